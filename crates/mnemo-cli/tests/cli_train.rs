//! Training end to end: Ctrl-C saves a checkpoint that resumes; long-context training, a
//! YaRN stage and the NIAH evaluation.

mod common;

use common::{assert_fails, mnemo, tmpdir};
use std::process::Command;

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
