//! Diagnostic for the MoE balancing bias (README, "Load balance on the real corpus"): how far
//! is the run's bias from the best a bias fitted to training text can do on held-out text, and
//! how low can the held-out load go at all at a given step?
//!
//! For each checkpoint it prints one JSON object: the step and, for three token sets, the
//! worst routed layer's max share over the mean under the run's bias (`run_*`) and under an
//! *oracle* bias (`oracle_*`) fitted (`moe::fit_bias`, 16 Sinkhorn rounds + 8 hard sweeps) to
//! 1,024 fresh random training windows of 32 tokens forwarded by the checkpoint's model (64×
//! the `small-moe` preset's per-step sample, and all of it fresh). A layer's router inputs
//! depend on how the layers before it route, so the oracle is refitted once to the inputs
//! computed with the earlier layers routing by the first fit, and each bias is evaluated on
//! inputs computed under itself. The token sets:
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

use common::{fit_biases, random_starts, router_scores, set_biases, worst_load, Run};
use mnemo::model::{Model, Workspace};

fn main() -> anyhow::Result<()> {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(!paths.is_empty(), "usage: moe_floor CHECKPOINT…");
    for p in &paths {
        let r = Run::open(std::path::Path::new(p), false)?;
        anyhow::ensure!(
            !r.model().routed_moe_layers().is_empty(),
            "{p}: no routed MoE layer"
        );
        // Training evaluates DSA models with their stage's attention; this routes dense.
        anyhow::ensure!(
            r.model().cfg.dsa.is_none(),
            "{p}: DSA models are not supported"
        );
        let run_bias = r.biases();
        let Run {
            loaded,
            run,
            step,
            cache,
        } = r;
        let mut model = loaded.model;
        let (train, val) = (&cache.train, &cache.val);
        let mut ws = Workspace::default();
        let mut rng = mnemo::rng::Rng::new(99);
        let (b, t) = (run.train.batch_size, run.train.seq_len);
        // The windows `evaluate` routes: `eval_batches` batches of `batch_size` windows.
        let eval = mnemo::data::eval_windows(val, t, b * run.train.eval_batches);
        anyhow::ensure!(
            !eval.is_empty(),
            "{p}: the validation split is shorter than seq_len"
        );
        let fit_set = random_starts(&mut rng, train, 1024, 32);
        let val_set = random_starts(&mut rng, val, 1024, 32);
        let train_set = random_starts(&mut rng, train, 1024, 32);
        // Router scores of the three sets with the model routing by its current biases.
        let sets = |model: &Model, ws: &mut Workspace| {
            [
                ("eval", router_scores(model, val, &eval, t, b, ws)),
                ("val", router_scores(model, val, &val_set, 32, 64, ws)),
                ("train", router_scores(model, train, &train_set, 32, 64, ws)),
            ]
        };
        let under_run = sets(&model, &mut ws);
        // The oracle: fitted to the fit set's router inputs, then refitted once to the inputs
        // the model computes when its earlier layers route by the first fit (a layer's inputs
        // depend on the routing before it), and evaluated on inputs computed under itself.
        let mut oracle = fit_biases(
            &model,
            &router_scores(&model, train, &fit_set, 32, 64, &mut ws),
            &run_bias,
        );
        set_biases(&mut model, &oracle);
        oracle = fit_biases(
            &model,
            &router_scores(&model, train, &fit_set, 32, 64, &mut ws),
            &oracle,
        );
        set_biases(&mut model, &oracle);
        let under_oracle = sets(&model, &mut ws);
        let mut obj = serde_json::json!({"checkpoint": p, "step": step});
        for ((name, sc), (_, so)) in under_run.iter().zip(&under_oracle) {
            let (w, per) = worst_load(&model, sc, &run_bias);
            obj[format!("run_{name}")] = w.into();
            obj[format!("run_{name}_layers")] = per.into();
            obj[format!("oracle_{name}")] = worst_load(&model, so, &oracle).0.into();
        }
        println!("{obj}");
        set_biases(&mut model, &run_bias);
        let model = &model;
        if std::env::var("FITS").is_ok() {
            // Two draws of the preset's sample size, one of each larger size.
            for (draw, (n, len)) in [(32usize, 16usize), (32, 16), (64, 16), (128, 16), (256, 16)]
                .into_iter()
                .enumerate()
            {
                let s = random_starts(&mut rng, train, n, len);
                let sc = router_scores(model, train, &s, len, 64, &mut ws);
                let b = fit_biases(model, &sc, &run_bias);
                let w: Vec<String> = under_run
                    .iter()
                    .map(|(name, x)| format!("{name} {:.2}", worst_load(model, x, &b).0))
                    .collect();
                println!(
                    "  step {} fresh {n}x{len} (draw {draw}): {}",
                    step,
                    w.join(", ")
                );
            }
        }
    }
    Ok(())
}
