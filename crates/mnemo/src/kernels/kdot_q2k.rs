//! The integer sums of a `Q2_K` super-block against `Q8_K` codes, for [`super::kdot`] (as
//! ggml's `ggml_vec_dot_q2_K_q8_K`).
//!
//! `Q2_K` (84 bytes: `scales[16]`, `qs[64]`, f16 `d`, f16 `dmin`): sixteen 16-value
//! sub-blocks `k`, each with a 4-bit scale `s_k = scales[k] & 15` and minimum
//! `m_k = scales[k] >> 4`; `w = (d·s_k)·q − dmin·m_k`, `q ∈ 0..4`. Half `h` (elements
//! `128h..128h+128`) is the 32 bytes `qs[32h..32h+32]`: bits `2j..2j+2` of byte `l` are
//! element `128h + 32j + l` (sub-block `8h + 2j + l/16`). So
//! `Σ w·(dy·qy) = d·dy·S − dmin·dy·M` with `S = Σ_k s_k·Σ_{l∈k} q_l·qy_l` (at most
//! 16·15·16·3·127 in magnitude) and `M = Σ_k m_k·bsums_k`.

/// `M = Σ_k m_k·bsums_k` of a `Q2_K` super-block (`sc`: its 16 scale bytes).
pub(super) fn q2k_min_sum(sc: &[u8], bsums: &[i16]) -> i32 {
    (0..16).map(|k| (sc[k] >> 4) as i32 * bsums[k] as i32).sum()
}

/// `S` of a `Q2_K` super-block (`blk`: its 84 bytes), portable.
pub(super) fn q2k_sum_generic(blk: &[u8], qy: &[i8]) -> i32 {
    let (sc, qs) = (&blk[0..16], &blk[16..80]);
    let mut tot = 0i32;
    for h in 0..2 {
        let q = &qs[32 * h..32 * h + 32];
        for j in 0..4 {
            for half in 0..2 {
                let k = 8 * h + 2 * j + half;
                let y = &qy[128 * h + 32 * j + 16 * half..][..16];
                let p: i32 = (0..16)
                    .map(|l| ((q[16 * half + l] >> (2 * j)) & 3) as i32 * y[l] as i32)
                    .sum();
                tot += (sc[k] & 15) as i32 * p;
            }
        }
    }
    tot
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    /// [`super::q2k_sum_generic`] with AVX2 or VNNI: the 2-bit codes of 32 elements at a
    /// time, multiplied with `qy` and the two 16-value sub-blocks' scales by `kdot`'s `scaled`.
    ///
    /// # Safety
    /// AVX2 (and for `VNNI` AVX-512 VL + VNNI) must be available; `blk` must hold 84 bytes and `qy` 256.
    #[inline(always)]
    pub unsafe fn q2k_sum<const VNNI: bool>(blk: *const u8, qy: *const i8) -> i32 {
        let m3 = _mm256_set1_epi8(3);
        let mut acc = _mm256_setzero_si256();
        for h in 0..2 {
            let raw = _mm256_loadu_si256(blk.add(16 + 32 * h) as *const __m256i);
            for j in 0..4 {
                let sh = _mm_cvtsi32_si128(2 * j as i32);
                let q = _mm256_and_si256(_mm256_srl_epi16(raw, sh), m3);
                let y = _mm256_loadu_si256(qy.add(128 * h + 32 * j) as *const __m256i);
                let k = 8 * h + 2 * j;
                let (s0, s1) = ((*blk.add(k) & 15) as i32, (*blk.add(k + 1) & 15) as i32);
                let p = super::super::kdot::x86::scaled::<VNNI>(q, y, s0, s1);
                acc = _mm256_add_epi32(acc, p);
            }
        }
        super::super::kdot::hsum_i32(acc)
    }
}
