//! DeepSeek-V4 checkpoints as transformers writes them (`DeepseekV4ForCausalLM.save_pretrained`:
//! `config.json` with `model_type: deepseek_v4`, safetensors in its saved names), read into a
//! mnemo model (`docs/deepseek-v4-equations.md` §1–2).
//!
//! - [`config_from_hf`]: `DeepseekV4Config` → [`ModelConfig`], folding the official legacy keys
//!   (`compress_ratios`, `num_hash_layers`, `qk_rope_head_dim`, flat `rope_scaling`) as
//!   transformers does.
//! - [`hf_name`]: a mnemo tensor name → its key in transformers' files.
//! - [`load_dir`]: both together; missing or unexpected tensors are listed.
//! - [`export`]: a mnemo DeepSeek-V4 model as such a directory (what `from_pretrained` loads),
//!   without its MTP blocks (transformers has none; `num_nextn_predict_layers` is written).

use super::safetensors::{serialize_mixed, Data};
use super::shards::Shards;
use crate::config::{FfnKind, ModelConfig, Residual, ScoreFunc, V4Config, V4LayerType, V4Yarn};
use crate::model::{Ffn, Model};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// Whether `dir` holds a transformers DeepSeek-V4 checkpoint.
pub fn is_v4_dir(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .is_some_and(|v| v["model_type"] == "deepseek_v4")
}

fn usize_of(v: &Value, k: &str) -> Result<Option<usize>> {
    match &v[k] {
        Value::Null => Ok(None),
        x => x
            .as_u64()
            .map(|u| Some(u as usize))
            .with_context(|| format!("config.json: `{k}` must be a non-negative integer, not {x}")),
    }
}

fn f64_of(v: &Value, k: &str) -> Result<Option<f64>> {
    match &v[k] {
        Value::Null => Ok(None),
        x => x
            .as_f64()
            .map(Some)
            .with_context(|| format!("config.json: `{k}` must be a number, not {x}")),
    }
}

fn req(v: &Value, k: &str, default: usize) -> Result<usize> {
    Ok(usize_of(v, k)?.unwrap_or(default))
}

/// transformers' `DeepseekV4Config` (its defaults, its legacy keys) as a mnemo config.
pub fn config_from_hf(v: &Value) -> Result<ModelConfig> {
    if v["model_type"] != "deepseek_v4" {
        bail!(
            "config.json: model_type is {}, expected \"deepseek_v4\"",
            v["model_type"]
        );
    }
    let l = req(v, "num_hidden_layers", 43)?;
    let d = req(v, "head_dim", 512)?;
    let d_model = req(v, "hidden_size", 4096)?;
    // MTP blocks (transformers' default 1; it instantiates none, `load_dir` drops them when
    // the weights have none).
    let mtp = req(v, "num_nextn_predict_layers", 1)?;
    // Layer types: explicit > legacy compress_ratios > the default pattern; then one per MTP
    // block (the legacy list's tail, else sliding as in the released models).
    let mut layer_types: Vec<V4LayerType> = match (&v["layer_types"], &v["compress_ratios"]) {
        (Value::Array(a), _) => a
            .iter()
            .enumerate()
            .map(|(i, x)| match x.as_str() {
                Some("sliding_attention") => Ok(V4LayerType::SlidingAttention),
                Some("compressed_sparse_attention") => Ok(V4LayerType::CompressedSparseAttention),
                Some("heavily_compressed_attention") => {
                    Ok(V4LayerType::HeavilyCompressedAttention)
                }
                _ => bail!("config.json: layer_types[{i}] = {x} is not a DeepSeek-V4 layer type (sliding_attention, compressed_sparse_attention, heavily_compressed_attention)"),
            })
            .collect::<Result<_>>()?,
        (_, Value::Array(a)) => a
            .iter()
            .take(l + mtp)
            .enumerate()
            .map(|(i, x)| match x.as_u64() {
                Some(0) => Ok(V4LayerType::SlidingAttention),
                Some(4) => Ok(V4LayerType::CompressedSparseAttention),
                Some(128) => Ok(V4LayerType::HeavilyCompressedAttention),
                _ => bail!("config.json: compress_ratios[{i}] = {x} (layer {i}) is not supported: transformers takes 0 (sliding), 4 (CSA) or 128 (HCA); other ratios go in compress_rates"),
            })
            .collect::<Result<_>>()?,
        _ => (0..l)
            .map(|i| {
                if i < 2 || i % 2 == 0 {
                    V4LayerType::HeavilyCompressedAttention
                } else {
                    V4LayerType::CompressedSparseAttention
                }
            })
            .collect(),
    };
    if layer_types.len() < l || layer_types.len() > l + mtp {
        bail!(
            "config.json: {} layer types for num_hidden_layers = {l}",
            layer_types.len()
        );
    }
    layer_types.resize(l + mtp, V4LayerType::SlidingAttention);
    let rates = &v["compress_rates"];
    let csa = usize_of(rates, "compressed_sparse_attention")?
        .or(usize_of(v, "compress_rate_csa")?)
        .unwrap_or(4);
    let hca = usize_of(rates, "heavily_compressed_attention")?
        .or(usize_of(v, "compress_rate_hca")?)
        .unwrap_or(128);
    // Hash layers: explicit mlp_layer_types > legacy num_hash_layers > 3.
    let n_hash = match &v["mlp_layer_types"] {
        Value::Array(a) => {
            let n = a
                .iter()
                .take_while(|x| x.as_str() == Some("hash_moe"))
                .count();
            if let Some((i, x)) = a
                .iter()
                .enumerate()
                .skip(n)
                .find(|(_, x)| x.as_str() != Some("moe"))
            {
                bail!("config.json: mlp_layer_types[{i}] = {x}: mnemo supports hash_moe layers first, then moe");
            }
            n
        }
        _ => usize_of(v, "num_hash_layers")?.unwrap_or(3).min(l),
    };
    // Rotary channels.
    let r = match (
        f64_of(v, "partial_rotary_factor")?,
        usize_of(v, "qk_rope_head_dim")?,
    ) {
        (Some(p), _) => (d as f64 * p) as usize,
        (None, Some(r)) => r,
        (None, None) => 64.min(d),
    };
    let rope_theta = f64_of(v, "rope_theta")?.unwrap_or(10000.0);
    let compress_theta = f64_of(v, "compress_rope_theta")?.unwrap_or(160000.0);
    let max_pos = req(v, "max_position_embeddings", 1 << 20)?;
    let (theta_c, yarn) = compress_rope(v, rope_theta, compress_theta, d, r, max_pos)?;
    let score = match v["scoring_func"].as_str().unwrap_or("sqrtsoftplus") {
        "sqrtsoftplus" => ScoreFunc::Sqrtsoftplus,
        "sigmoid" => ScoreFunc::Sigmoid,
        s => bail!("config.json: scoring_func {s:?} is not supported (sqrtsoftplus, sigmoid)"),
    };
    let inter = usize_of(v, "moe_intermediate_size")?
        .or(usize_of(v, "intermediate_size")?)
        .unwrap_or(2048);
    let cfg = ModelConfig {
        vocab_size: req(v, "vocab_size", 129280)?,
        d_model,
        n_layers: l,
        n_heads: req(v, "num_attention_heads", 64)?,
        n_kv_heads: 1,
        head_dim: d,
        rope_theta,
        rope_dim: 0,
        ffn_hidden: inter,
        tied_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
        norm_eps: f64_of(v, "rms_norm_eps")?.unwrap_or(1e-6) as f32,
        max_seq_len: max_pos,
        ffn: FfnKind::Moe,
        n_dense_layers: 0,
        n_shared_experts: 1,
        n_routed_experts: usize_of(v, "n_routed_experts")?
            .or(usize_of(v, "num_local_experts")?)
            .unwrap_or(256),
        moe_inter: inter,
        top_k: req(v, "num_experts_per_tok", 6)?,
        score_func: score,
        routed_scaling_factor: f64_of(v, "routed_scaling_factor")?.unwrap_or(1.5) as f32,
        norm_topk_prob: true,
        num_hash_layers: n_hash,
        residual: Residual::Mhc,
        hc_mult: req(v, "hc_mult", 4)?,
        hc_sinkhorn_iters: req(v, "hc_sinkhorn_iters", 20)?,
        hc_eps: f64_of(v, "hc_eps")?.unwrap_or(1e-6) as f32,
        swiglu_limit: f64_of(v, "swiglu_limit")?.unwrap_or(10.0) as f32,
        v4: Some(V4Config {
            q_lora_rank: req(v, "q_lora_rank", 1024)?,
            o_lora_rank: req(v, "o_lora_rank", 1024)?,
            o_groups: req(v, "o_groups", 8)?,
            sliding_window: req(v, "sliding_window", 128)?,
            layer_types,
            compress_rate_csa: csa,
            compress_rate_hca: hca,
            index_n_heads: req(v, "index_n_heads", 64)?,
            index_head_dim: req(v, "index_head_dim", 128)?,
            index_topk: req(v, "index_topk", 512)?,
            qk_rope_head_dim: r,
            compress_rope_theta: theta_c,
            compress_rope_scaling: yarn,
            num_nextn_predict_layers: mtp,
        }),
        ..ModelConfig::dense_defaults()
    };
    cfg.validate().context("config.json")?;
    Ok(cfg)
}

/// θ and YaRN of the compressed layers' rope (§1.4): nested `rope_parameters.compress` as
/// given (no injected attention factor, θ defaulting to `rope_theta`), or a legacy flat
/// `rope_scaling` (attention factor 1, θ = `compress_rope_theta`), or none.
fn compress_rope(
    v: &Value,
    rope_theta: f64,
    compress_theta: f64,
    d: usize,
    r: usize,
    max_pos: usize,
) -> Result<(f64, Option<V4Yarn>)> {
    let rp = &v["rope_parameters"];
    let (set, legacy) = if rp["compress"].is_object() {
        (&rp["compress"], false)
    } else if v["rope_scaling"].is_object() {
        (&v["rope_scaling"], true)
    } else if rp.is_object() && rp.get("rope_type").is_some() {
        (rp, true)
    } else {
        return Ok((compress_theta, None));
    };
    let theta = if legacy {
        compress_theta
    } else {
        f64_of(set, "rope_theta")?.unwrap_or(rope_theta)
    };
    if !legacy {
        let p = f64_of(set, "partial_rotary_factor")?.unwrap_or(1.0);
        if (d as f64 * p) as usize != r {
            bail!("config.json: rope_parameters.compress rotates {} channels but the attention rotates {r} (qk_rope_head_dim): mnemo needs them equal", (d as f64 * p) as usize);
        }
    }
    let ty = set["rope_type"]
        .as_str()
        .or(set["type"].as_str())
        .unwrap_or("default");
    match ty {
        "default" => Ok((theta, None)),
        "yarn" => {
            let f = f64_of(set, "factor")?.context("config.json: YaRN rope without a factor")?;
            let l0 = usize_of(set, "original_max_position_embeddings")?
                .unwrap_or((max_pos as f64 / f) as usize);
            let af = match (legacy, f64_of(set, "attention_factor")?) {
                (_, Some(a)) => a,
                (true, None) => 1.0,
                (false, None) if f > 1.0 => 0.1 * f.ln() + 1.0,
                (false, None) => 1.0,
            };
            Ok((
                theta,
                Some(V4Yarn {
                    factor: f,
                    original_max_position_embeddings: l0,
                    beta_fast: f64_of(set, "beta_fast")?.unwrap_or(32.0),
                    beta_slow: f64_of(set, "beta_slow")?.unwrap_or(1.0),
                    attention_factor: af,
                }),
            ))
        }
        t => bail!("config.json: rope_type {t:?} of the compressed layers is not supported (default, yarn)"),
    }
}

/// The key transformers' `save_pretrained` writes for the mnemo tensor `ours` (§2).
pub fn hf_name(ours: &str) -> String {
    match ours {
        "tok_embeddings.weight" => return "model.embed_tokens.weight".into(),
        "output.weight" => return "head.weight".into(),
        "norm.weight" => return "model.norm.weight".into(),
        _ => {}
    }
    if let Some(rest) = ours.strip_prefix("hc_head.") {
        return format!("model.hc_head.hc_{rest}");
    }
    let Some(rest) = ours.strip_prefix("layers.") else {
        return ours.to_string();
    };
    let (i, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let tail = match tail {
        "attention_norm.weight" => "attn_norm.weight".to_string(),
        "attn.kv_norm.weight" => "attn.norm.weight".to_string(),
        _ => {
            if let Some(s) = tail.strip_prefix("attn_hc.") {
                format!("hc_attn_{s}")
            } else if let Some(s) = tail.strip_prefix("ffn_hc.") {
                format!("hc_ffn_{s}")
            } else {
                tail.to_string()
            }
        }
    };
    format!("model.layers.{i}.{tail}")
}

/// Load a transformers DeepSeek-V4 directory (`config.json` + `model.safetensors`, or shards
/// with `model.safetensors.index.json`).
pub fn load_dir(dir: &Path) -> Result<Model> {
    let cpath = dir.join("config.json");
    let text =
        std::fs::read_to_string(&cpath).with_context(|| format!("reading {}", cpath.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", cpath.display()))?;
    let mut cfg = config_from_hf(&v).with_context(|| format!("{}", cpath.display()))?;
    let f = Shards::open(dir)?;
    let names: std::collections::HashSet<String> = f.names().into_iter().collect();
    // transformers keeps no MTP block (it drops `mtp.*` on load and never saves one): a
    // directory without `mtp.*` tensors is the model without its MTP blocks, whatever
    // `num_nextn_predict_layers` says. With them, they load by their official names.
    if !names.iter().any(|k| k.starts_with("mtp.")) {
        cfg = cfg.without_mtp();
    }
    let mut model = Model::new(cfg).context("the DeepSeek-V4 config")?;
    let mut used = std::collections::HashSet::new();
    let mut missing = Vec::new();
    for spec in model.layout.tensors.clone() {
        let key = hf_name(&spec.name);
        let hash_bias = model
            .layout
            .layers
            .iter()
            .any(|lo| matches!(lo.ffn, Ffn::Moe(mo) if mo.hash && mo.bias == spec.offset));
        if !names.contains(&key) {
            if hash_bias {
                continue; // hash layers select by table: no correction bias (zeros)
            }
            missing.push(key);
            continue;
        }
        let data = f.f32(&key, Some(&spec.shape))?;
        model.params[spec.range()].copy_from_slice(&data);
        used.insert(key);
    }
    let c = model.cfg.clone();
    for l in 0..c.n_layers {
        if c.is_hash(l) {
            let key = format!("model.layers.{l}.ffn.gate.tid2eid");
            if !names.contains(&key) {
                missing.push(key);
                continue;
            }
            let tab = f.u32_shaped(&key, Some(&[c.vocab_size, c.top_k]))?;
            if let Some(bad) = tab.iter().find(|&&e| e as usize >= c.n_routed_experts) {
                bail!(
                    "{}: `{key}` routes to expert {bad} of {}",
                    f.file(&key)?.path().display(),
                    c.n_routed_experts
                );
            }
            model.hash_tables[l] = Some(tab);
            used.insert(key);
        }
    }
    let mut extra: Vec<String> = names
        .into_iter()
        .filter(|k| !used.contains(k) && !k.contains("rotary_emb"))
        // Tied embeddings: a head saved anyway is the embedding.
        .filter(|k| !(c.tied_embeddings && k == "head.weight"))
        .collect();
    extra.sort();
    if !missing.is_empty() || !extra.is_empty() {
        bail!(
            "{}: the tensors do not match the config\n  missing: {}\n  unexpected: {}",
            f.describe(),
            if missing.is_empty() {
                "none".into()
            } else {
                missing.join(", ")
            },
            if extra.is_empty() {
                "none".into()
            } else {
                extra.join(", ")
            }
        );
    }
    Ok(model)
}

/// The `config.json` of `c` as transformers' `DeepseekV4Config` writes it (modern keys).
pub fn config_to_hf(c: &ModelConfig) -> Result<Value> {
    let v =
        c.v4.as_ref()
            .context("not a DeepSeek-V4 model (no `v4` section in its config)")?;
    let name = |t: &V4LayerType| match t {
        V4LayerType::SlidingAttention => "sliding_attention",
        V4LayerType::CompressedSparseAttention => "compressed_sparse_attention",
        V4LayerType::HeavilyCompressedAttention => "heavily_compressed_attention",
    };
    let prf = v.qk_rope_head_dim as f64 / c.head_dim as f64;
    let mut compress = serde_json::json!({
        "rope_type": "default",
        "rope_theta": v.compress_rope_theta,
        "partial_rotary_factor": prf,
    });
    if let Some(y) = &v.compress_rope_scaling {
        compress["rope_type"] = "yarn".into();
        compress["factor"] = y.factor.into();
        compress["original_max_position_embeddings"] = y.original_max_position_embeddings.into();
        compress["beta_fast"] = y.beta_fast.into();
        compress["beta_slow"] = y.beta_slow.into();
        compress["attention_factor"] = y.attention_factor.into();
    }
    let score = match c.score_func {
        ScoreFunc::Sqrtsoftplus => "sqrtsoftplus",
        ScoreFunc::Sigmoid => "sigmoid",
        ScoreFunc::Softmax => bail!("DeepSeek-V4 has no softmax router (score_func)"),
    };
    Ok(serde_json::json!({
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "dtype": "float32",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": 1,
        "head_dim": c.head_dim,
        "q_lora_rank": v.q_lora_rank,
        "o_lora_rank": v.o_lora_rank,
        "o_groups": v.o_groups,
        "moe_intermediate_size": c.moe_inter,
        "n_routed_experts": c.n_routed_experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": c.top_k,
        "scoring_func": score,
        "norm_topk_prob": true,
        "routed_scaling_factor": c.routed_scaling_factor,
        "swiglu_limit": c.swiglu_limit,
        "rms_norm_eps": c.norm_eps,
        "hc_mult": c.hc_mult,
        "hc_sinkhorn_iters": c.hc_sinkhorn_iters,
        "hc_eps": c.hc_eps,
        "sliding_window": v.sliding_window,
        "layer_types": v.layer_types[..c.n_layers].iter().map(name).collect::<Vec<_>>(),
        "compress_rates": {
            "compressed_sparse_attention": v.compress_rate_csa,
            "heavily_compressed_attention": v.compress_rate_hca,
        },
        "mlp_layer_types": (0..c.n_layers)
            .map(|l| if c.is_hash(l) { "hash_moe" } else { "moe" })
            .collect::<Vec<_>>(),
        "index_n_heads": v.index_n_heads,
        "index_head_dim": v.index_head_dim,
        "index_topk": v.index_topk,
        "partial_rotary_factor": prf,
        "rope_theta": c.rope_theta,
        "compress_rope_theta": v.compress_rope_theta,
        "rope_parameters": {
            "main": {"rope_type": "default", "rope_theta": c.rope_theta, "partial_rotary_factor": prf},
            "compress": compress,
        },
        "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tied_embeddings,
        "num_nextn_predict_layers": v.num_nextn_predict_layers,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
    }))
}

/// Write `model` as a transformers DeepSeek-V4 directory: `config.json` and
/// `model.safetensors` in the names `save_pretrained` uses (f32; `tid2eid` as I64; hash layers
/// without a correction bias), and `tokenizer.json` when given.
pub fn export(
    model: &Model,
    tokenizer: Option<&crate::tokenizer::Tokenizer>,
    dir: &Path,
) -> Result<()> {
    let cfg = config_to_hf(&model.cfg)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tensors: Vec<(String, Vec<usize>, Data)> = Vec::new();
    // The MTP blocks (`mtp.*`, laid out after the main model) are left out: transformers has
    // none and ignores them.
    for spec in model
        .layout
        .tensors
        .iter()
        .filter(|t| !crate::model::is_mtp_tensor(&t.name))
    {
        let hash_bias = model
            .layout
            .layers
            .iter()
            .any(|lo| matches!(lo.ffn, Ffn::Moe(mo) if mo.hash && mo.bias == spec.offset));
        if hash_bias {
            continue;
        }
        let name = hf_name(&spec.name);
        tensors.push((
            name,
            spec.shape.clone(),
            Data::F32(&model.params[spec.range()]),
        ));
    }
    if model.cfg.tied_embeddings {
        let e = &model.layout.tensors[0];
        tensors.push((
            "head.weight".into(),
            e.shape.clone(),
            Data::F32(&model.params[e.range()]),
        ));
    }
    for (l, tab) in model.hash_tables.iter().enumerate() {
        if let Some(tab) = tab {
            tensors.push((
                format!("model.layers.{l}.ffn.gate.tid2eid"),
                vec![model.cfg.vocab_size, model.cfg.top_k],
                Data::I64(tab.iter().map(|&e| e as i64).collect()),
            ));
        }
    }
    let meta = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    let bytes = serialize_mixed(&tensors, meta)?;
    let write = |name: &str, data: &[u8]| -> Result<()> {
        let (tmp, path) = (dir.join(format!(".{name}.tmp")), dir.join(name));
        std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    };
    write("model.safetensors", &bytes)?;
    write(
        "config.json",
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;
    if let Some(tok) = tokenizer {
        tok.save(&dir.join("tokenizer.json"))?;
    }
    Ok(())
}
