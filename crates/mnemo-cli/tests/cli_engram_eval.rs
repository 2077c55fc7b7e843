//! `engram` commands and configs, and `eval humaneval` in the sandbox.

mod common;

use common::{assert_fails, mnemo, mnemo_env, tmpdir};
use std::path::PathBuf;
use std::process::Command;

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
