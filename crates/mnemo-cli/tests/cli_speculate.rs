//! `mnemo generate --speculate mtp|lookup --draft-len K` on a tiny DeepSeek-V4 run with an
//! MTP block (trained 30 steps, under a second): greedy output identical to plain
//! `generate`, the counters on stderr; clear errors for a model without an MTP block and for
//! flags that exclude each other; `mnemo bench speculate` reports identical outputs.

mod common;

use common::{assert_fails, mnemo, tmpdir};
use std::path::{Path, PathBuf};

/// A V4 run (window 8, CSA every 4 tokens, MoE with 4 experts) with `mtp` MTP blocks.
fn v4_run(name: &str, mtp: usize) -> PathBuf {
    let d = tmpdir(name);
    let data = d.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..3 {
        let body: String = (0..30)
            .map(|j| format!("fn f_{i}_{j}(x: i32) -> i32 {{ x * {j} }}\n"))
            .collect();
        std::fs::write(data.join(format!("m{i}.rs")), body).unwrap();
    }
    let mut types = vec!["\"sliding_attention\"", "\"compressed_sparse_attention\""];
    types.extend(std::iter::repeat_n("\"sliding_attention\"", mtp));
    let cfg = format!(
        r#"{{"preset": "v4-tiny", "model": {{"vocab_size": 300, "d_model": 32, "n_layers": 2,
        "head_dim": 16, "max_seq_len": 256, "moe_inter": 16, "n_routed_experts": 4,
        "v4": {{"q_lora_rank": 16, "o_lora_rank": 8, "o_groups": 2, "sliding_window": 8,
        "compress_rate_csa": 4, "compress_rate_hca": 16, "index_topk": 4, "index_n_heads": 2,
        "index_head_dim": 8, "qk_rope_head_dim": 8, "compress_rope_theta": 160000.0,
        "num_nextn_predict_layers": {mtp}, "layer_types": [{}]}}}}}}"#,
        types.join(", ")
    );
    std::fs::write(d.join("cfg.json"), cfg).unwrap();
    let run = d.join("run");
    let (code, _, err) = mnemo(&[
        "--threads",
        "1",
        "train",
        "--data",
        &data.to_string_lossy(),
        "--out",
        &run.to_string_lossy(),
        "--config",
        &d.join("cfg.json").to_string_lossy(),
        "--steps",
        "30",
        "--quiet",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
    ]);
    assert_eq!(code, 0, "{err}");
    run
}

const PROMPT: &str = "fn f_1_3(x: i32) -> i32 { x * 3 }\nfn f_1_4(";

/// `generate RUN --temperature 0 --max-tokens 60 EXTRA`: stdout and stderr.
fn generate(run: &Path, extra: &[&str]) -> (String, String) {
    let r = run.to_string_lossy();
    let mut args = vec![
        "--threads",
        "1",
        "generate",
        &r,
        "--prompt",
        PROMPT,
        "--temperature",
        "0",
        "--max-tokens",
        "60",
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = mnemo(&args);
    assert_eq!(code, 0, "{extra:?}: {err}");
    (out, err)
}

#[test]
fn speculate_mtp_and_lookup_generate_plain_greedy_text() {
    let run = v4_run("spec-v4", 1);
    let (plain, _) = generate(&run, &[]);
    assert!(plain.len() > PROMPT.len(), "{plain}");
    for k in ["1", "3"] {
        let (out, err) = generate(&run, &["--speculate", "mtp", "--draft-len", k]);
        assert_eq!(out, plain, "--speculate mtp --draft-len {k}");
        assert!(err.contains("mtp: ") && err.contains("accepted"), "{err}");
    }
    let (out, err) = generate(&run, &["--speculate", "lookup", "--draft-len", "4"]);
    assert_eq!(out, plain);
    assert!(err.contains("lookup: "), "{err}");
    let (out, _) = generate(&run, &["--lookup"]);
    assert_eq!(out, plain);
    let r = run.to_string_lossy();
    let base = ["generate", &r, "--prompt", "fn", "--temperature", "0"];
    let with = |extra: &[&'static str]| -> Vec<&str> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };
    assert_fails(
        &with(&["--speculate", "mtp", "--lookup"]),
        "exclude each other",
    );
    assert_fails(
        &with(&["--draft-len", "2"]),
        "--draft-len needs --speculate",
    );
    assert_fails(
        &with(&["--speculate", "mtp", "--draft-len", "64"]),
        "draft length must be in 1..=63",
    );
    // The benchmark: every arm's output is plain greedy's.
    let (code, out, err) = mnemo(&[
        "--threads",
        "1",
        "bench",
        "speculate",
        &r,
        "--prompt",
        PROMPT,
        "--max-tokens",
        "20",
        "--rounds",
        "1",
        "--draft-len",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for arm in ["plain", "mtp_k2", "lookup"] {
        assert_eq!(v["arms"][arm]["identical_to_plain"], true, "{arm}: {out}");
    }
    assert!(
        v["arms"]["mtp_k2"]["drafted"].as_u64().unwrap() > 0,
        "{out}"
    );
}

#[test]
fn speculate_mtp_needs_an_mtp_block() {
    let run = v4_run("spec-v4-nomtp", 0);
    let r = run.to_string_lossy();
    assert_fails(
        &["generate", &r, "--prompt", "fn", "--speculate", "mtp"],
        "no MTP block",
    );
}
