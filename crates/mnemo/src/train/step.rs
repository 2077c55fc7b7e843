//! One optimizer step of a run — sample the step's micro-batches, forward and backward each,
//! stop on a non-finite loss or gradient, clip the global norm, AdamW on the trained tensors,
//! the Engram tables' lazy Adam, the MoE bias balancing — and the pieces it is made of
//! (optimizer updates, gradient norms, micro-batch weights, the balancing sample's windows).

use super::log::logs_at;
use super::start::Session;
use super::validate::add_moe_loads;
use crate::checkpoint;
use crate::config::{DsaStage, TrainOnly};
use crate::data::{self, TokenSplit};
use crate::dsa::DsaRun;
use crate::engram::SparseGrad;
use crate::kernels::adamw::{self, AdamWParams};
use crate::kernels::cross_entropy;
use crate::model::{Model, Workspace};
use crate::rng::Rng;
use crate::util::det_sum_sq;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::Instant;

/// What one optimizer step measured, for the log and the progress bar.
pub(super) struct StepOut {
    /// The step just taken (1-based).
    pub step: u64,
    /// Tokens seen by the run after it.
    pub tokens_seen: u64,
    pub lr: f32,
    /// Mean loss over the step's counted targets, nats/token (the main model's: without the
    /// MTP loss).
    pub loss: f64,
    /// The MTP loss `L_mtp` of the step (models with MTP blocks trained with
    /// `train.mtp_weight > 0`; the step minimised `loss + mtp_weight·mtp_loss`).
    pub mtp_loss: Option<f64>,
    /// Global gradient norm before clipping (trained flat parameters and Engram tables).
    pub gnorm: f64,
    /// Gradient norm of each layer before clipping.
    pub layer_gnorms: Vec<f64>,
    /// Sum of squares of the Engram tables' gradients before clipping.
    pub table_sq: f64,
    /// Rows of each Engram table the step touched (empty without Engram).
    pub table_rows: Vec<usize>,
    /// Per layer (`None` for dense layers): tokens each routed expert received.
    pub loads: Vec<Option<Vec<u64>>>,
    /// DSA: indexer KL averaged over the micro-batches, and the recall when measured.
    pub dsa_kl: f64,
    pub dsa_recall: Option<f64>,
    /// Wall-clock time of the step (optimizer included), ms.
    pub step_ms: f64,
}

/// The buffers of the step, allocated once per run.
pub(super) struct Stepper {
    grads: Vec<f32>,
    /// The step's workspace; after a step it holds its last forward/backward pass.
    pub ws: Workspace,
    /// The MoE balancing sample's forward passes (`bias_fit_sample`), apart from the step's.
    sample_ws: Workspace,
    /// Whether the bias is balanced on a fresh sample (a model with routed, not hash, MoE
    /// layers and `bias_fit_sample > 0`).
    sample_moe: bool,
    /// The step's micro-batches, sampled before any of them runs so that each one's gradient
    /// can be weighted by its share of the step's counted targets.
    xs: Vec<Vec<u32>>,
    ys: Vec<Vec<u32>>,
}

impl Stepper {
    /// The buffers for `sess` training on `train`. With a balancing sample, a split shorter
    /// than one sample window fails here, before step 1.
    pub fn new(sess: &Session, train: &TokenSplit) -> Result<Self> {
        let (run, tc) = (&sess.run, &sess.run.train);
        let (b, t) = (tc.batch_size, tc.seq_len);
        let grads = vec![0.0f32; sess.model.layout.total];
        // The MTP blocks train with the run's weight (and run in the balancing sample, so that
        // their MoE layer's bias is refitted like the others').
        let mut ws = Workspace {
            mtp_weight: tc.mtp_weight,
            ..Workspace::default()
        };
        let sample_ws = Workspace {
            mtp_weight: tc.mtp_weight,
            ..Workspace::headless()
        };
        let sample_moe =
            run.model.bias_fit_sample > 0 && !sess.model.routed_moe_layers().is_empty();
        if sample_moe {
            moe_sample_windows(train, tc.seed, 0, 0, run.model.bias_fit_sample_len)?;
        }
        // Memory-only fine-tuning: no weight gradients for the frozen backbone.
        ws.frozen_backbone = !tc.train_only.is_all();
        Ok(Stepper {
            grads,
            ws,
            sample_ws,
            sample_moe,
            xs: vec![vec![0u32; b * t]; tc.grad_accum],
            ys: vec![vec![0u32; b * t]; tc.grad_accum],
        })
    }

    /// Take optimizer step `sess.state.step + 1` on batches of `train` (the run directory
    /// `out` is named in errors): updates the parameters, the optimizer state, the data order
    /// and the step counter of `sess`.
    pub fn step(&mut self, sess: &mut Session, train: &TokenSplit, out: &Path) -> Result<StepOut> {
        let Stepper {
            grads,
            ws,
            sample_ws,
            sample_moe,
            xs,
            ys,
        } = self;
        let Session {
            run,
            model,
            tok,
            state,
            adam_m,
            adam_v,
            table_opt,
            moe_pools,
            ..
        } = sess;
        let tc = &run.train;
        let mode = tc.train_only;
        let (b, t) = (tc.batch_size, tc.seq_len);
        let step = state.step + 1;
        let lr = tc.lr_at(step);
        let step_t0 = Instant::now();
        grads.fill(0.0);
        let mut tgrads: Vec<SparseGrad> = vec![SparseGrad::default(); table_opt.len()];
        let mut loss = 0.0;
        let mut mtp_loss = 0.0;
        let mut loads: Vec<Option<Vec<u64>>> = vec![None; run.model.n_layers];
        let log_step = logs_at(tc, step);
        let mut dsa_kl = 0.0f64;
        let mut dsa_recall = None::<f64>;
        for (x, y) in xs.iter_mut().zip(ys.iter_mut()) {
            data::sample_batch(train, &mut state.data_rng, b, t, x, y)?;
            if let Some(sm) = &tc.synthetic {
                crate::longctx::mix_into_batch(
                    sm.task,
                    sm.fraction,
                    sm.loss,
                    tok,
                    &mut state.data_rng,
                    b,
                    t,
                    x,
                    y,
                )?;
            }
        }
        let weights = micro_batch_weights(ys);
        for (micro, (x, y)) in xs.iter().zip(ys.iter()).enumerate() {
            let (x, y) = (&x[..], &y[..]);
            let w = weights[micro];
            let gs = w as f32;
            let l = match run.model.has_indexer() {
                true => {
                    // Recall needs the dense attention in the sparse stage: measured on the
                    // first micro-batch of logging steps only.
                    let r = DsaRun {
                        stage: tc.dsa_stage,
                        kl: true,
                        recall: log_step && micro == 0,
                    };
                    let l = model.forward_backward_dsa(x, y, b, t, grads, gs, ws, r);
                    dsa_kl += ws.dsa_stats.kl / tc.grad_accum as f64;
                    if let Some(rc) = ws.dsa_stats.recall {
                        dsa_recall = Some(rc);
                    }
                    l
                }
                // (DSA models have no Engram tables, the only fallible part of a step.)
                false => model
                    .try_forward_backward(x, y, b, t, grads, gs, ws)
                    .with_context(|| format!("training step {step}"))?,
            };
            // The loss reported is the main model's; the MTP loss is reported beside it.
            loss += w * (l - ws.mtp_weight as f64 * ws.mtp_loss);
            mtp_loss += w * ws.mtp_loss;
            for (acc, g) in tgrads.iter_mut().zip(&ws.engram_table_grads) {
                acc.accumulate(g);
            }
            add_moe_loads(&mut loads, ws);
            if run.model.bias_fit_window > 0 && run.model.bias_fit_sample == 0 && mode.is_all() {
                model.push_moe_pools(moe_pools, ws);
            }
        }
        // A non-finite loss or gradient stops the run before the optimizer step, so neither the
        // parameters nor the last checkpoint on disk are touched.
        if !(loss.is_finite() && mtp_loss.is_finite()) {
            let loss = loss + tc.mtp_weight as f64 * mtp_loss;
            bail!(
                "loss became {loss} at step {step}{}: stopping; the last good checkpoint ({}) is intact. Lower --lr or check the data",
                where_nonfinite(ws),
                last_saved(out)
            );
        }
        // The global norm covers the flat parameters and the Engram tables' sparse gradients.
        let table_sq: f64 = tgrads.iter().map(SparseGrad::sum_sq).sum();
        let tensor_sq = tensor_sum_sq(model, grads);
        let gnorm = (trained_sum_sq(model, &tensor_sq, mode) + table_sq).sqrt();
        if !gnorm.is_finite() {
            let layer = first_nonfinite_grad(model, grads).unwrap_or_default();
            bail!(
                "the gradient norm became {gnorm} at step {step} (first non-finite gradient: {layer}): stopping; the last good checkpoint ({}) is intact",
                last_saved(out)
            );
        }
        let layer_gnorms = layer_grad_norms(model, &tensor_sq);
        if tc.grad_clip > 0.0 && gnorm > tc.grad_clip as f64 {
            let s = (tc.grad_clip as f64 / gnorm) as f32;
            crate::util::scale_in_place(grads, s);
            tgrads.iter_mut().for_each(|g| g.scale(s));
        }
        let hp = AdamWParams {
            lr,
            beta1: tc.beta1,
            beta2: tc.beta2,
            eps: tc.adam_eps,
            weight_decay: tc.weight_decay,
        };
        let dsa_warmup = run.model.has_indexer() && tc.dsa_stage == DsaStage::Warmup;
        if dsa_warmup {
            // Warm-up: everything but the indexer is frozen (no update, no weight decay).
            optimizer_step_where(model, grads, adam_m, adam_v, hp, step, |t| {
                crate::model::is_indexer_tensor(&t.name)
            });
        } else {
            optimizer_step_only(model, grads, adam_m, adam_v, hp, step, mode);
        }
        if let Some(e) = model.engram.as_mut() {
            let th = e.cfg.table_optimizer();
            for ((layer, opt), g) in e.layers.iter_mut().zip(table_opt.iter_mut()).zip(&tgrads) {
                opt.update(&mut layer.table, g, lr, &th)?;
            }
        }
        // The MoE balancing bias is part of the backbone: frozen in memory-only fine-tuning
        // and in the DSA warm-up.
        if mode.is_all() && !dsa_warmup {
            if *sample_moe {
                let (n, len) = (run.model.bias_fit_sample, run.model.bias_fit_sample_len);
                let x = moe_sample_windows(train, tc.seed, step, n, len)?;
                match run.model.has_indexer() {
                    // The attention of the stage, as in training (dense before the sparse
                    // stage; the warm-up does not balance).
                    true => model.forward_dsa(
                        &x,
                        n,
                        len,
                        sample_ws,
                        DsaRun {
                            stage: tc.dsa_stage,
                            kl: false,
                            recall: false,
                        },
                    ),
                    false => model
                        .try_forward(&x, n, len, sample_ws)
                        .with_context(|| format!("MoE balancing sample of step {step}"))?,
                }
                model.push_moe_pools(moe_pools, sample_ws);
            }
            model.balance_moe(&loads, ws, moe_pools, step);
        }
        let step_ms = step_t0.elapsed().as_secs_f64() * 1e3;
        state.step = step;
        state.tokens_seen += (b * t * tc.grad_accum) as u64;
        Ok(StepOut {
            step,
            tokens_seen: state.tokens_seen,
            lr,
            loss,
            mtp_loss: (ws.mtp_depths(&run.model) > 0).then_some(mtp_loss),
            gnorm,
            layer_gnorms,
            table_sq,
            table_rows: tgrads.iter().map(|g| g.rows.len()).collect(),
            loads,
            dsa_kl,
            dsa_recall,
            step_ms,
        })
    }
}

/// " in <where>" for the first non-finite activation of the last forward pass, if any.
fn where_nonfinite(ws: &Workspace) -> String {
    ws.first_nonfinite()
        .map(|w| format!(" (first non-finite value: {w})"))
        .unwrap_or_default()
}

/// The step of the checkpoint currently on disk, for error messages.
fn last_saved(out: &Path) -> String {
    match checkpoint::load(out, false).ok().and_then(|l| l.state) {
        Some(s) => format!(
            "step {} in {}",
            s.step,
            out.join(checkpoint::CHECKPOINT_DIR).display()
        ),
        None => "none saved yet".into(),
    }
}

/// The block index of a parameter name (`layers.{l}.…`; `mtp.{j}.…`: block `n_layers + j`),
/// or `None` for the embedding, the head and the final norm.
fn layer_of(name: &str, n_layers: usize) -> Option<usize> {
    let (rest, base) = match name.strip_prefix("layers.") {
        Some(r) => (r, 0),
        None => (name.strip_prefix("mtp.")?, n_layers),
    };
    let i: usize = rest.split('.').next()?.parse().ok()?;
    Some(base + i)
}

/// `Σ g²` of each tensor's gradient, in layout order (one pass over the gradients for the
/// global norm and the per-block norms).
pub fn tensor_sum_sq(model: &Model, grads: &[f32]) -> Vec<f64> {
    model
        .layout
        .tensors
        .iter()
        .map(|t| det_sum_sq(&grads[t.range()]))
        .collect()
}

/// L2 norm of the gradient of each block's parameters (before clipping): the layers, then the
/// MTP blocks; `tensor_sq` from [`tensor_sum_sq`].
pub fn layer_grad_norms(model: &Model, tensor_sq: &[f64]) -> Vec<f64> {
    let mut sq = vec![0.0f64; model.cfg.n_blocks()];
    for (t, &s) in model.layout.tensors.iter().zip(tensor_sq) {
        if let Some(l) = layer_of(&t.name, model.cfg.n_layers) {
            sq[l] += s;
        }
    }
    sq.into_iter().map(f64::sqrt).collect()
}

/// The first tensor (in layout order) whose gradient holds a NaN or infinity.
fn first_nonfinite_grad(model: &Model, grads: &[f32]) -> Option<String> {
    model
        .layout
        .tensors
        .iter()
        .find(|t| grads[t.range()].iter().any(|g| !g.is_finite()))
        .map(|t| t.name.clone())
}

/// Sum of squares of the gradients of the tensors `mode` trains (`tensor_sq` from
/// [`tensor_sum_sq`]).
fn trained_sum_sq(model: &Model, tensor_sq: &[f64], mode: TrainOnly) -> f64 {
    model
        .layout
        .tensors
        .iter()
        .zip(tensor_sq)
        .filter(|(t, _)| t.trainable && mode.trains(&t.name))
        .map(|(_, s)| s)
        .sum()
}

/// [`optimizer_step`] restricted to the tensors `mode` trains: the others get no update and
/// no weight decay (they stay bit-identical).
pub fn optimizer_step_only(
    model: &mut Model,
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    hp: AdamWParams,
    step: u64,
    mode: TrainOnly,
) {
    for spec in model
        .layout
        .tensors
        .iter()
        .filter(|t| t.trainable && mode.trains(&t.name))
    {
        let r = spec.range();
        adamw::step(
            &mut model.params[r.clone()],
            &grads[r.clone()],
            &mut m[r.clone()],
            &mut v[r],
            hp,
            step,
            spec.decay,
        );
    }
}

/// AdamW over every trainable tensor (weight decay where the tensor asks for it).
pub fn optimizer_step(
    model: &mut Model,
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    hp: AdamWParams,
    step: u64,
) {
    optimizer_step_where(model, grads, m, v, hp, step, |_| true)
}

/// [`optimizer_step`] restricted to the trainable tensors for which `only` holds: the others
/// (parameters and moments) are not touched at all.
pub fn optimizer_step_where(
    model: &mut Model,
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    hp: AdamWParams,
    step: u64,
    only: impl Fn(&crate::model::TensorSpec) -> bool,
) {
    for spec in model
        .layout
        .tensors
        .iter()
        .filter(|t| t.trainable && only(t))
    {
        let r = spec.range();
        adamw::step(
            &mut model.params[r.clone()],
            &grads[r.clone()],
            &mut m[r.clone()],
            &mut v[r],
            hp,
            step,
            spec.decay,
        );
    }
}

/// Weights of a step's micro-batches (their targets) so that the step's loss is the mean over
/// all its counted targets (those other than [`cross_entropy::IGNORE`]): micro-batch m returns
/// the mean over its own c_m counted targets and weighs in with `c_m / Σc` (`1 / grad_accum`
/// when nothing is masked; 0 for a micro-batch with nothing counted). With masked targets the
/// MoE balance loss of a micro-batch is weighted the same way.
pub fn micro_batch_weights(targets: &[Vec<u32>]) -> Vec<f64> {
    let counts: Vec<usize> = targets.iter().map(|y| cross_entropy::counted(y)).collect();
    let total = counts.iter().sum::<usize>().max(1) as f64;
    counts.iter().map(|&c| c as f64 / total).collect()
}

/// The windows of the MoE balancing sample after optimizer step `step` (`bias_fit_sample`):
/// `n` windows of `len` tokens of `split` (`[n·len]`), drawn from a stream derived from the
/// run's seed and the step, so that nothing about it needs checkpointing.
pub fn moe_sample_windows(
    split: &TokenSplit,
    seed: u64,
    step: u64,
    n: usize,
    len: usize,
) -> Result<Vec<u32>> {
    let toks = split.tokens();
    if len == 0 || toks.len() < len {
        bail!(
            "the training split has {} tokens, fewer than bias_fit_sample_len = {len}: lower it or use more data",
            toks.len()
        );
    }
    let mut rng = Rng::derived(
        seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        "moe-sample",
    );
    let starts = (toks.len() - len + 1) as u64;
    let mut x = Vec::with_capacity(n * len);
    for _ in 0..n {
        let s = rng.below(starts) as usize;
        x.extend_from_slice(&toks[s..s + len]);
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::kernels::cross_entropy::IGNORE;

    /// The MoE balancing sample: `n` windows of `len` consecutive tokens of the split, the same
    /// for the same seed and step (resume needs no state), another draw at another step or
    /// seed, and a clear error when the split is shorter than a window.
    #[test]
    fn moe_sample_windows_are_slices_drawn_per_step() {
        let toks: Vec<u32> = (0..500).collect();
        let split = TokenSplit::from_tokens(toks, 500, 1);
        let x = moe_sample_windows(&split, 7, 12, 9, 16).unwrap();
        assert_eq!(x.len(), 9 * 16);
        for w in x.chunks_exact(16) {
            // Consecutive ids: a slice of the split.
            assert!(w.windows(2).all(|p| p[1] == p[0] + 1), "{w:?}");
        }
        assert_eq!(x, moe_sample_windows(&split, 7, 12, 9, 16).unwrap());
        assert_ne!(x, moe_sample_windows(&split, 7, 13, 9, 16).unwrap());
        assert_ne!(x, moe_sample_windows(&split, 8, 12, 9, 16).unwrap());
        // A window as long as the split is the whole split.
        let all = moe_sample_windows(&split, 1, 1, 2, 500).unwrap();
        assert_eq!(&all[..500], split.tokens());
        let e = moe_sample_windows(&split, 1, 1, 2, 501).unwrap_err();
        assert!(
            format!("{e:#}").contains("bias_fit_sample_len = 501"),
            "{e:#}"
        );
    }

    /// Gradient accumulation over micro-batches with different numbers of masked targets equals
    /// one batch holding all their rows: the mean is over all counted targets of the step.
    #[test]
    fn accumulation_with_masked_targets_matches_one_batch() {
        let cfg = ModelConfig {
            vocab_size: 19,
            d_model: 12,
            n_layers: 1,
            n_heads: 2,
            n_kv_heads: 2,
            head_dim: 6,
            rope_dim: 4,
            ffn_hidden: 10,
            max_seq_len: 8,
            init_std: 0.3,
            ..ModelConfig::dense_defaults()
        };
        let mut m = Model::new(cfg).unwrap();
        m.init(2);
        let t = 6;
        let tokens: Vec<u32> = (0..2 * t).map(|i| (i * 7 % 19) as u32).collect();
        // Row 0 keeps one target, row 1 keeps five.
        let mut targets: Vec<u32> = (0..2 * t).map(|i| (i * 5 % 19) as u32).collect();
        for j in [0, 1, 2, 4, 5, 6] {
            targets[j] = IGNORE;
        }
        let mut ws = Workspace::default();
        let mut whole = vec![0.0; m.layout.total];
        let l_whole = m.forward_backward(&tokens, &targets, 2, t, &mut whole, 1.0, &mut ws);
        let ys = vec![targets[..t].to_vec(), targets[t..].to_vec()];
        let w = micro_batch_weights(&ys);
        assert_eq!(w, vec![1.0 / 6.0, 5.0 / 6.0]);
        let mut acc = vec![0.0; m.layout.total];
        let mut l_acc = 0.0;
        for (r, y) in ys.iter().enumerate() {
            let x = &tokens[r * t..(r + 1) * t];
            l_acc += w[r] * m.forward_backward(x, y, 1, t, &mut acc, w[r] as f32, &mut ws);
        }
        assert!((l_whole - l_acc).abs() < 1e-5, "{l_whole} vs {l_acc}");
        let scale = whole.iter().fold(0.0f32, |a, g| a.max(g.abs()));
        for (a, b) in whole.iter().zip(&acc) {
            assert!((a - b).abs() <= 1e-5 * scale.max(1.0), "{a} vs {b}");
        }
        // Nothing masked: every micro-batch weighs 1 / grad_accum.
        assert_eq!(
            micro_batch_weights(&[vec![1, 2], vec![3, 4]]),
            vec![0.5, 0.5]
        );
        assert_eq!(micro_batch_weights(&[vec![IGNORE; 3]]), vec![0.0]);
    }
}
