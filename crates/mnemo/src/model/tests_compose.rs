//! Every combination composes: residual (plain | HC | mHC) × attention (dense | DSA) ×
//! feed-forward (dense | MoE) × Engram (off | on), 24 models, each checked three ways:
//! 1. the whole-model gradient against finite differences (DSA selection held fixed; MoE
//!    selection pinned by the bias so the loss is smooth),
//! 2. cached decoding (a prefill chunk, then one token at a time) = the full forward's logits,
//! 3. batched decoding of several sequences = each sequence decoded alone.

use super::tests::{clone_engram, small_cfg};
use super::*;
use crate::batch::{forward_batch, BatchSeq};
use crate::config::{DsaConfig, FfnKind, ModelConfig, Residual};
use crate::kernels::rope::RopeLayout;
use std::cell::RefCell;

#[derive(Clone, Copy, Debug)]
struct Combo {
    residual: Residual,
    dsa: bool,
    moe: bool,
    engram: bool,
}

fn combos() -> Vec<Combo> {
    let mut v = Vec::new();
    for residual in [Residual::Plain, Residual::Hc, Residual::Mhc] {
        for dsa in [false, true] {
            for moe in [false, true] {
                for engram in [false, true] {
                    v.push(Combo {
                        residual,
                        dsa,
                        moe,
                        engram,
                    });
                }
            }
        }
    }
    v
}

fn cfg_of(k: Combo) -> ModelConfig {
    let mut c = small_cfg(false, 2, RopeLayout::Half);
    c.residual = k.residual;
    c.hc_mult = 2;
    c.hc_sinkhorn_iters = 20;
    if k.dsa {
        c.dsa = Some(DsaConfig {
            index_n_heads: 3,
            index_head_dim: 4,
            index_rope_dim: 2,
            // Fewer than the positions: the top-k really selects.
            index_topk: 3,
        });
    }
    if k.moe {
        c.ffn = FfnKind::Moe;
        c.n_routed_experts = 4;
        c.n_shared_experts = 1;
        c.moe_inter = 4;
        c.top_k = 2;
        c.n_dense_layers = 1;
    }
    if k.engram {
        c.engram = Some(crate::engram::EngramConfig {
            layer_ids: vec![1, 0],
            max_ngram_size: 3,
            n_head_per_ngram: 2,
            head_dim: 3,
            vocab_size_per_ngram: vec![7, 11],
            kernel_size: 2,
            ..Default::default()
        });
    }
    c
}

/// The model of a combination, with every norm, hyper-connection and Engram gate moved away
/// from its init, and the MoE selection pinned to experts 0 and 1 by far (a smooth loss).
fn model_of(k: Combo, seed: u64) -> Model {
    let mut m = Model::new(cfg_of(k)).unwrap_or_else(|e| panic!("{k:?}: {e}"));
    m.init(seed);
    m.engram_eot = Some(3);
    let mut r = Rng::new(seed + 100);
    for t in m.layout.tensors.clone() {
        let s = if is_hc_tensor(&t.name) || is_engram_tensor(&t.name) {
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
    m.sync_engram_gates();
    for lo in m.layout.layers.clone() {
        if let Ffn::Moe(mo) = lo.ffn {
            m.params[mo.bias..mo.bias + 4].copy_from_slice(&[30.0, 20.0, 0.0, 0.0]);
        }
    }
    m
}

fn copy_of(m: &Model) -> Model {
    Model {
        params: m.params.clone(),
        engram: m.engram.as_ref().map(clone_engram),
        engram_eot: m.engram_eot,
        hash_tables: m.hash_tables.clone(),
        ..Model::new(m.cfg.clone()).unwrap()
    }
}

/// The smallest `|signed_sqrt(s)|` over the Engram gates of a forward pass over `tokens`
/// (∞ without Engram): how far the gate is from the kink of its `√|s|` at `s = 0`.
fn gate_margin(m: &Model, tokens: &[u32], b: usize, t: usize) -> f32 {
    let mut ws = Workspace::default();
    m.forward(tokens, b, t, &mut ws);
    ws.engram_gates()
        .iter()
        .flatten()
        .map(|&a| (a / (1.0 - a)).ln().abs())
        .fold(f32::INFINITY, f32::min)
}

#[test]
fn every_combination_has_exact_gradients() {
    for k in combos() {
        let (b, t) = (2, 6);
        let mut tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % 19) as u32).collect();
        tokens[3] = 3; // an end of text inside the first row (Engram restarts)
        let targets: Vec<u32> = (0..b * t).map(|i| (i * 5 % 19) as u32).collect();
        // Finite differences of step 1e-2 must not cross the Engram gate's kink at s = 0: the
        // first seed whose gates all stay clear of it.
        let m = (1..64)
            .map(|seed| model_of(k, seed))
            .find(|m| gate_margin(m, &tokens, b, t) > 0.3)
            .unwrap_or_else(|| panic!("{k:?}: no seed keeps the gates off the kink"));
        let mut ws = Workspace::default();
        let mut grads = vec![0.0; m.layout.total];
        let loss = m.forward_backward(&tokens, &targets, b, t, &mut grads, 1.0, &mut ws);
        assert!(loss.is_finite(), "{k:?}");
        assert!(ws.first_nonfinite().is_none(), "{k:?}");
        // The LM loss does not depend on the indexer once its top-k is fixed: the indexer's
        // entries of the analytic gradient (its KL's) are left out.
        for spec in m
            .layout
            .tensors
            .iter()
            .filter(|s| is_indexer_tensor(&s.name))
        {
            grads[spec.range()].fill(0.0);
        }
        let mm = RefCell::new((copy_of(&m), Workspace::default()));
        {
            let (mm, w2) = &mut *mm.borrow_mut();
            mm.forward(&tokens, b, t, w2);
            w2.dsa_freeze_selection = true;
        }
        let loss_at = |p: &[f32]| {
            let (mm, w2) = &mut *mm.borrow_mut();
            mm.params.copy_from_slice(p);
            mm.forward(&tokens, b, t, w2);
            mm.loss(&targets, w2) + w2.aux_loss
        };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crate::kernels::gradcheck::check(&m.params, &grads, loss_at, 3e-3, 1e-2)
        }));
        if let Err(e) = r {
            panic!(
                "{k:?}: {}",
                e.downcast_ref::<String>().cloned().unwrap_or_default()
            );
        }
    }
}

#[test]
fn every_combination_decodes_as_the_full_forward() {
    for k in combos() {
        let m = model_of(k, 2);
        let t = 14;
        let toks: Vec<u32> = (0..t).map(|i| ((i * 5 + 2) % 19) as u32).collect();
        let mut ws = Workspace::default();
        m.forward(&toks, 1, t, &mut ws);
        let v = m.cfg.vocab_size;
        let mut cache = KvCache::new(&m);
        let mut last = m.forward_cached(&toks[..5], &mut cache).unwrap();
        for (i, &tok) in toks[5..].iter().enumerate() {
            let p = 4 + i;
            let want = &ws.logits[p * v..(p + 1) * v];
            for (a, b) in last.iter().zip(want) {
                assert!((a - b).abs() < 1e-4, "{k:?} position {p}: {a} vs {b}");
            }
            last = m.forward_cached(&[tok], &mut cache).unwrap();
        }
        let want = &ws.logits[(t - 1) * v..];
        for (a, b) in last.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "{k:?} last position: {a} vs {b}");
        }
    }
}

#[test]
fn every_combination_batches_as_single_sequences() {
    for k in combos() {
        let m = model_of(k, 3);
        let v = m.cfg.vocab_size;
        let prompts: [Vec<u32>; 3] = [
            vec![1, 5, 7, 2, 3, 9],
            vec![4, 4, 11, 18],
            vec![6, 3, 10, 12, 13, 0, 2, 8],
        ];
        let next: [Vec<u32>; 3] = [vec![2], vec![7, 1, 5], vec![16]];
        // Alone: prefill, then each next token (logits of every next row).
        let mut alone = Vec::new();
        for (p, nx) in prompts.iter().zip(&next) {
            let mut c = KvCache::new(&m);
            let mut rows = vec![m.forward_cached(p, &mut c).unwrap()];
            for &tok in nx {
                rows.push(m.forward_cached(&[tok], &mut c).unwrap());
            }
            alone.push(rows.concat());
        }
        // Together: one batched prefill (last rows), one batched step of every next run
        // (all its rows: a verification pass).
        let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(&m)).collect();
        let mut seqs: Vec<BatchSeq> = caches
            .iter_mut()
            .zip(&prompts)
            .map(|(cache, p)| BatchSeq {
                tokens: p,
                cache,
                logits_from: p.len() - 1,
            })
            .collect();
        let first = forward_batch(&m, &mut seqs).unwrap();
        let mut seqs: Vec<BatchSeq> = caches
            .iter_mut()
            .zip(&next)
            .map(|(cache, nx)| BatchSeq {
                tokens: nx,
                cache,
                logits_from: 0,
            })
            .collect();
        let second = forward_batch(&m, &mut seqs).unwrap();
        for i in 0..3 {
            let got = [first[i].clone(), second[i].clone()].concat();
            assert_eq!(got.len(), alone[i].len(), "{k:?}");
            for (j, (a, b)) in got.iter().zip(&alone[i]).enumerate() {
                assert!(
                    (a - b).abs() < 1e-5,
                    "{k:?} sequence {i} row {} logit {}: {a} vs {b}",
                    j / v,
                    j % v
                );
            }
        }
    }
}
