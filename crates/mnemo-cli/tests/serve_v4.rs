//! `mnemo serve` and `mnemo ask` on DeepSeek-V4 directories: a tiny V4 run (window 8, CSA
//! every 4 tokens, HCA every 16, MoE) exported in transformers' layout (`mnemo export`) and
//! written in the official FP8/FP4 layout (`mnemo quantize`). Through the real server: greedy
//! answers with the prompt cache (which holds the V4 window ring, compressed entries and
//! indexer keys) equal those without it, for a prompt that extends a cached one, for prompts
//! that leave a cached one far back (the shared prefix is kept as an entry of its own), and
//! after a restart from `--prefix-cache-dir`.

mod common;

use common::server::{completion_text, Server};
use common::{mnemo, tmpdir};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The run, its transformers-layout export and its official-layout FP8/FP4 copy.
fn v4_dirs() -> &'static (PathBuf, PathBuf, PathBuf) {
    static DIRS: OnceLock<(PathBuf, PathBuf, PathBuf)> = OnceLock::new();
    DIRS.get_or_init(|| {
        let d = tmpdir("v4");
        let data = d.join("data");
        std::fs::create_dir_all(&data).unwrap();
        for i in 0..3 {
            let body: String = (0..30)
                .map(|j| format!("fn f_{i}_{j}(x: i32) -> i32 {{ x * {j} }}\n"))
                .collect();
            std::fs::write(data.join(format!("m{i}.rs")), body).unwrap();
        }
        let cfg = r#"{"preset": "v4-tiny", "model": {"vocab_size": 300, "d_model": 32,
            "n_layers": 3, "head_dim": 16, "max_seq_len": 1024, "moe_inter": 32,
            "n_routed_experts": 4, "v4": {"q_lora_rank": 16, "o_lora_rank": 8, "o_groups": 2,
            "sliding_window": 8, "compress_rate_csa": 4, "compress_rate_hca": 16,
            "index_topk": 4, "index_n_heads": 2, "index_head_dim": 8, "qk_rope_head_dim": 8,
            "compress_rope_theta": 160000.0, "num_nextn_predict_layers": 0, "layer_types":
            ["sliding_attention", "compressed_sparse_attention",
             "heavily_compressed_attention"]}}}"#;
        std::fs::write(d.join("cfg.json"), cfg).unwrap();
        let s = |p: &PathBuf| p.to_string_lossy().into_owned();
        let (run, hf, off) = (d.join("run"), d.join("hf"), d.join("official"));
        let (code, _, err) = mnemo(&[
            "--threads",
            "1",
            "train",
            "--data",
            &s(&data),
            "--out",
            &s(&run),
            "--config",
            &s(&d.join("cfg.json")),
            "--steps",
            "20",
            "--quiet",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
        ]);
        assert_eq!(code, 0, "{err}");
        let (code, _, err) = mnemo(&["export", &s(&run), "--format", "hf", "--out", &s(&hf)]);
        assert_eq!(code, 0, "{err}");
        let (code, _, err) = mnemo(&["quantize", &s(&run), &s(&off), "--type", "fp8+fp4"]);
        assert_eq!(code, 0, "{err}");
        std::fs::copy(hf.join("tokenizer.json"), off.join("tokenizer.json")).unwrap();
        (run, hf, off)
    })
}

fn cached(v: &Value) -> u64 {
    v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0)
}

fn ask(server: &Server, prompt: &str) -> (String, u64) {
    let req = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0});
    let (st, v) = server.post("/v1/completions", &req);
    assert_eq!(st, 200, "{v}");
    (completion_text(&v), cached(&v))
}

#[test]
fn serve_runs_v4_directories_with_the_prompt_cache() {
    let (_, hf, off) = v4_dirs();
    let context: String = (0..10)
        .map(|j| format!("fn f_1_{j}(x: i32) -> i32 {{ x * {j} }}\n"))
        .collect();
    // Tails longer than a V4 state can be cut back by (64 positions).
    let tail = |i: usize| -> String {
        (0..8)
            .map(|j| format!("fn g_{i}_{j}(y: u8) -> u8 {{ y + {j} }}\n"))
            .collect()
    };
    let prompts = [
        format!("{context}{}", tail(1)),
        format!("{context}{}fn f_1_4(x", tail(1)),
        format!("{context}{}", tail(2)),
        format!("{context}fn f_2_5(x"),
        format!("{context}{}", tail(3)),
    ];
    for dir in [hf, off] {
        let plain = Server::start_model(dir, &["--prefix-entries", "0"]);
        let want: Vec<String> = prompts.iter().map(|p| ask(&plain, p).0).collect();
        drop(plain);
        let pdir = common::root().join(format!(
            "prefix-{}",
            dir.file_name().unwrap().to_string_lossy()
        ));
        let pd = pdir.to_str().unwrap();
        let cache_args = ["--prefix-min-tokens", "16", "--prefix-cache-dir", pd];
        let server = Server::start_model(dir, &cache_args);
        let got: Vec<(String, u64)> = prompts.iter().map(|p| ask(&server, p)).collect();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(&g.0, w, "{}: prompt {i}", dir.display());
        }
        let c: Vec<u64> = got.iter().map(|g| g.1).collect();
        // 1 extends 0; 2 leaves both far back (no hit) and keeps the shared context as an
        // entry; 3 and 4 reuse it.
        assert_eq!(c[0], 0, "{c:?}");
        assert!(c[1] >= 100, "{c:?}");
        assert_eq!(c[2], 0, "{c:?}");
        assert!(c[3] >= 100 && c[4] >= 100, "{c:?}");
        drop(server);
        // Saved to disk: a restarted server reuses the V4 states.
        let again = Server::start_model(dir, &cache_args);
        let (text, n) = ask(&again, &prompts[1]);
        assert_eq!(text, want[1]);
        assert!(n >= 100, "{n}\n{}", again.log.lock().unwrap());
    }
}

#[test]
fn ask_runs_v4_directories_and_reuses_the_prefix_cache() {
    let (_, hf, off) = v4_dirs();
    let d = tmpdir("v4-ask");
    let repo = d.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    for i in 0..6 {
        let body: String = (0..4)
            .map(|j| format!("fn g_{i}_{j}() -> u8 {{ {j} }}\n"))
            .collect();
        std::fs::write(repo.join(format!("m{i}.rs")), body).unwrap();
    }
    for dir in [hf, off] {
        let cache = d.join(format!(
            "cache-{}",
            dir.file_name().unwrap().to_string_lossy()
        ));
        let run = |q: &str| {
            let (code, out, err) = mnemo(&[
                "--threads",
                "1",
                "ask",
                repo.to_str().unwrap(),
                q,
                "--model",
                dir.to_str().unwrap(),
                "--max-tokens",
                "8",
                "--cache-dir",
                cache.to_str().unwrap(),
            ]);
            assert_eq!(code, 0, "{err}");
            (out, err)
        };
        let (_, err) = run("what does g_1_2 return?");
        assert!(err.contains("prefix cache saved"), "{err}");
        let (_, err) = run("where is g_4_3 defined");
        assert!(err.contains("prefix cache hit"), "{err}");
    }
}
