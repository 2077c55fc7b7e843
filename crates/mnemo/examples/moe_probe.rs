//! Diagnostic for the MoE balancing bias (README, "Load balance on the real corpus"): does a
//! bias fitted to K training windows, routed by the model as it stands, balance held-out text?
//!
//! For a checkpoint of an MoE run it prints, per routed layer, the max share over the mean
//! (max/min) on 256 validation windows and on 256 random held-out training windows with the
//! bias the run carries, with a bias fitted to the validation windows themselves (what the fit
//! can reach on the sample it sees), and, for K = 8, 32, 128 random training windows (3 draws
//! each), with a bias fitted to those (`moe::fit_bias`, 16 Sinkhorn rounds + 8 hard sweeps,
//! from the run's bias; STRIDE=s keeps every s-th token of the sample, like `bias_fit_stride`).
//!
//! Usage: `MNEMO_CACHE=… cargo run --release --example moe_probe -- RUN_DIR` (the run's
//! `state.json` names its corpus).
mod common;

use anyhow::Context;
use mnemo::model::Workspace;
use mnemo::moe::{load_stats, topk_load};

fn main() -> anyhow::Result<()> {
    let run_dir = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: moe_probe RUN_DIR")?,
    );
    let r = common::Run::open(&run_dir, false)?;
    let (cache, model) = (&r.cache, r.model());
    let t = r.run.train.seq_len;
    let (e, k) = (model.cfg.n_routed_experts, model.cfg.top_k);
    let routed = model.routed_moe_layers();
    let mut ws = Workspace::default();
    let collect = |split: &mnemo::data::TokenSplit, starts: &[usize], ws: &mut Workspace| {
        common::router_scores(model, split, starts, t, 8, ws)
    };
    let val_starts = mnemo::data::eval_windows(&cache.val, t, 256);
    let val = collect(&cache.val, &val_starts, &mut ws);
    let ntr = cache.train.tokens().len();
    let mut rng = 12345u64;
    let mut rand = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // held-out training windows (random)
    let ho: Vec<usize> = (0..256)
        .map(|_| (rand() % (ntr - t - 1) as u64) as usize)
        .collect();
    let hot = collect(&cache.train, &ho, &mut ws);
    let biases = r.biases();
    let bias_of = |l: usize| biases[l].clone();
    for &l in &routed {
        let b0 = bias_of(l);
        println!(
            "layer {l}: current bias  val {:.2}/{:.2}  train-heldout {:.2}/{:.2}",
            load_stats(&topk_load(&val[l], &b0, k)).0,
            load_stats(&topk_load(&val[l], &b0, k)).1,
            load_stats(&topk_load(&hot[l], &b0, k)).0,
            load_stats(&topk_load(&hot[l], &b0, k)).1
        );
        let mut bv = b0.clone();
        mnemo::moe::fit_bias(&mut bv, &val[l], k, 16, 8);
        println!(
            "   fit to val itself: val {:.2}  train-heldout {:.2}",
            load_stats(&topk_load(&val[l], &bv, k)).0,
            load_stats(&topk_load(&hot[l], &bv, k)).0
        );
    }
    for kwin in [8usize, 32, 128] {
        for rep in 0..3 {
            let starts: Vec<usize> = (0..kwin)
                .map(|_| (rand() % (ntr - t - 1) as u64) as usize)
                .collect();
            let tr = collect(&cache.train, &starts, &mut ws);
            let mut line = format!("K={kwin:4} rep {rep}:");
            for &l in &routed {
                let mut b = bias_of(l);
                let stride: usize = std::env::var("STRIDE")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                let sub: Vec<f32> = tr[l]
                    .chunks_exact(e)
                    .step_by(stride)
                    .flatten()
                    .copied()
                    .collect();
                mnemo::moe::fit_bias(&mut b, &sub, k, 16, 8);
                line += &format!(
                    "  L{l} val {:.2} ho {:.2}",
                    load_stats(&topk_load(&val[l], &b, k)).0,
                    load_stats(&topk_load(&hot[l], &b, k)).0
                );
            }
            println!("{line}");
        }
    }
    Ok(())
}
