//! Validation: loss and bits per byte over fixed windows of the validation split (with the
//! indexer KL and recall of a DSA model and the expert load of MoE layers), and the periodic
//! validation of the training loop that logs them.

use super::log::{append_metrics, println_above};
use crate::config::DsaStage;
use crate::config::RunConfig;
use crate::data::{self, TokenSplit};
use crate::dsa::{DsaRun, DsaStats};
use crate::model::{Model, Workspace};
use anyhow::Result;
use std::path::Path;

/// Validation loss (nats/token) and bits per byte over fixed windows of `split`.
pub fn evaluate(
    model: &Model,
    split: &TokenSplit,
    b: usize,
    t: usize,
    batches: usize,
    ws: &mut Workspace,
) -> Option<(f64, f64)> {
    evaluate_with(model, split, b, t, batches, ws, None).map(|e| (e.loss, e.bpb))
}

/// What [`evaluate_with`] measures over the validation windows.
#[derive(Clone, Debug)]
pub struct EvalOut {
    /// Mean loss, nats/token.
    pub loss: f64,
    /// Bits per byte of the raw text.
    pub bpb: f64,
    /// DSA models in a training mode: indexer KL and recall averaged over the batches.
    pub dsa: Option<DsaStats>,
    /// Per layer (`None` for dense layers): tokens each routed expert received over all the
    /// validation windows, routed with the current bias (the bias itself is not touched). This
    /// is the *global* expert load of DeepSeek's auxiliary-loss-free balancing paper (MaxVio
    /// on held-out text), independent of the composition of one small training batch.
    pub moe_loads: Vec<Option<Vec<u64>>>,
}

/// [`evaluate`], also returning the indexer KL and recall of a DSA model in a training mode
/// (`run`: dense or sparse attention) and the expert load of MoE layers over all windows.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_with(
    model: &Model,
    split: &TokenSplit,
    b: usize,
    t: usize,
    batches: usize,
    ws: &mut Workspace,
    run: Option<DsaRun>,
) -> Option<EvalOut> {
    let starts = data::eval_windows(split, t, batches * b);
    if starts.is_empty() {
        return None;
    }
    let toks = split.tokens();
    let (mut sum, mut count) = (0.0f64, 0usize);
    let (mut kl, mut recall, mut nb) = (0.0f64, 0.0f64, 0usize);
    let mut moe_loads: Vec<Option<Vec<u64>>> = Vec::new();
    for chunk in starts.chunks(b) {
        let mut x = Vec::with_capacity(chunk.len() * t);
        let mut y = Vec::with_capacity(chunk.len() * t);
        for &s in chunk {
            x.extend_from_slice(&toks[s..s + t]);
            y.extend_from_slice(&toks[s + 1..s + t + 1]);
        }
        match run {
            Some(r) => {
                model.forward_dsa(&x, chunk.len(), t, ws, r);
                kl += ws.dsa_stats.kl;
                recall += ws.dsa_stats.recall.unwrap_or(0.0);
                nb += 1;
            }
            None => model.forward(&x, chunk.len(), t, ws),
        }
        add_moe_loads(&mut moe_loads, ws);
        sum += model.loss(&y, ws) * y.len() as f64;
        count += y.len();
    }
    let loss = sum / count as f64;
    let bpb = loss / std::f64::consts::LN_2 * split.n_tokens as f64 / split.n_bytes.max(1) as f64;
    let stats = run.map(|r| DsaStats {
        kl: kl / nb as f64,
        recall: r.recall.then_some(recall / nb as f64),
    });
    Some(EvalOut {
        loss,
        bpb,
        dsa: stats,
        moe_loads,
    })
}

/// Entropy (nats/token) of the unigram distribution of `tokens`: the loss of a model that
/// ignores context, the bar a trained model must get well below.
pub fn unigram_entropy(tokens: &[u32], vocab: usize) -> f64 {
    let mut counts = vec![0u64; vocab.max(1)];
    for &t in tokens {
        if (t as usize) < counts.len() {
            counts[t as usize] += 1;
        }
    }
    let n = tokens.len().max(1) as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum()
}
/// Add the expert loads of the last forward pass (per layer; `None` for dense layers) to `acc`,
/// growing it to the model's layer count on first use.
pub(super) fn add_moe_loads(acc: &mut Vec<Option<Vec<u64>>>, ws: &Workspace) {
    let layer_loads = ws.moe_loads();
    if acc.len() < layer_loads.len() {
        acc.resize(layer_loads.len(), None);
    }
    for (a, l) in acc.iter_mut().zip(layer_loads) {
        if let Some(l) = l {
            let a = a.get_or_insert_with(|| vec![0; l.len()]);
            a.iter_mut().zip(l).for_each(|(a, b)| *a += b);
        }
    }
}

/// Per MoE layer: expert load (max and min share relative to the mean) and the range of the
/// balancing bias, as logged in `metrics.jsonl` (also printed by `mnemo eval`).
pub fn moe_stats(model: &Model, loads: &[Option<Vec<u64>>]) -> Option<serde_json::Value> {
    let rows: Vec<serde_json::Value> = loads
        .iter()
        .enumerate()
        .filter_map(|(l, load)| {
            let load = load.as_ref()?;
            let (mx, mn) = crate::moe::load_stats(load);
            let (bmin, bmax) = model.moe_bias_range(l).unwrap_or((0.0, 0.0));
            Some(serde_json::json!({"layer": l, "load_max": mx, "load_min": mn, "bias_min": bmin, "bias_max": bmax, "hash": model.cfg.is_hash(l), "load": load}))
        })
        .collect();
    (!rows.is_empty()).then_some(serde_json::Value::Array(rows))
}

/// The largest max-load ratio over the routed (non-hash) MoE layers.
pub(super) fn worst_load(model: &Model, loads: &[Option<Vec<u64>>]) -> Option<f64> {
    loads
        .iter()
        .enumerate()
        .filter(|(l, _)| !model.cfg.is_hash(*l))
        .filter_map(|(_, x)| x.as_ref())
        .map(|l| crate::moe::load_stats(l).0)
        .reduce(f64::max)
}

/// The validation of step `step` in the loop: evaluate `model` on `val` with the attention of
/// the DSA stage (dense before the sparse stage, with the indexer KL and recall), append
/// `{step, val_loss, val_bpb, …}` to `metrics_path` and print one line (`train_loss`: the
/// step's training loss, for comparison). `None` when `val` is shorter than one window.
#[allow(clippy::too_many_arguments)]
pub(super) fn validate(
    model: &Model,
    run: &RunConfig,
    val: &TokenSplit,
    ws: &mut Workspace,
    step: u64,
    train_loss: f64,
    metrics_path: &Path,
    pb: &indicatif::ProgressBar,
) -> Result<Option<(f64, f64)>> {
    let tc = &run.train;
    let (b, t) = (tc.batch_size, tc.seq_len);
    let loss = train_loss;
    // DSA: evaluate with the attention of the stage (dense before the sparse stage),
    // with the indexer KL and recall on the validation windows.
    let eval_run = run.model.has_indexer().then_some(DsaRun {
        stage: if tc.dsa_stage.is_sparse() {
            DsaStage::Sparse
        } else {
            DsaStage::Warmup
        },
        kl: true,
        recall: true,
    });
    let Some(ev) = evaluate_with(model, val, b, t, tc.eval_batches, ws, eval_run) else {
        return Ok(None);
    };
    let (vl, bpb) = (ev.loss, ev.bpb);
    let mut m = serde_json::json!({"step": step, "val_loss": vl, "val_bpb": bpb});
    let mut extra = String::new();
    if let Some(stats) = moe_stats(model, &ev.moe_loads) {
        m["val_moe"] = stats;
    }
    if let Some(w) = worst_load(model, &ev.moe_loads) {
        extra = format!(", max expert load {w:.2}x mean over the validation windows");
    }
    if let Some(ds) = ev.dsa {
        m["val_dsa_kl"] = serde_json::json!(ds.kl);
        m["val_dsa_recall"] = serde_json::json!(ds.recall);
        extra += &format!(
            ", indexer KL {:.4} recall {:.3}",
            ds.kl,
            ds.recall.unwrap_or(f64::NAN)
        );
    }
    append_metrics(metrics_path, &m)?;
    println_above(
        pb,
        format!(
            "step {step}: val loss {vl:.4} nats/token, {bpb:.4} bits/byte (train {loss:.4}){extra}"
        ),
    );
    Ok(Some((vl, bpb)))
}
