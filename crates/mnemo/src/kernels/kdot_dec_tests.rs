//! Tests of [`super`] (one-vector `Q4_K`/`Q6_K` products): against the dequantised weights
//! in f64, the portable, AVX2 and AVX-512 VNNI paths against each other bit for bit (tiles of
//! 4 and 2 rows and single rows: odd and partial row counts), extreme codes, and against the
//! group kernels of [`crate::kernels::kdot`].
use super::*;
use crate::kernels::kdot::tests::random_kmatrix;
use crate::kernels::kquant;
use crate::kernels::quant::isas;
use crate::rng::Rng;

/// `Σ w·(dy·qy)` over the dequantised weights and the quantised activation, in f64, and
/// `Σ|w·dy·qy|`, per row.
fn reference(m: &QMatrix, a: &Act) -> Vec<(f64, f64)> {
    let mut w = vec![0.0f32; m.rows * m.cols];
    kquant::format(m.ty.ggml_type())
        .unwrap()
        .dequantize(&m.data, &mut w);
    let xd: Vec<f64> = (0..m.cols)
        .map(|j| a.x.d[j / QK_K] as f64 * a.x.qs[j] as f64)
        .collect();
    w.chunks_exact(m.cols)
        .map(|wr| {
            let t = wr.iter().zip(&xd).map(|(&p, q)| p as f64 * q);
            (t.clone().sum(), t.map(f64::abs).sum())
        })
        .collect()
}

/// Products equal the f64 reference within `4e-6·Σ|w·dy·qy|` (f32 rounding of `dy·d`, of the
/// lanes and of the reference weights), `accumulate` adds onto `y`, and every path gives the
/// same bits, for row counts that leave partial tiles (1, 3, 5, 6, 7, 33, 70) and 1–8 blocks.
#[test]
fn one_vector_products_equal_reference_and_paths_agree() {
    let mut r = Rng::new(46);
    for ty in [QType::Q4_K, QType::Q6_K] {
        for (rows, cols) in [
            (1usize, 256usize),
            (3, 512),
            (5, 768),
            (6, 256),
            (7, 2048),
            (33, 512),
            (70, 1024),
        ] {
            let m = random_kmatrix(&mut r, ty, rows, cols);
            let mut x = vec![0.0f32; cols];
            r.fill_normal(&mut x, 1.0);
            let want = reference(&m, &Act::new(&x, false));
            let outs: Vec<Vec<f32>> = isas()
                .into_iter()
                .map(|isa| {
                    let mut y = vec![0.25f32; rows];
                    matvec(isa, &m, &x, &mut y, true);
                    y
                })
                .collect();
            for (i, &(w, s)) in want.iter().enumerate() {
                let err = (outs[0][i] as f64 - 0.25 - w).abs() / s;
                assert!(err < 4e-6, "{ty:?} {rows}x{cols} row {i}: rel {err:e}");
            }
            for (y, isa) in outs[1..].iter().zip(&isas()[1..]) {
                assert_eq!(y, &outs[0], "{ty:?} {rows}x{cols}: {isa:?} vs portable");
            }
            // Without accumulate: the same values.
            let mut y = vec![7.0f32; rows];
            matvec(crate::kernels::quant::isa(), &m, &x, &mut y, false);
            for (a, b) in y.iter().zip(&outs[0]) {
                assert!((a - (b - 0.25)).abs() <= 1e-6 * a.abs().max(1.0));
            }
        }
    }
}

/// The largest codes and scales (`Q4_K`: all ones; `Q6_K`: codes 0 → −32 with scale −128)
/// against `qy = −127` everywhere: no i16/i32 overflow on any path (the result matches the
/// reference), and the paths agree.
#[test]
fn one_vector_extremes() {
    let mut r = Rng::new(5);
    for ty in [QType::Q4_K, QType::Q6_K] {
        let (rows, cols) = (9, 1024);
        let mut m = random_kmatrix(&mut r, ty, rows, cols);
        for blk in m.data.chunks_exact_mut(ty.block_bytes()) {
            if ty == QType::Q4_K {
                blk[4..].fill(0xff);
            } else {
                blk[..192].fill(0);
                blk[192..208].fill(0x80);
            }
        }
        let m = QMatrix::new(ty, rows, cols, m.data);
        let x: Vec<f32> = (0..cols)
            .map(|j| if j == 0 { -1.0 } else { -0.999 })
            .collect();
        let a = Act::new(&x, false);
        assert!(a.x.qs.iter().all(|&v| v == -127));
        let want = reference(&m, &a);
        let mut first: Option<Vec<f32>> = None;
        for isa in isas() {
            let mut y = vec![0.0f32; rows];
            matvec(isa, &m, &x, &mut y, false);
            for (i, &(w, s)) in want.iter().enumerate() {
                assert!(
                    (y[i] as f64 - w).abs() < 4e-6 * s,
                    "{ty:?} {isa:?}: {} vs {w}",
                    y[i]
                );
            }
            match &first {
                Some(f) => assert_eq!(f, &y, "{ty:?} {isa:?} vs portable"),
                None => first = Some(y),
            }
        }
    }
}

/// `kdot::matmat` with one vector runs this kernel, and agrees with its group kernel (two
/// vectors, the second one discarded) within float rounding: the same integers, summed in
/// another order.
#[test]
fn one_vector_matches_group_kernel() {
    let mut r = Rng::new(8);
    for ty in [QType::Q4_K, QType::Q6_K] {
        let (rows, cols) = (21, 1536);
        let m = random_kmatrix(&mut r, ty, rows, cols);
        let mut x = vec![0.0f32; 2 * cols];
        r.fill_normal(&mut x, 1.0);
        let want = reference(&m, &Act::new(&x[..cols], false));
        for isa in isas() {
            let mut y1 = vec![0.0f32; rows];
            crate::kernels::kdot::matmat(isa, &m, &x[..cols], 1, &mut y1, false);
            let mut y2 = vec![0.0f32; rows];
            matvec(isa, &m, &x[..cols], &mut y2, false);
            assert_eq!(y1, y2, "{ty:?} {isa:?}: kdot::matmat(n = 1) is this kernel");
            let mut yg = vec![0.0f32; 2 * rows];
            crate::kernels::kdot::matmat(isa, &m, &x, 2, &mut yg, false);
            for i in 0..rows {
                let tol = 4e-6 * want[i].1;
                assert!(
                    (y1[i] as f64 - yg[i] as f64).abs() < tol,
                    "{ty:?} {isa:?} row {i}"
                );
            }
        }
    }
}

/// Timing of the tile heights on a matrix larger than the caches (not a test: `--ignored`).
#[test]
#[ignore]
fn bench_tiles() {
    let mut r = Rng::new(1);
    for ty in [QType::Q4_K, QType::Q6_K] {
        for rows in [65536usize] {
            let cols = 2048;
            let m = random_kmatrix(&mut r, ty, rows, cols);
            let mut x = vec![0.0f32; cols];
            r.fill_normal(&mut x, 1.0);
            let mut y = vec![0.0f32; rows];
            let gb = m.data.len() as f64 / 1e9;
            type F = unsafe fn(&QMatrix, usize, &Act, &mut [f32]);
            let a = Act::new(&x, true);
            let fs: [(&str, F); 6] = [
                ("z", x86::rows_512_pf::<0>),
                ("zpf1024", x86::rows_512_pf::<1024>),
                ("zpf2048", x86::rows_512_pf::<2048>),
                ("zpf4096", x86::rows_512_pf::<4096>),
                ("zpf8192", x86::rows_512_pf::<8192>),
                ("avx2pf4096", x86::rows_avx2_pf::<4096>),
            ];
            let reps = if rows < 1000 { 200 } else { 5 };
            for _round in 0..3 {
                for (name, f) in fs {
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        for c in 0..rows / 32 {
                            unsafe { f(&m, c * 32, &a, &mut y[c * 32..c * 32 + 32]) };
                        }
                    }
                    let s = t.elapsed().as_secs_f64() / reps as f64;
                    eprintln!(
                        "{ty:?} {rows} {name}: {:.3} ms, {:.1} GB/s",
                        s * 1e3,
                        gb / s
                    );
                }
            }
        }
    }
}
