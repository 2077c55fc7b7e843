//! The Rust model against the independent PyTorch reference (`reference/make_fixtures.py`):
//! same weights and tokens in, logits/loss within 1e-5 relative error and every parameter
//! gradient within 1e-4 relative error out — dense (MHA/GQA/MQA, tied/untied, both RoPE layouts)
//! DeepSeekMoE (sigmoid/sqrtsoftplus routers, shared experts, hash routing, balance loss), and
//! the hyper-connection residuals (mHC with n = 4 and 20 Sinkhorn iterations, HC with n = 3),
//! and DeepSeek Sparse Attention (indexer, top-k selection, sparse attention, the indexer KL
//! of both training stages).

use mnemo::config::ModelConfig;
use mnemo::io::safetensors::TensorFile;
use mnemo::model::{Model, Workspace};
use std::path::PathBuf;

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        d += (*x as f64 - *y as f64).powi(2);
        n += (*y as f64).powi(2);
    }
    d.sqrt() / n.sqrt().max(1e-30)
}

fn check_fixture(name: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.safetensors"));
    let f = TensorFile::open(&path).unwrap();
    let meta = f.metadata().unwrap();
    let cfg: ModelConfig = serde_json::from_str(&meta["config"]).unwrap();
    let b: usize = meta["batch"].parse().unwrap();
    let t: usize = meta["seq_len"].parse().unwrap();
    let mut model = Model::new(cfg.clone()).unwrap();
    mnemo::io::checkpoint::load_weights(&mut model, &path).unwrap();
    let tokens = f.u32("tokens").unwrap();
    let targets = f.u32("targets").unwrap();
    let mut ws = Workspace::default();
    model.forward(&tokens, b, t, &mut ws);
    let want_logits = f.f32("logits", Some(&[b, t, cfg.vocab_size])).unwrap();
    let e = rel_err(&ws.logits, &want_logits);
    assert!(e < 1e-5, "{name}: logits relative error {e:.2e}");
    // Mean cross-entropy plus the MoE balance loss (when the config enables it).
    let loss = model.loss(&targets, &mut ws) + ws.aux_loss;
    let want_loss = f.f32("loss", Some(&[1])).unwrap()[0] as f64;
    let le = (loss - want_loss).abs() / want_loss.abs();
    assert!(
        le < 1e-5,
        "{name}: loss {loss} vs {want_loss} (relative error {le:.2e})"
    );
    let mut grads = vec![0.0; model.layout.total];
    let loss2 = model.forward_backward(&tokens, &targets, b, t, &mut grads, 1.0, &mut ws);
    assert_eq!(loss, loss2);
    let mut worst = (0.0, String::new());
    // A tensor whose gradient is tiny next to the model's (a scalar such as mHC's head scale,
    // ~1e-4 of the total) is judged against 1% of the global gradient norm instead of its own
    // norm: its f32 round-off is ~1e-7 absolute, which is noise, not a mismatch.
    let wants: Vec<Vec<f32>> = model
        .layout
        .tensors
        .iter()
        .filter(|t| t.trainable)
        .map(|spec| {
            f.f32(&format!("grad.{}", spec.name), Some(&spec.shape))
                .unwrap()
        })
        .collect();
    let global = wants
        .iter()
        .flatten()
        .map(|&v| (v as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    for (spec, want) in model
        .layout
        .tensors
        .iter()
        .filter(|t| t.trainable)
        .zip(&wants)
    {
        let own = want.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let e = rel_err(&grads[spec.range()], want) * own.max(1e-30) / own.max(1e-2 * global);
        if e > worst.0 {
            worst = (e, spec.name.clone());
        }
        assert!(
            e < 1e-4,
            "{name}: gradient of {} relative error {e:.2e}",
            spec.name
        );
    }
    eprintln!(
        "{name}: logits {e:.1e}, loss {le:.1e}, worst gradient {:.1e} ({})",
        worst.0, worst.1
    );
}

#[test]
fn mha_tied_interleaved() {
    check_fixture("mha_tied_interleaved");
}
#[test]
fn gqa_untied_half_partial_rope() {
    check_fixture("gqa_untied_half_partial");
}
#[test]
fn mqa_tied_half() {
    check_fixture("mqa_tied_half");
}
#[test]
fn gqa_long_untied_multiple_attention_blocks() {
    check_fixture("gqa_long_untied");
}
#[test]
fn moe_sigmoid_shared_expert_dense_first_layer() {
    check_fixture("moe_sigmoid");
}
#[test]
fn moe_sqrtsoftplus_with_hash_routed_layer() {
    check_fixture("moe_sqrtsoftplus_hash");
}
#[test]
fn moe_balance_loss_without_shared_experts() {
    check_fixture("moe_aux_noshared");
}
#[test]
fn mhc_four_streams_sinkhorn_20_iterations() {
    check_fixture("mhc_n4_gqa");
}
#[test]
fn hc_three_streams_untied_half_rope() {
    check_fixture("hc_n3_untied");
}

#[test]
fn dsa_indexer_topk_sparse_attention_and_kl() {
    // Logits, LM loss and the gradients of LM + L_I (sparse stage) of every parameter.
    check_fixture("dsa_gqa_top5");
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dsa_gqa_top5.safetensors");
    let f = TensorFile::open(&path).unwrap();
    let meta = f.metadata().unwrap();
    let cfg: ModelConfig = serde_json::from_str(&meta["config"]).unwrap();
    let (b, t) = (2, 12);
    assert_eq!(meta["seq_len"], "12");
    let mut model = Model::new(cfg.clone()).unwrap();
    mnemo::io::checkpoint::load_weights(&mut model, &path).unwrap();
    let tokens = f.u32("tokens").unwrap();
    let targets = f.u32("targets").unwrap();
    let mut ws = Workspace::default();
    let mut grads = vec![0.0; model.layout.total];
    model.forward_backward(&tokens, &targets, b, t, &mut grads, 1.0, &mut ws);
    // The selection, as a 0/1 [b·t, t] mask per layer.
    for l in 0..cfg.n_layers {
        let want: Vec<i64> = f
            .u32_shaped(&format!("dsa.sel.{l}"), Some(&[b * t, t]))
            .unwrap()
            .iter()
            .map(|&x| x as i64)
            .collect();
        let (idx, k_max) = ws.dsa_selection(l).unwrap();
        let mut got = vec![0i64; b * t * t];
        for r in 0..b * t {
            for &s in idx[r * k_max..(r + 1) * k_max].iter().filter(|&&s| s >= 0) {
                got[r * t + s as usize % t] = 1;
            }
        }
        assert_eq!(got, want, "layer {l} selection");
    }
    let kl = f.f32("dsa_kl", Some(&[1])).unwrap()[0] as f64;
    let e = (ws.dsa_stats.kl - kl).abs() / kl;
    assert!(e < 1e-5, "sparse-stage L_I {} vs {kl}", ws.dsa_stats.kl);
    // Warm-up: dense attention, only the indexer's KL gradient.
    let run = mnemo::dsa::DsaRun {
        stage: mnemo::config::DsaStage::Warmup,
        kl: true,
        recall: false,
    };
    grads.fill(0.0);
    model.forward_backward_dsa(&tokens, &targets, b, t, &mut grads, 1.0, &mut ws, run);
    let kl = f.f32("warmup.dsa_kl", Some(&[1])).unwrap()[0] as f64;
    let e = (ws.dsa_stats.kl - kl).abs() / kl;
    assert!(e < 1e-5, "warm-up L_I {} vs {kl}", ws.dsa_stats.kl);
    for spec in &model.layout.tensors {
        let g = &grads[spec.range()];
        if mnemo::model::is_indexer_tensor(&spec.name) {
            let want = f
                .f32(&format!("warmup.grad.{}", spec.name), Some(&spec.shape))
                .unwrap();
            let e = rel_err(g, &want);
            assert!(
                e < 1e-4,
                "warm-up gradient of {}: relative error {e:.2e}",
                spec.name
            );
        } else {
            assert!(
                g.iter().all(|&x| x == 0.0),
                "{} has a warm-up gradient",
                spec.name
            );
        }
    }
}
