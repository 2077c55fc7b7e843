//! Diagnostic for the MoE balancing sample (README, "Load balance on the real corpus"): how
//! much of the held-out imbalance comes from fitting the bias to router inputs that older
//! models computed?
//!
//! For a checkpoint of an MoE run (saved with its optimizer state, so that the refit pool is
//! there) it routes the 64 validation windows that training evaluates on, and prints the worst
//! routed layer's max share over the mean with a bias fitted (`moe::fit_bias`, 16 Sinkhorn
//! rounds + 8 hard sweeps) to:
//! - the run's pool as saved (router inputs of older steps, re-scored by the current router),
//!   also with two level corrections (a per-expert linear trend over the batches' ages, and a
//!   shift to the newest batch's mean scores);
//! - the same training windows (and sampled rows) forwarded again by the checkpoint's model
//!   (fresh inputs), and the pool with the per-expert mean shift to those (does a level shift
//!   explain the drift?); the next step's batch alone, fresh, and the pool shifted to its mean;
//! - the same windows forwarded by the models of other checkpoints `OLDER…` of the same run and
//!   scored by the current router (what inputs a given number of steps old do);
//! - fresh random training windows of several counts and lengths (what a sample forwarded after
//!   the step can reach at a given forward cost).
//!
//! Usage: `MNEMO_CACHE=… cargo run --release --example moe_staleness -- RUN_DIR [OLDER…]`
//! (`SKIP_POOL=1` for a checkpoint without optimizer state; the run's `state.json` names its
//! corpus, and the training windows of each step are redrawn from its seed).
mod common;

use anyhow::Context;
use mnemo::model::{Ffn, Workspace};
use mnemo::moe::{load_stats, topk_load};

fn means(sc: &[f32], e: usize) -> Vec<f64> {
    let mut m = vec![0.0; e];
    let n = sc.len() / e;
    for r in sc.chunks_exact(e) {
        for j in 0..e {
            m[j] += r[j] as f64;
        }
    }
    m.iter().map(|v| v / n as f64).collect()
}

fn main() -> anyhow::Result<()> {
    let run_dir = std::path::PathBuf::from(std::env::args().nth(1).context("RUN_DIR")?);
    let r = common::Run::open(&run_dir, std::env::var("SKIP_POOL").is_err())?;
    let (l, run, cache) = (&r.loaded, &r.run, &r.cache);
    let (b, t) = (run.train.batch_size, run.train.seq_len);
    let step = r.step as usize;
    let model = &l.model;
    let pools = l.moe_pools.clone().unwrap_or_default();
    let (e, k) = (model.cfg.n_routed_experts, model.cfg.top_k);
    let routed = model.routed_moe_layers();
    let mut ws = Workspace::default();
    // Router scores per layer and batch of `b` windows starting at `starts`, keeping every
    // `stride`-th token from offset `offset(i)` in batch `i` (as `moe::BiasPool::push` does).
    let collect = |split: &mnemo::data::TokenSplit,
                   starts: &[usize],
                   ws: &mut Workspace,
                   stride: usize,
                   offset: &dyn Fn(usize) -> usize| {
        let toks = split.tokens();
        let mut out: Vec<Vec<Vec<f32>>> = vec![Vec::new(); model.layout.layers.len()];
        for (i, ch) in starts.chunks(b).enumerate() {
            let mut x = Vec::new();
            for &s in ch {
                x.extend_from_slice(&toks[s..s + t]);
            }
            model.forward(&x, ch.len(), t, ws);
            for (l, sc) in ws.moe_scores().iter().enumerate() {
                out[l].push(
                    sc.chunks_exact(e.max(1))
                        .skip(offset(i))
                        .step_by(stride)
                        .flatten()
                        .copied()
                        .collect(),
                );
            }
        }
        out
    };
    let val_starts = mnemo::data::eval_windows(&cache.val, t, 64);
    let val: Vec<Vec<f32>> = collect(&cache.val, &val_starts, &mut ws, 1, &|_| 0)
        .into_iter()
        .map(|v| v.concat())
        .collect();
    let ntr = cache.train.tokens().len();
    let mut rng = mnemo::rng::Rng::derived(run.train.seed, "data");
    let mut hist: Vec<Vec<usize>> = Vec::new();
    for _ in 0..step + 1 {
        hist.push(
            (0..b)
                .map(|_| rng.below((ntr - t) as u64) as usize)
                .collect(),
        );
    }
    let biases = r.biases();
    let bias_of = |l: usize| biases[l].clone();
    let worst = |name: &str, f: &dyn Fn(usize) -> Vec<f32>| {
        let v: Vec<f64> = routed
            .iter()
            .map(|&l| load_stats(&topk_load(&val[l], &f(l), k)).0)
            .collect();
        let w = v.iter().cloned().fold(0.0, f64::max);
        println!(
            "step {step}: {name:40} worst {w:.2} [{}]",
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    };
    let fit = |l: usize, sc: &[f32]| {
        let mut bb = bias_of(l);
        mnemo::moe::fit_bias(&mut bb, sc, k, 16, 8);
        bb
    };
    // The pool and OLDER rows redraw the run's training windows: only for runs whose pool held
    // the training batches of one micro-batch per step, without synthetic rows.
    let redraw_ok = run.train.grad_accum == 1
        && run.train.synthetic.is_none()
        && model.cfg.bias_fit_sample == 0
        && model.cfg.bias_fit_window > 0;
    if !redraw_ok {
        println!(
            "(no pool/OLDER rows: they need bias_fit_sample = 0, bias_fit_window > 0, grad_accum = 1 and no synthetic rows)"
        );
    }
    // The pool's sampling offsets: batch i (oldest first) of nb was pushed with offset
    // (next − nb + i) mod stride.
    let stride = model.cfg.bias_fit_stride.max(1);
    let nb = pools.get(routed[0]).map_or(0, |p| p.len());
    let next_off = pools.get(routed[0]).map_or(0, |p| p.to_parts().2);
    let pool_off = move |i: usize| (next_off + stride * (nb + 1) - nb + i) % stride;
    if redraw_ok && std::env::var("SKIP_POOL").is_err() {
        // stale pool per batch, scored by current router: [layer][batch] oldest first
        let stale: Vec<Vec<Vec<f32>>> = (0..model.layout.layers.len())
            .map(|l| {
                pools[l]
                    .batches()
                    .map(|bt| {
                        mnemo::moe::router_scores(
                            &mnemo::moe::MoeSpec::new(&model.cfg),
                            &model.params,
                            &match model.layout.layers[l].ffn {
                                Ffn::Moe(mo) => mo,
                                _ => unreachable!(),
                            },
                            bt,
                        )
                    })
                    .collect()
            })
            .collect::<Vec<_>>();
        worst("run bias", &|l| bias_of(l));
        worst("fit stale pool", &|l| fit(l, &stale[l].concat()));
        // detrend: regress per-batch per-expert means on age
        let detrend = |l: usize, newest_only: bool| -> Vec<f32> {
            let bs = &stale[l];
            let nb = bs.len();
            let ages: Vec<f64> = (0..nb).map(|i| (nb - i) as f64).collect();
            let ms: Vec<Vec<f64>> = bs.iter().map(|s| means(s, e)).collect();
            let abar = ages.iter().sum::<f64>() / nb as f64;
            let mut out = Vec::new();
            for (i, s) in bs.iter().enumerate() {
                for r in s.chunks_exact(e) {
                    for j in 0..e {
                        let mbar = ms.iter().map(|m| m[j]).sum::<f64>() / nb as f64;
                        let beta = if newest_only {
                            0.0
                        } else {
                            let num: f64 =
                                (0..nb).map(|q| (ages[q] - abar) * (ms[q][j] - mbar)).sum();
                            let den: f64 = (0..nb).map(|q| (ages[q] - abar).powi(2)).sum();
                            num / den
                        };
                        let shift = if newest_only {
                            ms[nb - 1][j] - mbar
                        } else {
                            -beta * ages[i]
                        };
                        out.push(r[j] + shift as f32);
                    }
                }
            }
            fit(l, &out)
        };
        worst("detrended stale pool (linear, to age 0)", &|l| {
            detrend(l, false)
        });
        worst("stale pool shifted to newest batch mean", &|l| {
            detrend(l, true)
        });
        // The pool's scores shifted per expert so that their means are `target`.
        let shift_to = |sc: &[f32], target: &[f64]| -> Vec<f32> {
            let m = means(sc, e);
            sc.chunks_exact(e)
                .flat_map(|r| {
                    (0..e)
                        .map(|j| r[j] + (target[j] - m[j]) as f32)
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        // oracle: fresh versions of the pool's windows
        let lo = step - nb;
        let starts: Vec<usize> = hist[lo..step].iter().flatten().copied().collect();
        let fresh = collect(&cache.train, &starts, &mut ws, stride, &pool_off);
        worst("fresh pool windows", &|l| fit(l, &fresh[l].concat()));
        worst("stale pool + oracle level shift", &|l| {
            let fm = means(&fresh[l].concat(), e);
            fit(l, &shift_to(&stale[l].concat(), &fm))
        });
        // next batch (fresh, under this model): what an in-forward fit would see
        let next = collect(&cache.train, &hist[step], &mut ws, 1, &|_| 0);
        worst("fresh next batch only", &|l| fit(l, &next[l].concat()));
        worst("stale pool shifted to next batch mean", &|l| {
            let fm = means(&next[l].concat(), e);
            fit(l, &shift_to(&stale[l].concat(), &fm))
        });
    }
    for older in std::env::args().skip(2).filter(|_| redraw_ok) {
        let lo_m = mnemo::checkpoint::load(std::path::Path::new(&older), false)?;
        let ostep = lo_m.state.as_ref().map_or(0, |s| s.step);
        // The pool's windows (or the last 16 batches' without a saved pool).
        let w = if nb > 0 { nb } else { 16 };
        let from = step.saturating_sub(w);
        let starts: Vec<usize> = hist[from..step].iter().flatten().copied().collect();
        let toks = cache.train.tokens();
        let mut sc: Vec<Vec<f32>> = vec![Vec::new(); model.layout.layers.len()];
        for (i, ch) in starts.chunks(b).enumerate() {
            let mut x = Vec::new();
            for &s in ch {
                x.extend_from_slice(&toks[s..s + t]);
            }
            lo_m.model.forward(&x, ch.len(), t, &mut ws);
            for (l, v) in model.moe_rescore(&ws).iter().enumerate() {
                let off = if nb > 0 { pool_off(i) } else { 0 };
                sc[l].extend(
                    v.chunks_exact(e)
                        .skip(off)
                        .step_by(stride)
                        .flatten()
                        .copied(),
                );
            }
        }
        worst(&format!("pool windows, inputs of step {ostep}"), &|l| {
            fit(l, &sc[l])
        });
    }
    let mut r2 = mnemo::rng::Rng::new(7);
    for (nw, len) in [
        (8usize, 256usize),
        (16, 32),
        (32, 16),
        (64, 16),
        (128, 16),
        (32, 64),
        (64, 32),
        (128, 32),
    ] {
        for rep in 0..2 {
            let toks = cache.train.tokens();
            let mut sc: Vec<Vec<f32>> = vec![Vec::new(); model.layout.layers.len()];
            let starts: Vec<usize> = (0..nw)
                .map(|_| r2.below((ntr - len) as u64) as usize)
                .collect();
            let mut x = Vec::new();
            for &s in &starts {
                x.extend_from_slice(&toks[s..s + len]);
            }
            model.forward(&x, nw, len, &mut ws);
            for (l, v) in ws.moe_scores().iter().enumerate() {
                sc[l].extend_from_slice(v);
            }
            worst(
                &format!("fresh {nw} windows x {len} tokens (rep {rep})"),
                &|l| fit(l, &sc[l]),
            );
        }
    }
    Ok(())
}
