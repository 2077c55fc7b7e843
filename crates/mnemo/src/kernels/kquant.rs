//! Dequantisation to f32 of the GGUF block formats that llama.cpp's quantisation mixes
//! (`Q4_K_M`, `Q5_K_S`, `Q3_K_L`, `IQ4_NL`, …) use beside the 32-value types that
//! [`super::quant`] multiplies directly (`Q4_0`, `Q4_1`, `Q8_0`; see `io/gguf/`).
//!
//! Each format is a run of fixed-size blocks; the byte layouts and formulas below are
//! ggml's (`ggml-quants.c`, `dequantize_row_*`). All integers are little-endian; `f16` is an
//! IEEE half-precision scale. Products are evaluated exactly in the order written (each a
//! separate f32 rounding, no fused multiply-add), as ggml's reference code does, so results
//! are bit-identical to it.
//!
//! 32-value blocks:
//! - `Q5_0` (22 bytes): `d: f16`, `qh: u32`, `qs: [u8; 16]`. Element `j < 16` is the low
//!   nibble of `qs[j]`, element `j + 16` its high nibble; bit `i` of `qh` is bit 4 of element
//!   `i`. `x = d · (q − 16)`.
//! - `Q5_1` (24 bytes): `d: f16`, `m: f16`, `qh`, `qs` as `Q5_0`. `x = d · q + m`.
//! - `IQ4_NL` (18 bytes): `d: f16`, `qs: [u8; 16]` nibbles as `Q4_0`, each an index into a
//!   fixed non-linear table of 16 `i8` levels `K`. `x = d · K[q]`.
//!
//! 256-value "k-quant" super-blocks, split into sub-blocks of 16 or 32 values with their own
//! scales (and minimums). Within a 128-value half, 2-bit fields are packed four to a byte
//! (element `32·s + l` of the half is bits `2s..2s+2` of the half's byte `l`), 4-bit fields two to a byte
//! (element `32·s + l` of a 64-value chunk is nibble `s` of byte `l`), and single high bits
//! one per byte of a 32-byte mask (element `e` is bit `e / 32` of byte `e mod 32`):
//! - `Q2_K` (84 bytes): `scales: [u8; 16]` (one per 16 values: low nibble scale `s`, high
//!   nibble minimum `m`), `qs: [u8; 64]` 2-bit, `d: f16`, `dmin: f16`.
//!   `x = (d · s) · q − (dmin · m)`.
//! - `Q3_K` (110 bytes): `hmask: [u8; 32]` (bit 2 of each value), `qs: [u8; 64]` (bits 0..2),
//!   `scales: [u8; 12]` (sixteen 6-bit signed scales: low nibbles of bytes 0..8 for scales
//!   0..8, their high nibbles for 8..16, the top two bits of scale `j` in bits `2(j / 4)` of
//!   byte `8 + j mod 4`; stored `+ 32`), `d: f16`. The high bit *clear* subtracts 4:
//!   `x = (d · (sc − 32)) · (q_low − 4·(1 − h))`.
//! - `Q4_K` (144 bytes): `d: f16`, `dmin: f16`, `scales: [u8; 12]` (eight 6-bit scales `s`
//!   and minimums `m`, one per 32 values: for `j < 4`, `s = b[j] & 63`, `m = b[j+4] & 63`;
//!   for `j ≥ 4`, the low 4 bits from the nibbles of `b[j+4]` and the top two from bits 6..8
//!   of `b[j−4]` and `b[j]`), `qs: [u8; 128]` 4-bit. `x = (d · s) · q − (dmin · m)`.
//! - `Q5_K` (176 bytes): `d`, `dmin`, `scales` as `Q4_K`, `qh: [u8; 32]` (bit 4 of each
//!   value), `qs: [u8; 128]` (bits 0..4). Same formula with 5-bit `q`.
//! - `Q6_K` (210 bytes): `ql: [u8; 128]` (bits 0..4; element `64·s + k` of a 128-value half
//!   is nibble `s` of the half's byte `k`), `qh: [u8; 64]` (bits 4..6, 2-bit packed),
//!   `scales: [i8; 16]` (one per 16 values), `d: f16`. `x = (d · sc) · (q − 32)`.
//! - `Q8_K` (292 bytes; llama.cpp's intermediate for dot products, rarely stored): `d: f32`,
//!   `qs: [i8; 256]`, `bsums: [i16; 16]` (unused here). `x = d · q`.
//!
//! - `MXFP4` (17 bytes; the routed experts of a `deepseek4` GGUF): `e: u8` (E8M0),
//!   `qs: [u8; 16]`, low nibbles elements 0..16, high 16..32.
//!   `x = 2^(e−128) · L[q]`, `L` the e2m1 values doubled (`0, 1, 2, 3, 4, 6, 8, 12` and
//!   their negatives; code 8 is −0).
//!
//! And `BF16` (2 bytes a value): the high half of an f32's bits; `I32` (4 bytes, the hash
//! routing tables of `deepseek4` GGUFs) as f32 (exact below 2^24).

use super::f16::{bf16_to_f32, f16_to_f32};
use rayon::prelude::*;

/// One block format: its ggml type id, name, and block geometry.
pub struct BlockFormat {
    pub ggml_type: u32,
    pub name: &'static str,
    /// Values per block.
    pub block_elems: usize,
    /// Bytes per block.
    pub block_bytes: usize,
    /// Dequantise one block (`block_bytes` in, `block_elems` out).
    block: fn(&[u8], &mut [f32]),
}

/// Every format of this module.
pub const FORMATS: &[BlockFormat] = &[
    fmt(6, "Q5_0", 32, 22, q5_0),
    fmt(7, "Q5_1", 32, 24, q5_1),
    fmt(10, "Q2_K", 256, 84, q2_k),
    fmt(11, "Q3_K", 256, 110, q3_k),
    fmt(12, "Q4_K", 256, 144, q4_k),
    fmt(13, "Q5_K", 256, 176, q5_k),
    fmt(14, "Q6_K", 256, 210, q6_k),
    fmt(15, "Q8_K", 256, 292, q8_k),
    fmt(20, "IQ4_NL", 32, 18, iq4_nl),
    fmt(30, "BF16", 1, 2, bf16),
    fmt(39, "MXFP4", 32, 17, mxfp4),
    fmt(26, "I32", 1, 4, i32_value),
];

const fn fmt(
    ggml_type: u32,
    name: &'static str,
    block_elems: usize,
    block_bytes: usize,
    block: fn(&[u8], &mut [f32]),
) -> BlockFormat {
    BlockFormat {
        ggml_type,
        name,
        block_elems,
        block_bytes,
        block,
    }
}

/// The format of ggml type `t`, if this module handles it.
pub fn format(t: u32) -> Option<&'static BlockFormat> {
    FORMATS.iter().find(|f| f.ggml_type == t)
}

impl BlockFormat {
    /// Bytes of `n` values, `None` unless `n` is a whole number of blocks.
    pub fn byte_len(&self, n: usize) -> Option<usize> {
        n.is_multiple_of(self.block_elems)
            .then(|| n / self.block_elems * self.block_bytes)
    }

    /// [`Self::dequantize`] on the calling thread (for one row at a time).
    pub(crate) fn dequantize_seq(&self, b: &[u8], out: &mut [f32]) {
        assert_eq!(Some(b.len()), self.byte_len(out.len()));
        for (o, b) in out
            .chunks_exact_mut(self.block_elems)
            .zip(b.chunks_exact(self.block_bytes))
        {
            (self.block)(b, o);
        }
    }

    /// Dequantise whole blocks: `b` holds `out.len() / block_elems` blocks (in parallel over
    /// runs of blocks). Panics if the lengths disagree.
    pub fn dequantize(&self, b: &[u8], out: &mut [f32]) {
        assert_eq!(
            Some(b.len()),
            self.byte_len(out.len()),
            "{}: byte and value counts disagree",
            self.name
        );
        let per_task = (8192 / self.block_elems).max(1);
        out.par_chunks_mut(per_task * self.block_elems)
            .zip(b.par_chunks(per_task * self.block_bytes))
            .for_each(|(o, b)| {
                for (o, b) in o
                    .chunks_exact_mut(self.block_elems)
                    .zip(b.chunks_exact(self.block_bytes))
                {
                    (self.block)(b, o);
                }
            });
    }
}

/// `IQ4_NL`'s 16 levels.
pub(crate) const IQ4_NL_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The 5-bit values of a `Q5_0`/`Q5_1` block (`qh`, `qs`).
fn q5_values(qh: u32, qs: &[u8]) -> [u8; 32] {
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = (qs[j] & 15) | ((((qh >> j) & 1) as u8) << 4);
        q[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    q
}

fn q5_0(b: &[u8], o: &mut [f32]) {
    let d = f16_to_f32(&b[0..2]);
    let q = q5_values(le_u32(&b[2..6]), &b[6..22]);
    for (x, &q) in o.iter_mut().zip(&q) {
        *x = d * (q as i32 - 16) as f32;
    }
}

fn q5_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (f16_to_f32(&b[0..2]), f16_to_f32(&b[2..4]));
    let q = q5_values(le_u32(&b[4..8]), &b[8..24]);
    for (x, &q) in o.iter_mut().zip(&q) {
        *x = d * q as f32 + m;
    }
}

fn iq4_nl(b: &[u8], o: &mut [f32]) {
    let d = f16_to_f32(&b[0..2]);
    for (j, &q) in b[2..18].iter().enumerate() {
        o[j] = d * IQ4_NL_LEVELS[(q & 15) as usize] as f32;
        o[j + 16] = d * IQ4_NL_LEVELS[(q >> 4) as usize] as f32;
    }
}

/// Bits `2s..2s+2` of the 2-bit packing: element `e` of a 256-value block.
fn two_bits(qs: &[u8], e: usize) -> u8 {
    let (half, s, l) = (e / 128, (e % 128) / 32, e % 32);
    (qs[half * 32 + l] >> (2 * s)) & 3
}

/// The 4-bit packing: element `e` of a 256-value block.
fn nibble(qs: &[u8], e: usize) -> u8 {
    let (chunk, s, l) = (e / 64, (e % 64) / 32, e % 32);
    (qs[chunk * 32 + l] >> (4 * s)) & 15
}

/// The one-bit-per-byte mask: element `e` of a 256-value block.
fn high_bit(mask: &[u8], e: usize) -> u8 {
    (mask[e % 32] >> (e / 32)) & 1
}

fn q2_k(b: &[u8], o: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_to_f32(&b[80..82]), f16_to_f32(&b[82..84]));
    for (e, x) in o.iter_mut().enumerate() {
        let sc = scales[e / 16];
        let (dl, ml) = (d * (sc & 15) as f32, dmin * (sc >> 4) as f32);
        *x = dl * two_bits(qs, e) as f32 - ml;
    }
}

/// `Q3_K`'s sixteen 6-bit scales, offset removed.
fn q3_k_scales(s: &[u8]) -> [i32; 16] {
    let mut out = [0i32; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let low = if j < 8 { s[j] & 15 } else { s[j - 8] >> 4 };
        let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = (low | (high << 4)) as i32 - 32;
    }
    out
}

fn q3_k(b: &[u8], o: &mut [f32]) {
    let (hmask, qs) = (&b[0..32], &b[32..96]);
    let scales = q3_k_scales(&b[96..108]);
    let d = f16_to_f32(&b[108..110]);
    for (e, x) in o.iter_mut().enumerate() {
        let dl = d * scales[e / 16] as f32;
        let q = two_bits(qs, e) as i32 - if high_bit(hmask, e) == 1 { 0 } else { 4 };
        *x = dl * q as f32;
    }
}

/// `Q4_K`/`Q5_K`'s scale and minimum of 32-value sub-block `j` (ggml's `get_scale_min_k4`).
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// `Q4_K` and `Q5_K` (`qh` the 32-byte high-bit mask of the latter).
fn q45_k(b: &[u8], qh: Option<&[u8]>, qs: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16_to_f32(&b[0..2]), f16_to_f32(&b[2..4]));
    for (j, sub) in o.chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(j, &b[4..16]);
        let (d1, m1) = (d * sc as f32, dmin * m as f32);
        for (l, x) in sub.iter_mut().enumerate() {
            let e = 32 * j + l;
            let q = nibble(qs, e) | qh.map_or(0, |h| high_bit(h, e) << 4);
            *x = d1 * q as f32 - m1;
        }
    }
}

fn q4_k(b: &[u8], o: &mut [f32]) {
    q45_k(b, None, &b[16..144], o);
}

fn q5_k(b: &[u8], o: &mut [f32]) {
    q45_k(b, Some(&b[16..48]), &b[48..176], o);
}

fn q6_k(b: &[u8], o: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_to_f32(&b[208..210]);
    for (e, x) in o.iter_mut().enumerate() {
        // Low 4 bits: the 4-bit packing over 64-value chunks of each 128-value half's 64
        // bytes; high 2 bits: the 2-bit packing.
        let (half, r) = (e / 128, e % 128);
        let low = (ql[half * 64 + r % 64] >> (4 * (r / 64))) & 15;
        let q = (low | (two_bits(qh, e) << 4)) as i32 - 32;
        *x = (d * scales[e / 16] as i8 as f32) * q as f32;
    }
}

fn q8_k(b: &[u8], o: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (x, &q) in o.iter_mut().zip(&b[4..260]) {
        *x = d * q as i8 as f32;
    }
}

fn bf16(b: &[u8], o: &mut [f32]) {
    o[0] = bf16_to_f32(b);
}

/// e2m1 values doubled (ggml's `kvalues_mxfp4`); the scale is halved to match.
const MXFP4_LEVELS: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

fn mxfp4(b: &[u8], o: &mut [f32]) {
    // E8M0 exponent byte e: 2^(e − 127), halved (the levels are doubled), as
    // ggml_e8m0_to_fp32_half; e < 2 gives the subnormals 2^-128 and 2^-127.
    let d = f32::from_bits(if b[0] < 2 {
        0x0020_0000u32 << b[0]
    } else {
        (b[0] as u32 - 1) << 23
    });
    for (j, &q) in b[1..17].iter().enumerate() {
        o[j] = d * MXFP4_LEVELS[(q & 15) as usize] as f32;
        o[j + 16] = d * MXFP4_LEVELS[(q >> 4) as usize] as f32;
    }
}

/// An I32 (hash-routing tables): exact as f32 below 2^24.
fn i32_value(b: &[u8], o: &mut [f32]) {
    o[0] = i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_is_ggmls() {
        // Block bytes from the layouts in the module comment.
        for f in FORMATS {
            let want = match f.name {
                "Q5_0" => 2 + 4 + 16,
                "Q5_1" => 2 + 2 + 4 + 16,
                "Q2_K" => 16 + 64 + 2 + 2,
                "Q3_K" => 32 + 64 + 12 + 2,
                "Q4_K" => 2 + 2 + 12 + 128,
                "Q5_K" => 2 + 2 + 12 + 32 + 128,
                "Q6_K" => 128 + 64 + 16 + 2,
                "Q8_K" => 4 + 256 + 32,
                "IQ4_NL" => 2 + 16,
                "BF16" => 2,
                "MXFP4" => 1 + 16,
                "I32" => 4,
                other => panic!("{other}"),
            };
            assert_eq!(f.block_bytes, want, "{}", f.name);
            assert_eq!(format(f.ggml_type).unwrap().name, f.name);
        }
        assert!(format(2).is_none() && format(16).is_none());
        assert_eq!(format(12).unwrap().byte_len(512), Some(288));
        assert_eq!(format(12).unwrap().byte_len(100), None);
    }

    #[test]
    fn mxfp4_block() {
        // e = 128: the scale 2^(128−127) = 2 times the e2m1 value; element j is the low nibble
        // of byte j (code j), element j+16 the high one (code 15 − j).
        let mut b = vec![128u8];
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut o = [0f32; 32];
        format(39).unwrap().dequantize(&b, &mut o);
        let e2m1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        for j in 0..16 {
            let v = |c: usize| if c < 8 { e2m1[c] } else { -e2m1[c - 8] };
            assert_eq!(o[j], 2.0 * v(j), "{j}");
            assert_eq!(o[j + 16], 2.0 * v(15 - j), "{j}");
        }
        // e = 1 and 0: the halved scales are the subnormals 2^-127 and 2^-128.
        let mut b = vec![1u8, 0x04];
        b.extend([0u8; 15]);
        format(39).unwrap().dequantize(&b, &mut o);
        assert_eq!(o[0], 4.0 * 2f32.powi(-127));
        let mut b = vec![0u8, 0x02];
        b.extend([0u8; 15]);
        format(39).unwrap().dequantize(&b, &mut o);
        assert_eq!(o[0], 2.0 * 2f32.powi(-128));
    }

    #[test]
    fn hand_made_blocks() {
        // Q6_K: d = 0.5, every scale 2, ql nibbles 0xf, qh bits 0b10: q = 15 | 32 → 47 − 32.
        let mut b = vec![0xffu8; 128];
        b.extend(std::iter::repeat_n(0b1010_1010u8, 64));
        b.extend(std::iter::repeat_n(2u8, 16));
        b.extend_from_slice(&0x3800u16.to_le_bytes());
        let mut o = vec![0.0; 256];
        format(14).unwrap().dequantize(&b, &mut o);
        assert!(o.iter().all(|&x| x == 15.0));
        // Q4_K: d = 1, dmin = 1, sub-block 5's scale 3 and minimum 2 (the 4+2-bit split).
        let mut b = vec![0u8; 144];
        b[0..2].copy_from_slice(&0x3c00u16.to_le_bytes());
        b[2..4].copy_from_slice(&0x3c00u16.to_le_bytes());
        b[4 + 9] = 0x23; // low nibbles of sub-block 5: scale 3, minimum 2
        b[16 + 2 * 32..16 + 3 * 32].fill(0x70); // chunk 2, high nibbles (sub-block 5) = 7
        format(12).unwrap().dequantize(&b, &mut o);
        assert!(o[160..192].iter().all(|&x| x == 3.0 * 7.0 - 2.0));
        assert!(o[..160].iter().chain(&o[192..]).all(|&x| x == 0.0));
    }
}
