//! AdamW (Loshchilov & Hutter 2019) over flat parameter buffers.
//!
//! `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `p ← p − lr·( m/(1−β₁ᵗ) / (sqrt(v/(1−β₂ᵗ)) + ε) + wd·p )` (decoupled decay, only where
//! `decay` is set: matrices, not norms or embeddings by default).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct AdamWParams {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

/// One update of a contiguous block. `step` is 1-based.
pub fn step(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    h: AdamWParams,
    step: u64,
    decay: bool,
) {
    let bc1 = 1.0 - (h.beta1 as f64).powi(step as i32);
    let bc2 = 1.0 - (h.beta2 as f64).powi(step as i32);
    let step_size = (h.lr as f64 / bc1) as f32;
    let inv_bc2_sqrt = (1.0 / bc2.sqrt()) as f32;
    let wd = if decay { h.lr * h.weight_decay } else { 0.0 };
    const CHUNK: usize = 4096;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                let gi = g[i];
                m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * gi;
                v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * gi * gi;
                let denom = v[i].sqrt() * inv_bc2_sqrt + h.eps;
                p[i] -= wd * p[i] + step_size * m[i] / denom;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_by_lr_times_sign() {
        // With bias correction, the first Adam step is lr·g/(|g|+ε) ≈ lr·sign(g).
        let h = AdamWParams {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut p = vec![1.0, 1.0, 1.0];
        let g = vec![0.5, -2.0, 0.0];
        let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
        step(&mut p, &g, &mut m, &mut v, h, 1, true);
        assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] - 1.1).abs() < 1e-6 && p[2] == 1.0);
        // Decoupled weight decay shrinks parameters even with zero gradient.
        let h = AdamWParams {
            weight_decay: 0.5,
            ..h
        };
        let mut p = vec![2.0];
        let (mut m, mut v) = (vec![0.0], vec![0.0]);
        step(&mut p, &[0.0], &mut m, &mut v, h, 1, true);
        assert!((p[0] - (2.0 - 0.1 * 0.5 * 2.0)).abs() < 1e-6);
    }

    #[test]
    fn minimises_a_quadratic() {
        let h = AdamWParams {
            lr: 0.05,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let target = [3.0f32, -1.0];
        let mut p = vec![0.0, 0.0];
        let (mut m, mut v) = (vec![0.0; 2], vec![0.0; 2]);
        for t in 1..=2000 {
            let g: Vec<f32> = p.iter().zip(&target).map(|(a, b)| 2.0 * (a - b)).collect();
            step(&mut p, &g, &mut m, &mut v, h, t, false);
        }
        assert!(
            (p[0] - 3.0).abs() < 1e-2 && (p[1] + 1.0).abs() < 1e-2,
            "{p:?}"
        );
    }
}
