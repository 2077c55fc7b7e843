//! The bf16 GEMM against its references: the rounding on known values, the vector packers
//! against the scalar one, the `vdpbf16ps` path against the portable path (round, then f32
//! GEMM) and both against f64 sums, on odd shapes, transposed and strided views, `k` over
//! several slices, and accumulation.

use super::pack::{panel_scalar, Lines};
use super::*;
use crate::rng::Rng;

#[test]
fn rounding_is_nearest_even_with_vcvtneps2bf16_specials() {
    assert_eq!(bf16_bits(1.0), 0x3f80);
    assert_eq!(bf16_bits(-2.5), 0xc020);
    // Halfway between 1 and the next bf16 (1 + 2⁻⁷): ties go to the even 1.0 ...
    assert_eq!(bf16_bits(1.0 + 2f32.powi(-8)), 0x3f80);
    // ... and from an odd neighbour up to the even one.
    assert_eq!(bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
    assert_eq!(bf16_bits(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 0x3f81);
    assert_eq!(bf16_bits(f32::INFINITY), 0x7f80);
    assert_eq!(bf16_bits(f32::MAX), 0x7f80);
    assert!(round_bf16(f32::NAN).is_nan());
    assert_eq!(bf16_bits(-1e-40), 0x8000);
    assert_eq!(round_bf16(0.1), 0.100097656);
}

/// The `vdpbf16ps` instruction runs on a CPU that reports it, with the exact bf16 result.
#[test]
fn vdpbf16ps_executes_when_detected() {
    if !has_avx512_bf16() {
        eprintln!("no AVX-512 BF16 on this CPU: only the portable path runs");
        return;
    }
    // SAFETY: the feature was detected.
    let r = unsafe { avx512::dot_pair(0.25, (1.5, -0.5), (2.0, 4.0)) };
    assert_eq!(r, [0.25 + 3.0 - 2.0; 16]);
}

fn special_values(r: &mut Rng, n: usize) -> Vec<f32> {
    let mut v = vec![0.0; n];
    r.fill_normal(&mut v, 3.0);
    let specials = [
        1e-40,
        -1e-39,
        1.0 + 2f32.powi(-8),
        f32::MAX,
        -0.0,
        65504.0,
        3e38,
    ];
    for (i, s) in specials.iter().enumerate() {
        if i * 7 < n {
            v[i * 7] = *s;
        }
    }
    v
}

#[test]
fn vector_packers_match_the_scalar_packer() {
    if !has_avx512_bf16() {
        return;
    }
    let mut r = Rng::new(5);
    for &(lines, depth) in &[(1, 1), (12, 2), (13, 33), (32, 64), (45, 77), (7, 130)] {
        let data = special_values(&mut r, lines * depth);
        let kp = depth.div_ceil(2);
        // Lines contiguous (ls = 1) and depth contiguous (ds = 1).
        for (ls, ds) in [(1, lines), (depth, 1)] {
            let x = Lines {
                data: &data,
                lines,
                depth,
                ls,
                ds,
            };
            for l0 in (0..lines).step_by(MR) {
                let (mut want, mut got) = (vec![7u32; kp * MR], vec![0xdead_beef_u32; kp * MR]);
                panel_scalar::<MR>(&x, l0, kp, &mut want);
                // SAFETY: the feature was detected; the view covers `data`.
                unsafe {
                    if ls == 1 {
                        avx512::pack_lines_contiguous::<MR>(&x, l0, 1, kp, &mut got);
                    } else {
                        avx512::pack_depth_contiguous::<MR>(&x, l0, kp, &mut got);
                    }
                }
                assert_eq!(got, want, "MR panel at {l0}, {lines}x{depth}, ls {ls}");
            }
            for l0 in (0..lines).step_by(NR) {
                let (mut want, mut got) = (vec![7u32; kp * NR], vec![0xdead_beef_u32; kp * NR]);
                panel_scalar::<NR>(&x, l0, kp, &mut want);
                // SAFETY: as above.
                unsafe {
                    if ls == 1 {
                        avx512::pack_lines_contiguous::<NR>(&x, l0, 1, kp, &mut got);
                    } else {
                        avx512::pack_depth_contiguous::<NR>(&x, l0, kp, &mut got);
                    }
                }
                assert_eq!(got, want, "NR panel at {l0}, {lines}x{depth}, ls {ls}");
            }
        }
        // Contiguous lines, several panels in one pass (from the first and from the
        // second panel), and the whole `pack` (groups of panels, serial and parallel).
        let x = Lines {
            data: &data,
            lines,
            depth,
            ls: 1,
            ds: lines,
        };
        let panels = lines.div_ceil(MR);
        let mut want = vec![7u32; panels * kp * MR];
        for (pi, d) in want.chunks_mut(kp * MR).enumerate() {
            panel_scalar::<MR>(&x, pi * MR, kp, d);
        }
        for first in 0..panels.min(2) {
            let mut got = vec![0xdead_beef_u32; (panels - first) * kp * MR];
            // SAFETY: the feature was detected; the view covers `data`.
            unsafe {
                avx512::pack_lines_contiguous::<MR>(&x, first * MR, panels - first, kp, &mut got)
            };
            assert_eq!(
                got,
                want[first * kp * MR..],
                "{panels} MR panels from {first}"
            );
        }
        for par in [false, true] {
            let mut got = vec![0xdead_beef_u32; 3];
            super::pack::pack::<MR>(x, kp, par, &mut got);
            assert_eq!(got, want, "pack, {lines}x{depth}, par {par}");
        }
    }
}

/// Contiguous lines wider than one group of panels: `pack` writes the same panels as the
/// scalar packer, panel by panel.
#[test]
fn grouped_lines_packing_matches_the_scalar_packer() {
    let mut r = Rng::new(9);
    let (lines, depth) = (600, 9);
    let data = special_values(&mut r, lines * depth);
    let kp = depth.div_ceil(2);
    let x = Lines {
        data: &data,
        lines,
        depth,
        ls: 1,
        ds: lines,
    };
    let panels = lines.div_ceil(NR);
    let mut want = vec![0u32; panels * kp * NR];
    for (pi, d) in want.chunks_mut(kp * NR).enumerate() {
        panel_scalar::<NR>(&x, pi * NR, kp, d);
    }
    for par in [false, true] {
        let mut got = vec![0xdead_beef_u32; 5];
        super::pack::pack::<NR>(x, kp, par, &mut got);
        assert_eq!(got, want, "par {par}");
    }
}

/// `C` (row stride `c_rs`) against f64 sums of the given operand values: `|c - want| ≤ tol ·
/// (Σ|a||b| + |C₀|)` per element.
#[allow(clippy::too_many_arguments)]
fn assert_close(
    c: &[f32],
    c_rs: usize,
    c0: &[f32],
    a: &MatRef,
    b: &MatRef,
    alpha: f32,
    round: bool,
    tol: f64,
    what: &str,
) {
    let f = |x: f32| {
        if round {
            round_bf16(x) as f64
        } else {
            x as f64
        }
    };
    for i in 0..a.rows {
        for j in 0..b.cols {
            let (mut s, mut mag) = (0.0f64, 0.0f64);
            for p in 0..a.cols {
                let x = f(a.data[i * a.rs + p * a.cs]) * f(b.data[p * b.rs + j * b.cs]);
                s += x;
                mag += x.abs();
            }
            let base = c0[i * c_rs + j] as f64;
            let want = base + alpha as f64 * s;
            let got = c[i * c_rs + j] as f64;
            let bound = tol * (alpha.abs() as f64 * mag + base.abs()) + 1e-30;
            assert!(
                (got - want).abs() <= bound,
                "{what}: C[{i},{j}] = {got}, want {want} (bound {bound})"
            );
        }
    }
}

#[test]
fn fast_and_portable_paths_match_f64_on_odd_shapes_views_and_accumulation() {
    let mut r = Rng::new(17);
    let shapes = [
        (1, 1, 1),
        (3, 5, 7),
        (13, 33, 31),
        (12, 2, 32),
        (67, 257, 129),
        (100, 531, 70),
        (200, 64, 300),
    ];
    for &(m, k, n) in &shapes {
        let mut a = vec![0.0; m * k];
        let mut b = vec![0.0; k * n];
        r.fill_normal(&mut a, 1.0);
        r.fill_normal(&mut b, 1.0);
        let at: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
        // A strided copy of A inside a wider buffer (a column block).
        let wide = k + 3;
        let mut aw = vec![9.0; m * wide];
        for i in 0..m {
            aw[i * wide + 2..i * wide + 2 + k].copy_from_slice(&a[i * k..(i + 1) * k]);
        }
        let views = [
            ("plain", MatRef::new(&a, m, k), MatRef::new(&b, k, n)),
            (
                "transposed",
                MatRef::new(&at, k, m).t(),
                MatRef::new(&bt, n, k).t(),
            ),
            (
                "strided",
                MatRef::strided(&aw[2..], m, k, wide),
                MatRef::new(&bt, n, k).t(),
            ),
        ];
        for (name, av, bv) in views {
            for &(accumulate, alpha) in &[(false, 1.0f32), (true, 0.5)] {
                let c_rs = n + 1;
                let mut c0 = vec![0.0; m * c_rs];
                if accumulate {
                    r.fill_normal(&mut c0, 1.0);
                }
                let mut fast = c0.clone();
                gemm(&mut fast, c_rs, av, bv, alpha, accumulate, true);
                let mut port = c0.clone();
                gemm_reference(&mut port, c_rs, av, bv, alpha, accumulate, true);
                let what = format!("{m}x{k}x{n} {name} acc={accumulate}");
                // Exact bf16 products summed in f32 (in two orders) vs in f64.
                assert_close(&fast, c_rs, &c0, &av, &bv, alpha, true, 1e-5, &what);
                assert_close(&port, c_rs, &c0, &av, &bv, alpha, true, 1e-5, &what);
                // Against the unrounded f32 operands: two bf16 roundings, ≤ 2⁻⁸ each.
                assert_close(&fast, c_rs, &c0, &av, &bv, alpha, false, 8e-3, &what);
                // The padding column of C is never written.
                if !accumulate {
                    assert!((0..m).all(|i| fast[i * c_rs + n] == 0.0), "{what}");
                }
                for (x, y) in fast.iter().zip(&port) {
                    assert!(
                        (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                        "{what}: {x} vs {y}"
                    );
                }
            }
        }
    }
}

#[test]
fn serial_and_parallel_runs_agree_bitwise() {
    let (m, k, n) = (150, 300, 200);
    let mut r = Rng::new(23);
    let mut a = vec![0.0; m * k];
    let mut b = vec![0.0; k * n];
    r.fill_normal(&mut a, 1.0);
    r.fill_normal(&mut b, 1.0);
    let run = |par: bool| {
        let mut c = vec![0.0; m * n];
        gemm(
            &mut c,
            n,
            MatRef::new(&a, m, k),
            MatRef::new(&b, k, n),
            1.0,
            false,
            par,
        );
        c
    };
    assert_eq!(run(true), run(false));
}
