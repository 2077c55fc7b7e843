//! Half-precision numbers: IEEE binary16 (`f16`, GGUF scales and tensors, safetensors `F16`)
//! and bfloat16 (`bf16`, safetensors `BF16`), read from 2 little-endian bytes as f32. Both
//! conversions are exact.

/// An IEEE half-precision number (2 little-endian bytes) as f32; subnormals, infinities and
/// NaNs included.
#[inline]
pub fn f16_to_f32(b: &[u8]) -> f32 {
    let h = u16::from_le_bytes([b[0], b[1]]) as u32;
    let sign = (h >> 15) << 31;
    let exp = (h >> 10) & 0x1f;
    let man = h & 0x3ff;
    let bits = if exp == 0 {
        if man == 0 {
            sign
        } else {
            // Subnormal: normalise.
            let mut e = 127 - 15 + 1;
            let mut m = man;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((m & 0x3ff) << 13)
        }
    } else if exp == 31 {
        sign | 0x7f80_0000 | (man << 13)
    } else {
        sign | ((exp + 127 - 15) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

/// A bfloat16 number (2 little-endian bytes) as f32: the high half of the f32's bits.
#[inline]
pub fn bf16_to_f32(b: &[u8]) -> f32 {
    f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
}

/// f32 → IEEE half-precision bits, rounded to nearest (ties to even), subnormals kept,
/// overflow to infinity, NaN to the quiet NaN `0x7e00`: ggml's `ggml_compute_fp32_to_fp16`
/// (the FP16 library's branch-free form), step for step, so GGUF block scales written here
/// equal ggml's bit for bit.
#[inline]
pub fn f32_to_f16_bits(f: f32) -> u16 {
    let scale_to_inf = f32::from_bits(0x7780_0000); // 2^112
    let scale_to_zero = f32::from_bits(0x0880_0000); // 2^-110
    let mut base = (f.abs() * scale_to_inf) * scale_to_zero;
    let w = f.to_bits();
    let shl1_w = w.wrapping_add(w);
    let sign = w & 0x8000_0000;
    let bias = (shl1_w & 0xff00_0000).max(0x7100_0000);
    base += f32::from_bits((bias >> 1) + 0x0780_0000);
    let bits = base.to_bits();
    let exp_bits = (bits >> 13) & 0x0000_7c00;
    let mantissa_bits = bits & 0x0000_0fff;
    let nonsign = exp_bits + mantissa_bits;
    ((sign >> 16)
        | if shl1_w > 0xff00_0000 {
            0x7e00
        } else {
            nonsign
        }) as u16
}

/// f32 → bfloat16 bits, rounded to nearest (ties to even), NaN kept quiet: ggml's
/// `ggml_compute_fp32_to_bf16`.
#[inline]
pub fn f32_to_bf16_bits(f: f32) -> u16 {
    let u = f.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

/// f32 → f16 bytes for the normal range, mantissa truncated (tiny values flush to zero, large
/// ones saturate the exponent): enough to build quantised test matrices.
#[cfg(test)]
pub(crate) fn f32_to_f16_truncated(x: f32) -> [u8; 2] {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let e = ((b >> 23) & 0xff) as i32 - 127 + 15;
    let v = if e <= 0 {
        sign
    } else {
        sign | ((e.min(30) as u16) << 10) | ((b >> 13) & 0x3ff) as u16
    };
    v.to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_values() {
        assert_eq!(f16_to_f32(&0x3c00u16.to_le_bytes()), 1.0);
        assert_eq!(f16_to_f32(&0xc000u16.to_le_bytes()), -2.0);
        assert_eq!(f16_to_f32(&0x0001u16.to_le_bytes()), 2f32.powi(-24));
        assert_eq!(f16_to_f32(&0x7bffu16.to_le_bytes()), 65504.0);
        assert_eq!(f16_to_f32(&0xfc00u16.to_le_bytes()), f32::NEG_INFINITY);
        assert!(f16_to_f32(&0x7e00u16.to_le_bytes()).is_nan());
        assert_eq!(
            f16_to_f32(&0x8000u16.to_le_bytes()).to_bits(),
            (-0.0f32).to_bits()
        );
        for x in [1.0f32, -2.5, 0.0625, 1000.0] {
            assert_eq!(f16_to_f32(&f32_to_f16_truncated(x)), x);
        }
    }

    #[test]
    fn bf16_values() {
        assert_eq!(bf16_to_f32(&0x3f80u16.to_le_bytes()), 1.0);
        assert_eq!(bf16_to_f32(&0xc020u16.to_le_bytes()), -2.5);
        assert_eq!(bf16_to_f32(&0x7f80u16.to_le_bytes()), f32::INFINITY);
    }
}
