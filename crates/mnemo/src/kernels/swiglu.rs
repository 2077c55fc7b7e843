//! SwiGLU gate (Shazeer 2020): `g = silu(a) ⊙ b`, `silu(a) = a·σ(a)`.
//!
//! Shapes: `h: [n, 2f]` holding `a` (gate, cols `0..f`) and `b` (up, cols `f..2f`) side by side,
//! as produced by one fused `[w1; w3]` projection; `g: [n, f]`.
//! Backward: `da = dg ⊙ b ⊙ σ(a)(1 + a(1 − σ(a)))`, `db = dg ⊙ silu(a)`.
//!
//! With a limit `λ > 0` (DeepSeek-V4's `swiglu_limit`) the pre-activations are clamped first:
//! `g = silu(min(a, λ)) ⊙ clamp(b, −λ, λ)`; the backward multiplies by the strict indicators
//! `[a < λ]` and `[−λ < b < λ]` (as torch's `clamp` backward). `λ = 0`: no clamp.

use rayon::prelude::*;

use super::vexp;

pub fn forward(g: &mut [f32], h: &[f32], f: usize) {
    forward_clamped(g, h, f, 0.0)
}

/// `a` clamped at `limit` (0: as is) into `ac`, and `σ(ac)` into `s` (vectorised `exp`).
fn gate(ac: &mut Vec<f32>, s: &mut Vec<f32>, a: &[f32], limit: f32) {
    ac.clear();
    if limit > 0.0 {
        ac.extend(a.iter().map(|&x| x.min(limit)));
    } else {
        ac.extend_from_slice(a);
    }
    s.resize(a.len(), 0.0);
    vexp::sigmoid(s, ac);
}

/// [`forward`] with the pre-activations clamped at `limit` (module docs; 0 = no clamp).
pub fn forward_clamped(g: &mut [f32], h: &[f32], f: usize, limit: f32) {
    g.par_chunks_mut(f).zip(h.par_chunks(2 * f)).for_each_init(
        || (Vec::new(), Vec::new()),
        |(ac, s), (g, h)| {
            let (a, b) = h.split_at(f);
            gate(ac, s, a, limit);
            if limit > 0.0 {
                for i in 0..f {
                    g[i] = ac[i] * s[i] * b[i].clamp(-limit, limit);
                }
            } else {
                for i in 0..f {
                    g[i] = ac[i] * s[i] * b[i];
                }
            }
        },
    );
}

/// Writes `dh: [n, 2f]` from `dg: [n, f]`.
pub fn backward(dh: &mut [f32], dg: &[f32], h: &[f32], f: usize) {
    backward_clamped(dh, dg, h, f, 0.0)
}

/// Backward of [`forward_clamped`] (`h`: the unclamped pre-activations).
pub fn backward_clamped(dh: &mut [f32], dg: &[f32], h: &[f32], f: usize, limit: f32) {
    dh.par_chunks_mut(2 * f)
        .zip(dg.par_chunks(f))
        .zip(h.par_chunks(2 * f))
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(ac, sg), ((dh, dg), h)| {
                let (a, b) = h.split_at(f);
                let (da, db) = dh.split_at_mut(f);
                gate(ac, sg, a, limit);
                for i in 0..f {
                    let (bi, pa, pb) = if limit > 0.0 {
                        let pa = if a[i] < limit { 1.0 } else { 0.0 };
                        let pb = if b[i] > -limit && b[i] < limit {
                            1.0
                        } else {
                            0.0
                        };
                        (b[i].clamp(-limit, limit), pa, pb)
                    } else {
                        (b[i], 1.0, 1.0)
                    };
                    let (ai, s) = (ac[i], sg[i]);
                    let silu = ai * s;
                    da[i] = pa * dg[i] * bi * s * (1.0 + ai * (1.0 - s));
                    db[i] = pb * dg[i] * silu;
                }
            },
        );
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

    /// The clamp at λ = 1.5 (inputs of std 2: many clamped, none within the step of an edge).
    #[test]
    fn clamped_swiglu_gradients_match_finite_differences() {
        let (n, f, lim) = (6, 10, 1.5f32);
        let mut r = Rng::new(11);
        let mut h = vec![0.0; n * 2 * f];
        let mut dg = vec![0.0; n * f];
        r.fill_normal(&mut h, 2.0);
        for x in &mut h {
            if (x.abs() - lim).abs() < 0.05 {
                *x += 0.1; // keep finite differences off the kinks
            }
        }
        r.fill_normal(&mut dg, 1.0);
        let loss = |h: &[f32]| {
            let mut g = vec![0.0; n * f];
            forward_clamped(&mut g, h, f, lim);
            g.iter().zip(&dg).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let mut dh = vec![0.0; h.len()];
        backward_clamped(&mut dh, &dg, &h, f, lim);
        check(&h, &dh, loss, 1e-2, 5e-3);
        // Clamped entries: the gate above λ and the up projection beyond ±λ get no gradient.
        let clamped = h.chunks(2 * f).flat_map(|row| {
            let (a, b) = row.split_at(f);
            a.iter()
                .map(|&x| x >= lim)
                .chain(b.iter().map(|&x| x.abs() >= lim))
                .collect::<Vec<_>>()
        });
        let mut nc = 0;
        for (c, d) in clamped.zip(&dh) {
            if c {
                assert_eq!(*d, 0.0);
                nc += 1;
            }
        }
        assert!(nc > 10, "only {nc} clamped entries");
    }
}
