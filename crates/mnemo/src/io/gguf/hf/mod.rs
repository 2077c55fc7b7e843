//! A Hugging Face directory (config.json, `model.safetensors` or shards with
//! `model.safetensors.index.json`, tokenizer.json, tokenizer_config.json; f32/f16/bf16
//! weights) written as a GGUF file, as llama.cpp's `convert_hf_to_gguf.py` writes it
//! ([`convert_hf`], `mnemo quantize DIR OUT --type F32|F16|BF16`) or as that conversion
//! followed by `llama-quantize` into a mix ([`quantize_hf`], `--type Q4_K_M` etc.).
//!
//! Architectures (config.json `architectures[0]`): `LlamaForCausalLM` → `llama` (q/k rows
//! permuted for llama.cpp's rotary layout: per head, row `j·d/2 + i` moves to `2i + j`;
//! tied embeddings give no `output.weight`), `Qwen2ForCausalLM` → `qwen2` (q/k/v biases),
//! `Qwen3ForCausalLM` → `qwen3` (q/k norms). Tensor names: `model.embed_tokens` →
//! `token_embd`, `model.norm` → `output_norm`, `lm_head` → `output`, per layer `N`:
//! `input_layernorm` → `blk.N.attn_norm`, `self_attn.{q,k,v,o}_proj` →
//! `attn_{q,k,v,output}`, `self_attn.{q,k}_norm` → `attn_{q,k}_norm`,
//! `post_attention_layernorm` → `ffn_norm`, `mlp.{gate,up,down}_proj` → `ffn_{gate,up,down}`.
//!
//! Tensor order (the plain conversion): shards in name order, tensors by name within each, as
//! convert_hf_to_gguf.py reads them. Types: 1-D tensors, `*_norm.weight` and names not
//! ending in `.weight` F32, the rest the output type (f16 / bf16 rounded to nearest even).
//! Metadata: [`meta`] and [`vocab`], in convert_hf_to_gguf.py's order.
//!
//! For a mix the intermediate is the conversion to the source's own dtype (that of the first
//! 2-D tensor: bf16 → BF16, f16 → F16, f32 → F32; lossless — convert_hf_to_gguf.py's
//! `--outtype auto` would take f32 to F16), then [`super::quantize`]'s plan and quantisers:
//! `general.file_type` and `general.quantization_version` moved to the end, tensors in
//! llama.cpp's order. Streaming: one tensor in f32 at a time.

mod meta;
mod pre_hashes;
pub mod sha256;
mod vocab;

use super::mix::{llama_order, Mix, ModelFacts, Planner};
use super::type_name;
use super::write::{GgufOut, OutTensor};
use crate::io::safetensors::Dtype;
use crate::io::shards::Shards;
use crate::kernels::quantize::{block_geometry, quantize_rows, writable_types};
use anyhow::{bail, Context, Result};
pub use meta::Kv;
use serde_json::Value;
use std::path::{Path, PathBuf};
pub use vocab::chkhsh;

/// The architectures read, as (config.json `architectures[0]`, GGUF architecture).
pub const ARCHS: [(&str, &str); 3] = [
    ("LlamaForCausalLM", "llama"),
    ("Qwen2ForCausalLM", "qwen2"),
    ("Qwen3ForCausalLM", "qwen3"),
];

/// One tensor to write: its Hugging Face and GGUF names, shape (outermost first) and, for
/// Llama's q/k, the head count of the row permutation.
struct HfTensor {
    hf: String,
    name: String,
    shape: Vec<usize>,
    permute: Option<usize>,
}

/// An opened Hugging Face directory.
pub struct HfModel {
    dir: PathBuf,
    config: Value,
    arch: &'static str,
    shards: Shards,
    tensors: Vec<HfTensor>,
    /// ggml type of the source weights (0 F32, 1 F16, 30 BF16).
    pub src_type: u32,
    pre_override: Option<String>,
}

fn map_name(hf: &str) -> Option<String> {
    let (stem, suffix) = if let Some(s) = hf.strip_suffix(".weight") {
        (s, "weight")
    } else {
        (hf.strip_suffix(".bias")?, "bias")
    };
    let base = match stem {
        "model.embed_tokens" => "token_embd".to_string(),
        "model.norm" => "output_norm".to_string(),
        "lm_head" => "output".to_string(),
        _ => {
            let rest = stem.strip_prefix("model.layers.")?;
            let (n, part) = rest.split_once('.')?;
            let n: usize = n.parse().ok()?;
            let g = match part {
                "input_layernorm" => "attn_norm",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "self_attn.q_norm" => "attn_q_norm",
                "self_attn.k_norm" => "attn_k_norm",
                "post_attention_layernorm" => "ffn_norm",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                _ => return None,
            };
            format!("blk.{n}.{g}")
        }
    };
    Some(format!("{base}.{suffix}"))
}

fn ggml_of(d: Dtype) -> Option<u32> {
    match d {
        Dtype::F32 => Some(0),
        Dtype::F16 => Some(1),
        Dtype::BF16 => Some(30),
        _ => None,
    }
}

impl HfModel {
    /// Open `dir`: parse config.json, index the safetensors, map every tensor's name.
    /// `pre_override`: the `tokenizer.ggml.pre` to use when the tokenizer's check hash is
    /// not in convert_hf_to_gguf.py's table.
    pub fn open(dir: &Path, pre_override: Option<&str>) -> Result<HfModel> {
        let cp = dir.join("config.json");
        let text = std::fs::read_to_string(&cp).with_context(|| {
            format!(
                "{}: no config.json (not a Hugging Face model directory?)",
                dir.display()
            )
        })?;
        let mut config: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", cp.display()))?;
        if let Some(tc) = config
            .get("text_config")
            .and_then(Value::as_object)
            .cloned()
        {
            for (k, v) in tc {
                config[k] = v;
            }
        }
        let supported = || ARCHS.iter().map(|a| a.0).collect::<Vec<_>>().join(", ");
        let hf_arch = config["architectures"][0].as_str().with_context(|| {
            format!(
                "{}: `architectures` is missing (supported: {})",
                cp.display(),
                supported()
            )
        })?;
        let Some(&(_, arch)) = ARCHS.iter().find(|a| a.0 == hf_arch) else {
            bail!(
                "{}: architecture {hf_arch} is not supported (supported: {})",
                cp.display(),
                supported()
            );
        };
        let need = |k: &str| {
            config
                .get(k)
                .and_then(Value::as_u64)
                .with_context(|| format!("{}: `{k}` is missing or not a number", cp.display()))
        };
        let n_head = need("num_attention_heads")? as usize;
        let n_kv = config
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .unwrap_or(n_head);
        need("hidden_size")?;
        need("num_hidden_layers")?;
        need("vocab_size")?;
        let shards = Shards::open(dir)?;
        // convert_hf_to_gguf.py's order: files by name, tensors by name within each.
        let mut names = shards.names();
        let file_of = |n: &str| -> Result<String> {
            Ok(shards
                .file(n)?
                .path()
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default())
        };
        let mut keyed = Vec::with_capacity(names.len());
        for n in names.drain(..) {
            keyed.push((file_of(&n)?, n));
        }
        keyed.sort();
        let mut tensors = Vec::new();
        let mut src_type = None;
        for (_, hf) in keyed {
            if hf.ends_with(".rotary_emb.inv_freq")
                || hf.ends_with(".attention.masked_bias")
                || hf.ends_with(".attention.bias")
            {
                continue;
            }
            let Some(name) = map_name(&hf) else {
                bail!(
                    "{}: tensor `{hf}` has no GGUF name for {hf_arch}",
                    dir.display()
                );
            };
            let (raw, file) = shards.raw(&hf)?;
            let Some(ty) = ggml_of(raw.dtype) else {
                bail!(
                    "{}: tensor `{hf}` is {:?}; only F32, F16 and BF16 weights are read",
                    file.path().display(),
                    raw.dtype
                );
            };
            if raw.shape.len() >= 2 && src_type.is_none() {
                src_type = Some(ty);
            }
            let permute = if arch != "llama" {
                None
            } else if hf.ends_with("q_proj.weight") || hf.ends_with("q_proj.bias") {
                Some(n_head)
            } else if hf.ends_with("k_proj.weight") || hf.ends_with("k_proj.bias") {
                Some(n_kv)
            } else {
                None
            };
            tensors.push(HfTensor {
                hf,
                name,
                shape: raw.shape.to_vec(),
                permute,
            });
        }
        // Every tensor the architecture needs (the output head may be tied / absent).
        let n_layer = config["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
        let mut req: Vec<(String, String)> = vec![
            (
                "model.embed_tokens.weight".into(),
                "token_embd.weight".into(),
            ),
            ("model.norm.weight".into(), "output_norm.weight".into()),
        ];
        for l in 0..n_layer {
            let mut parts = vec![
                "input_layernorm.weight",
                "self_attn.q_proj.weight",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
                "self_attn.o_proj.weight",
                "post_attention_layernorm.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "mlp.down_proj.weight",
            ];
            match arch {
                "qwen2" => parts.extend([
                    "self_attn.q_proj.bias",
                    "self_attn.k_proj.bias",
                    "self_attn.v_proj.bias",
                ]),
                "qwen3" => parts.extend(["self_attn.q_norm.weight", "self_attn.k_norm.weight"]),
                _ => {}
            }
            for p in parts {
                let hf = format!("model.layers.{l}.{p}");
                let g = map_name(&hf).expect("known name");
                req.push((hf, g));
            }
        }
        for (hf, g) in req {
            if !tensors.iter().any(|t| t.name == g) {
                bail!(
                    "{}: tensor `{hf}` ({g}) is missing ({hf_arch}, {n_layer} layers)",
                    dir.display()
                );
            }
        }
        Ok(HfModel {
            dir: dir.to_path_buf(),
            config,
            arch,
            shards,
            tensors,
            src_type: src_type.unwrap_or(0),
            pre_override: pre_override.map(String::from),
        })
    }

    /// The GGUF type convert_hf_to_gguf.py writes tensor `t` in for output type `out`.
    fn out_type(t: &HfTensor, out: u32) -> u32 {
        if t.shape.len() <= 1 || t.name.ends_with("_norm.weight") || !t.name.ends_with(".weight") {
            0
        } else {
            out
        }
    }

    /// Tensor `t` in f32, Llama's q/k rows permuted.
    fn values(&self, t: &HfTensor) -> Result<Vec<f32>> {
        let x = self.shards.f32(&t.hf, None)?;
        let Some(nh) = t.permute else { return Ok(x) };
        let rows = t.shape[0];
        let cols = x.len() / rows.max(1);
        if !rows.is_multiple_of(2 * nh) {
            bail!(
                "{}: tensor `{}` has {rows} rows, not a multiple of 2 × {nh} heads",
                self.dir.display(),
                t.hf
            );
        }
        let hd = rows / nh;
        let half = hd / 2;
        let mut y = vec![0f32; x.len()];
        for h in 0..nh {
            for i in 0..half {
                for j in 0..2 {
                    let dst = (h * hd + i * 2 + j) * cols;
                    let src = (h * hd + j * half + i) * cols;
                    y[dst..dst + cols].copy_from_slice(&x[src..src + cols]);
                }
            }
        }
        Ok(y)
    }

    /// Tensor `t` encoded as `ty` (a type [`quantize_rows`] writes).
    fn encode(&self, t: &HfTensor, ty: u32) -> Result<Vec<u8>> {
        let x = self.values(t)?;
        let cols = *t.shape.last().unwrap_or(&1);
        quantize_rows(ty, &x, cols.max(1)).with_context(|| {
            format!(
                "{}: tensor `{}` (rows of {cols}): cannot write type {} (writable: {})",
                self.dir.display(),
                t.name,
                type_name(ty),
                writable_types().join(", ")
            )
        })
    }

    fn dims(t: &HfTensor) -> Vec<u64> {
        t.shape.iter().rev().map(|&d| d as u64).collect()
    }

    /// The metadata convert_hf_to_gguf.py writes with `general.file_type` = `ftype`.
    pub fn metadata(&self, ftype: u32) -> Result<Kv> {
        let mut kv = Kv::default();
        let h = &self.config;
        let cp = self.dir.join("config.json");
        kv.str("general.architecture", self.arch);
        kv.str("general.type", "model");
        let total: u64 = self
            .tensors
            .iter()
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum();
        meta::general(&mut kv, &self.dir, h, total);
        meta::hparams(&mut kv, self.arch, h, ftype, &cp)?;
        if self.arch == "llama" {
            kv.u32(
                "llama.vocab_size",
                h["vocab_size"].as_u64().unwrap_or(0) as u32,
            );
            let rope_dim = match h.get("head_dim").and_then(Value::as_u64) {
                Some(d) => d,
                None => {
                    h["hidden_size"].as_u64().unwrap_or(0)
                        / h["num_attention_heads"].as_u64().unwrap_or(1).max(1)
                }
            };
            kv.u32("llama.rope.dimension_count", rope_dim as u32);
        }
        kv.u32("general.quantization_version", 2);
        if self.arch == "llama" {
            let tc: Option<Value> = std::fs::read_to_string(self.dir.join("tokenizer_config.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
            if let Some(b) = tc
                .as_ref()
                .and_then(|t| t.get("add_prefix_space"))
                .and_then(Value::as_bool)
            {
                kv.bool("tokenizer.ggml.add_space_prefix", b);
            }
        }
        vocab::add_gpt2_vocab(&mut kv, &self.dir, h, self.pre_override.as_deref())?;
        if self.arch == "llama" && h["vocab_size"].as_u64() == Some(49152) {
            // convert_hf_to_gguf.py: "Apply to granite small models only" (also SmolLM2).
            kv.bool("tokenizer.ggml.add_bos_token", false);
        }
        Ok(kv)
    }
}

/// What [`convert_hf`] / [`quantize_hf`] wrote: per tensor `(name, type)` in file order, and
/// the file's size.
pub struct HfReport {
    pub tensors: Vec<(String, String)>,
    pub bytes: u64,
}

fn finish(out: GgufOut, output: &Path, tensors: Vec<(String, String)>) -> Result<HfReport> {
    out.finish()?;
    let bytes = std::fs::metadata(output)
        .with_context(|| format!("cannot stat {}", output.display()))?
        .len();
    Ok(HfReport { tensors, bytes })
}

/// convert_hf_to_gguf.py `--outtype f32|f16|bf16` (`out_type` 0, 1 or 30).
pub fn convert_hf(dir: &Path, output: &Path, out_type: u32, pre: Option<&str>) -> Result<HfReport> {
    let m = HfModel::open(dir, pre)?;
    let ftype = match out_type {
        0 => 0,
        1 => 1,
        30 => 32,
        t => bail!(
            "convert_hf: output type {} is not F32, F16 or BF16",
            type_name(t)
        ),
    };
    let kv = m.metadata(ftype)?;
    let mut infos = Vec::with_capacity(m.tensors.len());
    for t in &m.tensors {
        let ty = HfModel::out_type(t, out_type);
        let n: usize = t.shape.iter().product();
        let (_, be, bb) = block_geometry(ty).expect("float type");
        infos.push(OutTensor {
            name: t.name.clone(),
            dims: HfModel::dims(t),
            ggml_type: ty,
            bytes: n / be * bb,
        });
    }
    let mut out = GgufOut::create(output, &kv.0, infos, 32)?;
    let mut rep = Vec::new();
    for t in &m.tensors {
        let ty = HfModel::out_type(t, out_type);
        out.tensor_data(&m.encode(t, ty)?)?;
        rep.push((t.name.clone(), type_name(ty)));
    }
    finish(out, output, rep)
}

/// convert_hf_to_gguf.py to the source dtype, then `llama-quantize` into `mix`.
pub fn quantize_hf(dir: &Path, output: &Path, mix: Mix, pre: Option<&str>) -> Result<HfReport> {
    let m = HfModel::open(dir, pre)?;
    let cur = m.src_type;
    let ftype = match cur {
        0 => 0,
        1 => 1,
        _ => 32,
    };
    let mut kv = m.metadata(ftype)?;
    kv.remove("general.quantization_version");
    kv.remove("general.file_type");
    kv.u32("general.quantization_version", 2);
    kv.u32("general.file_type", mix.ftype);
    let h = &m.config;
    let n_head = h["num_attention_heads"].as_u64().unwrap_or(0) as usize;
    let n_kv = h["num_key_value_heads"]
        .as_u64()
        .map(|v| v as usize)
        .unwrap_or(n_head);
    let facts = ModelFacts {
        n_layer: h["num_hidden_layers"].as_u64().unwrap_or(0) as usize,
        n_gqa: n_head.checked_div(n_kv).unwrap_or(0),
        n_expert: 0,
    };
    let mut names: Vec<String> = m.tensors.iter().map(|t| t.name.clone()).collect();
    llama_order(&mut names);
    let mut planner = Planner::new(mix, facts, &names);
    let mut plan = Vec::with_capacity(names.len());
    let mut infos = Vec::with_capacity(names.len());
    for n in &names {
        let t = m
            .tensors
            .iter()
            .find(|t| &t.name == n)
            .expect("name from the list");
        let dims = HfModel::dims(t);
        let c = HfModel::out_type(t, cur);
        let ty = planner.choose(n, &dims, c)?;
        let count: usize = t.shape.iter().product();
        let (_, be, bb) = block_geometry(ty).with_context(|| {
            format!(
                "tensor `{n}`: type {} is not one mnemo writes",
                type_name(ty)
            )
        })?;
        infos.push(OutTensor {
            name: n.clone(),
            dims,
            ggml_type: ty,
            bytes: count / be * bb,
        });
        plan.push((t, ty));
    }
    let mut out = GgufOut::create(output, &kv.0, infos, 32)?;
    let mut rep = Vec::new();
    for (t, ty) in plan {
        out.tensor_data(&m.encode(t, ty)?)?;
        rep.push((t.name.clone(), type_name(ty)));
    }
    finish(out, output, rep)
}
