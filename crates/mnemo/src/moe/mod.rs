//! DeepSeekMoE feed-forward (Dai et al. 2024; DeepSeek-V3 §2.1.2, V4): shared experts that every
//! token uses plus fine-grained routed experts of which each token uses `k`, with
//! auxiliary-loss-free load balancing.
//!
//! ```text
//! s      = score(f · W_gᵀ)                  [N, E]   sigmoid (V3), sqrt(softplus) (V4) or
//!                                                    softmax over the E experts (V2)
//! sel    = top-k(s + b)                     [N, k]   b: per-expert bias, selection only
//!          (n_group > 1: only among the topk_group groups whose two best s + b sum highest)
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

mod packed;
pub use packed::PackedRows;

use crate::config::{ModelConfig, ScoreFunc};
use crate::kernels::act_quant::{self, ActQuant};
use crate::kernels::matmul::{gemm, MatRef};
use crate::kernels::{swiglu, SendPtr};
use rayon::prelude::*;

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
    /// SwiGLU clamp `λ` of every expert (DeepSeek-V4's `swiglu_limit`; 0 = none), see
    /// [`swiglu::forward_clamped`].
    pub limit: f32,
    /// Round the routed experts' inputs (to `w1|w3`, to `w2`) as ggml's products do
    /// (`kernels::act_quant`; llama.cpp's numerics of a quantised GGUF); `None`: exact f32.
    /// `[2..4]`: the same for the shared experts' two products; `[4]`: the router's.
    pub act_quant: [Option<ActQuant>; 5],
    /// Multiply each routed expert's SwiGLU output by its route weight BEFORE `w2` (and round
    /// that product for `w2`, `act_quant[1]`), as DeepSeek's official inference code does;
    /// `false`: after `w2` (transformers). Equal in exact arithmetic.
    pub weight_before_w2: bool,
    /// Group-limited routing (`ModelConfig::n_group`, `topk_group`; `n_group ≤ 1`: none).
    pub n_group: usize,
    pub topk_group: usize,
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
            limit: c.swiglu_limit,
            act_quant: [None; 5],
            weight_before_w2: false,
            n_group: c.n_group,
            topk_group: c.topk_group,
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
        ScoreFunc::Softmax => unreachable!("softmax scores a whole row (score_row)"),
    }
}

/// The score function on one token's router logits `[E]`, in place.
fn score_row(f: ScoreFunc, row: &mut [f32]) {
    if f == ScoreFunc::Softmax {
        let m = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut z = 0.0f32;
        for x in row.iter_mut() {
            *x = (*x - m).exp();
            z += *x;
        }
        row.iter_mut().for_each(|x| *x /= z);
    } else {
        row.iter_mut().for_each(|x| *x = score_fn(f, *x));
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
        ScoreFunc::Softmax => unreachable!("softmax's Jacobian is not diagonal (backward)"),
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
    forward_with(spec, params, o, f, tokens, table, t, acts, y, None)
}

/// [`forward`], with the expert products of the rows `packed` marks on the quantised copies
/// of the expert weights it holds (cached decoding of a packed model; [`PackedRows`]).
#[allow(clippy::too_many_arguments)]
pub fn forward_with(
    spec: &MoeSpec,
    params: &[f32],
    o: &MoeOffsets,
    f: &[f32],
    tokens: &[u32],
    table: Option<&[u32]>,
    t: usize,
    acts: &mut MoeActs,
    y: &mut [f32],
    packed: Option<&PackedRows>,
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
    // Router (a packed-only model's router may be its mapped BF16 weight).
    acts.scores.resize(n * e, 0.0);
    match packed {
        Some(p) => packed::product(
            Some(p),
            |r| p.rows[r],
            params,
            o.gate,
            (&mut acts.scores, f),
            (n, d, e),
            false,
            true,
        ),
        None => {
            let fin = act_quant::rounded_rows(spec.act_quant[4], f, d);
            gate_logits(
                &mut acts.scores,
                &fin,
                &params[o.gate..o.gate + e * d],
                n,
                d,
                e,
            )
        }
    }
    acts.scores
        .par_chunks_mut(e)
        .for_each(|row| score_row(spec.score, row));
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
                .for_each(|(sel, s)| top_k_grouped(spec, s, bias, sel));
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
    let el = spec.expert_len();
    let w_route = &acts.w;
    acts.experts
        .par_iter_mut()
        .enumerate()
        .for_each(|(ej, ex)| {
            let m = ex.slots.len();
            ex.x.resize(m * d, 0.0);
            for (row, &slot) in ex.slots.iter().enumerate() {
                let tok = slot as usize / k;
                ex.x[row * d..(row + 1) * d].copy_from_slice(&f[tok * d..(tok + 1) * d]);
            }
            if let Some(q) = spec.act_quant[0] {
                ex.x.chunks_exact_mut(d).for_each(|r| q.round_trip(r));
            }
            ex.h13.resize(m * 2 * i, 0.0);
            ex.g.resize(m * i, 0.0);
            ex.out.resize(m * d, 0.0);
            if m == 0 {
                return;
            }
            let off = o.experts + ej * el;
            let slots = &ex.slots;
            let row_packed = |row: usize| packed.is_some_and(|p| p.rows[slots[row] as usize / k]);
            packed::product(
                packed,
                row_packed,
                params,
                off,
                (&mut ex.h13, &ex.x),
                (m, d, 2 * i),
                false,
                false,
            );
            swiglu::forward_clamped(&mut ex.g, &ex.h13, i, spec.limit);
            if spec.weight_before_w2 {
                for (g, &slot) in ex.g.chunks_exact_mut(i).zip(slots) {
                    let wj = w_route[slot as usize];
                    g.iter_mut().for_each(|v| *v *= wj);
                }
            }
            if let Some(q) = spec.act_quant[1] {
                ex.g.chunks_exact_mut(i).for_each(|r| q.round_trip(r));
            }
            packed::product(
                packed,
                row_packed,
                params,
                off + 2 * i * d,
                (&mut ex.out, &ex.g),
                (m, i, d),
                false,
                false,
            );
        });
    // Shared experts (one SwiGLU of width S·I) straight into y.
    if n_shared > 0 {
        let si = n_shared * i;
        acts.sh13.resize(n * 2 * si, 0.0);
        acts.sg.resize(n * si, 0.0);
        let row_packed = |r: usize| packed.is_some_and(|p| p.rows[r]);
        let fin = act_quant::rounded_rows(spec.act_quant[2], f, d);
        packed::product(
            packed,
            row_packed,
            params,
            o.shared_w13,
            (&mut acts.sh13, &fin),
            (n, d, 2 * si),
            false,
            true,
        );
        swiglu::forward_clamped(&mut acts.sg, &acts.sh13, si, spec.limit);
        if let Some(q) = spec.act_quant[3] {
            acts.sg.chunks_exact_mut(si).for_each(|r| q.round_trip(r));
        }
        packed::product(
            packed,
            row_packed,
            params,
            o.shared_w2,
            (y, &acts.sg),
            (n, si, d),
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
            let wj = if spec.weight_before_w2 { 1.0 } else { w[slot] };
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
    s.par_chunks_mut(e)
        .for_each(|row| score_row(spec.score, row));
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

/// [`top_k`], group-limited when `spec.n_group > 1` (llama.cpp's `build_moe_ffn`): the experts
/// form `n_group` consecutive equal groups, each scored by the sum of its two largest
/// `s + bias`; only the `topk_group` best groups (ties: lower index) stay selectable.
fn top_k_grouped(spec: &MoeSpec, s: &[f32], bias: &[f32], sel: &mut [u32]) {
    let g = spec.n_group;
    if g <= 1 {
        return top_k(s, bias, sel);
    }
    let per = s.len() / g;
    let mut score: Vec<(usize, f32)> = (0..g)
        .map(|gi| {
            let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
            for x in gi * per..(gi + 1) * per {
                let v = s[x] + bias[x];
                if v > a {
                    (a, b) = (v, a);
                } else if v > b {
                    b = v;
                }
            }
            (gi, if per > 1 { a + b } else { a })
        })
        .collect();
    score.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
    let mut masked = vec![f32::NEG_INFINITY; s.len()];
    for &(gi, _) in &score[..spec.topk_group] {
        masked[gi * per..(gi + 1) * per].copy_from_slice(&bias[gi * per..(gi + 1) * per]);
    }
    top_k(s, &masked, sel)
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
        swiglu::backward_clamped(&mut dsh13, &dsg, &acts.sh13, si, spec.limit);
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
            swiglu::backward_clamped(&mut dh13, &dg, &ex.h13, i, spec.limit);
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
            if spec.score == ScoreFunc::Softmax {
                // d logit_c = s_c · (ds_c − Σ_j ds_j s_j)
                let m: f32 = ds.iter().zip(s).map(|(a, b)| a * b).sum();
                for c in 0..e {
                    ds[c] = s[c] * (ds[c] - m);
                }
                return;
            }
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

mod balance;
#[cfg(test)]
mod tests;

pub use balance::{
    fit_bias, fit_bias_in, load_stats, refit_bias, refit_bias_in, update_bias, BiasPool,
};
