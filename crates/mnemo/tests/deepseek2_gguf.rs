//! DeepSeek-V2 GGUF files (llama.cpp's `deepseek2`, `io::gguf::deepseek2`: multi-head latent
//! attention + DeepSeekMoE) against llama.cpp: `tests/fixtures/gguf_deepseek2/`
//! (`reference/gguf_deepseek2.py`) holds tiny random models of the two layouts the converter
//! writes — `lite` (V2-Lite: `attn_q`, split `attn_k_b`/`attn_v_b`, softmax routing, two shared
//! experts, YaRN with mscale) and `v2` (`attn_q_a`/`attn_q_b`, legacy `attn_kv_b`, sigmoid
//! routing with a selection bias, renormalised and scaled weights, group-limited routing) —
//! in F32 (llama.cpp run with an f32 KV cache) and quantised by llama.cpp's own quantizer
//! (`Q4_K_M`, `Q2_K`; llama.cpp's default f16 KV cache), with llama.cpp's logits at every
//! position.
//!
//! Every file runs through all three drivers: the full forward (decompressed keys and
//! values), a cached prefill of the whole sequence, and a prefill of 16 followed (through a
//! saved and reloaded prefix cache) by one-token decoding (both on the latent cache with the
//! absorbed projections), checked against
//! llama.cpp and against each other. Bounds (measured in parentheses, largest over drivers):
//!
//! - F32 files vs llama.cpp (f32 KV cache): per position max |Δ| ≤ 1e-4 of its largest
//!   |logit| (lite 9.8e-6, v2 9.0e-6), argmax 100%.
//! - Quantised files vs llama.cpp on the same weights dequantised to F32 (f32 KV cache): the
//!   same bound (Q4_K_M 1.5e-5, Q2_K 1.2e-5), argmax 100%: the loader reads every stored type
//!   as ggml dequantises it.
//! - Quantised files vs llama.cpp's own run of them (its activations quantised to Q8_K/Q8_0 in
//!   every product, f16 KV cache; mnemo computes in f32): median over positions of
//!   ‖Δ‖₂/‖ref‖₂ ≤ 0.08 (Q4_K_M 3.6e-2, Q2_K 4.3e-2), argmax ≥ 85% (92%, 92%).
//! - Full forward vs the cached drivers (the two MLA evaluation orders): max |Δ| ≤ 1e-5 of
//!   the largest |logit| (measured 1.5e-5 to 4.2e-5 absolute, logits up to ~11).

use mnemo::model::decode::BatchSeq;
use mnemo::model::{KvCache, Workspace};
use std::path::PathBuf;

fn fixture(f: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf_deepseek2")
        .join(f)
}

/// Max over positions of `max |Δ| / max |want|` (each position's own scale), and the share
/// of positions whose argmax agrees.
fn compare(got: &[f32], want: &[Vec<f64>]) -> (f64, f64) {
    let v = want[0].len();
    let (mut worst, mut agree) = (0.0f64, 0usize);
    for (g, w) in got.chunks(v).zip(want) {
        let d = g
            .iter()
            .zip(w)
            .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
        let top = w.iter().fold(0.0f64, |m, b| m.max(b.abs()));
        worst = worst.max(d / top);
        let am_g = (0..v).max_by(|&i, &j| g[i].total_cmp(&g[j])).unwrap();
        let am_w = (0..v).max_by(|&i, &j| w[i].total_cmp(&w[j])).unwrap();
        agree += usize::from(am_g == am_w);
    }
    (worst, agree as f64 / want.len() as f64)
}

struct Case {
    name: String,
    ids: Vec<u32>,
    logits: Vec<Vec<f64>>,
    /// Quantised files: llama.cpp on the same weights dequantised, in F32 (f32 KV cache).
    dequantized: Option<Vec<Vec<f64>>>,
}

const MODELS: [&str; 4] = ["lite-F32", "lite-Q4_K_M", "v2-F32", "v2-Q2_K"];

fn case(name: &str) -> Case {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{name}.json"))).unwrap())
            .unwrap();
    let rows = |v: &serde_json::Value| -> Vec<Vec<f64>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    };
    Case {
        name: format!("{name}.gguf"),
        ids: j["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect(),
        logits: rows(&j["logits"]),
        dequantized: j.get("logits_dequantized_f32_kv").map(rows),
    }
}

/// The median over positions of `‖Δ‖₂ / ‖want‖₂`.
fn median_rel(got: &[f32], want: &[Vec<f64>]) -> f64 {
    let v = want[0].len();
    let mut r: Vec<f64> = got
        .chunks(v)
        .zip(want)
        .map(|(g, w)| {
            let d: f64 = g.iter().zip(w).map(|(&a, &b)| (a as f64 - b).powi(2)).sum();
            let n: f64 = w.iter().map(|b| b * b).sum();
            (d / n).sqrt()
        })
        .collect();
    r.sort_by(f64::total_cmp);
    r[r.len() / 2]
}

#[test]
fn deepseek2_matches_llama_cpp_in_every_driver() {
    let mut report = Vec::new();
    for case in MODELS.map(case) {
        let path = fixture(&case.name);
        assert!(mnemo::io::gguf::deepseek2::is_deepseek2_file(&path));
        let l = mnemo::checkpoint::load_model(&path).unwrap_or_else(|e| panic!("{e:#}"));
        let m = &l.model;
        let c = &m.cfg;
        let mla = c.mla.as_ref().expect("an MLA model");
        let lite = case.name.starts_with("lite");
        assert_eq!(mla.q_lora_rank == 0, lite, "{}", case.name);
        assert_eq!(c.rope_scaling.is_some(), lite, "{}", case.name);
        assert_eq!(c.n_group, if lite { 0 } else { 2 }, "{}", case.name);
        let (ids, t, v) = (&case.ids, case.ids.len(), c.vocab_size);
        // Full forward: decompressed keys and values.
        let mut ws = Workspace::default();
        m.try_forward(ids, 1, t, &mut ws).unwrap();
        let full = ws.logits.clone();
        // Cached prefill of the whole sequence: latent cache, absorbed projections.
        let mut cache = KvCache::new(m);
        let mut seq = [BatchSeq {
            tokens: ids,
            cache: &mut cache,
            logits_from: 0,
        }];
        let pre = m.forward_batch(&mut seq).unwrap().pop().unwrap();
        // Prefill of the first 16, then one token at a time.
        let n0 = 16;
        let mut cache = KvCache::new(m);
        let mut seq = [BatchSeq {
            tokens: &ids[..n0],
            cache: &mut cache,
            logits_from: 0,
        }];
        let mut dec = m.forward_batch(&mut seq).unwrap().pop().unwrap();
        // Through a saved prefix cache (the latent rows round-trip).
        let saved = std::env::temp_dir().join(format!(
            "mnemo-ds2-prefix-{}-{}.safetensors",
            case.name,
            std::process::id()
        ));
        cache.save(&saved, m, &ids[..n0]).unwrap();
        let (mut cache, toks) = KvCache::load(&saved, m).unwrap();
        std::fs::remove_file(&saved).unwrap();
        assert_eq!(toks, ids[..n0]);
        for &id in &ids[n0..] {
            dec.extend(m.forward_cached(&[id], &mut cache).unwrap());
        }
        assert_eq!(dec.len(), t * v);
        // The cache holds the latent and the RoPE key per token and layer, nothing per head.
        assert_eq!(
            cache.kv_bytes(),
            t * c.n_layers * (mla.kv_lora_rank + c.rope_dim) * 4
        );
        let mut line = format!("{}:", case.name);
        for (what, got) in [("full", &full), ("prefill", &pre), ("decode", &dec)] {
            let (worst, agree) = compare(got, &case.logits);
            let med = median_rel(got, &case.logits);
            line += &format!(
                "\n  {what}: vs llama.cpp max {worst:.2e}, median {med:.2e}, argmax {:.0}%",
                100.0 * agree
            );
            let at = format!("{} {what}", case.name);
            match &case.dequantized {
                None => {
                    // F32 weights, f32 KV cache on both sides: the architecture alone.
                    assert!(worst <= 1e-4 && agree == 1.0, "{at}: {worst} {agree}");
                }
                Some(dq) => {
                    let (w2, a2) = compare(got, dq);
                    line += &format!(
                        "; vs llama.cpp on the dequantised weights max {w2:.2e}, argmax {:.0}%",
                        100.0 * a2
                    );
                    // The loader: the quantised weights as ggml dequantises them.
                    assert!(w2 <= 1e-4 && a2 == 1.0, "{at} (dequantised): {w2} {a2}");
                    // llama.cpp's own run adds its 8-bit activations and f16 KV cache.
                    assert!(
                        med <= 0.08 && agree >= 0.85,
                        "{at}: median {med} argmax {agree}"
                    );
                }
            }
        }
        // The two evaluation orders of MLA agree to float rounding.
        let d = full
            .iter()
            .zip(&dec)
            .chain(full.iter().zip(&pre))
            .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
        line += &format!("; full vs cached max |Δ| {d:.2e}");
        let top = full.iter().fold(0.0f32, |a, &b| a.max(b.abs()));
        assert!(
            d <= 1e-5 * top.max(1.0),
            "{}: full vs cached {d}",
            case.name
        );
        if case.name == "v2-F32.gguf" {
            // The fixture exercises group-limited routing: without it, llama.cpp disagrees.
            let mut m = l.model;
            m.cfg.n_group = 0;
            m.try_forward(ids, 1, t, &mut ws).unwrap();
            let (worst, _) = compare(&ws.logits, &case.logits);
            line += &format!("; without groups {worst:.2e}");
            assert!(worst > 1e-2, "groups make no difference ({worst})");
        }
        report.push(line);
    }
    eprintln!("{}", report.join("\n"));
}

/// A copy of fixture `src` with the first occurrence of `from` replaced by `to` (same length)
/// and, when given, the `u32` right after the metadata key `from` (past its type tag) set.
fn patched(src: &str, from: &str, to: &str, value: Option<u32>, tag: &str) -> PathBuf {
    assert_eq!(from.len(), to.len());
    let mut b = std::fs::read(fixture(src)).unwrap();
    let i = b
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("{from} not in {src}"));
    b[i..i + from.len()].copy_from_slice(to.as_bytes());
    if let Some(v) = value {
        let at = i + from.len() + 4; // the value type (u32), then the value
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    let p = std::env::temp_dir().join(format!("mnemo-ds2-{tag}-{}.gguf", std::process::id()));
    std::fs::write(&p, b).unwrap();
    p
}

fn load_err(p: &PathBuf) -> String {
    let e = match mnemo::io::gguf::deepseek2::load(p, 64) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => format!("{e:#}"),
    };
    std::fs::remove_file(p).unwrap();
    e
}

/// Bad files name what is wrong: a renamed tensor is listed as missing (with the split pair
/// that may stand in for `attn_kv_b`) and as unexpected; an unsupported gating function, a
/// missing metadata key and an unsupported RoPE scaling name the key and the value.
#[test]
fn bad_deepseek2_files_name_the_fault() {
    let p = patched(
        "lite-F32.gguf",
        "blk.1.attn_v_b",
        "blk.1.attn_v_x",
        None,
        "tensor",
    );
    let e = load_err(&p);
    assert!(
        e.contains("missing: blk.1.attn_v_b.weight (to go with blk.1.attn_k_b.weight)")
            && e.contains("unexpected: blk.1.attn_k_b.weight, blk.1.attn_v_x.weight"),
        "{e}"
    );
    let p = patched(
        "v2-F32.gguf",
        "blk.1.ffn_up_exps",
        "blk.1.ffn_up_expz",
        None,
        "exps",
    );
    let e = load_err(&p);
    assert!(
        e.contains("missing: blk.1.ffn_up_exps.weight") && e.contains("blk.1.ffn_up_expz.weight"),
        "{e}"
    );
    let key = "deepseek2.expert_gating_func";
    let p = patched("v2-F32.gguf", key, key, Some(4), "gating");
    let e = load_err(&p);
    assert!(
        e.contains("metadata `deepseek2.expert_gating_func` = 4 is not supported for deepseek2 (1 = softmax, 2 = sigmoid)"),
        "{e}"
    );
    let p = patched(
        "lite-F32.gguf",
        "deepseek2.attention.kv_lora_rank",
        "deepseek2.attention.kv_lora_rang",
        None,
        "meta",
    );
    let e = load_err(&p);
    assert!(
        e.contains("metadata `deepseek2.attention.kv_lora_rank` is missing"),
        "{e}"
    );
    let p = patched("lite-F32.gguf", "yarn", "linr", None, "rope");
    let e = load_err(&p);
    assert!(
        e.contains("`deepseek2.rope.scaling.type` = \"linr\" is not supported (none, yarn)"),
        "{e}"
    );
}

/// The quantised files loaded packed (`deepseek2::load_packed`: no f32 copy of the quantised
/// matrices, products on their blocks with 8-bit activations as llama.cpp computes them): the
/// full forward refuses the model, the cached drivers run it and come closer to llama.cpp's own
/// run than the f32 arithmetic on the dequantised weights does.
#[test]
fn packed_deepseek2_runs_on_its_quantised_blocks() {
    let mut report = Vec::new();
    for name in ["lite-Q4_K_M", "v2-Q2_K"] {
        let case = case(name);
        let path = fixture(&case.name);
        let (m, _) = mnemo::io::gguf::deepseek2::load_packed(&path, 64).unwrap();
        assert!(
            m.packed_only && m.quant.len() > 10,
            "{name}: {}",
            m.quant.len()
        );
        let (ids, t) = (&case.ids, case.ids.len());
        let mut ws = Workspace::default();
        assert!(m.try_forward(ids, 1, t, &mut ws).is_err());
        let n0 = 16;
        let mut cache = KvCache::new(&m);
        let mut seq = [BatchSeq {
            tokens: &ids[..n0],
            cache: &mut cache,
            logits_from: 0,
        }];
        let mut got = m.forward_batch(&mut seq).unwrap().pop().unwrap();
        for &id in &ids[n0..] {
            got.extend(m.forward_cached(&[id], &mut cache).unwrap());
        }
        let (f32m, _) = mnemo::io::gguf::deepseek2::load(&path, 64).unwrap();
        f32m.try_forward(ids, 1, t, &mut ws).unwrap();
        let (med, med_f32) = (
            median_rel(&got, &case.logits),
            median_rel(&ws.logits, &case.logits),
        );
        let (_, agree) = compare(&got, &case.logits);
        report.push(format!(
            "{name} packed: median {med:.2e} (f32 on the dequantised weights {med_f32:.2e}), argmax {:.0}%",
            100.0 * agree
        ));
        assert!(med < med_f32 && agree >= 0.85, "{}", report.last().unwrap());
    }
    eprintln!("{}", report.join("\n"));
}

/// The `deepseek-llm` and `deepseek-coder` pre-tokenizers (DeepSeek-V2(-Lite) and
/// Coder-V2(-Lite) files) against llama.cpp's own tokenizer test files
/// (`models/ggml-vocab-deepseek-{llm,coder}.gguf` with `.inp`/`.out`, not committed: 4 MB and
/// 1 MB). Ignored: run with `LLAMA_CPP_MODELS=/path/to/llama.cpp/models cargo test --release
/// -p mnemo --test deepseek2_gguf -- --ignored`.
#[test]
#[ignore]
fn deepseek_pre_tokenizers_match_llama_cpp() {
    let dir = PathBuf::from(
        std::env::var("LLAMA_CPP_MODELS").expect("LLAMA_CPP_MODELS: llama.cpp's models/ dir"),
    );
    for name in ["deepseek-llm", "deepseek-coder"] {
        let f = dir.join(format!("ggml-vocab-{name}.gguf"));
        let tok = mnemo::io::gguf::load_tokenizer(&f).unwrap_or_else(|e| panic!("{e:#}"));
        let read = |ext: &str| {
            std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.{ext}"))).unwrap()
        };
        let inp = read("inp");
        let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
        let out = read("out");
        let want: Vec<&str> = out.lines().collect();
        let mut ok = 0;
        for (text, w) in texts.iter().zip(&want) {
            let got = tok.encode(text).unwrap();
            let w: Vec<u32> = w.split_whitespace().map(|x| x.parse().unwrap()).collect();
            if got == w {
                ok += 1;
            } else {
                eprintln!("{name}: {text:?}: {got:?} vs llama.cpp {w:?}");
            }
        }
        eprintln!("{name}: {ok}/{} texts as llama.cpp", want.len());
        assert_eq!(ok, want.len(), "{name}");
    }
}
