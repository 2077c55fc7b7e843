//! One-vector (decode) products of `Q5_0` and `Q8_0` matrices on AVX-512 machines (BW, VL,
//! VNNI): the same integers and float operations as the general kernels ([`super::qdot32`]
//! for `Q5_0`, [`super::quant`] for `Q8_0`), so every output has the same bits; only the
//! instruction selection and the number of rows per pass differ.
//!
//! `y[rows] (+)= M[rows, cols] · x` with `x ≈ dx·qx` per 32-value block (`qx ∈ [−127, 127]`).
//! Per weight block `b` the unsigned codes `u` and offset `o` are
//! - `Q5_0` (`w = d·(q − 16)`): `u = q` (`q ∈ 0..32`), `o = 16`;
//! - `Q8_0` (`w = d·q`, `q` signed): `u = q + 128`, `o = 128`,
//!
//! and lane `j` (4 products) of the block's integer sum is `S_bj = off_bj + Σ_{t<4}
//! u_{4j+t}·qx_{4j+t}` with the per-vector offsets `off_bj = −o·Σ_{t<4} qx_{4j+t}` (exact
//! in i32, `vpdpbusd`), then
//!
//! ```text
//! acc_j ← fma(d_b·dx_b, S_bj, acc_j)   for b = 0, 1, …      y = hsum(acc)
//! hsum(a) = ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))
//! ```
//!
//! What is cheaper than in the general kernels: the 5-bit codes are one broadcast load of the
//! 16 nibble bytes, a variable shift (the high half by 4) and a mask, plus one masked byte add
//! of 16 under the block's 32 high bits (`qh` moved to a mask register; ggml's
//! `bytes_from_bits_32` takes five instructions); `Q8_0` codes are one `xor` (the general
//! kernel computes `−128·Σ q` per weight block with a second `vpdpbusd`). `Q5_0` runs two
//! weight rows per pass (two FMA chains sharing each activation load), `Q8_0` one: more rows
//! per pass measured slower on the out-of-cache head (see `rows_t`).
//!
//! Tests: `qdot32`'s `qdot32_equals_reference_and_paths_agree` (one vector: portable, AVX2 and
//! this kernel bit-equal; 11 vectors through the general kernel equal one-vector products) and
//! `quant`'s `matmat_equals_matvec_bit_for_bit` (`Q8_0`: one vector here equals every vector of
//! 2–19-vector products and the AVX2 path, bit for bit).

use super::quant::{Q8Vec, QMatrix, QType};
use super::SendPtr;
use rayon::prelude::*;

/// Whether this CPU runs these kernels (AVX2, FMA, AVX-512 F/BW/VL/VNNI; detected once).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The lane offsets `off[b·8 + j] = −o·Σ_{t<4} qx_{32b+4j+t}` of a vector for a block type
/// (`o`: 16 for `Q5_0`, 128 for `Q8_0`).
pub(crate) fn offsets(ty: QType, x: &Q8Vec) -> Vec<i32> {
    let o = if ty == QType::Q5_0 { 16 } else { 128 };
    x.qx.chunks_exact(4)
        .map(|c| -o * c.iter().map(|&q| q as i32).sum::<i32>())
        .collect()
}

/// `y (+)= M · x` for one quantised vector `x` with its [`offsets`] `off`, `M` of type `Q5_0`
/// or `Q8_0`; parallel over chunks of rows. Callers check [`available`] first.
pub(crate) fn matvec(m: &QMatrix, x: &Q8Vec, off: &[i32], y: &mut [f32], accumulate: bool) {
    assert!(available(), "qdot_dec needs AVX-512 BW/VL/VNNI");
    assert!(m.ty == QType::Q5_0 || m.ty == QType::Q8_0);
    assert!(m.cols.is_multiple_of(32) && m.data.len() == m.rows * m.row_bytes());
    assert_eq!(m.d.len(), m.rows * (m.cols / 32));
    assert!(x.qx.len() == m.cols && x.dx.len() == m.cols / 32 && off.len() == m.cols / 4);
    assert_eq!(y.len(), m.rows);
    const ROWS: usize = 64;
    let nrows = m.rows;
    let yp = SendPtr(y.as_mut_ptr());
    (0..nrows.div_ceil(ROWS)).into_par_iter().for_each(|c| {
        let (r0, nr) = (c * ROWS, ROWS.min(nrows - c * ROWS));
        let mut buf = [0.0f32; ROWS];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the features were checked (`available`), the sizes above; rows r0..r0 + nr
        // are in `m` and `buf` holds nr.
        unsafe {
            x86::rows(m, r0, nr, x, off, buf.as_mut_ptr())
        };
        // SAFETY: chunk c alone writes y[r0..r0 + nr], inside y (rows elements).
        let yi = unsafe { std::slice::from_raw_parts_mut(yp.get().add(r0), nr) };
        if accumulate {
            yi.iter_mut().zip(&buf[..nr]).for_each(|(o, &v)| *o += v);
        } else {
            yi.copy_from_slice(&buf[..nr]);
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    const Q50: u8 = 0;
    const Q80: u8 = 1;

    /// The horizontal sum in the order of the module doc (as the general kernels).
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Rows `r0..r0 + nr` into `out[k]`.
    ///
    /// # Safety
    /// AVX2, FMA and AVX-512 F/BW/VL/VNNI available; sizes as checked by [`super::matvec`];
    /// `out` holds `nr`.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn rows(
        m: &QMatrix,
        r0: usize,
        nr: usize,
        x: &Q8Vec,
        off: &[i32],
        out: *mut f32,
    ) {
        match m.ty {
            QType::Q5_0 => rows_t::<Q50>(m, r0, nr, x, off, out),
            _ => rows_t::<Q80>(m, r0, nr, x, off, out),
        }
    }

    /// Rows `r0..r0 + nr` into `out[k]`: `Q5_0` two rows per pass, `Q8_0` one (measured,
    /// SmolLM2 decode, process CPU ms: `Q5_0` gate/up 2.9–3.0 with 2 rows, 3.0–3.2 with 1,
    /// 3.2–3.3 with 4; the `Q8_0` head 1.4–1.7 with 1 row, 3.8–3.9 with 2, 4.2–4.3 with 4).
    #[inline(always)]
    unsafe fn rows_t<const T: u8>(
        m: &QMatrix,
        r0: usize,
        nr: usize,
        x: &Q8Vec,
        off: &[i32],
        out: *mut f32,
    ) {
        let mut k = 0;
        if T == Q50 {
            while k + 2 <= nr {
                tile::<T, 2>(m, r0 + k, x, off, out.add(k));
                k += 2;
            }
        }
        while k < nr {
            tile::<T, 1>(m, r0 + k, x, off, out.add(k));
            k += 1;
        }
    }

    /// Rows `r..r + R` into `out[0..R]`.
    #[inline(always)]
    unsafe fn tile<const T: u8, const R: usize>(
        m: &QMatrix,
        r: usize,
        x: &Q8Vec,
        off: &[i32],
        out: *mut f32,
    ) {
        let (bs, nb) = (m.ty.block_bytes(), m.cols / 32);
        let rowp: [*const u8; R] =
            std::array::from_fn(|rr| m.data.as_ptr().add((r + rr) * nb * bs));
        let dsp: [*const f32; R] = std::array::from_fn(|rr| m.d.as_ptr().add((r + rr) * nb));
        let (xq, xd, op) = (x.qx.as_ptr(), x.dx.as_ptr(), off.as_ptr());
        let shift = _mm256_set_epi64x(4, 4, 0, 0);
        let m4 = _mm256_set1_epi8(0x0f);
        let hi = _mm256_set1_epi8(0x10);
        let flip = _mm256_set1_epi8(-128);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let xv = _mm256_loadu_si256(xq.add(b * 32) as *const __m256i);
            let base = _mm256_loadu_si256(op.add(b * 8) as *const __m256i);
            let dx = _mm256_set1_ps(*xd.add(b));
            for rr in 0..R {
                let blk = rowp[rr].add(b * bs);
                let u = if T == Q50 {
                    // Low nibbles in bytes 0..16, high ones in 16..32, then +16 where the
                    // block's high bit is set (bit j of qh for byte j).
                    let qh = u32::from_le((blk.add(2) as *const u32).read_unaligned());
                    let raw =
                        _mm256_broadcastsi128_si256(_mm_loadu_si128(blk.add(6) as *const __m128i));
                    let nib = _mm256_and_si256(_mm256_srlv_epi64(raw, shift), m4);
                    _mm256_mask_add_epi8(nib, qh, nib, hi)
                } else {
                    _mm256_xor_si256(_mm256_loadu_si256(blk.add(2) as *const __m256i), flip)
                };
                let p = _mm256_dpbusd_epi32(base, u, xv);
                let sc = _mm256_mul_ps(_mm256_set1_ps(*dsp[rr].add(b)), dx);
                acc[rr] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(p), acc[rr]);
            }
        }
        for (rr, a) in acc.iter().enumerate() {
            *out.add(rr) = hsum(*a);
        }
    }
}
