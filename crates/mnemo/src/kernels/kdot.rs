//! Matrix–vector products straight from `Q2_K` … `Q6_K` super-blocks (the types that make up
//! llama.cpp's k-quant mixes), for decoding, as llama.cpp's `ggml_vec_dot_q{2,3,4,5,6}_K_q8_K`
//! compute them (`Q5_K`'s, `Q2_K`'s and `Q3_K`'s integer sums: [`super::kdot_q5k`],
//! [`super::kdot_q2k`], [`super::kdot_q3k`]). Block layouts: see
//! [`super::kquant`]; weights are `[rows, cols]` row-major runs of 256-value super-blocks
//! (`cols` a multiple of 256).
//!
//! The activation `x: [cols]` is first quantised to `Q8_K` per 256-value block: `dy = m/−127`
//! where `m` is the block's value of largest magnitude (with its sign, as ggml), `qy =
//! round(x/dy) ∈ [−127, 127]`, and the 16 sums of 16 consecutive `qy` (`bsums`).
//!
//! Per super-block `b` of a weight row, with integer sums only inside the block:
//! - `Q4_K` (`w = (d·s_j)·q − (dmin·m_j)`, sub-blocks `j` of 32 values):
//!   `Σ w·(dy·qy) = d·dy·Σ_j s_j·Σ_{l∈j} q_l·qy_l − dmin·dy·Σ_{k<16} m_{k/2}·bsums_k`.
//! - `Q6_K` (`w = (d·sc_k)·(q − 32)`, sub-blocks `k` of 16 values):
//!   `Σ w·(dy·qy) = d·dy·Σ_k sc_k·Σ_{l∈k} (q_l − 32)·qy_l`
//!   `= d·dy·(Σ_k sc_k·Σ_{l∈k} q_l·qy_l − 32·Σ_k sc_k·bsums_k)` (the SIMD form).
//!
//! The integer sums (`i32`, no overflow: at most 8·63·32·15·127 and 16·128·16·32·127 in
//! magnitude) are computed by a portable loop, with AVX2 (`maddubs` of the unsigned weight
//! codes with `qy`, then `madd` with the scales) or with AVX-512 VNNI on 256-bit lanes
//! (the same `maddubs`, then `vpdpwssd` with the scales, accumulating: `x86::scaled_add`),
//! chosen at run time; the three give the same integers, and the float part (`acc +=
//! (d·dy)·S`, `acc −= (dmin·dy)·M`, in block order) is the same scalar code on every path, so
//! the paths agree bit for bit (tested against each other in `kdot_tests.rs`). Several vectors
//! (prefill rows, a decode batch) go in groups of 8: a super-block's scales are prepared once
//! per group; every output is computed exactly as for one vector. On the SIMD paths several
//! `Q4_K`/`Q6_K` vectors go to [`super::kdot_rows`] instead (one f32 lane per vector, the
//! super-block's codes unpacked once per row: `x86::Q4kBlock`, `x86::Q6kBlock`; the same bits
//! as this module's per-vector arithmetic), so the group form serves
//! `Q2_K`/`Q3_K`/`Q5_K` and the portable path. One vector of `Q4_K`/`Q6_K`, i.e. decoding,
//! runs [`super::kdot_dec`]: ggml's f32 lanes across the row's super-blocks, the same integers
//! summed in another float order.

use super::kquant::scale_min_k4;
use super::quant::{Isa, QMatrix, QType};
use super::SendPtr;
use rayon::prelude::*;

/// Values per super-block.
pub const QK_K: usize = 256;

/// A vector quantised to `Q8_K`: per 256-value block the scale `d`, 256 codes `qs`
/// (`x ≈ d·qs`) and the 16 sums of 16 consecutive codes `bsums`.
#[derive(Clone, Debug)]
pub(crate) struct Q8K {
    pub d: Vec<f32>,
    pub qs: Vec<i8>,
    pub bsums: Vec<i16>,
}

/// Quantise `x` (length a multiple of 256) to `Q8_K` as ggml's `quantize_row_q8_K_ref`
/// does: `d = m/−127` for the block's value `m` of largest magnitude, `q = round(x/d)` (ties
/// to even) capped at 127. (The same code compiled for AVX2 where the CPU has it, so that
/// the rounding is one instruction instead of a `rintf` call: the same bits.)
pub(crate) fn quantize_q8k(x: &[f32]) -> Q8K {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn q8k_avx2(x: &[f32]) -> Q8K {
            quantize_q8k_impl(x)
        }
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { q8k_avx2(x) };
    }
    quantize_q8k_impl(x)
}

#[inline(always)]
fn quantize_q8k_impl(x: &[f32]) -> Q8K {
    assert!(x.len().is_multiple_of(QK_K));
    let nb = x.len() / QK_K;
    let mut v = Q8K {
        d: vec![0.0; nb],
        qs: vec![0; x.len()],
        bsums: vec![0; nb * 16],
    };
    for (b, xb) in x.chunks_exact(QK_K).enumerate() {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &t in xb {
            if t.abs() > amax {
                amax = t.abs();
                max = t;
            }
        }
        if amax == 0.0 {
            continue;
        }
        let iscale = -127.0 / max;
        let qs = &mut v.qs[b * QK_K..(b + 1) * QK_K];
        for (q, &t) in qs.iter_mut().zip(xb) {
            *q = (iscale * t).round_ties_even().min(127.0) as i8;
        }
        for (s, c) in v.bsums[b * 16..(b + 1) * 16]
            .iter_mut()
            .zip(qs.chunks_exact(16))
        {
            *s = c.iter().map(|&q| q as i16).sum();
        }
        v.d[b] = 1.0 / iscale;
    }
    v
}

/// `Q4_K`'s eight 6-bit scales and minimums of one super-block (`sc` = its 12 scale bytes).
#[inline(always)]
fn q4k_scales(sc: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut s = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..8 {
        (s[j], m[j]) = scale_min_k4(j, sc);
    }
    (s, m)
}

/// The minimum term `M = Σ_k m_{k/2}·bsums_k` of a `Q4_K` super-block.
#[inline(always)]
fn q4k_min_sum(m: &[u8; 8], bsums: &[i16]) -> i32 {
    (0..16).map(|k| m[k / 2] as i32 * bsums[k] as i32).sum()
}

/// `S = Σ_j s_j·Σ_{l∈j} q_l·qy_l` of a `Q4_K` super-block, portable. Each 64-value chunk
/// `c` is 32 bytes: low nibbles are elements `64c..64c+32`, high nibbles `64c+32..64c+64`.
fn q4k_sum_generic(qs: &[u8], s: &[u8; 8], qy: &[i8]) -> i32 {
    let mut tot = 0i32;
    for c in 0..4 {
        let bytes = &qs[32 * c..32 * c + 32];
        let (lo, hi) = (&qy[64 * c..64 * c + 32], &qy[64 * c + 32..64 * c + 64]);
        let (mut a, mut b) = (0i32, 0i32);
        for l in 0..32 {
            a += (bytes[l] & 15) as i32 * lo[l] as i32;
            b += (bytes[l] >> 4) as i32 * hi[l] as i32;
        }
        tot += s[2 * c] as i32 * a + s[2 * c + 1] as i32 * b;
    }
    tot
}

/// `S = Σ_k sc_k·Σ_{l∈k} (q_l − 32)·qy_l` of a `Q6_K` super-block (210 bytes), portable.
fn q6k_sum_generic(blk: &[u8], qy: &[i8]) -> i32 {
    let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
    let mut q = [0i32; QK_K];
    for h in 0..2 {
        let (l, hb) = (&ql[64 * h..64 * h + 64], &qh[32 * h..32 * h + 32]);
        let o = &mut q[128 * h..128 * h + 128];
        for i in 0..32 {
            o[i] = ((l[i] & 15) | ((hb[i] & 3) << 4)) as i32 - 32;
            o[i + 32] = ((l[i + 32] & 15) | (((hb[i] >> 2) & 3) << 4)) as i32 - 32;
            o[i + 64] = ((l[i] >> 4) | (((hb[i] >> 4) & 3) << 4)) as i32 - 32;
            o[i + 96] = ((l[i + 32] >> 4) | (((hb[i] >> 6) & 3) << 4)) as i32 - 32;
        }
    }
    (0..16)
        .map(|k| {
            let p: i32 = (0..16).map(|l| q[16 * k + l] * qy[16 * k + l] as i32).sum();
            sc[k] as i8 as i32 * p
        })
        .sum()
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::hsum_i32;

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    #[inline(always)]
    pub(in crate::kernels) unsafe fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    /// i32 lanes whose total is `s0·Σ_{l<16} u_l·y_l + s1·Σ_{l≥16} u_l·y_l` (`u`: 32 unsigned
    /// codes, each `u·y` pair sum within i16): [`scaled_add`] from zero.
    #[inline(always)]
    pub(in crate::kernels) unsafe fn scaled<const VNNI: bool>(
        u: __m256i,
        y: __m256i,
        s0: i32,
        s1: i32,
    ) -> __m256i {
        scaled_add::<VNNI>(_mm256_setzero_si256(), u, y, scales16(s0, s1))
    }

    /// `s0` in the low 8 i16 lanes, `s1` in the high 8.
    #[inline(always)]
    unsafe fn scales16(s0: i32, s1: i32) -> __m256i {
        _mm256_set_m128i(_mm_set1_epi16(s1 as i16), _mm_set1_epi16(s0 as i16))
    }

    /// `acc` plus i32 lanes whose total is `Σ_l s_l·u_l·y_l` (`s`: an i16 scale per pair of
    /// values, [`scales16`]): `maddubs` (u8·i8 → i16 pairs, exact when each pair sum is within
    /// i16), then AVX2 `madd` with the scales and an add, or with `VNNI` AVX-512 VNNI's
    /// `vpdpwssd` (the same i16·i16 pair products added into `acc`). The same integers.
    #[inline(always)]
    pub(in crate::kernels) unsafe fn scaled_add<const VNNI: bool>(
        acc: __m256i,
        u: __m256i,
        y: __m256i,
        s: __m256i,
    ) -> __m256i {
        let p = _mm256_maddubs_epi16(u, y);
        if VNNI {
            _mm256_dpwssd_epi32(acc, p, s)
        } else {
            _mm256_add_epi32(acc, _mm256_madd_epi16(p, s))
        }
    }

    /// One vector's `S` of a `Q4_K` super-block, the codes unpacked in place (the
    /// one-vector path: [`super::row_dot1`]; [`Q4kBlock`] for `kdot_rows`).
    #[inline(always)]
    pub unsafe fn q4k_sum<const VNNI: bool>(qs: *const u8, s: &[u8; 8], qy: *const i8) -> i32 {
        let m4 = _mm256_set1_epi8(0x0f);
        let mut acc = _mm256_setzero_si256();
        for c in 0..4 {
            let raw = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
            let lo = _mm256_and_si256(raw, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            let y0 = _mm256_loadu_si256(qy.add(64 * c) as *const __m256i);
            let y1 = _mm256_loadu_si256(qy.add(64 * c + 32) as *const __m256i);
            let (s0, s1) = (s[2 * c] as i32, s[2 * c + 1] as i32);
            let p0 = scaled::<VNNI>(lo, y0, s0, s0);
            let p1 = scaled::<VNNI>(hi, y1, s1, s1);
            acc = _mm256_add_epi32(acc, _mm256_add_epi32(p0, p1));
        }
        hsum_i32(acc)
    }

    /// The 6-bit codes (0..63) of `Q6_K` half `h` (4 registers of 32 values, element order
    /// `128h + 32g ..`) from its 64 low-nibble bytes `ql` and 32 high-bit bytes `qh`.
    ///
    /// # Safety
    /// AVX2; `ql` must hold 64 bytes, `qh` 32.
    #[inline(always)]
    pub(in crate::kernels) unsafe fn q6k_codes(ql: *const u8, qh: *const u8) -> [__m256i; 4] {
        let m4 = _mm256_set1_epi8(0x0f);
        let m3 = _mm256_set1_epi8(0x30);
        let l0 = _mm256_loadu_si256(ql as *const __m256i);
        let l1 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
        let hb = _mm256_loadu_si256(qh as *const __m256i);
        [
            _mm256_or_si256(
                _mm256_and_si256(l0, m4),
                _mm256_and_si256(_mm256_slli_epi16(hb, 4), m3),
            ),
            _mm256_or_si256(
                _mm256_and_si256(l1, m4),
                _mm256_and_si256(_mm256_slli_epi16(hb, 2), m3),
            ),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                _mm256_and_si256(hb, m3),
            ),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                _mm256_and_si256(_mm256_srli_epi16(hb, 2), m3),
            ),
        ]
    }

    /// One vector's `S` of a `Q6_K` super-block, the codes rebuilt in place (the one-vector
    /// path; [`Q6kBlock`] for `kdot_rows`).
    #[inline(always)]
    pub unsafe fn q6k_sum<const VNNI: bool>(blk: *const u8, qy: *const i8, bsums: &[i16]) -> i32 {
        let (ql, qh, sc) = (blk, blk.add(128), blk.add(192) as *const i8);
        let mut acc = _mm256_setzero_si256();
        for h in 0..2 {
            let q = q6k_codes(ql.add(64 * h), qh.add(32 * h));
            for (g, &qg) in q.iter().enumerate() {
                let y = _mm256_loadu_si256(qy.add(128 * h + 32 * g) as *const __m256i);
                let k = 8 * h + 2 * g;
                let (s0, s1) = (*sc.add(k) as i32, *sc.add(k + 1) as i32);
                acc = _mm256_add_epi32(acc, scaled::<VNNI>(qg, y, s0, s1));
            }
        }
        let off: i32 = (0..16).map(|k| *sc.add(k) as i32 * bsums[k] as i32).sum();
        hsum_i32(acc) - 32 * off
    }

    /// A `Q4_K` super-block unpacked once for several vectors: code vector `j` holds elements
    /// `32j..32j + 32` (chunk `c = j/2`: low nibbles for even `j`, high for odd), `s[j]` its
    /// scale `s_j` in every i16 lane, `mins` lane `k` the minimum `m_{k/2}`.
    pub struct Q4kBlock {
        pub(in crate::kernels) q: [__m256i; 8],
        pub(in crate::kernels) s: [__m256i; 8],
        pub(in crate::kernels) mins: __m256i,
    }

    impl Q4kBlock {
        /// # Safety
        /// AVX2; `qs` must hold the block's 128 code bytes.
        #[inline(always)]
        pub unsafe fn new(qs: *const u8, s: &[u8; 8], mn: &[u8; 8]) -> Q4kBlock {
            let m4 = _mm256_set1_epi8(0x0f);
            let mut q = [_mm256_setzero_si256(); 8];
            for c in 0..4 {
                let raw = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
                q[2 * c] = _mm256_and_si256(raw, m4);
                q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            }
            let s = std::array::from_fn(|j| _mm256_set1_epi16(s[j] as i16));
            let m = |k: usize| mn[k / 2] as i16;
            let mins = _mm256_setr_epi16(
                m(0),
                m(1),
                m(2),
                m(3),
                m(4),
                m(5),
                m(6),
                m(7),
                m(8),
                m(9),
                m(10),
                m(11),
                m(12),
                m(13),
                m(14),
                m(15),
            );
            Q4kBlock { q, s, mins }
        }
    }

    /// A `Q6_K` super-block unpacked once for several vectors: code vector `j` (6-bit codes
    /// 0..63) holds elements `32j..32j + 32`, `s[j]` the scales of its two 16-value
    /// sub-blocks (low and high i16 lanes), `sc` lane `k` the scale `sc_k`.
    pub struct Q6kBlock {
        pub(in crate::kernels) q: [__m256i; 8],
        pub(in crate::kernels) s: [__m256i; 8],
        pub(in crate::kernels) sc: __m256i,
    }

    impl Q6kBlock {
        /// # Safety
        /// AVX2; `blk` must hold the block's 210 bytes.
        #[inline(always)]
        pub unsafe fn new(blk: *const u8) -> Q6kBlock {
            let (ql, qh, sc) = (blk, blk.add(128), blk.add(192) as *const i8);
            let (h0, h1) = (q6k_codes(ql, qh), q6k_codes(ql.add(64), qh.add(32)));
            let q = [h0[0], h0[1], h0[2], h0[3], h1[0], h1[1], h1[2], h1[3]];
            let s =
                std::array::from_fn(|j| scales16(*sc.add(2 * j) as i32, *sc.add(2 * j + 1) as i32));
            let sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc as *const __m128i));
            Q6kBlock { q, s, sc }
        }
    }
}

/// Row kernels: portable, AVX2, AVX-512 VNNI (on 256-bit lanes).
pub(super) const GENERIC: u8 = 0;
pub(super) const AVX2: u8 = 1;
pub(super) const VNNI: u8 = 2;

/// `$f::<VNNI>(args)` for row kernel level `V` (AVX2 or VNNI).
macro_rules! simd {
    ($v:expr, $($p:ident)::+ ($($a:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked the CPU for level `$v`; the block and its 256 codes are
        // in range (the callee's pointers are read within them).
        unsafe {
            if $v == VNNI {
                $($p)::+::<true>($($a),*)
            } else {
                $($p)::+::<false>($($a),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!()
    }};
}

/// Vectors per group: each super-block's scales are unpacked once for up to this many.
const GROUP: usize = 8;

/// Block `b`'s codes and 16-value sums of `x`.
#[inline(always)]
fn block_of(x: &Q8K, b: usize) -> (&[i8], &[i16]) {
    (
        &x.qs[b * QK_K..(b + 1) * QK_K],
        &x.bsums[b * 16..(b + 1) * 16],
    )
}

/// Row `r` of `m` against each vector `x` of `xs` (at most [`GROUP`]) into `out[i]`:
/// `Σ_b (d_b·dy_b)·S_b − (dmin_b·dy_b)·M_b`, in block order (the integer sums by row kernel
/// level `V`, the caller having checked the CPU). A vector's arithmetic does not depend on
/// the others.
#[inline(always)]
fn row_dots<const V: u8>(m: &QMatrix, r: usize, xs: &[Q8K], out: &mut [f32]) {
    let bs = m.ty.block_bytes();
    let nb = m.cols / QK_K;
    let row = &m.data[r * nb * bs..(r + 1) * nb * bs];
    let ds = &m.d[r * nb..(r + 1) * nb];
    let mut acc = [0.0f32; GROUP];
    let acc = &mut acc[..xs.len()];
    for (b, blk) in row.chunks_exact(bs).enumerate() {
        match m.ty {
            QType::Q4_K | QType::Q5_K => {
                let (s, mn) = q4k_scales(&blk[4..16]);
                let dmin = m.m[r * nb + b];
                for (a, x) in acc.iter_mut().zip(xs) {
                    let (qy, bsums) = block_of(x, b);
                    let (si, mi) = match (V, m.ty) {
                        (GENERIC, QType::Q4_K) => (
                            q4k_sum_generic(&blk[16..144], &s, qy),
                            q4k_min_sum(&mn, bsums),
                        ),
                        (GENERIC, _) => (
                            super::kdot_q5k::q5k_sum_generic(blk, &s, qy),
                            q4k_min_sum(&mn, bsums),
                        ),
                        // (On the SIMD paths `matmat` sends several Q4_K vectors to
                        // `kdot_rows`; this in-place form keeps `rows` complete.)
                        (_, QType::Q4_K) => (
                            simd!(V, x86::q4k_sum(blk[16..].as_ptr(), &s, qy.as_ptr())),
                            q4k_min_sum(&mn, bsums),
                        ),
                        _ => (
                            simd!(
                                V,
                                super::kdot_q5k::x86::q5k_sum(blk.as_ptr(), &s, qy.as_ptr())
                            ),
                            q4k_min_sum(&mn, bsums),
                        ),
                    };
                    *a += (ds[b] * x.d[b]) * si as f32;
                    *a -= (dmin * x.d[b]) * mi as f32;
                }
            }
            QType::Q2_K => {
                use super::kdot_q2k as k2;
                for (a, x) in acc.iter_mut().zip(xs) {
                    let (qy, bsums) = block_of(x, b);
                    let si = match V {
                        GENERIC => k2::q2k_sum_generic(blk, qy),
                        _ => simd!(V, k2::x86::q2k_sum(blk.as_ptr(), qy.as_ptr())),
                    };
                    let mi = k2::q2k_min_sum(&blk[..16], bsums);
                    *a += (ds[b] * x.d[b]) * si as f32;
                    *a -= (m.m[r * nb + b] * x.d[b]) * mi as f32;
                }
            }
            QType::Q3_K => {
                use super::kdot_q3k as k3;
                let sc = k3::q3k_scales(&blk[96..108]);
                for (a, x) in acc.iter_mut().zip(xs) {
                    let (qy, bsums) = block_of(x, b);
                    let si = match V {
                        GENERIC => k3::q3k_sum_generic(blk, &sc, qy, bsums),
                        _ => simd!(V, k3::x86::q3k_sum(blk.as_ptr(), &sc, qy.as_ptr(), bsums)),
                    };
                    *a += (ds[b] * x.d[b]) * si as f32;
                }
            }
            QType::Q6_K => {
                for (a, x) in acc.iter_mut().zip(xs) {
                    let (qy, bsums) = block_of(x, b);
                    let si = match V {
                        GENERIC => q6k_sum_generic(blk, qy),
                        // (Several Q6_K vectors on SIMD paths run `kdot_rows`, as for Q4_K.)
                        _ => simd!(V, x86::q6k_sum(blk.as_ptr(), qy.as_ptr(), bsums)),
                    };
                    *a += (ds[b] * x.d[b]) * si as f32;
                }
            }
            _ => unreachable!("not a k-quant type"),
        }
    }
    out[..xs.len()].copy_from_slice(acc);
}

/// Row `r` of `m` against one vector `x` (decoding): [`row_dots`]' arithmetic, the same
/// integers and the same float steps, but each super-block's codes unpacked in place
/// rather than into a group's registers, which costs a one-vector product ~25% (1.5B
/// Q4_K_M model, 1 thread: 11.3–11.6 vs 8.7–9.2 tok/s, alternating runs). Choosing the
/// in-place unpacking inside [`row_dots`] for one vector instead was measured too and keeps
/// most of the loss (10.0–11.2 here vs 7.7–8.6): the group loop itself costs it.
#[inline(always)]
fn row_dot1<const V: u8>(m: &QMatrix, r: usize, x: &Q8K) -> f32 {
    let bs = m.ty.block_bytes();
    let nb = m.cols / QK_K;
    let row = &m.data[r * nb * bs..(r + 1) * nb * bs];
    let ds = &m.d[r * nb..(r + 1) * nb];
    let mut acc = 0.0f32;
    for (b, blk) in row.chunks_exact(bs).enumerate() {
        let qy = &x.qs[b * QK_K..(b + 1) * QK_K];
        let bsums = &x.bsums[b * 16..(b + 1) * 16];
        let dy = x.d[b];
        match m.ty {
            QType::Q4_K | QType::Q5_K => {
                let (s, mn) = q4k_scales(&blk[4..16]);
                let si = match (V, m.ty) {
                    (GENERIC, QType::Q4_K) => q4k_sum_generic(&blk[16..144], &s, qy),
                    (GENERIC, _) => super::kdot_q5k::q5k_sum_generic(blk, &s, qy),
                    (_, QType::Q4_K) => simd!(V, x86::q4k_sum(blk[16..].as_ptr(), &s, qy.as_ptr())),
                    _ => simd!(
                        V,
                        super::kdot_q5k::x86::q5k_sum(blk.as_ptr(), &s, qy.as_ptr())
                    ),
                };
                let mi = q4k_min_sum(&mn, bsums);
                acc += (ds[b] * dy) * si as f32;
                acc -= (m.m[r * nb + b] * dy) * mi as f32;
            }
            QType::Q2_K => {
                use super::kdot_q2k as k2;
                let si = match V {
                    GENERIC => k2::q2k_sum_generic(blk, qy),
                    _ => simd!(V, k2::x86::q2k_sum(blk.as_ptr(), qy.as_ptr())),
                };
                let mi = k2::q2k_min_sum(&blk[..16], bsums);
                acc += (ds[b] * dy) * si as f32;
                acc -= (m.m[r * nb + b] * dy) * mi as f32;
            }
            QType::Q3_K => {
                use super::kdot_q3k as k3;
                let sc = k3::q3k_scales(&blk[96..108]);
                let si = match V {
                    GENERIC => k3::q3k_sum_generic(blk, &sc, qy, bsums),
                    _ => simd!(V, k3::x86::q3k_sum(blk.as_ptr(), &sc, qy.as_ptr(), bsums)),
                };
                acc += (ds[b] * dy) * si as f32;
            }
            QType::Q6_K => {
                let si = match V {
                    GENERIC => q6k_sum_generic(blk, qy),
                    _ => simd!(V, x86::q6k_sum(blk.as_ptr(), qy.as_ptr(), bsums)),
                };
                acc += (ds[b] * dy) * si as f32;
            }
            _ => unreachable!("not a k-quant type"),
        }
    }
    acc
}

/// Rows `r0..r0 + nr` of `m` against every vector of `xs` into `out[k·n + i]`, the vectors in
/// groups of [`GROUP`].
#[inline(always)]
fn rows_impl<const V: u8>(m: &QMatrix, r0: usize, nr: usize, xs: &[Q8K], out: &mut [f32]) {
    let n = xs.len();
    if n == 1 {
        for (k, o) in out[..nr].iter_mut().enumerate() {
            *o = row_dot1::<V>(m, r0 + k, &xs[0]);
        }
        return;
    }
    for k in 0..nr {
        for (g, xg) in xs.chunks(GROUP).enumerate() {
            let o = k * n + g * GROUP;
            row_dots::<V>(m, r0 + k, xg, &mut out[o..o + xg.len()]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rows_avx2(m: &QMatrix, r0: usize, nr: usize, xs: &[Q8K], out: &mut [f32]) {
    rows_impl::<AVX2>(m, r0, nr, xs, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512vl,avx512vnni")]
unsafe fn rows_vnni(m: &QMatrix, r0: usize, nr: usize, xs: &[Q8K], out: &mut [f32]) {
    rows_impl::<VNNI>(m, r0, nr, xs, out)
}

fn rows(isa: Isa, m: &QMatrix, r0: usize, nr: usize, xs: &[Q8K], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the features were detected at run time (tests force lower ones only).
        Isa::Vnni => return unsafe { rows_vnni(m, r0, nr, xs, out) },
        Isa::Avx2 => return unsafe { rows_avx2(m, r0, nr, xs, out) },
        Isa::Generic => {}
    }
    let _ = isa;
    rows_impl::<GENERIC>(m, r0, nr, xs, out)
}

/// `y[n, rows] (+)= X[n, cols] · Mᵀ` for a k-quant matrix (`x` quantised to `Q8_K`
/// first), parallel over chunks of weight rows; what [`super::quant::matmat`] runs for these
/// types. Each output is computed as for one vector, whatever `n`, except that one vector
/// of `Q4_K`/`Q6_K` (decoding) runs [`super::kdot_dec`]: the same integers, another float order.
pub(crate) fn matmat(isa: Isa, m: &QMatrix, x: &[f32], n: usize, y: &mut [f32], accumulate: bool) {
    assert!(m.ty.is_k());
    assert_eq!(x.len(), n * m.cols);
    assert_eq!(y.len(), n * m.rows);
    assert!(m.cols.is_multiple_of(QK_K) && m.data.len() == m.rows * m.row_bytes());
    assert_eq!(m.d.len(), m.rows * (m.cols / QK_K));
    if n == 0 {
        return;
    }
    if n == 1 && super::kdot_dec::handles(m.ty) {
        // Decoding: ggml's one-vector form (f32 lanes across the row's super-blocks).
        return super::kdot_dec::matvec(isa, m, x, y, accumulate);
    }
    // Several vectors are quantised in parallel (each one's bits do not depend on it).
    let xq: Vec<Q8K> = match n {
        1 => vec![quantize_q8k(x)],
        _ => x.par_chunks_exact(m.cols).map(quantize_q8k).collect(),
    };
    // Several `Q4_K`/`Q6_K` vectors: one f32 lane per vector (`kdot_rows`, same bits).
    let lanes = n > 1 && isa != Isa::Generic && matches!(m.ty, QType::Q4_K | QType::Q6_K);
    let dyt = match lanes {
        true => super::kdot_rows::transposed_scales(&xq, m.cols / QK_K),
        false => Vec::new(),
    };
    let nrows = m.rows;
    const ROWS: usize = 16;
    let yp = SendPtr(y.as_mut_ptr());
    (0..nrows.div_ceil(ROWS)).into_par_iter().for_each(|c| {
        let (r0, nr) = (c * ROWS, ROWS.min(nrows - c * ROWS));
        let mut buf = vec![0.0f32; nr * n];
        match lanes {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` (AVX2 or VNNI) was detected at run time (tests force lower ones
            // only); the sizes are checked inside.
            true => unsafe {
                super::kdot_rows::rows(isa == Isa::Vnni, m, r0, nr, &xq, &dyt, &mut buf)
            },
            _ => rows(isa, m, r0, nr, &xq, &mut buf),
        }
        for i in 0..n {
            // SAFETY: chunk c alone writes rows r0..r0 + nr of every output vector, all
            // inside y (n · rows elements).
            let yi = unsafe { std::slice::from_raw_parts_mut(yp.get().add(i * nrows + r0), nr) };
            if lanes {
                // `kdot_rows`' vector-major layout: a contiguous copy.
                let bi = &buf[i * nr..(i + 1) * nr];
                if accumulate {
                    yi.iter_mut().zip(bi).for_each(|(o, &v)| *o += v);
                } else {
                    yi.copy_from_slice(bi);
                }
                continue;
            }
            for (k, o) in yi.iter_mut().enumerate() {
                let v = buf[k * n + i];
                if accumulate {
                    *o += v;
                } else {
                    *o = v;
                }
            }
        }
    });
}

#[cfg(test)]
#[path = "kdot_tests.rs"]
pub(super) mod tests;
