//! RMSNorm (Zhang & Sennrich 2019): `y = x / sqrt(mean(x²) + eps) · w`.
//!
//! Shapes: `x, y: [n, d]`, `w: [d]`, `rstd: [n]` (saved for the backward pass).
//!
//! Backward, with `x̂ = x·rstd` and `g = dy ⊙ w`:
//! `dx = rstd · (g − x̂ · mean(g ⊙ x̂))`, `dw = Σ_rows dy ⊙ x̂`.

use rayon::prelude::*;

/// Rows per parallel task; fixed so that the reduction order of `dw` never depends on threads.
const ROWS_PER_TASK: usize = 32;

pub fn forward(y: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], d: usize, eps: f32) {
    assert_eq!(x.len(), y.len());
    assert_eq!(x.len(), rstd.len() * d);
    y.par_chunks_mut(d)
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(d))
        .for_each(|((y, r), x)| {
            // The squares summed in f64 and the mean rounded once, as ggml's `rms_norm`
            // (llama.cpp's numerics reproduce its rounding decisions bit for bit).
            let ms = (x.iter().map(|&v| (v * v) as f64).sum::<f64>() / d as f64) as f32;
            let s = 1.0 / (ms + eps).sqrt();
            *r = s;
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = x * s * w;
            }
        });
}

/// Accumulates into `dw`; writes (or adds to, when `accumulate`) `dx`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dx: &mut [f32],
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    d: usize,
    accumulate: bool,
) {
    let partial: Vec<Vec<f32>> = dx
        .par_chunks_mut(d * ROWS_PER_TASK)
        .zip(dy.par_chunks(d * ROWS_PER_TASK))
        .zip(x.par_chunks(d * ROWS_PER_TASK))
        .zip(rstd.par_chunks(ROWS_PER_TASK))
        .map(|(((dx, dy), x), rstd)| {
            let mut dw_part = vec![0.0f32; d];
            for (((dx, dy), x), &s) in dx
                .chunks_mut(d)
                .zip(dy.chunks(d))
                .zip(x.chunks(d))
                .zip(rstd)
            {
                let mut dot = 0.0f32;
                for i in 0..d {
                    let xh = x[i] * s;
                    dw_part[i] += dy[i] * xh;
                    dot += dy[i] * w[i] * xh;
                }
                let mean = dot / d as f32;
                for i in 0..d {
                    let v = s * (dy[i] * w[i] - x[i] * s * mean);
                    if accumulate {
                        dx[i] += v;
                    } else {
                        dx[i] = v;
                    }
                }
            }
            dw_part
        })
        .collect();
    for p in &partial {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gradcheck::check;
    use crate::rng::Rng;

    #[test]
    fn rmsnorm_gradients_match_finite_differences() {
        let (n, d) = (70, 12);
        let mut r = Rng::new(5);
        let mut x = vec![0.0; n * d];
        let mut w = vec![0.0; d];
        let mut g = vec![0.0; n * d];
        r.fill_normal(&mut x, 1.0);
        r.fill_normal(&mut w, 1.0);
        r.fill_normal(&mut g, 1.0);
        let loss = |x: &[f32], w: &[f32]| -> f64 {
            let mut y = vec![0.0; n * d];
            let mut rs = vec![0.0; n];
            forward(&mut y, &mut rs, x, w, d, 1e-5);
            y.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let mut y = vec![0.0; n * d];
        let mut rs = vec![0.0; n];
        forward(&mut y, &mut rs, &x, &w, d, 1e-5);
        // Output rows have unit RMS before the weight.
        let row: f32 = (0..d).map(|i| (y[i] / w[i]).powi(2)).sum::<f32>() / d as f32;
        assert!((row - 1.0).abs() < 1e-3);
        let mut dx = vec![7.0; n * d];
        let mut dw = vec![0.0; d];
        backward(&mut dx, &mut dw, &g, &x, &w, &rs, d, false);
        check(&x, &dx, |p| loss(p, &w), 1e-2, 5e-3);
        check(&w, &dw, |p| loss(&x, p), 1e-2, 5e-3);
    }
}
