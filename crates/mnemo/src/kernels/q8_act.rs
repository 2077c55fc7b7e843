//! The activation rounding of the quantised products (`quant::matmat`): a row `x` cut into
//! 32-value blocks, each stored as 8-bit integers with one scale (llama.cpp's `Q8_1`):
//!
//! ```text
//! d = max_j |x_j| / 127,   q_j = round(x_j · (1/d))   (ties away from zero; 0 when d = 0)
//! s = d · Σ_j q_j          (for the weight minimums of Q4_1 / offsets of Q4_0)
//! ```
//!
//! The AVX2 path (chosen at run time) computes the same bits as the portable one: the maximum
//! and the product `x·(1/d)` are exact IEEE operations either way, and the rounding is
//! `trunc(v) ± 1` where `|v − trunc(v)| ≥ 0.5` (`v − trunc(v)` is exact), which is `roundf`.
//! It replaces one libm `roundf` call per activation (≈6% of the server's CPU at 16 clients).

/// Quantise `x` (a multiple of 32 long) into `qx` (same length), `dx` and `sx` (one per block).
pub(crate) fn quantize(x: &[f32], qx: &mut [i8], dx: &mut [f32], sx: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: AVX2 and FMA were detected; every access is inside the checked slices.
        return unsafe { quantize_avx2(x, qx, dx, sx) };
    }
    quantize_portable(x, qx, dx, sx)
}

/// The portable path (the reference the AVX2 path is tested against).
pub(crate) fn quantize_portable(x: &[f32], qx: &mut [i8], dx: &mut [f32], sx: &mut [f32]) {
    check(x, qx, dx, sx);
    for (b, xb) in x.chunks_exact(32).enumerate() {
        let amax = xb.iter().fold(0.0f32, |a, &t| a.max(t.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut s = 0i32;
        for (q, &t) in qx[b * 32..(b + 1) * 32].iter_mut().zip(xb) {
            *q = (t * id).round() as i8;
            s += *q as i32;
        }
        dx[b] = d;
        sx[b] = d * s as f32;
    }
}

fn check(x: &[f32], qx: &[i8], dx: &[f32], sx: &[f32]) {
    let nb = x.len() / 32;
    assert!(x.len() == nb * 32 && qx.len() == x.len() && dx.len() == nb && sx.len() == nb);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(x: &[f32], qx: &mut [i8], dx: &mut [f32], sx: &mut [f32]) {
    use std::arch::x86_64::*;
    check(x, qx, dx, sx);
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for b in 0..x.len() / 32 {
        let p = x.as_ptr().add(b * 32);
        let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(p.add(8 * k)));
        let mut m = _mm256_and_ps(v[0], abs_mask);
        for vk in &v[1..] {
            m = _mm256_max_ps(m, _mm256_and_ps(*vk, abs_mask));
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        // (The maximum is exact and independent of the order for NaN-free rows.)
        let amax = lanes.iter().fold(0.0f32, |a, &t| a.max(t));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let idv = _mm256_set1_ps(id);
        let mut q = [_mm256_setzero_si256(); 4];
        let mut acc = _mm256_setzero_si256();
        for (qk, &vk) in q.iter_mut().zip(&v) {
            let t = _mm256_mul_ps(vk, idv);
            let tr = _mm256_round_ps(t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            let frac = _mm256_and_ps(_mm256_sub_ps(t, tr), abs_mask);
            let away = _mm256_cmp_ps(frac, half, _CMP_GE_OQ);
            let step = _mm256_or_ps(_mm256_and_ps(t, sign_mask), one);
            let r = _mm256_add_ps(tr, _mm256_and_ps(away, step));
            *qk = _mm256_cvtps_epi32(r);
            acc = _mm256_add_epi32(acc, *qk);
        }
        // i32 → i8 with saturation (as `as i8` on the portable path for |q| ≤ 127), in order.
        let a = _mm256_packs_epi32(q[0], q[1]);
        let c = _mm256_packs_epi32(q[2], q[3]);
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, c), perm);
        _mm256_storeu_si256(qx.as_mut_ptr().add(b * 32) as *mut __m256i, bytes);
        let mut s4 = [0i32; 8];
        _mm256_storeu_si256(s4.as_mut_ptr() as *mut __m256i, acc);
        let s: i32 = s4.iter().sum();
        dx[b] = d;
        sx[b] = d * s as f32;
    }
}

#[cfg(test)]
mod tests {
    /// The AVX2 path gives the portable path's bytes, scales and sums: random rows at several
    /// scales, exact ties (`x·(1/d)` = k + 0.5), zeros, and all-zero blocks.
    #[test]
    fn simd_and_portable_quantisation_agree() {
        let mut st: u64 = 11;
        let mut rnd = || {
            st = st
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((st >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for case in 0..40 {
            let n = 32 * (1 + case % 7);
            let scale = [1e-3f32, 1.0, 37.0, 1e4][case % 4];
            let mut x: Vec<f32> = (0..n).map(|_| rnd() * scale).collect();
            if case % 5 == 0 {
                // Ties: 127 · (k + 0.5) / 127 with the block maximum 127.
                for (j, t) in x.iter_mut().enumerate() {
                    *t = if j % 32 == 0 {
                        127.0
                    } else {
                        ((j % 50) as f32 - 25.0) + 0.5
                    };
                }
            }
            if case % 6 == 0 && n > 32 {
                x[n - 32..].fill(0.0);
            }
            let nb = n / 32;
            let (mut q1, mut d1, mut s1) = (vec![0i8; n], vec![0.0; nb], vec![0.0; nb]);
            let (mut q2, mut d2, mut s2) = (vec![0i8; n], vec![0.0; nb], vec![0.0; nb]);
            super::quantize_portable(&x, &mut q1, &mut d1, &mut s1);
            super::quantize(&x, &mut q2, &mut d2, &mut s2);
            assert_eq!(q1, q2, "case {case}");
            assert_eq!(d1, d2, "case {case}");
            assert_eq!(s1, s2, "case {case}");
            if case % 5 == 0 {
                // Round half away from zero: 1.5 → 2, −0.5 → −1.
                let i = x[..32].iter().position(|&t| t == 1.5).unwrap();
                assert_eq!(q1[i], 2);
                let i = x[..32].iter().position(|&t| t == -0.5).unwrap();
                assert_eq!(q1[i], -1);
            }
        }
    }
}
