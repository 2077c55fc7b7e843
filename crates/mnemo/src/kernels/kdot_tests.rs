//! Tests of [`super`] (the k-quant decode products): against the dequantised weights, the
//! portable, AVX2 and AVX-512 VNNI paths against each other, extremes, several vectors.
use super::*;
use crate::kernels::kquant;
use crate::kernels::quant::isas;
use crate::rng::Rng;

/// Random valid super-blocks: random bytes, the f16 scales (`d`, `dmin`) set to
/// 2^-10..2^-3 with random sign and mantissa.
pub(in crate::kernels) fn random_kmatrix(
    r: &mut Rng,
    ty: QType,
    rows: usize,
    cols: usize,
) -> QMatrix {
    let bb = ty.block_bytes();
    let mut data: Vec<u8> = (0..rows * cols / QK_K * bb)
        .map(|_| (r.next_u64() & 0xff) as u8)
        .collect();
    let offs: &[usize] = match ty {
        QType::Q6_K => &[208],
        QType::Q2_K => &[80, 82],
        QType::Q3_K => &[108],
        _ => &[0, 2],
    };
    for blk in data.chunks_exact_mut(bb) {
        for &o in offs {
            blk[o + 1] = ((blk[o + 1] as u16 & 0x83) | ((5 + (blk[o] as u16 & 7)) << 2)) as u8;
        }
    }
    QMatrix::new(ty, rows, cols, data)
}

fn ggml_id(ty: QType) -> u32 {
    ty.ggml_type()
}

/// The portable product and those of the SIMD levels this CPU has (AVX2, AVX-512 VNNI).
#[test]
fn q8k_quantisation_is_ggmls() {
    let mut r = Rng::new(1);
    let mut x = vec![0.0f32; 512];
    r.fill_normal(&mut x, 2.0);
    x[300] = -9.0; // block 1's largest magnitude, negative
    let q = quantize_q8k(&x);
    assert_eq!(q.d[1], 1.0 / (-127.0 / -9.0));
    assert_eq!(q.qs[300], -127);
    for b in 0..2 {
        for k in 0..16 {
            let s: i32 = q.qs[b * 256 + 16 * k..b * 256 + 16 * k + 16]
                .iter()
                .map(|&v| v as i32)
                .sum();
            assert_eq!(q.bsums[b * 16 + k] as i32, s);
        }
        for (j, &t) in x[b * 256..(b + 1) * 256].iter().enumerate() {
            assert!((q.d[b] * q.qs[b * 256 + j] as f32 - t).abs() <= 0.5001 * q.d[b].abs());
        }
    }
    // A zero block stays zero.
    let z = quantize_q8k(&[0.0; 256]);
    assert!(z.d[0] == 0.0 && z.qs.iter().all(|&v| v == 0));
}

/// The quantised product equals `Σ w·(dy·qy)` over the dequantised weights and the
/// `Q8_K`-quantised activation, evaluated in f64, within `4e-6 · Σ|w·dy·qy|` (what remains
/// is f32 rounding: of `d·dy`, of each block's contribution, of the running sum, and of the
/// dequantised reference weights); the portable, AVX2 and VNNI paths agree bit for bit.
#[test]
fn kquant_matvec_equals_reference_and_paths_agree() {
    let mut r = Rng::new(21);
    let mut worst = 0.0f64;
    for ty in [
        QType::Q2_K,
        QType::Q3_K,
        QType::Q4_K,
        QType::Q5_K,
        QType::Q6_K,
    ] {
        for (rows, cols) in [(1usize, 256usize), (7, 512), (33, 768), (5, 2048)] {
            let m = random_kmatrix(&mut r, ty, rows, cols);
            let mut w = vec![0.0f32; rows * cols];
            kquant::format(ggml_id(ty))
                .unwrap()
                .dequantize(&m.data, &mut w);
            let mut x = vec![0.0f32; cols];
            r.fill_normal(&mut x, 1.0);
            let q = quantize_q8k(&x);
            let xd: Vec<f64> = (0..cols)
                .map(|j| q.d[j / QK_K] as f64 * q.qs[j] as f64)
                .collect();
            let mut outs = Vec::new();
            for isa_ in isas() {
                let mut y = vec![0.25f32; rows];
                matmat(isa_, &m, &x, 1, &mut y, true);
                outs.push(y);
            }
            for i in 0..rows {
                let wr = &w[i * cols..(i + 1) * cols];
                let want: f64 = wr.iter().zip(&xd).map(|(&a, b)| a as f64 * b).sum();
                let scale: f64 = wr.iter().zip(&xd).map(|(&a, b)| (a as f64 * b).abs()).sum();
                let err = (outs[0][i] as f64 - 0.25 - want).abs() / scale;
                worst = worst.max(err);
                assert!(
                    err < 4e-6,
                    "{ty:?} {rows}x{cols} row {i}: {} vs {want} (rel {err:e})",
                    outs[0][i] - 0.25
                );
            }
            for y in &outs[1..] {
                assert_eq!(y, &outs[0], "{ty:?} {rows}x{cols}: SIMD vs portable");
            }
        }
    }
    eprintln!("worst relative error {worst:e}");
}

/// Extreme codes (all scales and codes at their largest, activations at ±127) do not
/// overflow, and several vectors at once equal one-vector products bit for bit (on every
/// path, and the paths agree).
#[test]
fn kquant_extremes_and_several_vectors() {
    let mut r = Rng::new(4);
    for ty in [
        QType::Q2_K,
        QType::Q3_K,
        QType::Q4_K,
        QType::Q5_K,
        QType::Q6_K,
    ] {
        let (rows, cols) = (3, 512);
        let mut m = random_kmatrix(&mut r, ty, rows, cols);
        for blk in m.data.chunks_exact_mut(ty.block_bytes()) {
            if ty == QType::Q2_K {
                blk[..80].fill(0xff);
            } else if ty == QType::Q3_K {
                blk[..96].fill(0); // q = −4
                blk[96..108].fill(0); // scale −32
            } else if ty != QType::Q6_K {
                blk[4..].fill(0xff);
            } else {
                blk[..192].fill(0); // q = 0 → −32
                blk[192..208].fill(0x80); // scale −128
            }
        }
        let m = QMatrix::new(ty, rows, cols, m.data);
        let mut w = vec![0.0f32; rows * cols];
        kquant::format(ggml_id(ty))
            .unwrap()
            .dequantize(&m.data, &mut w);
        let x: Vec<f32> = (0..cols)
            .map(|j| if j == 0 { -1.0 } else { -0.999 })
            .collect();
        let q = quantize_q8k(&x);
        assert!(q.qs.iter().all(|&v| v == -127));
        for isa_ in isas() {
            let mut y = vec![0.0f32; rows];
            matmat(isa_, &m, &x, 1, &mut y, false);
            for i in 0..rows {
                let t = |j: usize| w[i * cols + j] as f64 * (q.d[j / QK_K] as f64 * -127.0);
                let want: f64 = (0..cols).map(t).sum();
                let scale: f64 = (0..cols).map(|j| t(j).abs()).sum();
                assert!(
                    (y[i] as f64 - want).abs() < 4e-6 * scale,
                    "{ty:?} {isa_:?}: {} vs {want}",
                    y[i]
                );
            }
        }
        // 11 vectors: a full group of 8 and a partial one; every path gives the same bits.
        // (One vector of `Q4_K`/`Q6_K` runs `kdot_dec`, whose float sums are in ggml's lane
        // order: the same within rounding there.)
        let n = 11;
        let mut xs = vec![0.0f32; n * cols];
        r.fill_normal(&mut xs, 1.0);
        let mut first: Option<Vec<f32>> = None;
        for isa_ in isas() {
            let mut y = vec![0.0f32; n * rows];
            matmat(isa_, &m, &xs, n, &mut y, false);
            for i in 0..n {
                let mut yi = vec![0.0f32; rows];
                matmat(isa_, &m, &xs[i * cols..(i + 1) * cols], 1, &mut yi, false);
                if crate::kernels::kdot_dec::handles(ty) {
                    for (a, b) in y[i * rows..(i + 1) * rows].iter().zip(&yi) {
                        assert!((a - b).abs() <= 1e-5 * a.abs().max(b.abs()), "{ty:?}");
                    }
                } else {
                    assert_eq!(&y[i * rows..(i + 1) * rows], &yi[..]);
                }
            }
            match &first {
                Some(f) => assert_eq!(f, &y, "{ty:?} {isa_:?}: {n} vectors vs portable"),
                None => first = Some(y),
            }
        }
    }
}

/// `matmat_fast` (f32 activations, each row dequantised once) handles the k-quants too.
#[test]
fn kquant_matmat_fast_equals_dequantised_product() {
    let mut r = Rng::new(9);
    for ty in [
        QType::Q2_K,
        QType::Q3_K,
        QType::Q4_K,
        QType::Q5_K,
        QType::Q6_K,
    ] {
        let (rows, cols, n) = (19, 512, 3);
        let m = random_kmatrix(&mut r, ty, rows, cols);
        let mut w = vec![0.0f32; rows * cols];
        kquant::format(ggml_id(ty))
            .unwrap()
            .dequantize(&m.data, &mut w);
        let mut x = vec![0.0f32; n * cols];
        r.fill_normal(&mut x, 1.0);
        let mut y = vec![0.0f32; n * rows];
        crate::kernels::quant::matmat_fast(&m, &x, n, &mut y, false);
        for i in 0..n {
            for k in 0..rows {
                let t = |j: usize| w[k * cols + j] as f64 * x[i * cols + j] as f64;
                let want: f64 = (0..cols).map(t).sum();
                let scale: f64 = (0..cols).map(|j| t(j).abs()).sum();
                let got = y[i * rows + k] as f64;
                assert!((got - want).abs() < 1e-5 * scale, "{ty:?}: {got} vs {want}");
            }
        }
    }
}

/// The several-vector `Q4_K`/`Q6_K` kernel (`kdot_rows`: one lane per vector, up to 64
/// vectors per pass): 2, 9 and 70 vectors (partial groups, a second pass of 64) against 19
/// rows (a partial chunk of 16), with and without accumulation, equal the per-vector
/// products (`row_dot1`) bit for bit on every path, and the paths agree.
#[test]
fn kquant_lanes_kernel_equals_one_vector_products() {
    let mut r = Rng::new(21);
    for ty in [QType::Q4_K, QType::Q6_K] {
        let (rows, cols) = (19, 768);
        let m = random_kmatrix(&mut r, ty, rows, cols);
        for n in [2usize, 9, 70] {
            let mut xs = vec![0.0f32; n * cols];
            r.fill_normal(&mut xs, 1.0);
            let mut first: Option<Vec<f32>> = None;
            for isa_ in isas() {
                let mut y = vec![0.5f32; n * rows];
                matmat(isa_, &m, &xs, n, &mut y, true);
                for i in 0..n {
                    // The per-vector arithmetic (`row_dot1`; `matmat` sends one vector of
                    // these types to `kdot_dec`, another float order).
                    let mut yi = vec![0.0f32; rows];
                    let xi = quantize_q8k(&xs[i * cols..(i + 1) * cols]);
                    super::rows(isa_, &m, 0, rows, std::slice::from_ref(&xi), &mut yi);
                    let want: Vec<f32> = yi.iter().map(|v| 0.5 + v).collect();
                    assert_eq!(
                        &y[i * rows..(i + 1) * rows],
                        &want[..],
                        "{ty:?} {isa_:?} n={n}"
                    );
                }
                // The group form (`row_dots`, what `rows` runs for several vectors) too.
                let xq: Vec<Q8K> = xs.chunks_exact(cols).map(quantize_q8k).collect();
                let mut g = vec![0.0f32; rows * n];
                super::rows(isa_, &m, 0, rows, &xq, &mut g);
                for (k, gk) in g.chunks_exact(n).enumerate() {
                    for (i, &v) in gk.iter().enumerate() {
                        assert_eq!(
                            y[i * rows + k],
                            0.5 + v,
                            "{ty:?} {isa_:?} n={n}: group form"
                        );
                    }
                }
                match &first {
                    Some(f) => assert_eq!(f, &y, "{ty:?} {isa_:?}: {n} vectors vs portable"),
                    None => first = Some(y),
                }
            }
        }
    }
}
