//! What the MoE diagnostics share: a checkpoint with the corpus its run trained on, router
//! scores of token windows under its model, and the worst routed layer's load under a bias.
#![allow(dead_code)] // each example uses its own part

use anyhow::Context;
use mnemo::checkpoint::Loaded;
use mnemo::config::RunConfig;
use mnemo::data::{TokenCache, TokenSplit};
use mnemo::model::{Ffn, Model, Workspace};
use mnemo::moe::{load_stats, topk_load};
use std::path::Path;

/// A saved MoE run: its checkpoint, the run config from its `state.json`, and the token
/// cache of its corpus (prepared like `mnemo eval` does, under `MNEMO_CACHE`).
pub struct Run {
    pub loaded: Loaded,
    pub run: RunConfig,
    pub step: u64,
    pub cache: TokenCache,
}

impl Run {
    /// Open a run directory or a checkpoint directory (`checkpoint-step{N}/` included);
    /// `with_optimizer` also loads the refit pools.
    pub fn open(path: &Path, with_optimizer: bool) -> anyhow::Result<Run> {
        let loaded = mnemo::checkpoint::load(path, with_optimizer)?;
        let state = loaded
            .state
            .as_ref()
            .with_context(|| format!("{}: no training state", path.display()))?;
        let run: RunConfig = serde_json::from_value(state.run.clone())
            .with_context(|| format!("{}: the run config in state.json", path.display()))?;
        let step = state.step;
        let corpus = mnemo::data::scan(&run.data)?;
        let cache = mnemo::data::prepare(
            &corpus,
            &run.data,
            &loaded.tokenizer,
            &mnemo::data::default_cache_root(),
            true,
        )?;
        Ok(Run {
            loaded,
            run,
            step,
            cache,
        })
    }

    pub fn model(&self) -> &Model {
        &self.loaded.model
    }

    /// The balancing bias each layer carries (empty for layers without routed experts).
    pub fn biases(&self) -> Vec<Vec<f32>> {
        let m = self.model();
        let e = m.cfg.n_routed_experts;
        m.layout
            .layers
            .iter()
            .map(|ly| match ly.ffn {
                Ffn::Moe(mo) => m.params[mo.bias..mo.bias + e].to_vec(),
                _ => Vec::new(),
            })
            .collect()
    }
}

/// Set the balancing bias of each routed layer (the shape [`Run::biases`] gives).
pub fn set_biases(model: &mut Model, biases: &[Vec<f32>]) {
    let e = model.cfg.n_routed_experts;
    for (l, b) in biases.iter().enumerate() {
        if let Ffn::Moe(mo) = model.layout.layers[l].ffn {
            model.params[mo.bias..mo.bias + e].copy_from_slice(b);
        }
    }
}

/// Router scores `[windows · len, E]` per layer of the windows of `len` tokens at `starts`
/// of `split`, forwarded `chunk` windows at a time.
pub fn router_scores(
    model: &Model,
    split: &TokenSplit,
    starts: &[usize],
    len: usize,
    chunk: usize,
    ws: &mut Workspace,
) -> Vec<Vec<f32>> {
    let toks = split.tokens();
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); model.layout.layers.len()];
    for ch in starts.chunks(chunk.max(1)) {
        let mut x = Vec::with_capacity(ch.len() * len);
        for &s in ch {
            x.extend_from_slice(&toks[s..s + len]);
        }
        model.forward(&x, ch.len(), len, ws);
        for (l, sc) in ws.moe_scores().iter().enumerate() {
            out[l].extend_from_slice(sc);
        }
    }
    out
}

/// Per routed layer, the max share over the mean of `scores` under `biases`, and the worst.
pub fn worst_load(model: &Model, scores: &[Vec<f32>], biases: &[Vec<f32>]) -> (f64, Vec<f64>) {
    let v: Vec<f64> = model
        .routed_moe_layers()
        .iter()
        .map(|&l| load_stats(&topk_load(&scores[l], &biases[l], model.cfg.top_k)).0)
        .collect();
    (v.iter().cloned().fold(0.0, f64::max), v)
}

/// A bias per layer fitted to `scores` (`moe::fit_bias`: 16 Sinkhorn rounds + 8 hard sweeps,
/// from `start`), for the routed layers.
pub fn fit_biases(model: &Model, scores: &[Vec<f32>], start: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let routed = model.routed_moe_layers();
    start
        .iter()
        .enumerate()
        .map(|(l, b0)| {
            let mut b = b0.clone();
            if routed.contains(&l) {
                mnemo::moe::fit_bias(&mut b, &scores[l], model.cfg.top_k, 16, 8);
            }
            b
        })
        .collect()
}

/// `n` random window starts for windows of `len` tokens in `split`.
pub fn random_starts(
    rng: &mut mnemo::rng::Rng,
    split: &TokenSplit,
    n: usize,
    len: usize,
) -> Vec<usize> {
    let m = split.tokens().len().saturating_sub(len) as u64;
    assert!(
        m > 0,
        "a split of {} tokens has no window of {len}",
        split.tokens().len()
    );
    (0..n).map(|_| rng.below(m) as usize).collect()
}
