//! The command line on bad input: one clear error naming the file/field, a non-zero exit code,
//! never a panic (bad data directories, configs, checkpoints, tokenizers), and the DSA config
//! flags.

mod common;

use common::{assert_fails, mnemo, tmpdir};

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
    // `train.precision`: f32 or bf16, from the flag or --set; a resumed run keeps its own.
    assert_fails(
        &["config", "--precision", "fp16"],
        "unknown precision `fp16` (expected f32 or bf16)",
    );
    assert_fails(
        &["config", "--set", "train.precision=fp16"],
        "unknown variant `fp16`, expected `f32` or `bf16`",
    );
    assert_fails(
        &[
            "train",
            "--resume",
            "/nonexistent/run",
            "--precision",
            "bf16",
        ],
        "its precision included",
    );
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
