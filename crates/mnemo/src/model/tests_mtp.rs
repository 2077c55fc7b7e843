//! The MTP blocks (module `mtp`): their layout and names, their forward against the equations
//! written out here, their gradient against finite differences (the whole model, and the part
//! the MTP loss adds to every tensor it reaches), and weight 0 = exactly the main model.

use super::block::{BlockRows, Mem};
use super::decode::Plan;
use super::ffn::FfnRows;
use super::workspace::LayerActs;
use super::*;
use crate::config::{FfnKind, ModelConfig, Residual, V4Config, V4LayerType};
use crate::kernels::cross_entropy::IGNORE;
use std::cell::RefCell;

/// A tiny DeepSeek-V4 model (CSA and HCA layers whose top-k keeps every entry, a hash layer, mHC
/// with 2 streams) with `mtp` MTP blocks of the given attention types.
fn v4_cfg(mtp: &[V4LayerType]) -> ModelConfig {
    let mut layer_types = vec![
        V4LayerType::CompressedSparseAttention,
        V4LayerType::HeavilyCompressedAttention,
    ];
    layer_types.extend_from_slice(mtp);
    ModelConfig {
        vocab_size: 19,
        d_model: 16,
        n_layers: 2,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 8,
        rope_dim: 0,
        ffn_hidden: 8,
        tied_embeddings: false,
        norm_eps: 1e-5,
        init_std: 0.25,
        max_seq_len: 16,
        ffn: FfnKind::Moe,
        n_shared_experts: 1,
        n_routed_experts: 4,
        moe_inter: 4,
        top_k: 2,
        num_hash_layers: 1,
        residual: Residual::Mhc,
        hc_mult: 2,
        swiglu_limit: 10.0,
        v4: Some(V4Config {
            q_lora_rank: 8,
            o_lora_rank: 4,
            o_groups: 2,
            sliding_window: 4,
            layer_types,
            compress_rate_csa: 2,
            compress_rate_hca: 4,
            index_n_heads: 2,
            index_head_dim: 8,
            index_topk: 8,
            qk_rope_head_dim: 4,
            compress_rope_theta: 160000.0,
            compress_rope_scaling: None,
            num_nextn_predict_layers: mtp.len(),
        }),
        ..ModelConfig::dense_defaults()
    }
}

/// The model of `cfg` with every norm and hyper-connection moved away from its init and the MoE
/// selection pinned to experts 0 and 1 by far (a smooth loss).
fn model_of(cfg: ModelConfig, seed: u64) -> Model {
    let mut m = Model::new(cfg).unwrap();
    m.init(seed);
    let mut r = Rng::new(seed + 100);
    for t in m.layout.tensors.clone() {
        let s = if is_hc_tensor(&t.name) {
            0.3
        } else if t.shape.len() == 1 && t.trainable {
            0.2
        } else {
            continue;
        };
        for p in &mut m.params[t.range()] {
            *p += s * r.normal() as f32;
        }
    }
    for lo in m.layout.layers.clone() {
        if let Ffn::Moe(mo) = lo.ffn {
            m.params[mo.bias..mo.bias + 4].copy_from_slice(&[30.0, 20.0, 0.0, 0.0]);
        }
    }
    m
}

fn batch(b: usize, t: usize) -> (Vec<u32>, Vec<u32>) {
    let tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % 19) as u32).collect();
    let mut targets: Vec<u32> = (0..b * t).map(|i| (i * 5 % 19) as u32).collect();
    targets[3] = IGNORE; // a masked target: the main and the MTP loss leave it out
    (tokens, targets)
}

fn ws_with(weight: f32) -> Workspace {
    Workspace {
        mtp_weight: weight,
        ..Workspace::default()
    }
}

/// The official names (`mtp.{j}.…`, as the released checkpoint names them) after the main
/// model, whose layout is the same as without MTP blocks; the block is an MoE block without
/// hash routing; `layer_types` needs one entry per MTP block.
#[test]
fn mtp_tensors_have_the_official_names_after_the_main_model() {
    let cfg = v4_cfg(&[V4LayerType::SlidingAttention]);
    let m = Model::new(cfg.clone()).unwrap();
    let main = Model::new(cfg.without_mtp()).unwrap();
    assert_eq!(m.layout.main_total, main.layout.total);
    let k = main.layout.tensors.len();
    for (a, b) in m.layout.tensors[..k].iter().zip(&main.layout.tensors) {
        assert_eq!((&a.name, &a.shape, a.offset), (&b.name, &b.shape, b.offset));
    }
    let names: Vec<&str> = m.layout.tensors[k..]
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    assert!(names.iter().all(|n| n.starts_with("mtp.0.")), "{names:?}");
    for want in [
        "mtp.0.e_proj.weight",
        "mtp.0.h_proj.weight",
        "mtp.0.enorm.weight",
        "mtp.0.hnorm.weight",
        "mtp.0.norm.weight",
        "mtp.0.hc_head_fn",
        "mtp.0.hc_head_base",
        "mtp.0.hc_head_scale",
        "mtp.0.attn_norm.weight",
        "mtp.0.ffn_norm.weight",
        "mtp.0.hc_attn_fn",
        "mtp.0.hc_attn_base",
        "mtp.0.hc_attn_scale",
        "mtp.0.hc_ffn_fn",
        "mtp.0.attn.wq_a.weight",
        "mtp.0.attn.kv_norm.weight",
        "mtp.0.attn.attn_sink",
        "mtp.0.ffn.gate.weight",
        "mtp.0.ffn.gate.bias",
        "mtp.0.ffn.shared_experts.w2.weight",
        "mtp.0.ffn.experts.3.w3.weight",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let shape = |n: &str| m.layout.get(n).unwrap().shape.clone();
    assert_eq!(shape("mtp.0.hc_head_fn"), vec![2, 32]);
    assert_eq!(shape("mtp.0.hc_head_scale"), vec![1]);
    assert_eq!(shape("mtp.0.e_proj.weight"), vec![16, 16]);
    assert!(is_hc_tensor("mtp.0.hc_head_fn") && is_hc_tensor("mtp.0.hc_ffn_base"));
    assert!(!is_hc_tensor("mtp.0.hnorm.weight"));
    assert_eq!(m.layout.layers.len(), 3);
    assert!(matches!(m.layout.layers[2].ffn, Ffn::Moe(mo) if !mo.hash));
    assert_eq!(m.hash_tables.len(), 3);
    assert!(m.hash_tables[2].is_none());
    assert_eq!(m.counts().mtp, m.layout.total - m.layout.main_total);
    // A model with MTP blocks starts from the same main model as one without.
    let (mut a, mut b) = (m, main);
    a.init(9);
    b.init(9);
    assert!(a.params[..a.layout.main_total] == b.params[..]);
    // The config: one layer type per MTP block, written only when there are some.
    let mut bad = cfg.clone();
    bad.v4.as_mut().unwrap().layer_types.pop();
    let e = bad.validate().unwrap_err();
    assert_eq!(e.field, "v4.layer_types");
    assert!(e.to_string().contains("1 MTP blocks"), "{e}");
    let j = serde_json::to_string(&cfg).unwrap();
    assert!(j.contains(r#""num_nextn_predict_layers":1"#), "{j}");
    assert_eq!(serde_json::from_str::<ModelConfig>(&j).unwrap(), cfg);
    let j = serde_json::to_string(&cfg.without_mtp()).unwrap();
    assert!(!j.contains("num_nextn_predict_layers"), "{j}");
}

/// Weight 0 (or a frozen backbone) runs no MTP block: loss and gradients are exactly those of
/// the model without MTP blocks, the MTP tensors get none. With a weight, the main model's
/// forward is untouched and the loss is the main loss + λ·L_mtp.
#[test]
fn mtp_weight_zero_is_exactly_the_main_model() {
    let cfg = v4_cfg(&[V4LayerType::SlidingAttention]);
    let m = model_of(cfg.clone(), 3);
    let main = Model {
        params: m.params[..m.layout.main_total].to_vec().into(),
        hash_tables: m.hash_tables[..2].to_vec(),
        ..Model::new(cfg.without_mtp()).unwrap()
    };
    let (b, t) = (2, 8);
    let (tokens, targets) = batch(b, t);
    let mut g_main = vec![0.0; main.layout.total];
    let mut ws = Workspace::default();
    let l_main = main.forward_backward(&tokens, &targets, b, t, &mut g_main, 0.7, &mut ws);
    let mut g = vec![0.0; m.layout.total];
    let mut ws0 = ws_with(0.0);
    let l0 = m.forward_backward(&tokens, &targets, b, t, &mut g, 0.7, &mut ws0);
    assert_eq!(l0.to_bits(), l_main.to_bits());
    assert!(g[..m.layout.main_total] == g_main[..]);
    assert!(g[m.layout.main_total..].iter().all(|&x| x == 0.0));
    assert_eq!(ws0.mtp_loss, 0.0);
    // With a weight: the same main logits, the loss adds λ·L_mtp.
    let mut ws1 = ws_with(0.4);
    g.fill(0.0);
    let l1 = m.forward_backward(&tokens, &targets, b, t, &mut g, 0.7, &mut ws1);
    let trained = ws1.mtp_loss;
    assert!(trained > 0.5, "{trained}");
    assert!(
        (l1 - (l_main + 0.4f32 as f64 * trained)).abs() < 1e-12 * l1,
        "{l1} vs {l_main} + 0.4·{trained} (aux {})",
        ws1.aux_loss
    );
    assert!(g[m.layout.main_total..].iter().any(|&x| x != 0.0));
    m.forward(&tokens, b, t, &mut ws1);
    main.forward(&tokens, b, t, &mut ws);
    assert!(ws1.logits == ws.logits);
    let mtp = m.mtp_loss(&targets, &ws1);
    assert!((mtp - trained).abs() < 1e-6, "{mtp} vs {trained}");
    // A frozen backbone (memory-only fine-tuning) runs none either.
    let mut wsf = Workspace {
        frozen_backbone: true,
        ..ws_with(0.4)
    };
    m.forward(&tokens, b, t, &mut wsf);
    assert_eq!(wsf.layers.len(), 2);
}

/// The MTP logits are the module docs' equations, written out here with plain loops around
/// the shared block (which the main model's tests check): the next token's embedding, the
/// norms and projections of the main model's last streams (before its head), the block, the
/// MTP block's own mHC head and norm, the shared output head. `mtp_logits` gives any rows
/// for any next tokens; the training forward's loss is their cross-entropy on the targets
/// two ahead.
#[test]
fn mtp_forward_follows_the_equations() {
    let m = model_of(v4_cfg(&[V4LayerType::SlidingAttention]), 5);
    let c = &m.cfg;
    let (b, t) = (2, 8);
    let (d, v, nh, eps) = (c.d_model, c.vocab_size, c.hc_mult, c.norm_eps);
    let n = b * t;
    let (tokens, targets) = batch(b, t);
    let mut ws = ws_with(0.3);
    m.forward(&tokens, b, t, &mut ws);
    let xl = ws.streams[2 * c.n_layers].clone(); // [N, n, D]
    let mo = m.layout.mtp[0];
    let w = |o: usize, len: usize| &m.params[o..o + len];
    let rms = |x: &[f32], g: &[f32]| -> Vec<f32> {
        let ms = x.iter().map(|a| a * a).sum::<f32>() / x.len() as f32;
        let r = 1.0 / (ms + eps).sqrt();
        x.iter().zip(g).map(|(a, g)| a * r * g).collect()
    };
    let matvec = |wm: &[f32], x: &[f32], rows: usize| -> Vec<f32> {
        (0..rows)
            .map(|r| {
                wm[r * x.len()..(r + 1) * x.len()]
                    .iter()
                    .zip(x)
                    .map(|(a, b)| a * b)
                    .sum()
            })
            .collect()
    };
    // u[i] = the token after tokens[i] (the last of a row: a placeholder, its own).
    let next: Vec<u32> = (0..n)
        .map(|i| tokens[if i % t == t - 1 { i } else { i + 1 }])
        .collect();
    let mut y0 = vec![0.0f32; n * nh * d];
    let mut ssq0 = vec![0.0f32; n * nh];
    for i in 0..n {
        let u = next[i] as usize;
        let e = rms(
            &w(m.layout.embed, v * d)[u * d..(u + 1) * d],
            w(mo.enorm, d),
        );
        let ep = matvec(w(mo.e_proj, d * d), &e, d);
        for k in 0..nh {
            let row = &xl[(i * nh + k) * d..(i * nh + k + 1) * d];
            let hp = matvec(w(mo.h_proj, d * d), &rms(row, w(mo.hnorm, d)), d);
            let out = &mut y0[(i * nh + k) * d..(i * nh + k + 1) * d];
            for c in 0..d {
                out[c] = ep[c] + hp[c];
            }
            ssq0[i * nh + k] = out.iter().map(|a| a * a).sum();
        }
    }
    // The block (shared code) on Y⁰.
    let l = c.n_layers;
    let mut xs = vec![y0, vec![0.0; n * nh * d], vec![0.0; n * nh * d]];
    let mut sq = vec![ssq0, vec![0.0; n * nh], vec![0.0; n * nh]];
    let mut la = LayerActs::new(c, l, n);
    let mut rows = BlockRows {
        kv: attention::Kv::Batch { b, t, dsa: None },
        ffn: FfnRows {
            tokens: &next,
            seq_len: t,
            aux: true,
            plan: &Plan::F32,
        },
        mem: Mem::None,
    };
    m.block_forward(l, &mut xs, &mut sq, &mut la, &mut rows)
        .unwrap();
    // The MTP block's mHC head: pre = σ(scale·(x·fnᵀ)/rms(x) + base) + hc_eps, Σ_k pre_k·x_k.
    let hf = mo.hc_head.unwrap();
    let mut want = vec![0.0f32; n * v];
    for i in 0..n {
        let x = &xs[2][i * nh * d..(i + 1) * nh * d];
        let r = 1.0 / (x.iter().map(|a| a * a).sum::<f32>() / (nh * d) as f32 + eps).sqrt();
        let mut y = vec![0.0f32; d];
        for k in 0..nh {
            let mix: f32 = w(hf.fn_, nh * nh * d)[k * nh * d..(k + 1) * nh * d]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum();
            let z = mix * r * m.params[hf.scale] + m.params[hf.stat + k];
            let pre = 1.0 / (1.0 + (-z).exp()) + c.hc_eps;
            for ch in 0..d {
                y[ch] += pre * x[k * d + ch];
            }
        }
        let logits = matvec(w(m.layout.output, v * d), &rms(&y, w(mo.norm, d)), v);
        want[i * v..(i + 1) * v].copy_from_slice(&logits);
    }
    let all: Vec<usize> = (0..n).collect();
    let got = m.mtp_logits(&next, &all, &mut ws).unwrap();
    let top = want.iter().fold(0.0f32, |a, &b| a.max(b.abs()));
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * top.max(1.0),
            "row {} logit {}: {a} vs {b}",
            i / v,
            i % v
        );
    }
    // Some rows only; the training forward's loss is the cross-entropy of these logits on the
    // targets two ahead (the rows that have one).
    let some = m.mtp_logits(&next, &[5, 0, 12], &mut ws).unwrap();
    for (k, &r) in [5, 0, 12].iter().enumerate() {
        for (a, b) in some[k * v..(k + 1) * v]
            .iter()
            .zip(&got[r * v..(r + 1) * v])
        {
            assert!((a - b).abs() <= 1e-6 * top.max(1.0), "row {r}: {a} vs {b}");
        }
    }
    let (mut sum, mut cnt) = (0.0f64, 0);
    for i in 0..n {
        let Some(&y) = targets.get(i + 1).filter(|_| i % t < t - 1) else {
            continue;
        };
        if y == IGNORE {
            continue;
        }
        let row = &want[i * v..(i + 1) * v];
        let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let lse = mx as f64
            + row
                .iter()
                .map(|&z| ((z - mx) as f64).exp())
                .sum::<f64>()
                .ln();
        sum += lse - row[y as usize] as f64;
        cnt += 1;
    }
    assert_eq!(cnt, b * (t - 1) - 1);
    let mtp = m.mtp_loss(&targets, &ws);
    assert!(
        (mtp - sum / cnt as f64).abs() < 1e-5,
        "{mtp} vs {}",
        sum / cnt as f64
    );
    // Another next token changes the draft of its row and of the rows that see it (the
    // block's sliding window of 4) only.
    let mut other = next.clone();
    other[10] = (other[10] + 1) % 19;
    let got2 = m.mtp_logits(&other, &all, &mut ws).unwrap();
    for i in 0..n {
        let same = got2[i * v..(i + 1) * v] == got[i * v..(i + 1) * v];
        assert_eq!(same, !(10..14).contains(&i), "row {i}");
    }
    assert!(m.mtp_logits(&next[1..], &all, &mut ws).is_err());
    assert!(m.mtp_logits(&next, &[n], &mut ws).is_err());
}

/// The whole model's gradient with MTP blocks (one sliding block; two chained blocks, the
/// second an HCA block) against finite differences of `L_main + λ·L_mtp`, over the whole
/// vector and over the MTP tensors; and the part the MTP adds (`λ·dL_mtp/dθ`, the gradient
/// minus the one with weight 0) against finite differences of `λ·L_mtp` alone, over the whole
/// vector, the MTP tensors, the shared embedding and head and the main layers it reaches
/// through their last streams.
///
/// The indexer's own KL loss (module `attention_v4_indexer`, checked there) is left out: this
/// runs the sparse stage with `kl: false`, so the gradient is that of the loss differenced here.
#[test]
fn mtp_whole_model_gradient_matches_finite_differences() {
    use V4LayerType::*;
    let lam = 0.6f32;
    for mtp in [
        vec![SlidingAttention],
        vec![SlidingAttention, HeavilyCompressedAttention],
    ] {
        let m = model_of(v4_cfg(&mtp), 7);
        let (b, t) = (2, 8);
        let (tokens, targets) = batch(b, t);
        let mut g = vec![0.0; m.layout.total];
        let mut ws = ws_with(lam);
        let run = crate::dsa::DsaRun {
            stage: crate::dsa::DsaStage::Sparse,
            kl: false,
            recall: false,
        };
        let loss = m.forward_backward_dsa(&tokens, &targets, b, t, &mut g, 1.0, &mut ws, run);
        let mut g0 = vec![0.0; m.layout.total];
        let l0 = m.forward_backward_dsa(
            &tokens,
            &targets,
            b,
            t,
            &mut g0,
            1.0,
            &mut ws_with(0.0),
            run,
        );
        let g_mtp: Vec<f32> = g.iter().zip(&g0).map(|(a, b)| a - b).collect();
        let mm = RefCell::new((
            Model {
                params: m.params.clone(),
                hash_tables: m.hash_tables.clone(),
                ..Model::new(m.cfg.clone()).unwrap()
            },
            ws_with(lam),
        ));
        // (total, λ·L_mtp) at parameters p.
        let at = |p: &[f32]| {
            let (mm, w2) = &mut *mm.borrow_mut();
            mm.params.copy_from_slice(p);
            mm.forward(&tokens, b, t, w2);
            let mtp = lam as f64 * mm.mtp_loss(&targets, w2);
            (mm.loss(&targets, w2) + w2.aux_loss + mtp, mtp)
        };
        let (total, part) = at(&m.params);
        assert!((total - loss).abs() < 1e-6 * loss, "{total} vs {loss}");
        assert!(
            (loss - l0 - part).abs() < 1e-6 * loss,
            "{loss} - {l0} vs {part}"
        );
        let ly = &m.layout;
        let (v, d) = (m.cfg.vocab_size, m.cfg.d_model);
        let ranges = [
            ("whole model", 0..ly.total),
            ("MTP blocks", ly.main_total..ly.total),
            ("embedding", ly.embed..ly.embed + v * d),
            ("output head", ly.output..ly.output + v * d),
            ("main layers", ly.embed + v * d..ly.hc_head.unwrap().fn_),
        ];
        for (which, grad, f) in [
            ("L_main + λ·L_mtp", &g, 0usize),
            ("λ·L_mtp", &g_mtp, 1usize),
        ] {
            for (name, r) in ranges.clone() {
                if f == 0 && !matches!(name, "whole model" | "MTP blocks") {
                    continue;
                }
                let loss_at = |sub: &[f32]| {
                    let mut p = m.params.clone();
                    p[r.clone()].copy_from_slice(sub);
                    let (tot, part) = at(&p);
                    if f == 0 {
                        tot
                    } else {
                        part
                    }
                };
                let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    crate::kernels::gradcheck::check(
                        &m.params[r.clone()],
                        &grad[r.clone()],
                        loss_at,
                        3e-3,
                        1e-2,
                    )
                }));
                if let Err(e) = res {
                    panic!(
                        "{} MTP blocks, {which}, {name}: {}",
                        mtp.len(),
                        e.downcast_ref::<String>().cloned().unwrap_or_default()
                    );
                }
            }
        }
        // The MTP loss reaches the main model: its embedding, head and layers.
        let nz = |r: std::ops::Range<usize>| g_mtp[r].iter().any(|&x| x != 0.0);
        assert!(nz(ly.embed..ly.embed + v * d) && nz(ly.output..ly.output + v * d));
        assert!(nz(ly.layers[0].attn_norm..ly.layers[0].attn_norm + d));
    }
}
