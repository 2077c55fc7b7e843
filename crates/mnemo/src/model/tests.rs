//! Whole-model tests: finite-difference gradients, masked targets, frozen backbones, Engram
//! errors and mHC diagnostics.

use super::*;
use crate::config::{ModelConfig, Residual};
use crate::engram;
use crate::kernels::rope::RopeLayout;

pub(crate) fn small_cfg(tied: bool, kv: usize, layout: RopeLayout) -> ModelConfig {
    ModelConfig {
        vocab_size: 19,
        d_model: 12,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: kv,
        head_dim: 6,
        rope_theta: 10000.0,
        rope_dim: 4,
        rope_layout: layout,
        ffn_hidden: 10,
        tied_embeddings: tied,
        norm_eps: 1e-5,
        init_std: 0.3,
        max_seq_len: 16,
        ..ModelConfig::dense_defaults()
    }
}

/// [`small_cfg`] with MoE layers: 1 shared + 4 routed experts of width 4, top-2.
fn small_moe_cfg() -> ModelConfig {
    ModelConfig {
        ffn: crate::config::FfnKind::Moe,
        n_routed_experts: 4,
        n_shared_experts: 1,
        moe_inter: 4,
        top_k: 2,
        ..small_cfg(true, 2, RopeLayout::Interleaved)
    }
}

/// The mean loss of `m`'s architecture with parameters `p` on (`tokens`, `targets`): the
/// function a finite-difference check differentiates.
fn loss_at<'a>(
    m: &'a Model,
    tokens: &'a [u32],
    targets: &'a [u32],
    b: usize,
    t: usize,
) -> impl Fn(&[f32]) -> f64 + 'a {
    move |p: &[f32]| {
        let mm = Model {
            params: p.to_vec().into(),
            ..Model::new(m.cfg.clone()).unwrap()
        };
        let mut ws = Workspace::default();
        mm.forward(tokens, b, t, &mut ws);
        mm.loss(targets, &mut ws)
    }
}

/// `skip_head` (the MoE balancing sample's forward) stops after the last layer: the same
/// router scores as a full forward, plain and with hyper-connections, and no logits.
#[test]
fn skip_head_keeps_the_layers_and_drops_the_logits() {
    for residual in [crate::config::Residual::Plain, crate::config::Residual::Mhc] {
        let cfg = ModelConfig {
            residual,
            ..small_moe_cfg()
        };
        let mut m = Model::new(cfg).unwrap();
        m.init(5);
        let tokens: Vec<u32> = (0..2 * 7).map(|i| (i * 5 % 19) as u32).collect();
        let mut full = Workspace::default();
        m.forward(&tokens, 2, 7, &mut full);
        let mut cut = Workspace {
            skip_head: true,
            ..Default::default()
        };
        m.forward(&tokens, 2, 7, &mut cut);
        assert!(!full.moe_scores()[1].is_empty());
        assert_eq!(full.moe_scores(), cut.moe_scores(), "{residual:?}");
        assert!(full.logits.iter().any(|&x| x != 0.0));
        assert!(cut.logits.iter().all(|&x| x == 0.0), "{residual:?}");
    }
}

/// `bias_fit_rate_after`: up to that step the refit jumps to the batch's fit (rate 1),
/// after it the bias moves `bias_fit_rate` of the way.
#[test]
fn moe_bias_refit_rate_applies_after_its_step() {
    let mut cfg = small_moe_cfg();
    cfg.bias_fit_iters = 8;
    cfg.bias_fit_hard_rounds = 2;
    cfg.bias_fit_rate = 0.25;
    cfg.bias_fit_rate_after = 10;
    let mut rng = crate::rng::Rng::new(3);
    let scores: Vec<f32> = (0..64 * 4).map(|_| rng.next_f64() as f32).collect();
    let per_layer: Vec<&[f32]> = vec![&scores[..]; cfg.n_layers];
    let bias_after = |step: u64, rate_one: bool| {
        let mut c = cfg.clone();
        if rate_one {
            c.bias_fit_rate = 1.0;
        }
        let mut m = Model::new(c).unwrap();
        m.fit_moe_bias(&per_layer, 8, step);
        m.moe_bias_range(1).unwrap()
    };
    let full = bias_after(1, true);
    assert_ne!(full, (0.0, 0.0), "the refit moved nothing");
    assert_eq!(
        bias_after(10, false),
        full,
        "rate 1 up to bias_fit_rate_after"
    );
    let (lo, hi) = bias_after(11, false);
    assert!(
        (lo - 0.25 * full.0).abs() < 1e-6 && (hi - 0.25 * full.1).abs() < 1e-6,
        "{lo} {hi} vs {full:?}"
    );
}

#[test]
fn whole_model_gradient_matches_finite_differences() {
    for (tied, kv, layout, yarn) in [
        (true, 2, RopeLayout::Interleaved, false),
        (false, 1, RopeLayout::Half, false),
        // YaRN: scaled frequencies and the mscale² softmax temperature.
        (false, 2, RopeLayout::Half, true),
    ] {
        let mut cfg = small_cfg(tied, kv, layout);
        if yarn {
            cfg.rope_scaling = Some(crate::kernels::rope::RopeScaling::yarn(4.0, 4));
        }
        let mut m = Model::new(cfg).unwrap();
        m.init(1);
        // Perturb norms away from 1 so their gradients are exercised generically.
        let mut r = Rng::new(5);
        for t in m.layout.tensors.clone() {
            if t.shape.len() == 1 {
                for p in &mut m.params[t.range()] {
                    *p += 0.2 * r.normal() as f32;
                }
            }
        }
        let (b, t) = (2, 5);
        let tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % 19) as u32).collect();
        let targets: Vec<u32> = (0..b * t).map(|i| (i * 5 % 19) as u32).collect();
        let mut ws = Workspace::default();
        let mut grads = vec![0.0; m.layout.total];
        m.forward_backward(&tokens, &targets, b, t, &mut grads, 1.0, &mut ws);
        let params = m.params.clone();
        let loss = loss_at(&m, &tokens, &targets, b, t);
        crate::kernels::gradcheck::check(&params, &grads, loss, 1e-2, 1e-2);
    }
}

#[test]
fn ignored_targets_are_left_out_of_the_loss_and_its_gradient() {
    use crate::kernels::cross_entropy::IGNORE;
    let mut m = Model::new(small_cfg(false, 2, RopeLayout::Half)).unwrap();
    m.init(3);
    let (b, t) = (2, 5);
    let tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % 19) as u32).collect();
    let full: Vec<u32> = (0..b * t).map(|i| (i * 5 % 19) as u32).collect();
    let kept = [1usize, 4, 5, 9];
    let targets: Vec<u32> = (0..b * t)
        .map(|i| if kept.contains(&i) { full[i] } else { IGNORE })
        .collect();
    // The loss is the mean over the kept positions only, computed by hand from the logits.
    let mut ws = Workspace::default();
    m.forward(&tokens, b, t, &mut ws);
    let v = m.cfg.vocab_size;
    let manual = kept
        .iter()
        .map(|&i| {
            let z = &ws.logits[i * v..(i + 1) * v];
            let mx = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let s: f64 = z.iter().map(|&x| (x as f64 - mx).exp()).sum();
            mx + s.ln() - z[full[i] as usize] as f64
        })
        .sum::<f64>()
        / kept.len() as f64;
    assert!((m.loss(&targets, &mut ws) - manual).abs() < 1e-5);
    let mut grads = vec![0.0; m.layout.total];
    let l = m.forward_backward(&tokens, &targets, b, t, &mut grads, 1.0, &mut ws);
    assert!((l - manual).abs() < 1e-5);
    let params = m.params.clone();
    let loss = loss_at(&m, &tokens, &targets, b, t);
    crate::kernels::gradcheck::check(&params, &grads, loss, 1e-2, 1e-2);
    // Nothing counted: zero loss and zero gradient.
    let none = vec![IGNORE; b * t];
    let mut g0 = vec![0.0; m.layout.total];
    assert_eq!(
        m.forward_backward(&tokens, &none, b, t, &mut g0, 1.0, &mut ws),
        0.0
    );
    assert!(g0.iter().all(|&g| g == 0.0));
    // The sentinel can never be a token id.
    let mut big = small_cfg(false, 2, RopeLayout::Half);
    big.vocab_size = IGNORE as usize;
    let e = big.validate().unwrap_err().to_string();
    assert!(e.contains("vocab_size"), "{e}");
}

#[test]
fn whole_model_gradient_matches_finite_differences_with_hyper_connections() {
    for (residual, n) in [(Residual::Mhc, 3), (Residual::Hc, 3), (Residual::Mhc, 1)] {
        let mut cfg = small_cfg(false, 2, RopeLayout::Half);
        cfg.residual = residual;
        cfg.hc_mult = n;
        cfg.hc_sinkhorn_iters = 20;
        let mut m = Model::new(cfg).unwrap();
        m.init(1);
        // Move every norm and hyper-connection parameter away from its init so that the
        // dynamic coefficient paths are exercised.
        let mut r = Rng::new(5);
        for t in m.layout.tensors.clone() {
            let s = if is_hc_tensor(&t.name) {
                0.4
            } else if t.shape.len() == 1 {
                0.2
            } else {
                continue;
            };
            for p in &mut m.params[t.range()] {
                *p += s * r.normal() as f32;
            }
        }
        let (b, t) = (2, 5);
        let tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % 19) as u32).collect();
        let targets: Vec<u32> = (0..b * t).map(|i| (i * 5 % 19) as u32).collect();
        let mut ws = Workspace::default();
        let mut grads = vec![0.0; m.layout.total];
        m.forward_backward(&tokens, &targets, b, t, &mut grads, 1.0, &mut ws);
        let loss = loss_at(&m, &tokens, &targets, b, t);
        crate::kernels::gradcheck::check(&m.params, &grads, &loss, 1e-2, 1e-2);
        // Just the hyper-connection parameters (a small share of the whole vector).
        // (f32 central differences resolve gradients down to ~1e-5; smaller ones are
        // covered by the per-layer checks in `mhc`.)
        let mut checked = 0;
        for spec in m.layout.tensors.iter().filter(|t| is_hc_tensor(&t.name)) {
            let r = spec.range();
            let gn = grads[r.clone()].iter().map(|g| g * g).sum::<f32>().sqrt();
            if gn < 1e-3 * (spec.len() as f32).sqrt() {
                continue;
            }
            let sub = |q: &[f32]| {
                let mut p = m.params.clone();
                p[r.clone()].copy_from_slice(q);
                loss(&p)
            };
            crate::kernels::gradcheck::check(
                &m.params[r.clone()],
                &grads[r.clone()],
                sub,
                1e-2,
                2e-2,
            );
            checked += 1;
        }
        assert!(
            checked >= 4,
            "only {checked} hyper-connection tensors checked"
        );
        assert!(ws.first_nonfinite().is_none());
    }
}

/// A deep copy of an Engram (tables copied into RAM), for finite differences.
pub(crate) fn clone_engram(e: &Engram) -> Engram {
    let nb = e.layers[0].gate.n_branch;
    let d = e.layers[0].gate.d;
    let parts = e
        .layers
        .iter()
        .map(|l| {
            let t = crate::engram::EngramTable::from_vec(
                l.table.rows(),
                l.table.dim(),
                l.table.as_slice().to_vec(),
            )
            .unwrap();
            (l.hash.clone(), t, l.params.clone())
        })
        .collect();
    Engram::from_parts(e.cfg.clone(), e.compress.clone(), d, nb, parts).unwrap()
}

pub(crate) fn engram_test_cfg(residual: Residual) -> ModelConfig {
    let mut cfg = small_cfg(false, 2, RopeLayout::Half);
    cfg.residual = residual;
    cfg.hc_mult = 2;
    cfg.hc_sinkhorn_iters = 20;
    cfg.engram = Some(crate::engram::EngramConfig {
        layer_ids: vec![1, 0],
        max_ngram_size: 3,
        n_head_per_ngram: 2,
        head_dim: 3,
        vocab_size_per_ngram: vec![7, 11],
        kernel_size: 2,
        ..Default::default()
    });
    cfg
}

/// Move the Engram gates (conv included) and norms away from their init.
pub(crate) fn perturb_engram(m: &mut Model, seed: u64) {
    let mut r = Rng::new(seed);
    for t in m.layout.tensors.clone() {
        let s = if is_engram_tensor(&t.name) || is_hc_tensor(&t.name) {
            0.3
        } else if t.shape.len() == 1 {
            0.2
        } else {
            continue;
        };
        for p in &mut m.params[t.range()] {
            *p += s * r.normal() as f32;
        }
    }
    m.sync_engram_gates();
}

/// Memory-only fine-tuning's backward (frozen backbone) gives exactly the Engram gate and
/// table gradients of the full backward, and no gradient at all for the backbone.
#[test]
fn frozen_backbone_backward_keeps_engram_gradients_exact() {
    for residual in [Residual::Plain, Residual::Mhc] {
        for ids in [vec![1, 0], vec![1]] {
            let mut cfg = engram_test_cfg(residual);
            cfg.engram.as_mut().unwrap().layer_ids = ids.clone();
            let mut m = Model::new(cfg).unwrap();
            m.init(1);
            perturb_engram(&mut m, 5);
            let (b, t) = (2, 6);
            let tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % 19) as u32).collect();
            let targets: Vec<u32> = (0..b * t).map(|i| (i * 5 % 19) as u32).collect();
            let run = |frozen: bool| {
                let mut ws = Workspace {
                    frozen_backbone: frozen,
                    ..Workspace::default()
                };
                let mut grads = vec![0.0; m.layout.total];
                let loss = m
                    .try_forward_backward(&tokens, &targets, b, t, &mut grads, 1.0, &mut ws)
                    .unwrap();
                (loss, grads, ws.engram_table_grads)
            };
            let (l_full, g_full, tg_full) = run(false);
            let (l_fz, g_fz, tg_fz) = run(true);
            assert_eq!(l_full, l_fz);
            assert_eq!(tg_full, tg_fz, "{residual:?} {ids:?}: table gradients");
            assert!(tg_fz.iter().all(|g| !g.rows.is_empty()));
            let mut engram_seen = 0;
            for spec in &m.layout.tensors {
                let r = spec.range();
                if is_engram_tensor(&spec.name) {
                    assert_eq!(
                        g_full[r.clone()],
                        g_fz[r],
                        "{residual:?} {ids:?}: {}",
                        spec.name
                    );
                    engram_seen += 1;
                } else if (spec.shape.len() >= 2 && !is_hc_tensor(&spec.name))
                    || (ids == [1] && spec.name.starts_with("layers.0."))
                {
                    // Linear weights and the embedding get no gradient, nor anything
                    // below the lowest Engram block; norm weights and hyper-connections
                    // above it still get theirs (dropped by the optimiser).
                    assert!(g_fz[r].iter().all(|&g| g == 0.0), "{}: frozen", spec.name);
                }
            }
            assert!(engram_seen > 0);
        }
    }
}

/// A token id inside the model's vocabulary but outside the tokenizer's (the Engram
/// compression table) is a clear error on the cached (generate, serve) and batched paths.
#[test]
fn engram_token_outside_the_tokenizer_range_is_an_error() {
    let mut m = Model::new(engram_test_cfg(Residual::Plain)).unwrap();
    m.init(1);
    let v = m.cfg.vocab_size as u32;
    let comp = CompressedTokenizer::from_lookup((0..v - 3).collect()).unwrap();
    m.init_engram(comp, 2).unwrap();
    let bad = v - 2; // a valid embedding row, outside the tokenizer
    let tokens = vec![1, 2, bad, 3];
    let want = format!(
        "token id {bad} is outside the tokenizer's range 0..{}",
        v - 3
    );
    let e = m.check_engram_tokens(&tokens).unwrap_err();
    assert!(e.to_string().contains(&want), "{e}");
    let mut cache = crate::generate::KvCache::with_capacity(&m, 16);
    let e = m.forward_cached(&tokens, &mut cache).unwrap_err();
    assert!(e.to_string().contains(&want), "{e}");
    let e = crate::batch::forward_all(&m, &tokens, &mut cache).unwrap_err();
    assert!(format!("{e:#}").contains(&want), "{e:#}");
    assert_eq!(cache.len(), 0);
    m.check_engram_tokens(&[1, 2, v - 4]).unwrap();
    assert!(!m.forward_cached(&[1, 2, 3], &mut cache).unwrap().is_empty());
}

/// A memory-mapped table whose file vanishes before a training step is an error naming
/// the file (no panic), from both the training and the inference forward.
#[test]
fn vanished_mapped_table_is_an_error_naming_the_file() {
    let mut m = Model::new(engram_test_cfg(Residual::Plain)).unwrap();
    m.init(1);
    let dir = std::env::temp_dir().join(format!("mnemo-vanish-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("engram_table.1.f32");
    {
        let e = m.engram.as_mut().unwrap();
        let l = &mut e.layers[0];
        l.table.write_file(&path).unwrap();
        l.table =
            engram::EngramTable::open_mapped(&path, l.table.rows(), l.table.dim(), true).unwrap();
    }
    let (b, t) = (1, 5);
    let tokens: Vec<u32> = (0..5).collect();
    let mut grads = vec![0.0; m.layout.total];
    let mut ws = Workspace::default();
    m.try_forward_backward(&tokens, &tokens, b, t, &mut grads, 1.0, &mut ws)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    let e = m
        .try_forward_backward(&tokens, &tokens, b, t, &mut grads, 1.0, &mut ws)
        .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("engram_table.1.f32") && msg.contains("vanished"),
        "{msg}"
    );
    let e = m.try_forward(&tokens, b, t, &mut ws).unwrap_err();
    assert!(format!("{e:#}").contains("engram_table.1.f32"));
    assert!(m.check_engram_tables().is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn whole_model_gradient_matches_finite_differences_with_engram() {
    for residual in [Residual::Plain, Residual::Mhc] {
        let mut m = Model::new(engram_test_cfg(residual)).unwrap();
        m.init(1);
        m.engram_eot = Some(3);
        perturb_engram(&mut m, 5);
        let (b, t) = (2, 6);
        // Token 3 (the EOT) ends a document inside the first row.
        let mut tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % 19) as u32).collect();
        tokens[3] = 3;
        let targets: Vec<u32> = (0..b * t).map(|i| (i * 5 % 19) as u32).collect();
        let mut ws = Workspace::default();
        let mut grads = vec![0.0; m.layout.total];
        m.forward_backward(&tokens, &targets, b, t, &mut grads, 1.0, &mut ws);
        let mm = std::cell::RefCell::new(Model {
            params: m.params.clone(),
            engram: Some(clone_engram(m.engram.as_ref().unwrap())),
            engram_eot: m.engram_eot,
            ..Model::new(m.cfg.clone()).unwrap()
        });
        let loss_with = |p: &[f32]| {
            let mut mm = mm.borrow_mut();
            mm.params.copy_from_slice(p);
            let mut ws = Workspace::default();
            mm.forward(&tokens, b, t, &mut ws);
            mm.loss(&targets, &mut ws)
        };
        crate::kernels::gradcheck::check(&m.params, &grads, loss_with, 1e-2, 1e-2);
        // Every Engram gate tensor on its own.
        let mut checked = 0;
        for spec in m
            .layout
            .tensors
            .iter()
            .filter(|t| is_engram_tensor(&t.name))
        {
            let r = spec.range();
            let gn = grads[r.clone()].iter().map(|g| g * g).sum::<f32>().sqrt();
            if gn < 1e-3 * (spec.len() as f32).sqrt() {
                continue;
            }
            let sub = |q: &[f32]| {
                let mut p = m.params.clone();
                p[r.clone()].copy_from_slice(q);
                loss_with(&p)
            };
            crate::kernels::gradcheck::check(
                &m.params[r.clone()],
                &grads[r.clone()],
                sub,
                1e-2,
                2e-2,
            );
            checked += 1;
        }
        assert!(checked >= 6, "only {checked} engram tensors checked");
        mm.borrow_mut().params.copy_from_slice(&m.params);
        // Table rows: the sparse gradient against finite differences of the entries.
        let e = m.engram.as_ref().unwrap();
        assert_eq!(ws.engram_table_grads.len(), 2);
        for (i, tg) in ws.engram_table_grads.iter().enumerate() {
            let dim = e.layers[i].table.dim();
            assert!(!tg.rows.is_empty());
            let mut dense = vec![0.0f32; e.layers[i].table.rows() * dim];
            tg.add_to_dense(&mut dense);
            let orig = e.layers[i].table.as_slice().to_vec();
            let sub = |q: &[f32]| {
                let mut g = mm.borrow_mut();
                let tab = g.engram.as_mut().unwrap().layers[i].table.as_mut_slice();
                tab.unwrap().copy_from_slice(q);
                let mut ws = Workspace::default();
                g.forward(&tokens, b, t, &mut ws);
                g.loss(&targets, &mut ws)
            };
            crate::kernels::gradcheck::check(&orig, &dense, sub, 1e-2, 2e-2);
            mm.borrow_mut().engram.as_mut().unwrap().layers[i]
                .table
                .as_mut_slice()
                .unwrap()
                .copy_from_slice(&orig);
        }
    }
}

#[test]
fn mhc_streams_amax_diagnostics_and_nan_location() {
    let mut cfg = small_cfg(true, 2, RopeLayout::Interleaved);
    cfg.residual = Residual::Mhc;
    let mut m = Model::new(cfg).unwrap();
    m.init(2);
    let (b, t) = (1, 6);
    let tokens: Vec<u32> = (0..6).collect();
    let mut ws = Workspace::default();
    m.forward(&tokens, b, t, &mut ws);
    assert!(m.loss(&tokens, &mut ws).is_finite());
    assert_eq!(ws.hc_streams(0).unwrap().len(), t * 4 * 12);
    let g = ws.hc_amax().unwrap();
    assert_eq!(g.len(), 4);
    for x in &g {
        assert!(
            (x[0] - 1.0).abs() < 1e-3 && (x[1] - 1.0).abs() < 1e-2,
            "{x:?}"
        );
    }
    let o = m.layout.get("layers.1.attn_hc.base").unwrap().offset;
    m.params[o + 3] = f32::NAN;
    m.forward(&tokens, b, t, &mut ws);
    assert!(!m.loss(&tokens, &mut ws).is_finite());
    let e = ws.first_nonfinite().unwrap();
    assert!(
        e.contains("coefficients") && e.contains("layer 1 (attention)"),
        "{e}"
    );
}
