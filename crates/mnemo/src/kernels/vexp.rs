//! `exp` over a row, vectorised: the softmax and cross-entropy inner loop
//! `xᵢ ← exp(xᵢ − m)`, `s = Σ xᵢ`, at several elements per instruction instead of one libm call
//! each.
//!
//! The function (Cephes `expf`): with `n = round(x·log₂e)` and `r = x − n·ln2` (ln2 split in
//! two for precision, `|r| ≤ ln2/2`),
//!
//! ```text
//! exp(x) = 2ⁿ · (1 + r + r²·P(r)),   P a degree-5 polynomial   (≤ 2 ulp from libm, tested)
//! ```
//!
//! `x < −87.34` (where 2ⁿ would leave the normal range, and `−∞` of masked scores) gives 0,
//! `x > 88` is clamped to 88 (`exp(88) ≈ 1.65e38`), NaN stays NaN. The AVX-512F and AVX2+FMA
//! paths (chosen at run time) and the portable path run the same operations with fused
//! multiply-adds in the same order, and sum in the same sixteen lanes (element `i` into lane
//! `i mod 16`, the lanes added 0 to 15 at the end): all three give the same bits.
//! [`exp_sub`] is [`exp_sub_sum`] without the sum (attention's backward `P = exp(S − lse)`),
//! the same values.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const LO: f32 = -87.336_55;
const HI: f32 = 88.0;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];
const LANES: usize = 16;

/// `exp(x)` (the module's function, one element).
#[inline]
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x < LO {
        return 0.0;
    }
    let x = x.min(HI);
    let fx = (x * LOG2E).round_ties_even();
    let r = (-fx).mul_add(LN2_HI, x);
    let r = (-fx).mul_add(LN2_LO, r);
    let z = r * r;
    let mut p = P[0];
    for &c in &P[1..] {
        p = p.mul_add(r, c);
    }
    let y = p.mul_add(z, r + 1.0);
    y * f32::from_bits(((fx as i32 + 127) as u32) << 23)
}

/// The instruction sets of the row kernels, best first (tests pick each one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Avx512,
    Avx2,
    Portable,
}

/// The best path this CPU runs.
fn best() -> Path {
    if super::has_avx512f() {
        Path::Avx512
    } else if super::has_avx2_fma() {
        Path::Avx2
    } else {
        Path::Portable
    }
}

/// `xᵢ ← exp(xᵢ − m)` for every element; returns `Σ exp(xᵢ − m)` (module docs for the order).
pub fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
    exp_sub_sum_on(best(), x, m)
}

/// [`exp_sub_sum`] on `path` (which the CPU must run).
fn exp_sub_sum_on(path: Path, x: &mut [f32], m: f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if !x.is_empty() {
        match path {
            // SAFETY: the feature was detected; the kernels read and write only inside `x`.
            Path::Avx512 => done = unsafe { exp_sub_sum_avx512(x, m, &mut lanes) },
            Path::Avx2 => done = unsafe { exp_sub_sum_avx2(x, m, &mut lanes) },
            Path::Portable => {}
        }
    }
    let _ = path;
    for (i, v) in x.iter_mut().enumerate().skip(done) {
        *v = exp(*v - m);
        lanes[i % LANES] += *v;
    }
    lanes.iter().sum()
}

/// `xᵢ ← exp(xᵢ − m)` for every element: [`exp_sub_sum`]'s values, without the sum.
pub fn exp_sub(x: &mut [f32], m: f32) {
    exp_sub_on(best(), x, m)
}

/// [`exp_sub`] on `path` (which the CPU must run).
fn exp_sub_on(path: Path, x: &mut [f32], m: f32) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    match path {
        // SAFETY: the feature was detected; the kernels read and write only inside `x`.
        Path::Avx512 => done = unsafe { exp_sub_avx512(x, m) },
        Path::Avx2 => done = unsafe { exp_sub_avx2(x, m) },
        Path::Portable => {}
    }
    let _ = path;
    for v in &mut x[done..] {
        *v = exp(*v - m);
    }
}

/// The portable path of [`exp_sub_sum`] (the reference the SIMD path is tested against).
pub fn exp_sub_sum_portable(x: &mut [f32], m: f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    for (i, v) in x.iter_mut().enumerate() {
        *v = exp(*v - m);
        lanes[i % LANES] += *v;
    }
    lanes.iter().sum()
}

/// Whole blocks of 16 elements and (for a finite `m`) the tail; the lane sums into `lanes`.
/// Returns the elements done.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sub_sum_avx2(x: &mut [f32], m: f32, lanes: &mut [f32; LANES]) -> usize {
    use std::arch::x86_64::*;
    let n = x.len() / LANES * LANES;
    let p = x.as_mut_ptr();
    let mv = _mm256_set1_ps(m);
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i < n {
        let a = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv));
        let b = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i + 8)), mv));
        _mm256_storeu_ps(p.add(i), a);
        _mm256_storeu_ps(p.add(i + 8), b);
        s0 = _mm256_add_ps(s0, a);
        s1 = _mm256_add_ps(s1, b);
        i += LANES;
    }
    let mut done = n;
    // The tail as one more block padded with −∞: exp(−∞ − m) = +0 for a finite `m`, and
    // adding +0 leaves a lane sum's bits unchanged, so the result is the portable one.
    if n < x.len() && m.is_finite() {
        let tail = &mut x[n..];
        let mut buf = [f32::NEG_INFINITY; LANES];
        buf[..tail.len()].copy_from_slice(tail);
        let q = buf.as_mut_ptr();
        let a = exp8(_mm256_sub_ps(_mm256_loadu_ps(q), mv));
        let b = exp8(_mm256_sub_ps(_mm256_loadu_ps(q.add(8)), mv));
        _mm256_storeu_ps(q, a);
        _mm256_storeu_ps(q.add(8), b);
        s0 = _mm256_add_ps(s0, a);
        s1 = _mm256_add_ps(s1, b);
        tail.copy_from_slice(&buf[..tail.len()]);
        done = x.len();
    }
    _mm256_storeu_ps(lanes.as_mut_ptr(), s0);
    _mm256_storeu_ps(lanes.as_mut_ptr().add(8), s1);
    done
}

/// Eight lanes of [`exp`], the same operations.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp8(v: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_max_ps(_mm256_min_ps(v, _mm256_set1_ps(HI)), _mm256_set1_ps(LO));
    let fx = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(LOG2E),
    ));
    let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(LN2_LO), r);
    let z = _mm256_mul_ps(r, r);
    let mut p = _mm256_set1_ps(P[0]);
    for &c in &P[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(p, z, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    let n = _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127));
    let y = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(n)));
    // Below LO: 0 (a NaN compares false and is put back next).
    let y = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(v, _mm256_set1_ps(LO)), y);
    _mm256_blendv_ps(y, v, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v))
}

/// Whole blocks of 8 of [`exp_sub`]; returns the elements done.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sub_avx2(x: &mut [f32], m: f32) -> usize {
    use std::arch::x86_64::*;
    let n = x.len() / 8 * 8;
    let p = x.as_mut_ptr();
    let mv = _mm256_set1_ps(m);
    let mut i = 0;
    while i < n {
        _mm256_storeu_ps(p.add(i), exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv)));
        i += 8;
    }
    n
}

/// Every element of [`exp_sub`] (the tail under a mask); returns the elements done.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_sub_avx512(x: &mut [f32], m: f32) -> usize {
    use std::arch::x86_64::*;
    let p = x.as_mut_ptr();
    let mv = _mm512_set1_ps(m);
    let mut i = 0;
    while i + LANES <= x.len() {
        _mm512_storeu_ps(
            p.add(i),
            exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), mv)),
        );
        i += LANES;
    }
    if i < x.len() {
        let k: __mmask16 = (1u16 << (x.len() - i)) - 1;
        let v = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(i)), mv));
        _mm512_mask_storeu_ps(p.add(i), k, v);
    }
    x.len()
}

/// [`exp_sub_sum_avx2`] sixteen lanes at a time: the same lane sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_sub_sum_avx512(x: &mut [f32], m: f32, lanes: &mut [f32; LANES]) -> usize {
    use std::arch::x86_64::*;
    let n = x.len() / LANES * LANES;
    let p = x.as_mut_ptr();
    let mv = _mm512_set1_ps(m);
    let mut s = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        let a = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), mv));
        _mm512_storeu_ps(p.add(i), a);
        s = _mm512_add_ps(s, a);
        i += LANES;
    }
    let mut done = n;
    // The tail padded with −∞ (as in the AVX2 path): +0 in the lanes past the end.
    if n < x.len() && m.is_finite() {
        let k: __mmask16 = (1u16 << (x.len() - n)) - 1;
        let v = _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), k, p.add(n));
        let a = exp16(_mm512_sub_ps(v, mv));
        _mm512_mask_storeu_ps(p.add(n), k, a);
        s = _mm512_add_ps(s, a);
        done = x.len();
    }
    _mm512_storeu_ps(lanes.as_mut_ptr(), s);
    done
}

/// Sixteen lanes of [`exp`], the same operations as [`exp8`].
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn exp16(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_max_ps(_mm512_min_ps(v, _mm512_set1_ps(HI)), _mm512_set1_ps(LO));
    let fx = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
    );
    let r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(LN2_LO), r);
    let z = _mm512_mul_ps(r, r);
    let mut p = _mm512_set1_ps(P[0]);
    for &c in &P[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let y = _mm512_fmadd_ps(p, z, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    let n = _mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127));
    let y = _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32::<23>(n)));
    // Below LO: 0 (a NaN compares false and is put back next).
    let y = _mm512_maskz_mov_ps(!_mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, _mm512_set1_ps(LO)), y);
    _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v), v)
}

/// `out[i] = σ(x[i]) = 1 / (1 + exp(−x[i]))` over the common length, with [`exp`] (the AVX2
/// path and the portable one give the same bits).
pub fn sigmoid(out: &mut [f32], x: &[f32]) {
    let n = out.len().min(x.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if n >= 8 && super::has_avx2_fma() {
        // SAFETY: AVX2 and FMA were detected; the kernel touches whole blocks of 8 inside both.
        done = unsafe { sigmoid_avx2(&mut out[..n], &x[..n]) };
    }
    for (o, &v) in out[done..n].iter_mut().zip(&x[done..n]) {
        *o = 1.0 / (1.0 + exp(-v));
    }
}

/// Whole blocks of 8; returns the elements done.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sigmoid_avx2(out: &mut [f32], x: &[f32]) -> usize {
    use std::arch::x86_64::*;
    let n = out.len() / 8 * 8;
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let v = _mm256_loadu_ps(x.as_ptr().add(i));
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), v));
        _mm256_storeu_ps(
            out.as_mut_ptr().add(i),
            _mm256_div_ps(one, _mm256_add_ps(one, e)),
        );
        i += 8;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm_and_handles_the_edges() {
        let mut x = -87.3f32;
        while x < 88.0 {
            let (a, b) = (exp(x), (x as f64).exp() as f32);
            let ulp = (a.to_bits() as i64 - b.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}) = {a}, want {b} ({ulp} ulp)");
            x += 0.0137;
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(1e30).is_finite() && exp(1e30) > 1e38);
    }

    /// The paths this CPU can run.
    fn paths() -> Vec<Path> {
        let mut v = vec![Path::Portable];
        if crate::kernels::has_avx2_fma() {
            v.push(Path::Avx2);
        }
        if crate::kernels::has_avx512f() {
            v.push(Path::Avx512);
        }
        v
    }

    #[test]
    fn the_row_paths_agree_bit_for_bit() {
        let mut rng = crate::rng::Rng::new(3);
        for len in [0, 1, 15, 16, 17, 33, 100, 4096 + 5] {
            let mut x = vec![0.0f32; len];
            rng.fill_normal(&mut x, 8.0);
            if len > 3 {
                x[1] = f32::NEG_INFINITY;
                x[2] = -200.0;
            }
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let (mut a, mut b) = (x.clone(), x.clone());
            let (sa, sb) = (exp_sub_sum(&mut a, m), exp_sub_sum_portable(&mut b, m));
            assert_eq!(sa.to_bits(), sb.to_bits(), "len {len}");
            assert!(
                a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                "len {len}"
            );
            // Every path this CPU runs, with and without the sum; a finite and a −∞ shift.
            for path in paths() {
                for shift in [m, f32::NEG_INFINITY] {
                    let (mut c, mut d, mut e) = (x.clone(), x.clone(), x.clone());
                    let sc = exp_sub_sum_on(path, &mut c, shift);
                    let sd = exp_sub_sum_on(Path::Portable, &mut d, shift);
                    exp_sub_on(path, &mut e, shift);
                    let same = |u: &[f32], v: &[f32]| {
                        u.iter().zip(v).all(|(p, q)| p.to_bits() == q.to_bits())
                    };
                    assert!(same(&c, &d) && same(&e, &d), "{path:?} len {len}");
                    assert!(
                        sc.to_bits() == sd.to_bits() || (sc.is_nan() && sd.is_nan()),
                        "{path:?} len {len}: {sc} vs {sd}"
                    );
                }
            }
            let want: f64 = x.iter().map(|&v| ((v - m) as f64).exp()).sum();
            assert!(
                (sa as f64 - want).abs() <= 1e-5 * want.max(1.0),
                "{sa} vs {want}"
            );
        }
        let mut x = vec![0.0f32; 37];
        rng.fill_normal(&mut x, 6.0);
        x[3] = -200.0;
        x[4] = 200.0;
        let (mut a, mut b) = (vec![0.0f32; 37], vec![0.0f32; 37]);
        sigmoid(&mut a, &x);
        for (o, &v) in b.iter_mut().zip(&x) {
            *o = 1.0 / (1.0 + exp(-v));
        }
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
        assert!(a
            .iter()
            .zip(&x)
            .all(|(s, &v)| (s - 1.0 / (1.0 + (-v).exp())).abs() < 1e-6));
        let mut nan = vec![0.0f32; 20];
        nan[17] = f32::NAN;
        assert!(exp_sub_sum(&mut nan, 0.0).is_nan());
    }
}
