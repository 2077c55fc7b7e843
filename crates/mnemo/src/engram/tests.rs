use super::*;
use crate::kernels::gradcheck::check;
use crate::rng::Rng;

fn spec(n_branch: usize, kernel: usize) -> GateSpec {
    GateSpec {
        d: 8,
        d_mem: 12,
        n_branch,
        kernel,
        dilation: 2,
        eps_gate: f32::EPSILON,
        eps_conv: 1e-5,
    }
}

/// Random parameters (norm weights around 1, conv weights non-zero so the conv path matters).
fn params(s: &GateSpec, rng: &mut Rng) -> Vec<f32> {
    let o = s.offsets();
    let mut p = vec![0.0; o.total];
    rng.fill_normal(&mut p, 0.3);
    for x in &mut p[o.norm_k..o.conv] {
        *x += 1.0;
    }
    p
}

fn loss(s: &GateSpec, p: &[f32], e: &[f32], h: &[f32], pos: &[u32], g: &[f32]) -> f64 {
    let mut y = vec![0.0; h.len()];
    let mut acts = GateActs::default();
    gate::forward(s, p, e, h, pos, &mut y, &mut acts);
    y.iter().zip(g).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// Finite-difference step: small, as the signed square root has large higher derivatives.
const EPS: f32 = 2e-3;

fn gradcheck_case(n_branch: usize, kernel: usize) {
    let s = spec(n_branch, kernel);
    let mut rng = Rng::new(11 + n_branch as u64 + kernel as u64);
    // Two rows of 9 tokens; the first row packs two documents (the second starts at 5).
    let pos: Vec<u32> = [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 8].to_vec();
    let nt = pos.len();
    let nd = n_branch * s.d;
    let p = params(&s, &mut rng);
    let mut e = vec![0.0; nt * s.d_mem];
    let mut h = vec![0.0; nt * nd];
    let mut g = vec![0.0; nt * nd];
    rng.fill_normal(&mut e, 1.0);
    rng.fill_normal(&mut h, 1.0);
    rng.fill_normal(&mut g, 1.0);
    let mut y = vec![0.0; nt * nd];
    let mut acts = GateActs::default();
    gate::forward(&s, &p, &e, &h, &pos, &mut y, &mut acts);
    let mut dh = vec![0.5; nt * nd];
    let mut de = vec![7.0; nt * s.d_mem];
    let mut dp = vec![0.0; p.len()];
    gate::backward(&s, &p, &acts, &g, &mut dh, &mut de, &mut dp);
    // dh accumulates onto what was there.
    dh.iter_mut().for_each(|x| *x -= 0.5);
    eprintln!("checking e");
    check(&e, &de, |x| loss(&s, &p, x, &h, &pos, &g), EPS, 1e-2);
    eprintln!("checking h");
    check(&h, &dh, |x| loss(&s, &p, &e, x, &pos, &g), EPS, 1e-2);
    // Each parameter tensor on its own (so a small tensor is not drowned by W_kv).
    for (name, shape, off) in s.tensors() {
        let len: usize = shape.iter().product();
        let r = off..off + len;
        check(
            &p[r.clone()],
            &dp[r.clone()],
            |x| {
                let mut q = p.clone();
                q[r.clone()].copy_from_slice(x);
                loss(&s, &q, &e, &h, &pos, &g)
            },
            EPS,
            1e-2,
        );
        let _ = name;
    }
}

#[test]
fn engram_gate_gradients_mhc_with_conv() {
    gradcheck_case(3, 4);
}

#[test]
fn engram_gate_gradients_single_stream_without_conv() {
    gradcheck_case(1, 0);
}

#[test]
fn engram_gate_zero_conv_gives_the_gated_value_and_documents_are_independent() {
    let s = spec(2, 4);
    let mut rng = Rng::new(5);
    let mut p = s.init(&mut rng, 0.5);
    let o = s.offsets();
    assert!(p[o.conv..].iter().all(|&x| x == 0.0));
    let nt = 6;
    let mut e = vec![0.0; nt * s.d_mem];
    let mut h = vec![0.0; nt * 16];
    rng.fill_normal(&mut e, 1.0);
    rng.fill_normal(&mut h, 1.0);
    let pos = [0u32, 1, 2, 0, 1, 2];
    let mut y = vec![0.0; nt * 16];
    let mut acts = GateActs::default();
    gate::forward(&s, &p, &e, &h, &pos, &mut y, &mut acts);
    // Zero conv: y = a·v exactly (SiLU(0) = 0).
    let kv = {
        let mut v = vec![0.0; s.d];
        for i in 0..s.d {
            v[i] = (0..s.d_mem).map(|j| p[i * s.d_mem + j] * e[j]).sum::<f32>();
        }
        v
    };
    let a = acts.gates();
    for i in 0..s.d {
        assert!((y[i] - a[0] * kv[i]).abs() < 1e-5);
        assert!((y[8 + i] - a[1] * kv[i]).abs() < 1e-5);
    }
    // With a non-zero conv, the second document (tokens 3..6) equals the same tokens alone.
    rng.fill_normal(&mut p[o.conv..], 0.5);
    gate::forward(&s, &p, &e, &h, &pos, &mut y, &mut acts);
    let mut y2 = vec![0.0; 3 * 16];
    gate::forward(
        &s,
        &p,
        &e[3 * 12..],
        &h[3 * 16..],
        &[0, 1, 2],
        &mut y2,
        &mut acts,
    );
    for (a, b) in y[3 * 16..].iter().zip(&y2) {
        assert!((a - b).abs() < 1e-6);
    }
}

pub(crate) fn tiny_engram(n_branch: usize, kernel: usize) -> Engram {
    let decoded: Vec<String> = (0..40).map(|i| format!("w{}", i % 25)).collect();
    let comp = CompressedTokenizer::from_strings(&decoded, &decoded).unwrap();
    let cfg = EngramConfig {
        layer_ids: vec![0, 2],
        max_ngram_size: 3,
        n_head_per_ngram: 2,
        head_dim: 4,
        vocab_size_per_ngram: vec![30, 40],
        kernel_size: kernel,
        ..EngramConfig::default()
    };
    Engram::new(cfg, comp, 8, n_branch, 1, 0.3).unwrap()
}

#[test]
fn engram_incremental_decode_equals_full_forward() {
    for (n_branch, kernel) in [(2, 4), (1, 0)] {
        let mut eng = tiny_engram(n_branch, kernel);
        let mut rng = Rng::new(9);
        for l in &mut eng.layers {
            let o = l.gate.offsets();
            rng.fill_normal(&mut l.params[o.conv..], 0.5); // exercise the conv history
        }
        let eot = 0u32;
        let tokens: Vec<u32> = vec![5, 17, 30, 5, 17, 2, 9, 0, 5, 17, 30, 11, 39, 1];
        let nt = tokens.len();
        let nd = n_branch * 8;
        let cids = eng.compress.compress(&tokens);
        let pos = positions_in_documents(&tokens, 1, nt, Some(eot));
        let mut h = vec![0.0; nt * nd];
        rng.fill_normal(&mut h, 1.0);
        let mut full = vec![];
        for l in &eng.layers {
            let mem = l.lookup(&cids, &pos).unwrap();
            let mut y = vec![0.0; nt * nd];
            l.forward(mem, &h, &pos, &mut y, &mut EngramActs::default());
            full.push(y);
        }
        let mut st = eng.new_state();
        for (t, &tid) in tokens.iter().enumerate() {
            let cid = eng.compress.compress_one(tid);
            for (i, l) in eng.layers.iter().enumerate() {
                let mut y = vec![0.0; nd];
                l.forward_step(&mut st, i, cid, &h[t * nd..(t + 1) * nd], &mut y)
                    .unwrap();
                let want = &full[i][t * nd..(t + 1) * nd];
                let err = y
                    .iter()
                    .zip(want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(err < 1e-5, "layer {i} token {t}: {err}");
            }
            st.push(&eng, tid, Some(eot));
        }
    }
}

#[test]
fn engram_layer_backward_returns_sparse_rows_matching_dense_finite_differences() {
    let eng = tiny_engram(2, 4);
    let l = &eng.layers[1];
    let tokens: Vec<u32> = vec![3, 4, 5, 3, 4, 6, 7, 3];
    let nt = tokens.len();
    let cids = eng.compress.compress(&tokens);
    let pos = positions_in_documents(&tokens, 2, 4, None);
    let mut rng = Rng::new(4);
    let mut h = vec![0.0; nt * 16];
    let mut g = vec![0.0; nt * 16];
    rng.fill_normal(&mut h, 1.0);
    rng.fill_normal(&mut g, 1.0);
    let mut y = vec![0.0; nt * 16];
    let mut acts = EngramActs::default();
    l.forward(l.lookup(&cids, &pos).unwrap(), &h, &pos, &mut y, &mut acts);
    let mut dh = vec![0.0; nt * 16];
    let mut dp = vec![0.0; l.params.len()];
    let sg = l.backward(&acts, &g, &mut dh, &mut dp);
    let mut used = acts.rows.clone();
    used.sort_unstable();
    used.dedup();
    assert_eq!(sg.rows, used);
    assert!(sg.rows.len() < l.table.rows());
    let mut dense = vec![0.0; l.table.rows() * 4];
    sg.add_to_dense(&mut dense);
    let table = l.table.as_slice().to_vec();
    let f = |tab: &[f32]| {
        let t = EngramTable::from_vec(l.table.rows(), 4, tab.to_vec()).unwrap();
        let rows = l.hash.rows(&cids, &pos);
        let e = t.prefetch(&rows).unwrap();
        loss(&l.gate, &l.params, &e, &h, &pos, &g)
    };
    // Check the used rows only (the rest are exactly zero by construction).
    let idx: Vec<usize> = sg
        .rows
        .iter()
        .flat_map(|&r| (0..4).map(move |i| r as usize * 4 + i))
        .collect();
    let x: Vec<f32> = idx.iter().map(|&i| table[i]).collect();
    let a: Vec<f32> = idx.iter().map(|&i| dense[i]).collect();
    check(
        &x,
        &a,
        |xs| {
            let mut t = table.clone();
            for (&i, &v) in idx.iter().zip(xs) {
                t[i] = v;
            }
            f(&t)
        },
        1e-2,
        1e-2,
    );
}

/// [`Engram::plan`] sizes a DeepSeek-V4.1-sized Engram (blocks 1 and 14, orders 2..=4, 8 heads
/// of about 16M rows per order: ~384M rows per layer) without building a table, and agrees
/// with what [`Engram::new`] builds.
#[test]
fn engram_plan_sizes_tables_without_building_them() {
    let v41 = EngramConfig {
        layer_ids: vec![1, 14],
        max_ngram_size: 4,
        n_head_per_ngram: 8,
        head_dim: 16,
        vocab_size_per_ngram: vec![16_000_000; 3],
        kernel_size: 0,
        ..EngramConfig::default()
    };
    let ident = CompressedTokenizer::identity(129_280).unwrap();
    let plan = Engram::plan(&v41, &ident, 64, 1).unwrap();
    let rows: Vec<u64> = plan.iter().map(|i| i.total_rows).collect();
    assert_eq!(rows, [384_006_168, 384_016_682]);
    assert_eq!(plan[0].table_bytes, 384_006_168 * 16 * 4);
    assert_eq!(plan[1].orders, [2, 3, 4]);
    assert_eq!(plan[1].primes.len(), 3);
    assert!(plan[1].primes.iter().flatten().all(|&p| p > 16_000_000));
    // The same summary as the Engram that is built (primes, multipliers, rows, gate sizes).
    let eng = tiny_engram(2, 4);
    let planned = Engram::plan(&eng.cfg, &eng.compress, 8, 2).unwrap();
    assert_eq!(planned, eng.inspect());
    assert!(Engram::plan(&eng.cfg, &eng.compress, 0, 2).is_err());
}

#[test]
fn engram_config_validation_and_inspect() {
    let ok = EngramConfig::default();
    ok.validate(Some(4)).unwrap();
    let msg = |c: EngramConfig| format!("{:#}", c.validate(Some(4)).unwrap_err());
    assert!(msg(EngramConfig {
        max_ngram_size: 1,
        vocab_size_per_ngram: vec![],
        ..ok.clone()
    })
    .contains("N must be ≥ 2"));
    assert!(msg(EngramConfig {
        n_head_per_ngram: 0,
        ..ok.clone()
    })
    .contains("n_head_per_ngram"));
    assert!(msg(EngramConfig {
        layer_ids: vec![5],
        ..ok.clone()
    })
    .contains("does not exist"));
    assert!(msg(EngramConfig {
        layer_ids: vec![1, 1],
        ..ok.clone()
    })
    .contains("twice"));
    assert!(msg(EngramConfig {
        vocab_size_per_ngram: vec![100],
        ..ok.clone()
    })
    .contains("one per order"));
    assert!(msg(EngramConfig {
        table_lr_mult: 0.0,
        ..ok.clone()
    })
    .contains("table_lr_mult"));
    // Serde round trip, with defaults for the optional fields.
    let json = r#"{"layer_ids":[1],"max_ngram_size":3,"n_head_per_ngram":4,"head_dim":16,
        "vocab_size_per_ngram":[50000,50000],"kernel_size":4,"seed":0,"pad_id":0}"#;
    let c: EngramConfig = serde_json::from_str(json).unwrap();
    assert_eq!(c, ok);
    assert_eq!(c.d_mem(), 2 * 4 * 16);

    let eng = tiny_engram(2, 4);
    let info = eng.inspect();
    assert_eq!(info.len(), 2);
    assert_eq!(info[0].orders, [2, 3]);
    assert_eq!(info[0].primes, [[31, 37], [41, 43]]);
    assert_eq!(info[1].primes, [[47, 53], [59, 61]]); // distinct across layers
    assert_eq!(info[1].total_rows, 47 + 53 + 59 + 61);
    assert_eq!(info[1].table_bytes, info[1].total_rows * 4 * 4);
    assert_eq!(eng.layer_of_block(2), Some(1));
    let text = eng.inspect_text();
    assert!(
        text.contains("layer 2: orders [2, 3], 2 heads/order x 4 dims, 220 rows"),
        "{text}"
    );
    assert!(text.contains("3-gram table sizes [59, 61]"), "{text}");
    assert_eq!(eng.lookup_all(&[1, 2, 3], &[0, 1, 2]).unwrap().len(), 2);
    // Stored parts reassemble; a table of the wrong size is refused.
    let cfg = eng.cfg.clone();
    let comp = eng.compress.clone();
    let parts: Vec<_> = eng
        .layers
        .into_iter()
        .map(|l| (l.hash, l.table, l.params))
        .collect();
    let mut bad: Vec<_> = parts
        .iter()
        .map(|(h, t, p)| {
            (
                h.clone(),
                EngramTable::from_vec(t.rows(), 4, t.as_slice().to_vec()).unwrap(),
                p.clone(),
            )
        })
        .collect();
    bad[0].1 = EngramTable::zeros(10, 4);
    assert!(Engram::from_parts(cfg.clone(), comp.clone(), 8, 2, bad).is_err());
    Engram::from_parts(cfg, comp, 8, 2, parts).unwrap();
}

/// Compression statistics of a real tokenizer (what `mnemo engram compress` would print):
/// `MNEMO_ENGRAM_TOKENIZER=path/to/tokenizer.json cargo test --release -p mnemo
/// engram_compression_report -- --ignored --nocapture`.
#[test]
#[ignore]
fn engram_compression_report() {
    let Ok(path) = std::env::var("MNEMO_ENGRAM_TOKENIZER") else {
        eprintln!("set MNEMO_ENGRAM_TOKENIZER to a tokenizer.json");
        return;
    };
    let tok = crate::tokenizer::Tokenizer::load(std::path::Path::new(&path)).unwrap();
    let t = std::time::Instant::now();
    let c = CompressedTokenizer::build(&tok).unwrap();
    eprintln!("{path}: built in {:.2} s", t.elapsed().as_secs_f64());
    eprint!("{}", c.report(&tok, 8));
}

/// End to end: memory that depends on the previous token must be learned from the tables. The
/// target added to the stream is a fixed function of the (previous, current) token pair; the
/// gate parameters train with AdamW, the tables with lazy Adam at 5× the learning rate, and
/// the loss falls by more than 10×.
#[test]
fn engram_learns_a_bigram_signal_with_lazy_adam() {
    let mut eng = tiny_engram(2, 4);
    let li = 0;
    let d = 8;
    let nd = 2 * d;
    let (b, t) = (4, 12);
    let mut rng = Rng::new(21);
    // Fixed random target per (prev, cur) pair of compressed ids.
    let mut target_of = std::collections::HashMap::new();
    let mut tgt = |p: u32, c: u32, rng: &mut Rng| -> Vec<f32> {
        target_of
            .entry((p, c))
            .or_insert_with(|| {
                let mut v = vec![0.0; nd];
                rng.fill_normal(&mut v, 0.5);
                v
            })
            .clone()
    };
    // A small fixed vocabulary of sequences so that n-grams repeat.
    let seqs: Vec<Vec<u32>> = (0..b)
        .map(|_| (0..t).map(|_| 1 + rng.below(6) as u32).collect())
        .collect();
    let tokens: Vec<u32> = seqs.concat();
    let cids = eng.compress.compress(&tokens);
    let pos = positions_in_documents(&tokens, b, t, None);
    let mut h = vec![0.0; b * t * nd];
    rng.fill_normal(&mut h, 1.0);
    let mut target = vec![0.0; b * t * nd];
    for i in 0..b * t {
        let prev = if pos[i] > 0 { cids[i - 1] } else { u32::MAX };
        target[i * nd..(i + 1) * nd].copy_from_slice(&tgt(prev, cids[i], &mut rng));
    }
    let layer = &mut eng.layers[li];
    let mut opt = SparseAdam::new(layer.table.rows(), layer.table.dim());
    let hp = SparseAdamParams::default();
    let aw = crate::kernels::adamw::AdamWParams {
        lr: 3e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let (mut m, mut v) = (vec![0.0; layer.params.len()], vec![0.0; layer.params.len()]);
    let mut first = 0.0;
    let mut last = 0.0;
    for step in 1..=300u64 {
        let mem = layer.lookup(&cids, &pos).unwrap();
        let mut y = vec![0.0; b * t * nd];
        let mut acts = EngramActs::default();
        layer.forward(mem, &h, &pos, &mut y, &mut acts);
        let n = y.len() as f32;
        let loss: f64 = y
            .iter()
            .zip(&target)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            / n as f64;
        let dy: Vec<f32> = y
            .iter()
            .zip(&target)
            .map(|(a, b)| 2.0 * (a - b) / n)
            .collect();
        let mut dh = vec![0.0; y.len()];
        let mut dp = vec![0.0; layer.params.len()];
        let tg = layer.backward(&acts, &dy, &mut dh, &mut dp);
        crate::kernels::adamw::step(&mut layer.params, &dp, &mut m, &mut v, aw, step, false);
        opt.update(&mut layer.table, &tg, aw.lr, &hp).unwrap();
        if step == 1 {
            first = loss;
        }
        last = loss;
    }
    eprintln!("engram bigram regression: loss {first:.4} -> {last:.5} in 300 steps");
    assert!(last < first / 10.0, "loss {first} -> {last}");
}

/// Timing of one layer's gate at a training-like size:
/// `cargo test --release -p mnemo engram_gate_timing -- --ignored --nocapture`.
#[test]
#[ignore]
fn engram_gate_timing() {
    let s = GateSpec {
        d: 512,
        d_mem: 512,
        n_branch: 4,
        kernel: 4,
        dilation: 3,
        eps_gate: f32::EPSILON,
        eps_conv: 1e-5,
    };
    let nt = 4096;
    let nd = s.n_branch * s.d;
    let mut rng = Rng::new(1);
    let p = params(&s, &mut rng);
    let mut e = vec![0.0; nt * s.d_mem];
    let mut h = vec![0.0; nt * nd];
    rng.fill_normal(&mut e, 1.0);
    rng.fill_normal(&mut h, 1.0);
    let pos: Vec<u32> = (0..nt as u32).map(|i| i % 512).collect();
    let mut y = vec![0.0; nt * nd];
    let mut acts = GateActs::default();
    let (mut dh, mut de, mut dp) = (
        vec![0.0; nt * nd],
        vec![0.0; nt * s.d_mem],
        vec![0.0; p.len()],
    );
    eprintln!(
        "gemm peak here: {:.1} GFLOP/s",
        crate::kernels::matmul::bench_gemm(512, 5)
    );
    for rep in 0..3 {
        let t0 = std::time::Instant::now();
        gate::forward(&s, &p, &e, &h, &pos, &mut y, &mut acts);
        let t1 = std::time::Instant::now();
        gate::backward(&s, &p, &acts, &y, &mut dh, &mut de, &mut dp);
        let t2 = std::time::Instant::now();
        let flop = 2.0 * nt as f64 * ((s.n_branch + 1) * s.d * s.d_mem) as f64;
        eprintln!(
            "rep {rep}: gate N={nt} d={} n={} d_mem={}: forward {:.1} ms ({:.1} GFLOP/s), backward {:.1} ms ({:.1} GFLOP/s)",
            s.d,
            s.n_branch,
            s.d_mem,
            (t1 - t0).as_secs_f64() * 1e3,
            flop / (t1 - t0).as_secs_f64() / 1e9,
            (t2 - t1).as_secs_f64() * 1e3,
            2.0 * flop / (t2 - t1).as_secs_f64() / 1e9
        );
    }
}

#[test]
fn engram_sparse_grad_accumulate_merges_sorted_rows() {
    let a = SparseGrad::from_gather(&[5, 1, 5], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2);
    let b = SparseGrad::from_gather(&[2, 5], &[10.0, 20.0, 30.0, 40.0], 2);
    let mut acc = SparseGrad::default();
    acc.accumulate(&a);
    acc.accumulate(&b);
    assert_eq!(acc.rows, vec![1, 2, 5]);
    assert_eq!(acc.grad, vec![3.0, 4.0, 10.0, 20.0, 36.0, 48.0]);
    let mut dense = vec![0.0f32; 12];
    a.add_to_dense(&mut dense);
    b.add_to_dense(&mut dense);
    let mut d2 = vec![0.0f32; 12];
    acc.add_to_dense(&mut d2);
    assert_eq!(dense, d2);
}
