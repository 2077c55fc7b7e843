//! Autoregressive generation over a [`KvCache`], token sampling, and saving/loading a prefix
//! cache.
//!
//! The prompt is prefilled in chunks (bounded memory), then one token at a time, through the
//! model's cached driver ([`Model::forward_cached`], module `model::decode`): each new token's
//! q/k/v are computed once and its k/v appended to the per-layer cache.
//!
//! Sampling: `temperature = 0` is greedy; otherwise logits are divided by the temperature,
//! restricted to the `top_k` largest (0 = all), then to the smallest set whose probability
//! reaches `top_p` (nucleus), renormalised and sampled with a seeded [`Rng`].

pub use crate::io::prefix_cache::model_fingerprint;
use crate::model::Model;
pub use crate::model::{CacheOptions, KvCache, PREFILL_CHUNK};
use crate::rng::Rng;
use anyhow::{bail, Result};

/// Sampling settings.
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
}

/// Pick the next token from `logits` (only the first `n_valid` entries are real tokens).
pub fn sample(logits: &[f32], n_valid: usize, s: Sampling, rng: &mut Rng) -> u32 {
    let logits = &logits[..n_valid.min(logits.len())];
    if s.temperature <= 0.0 {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    crate::sampler::draw(logits, s.temperature, s.top_k, s.top_p, rng.next_f64())
}

/// The distribution [`sample`] draws from: `(token, probability)` pairs, most likely first
/// (temperature, then top-k, then top-p with renormalisation; greedy: the argmax alone). The
/// sorted reference of [`crate::sampler`] (its module docs give the arithmetic): `sample` draws
/// the same token without sorting the vocabulary.
pub fn distribution(logits: &[f32], n_valid: usize, s: Sampling) -> Vec<(u32, f64)> {
    let logits = &logits[..n_valid.min(logits.len())];
    if s.temperature <= 0.0 {
        let t = sample(logits, logits.len(), s, &mut Rng::new(0));
        return vec![(t, 1.0)];
    }
    let mut idx = order_desc(logits, s.top_k);
    let m = logits[idx[0]];
    let e = crate::sampler::weights(logits, m, s.temperature);
    let last = (s.top_k > 0 && s.top_k < logits.len()).then(|| {
        let i = idx[idx.len() - 1];
        crate::sampler::desc_key(i, logits[i])
    });
    let z = crate::sampler::normaliser(logits, &e, last);
    let mut probs: Vec<f64> = idx.iter().map(|&i| e[i] as f64 / z).collect();
    if s.top_p > 0.0 && s.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= s.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
    }
    idx.into_iter().map(|i| i as u32).zip(probs).collect()
}

/// Token ids by descending logit, ties by ascending id (the order of a stable sort by
/// descending logit; `-0.0` equals `0.0`), the first `top_k` only when `top_k > 0`. Sorted as
/// packed `u64` keys (order bits, id), unique so an unstable sort is exact: about twice as fast
/// as a comparator sort on a 50k vocabulary, and a top-k selection first when `top_k` is set.
/// (NaN logits, which no working model emits, sort first.)
fn order_desc(logits: &[f32], top_k: usize) -> Vec<usize> {
    let mut keys: Vec<u64> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| crate::sampler::desc_key(i, x))
        .collect();
    if top_k > 0 && top_k < keys.len() {
        keys.select_nth_unstable(top_k - 1);
        keys.truncate(top_k);
    }
    keys.sort_unstable();
    keys.into_iter()
        .map(|k| (k & 0xffff_ffff) as usize)
        .collect()
}

/// Generate up to `max_new` tokens after `prompt`, calling `on_token` with each new id; stops
/// early at `stop_token` or when the context is full. Returns the new ids.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    model: &Model,
    prompt: &[u32],
    max_new: usize,
    s: Sampling,
    seed: u64,
    n_valid: usize,
    stop_token: Option<u32>,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    let mut cache = KvCache::new(model);
    generate_after(
        model, &mut cache, prompt, max_new, s, seed, n_valid, stop_token, on_token,
    )
}

/// Like [`generate`], continuing a cache that already holds a prefix (e.g. a packed
/// repository loaded with [`KvCache::load`]); `new_tokens` (non-empty) are prefilled first.
#[allow(clippy::too_many_arguments)]
pub fn generate_after(
    model: &Model,
    cache: &mut KvCache,
    new_tokens: &[u32],
    max_new: usize,
    s: Sampling,
    seed: u64,
    n_valid: usize,
    stop_token: Option<u32>,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    if new_tokens.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let mut rng = Rng::new(seed);
    let mut logits = model.forward_cached(new_tokens, cache)?;
    let mut out = Vec::new();
    for _ in 0..max_new {
        let t = sample(&logits, n_valid, s, &mut rng);
        if Some(t) == stop_token {
            break;
        }
        out.push(t);
        on_token(t)?;
        if cache.len() >= cache.capacity() {
            break;
        }
        logits = model.forward_cached(&[t], cache)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::kernels::rope::RopeLayout;
    use crate::model::Workspace;

    #[test]
    fn cached_decoding_matches_the_training_forward() {
        cached_matches_forward(None);
    }

    /// With YaRN (scaled frequencies, mscale² temperature) the cached path still equals the
    /// training forward, and the scaling changes the logits.
    #[test]
    fn cached_decoding_matches_the_training_forward_with_yarn() {
        let a = cached_matches_forward(Some(crate::kernels::rope::RopeScaling::yarn(4.0, 75)));
        let b = cached_matches_forward(None);
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(d > 1e-3, "YaRN must change the logits (max diff {d})");
    }

    /// Returns the training-forward logits.
    fn cached_matches_forward(rope_scaling: Option<crate::kernels::rope::RopeScaling>) -> Vec<f32> {
        let cfg = ModelConfig {
            rope_scaling,
            vocab_size: 23,
            d_model: 16,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            rope_theta: 10000.0,
            rope_dim: 8,
            rope_layout: RopeLayout::Half,
            ffn_hidden: 24,
            tied_embeddings: false,
            norm_eps: 1e-5,
            init_std: 0.2,
            max_seq_len: 300,
            ..ModelConfig::dense_defaults()
        };
        let mut m = Model::new(cfg).unwrap();
        m.init(3);
        let toks: Vec<u32> = (0..280).map(|i| (i * 7 % 23) as u32).collect();
        let mut ws = Workspace::default();
        m.forward(&toks, 1, toks.len(), &mut ws);
        // Prefill 270 (two chunks), then decode the rest one by one.
        let mut cache = KvCache::new(&m);
        let mut last = m.forward_cached(&toks[..270], &mut cache).unwrap();
        for (i, &t) in toks[270..].iter().enumerate() {
            let want = &ws.logits[(269 + i) * 23..(270 + i) * 23];
            for (a, b) in last.iter().zip(want) {
                assert!((a - b).abs() < 1e-4, "position {}: {a} vs {b}", 269 + i);
            }
            last = m.forward_cached(&[t], &mut cache).unwrap();
        }
        assert!(
            m.forward_cached(&[0; 21], &mut cache).is_err(),
            "overflow must be an error"
        );
        ws.logits.clone()
    }

    fn dsa_test_model(topk: usize) -> Model {
        let cfg = ModelConfig {
            vocab_size: 23,
            d_model: 16,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            rope_theta: 10000.0,
            rope_dim: 8,
            rope_layout: RopeLayout::Half,
            ffn_hidden: 24,
            tied_embeddings: false,
            norm_eps: 1e-5,
            init_std: 0.2,
            max_seq_len: 300,
            dsa: Some(crate::config::DsaConfig {
                index_n_heads: 2,
                index_head_dim: 8,
                index_rope_dim: 4,
                index_topk: topk,
            }),
            ..ModelConfig::dense_defaults()
        };
        let mut m = Model::new(cfg).unwrap();
        m.init(5);
        m
    }

    #[test]
    fn cached_sparse_decoding_matches_the_training_forward() {
        // top-k 24 of up to 280 visible positions: most rows attend to a strict subset.
        let m = dsa_test_model(24);
        let mut rng = Rng::new(8);
        let toks: Vec<u32> = (0..280).map(|_| rng.below(23) as u32).collect();
        let mut ws = Workspace::default();
        m.forward(&toks, 1, toks.len(), &mut ws);
        let mut cache = KvCache::new(&m);
        let mut last = m.forward_cached(&toks[..270], &mut cache).unwrap();
        for (i, &t) in toks[270..].iter().enumerate() {
            let want = &ws.logits[(269 + i) * 23..(270 + i) * 23];
            for (a, b) in last.iter().zip(want) {
                assert!((a - b).abs() < 1e-4, "position {}: {a} vs {b}", 269 + i);
            }
            last = m.forward_cached(&[t], &mut cache).unwrap();
        }
        assert_eq!(cache.index_key_bytes(), 2 * 280 * 8 * 4);
        // Sparse differs from dense attention at this context (the selection matters) ...
        let mut dense = KvCache::with_options(
            &m,
            300,
            CacheOptions {
                dense_attention: true,
                ..Default::default()
            },
        );
        let d = m.forward_cached(&toks, &mut dense).unwrap();
        let gap = d
            .iter()
            .zip(&last)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            gap > 1e-3,
            "dense and sparse logits should differ (gap {gap})"
        );
        assert_eq!(dense.index_key_bytes(), 0);
        // ... and 8-bit indexer keys stay close to f32 ones.
        let mut q8 = KvCache::with_options(
            &m,
            300,
            CacheOptions {
                index_keys_8bit: true,
                ..Default::default()
            },
        );
        let l8 = m.forward_cached(&toks, &mut q8).unwrap();
        let gap8 = l8
            .iter()
            .zip(&last)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            gap8 < gap,
            "8-bit keys should stay nearer the f32 path ({gap8} vs {gap})"
        );
        assert!(q8.index_key_bytes() < cache.index_key_bytes() / 2);
    }

    #[test]
    fn sparse_prefix_cache_roundtrips_and_rewinds() {
        let m = dsa_test_model(12);
        let toks: Vec<u32> = (0..60).map(|i| (i * 5 % 23) as u32).collect();
        let mut cache = KvCache::new(&m);
        m.forward_cached(&toks[..50], &mut cache).unwrap();
        let dir = std::env::temp_dir().join(format!("mnemo-dsa-prefix-{}", std::process::id()));
        let path = dir.join("p.safetensors");
        cache.save(&path, &m, &toks[..50]).unwrap();
        let (mut loaded, t) = KvCache::load(&path, &m).unwrap();
        assert_eq!(t, &toks[..50]);
        let a = m.forward_cached(&toks[50..], &mut cache).unwrap();
        let b = m.forward_cached(&toks[50..], &mut loaded).unwrap();
        assert_eq!(a, b);
        // Truncating (rejected drafts) rewinds the indexer keys too.
        cache.truncate(55).unwrap();
        let c = m.forward_cached(&toks[55..], &mut cache).unwrap();
        for (x, y) in a.iter().zip(&c) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y} after rewinding");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn cached_decoding_matches_the_training_forward_with_hyper_connections() {
        for residual in [crate::config::Residual::Mhc, crate::config::Residual::Hc] {
            let cfg = ModelConfig {
                vocab_size: 23,
                d_model: 16,
                n_layers: 2,
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 8,
                rope_theta: 10000.0,
                rope_dim: 8,
                rope_layout: RopeLayout::Half,
                ffn_hidden: 24,
                tied_embeddings: false,
                norm_eps: 1e-5,
                init_std: 0.2,
                max_seq_len: 300,
                residual,
                hc_mult: 3,
                ..ModelConfig::dense_defaults()
            };
            let mut m = Model::new(cfg).unwrap();
            m.init(3);
            // Make the dynamic coefficients matter.
            let mut r = Rng::new(9);
            for t in m.layout.tensors.clone() {
                if crate::model::is_hc_tensor(&t.name) {
                    for p in &mut m.params[t.range()] {
                        *p += 0.3 * r.normal() as f32;
                    }
                }
            }
            let toks: Vec<u32> = (0..270).map(|i| (i * 7 % 23) as u32).collect();
            let mut ws = Workspace::default();
            m.forward(&toks, 1, toks.len(), &mut ws);
            // Prefill 260 (two chunks), then decode the rest one by one.
            let mut cache = KvCache::new(&m);
            let mut last = m.forward_cached(&toks[..260], &mut cache).unwrap();
            for (i, &t) in toks[260..].iter().enumerate() {
                let want = &ws.logits[(259 + i) * 23..(260 + i) * 23];
                for (a, b) in last.iter().zip(want) {
                    assert!(
                        (a - b).abs() < 1e-4,
                        "{residual:?} position {}: {a} vs {b}",
                        259 + i
                    );
                }
                last = m.forward_cached(&[t], &mut cache).unwrap();
            }
        }
    }

    #[test]
    fn cached_decoding_matches_the_training_forward_with_engram() {
        use crate::model::tests::{engram_test_cfg, perturb_engram};
        for residual in [crate::config::Residual::Plain, crate::config::Residual::Mhc] {
            let mut cfg = engram_test_cfg(residual);
            cfg.max_seq_len = 300;
            let v = cfg.vocab_size;
            let mut m = Model::new(cfg).unwrap();
            m.init(3);
            m.engram_eot = Some(3);
            perturb_engram(&mut m, 9);
            // Documents end at every token 3 (the EOT), in the prefill and in the decode.
            let toks: Vec<u32> = (0..280).map(|i| (i * 7 % 19) as u32).collect();
            let mut ws = Workspace::default();
            m.forward(&toks, 1, toks.len(), &mut ws);
            let mut cache = KvCache::new(&m);
            let mut last = m.forward_cached(&toks[..270], &mut cache).unwrap();
            for (i, &t) in toks[270..].iter().enumerate() {
                let want = &ws.logits[(269 + i) * v..(270 + i) * v];
                for (a, b) in last.iter().zip(want) {
                    assert!(
                        (a - b).abs() < 1e-4,
                        "{residual:?} position {}: {a} vs {b}",
                        269 + i
                    );
                }
                last = m.forward_cached(&[t], &mut cache).unwrap();
            }
            // Without the Engram contribution the logits differ (the memory is used).
            let mut m2 = Model::new(m.cfg.clone()).unwrap();
            m2.params.copy_from_slice(&m.params);
            for &o in &m.layout.engram_gate.clone() {
                let n = m.engram.as_ref().unwrap().layers[0].gate.n_params();
                m2.params[o..o + n].fill(0.0);
            }
            let mut ws2 = Workspace::default();
            m2.forward(&toks, 1, toks.len(), &mut ws2);
            assert!(ws2.logits != ws.logits);
            // A token id beyond the tokenizer's range is a clear error.
            let mut cache = KvCache::new(&m);
            let e = m
                .forward_cached(&[1, 19], &mut cache)
                .unwrap_err()
                .to_string();
            assert!(e.contains("token id 19") && e.contains("0..19"), "{e}");
        }
    }

    /// The packed-key order is the stable comparator sort's, ties and signed zeros included.
    #[test]
    fn order_desc_matches_a_stable_sort() {
        let mut x: u64 = 3;
        for n in [1, 2, 7, 300, 5000] {
            let logits: Vec<f32> = (0..n)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    match (x >> 60) % 4 {
                        0 => 0.0,
                        1 => -0.0,
                        _ => ((x >> 40) % 64) as f32 / 8.0 - 4.0,
                    }
                })
                .collect();
            let mut want: Vec<usize> = (0..n).collect();
            want.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap());
            assert_eq!(super::order_desc(&logits, 0), want, "{n}");
            for k in [1, 3, n] {
                assert_eq!(super::order_desc(&logits, k), want[..k.min(n)], "{n} {k}");
            }
        }
    }

    #[test]
    fn sampling_respects_greedy_top_k_and_top_p() {
        let logits = [0.0, 3.0, 1.0, 2.9];
        let mut r = Rng::new(1);
        let greedy = Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        };
        assert_eq!(sample(&logits, 4, greedy, &mut r), 1);
        let k2 = Sampling {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
        };
        for _ in 0..200 {
            let t = sample(&logits, 4, k2, &mut r);
            assert!(t == 1 || t == 3);
        }
        let p = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.3,
        };
        for _ in 0..100 {
            assert_eq!(sample(&logits, 4, p, &mut r), 1);
        }
        // Only the first n_valid logits may be chosen.
        assert_eq!(sample(&logits, 1, greedy, &mut r), 0);
    }

    #[test]
    fn prefix_cache_roundtrips_and_continues_identically() {
        let mut cfg = ModelConfig::preset("tiny").unwrap();
        cfg.vocab_size = 64;
        cfg.n_layers = 2;
        cfg.d_model = 32;
        cfg.ffn_hidden = 48;
        cfg.head_dim = 8;
        cfg.rope_dim = 8;
        let mut m = Model::new(cfg).unwrap();
        m.init(9);
        let prefix: Vec<u32> = (0..40).map(|i| (i * 5 % 64) as u32).collect();
        let question = [3u32, 4, 5];
        let s = Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        };
        let full: Vec<u32> = prefix.iter().chain(&question).copied().collect();
        let want = generate(&m, &full, 10, s, 0, 64, None, |_| Ok(())).unwrap();
        let mut cache = KvCache::new(&m);
        m.forward_cached(&prefix, &mut cache).unwrap();
        let dir = std::env::temp_dir().join(format!("mnemo-prefix-{}", std::process::id()));
        let path = dir.join("p.safetensors");
        cache.save(&path, &m, &prefix).unwrap();
        let (mut loaded, toks) = KvCache::load(&path, &m).unwrap();
        assert_eq!(toks, prefix);
        let got =
            generate_after(&m, &mut loaded, &question, 10, s, 0, 64, None, |_| Ok(())).unwrap();
        assert_eq!(got, want);
        // Another model's cache is refused.
        let mut other = Model::new(m.cfg.clone()).unwrap();
        other.init(10);
        let err = format!("{:#}", KvCache::load(&path, &other).err().unwrap());
        assert!(err.contains("another model"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
