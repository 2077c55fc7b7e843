//! The feed-forward sublayer: a dense SwiGLU, or DeepSeekMoE (module [`crate::moe`]), chosen
//! per block by [`Ffn`].
//!
//! ```text
//! f: [N, d] (normed input)
//! dense:  g = silu(f·W1ᵀ) ⊙ (f·W3ᵀ)        [N, F]      out (+)= g·W2ᵀ        [N, d]
//! MoE:    out (+)= Σ shared experts(f) + Σ_{e ∈ top-k(f)} gate_e · expert_e(f)
//! ```

use super::decode::Plan;
use super::{Ffn, LayerOffsets, Model};
use crate::config::ModelConfig;
use crate::kernels::matmul::linear_backward_frozen;
use crate::kernels::swiglu;
use crate::moe::{self, MoeActs, MoeSpec};

/// The feed-forward activations of one block.
#[derive(Default)]
pub(crate) struct FfnActs {
    /// Dense: `f·[W1; W3]ᵀ` `[N, 2F]` and the SwiGLU output `[N, F]`.
    pub(crate) h13: Vec<f32>,
    pub(crate) g: Vec<f32>,
    /// MoE: routing, loads and the experts' activations.
    pub(crate) moe: MoeActs,
}

impl FfnActs {
    pub(crate) fn new(c: &ModelConfig, l: usize, n: usize) -> Self {
        let f = if c.is_moe(l) { 0 } else { c.ffn_hidden };
        FfnActs {
            h13: vec![0.0; n * 2 * f],
            g: vec![0.0; n * f],
            moe: MoeActs::default(),
        }
    }
}

/// What the feed-forward needs from its driver: the batch's token ids (hash routing), the
/// sequence length of the MoE balance loss, and whether that loss is computed.
#[derive(Clone, Copy)]
pub(crate) struct FfnRows<'a> {
    pub(crate) tokens: &'a [u32],
    pub(crate) seq_len: usize,
    pub(crate) aux: bool,
    /// Which rows use the model's quantised weights (cached drivers).
    pub(crate) plan: &'a Plan,
}

impl Model {
    /// The feed-forward sublayer of block `l` on its normed input `f: [N, d]`: writes (`acc`:
    /// adds) its output into `out: [N, d]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn ffn_forward(
        &self,
        l: usize,
        lo: &LayerOffsets,
        f: &[f32],
        acts: &mut FfnActs,
        rows: FfnRows,
        out: &mut [f32],
        acc: bool,
    ) {
        use super::decode::profile::{FFN_DOWN, FFN_UP};
        let c = &self.cfg;
        let (d, fh) = (c.d_model, c.ffn_hidden);
        let n = f.len() / d;
        match lo.ffn {
            Ffn::Dense { w13, w2 } => {
                acts.h13.resize(n * 2 * fh, 0.0);
                acts.g.resize(n * fh, 0.0);
                self.lin(
                    rows.plan,
                    FFN_UP,
                    &mut acts.h13,
                    f,
                    w13,
                    n,
                    d,
                    2 * fh,
                    false,
                );
                swiglu::forward(&mut acts.g, &acts.h13, fh);
                self.lin(rows.plan, FFN_DOWN, out, &acts.g, w2, n, fh, d, acc);
            }
            Ffn::Moe(mo) => {
                if !acc {
                    out.fill(0.0);
                }
                let mut spec = MoeSpec::new(c);
                if !rows.aux {
                    spec.aux_coef = 0.0;
                }
                if let Some(q) = self.moe_act_quant.get(l) {
                    spec.act_quant = *q;
                }
                spec.weight_before_w2 = self.official_numerics;
                let table = self.hash_tables[l].as_deref();
                let qrows = match (self.quant.is_empty(), self.packed_only) {
                    (true, _) => None,
                    (false, true) => Some(vec![true; n]),
                    (false, false) => rows.plan.quantised_rows(n),
                };
                let packed = qrows.as_deref().map(|r| moe::PackedRows {
                    quant: &self.quant,
                    rows: r,
                });
                moe::forward_with(
                    &spec,
                    &self.params,
                    &mo,
                    f,
                    rows.tokens,
                    table,
                    rows.seq_len,
                    &mut acts.moe,
                    out,
                    packed.as_ref(),
                );
            }
        }
    }

    /// Backward of [`Model::ffn_forward`] over `N` rows of sequences of `t`: from
    /// `dout = dL/dout` into `df = dL/df` (overwritten), accumulating the weight gradients
    /// into `grads` (dense weights unless `frozen`; MoE always).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn ffn_backward(
        &self,
        lo: &LayerOffsets,
        t: usize,
        f: &[f32],
        acts: &FfnActs,
        frozen: bool,
        (dout, df): (&[f32], &mut [f32]),
        grads: &mut [f32],
        grad_scale: f32,
        (dh13, dg): (&mut [f32], &mut [f32]),
    ) {
        let c = &self.cfg;
        let (d, fh) = (c.d_model, c.ffn_hidden);
        let n = f.len() / d;
        match lo.ffn {
            Ffn::Dense { w13, w2 } => {
                linear_backward_frozen(
                    Some((dg, false)),
                    (!frozen).then_some(&mut grads[w2..w2 + d * fh]),
                    dout,
                    &acts.g,
                    self.w(w2, d * fh),
                    n,
                    fh,
                    d,
                );
                swiglu::backward(dh13, dg, &acts.h13, fh);
                linear_backward_frozen(
                    Some((df, false)),
                    (!frozen).then_some(&mut grads[w13..w13 + 2 * fh * d]),
                    dh13,
                    f,
                    self.w(w13, 2 * fh * d),
                    n,
                    d,
                    2 * fh,
                );
            }
            Ffn::Moe(mo) => {
                let spec = MoeSpec::new(c);
                moe::backward(
                    &spec,
                    &self.params,
                    grads,
                    &mo,
                    f,
                    &acts.moe,
                    dout,
                    df,
                    t,
                    grad_scale,
                );
            }
        }
    }
}
