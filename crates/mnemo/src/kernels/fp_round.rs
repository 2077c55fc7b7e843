//! Block round trips through FP8 `e4m3` and FP4 `e2m1` with power-of-two (ue8m0) scales: the
//! activation quantisers of DeepSeek's inference kernels (`act_quant`, `fp4_act_quant` with
//! `inplace=True`, i.e. quantise then dequantise), applied to f32 values in place.
//!
//! Per block `b` of `block` consecutive values of `x` (`x.len()` a multiple of `block`):
//!
//! ```text
//! FP8:  a = max(max|x_b|, 1e-4)        s = pow2ceil(a · (1/448))
//!       x_b ← e4m3(clamp(x_b / s, ±448)) · s          (e4m3: nearest, ties to even)
//! FP4:  a = max(max|x_b|, 6·2⁻¹²⁶)     s = pow2ceil(a · (1/6))
//!       x_b ← e2m1(clamp(x_b / s, ±6)) · s            (e2m1: nearest, ties to the even code)
//! ```
//!
//! `pow2ceil(v) = 2^k`, `k` = the exponent field of `v` − 127, plus one if any mantissa bit
//! is set: the kernels' `fast_round_scale` bit trick (the scale is `a` times the f32
//! reciprocal of the format's largest value, not `a` divided by it, as the kernels compute it).
//! Division by a power of two is exact, so the only roundings are the format casts.
//!
//! Scalar code: these run on a few vectors per token (KV rows, indexer queries and keys,
//! product inputs), far from the cost of the products they feed.

use super::fp8::{e4m3_to_f32, f32_to_e4m3, E2M1};

/// Largest finite `e4m3` value.
pub const FP8_MAX: f32 = 448.0;
/// Largest `e2m1` value.
pub const FP4_MAX: f32 = 6.0;

/// `2^ceil(log2 v)` of a positive finite `v` by its bits (module doc; a subnormal `v` gives
/// 2⁻¹²⁶ as the kernels' trick does).
#[inline]
pub fn pow2_ceil(v: f32) -> f32 {
    let b = v.to_bits();
    let k = ((b >> 23) & 0xff) as i32 - 127 + i32::from(b & 0x7f_ffff != 0);
    f32::from_bits(((k.clamp(-126, 127) + 127) as u32) << 23)
}

/// `v` (|v| ≤ 448) rounded to the nearest `e4m3` value, ties to even.
#[inline]
pub fn e4m3_round(v: f32) -> f32 {
    e4m3_to_f32(f32_to_e4m3(v))
}

/// `v` (|v| ≤ 6) rounded to the nearest `e2m1` value, ties to the even code (0.25 → 0,
/// 0.75 → 1, 1.25 → 1, 1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4), sign kept.
#[inline]
pub fn e2m1_round(v: f32) -> f32 {
    let a = v.abs();
    // Code c is reached when a passes the midpoint below it: strictly where the code below
    // is the even one (ties go down), inclusively where it is odd (ties go up).
    let code = usize::from(a > 0.25)
        + usize::from(a >= 0.75)
        + usize::from(a > 1.25)
        + usize::from(a >= 1.75)
        + usize::from(a > 2.5)
        + usize::from(a >= 3.5)
        + usize::from(a > 5.0);
    let m = E2M1[code];
    if v.is_sign_negative() {
        -m
    } else {
        m
    }
}

/// FP8 `e4m3` round trip of `x` in blocks of `block` (module doc).
pub fn fp8_round_trip(x: &mut [f32], block: usize) {
    assert!(
        block > 0 && x.len().is_multiple_of(block),
        "FP8 round trip: {} values are not whole blocks of {block}",
        x.len()
    );
    for xb in x.chunks_exact_mut(block) {
        let a = xb.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-4);
        let s = pow2_ceil(a * (1.0 / FP8_MAX));
        for v in xb.iter_mut() {
            *v = e4m3_round((*v / s).clamp(-FP8_MAX, FP8_MAX)) * s;
        }
    }
}

/// FP4 `e2m1` round trip of `x` in blocks of `block` (module doc).
pub fn fp4_round_trip(x: &mut [f32], block: usize) {
    assert!(
        block > 0 && x.len().is_multiple_of(block),
        "FP4 round trip: {} values are not whole blocks of {block}",
        x.len()
    );
    for xb in x.chunks_exact_mut(block) {
        let a = xb
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()))
            .max(FP4_MAX * 2f32.powi(-126));
        let s = pow2_ceil(a * (1.0 / FP4_MAX));
        for v in xb.iter_mut() {
            *v = e2m1_round((*v / s).clamp(-FP4_MAX, FP4_MAX)) * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fp8::{dequant_fp4, dequant_fp8, quantize_fp4, quantize_fp8};

    fn rand_rows(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                // magnitudes over several octaves per block
                u * 2f32.powi((i % 7) as i32 - 3)
            })
            .collect()
    }

    #[test]
    fn pow2_ceil_is_the_next_power_of_two() {
        assert_eq!(pow2_ceil(1.0), 1.0);
        assert_eq!(pow2_ceil(1.0 + f32::EPSILON), 2.0);
        assert_eq!(pow2_ceil(0.75), 1.0);
        assert_eq!(pow2_ceil(0.5), 0.5);
        assert_eq!(pow2_ceil(3e-7), 2f32.powi(-21));
        // 449/448 just above 1: scale 2.
        assert_eq!(pow2_ceil(449.0 * (1.0 / FP8_MAX)), 2.0);
    }

    #[test]
    fn fp8_round_trip_rounds_ties_to_even_and_clamps() {
        // Block max 448: scale 1. 1 + 1/16 is halfway between 1 and 1.125: to 1 (even);
        // 1.1875 halfway between 1.125 and 1.25: to 1.25 (even).
        let mut x = vec![0.0f32; 64];
        x[..4].copy_from_slice(&[448.0, 1.0625, 1.1875, -3.0]);
        fp8_round_trip(&mut x, 64);
        assert_eq!(&x[..4], &[448.0, 1.0, 1.25, -3.0]);
        // amax 449: scale 2, 449/2 = 224.5 → 224 → 448.
        let mut x = vec![0.0f32; 64];
        x[..2].copy_from_slice(&[449.0, 3.0]);
        fp8_round_trip(&mut x, 64);
        assert_eq!(&x[..2], &[448.0, 3.0]);
        // An all-zero block stays zero (amax clamped to 1e-4).
        let mut z = vec![0.0f32; 128];
        fp8_round_trip(&mut z, 128);
        assert!(z.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn fp8_round_trip_equals_the_weight_quantiser() {
        // The weight quantiser (`fp8::quantize_fp8`, exact scale search, one row per block
        // row) and the dequantiser give the same values on random rows of mixed octaves.
        let (rows, cols) = (5, 256);
        let w = rand_rows(rows * cols, 7);
        let (q, e) = quantize_fp8(&w, rows, cols, [1, 64]);
        let sc: Vec<f32> = e.iter().map(|&b| 2f32.powi(b as i32 - 127)).collect();
        let want = dequant_fp8(&q, &sc, rows, cols, [1, 64]);
        let mut got = w.clone();
        fp8_round_trip(&mut got, 64);
        assert_eq!(got, want);
    }

    #[test]
    fn fp4_round_trip_rounds_ties_to_the_even_code() {
        let mut x = vec![0.0f32; 32];
        x[..10].copy_from_slice(&[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.3]);
        fp4_round_trip(&mut x, 32);
        assert_eq!(
            &x[..10],
            &[6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, -0.5]
        );
        // Every e2m1 value is a fixed point; just off a midpoint goes to the nearer side.
        for (c, &v) in E2M1.iter().enumerate() {
            assert_eq!(e2m1_round(v), v, "code {c}");
        }
        assert_eq!(e2m1_round(0.2500001), 0.5);
        assert_eq!(e2m1_round(0.7499999), 0.5);
    }

    #[test]
    fn fp4_round_trip_equals_the_weight_quantiser() {
        let (rows, cols) = (6, 128);
        let w = rand_rows(rows * cols, 11);
        let (p, e) = quantize_fp4(&w, rows, cols, 32);
        let sc: Vec<f32> = e.iter().map(|&b| 2f32.powi(b as i32 - 127)).collect();
        let want = dequant_fp4(&p, &sc, rows, cols, 32);
        let mut got = w.clone();
        fp4_round_trip(&mut got, 32);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(a.abs(), b.abs(), "{i}: {} -> {a} vs {b}", w[i]);
        }
    }

    #[test]
    #[should_panic(expected = "not whole blocks")]
    fn partial_blocks_are_refused() {
        fp8_round_trip(&mut [1.0; 65], 64);
    }
}
