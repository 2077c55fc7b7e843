//! The small dense products inside the attention kernels, without packing:
//!
//! ```text
//! C[i, j] = β·C[i, j] + α·acc[i, j]        β ∈ {0, 1} (accumulate), i < m, j < n
//! acc[i, j] = fma(a[i, k−1], b[k−1, j], … fma(a[i, 1], b[1, j], fma(a[i, 0], b[0, j], 0)))
//! a: [m, k] any strides (read one scalar at a time and broadcast)
//! b: [k, n] rows contiguous (column stride 1), any row stride
//! ```
//!
//! An attention block product is small (`64 × 64 × 64` to `64 × 512 × 64`) and its operands
//! are views into fused QKV rows: a general GEMM spends as long packing them as multiplying
//! (measured on `small`'s shapes: the packing routine took more samples than the micro-kernel).
//! Here `b` is read in place, one row of up to 64 columns per depth step, and each of up to 6
//! rows of `a` is broadcast against it: a register tile of 6 × 64 outputs (24 AVX-512
//! accumulators; 6 × 16 with AVX2). Callers give `b` row-major: keys are transposed once per
//! head before the score products (`Kᵀ`, `[d_h, T]`), values, queries and output gradients are
//! used as they lie.
//!
//! Every output is one FMA chain over the depth in order, so the AVX-512, AVX2 and portable
//! paths give the same bits (tested), and a row's result does not depend on the other rows.

use super::matmul::MatRef;

/// Rows of the register tile.
const MR: usize = 6;

/// The instruction set a product runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

/// The best path this CPU executes.
pub fn best_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// `C = β·C + α·A·B` (module docs) on the best path.
///
/// # Safety
/// `c` must be valid for reads and writes at `i·c_rs + j` for `i < a.rows`, `j < b.cols`, and
/// no other thread may access those elements during the call.
pub unsafe fn gemm_tile(
    c: *mut f32,
    c_rs: usize,
    a: MatRef,
    b: MatRef,
    alpha: f32,
    accumulate: bool,
) {
    gemm_tile_on(best_isa(), c, c_rs, a, b, alpha, accumulate)
}

/// [`gemm_tile`] on a given path (tests compare them; an `isa` the CPU lacks falls back to
/// the portable path).
///
/// # Safety
/// As [`gemm_tile`].
pub unsafe fn gemm_tile_on(
    isa: Isa,
    c: *mut f32,
    c_rs: usize,
    a: MatRef,
    b: MatRef,
    alpha: f32,
    accumulate: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm_tile: inner dimensions differ");
    assert_eq!(b.cs, 1, "gemm_tile: b must have contiguous rows");
    if m == 0 || n == 0 {
        return;
    }
    if k > 0 {
        a.check("gemm_tile", "lhs");
        b.check("gemm_tile", "rhs");
    }
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 if is_x86_feature_detected!("avx512f") => {
            return x86::avx512(c, c_rs, &a, &b, alpha, accumulate);
        }
        Isa::Avx2 if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") => {
            return x86::avx2(c, c_rs, &a, &b, alpha, accumulate);
        }
        _ => {}
    }
    let _ = isa;
    portable(c, c_rs, &a, &b, alpha, accumulate)
}

/// The portable path: the same FMA chains with `f32::mul_add`.
unsafe fn portable(c: *mut f32, c_rs: usize, a: &MatRef, b: &MatRef, alpha: f32, acc_c: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mut acc = vec![0.0f32; n];
    for i in 0..m {
        acc.fill(0.0);
        for p in 0..k {
            let av = a.data[i * a.rs + p * a.cs];
            let brow = &b.data[p * b.rs..p * b.rs + n];
            for (x, &bv) in acc.iter_mut().zip(brow) {
                *x = av.mul_add(bv, *x);
            }
        }
        for (j, &x) in acc.iter().enumerate() {
            let dst = c.add(i * c_rs + j);
            let v = alpha * x;
            *dst = if acc_c { *dst + v } else { v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MatRef, MR};
    use std::arch::x86_64::*;

    /// Raw operands of one tile: `a` at its first row, `b` at its first column, `c` likewise.
    #[derive(Clone, Copy)]
    struct Tile {
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        b_rs: usize,
        k: usize,
        c: *mut f32,
        c_rs: usize,
        alpha: f32,
        accumulate: bool,
    }

    /// `$f::<R, NV>(t, w)` for the run-time tile shape (`R` ≤ [`MR`] rows, `NV` vectors).
    macro_rules! dispatch {
        ($f:ident, $t:expr, $r:expr, $nv:expr, $w:expr; $($vv:literal)*) => {
            match $nv {
                $($vv => match $r {
                    1 => $f::<1, $vv>($t, $w),
                    2 => $f::<2, $vv>($t, $w),
                    3 => $f::<3, $vv>($t, $w),
                    4 => $f::<4, $vv>($t, $w),
                    5 => $f::<5, $vv>($t, $w),
                    _ => $f::<MR, $vv>($t, $w),
                },)*
                _ => unreachable!("tile width"),
            }
        };
    }

    /// Cut `C = β·C + α·A·B` into tiles of up to [`MR`] rows × `cols` columns and run `tile`
    /// on each with its row count and width.
    unsafe fn for_tiles(
        c: *mut f32,
        c_rs: usize,
        a: &MatRef,
        b: &MatRef,
        (alpha, accumulate): (f32, bool),
        cols: usize,
        mut tile: impl FnMut(Tile, usize, usize),
    ) {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        for i0 in (0..m).step_by(MR) {
            for j0 in (0..n).step_by(cols) {
                let t = Tile {
                    a: a.data.as_ptr().wrapping_add(i0 * a.rs),
                    a_rs: a.rs,
                    a_cs: a.cs,
                    b: b.data.as_ptr().wrapping_add(j0),
                    b_rs: b.rs,
                    k,
                    c: c.add(i0 * c_rs + j0),
                    c_rs,
                    alpha,
                    accumulate,
                };
                tile(t, (m - i0).min(MR), (n - j0).min(cols));
            }
        }
    }

    /// The AVX-512 path: tiles of 6 × 64 (four 16-lane vectors a row).
    pub(super) unsafe fn avx512(
        c: *mut f32,
        c_rs: usize,
        a: &MatRef,
        b: &MatRef,
        alpha: f32,
        accumulate: bool,
    ) {
        for_tiles(
            c,
            c_rs,
            a,
            b,
            (alpha, accumulate),
            64,
            |t, r, w| dispatch!(tile512, t, r, w.div_ceil(16), w; 1 2 3 4),
        );
    }

    /// One `R × 16·NV` tile (the last vector masked to `w` columns).
    #[target_feature(enable = "avx512f")]
    unsafe fn tile512<const R: usize, const NV: usize>(t: Tile, w: usize) {
        let mask: [__mmask16; NV] = std::array::from_fn(|v| {
            let lanes = w.saturating_sub(16 * v).min(16);
            ((1u32 << lanes) - 1) as __mmask16
        });
        let mut acc = [[_mm512_setzero_ps(); NV]; R];
        for p in 0..t.k {
            let brow = t.b.wrapping_add(p * t.b_rs);
            let mut bv = [_mm512_setzero_ps(); NV];
            for v in 0..NV {
                bv[v] = _mm512_maskz_loadu_ps(mask[v], brow.wrapping_add(16 * v));
            }
            let ap = t.a.wrapping_add(p * t.a_cs);
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(i * t.a_rs));
                for v in 0..NV {
                    row[v] = _mm512_fmadd_ps(av, bv[v], row[v]);
                }
            }
        }
        let al = _mm512_set1_ps(t.alpha);
        for (i, row) in acc.iter().enumerate() {
            for v in 0..NV {
                let dst = t.c.wrapping_add(i * t.c_rs + 16 * v);
                let mut val = _mm512_mul_ps(al, row[v]);
                if t.accumulate {
                    val = _mm512_add_ps(_mm512_maskz_loadu_ps(mask[v], dst), val);
                }
                _mm512_mask_storeu_ps(dst, mask[v], val);
            }
        }
    }

    /// The AVX2 path: tiles of 6 × 16 (two 8-lane vectors a row).
    pub(super) unsafe fn avx2(
        c: *mut f32,
        c_rs: usize,
        a: &MatRef,
        b: &MatRef,
        alpha: f32,
        accumulate: bool,
    ) {
        for_tiles(
            c,
            c_rs,
            a,
            b,
            (alpha, accumulate),
            16,
            |t, r, w| dispatch!(tile256, t, r, w.div_ceil(8), w; 1 2),
        );
    }

    /// One `R × 8·NV` tile (the last vector masked to `w` columns).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile256<const R: usize, const NV: usize>(t: Tile, w: usize) {
        let mask: [__m256i; NV] = std::array::from_fn(|v| {
            let lanes = w.saturating_sub(8 * v).min(8) as i32;
            _mm256_cmpgt_epi32(
                _mm256_set1_epi32(lanes),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            )
        });
        let mut acc = [[_mm256_setzero_ps(); NV]; R];
        for p in 0..t.k {
            let brow = t.b.wrapping_add(p * t.b_rs);
            let mut bv = [_mm256_setzero_ps(); NV];
            for v in 0..NV {
                bv[v] = _mm256_maskload_ps(brow.wrapping_add(8 * v), mask[v]);
            }
            let ap = t.a.wrapping_add(p * t.a_cs);
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_ps(*ap.add(i * t.a_rs));
                for v in 0..NV {
                    row[v] = _mm256_fmadd_ps(av, bv[v], row[v]);
                }
            }
        }
        let al = _mm256_set1_ps(t.alpha);
        for (i, row) in acc.iter().enumerate() {
            for v in 0..NV {
                let dst = t.c.wrapping_add(i * t.c_rs + 8 * v);
                let mut val = _mm256_mul_ps(al, row[v]);
                if t.accumulate {
                    val = _mm256_add_ps(_mm256_maskload_ps(dst, mask[v]), val);
                }
                _mm256_maskstore_ps(dst, mask[v], val);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// Every path gives the same bits as the FMA-chain reference, for tails in every
    /// dimension, strided and transposed `a`, a row-strided `b`, with and without accumulation.
    #[test]
    fn paths_agree_bitwise_with_the_fma_chain() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (6, 64, 64),
            (7, 13, 70),
            (64, 64, 64),
            (13, 5, 17),
        ] {
            for &trans in &[false, true] {
                for &accumulate in &[false, true] {
                    let a_data = rand(m * k + 3, 1);
                    let a = if trans {
                        MatRef::new(&a_data[..m * k], k, m).t()
                    } else {
                        MatRef::new(&a_data[..m * k], m, k)
                    };
                    let b_rs = n + 5;
                    let b_data = rand(k * b_rs, 2);
                    let b = MatRef::strided(&b_data, k, n, b_rs);
                    let c_rs = n + 2;
                    let c0 = rand(m * c_rs, 3);
                    let mut want = c0.clone();
                    for i in 0..m {
                        for j in 0..n {
                            let mut x = 0.0f32;
                            for p in 0..k {
                                x = a.data[i * a.rs + p * a.cs].mul_add(b_data[p * b_rs + j], x);
                            }
                            let v = 0.7 * x;
                            let dst = &mut want[i * c_rs + j];
                            *dst = if accumulate { *dst + v } else { v };
                        }
                    }
                    for isa in [Isa::Avx512, Isa::Avx2, Isa::Portable] {
                        let mut c = c0.clone();
                        unsafe { gemm_tile_on(isa, c.as_mut_ptr(), c_rs, a, b, 0.7, accumulate) };
                        for (x, y) in c.iter().zip(&want) {
                            assert_eq!(
                                x.to_bits(),
                                y.to_bits(),
                                "{isa:?} m={m} k={k} n={n} trans={trans} acc={accumulate}"
                            );
                        }
                    }
                }
            }
        }
    }
}
