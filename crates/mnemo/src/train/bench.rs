//! Benchmarks of training: full training steps on random tokens (one model, or several
//! interleaved step by step so that load from other processes hits all alike), and the
//! forward throughput of a large Engram table in RAM vs memory-mapped.

use super::start::new_table_opt;
use super::step::optimizer_step;
use crate::config::ModelConfig;
use crate::engram::{SparseAdam, SparseGrad};
use crate::kernels::adamw::AdamWParams;
use crate::model::{Model, Workspace};
use crate::prof;
use crate::rng::Rng;
use crate::util::det_sum_sq;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// Timing of synthetic training steps (random tokens), for the benchmark against PyTorch.
#[derive(Debug, Serialize)]
pub struct StepBench {
    pub implementation: &'static str,
    /// Which model of an interleaved comparison.
    pub label: String,
    pub threads: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub params: usize,
    /// Engram table values (outside `params`).
    pub engram_table_params: usize,
    /// A memory-only fine-tuning step (frozen backbone, tables only).
    pub frozen_backbone: bool,
    pub step_ms_median: f64,
    pub step_ms_all: Vec<f64>,
    /// CPU time (all threads) per step, median, from `/proc/self/stat` (10 ms resolution);
    /// less sensitive than wall-clock time to other processes on a shared machine.
    pub step_cpu_ms_median: Option<f64>,
    pub step_cpu_ms_all: Vec<f64>,
    /// The model's residual kind (`plain`, `hc`, `mhc`) and stream count.
    pub residual: crate::config::Residual,
    pub hc_mult: usize,
    pub gflop_per_step: f64,
    pub achieved_gflops: f64,
    /// Milliseconds per phase of one step: forward, backward, optimizer (median over steps).
    pub phase_ms: serde_json::Value,
    /// With [`crate::prof`] spans on (`--profile`): milliseconds per span per step (median over
    /// steps), over forward + backward + optimizer (the standalone forward is not counted).
    /// Spans nest: `attn.sublayer.fwd` holds `attn.fwd` (the rest is norm + residual mixing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile_ms: Option<serde_json::Map<String, serde_json::Value>>,
    /// With `--profile`: the step's matrix products (balancing sample forward included)
    /// against their floor, each shape timed alone ([`super::bench_gemm`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gemm_floor: Option<super::bench_gemm::GemmFloor>,
}

/// Run `warmup + steps` full training steps (forward, backward, clip, AdamW) on random tokens.
pub fn bench_steps(
    cfg: &ModelConfig,
    b: usize,
    t: usize,
    steps: usize,
    warmup: usize,
    seed: u64,
) -> Result<StepBench> {
    let v = BenchVariant {
        label: "model".into(),
        cfg: cfg.clone(),
        frozen_backbone: false,
    };
    let mut r = bench_steps_interleaved(&[v], b, t, steps, warmup, seed)?;
    Ok(r.remove(0))
}

/// Forward throughput of an Engram model whose tables are far larger than the CPU caches, with
/// the tables in RAM vs memory-mapped from a file (spec: offload), measured interleaved.
#[derive(Debug, Serialize)]
pub struct OffloadBench {
    pub table_bytes: u64,
    pub table_rows: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub reps: usize,
    pub file: String,
    /// Wall time of each forward, ms.
    pub ram_ms_all: Vec<f64>,
    pub mapped_ms_all: Vec<f64>,
    /// CPU time (all threads, 10 ms resolution) of each forward, ms: less sensitive to other
    /// processes than wall time.
    pub ram_cpu_ms_all: Vec<f64>,
    pub mapped_cpu_ms_all: Vec<f64>,
    /// Wall time of the Engram lookup alone (compress, hash, gather: the part that differs),
    /// run just before each forward, ms.
    pub ram_gather_ms_all: Vec<f64>,
    pub mapped_gather_ms_all: Vec<f64>,
    /// `mapped / ram − 1` of the median forward CPU time, in percent.
    pub mapped_overhead_cpu_pct: f64,
    /// Median gather time as a share of the median forward wall time (RAM, mapped), percent.
    pub gather_share_pct: [f64; 2],
    pub ram_tokens_per_s_median: f64,
    pub mapped_tokens_per_s_median: f64,
    /// `mapped / ram − 1` of the median forward time, in percent.
    pub mapped_overhead_pct: f64,
    /// The same over the per-repetition ratios (each pair ran back to back), median.
    pub mapped_overhead_pct_paired_median: f64,
}

/// [`OffloadBench`]: scale `cfg`'s Engram tables (rows per order and head) to about
/// `table_bytes` in total, write them to a file in `dir` (deleted at the end), and time
/// `reps` forward passes of `b × t` fresh random tokens with the RAM tables and with the
/// mapped file, alternating (RAM, mapped, RAM, mapped, …: the same tokens for both of a pair).
/// The mapped file is in the page cache (just written): this is host memory through a file
/// mapping (minor page faults, 4 KiB pages), not disk.
pub fn bench_offload(
    cfg: &ModelConfig,
    table_bytes: u64,
    b: usize,
    t: usize,
    reps: usize,
    dir: &Path,
    seed: u64,
) -> Result<OffloadBench> {
    let mut cfg = cfg.clone();
    let e = cfg
        .engram
        .as_mut()
        .context("bench engram-offload needs a model with Engram (e.g. --preset tiny-engram)")?;
    let orders = e.max_ngram_size - 1;
    let per_head =
        table_bytes / (4 * e.head_dim * e.n_head_per_ngram * orders * e.layer_ids.len()) as u64;
    e.vocab_size_per_ngram = vec![per_head.max(16); orders];
    cfg.validate()?;
    let mut model = Model::new(cfg.clone())?;
    model.init(seed);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let eng = model.engram.as_mut().context("engram")?;
    let mut mapped = Vec::new();
    let mut files = Vec::new();
    for (i, l) in eng.layers.iter().enumerate() {
        let p = dir.join(format!("offload-bench-{}-{i}.f32", std::process::id()));
        l.table.write_file(&p)?;
        mapped.push(crate::engram::EngramTable::open_mapped(
            &p,
            l.table.rows(),
            l.table.dim(),
            false,
        )?);
        files.push(p);
    }
    let rows: usize = eng.layers.iter().map(|l| l.table.rows()).sum();
    let bytes: u64 = eng.layers.iter().map(|l| l.table.bytes()).sum();
    let vocab = eng.compress.tokenizer_vocab_size().min(cfg.vocab_size);
    type Times = [Vec<f64>; 6];
    let result = (|| -> Result<Times> {
        let mut rng = Rng::new(seed);
        let mut ws = Workspace::default();
        let mut tm: Times = Default::default();
        let swap = |model: &mut Model, other: &mut Vec<crate::engram::EngramTable>| {
            if let Some(e) = model.engram.as_mut() {
                for (l, o) in e.layers.iter_mut().zip(other.iter_mut()) {
                    std::mem::swap(&mut l.table, o);
                }
            }
        };
        // One untimed pass each (workspace allocation).
        let x: Vec<u32> = (0..b * t).map(|_| rng.below(vocab as u64) as u32).collect();
        for rep in 0..=reps {
            let x = if rep == 0 {
                x.clone()
            } else {
                (0..b * t).map(|_| rng.below(vocab as u64) as u32).collect()
            };
            // Other tokens for the lookup timed alone, so that the forward's rows stay cold.
            let xg: Vec<u32> = (0..b * t).map(|_| rng.below(vocab as u64) as u32).collect();
            for is_mapped in [false, true] {
                if is_mapped {
                    swap(&mut model, &mut mapped);
                }
                let g0 = Instant::now();
                let lookup = model.engram.as_ref().map(|e| {
                    let pos = crate::engram::positions_in_documents(&xg, b, t, None);
                    e.lookup_all(&e.compress.compress(&xg), &pos)
                });
                let gather_ms = g0.elapsed().as_secs_f64() * 1e3;
                let c0 = crate::util::process_cpu_seconds();
                let t0 = Instant::now();
                let r = model.try_forward(&x, b, t, &mut ws);
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                let cpu = c0
                    .zip(crate::util::process_cpu_seconds())
                    .map_or(f64::NAN, |(a, b)| (b - a) * 1e3);
                if is_mapped {
                    swap(&mut model, &mut mapped);
                }
                r?;
                lookup.transpose()?;
                if rep > 0 {
                    let k = usize::from(is_mapped);
                    tm[k].push(ms);
                    tm[2 + k].push(cpu);
                    tm[4 + k].push(gather_ms);
                }
            }
        }
        Ok(tm)
    })();
    drop(mapped);
    for p in &files {
        let _ = std::fs::remove_file(p);
    }
    let [ram_ms, map_ms, ram_cpu, map_cpu, ram_g, map_g] = result?;
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let paired: Vec<f64> = ram_ms
        .iter()
        .zip(&map_ms)
        .map(|(r, m)| m / r - 1.0)
        .collect();
    let (r, m) = (med(&ram_ms), med(&map_ms));
    let toks = (b * t) as f64;
    Ok(OffloadBench {
        table_bytes: bytes,
        table_rows: rows,
        batch: b,
        seq_len: t,
        reps,
        file: dir.display().to_string(),
        ram_tokens_per_s_median: toks / (r / 1e3),
        mapped_tokens_per_s_median: toks / (m / 1e3),
        mapped_overhead_pct: 100.0 * (m / r - 1.0),
        mapped_overhead_pct_paired_median: 100.0 * med(&paired),
        mapped_overhead_cpu_pct: 100.0 * (med(&map_cpu) / med(&ram_cpu) - 1.0),
        gather_share_pct: [100.0 * med(&ram_g) / r, 100.0 * med(&map_g) / m],
        ram_cpu_ms_all: ram_cpu,
        mapped_cpu_ms_all: map_cpu,
        ram_gather_ms_all: ram_g,
        mapped_gather_ms_all: map_g,
        ram_ms_all: ram_ms,
        mapped_ms_all: map_ms,
    })
}

/// One model of [`bench_steps_interleaved`].
#[derive(Clone, Debug)]
pub struct BenchVariant {
    pub label: String,
    pub cfg: ModelConfig,
    /// Time the memory-only fine-tuning step (`--train-only engram`): frozen backbone (no
    /// weight gradients below/outside Engram, no AdamW step), tables only.
    pub frozen_backbone: bool,
}

/// Time training steps of several models in turn (step 1 of each, then step 2 of each, …), so
/// that load from other processes hits all of them alike. A step is what `mnemo train` does:
/// forward + backward, global-norm clip (flat gradients and the Engram tables' sparse ones),
/// AdamW on the flat parameters (skipped for a frozen backbone), the MoE bias update, and the
/// Engram tables' lazy Adam over the rows the batch touched.
pub fn bench_steps_interleaved(
    variants: &[BenchVariant],
    b: usize,
    t: usize,
    steps: usize,
    warmup: usize,
    seed: u64,
) -> Result<Vec<StepBench>> {
    struct Run {
        model: Model,
        x: Vec<u32>,
        y: Vec<u32>,
        grads: Vec<f32>,
        m: Vec<f32>,
        v: Vec<f32>,
        table_opt: Vec<SparseAdam>,
        ws: Workspace,
        pools: Vec<crate::moe::BiasPool>,
        sample_ws: Workspace,
        rng: Rng,
        vocab: usize,
        times: Vec<f64>,
        cpu: Vec<f64>,
        fwd_t: Vec<f64>,
        bwd_t: Vec<f64>,
        opt_t: Vec<f64>,
        prof: Vec<Vec<(&'static str, f64, u64)>>,
        gemms: Vec<(prof::GemmShape, f64, u64)>,
    }
    let profile = prof::enabled();
    prof::take();
    let mut runs = Vec::new();
    for var in variants {
        let cfg = &var.cfg;
        let mut model = Model::new(cfg.clone())?;
        model.init(seed);
        let mut rng = Rng::new(seed);
        let n = b * t;
        // Token ids inside the Engram compression table when there is one.
        let vocab = model
            .engram
            .as_ref()
            .map_or(cfg.vocab_size, |e| e.compress.tokenizer_vocab_size())
            .min(cfg.vocab_size);
        let x: Vec<u32> = (0..n).map(|_| rng.below(vocab as u64) as u32).collect();
        let y: Vec<u32> = (0..n).map(|_| rng.below(vocab as u64) as u32).collect();
        let grads = vec![0.0f32; model.layout.total];
        // MTP blocks train (and run in the balancing sample) with the default weight.
        let mtp_weight = crate::config::TrainConfig::default().mtp_weight;
        let ws = Workspace {
            frozen_backbone: var.frozen_backbone,
            mtp_weight,
            ..Workspace::default()
        };
        runs.push(Run {
            table_opt: new_table_opt(&model),
            pools: model.new_moe_pools(),
            sample_ws: Workspace {
                mtp_weight,
                ..Workspace::headless()
            },
            rng,
            vocab,
            model,
            x,
            y,
            m: vec![0.0f32; grads.len()],
            v: vec![0.0f32; grads.len()],
            grads,
            ws,
            times: vec![],
            cpu: vec![],
            fwd_t: vec![],
            bwd_t: vec![],
            opt_t: vec![],
            prof: vec![],
            gemms: vec![],
        });
    }
    for i in 0..warmup + steps {
        for (r, var) in runs.iter_mut().zip(variants) {
            let t0 = Instant::now();
            r.grads.fill(0.0);
            prof::enable(false);
            prof::log_gemms(false);
            r.model.try_forward(&r.x, b, t, &mut r.ws)?;
            prof::enable(profile);
            prof::log_gemms(profile);
            let t1 = Instant::now();
            let c1 = crate::util::process_cpu_seconds();
            // forward_backward repeats the forward; time it separately and subtract.
            r.model
                .try_forward_backward(&r.x, &r.y, b, t, &mut r.grads, 1.0, &mut r.ws)?;
            let t2 = Instant::now();
            let clip = prof::span("clip");
            let mut tgrads = r.ws.engram_table_grads.clone();
            let table_sq: f64 = tgrads.iter().map(SparseGrad::sum_sq).sum();
            let gn = (det_sum_sq(&r.grads) + table_sq).sqrt();
            if gn > 1.0 {
                let s = (1.0 / gn) as f32;
                crate::util::scale_in_place(&mut r.grads, s);
                tgrads.iter_mut().for_each(|g| g.scale(s));
            }
            drop(clip);
            let hp = AdamWParams {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
            };
            if !var.frozen_backbone {
                let s = prof::span("adamw");
                optimizer_step(&mut r.model, &r.grads, &mut r.m, &mut r.v, hp, i as u64 + 1);
                drop(s);
                let loads: Vec<Option<Vec<u64>>> =
                    r.ws.moe_loads()
                        .into_iter()
                        .map(|l| l.map(<[u64]>::to_vec))
                        .collect();
                // The balancing as in training: the sign step and the refit, its pool filled
                // with this step's batch (the first step fills the whole window, so that every
                // timed step fits a full pool).
                let fill = if i == 0 {
                    r.model.cfg.bias_fit_window.max(1)
                } else {
                    1
                };
                let len = r.model.cfg.bias_fit_sample_len;
                let n = if r.model.routed_moe_layers().is_empty() {
                    0
                } else {
                    r.model.cfg.bias_fit_sample
                };
                // The balancing's own forward passes are its time, not the model's spans'.
                let s = prof::span("moe.balance.sample");
                prof::enable(false);
                for _ in 0..fill {
                    if n > 0 {
                        // The fresh sample of random tokens, as long as training's.
                        let xs: Vec<u32> = (0..n * len)
                            .map(|_| r.rng.below(r.vocab as u64) as u32)
                            .collect();
                        r.model.try_forward(&xs, n, len, &mut r.sample_ws)?;
                        r.model.push_moe_pools(&mut r.pools, &r.sample_ws);
                    } else {
                        r.model.push_moe_pools(&mut r.pools, &r.ws);
                    }
                }
                prof::enable(profile);
                drop(s);
                let _s = prof::span("moe.balance.fit");
                r.model.balance_moe(&loads, &r.ws, &r.pools, i as u64 + 1);
            }
            if let Some(e) = r.model.engram.as_mut() {
                let th = e.cfg.table_optimizer();
                for ((layer, opt), g) in e.layers.iter_mut().zip(&mut r.table_opt).zip(&tgrads) {
                    opt.update(&mut layer.table, g, hp.lr, &th)?;
                }
            }
            let t3 = Instant::now();
            if i < warmup {
                prof::take();
                prof::take_gemms();
            }
            if i >= warmup {
                let f = (t1 - t0).as_secs_f64() * 1e3;
                let fb = (t2 - t1).as_secs_f64() * 1e3;
                let o = (t3 - t2).as_secs_f64() * 1e3;
                r.fwd_t.push(f);
                r.bwd_t.push(fb - f);
                r.opt_t.push(o);
                r.times.push(fb + o);
                r.prof.push(prof::take());
                super::bench_gemm::merge(&mut r.gemms, prof::take_gemms());
                if let (Some(a), Some(b)) = (c1, crate::util::process_cpu_seconds()) {
                    r.cpu.push((b - a) * 1e3);
                }
            }
        }
    }
    prof::log_gemms(false);
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut out = Vec::new();
    for (mut r, var) in runs.into_iter().zip(variants) {
        let cfg = &var.cfg;
        let all = r.times.clone();
        let step_ms = med(&mut r.times);
        let gflop = cfg.train_flops(b, t) / 1e9;
        out.push(StepBench {
            implementation: "mnemo",
            label: var.label.clone(),
            threads: rayon::current_num_threads(),
            batch: b,
            seq_len: t,
            params: r.model.layout.total,
            engram_table_params: r
                .model
                .engram
                .as_ref()
                .map_or(0, |e| e.layers.iter().map(|l| l.table.rows() * l.table.dim()).sum()),
            frozen_backbone: var.frozen_backbone,
            step_ms_median: step_ms,
            step_ms_all: all,
            step_cpu_ms_median: (!r.cpu.is_empty()).then(|| med(&mut r.cpu)),
            step_cpu_ms_all: r.cpu.clone(),
            residual: cfg.residual,
            hc_mult: cfg.hc_mult,
            gflop_per_step: gflop,
            achieved_gflops: gflop / (step_ms / 1e3),
            phase_ms: serde_json::json!({"forward": med(&mut r.fwd_t), "backward": med(&mut r.bwd_t), "optimizer": med(&mut r.opt_t)}),
            profile_ms: profile.then(|| profile_medians(&r.prof)),
            gemm_floor: profile
                .then(|| super::bench_gemm::floor(&r.gemms, steps, rayon::current_num_threads())),
        });
    }
    Ok(out)
}

/// Per span name, the median over steps of its milliseconds in a step (0 in a step without
/// it), in first-seen order.
fn profile_medians(
    steps: &[Vec<(&'static str, f64, u64)>],
) -> serde_json::Map<String, serde_json::Value> {
    let mut names: Vec<&'static str> = vec![];
    for st in steps {
        for (n, _, _) in st {
            if !names.contains(n) {
                names.push(n);
            }
        }
    }
    names
        .into_iter()
        .map(|n| {
            let mut v: Vec<f64> = steps
                .iter()
                .map(|st| st.iter().find(|e| e.0 == n).map_or(0.0, |e| e.1))
                .collect();
            v.sort_by(|a, b| a.total_cmp(b));
            (n.to_string(), serde_json::json!(v[v.len() / 2]))
        })
        .collect()
}
