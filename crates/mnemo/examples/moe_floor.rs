//! Diagnostic for the MoE balancing bias (README, "Load balance on the real corpus"): how far
//! is the run's bias from the best a bias fitted to training text can do on held-out text, and
//! how low can the held-out load go at all at a given step?
//!
//! For each checkpoint it prints one JSON object: the step and, for three token sets, the
//! worst routed layer's max share over the mean under the run's bias (`run_*`) and under an
//! *oracle* bias (`oracle_*`) fitted (`moe::fit_bias`, 16 Sinkhorn rounds + 8 hard sweeps) to
//! 1,024 fresh random training windows of 32 tokens forwarded by the checkpoint's model (64×
//! the `small-moe` preset's per-step sample, and all of it fresh):
//! - `eval`: the validation windows of `seq_len` tokens that training routes at each evaluation
//!   (`batch_size × eval_batches` windows spread evenly over the validation split, 64 in
//!   `scripts/moe-floor.sh`: the `val_moe` load of the metrics);
//! - `val`: 1,024 random validation windows of 32 tokens (all of the split's files, by size);
//! - `train`: 1,024 other random training windows of 32 tokens.
//!
//! The same windows are drawn for every checkpoint. `FITS=1` adds fits to smaller fresh
//! samples (what a per-step sample of that size can reach), printed as extra lines.
//!
//! Usage: `MNEMO_CACHE=… cargo run --release --example moe_floor -- CHECKPOINT…` (run
//! directories or kept checkpoints, `--set train.keep_steps=[…]`; `scripts/moe-floor.sh`).
mod common;

use common::{fit_biases, random_starts, router_scores, worst_load, Run};
use mnemo::model::Workspace;

fn main() -> anyhow::Result<()> {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(!paths.is_empty(), "usage: moe_floor CHECKPOINT…");
    for p in &paths {
        let r = Run::open(std::path::Path::new(p), false)?;
        let model = r.model();
        anyhow::ensure!(
            !model.routed_moe_layers().is_empty(),
            "{p}: no routed MoE layer"
        );
        let (train, val) = (&r.cache.train, &r.cache.val);
        let mut ws = Workspace::default();
        let mut rng = mnemo::rng::Rng::new(99);
        let fit_set = random_starts(&mut rng, train, 1024, 32);
        let fit_sc = router_scores(model, train, &fit_set, 32, 64, &mut ws);
        let (b, t) = (r.run.train.batch_size, r.run.train.seq_len);
        // The windows `evaluate` routes: `eval_batches` batches of `batch_size` windows.
        let eval = mnemo::data::eval_windows(val, t, b * r.run.train.eval_batches);
        anyhow::ensure!(
            !eval.is_empty(),
            "{p}: the validation split is shorter than seq_len"
        );
        let sets = [
            ("eval", router_scores(model, val, &eval, t, b, &mut ws)),
            ("val", {
                let s = random_starts(&mut rng, val, 1024, 32);
                router_scores(model, val, &s, 32, 64, &mut ws)
            }),
            ("train", {
                let s = random_starts(&mut rng, train, 1024, 32);
                router_scores(model, train, &s, 32, 64, &mut ws)
            }),
        ];
        let run_bias = r.biases();
        let oracle = fit_biases(model, &fit_sc, &run_bias);
        let mut obj = serde_json::json!({"checkpoint": p, "step": r.step});
        for (name, sc) in &sets {
            let (w, per) = worst_load(model, sc, &run_bias);
            obj[format!("run_{name}")] = w.into();
            obj[format!("run_{name}_layers")] = per.into();
            obj[format!("oracle_{name}")] = worst_load(model, sc, &oracle).0.into();
        }
        println!("{obj}");
        if std::env::var("FITS").is_ok() {
            // Two draws of the preset's sample size, one of each larger size.
            for (draw, (n, len)) in [(32usize, 16usize), (32, 16), (64, 16), (128, 16), (256, 16)]
                .into_iter()
                .enumerate()
            {
                let s = random_starts(&mut rng, train, n, len);
                let sc = router_scores(model, train, &s, len, 64, &mut ws);
                let b = fit_biases(model, &sc, &run_bias);
                let w: Vec<String> = sets
                    .iter()
                    .map(|(name, x)| format!("{name} {:.2}", worst_load(model, x, &b).0))
                    .collect();
                println!(
                    "  step {} fresh {n}x{len} (draw {draw}): {}",
                    r.step,
                    w.join(", ")
                );
            }
        }
    }
    Ok(())
}
