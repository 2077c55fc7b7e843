//! Random-weight DeepSeek-V4 checkpoints in the official layout, written straight in packed
//! form (no f32 model in memory): for scale benchmarks with V4-Flash's real layer shapes
//! (`mnemo v4-scale write`, `scripts/v4-scale.sh`).
//!
//! [`flash_config`] is V4-Flash's `config.json` (`docs/deepseek-v4.md`; hidden 4096, 64 heads
//! × 512, q_lora 1024, o_lora 1024 in 8 groups, experts of width 2048, top-6 + 1 shared,
//! window 128, CSA 4 with index top-512, HCA 128, hc_mult 4, vocab 129280) with fewer layers
//! and experts. [`write_random`] stores every tensor as the release does
//! ([`super::v4_quantize::stored_as`], FP8 + FP4 experts), except the output head, which
//! it stores in FP8 (the release: BF16; mnemo would read it as f32, 2.1 GB a token).
//!
//! Values: FP8 codes uniform over the e4m3 bytes of magnitude ≤ 1.875 with a block scale of
//! about `1/√in`; FP4 codes uniform over all 16 e2m1 values with a per-32 scale of about
//! `1/(4√in)`; BF16/F32 matrices uniform with standard deviation 0.02; norm weights 1;
//! selection biases and attention sinks 0; hash tables uniform. Shards of at most
//! `shard_bytes`, each streamed to disk (`model-0000k-of-0000n.safetensors` + the index).

use super::hf_v4::config_from_hf;
use super::v4_official::{official_name, scale_name, FP4_BLOCK};
use super::v4_quantize::{stored_as, QuantMix, Stored};
use crate::model::{Ffn, ParamLayout};
use crate::rng::Rng;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;

/// V4-Flash's official `config.json` with `layers` layers (compress ratios cycling
/// CSA, HCA as the release's middle layers do; the first `hash_layers` layers hash-routed) and
/// `experts` routed experts.
pub fn flash_config(layers: usize, experts: usize, hash_layers: usize) -> Value {
    let ratios: Vec<usize> = (0..layers)
        .map(|l| if l % 2 == 0 { 4 } else { 128 })
        .collect();
    let mut v = json!({
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": 129280, "hidden_size": 4096, "moe_intermediate_size": 2048,
        "num_hidden_layers": layers, "num_attention_heads": 64, "num_key_value_heads": 1,
        "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_lora_rank": 1024,
        "o_groups": 8, "n_routed_experts": experts, "n_shared_experts": 1,
        "num_experts_per_tok": 6, "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc",
        "norm_topk_prob": true, "routed_scaling_factor": 1.5, "swiglu_limit": 10.0,
        "sliding_window": 128, "compress_ratios": ratios, "compress_rope_theta": 160000.0,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        "max_position_embeddings": 1048576, "index_n_heads": 64, "index_head_dim": 128,
        "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6
    });
    let rest = json!({
        "num_hash_layers": hash_layers, "num_nextn_predict_layers": 0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1,
        "hidden_act": "silu", "expert_dtype": "fp4", "torch_dtype": "bfloat16",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
            "quant_method": "fp8", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
    });
    if let (Some(a), Value::Object(b)) = (v.as_object_mut(), rest) {
        a.extend(b);
    }
    v
}

/// One stored tensor to generate: name, safetensors dtype string, shape, and how to fill it.
struct Spec {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    fill: Fill,
}

#[derive(Clone, Copy)]
enum Fill {
    Fp8Codes,
    Fp4Codes,
    Scale(u8),
    Bf16,
    F32(Option<f32>),
    Table { experts: u32 },
}

impl Spec {
    fn bytes(&self) -> usize {
        let n: usize = self.shape.iter().product();
        n * match self.dtype {
            "BF16" => 2,
            "F32" | "I32" => 4,
            _ => 1,
        }
    }
}

/// `2^-round(log2(x))` as an E8M0 byte.
fn e8m0_near(x: f64) -> u8 {
    (127.0 - x.log2().round()).clamp(1.0, 254.0) as u8
}

/// The stored tensors of `cfg_json`'s model, in layout order.
fn specs(cfg_json: &Value) -> Result<Vec<Spec>> {
    let cfg = config_from_hf(cfg_json)?;
    let layout = ParamLayout::new(&cfg);
    let mut out = Vec::new();
    for t in &layout.tensors {
        let hash_bias = layout
            .layers
            .iter()
            .any(|lo| matches!(lo.ffn, Ffn::Moe(mo) if mo.hash && mo.bias == t.offset));
        if hash_bias || crate::model::is_mtp_tensor(&t.name) {
            continue;
        }
        let name = official_name(&t.name);
        let mut st = stored_as(&name, QuantMix::Fp8Fp4);
        if name == "head.weight" {
            st = Stored::Fp8;
        }
        let shape = t.shape.clone();
        match (st, &shape[..]) {
            (Stored::Fp8, &[r, c]) => {
                let e = e8m0_near((c as f64).sqrt());
                out.push(Spec {
                    name: scale_name(&name),
                    dtype: "F8_E8M0",
                    shape: vec![r.div_ceil(128), c.div_ceil(128)],
                    fill: Fill::Scale(e),
                });
                out.push(Spec {
                    name,
                    dtype: "F8_E4M3",
                    shape,
                    fill: Fill::Fp8Codes,
                });
            }
            (Stored::Fp4, &[r, c]) => {
                let e = e8m0_near(4.0 * (c as f64).sqrt());
                out.push(Spec {
                    name: scale_name(&name),
                    dtype: "F8_E8M0",
                    shape: vec![r, c / FP4_BLOCK],
                    fill: Fill::Scale(e),
                });
                out.push(Spec {
                    name,
                    dtype: "I8",
                    shape: vec![r, c / 2],
                    fill: Fill::Fp4Codes,
                });
            }
            (Stored::Bf16, _) => out.push(Spec {
                name,
                dtype: "BF16",
                shape,
                fill: Fill::Bf16,
            }),
            _ => {
                let v = if name.ends_with("norm.weight") {
                    Some(1.0)
                } else if name.ends_with(".bias") || name.ends_with("attn_sink") {
                    Some(0.0)
                } else {
                    None
                };
                out.push(Spec {
                    name,
                    dtype: "F32",
                    shape,
                    fill: Fill::F32(v),
                })
            }
        }
    }
    for l in (0..cfg.n_layers).filter(|&l| cfg.is_hash(l)) {
        out.push(Spec {
            name: format!("layers.{l}.ffn.gate.tid2eid"),
            dtype: "I32",
            shape: vec![cfg.vocab_size, cfg.top_k],
            fill: Fill::Table {
                experts: cfg.n_routed_experts as u32,
            },
        });
    }
    Ok(out)
}

/// Fill `buf` (the bytes of one tensor, or a piece of it) as `fill` says.
fn fill(buf: &mut [u8], f: Fill, rng: &mut Rng, k: usize) {
    let mut word = || rng.next_u64();
    match f {
        Fill::Fp8Codes => {
            for c in buf.chunks_mut(8) {
                let w = word().to_le_bytes();
                for (b, r) in c.iter_mut().zip(w) {
                    *b = r & 0xbf; // sign and magnitude ≤ 0x3f (|v| ≤ 1.875)
                }
            }
        }
        Fill::Fp4Codes => {
            for c in buf.chunks_mut(8) {
                c.copy_from_slice(&word().to_le_bytes()[..c.len()]);
            }
        }
        Fill::Scale(e) => buf.fill(e),
        Fill::Bf16 | Fill::F32(None) => {
            let w = if matches!(f, Fill::Bf16) { 2 } else { 4 };
            for c in buf.chunks_mut(w) {
                let u = (word() >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                let x = (u * 2.0 - 1.0) * 0.02 * 3f32.sqrt();
                c.copy_from_slice(&x.to_le_bytes()[4 - w..]);
            }
        }
        Fill::F32(Some(v)) => {
            for c in buf.chunks_mut(4) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        Fill::Table { experts } => {
            // Row r routes to experts (7919·r + j) mod E, j < k: distinct, spread evenly.
            for (i, c) in buf.chunks_mut(4).enumerate() {
                let e = ((i / k) as u64 * 7919 + (i % k) as u64) % experts as u64;
                c.copy_from_slice(&(e as i32).to_le_bytes());
            }
        }
    }
}

/// Write the random checkpoint of `cfg_json` (e.g. [`flash_config`]) to `dir` (created; its
/// old shards replaced): `config.json`, the shards and the index. Returns the bytes of tensor
/// data written.
pub fn write_random(dir: &Path, cfg_json: &Value, shard_bytes: usize, seed: u64) -> Result<u64> {
    let specs = specs(cfg_json).context("the config")?;
    let k = cfg_json["num_experts_per_tok"].as_u64().unwrap_or(1) as usize;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Group into shards by size, in order.
    let mut shards: Vec<Vec<&Spec>> = vec![Vec::new()];
    let mut size = 0;
    for s in &specs {
        if size > 0 && size + s.bytes() > shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += s.bytes();
        shards.last_mut().expect("one").push(s);
    }
    let n = shards.len();
    let mut map = serde_json::Map::new();
    let mut rng = Rng::derived(seed, "v4-random");
    let mut total = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut off = 0usize;
        for s in shard {
            let b = s.bytes();
            header.insert(
                s.name.clone(),
                json!({"dtype": s.dtype, "shape": s.shape, "data_offsets": [off, off + b]}),
            );
            off += b;
            map.insert(s.name.clone(), file.clone().into());
        }
        let mut h = serde_json::to_vec(&Value::Object(header))?;
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let path = dir.join(&file);
        let tmp = dir.join(format!(".{file}.tmp"));
        let f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = std::io::BufWriter::with_capacity(8 << 20, f);
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(&h)?;
        let mut buf = Vec::new();
        for s in shard {
            let mut left = s.bytes();
            while left > 0 {
                let m = left.min(16 << 20);
                buf.resize(m, 0);
                fill(&mut buf, s.fill, &mut rng, k);
                w.write_all(&buf)?;
                left -= m;
            }
        }
        w.flush()
            .with_context(|| format!("writing {}", tmp.display()))?;
        drop(w);
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        total += off as u64;
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": Value::Object(map)});
    std::fs::write(
        dir.join(super::shards::INDEX_FILE),
        serde_json::to_string_pretty(&index)?,
    )?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(cfg_json)?,
    )?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::KvCache;

    #[test]
    fn a_random_checkpoint_loads_packed_decodes_and_fills_a_synthetic_cache() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/deepseek_v4_official/config.json");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
        let d = std::env::temp_dir().join(format!("mnemo-v4random-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let n = write_random(&d, &v, 100_000, 1).unwrap();
        let shards = std::fs::read_dir(&d)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().ends_with(".safetensors")
            })
            .count();
        assert!(shards > 1 && n > 100_000, "{shards} shards, {n} bytes");
        let m = crate::io::v4_packed::load_dir_packed(&d).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(m.packed_only);
        let c = &m.cfg;
        let n4 = m.quant.values().filter(|q| q.ty.is_packed_float()).count();
        assert!(n4 >= c.n_layers * c.n_routed_experts * 3);
        // Prefill and decode: finite logits.
        let ids: Vec<u32> = (0..40).map(|i| (i * 7 % c.vocab_size) as u32).collect();
        let mut real = KvCache::new(&m);
        let l = m.forward_cached(&ids, &mut real).unwrap();
        assert!(l.iter().all(|x| x.is_finite()));
        // A synthetic cache of 40 positions has the sizes the real prefill left, and decodes.
        let mut syn = KvCache::new(&m);
        syn.fill_synthetic(40, 3).unwrap();
        assert_eq!(syn.len(), 40);
        assert_eq!(syn.kv_bytes(), real.kv_bytes());
        assert_eq!(syn.index_key_bytes(), real.index_key_bytes());
        for t in [5u32, 9] {
            let a = m.forward_cached(&[t], &mut syn).unwrap();
            let b = m.forward_cached(&[t], &mut real).unwrap();
            assert!(a.iter().chain(&b).all(|x| x.is_finite()));
        }
        assert_eq!(syn.kv_bytes(), real.kv_bytes());
        assert!(syn.fill_synthetic(10, 0).is_err(), "only an empty cache");
        std::fs::remove_dir_all(&d).ok();
    }
}
