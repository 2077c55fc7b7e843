//! The integer sum of a `Q5_K` super-block against `Q8_K` codes, for [`super::kdot`] (as
//! ggml's `ggml_vec_dot_q5_K_q8_K`).
//!
//! `Q5_K` (176 bytes: f16 `d`, f16 `dmin`, 12 bytes of eight 6-bit scales `s_j` and minimums
//! `m_j` packed as in `Q4_K`, `qh[32]`, `qs[128]`): each 64-value chunk `c` is 32 bytes of
//! `qs`, low nibbles elements `64c..64c+32`, high nibbles `64c+32..64c+64`, and the fifth bit
//! of element `64c + l` is bit `2c` of `qh[l]`, of `64c + 32 + l` bit `2c + 1`;
//! `w = (d·s_j)·q − dmin·m_j`, `q ∈ 0..32`. So, as for `Q4_K`:
//! `Σ w·(dy·qy) = d·dy·S − dmin·dy·M`, `S = Σ_j s_j·Σ_{l∈j} q_l·qy_l` (this file; at most
//! 8·63·32·31·127 in magnitude), `M = Σ_k m_{k/2}·bsums_k` (shared with `Q4_K`).

/// `S` of a `Q5_K` super-block (`blk`: its 176 bytes), portable.
pub(super) fn q5k_sum_generic(blk: &[u8], s: &[u8; 8], qy: &[i8]) -> i32 {
    let (qh, qs) = (&blk[16..48], &blk[48..176]);
    let mut tot = 0i32;
    for c in 0..4 {
        let bytes = &qs[32 * c..32 * c + 32];
        let (lo, hi) = (&qy[64 * c..64 * c + 32], &qy[64 * c + 32..64 * c + 64]);
        let (mut a, mut b) = (0i32, 0i32);
        for l in 0..32 {
            let ql = (bytes[l] & 15) | (((qh[l] >> (2 * c)) & 1) << 4);
            let qu = (bytes[l] >> 4) | (((qh[l] >> (2 * c + 1)) & 1) << 4);
            a += ql as i32 * lo[l] as i32;
            b += qu as i32 * hi[l] as i32;
        }
        tot += s[2 * c] as i32 * a + s[2 * c + 1] as i32 * b;
    }
    tot
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    /// [`super::q5k_sum_generic`] with AVX2 or VNNI: the 5-bit codes (0..31) rebuilt 32 at a
    /// time (nibble | fifth bit shifted to bit 4), multiplied with `qy` and the sub-block's
    /// scale by `kdot`'s `scaled` (i16 pairs at most 2·31·127).
    ///
    /// # Safety
    /// AVX2 (and for `VNNI` AVX-512 VL + VNNI) must be available; `blk` must hold 176 bytes and `qy` 256.
    #[inline(always)]
    pub unsafe fn q5k_sum<const VNNI: bool>(blk: *const u8, s: &[u8; 8], qy: *const i8) -> i32 {
        let m4 = _mm256_set1_epi8(0x0f);
        let one = _mm256_set1_epi8(1);
        let qh = _mm256_loadu_si256(blk.add(16) as *const __m256i);
        let mut acc = _mm256_setzero_si256();
        for c in 0..4 {
            let raw = _mm256_loadu_si256(blk.add(48 + 32 * c) as *const __m256i);
            let (sl, sh) = (
                _mm_cvtsi32_si128(2 * c as i32),
                _mm_cvtsi32_si128(2 * c as i32 + 1),
            );
            let hl = _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(qh, sl), one), 4);
            let hh = _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(qh, sh), one), 4);
            let lo = _mm256_or_si256(_mm256_and_si256(raw, m4), hl);
            let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m4), hh);
            let y0 = _mm256_loadu_si256(qy.add(64 * c) as *const __m256i);
            let y1 = _mm256_loadu_si256(qy.add(64 * c + 32) as *const __m256i);
            let (s0, s1) = (s[2 * c] as i32, s[2 * c + 1] as i32);
            let p0 = super::super::kdot::x86::scaled::<VNNI>(lo, y0, s0, s0);
            let p1 = super::super::kdot::x86::scaled::<VNNI>(hi, y1, s1, s1);
            acc = _mm256_add_epi32(acc, _mm256_add_epi32(p0, p1));
        }
        super::super::kdot::hsum_i32(acc)
    }
}
