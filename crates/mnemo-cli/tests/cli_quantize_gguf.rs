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
