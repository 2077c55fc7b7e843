//! Block-scaled 8-bit and 4-bit floats decoded to f32: the numbers of DeepSeek's FP8/FP4
//! weights (what file holds them, and under which names, is the io layer's business).
//!
//! - FP8 `e4m3` (`float8_e4m3fn`): sign, 4 exponent bits (bias 7), 3 mantissa bits;
//!   subnormals at exponent 0 (`m/8 · 2⁻⁶`), no infinities, `S.1111.111` is NaN; largest
//!   finite value 448.
//! - FP4 `e2m1`: sign, 2 exponent bits, 1 mantissa bit, the 16 values
//!   `0, .5, 1, 1.5, 2, 3, 4, 6, −0, −.5, −1, −1.5, −2, −3, −4, −6` ([`E2M1`]). Two per byte,
//!   the element of even index in the LOW nibble.
//! - Scales `e8m0` (`float8_e8m0fnu`, "ue8m0"): a byte `e` is `2^(e − 127)`; 255 is NaN.
//!
//! A weight `[rows, cols]` is dequantised as `value × scale` of its block: FP8 with one scale
//! per `br × bc` block (`[ceil(rows/br), ceil(cols/bc)]` scales, the last block of a row or
//! column partial), FP4 with one scale per `block` consecutive values of a row
//! (`[rows, ceil(cols/block)]` scales). Invalid codes give NaN; the caller decides what to do
//! with them. Callers check the lengths; the functions assert them.

use rayon::prelude::*;

/// The 16 e2m1 values by 4-bit code (bit 3 is the sign; code 8 is −0).
pub const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// The 256 e4m3 values by byte.
static E4M3: [f32; 256] = e4m3_table();

const fn e4m3_table() -> [f32; 256] {
    let mut t = [0.0f32; 256];
    let mut b = 0;
    while b < 256 {
        let (e, m) = ((b >> 3) & 0xf, b & 7);
        let mag = if e == 0xf && m == 7 {
            f32::NAN
        } else if e == 0 {
            m as f32 / 512.0 // m/8 · 2^-6
        } else {
            // (1 + m/8) · 2^(e-7): exact in f32.
            f32::from_bits(((e as u32 + 120) << 23) | ((m as u32) << 20))
        };
        t[b] = if b & 0x80 != 0 { -mag } else { mag };
        b += 1;
    }
    t
}

/// An e4m3 byte as f32 (NaN for `0x7f`, `0xff`).
#[inline]
pub fn e4m3_to_f32(b: u8) -> f32 {
    E4M3[b as usize]
}

/// An e2m1 code (the low 4 bits of `n`) as f32.
#[inline]
pub fn e2m1_to_f32(n: u8) -> f32 {
    E2M1[(n & 0xf) as usize]
}

/// An e8m0 scale byte as f32: `2^(e − 127)` (2⁻¹²⁷ is an f32 subnormal, exact), NaN for 255.
#[inline]
pub fn e8m0_to_f32(e: u8) -> f32 {
    match e {
        255 => f32::NAN,
        0 => f32::from_bits(0x0040_0000),
        _ => f32::from_bits((e as u32) << 23),
    }
}

/// A `[rows, cols]` e4m3 matrix times its block scales: `scales` is
/// `[ceil(rows/br), ceil(cols/bc)]` row-major, `block = [br, bc]`.
pub fn dequant_fp8(
    q: &[u8],
    scales: &[f32],
    rows: usize,
    cols: usize,
    block: [usize; 2],
) -> Vec<f32> {
    let [br, bc] = block;
    assert!(br > 0 && bc > 0, "FP8 block sizes must be positive");
    let sc = cols.div_ceil(bc);
    assert_eq!(q.len(), rows * cols, "FP8 values");
    assert_eq!(scales.len(), rows.div_ceil(br) * sc, "FP8 scales");
    let mut out = vec![0.0f32; rows * cols];
    if cols == 0 {
        return out;
    }
    out.par_chunks_mut(cols)
        .zip(q.par_chunks(cols))
        .enumerate()
        .for_each(|(r, (o, qr))| {
            let srow = &scales[(r / br) * sc..(r / br + 1) * sc];
            for ((oc, qc), &s) in o.chunks_mut(bc).zip(qr.chunks(bc)).zip(srow) {
                for (y, &b) in oc.iter_mut().zip(qc) {
                    *y = e4m3_to_f32(b) * s;
                }
            }
        });
    out
}

/// A `[rows, cols]` e2m1 matrix packed two per byte (`[rows, cols/2]`, even element in the low
/// nibble; `cols` even) times its scales `[rows, ceil(cols/block)]`, one per `block` values.
pub fn dequant_fp4(
    packed: &[u8],
    scales: &[f32],
    rows: usize,
    cols: usize,
    block: usize,
) -> Vec<f32> {
    assert!(cols.is_multiple_of(2), "FP4 rows pack two values per byte");
    assert!(
        block > 0 && block.is_multiple_of(2),
        "FP4 blocks cover whole bytes"
    );
    let sc = cols.div_ceil(block);
    assert_eq!(packed.len(), rows * cols / 2, "FP4 bytes");
    assert_eq!(scales.len(), rows * sc, "FP4 scales");
    let mut out = vec![0.0f32; rows * cols];
    if cols == 0 {
        return out;
    }
    out.par_chunks_mut(cols)
        .zip(packed.par_chunks(cols / 2))
        .zip(scales.par_chunks(sc))
        .for_each(|((o, pr), srow)| {
            for ((oc, pc), &s) in o.chunks_mut(block).zip(pr.chunks(block / 2)).zip(srow) {
                for (y, &b) in oc.chunks_exact_mut(2).zip(pc) {
                    y[0] = e2m1_to_f32(b) * s;
                    y[1] = e2m1_to_f32(b >> 4) * s;
                }
            }
        });
    out
}

/// The smallest `k` with `amax ≤ qmax·2^k` (the power-of-two ue8m0 scale exponent of a
/// block whose largest magnitude is `amax`, `qmax` the format's largest value).
pub fn pow2_ceil_exp(amax: f32, qmax: f32) -> i32 {
    let (a, q) = (amax as f64, qmax as f64);
    let mut k = (a / q).log2().ceil() as i32;
    while a > q * 2f64.powi(k) {
        k += 1;
    }
    while a <= q * 2f64.powi(k - 1) {
        k -= 1;
    }
    k
}

/// `y` (|y| ≤ 448) as the nearest e4m3 byte, ties to the even code (as
/// `torch.Tensor.to(float8_e4m3fn)`); larger magnitudes saturate at ±448.
pub fn f32_to_e4m3(y: f32) -> u8 {
    let sign = if y.is_sign_negative() { 0x80 } else { 0 };
    let a = y.abs();
    let code = if a >= 448.0 {
        0x7e
    } else if a < 2f32.powi(-6) {
        // Subnormals m/8·2⁻⁶: m = round(a·2⁹); m = 8 is the smallest normal, code 0x08.
        (a * 512.0).round_ties_even() as u32
    } else {
        let e = ((a.to_bits() >> 23) as i32) - 127; // floor(log2 a), a normal f32
        let m = ((a / 2f32.powi(e) - 1.0) * 8.0).round_ties_even() as u32; // 0..=8
        (((e + 7) as u32) << 3) + m // m = 8 carries into the exponent
    };
    sign | code.min(0x7e) as u8
}

/// `y` (|y| ≤ 6) as the nearest e2m1 code, ties to the even code, sign kept.
pub fn f32_to_e2m1(y: f32) -> u8 {
    let a = y.abs();
    let mut best = 0usize;
    for (c, &v) in E2M1.iter().enumerate().take(8).skip(1) {
        let (d, db) = ((v - a).abs(), (E2M1[best] - a).abs());
        if d < db || (d == db && c % 2 == 0) {
            best = c;
        }
    }
    best as u8 | if y.is_sign_negative() { 8 } else { 0 }
}

/// Quantise a `[rows, cols]` f32 matrix to e4m3 with one ue8m0 scale per `br × bc` block
/// (`2^k`, `k` the smallest with `amax ≤ 448·2^k`, `amax` clamped below at 1e-4, as
/// DeepSeek's `act_quant` and the reference fixtures): `(codes [rows·cols], scale exponent
/// bytes [ceil(rows/br), ceil(cols/bc)])`.
pub fn quantize_fp8(w: &[f32], rows: usize, cols: usize, block: [usize; 2]) -> (Vec<u8>, Vec<u8>) {
    let [br, bc] = block;
    assert_eq!(w.len(), rows * cols);
    let (nr, nc) = (rows.div_ceil(br), cols.div_ceil(bc));
    let mut q = vec![0u8; rows * cols];
    let mut e = vec![0u8; nr * nc];
    for bi in 0..nr {
        for bj in 0..nc {
            let (r0, r1, c0, c1) = (
                bi * br,
                (bi * br + br).min(rows),
                bj * bc,
                (bj * bc + bc).min(cols),
            );
            let amax = (r0..r1)
                .flat_map(|r| w[r * cols + c0..r * cols + c1].iter())
                .fold(0.0f32, |m, x| m.max(x.abs()))
                .max(1e-4);
            let k = pow2_ceil_exp(amax, 448.0);
            e[bi * nc + bj] = (k + 127) as u8;
            let inv = 2f32.powi(-k);
            for r in r0..r1 {
                for c in c0..c1 {
                    q[r * cols + c] = f32_to_e4m3(w[r * cols + c] * inv);
                }
            }
        }
    }
    (q, e)
}

/// Quantise a `[rows, cols]` f32 matrix (`cols` a multiple of `block`) to e2m1, two per byte
/// (even element in the low nibble), with one ue8m0 scale per `block` values of a row (`amax`
/// clamped below at 6·2⁻¹²⁶): `(packed [rows·cols/2], scale exponent bytes [rows, cols/block])`.
pub fn quantize_fp4(w: &[f32], rows: usize, cols: usize, block: usize) -> (Vec<u8>, Vec<u8>) {
    assert!(cols.is_multiple_of(block) && block.is_multiple_of(2) && w.len() == rows * cols);
    let mut p = vec![0u8; rows * cols / 2];
    let mut e = vec![0u8; rows * cols / block];
    for (b, (wb, pb)) in w
        .chunks_exact(block)
        .zip(p.chunks_exact_mut(block / 2))
        .enumerate()
    {
        let amax = wb
            .iter()
            .fold(0.0f32, |m, x| m.max(x.abs()))
            .max(6.0 * 2f32.powi(-126));
        let k = pow2_ceil_exp(amax, 6.0);
        e[b] = (k + 127) as u8;
        // 2^-k may overflow f32 for the smallest scales: divide in f64.
        let q = |x: f32| f32_to_e2m1((x as f64 / 2f64.powi(k)) as f32);
        for (o, pair) in pb.iter_mut().zip(wb.chunks_exact(2)) {
            *o = q(pair[0]) | (q(pair[1]) << 4);
        }
    }
    (p, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantisers_round_to_nearest_even_and_round_trip() {
        // Every e4m3 value is its own code; midpoints go to the even code.
        for b in 0..=255u8 {
            if b & 0x7f == 0x7f {
                continue;
            }
            assert_eq!(f32_to_e4m3(e4m3_to_f32(b)), b, "{b:#x}");
            if b & 0x7f < 0x7e && b & 0x80 == 0 {
                let mid = (e4m3_to_f32(b) + e4m3_to_f32(b + 1)) / 2.0;
                let want = if b % 2 == 0 { b } else { b + 1 };
                assert_eq!(f32_to_e4m3(mid), want, "midpoint above {b:#x}");
            }
        }
        assert_eq!(f32_to_e4m3(1000.0), 0x7e);
        for c in 0..16u8 {
            assert_eq!(f32_to_e2m1(e2m1_to_f32(c)), c, "{c}");
        }
        // Midpoints 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5 → codes 0, 2, 2, 4, 4, 6, 6.
        for (x, c) in [
            (0.25, 0),
            (0.75, 2),
            (1.25, 2),
            (1.75, 4),
            (2.5, 4),
            (3.5, 6),
            (5.0, 6),
        ] {
            assert_eq!(f32_to_e2m1(x), c, "{x}");
            assert_eq!(f32_to_e2m1(-x), c | 8, "-{x}");
        }
        assert_eq!(pow2_ceil_exp(448.0, 448.0), 0);
        assert_eq!(pow2_ceil_exp(448.1, 448.0), 1);
        assert_eq!(pow2_ceil_exp(224.0, 448.0), -1);
        // Quantise-dequantise: within half a step of the block's grid; re-quantising the
        // dequantised values gives them back exactly.
        let mut r = crate::rng::Rng::new(9);
        let (rows, cols) = (130, 96);
        let mut w = vec![0.0f32; rows * cols];
        r.fill_normal(&mut w, 0.05);
        let (q, e) = quantize_fp8(&w, rows, cols, [128, 128]);
        let s: Vec<f32> = e.iter().map(|&b| e8m0_to_f32(b)).collect();
        let d = dequant_fp8(&q, &s, rows, cols, [128, 128]);
        for (a, b) in w.iter().zip(&d) {
            // Half a step: 1/16 relative, or half the subnormal step 2⁻¹⁰·scale (scale ≤ 2⁻¹⁰).
            assert!(
                (a - b).abs() <= a.abs() / 16.0 + 2f32.powi(-20),
                "{a} vs {b}"
            );
        }
        let (q2, e2) = quantize_fp8(&d, rows, cols, [128, 128]);
        let s2: Vec<f32> = e2.iter().map(|&b| e8m0_to_f32(b)).collect();
        assert_eq!(dequant_fp8(&q2, &s2, rows, cols, [128, 128]), d);
        let (p, e) = quantize_fp4(&w, rows, cols, 32);
        let s: Vec<f32> = e.iter().map(|&b| e8m0_to_f32(b)).collect();
        let d = dequant_fp4(&p, &s, rows, cols, 32);
        for (blk, db) in w.chunks(32).zip(d.chunks(32)) {
            let amax = blk.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            for (a, b) in blk.iter().zip(db) {
                // Half the widest step (4 → 6) of a scale below amax/3.
                assert!((a - b).abs() <= amax / 3.0, "{a} vs {b}");
            }
        }
        let (p2, e2) = quantize_fp4(&d, rows, cols, 32);
        let s2: Vec<f32> = e2.iter().map(|&b| e8m0_to_f32(b)).collect();
        assert_eq!(dequant_fp4(&p2, &s2, rows, cols, 32), d);
    }

    #[test]
    fn e4m3_values_by_hand() {
        // 0x38 = 0 0111 000 = 1.0; 0x3c = 0 0111 100 = 1.5; 0xc2 = 1 1000 010 = -(1.25 · 2) = -2.5
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x3c), 1.5);
        assert_eq!(e4m3_to_f32(0xc2), -2.5);
        // largest finite: 0 1111 110 = 1.75 · 2^8
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0xfe), -448.0);
        // smallest normal 2^-6, subnormals m/8 · 2^-6
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x07), 7.0 * 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x86), -6.0 * 2f32.powi(-9));
        // ±0
        assert_eq!(e4m3_to_f32(0x00).to_bits(), 0.0f32.to_bits());
        assert_eq!(e4m3_to_f32(0x80).to_bits(), (-0.0f32).to_bits());
        // NaN only at S.1111.111
        assert!(e4m3_to_f32(0x7f).is_nan() && e4m3_to_f32(0xff).is_nan());
        let nans = (0..=255u8).filter(|&b| e4m3_to_f32(b).is_nan()).count();
        assert_eq!(nans, 2);
        // Monotone over the positive codes (a check of every exponent/mantissa step).
        for b in 1..0x7fu8 {
            assert!(e4m3_to_f32(b) > e4m3_to_f32(b - 1), "{b:#x}");
        }
    }

    #[test]
    fn e2m1_and_e8m0_values_by_hand() {
        let want = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        for (c, &w) in want.iter().enumerate() {
            assert_eq!(e2m1_to_f32(c as u8), w);
            assert_eq!(e2m1_to_f32(c as u8 | 8), -w);
        }
        // −0 keeps its sign; only the low nibble counts.
        assert!(e2m1_to_f32(8).is_sign_negative() && e2m1_to_f32(8) == 0.0);
        assert_eq!(e2m1_to_f32(0xf7), 6.0);
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(130), 8.0);
        assert_eq!(e8m0_to_f32(120), 2f32.powi(-7));
        assert_eq!(e8m0_to_f32(254), 2f32.powi(127));
        assert_eq!(e8m0_to_f32(1), 2f32.powi(-126));
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-126) / 2.0);
        assert!(e8m0_to_f32(255).is_nan());
    }

    #[test]
    fn fp8_blocks_partial_at_the_edges() {
        // [3, 5] with 2×2 blocks: scales [2, 3], the last row and column blocks partial.
        let (rows, cols) = (3, 5);
        let one = 0x38u8; // 1.0
        let q = vec![one; rows * cols];
        let scales = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0];
        let got = dequant_fp8(&q, &scales, rows, cols, [2, 2]);
        #[rustfmt::skip]
        let want = [
            1.0, 1.0, 2.0, 2.0, 4.0,
            1.0, 1.0, 2.0, 2.0, 4.0,
            8.0, 8.0, 16.0, 16.0, 32.0,
        ];
        assert_eq!(got, want);
        // Values and scales combine per element: −2.5 · 0.5, 448 · 2^-8.
        let got = dequant_fp8(&[0xc2, 0x7e], &[0.5, 2f32.powi(-8)], 1, 2, [1, 1]);
        assert_eq!(got, [-1.25, 1.75]);
        // A NaN code comes out as NaN (the caller names it); no other value is non-finite.
        let got = dequant_fp8(&[0x7f, 0x00, 0x80], &[1.0], 1, 3, [128, 128]);
        assert!(got[0].is_nan() && got[1] == 0.0 && got[2] == 0.0);
        assert!(got[2].is_sign_negative());
    }

    #[test]
    fn fp4_low_nibble_first_with_per_block_scales() {
        // Row 0: bytes 0x21 → [lut[1], lut[2]] = [0.5, 1.0]; 0xf8 → [−0, −6].
        // Row 1: 0x7a → [lut[0xa], lut[7]] = [−1, 6]; 0x93 → [1.5, −0.5]. Block 2: a scale per byte.
        let packed = [0x21, 0xf8, 0x7a, 0x93];
        let scales = [2.0, 0.25, 1.0, 4.0];
        let got = dequant_fp4(&packed, &scales, 2, 4, 2);
        assert_eq!(got, [1.0, 2.0, -0.0, -1.5, -1.0, 6.0, 6.0, -2.0]);
        assert!(got[2].is_sign_negative());
        // A partial last block: 6 columns, blocks of 4 → scales [1, 2] per row.
        let packed = [0x22, 0x22, 0x22];
        let got = dequant_fp4(&packed, &[1.0, 8.0], 1, 6, 4);
        assert_eq!(got, [1.0, 1.0, 1.0, 1.0, 8.0, 8.0]);
        // Every code is finite: FP4 has no NaN.
        let all: Vec<u8> = (0..=255).collect();
        let got = dequant_fp4(&all, &[1.0; 16], 1, 512, 32);
        assert!(got.iter().all(|x| x.is_finite()));
    }
}
