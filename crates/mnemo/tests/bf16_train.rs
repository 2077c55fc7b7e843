//! bf16 mixed precision on a whole model: one training step of the `tiny` preset in f32 and
//! in bf16 (`kernels::precision`) from the same weights and batch. The GEMM precision is
//! process-wide, so this lives in its own test binary (the library's gradient checks stay
//! f32) and flips it in a single test.

use mnemo::config::ModelConfig;
use mnemo::kernels::precision::{gemm_precision, set_gemm_precision, Precision};
use mnemo::model::{Model, Workspace};
use mnemo::rng::Rng;

#[test]
fn tiny_bf16_step_has_finite_loss_and_gradients_close_to_f32() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let mut model = Model::new(cfg.clone()).unwrap();
    model.init(7);
    let (b, t) = (2, 64);
    let mut r = Rng::new(3);
    let tokens: Vec<u32> = (0..b * t)
        .map(|_| r.below(cfg.vocab_size as u64) as u32)
        .collect();
    let targets: Vec<u32> = (0..b * t)
        .map(|_| r.below(cfg.vocab_size as u64) as u32)
        .collect();
    let step = |p: Precision| {
        set_gemm_precision(p);
        let mut ws = Workspace::default();
        let mut g = vec![0.0f32; model.layout.total];
        let loss = model.forward_backward(&tokens, &targets, b, t, &mut g, 1.0, &mut ws);
        (loss, g)
    };
    let (lf, gf) = step(Precision::F32);
    let (lb, gb) = step(Precision::Bf16);
    set_gemm_precision(Precision::F32);
    assert_eq!(gemm_precision(), Precision::F32);
    assert!(lb.is_finite() && gb.iter().all(|x| x.is_finite()));
    // The switch reaches the model's products (bf16 rounding changes the result) ...
    assert_ne!(
        lf, lb,
        "bf16 gave the f32 loss bit for bit: GEMM precision not applied"
    );
    // ... and stays within bf16 rounding of f32: the loss to 1e-2 nats, the gradient's
    // direction to a cosine of 0.99.
    assert!((lf - lb).abs() < 1e-2, "loss f32 {lf} vs bf16 {lb}");
    let dot: f64 = gf.iter().zip(&gb).map(|(a, b)| *a as f64 * *b as f64).sum();
    let nf: f64 = gf.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = gb.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
    let cos = dot / (nf * nb);
    assert!(cos > 0.99, "gradient cosine f32 vs bf16 {cos}");
    assert!(
        (nb / nf - 1.0).abs() < 0.02,
        "gradient norm f32 {nf} vs bf16 {nb}"
    );
    eprintln!("loss f32 {lf} bf16 {lb}; gradient cosine {cos}, norms {nf} / {nb}");
}
