//! Activation round trips of ggml's CPU matrix products: before `y = W·x` with a quantised
//! `W`, ggml converts `x` to the weight type's `vec_dot_type` and multiplies in that form.
//! Applied to `x` in f32 (quantise, then dequantise) before mnemo's f32 product on the
//! dequantised `W`, it gives llama.cpp's products up to the f32 summation order (the integer
//! block sums are exact, `W`'s values are the same).
//!
//! - `Q8_0` (the `vec_dot_type` of `MXFP4`, `Q8_0`, `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `IQ4_NL`),
//!   per block of 32 as `quantize_row_q8_0`'s AVX path: `a = max|x|`, `d = f16(a/127)`,
//!   `q = round_even(x·127/a)`, `x' = q·d` (all zero when `a = 0`).
//! - `Q8_K` (that of `Q2_K` … `Q6_K`), per block of 256 as `quantize_row_q8_K_ref`
//!   ([`super::kdot::quantize_q8k`]): `m` the value of largest magnitude, `d = m/−127`,
//!   `q = min(round_even(x/d), 127)`, `x' = q·d`.
//!
//! - `F16` / `BF16` (the `vec_dot_type` of F16 / BF16 weights): each value rounded to the
//!   nearest f16 / bf16 (ties to even); the products of those values are exact in f32.
//!
//! - `Fp8` (DeepSeek's official `act_quant(x, 128, "ue8m0")` before each FP8/FP4 weight
//!   product, `--numerics official`): the FP8 `e4m3` round trip of every block of 128 with a
//!   power-of-two scale ([`super::fp_round::fp8_round_trip`]).
//!
//! Shapes: `x` is any number of rows of a length that is a multiple of the block (32 / 256),
//! blocks never straddling rows; a length that is not is left as it is (ggml refuses such
//! products).

use super::kdot::{quantize_q8k, QK_K};

/// The `vec_dot_type` an activation is converted to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActQuant {
    Q8_0,
    Q8K,
    F16,
    Bf16,
    /// FP8 `e4m3`, one power-of-two scale per 128 values (not a ggml type: DeepSeek's).
    Fp8,
}

impl ActQuant {
    /// The activation type ggml uses for weights of ggml type `t` (`None`: products in f32,
    /// or a type whose conversion is not simulated).
    pub fn for_weight_type(t: u32) -> Option<ActQuant> {
        match t {
            1 => Some(ActQuant::F16),
            30 => Some(ActQuant::Bf16),
            2 | 3 | 6 | 7 | 8 | 20 | 39 => Some(ActQuant::Q8_0),
            10..=14 => Some(ActQuant::Q8K),
            _ => None,
        }
    }

    /// Round `x` through this type in place (module doc).
    pub fn round_trip(self, x: &mut [f32]) {
        match self {
            ActQuant::F16 => x.iter_mut().for_each(|v| *v = f16_round(*v)),
            ActQuant::Bf16 => x.iter_mut().for_each(|v| *v = super::bf16::round_bf16(*v)),
            ActQuant::Q8_0 => q8_0_round_trip(x),
            ActQuant::Fp8 => {
                if x.len().is_multiple_of(128) {
                    super::fp_round::fp8_round_trip(x, 128)
                }
            }
            ActQuant::Q8K => {
                if x.len().is_multiple_of(QK_K) {
                    let q = quantize_q8k(x);
                    for (b, xb) in x.chunks_exact_mut(QK_K).enumerate() {
                        for (v, &qi) in xb.iter_mut().zip(&q.qs[b * QK_K..(b + 1) * QK_K]) {
                            *v = qi as f32 * q.d[b];
                        }
                    }
                }
            }
        }
    }
}

/// `x` (rows of `width`) as a product with a weight of rounding `q` reads it: borrowed when
/// `q` is `None`, else a copy with every row rounded ([`ActQuant::round_trip`]).
pub fn rounded_rows(q: Option<ActQuant>, x: &[f32], width: usize) -> std::borrow::Cow<'_, [f32]> {
    match q {
        None => std::borrow::Cow::Borrowed(x),
        Some(q) => {
            let mut v = x.to_vec();
            v.chunks_exact_mut(width).for_each(|r| q.round_trip(r));
            std::borrow::Cow::Owned(v)
        }
    }
}

/// `x` rounded to the nearest f16 (ties to even), as an f32.
pub fn f16_round(x: f32) -> f32 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let b = x.to_bits();
    let exp = ((b >> 23) & 0xff) as i32 - 127;
    if exp >= -14 {
        // Normal f16: keep 10 of the 23 mantissa bits (a carry may bump the exponent).
        let lsb = (b >> 13) & 1;
        f32::from_bits((b + 0x0fff + lsb) & !0x1fff)
    } else {
        let q = 2f32.powi(-24); // the f16 subnormal step
        (x / q).round_ties_even() * q
    }
}

/// `Q8_0` round trip of `x` in place (module doc).
pub fn q8_0_round_trip(x: &mut [f32]) {
    if !x.len().is_multiple_of(32) {
        return;
    }
    for xb in x.chunks_exact_mut(32) {
        let a = xb.iter().fold(0.0f32, |m, &t| m.max(t.abs()));
        if a == 0.0 {
            xb.fill(0.0);
            continue;
        }
        let d = f16_round(a / 127.0);
        let id = 127.0 / a;
        for v in xb.iter_mut() {
            *v = (*v * id).round_ties_even() * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::f16::f16_to_f32;

    #[test]
    fn f16_rounding_matches_the_f16_grid() {
        // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to even (1); just above rounds up.
        assert_eq!(f16_round(1.0 + 2f32.powi(-11)), 1.0);
        assert_eq!(
            f16_round(1.0 + 2f32.powi(-11) + 2f32.powi(-20)),
            1.0 + 2f32.powi(-10)
        );
        assert_eq!(
            f16_round(1.0 + 3.0 * 2f32.powi(-11)),
            1.0 + 2.0 * 2f32.powi(-10)
        );
        // Every rounded value is an f16 (read back through the decoder), and the nearest one.
        for i in 0..2000 {
            let x = (i as f32 * 0.7319).sin() * 10f32.powi(i % 9 - 6);
            let r = f16_round(x);
            let bits = {
                let s = (r.to_bits() >> 16) & 0x8000;
                let a = r.abs();
                if a < 2f32.powi(-14) {
                    s | (a / 2f32.powi(-24)) as u32
                } else {
                    let e = ((a.to_bits() >> 23) & 0xff) - 127 + 15;
                    s | (e << 10) | ((a.to_bits() >> 13) & 0x3ff)
                }
            };
            let back = f16_to_f32(&(bits as u16).to_le_bytes());
            assert_eq!(back, r, "{x}");
            let step = if r.abs() < 2f32.powi(-14) {
                2f32.powi(-24)
            } else {
                2f32.powi(((r.abs().to_bits() >> 23) & 0xff) as i32 - 127 - 10)
            };
            assert!((x - r).abs() <= step / 2.0 * 1.0001, "{x} -> {r}");
        }
    }

    #[test]
    fn q8_0_round_trip_is_ggmls() {
        // One block: max 2.54 → d = f16(0.02), q = round_even(x·127/2.54) = round_even(50 x).
        let mut x: Vec<f32> = (0..32).map(|i| (i as f32 - 15.5) * 0.16).collect();
        x[0] = -2.54;
        let want: Vec<f32> = x
            .iter()
            .map(|&v| (v * (127.0 / 2.54)).round_ties_even() * f16_round(2.54 / 127.0))
            .collect();
        q8_0_round_trip(&mut x);
        assert_eq!(x, want);
        assert!(x.iter().all(|v| (v / f16_round(0.02)).fract().abs() < 1e-4));
        // A zero block stays zero; a length off the block grid is left alone.
        let mut z = vec![0.0f32; 32];
        q8_0_round_trip(&mut z);
        assert!(z.iter().all(|&v| v == 0.0));
        let mut odd = vec![0.3f32; 33];
        q8_0_round_trip(&mut odd);
        assert!(odd.iter().all(|&v| v == 0.3));
    }

    #[test]
    fn q8k_round_trip_rounds_to_the_block_grid() {
        let mut x: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let orig = x.clone();
        ActQuant::Q8K.round_trip(&mut x);
        let m = orig
            .iter()
            .fold(0.0f32, |a, &t| if t.abs() > a.abs() { t } else { a });
        let d = 1.0 / (-127.0 / m);
        for (a, b) in x.iter().zip(&orig) {
            assert!((a - b).abs() <= d.abs() / 2.0 * 1.001, "{a} {b}");
        }
        assert_eq!(ActQuant::for_weight_type(39), Some(ActQuant::Q8_0));
        assert_eq!(ActQuant::for_weight_type(10), Some(ActQuant::Q8K));
        assert_eq!(ActQuant::for_weight_type(1), Some(ActQuant::F16));
        assert_eq!(ActQuant::for_weight_type(30), Some(ActQuant::Bf16));
        assert_eq!(ActQuant::for_weight_type(0), None, "F32: products in f32");
        // F16 / BF16: each value to the nearest half / bfloat (ties to even).
        let mut h = vec![1.0 + 1.0 / 4096.0, 1.0 + 3.0 / 4096.0, 65504.0, 1e-8];
        ActQuant::F16.round_trip(&mut h);
        assert_eq!(h, [1.0, 1.0 + 4.0 / 4096.0, 65504.0, 0.0]);
        let mut b = vec![1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0];
        ActQuant::Bf16.round_trip(&mut b);
        assert_eq!(b, [1.0, 1.0 + 4.0 / 256.0]);
    }
}
