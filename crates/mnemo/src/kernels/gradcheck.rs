//! Finite-difference gradient checking, used by every kernel's tests.

/// Compare `analytic` (dL/dx) with central differences of `loss` around `x`.
///
/// The relative error is measured over the whole vector, `‖num − ana‖ / max(‖num‖, ‖ana‖, 1e-6)`,
/// which is robust to individual near-zero entries; panics with both vectors when it exceeds `tol`.
pub fn check(x: &[f32], analytic: &[f32], loss: impl Fn(&[f32]) -> f64, eps: f32, tol: f64) {
    assert_eq!(x.len(), analytic.len());
    let mut num = vec![0.0f64; x.len()];
    let mut p = x.to_vec();
    // Check at most ~200 coordinates, spread over the vector.
    let step = (x.len() / 200).max(1);
    for i in (0..x.len()).step_by(step) {
        let orig = p[i];
        p[i] = orig + eps;
        let lp = loss(&p);
        p[i] = orig - eps;
        let lm = loss(&p);
        p[i] = orig;
        num[i] = (lp - lm) / (2.0 * eps as f64);
    }
    let (mut diff, mut nn, mut na) = (0.0f64, 0.0f64, 0.0f64);
    for i in (0..x.len()).step_by(step) {
        let a = analytic[i] as f64;
        diff += (num[i] - a).powi(2);
        nn += num[i].powi(2);
        na += a * a;
    }
    let rel = diff.sqrt() / nn.sqrt().max(na.sqrt()).max(1e-6);
    assert!(
        rel < tol,
        "gradient check failed: relative error {rel:.3e} > {tol:.1e}\nnumeric  {:?}\nanalytic {:?}",
        &num.iter().step_by(step).take(12).collect::<Vec<_>>(),
        &analytic.iter().step_by(step).take(12).collect::<Vec<_>>()
    );
}
