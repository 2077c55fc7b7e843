//! Batched decoding over several sequences, each with its own KV cache: the public face of
//! the model's cached driver ([`Model::forward_batch`], module `model::decode`), used by the
//! server and lookup decoding.

use crate::generate::KvCache;
pub use crate::model::decode::{profile, set_quant_max_rows, BatchSeq, QUANT_FAST_MAX_ROWS};
use crate::model::Model;
use anyhow::Result;

/// Run every sequence's tokens through the model, appending to its cache. Returns, per
/// sequence, the logits `[rows, V]` of its rows `logits_from..` (row-major).
pub fn forward_batch(model: &Model, seqs: &mut [BatchSeq<'_>]) -> Result<Vec<Vec<f32>>> {
    model.forward_batch(seqs)
}

/// Run `tokens` after what `cache` holds and return the logits of every one of them
/// (`[tokens.len(), V]`): the verification pass of lookup decoding.
pub fn forward_all(model: &Model, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
    let mut s = [BatchSeq {
        tokens,
        cache,
        logits_from: 0,
    }];
    Ok(forward_batch(model, &mut s)?.pop().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::kernels::rope::RopeLayout;

    pub(crate) fn tiny(seed: u64, max_seq_len: usize) -> Model {
        tiny_with(seed, max_seq_len, crate::config::Residual::Plain)
    }

    fn tiny_with(seed: u64, max_seq_len: usize, residual: crate::config::Residual) -> Model {
        let mut cfg = ModelConfig {
            vocab_size: 37,
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            rope_theta: 10000.0,
            rope_dim: 8,
            rope_layout: RopeLayout::Half,
            ffn_hidden: 48,
            tied_embeddings: false,
            norm_eps: 1e-5,
            init_std: 0.2,
            max_seq_len,
            ..ModelConfig::dense_defaults()
        };
        cfg.residual = residual;
        cfg.hc_mult = 2;
        let mut m = Model::new(cfg).unwrap();
        m.init(seed);
        m
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() < 1e-5, "{what}[{i}]: {x} vs {y}");
        }
    }

    #[test]
    fn batched_decode_matches_single_sequence_decoding() {
        for res in [crate::config::Residual::Plain, crate::config::Residual::Mhc] {
            batched_matches_single(&tiny_with(4, 128, res));
        }
    }

    fn batched_matches_single(m: &Model) {
        let prompts: Vec<Vec<u32>> = (0..5)
            .map(|s| {
                (0..(3 + 7 * s))
                    .map(|i| ((i * 5 + s) % 37) as u32)
                    .collect()
            })
            .collect();
        // Reference: each sequence alone through forward_cached.
        let mut want = Vec::new();
        for p in &prompts {
            let mut c = KvCache::new(m);
            let mut l = vec![m.forward_cached(p, &mut c).unwrap()];
            for t in 0..4u32 {
                l.push(m.forward_cached(&[(t * 3) % 37], &mut c).unwrap());
            }
            want.push(l);
        }
        // Batched: prefill all prompts in one call, then decode four steps together.
        let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(m)).collect();
        let mut seqs: Vec<BatchSeq> = prompts
            .iter()
            .zip(caches.iter_mut())
            .map(|(p, c)| BatchSeq {
                tokens: p,
                cache: c,
                logits_from: p.len() - 1,
            })
            .collect();
        let got = forward_batch(m, &mut seqs).unwrap();
        for (i, g) in got.iter().enumerate() {
            close(g, &want[i][0], &format!("prefill seq {i}"));
        }
        for t in 0..4u32 {
            let tok = [(t * 3) % 37];
            let mut seqs: Vec<BatchSeq> = caches
                .iter_mut()
                .map(|c| BatchSeq {
                    tokens: &tok,
                    cache: c,
                    logits_from: 0,
                })
                .collect();
            let got = forward_batch(m, &mut seqs).unwrap();
            for (i, g) in got.iter().enumerate() {
                close(g, &want[i][1 + t as usize], &format!("step {t} seq {i}"));
            }
        }
        for c in &caches {
            assert!(c.len() >= 7);
        }
    }

    #[test]
    fn forward_all_returns_every_rows_logits_and_truncation_rewinds() {
        let m = tiny(5, 64);
        let toks: Vec<u32> = (0..20).map(|i| (i * 11 % 37) as u32).collect();
        let mut c = KvCache::new(&m);
        m.forward_cached(&toks[..10], &mut c).unwrap();
        let all = forward_all(&m, &toks[10..], &mut c).unwrap();
        assert_eq!(c.len(), 20);
        for j in 0..10 {
            let mut r = KvCache::new(&m);
            let want = m.forward_cached(&toks[..11 + j], &mut r).unwrap();
            close(&all[j * 37..(j + 1) * 37], &want, &format!("row {j}"));
        }
        // Rewind to 13 positions and continue: same as never having seen the rest.
        c.truncate(13).unwrap();
        let got = m.forward_cached(&[7], &mut c).unwrap();
        let mut r = KvCache::new(&m);
        let mut p = toks[..13].to_vec();
        p.push(7);
        close(
            &got,
            &m.forward_cached(&p, &mut r).unwrap(),
            "after truncate",
        );
        assert!(forward_all(&m, &[1; 60], &mut c).is_err(), "overflow");
    }

    /// Every model kind the server runs takes one forward for a step that mixes a prefill chunk
    /// (logits of its last row), one-token decoding and a verification pass of several rows,
    /// each sequence at its own position: every sequence's logits equal those of running it
    /// alone (up to f32 rounding; a quantised model's decode rows bit for bit).
    #[test]
    fn every_model_kind_mixes_prefill_chunks_and_decode_rows_in_one_forward() {
        use crate::kernels::quant::{quantize_matrix, QType};
        let preset = |name: &str| {
            let mut m = Model::new(ModelConfig::preset(name).unwrap()).unwrap();
            m.init(7);
            m
        };
        let mut quantised = preset("tiny");
        {
            let c = quantised.cfg.clone();
            let (d, f, v, qd) = (c.d_model, c.ffn_hidden, c.vocab_size, c.qkv_dim());
            let mut mats = vec![(quantised.layout.output, v, d, QType::Q8_0)];
            for lo in &quantised.layout.layers {
                mats.push((lo.wqkv, qd, d, QType::Q4_1));
                mats.push((lo.wo, d, c.n_heads * c.head_dim, QType::Q4_0));
                if let crate::model::Ffn::Dense { w13, w2 } = lo.ffn {
                    mats.push((w13, 2 * f, d, QType::Q8_0));
                    mats.push((w2, d, f, QType::Q4_1));
                }
            }
            for (off, rows, cols, ty) in mats {
                let w = &quantised.params[off..off + rows * cols];
                let q = quantize_matrix(ty, rows, cols, w);
                quantised.quant.insert(off, q);
            }
        }
        let kinds = [
            ("dense", preset("tiny")),
            ("moe", preset("tiny-moe")),
            ("mhc", preset("tiny-mhc")),
            ("dsa", preset("tiny-dsa")),
            ("engram", preset("tiny-engram")),
            ("deepseek-v4", preset("v4-tiny")),
            ("quantised", quantised),
        ];
        let toks = |s: u32, n: usize| -> Vec<u32> {
            (0..n as u32).map(|i| 1 + (i * 7 + s * 13) % 200).collect()
        };
        // Per sequence: tokens already cached, rows this step, logits from row.
        let plan: [(usize, usize, usize); 4] = [(0, 12, 11), (9, 1, 0), (20, 3, 0), (33, 5, 4)];
        for (name, m) in &kinds {
            let fresh = || -> Vec<KvCache> {
                plan.iter()
                    .enumerate()
                    .map(|(i, &(h, _, _))| {
                        let mut c = KvCache::new(m);
                        if h > 0 {
                            m.forward_cached(&toks(i as u32, h), &mut c).unwrap();
                        }
                        c
                    })
                    .collect()
            };
            let rows: Vec<Vec<u32>> = plan
                .iter()
                .enumerate()
                .map(|(i, &(_, n, _))| toks(50 + i as u32, n))
                .collect();
            let mut alone = Vec::new();
            for (i, mut c) in fresh().into_iter().enumerate() {
                let mut s = [BatchSeq {
                    tokens: &rows[i],
                    cache: &mut c,
                    logits_from: plan[i].2,
                }];
                alone.push(forward_batch(m, &mut s).unwrap().remove(0));
            }
            let mut caches = fresh();
            let mut seqs: Vec<BatchSeq> = caches
                .iter_mut()
                .enumerate()
                .map(|(i, c)| BatchSeq {
                    tokens: &rows[i],
                    cache: c,
                    logits_from: plan[i].2,
                })
                .collect();
            let mixed = forward_batch(m, &mut seqs).unwrap();
            for (i, (a, b)) in mixed.iter().zip(&alone).enumerate() {
                assert_eq!(a.len(), b.len());
                if *name == "quantised" && plan[i].2 == 0 {
                    assert_eq!(a, b, "{name}: decode rows of sequence {i}");
                    continue;
                }
                for (j, (x, y)) in a.iter().zip(b).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                        "{name}: sequence {i} logit {j}: {x} vs {y}"
                    );
                }
            }
            for (c, &(h, n, _)) in caches.iter().zip(&plan) {
                assert_eq!(c.len(), h + n, "{name}");
            }
        }
    }
}
