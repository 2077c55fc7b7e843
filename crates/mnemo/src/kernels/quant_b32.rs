//! Quantisation of f32 values into the 32-value GGUF block formats (`Q4_0`, `Q4_1`, `Q5_0`,
//! `Q5_1`, `Q8_0`; layouts in [`super::kquant`] and `io/gguf`): ggml's reference
//! `quantize_row_*_ref`, which `llama-quantize` runs when no importance matrix is given.
//! Each function takes a multiple of 32 values and appends whole blocks to `out`.
//!
//! Per block of 32 values `x`:
//! - `Q8_0`: `d = max|x|/127`, `q = round(x/d)` (half away from zero), `x ≈ d·q`.
//! - `Q4_0` / `Q5_0`: `d = v/−8` (`v/−16`) with `v` the value of largest magnitude,
//!   `q = min(15, trunc(x/d + 8.5))` (31, `+16.5`), `x ≈ d·(q − 8)` (`− 16`).
//! - `Q4_1` / `Q5_1`: `d = (max − min)/15` (`/31`), `q = trunc((x − min)/d + 0.5)`,
//!   `x ≈ d·q + min`.
//!
//! `1/d` is taken once per block and multiplied in (not a division per value), scales are
//! rounded to f16 after use, exactly as ggml does, so the bytes equal ggml's.

use super::f16::f32_to_f16_bits;

fn push_f16(out: &mut Vec<u8>, x: f32) {
    out.extend_from_slice(&f32_to_f16_bits(x).to_le_bytes());
}

/// The value of largest magnitude (the first on ties) and that magnitude.
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// C's `(int8_t)(float)` then `(uint8_t)`: truncation toward zero, wrapped to a byte (the
/// values here are in 0..=32, where it is plain truncation).
#[inline]
fn trunc_u8(v: f32) -> u8 {
    v as i32 as u8
}

/// `Q8_0`: 34-byte blocks.
pub fn quantize_q8_0(x: &[f32], out: &mut Vec<u8>) {
    for b in x.chunks_exact(32) {
        let amax = b.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        push_f16(out, d);
        out.extend(b.iter().map(|&v| (v * id).round() as i8 as u8));
    }
}

/// `Q4_0`: 18-byte blocks.
pub fn quantize_q4_0(x: &[f32], out: &mut Vec<u8>) {
    for b in x.chunks_exact(32) {
        let (max, _) = signed_absmax(b);
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        push_f16(out, d);
        for j in 0..16 {
            let q0 = trunc_u8(b[j] * id + 8.5).min(15);
            let q1 = trunc_u8(b[j + 16] * id + 8.5).min(15);
            out.push(q0 | (q1 << 4));
        }
    }
}

/// `Q4_1`: 20-byte blocks.
pub fn quantize_q4_1(x: &[f32], out: &mut Vec<u8>) {
    for b in x.chunks_exact(32) {
        let (min, max) = min_max(b);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        push_f16(out, d);
        push_f16(out, min);
        for j in 0..16 {
            let q0 = trunc_u8((b[j] - min) * id + 0.5).min(15);
            let q1 = trunc_u8((b[j + 16] - min) * id + 0.5).min(15);
            out.push(q0 | (q1 << 4));
        }
    }
}

/// Low nibbles and the 32 fifth bits of 32 five-bit values (the `Q5_0`/`Q5_1` layout).
fn push_q5(out: &mut Vec<u8>, q: &[u8; 32]) {
    let mut qh = 0u32;
    for (j, &v) in q.iter().enumerate() {
        qh |= (((v & 0x10) >> 4) as u32) << j;
    }
    out.extend_from_slice(&qh.to_le_bytes());
    for j in 0..16 {
        out.push((q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4));
    }
}

/// `Q5_0`: 22-byte blocks.
pub fn quantize_q5_0(x: &[f32], out: &mut Vec<u8>) {
    for b in x.chunks_exact(32) {
        let (max, _) = signed_absmax(b);
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        push_f16(out, d);
        let mut q = [0u8; 32];
        for (qj, &v) in q.iter_mut().zip(b) {
            *qj = trunc_u8(v * id + 16.5).min(31);
        }
        push_q5(out, &q);
    }
}

/// `Q5_1`: 24-byte blocks.
pub fn quantize_q5_1(x: &[f32], out: &mut Vec<u8>) {
    for b in x.chunks_exact(32) {
        let (min, max) = min_max(b);
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        push_f16(out, d);
        push_f16(out, min);
        let mut q = [0u8; 32];
        for (qj, &v) in q.iter_mut().zip(b) {
            *qj = trunc_u8((v - min) * id + 0.5);
        }
        push_q5(out, &q);
    }
}
