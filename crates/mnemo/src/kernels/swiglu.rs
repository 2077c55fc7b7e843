//! SwiGLU gate (Shazeer 2020): `g = silu(a) ⊙ b`, `silu(a) = a·σ(a)`.
//!
//! Shapes: `h: [n, 2f]` holding `a` (gate, cols `0..f`) and `b` (up, cols `f..2f`) side by side,
//! as produced by one fused `[w1; w3]` projection; `g: [n, f]`.
//! Backward: `da = dg ⊙ b ⊙ σ(a)(1 + a(1 − σ(a)))`, `db = dg ⊙ silu(a)`.

use rayon::prelude::*;

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub fn forward(g: &mut [f32], h: &[f32], f: usize) {
    g.par_chunks_mut(f)
        .zip(h.par_chunks(2 * f))
        .for_each(|(g, h)| {
            let (a, b) = h.split_at(f);
            for i in 0..f {
                g[i] = a[i] * sigmoid(a[i]) * b[i];
            }
        });
}

/// Writes `dh: [n, 2f]` from `dg: [n, f]`.
pub fn backward(dh: &mut [f32], dg: &[f32], h: &[f32], f: usize) {
    dh.par_chunks_mut(2 * f)
        .zip(dg.par_chunks(f))
        .zip(h.par_chunks(2 * f))
        .for_each(|((dh, dg), h)| {
            let (a, b) = h.split_at(f);
            let (da, db) = dh.split_at_mut(f);
            for i in 0..f {
                let s = sigmoid(a[i]);
                let silu = a[i] * s;
                da[i] = dg[i] * b[i] * s * (1.0 + a[i] * (1.0 - s));
                db[i] = dg[i] * silu;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gradcheck::check;
    use crate::rng::Rng;

    #[test]
    fn swiglu_gradients_match_finite_differences() {
        let (n, f) = (6, 10);
        let mut r = Rng::new(9);
        let mut h = vec![0.0; n * 2 * f];
        let mut dg = vec![0.0; n * f];
        r.fill_normal(&mut h, 2.0);
        r.fill_normal(&mut dg, 1.0);
        let loss = |h: &[f32]| {
            let mut g = vec![0.0; n * f];
            forward(&mut g, h, f);
            g.iter().zip(&dg).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let mut dh = vec![0.0; h.len()];
        backward(&mut dh, &dg, &h, f);
        check(&h, &dh, loss, 1e-2, 5e-3);
    }
}
