//! DeepSeek-V4 GGUF files (`general.architecture = "deepseek4"`): what llama.cpp's
//! `convert_hf_to_gguf.py` writes from an official-layout V4 directory, read into mnemo's V4
//! model (`docs/deepseek-v4.md`, section "GGUF").
//!
//! Metadata (`deepseek4.` prefix) → the official `config.json` keys, folded by
//! [`config_from_hf`] exactly as an official directory's config is:
//!
//! | GGUF key | config key |
//! |---|---|
//! | `block_count` − `nextn_predict_layers` | `num_hidden_layers` |
//! | `embedding_length`, `context_length`, `vocab_size` (else `token_embd` rows) | `hidden_size`, `max_position_embeddings`, `vocab_size` |
//! | `attention.head_count`, `attention.key_length`, `rope.dimension_count` | `num_attention_heads`, `head_dim`, `qk_rope_head_dim` |
//! | `attention.q_lora_rank`, `attention.output_lora_rank`, `attention.output_group_count` | `q_lora_rank`, `o_lora_rank`, `o_groups` |
//! | `attention.sliding_window`, `attention.compress_ratios` (0, 4, 128) | `sliding_window`, `compress_ratios` |
//! | `attention.indexer.{head_count,key_length,top_k}` | `index_n_heads`, `index_head_dim`, `index_topk` |
//! | `rope.freq_base`, `attention.compress_rope_freq_base`, `rope.scaling.*` (YaRN) | `rope_theta`, `compress_rope_theta`, flat `rope_scaling` |
//! | `expert_count`, `expert_used_count`, `expert_feed_forward_length`, `expert_weights_scale` | `n_routed_experts`, `num_experts_per_tok`, `moe_intermediate_size`, `routed_scaling_factor` |
//! | `expert_gating_func` (4 = sqrtsoftplus), `hash_layer_count`, `swiglu_clamp_exp` | `scoring_func`, `num_hash_layers`, `swiglu_limit` |
//! | `hyper_connection.{count,sinkhorn_iterations,epsilon}` | `hc_mult`, `hc_sinkhorn_iters`, `hc_eps` |
//!
//! The flat (legacy) YaRN gives the attention factor 1, which is what llama.cpp computes
//! (`dsv4_rope_attn_factor` cancels ggml's `1 + 0.1 ln(1/s)`).
//!
//! Tensors: GGUF dims are reversed row-major shapes, so every official `[out, in]` weight
//! reads as it is ([`gguf_name`] gives the names). The routed experts are stacked per layer,
//! `blk.{i}.ffn_{gate,down,up}_exps.weight` `[n_expert, out, in]` (MXFP4 as converted, any
//! ggml type after `llama-quantize`); hash layers' `blk.{i}.ffn_gate_tid2eid.weight` is I32
//! `[vocab, top_k]` and they have no `exp_probs_b`. Every weight is dequantised to f32.
//! MTP blocks (`blk.{L+k}.nextn.*`, only in `--mtp` exports) are skipped with a warning.
//! Errors name the file and the metadata key or tensor at fault.

use super::{Gguf, Value};
use crate::io::hf_v4::config_from_hf;
use crate::io::v4_official::official_name;
use crate::model::{Ffn, Model};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value as Json};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Whether the GGUF at `path` declares the `deepseek4` architecture (false when it cannot
/// be read: the caller's loader reports that).
pub fn is_deepseek4_file(path: &Path) -> bool {
    Gguf::open(path).is_ok_and(|g| is_deepseek4(&g))
}

fn is_deepseek4(g: &Gguf) -> bool {
    g.meta.get("general.architecture").and_then(Value::as_str) == Some("deepseek4")
}

/// The GGUF name of the official tensor `name`, and the expert index for a routed expert's
/// slice of the stacked tensor; `None` for names with no GGUF counterpart.
pub fn gguf_name(name: &str) -> Option<(String, Option<usize>)> {
    let root = match name {
        "embed.weight" => Some("token_embd.weight"),
        "norm.weight" => Some("output_norm.weight"),
        "head.weight" => Some("output.weight"),
        "hc_head_fn" => Some("output_hc_fn.weight"),
        "hc_head_base" => Some("output_hc_base.weight"),
        "hc_head_scale" => Some("output_hc_scale.weight"),
        _ => None,
    };
    if let Some(r) = root {
        return Some((r.to_string(), None));
    }
    let rest = name.strip_prefix("layers.")?;
    let (i, tail) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    if let Some(e) = tail.strip_prefix("ffn.experts.") {
        let (j, w) = e.split_once('.')?;
        let proj = match w {
            "w1.weight" => "ffn_gate_exps",
            "w2.weight" => "ffn_down_exps",
            "w3.weight" => "ffn_up_exps",
            _ => return None,
        };
        return Some((format!("blk.{i}.{proj}.weight"), Some(j.parse().ok()?)));
    }
    let g = match tail {
        "attn_norm.weight" => "attn_norm.weight",
        "ffn_norm.weight" => "ffn_norm.weight",
        "hc_attn_fn" => "hc_attn_fn.weight",
        "hc_attn_base" => "hc_attn_base.weight",
        "hc_attn_scale" => "hc_attn_scale.weight",
        "hc_ffn_fn" => "hc_ffn_fn.weight",
        "hc_ffn_base" => "hc_ffn_base.weight",
        "hc_ffn_scale" => "hc_ffn_scale.weight",
        "attn.attn_sink" => "attn_sinks.weight",
        "attn.wq_a.weight" => "attn_q_a.weight",
        "attn.q_norm.weight" => "attn_q_a_norm.weight",
        "attn.wq_b.weight" => "attn_q_b.weight",
        "attn.wkv.weight" => "attn_kv.weight",
        "attn.kv_norm.weight" => "attn_kv_a_norm.weight",
        "attn.wo_a.weight" => "attn_output_a.weight",
        "attn.wo_b.weight" => "attn_output_b.weight",
        "attn.compressor.ape" => "attn_compressor_ape.weight",
        "attn.compressor.wkv.weight" => "attn_compressor_kv.weight",
        "attn.compressor.wgate.weight" => "attn_compressor_gate.weight",
        "attn.compressor.norm.weight" => "attn_compressor_norm.weight",
        "attn.indexer.wq_b.weight" => "indexer.attn_q_b.weight",
        "attn.indexer.weights_proj.weight" => "indexer.proj.weight",
        "attn.indexer.compressor.ape" => "indexer_compressor_ape.weight",
        "attn.indexer.compressor.wkv.weight" => "indexer_compressor_kv.weight",
        "attn.indexer.compressor.wgate.weight" => "indexer_compressor_gate.weight",
        "attn.indexer.compressor.norm.weight" => "indexer_compressor_norm.weight",
        "ffn.gate.weight" => "ffn_gate_inp.weight",
        "ffn.gate.bias" => "exp_probs_b.bias",
        "ffn.gate.tid2eid" => "ffn_gate_tid2eid.weight",
        "ffn.shared_experts.w1.weight" => "ffn_gate_shexp.weight",
        "ffn.shared_experts.w2.weight" => "ffn_down_shexp.weight",
        "ffn.shared_experts.w3.weight" => "ffn_up_shexp.weight",
        _ => return None,
    };
    Some((format!("blk.{i}.{g}"), None))
}

/// The official `config.json` equivalent of a `deepseek4` GGUF's metadata (module doc).
pub fn config_json(g: &Gguf) -> Result<Json> {
    let p = g.path.display();
    let key = |k: &str| format!("deepseek4.{k}");
    let get = |k: &str| g.meta.get(&key(k));
    let uint = |k: &str| -> Result<u64> {
        get(k)
            .and_then(Value::as_u64)
            .with_context(|| format!("{p}: metadata `{}` is missing or not an integer", key(k)))
    };
    let float = |k: &str| -> Result<f64> {
        get(k)
            .and_then(Value::as_f64)
            .with_context(|| format!("{p}: metadata `{}` is missing or not a number", key(k)))
    };
    let nextn = get("nextn_predict_layers")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let blocks = uint("block_count")?;
    if nextn > blocks {
        bail!("{p}: metadata `deepseek4.nextn_predict_layers` = {nextn} exceeds `deepseek4.block_count` = {blocks}");
    }
    let l = (blocks - nextn) as usize;
    let ratios: Vec<u64> = match get("attention.compress_ratios") {
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_u64().with_context(|| {
                    format!("{p}: metadata `deepseek4.attention.compress_ratios[{i}]` is not an unsigned integer")
                })
            })
            .collect::<Result<_>>()?,
        _ => bail!("{p}: metadata `deepseek4.attention.compress_ratios` is missing or not an array"),
    };
    if ratios.len() < l {
        bail!(
            "{p}: metadata `deepseek4.attention.compress_ratios` has {} entries for {l} layers",
            ratios.len()
        );
    }
    // One value per layer (llama.cpp reads a scalar or an array); mnemo takes one limit.
    let per_layer = |k: &str| -> Result<Option<f64>> {
        let vals: Vec<f64> = match get(k) {
            None => return Ok(None),
            Some(Value::Array(a)) => a.iter().take(l).filter_map(Value::as_f64).collect(),
            Some(v) => v.as_f64().into_iter().collect(),
        };
        let Some(&first) = vals.first() else {
            bail!("{p}: metadata `{}` holds no number", key(k));
        };
        if let Some(other) = vals.iter().find(|&&x| x != first) {
            bail!("{p}: metadata `{}` varies by layer ({first} and {other}): mnemo takes one swiglu_limit", key(k));
        }
        Ok(Some(first))
    };
    let limit = per_layer("swiglu_clamp_exp")?.unwrap_or(0.0);
    if let Some(sh) = per_layer("swiglu_clamp_shexp")? {
        if sh != limit {
            bail!("{p}: metadata `deepseek4.swiglu_clamp_shexp` = {sh} differs from `deepseek4.swiglu_clamp_exp` = {limit}: mnemo clamps both experts at one swiglu_limit");
        }
    }
    if let Some(n) = get("expert_shared_count").and_then(Value::as_u64) {
        if n != 1 {
            bail!("{p}: metadata `deepseek4.expert_shared_count` = {n}: mnemo's DeepSeek-V4 has exactly one shared expert");
        }
    }
    if let Some(Value::Bool(false)) = get("expert_weights_norm") {
        bail!("{p}: metadata `deepseek4.expert_weights_norm` is false: mnemo's DeepSeek-V4 renormalises the routed weights");
    }
    let scoring = match get("expert_gating_func").and_then(Value::as_u64) {
        Some(4) | None => "sqrtsoftplus",
        Some(2) => "sigmoid",
        Some(f) => bail!("{p}: metadata `deepseek4.expert_gating_func` = {f} is not supported (4 = sqrtsoftplus, 2 = sigmoid)"),
    };
    let vocab = match get("vocab_size").and_then(Value::as_u64) {
        Some(v) => v,
        None => g
            .tensors
            .iter()
            .find(|t| t.name == "token_embd.weight")
            .and_then(|t| t.dims.get(1).copied())
            .with_context(|| {
                format!("{p}: neither `deepseek4.vocab_size` nor tensor `token_embd.weight`")
            })?,
    };
    let mut c = Map::new();
    c.insert("model_type".into(), json!("deepseek_v4"));
    c.insert("num_hidden_layers".into(), json!(l));
    c.insert("num_nextn_predict_layers".into(), json!(0));
    c.insert("hidden_size".into(), json!(uint("embedding_length")?));
    c.insert("vocab_size".into(), json!(vocab));
    c.insert(
        "num_attention_heads".into(),
        json!(uint("attention.head_count")?),
    );
    c.insert("head_dim".into(), json!(uint("attention.key_length")?));
    c.insert(
        "qk_rope_head_dim".into(),
        json!(uint("rope.dimension_count")?),
    );
    c.insert("q_lora_rank".into(), json!(uint("attention.q_lora_rank")?));
    c.insert(
        "o_lora_rank".into(),
        json!(uint("attention.output_lora_rank")?),
    );
    c.insert(
        "o_groups".into(),
        json!(uint("attention.output_group_count")?),
    );
    c.insert(
        "sliding_window".into(),
        json!(uint("attention.sliding_window")?),
    );
    c.insert("compress_ratios".into(), json!(ratios[..l]));
    c.insert(
        "index_n_heads".into(),
        json!(uint("attention.indexer.head_count")?),
    );
    c.insert(
        "index_head_dim".into(),
        json!(uint("attention.indexer.key_length")?),
    );
    c.insert("index_topk".into(), json!(uint("attention.indexer.top_k")?));
    c.insert("n_routed_experts".into(), json!(uint("expert_count")?));
    c.insert(
        "num_experts_per_tok".into(),
        json!(uint("expert_used_count")?),
    );
    c.insert(
        "moe_intermediate_size".into(),
        json!(uint("expert_feed_forward_length")?),
    );
    c.insert(
        "routed_scaling_factor".into(),
        json!(float("expert_weights_scale")?),
    );
    c.insert("scoring_func".into(), json!(scoring));
    c.insert("num_hash_layers".into(), json!(uint("hash_layer_count")?));
    c.insert("swiglu_limit".into(), json!(limit));
    c.insert("hc_mult".into(), json!(uint("hyper_connection.count")?));
    c.insert(
        "hc_sinkhorn_iters".into(),
        json!(uint("hyper_connection.sinkhorn_iterations")?),
    );
    c.insert("hc_eps".into(), json!(float("hyper_connection.epsilon")?));
    c.insert(
        "rms_norm_eps".into(),
        json!(float("attention.layer_norm_rms_epsilon")?),
    );
    c.insert("rope_theta".into(), json!(float("rope.freq_base")?));
    c.insert(
        "compress_rope_theta".into(),
        json!(float("attention.compress_rope_freq_base")?),
    );
    if let Ok(n) = uint("context_length") {
        c.insert("max_position_embeddings".into(), json!(n));
    }
    match get("rope.scaling.type").and_then(Value::as_str) {
        None | Some("none") => {}
        Some("yarn") => {
            let mut y = Map::new();
            y.insert("type".into(), json!("yarn"));
            y.insert("factor".into(), json!(float("rope.scaling.factor")?));
            y.insert(
                "original_max_position_embeddings".into(),
                json!(uint("rope.scaling.original_context_length")?),
            );
            for (gk, ck) in [
                ("rope.scaling.yarn_beta_fast", "beta_fast"),
                ("rope.scaling.yarn_beta_slow", "beta_slow"),
            ] {
                if let Ok(v) = float(gk) {
                    y.insert(ck.into(), json!(v));
                }
            }
            c.insert("rope_scaling".into(), Json::Object(y));
        }
        Some(t) => {
            bail!("{p}: metadata `deepseek4.rope.scaling.type` = {t:?} is not supported (yarn)")
        }
    }
    Ok(Json::Object(c))
}

/// Load a `deepseek4` GGUF as a mnemo V4 model (weights dequantised to f32), with its
/// tokenizer when the file carries a usable one (`None` otherwise, with the reason).
pub fn load(path: &Path) -> Result<(Model, std::result::Result<Tokenizer, String>)> {
    let g = Gguf::open(path)?;
    load_from(&g)
}

/// [`load`] on an opened file.
pub fn load_from(g: &Gguf) -> Result<(Model, std::result::Result<Tokenizer, String>)> {
    let p = g.path.display().to_string();
    if !is_deepseek4(g) {
        bail!(
            "{p}: architecture `{}` is not `deepseek4`",
            g.meta
                .get("general.architecture")
                .and_then(Value::as_str)
                .unwrap_or("?")
        );
    }
    let cj = config_json(g)?;
    let cfg = config_from_hf(&cj).with_context(|| format!("{p}: the deepseek4 metadata"))?;
    let mut model = Model::new(cfg).with_context(|| format!("{p}: the deepseek4 metadata"))?;
    let by_name: HashMap<&str, &super::TensorInfo> =
        g.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut used: HashSet<String> = HashSet::new();
    let mut missing = Vec::new();
    // Stacked experts, dequantised once per tensor.
    let mut stacks: HashMap<String, (Vec<usize>, Vec<f32>)> = HashMap::new();
    for spec in model.layout.tensors.clone() {
        let off = official_name(&spec.name);
        let Some((gname, expert)) = gguf_name(&off) else {
            bail!(
                "{p}: mnemo tensor `{}` (official `{off}`) has no GGUF name",
                spec.name
            );
        };
        if !by_name.contains_key(gname.as_str()) {
            let hash_bias = model
                .layout
                .layers
                .iter()
                .any(|lo| matches!(lo.ffn, Ffn::Moe(mo) if mo.hash && mo.bias == spec.offset));
            if !hash_bias {
                missing.push(gname);
            }
            continue;
        }
        let w: Vec<f32> = match expert {
            None => {
                let (shape, w) = g.tensor_f32(&gname)?;
                if shape != spec.shape {
                    bail!(
                        "{p}: tensor `{gname}` has shape {shape:?}, expected {:?}",
                        spec.shape
                    );
                }
                w
            }
            Some(j) => {
                if !stacks.contains_key(&gname) {
                    stacks.insert(gname.clone(), g.tensor_f32(&gname)?);
                }
                let (shape, all) = &stacks[&gname];
                let n_exp = model.cfg.n_routed_experts;
                let want: Vec<usize> = [vec![n_exp], spec.shape.clone()].concat();
                if *shape != want {
                    bail!("{p}: tensor `{gname}` has shape {shape:?}, expected {want:?}");
                }
                let n = spec.len();
                all[j * n..(j + 1) * n].to_vec()
            }
        };
        if let Some(i) = w.iter().position(|x| !x.is_finite()) {
            bail!("{p}: tensor `{gname}` holds {} at index {i}", w[i]);
        }
        model.params[spec.range()].copy_from_slice(&w);
        used.insert(gname);
    }
    let c = model.cfg.clone();
    for l in (0..c.n_layers).filter(|&l| c.is_hash(l)) {
        let key = format!("blk.{l}.ffn_gate_tid2eid.weight");
        if !by_name.contains_key(key.as_str()) {
            missing.push(key);
            continue;
        }
        let (shape, tab) = g.tensor_f32(&key)?;
        if shape != [c.vocab_size, c.top_k] {
            bail!(
                "{p}: tensor `{key}` has shape {shape:?}, expected [{}, {}]",
                c.vocab_size,
                c.top_k
            );
        }
        let mut out = Vec::with_capacity(tab.len());
        for (i, &e) in tab.iter().enumerate() {
            if !(e >= 0.0 && (e as usize) < c.n_routed_experts && e.fract() == 0.0) {
                bail!(
                    "{p}: tensor `{key}` routes token {} to expert {e} of {}",
                    i / c.top_k,
                    c.n_routed_experts
                );
            }
            out.push(e as u32);
        }
        model.hash_tables[l] = Some(out);
        used.insert(key);
    }
    let mut mtp_skipped = 0;
    let mut extra = Vec::new();
    for t in &g.tensors {
        if used.contains(&t.name) {
            continue;
        }
        let block = t
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(i, _)| i.parse::<usize>().ok());
        match block {
            Some(b) if b >= c.n_layers => mtp_skipped += 1,
            _ => extra.push(t.name.as_str()),
        }
    }
    if !missing.is_empty() || !extra.is_empty() {
        let list = |v: Vec<&str>| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        bail!(
            "{p}: the tensors do not match the deepseek4 metadata\n  missing: {}\n  unexpected: {}",
            list(missing.iter().map(String::as_str).collect()),
            list(extra)
        );
    }
    if mtp_skipped > 0 {
        tracing::warn!(
            "{p}: skipped {mtp_skipped} tensors of the MTP blocks (blk.{}.* and after): mnemo \
             loads the main layers of a deepseek4 GGUF",
            c.n_layers
        );
    }
    let tok = match g.meta.get("tokenizer.ggml.tokens") {
        Some(Value::Array(v)) => {
            let tokens: Vec<String> = v
                .iter()
                .map(|x| x.as_str().unwrap_or("").to_string())
                .collect();
            super::tokenizer_from_gguf(g, &tokens).map_err(|e| format!("{e:#}"))
        }
        _ => Err(format!("{p}: no tokenizer.ggml.tokens")),
    };
    Ok((model, tok))
}

/// Switch `model` (loaded from the `deepseek4` GGUF at `path`) to llama.cpp's numerics: the
/// input of every product with a quantised or half-precision weight rounded as ggml converts
/// it for the stored type (`Q8_0` for MXFP4 and the 32-blocks, `Q8_K` for k-quants, f16 / bf16
/// for F16 / BF16; `kernels::act_quant`): the routed and shared experts, the router, the
/// attention, compressor and indexer projections (`Model::act_quant_at`, read by
/// `Model::lin`), the output head and the mHC coefficient products (`HcOffsets::in_quant`;
/// `hc_*_fn` are F32 in the converter's files, quantised by `llama-quantize` mixes). Not
/// simulated: the f16 K cache (llama.cpp's default; compare with an f32 one). Returns notes on
/// what stays exact.
pub fn use_ggml_numerics(path: &Path, model: &mut Model) -> Result<Vec<String>> {
    use crate::kernels::act_quant::ActQuant;
    let g = Gguf::open(path)?;
    if !is_deepseek4(&g) {
        bail!(
            "{}: llama.cpp numerics (--numerics ggml) are for deepseek4 GGUF files",
            path.display()
        );
    }
    let ty = |name: &str| -> Result<u32> {
        g.tensors
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.ggml_type)
            .with_context(|| format!("{}: tensor `{name}` is missing", path.display()))
    };
    let mut notes = Vec::new();
    let mut per = Vec::new();
    for l in 0..model.cfg.n_layers {
        let b = |p: &str| format!("blk.{l}.{p}.weight");
        let (tg, tu, td) = (
            ty(&b("ffn_gate_exps"))?,
            ty(&b("ffn_up_exps"))?,
            ty(&b("ffn_down_exps"))?,
        );
        let (qg, qu) = (ActQuant::for_weight_type(tg), ActQuant::for_weight_type(tu));
        if qg != qu {
            bail!(
                "{}: `{}` ({}) and `{}` ({}) take differently converted inputs: mnemo multiplies                  them as one product",
                path.display(),
                b("ffn_gate_exps"),
                super::type_name(tg),
                b("ffn_up_exps"),
                super::type_name(tu)
            );
        }
        for t in [tg, td] {
            if ActQuant::for_weight_type(t).is_none() && t != super::F32 {
                notes.push(format!(
                    "layer {l}: experts stored as {} multiply exact f32 inputs (ggml's conversion                      for that type is not simulated)",
                    super::type_name(t)
                ));
            }
        }
        let sh = |p: &str| -> Result<Option<ActQuant>> {
            let n = b(p);
            if g.tensors.iter().any(|t| t.name == n) {
                Ok(ActQuant::for_weight_type(ty(&n)?))
            } else {
                Ok(None)
            }
        };
        let (sg, su, sd) = (
            sh("ffn_gate_shexp")?,
            sh("ffn_up_shexp")?,
            sh("ffn_down_shexp")?,
        );
        if sg != su {
            bail!(
                "{}: `{}` and `{}` take differently converted inputs: mnemo multiplies them as \
                 one product",
                path.display(),
                b("ffn_gate_shexp"),
                b("ffn_up_shexp")
            );
        }
        per.push([
            qg,
            ActQuant::for_weight_type(td),
            sg,
            sd,
            sh("ffn_gate_inp")?,
        ]);
    }
    model.moe_act_quant = per;
    // Every other product with a weight of its own offset (`Model::lin`, the head).
    let groups = model.cfg.v4.as_ref().map_or(1, |v| v.o_groups);
    let mut at = std::collections::HashMap::new();
    for spec in &model.layout.tensors {
        let Some((gname, None)) = gguf_name(&official_name(&spec.name)) else {
            continue;
        };
        let Some(t) = g.tensors.iter().find(|t| t.name == gname) else {
            continue;
        };
        if let (Some(q), [rows, cols]) = (ActQuant::for_weight_type(t.ggml_type), &spec.shape[..]) {
            // `wo_a` runs as its `o_groups` diagonal blocks, each a product of its own.
            let parts = if spec.name.ends_with("wo_a.weight") {
                groups
            } else {
                1
            };
            for gi in 0..parts {
                at.insert(spec.offset + gi * (rows / parts) * cols, q);
            }
        }
    }
    // The mHC coefficient products (`hc_*_fn`, quantised by `llama-quantize` mixes).
    let fq = |o: &mut Option<crate::mhc::HcOffsets>| {
        if let Some(o) = o.as_mut() {
            o.in_quant = at.get(&o.fn_).copied();
        }
    };
    for lo in model.layout.layers.iter_mut() {
        fq(&mut lo.attn_hc);
        fq(&mut lo.ffn_hc);
    }
    fq(&mut model.layout.hc_head);
    model.act_quant_at = at;
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_converter() {
        for (off, want, e) in [
            ("embed.weight", "token_embd.weight", None),
            ("hc_head_scale", "output_hc_scale.weight", None),
            (
                "layers.2.attn.kv_norm.weight",
                "blk.2.attn_kv_a_norm.weight",
                None,
            ),
            ("layers.0.attn.attn_sink", "blk.0.attn_sinks.weight", None),
            (
                "layers.1.attn.indexer.compressor.ape",
                "blk.1.indexer_compressor_ape.weight",
                None,
            ),
            ("layers.3.ffn.gate.bias", "blk.3.exp_probs_b.bias", None),
            (
                "layers.3.ffn.experts.7.w2.weight",
                "blk.3.ffn_down_exps.weight",
                Some(7),
            ),
            (
                "layers.0.ffn.shared_experts.w3.weight",
                "blk.0.ffn_up_shexp.weight",
                None,
            ),
        ] {
            assert_eq!(gguf_name(off), Some((want.to_string(), e)), "{off}");
        }
        assert_eq!(gguf_name("layers.0.attn.bogus"), None);
        assert_eq!(gguf_name("mtp.0.emb"), None);
    }
}
