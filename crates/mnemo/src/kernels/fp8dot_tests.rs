//! Tests of [`super`]: every kernel against dequantise-then-f32 and against each other.

use super::*;
use crate::kernels::fp8::{dequant_fp4, dequant_fp8};
use crate::rng::Rng;

/// The kernels this CPU runs.
fn isas() -> Vec<Isa> {
    match isa() {
        Isa::Avx512 => vec![Isa::Generic, Isa::Avx2, Isa::Avx512],
        Isa::Avx2 => vec![Isa::Generic, Isa::Avx2],
        Isa::Generic => vec![Isa::Generic],
    }
}

fn byte(r: &mut Rng) -> u8 {
    (r.next_u64() & 0xff) as u8
}

/// A random FP8 matrix with `br × bc` block scales `2^(−8..=1)` (one block at `2^9`, the
/// two-multiply path, when `big`), and its dequantised f32 values.
fn random_fp8(
    r: &mut Rng,
    rows: usize,
    cols: usize,
    blk: [usize; 2],
    big: bool,
) -> (QMatrix, Vec<f32>) {
    let q: Vec<u8> = (0..rows * cols)
        .map(|_| loop {
            let b = byte(r);
            if b & 0x7f != 0x7f {
                break b;
            }
        })
        .collect();
    let nbs = rows.div_ceil(blk[0]) * cols.div_ceil(blk[1]);
    let mut s: Vec<f32> = (0..nbs)
        .map(|_| 2f32.powi((r.next_u64() % 10) as i32 - 8))
        .collect();
    if big {
        s[nbs - 1] = 512.0;
    }
    let w = dequant_fp8(&q, &s, rows, cols, blk);
    let per_row = expand_block_scales(&s, rows, cols, blk);
    let m = QMatrix::packed(QType::Fp8, rows, cols, q, per_row, blk[1]).unwrap();
    (m, w)
}

/// A random FP4 matrix with per-32 scales `2^(−8..=1)`, and its dequantised f32 values.
fn random_fp4(r: &mut Rng, rows: usize, cols: usize) -> (QMatrix, Vec<f32>) {
    let p: Vec<u8> = (0..rows * cols / 2).map(|_| byte(r)).collect();
    let s: Vec<f32> = (0..rows * cols.div_ceil(32))
        .map(|_| 2f32.powi((r.next_u64() % 10) as i32 - 8))
        .collect();
    let w = dequant_fp4(&p, &s, rows, cols, 32);
    (
        QMatrix::packed(QType::Fp4, rows, cols, p, s, 32).unwrap(),
        w,
    )
}

/// A random BF16 matrix (values of every magnitude and sign, zeros and subnormals
/// included), and its f32 values.
fn random_bf16(r: &mut Rng, rows: usize, cols: usize) -> (QMatrix, Vec<f32>) {
    let bits: Vec<u16> = (0..rows * cols)
        .map(|i| match i % 11 {
            0 => 0x8000,
            1 => 0x0003,
            _ => ((r.next_u64() & 0x8000) as u16) | (0x3c00 + (r.next_u64() % 0x0800) as u16),
        })
        .collect();
    let w = bits
        .iter()
        .map(|&b| f32::from_bits((b as u32) << 16))
        .collect();
    let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    (QMatrix::bf16(rows, cols, bytes.into()).unwrap(), w)
}

/// `y = X·Wᵀ` in f64 and `Σ|w·x|` per output (the scale of the rounding error).
fn reference(w: &[f32], x: &[f32], n: usize, rows: usize, cols: usize) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0f64; n * rows];
    let mut a = vec![0.0f64; n * rows];
    for i in 0..n {
        for rr in 0..rows {
            for j in 0..cols {
                let p = w[rr * cols + j] as f64 * x[i * cols + j] as f64;
                y[i * rows + rr] += p;
                a[i * rows + rr] += p.abs();
            }
        }
    }
    (y, a)
}

#[test]
fn every_kernel_matches_dequantise_then_f32_and_each_other() {
    // Partial FP8 blocks at both edges (200 = 128 + 72 columns, 130 rows) and a partial chunk
    // of 16 (200 = 12·16 + 8); FP4 with a partial scale block (80 = 2·32 + 16) and 40 (a
    // partial chunk); 1..=9 vectors (AVX2 groups of 4, AVX-512 groups of 8, and beyond).
    let mut r = Rng::new(11);
    let cases: Vec<(&str, QMatrix, Vec<f32>)> = vec![
        {
            let (m, w) = random_fp8(&mut r, 130, 200, [128, 128], false);
            ("fp8", m, w)
        },
        {
            let (m, w) = random_fp8(&mut r, 9, 48, [4, 16], true);
            ("fp8 small blocks, one scale 2^9", m, w)
        },
        {
            let (m, w) = random_fp4(&mut r, 70, 80);
            ("fp4", m, w)
        },
        {
            let (m, w) = random_fp4(&mut r, 5, 40);
            ("fp4 partial chunk", m, w)
        },
        {
            let (m, w) = random_bf16(&mut r, 130, 200);
            ("bf16", m, w)
        },
        {
            let (m, w) = random_bf16(&mut r, 5, 40);
            ("bf16 partial chunk", m, w)
        },
    ];
    for (what, m, w) in &cases {
        let (rows, cols) = (m.rows, m.cols);
        // Rows decode to exactly the dequantised values.
        for rr in [0, rows / 2, rows - 1] {
            let mut row = vec![f32::NAN; cols];
            decode_row(m, rr, &mut row);
            assert_eq!(&row[..], &w[rr * cols..(rr + 1) * cols], "{what} row {rr}");
        }
        for n in [1usize, 2, 3, 4, 5, 8, 9] {
            let mut x = vec![0.0f32; n * cols];
            r.fill_normal(&mut x, 1.0);
            let (want, scale) = reference(w, &x, n, rows, cols);
            let mut first: Option<Vec<f32>> = None;
            for isa_ in isas() {
                let mut y = vec![0.5f32; n * rows];
                matmat_with(isa_, m, &x, n, &mut y, true);
                // Decoded weights are exact: only the f32 summation order differs from the
                // f64 sum (≤ ~cols/16 roundings of 2⁻²⁴ relative to Σ|w·x|).
                for k in 0..n * rows {
                    let err = (y[k] as f64 - 0.5 - want[k]).abs();
                    assert!(
                        err <= 2e-6 * scale[k] + 1e-6,
                        "{what} {isa_:?} n {n} out {k}: {} vs {}",
                        y[k] - 0.5,
                        want[k]
                    );
                }
                // Every kernel gives the same bits; each vector as if alone.
                match &first {
                    Some(f) => assert_eq!(f, &y, "{what} {isa_:?} n {n} vs the portable kernel"),
                    None => first = Some(y.clone()),
                }
                for i in [0, n - 1] {
                    let mut yi = vec![0.5f32; rows];
                    matmat_with(isa_, m, &x[i * cols..(i + 1) * cols], 1, &mut yi, true);
                    assert_eq!(
                        &y[i * rows..(i + 1) * rows],
                        &yi[..],
                        "{what} {isa_:?} n {n} vector {i}"
                    );
                }
            }
            // Overwrite mode writes the same values as accumulating onto zeros.
            let (mut a, mut b) = (vec![0.0f32; n * rows], vec![7.0f32; n * rows]);
            matmat(m, &x, n, &mut a, true);
            matmat(m, &x, n, &mut b, false);
            assert_eq!(a, b, "{what}");
        }
    }
}

#[test]
fn exact_sums_come_out_exact() {
    // FP8 1.0 (0x38) and −0.5 (0xb0) with scales 2 and 1/4; x small integers: every partial
    // sum is an exact small number, so y is exact on every kernel.
    let (rows, cols) = (3, 256);
    let q: Vec<u8> = (0..rows * cols)
        .map(|i| if i % 3 == 0 { 0xb0 } else { 0x38 })
        .collect();
    let s = vec![2.0, 0.25];
    let per_row = expand_block_scales(&s, rows, cols, [128, 128]);
    let m = QMatrix::packed(QType::Fp8, rows, cols, q.clone(), per_row, 128).unwrap();
    let x: Vec<f32> = (0..cols).map(|j| (j % 7) as f32 - 3.0).collect();
    let w = dequant_fp8(&q, &s, rows, cols, [128, 128]);
    for isa_ in isas() {
        let mut y = vec![0.0f32; rows];
        matmat_with(isa_, &m, &x, 1, &mut y, false);
        for rr in 0..rows {
            let want: f32 = (0..cols).map(|j| w[rr * cols + j] * x[j]).sum();
            assert_eq!(y[rr], want, "{isa_:?} row {rr}");
        }
    }
    // FP4: 0x21 → [0.5, 1.0] times scale 4, x = 1: 32 values per block → 16·(2 + 4).
    let m = QMatrix::packed(QType::Fp4, 1, 64, vec![0x21; 32], vec![4.0, 0.5], 32).unwrap();
    for isa_ in isas() {
        let mut y = vec![0.0f32; 1];
        matmat_with(isa_, &m, &[1.0; 64], 1, &mut y, false);
        assert_eq!(y[0], 16.0 * 6.0 + 16.0 * 0.75, "{isa_:?}");
    }
}

#[test]
fn packed_rejects_bad_sizes_scales_and_nan_codes() {
    let err = |r: Result<QMatrix, String>| r.unwrap_err();
    assert!(err(QMatrix::packed(
        QType::Fp8,
        2,
        16,
        vec![0; 31],
        vec![1.0; 2],
        16
    ))
    .contains("expected 32"));
    assert!(err(QMatrix::packed(
        QType::Fp4,
        2,
        16,
        vec![0; 17],
        vec![1.0; 2],
        16
    ))
    .contains("17 bytes of codes, expected 16"));
    assert!(err(QMatrix::packed(
        QType::Fp4,
        1,
        15,
        vec![0; 8],
        vec![1.0],
        16
    ))
    .contains("even"));
    assert!(err(QMatrix::packed(
        QType::Fp8,
        1,
        16,
        vec![0; 16],
        vec![1.0; 2],
        16
    ))
    .contains("2 scales, expected 1"));
    assert!(err(QMatrix::packed(
        QType::Fp8,
        1,
        16,
        vec![0; 16],
        vec![3.0],
        16
    ))
    .contains("power of two"));
    assert!(err(QMatrix::packed(
        QType::Fp8,
        1,
        16,
        vec![0; 16],
        vec![1.0],
        8
    ))
    .contains("multiple of 16"));
    let mut q = vec![0u8; 16];
    q[5] = 0xff;
    assert!(err(QMatrix::packed(QType::Fp8, 1, 16, q, vec![1.0], 16))
        .contains("NaN code 0xff at [0, 5]"));
    assert!(err(QMatrix::packed(
        QType::Q8_0,
        1,
        16,
        vec![0; 16],
        vec![1.0],
        16
    ))
    .contains("not a packed"));
    // The smallest E8M0 scale, 2⁻¹²⁷ (an f32 subnormal), is a power of two.
    assert!(QMatrix::packed(
        QType::Fp4,
        1,
        16,
        vec![0; 8],
        vec![f32::from_bits(0x0040_0000)],
        16
    )
    .is_ok());
}

#[test]
fn quant_matmat_runs_packed_types() {
    // Through the quantised-weight entry points the model uses (`quant::matmat`, `matmat_fast`).
    let mut r = Rng::new(4);
    let (m, w) = random_fp4(&mut r, 33, 64);
    let mut x = vec![0.0f32; 2 * 64];
    r.fill_normal(&mut x, 1.0);
    let (mut a, mut b, mut c) = (vec![0.0; 66], vec![0.0; 66], vec![0.0; 66]);
    crate::kernels::quant::matmat(&m, &x, 2, &mut a, false);
    crate::kernels::quant::matmat_fast(&m, &x, 2, &mut b, false);
    matmat(&m, &x, 2, &mut c, false);
    assert_eq!(a, c);
    assert_eq!(b, c);
    let (want, _) = reference(&w, &x, 2, 33, 64);
    assert!((c[40] as f64 - want[40]).abs() < 1e-4);
}
