//! MTP speculation (module `speculate`) and the MTP block's cached driver
//! (`model::mtp_decode`): the cached block against the training driver's MTP logits, greedy
//! output against plain greedy decoding token for token (drafts mostly wrong, and often
//! right), the sampled output's distribution, and the errors.

use super::*;
use crate::config::{FfnKind, ModelConfig, Residual, V4Config, V4LayerType};
use crate::generate::generate;
use crate::model::Workspace;

/// A tiny DeepSeek-V4 model with one MTP block of attention type `mtp`: window 8, CSA every 4
/// tokens with top-3 (the indexer selects), HCA every 8, mHC with 2 streams, MoE with a hash
/// layer; every vector parameter moved away from its init.
fn model(mtp: V4LayerType, vocab: usize, seed: u64) -> Model {
    model_with(&[mtp], vocab, seed)
}

/// [`model`] with one MTP block per entry of `mtp` (its attention type).
fn model_with(mtp: &[V4LayerType], vocab: usize, seed: u64) -> Model {
    model_with_index_heads(mtp, vocab, seed, 2)
}

/// [`model_with`] with `index_n_heads` indexer heads.
fn model_with_index_heads(
    mtp: &[V4LayerType],
    vocab: usize,
    seed: u64,
    index_n_heads: usize,
) -> Model {
    let mut layer_types = vec![
        V4LayerType::SlidingAttention,
        V4LayerType::CompressedSparseAttention,
        V4LayerType::HeavilyCompressedAttention,
    ];
    layer_types.extend_from_slice(mtp);
    let cfg = ModelConfig {
        vocab_size: vocab,
        d_model: 16,
        n_layers: 3,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 8,
        rope_dim: 0,
        ffn_hidden: 8,
        tied_embeddings: false,
        norm_eps: 1e-5,
        init_std: 0.3,
        max_seq_len: 320,
        ffn: FfnKind::Moe,
        n_shared_experts: 1,
        n_routed_experts: 4,
        moe_inter: 8,
        top_k: 2,
        num_hash_layers: 1,
        residual: Residual::Mhc,
        hc_mult: 2,
        swiglu_limit: 10.0,
        v4: Some(V4Config {
            q_lora_rank: 8,
            o_lora_rank: 4,
            o_groups: 2,
            sliding_window: 8,
            layer_types,
            compress_rate_csa: 4,
            compress_rate_hca: 8,
            index_n_heads,
            index_head_dim: 8,
            index_topk: 3,
            qk_rope_head_dim: 4,
            compress_rope_theta: 160000.0,
            compress_rope_scaling: None,
            num_nextn_predict_layers: mtp.len(),
        }),
        ..ModelConfig::dense_defaults()
    };
    let mut m = Model::new(cfg).unwrap();
    m.init(seed);
    let mut r = Rng::new(seed + 50);
    for t in m.layout.tensors.clone() {
        if t.shape.len() == 1 || t.name.ends_with("ape") {
            for p in &mut m.params[t.range()] {
                *p += 0.3 * r.normal() as f32;
            }
        }
    }
    m
}

/// `model` whose main and MTP heads read one coordinate of the normed hidden state (both
/// final norms zero elsewhere): each picks one of the same two tokens by its sign. The MTP
/// head's sign is the one (of ±1) whose drafts agree more often on a reference prompt, so
/// drafts are often kept, runs of several included.
fn two_way(mtp: V4LayerType, seed: u64) -> Model {
    let mut m = model(mtp, 23, seed);
    let d = m.cfg.d_model;
    for off in [m.layout.norm, m.layout.mtp[0].norm] {
        m.params[off..off + d].fill(0.0);
        m.params[off] = 1.0;
    }
    let p = prompt(30, 7, 23);
    let (_, plus) = self::mtp(&m, &p, 40, 4);
    m.params[m.layout.mtp[0].norm] = -1.0;
    let (_, minus) = self::mtp(&m, &p, 40, 4);
    if plus.accepted > minus.accepted {
        m.params[m.layout.mtp[0].norm] = 1.0;
    }
    m
}

const GREEDY: Sampling = Sampling {
    temperature: 0.0,
    top_k: 0,
    top_p: 1.0,
};

fn prompt(len: usize, salt: u32, vocab: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 7 + salt * 13 + i * i * salt) % vocab as u32)
        .collect()
}

fn mtp(m: &Model, p: &[u32], max_new: usize, k: usize) -> (Vec<u32>, LookupStats) {
    let mut c = KvCache::new(m);
    let v = m.cfg.vocab_size;
    generate_mtp(m, &mut c, p, max_new, GREEDY, 0, v, None, k, |_| Ok(())).unwrap()
}

/// The cached MTP block over a sequence, in pieces of any size (drafting's one row, the
/// catch-up's few, a prefill chunk), gives the training driver's MTP logits (`mtp_logits`,
/// checked against the equations in `model::tests_mtp`) for every position.
#[test]
fn cached_mtp_block_matches_the_training_driver() {
    for ty in [
        V4LayerType::SlidingAttention,
        V4LayerType::CompressedSparseAttention,
    ] {
        // 16 indexer heads: no entry has every head ReLU-zeroed, so no scores tie at the
        // top-k boundary, where the full forward and the cached drivers may choose
        // differently (as transformers' do: `Model::v4_topk`).
        let m = model_with_index_heads(&[ty], 31, 3, 16);
        let v = m.cfg.vocab_size;
        let t = 70;
        let ids = prompt(t, 2, v);
        let mut next: Vec<u32> = ids[1..].to_vec();
        next.push(5);
        let mut ws = Workspace {
            mtp_weight: 0.3,
            ..Workspace::default()
        };
        m.forward(&ids, 1, t, &mut ws);
        let all: Vec<usize> = (0..t).collect();
        let want = m.mtp_logits(&next, &all, &mut ws).unwrap();
        let top = want.iter().fold(0.0f32, |a, &b| a.max(b.abs()));
        let mut main = KvCache::new(&m);
        let mut seq = [BatchSeq {
            tokens: &ids,
            cache: &mut main,
            logits_from: t - 1,
        }];
        let (_, xl) = m.forward_batch_streams(&mut seq).unwrap();
        let w = xl.len() / t;
        for piece in [1, 3, 70] {
            let mut c = KvCache::new(&m);
            let mut got = Vec::new();
            for (i0, nx) in (0..t).step_by(piece).zip(next.chunks(piece)) {
                let h = &xl[i0 * w..(i0 + nx.len()) * w];
                got.extend(m.mtp_forward_cached(0, h, nx, &mut c, 0).unwrap().logits);
            }
            assert_eq!(c.len(), t);
            let worst = got
                .iter()
                .zip(&want)
                .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(
                worst <= 1e-4 * top,
                "{ty:?} pieces of {piece}: {worst} (top {top})"
            );
        }
    }
}

/// Greedy MTP speculation emits plain greedy decoding's tokens, one for one: prompts and
/// outputs crossing the window (8) and many CSA (4) and HCA (8) entries, several draft lengths,
/// an MTP block with sliding or CSA attention; on random models (drafts mostly rejected), on
/// two-way models (drafts often kept, runs of them too) and with two chained MTP blocks.
#[test]
fn greedy_mtp_equals_plain_greedy_token_for_token() {
    let mut kept_runs = 0;
    for (seed, ty) in [
        (1u64, V4LayerType::SlidingAttention),
        (2, V4LayerType::CompressedSparseAttention),
    ] {
        for (name, m) in [
            ("random", model(ty, 29, seed)),
            ("two-way", two_way(ty, seed)),
        ] {
            let v = m.cfg.vocab_size;
            for (len, salt) in [(3usize, 1u32), (21, 2), (90, 3)] {
                let p = prompt(len, salt, v);
                let want = generate(&m, &p, 70, GREEDY, 0, v, None, |_| Ok(())).unwrap();
                for k in [1usize, 3, 6] {
                    let (got, st) = mtp(&m, &p, 70, k);
                    assert_eq!(got, want, "{name} {ty:?} prompt {len} draft {k}: {st:?}");
                    assert!(st.drafted > 0 && st.accepted <= st.drafted, "{st:?}");
                    if name == "two-way" && k > 1 {
                        assert!(st.accepted * 4 > st.drafted, "{name} k {k}: {st:?}");
                        kept_runs += (st.passes < 70 / 2) as usize;
                    }
                }
            }
        }
    }
    assert!(kept_runs > 0, "no decode kept runs of drafts");
}

/// A prompt of two prefill chunks; the end of the context and a stop token end MTP speculation where they end plain decoding.
#[test]
fn greedy_mtp_stops_where_plain_decoding_stops() {
    let m = two_way(V4LayerType::SlidingAttention, 4);
    let v = m.cfg.vocab_size;
    // Two prefill chunks (256 + 14 rows), and 50 positions left: the cache fills.
    let p = prompt(270, 5, v);
    let want = generate(&m, &p, 500, GREEDY, 0, v, None, |_| Ok(())).unwrap();
    let (got, _) = mtp(&m, &p, 500, 5);
    assert_eq!(got, want);
    let stop = want[7];
    let want = generate(&m, &p, 40, GREEDY, 0, v, Some(stop), |_| Ok(())).unwrap();
    let mut c = KvCache::new(&m);
    let (got, _) =
        generate_mtp(&m, &mut c, &p, 40, GREEDY, 0, v, Some(stop), 4, |_| Ok(())).unwrap();
    assert_eq!(got, want);
}

/// At temperature > 0 the second emitted token (the first that can be a draft) has the same
/// distribution as plain sampling's (two-sample chi-square).
#[test]
fn sampled_mtp_keeps_the_model_distribution() {
    let m = two_way(V4LayerType::SlidingAttention, 6);
    let v = m.cfg.vocab_size;
    let p = prompt(12, 4, v);
    let s = Sampling {
        temperature: 1.5,
        top_k: 0,
        top_p: 1.0,
    };
    let runs = 600;
    let (mut a, mut b) = (vec![0usize; v], vec![0usize; v]);
    for seed in 0..runs {
        let mut c = KvCache::new(&m);
        let (g, _) = generate_mtp(&m, &mut c, &p, 2, s, seed, v, None, 1, |_| Ok(())).unwrap();
        a[g[1] as usize] += 1;
        let g = generate(&m, &p, 2, s, seed + 100_000, v, None, |_| Ok(())).unwrap();
        b[g[1] as usize] += 1;
    }
    let mut chi2 = 0.0;
    let mut dof = 0;
    for i in 0..v {
        let t = a[i] + b[i];
        if t >= 20 {
            let e = t as f64 / 2.0;
            chi2 += (a[i] as f64 - e).powi(2) / e + (b[i] as f64 - e).powi(2) / e;
            dof += 1;
        }
    }
    assert!(dof >= 2, "{a:?} {b:?}");
    // 99.9% quantile of chi-square with up to 22 degrees of freedom is 48.3.
    assert!(chi2 < 48.3, "chi2 {chi2} dof {dof}: {a:?} vs {b:?}");
}

#[test]
fn mtp_speculation_refuses_what_it_cannot_do() {
    let m = model(V4LayerType::SlidingAttention, 29, 1);
    let main_only = Model::new(m.cfg.without_mtp()).unwrap();
    let mut c = KvCache::new(&main_only);
    let e = generate_mtp(
        &main_only,
        &mut c,
        &[1, 2],
        4,
        GREEDY,
        0,
        29,
        None,
        3,
        |_| Ok(()),
    );
    assert!(format!("{:#}", e.unwrap_err()).contains("no MTP block"));
    for k in [0, MAX_DRAFT_LEN + 1] {
        let e = check_mtp(&m, k).unwrap_err();
        assert!(format!("{e:#}").contains("draft length"), "{e:#}");
    }
    let mut c = KvCache::new(&m);
    m.forward_cached(&[1, 2, 3], &mut c).unwrap();
    let e = generate_mtp(&m, &mut c, &[4], 4, GREEDY, 0, 29, None, 3, |_| Ok(()));
    assert!(format!("{:#}", e.unwrap_err()).contains("empty cache"));
}

/// Two chained MTP blocks: over rounds of drafting (draft lengths below, at and above the
/// depth) and stand-in verifications (some drafts kept, then a token of the test's own), each
/// block `j`'s draft is the training driver's block-`j` argmax at position `N − 1` on the
/// verified tokens followed by the drafts before it (within f32 rounding of a near tie).
#[test]
fn chained_drafts_follow_the_training_driver() {
    let m = model_with(
        &[
            V4LayerType::SlidingAttention,
            V4LayerType::CompressedSparseAttention,
        ],
        31,
        5,
    );
    let v = m.cfg.vocab_size;
    let mut hist = prompt(40, 3, v);
    let n0 = hist.len() - 1;
    let mut main = KvCache::new(&m);
    let mut seq = [BatchSeq {
        tokens: &hist[..n0],
        cache: &mut main,
        logits_from: n0 - 1,
    }];
    let (_, xl) = m.forward_batch_streams(&mut seq).unwrap();
    let mut dr = Drafter::new(&m, main.capacity());
    let w = dr.w;
    dr.pend[0] = xl;
    // As after a prefill: the last prompt token is not yet known to the blocks.
    dr.catch_up(&m, &hist[..n0], main.len()).unwrap();
    let mut ws = Workspace {
        mtp_weight: 0.3,
        ..Workspace::default()
    };
    for (round, k) in [1usize, 2, 3, 2, 4, 1, 2, 3, 2, 2].into_iter().enumerate() {
        let n = hist.len() - 1;
        assert_eq!(main.len(), n);
        let drafts = dr.draft(&m, &hist, k, v).unwrap();
        assert_eq!(drafts.len(), k);
        let depth = k.min(2);
        let mut ids = hist.clone();
        ids.extend_from_slice(&drafts[..depth - 1]);
        m.forward(&ids, 1, ids.len(), &mut ws);
        for (j, &d) in drafts.iter().enumerate().take(depth) {
            let l = m.mtp_row_logits(&ws, j, n - 1);
            let top = l.iter().fold(f32::MIN, |a, &b| a.max(b));
            let scale = l.iter().fold(0.0f32, |a, &b| a.max(b.abs()));
            assert!(
                l[d as usize] >= top - 1e-4 * scale,
                "round {round} block {j}: draft {d} has {} of the top {top}",
                l[d as usize]
            );
        }
        // Stand-in verification: keep `a` drafts, then a token of our own.
        let a = round % (k + 1);
        let mut feed = vec![hist[n]];
        feed.extend_from_slice(&drafts);
        let mut seq = [BatchSeq {
            tokens: &feed,
            cache: &mut main,
            logits_from: 0,
        }];
        let (_, xl) = m.forward_batch_streams(&mut seq).unwrap();
        main.truncate(n + 1 + a).unwrap();
        dr.pend[0].extend_from_slice(&xl[..(a + 1) * w]);
        hist.extend_from_slice(&drafts[..a]);
        hist.push((round as u32 * 7 + 3) % v as u32);
    }
}
