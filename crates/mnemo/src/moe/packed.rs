//! The expert products of cached decoding from packed (quantised) weights: for the rows a
//! driver marks, `y (+)= x·Wᵀ` runs on the model's quantised copy of `W` (e.g. FP8/FP4 from an
//! official DeepSeek-V4 checkpoint, [`crate::kernels::fp8dot`]) when it has one; every other
//! row runs the f32 GEMM, so a row's result does not depend on the rows beside it.

use crate::kernels::matmul::{gemm, MatRef};
use crate::kernels::quant::{self, QMatrix};
use std::collections::HashMap;

/// Quantised weights by offset in the flat parameters, and which of the layer's `N` input
/// rows use them.
#[derive(Clone, Copy)]
pub struct PackedRows<'a> {
    pub quant: &'a HashMap<usize, QMatrix>,
    pub rows: &'a [bool],
}

/// The quantised copy of a `[dout, din]` weight: one matrix, or two stacked ones (an
/// expert's `[W1; W3]`, kept as the two tensors a checkpoint stores: `io::v4_packed`).
enum Quant<'a> {
    One(&'a QMatrix),
    Two(&'a QMatrix, &'a QMatrix),
}

impl<'a> Quant<'a> {
    fn of(quant: &'a HashMap<usize, QMatrix>, off: usize, din: usize, dout: usize) -> Option<Self> {
        let q = quant.get(&off).filter(|q| q.cols == din)?;
        if q.rows == dout {
            return Some(Quant::One(q));
        }
        let r = quant
            .get(&(off + q.rows * din))
            .filter(|r| r.cols == din && q.rows + r.rows == dout)?;
        Some(Quant::Two(q, r))
    }

    /// `y[m, dout] (+)= x[m, din]·Wᵀ` (two stacked matrices: each into its columns of `y`).
    fn matmat(&self, x: &[f32], m: usize, y: &mut [f32], accumulate: bool) {
        match *self {
            Quant::One(q) => quant::matmat(q, x, m, y, accumulate),
            Quant::Two(a, b) => {
                let dout = a.rows + b.rows;
                for (q, c0) in [(a, 0), (b, a.rows)] {
                    let mut part = vec![0.0f32; m * q.rows];
                    quant::matmat(q, x, m, &mut part, false);
                    for (yr, pr) in y.chunks_exact_mut(dout).zip(part.chunks_exact(q.rows)) {
                        let dst = &mut yr[c0..c0 + q.rows];
                        if accumulate {
                            dst.iter_mut().zip(pr).for_each(|(d, s)| *d += s);
                        } else {
                            dst.copy_from_slice(pr);
                        }
                    }
                }
            }
        }
    }
}

/// `y[m, dout] (+)= x[m, din] · Wᵀ` with `W = params[off..off + dout·din]` (`[dout, din]`):
/// rows `r` with `packed(r)` on the quantised copy of `W` (when `p` has one of that shape),
/// the others with the f32 GEMM (`parallel` as [`gemm`]'s).
#[allow(clippy::too_many_arguments)]
pub(crate) fn product(
    p: Option<&PackedRows>,
    packed: impl Fn(usize) -> bool,
    params: &[f32],
    off: usize,
    (y, x): (&mut [f32], &[f32]),
    (m, din, dout): (usize, usize, usize),
    accumulate: bool,
    parallel: bool,
) {
    let w = &params[off..off + dout * din];
    let f32_rows = |y: &mut [f32], x: &[f32], m: usize| {
        gemm(
            y,
            dout,
            MatRef::new(x, m, din),
            MatRef::new(w, dout, din).t(),
            1.0,
            accumulate,
            parallel,
        )
    };
    let Some(q) = p.and_then(|p| Quant::of(p.quant, off, din, dout)) else {
        return f32_rows(y, x, m);
    };
    let (pk, fl): (Vec<usize>, Vec<usize>) = (0..m).partition(|&r| packed(r));
    if fl.is_empty() {
        return q.matmat(x, m, y, accumulate);
    }
    if pk.is_empty() {
        return f32_rows(y, x, m);
    }
    // Mixed rows (a batch of decoding and prefilling sequences): each set gathered, computed
    // and scattered back.
    for (set, is_packed) in [(pk, true), (fl, false)] {
        let k = set.len();
        let mut xs = vec![0.0f32; k * din];
        let mut ys = vec![0.0f32; k * dout];
        for (j, &r) in set.iter().enumerate() {
            xs[j * din..(j + 1) * din].copy_from_slice(&x[r * din..(r + 1) * din]);
            if accumulate {
                ys[j * dout..(j + 1) * dout].copy_from_slice(&y[r * dout..(r + 1) * dout]);
            }
        }
        if is_packed {
            q.matmat(&xs, k, &mut ys, accumulate);
        } else {
            f32_rows(&mut ys, &xs, k);
        }
        for (j, &r) in set.iter().enumerate() {
            y[r * dout..(r + 1) * dout].copy_from_slice(&ys[j * dout..(j + 1) * dout]);
        }
    }
}
