//! A few rows times a matrix with contiguous columns — decoding, draft verification, a small
//! batch of sequences:
//!
//! ```text
//! C[i, j] = β·C[i, j] + α·⟨aᵢ, b_j⟩      a: [m, k] rows contiguous, m ≤ MAX_ROWS
//!                                        b: [k, n] columns contiguous (a weight Wᵀ, W [n, k])
//! ```
//!
//! Each column `b_j` is read once for all `m` rows (a general GEMM would pack the whole matrix
//! first, which costs more than the product at these sizes), and each row's dot product with
//! a column is summed in the same order whatever `m` is and whichever rows share the call: a
//! row's output is bit-identical whether it is decoded alone or verified beside seven drafts.
//! Columns are split across threads for big matrices.

use super::matmul::MatRef;
use super::SendPtr;
use rayon::prelude::*;

/// The most rows this path takes; more go to the general GEMM.
pub const MAX_ROWS: usize = 8;

/// Whether [`gemm_rows`] handles this product.
pub(super) fn applies(a: &MatRef, b: &MatRef) -> bool {
    a.rows <= MAX_ROWS && a.cs == 1 && b.rs == 1 && a.cols >= 16
}

/// `C = β·C + α·A·B` for a product [`applies`] accepts (views already bounds-checked).
pub(super) fn gemm_rows(
    c: &mut [f32],
    c_rs: usize,
    a: MatRef,
    b: MatRef,
    alpha: f32,
    accumulate: bool,
    parallel: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let all: [&[f32]; MAX_ROWS] = std::array::from_fn(|i| {
        if i < m {
            &a.data[i * a.rs..i * a.rs + k]
        } else {
            &[]
        }
    });
    let rows = &all[..m];
    let out = SendPtr(c.as_mut_ptr());
    let cols = |j0: usize, j1: usize| {
        let mut dots = [0.0f32; MAX_ROWS];
        for j in j0..j1 {
            let w = &b.data[j * b.cs..j * b.cs + k];
            column(w, rows, &mut dots[..m]);
            for (i, &d) in dots[..m].iter().enumerate() {
                // SAFETY: i < m and j < n lie inside `c` (checked by the caller); the column
                // ranges of parallel tasks are disjoint.
                unsafe {
                    let p = at(&out, i * c_rs + j);
                    *p = if accumulate {
                        *p + alpha * d
                    } else {
                        alpha * d
                    };
                }
            }
        }
    };
    const COLS: usize = 64;
    if parallel && m * n * k >= 1 << 18 && n > COLS && rayon::current_num_threads() > 1 {
        (0..n.div_ceil(COLS))
            .into_par_iter()
            .for_each(|cb| cols(cb * COLS, ((cb + 1) * COLS).min(n)));
    } else {
        cols(0, n);
    }
}

/// The element `i` of the output (a call, so that closures capture the whole `SendPtr`).
///
/// # Safety
/// `i` must lie inside the buffer the pointer came from.
unsafe fn at(p: &SendPtr, i: usize) -> *mut f32 {
    p.0.add(i)
}

/// `out[i] = ⟨rows[i], w⟩` for every row (each summed as [`super::vecops::dot`] sums).
fn column(w: &[f32], rows: &[&[f32]], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        for (rs, o) in rows.chunks(4).zip(out.chunks_mut(4)) {
            // SAFETY: AVX2 and FMA were detected; every row is as long as `w` (≥ 16).
            unsafe {
                match rs.len() {
                    1 => dots_avx2::<1>(w, rs, o),
                    2 => dots_avx2::<2>(w, rs, o),
                    3 => dots_avx2::<3>(w, rs, o),
                    _ => dots_avx2::<4>(w, rs, o),
                }
            }
        }
        return;
    }
    for (r, o) in rows.iter().zip(out.iter_mut()) {
        *o = super::vecops::dot(r, w);
    }
}

/// `R` rows against one column, each row with the accumulators and order of
/// `vecops::dot_avx2` (two 8-lane sums over blocks of 16, one more block of 8, the lanes
/// folded, the scalar tail).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2<const R: usize>(w: &[f32], rows: &[&[f32]], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = w.len();
    let pw = w.as_ptr();
    let pr: [*const f32; R] = std::array::from_fn(|r| rows[r].as_ptr());
    let mut s0 = [_mm256_setzero_ps(); R];
    let mut s1 = [_mm256_setzero_ps(); R];
    let mut i = 0;
    while i + 16 <= n {
        let (w0, w1) = (_mm256_loadu_ps(pw.add(i)), _mm256_loadu_ps(pw.add(i + 8)));
        for r in 0..R {
            s0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(pr[r].add(i)), w0, s0[r]);
            s1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(pr[r].add(i + 8)), w1, s1[r]);
        }
        i += 16;
    }
    if i + 8 <= n {
        let w0 = _mm256_loadu_ps(pw.add(i));
        for r in 0..R {
            s0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(pr[r].add(i)), w0, s0[r]);
        }
        i += 8;
    }
    for r in 0..R {
        let s = _mm256_add_ps(s0[r], s1[r]);
        let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        let mut v = _mm_cvtss_f32(h);
        for t in i..n {
            v += *pr[r].add(t) * *pw.add(t);
        }
        out[r] = v;
    }
}

#[cfg(test)]
mod tests {
    use super::super::matmul::{gemm, MatRef};
    use crate::rng::Rng;

    #[test]
    fn rows_match_f64_and_do_not_depend_on_their_neighbours() {
        let mut rng = Rng::new(11);
        for &(m, k, n) in &[
            (1, 16, 5),
            (2, 37, 70),
            (3, 64, 129),
            (5, 100, 33),
            (8, 300, 600),
        ] {
            let mut a = vec![0.0f32; m * k];
            let mut w = vec![0.0f32; n * k]; // W [n, k]: b = Wᵀ has contiguous columns
            rng.fill_normal(&mut a, 1.0);
            rng.fill_normal(&mut w, 1.0);
            let bt = MatRef::new(&w, n, k).t();
            for accumulate in [false, true] {
                let mut c = vec![0.5f32; m * n];
                gemm(&mut c, n, MatRef::new(&a, m, k), bt, 0.75, accumulate, true);
                for i in 0..m {
                    for j in 0..n {
                        let dot: f64 = (0..k)
                            .map(|p| a[i * k + p] as f64 * w[j * k + p] as f64)
                            .sum();
                        let want = 0.75 * dot + if accumulate { 0.5 } else { 0.0 };
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{m}x{k}x{n}"
                        );
                    }
                }
                // Each row alone gives the same bits as in the batch.
                for i in 0..m {
                    let mut ci = vec![0.5f32; n];
                    let ai = MatRef::new(&a[i * k..(i + 1) * k], 1, k);
                    gemm(&mut ci, n, ai, bt, 0.75, accumulate, false);
                    assert_eq!(ci, c[i * n..(i + 1) * n], "row {i} of {m}x{k}x{n}");
                }
            }
        }
    }
}
