//! DeepSeekMoE feed-forward (Dai et al. 2024; DeepSeek-V3 §2.1.2, V4): shared experts that every
//! token uses plus fine-grained routed experts of which each token uses `k`, with
//! auxiliary-loss-free load balancing.
//!
//! ```text
//! s      = score(f · W_gᵀ)                  [N, E]   sigmoid (V3) or sqrt(softplus) (V4)
//! sel    = top-k(s + b)                     [N, k]   b: per-expert bias, selection only
//!        | tid2eid[token]                            (hash layers: a fixed table)
//! w      = c · s_sel / Σ s_sel              [N, k]   (plain c · s_sel without normalisation)
//! y      = Σ_shared FFN_i(f) + Σ_j w_j · FFN_{sel_j}(f)        each FFN a SwiGLU of width I
//! ```
//!
//! The bias `b` is not trained by gradient: after every optimizer step it moves by
//! `±bias_update_speed` toward equal load ([`update_bias`]); optionally it is then refitted
//! against the scores of the batch just seen ([`fit_bias`], `bias_fit_iters`), moving only
//! `bias_fit_rate` of the way ([`refit_bias`]: `b ← (1 − r)·b + r·fit(b, s)`), with `s` the
//! scores that routed that batch, or (`bias_fit_rescore`) the same inputs scored again by the
//! router after the optimizer step ([`router_scores`]), or (`bias_fit_window`) the inputs of
//! the last few batches pooled and scored again by that router ([`BiasPool`]). An optional
//! sequence-wise balance loss `α Σ_e f_e P_e` (V3 eq. 17–20) can be added.
//!
//! Compute is expert by expert over gathered token groups, never a dense `N×E` expert product:
//! the tokens routed to expert `e` are gathered into `[n_e, d]`, run through its SwiGLU with
//! two GEMMs, and combined back per token in slot order (deterministic), in parallel across
//! experts. Backward mirrors it: per-expert GEMMs for the weight gradients, the gate gradient
//! through `w` (the selection itself is a constant), and the router's chain rule.

use crate::config::{ModelConfig, ScoreFunc};
use crate::kernels::matmul::{gemm, MatRef};
use crate::kernels::{swiglu, SendPtr};
use rayon::prelude::*;
use std::collections::VecDeque;

/// Shapes and routing settings of one MoE layer.
#[derive(Clone, Copy, Debug)]
pub struct MoeSpec {
    pub d: usize,
    pub inter: usize,
    pub n_shared: usize,
    pub n_experts: usize,
    pub top_k: usize,
    pub score: ScoreFunc,
    pub scale: f32,
    pub norm_topk: bool,
    pub aux_coef: f32,
}

impl MoeSpec {
    pub fn new(c: &ModelConfig) -> Self {
        MoeSpec {
            d: c.d_model,
            inter: c.moe_inter,
            n_shared: c.n_shared_experts,
            n_experts: c.n_routed_experts,
            top_k: c.top_k,
            score: c.score_func,
            scale: c.routed_scaling_factor,
            norm_topk: c.norm_topk_prob,
            aux_coef: c.seq_aux_loss_coef,
        }
    }
    /// Floats of one routed expert: `w1, w3: [I, d]`, `w2: [d, I]`.
    pub fn expert_len(&self) -> usize {
        3 * self.inter * self.d
    }
}

/// Offsets of an MoE layer's tensors in the flat parameter buffer.
#[derive(Clone, Copy, Debug)]
pub struct MoeOffsets {
    /// Router `[E, d]`.
    pub gate: usize,
    /// Selection bias `[E]` (not trained).
    pub bias: usize,
    /// Shared experts as one SwiGLU of width `S·I`: `[w1; w3]` `[2SI, d]`, then `w2` `[d, SI]`.
    pub shared_w13: usize,
    pub shared_w2: usize,
    /// Routed experts, `expert_len()` floats each: `w1, w3, w2`.
    pub experts: usize,
    pub hash: bool,
}

/// Activations of one MoE layer kept for the backward pass.
#[derive(Default)]
pub struct MoeActs {
    /// Router scores after the score function `[N, E]`.
    pub scores: Vec<f32>,
    /// Selected experts `[N, k]`.
    pub sel: Vec<u32>,
    /// Gate weights `[N, k]`.
    pub w: Vec<f32>,
    /// Row of each (token, slot) inside its expert's group `[N·k]`.
    slot_row: Vec<u32>,
    experts: Vec<ExpertActs>,
    sh13: Vec<f32>,
    sg: Vec<f32>,
    /// Tokens routed to each expert in the last forward pass.
    pub load: Vec<u64>,
    /// Sequence-wise balance loss of the last forward pass (0 when off).
    pub aux_loss: f64,
}

#[derive(Default)]
struct ExpertActs {
    /// (token, slot) of each row.
    slots: Vec<u32>,
    x: Vec<f32>,
    h13: Vec<f32>,
    g: Vec<f32>,
    out: Vec<f32>,
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline]
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// `score(x)` and its derivative `d score / dx` given `x` and `s = score(x)`.
#[inline]
fn score_fn(f: ScoreFunc, x: f32) -> f32 {
    match f {
        ScoreFunc::Sigmoid => sigmoid(x),
        ScoreFunc::Sqrtsoftplus => softplus(x).sqrt(),
    }
}

#[inline]
fn score_grad(f: ScoreFunc, x: f32, s: f32) -> f32 {
    match f {
        ScoreFunc::Sigmoid => s * (1.0 - s),
        ScoreFunc::Sqrtsoftplus => {
            if s > 1e-20 {
                sigmoid(x) / (2.0 * s)
            } else {
                0.0
            }
        }
    }
}

/// Forward pass: adds the layer output to `y: [N, d]`.
///
/// `f: [N, d]` is the normalised input, `tokens: [N]` the token ids (for hash routing),
/// `table: [V, k]` the hash table of a hash layer, `t` the sequence length (for the
/// sequence-wise balance loss).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    spec: &MoeSpec,
    params: &[f32],
    o: &MoeOffsets,
    f: &[f32],
    tokens: &[u32],
    table: Option<&[u32]>,
    t: usize,
    acts: &mut MoeActs,
    y: &mut [f32],
) {
    let MoeSpec {
        d,
        inter: i,
        n_shared,
        n_experts: e,
        top_k: k,
        ..
    } = *spec;
    let n = tokens.len();
    assert_eq!(f.len(), n * d);
    // Router.
    acts.scores.resize(n * e, 0.0);
    gate_logits(
        &mut acts.scores,
        f,
        &params[o.gate..o.gate + e * d],
        n,
        d,
        e,
    );
    acts.scores.par_chunks_mut(e).for_each(|row| {
        for x in row.iter_mut() {
            *x = score_fn(spec.score, *x);
        }
    });
    // Selection.
    acts.sel.resize(n * k, 0);
    let bias = &params[o.bias..o.bias + e];
    match table {
        Some(tab) => {
            for (r, &tok) in tokens.iter().enumerate() {
                acts.sel[r * k..(r + 1) * k]
                    .copy_from_slice(&tab[tok as usize * k..(tok as usize + 1) * k]);
            }
        }
        None => {
            acts.sel
                .par_chunks_mut(k)
                .zip(acts.scores.par_chunks(e))
                .for_each(|(sel, s)| top_k(s, bias, sel));
        }
    }
    // Gate weights.
    acts.w.resize(n * k, 0.0);
    for r in 0..n {
        let sel = &acts.sel[r * k..(r + 1) * k];
        let w = &mut acts.w[r * k..(r + 1) * k];
        let mut sum = 0.0f32;
        for (wj, &ej) in w.iter_mut().zip(sel) {
            *wj = acts.scores[r * e + ej as usize];
            sum += *wj;
        }
        let c = if spec.norm_topk {
            spec.scale / sum.max(1e-20)
        } else {
            spec.scale
        };
        w.iter_mut().for_each(|x| *x *= c);
    }
    // Group (token, slot) by expert, in token order.
    acts.experts.resize_with(e, ExpertActs::default);
    for ex in acts.experts.iter_mut() {
        ex.slots.clear();
    }
    acts.slot_row.resize(n * k, 0);
    for (slot, &ej) in acts.sel.iter().enumerate() {
        let ex = &mut acts.experts[ej as usize];
        acts.slot_row[slot] = ex.slots.len() as u32;
        ex.slots.push(slot as u32);
    }
    acts.load = acts.experts.iter().map(|x| x.slots.len() as u64).collect();
    // Routed experts, in parallel.
    let experts = &params[o.experts..o.experts + e * spec.expert_len()];
    acts.experts
        .par_iter_mut()
        .zip(experts.par_chunks(spec.expert_len()))
        .for_each(|(ex, wts)| {
            let m = ex.slots.len();
            ex.x.resize(m * d, 0.0);
            for (row, &slot) in ex.slots.iter().enumerate() {
                let tok = slot as usize / k;
                ex.x[row * d..(row + 1) * d].copy_from_slice(&f[tok * d..(tok + 1) * d]);
            }
            ex.h13.resize(m * 2 * i, 0.0);
            ex.g.resize(m * i, 0.0);
            ex.out.resize(m * d, 0.0);
            if m == 0 {
                return;
            }
            let (w13, w2) = wts.split_at(2 * i * d);
            gemm(
                &mut ex.h13,
                2 * i,
                MatRef::new(&ex.x, m, d),
                MatRef::new(w13, 2 * i, d).t(),
                1.0,
                false,
                false,
            );
            swiglu::forward(&mut ex.g, &ex.h13, i);
            gemm(
                &mut ex.out,
                d,
                MatRef::new(&ex.g, m, i),
                MatRef::new(w2, d, i).t(),
                1.0,
                false,
                false,
            );
        });
    // Shared experts (one SwiGLU of width S·I) straight into y.
    if n_shared > 0 {
        let si = n_shared * i;
        acts.sh13.resize(n * 2 * si, 0.0);
        acts.sg.resize(n * si, 0.0);
        gemm(
            &mut acts.sh13,
            2 * si,
            MatRef::new(f, n, d),
            MatRef::new(&params[o.shared_w13..o.shared_w13 + 2 * si * d], 2 * si, d).t(),
            1.0,
            false,
            true,
        );
        swiglu::forward(&mut acts.sg, &acts.sh13, si);
        gemm(
            y,
            d,
            MatRef::new(&acts.sg, n, si),
            MatRef::new(&params[o.shared_w2..o.shared_w2 + d * si], d, si).t(),
            1.0,
            true,
            true,
        );
    }
    // Combine per token in slot order.
    let (sel, w, slot_row, exs) = (&acts.sel, &acts.w, &acts.slot_row, &acts.experts);
    y.par_chunks_mut(d).enumerate().for_each(|(r, yr)| {
        for j in 0..k {
            let slot = r * k + j;
            let ex = &exs[sel[slot] as usize];
            let row = slot_row[slot] as usize;
            let wj = w[slot];
            for (a, b) in yr.iter_mut().zip(&ex.out[row * d..(row + 1) * d]) {
                *a += wj * b;
            }
        }
    });
    acts.aux_loss = if spec.aux_coef > 0.0 && table.is_none() {
        spec.aux_coef as f64 * seq_balance(spec, &acts.scores, &acts.sel, n / t, t, None)
    } else {
        0.0
    };
}

/// Router scores `s = score(f · W_gᵀ)` `[N, E]` of the inputs `f: [N, d]` under the current
/// router weights (as in [`forward`]). With `bias_fit_rescore`, the refit uses the batch just
/// routed scored by the router *after* the optimizer step, so the bias does not lag that
/// step's change of the router.
pub fn router_scores(spec: &MoeSpec, params: &[f32], o: &MoeOffsets, f: &[f32]) -> Vec<f32> {
    let (d, e) = (spec.d, spec.n_experts);
    let n = f.len() / d;
    let mut s = vec![0.0f32; n * e];
    gate_logits(&mut s, f, &params[o.gate..o.gate + e * d], n, d, e);
    s.par_chunks_mut(e).for_each(|row| {
        for x in row.iter_mut() {
            *x = score_fn(spec.score, *x);
        }
    });
    s
}

fn gate_logits(out: &mut [f32], f: &[f32], wg: &[f32], n: usize, d: usize, e: usize) {
    gemm(
        out,
        e,
        MatRef::new(f, n, d),
        MatRef::new(wg, e, d).t(),
        1.0,
        false,
        true,
    );
}

/// The `k` indices with the largest `s + bias` (ties: lower index first), into `sel`.
fn top_k(s: &[f32], bias: &[f32], sel: &mut [u32]) {
    let mut taken = 0u128; // E ≤ 128 handled by the bitmask; larger E by a linear check.
    let big = s.len() > 128;
    for j in 0..sel.len() {
        let mut best = usize::MAX;
        let mut bv = f32::NEG_INFINITY;
        for (x, (&sv, &bv_)) in s.iter().zip(bias).enumerate() {
            let used = if big {
                sel[..j].contains(&(x as u32))
            } else {
                taken >> x & 1 == 1
            };
            let v = sv + bv_;
            if !used && (best == usize::MAX || v > bv) {
                best = x;
                bv = v;
            }
        }
        sel[j] = best as u32;
        if !big {
            taken |= 1 << best;
        }
    }
}

/// Tokens per expert when each row of `scores` (`[N, E]`) picks its `k` largest
/// `score + bias`, as the router does: the hard top-k load a bias gives a sample.
pub fn topk_load(scores: &[f32], bias: &[f32], k: usize) -> Vec<u64> {
    let e = bias.len();
    let mut load = vec![0u64; e];
    let mut sel = vec![0u32; k];
    for row in scores.chunks_exact(e.max(1)) {
        top_k(row, bias, &mut sel);
        sel.iter().for_each(|&x| load[x as usize] += 1);
    }
    load
}

/// Sequence-wise balance loss `mean_b Σ_e f_e P_e` (without the coefficient); with `grad`,
/// adds `coef_scale · dL/ds` into it.
fn seq_balance(
    spec: &MoeSpec,
    scores: &[f32],
    sel: &[u32],
    b: usize,
    t: usize,
    grad: Option<(&mut [f32], f32)>,
) -> f64 {
    let (e, k) = (spec.n_experts, spec.top_k);
    let mut total = 0.0f64;
    let mut grad = grad;
    for bi in 0..b {
        let mut fe = vec![0.0f64; e];
        for &x in &sel[bi * t * k..(bi + 1) * t * k] {
            fe[x as usize] += 1.0;
        }
        fe.iter_mut().for_each(|v| *v *= e as f64 / (k * t) as f64);
        let mut pe = vec![0.0f64; e];
        for r in bi * t..(bi + 1) * t {
            let row = &scores[r * e..(r + 1) * e];
            let z: f64 = row.iter().map(|&v| v as f64).sum();
            for (p, &v) in pe.iter_mut().zip(row) {
                *p += v as f64 / z / t as f64;
            }
            if let Some((g, c)) = grad.as_mut() {
                // L_b = Σ_e f_e · mean_t s'_e, s' = s/Σs; dL/ds_e = (f_e − Σ_j f_j s'_j) / (T Σs).
                let dot: f64 = fe.iter().zip(row).map(|(f, &v)| f * v as f64 / z).sum();
                for x in 0..e {
                    g[r * e + x] += *c * ((fe[x] - dot) / (t as f64 * z) / b as f64) as f32;
                }
            }
        }
        total += fe.iter().zip(&pe).map(|(a, b)| a * b).sum::<f64>();
    }
    total / b as f64
}

/// Backward pass. `dy: [N, d]` is the gradient of the layer output; writes `df: [N, d]`
/// (overwritten) and accumulates parameter gradients into `grads` (same layout as `params`),
/// except the selection bias, which has none. `grad_scale` scales the balance-loss gradient
/// like the language-model loss's.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    spec: &MoeSpec,
    params: &[f32],
    grads: &mut [f32],
    o: &MoeOffsets,
    f: &[f32],
    acts: &MoeActs,
    dy: &[f32],
    df: &mut [f32],
    t: usize,
    grad_scale: f32,
) {
    let MoeSpec {
        d,
        inter: i,
        n_shared,
        n_experts: e,
        top_k: k,
        ..
    } = *spec;
    let n = f.len() / d;
    // Shared experts: df = dsh13 · Wsh13 (overwrites df).
    if n_shared > 0 {
        let si = n_shared * i;
        let mut dsg = vec![0.0f32; n * si];
        let w2 = &params[o.shared_w2..o.shared_w2 + d * si];
        gemm(
            &mut dsg,
            si,
            MatRef::new(dy, n, d),
            MatRef::new(w2, d, si),
            1.0,
            false,
            true,
        );
        gemm(
            &mut grads[o.shared_w2..o.shared_w2 + d * si],
            si,
            MatRef::new(dy, n, d).t(),
            MatRef::new(&acts.sg, n, si),
            1.0,
            true,
            true,
        );
        let mut dsh13 = vec![0.0f32; n * 2 * si];
        swiglu::backward(&mut dsh13, &dsg, &acts.sh13, si);
        let w13 = &params[o.shared_w13..o.shared_w13 + 2 * si * d];
        gemm(
            df,
            d,
            MatRef::new(&dsh13, n, 2 * si),
            MatRef::new(w13, 2 * si, d),
            1.0,
            false,
            true,
        );
        gemm(
            &mut grads[o.shared_w13..o.shared_w13 + 2 * si * d],
            d,
            MatRef::new(&dsh13, n, 2 * si).t(),
            MatRef::new(f, n, d),
            1.0,
            true,
            true,
        );
    } else {
        df.fill(0.0);
    }
    // Routed experts in parallel: each owns its gradient block and its slots of `dw`.
    let mut dw = vec![0.0f32; n * k];
    let dw_ptr = SendPtr(dw.as_mut_ptr());
    let el = spec.expert_len();
    let wts = &params[o.experts..o.experts + e * el];
    let dx_per_expert: Vec<Vec<f32>> = acts
        .experts
        .par_iter()
        .zip(wts.par_chunks(el))
        .zip(grads[o.experts..o.experts + e * el].par_chunks_mut(el))
        .map(|((ex, w), g)| {
            let m = ex.slots.len();
            if m == 0 {
                return Vec::new();
            }
            // dout = w_slot · dy[token];  dw_slot = out · dy[token].
            let mut dout = vec![0.0f32; m * d];
            for (row, &slot) in ex.slots.iter().enumerate() {
                let tok = slot as usize / k;
                let dyr = &dy[tok * d..(tok + 1) * d];
                let out = &ex.out[row * d..(row + 1) * d];
                let ws = acts.w[slot as usize];
                let mut dot = 0.0f32;
                for c in 0..d {
                    dout[row * d + c] = ws * dyr[c];
                    dot += out[c] * dyr[c];
                }
                // SAFETY: every slot belongs to exactly one expert.
                unsafe { *dw_ptr.get().add(slot as usize) = dot };
            }
            let (w13, w2) = w.split_at(2 * i * d);
            let (g13, g2) = g.split_at_mut(2 * i * d);
            let mut dg = vec![0.0f32; m * i];
            gemm(
                &mut dg,
                i,
                MatRef::new(&dout, m, d),
                MatRef::new(w2, d, i),
                1.0,
                false,
                false,
            );
            gemm(
                g2,
                i,
                MatRef::new(&dout, m, d).t(),
                MatRef::new(&ex.g, m, i),
                1.0,
                true,
                false,
            );
            let mut dh13 = vec![0.0f32; m * 2 * i];
            swiglu::backward(&mut dh13, &dg, &ex.h13, i);
            gemm(
                g13,
                d,
                MatRef::new(&dh13, m, 2 * i).t(),
                MatRef::new(&ex.x, m, d),
                1.0,
                true,
                false,
            );
            let mut dx = vec![0.0f32; m * d];
            gemm(
                &mut dx,
                d,
                MatRef::new(&dh13, m, 2 * i),
                MatRef::new(w13, 2 * i, d),
                1.0,
                false,
                false,
            );
            dx
        })
        .collect();
    // Combine expert input gradients per token in slot order.
    df.par_chunks_mut(d).enumerate().for_each(|(r, dfr)| {
        for j in 0..k {
            let slot = r * k + j;
            let row = acts.slot_row[slot] as usize;
            let dx = &dx_per_expert[acts.sel[slot] as usize];
            for (a, b) in dfr.iter_mut().zip(&dx[row * d..(row + 1) * d]) {
                *a += b;
            }
        }
    });
    // Gate weights → scores of the selected experts.
    let mut dscores = vec![0.0f32; n * e];
    for r in 0..n {
        let sel = &acts.sel[r * k..(r + 1) * k];
        let g = &dw[r * k..(r + 1) * k];
        if spec.norm_topk {
            let s: Vec<f32> = sel
                .iter()
                .map(|&x| acts.scores[r * e + x as usize])
                .collect();
            let sum: f32 = s.iter().sum::<f32>().max(1e-20);
            let gs: f32 = g.iter().zip(&s).map(|(a, b)| a * b).sum::<f32>() / sum;
            for j in 0..k {
                dscores[r * e + sel[j] as usize] += spec.scale / sum * (g[j] - gs);
            }
        } else {
            for j in 0..k {
                dscores[r * e + sel[j] as usize] += spec.scale * g[j];
            }
        }
    }
    if spec.aux_coef > 0.0 && !o.hash {
        seq_balance(
            spec,
            &acts.scores,
            &acts.sel,
            n / t,
            t,
            Some((&mut dscores, spec.aux_coef * grad_scale)),
        );
    }
    // Through the score function to the router logits (recomputed), then the router matmul.
    let wg = &params[o.gate..o.gate + e * d];
    let mut logits = vec![0.0f32; n * e];
    gate_logits(&mut logits, f, wg, n, d, e);
    dscores
        .par_chunks_mut(e)
        .zip(logits.par_chunks(e))
        .zip(acts.scores.par_chunks(e))
        .for_each(|((ds, x), s)| {
            for c in 0..e {
                ds[c] *= score_grad(spec.score, x[c], s[c]);
            }
        });
    gemm(
        df,
        d,
        MatRef::new(&dscores, n, e),
        MatRef::new(wg, e, d),
        1.0,
        true,
        true,
    );
    gemm(
        &mut grads[o.gate..o.gate + e * d],
        d,
        MatRef::new(&dscores, n, e).t(),
        MatRef::new(f, n, d),
        1.0,
        true,
        true,
    );
}

/// Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): after a step, raise the bias of every
/// expert that got fewer than the mean number of tokens by `speed`, lower the others.
pub fn update_bias(bias: &mut [f32], load: &[u64], speed: f32) {
    let mean = load.iter().sum::<u64>() as f64 / load.len().max(1) as f64;
    for (b, &l) in bias.iter_mut().zip(load) {
        let l = l as f64;
        if l < mean {
            *b += speed;
        } else if l > mean {
            *b -= speed;
        }
    }
}

/// Refit the selection bias against one batch's scores `s: [N, E]` so that this batch's
/// load would be even: the bias is the dual variable of an entropy-regularised balanced
/// assignment (each token takes `k` units, each expert receives `N·k/E`), found by `iters`
/// Sinkhorn rounds warm-started from the current bias:
///
/// ```text
/// τ     = mean_e std_t s[t, e]                     (the token-specific spread of the scores)
/// P     = softmax_e((s + b) / τ)                   [N, E]
/// b_e  += τ · (log(N·k/E) − log(k · Σ_t P[t, e]))
/// ```
///
/// then `hard_rounds` sweeps of exact per-expert updates on the hard top-k load (see
/// `hard_correct`), and finally the mean is removed (selection is shift-invariant).
///
/// Early in training every token's router input is nearly the same vector: the scores share
/// a common mode that is large next to their token-specific part, and a fixed-size sign step
/// per batch can neither reach nor follow it. The dual fit reaches it in a few rounds at any
/// scale. It only ever uses the batch already routed, so no token's routing depends on
/// tokens of its own batch.
pub fn fit_bias(bias: &mut [f32], scores: &[f32], k: usize, iters: usize, hard_rounds: usize) {
    let e = bias.len();
    if e == 0 || iters == 0 {
        return;
    }
    let n = scores.len() / e;
    let mut mean = vec![0.0f64; e];
    let mut sq = vec![0.0f64; e];
    for row in scores.chunks_exact(e) {
        for j in 0..e {
            mean[j] += row[j] as f64;
            sq[j] += row[j] as f64 * row[j] as f64;
        }
    }
    let tau = (0..e)
        .map(|j| {
            let m = mean[j] / n as f64;
            (sq[j] / n as f64 - m * m).max(0.0).sqrt()
        })
        .sum::<f64>()
        / e as f64;
    if tau <= 1e-9 {
        return; // identical rows: no bias can split them
    }
    let target = (n * k) as f64 / e as f64;
    let mut b: Vec<f64> = bias.iter().map(|&x| x as f64).collect();
    for _ in 0..iters {
        let col = scores
            .par_chunks(e * 256)
            .map(|chunk| {
                let mut col = vec![0.0f64; e];
                let mut z = vec![0.0f64; e];
                for row in chunk.chunks_exact(e) {
                    let mut zmax = f64::NEG_INFINITY;
                    for j in 0..e {
                        z[j] = (row[j] as f64 + b[j]) / tau;
                        zmax = zmax.max(z[j]);
                    }
                    let mut sum = 0.0;
                    for zj in z.iter_mut() {
                        *zj = (*zj - zmax).exp();
                        sum += *zj;
                    }
                    for j in 0..e {
                        col[j] += k as f64 * z[j] / sum;
                    }
                }
                col
            })
            .collect::<Vec<_>>()
            // Summed in chunk order: a rayon `reduce` groups the chunks by how the work was
            // split, which depends on the thread count and on stealing, and the f64 sums (so
            // the bias, so resume) would not be bit-reproducible.
            .into_iter()
            .fold(vec![0.0f64; e], |mut a, c| {
                a.iter_mut().zip(&c).for_each(|(a, c)| *a += c);
                a
            });
        for j in 0..e {
            b[j] += tau * (target.ln() - col[j].max(1e-12).ln());
        }
    }
    // Selection depends on the bias only up to a common shift. Each Sinkhorn round raises
    // the mean bias when the load is uneven (Σ_e ln(target/load_e) ≥ 0 by Jensen), so
    // without re-centring the mean drifts up without bound (≈ +80 after 1,000 steps of
    // `tiny-moe`) and eats f32 resolution; it is removed after the fit.
    bias.iter_mut().zip(&b).for_each(|(x, &v)| *x = v as f32);
    hard_correct(bias, scores, k, hard_rounds, 1e-3 * tau as f32);
    let mean = bias.iter().map(|&x| x as f64).sum::<f64>() / e as f64;
    bias.iter_mut().for_each(|x| *x = (*x as f64 - mean) as f32);
}

/// After the soft fit: `sweeps` sweeps of exact coordinate updates on the *hard* top-k load.
/// For expert `j` with the other biases fixed, token `t` selects `j` iff
/// `s[t, j] + b_j > m_t`, with `m_t` the `k`-th largest `s[t, i] + b_i` over `i ≠ j`; so
/// `b_j = −(midpoint of the target-th and (target+1)-th largest of s[t, j] − m_t)` gives `j`
/// exactly its share of this sample (`⌊N·k/E⌋`, one more for the first `(N·k) mod E` experts,
/// so that the shares add up and the sweeps can settle). Experts are updated one after another
/// (Gauss–Seidel), each with the others' latest biases. The entropic model spreads each
/// token's `k` units by a softmax, which is not top-k selection: the soft fit leaves an
/// expert-specific gap that these sweeps close. Unlike a gradient step on `ln(load)`, an
/// exact update cannot overshoot when an expert's load is near zero, which is common early
/// in training when every token's scores are almost the same.
fn hard_correct(bias: &mut [f32], scores: &[f32], k: usize, sweeps: usize, tol: f32) {
    let e = bias.len();
    let n = scores.len() / e.max(1);
    if e == 0 || n == 0 || k == 0 || k >= e {
        return;
    }
    // Shares that add up to the N·k slots: the first `(N·k) mod E` experts take one more.
    let (base, extra) = ((n * k) / e, (n * k) % e);
    let mut gap = vec![0.0f32; n];
    for _ in 0..sweeps {
        let mut moved = 0.0f32;
        for j in 0..e {
            let b: &[f32] = bias;
            gap.par_chunks_mut(512)
                .zip(scores.par_chunks(512 * e))
                .for_each(|(gs, rows)| {
                    // The k largest biased scores of the other experts, descending.
                    let mut others = vec![f32::NEG_INFINITY; k];
                    for (g, row) in gs.iter_mut().zip(rows.chunks_exact(e)) {
                        others.fill(f32::NEG_INFINITY);
                        let kk = k;
                        for (i, (&sv, &bv)) in row.iter().zip(b).enumerate() {
                            let v = sv + bv;
                            if i == j || v <= others[kk - 1] {
                                continue;
                            }
                            let mut p = kk - 1;
                            while p > 0 && others[p - 1] < v {
                                others[p] = others[p - 1];
                                p -= 1;
                            }
                            others[p] = v;
                        }
                        *g = row[j] - others[kk - 1];
                    }
                });
            let want = (base + usize::from(j < extra)).min(n);
            let cut = if want == 0 {
                // No token: the cut sits just above the largest gap.
                let top = gap.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                top + top.abs().max(1.0) * 1e-3
            } else {
                // Descending: the want-th largest gap sits at index want − 1.
                let desc = |a: &f32, b: &f32| b.total_cmp(a);
                let (_, &mut hi, rest) = gap.select_nth_unstable_by(want - 1, desc);
                let lo = rest.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                if lo.is_finite() {
                    0.5 * (hi + lo)
                } else {
                    hi - 1.0
                }
            };
            moved = moved.max((bias[j] + cut).abs());
            bias[j] = -cut;
        }
        // A sweep that moved no bias by more than `tol` has converged.
        if moved <= tol {
            break;
        }
    }
}

/// The refit with memory: `b ← (1 − rate)·b + rate·fit(b, scores)` ([`fit_bias`] warm-started
/// from `b`). `rate = 1` jumps to the fit of the last batch, whose composition (a handful of
/// documents) moves the fitted bias by as much as the drift of the scores; with `rate < 1`
/// the bias averages the per-batch fits over the last ~`1/rate` batches, so the next batch is
/// routed with a bias fitted to the recent mixture. The only state is the bias itself.
pub fn refit_bias(
    bias: &mut [f32],
    scores: &[f32],
    k: usize,
    iters: usize,
    hard_rounds: usize,
    rate: f32,
) {
    if rate >= 1.0 {
        return fit_bias(bias, scores, k, iters, hard_rounds);
    }
    let old = bias.to_vec();
    fit_bias(bias, scores, k, iters, hard_rounds);
    for (b, o) in bias.iter_mut().zip(old) {
        *b = o + rate * (*b - o);
    }
}

/// The router inputs (`f`, `[n, d]` per batch) of one routed layer over the last `window`
/// batches, every `stride`-th token of each: the sample the refit balances when
/// `bias_fit_window > 0`. Before every fit the whole pool is scored again by the current router
/// ([`router_scores`]), so the fit follows the router without lag and averages the
/// composition of `window` batches rather than carrying one batch's handful of documents.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BiasPool {
    window: usize,
    stride: usize,
    d: usize,
    /// Row the next batch's sample starts at (`0..stride`): it moves by one per batch, so
    /// that a stride dividing the sequence length does not always keep the same positions
    /// (position 0, the token without context, would be `stride`× over-represented).
    offset: usize,
    batches: VecDeque<Vec<f32>>,
}

impl BiasPool {
    /// An empty pool of `window` batches keeping every `stride`-th row of width `d`.
    pub fn new(window: usize, stride: usize, d: usize) -> Self {
        BiasPool {
            window,
            stride: stride.max(1),
            d,
            offset: 0,
            batches: VecDeque::new(),
        }
    }

    /// Add one batch's router inputs `f: [n, d]` (rows o, o + stride, o + 2·stride, …, with
    /// the offset `o` moving by one per batch), dropping the oldest batch beyond the window.
    pub fn push(&mut self, f: &[f32]) {
        if self.window == 0 || self.d == 0 {
            return;
        }
        let rows: Vec<f32> = f
            .chunks_exact(self.d)
            .skip(self.offset)
            .step_by(self.stride)
            .flatten()
            .copied()
            .collect();
        self.batches.push_back(rows);
        self.offset = (self.offset + 1) % self.stride;
        while self.batches.len() > self.window {
            self.batches.pop_front();
        }
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.batches.iter().map(|b| b.len()).sum::<usize>() / self.d.max(1)
    }

    /// Each batch's kept inputs `[n_i, d]`, oldest first.
    pub fn batches(&self) -> impl Iterator<Item = &[f32]> {
        self.batches.iter().map(|b| &b[..])
    }

    /// The pooled inputs `[rows, d]`, oldest batch first.
    pub fn joined(&self) -> Vec<f32> {
        self.batches.iter().flatten().copied().collect()
    }

    /// Batches held.
    pub fn len(&self) -> usize {
        self.batches.len()
    }

    /// No batch held.
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// For the checkpoint: the pooled inputs, each batch's row count, and the next offset.
    pub fn to_parts(&self) -> (Vec<f32>, Vec<u32>, usize) {
        let counts = self
            .batches
            .iter()
            .map(|b| (b.len() / self.d.max(1)) as u32)
            .collect();
        (self.joined(), counts, self.offset)
    }

    /// The inverse of [`BiasPool::to_parts`]; `None` when the parts do not fit together.
    pub fn from_parts(
        window: usize,
        stride: usize,
        d: usize,
        data: &[f32],
        counts: &[u32],
        offset: usize,
    ) -> Option<Self> {
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        if d == 0
            || total.checked_mul(d)? != data.len()
            || counts.len() > window
            || offset >= stride.max(1)
        {
            return None;
        }
        let mut pool = BiasPool::new(window, stride, d);
        pool.offset = offset;
        let mut at = 0;
        for &c in counts {
            let len = c as usize * d;
            pool.batches.push_back(data[at..at + len].to_vec());
            at += len;
        }
        Some(pool)
    }
}

/// Load statistics of one layer: (max share / mean share, min share / mean share).
pub fn load_stats(load: &[u64]) -> (f64, f64) {
    let total: u64 = load.iter().sum();
    if total == 0 || load.is_empty() {
        return (0.0, 0.0);
    }
    let mean = total as f64 / load.len() as f64;
    let max = *load.iter().max().unwrap_or(&0) as f64;
    let min = *load.iter().min().unwrap_or(&0) as f64;
    (max / mean, min / mean)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer that is only a router (`W_g: [E, d]` at offset 0), for the balancing tests.
    fn router_only(d: usize, e: usize, k: usize) -> (MoeSpec, MoeOffsets) {
        let spec = MoeSpec {
            d,
            inter: 1,
            n_shared: 0,
            n_experts: e,
            top_k: k,
            score: ScoreFunc::Sqrtsoftplus,
            scale: 1.0,
            norm_topk: true,
            aux_coef: 0.0,
        };
        let o = MoeOffsets {
            gate: 0,
            bias: e * d,
            shared_w13: 0,
            shared_w2: 0,
            experts: 0,
            hash: false,
        };
        (spec, o)
    }

    #[test]
    fn top_k_respects_bias_and_ties() {
        let s = [0.1, 0.5, 0.5, 0.2];
        let mut sel = [0u32; 2];
        top_k(&s, &[0.0; 4], &mut sel);
        assert_eq!(sel, [1, 2]);
        top_k(&s, &[0.0, 0.0, 0.0, 0.4], &mut sel);
        assert_eq!(sel, [3, 1]);
    }

    /// Scores with a large common mode (every token prefers the same experts) and a small
    /// token-specific part, as early in training: one sign step leaves the collapse, the
    /// refit on the same scores balances it.
    #[test]
    fn fit_bias_balances_a_collapsed_batch() {
        use crate::rng::Rng;
        let (n, e, k) = (2048, 16, 2);
        let mut r = Rng::new(5);
        let common: Vec<f32> = (0..e).map(|j| 0.8 + 0.05 * j as f32).collect();
        let mut noise = vec![0.0f32; n * e];
        r.fill_normal(&mut noise, 0.01);
        let scores: Vec<f32> = (0..n * e).map(|i| common[i % e] + noise[i]).collect();
        let load_of = |bias: &[f32]| topk_load(&scores, bias, k);
        let mut one = vec![0.0f32; e];
        let l0 = load_of(&one);
        update_bias(&mut one, &l0, 0.01);
        assert!(
            load_stats(&load_of(&one)).0 > 7.0,
            "one step cannot undo the collapse"
        );
        let mut fit = vec![0.0f32; e];
        fit_bias(&mut fit, &scores, k, 16, 0);
        let (mx, mn) = load_stats(&load_of(&fit));
        assert!(
            mx < 1.5 && mn > 0.5,
            "refitted load max {mx:.2} min {mn:.2}"
        );
        // The exact hard-load sweeps close the gap the soft (softmax) model leaves: every
        // expert gets its share of this batch to within a few tokens.
        let mut hard = vec![0.0f32; e];
        fit_bias(&mut hard, &scores, k, 16, 8);
        let (hx, hn) = load_stats(&load_of(&hard));
        assert!(
            hx < mx && hx < 1.03 && hn > 0.97,
            "soft fit max {mx:.3} min {mn:.3}, with hard sweeps max {hx:.3} min {hn:.3}"
        );
        eprintln!("soft fit max {mx:.3} min {mn:.3}, with hard sweeps max {hx:.3} min {hn:.3}");
        // From a bias that starves one expert, with a soft fit far from converged (one
        // round): the sweeps still balance, where a step on ln(load) would overshoot (an
        // empty expert's ln(target / ½) is large next to the scores' spread).
        let mut starved = vec![0.0f32; e];
        starved[e - 1] = -1.0;
        fit_bias(&mut starved, &scores, k, 1, 3);
        let (sx, sn) = load_stats(&load_of(&starved));
        assert!(
            sx < 1.03 && sn > 0.97,
            "from a starved expert: max {sx:.3} min {sn:.3}"
        );
    }

    /// A drifting stream of batches like the real corpus gives: each batch holds a few
    /// documents of a few kinds, each kind preferring its own experts, on top of a common mode
    /// that drifts. Every batch is routed with the bias left by the previous ones, then the
    /// bias takes the sign step and the refit. Jumping to each batch's fit (`rate = 1`)
    /// carries that batch's composition into the next one's routing; averaging the fits
    /// (`rate = 0.2`) lowers the max share per batch and over 10-batch windows.
    #[test]
    fn refit_rate_below_one_balances_a_drifting_stream_better() {
        use crate::rng::Rng;
        let (e, k, docs, doc_len, kinds) = (16, 2, 4, 128, 6);
        let n = docs * doc_len;
        let run = |rate: f32| {
            let mut r = Rng::new(11);
            let mut pref = vec![0.0f32; kinds * e];
            r.fill_normal(&mut pref, 0.05);
            let mut drift = vec![0.0f32; e];
            r.fill_normal(&mut drift, 0.004);
            let mut bias = vec![0.0f32; e];
            let (mut per_batch, mut windows) = (Vec::new(), Vec::new());
            let mut acc = vec![0u64; e];
            let mut noise = vec![0.0f32; n * e];
            for t in 0..120 {
                r.fill_normal(&mut noise, 0.03);
                let mut s = vec![0.0f32; n * e];
                for d in 0..docs {
                    let kind = r.below(kinds as u64) as usize;
                    for i in d * doc_len..(d + 1) * doc_len {
                        for j in 0..e {
                            s[i * e + j] =
                                0.6 + drift[j] * t as f32 + pref[kind * e + j] + noise[i * e + j];
                        }
                    }
                }
                let load = topk_load(&s, &bias, k);
                if t >= 20 {
                    per_batch.push(load_stats(&load).0);
                    acc.iter_mut().zip(&load).for_each(|(a, l)| *a += l);
                    if (t + 1) % 10 == 0 {
                        windows.push(load_stats(&acc).0);
                        acc.iter_mut().for_each(|a| *a = 0);
                    }
                }
                update_bias(&mut bias, &load, 0.01);
                refit_bias(&mut bias, &s, k, 16, 0, rate);
            }
            let mean = per_batch.iter().sum::<f64>() / per_batch.len() as f64;
            let worst_window = windows.iter().cloned().fold(0.0, f64::max);
            (mean, worst_window)
        };
        let (old_mean, old_win) = run(1.0);
        let (new_mean, new_win) = run(0.2);
        assert!(
            new_mean < 0.9 * old_mean && new_win < old_win,
            "per batch {old_mean:.3} -> {new_mean:.3}, worst 10-batch window {old_win:.3} -> {new_win:.3}"
        );
        eprintln!(
            "per batch {old_mean:.3} -> {new_mean:.3}, worst window {old_win:.3} -> {new_win:.3}"
        );
    }

    /// A router whose weights drift in a persistent direction every step, over inputs that
    /// share a common mode (as in training): refitting to the batch just routed as the
    /// *updated* router scores it (`bias_fit_rescore`) leaves the next batch better balanced
    /// than refitting to the stale scores, which always lag one step of drift.
    #[test]
    fn refit_on_rescored_batch_follows_a_drifting_router() {
        use crate::rng::Rng;
        let (d, e, k, n) = (16, 16, 2, 512);
        let (spec, o) = router_only(d, e, k);
        let run = |rescore: bool| {
            let mut r = Rng::new(3);
            let mut w = vec![0.0f32; e * d];
            r.fill_normal(&mut w, 0.3);
            let mut dw = vec![0.0f32; e * d];
            r.fill_normal(&mut dw, 0.02);
            let mut mu = vec![0.0f32; d];
            r.fill_normal(&mut mu, 1.0);
            let mut bias = vec![0.0f32; e];
            let mut per_batch = Vec::new();
            for t in 0..80 {
                let mut f = vec![0.0f32; n * d];
                r.fill_normal(&mut f, 0.3);
                f.iter_mut().enumerate().for_each(|(i, x)| *x += mu[i % d]);
                let s = router_scores(&spec, &w, &o, &f);
                let load = topk_load(&s, &bias, k);
                if t >= 10 {
                    per_batch.push(load_stats(&load).0);
                }
                // The optimizer step, then the balancing.
                w.iter_mut().zip(&dw).for_each(|(w, dw)| *w += dw);
                update_bias(&mut bias, &load, 0.01);
                let s = if rescore {
                    router_scores(&spec, &w, &o, &f)
                } else {
                    s
                };
                refit_bias(&mut bias, &s, k, 16, 0, 1.0);
            }
            per_batch.iter().sum::<f64>() / per_batch.len() as f64
        };
        let (stale, fresh) = (run(false), run(true));
        assert!(
            fresh < 0.9 * stale,
            "mean max share per batch {stale:.3} -> {fresh:.3}"
        );
        eprintln!("mean max share per batch: stale {stale:.3} -> rescored {fresh:.3}");
    }

    /// The pool keeps every `stride`-th row of the last `window` batches and survives the
    /// round trip through its checkpoint parts; parts that do not fit are refused.
    #[test]
    fn bias_pool_keeps_a_strided_window_and_round_trips() {
        let d = 3;
        let batch = |v: f32, n: usize| -> Vec<f32> {
            (0..n * d).map(|i| v + (i / d) as f32 * 0.01).collect()
        };
        let mut p = BiasPool::new(2, 2, d);
        p.push(&batch(1.0, 5)); // rows 0, 2, 4
        assert_eq!(p.rows(), 3);
        assert_eq!(&p.joined()[3..6], &[1.02; 3]);
        p.push(&batch(2.0, 4)); // the offset moved: rows 1, 3
        p.push(&batch(3.0, 2)); // row 0; the first batch leaves
        assert_eq!((p.rows(), p.len()), (3, 2));
        assert_eq!(p.joined()[0], 2.01);
        assert_eq!(p.joined()[3], 2.03);
        assert_eq!(p.joined()[6], 3.0);
        let (x, rows, offset) = p.to_parts();
        assert_eq!((rows.clone(), offset), (vec![2, 1], 1));
        let back = BiasPool::from_parts(2, 2, d, &x, &rows, offset);
        assert_eq!(back, Some(p.clone()));
        // The restored pool continues where the saved one would.
        let (mut a, mut b) = (p.clone(), back.unwrap_or_default());
        a.push(&batch(4.0, 4));
        b.push(&batch(4.0, 4));
        assert_eq!(a, b);
        assert_eq!(BiasPool::from_parts(2, 2, d, &x[1..], &rows, 0), None);
        assert_eq!(BiasPool::from_parts(1, 2, d, &x, &rows, 0), None);
        assert_eq!(BiasPool::from_parts(2, 2, d, &x, &rows, 2), None);
        // Window 0 keeps nothing.
        let mut off = BiasPool::new(0, 1, d);
        off.push(&batch(1.0, 4));
        assert_eq!(off.rows(), 0);
    }

    /// Documents of a few kinds, each pulling the router input its own way, under a router
    /// that drifts every step: a bias refitted to the last batch (re-scored) carries that
    /// batch's handful of documents, while a bias fitted to the re-scored pool of the last 16
    /// batches balances held-out text of every kind (the global load) far better.
    #[test]
    fn pooled_refit_balances_held_out_text_better_than_the_last_batch() {
        use crate::rng::Rng;
        let (d, e, k, kinds, docs, doc_len) = (16, 16, 2, 6, 4, 64);
        let (spec, o) = router_only(d, e, k);
        let run = |window: usize| {
            let mut r = Rng::new(5);
            let mut w = vec![0.0f32; e * d];
            r.fill_normal(&mut w, 0.3);
            let mut dw = vec![0.0f32; e * d];
            r.fill_normal(&mut dw, 0.005);
            let mut mu = vec![0.0f32; d];
            r.fill_normal(&mut mu, 1.0);
            let mut kind_mu = vec![0.0f32; kinds * d];
            r.fill_normal(&mut kind_mu, 0.6);
            let doc = |r: &mut Rng, kind: usize, len: usize| {
                let mut f = vec![0.0f32; len * d];
                r.fill_normal(&mut f, 0.3);
                for (i, x) in f.iter_mut().enumerate() {
                    *x += mu[i % d] + kind_mu[kind * d + i % d];
                }
                f
            };
            // Held-out text: every kind equally.
            let held: Vec<f32> = (0..kinds * 8)
                .flat_map(|i| doc(&mut r, i % kinds, 32))
                .collect();
            let mut pool = BiasPool::new(window, 4, d);
            let mut bias = vec![0.0f32; e];
            let mut global = Vec::new();
            for t in 0..100 {
                let f: Vec<f32> = (0..docs)
                    .flat_map(|_| {
                        let kind = r.below(kinds as u64) as usize;
                        doc(&mut r, kind, doc_len)
                    })
                    .collect();
                let s = router_scores(&spec, &w, &o, &f);
                let load = topk_load(&s, &bias, k);
                // The optimizer step, then the balancing on the re-scored batch or pool.
                w.iter_mut().zip(&dw).for_each(|(w, dw)| *w += dw);
                update_bias(&mut bias, &load, 0.01);
                let s = if window > 0 {
                    pool.push(&f);
                    router_scores(&spec, &w, &o, &pool.joined())
                } else {
                    router_scores(&spec, &w, &o, &f)
                };
                refit_bias(&mut bias, &s, k, 16, 8, 1.0);
                if t >= 20 {
                    let hs = router_scores(&spec, &w, &o, &held);
                    let hl = topk_load(&hs, &bias, k);
                    global.push(load_stats(&hl).0);
                }
            }
            let mean = global.iter().sum::<f64>() / global.len() as f64;
            (mean, global.iter().cloned().fold(0.0, f64::max))
        };
        let (last, pooled) = (run(0), run(16));
        assert!(
            pooled.0 < 0.85 * last.0 && pooled.1 < last.1,
            "held-out max share mean/worst: last batch {last:.3?}, pool of 16 {pooled:.3?}"
        );
        eprintln!("held-out max share mean/worst: last batch {last:.3?}, pool of 16 {pooled:.3?}");
    }

    /// The refit leaves a zero-mean bias (the common shift does not change any selection and
    /// would otherwise drift up step after step) and the same selections as before centring.
    #[test]
    fn fit_bias_is_centred_and_selection_invariant() {
        let (n, e, k) = (256, 8, 2);
        let mut rng = crate::rng::Rng::new(11);
        // Uneven scores: expert 0 is everyone's favourite.
        let scores: Vec<f32> = (0..n * e)
            .map(|i| rng.next_f64() as f32 * 0.1 + if i % e == 0 { 0.5 } else { 0.0 })
            .collect();
        let mut bias = vec![3.0f32; e];
        for _ in 0..50 {
            fit_bias(&mut bias, &scores, k, 16, 8);
        }
        let mean = bias.iter().sum::<f32>() / e as f32;
        assert!(mean.abs() < 1e-4, "mean bias {mean}");
        // A shifted copy selects exactly the same experts.
        let shifted: Vec<f32> = bias.iter().map(|b| b + 40.0).collect();
        let (mut a, mut b) = (vec![0u32; k], vec![0u32; k]);
        for row in scores.chunks_exact(e) {
            top_k(row, &bias, &mut a);
            top_k(row, &shifted, &mut b);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn bias_moves_toward_balance() {
        let mut b = vec![0.0; 3];
        update_bias(&mut b, &[10, 5, 3], 0.01);
        assert_eq!(b, vec![-0.01, 0.01, 0.01]); // mean 6: only expert 0 is over
        assert_eq!(load_stats(&[10, 5, 3]), (10.0 / 6.0, 3.0 / 6.0));
    }

    #[test]
    fn score_gradients_match_finite_differences() {
        for f in [ScoreFunc::Sigmoid, ScoreFunc::Sqrtsoftplus] {
            for &x in &[-3.0f32, -0.5, 0.0, 0.7, 4.0] {
                let h = 1e-3;
                let num = (score_fn(f, x + h) - score_fn(f, x - h)) / (2.0 * h);
                let ana = score_grad(f, x, score_fn(f, x));
                assert!((num - ana).abs() < 1e-3, "{f:?} at {x}: {num} vs {ana}");
            }
        }
    }

    /// Finite differences through the whole layer (router, gate weights, shared and routed
    /// experts, balance loss). The selection bias separates experts 0 and 1 from the rest by far
    /// more than any score, so the selection is constant and the loss smooth.
    #[test]
    fn moe_layer_gradients_match_finite_differences() {
        use crate::kernels::gradcheck::check;
        use crate::rng::Rng;
        for (score, norm, aux, shared) in [
            (ScoreFunc::Sigmoid, true, 0.0, 1),
            (ScoreFunc::Sqrtsoftplus, false, 0.3, 0),
            (ScoreFunc::Sqrtsoftplus, true, 0.3, 2),
        ] {
            let spec = MoeSpec {
                d: 6,
                inter: 4,
                n_shared: shared,
                n_experts: 5,
                top_k: 2,
                score,
                scale: 1.7,
                norm_topk: norm,
                aux_coef: aux,
            };
            let (d, i, e) = (spec.d, spec.inter, spec.n_experts);
            let si = shared * i;
            let o = MoeOffsets {
                gate: 0,
                bias: e * d,
                shared_w13: e * d + e,
                shared_w2: e * d + e + 2 * si * d,
                experts: e * d + e + 3 * si * d,
                hash: false,
            };
            let total = o.experts + e * spec.expert_len();
            let mut r = Rng::new(21);
            let mut params = vec![0.0f32; total];
            r.fill_normal(&mut params, 0.5);
            params[o.bias..o.bias + e].copy_from_slice(&[30.0, 20.0, 0.0, 0.0, 0.0]);
            let (b, t) = (2, 3);
            let n = b * t;
            let tokens: Vec<u32> = (0..n as u32).collect();
            let mut f = vec![0.0f32; n * d];
            let mut g = vec![0.0f32; n * d];
            r.fill_normal(&mut f, 1.0);
            r.fill_normal(&mut g, 1.0);
            let loss = |p: &[f32], f: &[f32]| {
                let mut acts = MoeActs::default();
                let mut y = vec![0.0f32; n * d];
                forward(&spec, p, &o, f, &tokens, None, t, &mut acts, &mut y);
                y.iter()
                    .zip(&g)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    + acts.aux_loss
            };
            let mut acts = MoeActs::default();
            let mut y = vec![0.0f32; n * d];
            forward(&spec, &params, &o, &f, &tokens, None, t, &mut acts, &mut y);
            assert!(acts.sel.chunks(2).all(|s| s.contains(&0) && s.contains(&1)));
            let mut grads = vec![0.0f32; total];
            let mut df = vec![0.0f32; n * d];
            backward(
                &spec, &params, &mut grads, &o, &f, &acts, &g, &mut df, t, 1.0,
            );
            assert!(
                grads[o.bias..o.bias + e].iter().all(|&x| x == 0.0),
                "the bias gets no gradient"
            );
            let mut trainable = params.clone();
            let mut tg = grads.clone();
            // Exclude the bias from the check (it is not differentiable-in-use).
            trainable.drain(o.bias..o.bias + e);
            tg.drain(o.bias..o.bias + e);
            let with_bias = |p: &[f32]| {
                let mut full = p[..o.bias].to_vec();
                full.extend_from_slice(&params[o.bias..o.bias + e]);
                full.extend_from_slice(&p[o.bias..]);
                full
            };
            check(&trainable, &tg, |p| loss(&with_bias(p), &f), 1e-2, 5e-3);
            check(&f, &df, |x| loss(&params, x), 1e-2, 5e-3);
        }
    }
}
