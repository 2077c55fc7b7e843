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

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeLayout {
    Interleaved,
    Half,
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
    pub fn new(rope_dim: usize, theta: f64, max_pos: usize, layout: RopeLayout) -> Self {
        assert!(rope_dim.is_multiple_of(2), "rope_dim must be even");
        let half = rope_dim / 2;
        let mut cos = vec![0.0; max_pos * half];
        let mut sin = vec![0.0; max_pos * half];
        for p in 0..max_pos {
            for i in 0..half {
                let freq = theta.powf(-2.0 * i as f64 / rope_dim as f64);
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
