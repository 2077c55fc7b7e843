//! Tests of [`super`] (HC / mHC): Sinkhorn (doubly stochastic, eq. 9, the unrolled steps
//! against the general loop), finite-difference checks of the layer and head gradients, the
//! composite gains.
use super::*;
use crate::kernels::gradcheck::check;
use crate::rng::Rng;

/// The unrolled Sinkhorn steps (2–4 streams) give the general loop's bits, forward and
/// backward, on matrices from near-uniform to peaked.
#[test]
fn unrolled_sinkhorn_steps_match_the_general_loop_bit_for_bit() {
    let mut r = Rng::new(11);
    for n in 2..=4 {
        for scale in [0.1f32, 2.0, 30.0] {
            let mut p = vec![0.0f32; n * n];
            let mut g = vec![0.0f32; n * n];
            let mut y = vec![0.0f32; n * n];
            r.fill_normal(&mut p, scale);
            r.fill_normal(&mut g, 1.0);
            r.fill_normal(&mut y, 1.0);
            p.iter_mut().for_each(|v| *v = v.exp());
            for col in [true, false] {
                let (mut a, mut b) = (p.clone(), p.clone());
                normalize(&mut a, n, col, 1e-6);
                normalize_any(&mut b, n, col, 1e-6);
                assert_eq!(a, b, "forward n={n} col={col} scale={scale}");
                let (mut ga, mut gb) = (g.clone(), g.clone());
                match n {
                    2 => normalize_backward_fixed::<2>(&mut ga, &p, &y, col, 1e-6),
                    3 => normalize_backward_fixed::<3>(&mut ga, &p, &y, col, 1e-6),
                    _ => normalize_backward_fixed::<4>(&mut ga, &p, &y, col, 1e-6),
                }
                normalize_backward_any(&mut gb, &p, &y, n, col, 1e-6);
                assert_eq!(ga, gb, "backward n={n} col={col} scale={scale}");
            }
        }
    }
}

fn dims(kind: Residual, n: usize, d: usize) -> HcDims {
    HcDims {
        kind,
        n,
        d,
        iters: 20,
        eps: 1e-6,
        norm_eps: 1e-5,
    }
}

#[test]
fn sinkhorn_is_nearly_doubly_stochastic_and_matches_eq9() {
    let n = 4;
    let mut r = Rng::new(3);
    let mut l = vec![0.0f32; n * n];
    r.fill_normal(&mut l, 2.0);
    let mut c = vec![0.0f32; n * n];
    sinkhorn_forward(&mut c, &l, n, 20, 1e-6);
    // comb columns exact (= rows of H_res), rows approximately 1.
    for k in 0..n {
        let col: f32 = (0..n).map(|j| c[j * n + k]).sum();
        assert!((col - 1.0).abs() < 1e-5, "column {k}: {col}");
        let row: f32 = (0..n).map(|j| c[k * n + j]).sum();
        assert!((row - 1.0).abs() < 1e-3, "row {k}: {row}");
    }
    // Eq. 9 on H_res = combᵀ: M0 = exp(Lᵀ), then 20 × (T_c then T_r), in f64.
    let mut h: Vec<f64> = (0..n * n)
        .map(|i| (l[(i % n) * n + i / n] as f64).exp())
        .collect();
    for _ in 0..20 {
        for (col, _) in [(true, 0), (false, 0)] {
            for a in 0..n {
                let s: f64 = (0..n)
                    .map(|b| if col { h[b * n + a] } else { h[a * n + b] })
                    .sum();
                for b in 0..n {
                    let i = if col { b * n + a } else { a * n + b };
                    h[i] /= s;
                }
            }
        }
    }
    for j in 0..n {
        for k in 0..n {
            assert!((h[k * n + j] - c[j * n + k] as f64).abs() < 1e-4);
        }
    }
}

#[test]
fn sinkhorn_gradient_matches_finite_differences_at_20_iterations() {
    let n = 4;
    let mut r = Rng::new(7);
    for scale in [0.5f32, 2.0] {
        let mut l = vec![0.0f32; n * n];
        r.fill_normal(&mut l, scale);
        let mut g = vec![0.0f32; n * n];
        r.fill_normal(&mut g, 1.0);
        let mut dl = vec![0.0f32; n * n];
        let mut scratch = Vec::new();
        sinkhorn_backward(&mut dl, &g, &l, n, 20, 1e-6, &mut scratch);
        let loss = |p: &[f32]| {
            // f64 forward for accurate differences.
            let mut c = vec![0.0f64; n * n];
            for j in 0..n {
                let mx = (0..n).map(|k| p[j * n + k]).fold(f32::MIN, f32::max) as f64;
                let z: f64 = (0..n).map(|k| (p[j * n + k] as f64 - mx).exp()).sum();
                for k in 0..n {
                    c[j * n + k] = (p[j * n + k] as f64 - mx).exp() / z + 1e-6;
                }
            }
            for s in 0..sinkhorn_steps(20) {
                let col = step_is_col(s);
                for a in 0..n {
                    let sum: f64 = (0..n)
                        .map(|b| if col { c[b * n + a] } else { c[a * n + b] })
                        .sum();
                    for b in 0..n {
                        let i = if col { b * n + a } else { a * n + b };
                        c[i] /= sum + 1e-6;
                    }
                }
            }
            c.iter().zip(&g).map(|(a, b)| a * *b as f64).sum()
        };
        check(&l, &dl, loss, 1e-2, 2e-3);
    }
}

/// One full hyper-connection layer with a linear "sublayer" `out = V · y`:
/// coefficients → read-out → out → merge, loss = Σ G ⊙ x'. Returns (loss, dparams, dx).
fn layer_loss(
    dm: &HcDims,
    p: &[f32],
    o: HcOffsets,
    x: &[f32],
    vmat: &[f32],
    g: &[f32],
    tokens: usize,
    want_grads: bool,
) -> (f64, Vec<f32>, Vec<f32>) {
    let (n, d) = (dm.n, dm.d);
    let mut ssq = vec![0.0f32; tokens * n];
    for (s, xs) in ssq.iter_mut().zip(x.chunks(d)) {
        *s = xs.iter().map(|v| v * v).sum();
    }
    let mut acts = HcActs::new(dm, tokens, false);
    coeffs_forward(dm, p, o, x, &ssq, &mut acts, false);
    readout(&mut acts.y, x, &acts.pre, n, d);
    linear_forward(&mut acts.out, &acts.y, vmat, tokens, d, d, false);
    let mut xn = vec![0.0f32; x.len()];
    let mut ssq2 = vec![0.0f32; tokens * n];
    merge(
        &mut xn, &mut ssq2, x, &acts.out, &acts.post, &acts.comb, n, d,
    );
    let loss: f64 = xn.iter().zip(g).map(|(a, b)| *a as f64 * *b as f64).sum();
    if !want_grads {
        return (loss, vec![], vec![]);
    }
    let mut dout = vec![0.0f32; tokens * d];
    let mut dx = vec![0.0f32; x.len()];
    let mut dcoef = vec![0.0f32; tokens * (n + n * n)];
    merge_backward(
        &mut dout, &mut dx, &mut dcoef, g, x, &acts.out, &acts.post, &acts.comb, n, d,
    );
    let mut dy = vec![0.0f32; tokens * d];
    let mut dv = vec![0.0f32; d * d];
    linear_backward(
        Some((&mut dy, false)),
        &mut dv,
        &dout,
        &acts.y,
        vmat,
        tokens,
        d,
        d,
    );
    let mut grads = vec![0.0f32; p.len()];
    let mut draw = Vec::new();
    coeffs_backward(
        dm, p, &mut grads, o, x, &acts, &dy, &dcoef, &mut dx, &mut draw, false,
    );
    (loss, grads, dx)
}

fn check_layer(kind: Residual) {
    let (n, d, tokens) = (3, 5, 7);
    let dm = dims(kind, n, d);
    let mut off = 0;
    let mut offs = [0usize; 3];
    for (i, (_, shape, _)) in dm.layer_tensors().iter().enumerate() {
        if i < 3 {
            offs[i] = off;
        }
        off += shape.iter().product::<usize>();
    }
    let o = HcOffsets {
        fn_: offs[0],
        scale: offs[1],
        stat: offs[2],
        in_quant: None,
    };
    let mut r = Rng::new(11);
    let mut p = vec![0.0f32; off];
    r.fill_normal(&mut p, 0.5);
    let mut x = vec![0.0f32; tokens * n * d];
    r.fill_normal(&mut x, 1.0);
    let mut vmat = vec![0.0f32; d * d];
    r.fill_normal(&mut vmat, 0.5);
    let mut g = vec![0.0f32; x.len()];
    r.fill_normal(&mut g, 1.0);
    let (_, gp, gx) = layer_loss(&dm, &p, o, &x, &vmat, &g, tokens, true);
    check(
        &p,
        &gp,
        |pp| layer_loss(&dm, pp, o, &x, &vmat, &g, tokens, false).0,
        1e-2,
        1e-2,
    );
    check(
        &x,
        &gx,
        |xx| layer_loss(&dm, &p, o, xx, &vmat, &g, tokens, false).0,
        1e-2,
        1e-2,
    );
}

#[test]
fn mhc_layer_gradients_match_finite_differences() {
    check_layer(Residual::Mhc);
}

#[test]
fn hc_layer_gradients_match_finite_differences() {
    check_layer(Residual::Hc);
}

#[test]
fn mhc_head_gradients_match_finite_differences() {
    let (n, d, tokens) = (4, 3, 5);
    let dm = dims(Residual::Mhc, n, d);
    let o = HcOffsets {
        fn_: 0,
        scale: n * n * d,
        stat: n * n * d + 1,
        in_quant: None,
    };
    let mut r = Rng::new(2);
    let mut p = vec![0.0f32; n * n * d + 1 + n];
    r.fill_normal(&mut p, 0.7);
    let mut x = vec![0.0f32; tokens * n * d];
    r.fill_normal(&mut x, 1.0);
    let mut g = vec![0.0f32; tokens * d];
    r.fill_normal(&mut g, 1.0);
    let run = |p: &[f32], x: &[f32], grads: bool| {
        let mut ssq = vec![0.0f32; tokens * n];
        for (s, xs) in ssq.iter_mut().zip(x.chunks(d)) {
            *s = xs.iter().map(|v| v * v).sum();
        }
        let mut acts = HcActs::new(&dm, tokens, true);
        coeffs_forward(&dm, p, o, x, &ssq, &mut acts, true);
        readout(&mut acts.y, x, &acts.pre, n, d);
        let loss: f64 = acts
            .y
            .iter()
            .zip(&g)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        let mut gp = vec![0.0f32; p.len()];
        let mut dx = vec![0.0f32; x.len()];
        if grads {
            coeffs_backward(
                &dm,
                p,
                &mut gp,
                o,
                x,
                &acts,
                &g,
                &[],
                &mut dx,
                &mut Vec::new(),
                true,
            );
        }
        (loss, gp, dx)
    };
    let (_, gp, gx) = run(&p, &x, true);
    check(&p, &gp, |pp| run(pp, &x, false).0, 1e-2, 1e-2);
    check(&x, &gx, |xx| run(&p, xx, false).0, 1e-2, 1e-2);
}

#[test]
fn amax_gain_of_doubly_stochastic_products_is_one_and_identity_init_of_hc_is_one() {
    let n = 4;
    let mut r = Rng::new(1);
    let layers: Vec<Vec<f32>> = (0..6)
        .map(|_| {
            let mut l = vec![0.0f32; 2 * n * n];
            r.fill_normal(&mut l, 1.0);
            let mut c = vec![0.0f32; 2 * n * n];
            for t in 0..2 {
                sinkhorn_forward(
                    &mut c[t * n * n..(t + 1) * n * n],
                    &l[t * n * n..(t + 1) * n * n],
                    n,
                    20,
                    1e-6,
                );
            }
            c
        })
        .collect();
    let refs: Vec<&[f32]> = layers.iter().map(|v| &v[..]).collect();
    for g in amax_gains(&refs, n, 2) {
        assert!(
            (g[0] - 1.0).abs() < 1e-3 && (g[1] - 1.0).abs() < 1e-3,
            "{g:?}"
        );
    }
    // A scaled identity: gains multiply along the composite.
    let c2: Vec<f32> = (0..n * n)
        .map(|i| if i % (n + 1) == 0 { 2.0 } else { 0.0 })
        .collect();
    let g = amax_gains(&[&c2, &c2, &c2], n, 1);
    assert_eq!(g[2][0], 8.0);
    assert_eq!(g[2][3], 2.0);
}
