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
//! values), a cached prefill of the whole sequence, and a prefill of 16 followed by one-token
//! decoding (both on the latent cache with the absorbed projections), checked against
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
        for &id in &ids[n0..] {
            dec.extend(m.forward_cached(&[id], &mut cache).unwrap());
        }
        assert_eq!(dec.len(), t * v);
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
        report.push(line);
    }
    eprintln!("{}", report.join("\n"));
}
