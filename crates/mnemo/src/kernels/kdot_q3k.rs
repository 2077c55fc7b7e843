//! The integer sum of a `Q3_K` super-block against `Q8_K` codes, for [`super::kdot`] (as
//! ggml's `ggml_vec_dot_q3_K_q8_K`).
//!
//! `Q3_K` (110 bytes: `hmask[32]`, `qs[64]`, 12 bytes of sixteen 6-bit scales, f16 `d`):
//! sixteen 16-value sub-blocks `k` with scale `sc_k ∈ −32..32`; element `e = 128h + 32j + l`
//! (`h < 2`, `j < 4`, `l < 32`; sub-block `8h + 2j + l/16`) has the 2-bit code
//! `t = (qs[32h + l] >> 2j) & 3` and the high bit `b = (hmask[l] >> (4h + j)) & 1`, and
//! `w = (d·sc_k)·q` with `q = t − 4·(1 − b) ∈ −4..4`. With the unsigned `u = t + 4b = q + 4`:
//! `Σ w·(dy·qy) = d·dy·S`, `S = Σ_k sc_k·Σ_{l∈k} u_l·qy_l − 4·Σ_k sc_k·bsums_k` (at most
//! 16·32·16·7·127 in magnitude).

/// `Q3_K`'s sixteen scales `sc_k` (offset 32 removed) from its 12 scale bytes.
#[inline(always)]
pub(super) fn q3k_scales(s: &[u8]) -> [i32; 16] {
    let mut out = [0i32; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let low = if j < 8 { s[j] & 15 } else { s[j - 8] >> 4 };
        let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = (low | (high << 4)) as i32 - 32;
    }
    out
}

/// `−4·Σ_k sc_k·bsums_k`: the offset part of `S`.
#[inline(always)]
fn offset(sc: &[i32; 16], bsums: &[i16]) -> i32 {
    -4 * (0..16).map(|k| sc[k] * bsums[k] as i32).sum::<i32>()
}

/// `S` of a `Q3_K` super-block (`blk`: its 110 bytes), portable.
pub(super) fn q3k_sum_generic(blk: &[u8], sc: &[i32; 16], qy: &[i8], bsums: &[i16]) -> i32 {
    let (hm, qs) = (&blk[0..32], &blk[32..96]);
    let mut tot = 0i32;
    for h in 0..2 {
        for j in 0..4 {
            for half in 0..2 {
                let k = 8 * h + 2 * j + half;
                let p: i32 = (16 * half..16 * half + 16)
                    .map(|l| {
                        let t = (qs[32 * h + l] >> (2 * j)) & 3;
                        let b = (hm[l] >> (4 * h + j)) & 1;
                        (t + 4 * b) as i32 * qy[128 * h + 32 * j + l] as i32
                    })
                    .sum();
                tot += sc[k] * p;
            }
        }
    }
    tot + offset(sc, bsums)
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    /// [`super::q3k_sum_generic`] with AVX2 or VNNI: the unsigned codes `u` (0..7) of 32
    /// elements at a time, multiplied with `qy` and the two sub-blocks' scales by `kdot`'s
    /// `scaled` (i16 pairs at most 2·7·127).
    ///
    /// # Safety
    /// AVX2 (and for `VNNI` AVX-512 VL + VNNI) must be available; `blk` must hold 110 bytes
    /// and `qy` 256.
    #[inline(always)]
    pub unsafe fn q3k_sum<const VNNI: bool>(
        blk: *const u8,
        sc: &[i32; 16],
        qy: *const i8,
        bsums: &[i16],
    ) -> i32 {
        let m3 = _mm256_set1_epi8(3);
        let m4 = _mm256_set1_epi8(4);
        let hm = _mm256_loadu_si256(blk as *const __m256i);
        let mut acc = _mm256_setzero_si256();
        for h in 0..2 {
            let raw = _mm256_loadu_si256(blk.add(32 + 32 * h) as *const __m256i);
            for j in 0..4 {
                let t =
                    _mm256_and_si256(_mm256_srl_epi16(raw, _mm_cvtsi32_si128(2 * j as i32)), m3);
                // bit 4h + j of each hmask byte, moved to bit 2 (value 4).
                let sh = 4 * h as i32 + j as i32 - 2;
                let b = if sh >= 0 {
                    _mm256_srl_epi16(hm, _mm_cvtsi32_si128(sh))
                } else {
                    _mm256_sll_epi16(hm, _mm_cvtsi32_si128(-sh))
                };
                let u = _mm256_or_si256(t, _mm256_and_si256(b, m4));
                let y = _mm256_loadu_si256(qy.add(128 * h + 32 * j) as *const __m256i);
                let k = 8 * h + 2 * j;
                let p = super::super::kdot::x86::scaled::<VNNI>(u, y, sc[k], sc[k + 1]);
                acc = _mm256_add_epi32(acc, p);
            }
        }
        super::super::kdot::hsum_i32(acc) + super::offset(sc, bsums)
    }
}
