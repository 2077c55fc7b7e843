//! `mnemo::gguf::quantize` against llama.cpp's `llama-quantize` (`reference/gguf_quantize_fixture.py`):
//! for tiny llama / qwen2 / qwen3 / deepseek2 (Lite and V2 shapes) GGUFs and the
//! mixes Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K and Q8_0 (llama also Q3_K_S, Q3_K_L, Q4_K_S, Q5_K_S,
//! Q4_0, Q4_1, Q5_0, Q5_1), mnemo's output has the same tensors in
//! the same order with the same types (the mix policy, fallbacks included) and the same data
//! bytes (the quantisers), and the whole file is byte-identical (metadata copied, file type,
//! layout, alignment). Each output then loads in mnemo.
//!
//! The llama / qwen2 / qwen3 sources are quantised fixtures; their F32 inputs are rebuilt here
//! by mnemo (`--type F32 --allow-requantize`) and must equal llama.cpp's F32 files too, as must
//! the F16 and BF16 inputs made from llama's F32 (each then quantised to two mixes).

use mnemo::gguf::mix::Mix;
use mnemo::gguf::quantize::quantize_gguf;
use mnemo::gguf::Gguf;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fnv1a64(b: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &c in b {
        h = (h ^ c as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mnemo-gguf-quantize-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn file_fnv(p: &Path) -> String {
    fnv1a64(&std::fs::read(p).unwrap())
}

#[test]
fn mixes_match_llama_quantize() {
    let fx = fixtures();
    let want: Value = serde_json::from_str(
        &std::fs::read_to_string(fx.join("gguf_quantize/llamacpp.json")).unwrap(),
    )
    .unwrap();
    let d = tmpdir("mixes");
    let models = want["models"].as_object().unwrap();
    assert!(models.len() >= 7);
    for (name, m) in models {
        let src = fx.join(m["source"].as_str().unwrap());
        // The conversions that make the input (F32 from a quantised fixture, then F16/BF16).
        let mut input = src;
        for (i, ty) in m["chain"].as_array().unwrap().iter().enumerate() {
            let ty = ty.as_str().unwrap();
            let p = d.join(format!("{name}-{ty}.gguf"));
            quantize_gguf(&input, &p, Mix::parse(ty).unwrap(), i == 0).unwrap();
            input = p;
        }
        let f32_path = input;
        assert_eq!(
            file_fnv(&f32_path),
            m["input_fnv"].as_str().unwrap(),
            "{name}: input file"
        );
        for (mix, w) in m["mixes"].as_object().unwrap() {
            let out = d.join(format!("{name}-{mix}.gguf"));
            quantize_gguf(&f32_path, &out, Mix::parse(mix).unwrap(), false).unwrap();
            let g = Gguf::open(&out).unwrap();
            let wt = w["tensors"].as_array().unwrap();
            assert_eq!(g.tensors.len(), wt.len(), "{name} {mix}: tensor count");
            for (t, e) in g.tensors.iter().zip(wt) {
                let ctx = format!("{name} {mix} {}", t.name);
                assert_eq!(t.name, e["name"].as_str().unwrap(), "{ctx}: order");
                let ty = mnemo::kernels::quantize::block_geometry(t.ggml_type)
                    .map(|g| g.0.to_string())
                    .unwrap_or_else(|| format!("ggml type {}", t.ggml_type));
                assert_eq!(ty, e["type"].as_str().unwrap(), "{ctx}: type");
                let data = g.tensor_data(&t.name).unwrap();
                assert_eq!(fnv1a64(data), e["fnv"].as_str().unwrap(), "{ctx}: data");
            }
            assert_eq!(
                file_fnv(&out),
                w["file_fnv"].as_str().unwrap(),
                "{name} {mix}: file"
            );
            let l = mnemo::checkpoint::load_model(&out)
                .unwrap_or_else(|e| panic!("{name} {mix}: mnemo cannot load it: {e:#}"));
            assert!(l.model.params.iter().all(|v| v.is_finite()), "{name} {mix}");
        }
    }
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn quantised_input_needs_allow_requantize() {
    let src = fixtures().join("gguf_arch/llama-Q4_K_M.gguf");
    let d = tmpdir("requant");
    let out = d.join("x.gguf");
    let e = quantize_gguf(&src, &out, Mix::parse("Q8_0").unwrap(), false)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("already quantised") && e.contains("Q4_K_M") && e.contains("--allow-requantize"),
        "{e}"
    );
    assert!(!out.exists());
    // The same mix as the input: every tensor keeps its type and bytes, nothing to requantise.
    quantize_gguf(&src, &out, Mix::parse("Q4_K_M").unwrap(), false).unwrap();
    let (a, b) = (Gguf::open(&src).unwrap(), Gguf::open(&out).unwrap());
    for t in &a.tensors {
        assert_eq!(
            a.tensor_data(&t.name).unwrap(),
            b.tensor_data(&t.name).unwrap(),
            "{}",
            t.name
        );
    }
    std::fs::remove_dir_all(&d).ok();
}
