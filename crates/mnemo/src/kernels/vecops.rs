//! Short-vector primitives for the row-by-row attention loops: `dot(a, b) = Σ aᵢ·bᵢ`,
//! `axpy: y ← y + α·x` and a row's `max`, with an AVX2/FMA path chosen at run time and a portable path (eight
//! independent accumulators, which the compiler vectorises) elsewhere. Each path sums in a
//! fixed order, so results are reproducible on one machine.

/// `Σ aᵢ·bᵢ` over the common length.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    if n >= 16 && super::has_avx2_fma() {
        // SAFETY: AVX2 and FMA were detected; the kernel reads `n` floats of each.
        return unsafe { dot_avx2(&a[..n], &b[..n]) };
    }
    crate::kernels::sparse_attention::dot(&a[..n], &b[..n])
}

/// `max(init, max_i xᵢ)` (NaN elements are skipped, as by `f32::max`): sixteen independent
/// lanes, which the compiler vectorises, so a long row is not one dependent chain.
#[inline]
pub fn max(x: &[f32], init: f32) -> f32 {
    let mut lanes = [init; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    let mut m = chunks.remainder().iter().fold(init, |m, &v| m.max(v));
    for l in lanes {
        m = m.max(l);
    }
    m
}

/// `y ← y + α·x` over the common length.
#[inline]
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    let n = y.len().min(x.len());
    #[cfg(target_arch = "x86_64")]
    if n >= 16 && super::has_avx2_fma() {
        // SAFETY: AVX2 and FMA were detected; the kernel touches `n` floats of each.
        return unsafe { axpy_avx2(&mut y[..n], alpha, &x[..n]) };
    }
    for (y, x) in y[..n].iter_mut().zip(&x[..n]) {
        *y += alpha * x;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
        s1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i + 8)),
            _mm256_loadu_ps(pb.add(i + 8)),
            s1,
        );
        i += 16;
    }
    if i + 8 <= n {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
        i += 8;
    }
    let s = _mm256_add_ps(s0, s1);
    let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    let mut r = _mm_cvtss_f32(h);
    while i < n {
        r += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    r
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(y: &mut [f32], alpha: f32, x: &[f32]) {
    use std::arch::x86_64::*;
    let n = y.len();
    let (py, px) = (y.as_mut_ptr(), x.as_ptr());
    let va = _mm256_set1_ps(alpha);
    let mut i = 0;
    while i + 8 <= n {
        let v = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
        _mm256_storeu_ps(py.add(i), v);
        i += 8;
    }
    while i < n {
        *py.add(i) += alpha * *px.add(i);
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_and_axpy_match_the_plain_sums_at_every_length() {
        let mut r = crate::rng::Rng::new(3);
        for n in [0, 1, 7, 8, 15, 16, 17, 31, 64, 100] {
            let a: Vec<f32> = (0..n).map(|_| r.normal() as f32).collect();
            let b: Vec<f32> = (0..n).map(|_| r.normal() as f32).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let got = dot(&a, &b) as f64;
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "n={n}: {got} vs {want}"
            );
            let mut y = b.clone();
            axpy(&mut y, 0.5, &a);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.5 * a[i])).abs() <= 1e-6, "n={n}, i={i}");
            }
        }
    }

    #[test]
    fn max_is_the_plain_maximum_and_skips_nan() {
        let mut r = crate::rng::Rng::new(5);
        for n in [0, 1, 15, 16, 17, 40, 100] {
            let mut x: Vec<f32> = (0..n).map(|_| r.normal() as f32).collect();
            if n > 3 {
                x[2] = f32::NAN;
            }
            let want = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert_eq!(max(&x, f32::NEG_INFINITY), want, "n={n}");
            assert_eq!(max(&x, 1e9), 1e9, "n={n}");
        }
    }
}
