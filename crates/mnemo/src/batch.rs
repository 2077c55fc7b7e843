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
}
