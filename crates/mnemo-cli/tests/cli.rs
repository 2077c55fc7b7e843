//! The command line on bad input: one clear error naming the file/field, a non-zero exit code,
//! never a panic.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn mnemo(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mnemo"))
        .args(args)
        .env("MNEMO_CACHE", common::cache())
        .output()
        .expect("run mnemo");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tmpdir(name: &str) -> PathBuf {
    common::tmpdir(name)
}

fn assert_fails(args: &[&str], needle: &str) {
    let (code, _, err) = mnemo(args);
    assert_ne!(code, 0, "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    assert!(
        err.contains(needle),
        "{args:?}: expected `{needle}` in:\n{err}"
    );
}

#[test]
fn bad_data_directories() {
    // A failed run removes the run directory it created, and the parents it made.
    let d = tmpdir("bad-data");
    let out = d.join("runs/x");
    assert_fails(
        &[
            "train",
            "--data",
            "/nonexistent/mnemo-data",
            "--out",
            out.to_str().unwrap(),
        ],
        "/nonexistent/mnemo-data",
    );
    assert!(!d.join("runs").exists(), "a failed run left its directory");
    // A directory that existed before is left alone.
    std::fs::create_dir_all(&out).unwrap();
    assert_fails(
        &[
            "train",
            "--data",
            "/nonexistent/mnemo-data",
            "--out",
            out.to_str().unwrap(),
        ],
        "/nonexistent/mnemo-data",
    );
    assert!(out.is_dir());
    let empty = tmpdir("empty");
    assert_fails(
        &[
            "train",
            "--data",
            empty.to_str().unwrap(),
            "--out",
            empty.join("run").to_str().unwrap(),
        ],
        "no text files",
    );
}

#[test]
fn inconsistent_configs_name_the_field() {
    assert_fails(&["config", "--set", "n_kv_heads=3"], "n_kv_heads");
    assert_fails(&["config", "--set", "d_modle=3"], "d_modle");
    assert_fails(
        &["config", "--set", "d_model=abc"],
        "--set d_model=abc: bad value for `d_model`: invalid type: string \"abc\", expected usize",
    );
    assert_fails(&["config", "--set", "rope_dim=7"], "rope_dim");
    assert_fails(&["config", "--preset", "huge"], "unknown preset `huge`");
    assert_fails(&["config", "--seq-len", "100000"], "seq_len");
    assert_fails(
        &[
            "config",
            "--steps",
            "100",
            "--set",
            "train.keep_steps=[50,200]",
        ],
        "`keep_steps` holds step 200",
    );
    let (code, out, err) = mnemo(&[
        "config",
        "--steps",
        "100",
        "--set",
        "train.keep_steps=[50,100]",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["train"]["keep_steps"], serde_json::json!([50, 100]));
    assert_fails(
        &["config", "--preset", "tiny-moe", "--set", "top_k=17"],
        "top_k",
    );
    assert_fails(&["config", "--set", "ffn=moe"], "n_routed_experts");
    assert_fails(
        &[
            "config",
            "--preset",
            "tiny-moe",
            "--set",
            "n_routed_experts=0",
        ],
        "n_routed_experts",
    );
    assert_fails(
        &[
            "config",
            "--preset",
            "tiny-moe",
            "--set",
            "num_hash_layers=9",
        ],
        "num_hash_layers",
    );
    // The balancing sample feeds the refit pool; its windows fit the context.
    assert_fails(
        &[
            "config",
            "--preset",
            "tiny-moe",
            "--set",
            "bias_fit_window=0",
            "--set",
            "bias_fit_sample=8",
        ],
        "`bias_fit_sample` feeds the refit pool",
    );
    assert_fails(
        &[
            "config",
            "--preset",
            "tiny-moe",
            "--set",
            "bias_fit_sample=8",
            "--set",
            "bias_fit_sample_len=100000",
        ],
        "`bias_fit_sample_len` must be in 1..=max_seq_len",
    );
    assert_fails(
        &[
            "config",
            "--preset",
            "tiny-moe",
            "--set",
            "bias_fit_sample=4096",
            "--set",
            "bias_fit_sample_len=64",
        ],
        "`bias_fit_sample` times bias_fit_sample_len is 262144 tokens",
    );
    // The refit pool needs the refit; a zero stride keeps nothing.
    assert_fails(
        &[
            "config",
            "--preset",
            "tiny-moe",
            "--set",
            "bias_fit_iters=0",
        ],
        "bias_fit_window",
    );
    assert_fails(
        &[
            "config",
            "--preset",
            "tiny-moe",
            "--set",
            "bias_fit_stride=0",
        ],
        "bias_fit_stride",
    );
    assert_fails(&["config", "--set", "ffn=sparse"], "sparse");
    let d = tmpdir("cfg");
    let f = d.join("bad.json");
    std::fs::write(&f, r#"{"model": {"d_model": 64, "n_heads": 5}}"#).unwrap();
    assert_fails(&["config", "--config", f.to_str().unwrap()], "n_kv_heads");
    std::fs::write(&f, "{not json").unwrap();
    assert_fails(&["config", "--config", f.to_str().unwrap()], "bad.json");
    let (code, out, _) = mnemo(&[
        "config",
        "--set",
        "train.lr=0.01",
        "--set",
        "rope_layout=half",
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("\"lr\": 0.01") && out.contains("\"rope_layout\": \"half\""),
        "{out}"
    );
}

#[test]
fn bad_checkpoints_and_tokenizers() {
    let d = tmpdir("ckpt");
    assert_fails(
        &["generate", d.to_str().unwrap(), "--prompt", "x"],
        "holds no checkpoint",
    );
    assert_fails(&["eval", "/nonexistent/run"], "does not exist");
    let ck = d.join("checkpoint");
    std::fs::create_dir_all(&ck).unwrap();
    std::fs::write(ck.join("config.json"), "{}").unwrap();
    std::fs::write(ck.join("model.safetensors"), "junk").unwrap();
    assert_fails(
        &["generate", d.to_str().unwrap(), "--prompt", "x"],
        "config.json",
    );
    let tok = d.join("tokenizer.json");
    std::fs::write(&tok, "not a tokenizer").unwrap();
    let data = tmpdir("tokdata");
    std::fs::write(data.join("a.rs"), "fn main() {}\n".repeat(200)).unwrap();
    std::fs::write(data.join("b.rs"), "fn other() {}\n".repeat(200)).unwrap();
    assert_fails(
        &[
            "train",
            "--data",
            data.to_str().unwrap(),
            "--tokenizer",
            tok.to_str().unwrap(),
            "--out",
            d.join("r").to_str().unwrap(),
        ],
        "tokenizer.json",
    );
}

#[test]
fn help_explains_the_default() {
    let (code, out, _) = mnemo(&["train", "--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("--resume") && out.contains("current directory"),
        "{out}"
    );
    // The true size of the default preset (the unit test in config_cmd.rs counts it).
    assert!(out.contains("tiny (4.26M parameters"), "{out}");
}

/// `--temperature -1` is refused with what is allowed, not clap's `-- -1` tip; before any
/// model is loaded.
#[test]
fn negative_temperatures_are_refused_clearly() {
    for cmd in [
        &[
            "generate",
            "no-such-run",
            "--prompt",
            "x",
            "--temperature",
            "-1",
        ][..],
        &[
            "ask",
            ".",
            "q",
            "--model",
            "no-such-run",
            "--temperature",
            "-0.5",
        ][..],
        &["eval", "humaneval", "no-such-model", "--temperature", "-1"][..],
    ] {
        let (code, _, err) = mnemo(cmd);
        assert_eq!(code, 2, "{cmd:?}: {err}");
        assert!(
            err.contains("--temperature") && err.contains("must be a number >= 0"),
            "{cmd:?}: {err}"
        );
        assert!(!err.contains("-- -1") && !err.contains("tip:"), "{err}");
    }
}

#[test]
fn shell_completions() {
    for (shell, needle) in [
        ("bash", "_mnemo()"),
        ("zsh", "#compdef mnemo"),
        ("fish", "complete -c mnemo"),
    ] {
        let (code, out, err) = mnemo(&["completions", shell]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(needle), "{shell}: {out}");
        assert!(
            out.contains("train") && out.contains("--max-tokens"),
            "{shell}"
        );
    }
    assert_fails(&["completions", "tcsh"], "invalid value 'tcsh'");
    // A reader that stops early (`mnemo completions bash | head`) is no error and no panic.
    for args in [&["completions", "bash"][..], &["cache", "list"][..]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mnemo"))
            .args(args)
            .env("MNEMO_CACHE", common::cache())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

/// A GGUF holding only a tokenizer: GPT-2's 256 byte symbols and a few merges.
fn write_tokenizer_gguf(path: &std::path::Path) {
    // GPT-2's byte-to-symbol map: printable Latin-1 bytes map to themselves, the rest to 256+.
    let mut symbols = Vec::new();
    let mut extra = 0u32;
    for b in 0u32..256 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            extra += 1;
            255 + extra
        };
        symbols.push(char::from_u32(c).unwrap().to_string());
    }
    let merges = ["f n", "Ġ m", "a i", "Ġm ai"];
    let mut tokens = symbols.clone();
    tokens.extend(
        ["fn", "Ġm", "ai", "Ġmai", "<|endoftext|>"]
            .iter()
            .map(|s| s.to_string()),
    );
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend_from_slice(&(x.len() as u64).to_le_bytes());
        b.extend_from_slice(x.as_bytes());
    };
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&3u64.to_le_bytes()); // key/value pairs
    s(&mut b, "tokenizer.ggml.model");
    b.extend_from_slice(&8u32.to_le_bytes());
    s(&mut b, "gpt2");
    for (key, list) in [
        ("tokenizer.ggml.tokens", tokens),
        (
            "tokenizer.ggml.merges",
            merges.iter().map(|m| m.to_string()).collect(),
        ),
    ] {
        s(&mut b, key);
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&(list.len() as u64).to_le_bytes());
        for t in &list {
            s(&mut b, t);
        }
    }
    std::fs::write(path, b).unwrap();
}

/// `pack --tokenizer` takes a GGUF model, as `generate` does.
#[test]
fn pack_counts_with_a_gguf_tokenizer() {
    let d = tmpdir("pack-gguf");
    let repo = d.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("main.rs"), "fn main() {}\n").unwrap();
    let gguf = d.join("tok.gguf");
    write_tokenizer_gguf(&gguf);
    let (code, out, err) = mnemo(&[
        "pack",
        repo.to_str().unwrap(),
        "--count",
        "--tokenizer",
        gguf.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    // `fn`, ` mai`, `n`, `(`, `)`, ` `, `{`, `}`, `\n`: 9 tokens.
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("9 ") && l.ends_with("main.rs")),
        "{out}"
    );
}

#[test]
fn ctrl_c_saves_a_checkpoint_that_resumes() {
    let d = tmpdir("sigint");
    let data = d.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..20 {
        let body: String = (0..60)
            .map(|j| format!("fn f_{i}_{j}(x: i32) -> i32 {{ x * {j} }}\n"))
            .collect();
        std::fs::write(data.join(format!("m{i}.rs")), body).unwrap();
    }
    let run = d.join("run");
    let child = Command::new(env!("CARGO_BIN_EXE_mnemo"))
        .args([
            "--threads",
            "1",
            "train",
            "--data",
            data.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
        ])
        .args([
            "--steps",
            "100000",
            "--set",
            "vocab_size=300",
            "--set",
            "d_model=32",
            "--set",
            "n_layers=1",
        ])
        .args([
            "--set",
            "head_dim=8",
            "--set",
            "rope_dim=8",
            "--set",
            "ffn_hidden=32",
            "--batch-size",
            "2",
        ])
        .args(["--seq-len", "16", "--set", "log_interval=1", "--quiet"])
        .env("MNEMO_CACHE", d.join("cache"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way, then interrupt it like Ctrl-C does.
    let metrics = run.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 3
    {
        assert!(t0.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("checkpoint saved") || err.contains("resume with"),
        "{err}"
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoint/state.json")).unwrap())
            .unwrap();
    let step = state["step"].as_u64().unwrap();
    assert!(step >= 3);
    assert!(
        !run.join(".checkpoint.tmp").exists(),
        "no partial checkpoint left behind"
    );
    // Resume for two more steps.
    let target = (step + 2).to_string();
    let (code, _, err) = mnemo(&[
        "--threads",
        "1",
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--steps",
        &target,
        "--quiet",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("resuming {} from step {step}", run.display())),
        "{err}"
    );
}

#[test]
fn pack_reports_secrets_and_fails_cleanly_on_bad_paths() {
    let (code, _, err) = mnemo(&["pack", "/nonexistent/mnemo-repo"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("/nonexistent/mnemo-repo") && !err.contains("panicked"),
        "{err}"
    );
    let d = tmpdir("packrepo");
    let f = d.join("file.txt");
    std::fs::write(&f, "x").unwrap();
    let (code, _, err) = mnemo(&["pack", f.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not a directory"), "{err}");
    std::fs::write(d.join("main.rs"), "fn main() {}\n").unwrap();
    let key = ["AKIA", "IOSFODNN7", "EXAMPLE"].concat();
    std::fs::write(d.join("settings.toml"), format!("[aws]\nid = \"{key}\"\n")).unwrap();
    std::fs::write(d.join(".env"), "PASSWORD=hunter2hunter2\n").unwrap();
    let (code, out, err) = mnemo(&["pack", d.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("fn main() {}"));
    assert!(!out.contains(&key) && !out.contains("hunter2"), "{out}");
    assert!(
        err.contains("settings.toml") && err.contains("secret"),
        "{err}"
    );
}

/// `train` of a tiny model (1 layer, d = 32, context 256) on `data`, `steps` steps.
fn train_tiny(data: &std::path::Path, run: &std::path::Path, steps: &str) -> (i32, String, String) {
    mnemo(&[
        "--threads",
        "1",
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--steps",
        steps,
        "--set",
        "vocab_size=300",
        "--set",
        "d_model=32",
        "--set",
        "n_layers=1",
        "--set",
        "head_dim=8",
        "--set",
        "rope_dim=8",
        "--set",
        "ffn_hidden=32",
        "--set",
        "data.val_fraction=0.5",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--quiet",
    ])
}

/// A repository much bigger than the tiny model's context: a second, different question reuses
/// the question-independent prefix; a change misses it; the size limit evicts the least recently
/// used entry; `mnemo cache list|clear` see and delete them. Also: `generate` says when
/// `--max-tokens` is beyond the context, `--steps 0` gives no `generate` hint, and training and
/// `eval` say how many validation windows their losses use.
#[test]
fn ask_packs_prefills_and_reuses_the_prefix_cache() {
    let d = tmpdir("ask");
    let data = d.join("repo");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..24 {
        let body: String = (0..4)
            .map(|j| format!("fn g_{i}_{j}() -> u8 {{ {j} }}\n"))
            .collect();
        std::fs::write(data.join(format!("m{i}.rs")), body).unwrap();
    }
    let run = d.join("run");
    let (code, _, err) = train_tiny(&data, &run, "2");
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("windows of 16 tokens = train.eval_batches 8")
            && err.contains("`mnemo eval` uses 32 batches"),
        "{err}"
    );
    assert!(err.contains("sample with: mnemo generate"), "{err}");
    let cache = d.join("cache");
    let ask = |q: &str, extra: &[&str]| {
        let mut args = vec![
            "ask",
            data.to_str().unwrap(),
            q,
            "--model",
            run.to_str().unwrap(),
            "--max-tokens",
            "8",
            "--cache-dir",
            cache.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (code, _, err) = mnemo(&args);
        assert_eq!(code, 0, "{err}");
        err
    };
    let list = || {
        let (code, out, err) = mnemo(&["cache", "list", "--cache-dir", cache.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        out
    };
    let err = ask("what does g_1_2 return?", &[]);
    assert!(
        err.contains("prefilled") && err.contains("prefix cache saved"),
        "{err}"
    );
    assert!(
        err.contains("ranked without the question") && err.contains("files for this question"),
        "{err}"
    );
    // A different question: the cached part is reused, only its own files and itself prefilled.
    let err = ask("where is g_17_3 defined", &[]);
    assert!(
        err.contains("tokens: m17.rs"),
        "the question's file first: {err}"
    );
    assert!(
        err.contains("prefix cache hit") && err.contains("tokens reused"),
        "{err}"
    );
    assert!(!err.contains("prefilled"), "{err}");
    assert!(err.contains("of files for this question"), "{err}");
    assert!(
        list().contains("prefix caches (mnemo ask) in") && list().contains(": 1 entries"),
        "{}",
        list()
    );
    let entry = std::fs::read_dir(cache.join("prefix"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let size = entry.metadata().unwrap().len();
    // A changed repository misses the cache; with room for one entry the older one goes.
    let change = |i: usize| {
        // Same length, other values: the cached part changes, its size does not.
        let body: String = (0..4)
            .map(|j| format!("fn g_{i}_{j}() -> u8 {{ {} }}\n", 9 - j))
            .collect();
        std::fs::write(data.join(format!("m{i}.rs")), body).unwrap();
    };
    change(0);
    let limit = (size + size / 2).to_string();
    let err = ask("what does g_21_2 return?", &["--cache-limit", &limit]);
    assert!(err.contains("prefilled"), "{err}");
    assert!(
        err.contains("evicted 1 least recently used entries"),
        "{err}"
    );
    assert!(list().contains(": 1 entries"), "{}", list());
    // A limit of 0 saves nothing; so does one below the entry's size.
    change(1);
    let err = ask("q", &["--cache-limit", "0"]);
    assert!(
        err.contains("prefix cache not saved: its size limit is 0"),
        "{err}"
    );
    let (code, _, err) = mnemo_env(
        &[
            "ask",
            data.to_str().unwrap(),
            "q",
            "--model",
            run.to_str().unwrap(),
            "--max-tokens",
            "8",
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
        &[("MNEMO_PREFIX_CACHE_LIMIT", "1K")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("prefix cache not kept") && err.contains("over the limit of 1.0 KiB"),
        "{err}"
    );
    assert!(
        list().contains(": 0 entries"),
        "nothing is under 1K: {}",
        list()
    );
    let (code, _, err) = mnemo_env(
        &[
            "ask",
            data.to_str().unwrap(),
            "q",
            "--model",
            run.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
        &[("MNEMO_PREFIX_CACHE_LIMIT", "lots")],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("$MNEMO_PREFIX_CACHE_LIMIT") && err.contains("`lots`"),
        "{err}"
    );
    // `cache clear --prefix` deletes them all.
    let err = ask("q", &[]);
    assert!(err.contains("prefix cache saved"), "{err}");
    let (code, out, err) = mnemo(&[
        "cache",
        "clear",
        "--prefix",
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deleted 1 cache entries"), "{out}");
    assert!(list().contains(": 0 entries"), "{}", list());

    // `generate` says when --max-tokens is beyond the context (256 tokens).
    let (code, _, err) = mnemo(&[
        "generate",
        run.to_str().unwrap(),
        "--prompt",
        "fn g",
        "--max-tokens",
        "1000",
        "--temperature",
        "0",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("--max-tokens 1000 is more than the context leaves")
            && err.contains("of the model's 256 tokens"),
        "{err}"
    );
    // `eval` states its batches.
    let (code, out, err) = mnemo(&["eval", run.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("= 32 batches of 2") && out.contains("train.eval_batches"),
        "{out}"
    );
    // `--steps 0`: no checkpoint, so no `generate` hint.
    let (code, _, err) = train_tiny(&data, &d.join("zero"), "0");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("0 steps: nothing was trained"), "{err}");
    assert!(!err.contains("sample with"), "{err}");
}

#[test]
fn engram_commands_overrides_and_bad_engram_configs() {
    // `--set engram.FIELD=…` edits the preset's Engram config (or adds one); a block that does
    // not exist names the field.
    assert_fails(
        &[
            "config",
            "--preset",
            "tiny-engram",
            "--set",
            "engram.layer_ids=[1,9]",
        ],
        "engram.layer_ids",
    );
    let (code, out, err) = mnemo(&[
        "config",
        "--preset",
        "tiny",
        "--set",
        "engram.layer_ids=[1,3]",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["model"]["engram"]["layer_ids"], serde_json::json!([1, 3]));
    // Inspect a config file (a run config as `mnemo config` prints it).
    let d = tmpdir("engram");
    let cfg = d.join("run.json");
    std::fs::write(&cfg, &out).unwrap();
    let (code, out, err) = mnemo(&["engram", "inspect", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("layer 1:") && out.contains("layer 3:") && out.contains("2-gram table sizes"),
        "{out}"
    );
    let (_, plain, _) = mnemo(&["config", "--preset", "tiny"]);
    let pc = d.join("plain.json");
    std::fs::write(&pc, plain).unwrap();
    assert_fails(&["engram", "inspect", pc.to_str().unwrap()], "no Engram");
    assert_fails(&["engram", "inspect", "/nonexistent/run"], "does not exist");
    // Compression report of a trained tokenizer.
    let data = tmpdir("engram-data");
    std::fs::write(data.join("a.rs"), "fn Main() { let X = 1; }\n".repeat(200)).unwrap();
    let tok = d.join("tok.json");
    let (code, _, err) = mnemo(&[
        "tokenizer",
        "train",
        "--data",
        data.to_str().unwrap(),
        "--vocab",
        "300",
        "--out",
        tok.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = mnemo(&["engram", "compress", "--tokenizer", tok.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("tokenizer ids ->"), "{out}");
    assert_fails(
        &["engram", "compress", "--tokenizer", "/nonexistent/tok.json"],
        "/nonexistent/tok.json",
    );
}

/// `engram inspect CONFIG` sizes the tables from the config without building them: a
/// DeepSeek-V4.1-sized Engram (blocks 1 and 14, orders 2..=4, 8 heads of ~16M rows per order,
/// ~384M rows and ~25 GB per layer) answers at once with the rows its tables would have.
#[test]
fn engram_inspect_sizes_a_v41_config_without_building_it() {
    let (code, out, err) = mnemo(&[
        "config",
        "--preset",
        "tiny",
        "--set",
        "n_layers=16",
        "--set",
        "vocab_size=129280",
        "--set",
        "engram.layer_ids=[1,14]",
        "--set",
        "engram.max_ngram_size=4",
        "--set",
        "engram.n_head_per_ngram=8",
        "--set",
        "engram.head_dim=16",
        "--set",
        "engram.vocab_size_per_ngram=[16000000,16000000,16000000]",
        "--set",
        "engram.kernel_size=0",
    ]);
    assert_eq!(code, 0, "{err}");
    let d = tmpdir("engram-v41");
    let cfg = d.join("v41.json");
    std::fs::write(&cfg, &out).unwrap();
    let (code, out, err) = mnemo(&["engram", "inspect", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("layer 1: orders [2, 3, 4], 8 heads/order x 16 dims, 384006168 rows"),
        "{out}"
    );
    assert!(
        out.contains("layer 14: orders [2, 3, 4], 8 heads/order x 16 dims, 384016682 rows"),
        "{out}"
    );
}

fn mnemo_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mnemo"));
    cmd.args(args).env("MNEMO_CACHE", common::cache());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run mnemo");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn eval_humaneval_scores_fixture_problems_in_the_sandbox() {
    let d = tmpdir("heval");
    let data = d.join("code");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..4 {
        let body: String = (0..30)
            .map(|j| format!("def f_{i}_{j}(x):\n    return x + {j}\n\n"))
            .collect();
        std::fs::write(data.join(format!("m{i}.py")), body).unwrap();
    }
    let run = d.join("run");
    let (code, _, err) = mnemo(&[
        "--threads",
        "1",
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--steps",
        "2",
        "--set",
        "vocab_size=300",
        "--set",
        "d_model=32",
        "--set",
        "n_layers=1",
        "--set",
        "head_dim=8",
        "--set",
        "rope_dim=8",
        "--set",
        "ffn_hidden=32",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--quiet",
    ]);
    assert_eq!(code, 0, "{err}");
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../mnemo-eval/tests/fixtures");
    let check = |bench: &str, file: &str, env: &[(&str, &str)]| -> serde_json::Value {
        let out = d.join(format!("{bench}.jsonl"));
        let (code, stdout, err) = mnemo_env(
            &[
                "--threads",
                "1",
                "eval",
                bench,
                run.to_str().unwrap(),
                "--data",
                fixtures.join(file).to_str().unwrap(),
                "--limit",
                "2",
                "--k",
                "1",
                "--max-tokens",
                "8",
                "--out",
                out.to_str().unwrap(),
            ],
            env,
        );
        assert_eq!(code, 0, "{err}");
        let s: serde_json::Value = serde_json::from_str(&stdout).expect("a JSON summary");
        assert_eq!(s["benchmark"], bench);
        assert_eq!(s["problems"], 2);
        assert_eq!(s["samples_per_problem"], 1);
        let p1 = s["pass@k"]["1"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&p1), "{s}");
        assert!(s["passed"].as_u64().unwrap() <= 2);
        let n: u64 = s["statuses"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(n, 2, "{s}");
        assert!(s["time_s"].as_f64().unwrap() > 0.0);
        assert!(s["sandbox"]["namespaces"].is_boolean());
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0]["results"][0]["status"].is_string(), "{}", lines[0]);
        assert!(lines[0]["results"][0]["completion"].is_string());
        s
    };
    check("humaneval", "humaneval-tiny.jsonl", &[]);
    let rustc_here = Command::new("rustc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if rustc_here {
        check("humaneval-rust", "humaneval-rust-tiny.jsonl", &[]);
    }
    // Without namespaces (as on a kernel that refuses them) it still runs, and says so.
    let s = check(
        "humaneval",
        "humaneval-tiny.jsonl",
        &[("MNEMO_SANDBOX_NO_NS", "1")],
    );
    assert_eq!(s["sandbox"]["namespaces"], false);
    // Bad input: missing data, k above the sample count; the old `eval RUN_DIR` still parses.
    assert_fails(
        &[
            "eval",
            "humaneval",
            run.to_str().unwrap(),
            "--data",
            "/nonexistent/he.jsonl",
        ],
        "fetch-humaneval.sh",
    );
    assert_fails(
        &[
            "eval",
            "humaneval",
            run.to_str().unwrap(),
            "--data",
            fixtures.join("humaneval-tiny.jsonl").to_str().unwrap(),
            "--k",
            "2",
        ],
        "pass@2",
    );
    assert_fails(&["eval"], "RUN_DIR");
}

#[test]
fn dsa_config_and_stage_flags() {
    assert_fails(
        &[
            "config",
            "--preset",
            "tiny-dsa",
            "--set",
            "dsa.index_topk=0",
        ],
        "dsa.index_topk",
    );
    // DSA composes with mHC (and Engram): the released V4 combination.
    let (code, out, err) = mnemo(&["config", "--preset", "tiny-dsa", "--set", "residual=mhc"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"residual\": \"mhc\""), "{out}");
    assert_fails(&["config", "--set", "dsa.index_topq=3"], "index_topq");
    assert_fails(&["config", "--dsa-stage", "warmup"], "dsa_stage");
    assert_fails(&["config", "--dsa-stage", "later"], "later");
    let (code, out, err) = mnemo(&[
        "config",
        "--set",
        "dsa.index_topk=64",
        "--dsa-stage",
        "warmup",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("\"index_topk\": 64") && out.contains("\"dsa_stage\": \"warmup\""),
        "{out}"
    );
    let d = tmpdir("dsa-resume");
    assert_fails(
        &[
            "train",
            "--resume",
            d.to_str().unwrap(),
            "--seq-len",
            "8",
            "--dsa-stage",
            "sparse",
        ],
        "--dsa-stage",
    );
}

/// Long context end to end: a tiny run trained on synthetic NIAH rows, a YaRN continuation
/// stage from it with `--init`, `eval --task niah|vt` (table + JSON), and the bad-input errors
/// (context beyond the model, RoPE scaling that cannot reach max_seq_len, prompt too long).
#[test]
fn long_context_synthetic_training_init_stage_and_niah_eval() {
    let d = tmpdir("longctx");
    let data = d.join("code");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..4 {
        let body: String = (0..40)
            .map(|j| {
                format!("fn f_{i}_{j}(x: u32) -> u32 {{\n    let y = x + {j};\n    y * 3\n}}\n")
            })
            .collect();
        std::fs::write(data.join(format!("m{i}.rs")), body).unwrap();
    }
    let run = d.join("run");
    let small = [
        "--set",
        "vocab_size=300",
        "--set",
        "d_model=32",
        "--set",
        "n_layers=1",
        "--set",
        "head_dim=8",
        "--set",
        "rope_dim=8",
        "--set",
        "ffn_hidden=32",
        "--set",
        "max_seq_len=128",
    ];
    let mut args = vec![
        "--threads",
        "1",
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "128",
        "--synthetic",
        "niah",
        "--synthetic-mix",
        "0.5",
        "--synthetic-loss",
        "answers",
        "--quiet",
    ];
    args.extend_from_slice(&small);
    let (code, _, err) = mnemo(&args);
    assert_eq!(code, 0, "{err}");
    let rj = std::fs::read_to_string(run.join("run.json")).unwrap();
    assert!(
        rj.contains(r#""task": "niah""#)
            && rj.contains(r#""fraction": 0.5"#)
            && rj.contains(r#""loss": "answers""#),
        "{rj}"
    );
    // An unknown loss selection is refused, naming the flag.
    let mut bad = args.clone();
    let at = bad.iter().position(|a| *a == "answers").unwrap();
    bad[at] = "filler";
    let (code, _, err) = mnemo(&bad);
    assert_ne!(code, 0);
    assert!(
        err.contains("--synthetic-loss") && err.contains("filler"),
        "{err}"
    );
    // Continuation: 4x context with YaRN, weights from the first run.
    let long = d.join("long");
    let (code, _, err) = mnemo(&[
        "--threads",
        "1",
        "train",
        "--init",
        run.to_str().unwrap(),
        "--seq-len",
        "512",
        "--rope-scaling-factor",
        "4",
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--out",
        long.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("initialised from"), "{err}");
    let cfg = std::fs::read_to_string(long.join("checkpoint/config.json")).unwrap();
    assert!(
        cfg.contains(r#""max_seq_len": 512"#)
            && cfg.contains(r#""original_max_position_embeddings": 128"#),
        "{cfg}"
    );
    // The eval: table on stdout, cells in the JSON.
    let json = d.join("niah.json");
    let (code, out, err) = mnemo(&[
        "--threads",
        "1",
        "eval",
        "--task",
        "niah",
        "--model",
        long.to_str().unwrap(),
        "--context",
        "128,512",
        "--depths",
        "0,1",
        "--samples",
        "1",
        "--json",
        json.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("depth") && out.contains("512") && out.contains("mean"),
        "{out}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["cells"].as_array().unwrap().len(), 4);
    assert_eq!(v["rope_scaling"]["factor"], 4.0);
    let (code, out, err) = mnemo(&[
        "--threads",
        "1",
        "eval",
        "--task",
        "vt",
        run.to_str().unwrap(),
        "--context",
        "128",
        "--depths",
        "0.5",
        "--samples",
        "1",
        "--quiet",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("vt accuracy"), "{out}");
    // Bad input: errors before any work.
    assert_fails(
        &[
            "eval",
            "--task",
            "niah",
            "--model",
            run.to_str().unwrap(),
            "--context",
            "1024",
        ],
        "--context 1024 exceeds the model's maximum context of 128 tokens",
    );
    assert_fails(
        &[
            "eval",
            "--task",
            "niah",
            "--model",
            run.to_str().unwrap(),
            "--depths",
            "2",
        ],
        "--depths: 2 is not in [0, 1]",
    );
    assert_fails(
        &[
            "train", "--data", data.to_str().unwrap(), "--out", d.join("bad").to_str().unwrap(),
            "--set", "max_seq_len=4096", "--set",
            r#"rope_scaling={"factor":2,"original_max_position_embeddings":256}"#,
        ],
        "`max_seq_len` (4096) is beyond what the RoPE scaling reaches: rope_scaling.original_max_position_embeddings (256) × rope_scaling.factor (2) = 512",
    );
    assert_fails(
        &[
            "train",
            "--init",
            run.to_str().unwrap(),
            "--set",
            "d_model=64",
            "--out",
            d.join("bad2").to_str().unwrap(),
        ],
        "do not fit the new model",
    );
    let prompt = "fn main() { let x = 1; }\n".repeat(200);
    assert_fails(
        &["generate", run.to_str().unwrap(), "--prompt", &prompt],
        "beyond the model's maximum context of 128 tokens",
    );
}
