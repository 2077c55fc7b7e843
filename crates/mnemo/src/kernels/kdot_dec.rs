//! One-vector (decoding) products of `Q4_K` and `Q6_K` matrices, in the form of ggml's
//! `ggml_vec_dot_q{4,6}_K_q8_K` AVX2 kernels: `y = M·x` for one activation row `x: [cols]`
//! quantised once to `Q8_K` ([`super::kdot::quantize_q8k`]: per 256-value block `x ≈
//! dy·qy`, with the 16 sums `bsums` of 16 consecutive codes). Weights `M: [rows, cols]` as
//! in [`super::kdot`] (runs of 256-value super-blocks; block layouts: [`super::kquant`]).
//!
//! Each row keeps 8 f32 lanes across all its super-blocks and sums them once at the end.
//! Lane `t ∈ 0..8` of block `b` holds an exact integer `S_bt` (byte positions `4t..4t+4`
//! of each 32-value register), and
//!
//! ```text
//! Q4_K (w = d·s_j·q − dmin·m_j, sub-blocks j of 32, q ∈ 0..16):
//!   S_bt = Σ_{j<8} s_j·Σ_{i<4} q_{32j+4t+i}·qy_{32j+4t+i}
//!   M_bu = m_{2u}·Y_{2u} + m_{2u+1}·Y_{2u+1}   (u < 4; Y_j = bsums_{2j} + bsums_{2j+1})
//!   acc_t ← fma(dy_b·d_b, S_bt, acc_t)    accm_u ← fma(−dy_b·dmin_b, M_bu, accm_u)
//!   y = hsum8(acc) + ((accm_0 + accm_2) + (accm_1 + accm_3))
//! Q6_K (w = d·sc_k·(q − 32), sub-blocks k of 16, q ∈ 0..64; the 32-value register g < 8
//!   holds sub-blocks 2g (its low 16 values) and 2g + 1 (its high 16)):
//!   S_bt = Σ_g sc_{2g + ⌊t/4⌋}·Σ_{i<4} q_{32g+4t+i}·qy_{32g+4t+i}
//!          − 32·(sc_{2t}·bsums_{2t} + sc_{2t+1}·bsums_{2t+1})
//!   acc_t ← fma(dy_b·d_b, S_bt, acc_t)    y = hsum8(acc)
//! hsum8(a) = ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))
//! ```
//!
//! (`|S_bt| < 2^25`: its conversion to f32 rounds to nearest, the same on every path.) The
//! integer lanes come from a portable loop, from AVX2 (`maddubs` of the unsigned codes with
//! `qy`, then `madd` with the scale broadcast to the register's i16 lanes) or from AVX-512
//! BW + VNNI on 512-bit registers (two 32-value registers' work per instruction, `maddubs`
//! then `vpdpwssd`, the 16 lanes folded to 8: lane `t` plus lane `t + 8`), chosen at run
//! time; the float steps are the same operations in the same order on every path, so the
//! three agree bit for bit (`kdot_dec_tests.rs`). Unlike [`super::kdot`]'s group kernels
//! (prefill), the `Q4_K` scales are decoded with shifts and masks on 32-bit words (as
//! ggml), the minimum term is one `madd` per block against `Y` (computed once per product),
//! no horizontal sum is taken per block, and `Q4_K` rows are prefetched 2 KiB ahead.
//!
//! Measured (1.5B Llama-shaped Q4_K_M, 1 thread, `mnemo bench rows --rows 1`, process CPU
//! ms per token): 82 before (`kdot`'s one-vector loop: a horizontal integer sum and scalar
//! float steps per block, scales unpacked byte by byte), 51 with the AVX2
//! form, 49–50 with the 512-bit one. Tried and dropped: 2 and 4 rows per pass sharing the
//! activation loads (faster in cache, 2–3× slower streaming from memory).

use super::kdot::{Q8K, QK_K};
use super::quant::{Isa, QMatrix, QType};
use super::SendPtr;
use rayon::prelude::*;

/// The activation of one product: the `Q8_K` vector, per block `Y_j = bsums_{2j} +
/// bsums_{2j+1}` (`[nb·8]`, the 32-value sums for `Q4_K`'s minimum term) and, for the
/// AVX-512 `Q4_K` kernel, the codes with each block's 32-value sub-blocks in the order 0, 2,
/// 1, 3, 4, 6, 5, 7 (`qs4`; empty otherwise).
pub(crate) struct Act {
    pub x: Q8K,
    pub y32: Vec<i16>,
    pub qs4: Vec<i8>,
}

impl Act {
    pub(crate) fn new(x: &[f32], qs4: bool) -> Act {
        let x = super::kdot::quantize_q8k(x);
        let y32 = x.bsums.chunks_exact(2).map(|p| p[0] + p[1]).collect();
        let qs4 = match qs4 {
            false => Vec::new(),
            true => {
                x.qs.chunks_exact(QK_K)
                    .flat_map(|blk| [0, 2, 1, 3, 4, 6, 5, 7].map(|j| &blk[32 * j..32 * j + 32]))
                    .flatten()
                    .copied()
                    .collect()
            }
        };
        Act { x, y32, qs4 }
    }
}

/// The sum of 8 lanes in the SIMD kernels' order (module doc).
#[inline(always)]
fn hsum8(a: &[f32; 8]) -> f32 {
    let s: [f32; 4] = std::array::from_fn(|k| a[k] + a[k + 4]);
    (s[0] + s[2]) + (s[1] + s[3])
}

/// `Q4_K`'s 8 scales (`[0]`) and 8 minimums (`[1]`) from its 12 scale bytes, as ggml decodes
/// them: three little-endian words, shifts and masks.
#[inline(always)]
fn q4k_scale_words(p: &[u8]) -> [u64; 2] {
    let w = |i: usize| u32::from_le_bytes([p[4 * i], p[4 * i + 1], p[4 * i + 2], p[4 * i + 3]]);
    let (u0, u1, u2) = (w(0), w(1), w(2));
    const K1: u32 = 0x3f3f_3f3f;
    const K2: u32 = 0x0f0f_0f0f;
    const K3: u32 = 0x0303_0303;
    let s_lo = u0 & K1;
    let s_hi = (u2 & K2) | (((u0 >> 6) & K3) << 4);
    let m_lo = u1 & K1;
    let m_hi = ((u2 >> 4) & K2) | (((u1 >> 6) & K3) << 4);
    [
        s_lo as u64 | (s_hi as u64) << 32,
        m_lo as u64 | (m_hi as u64) << 32,
    ]
}

/// Row `r` of a `Q4_K` matrix against `a`, portable (the module doc's arithmetic).
fn q4k_row_generic(m: &QMatrix, r: usize, a: &Act) -> f32 {
    let nb = m.cols / QK_K;
    let bs = m.ty.block_bytes();
    let mut acc = [0.0f32; 8];
    let mut accm = [0.0f32; 4];
    for b in 0..nb {
        let blk = &m.data[(r * nb + b) * bs..(r * nb + b + 1) * bs];
        let [sw, mw] = q4k_scale_words(&blk[4..16]);
        let s = sw.to_le_bytes();
        let mn = mw.to_le_bytes();
        let qy = &a.x.qs[b * QK_K..(b + 1) * QK_K];
        let y32 = &a.y32[b * 8..(b + 1) * 8];
        let dy = a.x.d[b];
        let mut si = [0i32; 8];
        for c in 0..4 {
            let qs = &blk[16 + 32 * c..48 + 32 * c];
            let (lo, hi) = (&qy[64 * c..64 * c + 32], &qy[64 * c + 32..64 * c + 64]);
            for (t, st) in si.iter_mut().enumerate() {
                let (mut pl, mut ph) = (0i32, 0i32);
                for i in 4 * t..4 * t + 4 {
                    pl += (qs[i] & 15) as i32 * lo[i] as i32;
                    ph += (qs[i] >> 4) as i32 * hi[i] as i32;
                }
                *st += s[2 * c] as i32 * pl + s[2 * c + 1] as i32 * ph;
            }
        }
        let sd = dy * m.d[r * nb + b];
        let md = -dy * m.m[r * nb + b];
        for u in 0..4 {
            let mi =
                mn[2 * u] as i32 * y32[2 * u] as i32 + mn[2 * u + 1] as i32 * y32[2 * u + 1] as i32;
            accm[u] = md.mul_add(mi as f32, accm[u]);
        }
        for (t, at) in acc.iter_mut().enumerate() {
            *at = sd.mul_add(si[t] as f32, *at);
        }
    }
    hsum8(&acc) + ((accm[0] + accm[2]) + (accm[1] + accm[3]))
}

/// The 6-bit codes (0..64) of a `Q6_K` super-block in element order.
#[inline(always)]
fn q6k_codes(blk: &[u8]) -> [u8; QK_K] {
    let (ql, qh) = (&blk[0..128], &blk[128..192]);
    let mut q = [0u8; QK_K];
    for h in 0..2 {
        let (l, hb) = (&ql[64 * h..64 * h + 64], &qh[32 * h..32 * h + 32]);
        let o = &mut q[128 * h..128 * h + 128];
        for i in 0..32 {
            o[i] = (l[i] & 15) | ((hb[i] & 3) << 4);
            o[i + 32] = (l[i + 32] & 15) | (((hb[i] >> 2) & 3) << 4);
            o[i + 64] = (l[i] >> 4) | (((hb[i] >> 4) & 3) << 4);
            o[i + 96] = (l[i + 32] >> 4) | (((hb[i] >> 6) & 3) << 4);
        }
    }
    q
}

/// Row `r` of a `Q6_K` matrix against `a`, portable (the module doc's arithmetic).
fn q6k_row_generic(m: &QMatrix, r: usize, a: &Act) -> f32 {
    let nb = m.cols / QK_K;
    let bs = m.ty.block_bytes();
    let mut acc = [0.0f32; 8];
    for b in 0..nb {
        let blk = &m.data[(r * nb + b) * bs..(r * nb + b + 1) * bs];
        let q = q6k_codes(blk);
        let sc = &blk[192..208];
        let qy = &a.x.qs[b * QK_K..(b + 1) * QK_K];
        let bsums = &a.x.bsums[b * 16..(b + 1) * 16];
        let mut si = [0i32; 8];
        for g in 0..8 {
            let k = 2 * g;
            for (t, st) in si.iter_mut().enumerate() {
                let p: i32 = (32 * g + 4 * t..32 * g + 4 * t + 4)
                    .map(|e| q[e] as i32 * qy[e] as i32)
                    .sum();
                *st += sc[k + t / 4] as i8 as i32 * p;
            }
        }
        for (t, st) in si.iter_mut().enumerate() {
            let o = sc[2 * t] as i8 as i32 * bsums[2 * t] as i32
                + sc[2 * t + 1] as i8 as i32 * bsums[2 * t + 1] as i32;
            *st -= o << 5;
        }
        let sd = a.x.d[b] * m.d[r * nb + b];
        for (t, at) in acc.iter_mut().enumerate() {
            *at = sd.mul_add(si[t] as f32, *at);
        }
    }
    hsum8(&acc)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// [`super::hsum8`] of 8 f32 lanes, in the same order.
    #[inline(always)]
    unsafe fn hsum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// `((a0 + a2) + (a1 + a3))`.
    #[inline(always)]
    unsafe fn hsum4(s: __m128) -> f32 {
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Prefetch the `bs` bytes `PF` bytes past `p` (a hint: past the end of the matrix it
    /// does not fault).
    #[inline(always)]
    unsafe fn prefetch<const PF: usize>(p: *const u8, bs: usize) {
        if PF > 0 {
            let mut o = 0;
            while o < bs {
                _mm_prefetch(p.wrapping_add(PF + o) as *const i8, _MM_HINT_T0);
                o += 64;
            }
        }
    }

    /// 8 scales `s_j` (the bytes of `w`) as i32 words `s_j·0x10001` (the scale in both i16
    /// halves).
    #[inline(always)]
    unsafe fn scale_words(w: u64) -> __m256i {
        let v = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(w as i64));
        _mm256_or_si256(v, _mm256_slli_epi32(v, 16))
    }

    /// `Q4_K`'s minimum term of one block into `accm` (module doc).
    #[inline(always)]
    unsafe fn q4k_mins(accm: __m128, mn: u64, y32: *const i16, md: f32) -> __m128 {
        let mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
        let prod = _mm_madd_epi16(mins, _mm_loadu_si128(y32 as *const __m128i));
        _mm_fmadd_ps(_mm_set1_ps(md), _mm_cvtepi32_ps(prod), accm)
    }

    /// Row `r` of a `Q4_K` matrix against `a`, AVX2 (`maddubs`, `madd` with the scale
    /// broadcast from its word, add).
    #[inline(always)]
    unsafe fn q4k_row_avx2<const PF: usize>(m: &QMatrix, r: usize, a: &Act) -> f32 {
        let nb = m.cols / QK_K;
        let bs = 144;
        let m4 = _mm256_set1_epi8(0x0f);
        let row = m.data.as_ptr().add(r * nb * bs);
        let (dp, mp) = (m.d.as_ptr().add(r * nb), m.m.as_ptr().add(r * nb));
        let mut acc = _mm256_setzero_ps();
        let mut accm = _mm_setzero_ps();
        for b in 0..nb {
            let blk = row.add(b * bs);
            prefetch::<PF>(blk, bs);
            let qy = a.x.qs.as_ptr().add(b * QK_K);
            let dy = *a.x.d.get_unchecked(b);
            let [s, mn] = q4k_scale_words(std::slice::from_raw_parts(blk.add(4), 12));
            accm = q4k_mins(accm, mn, a.y32.as_ptr().add(b * 8), -dy * *mp.add(b));
            let mut sw = [0i32; 8];
            _mm256_storeu_si256(sw.as_mut_ptr() as *mut __m256i, scale_words(s));
            let mut sumi = _mm256_setzero_si256();
            for c in 0..4 {
                let raw = _mm256_loadu_si256(blk.add(16 + 32 * c) as *const __m256i);
                let lo = _mm256_and_si256(raw, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                let y0 = _mm256_loadu_si256(qy.add(64 * c) as *const __m256i);
                let y1 = _mm256_loadu_si256(qy.add(64 * c + 32) as *const __m256i);
                let pl =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(lo, y0), _mm256_set1_epi32(sw[2 * c]));
                let ph = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(hi, y1),
                    _mm256_set1_epi32(sw[2 * c + 1]),
                );
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
            }
            let sd = _mm256_set1_ps(dy * *dp.add(b));
            acc = _mm256_fmadd_ps(sd, _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum8(acc) + hsum4(accm)
    }

    /// Row `r` of a `Q6_K` matrix against `a`, AVX2.
    #[inline(always)]
    unsafe fn q6k_row_avx2<const PF: usize>(m: &QMatrix, r: usize, a: &Act) -> f32 {
        let nb = m.cols / QK_K;
        let bs = 210;
        // Word 2g of the low 128-bit lane, word 2g + 1 of the high one, in every i16 lane.
        let pick: [__m256i; 4] = std::array::from_fn(|g| {
            let lo = (0x0100 + 0x0202 * 2 * g as i32) as i16;
            let hi = (0x0100 + 0x0202 * (2 * g as i32 + 1)) as i16;
            _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo))
        });
        let row = m.data.as_ptr().add(r * nb * bs);
        let dp = m.d.as_ptr().add(r * nb);
        let mut acc = _mm256_setzero_ps();
        for b in 0..nb {
            let p = row.add(b * bs);
            prefetch::<PF>(p, bs);
            let qy = a.x.qs.as_ptr().add(b * QK_K);
            let dy = *a.x.d.get_unchecked(b);
            let bsums = _mm256_loadu_si256(a.x.bsums.as_ptr().add(b * 16) as *const __m256i);
            let s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192) as *const __m128i));
            let off = _mm256_slli_epi32(_mm256_madd_epi16(s16, bsums), 5);
            let sc = [
                _mm256_permute4x64_epi64(s16, 0x44),
                _mm256_permute4x64_epi64(s16, 0xee),
            ];
            let mut sumi = _mm256_sub_epi32(_mm256_setzero_si256(), off);
            for (h, &sch) in sc.iter().enumerate() {
                let q = crate::kernels::kdot::x86::q6k_codes(p.add(64 * h), p.add(128 + 32 * h));
                for g in 0..4 {
                    let y = _mm256_loadu_si256(qy.add(128 * h + 32 * g) as *const __m256i);
                    let s = _mm256_shuffle_epi8(sch, pick[g]);
                    let pr = _mm256_madd_epi16(_mm256_maddubs_epi16(q[g], y), s);
                    sumi = _mm256_add_epi32(sumi, pr);
                }
            }
            let sd = _mm256_set1_ps(dy * *dp.add(b));
            acc = _mm256_fmadd_ps(sd, _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum8(acc)
    }

    /// The 8 i32 lanes of a 16-lane sum: lane `t` plus lane `t + 8` (exact integers).
    #[inline(always)]
    unsafe fn fold(v: __m512i) -> __m256i {
        _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1))
    }

    /// Row `r` of a `Q4_K` matrix against `a`, AVX-512 (BW + VNNI) on 512-bit registers: two
    /// sub-blocks per register (`a.qs4`: the codes of sub-blocks 0, 2, 1, 3, 4, 6, 5, 7 of
    /// each block, so that a 64-byte load matches two chunks' low or high nibbles), the
    /// scales picked into each 256-bit half by `vpermd`, `maddubs` + `vpdpwssd`; the 16
    /// lanes folded to the 8 of the AVX2 path (the same integers).
    #[inline(always)]
    unsafe fn q4k_row_512<const PF: usize>(m: &QMatrix, r: usize, a: &Act) -> f32 {
        let nb = m.cols / QK_K;
        let bs = 144;
        let m4 = _mm512_set1_epi8(0x0f);
        let half = |x: i32, y: i32| {
            _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_set1_epi32(x)),
                _mm256_set1_epi32(y),
                1,
            )
        };
        let idx = [half(0, 2), half(1, 3), half(4, 6), half(5, 7)];
        let row = m.data.as_ptr().add(r * nb * bs);
        let (dp, mp) = (m.d.as_ptr().add(r * nb), m.m.as_ptr().add(r * nb));
        let mut acc = _mm256_setzero_ps();
        let mut accm = _mm_setzero_ps();
        for b in 0..nb {
            let blk = row.add(b * bs);
            prefetch::<PF>(blk, bs);
            let qy = a.qs4.as_ptr().add(b * QK_K);
            let dy = *a.x.d.get_unchecked(b);
            let [s, mn] = q4k_scale_words(std::slice::from_raw_parts(blk.add(4), 12));
            accm = q4k_mins(accm, mn, a.y32.as_ptr().add(b * 8), -dy * *mp.add(b));
            let w = _mm512_castsi256_si512(scale_words(s));
            let mut sumi = _mm512_setzero_si512();
            for c in 0..2 {
                let raw = _mm512_loadu_si512(blk.add(16 + 64 * c) as *const _);
                let lo = _mm512_and_si512(raw, m4);
                let hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
                let y0 = _mm512_loadu_si512(qy.add(128 * c) as *const _);
                let y1 = _mm512_loadu_si512(qy.add(128 * c + 64) as *const _);
                let s0 = _mm512_permutexvar_epi32(idx[2 * c], w);
                let s1 = _mm512_permutexvar_epi32(idx[2 * c + 1], w);
                sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(lo, y0), s0);
                sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(hi, y1), s1);
            }
            let sd = _mm256_set1_ps(dy * *dp.add(b));
            acc = _mm256_fmadd_ps(sd, _mm256_cvtepi32_ps(fold(sumi)), acc);
        }
        hsum8(acc) + hsum4(accm)
    }

    /// Row `r` of a `Q6_K` matrix against `a`, AVX-512 (BW + VNNI): per half of the block
    /// two 512-bit code registers (elements 0..64 and 64..128 of the half: the 64 low-nibble
    /// bytes once, the 32 high-bit bytes in both 256-bit halves, shifted per half by
    /// `vpsllvw`/`vpsrlvw`), the four scales of each register's 128-bit lanes picked by
    /// `vpermw`; the lanes folded to the AVX2 path's 8 (the same integers).
    #[inline(always)]
    unsafe fn q6k_row_512<const PF: usize>(m: &QMatrix, r: usize, a: &Act) -> f32 {
        let nb = m.cols / QK_K;
        let bs = 210;
        let m4 = _mm512_set1_epi8(0x0f);
        let m3 = _mm512_set1_epi8(0x30);
        let cnt = |x: i16, y: i16| {
            _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_set1_epi16(x)),
                _mm256_set1_epi16(y),
                1,
            )
        };
        let (shl, shr) = (cnt(4, 2), cnt(0, 2));
        // Register (h, k) of the block: its 128-bit lane q takes scale 8h + 4k + q.
        let pick: [__m512i; 4] = std::array::from_fn(|i| {
            let mut w = [0i16; 32];
            for (l, v) in w.iter_mut().enumerate() {
                *v = (4 * i + l / 8) as i16;
            }
            _mm512_loadu_si512(w.as_ptr() as *const _)
        });
        let row = m.data.as_ptr().add(r * nb * bs);
        let dp = m.d.as_ptr().add(r * nb);
        let mut acc = _mm256_setzero_ps();
        for b in 0..nb {
            let p = row.add(b * bs);
            prefetch::<PF>(p, bs);
            let qy = a.x.qs.as_ptr().add(b * QK_K);
            let dy = *a.x.d.get_unchecked(b);
            let bsums = _mm256_loadu_si256(a.x.bsums.as_ptr().add(b * 16) as *const __m256i);
            let s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192) as *const __m128i));
            let off = _mm256_slli_epi32(_mm256_madd_epi16(s16, bsums), 5);
            let s16 = _mm512_castsi256_si512(s16);
            let mut sumi = _mm512_setzero_si512();
            for h in 0..2 {
                let l = _mm512_loadu_si512(p.add(64 * h) as *const _);
                let hb = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                    p.add(128 + 32 * h) as *const __m256i
                ));
                let qa = _mm512_or_si512(
                    _mm512_and_si512(l, m4),
                    _mm512_and_si512(_mm512_sllv_epi16(hb, shl), m3),
                );
                let qb = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16(l, 4), m4),
                    _mm512_and_si512(_mm512_srlv_epi16(hb, shr), m3),
                );
                let ya = _mm512_loadu_si512(qy.add(128 * h) as *const _);
                let yb = _mm512_loadu_si512(qy.add(128 * h + 64) as *const _);
                let sa = _mm512_permutexvar_epi16(pick[2 * h], s16);
                let sb = _mm512_permutexvar_epi16(pick[2 * h + 1], s16);
                sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(qa, ya), sa);
                sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(qb, yb), sb);
            }
            let si = _mm256_sub_epi32(fold(sumi), off);
            let sd = _mm256_set1_ps(dy * *dp.add(b));
            acc = _mm256_fmadd_ps(sd, _mm256_cvtepi32_ps(si), acc);
        }
        hsum8(acc)
    }

    /// Rows `r0..r0 + out.len()`, one at a time.
    #[inline(always)]
    unsafe fn rows<const Z: bool, const PF4: usize, const PF6: usize>(
        m: &QMatrix,
        r0: usize,
        a: &Act,
        out: &mut [f32],
    ) {
        for (k, o) in out.iter_mut().enumerate() {
            *o = match (Z, m.ty == QType::Q4_K) {
                (false, true) => q4k_row_avx2::<PF4>(m, r0 + k, a),
                (false, false) => q6k_row_avx2::<PF6>(m, r0 + k, a),
                (true, true) => q4k_row_512::<PF4>(m, r0 + k, a),
                (true, false) => q6k_row_512::<PF6>(m, r0 + k, a),
            };
        }
    }

    /// # Safety
    /// AVX2 and FMA; rows `r0..r0 + out.len()` in `m`, `a` of `m.cols` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows_avx2(m: &QMatrix, r0: usize, a: &Act, out: &mut [f32]) {
        rows::<false, PREFETCH_Q4K, PREFETCH_Q6K>(m, r0, a, out)
    }

    /// # Safety
    /// AVX2, FMA, AVX-512 F + BW + VNNI; `a.qs4` filled; sizes as [`rows_avx2`].
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn rows_512(m: &QMatrix, r0: usize, a: &Act, out: &mut [f32]) {
        rows::<true, PREFETCH_Q4K, PREFETCH_Q6K>(m, r0, a, out)
    }

    /// (Timing experiments: the prefetch distance.)
    #[cfg(test)]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn rows_512_pf<const PF: usize>(
        m: &QMatrix,
        r0: usize,
        a: &Act,
        out: &mut [f32],
    ) {
        rows::<true, PF, PF>(m, r0, a, out)
    }

    /// (Timing experiments: the prefetch distance.)
    #[cfg(test)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows_avx2_pf<const PF: usize>(
        m: &QMatrix,
        r0: usize,
        a: &Act,
        out: &mut [f32],
    ) {
        rows::<false, PF, PF>(m, r0, a, out)
    }
}

/// Bytes ahead of the current super-block that the SIMD kernels prefetch (0: none), per
/// type. Measured on a 65536 × 2048 matrix, 1 thread (`bench_tiles`): `Q4_K` 12 → 15.5 GB/s
/// with 2048, `Q6_K` no better with any distance (16.5 → 14–15.5 GB/s).
#[cfg(target_arch = "x86_64")]
const PREFETCH_Q4K: usize = 2048;
#[cfg(target_arch = "x86_64")]
const PREFETCH_Q6K: usize = 0;

/// Whether the AVX-512 kernels run here: the `Vnni` level (AVX-512 VL + VNNI) plus AVX-512 F
/// and BW (every CPU with AVX-512 VNNI has them; otherwise the AVX2 kernels run).
fn has_512(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static BW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        isa == Isa::Vnni
            && *BW.get_or_init(|| {
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
            })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        false
    }
}

/// Rows `r0..r0 + out.len()` of `m` against `a` into `out`.
fn rows(isa: Isa, m: &QMatrix, r0: usize, a: &Act, out: &mut [f32]) {
    assert!(r0 + out.len() <= m.rows);
    assert!(a.x.qs.len() == m.cols && a.y32.len() == m.cols / 32);
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the features were detected at run time (tests force lower ones only); the
        // rows and the activation's length were checked above (and `qs4` where it is used).
        Isa::Vnni if has_512(isa) => {
            assert!(m.ty != QType::Q4_K || a.qs4.len() == m.cols);
            return unsafe { x86::rows_512(m, r0, a, out) };
        }
        Isa::Vnni | Isa::Avx2 => return unsafe { x86::rows_avx2(m, r0, a, out) },
        Isa::Generic => {}
    }
    let _ = isa;
    for (k, o) in out.iter_mut().enumerate() {
        *o = match m.ty {
            QType::Q4_K => q4k_row_generic(m, r0 + k, a),
            _ => q6k_row_generic(m, r0 + k, a),
        };
    }
}

/// Whether [`matvec`] runs this matrix type.
pub(crate) fn handles(ty: QType) -> bool {
    matches!(ty, QType::Q4_K | QType::Q6_K)
}

/// `y (+)= M·x` for one vector (`x: [cols]`, `y: [rows]`) of a `Q4_K` or `Q6_K` matrix,
/// parallel over chunks of rows (what [`super::kdot::matmat`] runs for one vector).
pub(crate) fn matvec(isa: Isa, m: &QMatrix, x: &[f32], y: &mut [f32], accumulate: bool) {
    assert!(handles(m.ty));
    assert!(m.cols.is_multiple_of(QK_K) && x.len() == m.cols && y.len() == m.rows);
    assert!(m.data.len() == m.rows * m.row_bytes() && m.d.len() == m.rows * (m.cols / QK_K));
    let a = Act::new(x, m.ty == QType::Q4_K && has_512(isa));
    const ROWS: usize = 32;
    let nrows = m.rows;
    let yp = SendPtr(y.as_mut_ptr());
    (0..nrows.div_ceil(ROWS)).into_par_iter().for_each(|c| {
        let (r0, nr) = (c * ROWS, ROWS.min(nrows - c * ROWS));
        let mut buf = [0.0f32; ROWS];
        rows(isa, m, r0, &a, &mut buf[..nr]);
        // SAFETY: chunk c alone writes rows r0..r0 + nr, inside y.
        let yc = unsafe { std::slice::from_raw_parts_mut(yp.get().add(r0), nr) };
        for (o, &v) in yc.iter_mut().zip(&buf[..nr]) {
            if accumulate {
                *o += v;
            } else {
                *o = v;
            }
        }
    });
}

#[cfg(test)]
#[path = "kdot_dec_tests.rs"]
mod tests;
