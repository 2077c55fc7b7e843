//! `mnemo quantize` on GGUF files: the GGUF path is taken, bad `--type` and already-quantised
//! inputs are explained, `--allow-requantize` requantises. (The mixes themselves are checked
//! against llama-quantize in `crates/mnemo/tests/gguf_quantize.rs`.)

mod common;
use common::{assert_fails, mnemo, tmpdir};
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../mnemo/tests/fixtures/gguf_arch/llama-Q4_K_M.gguf")
}

#[test]
fn quantize_gguf_cli() {
    let src = fixture();
    let src = src.to_str().unwrap();
    let d = tmpdir("quantize-gguf");
    let out = d.join("out.gguf");
    let o = out.to_str().unwrap();
    assert_fails(&["quantize", src, o, "--type", "Q4_K_X"], "Q4_K_M");
    assert_fails(&["quantize", src, o, "--type", "Q4_K_X"], "fp8+fp4");
    assert_fails(&["quantize", src, o, "--type", "fp8"], "GGUF mix");
    assert_fails(
        &["quantize", src, o, "--type", "Q8_0"],
        "--allow-requantize",
    );
    assert_fails(&["quantize", src, src, "--type", "Q4_K_M"], "OUT is IN");
    assert!(!out.exists());
    let (code, _, err) = mnemo(&["quantize", src, o, "--type", "q8_0", "--allow-requantize"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("wrote") && err.contains("Q8_0"), "{err}");
    let g = mnemo::gguf::Gguf::open(&out).unwrap();
    assert_eq!(g.meta["general.file_type"].as_u64(), Some(7));
    let (code, help, _) = mnemo(&["quantize", "--help"]);
    assert_eq!(code, 0);
    for w in ["Q4_K_M", "fp8+fp4", "--allow-requantize", "llama-quantize"] {
        assert!(help.contains(w), "--help lacks {w}");
    }
}

/// A Hugging Face directory: the committed tiny Qwen2 (config, tokenizer) with f32 weights
/// written here (values irrelevant: byte identity with llama.cpp is
/// `crates/mnemo/tests/hf_quantize.rs`).
fn hf_dir(root: &std::path::Path) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../mnemo/tests/fixtures/hf_quantize/tiny-qwen2-f32");
    let d = root.join("tiny-qwen2-f32");
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tensors.json")).unwrap()).unwrap();
    let mut ts: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for t in m["model.safetensors"].as_array().unwrap() {
        let shape: Vec<usize> = t[2]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|i| ((i * 7919) % 201) as f32 / 1000.0 - 0.1)
            .collect();
        ts.push((t[0].as_str().unwrap().to_string(), shape, v));
    }
    let refs: Vec<(String, Vec<usize>, &[f32])> = ts
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice()))
        .collect();
    let bytes = mnemo::io::safetensors::serialize(&refs, Default::default()).unwrap();
    std::fs::write(d.join("model.safetensors"), bytes).unwrap();
    d
}

#[test]
fn quantize_hf_dir_cli() {
    let root = tmpdir("quantize-hf");
    let d = hf_dir(&root);
    let ds = d.to_str().unwrap();
    let out = root.join("out.gguf");
    let o = out.to_str().unwrap();
    // SmolLM2's tokenizer cut to 1024 tokens: not in convert_hf_to_gguf.py's table.
    assert_fails(&["quantize", ds, o, "--type", "Q4_K_M"], "--tokenizer-pre");
    assert_fails(
        &["quantize", ds, o, "--type", "Q4_K_M", "--allow-requantize"],
        "only for a GGUF input",
    );
    let (code, _, err) = mnemo(&[
        "quantize",
        ds,
        o,
        "--type",
        "Q4_K_M",
        "--tokenizer-pre",
        "smollm",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("wrote") && err.contains("Q4_K_M"), "{err}");
    let g = mnemo::gguf::Gguf::open(&out).unwrap();
    assert_eq!(g.meta["general.architecture"].as_str(), Some("qwen2"));
    assert_eq!(g.meta["tokenizer.ggml.pre"].as_str(), Some("smollm"));
    assert_eq!(g.meta["general.file_type"].as_u64(), Some(15));
    let (code, _, err) = mnemo(&[
        "quantize",
        ds,
        o,
        "--type",
        "bf16",
        "--tokenizer-pre",
        "smollm",
    ]);
    assert_eq!(code, 0, "{err}");
    // No config.json: not taken for a Hugging Face directory.
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_fails(
        &["quantize", empty.to_str().unwrap(), o, "--type", "Q8_0"],
        "config.json",
    );
    let (code, help, _) = mnemo(&["quantize", "--help"]);
    assert_eq!(code, 0);
    for w in [
        "Hugging Face",
        "convert_hf_to_gguf.py",
        "--tokenizer-pre",
        "Qwen3ForCausalLM",
    ] {
        assert!(help.contains(w), "--help lacks {w}");
    }
}
