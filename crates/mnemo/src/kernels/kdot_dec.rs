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
//! Q6_K (w = d·sc_k·(q − 32), sub-blocks k of 16, q ∈ 0..64; register g = 8h + 2·(g mod 4)
//!   of half h holds sub-blocks k_g (low 16 values) and k_g + 1 (high 16)):
//!   S_bt = Σ_g sc_{k_g + ⌊t/4⌋}·Σ_{i<4} q_{32g+4t+i}·qy_{32g+4t+i}
//!          − 32·(sc_{2t}·bsums_{2t} + sc_{2t+1}·bsums_{2t+1})
//!   acc_t ← fma(dy_b·d_b, S_bt, acc_t)    y = hsum8(acc)
//! hsum8(a) = ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))
//! ```
//!
//! (`|S_bt| < 2^25`: its conversion to f32 rounds to nearest, the same on every path.) The
//! integer lanes come from a portable loop, from AVX2 (`maddubs` of the unsigned codes with
//! `qy`, then `madd` with the scale broadcast to the register's i16 lanes) or from AVX-512
//! VNNI on 256-bit registers (the same `maddubs`, then `vpdpwssd` accumulating), chosen at
//! run time; the float steps are the same operations in the same order on every path, so the
//! three agree bit for bit (`kdot_dec_tests.rs`). Unlike [`super::kdot`]'s group kernels the
//! `Q4_K` scales are decoded with shifts and masks on 32-bit words (as ggml), the scales
//! reach the vector unit as broadcast loads, the minimum term is one `madd` per block
//! against `Y` (computed once per product), and `R` rows (4 with AVX-512's 32 registers, 2
//! with AVX2) share each activation load.

use super::kdot::{Q8K, QK_K};
use super::quant::{Isa, QMatrix, QType};
use super::SendPtr;
use rayon::prelude::*;

/// The activation of one product: the `Q8_K` vector and, per block, `Y_j = bsums_{2j} +
/// bsums_{2j+1}` (`[nb·8]`, the 32-value sums for `Q4_K`'s minimum term).
pub(crate) struct Act {
    pub x: Q8K,
    pub y32: Vec<i16>,
}

impl Act {
    pub(crate) fn new(x: &[f32]) -> Act {
        let x = super::kdot::quantize_q8k(x);
        let y32 = x.bsums.chunks_exact(2).map(|p| p[0] + p[1]).collect();
        Act { x, y32 }
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
            let mi = mn[2 * u] as i32 * y32[2 * u] as i32 + mn[2 * u + 1] as i32 * y32[2 * u + 1] as i32;
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

    /// `acc` plus the i32 lanes of `Σ s·(u·y)` over i16 pairs: `maddubs` then `madd` and an
    /// add, or with `VNNI` `vpdpwssd` (the same integers).
    #[inline(always)]
    unsafe fn scaled_add<const VNNI: bool>(
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

    /// 8 scales `s` (bytes of `w`) as i32 words `s·0x10001` (the scale in both i16 halves),
    /// stored to `out` so that each is one broadcast load.
    #[inline(always)]
    unsafe fn scale_words(w: u64, out: &mut [i32; 8]) {
        let v = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(w as i64));
        let v = _mm256_or_si256(v, _mm256_slli_epi32(v, 16));
        _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, v);
    }

    /// Rows `r..r + R` of a `Q4_K` matrix against `a` into `out[0..R]`.
    #[inline(always)]
    pub(super) unsafe fn q4k_tile<const VNNI: bool, const R: usize>(
        m: &QMatrix,
        r: usize,
        a: &Act,
        out: &mut [f32],
    ) {
        let nb = m.cols / QK_K;
        let bs = 144;
        let m4 = _mm256_set1_epi8(0x0f);
        let rowp: [*const u8; R] = std::array::from_fn(|k| m.data.as_ptr().add((r + k) * nb * bs));
        let dp: [*const f32; R] = std::array::from_fn(|k| m.d.as_ptr().add((r + k) * nb));
        let mp: [*const f32; R] = std::array::from_fn(|k| m.m.as_ptr().add((r + k) * nb));
        let mut acc = [_mm256_setzero_ps(); R];
        let mut accm = [_mm_setzero_ps(); R];
        let mut sw = [[0i32; 8]; R];
        for b in 0..nb {
            let qy = a.x.qs.as_ptr().add(b * QK_K);
            let dy = *a.x.d.get_unchecked(b);
            let y32 = _mm_loadu_si128(a.y32.as_ptr().add(b * 8) as *const __m128i);
            let mut sumi = [_mm256_setzero_si256(); R];
            for k in 0..R {
                let blk = rowp[k].add(b * bs);
                let [s, mn] = q4k_scale_words(std::slice::from_raw_parts(blk.add(4), 12));
                scale_words(s, &mut sw[k]);
                let mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
                let prod = _mm_madd_epi16(mins, y32);
                let md = _mm_set1_ps(-dy * *mp[k].add(b));
                accm[k] = _mm_fmadd_ps(md, _mm_cvtepi32_ps(prod), accm[k]);
            }
            for c in 0..4 {
                let y0 = _mm256_loadu_si256(qy.add(64 * c) as *const __m256i);
                let y1 = _mm256_loadu_si256(qy.add(64 * c + 32) as *const __m256i);
                for k in 0..R {
                    let raw = _mm256_loadu_si256(rowp[k].add(b * bs + 16 + 32 * c) as *const __m256i);
                    let lo = _mm256_and_si256(raw, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                    let sl = _mm256_set1_epi32(sw[k][2 * c]);
                    let sh = _mm256_set1_epi32(sw[k][2 * c + 1]);
                    sumi[k] = scaled_add::<VNNI>(sumi[k], lo, y0, sl);
                    sumi[k] = scaled_add::<VNNI>(sumi[k], hi, y1, sh);
                }
            }
            for k in 0..R {
                let sd = _mm256_set1_ps(dy * *dp[k].add(b));
                acc[k] = _mm256_fmadd_ps(sd, _mm256_cvtepi32_ps(sumi[k]), acc[k]);
            }
        }
        for k in 0..R {
            out[k] = hsum8(acc[k]) + hsum4(accm[k]);
        }
    }

    /// Rows `r..r + R` of a `Q6_K` matrix against `a` into `out[0..R]`.
    #[inline(always)]
    pub(super) unsafe fn q6k_tile<const VNNI: bool, const R: usize>(
        m: &QMatrix,
        r: usize,
        a: &Act,
        out: &mut [f32],
    ) {
        let nb = m.cols / QK_K;
        let bs = 210;
        let m4 = _mm256_set1_epi8(0x0f);
        let m3 = _mm256_set1_epi8(0x30);
        // Word 2g of the low 128-bit lane, word 2g + 1 of the high one, in every i16 lane.
        let pick: [__m256i; 4] = std::array::from_fn(|g| {
            let lo = (0x0100 + 0x0202 * 2 * g as i32) as i16;
            let hi = (0x0100 + 0x0202 * (2 * g as i32 + 1)) as i16;
            _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo))
        });
        let rowp: [*const u8; R] = std::array::from_fn(|k| m.data.as_ptr().add((r + k) * nb * bs));
        let dp: [*const f32; R] = std::array::from_fn(|k| m.d.as_ptr().add((r + k) * nb));
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let qy = a.x.qs.as_ptr().add(b * QK_K);
            let dy = *a.x.d.get_unchecked(b);
            let bsums = _mm256_loadu_si256(a.x.bsums.as_ptr().add(b * 16) as *const __m256i);
            let mut sumi = [_mm256_setzero_si256(); R];
            let mut sc = [[_mm256_setzero_si256(); 2]; R];
            for k in 0..R {
                let s8 = _mm_loadu_si128(rowp[k].add(b * bs + 192) as *const __m128i);
                let s16 = _mm256_cvtepi8_epi16(s8);
                let off = _mm256_slli_epi32(_mm256_madd_epi16(s16, bsums), 5);
                sumi[k] = _mm256_sub_epi32(sumi[k], off);
                sc[k] = [
                    _mm256_permute4x64_epi64(s16, 0x44),
                    _mm256_permute4x64_epi64(s16, 0xee),
                ];
            }
            for h in 0..2 {
                let y: [__m256i; 4] = std::array::from_fn(|g| {
                    _mm256_loadu_si256(qy.add(128 * h + 32 * g) as *const __m256i)
                });
                for k in 0..R {
                    let p = rowp[k].add(b * bs);
                    let l0 = _mm256_loadu_si256(p.add(64 * h) as *const __m256i);
                    let l1 = _mm256_loadu_si256(p.add(64 * h + 32) as *const __m256i);
                    let hb = _mm256_loadu_si256(p.add(128 + 32 * h) as *const __m256i);
                    let q = [
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
                    ];
                    for g in 0..4 {
                        let s = _mm256_shuffle_epi8(sc[k][h], pick[g]);
                        sumi[k] = scaled_add::<VNNI>(sumi[k], q[g], y[g], s);
                    }
                }
            }
            for k in 0..R {
                let sd = _mm256_set1_ps(dy * *dp[k].add(b));
                acc[k] = _mm256_fmadd_ps(sd, _mm256_cvtepi32_ps(sumi[k]), acc[k]);
            }
        }
        for k in 0..R {
            out[k] = hsum8(acc[k]);
        }
    }

    /// Rows `r0..r0 + out.len()` in tiles of `R` rows (then single rows).
    #[inline(always)]
    pub(super) unsafe fn rows<const VNNI: bool, const R: usize>(m: &QMatrix, r0: usize, a: &Act, out: &mut [f32]) {
        let nr = out.len();
        let mut k = 0;
        let q4 = m.ty == QType::Q4_K;
        while k < nr {
            let n = if k + R <= nr { R } else { 1 };
            let o = &mut out[k..k + n];
            match (q4, n == R) {
                (true, true) => q4k_tile::<VNNI, R>(m, r0 + k, a, o),
                (true, false) => q4k_tile::<VNNI, 1>(m, r0 + k, a, o),
                (false, true) => q6k_tile::<VNNI, R>(m, r0 + k, a, o),
                (false, false) => q6k_tile::<VNNI, 1>(m, r0 + k, a, o),
            }
            k += n;
        }
    }

    /// # Safety
    /// AVX2 and FMA; rows `r0..r0 + out.len()` in `m`, `a` of `m.cols` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows_avx2(m: &QMatrix, r0: usize, a: &Act, out: &mut [f32]) {
        rows::<false, 1>(m, r0, a, out)
    }

    /// # Safety
    /// AVX2, FMA, AVX-512 VL + VNNI; sizes as [`rows_avx2`].
    #[target_feature(enable = "avx2,fma,avx512vl,avx512vnni")]
    pub(super) unsafe fn rows_vnni(m: &QMatrix, r0: usize, a: &Act, out: &mut [f32]) {
        rows::<true, 1>(m, r0, a, out)
    }

    /// (Timing experiments: any tile height.)
    #[target_feature(enable = "avx2,fma,avx512vl,avx512vnni")]
    pub(super) unsafe fn rows_vnni_r<const R: usize>(m: &QMatrix, r0: usize, a: &Act, out: &mut [f32]) {
        rows::<true, R>(m, r0, a, out)
    }
}

/// Rows `r0..r0 + out.len()` of `m` against `a` into `out`.
fn rows(isa: Isa, m: &QMatrix, r0: usize, a: &Act, out: &mut [f32]) {
    assert!(r0 + out.len() <= m.rows);
    assert!(a.x.qs.len() == m.cols && a.y32.len() == m.cols / 32);
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the features were detected at run time (tests force lower ones only); the
        // rows and the activation's length were checked above.
        Isa::Vnni => return unsafe { x86::rows_vnni(m, r0, a, out) },
        Isa::Avx2 => return unsafe { x86::rows_avx2(m, r0, a, out) },
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
    let a = Act::new(x);
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
