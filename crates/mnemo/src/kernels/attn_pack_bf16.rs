//! Packing the attention core's f32 operands into the bf16 pairs of
//! [`attn_tile_bf16`](super::attn_tile_bf16). For `x: [rows, cols]` (row stride `x.rs`,
//! contiguous columns) and `pair(l, h) = bf16(l) | bf16(h) << 16` (round to nearest even,
//! [`bf16_bits`]; a missing partner past the matrix is 0):
//!
//! ```text
//! rows_pairs:    out[r·ors + q] = pair(x[r, 2q], x[r, 2q+1])     r < rows, q < ⌈cols/2⌉
//! rows_pairs_t:  out[q·ors + r] = pair(x[r, 2q], x[r, 2q+1])     (the same pairs, transposed)
//! cols_pairs:    out[q·ors + c] = pair(x[2q, c], x[2q+1, c])     q < ⌈rows/2⌉, c < cols
//! ```
//!
//! `rows_pairs` makes a left operand with depth along the row (Q, dO, P, dS); `rows_pairs_t` a
//! right operand with the depth along the row of the source (Kᵀ, Vᵀ from K, V);
//! `cols_pairs` a right operand with depth down the columns (V, K, Q, dO over positions) or,
//! read with `rs = 1`, a transposed left operand (Pᵀ, dSᵀ). The AVX-512 BF16 packers
//! (`vcvtne2ps2bf16`/`vcvtneps2bf16`) round as [`bf16_bits`] does: tested against the scalar
//! ones.

use super::bf16::{bf16_bits, has_avx512_bf16};
use super::matmul::MatRef;

#[inline]
fn pair(l: f32, h: f32) -> u32 {
    bf16_bits(l) as u32 | (bf16_bits(h) as u32) << 16
}

fn checks(x: &MatRef, out: &[u32], lines: usize, width: usize, ors: usize, what: &str) {
    assert_eq!(x.cs, 1, "{what}: columns must be contiguous");
    assert!(ors >= width, "{what}: output row stride {ors} < {width}");
    if x.rows > 0 && x.cols > 0 {
        x.check(what, "source");
        assert!(
            (lines - 1) * ors + width <= out.len(),
            "{what}: output too short"
        );
    }
}

/// `rows_pairs` (module docs), on the vector packer when `vector` and the CPU has it.
pub fn rows_pairs(x: &MatRef, out: &mut [u32], ors: usize, vector: bool) {
    let cp = x.cols.div_ceil(2);
    checks(x, out, x.rows, cp, ors, "rows_pairs");
    if x.rows == 0 || x.cols == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if vector && has_avx512_bf16() {
        // SAFETY: the feature was detected; `checks` bounds-checked source and output.
        return unsafe { x86::rows_pairs(x, out, ors) };
    }
    let _ = vector;
    for r in 0..x.rows {
        let src = &x.data[r * x.rs..][..x.cols];
        for (q, d) in out[r * ors..][..cp].iter_mut().enumerate() {
            *d = pair(src[2 * q], src.get(2 * q + 1).copied().unwrap_or(0.0));
        }
    }
}

/// `rows_pairs_t` (module docs): [`rows_pairs`] into a scratch, then transposed.
pub fn rows_pairs_t(x: &MatRef, out: &mut [u32], ors: usize, vector: bool) {
    let cp = x.cols.div_ceil(2);
    assert!(
        ors >= x.rows,
        "rows_pairs_t: output row stride {ors} < {}",
        x.rows
    );
    if x.rows == 0 || cp == 0 {
        return;
    }
    assert!(
        (cp - 1) * ors + x.rows <= out.len(),
        "rows_pairs_t: output too short"
    );
    let mut tmp = vec![0u32; x.rows * cp];
    rows_pairs(x, &mut tmp, cp, vector);
    for (r, row) in tmp.chunks_exact(cp).enumerate() {
        for (q, &w) in row.iter().enumerate() {
            out[q * ors + r] = w;
        }
    }
}

/// `cols_pairs` (module docs), on the vector packer when `vector` and the CPU has it.
pub fn cols_pairs(x: &MatRef, out: &mut [u32], ors: usize, vector: bool) {
    let rp = x.rows.div_ceil(2);
    checks(x, out, rp, x.cols, ors, "cols_pairs");
    if x.rows == 0 || x.cols == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if vector && has_avx512_bf16() {
        // SAFETY: the feature was detected; `checks` bounds-checked source and output.
        return unsafe { x86::cols_pairs(x, out, ors) };
    }
    let _ = vector;
    for q in 0..rp {
        let r0 = &x.data[2 * q * x.rs..][..x.cols];
        let r1 = (2 * q + 1 < x.rows).then(|| &x.data[(2 * q + 1) * x.rs..][..x.cols]);
        for (c, d) in out[q * ors..][..x.cols].iter_mut().enumerate() {
            *d = pair(r0[c], r1.map_or(0.0, |r| r[c]));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::MatRef;
    use std::arch::x86_64::*;

    /// Mask of the first `n` (≤ 16) lanes.
    #[inline]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            (1u16 << n) - 1
        }
    }

    /// 16 f32 → 16 bf16 (RNE) zero-extended into the low halves of 16 `u32` lanes.
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
    unsafe fn to_u32(v: __m512) -> __m512i {
        _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
            _mm512_cvtneps_pbh(v),
        ))
    }

    /// # Safety
    /// AVX-512 BF16/F/BW/VL present; views bounds-checked by the caller.
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn rows_pairs(x: &MatRef, out: &mut [u32], ors: usize) {
        let cols = x.cols;
        for r in 0..x.rows {
            // Masked lanes are not read, so the pointers may run past the view.
            let src = x.data.as_ptr().wrapping_add(r * x.rs);
            let dst = out.as_mut_ptr().add(r * ors);
            for c0 in (0..cols).step_by(32) {
                let left = cols - c0;
                let lo = _mm512_maskz_loadu_ps(lanes(left), src.wrapping_add(c0));
                let hi = if left > 16 {
                    _mm512_maskz_loadu_ps(lanes(left - 16), src.wrapping_add(c0 + 16))
                } else {
                    _mm512_setzero_ps()
                };
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                let m = lanes(left.min(32).div_ceil(2));
                _mm512_mask_storeu_epi32(dst.add(c0 / 2) as *mut i32, m, v);
            }
        }
    }

    /// # Safety
    /// As [`rows_pairs`].
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn cols_pairs(x: &MatRef, out: &mut [u32], ors: usize) {
        let cols = x.cols;
        for q in 0..x.rows.div_ceil(2) {
            let r0 = x.data.as_ptr().wrapping_add(2 * q * x.rs);
            let has1 = 2 * q + 1 < x.rows;
            let r1 = x.data.as_ptr().wrapping_add((2 * q + 1) * x.rs);
            let dst = out.as_mut_ptr().add(q * ors);
            for c0 in (0..cols).step_by(16) {
                let m = lanes(cols - c0);
                let lo = _mm512_maskz_loadu_ps(m, r0.wrapping_add(c0));
                let hi = if has1 {
                    _mm512_maskz_loadu_ps(m, r1.wrapping_add(c0))
                } else {
                    _mm512_setzero_ps()
                };
                let v = _mm512_or_si512(to_u32(lo), _mm512_slli_epi32::<16>(to_u32(hi)));
                _mm512_mask_storeu_epi32(dst.add(c0) as *mut i32, m, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Vector and scalar packers give the same words, for odd and even shapes, strided rows,
    /// special values (subnormals, ±0, huge), and leave the output's padding columns alone.
    #[test]
    fn vector_packers_match_scalar_and_the_definition() {
        for &(rows, cols) in &[(1, 1), (5, 7), (64, 64), (13, 33), (2, 17)] {
            let rs = cols + 3;
            let mut x = vec![0.0f32; rows * rs];
            Rng::new(rows as u64).fill_normal(&mut x, 2.0);
            for (i, s) in [1e-40f32, -0.0, 3e38, -1e-39].iter().enumerate() {
                if i * 5 < x.len() {
                    x[i * 5] = *s;
                }
            }
            let v = MatRef::strided(&x, rows, cols, rs);
            let at = |r: usize, c: usize| {
                if r < rows && c < cols {
                    x[r * rs + c]
                } else {
                    0.0
                }
            };
            let (cp, rp) = (cols.div_ceil(2), rows.div_ceil(2));
            for vector in [false, true] {
                let mut o = vec![7u32; rows * (cp + 1)];
                rows_pairs(&v, &mut o, cp + 1, vector);
                let mut t = vec![7u32; cp * (rows + 2)];
                rows_pairs_t(&v, &mut t, rows + 2, vector);
                for r in 0..rows {
                    for q in 0..cp {
                        let want = pair(at(r, 2 * q), at(r, 2 * q + 1));
                        assert_eq!(o[r * (cp + 1) + q], want, "rows {rows}x{cols} {vector}");
                        assert_eq!(t[q * (rows + 2) + r], want, "rows_t {rows}x{cols} {vector}");
                    }
                    assert_eq!(o[r * (cp + 1) + cp], 7);
                }
                let mut o = vec![7u32; rp * (cols + 1)];
                cols_pairs(&v, &mut o, cols + 1, vector);
                for q in 0..rp {
                    for c in 0..cols {
                        let want = pair(at(2 * q, c), at(2 * q + 1, c));
                        assert_eq!(o[q * (cols + 1) + c], want, "cols {rows}x{cols} {vector}");
                    }
                    assert_eq!(o[q * (cols + 1) + cols], 7);
                }
            }
        }
    }
}
