//! AVX-512 BF16 pieces of the bf16 GEMM: the `MR×NR` `vdpbf16ps` micro-kernel and the two
//! vector packers (`vcvtneps2bf16` / `vcvtne2ps2bf16` rounding, see `pack`).

use super::pack::Lines;
use super::{MR, NR};
use std::arch::x86_64::*;

/// `C[0..mr, 0..nr] = (load ? C : 0) + α·Σ_q A_q ⊗ B_q` over `npairs` depth pairs of one A
/// panel (`ap`, `MR` per pair) and one B panel (`bp`, `NR` per pair). A partial tile
/// (`mr < MR` or `nr < NR`) goes through a local buffer.
///
/// # Safety
/// AVX-512 BF16/F/BW/VL present; `ap`/`bp` readable for `npairs·MR` / `npairs·NR` entries; `c`
/// valid for reads and writes at `i·c_rs + j`, `i < mr`, `j < nr`, and not touched by another
/// thread meanwhile.
#[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile(
    npairs: usize,
    ap: *const u32,
    bp: *const u32,
    c: *mut f32,
    c_rs: usize,
    mr: usize,
    nr: usize,
    alpha: f32,
    load: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for q in 0..npairs {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(q * NR) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(q * NR + 16) as *const _));
        let a = ap.add(q * MR);
        for (i, row) in acc.iter_mut().enumerate() {
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(i) as i32));
            row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
            row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
        }
    }
    let av = _mm512_set1_ps(alpha);
    if mr == MR && nr == NR {
        for (i, row) in acc.iter().enumerate() {
            for (h, v) in row.iter().enumerate() {
                let p = c.add(i * c_rs + 16 * h);
                let out = if load {
                    _mm512_fmadd_ps(*v, av, _mm512_loadu_ps(p))
                } else {
                    _mm512_mul_ps(*v, av)
                };
                _mm512_storeu_ps(p, out);
            }
        }
    } else {
        for (i, row) in acc.iter().enumerate().take(mr) {
            for (h, v) in row.iter().enumerate() {
                let j0 = 16 * h;
                if j0 >= nr {
                    break;
                }
                let mask: __mmask16 = if nr - j0 >= 16 {
                    0xffff
                } else {
                    (1u16 << (nr - j0)) - 1
                };
                let p = c.add(i * c_rs + j0);
                let out = if load {
                    _mm512_fmadd_ps(*v, av, _mm512_maskz_loadu_ps(mask, p))
                } else {
                    _mm512_mul_ps(*v, av)
                };
                _mm512_mask_storeu_ps(p, mask, out);
            }
        }
    }
}

/// 16 f32 → 16 bf16 (RNE) zero-extended into the low halves of 16 `u32` lanes.
#[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
unsafe fn to_bf16_u32(v: __m512) -> __m512i {
    let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
    _mm512_cvtepu16_epi32(h)
}

/// Mask of the first `n` (≤ 16) lanes.
#[inline]
fn lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        (1u16 << n) - 1
    }
}

/// `np` consecutive `W`-wide panels (lines `l0..l0 + np·W`) when the lines are contiguous
/// (`x.ls == 1`: A = a transposed matrix, or B row-major): for each depth pair, the two depth
/// rows are read across all `np·W` lines (one sequential stretch of each row, rather than `W`
/// lines of every row per panel, which strides through the whole matrix once per panel),
/// rounded, interleaved and written to the `np` panels.
///
/// # Safety
/// AVX-512 BF16/F/BW/VL present; `x` a bounds-checked view with `x.ls == 1`, `l0 < x.lines`;
/// `dst` the `np` panels (`np·kp·W` entries, all written: lines past the matrix get zeros).
#[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn pack_lines_contiguous<const W: usize>(
    x: &Lines,
    l0: usize,
    np: usize,
    kp: usize,
    dst: &mut [u32],
) {
    assert!(dst.len() >= np * kp * W);
    let base = x.data.as_ptr();
    for q in 0..kp {
        let (p0, p1) = (2 * q, 2 * q + 1);
        for pi in 0..np {
            let lp = l0 + pi * W;
            let nl = W.min(x.lines.saturating_sub(lp));
            let out = dst.as_mut_ptr().add(pi * kp * W + q * W);
            for c0 in (0..W).step_by(16) {
                let m = lanes(nl.saturating_sub(c0));
                // Masked lanes are not read, so the pointer may run past the view
                // (wrapping_add).
                let lo = _mm512_maskz_loadu_ps(m, base.wrapping_add(p0 * x.ds + lp + c0));
                let hi = if p1 < x.depth {
                    _mm512_maskz_loadu_ps(m, base.wrapping_add(p1 * x.ds + lp + c0))
                } else {
                    _mm512_setzero_ps()
                };
                let v = _mm512_or_si512(to_bf16_u32(lo), _mm512_slli_epi32::<16>(to_bf16_u32(hi)));
                // Lanes past the matrix were loaded as zeros: store the whole panel width.
                _mm512_mask_storeu_epi32(out.add(c0) as *mut i32, lanes(W - c0), v);
            }
        }
    }
}

/// One `W`-wide panel when the depth is contiguous (`x.ds == 1`: A row-major, or B = a
/// transposed matrix): 16 lines at a time, each line's 32 consecutive f32 become 16 pairs in
/// one `vcvtne2ps2bf16`, and a 16×16 transpose of those `u32` turns them into 16 pair rows.
///
/// # Safety
/// As [`pack_lines_contiguous`], with `x.ds == 1`.
#[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn pack_depth_contiguous<const W: usize>(
    x: &Lines,
    l0: usize,
    kp: usize,
    dst: &mut [u32],
) {
    let nl = W.min(x.lines - l0);
    let base = x.data.as_ptr();
    let mut v = [_mm512_setzero_si512(); 16];
    for rb in (0..W).step_by(16) {
        let store = lanes(W - rb);
        for q0 in (0..kp).step_by(16) {
            let p0 = 2 * q0;
            let left = x.depth - p0;
            for (r, vr) in v.iter_mut().enumerate() {
                if rb + r >= nl {
                    *vr = _mm512_setzero_si512();
                    continue;
                }
                // Masked lanes are not read, so the pointer may run past the view.
                let line = base.wrapping_add((l0 + rb + r) * x.ls + p0);
                let lo = _mm512_maskz_loadu_ps(lanes(left), line);
                let hi = if left > 16 {
                    _mm512_maskz_loadu_ps(lanes(left - 16), line.wrapping_add(16))
                } else {
                    _mm512_setzero_ps()
                };
                *vr = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            }
            transpose16(&mut v);
            for (t, vt) in v.iter().enumerate().take((kp - q0).min(16)) {
                let p = dst.as_mut_ptr().add((q0 + t) * W + rb) as *mut i32;
                _mm512_mask_storeu_epi32(p, store, *vt);
            }
        }
    }
}

/// In-place transpose of a 16×16 matrix of 32-bit lanes (`r[i]` lane `j` ↔ `r[j]` lane `i`).
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: &mut [__m512i; 16]) {
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // u[4g + c]: rows 4g..4g+4 of columns c, c+4, c+8, c+12 (one per 128-bit lane).
    let mut u = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        let i = 4 * g;
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for c in 0..4 {
        let v0 = _mm512_shuffle_i32x4::<0x44>(u[c], u[4 + c]);
        let v1 = _mm512_shuffle_i32x4::<0xee>(u[c], u[4 + c]);
        let w0 = _mm512_shuffle_i32x4::<0x44>(u[8 + c], u[12 + c]);
        let w1 = _mm512_shuffle_i32x4::<0xee>(u[8 + c], u[12 + c]);
        r[c] = _mm512_shuffle_i32x4::<0x88>(v0, w0);
        r[c + 4] = _mm512_shuffle_i32x4::<0xdd>(v0, w0);
        r[c + 8] = _mm512_shuffle_i32x4::<0x88>(v1, w1);
        r[c + 12] = _mm512_shuffle_i32x4::<0xdd>(v1, w1);
    }
}

#[cfg(test)]
/// `vdpbf16ps` on fixed values (for the test that the instruction really executes):
/// lane `j` gets `acc + a0·b0 + a1·b1` with the bf16 pairs `(a0, a1)`, `(b0, b1)`.
///
/// # Safety
/// AVX-512 BF16/F/BW/VL present.
#[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn dot_pair(acc: f32, a: (f32, f32), b: (f32, f32)) -> [f32; 16] {
    let pair = |x: (f32, f32)| -> __m512bh {
        let w = (super::bf16_bits(x.0) as u32) | ((super::bf16_bits(x.1) as u32) << 16);
        std::mem::transmute(_mm512_set1_epi32(w as i32))
    };
    let r = _mm512_dpbf16_ps(_mm512_set1_ps(acc), pair(a), pair(b));
    let mut out = [0.0f32; 16];
    _mm512_storeu_ps(out.as_mut_ptr(), r);
    out
}
