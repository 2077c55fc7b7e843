//! Qwen-style additions to the GQA attention sublayer ([`super::attention`]), applied to the
//! fused q|k|v rows right after the projection and before RoPE.
//!
//! ```text
//! qkv_bias (Qwen2):  q|k|v += [bq; bk; bv]                         bq: [H·d_h], bk, bv: [KV·d_h]
//! qk_norm  (Qwen3):  q_h ← q_h · s_h ⊙ w_q,  s_h = 1/√(mean(q_h²) + eps)   per query head h
//!                    k_g ← k_g · s_g ⊙ w_k                                 per key head g
//!                    w_q, w_k: [d_h] (one vector for all query heads, one for all key heads)
//! ```
//!
//! Backward (module `kernels::rmsnorm`'s equations per head), with `x` the pre-norm head and
//! `g = dy ⊙ w`: `dx = s·(g − x·s·mean(g ⊙ x·s))`, `dw += dy ⊙ x·s`; then `db = Σ_rows dqkv`.
//! The forward keeps the pre-norm q|k values and the per-head `s` ([`QkActs`]).

use super::layout::LayoutBuilder;
use super::Model;
use crate::config::ModelConfig;

/// Offsets of a layer's q/k/v biases (`bq`, `bk`, `bv` back to back, like `wq`, `wk`, `wv`)
/// and q/k norm weights; `None` when the model has none.
#[derive(Clone, Copy, Debug, Default)]
pub struct QkOffsets {
    pub bqkv: Option<usize>,
    pub q_norm: Option<usize>,
    pub k_norm: Option<usize>,
}

impl QkOffsets {
    /// Lay out the tensors `cfg.qkv_bias` and `cfg.qk_norm` ask for, named by `p` from
    /// `attention.{wq,wk,wv}.bias` and `attention.{q,k}_norm.weight`.
    pub(crate) fn add(
        bld: &mut LayoutBuilder,
        c: &ModelConfig,
        p: &dyn Fn(&str) -> String,
    ) -> Self {
        let (hd, h, kv) = (c.head_dim, c.n_heads, c.n_kv_heads);
        let bqkv = c.qkv_bias.then(|| {
            let o = bld.add(p("attention.wq.bias"), vec![h * hd], false);
            bld.add(p("attention.wk.bias"), vec![kv * hd], false);
            bld.add(p("attention.wv.bias"), vec![kv * hd], false);
            o
        });
        let (q_norm, k_norm) = if c.qk_norm {
            (
                Some(bld.add(p("attention.q_norm.weight"), vec![hd], false)),
                Some(bld.add(p("attention.k_norm.weight"), vec![hd], false)),
            )
        } else {
            (None, None)
        };
        QkOffsets {
            bqkv,
            q_norm,
            k_norm,
        }
    }
}

/// Whether a parameter is a q/k/v bias (initialised to zero).
pub fn is_qkv_bias(name: &str) -> bool {
    [
        "attention.wq.bias",
        "attention.wk.bias",
        "attention.wv.bias",
    ]
    .iter()
    .any(|s| name.ends_with(s))
}

/// What the backward of the q/k norms needs: the pre-norm q|k part of every row
/// `[N, (H+KV)·d_h]` and each head's `s` `[N, H+KV]`.
#[derive(Default)]
pub(crate) struct QkActs {
    pub(crate) pre: Vec<f32>,
    pub(crate) rstd: Vec<f32>,
}

impl Model {
    /// Add the biases and normalise the q and k heads of `qkv: [n, qkv_dim]` in place.
    pub(crate) fn qk_forward(&self, qk: &QkOffsets, qkv: &mut [f32], acts: &mut QkActs) {
        let c = &self.cfg;
        let qd = c.qkv_dim();
        let n = qkv.len() / qd;
        if let Some(o) = qk.bqkv {
            let b = &self.params[o..o + qd];
            for row in qkv.chunks_exact_mut(qd) {
                for (x, &bi) in row.iter_mut().zip(b) {
                    *x += bi;
                }
            }
        }
        let (Some(qo), Some(ko)) = (qk.q_norm, qk.k_norm) else {
            return;
        };
        let (hd, nh) = (c.head_dim, c.n_heads + c.n_kv_heads);
        let (wq, wk) = (&self.params[qo..qo + hd], &self.params[ko..ko + hd]);
        acts.pre.resize(n * nh * hd, 0.0);
        acts.rstd.resize(n * nh, 0.0);
        for ((row, pre), rstd) in qkv
            .chunks_exact_mut(qd)
            .zip(acts.pre.chunks_exact_mut(nh * hd))
            .zip(acts.rstd.chunks_exact_mut(nh))
        {
            pre.copy_from_slice(&row[..nh * hd]);
            for (j, (x, s)) in row[..nh * hd]
                .chunks_exact_mut(hd)
                .zip(rstd.iter_mut())
                .enumerate()
            {
                let w = if j < c.n_heads { wq } else { wk };
                let ms = x.iter().map(|&v| v * v).sum::<f32>() / hd as f32;
                *s = 1.0 / (ms + c.norm_eps).sqrt();
                for (x, &w) in x.iter_mut().zip(w) {
                    *x = *x * *s * w;
                }
            }
        }
    }

    /// Backward of [`Model::qk_forward`]: `dqkv: [n, qkv_dim]` holds dL/d(its output) and
    /// becomes dL/d(its input); the bias and norm-weight gradients are added to `grads`.
    pub(crate) fn qk_backward(
        &self,
        qk: &QkOffsets,
        acts: &QkActs,
        dqkv: &mut [f32],
        grads: &mut [f32],
    ) {
        let c = &self.cfg;
        let qd = c.qkv_dim();
        if let (Some(qo), Some(ko)) = (qk.q_norm, qk.k_norm) {
            let (hd, nh) = (c.head_dim, c.n_heads + c.n_kv_heads);
            let mut dwq = vec![0.0f32; hd];
            let mut dwk = vec![0.0f32; hd];
            let (wq, wk) = (&self.params[qo..qo + hd], &self.params[ko..ko + hd]);
            for ((drow, pre), rstd) in dqkv
                .chunks_exact_mut(qd)
                .zip(acts.pre.chunks_exact(nh * hd))
                .zip(acts.rstd.chunks_exact(nh))
            {
                for (j, ((dy, x), &s)) in drow[..nh * hd]
                    .chunks_exact_mut(hd)
                    .zip(pre.chunks_exact(hd))
                    .zip(rstd)
                    .enumerate()
                {
                    let (w, dw) = if j < c.n_heads {
                        (wq, &mut dwq)
                    } else {
                        (wk, &mut dwk)
                    };
                    let mut dot = 0.0f32;
                    for i in 0..hd {
                        let xh = x[i] * s;
                        dw[i] += dy[i] * xh;
                        dot += dy[i] * w[i] * xh;
                    }
                    let mean = dot / hd as f32;
                    for i in 0..hd {
                        dy[i] = s * (dy[i] * w[i] - x[i] * s * mean);
                    }
                }
            }
            for (g, d) in grads[qo..qo + hd].iter_mut().zip(&dwq) {
                *g += d;
            }
            for (g, d) in grads[ko..ko + hd].iter_mut().zip(&dwk) {
                *g += d;
            }
        }
        if let Some(o) = qk.bqkv {
            let gb = &mut grads[o..o + qd];
            for drow in dqkv.chunks_exact(qd) {
                for (g, &d) in gb.iter_mut().zip(drow) {
                    *g += d;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::small_cfg;
    use super::super::{Model, Workspace};
    use crate::kernels::rope::RopeLayout;
    use crate::rng::Rng;

    /// Finite differences of the loss in each bias and q/k norm weight, and over the whole
    /// model (the new terms must not disturb the other gradients), with both options on and
    /// each alone, GQA with 2 key heads for 4 query heads.
    #[test]
    fn qkv_bias_and_qk_norm_gradients_match_finite_differences() {
        for (bias, norm) in [(true, true), (true, false), (false, true)] {
            let mut cfg = small_cfg(false, 2, RopeLayout::Interleaved);
            cfg.qkv_bias = bias;
            cfg.qk_norm = norm;
            let mut m = Model::new(cfg).unwrap();
            m.init(3);
            let mut r = Rng::new(9);
            for t in m.layout.tensors.clone() {
                if t.shape.len() == 1 {
                    for p in &mut m.params[t.range()] {
                        *p += 0.3 * r.normal() as f32;
                    }
                }
            }
            let (b, t) = (2, 5);
            let tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % 19) as u32).collect();
            let targets: Vec<u32> = (0..b * t).map(|i| (i * 5 % 19) as u32).collect();
            let mut ws = Workspace::default();
            let mut grads = vec![0.0; m.layout.total];
            m.forward_backward(&tokens, &targets, b, t, &mut grads, 1.0, &mut ws);
            let loss_of = |p: &[f32]| {
                let mm = Model {
                    params: p.to_vec().into(),
                    ..Model::new(m.cfg.clone()).unwrap()
                };
                let mut ws = Workspace::default();
                mm.forward(&tokens, b, t, &mut ws);
                mm.loss(&targets, &mut ws)
            };
            let mut checked = 0;
            for spec in m.layout.tensors.iter() {
                if !(super::is_qkv_bias(&spec.name)
                    || spec.name.contains("_norm.weight") && spec.name.contains(".attention."))
                {
                    continue;
                }
                checked += 1;
                let range = spec.range();
                let sub = |x: &[f32]| {
                    let mut p = m.params.clone();
                    p[range.clone()].copy_from_slice(x);
                    loss_of(&p)
                };
                assert!(
                    grads[range.clone()].iter().any(|&g| g != 0.0),
                    "{}",
                    spec.name
                );
                crate::kernels::gradcheck::check(
                    &m.params[range.clone()],
                    &grads[range.clone()],
                    sub,
                    1e-2,
                    1e-2,
                );
            }
            assert_eq!(checked, 2 * (3 * bias as usize + 2 * norm as usize));
            // A smaller step than the per-tensor checks: the head norms curve the loss more.
            crate::kernels::gradcheck::check(&m.params, &grads, loss_of, 2e-3, 1e-2);
        }
    }
}
