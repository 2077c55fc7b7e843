//! End-to-end training on a tiny generated corpus: loss goes down, a stopped-and-resumed run is
//! bit-identical to an uninterrupted one, and checkpoints survive reloading.

use mnemo::config::CorpusSpec;
use mnemo::config::ModelConfig;
use mnemo::kernels::rope::RopeLayout;
use mnemo::train::{train, RunConfig, Start, TrainConfig, TrainOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mnemo-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A few dozen small, repetitive "source files" so a tiny model can learn something quickly.
fn make_corpus(dir: &Path) {
    for i in 0..30 {
        let mut s = String::new();
        for j in 0..40 {
            s.push_str(&format!(
                "fn item_{i}_{j}(x: u32) -> u32 {{\n    let y = x + {j};\n    y * {}\n}}\n\n",
                (i + j) % 7
            ));
        }
        std::fs::write(dir.join(format!("file_{i}.rs")), s).unwrap();
    }
}

/// A fresh temporary directory `name` with the small corpus in `data/` and a token cache
/// directory `cache/`: (root, data, cache).
fn corpus_dir(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let root = tmpdir(name);
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    make_corpus(&data);
    let cache = root.join("cache");
    (root, data, cache)
}

/// The DSA indexer used by the DSA tests: 2 heads × 8 dims, RoPE on 4, top-8.
fn small_dsa() -> mnemo::config::DsaConfig {
    mnemo::config::DsaConfig {
        index_n_heads: 2,
        index_head_dim: 8,
        index_rope_dim: 4,
        index_topk: 8,
    }
}

fn run_config(data: &Path, steps: u64) -> RunConfig {
    RunConfig {
        model: ModelConfig {
            vocab_size: 320,
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            rope_theta: 10000.0,
            rope_dim: 8,
            rope_layout: RopeLayout::Interleaved,
            ffn_hidden: 64,
            tied_embeddings: true,
            norm_eps: 1e-5,
            init_std: 0.02,
            max_seq_len: 64,
            ..ModelConfig::dense_defaults()
        },
        train: TrainConfig {
            batch_size: 4,
            seq_len: 32,
            grad_accum: 2,
            max_steps: steps,
            lr: 1e-2,
            min_lr: 1e-3,
            warmup_steps: 5,
            log_interval: 5,
            eval_interval: 50,
            eval_batches: 2,
            save_interval: 40,
            ..TrainConfig::default()
        },
        data: CorpusSpec::new(data),
    }
}

fn fresh(out: &Path, run: RunConfig, cache: &Path) -> TrainOptions {
    let start = Start::Fresh {
        run: Box::new(run),
        tokenizer: None,
        init: None,
    };
    TrainOptions {
        out: out.to_path_buf(),
        start,
        cache_root: cache.to_path_buf(),
        progress: false,
    }
}

fn resume(out: &Path, cache: &Path) -> TrainOptions {
    let start = Start::Resume {
        max_steps: None,
        dsa_stage: None,
    };
    TrainOptions {
        out: out.to_path_buf(),
        start,
        cache_root: cache.to_path_buf(),
        progress: false,
    }
}

#[test]
fn training_learns_and_resume_is_bit_identical() {
    let (root, data, cache) = corpus_dir("resume");
    let never = AtomicBool::new(false);

    // Uninterrupted 150 steps, keeping the checkpoint of step 7 (not a `save_interval` step).
    let run_config = |data: &Path, steps| {
        let mut r = run_config(data, steps);
        r.train.keep_steps = vec![7];
        r
    };
    let a = root.join("a");
    let sa = train(fresh(&a, run_config(&data, 150), &cache), &never).unwrap();
    assert!(!sa.stopped_early);
    let vl = sa.val_loss.unwrap();
    assert!(
        vl < sa.unigram_entropy - 0.5,
        "val loss {vl} not well below unigram entropy {}",
        sa.unigram_entropy
    );

    // Same run, stopped after its first step (as Ctrl-C does), then resumed.
    let b = root.join("b");
    let stop = AtomicBool::new(true);
    let sb = train(fresh(&b, run_config(&data, 150), &cache), &stop).unwrap();
    assert!(sb.stopped_early);
    assert_eq!(sb.steps, 1);
    // A fresh `train` into a directory with a checkpoint refuses instead of overwriting it.
    let err = train(fresh(&b, run_config(&data, 150), &cache), &never).unwrap_err();
    assert!(format!("{err:#}").contains("--resume"), "{err:#}");
    // Resume to step 150 (the run's own config is authoritative).
    let sb = train(resume(&b, &cache), &never).unwrap();
    assert_eq!(sb.steps, 150);

    let read = |p: &Path| std::fs::read(p).unwrap();
    assert_eq!(
        read(&a.join("metrics.jsonl")),
        read(&b.join("metrics.jsonl")),
        "metrics differ after resume"
    );
    assert_eq!(
        read(&a.join("checkpoint/model.safetensors")),
        read(&b.join("checkpoint/model.safetensors")),
        "weights differ after resume"
    );
    assert_eq!(
        read(&a.join("checkpoint/optimizer.safetensors")),
        read(&b.join("checkpoint/optimizer.safetensors"))
    );
    assert!(a.join("loss.png").is_file());
    // Both runs kept step 7, the same bytes; it loads, and it is not the final model.
    let kept = |d: &Path| d.join("checkpoint-step7");
    let l7 = mnemo::checkpoint::load(&kept(&a), true).unwrap();
    assert_eq!(l7.state.as_ref().unwrap().step, 7);
    for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        assert_eq!(read(&kept(&a).join(f)), read(&kept(&b).join(f)), "{f}");
    }
    assert_ne!(
        read(&kept(&a).join("model.safetensors")),
        read(&a.join("checkpoint/model.safetensors"))
    );

    // The checkpoint reloads, evaluates to the logged validation loss, and generates.
    let l = mnemo::checkpoint::load(&a, false).unwrap();
    let c = mnemo::data::prepare(
        &mnemo::data::scan(&CorpusSpec::new(&data)).unwrap(),
        &CorpusSpec::new(&data),
        &l.tokenizer,
        &cache,
        false,
    )
    .unwrap();
    assert!(c.reused, "the token cache is reused across runs");
    let mut ws = mnemo::model::Workspace::default();
    let (v2, _) = mnemo::train::evaluate(&l.model, &c.val, 4, 32, 2, &mut ws).unwrap();
    assert_eq!(v2, vl);
    let prompt = l.tokenizer.encode("fn item_3").unwrap();
    let s = mnemo::generate::Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };
    let out = mnemo::generate::generate(
        &l.model,
        &prompt,
        12,
        s,
        0,
        l.tokenizer.vocab_size(),
        None,
        |_| Ok(()),
    )
    .unwrap();
    assert_eq!(out.len(), 12);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn corrupt_checkpoints_give_clear_errors() {
    let root = tmpdir("corrupt");
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    make_corpus(&data);
    let a = root.join("a");
    train(
        fresh(&a, run_config(&data, 2), &root.join("cache")),
        &AtomicBool::new(false),
    )
    .unwrap();
    let model = a.join("checkpoint/model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!("{:#}", mnemo::checkpoint::load(&a, false).err().unwrap());
    assert!(
        err.contains("model.safetensors") && err.contains("corrupt or truncated"),
        "{err}"
    );
    std::fs::write(&model, b"garbage").unwrap();
    assert!(mnemo::checkpoint::load(&a, false).is_err());
    let err = format!(
        "{:#}",
        mnemo::checkpoint::load(&root.join("nope"), false)
            .err()
            .unwrap()
    );
    assert!(err.contains("does not exist"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

/// Two runs wrote the same metrics, model and optimizer state, byte for byte.
fn assert_same_run(a: &Path, b: &Path) {
    let read = |p: &Path| std::fs::read(p).unwrap();
    assert_eq!(
        read(&a.join("metrics.jsonl")),
        read(&b.join("metrics.jsonl"))
    );
    for f in ["model.safetensors", "optimizer.safetensors"] {
        assert_eq!(
            read(&a.join("checkpoint").join(f)),
            read(&b.join("checkpoint").join(f)),
            "{f}"
        );
    }
}

/// The last metrics line of run `dir` with per-layer MoE statistics.
fn last_moe_metrics(dir: &Path) -> serde_json::Value {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("moe").is_some())
        .unwrap()
}

/// The tiny MoE model of the tests below: a hash layer, then a routed layer of 8 experts,
/// top-2, with the sign step and the refit with every option on (a pool of the last 4
/// batches' router inputs re-scored every step, hard-load sweeps, averaged over ~5 fits after
/// step 30).
fn moe_run(data: &Path, steps: u64) -> RunConfig {
    let mut r = run_config(data, steps);
    r.model.ffn = mnemo::config::FfnKind::Moe;
    r.model.n_dense_layers = 0;
    r.model.n_shared_experts = 1;
    r.model.n_routed_experts = 8;
    r.model.moe_inter = 16;
    r.model.top_k = 2;
    r.model.num_hash_layers = 1;
    r.model.bias_update_speed = 0.01;
    r.model.bias_fit_iters = 16;
    r.model.bias_fit_rate = 0.2;
    r.model.bias_fit_rate_after = 30;
    r.model.bias_fit_window = 4;
    r.model.bias_fit_stride = 3;
    r.model.bias_fit_hard_rounds = 8;
    r.train.eval_interval = 40;
    r
}

/// The MoE model trains, writes its expert-load statistics to the metrics, keeps its hash table
/// and balancing bias across a resume (bit-identical), and the bias method balances the load.
/// The refit pool is state beyond the bias: it travels in the checkpoint, so the run stopped
/// after step 1 resumes with that batch in its pool, bit-identically.
#[test]
fn moe_training_balances_load_and_resumes_bit_identically() {
    let (root, data, cache) = corpus_dir("moe");
    let moe_run = |steps| moe_run(&data, steps);
    let never = AtomicBool::new(false);
    let a = root.join("a");
    let sa = train(fresh(&a, moe_run(80), &cache), &never).unwrap();
    assert!(sa.val_loss.unwrap() < sa.unigram_entropy);
    let b = root.join("b");
    train(fresh(&b, moe_run(80), &cache), &AtomicBool::new(true)).unwrap();
    let pools = mnemo::checkpoint::load(&b, true)
        .unwrap()
        .moe_pools
        .unwrap();
    // Layer 0 routes by hash (no pool); layer 1 holds every 3rd token of step 1's two
    // micro-batches of 4 × 32 tokens.
    assert_eq!(pools[0].rows(), 0);
    assert_eq!(pools[1].rows(), 2 * (4 * 32usize).div_ceil(3));
    train(resume(&b, &cache), &never).unwrap();
    assert_same_run(&a, &b);
    // Load statistics per MoE layer in the metrics; the routed layer ends balanced.
    let last = last_moe_metrics(&a);
    let layers = last["moe"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[0]["hash"], true);
    let routed = &layers[1];
    assert!(
        routed["load_max"].as_f64().unwrap() < 2.0,
        "unbalanced: {routed}"
    );
    assert!(routed["bias_max"].as_f64().unwrap() > routed["bias_min"].as_f64().unwrap());
    let _ = std::fs::remove_dir_all(&root);
}

/// With `bias_fit_sample`, fresh windows forwarded after each step feed the refit pool instead
/// of the training batches: the pool holds exactly the sample (6 windows of 8 tokens, every
/// token), a run stopped after step 1 resumes bit-identically (the sample stream is a
/// function of the seed and the step), and the routed layer ends balanced.
#[test]
fn moe_sample_refit_resumes_bit_identically() {
    let (root, data, cache) = corpus_dir("moe-sample");
    let run = |steps| {
        let mut r = moe_run(&data, steps);
        r.model.bias_fit_sample = 6;
        r.model.bias_fit_sample_len = 8;
        r.model.bias_fit_window = 2;
        r.model.bias_fit_stride = 1;
        r
    };
    let never = AtomicBool::new(false);
    let a = root.join("a");
    train(fresh(&a, run(40), &cache), &never).unwrap();
    let b = root.join("b");
    train(fresh(&b, run(40), &cache), &AtomicBool::new(true)).unwrap();
    let l = mnemo::checkpoint::load(&b, true).unwrap();
    let pools = l.moe_pools.clone().unwrap();
    assert_eq!(pools[0].rows(), 0);
    assert_eq!((pools[1].len(), pools[1].rows()), (1, 6 * 8));
    // The pool holds step 1's sample forwarded after the optimizer step. Layer 1's router
    // inputs depend on no bias (layer 0 routes by hash), so the saved model reproduces them:
    // its router scores the pool as the forward of `moe_sample_windows(seed, step 1)` does,
    // and not as the windows of another step.
    let r = run(40);
    let corpus = mnemo::data::scan(&r.data).unwrap();
    let split = mnemo::data::prepare(&corpus, &r.data, &l.tokenizer, &cache, false)
        .unwrap()
        .train;
    let pooled = l.model.moe_pool_scores(&pools);
    let forwarded = |step| {
        let x = mnemo::train::moe_sample_windows(&split, r.train.seed, step, 6, 8).unwrap();
        let mut ws = mnemo::model::Workspace::default();
        l.model.forward(&x, 6, 8, &mut ws);
        ws.moe_scores()[1].to_vec()
    };
    let max_diff = |v: &[f32]| {
        assert_eq!(v.len(), pooled[1].len());
        v.iter()
            .zip(&pooled[1])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    };
    assert!(
        max_diff(&forwarded(1)) < 1e-5,
        "{}",
        max_diff(&forwarded(1))
    );
    assert!(max_diff(&forwarded(2)) > 1e-3);
    train(resume(&b, &cache), &never).unwrap();
    assert_same_run(&a, &b);
    let l = mnemo::checkpoint::load(&a, true).unwrap();
    let pools = l.moe_pools.unwrap();
    assert_eq!((pools[1].len(), pools[1].rows()), (2, 2 * 6 * 8));
    let last = last_moe_metrics(&a);
    let routed = &last["moe"][1];
    assert!(
        routed["load_max"].as_f64().unwrap() < 2.0,
        "unbalanced: {routed}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// mHC and HC models train, log the stability diagnostics (Amax gains of the composite
/// residual mapping, per-layer gradient norms) and draw them; mHC resumes bit-identically; a
/// NaN injected into a hyper-connection coefficient stops the run with an error naming the
/// step and the layer, and leaves the last checkpoint untouched.
#[test]
fn hyper_connection_training_diagnostics_resume_and_nan_stop() {
    let (root, data, cache) = corpus_dir("mhc");
    let hc_run = |steps, residual| {
        let mut r = run_config(&data, steps);
        r.model.residual = residual;
        r.train.eval_interval = 20;
        r.train.save_interval = 20;
        r
    };
    let never = AtomicBool::new(false);
    let a = root.join("a");
    let sa = train(
        fresh(&a, hc_run(40, mnemo::config::Residual::Mhc), &cache),
        &never,
    )
    .unwrap();
    assert!(sa.val_loss.unwrap() < sa.unigram_entropy);
    let b = root.join("b");
    train(
        fresh(&b, hc_run(40, mnemo::config::Residual::Mhc), &cache),
        &AtomicBool::new(true),
    )
    .unwrap();
    train(resume(&b, &cache), &never).unwrap();
    let read = |p: &Path| std::fs::read(p).unwrap();
    assert_eq!(
        read(&a.join("metrics.jsonl")),
        read(&b.join("metrics.jsonl"))
    );
    assert_eq!(
        read(&a.join("checkpoint/model.safetensors")),
        read(&b.join("checkpoint/model.safetensors"))
    );
    assert!(a.join("hc_amax.png").is_file() && a.join("grad_norm.png").is_file());
    let last: serde_json::Value = std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .rfind(|l| l.contains("hc_amax_fwd"))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap();
    let fwd = last["hc_amax_fwd"].as_array().unwrap();
    assert_eq!(fwd.len(), 4, "one entry per sublayer");
    for (f, b) in fwd.iter().zip(last["hc_amax_bwd"].as_array().unwrap()) {
        let (f, b) = (f.as_f64().unwrap(), b.as_f64().unwrap());
        assert!((f - 1.0).abs() < 1e-3, "mHC forward gain {f}");
        assert!((b - 1.0).abs() < 0.1, "mHC backward gain {b}");
    }
    assert_eq!(last["layer_grad_norm"].as_array().unwrap().len(), 2);

    // HC trains too.
    let h = root.join("h");
    let sh = train(
        fresh(&h, hc_run(20, mnemo::config::Residual::Hc), &cache),
        &never,
    )
    .unwrap();
    assert!(sh.val_loss.unwrap().is_finite());

    // Poison layer 1's FFN hyper-connection in the checkpoint (loading rejects NaN weights, so
    // with huge finite ones whose coefficient logits overflow to ±inf and NaN).
    let mut l = mnemo::checkpoint::load(&a, true).unwrap();
    let t = l.model.layout.get("layers.1.ffn_hc.fn").unwrap().clone();
    for (i, p) in l.model.params[t.range()].iter_mut().enumerate() {
        *p = if i % 2 == 0 { 3e38 } else { -3e38 };
    }
    let (m, v) = l.adam.clone().unwrap();
    mnemo::checkpoint::save(
        &a,
        &l.model,
        &l.tokenizer,
        (&m, &v),
        l.state.as_ref().unwrap(),
    )
    .unwrap();
    let before = read(&a.join("checkpoint/model.safetensors"));
    let err = train(
        TrainOptions {
            out: a.clone(),
            start: Start::Resume {
                max_steps: Some(60),
                dsa_stage: None,
            },
            cache_root: cache.clone(),
            progress: false,
        },
        &never,
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("at step 41"), "{msg}");
    assert!(
        msg.contains("layer 1 (FFN)") && msg.contains("coefficients"),
        "{msg}"
    );
    assert!(msg.contains("intact"), "{msg}");
    assert_eq!(before, read(&a.join("checkpoint/model.safetensors")));
    let _ = std::fs::remove_dir_all(&root);
}

/// An Engram model trains (the tables move, lazy Adam), resumes bit-identically (tables,
/// their optimizer state, gates), loads for generation with mapped tables, and a table file of
/// the wrong size or an inconsistent Engram config is a clear error.
#[test]
fn engram_training_resumes_bit_identically_and_bad_files_are_errors() {
    let (root, data, cache) = corpus_dir("engram");
    let run = |steps| {
        let mut r = run_config(&data, steps);
        r.model.engram = Some(mnemo::config::EngramConfig {
            layer_ids: vec![1],
            max_ngram_size: 3,
            n_head_per_ngram: 2,
            head_dim: 8,
            vocab_size_per_ngram: vec![600, 600],
            ..Default::default()
        });
        r.train.eval_interval = 20;
        r.train.save_interval = 20;
        r
    };
    let never = AtomicBool::new(false);
    let a = root.join("a");
    let sa = train(fresh(&a, run(40), &cache), &never).unwrap();
    assert!(sa.val_loss.unwrap() < sa.unigram_entropy);
    let b = root.join("b");
    train(fresh(&b, run(40), &cache), &AtomicBool::new(true)).unwrap();
    train(resume(&b, &cache), &never).unwrap();
    let read = |p: &Path| std::fs::read(p).unwrap();
    for f in [
        "metrics.jsonl",
        "checkpoint/model.safetensors",
        "checkpoint/optimizer.safetensors",
        "checkpoint/engram.safetensors",
        "checkpoint/engram_table.1.f32",
        "checkpoint/engram_optimizer.safetensors",
    ] {
        assert_eq!(
            read(&a.join(f)),
            read(&b.join(f)),
            "{f} differs after resume"
        );
    }
    let last: serde_json::Value = std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .rfind(|l| l.contains("engram_rows_touched"))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap();
    assert!(last["engram_table_grad_norm"].as_f64().unwrap() > 0.0);
    assert!(a.join("timing.jsonl").is_file());
    // Generation from the checkpoint (tables mapped read-only).
    let l = mnemo::checkpoint::load(&a, false).unwrap();
    let e = l.model.engram.as_ref().unwrap();
    assert!(e.layers[0].table.is_mapped());
    assert_eq!(l.model.engram_eot, Some(l.tokenizer.eot()));
    let prompt = l.tokenizer.encode("fn item_3").unwrap();
    let s = mnemo::generate::Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };
    let n = l.tokenizer.vocab_size();
    let out = mnemo::generate::generate(&l.model, &prompt, 8, s, 1, n, None, |_| Ok(()));
    assert!(out.is_ok(), "{:?}", out.err());
    drop(l);
    // A table file of the wrong size.
    let tp = a.join("checkpoint/engram_table.1.f32");
    let mut bytes = read(&tp);
    bytes.truncate(bytes.len() - 4);
    std::fs::write(&tp, &bytes).unwrap();
    let err = format!("{:#}", mnemo::checkpoint::load(&a, false).err().unwrap());
    assert!(
        err.contains("engram_table.1.f32") && err.contains("bytes"),
        "{err}"
    );
    // An Engram config that disagrees with the stored one.
    let c = b.join("checkpoint/config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&c).unwrap()).unwrap();
    v["engram"]["n_head_per_ngram"] = 3.into();
    std::fs::write(&c, v.to_string()).unwrap();
    let err = format!("{:#}", mnemo::checkpoint::load(&b, false).err().unwrap());
    assert!(err.contains("Engram"), "{err}");
    std::fs::remove_dir_all(&root).ok();
}

/// Memory-only fine-tuning: `--init` + `train_only = engram` leaves every backbone weight
/// bit-identical, changes only table rows, writes a delta that reloads (base + delta) to exactly
/// the fine-tuned logits; `engram+gates` also trains the gates and nothing else; a changed base
/// is refused; `off` (the `--no-engram` ablation) changes the logits.
#[test]
fn engram_memory_only_finetuning_freezes_the_backbone_and_the_delta_reloads_exactly() {
    use mnemo::config::TrainOnly;
    use mnemo::io::delta::{read_delta_meta, DELTA_FILE};
    let root = tmpdir("engramft");
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    make_corpus(&data);
    let data2 = root.join("data2");
    std::fs::create_dir_all(&data2).unwrap();
    for i in 0..20 {
        let mut s = String::new();
        for j in 0..30 {
            s.push_str(&format!(
                "struct Point{i}_{j} {{ x: i64, y: i64 }}\nimpl Point{i}_{j} {{ fn norm(&self) -> i64 {{ self.x * {} }} }}\n\n",
                (i * j) % 5
            ));
        }
        std::fs::write(data2.join(format!("p_{i}.rs")), s).unwrap();
    }
    let cache = root.join("cache");
    let mut base_run = run_config(&data, 20);
    base_run.model.engram = Some(mnemo::config::EngramConfig {
        layer_ids: vec![1],
        max_ngram_size: 3,
        n_head_per_ngram: 2,
        head_dim: 8,
        vocab_size_per_ngram: vec![600, 600],
        ..Default::default()
    });
    let never = AtomicBool::new(false);
    let base = root.join("base");
    train(fresh(&base, base_run.clone(), &cache), &never).unwrap();
    // train_only without an init run is refused.
    let mut bad = base_run.clone();
    bad.train.train_only = TrainOnly::Engram;
    assert!(format!(
        "{:#}",
        train(fresh(&root.join("bad"), bad, &cache), &never).unwrap_err()
    )
    .contains("--init"));
    let finetune = |out: &Path, mode: TrainOnly| {
        let mut r = run_config(&data2, 10);
        r.train.init = Some(base.clone());
        r.train.train_only = mode;
        r.train.save_interval = 5;
        let opts = TrainOptions {
            out: out.to_path_buf(),
            start: Start::Init { run: Box::new(r) },
            cache_root: cache.clone(),
            progress: false,
        };
        train(opts, &never).unwrap();
    };
    let b = mnemo::checkpoint::load(&base, false).unwrap();
    let toks = b
        .tokenizer
        .encode("struct Point3_4 { x: i64, y: i64 }\nfn item_1_2(x: u32)")
        .unwrap();
    let logits = |m: &mnemo::model::Model| {
        let mut ws = mnemo::model::Workspace::default();
        m.forward(&toks, 1, toks.len(), &mut ws);
        ws.logits.clone()
    };
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for mode in [TrainOnly::Engram, TrainOnly::EngramGates] {
        let out = root.join(format!("ft-{}", mode.name()));
        finetune(&out, mode);
        let f = mnemo::checkpoint::load(&out, false).unwrap();
        for t in &f.model.layout.tensors {
            let same = bits(&f.model.params[t.range()]) == bits(&b.model.params[t.range()]);
            let gate = mnemo::model::is_engram_tensor(&t.name);
            if mode == TrainOnly::Engram || !gate {
                assert!(same, "{}: {} changed", mode.name(), t.name);
            }
        }
        if mode == TrainOnly::EngramGates {
            let o = f.model.layout.engram_gate[0];
            let n = f.model.engram.as_ref().unwrap().layers[0].gate.n_params();
            assert_ne!(f.model.params[o..o + n], b.model.params[o..o + n]);
        }
        let (tf, tb) = (
            f.model.engram.as_ref().unwrap().layers[0].table.as_slice(),
            b.model.engram.as_ref().unwrap().layers[0].table.as_slice(),
        );
        let changed = tf
            .chunks(8)
            .zip(tb.chunks(8))
            .filter(|(x, y)| x != y)
            .count();
        assert!(
            changed > 0 && changed < tf.len() / 8,
            "{changed} rows changed"
        );
        // The delta alone (base + delta) gives exactly the fine-tuned logits.
        let only = root.join(format!("delta-{}", mode.name()));
        std::fs::create_dir_all(&only).unwrap();
        std::fs::copy(out.join(DELTA_FILE), only.join(DELTA_FILE)).unwrap();
        let d = mnemo::checkpoint::load(&only, false).unwrap();
        let (lf, ld, lb) = (logits(&f.model), logits(&d.model), logits(&b.model));
        assert_eq!(bits(&lf), bits(&ld), "{}: delta logits differ", mode.name());
        assert_ne!(bits(&lf), bits(&lb));
        let (_, meta) = read_delta_meta(&only.join(DELTA_FILE)).unwrap();
        assert_eq!((meta.train_only, meta.step), (mode, 10));
        let delta_bytes = std::fs::metadata(only.join(DELTA_FILE)).unwrap().len();
        assert!(
            delta_bytes
                < std::fs::metadata(base.join("checkpoint/engram_table.1.f32"))
                    .unwrap()
                    .len()
        );
    }
    // Ablation: Engram off changes the logits (and they stay finite).
    let mut off = mnemo::checkpoint::load(&base, false).unwrap();
    off.model.engram.as_mut().unwrap().off = true;
    let lo = logits(&off.model);
    assert!(lo.iter().all(|x| x.is_finite()));
    assert_ne!(bits(&lo), bits(&logits(&b.model)));
    // A base that changed after the delta was made is refused.
    let cfgp = base.join("checkpoint/config.json");
    let mut s = std::fs::read_to_string(&cfgp).unwrap();
    s.push('\n');
    std::fs::write(&cfgp, s).unwrap();
    let err = format!(
        "{:#}",
        mnemo::checkpoint::load(&root.join("delta-engram"), false)
            .err()
            .unwrap()
    );
    assert!(err.contains("has changed"), "{err}");
    std::fs::remove_dir_all(&root).ok();
}

/// DSA: the warm-up stage moves only the indexer (every other parameter bit-identical to its
/// initialisation, Adam moments untouched), the stage switches to sparse on resume, and a run
/// stopped and resumed in the sparse stage is bit-identical to an uninterrupted one.
#[test]
fn dsa_warmup_freezes_the_model_and_sparse_resume_is_bit_identical() {
    use mnemo::config::DsaStage;
    let (root, data, cache) = corpus_dir("dsa");
    let never = AtomicBool::new(false);
    let cfg = |steps| {
        let mut r = run_config(&data, steps);
        r.model.dsa = Some(small_dsa());
        r.train.dsa_stage = DsaStage::Warmup;
        r.train.eval_interval = 10;
        r
    };
    let opts = |out: &Path, max_steps, dsa_stage| TrainOptions {
        out: out.to_path_buf(),
        start: Start::Resume {
            max_steps,
            dsa_stage,
        },
        cache_root: cache.clone(),
        progress: false,
    };
    let read = |p: &Path| std::fs::read(p).unwrap();
    let a = root.join("a");
    train(fresh(&a, cfg(10), &cache), &never).unwrap();
    let l = mnemo::checkpoint::load(&a, true).unwrap();
    let mut init = mnemo::model::Model::new(l.model.cfg.clone()).unwrap();
    init.init(
        l.state.as_ref().unwrap().run["train"]["seed"]
            .as_u64()
            .unwrap(),
    );
    let (m, _) = l.adam.clone().unwrap();
    let (mut frozen, mut moved) = (0, 0);
    for t in &l.model.layout.tensors {
        let r = t.range();
        if mnemo::model::is_indexer_tensor(&t.name) {
            assert_ne!(l.model.params[r.clone()], init.params[r], "{}", t.name);
            moved += 1;
        } else {
            assert!(
                l.model.params[r.clone()] == init.params[r.clone()],
                "{} moved during warm-up",
                t.name
            );
            assert!(m[r].iter().all(|&x| x == 0.0), "{}", t.name);
            frozen += 1;
        }
    }
    assert_eq!(moved, 2 * 5);
    assert!(frozen > 10);
    let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains(r#""dsa_stage":"warmup""#), "{metrics}");
    assert!(metrics.contains("dsa_recall") && metrics.contains("val_dsa_kl"));
    // Then the sparse stage, uninterrupted (a) and stopped after one step + resumed (b).
    let b = root.join("b");
    train(fresh(&b, cfg(10), &cache), &never).unwrap();
    train(opts(&a, Some(30), Some(DsaStage::Sparse)), &never).unwrap();
    let stop = AtomicBool::new(true);
    let sb = train(opts(&b, Some(30), Some(DsaStage::Sparse)), &stop).unwrap();
    assert_eq!(sb.steps, 11);
    let sb = train(opts(&b, None, None), &never).unwrap();
    assert_eq!(sb.steps, 30);
    assert_eq!(
        read(&a.join("metrics.jsonl")),
        read(&b.join("metrics.jsonl")),
        "metrics differ after resume"
    );
    assert_eq!(
        read(&a.join("checkpoint/model.safetensors")),
        read(&b.join("checkpoint/model.safetensors")),
        "weights differ after resume"
    );
    let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains(r#""dsa_stage":"sparse""#), "{metrics}");
    // A non-DSA model refuses a non-default stage.
    let mut bad = run_config(&data, 5);
    bad.train.dsa_stage = DsaStage::Warmup;
    let err = train(fresh(&root.join("c"), bad, &cache), &never).unwrap_err();
    assert!(format!("{err:#}").contains("dsa_stage"), "{err:#}");
    let _ = std::fs::remove_dir_all(&root);
}

/// `--init` from a dense run into a DSA model (the paper's warm-up starts from a trained dense
/// checkpoint): every dense tensor is copied bit for bit, the indexer keeps its fresh
/// initialisation and the warm-up trains it; a changed dense shape is still refused.
#[test]
fn dsa_model_initialised_from_a_dense_run_keeps_its_weights_and_a_fresh_indexer() {
    use mnemo::config::DsaStage;
    let (root, data, cache) = corpus_dir("dsa-init");
    let never = AtomicBool::new(false);
    let dense = root.join("dense");
    train(fresh(&dense, run_config(&data, 6), &cache), &never).unwrap();
    let src = mnemo::checkpoint::load(&dense, false).unwrap();
    let init_run = |out: &Path, r: RunConfig| TrainOptions {
        out: out.to_path_buf(),
        start: Start::Fresh {
            run: Box::new(r),
            tokenizer: None,
            init: Some(dense.clone()),
        },
        cache_root: cache.clone(),
        progress: false,
    };
    let mut r = run_config(&data, 0);
    r.model.dsa = Some(small_dsa());
    r.train.dsa_stage = DsaStage::Warmup;
    r.train.max_steps = 3;
    let sparse = root.join("sparse");
    train(init_run(&sparse, r.clone()), &never).unwrap();
    let l = mnemo::checkpoint::load(&sparse, false).unwrap();
    let mut fresh_model = mnemo::model::Model::new(l.model.cfg.clone()).unwrap();
    fresh_model.init(r.train.seed);
    let (mut copied, mut indexer) = (0, 0);
    for t in &l.model.layout.tensors {
        let got = &l.model.params[t.range()];
        if mnemo::model::is_indexer_tensor(&t.name) {
            // Trained by the warm-up from its fresh initialisation (not from the source).
            assert!(!src.model.layout.tensors.iter().any(|s| s.name == t.name));
            assert_ne!(got, &fresh_model.params[t.range()], "{}", t.name);
            indexer += 1;
        } else {
            let s = src
                .model
                .layout
                .tensors
                .iter()
                .find(|s| s.name == t.name)
                .unwrap();
            assert!(got == &src.model.params[s.range()], "{} differs", t.name);
            copied += 1;
        }
    }
    assert_eq!(indexer, 2 * 5);
    assert!(copied > 10);
    // Any other shape change is still refused, naming the tensor.
    let mut bad = r.clone();
    bad.model.ffn_hidden = 96;
    let err = format!(
        "{:#}",
        train(init_run(&root.join("bad"), bad), &never).unwrap_err()
    );
    assert!(
        err.contains("do not fit") && err.contains("feed_forward.w1"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// A DeepSeek-V4 model (one CSA layer with its indexer, one HCA layer): the warm-up stage
/// trains only the indexer, and the sparse stage (the model on the LM loss, the indexer on
/// its KL) stopped after one step and resumed is bit-identical to an uninterrupted run.
#[test]
fn deepseek_v4_indexer_warmup_and_sparse_resume_is_bit_identical() {
    use mnemo::config::{DsaStage, V4LayerType};
    let (root, data, cache) = corpus_dir("v4");
    let never = AtomicBool::new(false);
    let cfg = |steps| {
        let mut r = run_config(&data, steps);
        let mut m = ModelConfig::preset("v4-tiny").unwrap();
        (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.head_dim) = (320, 32, 2, 2, 16);
        (m.n_routed_experts, m.top_k, m.moe_inter, m.hc_mult) = (4, 2, 16, 2);
        m.max_seq_len = 64;
        let v = m.v4.as_mut().unwrap();
        (v.q_lora_rank, v.o_lora_rank, v.o_groups, v.sliding_window) = (16, 8, 2, 8);
        v.layer_types = vec![
            V4LayerType::CompressedSparseAttention,
            V4LayerType::HeavilyCompressedAttention,
        ];
        v.num_nextn_predict_layers = 0;
        (v.compress_rate_hca, v.index_n_heads, v.index_head_dim) = (8, 2, 8);
        (v.index_topk, v.qk_rope_head_dim) = (3, 8);
        r.model = m;
        r.train.dsa_stage = DsaStage::Warmup;
        r.train.eval_interval = 10;
        r
    };
    let opts = |out: &Path, max_steps, dsa_stage| TrainOptions {
        out: out.to_path_buf(),
        start: Start::Resume {
            max_steps,
            dsa_stage,
        },
        cache_root: cache.clone(),
        progress: false,
    };
    let a = root.join("a");
    train(fresh(&a, cfg(6), &cache), &never).unwrap();
    let l = mnemo::checkpoint::load(&a, true).unwrap();
    let mut init = mnemo::model::Model::new(l.model.cfg.clone()).unwrap();
    init.init(
        l.state.as_ref().unwrap().run["train"]["seed"]
            .as_u64()
            .unwrap(),
    );
    let mut moved = 0;
    for t in &l.model.layout.tensors {
        let r = t.range();
        let same = l.model.params[r.clone()] == init.params[r];
        if mnemo::model::is_indexer_tensor(&t.name) {
            moved += usize::from(!same);
        } else {
            assert!(same, "{} moved during the warm-up", t.name);
        }
    }
    assert!(moved >= 5, "{moved} indexer tensors moved");
    let b = root.join("b");
    train(fresh(&b, cfg(6), &cache), &never).unwrap();
    train(opts(&a, Some(14), Some(DsaStage::Sparse)), &never).unwrap();
    let stop = AtomicBool::new(true);
    let sb = train(opts(&b, Some(14), Some(DsaStage::Sparse)), &stop).unwrap();
    assert_eq!(sb.steps, 7);
    train(opts(&b, None, None), &never).unwrap();
    assert_same_run(&a, &b);
    let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains(r#""dsa_stage":"sparse""#) && metrics.contains("dsa_kl"));
    let _ = std::fs::remove_dir_all(&root);
}

/// A tiny DeepSeek-V4 model (CSA and HCA layers, a hash layer, mHC with 2 streams) with one
/// MTP block, trained with the MTP loss (the default weight) and the MoE balancing sample.
fn v4_mtp_run(data: &Path, steps: u64) -> RunConfig {
    use mnemo::config::{V4Config, V4LayerType};
    let mut r = run_config(data, steps);
    let m = &mut r.model;
    m.n_heads = 2;
    m.n_kv_heads = 1;
    m.head_dim = 16;
    m.rope_dim = 0;
    m.tied_embeddings = false;
    m.ffn = mnemo::config::FfnKind::Moe;
    m.n_shared_experts = 1;
    m.n_routed_experts = 4;
    m.moe_inter = 16;
    m.top_k = 2;
    m.num_hash_layers = 1;
    m.bias_update_speed = 0.01;
    m.bias_fit_iters = 4;
    m.bias_fit_window = 2;
    m.bias_fit_sample = 4;
    m.bias_fit_sample_len = 8;
    m.residual = mnemo::config::Residual::Mhc;
    m.hc_mult = 2;
    m.swiglu_limit = 10.0;
    m.v4 = Some(V4Config {
        q_lora_rank: 16,
        o_lora_rank: 8,
        o_groups: 2,
        sliding_window: 8,
        layer_types: vec![
            V4LayerType::CompressedSparseAttention,
            V4LayerType::HeavilyCompressedAttention,
            V4LayerType::SlidingAttention,
        ],
        compress_rate_csa: 4,
        compress_rate_hca: 8,
        index_n_heads: 2,
        index_head_dim: 16,
        index_topk: 4,
        qk_rope_head_dim: 8,
        compress_rope_theta: 160000.0,
        compress_rope_scaling: None,
        num_nextn_predict_layers: 1,
    });
    r.train.eval_interval = 12;
    r
}

/// DeepSeek-V4 with an MTP block: the MTP loss is logged beside the main loss and falls, the
/// checkpoint keeps the MTP block (its official names), and a run stopped after step 1
/// resumes bit-identically (parameters, optimizer state and the MoE refit pools, the MTP
/// block's included).
#[test]
fn v4_mtp_training_logs_the_mtp_loss_and_resumes_bit_identically() {
    let (root, data, cache) = corpus_dir("v4-mtp");
    let never = AtomicBool::new(false);
    let a = root.join("a");
    train(fresh(&a, v4_mtp_run(&data, 12), &cache), &never).unwrap();
    let b = root.join("b");
    train(
        fresh(&b, v4_mtp_run(&data, 12), &cache),
        &AtomicBool::new(true),
    )
    .unwrap();
    train(resume(&b, &cache), &never).unwrap();
    assert_same_run(&a, &b);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v.get("loss").is_some())
        .collect();
    assert_eq!(lines.len(), 4, "steps 1, 5, 10, 12");
    let mtp: Vec<f64> = lines
        .iter()
        .map(|v| v["mtp_loss"].as_f64().unwrap())
        .collect();
    assert!(mtp.iter().all(|x| x.is_finite()), "{mtp:?}");
    assert!(mtp[3] < mtp[0], "the MTP loss does not fall: {mtp:?}");
    // One gradient norm per block: the two layers, then the MTP block.
    assert_eq!(lines[3]["layer_grad_norm"].as_array().unwrap().len(), 3);
    // The MoE statistics cover the MTP block's MoE layer (block 2).
    assert_eq!(lines[3]["moe"].as_array().unwrap().len(), 3);
    let f =
        mnemo::io::safetensors::TensorFile::open(&a.join("checkpoint/model.safetensors")).unwrap();
    assert!(f.names().iter().any(|n| n == "mtp.0.hc_head_fn"));
    let _ = std::fs::remove_dir_all(&root);
}
