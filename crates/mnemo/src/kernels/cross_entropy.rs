//! Softmax cross-entropy, fused with its gradient.
//!
//! `loss_r = logsumexp(z_r) − z_r[y_r]`; `dz_r = scale · (softmax(z_r) − onehot(y_r))`.
//! Shapes: `logits: [n, v]`, `targets: [n]`. The gradient overwrites the logits in place (the
//! logits are the largest activation of a small model; they are not needed afterwards).

use rayon::prelude::*;

/// Per-row losses (nats) into `losses`; logits left untouched.
pub fn forward(losses: &mut [f32], logits: &[f32], targets: &[u32], v: usize) {
    losses
        .par_iter_mut()
        .zip(logits.par_chunks(v))
        .zip(targets.par_iter())
        .for_each(|((l, z), &y)| {
            let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let s: f32 = z.iter().map(|&x| (x - m).exp()).sum();
            *l = m + s.ln() - z[y as usize];
        });
}

/// Per-row losses into `losses`, and `logits` replaced by `scale · dloss/dlogits`.
pub fn forward_backward(
    losses: &mut [f32],
    logits: &mut [f32],
    targets: &[u32],
    v: usize,
    scale: f32,
) {
    losses
        .par_iter_mut()
        .zip(logits.par_chunks_mut(v))
        .zip(targets.par_iter())
        .for_each(|((l, z), &y)| {
            let y = y as usize;
            let zy = z[y];
            let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut s = 0.0f32;
            for x in z.iter_mut() {
                *x = (*x - m).exp();
                s += *x;
            }
            *l = m + s.ln() - zy;
            let inv = scale / s;
            for x in z.iter_mut() {
                *x *= inv;
            }
            z[y] -= scale;
        });
}

/// Deterministic sum of per-row losses.
pub fn sum(losses: &[f32]) -> f64 {
    losses.iter().map(|&x| x as f64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gradcheck::check;
    use crate::rng::Rng;

    #[test]
    fn cross_entropy_gradient_and_value() {
        let (n, v) = (5, 11);
        let mut r = Rng::new(4);
        let mut z = vec![0.0; n * v];
        r.fill_normal(&mut z, 3.0);
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        let loss = |z: &[f32]| {
            let mut l = vec![0.0; n];
            forward(&mut l, z, &t, v);
            sum(&l) / n as f64
        };
        // Uniform logits give ln(v).
        let mut l = vec![0.0; 1];
        forward(&mut l, &vec![0.5; v], &[3], v);
        assert!((l[0] - (v as f32).ln()).abs() < 1e-5);
        let mut g = z.clone();
        let mut l2 = vec![0.0; n];
        forward_backward(&mut l2, &mut g, &t, v, 1.0 / n as f32);
        assert!((sum(&l2) / n as f64 - loss(&z)).abs() < 1e-5);
        check(&z, &g, loss, 1e-2, 5e-3);
    }
}
