//! The engine's scheduling, driven step by step on tiny random models: the prefill chunk
//! schedule keeps the rows of a fresh prefill, a long prompt does not stall decoding, prefilling
//! sequences take turns, every request finishes in arrival order, and the outputs (mixed steps,
//! prompt-cache hits, DeepSeek-V4 snapshots) equal plain greedy generation.

use super::prefix::{fresh_alone, next_chunk, reusable};
use super::seq::{held_back, Event, Phase, Request, Seq};
use super::{Engine, EngineConfig, Shared};
use mnemo::config::{ModelConfig, V4Config, V4LayerType};
use mnemo::generate::{generate, Sampling, PREFILL_CHUNK};
use mnemo::model::Model;
use mnemo::tokenizer::Tokenizer;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const GREEDY: Sampling = Sampling {
    temperature: 0.0,
    top_k: 0,
    top_p: 1.0,
};

/// The chunk lengths of prefilling `len` tokens after `n` reused ones, at most `max(step)` at
/// step `step`, stopping at `snap` first when given.
fn chunks(len: usize, n: usize, snap: Option<usize>, max: impl Fn(usize) -> usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut done = n;
    while done < len {
        let k = match snap {
            Some(s) if done < s => next_chunk(s - done, false, max(out.len())),
            _ => next_chunk(len - done, fresh_alone(len), max(out.len())),
        };
        assert!(k >= 1 && done + k <= len && snap.is_none_or(|s| done >= s || done + k <= s));
        out.push(k);
        done += k;
    }
    out
}

/// Whatever is reused and however the chunks are bounded, every chunk has at least two rows
/// except the last, which has one exactly when a fresh prefill's does, and the entry's reused
/// rows never include a row that ran alone.
#[test]
fn reused_prefixes_keep_the_rows_of_a_fresh_prefill() {
    let c = PREFILL_CHUNK;
    let maxes: [&dyn Fn(usize) -> usize; 4] =
        [&|_| c, &|_| 3, &|_| 64, &|s| [3, 64, 5, 256][s % 4]];
    for len in [2, 17, 40, c, c + 1, c + 2, 2 * c, 2 * c + 1, 3 * c - 1] {
        for entry_len in [1, 16, 39, c, c + 1, c + 2, 2 * c + 1, 3 * c] {
            for lcp in 0..=entry_len.min(len) {
                let n = reusable(len, lcp, entry_len);
                assert!(n <= lcp && n < len, "{len} {lcp} {entry_len}: {n}");
                assert!(!(fresh_alone(entry_len) && n == entry_len));
                // Little is given up: at most two rows.
                assert!(n + 2 >= lcp.min(len - 1), "{len} {lcp} {entry_len}: {n}");
                for max in maxes {
                    let ch = chunks(len, n, None, max);
                    assert!(ch[..ch.len() - 1].iter().all(|&k| k > 1), "{ch:?}");
                    assert_eq!(ch.last() == Some(&1), fresh_alone(len), "{len} {n}");
                    assert!(ch.iter().all(|&k| k <= max(0).max(c).max(3)));
                }
            }
        }
    }
    // Bounded chunks: 64 rows at most, the rest never a chunk of one.
    assert_eq!(chunks(130, 0, None, |_| 64), [64, 64, 2]);
    assert_eq!(chunks(129, 0, None, |_| 64), [64, 63, 2]);
    assert_eq!(chunks(257, 0, None, |_| 64), [64, 64, 64, 64, 1]);
    // Stopping at a snapshot point first.
    assert_eq!(chunks(180, 0, Some(100), |_| 64), [64, 36, 64, 16]);
    // A repeated prompt of 40 tokens: 38 reused, the last two prefilled together.
    assert_eq!(reusable(40, 39, 40), 38);
    // A longer prompt after a cached one: all of the cached one.
    assert_eq!(reusable(45, 40, 40), 40);
}

#[test]
fn holds_back_a_partial_stop_sequence() {
    let stops = vec!["\n\n".to_string(), "END".to_string()];
    assert_eq!(held_back("abc\n", &stops), 1);
    assert_eq!(held_back("abcEN", &stops), 2);
    assert_eq!(held_back("abc", &stops), 0);
    assert_eq!(held_back("é", &["éx".to_string()]), 2);
}

/// A dense model (vocabulary 260: the byte tokenizer's 257 ids and 3 more).
fn dense() -> Model {
    let cfg = ModelConfig {
        vocab_size: 260,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        rope_dim: 8,
        ffn_hidden: 48,
        tied_embeddings: false,
        init_std: 0.3,
        max_seq_len: 512,
        ..ModelConfig::preset("tiny").unwrap()
    };
    let mut m = Model::new(cfg).unwrap();
    m.init(3);
    m
}

/// A DeepSeek-V4 model: window 8, a CSA layer (every 4 tokens, top-4) and an HCA one (every
/// 16), MoE with 4 experts, mHC.
fn v4() -> Model {
    let mut cfg = ModelConfig::preset("v4-tiny").unwrap();
    cfg.vocab_size = 260;
    cfg.d_model = 32;
    cfg.n_layers = 3;
    cfg.head_dim = 16;
    cfg.ffn_hidden = 32;
    cfg.moe_inter = 16;
    cfg.n_routed_experts = 4;
    cfg.max_seq_len = 512;
    cfg.init_std = 0.3;
    cfg.v4 = Some(V4Config {
        q_lora_rank: 16,
        o_lora_rank: 8,
        o_groups: 2,
        sliding_window: 8,
        layer_types: vec![
            V4LayerType::SlidingAttention,
            V4LayerType::CompressedSparseAttention,
            V4LayerType::HeavilyCompressedAttention,
        ],
        compress_rate_csa: 4,
        compress_rate_hca: 16,
        index_n_heads: 2,
        index_head_dim: 8,
        index_topk: 4,
        qk_rope_head_dim: 8,
        num_nextn_predict_layers: 0,
        ..cfg.v4.clone().unwrap()
    });
    let mut m = Model::new(cfg).unwrap();
    m.init(5);
    m
}

fn engine(model: Model, f: impl FnOnce(&mut EngineConfig)) -> Engine {
    let tok = Tokenizer::train(std::iter::once("fn f(x) { x }".to_string()), 257).unwrap();
    let mut cfg = EngineConfig {
        max_batch: 4,
        ctx: 512,
        prefill_chunk: 4,
        lookup: Default::default(),
        lookup_default: false,
        prefix_min_tokens: 16,
        prefix_max_entries: 0,
        prefix_dir: None,
        prefix_dir_limit: 0,
        shutdown_grace: Duration::from_secs(1),
        step_delay: Duration::ZERO,
    };
    f(&mut cfg);
    Engine::new(
        Arc::new(model),
        Arc::new(tok),
        cfg,
        Arc::new(Shared::default()),
    )
}

/// A greedy request for `max_tokens` tokens (end of text ignored) and its event receiver.
fn request(prompt: Vec<u32>, max_tokens: usize) -> (Request, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let r = Request {
        prompt,
        max_tokens,
        sampling: GREEDY,
        seed: 0,
        stop: Vec::new(),
        ignore_eos: true,
        lookup: Some(false),
        arrived: Instant::now(),
        tx,
    };
    (r, rx)
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 1 + (i * 7 + seed * 13) % 250)
        .collect()
}

fn greedy(e: &Engine, p: &[u32], n: usize) -> Vec<u32> {
    generate(&e.model, p, n, GREEDY, 0, 257, None, |_| Ok(())).unwrap()
}

fn prefilling(s: &Seq) -> Option<usize> {
    match s.phase {
        Phase::Prefill { done, .. } => Some(done),
        Phase::Decode => None,
    }
}

/// While a long prompt is prefilled (bounded chunks, in the same forward as the decode rows),
/// a decoding sequence gains a token every step; a short prompt that arrives after the long
/// one starts within a turn; every output equals plain greedy generation.
#[test]
fn a_long_prompt_is_prefilled_in_turns_without_stalling_decoding() {
    for model in [dense(), v4()] {
        let mut e = engine(model, |_| {});
        let pa = prompt(1, 6);
        let (r, _ra) = request(pa.clone(), 40);
        let mut active = vec![e.admit(r).unwrap()];
        e.step(&mut active);
        assert_eq!(
            active[0].ids.len(),
            1,
            "alone, the prompt runs in one chunk"
        );
        let (pl, ps) = (prompt(2, 45), prompt(3, 5));
        let (r, _rl) = request(pl.clone(), 8);
        active.push(e.admit(r).unwrap());
        let (r, _rs) = request(ps.clone(), 8);
        active.push(e.admit(r).unwrap());
        let mut steps = 0;
        while prefilling(&active[1]).is_some() {
            let (a0, l0) = (active[0].ids.len(), prefilling(&active[1]).unwrap());
            e.step(&mut active);
            steps += 1;
            assert_eq!(active[0].ids.len(), a0 + 1, "decoding never waits");
            let l1 = prefilling(&active[1]).unwrap_or(pl.len());
            assert!(l1 <= l0 + 4, "at most --prefill-chunk rows a step");
            if steps == 4 {
                assert!(
                    prefilling(&active[2]).is_none(),
                    "the short prompt had its turn"
                );
            }
        }
        assert!(steps >= 12, "{steps} steps for 45 rows in chunks of 4");
        while active.iter().any(|s| !s.finished) {
            e.step(&mut active);
        }
        assert_eq!(active[0].ids, greedy(&e, &pa, 40));
        assert_eq!(active[1].ids, greedy(&e, &pl, 8));
        assert_eq!(active[2].ids, greedy(&e, &ps, 8));
    }
}

/// Short prompts that join together are prefilled in one step (one pass over the weights),
/// beside the decoding sequence, and their outputs equal plain greedy generation.
#[test]
fn short_prompts_share_a_step() {
    let mut e = engine(dense(), |c| c.prefill_chunk = 64);
    let (r, _ra) = request(prompt(1, 6), 20);
    let mut active = vec![e.admit(r).unwrap()];
    e.step(&mut active);
    let ps: Vec<Vec<u32>> = (2..5).map(|i| prompt(i, 12 + i as usize)).collect();
    let mut rxs = Vec::new();
    for p in &ps {
        let (r, rx) = request(p.clone(), 6);
        active.push(e.admit(r).unwrap());
        rxs.push(rx);
    }
    e.step(&mut active);
    assert_eq!(active[0].ids.len(), 2);
    assert!(
        active[1..].iter().all(|s| s.ids.len() == 1),
        "one step for 3 prompts"
    );
    while active.iter().any(|s| !s.finished) {
        e.step(&mut active);
    }
    for (s, p) in active[1..].iter().zip(&ps) {
        assert_eq!(s.ids, greedy(&e, p, 6));
    }
}

/// Six equal requests through a batch of two: each finishes, in arrival order, with its events.
#[test]
fn requests_finish_in_arrival_order_and_none_starves() {
    let mut e = engine(dense(), |c| c.max_batch = 2);
    let (tx, mut rx) = mpsc::channel(8);
    let mut rxs = Vec::new();
    for i in 0..6 {
        let (r, rr) = request(prompt(i, 10 + i as usize), 5);
        tx.try_send(r).ok().unwrap();
        rxs.push(rr);
    }
    let mut active = Vec::new();
    let mut finished_at = [None; 6];
    for tick in 0..100 {
        e.join(&mut rx, &mut active);
        assert!(active.len() <= 2);
        e.tick(&mut active);
        for (i, r) in rxs.iter_mut().enumerate() {
            while let Ok(ev) = r.try_recv() {
                if let Event::Done(f) = ev {
                    assert_eq!(f.completion_tokens, 5);
                    finished_at[i] = Some(tick);
                }
            }
        }
    }
    let at: Vec<usize> = finished_at.iter().map(|t| t.expect("finished")).collect();
    assert!(at.windows(2).all(|w| w[0] <= w[1]), "{at:?}");
}

/// DeepSeek-V4 prompt cache: a prompt that leaves a cached one more than its state can be cut
/// back keeps its state at the shared prefix; a third prompt with that prefix reuses it; a
/// repeated prompt reuses all but its last rows. Outputs equal plain greedy generation.
#[test]
fn v4_prompt_cache_covers_the_window_entries_and_shared_prefixes() {
    let mut e = engine(v4(), |c| c.prefix_max_entries = 4);
    let common = prompt(4, 100);
    let with = |tail: u32, n: usize| -> Vec<u32> {
        let mut p = common.clone();
        p.extend(prompt(tail, n));
        p
    };
    let run = |e: &mut Engine, p: &[u32]| -> (Vec<u32>, usize) {
        let (r, _rx) = request(p.to_vec(), 6);
        let mut active = vec![e.admit(r).unwrap()];
        while !active[0].finished {
            e.step(&mut active);
        }
        (active[0].ids.clone(), active[0].cached_tokens)
    };
    let (p1, p2, p3) = (with(5, 80), with(6, 80), with(7, 10));
    let (ids, cached) = run(&mut e, &p1);
    assert_eq!((ids, cached), (greedy(&e, &p1, 6), 0));
    // 80 rows past the shared prefix: more than a V4 state can be cut back.
    let (ids, cached) = run(&mut e, &p2);
    assert_eq!((ids, cached), (greedy(&e, &p2, 6), 0));
    assert!(e.prefixes.iter().any(|x| x.tokens == common), "a snapshot");
    let (ids, cached) = run(&mut e, &p3);
    assert_eq!(cached, 100);
    assert_eq!(ids, greedy(&e, &p3, 6));
    let (ids, cached) = run(&mut e, &p3);
    assert_eq!(cached, p3.len() - 2);
    assert_eq!(ids, greedy(&e, &p3, 6));
}
