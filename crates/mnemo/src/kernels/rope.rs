//! Rotary position embedding (Su et al. 2021) on a leading slice of each head's dimensions.
//!
//! For head dims `0..rope_dim` (even), pair `i ∈ [0, rope_dim/2)` rotates by angle
//! `pos · θ^(−2i/rope_dim)`: `(x₀, x₁) → (x₀cos − x₁sin, x₀sin + x₁cos)`.
//! The pair is `(2i, 2i+1)` in the **interleaved** layout (Meta LLaMA, DeepSeek) and
//! `(i, i + rope_dim/2)` in the **half** (rotate-half, NeoX/Hugging Face) layout. Dims
//! `rope_dim..head_dim` pass through unchanged.
//!
//! Rotation is orthogonal, so the backward pass is the same rotation by the negative angle.
//!
//! Buffers are rows of `[n_heads, head_dim]` inside a matrix of row stride `row_stride`
//! (e.g. the q part of a fused q|k|v row); `pos[r]` is the position of row `r`.
//!
//! # YaRN context extension ([`RopeScaling`])
//!
//! YaRN (Peng et al. 2023, arXiv 2309.00071), exactly as DeepSeek's `inference/model.py`
//! (`precompute_freqs_cis` and `yarn_get_mscale`, V3 / V3.2 / V4) computes it. With `d =
//! rope_dim`, base `θ`, scale `s = factor`, original context `L₀ =
//! original_max_position_embeddings` and `β_fast`, `β_slow`:
//!
//! ```text
//! f_i      = θ^(−2i/d)                                   i ∈ [0, d/2)
//! dim(r)   = d·ln(L₀ / (2π·r)) / (2·ln θ)                 (the pair that turns r times over L₀)
//! low      = max(⌊dim(β_fast)⌋, 0),  high = min(⌈dim(β_slow)⌉, d − 1)   (high += 0.001 if equal)
//! ramp_i   = clamp((i − low) / (high − low), 0, 1),  smooth_i = 1 − ramp_i
//! f'_i     = f_i / s · (1 − smooth_i) + f_i · smooth_i
//! ```
//!
//! High-frequency pairs (i < low) keep their frequency (extrapolation), low-frequency pairs
//! (i > high) are divided by `s` (interpolation), and a linear ramp blends the pairs between.
//! The attention logits are sharpened to compensate for the longer context: DeepSeek multiplies
//! the softmax scale by `mscale²` with `mscale = 0.1·mscale_coef·ln(s) + 1` (1 when `s ≤ 1`), see
//! [`RopeScaling::mscale`] and [`crate::config::ModelConfig::attn_scale`].
//!
//! One difference from DeepSeek's script: it applies YaRN only when the run's `max_seq_len`
//! exceeds `L₀` (`if seqlen > args.original_seq_len`); here the presence of `rope_scaling` in the
//! config is the switch (as in Hugging Face's implementation), so capping the context of a
//! loaded model can never silently change what it computes. `factor = 1` is the identity.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeLayout {
    Interleaved,
    Half,
}

/// YaRN RoPE scaling (see the module doc): `ModelConfig::rope_scaling`, and Hugging Face's
/// `rope_scaling: {type: yarn, ...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeScaling {
    /// Context extension factor `s` (≥ 1).
    pub factor: f64,
    /// The context `L₀` the model was (pre)trained at; `L₀·s` is the longest reachable context.
    pub original_max_position_embeddings: usize,
    /// Pairs turning more than `β_fast` times over `L₀` keep their frequency.
    #[serde(default = "default_beta_fast")]
    pub beta_fast: f64,
    /// Pairs turning fewer than `β_slow` times over `L₀` are fully interpolated.
    #[serde(default = "default_beta_slow")]
    pub beta_slow: f64,
    /// DeepSeek's `mscale` coefficient of the attention temperature (1 in V3/V3.2/V4).
    #[serde(default = "default_mscale")]
    pub mscale: f64,
}

fn default_beta_fast() -> f64 {
    32.0
}
fn default_beta_slow() -> f64 {
    1.0
}
fn default_mscale() -> f64 {
    1.0
}

impl RopeScaling {
    /// YaRN with DeepSeek's defaults (β_fast 32, β_slow 1, mscale 1).
    pub fn yarn(factor: f64, original_max_position_embeddings: usize) -> Self {
        RopeScaling {
            factor,
            original_max_position_embeddings,
            beta_fast: default_beta_fast(),
            beta_slow: default_beta_slow(),
            mscale: default_mscale(),
        }
    }

    /// The longest context the scaling reaches: `L₀ · s`.
    pub fn max_context(&self) -> usize {
        (self.original_max_position_embeddings as f64 * self.factor).floor() as usize
    }

    /// DeepSeek's `yarn_get_mscale(factor, mscale)`: `0.1·mscale·ln(s) + 1`, or 1 when `s ≤ 1`.
    /// The softmax scale is multiplied by its square.
    pub fn mscale(&self) -> f64 {
        if self.factor <= 1.0 {
            1.0
        } else {
            0.1 * self.mscale * self.factor.ln() + 1.0
        }
    }

    /// The scaled inverse frequencies `f'_i`, `i ∈ [0, rope_dim/2)`, for base `theta`.
    pub fn inv_freqs(&self, rope_dim: usize, theta: f64) -> Vec<f64> {
        let d = rope_dim as f64;
        let l0 = self.original_max_position_embeddings as f64;
        let corr =
            |rot: f64| d * (l0 / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
        let low = corr(self.beta_fast).floor().max(0.0);
        let mut high = corr(self.beta_slow).ceil().min(d - 1.0);
        if low == high {
            high += 0.001;
        }
        base_inv_freqs(rope_dim, theta)
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let smooth = 1.0 - ramp;
                f / self.factor * (1.0 - smooth) + f * smooth
            })
            .collect()
    }
}

/// Unscaled inverse frequencies `θ^(−2i/d)`, `i ∈ [0, d/2)`.
pub fn base_inv_freqs(rope_dim: usize, theta: f64) -> Vec<f64> {
    (0..rope_dim / 2)
        .map(|i| theta.powf(-2.0 * i as f64 / rope_dim as f64))
        .collect()
}

/// Precomputed cos/sin for positions `0..max_pos`, `[max_pos, rope_dim/2]` each.
#[derive(Clone, Debug)]
pub struct RopeTable {
    pub rope_dim: usize,
    pub layout: RopeLayout,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Plain RoPE (no scaling).
    pub fn new(rope_dim: usize, theta: f64, max_pos: usize, layout: RopeLayout) -> Self {
        Self::with_scaling(rope_dim, theta, max_pos, layout, None)
    }

    /// RoPE with optional YaRN scaling of the frequencies (the attention temperature `mscale`
    /// is not part of the table: it goes into the softmax scale).
    pub fn with_scaling(
        rope_dim: usize,
        theta: f64,
        max_pos: usize,
        layout: RopeLayout,
        scaling: Option<&RopeScaling>,
    ) -> Self {
        assert!(rope_dim.is_multiple_of(2), "rope_dim must be even");
        let half = rope_dim / 2;
        let freqs = match scaling {
            Some(s) => s.inv_freqs(rope_dim, theta),
            None => base_inv_freqs(rope_dim, theta),
        };
        let mut cos = vec![0.0; max_pos * half];
        let mut sin = vec![0.0; max_pos * half];
        for p in 0..max_pos {
            for (i, &freq) in freqs.iter().enumerate() {
                let a = p as f64 * freq;
                cos[p * half + i] = a.cos() as f32;
                sin[p * half + i] = a.sin() as f32;
            }
        }
        RopeTable {
            rope_dim,
            layout,
            cos,
            sin,
        }
    }

    pub fn max_pos(&self) -> usize {
        if self.rope_dim == 0 {
            usize::MAX
        } else {
            self.cos.len() / (self.rope_dim / 2)
        }
    }

    /// Rotate the first `n_heads·head_dim` columns of every row in place.
    /// `inverse` rotates by the negative angle (the backward pass).
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &self,
        x: &mut [f32],
        rows: usize,
        row_stride: usize,
        col_offset: usize,
        n_heads: usize,
        head_dim: usize,
        pos: impl Fn(usize) -> usize + Sync,
        inverse: bool,
    ) {
        if self.rope_dim == 0 {
            return;
        }
        assert!(self.rope_dim <= head_dim);
        let half = self.rope_dim / 2;
        let sign = if inverse { -1.0f32 } else { 1.0 };
        x[..rows * row_stride]
            .par_chunks_mut(row_stride)
            .enumerate()
            .for_each(|(r, row)| {
                let p = pos(r);
                assert!(p < self.max_pos(), "position {p} beyond the RoPE table");
                let cos = &self.cos[p * half..(p + 1) * half];
                let sin = &self.sin[p * half..(p + 1) * half];
                for h in 0..n_heads {
                    let v = &mut row[col_offset + h * head_dim..col_offset + (h + 1) * head_dim];
                    for i in 0..half {
                        let (a, b) = match self.layout {
                            RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                            RopeLayout::Half => (i, i + half),
                        };
                        let (c, s) = (cos[i], sign * sin[i]);
                        let (x0, x1) = (v[a], v[b]);
                        v[a] = x0 * c - x1 * s;
                        v[b] = x0 * s + x1 * c;
                    }
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gradcheck::check;
    use crate::rng::Rng;

    #[test]
    fn rope_is_a_rotation_and_its_backward_is_the_inverse() {
        for layout in [RopeLayout::Interleaved, RopeLayout::Half] {
            let (rows, heads, hd, rd) = (9, 2, 10, 6);
            let t = RopeTable::new(rd, 10000.0, 32, layout);
            let mut r = Rng::new(2);
            let mut x = vec![0.0; rows * heads * hd];
            let mut g = vec![0.0; x.len()];
            r.fill_normal(&mut x, 1.0);
            r.fill_normal(&mut g, 1.0);
            let fwd = |x: &[f32]| {
                let mut y = x.to_vec();
                t.apply(&mut y, rows, heads * hd, 0, heads, hd, |r| r + 3, false);
                y
            };
            let y = fwd(&x);
            // Pass-through dims untouched; norms of pairs preserved.
            for rr in 0..rows {
                for h in 0..heads {
                    for d in rd..hd {
                        let i = rr * heads * hd + h * hd + d;
                        assert_eq!(x[i], y[i]);
                    }
                }
            }
            let n1: f32 = x.iter().map(|v| v * v).sum();
            let n2: f32 = y.iter().map(|v| v * v).sum();
            assert!((n1 - n2).abs() < 1e-3 * n1);
            let mut back = y.clone();
            t.apply(&mut back, rows, heads * hd, 0, heads, hd, |r| r + 3, true);
            for (a, b) in back.iter().zip(&x) {
                assert!((a - b).abs() < 1e-5);
            }
            let mut dx = g.clone();
            t.apply(&mut dx, rows, heads * hd, 0, heads, hd, |r| r + 3, true);
            let loss = |p: &[f32]| {
                fwd(p)
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum()
            };
            check(&x, &dx, loss, 1e-2, 1e-3);
        }
    }

    /// Frequencies and mscale against `reference/yarn.py` (DeepSeek's `precompute_freqs_cis`
    /// and `yarn_get_mscale`, run in PyTorch).
    #[test]
    fn yarn_matches_deepseek_reference() {
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/yarn_freqs.json")).unwrap();
        let cases = v.as_array().unwrap();
        assert!(cases.len() >= 3);
        for c in cases {
            let s = RopeScaling {
                factor: c["factor"].as_f64().unwrap(),
                original_max_position_embeddings: c["original"].as_u64().unwrap() as usize,
                beta_fast: c["beta_fast"].as_f64().unwrap(),
                beta_slow: c["beta_slow"].as_f64().unwrap(),
                mscale: c["mscale_coef"].as_f64().unwrap(),
            };
            let dim = c["dim"].as_u64().unwrap() as usize;
            let theta = c["base"].as_f64().unwrap();
            let want: Vec<f64> = c["freqs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            let got = s.inv_freqs(dim, theta);
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // The reference runs in float32.
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1e-30),
                    "{c}: pair {i}: {g} vs {w}"
                );
            }
            let ms = c["mscale"].as_f64().unwrap();
            assert!((s.mscale() - ms).abs() < 1e-12, "{c}: mscale");
            // cos/sin at a far position from the reference's torch.polar.
            let p = c["pos"].as_u64().unwrap() as usize;
            let t = RopeTable::with_scaling(dim, theta, p + 1, RopeLayout::Interleaved, Some(&s));
            let cw = c["cos_at_pos"].as_array().unwrap();
            for (i, w) in cw.iter().enumerate() {
                let w = w.as_f64().unwrap();
                assert!(
                    (t.cos[p * dim / 2 + i] as f64 - w).abs() < 1e-3,
                    "{c}: cos {i}"
                );
            }
        }
    }

    #[test]
    fn yarn_factor_one_is_plain_rope() {
        let plain = RopeTable::new(16, 10000.0, 64, RopeLayout::Half);
        let s = RopeScaling::yarn(1.0, 32);
        let y = RopeTable::with_scaling(16, 10000.0, 64, RopeLayout::Half, Some(&s));
        assert_eq!(plain.cos, y.cos);
        assert_eq!(plain.sin, y.sin);
        assert_eq!(s.mscale(), 1.0);
        // A real factor: the highest-frequency pair is untouched, the lowest divided by s.
        let s = RopeScaling::yarn(8.0, 64);
        let f = s.inv_freqs(16, 10000.0);
        let b = base_inv_freqs(16, 10000.0);
        assert_eq!(f[0], b[0]);
        assert!((f[7] - b[7] / 8.0).abs() < 1e-15);
        assert_eq!(s.max_context(), 512);
        assert!((s.mscale() - (0.1 * 8f64.ln() + 1.0)).abs() < 1e-15);
    }

    #[test]
    fn layouts_agree_up_to_a_permutation() {
        // Rotate-half on x equals interleaved on x with dims permuted (i ↔ 2i, i+h ↔ 2i+1).
        let (hd, rd) = (8, 8);
        let ti = RopeTable::new(rd, 100.0, 8, RopeLayout::Interleaved);
        let th = RopeTable::new(rd, 100.0, 8, RopeLayout::Half);
        let x: Vec<f32> = (0..hd).map(|i| i as f32 * 0.3 - 1.0).collect();
        let perm: Vec<usize> = (0..rd / 2).flat_map(|i| [i, i + rd / 2]).collect();
        let xi: Vec<f32> = perm.iter().map(|&p| x[p]).collect();
        let mut yh = x.clone();
        th.apply(&mut yh, 1, hd, 0, 1, hd, |_| 5, false);
        let mut yi = xi.clone();
        ti.apply(&mut yi, 1, hd, 0, 1, hd, |_| 5, false);
        for (k, &p) in perm.iter().enumerate() {
            assert!((yi[k] - yh[p]).abs() < 1e-6);
        }
    }
}
