use super::*;
use crate::config::{DsaConfig, ModelConfig};
use crate::kernels::rope::RopeLayout;
use crate::model::{Model, Workspace};
use crate::rng::Rng;

pub(crate) fn dsa_cfg(topk: usize, kv: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 19,
        d_model: 12,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: kv,
        head_dim: 6,
        rope_theta: 10000.0,
        rope_dim: 4,
        rope_layout: RopeLayout::Half,
        ffn_hidden: 10,
        tied_embeddings: false,
        norm_eps: 1e-5,
        init_std: 0.3,
        max_seq_len: 16,
        dsa: Some(DsaConfig {
            index_n_heads: 3,
            index_head_dim: 4,
            index_rope_dim: 2,
            index_topk: topk,
        }),
        ..ModelConfig::dense_defaults()
    }
}

/// A DSA model with every norm (and the LayerNorm bias) moved away from its init.
pub(crate) fn dsa_model(topk: usize, kv: usize, seed: u64) -> Model {
    let mut m = Model::new(dsa_cfg(topk, kv)).unwrap();
    m.init(seed);
    let mut r = Rng::new(seed + 10);
    for t in m.layout.tensors.clone() {
        if t.shape.len() == 1 {
            for p in &mut m.params[t.range()] {
                *p += 0.2 * r.normal() as f32;
            }
        }
    }
    m
}

fn batch(b: usize, t: usize) -> (Vec<u32>, Vec<u32>) {
    let x = (0..b * t).map(|i| (i * 7 % 19) as u32).collect();
    let y = (0..b * t).map(|i| (i * 5 % 19) as u32).collect();
    (x, y)
}

#[test]
fn topk_select_is_a_set_with_low_position_ties() {
    let mut out = Vec::new();
    topk_select(&[0.5, 2.0, -1.0, 2.0, 0.5, 3.0], 3, &mut out);
    assert_eq!(out, vec![1, 3, 5]);
    topk_select(&[1.0, 1.0, 1.0, 1.0], 2, &mut out);
    assert_eq!(out, vec![0, 1]);
    topk_select(&[0.1, f32::NAN, 0.3], 2, &mut out);
    assert_eq!(out, vec![0, 2]);
    topk_select(&[4.0, 1.0], 5, &mut out);
    assert_eq!(out, vec![0, 1]);
}

#[test]
fn sparse_equals_dense_when_topk_covers_the_sequence() {
    for kv in [4, 2, 1] {
        let (b, t) = (2, 7);
        let m = dsa_model(t, kv, 3);
        // The same weights without the indexer: a plain dense model.
        let mut dense_cfg = m.cfg.clone();
        dense_cfg.dsa = None;
        let mut dm = Model::new(dense_cfg).unwrap();
        for spec in &dm.layout.tensors {
            let src = m.layout.get(&spec.name).unwrap();
            dm.params[spec.range()].copy_from_slice(&m.params[src.range()]);
        }
        let (x, y) = batch(b, t);
        let (mut ws, mut wd) = (Workspace::default(), Workspace::default());
        m.forward(&x, b, t, &mut ws);
        dm.forward(&x, b, t, &mut wd);
        for (a, c) in ws.logits.iter().zip(&wd.logits) {
            assert!((a - c).abs() < 1e-5, "{a} vs {c}");
        }
        assert!((m.loss(&y, &mut ws) - dm.loss(&y, &mut wd)).abs() < 1e-6);
        // And the gradients of everything but the indexer.
        let mut g = vec![0.0; m.layout.total];
        let mut gd = vec![0.0; dm.layout.total];
        m.forward_backward(&x, &y, b, t, &mut g, 1.0, &mut ws);
        dm.forward_backward(&x, &y, b, t, &mut gd, 1.0, &mut wd);
        for spec in &dm.layout.tensors {
            let src = m.layout.get(&spec.name).unwrap();
            for (a, c) in g[src.range()].iter().zip(&gd[spec.range()]) {
                assert!((a - c).abs() < 1e-5, "{}: {a} vs {c}", spec.name);
            }
        }
    }
}

#[test]
fn small_topk_changes_the_output_and_selection_is_causal() {
    let (b, t) = (2, 9);
    let m = dsa_model(3, 2, 4);
    let (x, _) = batch(b, t);
    let mut ws = Workspace::default();
    m.forward(&x, b, t, &mut ws);
    let da = ws.dsa(0);
    assert_eq!(da.k_max, 3);
    for r in 0..b * t {
        let (s0, i) = (r - r % t, r % t);
        let ids = &da.idx[r * 3..(r + 1) * 3];
        let valid: Vec<i32> = ids.iter().copied().filter(|&s| s >= 0).collect();
        assert_eq!(valid.len(), (i + 1).min(3));
        for &s in &valid {
            assert!(s as usize >= s0 && s as usize <= r, "row {r} selects {s}");
        }
        // The selection is the top-k of a brute-force score row.
        let hi = 3;
        let di = 4;
        let sc: Vec<f32> = (s0..=r)
            .map(|s| {
                score(
                    &da.q[r * hi * di..(r + 1) * hi * di],
                    &da.w[r * hi..(r + 1) * hi],
                    &da.k[s * di..(s + 1) * di],
                )
            })
            .collect();
        let mut want = Vec::new();
        topk_select(&sc, 3, &mut want);
        let want: Vec<i32> = want.iter().map(|&j| (s0 + j as usize) as i32).collect();
        assert_eq!(valid, want);
    }
    let m2 = dsa_model(t, 2, 4);
    let mut ws2 = Workspace::default();
    m2.forward(&x, b, t, &mut ws2);
    let diff: f32 = ws
        .logits
        .iter()
        .zip(&ws2.logits)
        .map(|(a, c)| (a - c).abs())
        .sum();
    assert!(diff > 1e-3, "top-3 of 9 should differ from dense");
}

fn is_indexer(name: &str) -> bool {
    name.contains(".indexer.")
}

#[test]
fn indexer_kl_gradient_matches_finite_differences() {
    for stage in [DsaStage::Dense, DsaStage::Warmup, DsaStage::Sparse] {
        let (b, t) = (2, 6);
        let m = dsa_model(3, 2, 5);
        let (x, y) = batch(b, t);
        let run = DsaRun {
            stage,
            kl: true,
            recall: true,
        };
        let mut ws = Workspace::default();
        let mut g = vec![0.0; m.layout.total];
        m.forward_backward_dsa(&x, &y, b, t, &mut g, 1.0, &mut ws, run);
        let st = ws.dsa_stats;
        assert!(st.kl > 0.0 && st.kl.is_finite(), "{st:?}");
        let rec = st.recall.unwrap();
        assert!(rec > 0.3 && rec <= 1.0 + 1e-5, "{st:?}");
        if stage == DsaStage::Warmup {
            // Warm-up touches nothing but the indexer.
            for spec in m.layout.tensors.iter().filter(|s| !is_indexer(&s.name)) {
                assert!(g[spec.range()].iter().all(|&v| v == 0.0), "{}", spec.name);
            }
        }
        // KL as a function of the indexer parameters, the selection held fixed.
        let mm = std::cell::RefCell::new((
            Model {
                params: m.params.clone(),
                ..Model::new(m.cfg.clone()).unwrap()
            },
            Workspace::default(),
        ));
        {
            let (mm, w2) = &mut *mm.borrow_mut();
            mm.forward_dsa(&x, b, t, w2, run);
            assert_eq!(w2.dsa_stats.kl, st.kl);
            w2.dsa_freeze_selection = true;
        }
        let kl = |p: &[f32]| {
            let (mm, w2) = &mut *mm.borrow_mut();
            mm.params.copy_from_slice(p);
            mm.forward_dsa(&x, b, t, w2, run);
            w2.dsa_stats.kl
        };
        let mut checked = 0;
        for spec in m.layout.tensors.iter().filter(|s| is_indexer(&s.name)) {
            let r = spec.range();
            let gn: f32 = g[r.clone()].iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!(gn > 0.0, "{} has no gradient", spec.name);
            let sub = |q: &[f32]| {
                let mut p = m.params.clone();
                p[r.clone()].copy_from_slice(q);
                kl(&p)
            };
            crate::kernels::gradcheck::check(&m.params[r.clone()], &g[r.clone()], sub, 3e-3, 2e-2);
            checked += 1;
        }
        assert_eq!(checked, 10);
    }
}

#[test]
fn whole_model_lm_gradient_with_sparse_attention_matches_finite_differences() {
    for kv in [2, 1] {
        let (b, t) = (2, 7);
        let m = dsa_model(3, kv, 6);
        let (x, y) = batch(b, t);
        let mut ws = Workspace::default();
        let mut g = vec![0.0; m.layout.total];
        m.forward_backward(&x, &y, b, t, &mut g, 1.0, &mut ws);
        // The LM loss does not depend on the indexer once the top-k is fixed: its entries of
        // the analytic gradient (the KL's) are left out.
        for spec in m.layout.tensors.iter().filter(|s| is_indexer(&s.name)) {
            g[spec.range()].fill(0.0);
        }
        let mm = std::cell::RefCell::new((
            Model {
                params: m.params.clone(),
                ..Model::new(m.cfg.clone()).unwrap()
            },
            Workspace::default(),
        ));
        {
            let (mm, w2) = &mut *mm.borrow_mut();
            mm.forward(&x, b, t, w2);
            w2.dsa_freeze_selection = true;
        }
        let loss = |p: &[f32]| {
            let (mm, w2) = &mut *mm.borrow_mut();
            mm.params.copy_from_slice(p);
            mm.forward(&x, b, t, w2);
            mm.loss(&y, w2)
        };
        crate::kernels::gradcheck::check(&m.params, &g, loss, 1e-2, 1e-2);
    }
}
