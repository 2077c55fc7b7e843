//! Softmax cross-entropy, fused with its gradient.
//!
//! `loss_r = logsumexp(z_r) − z_r[y_r]`; `dz_r = scale · (softmax(z_r) − onehot(y_r))`.
//! Shapes: `logits: [n, v]`, `targets: [n]`. The gradient overwrites the logits in place (the
//! logits are the largest activation of a small model; they are not needed afterwards).
//!
//! **Ignored targets**: a row whose target is [`IGNORE`] has `loss_r = 0` and `dz_r = 0`; the
//! caller averages over the counted rows only, `L = Σ_{r counted} loss_r / n_counted`
//! ([`counted`]). `IGNORE = u32::MAX` can never be a token id (`ModelConfig::validate` keeps
//! `vocab_size < u32::MAX`).

use rayon::prelude::*;

/// Target id of a position that does not count in the loss (zero loss, zero gradient).
pub const IGNORE: u32 = u32::MAX;

/// Number of targets that count in the loss (those other than [`IGNORE`]).
pub fn counted(targets: &[u32]) -> usize {
    targets.iter().filter(|&&y| y != IGNORE).count()
}

/// Per-row losses (nats) into `losses` (0 for [`IGNORE`] targets); logits left untouched.
pub fn forward(losses: &mut [f32], logits: &[f32], targets: &[u32], v: usize) {
    losses
        .par_iter_mut()
        .zip(logits.par_chunks(v))
        .zip(targets.par_iter())
        .for_each_init(Vec::new, |e, ((l, z), &y)| {
            if y == IGNORE {
                *l = 0.0;
                return;
            }
            let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            // The same exponentials and sum as `forward_backward` (bit-identical losses).
            e.clear();
            e.extend_from_slice(z);
            let s = super::vexp::exp_sub_sum(e, m);
            *l = m + s.ln() - z[y as usize];
        });
}

/// Per-row losses into `losses`, and `logits` replaced by `scale · dloss/dlogits` (a zero row
/// and a zero loss for an [`IGNORE`] target).
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
            if y == IGNORE {
                *l = 0.0;
                z.fill(0.0);
                return;
            }
            let y = y as usize;
            let zy = z[y];
            let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let s = super::vexp::exp_sub_sum(z, m);
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

    #[test]
    fn ignored_targets_have_zero_loss_and_zero_gradient() {
        let (n, v) = (6, 9);
        let mut r = Rng::new(8);
        let mut z = vec![0.0; n * v];
        r.fill_normal(&mut z, 2.0);
        let t: Vec<u32> = vec![3, IGNORE, 0, IGNORE, 8, 5];
        let kept: Vec<usize> = vec![0, 2, 4, 5];
        assert_eq!(counted(&t), kept.len());
        // Manual loss over the kept rows only.
        let manual: f64 = kept
            .iter()
            .map(|&i| {
                let row = &z[i * v..(i + 1) * v];
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let s: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
                m + s.ln() - row[t[i] as usize] as f64
            })
            .sum::<f64>()
            / kept.len() as f64;
        let loss = |z: &[f32]| {
            let mut l = vec![0.0; n];
            forward(&mut l, z, &t, v);
            sum(&l) / counted(&t) as f64
        };
        assert!((loss(&z) - manual).abs() < 1e-5);
        let mut g = z.clone();
        let mut l2 = vec![0.0; n];
        forward_backward(&mut l2, &mut g, &t, v, 1.0 / counted(&t) as f32);
        assert_eq!((l2[1], l2[3]), (0.0, 0.0));
        assert!(g[v..2 * v]
            .iter()
            .chain(&g[3 * v..4 * v])
            .all(|&x| x == 0.0));
        check(&z, &g, loss, 1e-2, 5e-3);
    }
}
