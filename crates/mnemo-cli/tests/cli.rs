//! The command line on bad input: one clear error naming the file/field, a non-zero exit code,
//! never a panic.

use std::path::PathBuf;
use std::process::Command;

fn mnemo(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mnemo"))
        .args(args)
        .env(
            "MNEMO_CACHE",
            std::env::temp_dir().join(format!("mnemo-cli-cache-{}", std::process::id())),
        )
        .output()
        .expect("run mnemo");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mnemo-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
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
    assert_fails(
        &[
            "train",
            "--data",
            "/nonexistent/mnemo-data",
            "--out",
            "/tmp/x",
        ],
        "/nonexistent/mnemo-data",
    );
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

#[test]
fn ask_packs_prefills_and_reuses_the_prefix_cache() {
    let d = tmpdir("ask");
    let data = d.join("repo");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..6 {
        let body: String = (0..30)
            .map(|j| format!("fn g_{i}_{j}() -> u8 {{ {j} }}\n"))
            .collect();
        std::fs::write(data.join(format!("m{i}.rs")), body).unwrap();
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
    let cache = d.join("cache");
    let ask = || {
        mnemo(&[
            "ask",
            data.to_str().unwrap(),
            "what does g_1_2 return?",
            "--model",
            run.to_str().unwrap(),
            "--max-tokens",
            "8",
            "--cache-dir",
            cache.to_str().unwrap(),
        ])
    };
    let (code, _, err) = ask();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("prefilled"), "{err}");
    let (code, _, err) = ask();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("prefix cache hit"), "{err}");
    // A changed repository misses the cache.
    std::fs::write(data.join("m0.rs"), "fn changed() {}\n").unwrap();
    let (code, _, err) = ask();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("prefilled"), "{err}");
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
    cmd.args(args).env(
        "MNEMO_CACHE",
        std::env::temp_dir().join(format!("mnemo-cli-cache-{}", std::process::id())),
    );
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
