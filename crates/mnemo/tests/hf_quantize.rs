//! `mnemo quantize HF_DIR OUT.gguf` (`mnemo::gguf::hf`) against llama.cpp's
//! `convert_hf_to_gguf.py` (+ `llama-quantize` for the mixes), `reference/hf_quantize_fixture.py`:
//! tiny LlamaForCausalLM (tied embeddings; bf16, and f32 in 3 shards), Qwen2ForCausalLM (q/k/v
//! biases, f32), Qwen3ForCausalLM (q/k norms, bf16) and a 576-wide Llama (f16: the k-quant
//! fallbacks) with SmolLM2's tokenizer cut to 1024 tokens, and a Qwen2 whose tokenizer has a
//! TemplateProcessing post-processor (BOS added, a pair template; its BF16 conversion). The committed directories hold
//! everything but the weights, which are regenerated here bit for bit (`weights` below is the
//! generator of the Python script) and written as safetensors in the same files. Every output
//! (F32, F16, BF16 conversions; Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K, Q8_0: 46 files) must have the SHA-256
//! of llama.cpp's file. Also: the tokenizer check hash equals the one transformers gives, and
//! bad inputs are refused with the file, field or tensor named.

use mnemo::gguf::hf::{chkhsh, convert_hf, quantize_hf, sha256::sha256_hex};
use mnemo::gguf::mix::Mix;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_quantize")
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mnemo-hfq-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fnv1a64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &c in s.as_bytes() {
        h = (h ^ c as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The Python generator's values (`ints`, `values`), exact in `dtype`.
fn weights(name: &str, n: usize, dtype: &str) -> Vec<f32> {
    let seed = fnv1a64(name);
    let norm = name.ends_with("norm.weight");
    (1..=n as u64)
        .map(|i| {
            let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let k = (z >> 40) as i64 - (1 << 23);
            let v = match (dtype, norm) {
                ("F32", true) => 1.0 + (k >> 8) as f64 * 2f64.powi(-18),
                ("F32", false) => k as f64 * 2f64.powi(-26),
                ("BF16", true) => 1.0 + (k >> 20) as f64 * 2f64.powi(-6),
                ("BF16", false) => (k >> 16) as f64 * 2f64.powi(-10),
                (_, true) => 1.0 + (k >> 16) as f64 * 2f64.powi(-10),
                (_, false) => (k >> 13) as f64 * 2f64.powi(-13),
            };
            v as f32
        })
        .collect()
}

/// Copy the committed directory `name` into `root/name` and write its safetensors.
fn build(root: &Path, name: &str) -> PathBuf {
    build_without(root, name, None)
}

/// [`build`], leaving out the tensor `skip` (from its file and the index).
fn build_without(root: &Path, name: &str, skip: Option<&str>) -> PathBuf {
    let src = fixtures().join(name);
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != "tensors.json" {
            std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
        }
    }
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tensors.json")).unwrap()).unwrap();
    for (file, ts) in m.as_object().unwrap() {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for t in ts.as_array().unwrap() {
            let (tn, dt) = (t[0].as_str().unwrap(), t[1].as_str().unwrap());
            if Some(tn) == skip {
                continue;
            }
            let shape: Vec<usize> = t[2]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            let v = weights(tn, shape.iter().product(), dt);
            let start = data.len();
            for x in v {
                match dt {
                    "F32" => data.extend_from_slice(&x.to_le_bytes()),
                    "BF16" => data.extend_from_slice(&((x.to_bits() >> 16) as u16).to_le_bytes()),
                    _ => data
                        .extend_from_slice(&mnemo::kernels::f16::f32_to_f16_bits(x).to_le_bytes()),
                }
            }
            header.insert(
                tn.into(),
                serde_json::json!({"dtype": dt, "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let mut h = serde_json::to_vec(&Value::Object(header)).unwrap();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        out.extend_from_slice(&data);
        std::fs::write(d.join(file), out).unwrap();
    }
    let idx = d.join("model.safetensors.index.json");
    if let (Some(skip), true) = (skip, idx.is_file()) {
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&idx).unwrap()).unwrap();
        v["weight_map"].as_object_mut().unwrap().remove(skip);
        std::fs::write(&idx, serde_json::to_string(&v).unwrap()).unwrap();
    }
    d
}

fn file_sha(p: &Path) -> String {
    sha256_hex(&std::fs::read(p).unwrap())
}

fn want() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("llamacpp.json")).unwrap())
        .unwrap()
}

#[test]
fn files_match_convert_hf_to_gguf_and_llama_quantize() {
    let w = want();
    let root = tmpdir("all");
    let models = w["models"].as_object().unwrap();
    assert_eq!(models.len(), 6);
    for (name, m) in models {
        let d = build(&root, name);
        for (ty, sha) in m["files"].as_object().unwrap() {
            let out = root.join(format!("{name}-{ty}.gguf"));
            let r = match ty.as_str() {
                "F32" => convert_hf(&d, &out, 0, Some("smollm")),
                "F16" => convert_hf(&d, &out, 1, Some("smollm")),
                "BF16" => convert_hf(&d, &out, 30, Some("smollm")),
                mix => quantize_hf(&d, &out, Mix::parse(mix).unwrap(), Some("smollm")),
            };
            r.unwrap_or_else(|e| panic!("{name} {ty}: {e:#}"));
            assert_eq!(&file_sha(&out), sha.as_str().unwrap(), "{name} {ty}: file");
            if ty == "Q4_K_M" {
                let l = mnemo::checkpoint::load_model(&out)
                    .unwrap_or_else(|e| panic!("{name} {ty}: mnemo cannot load it: {e:#}"));
                assert!(l.model.params.iter().all(|v| v.is_finite()));
            }
            std::fs::remove_file(&out).ok();
        }
    }
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn tokenizer_check_hash_and_unknown_tokenizer() {
    let w = want();
    let root = tmpdir("tok");
    let d = build(&root, "tiny-llama-bf16");
    assert_eq!(
        chkhsh(&d.join("tokenizer.json")).unwrap(),
        w["chkhsh_cut"].as_str().unwrap()
    );
    // Without --tokenizer-pre the cut vocabulary is refused, naming its hash.
    let e = quantize_hf(&d, &root.join("x.gguf"), Mix::parse("Q8_0").unwrap(), None)
        .err()
        .expect("refused");
    let e = format!("{e:#}");
    assert!(
        e.contains(w["chkhsh_cut"].as_str().unwrap()) && e.contains("--tokenizer-pre"),
        "{e}"
    );
    assert!(!root.join("x.gguf").exists());
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn bad_inputs_are_named() {
    let root = tmpdir("bad");
    let mix = Mix::parse("Q8_0").unwrap();
    let err = |d: &Path| {
        let e = quantize_hf(d, &root.join("x.gguf"), mix, Some("smollm"))
            .err()
            .expect("refused");
        format!("{e:#}")
    };
    let edit = |d: &Path, f: &dyn Fn(&mut Value)| {
        let p = d.join("config.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    };
    // A missing config field.
    let d = build(&root.join("a"), "tiny-qwen2-f32");
    edit(&d, &|v| {
        v.as_object_mut().unwrap().remove("num_attention_heads");
    });
    let e = err(&d);
    assert!(
        e.contains("num_attention_heads") && e.contains("config.json"),
        "{e}"
    );
    // An unknown architecture: named, with the supported ones.
    let d = build(&root.join("b"), "tiny-qwen2-f32");
    edit(&d, &|v| v["architectures"][0] = "GPTNeoXForCausalLM".into());
    let e = err(&d);
    assert!(
        e.contains("GPTNeoXForCausalLM") && e.contains("LlamaForCausalLM, Qwen2ForCausalLM"),
        "{e}"
    );
    // A missing tensor (left out of its shard and the index).
    let tname = "model.layers.1.mlp.up_proj.weight";
    let d = build_without(&root.join("c"), "tiny-llama-f32", Some(tname));
    let e = err(&d);
    assert!(e.contains(tname) && e.contains("missing"), "{e}");
    // A truncated shard: named.
    let d = build(&root.join("d"), "tiny-llama-f32");
    let st = d.join("model-00002-of-00003.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&st).unwrap();
    f.set_len(len - 100).unwrap();
    let e = err(&d);
    assert!(
        e.contains("model-00002-of-00003.safetensors") && e.contains("past the data's end"),
        "{e}"
    );
    // Not a Hugging Face directory.
    let e = err(&root);
    assert!(e.contains("config.json"), "{e}");
    std::fs::remove_dir_all(&root).ok();
}
