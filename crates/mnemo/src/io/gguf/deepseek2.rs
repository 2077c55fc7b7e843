//! DeepSeek-V2 GGUF files (`general.architecture = "deepseek2"`: DeepSeek-V2, V2-Lite,
//! DeepSeek-Coder-V2(-Lite)) as llama.cpp's `convert_hf_to_gguf.py` writes them, read into a
//! mnemo model with multi-head latent attention ([`crate::model::attention_mla`]) and
//! DeepSeekMoE, as llama.cpp's `src/models/deepseek2.cpp` runs them. Weights are dequantised
//! to f32.
//!
//! Metadata (`deepseek2.` prefix) → [`ModelConfig`]:
//!
//! | GGUF key | mnemo |
//! |---|---|
//! | `embedding_length`, `block_count`, `attention.head_count`, `feed_forward_length` | `d_model`, `n_layers`, `n_heads`, `ffn_hidden` (the leading dense blocks) |
//! | `attention.q_lora_rank` (absent or 0: `attn_q`), `attention.kv_lora_rank` | `mla.q_lora_rank`, `mla.kv_lora_rank` |
//! | `attention.key_length_mla`, `attention.value_length_mla` (split `attn_k_b`/`attn_v_b`); without them `attention.key_length`, `attention.value_length` (legacy `attn_kv_b`) | `head_dim` = `qk_nope + qk_rope`, `mla.v_head_dim` |
//! | `rope.dimension_count`, `rope.freq_base` | `rope_dim` (`qk_rope_head_dim`), `rope_theta` |
//! | `rope.scaling.{type = yarn, factor, original_context_length, yarn_beta_fast, yarn_beta_slow}` | `rope_scaling` |
//! | `rope.scaling.yarn_log_multiplier` (`0.1·mscale_all_dim`) | `rope_scaling.mscale` = it / 0.1 |
//! | `leading_dense_block_count`, `expert_count`, `expert_used_count`, `expert_shared_count`, `expert_feed_forward_length` | `n_dense_layers`, `n_routed_experts`, `top_k`, `n_shared_experts`, `moe_inter` |
//! | `expert_gating_func` (1 softmax, 2 sigmoid; absent: softmax, as llama.cpp), `expert_weights_norm` (absent: false), `expert_weights_scale` (absent: 1) | `score_func`, `norm_topk_prob`, `routed_scaling_factor` |
//! | `expert_group_count`, `expert_group_used_count` | `n_group`, `topk_group` |
//!
//! `attention.head_count_kv` is not read (1 in MLA files: llama.cpp's MQA over the latent).
//! Not supported, each named when present: gating functions other than softmax and sigmoid,
//! `rope.scaling.attn_factor` ≠ 1, `attention.temperature_scale` (Mistral-Large's), other
//! RoPE scalings, per-layer arrays that vary, MTP blocks (`nextn_predict_layers`; skipped).
//! Not reproduced: llama.cpp's GLM-4.7-Lite special case (sigmoid gating assumed for 47/48
//! layers with 154880 tokens when the key is absent) and DeepSeek-V2's original
//! `group_limited_greedy` group score (the group's maximum; llama.cpp, and so mnemo, sum the two
//! best — the same when groups are off, as in V2-Lite).
//!
//! Tensors (GGUF dims reversed: `[out, in]` as in PyTorch): `attn_q` or `attn_q_a`,
//! `attn_q_a_norm`, `attn_q_b`; `attn_kv_a_mqa` `[r + d_r, d]`; `attn_kv_a_norm`; either the
//! split `attn_k_b` `[H, r, d_n]` (transposed per head) and `attn_v_b` `[H, d_v, r]`, or the
//! legacy `attn_kv_b` `[H·(d_n+d_v), r]` (mnemo keeps the latter layout and rebuilds it from the
//! split pair); `attn_output`; dense blocks `ffn_{gate,up,down}`; MoE blocks `ffn_gate_inp`,
//! optional `exp_probs_b.bias` (selection bias; zeros when absent), the stacked experts
//! `ffn_{gate,up,down}_exps` `[E, out, in]` (or the fused `ffn_gate_up_exps` `[E, 2I, d]`) and
//! the shared experts `ffn_{gate,up,down}_shexp`. Missing and unexpected tensors are listed.

use super::{Gguf, Value};
use crate::config::{FfnKind, MlaConfig, ModelConfig, ScoreFunc};
use crate::kernels::rope::{RopeLayout, RopeScaling};
use crate::model::{Ffn, Model};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Whether the GGUF at `path` declares the `deepseek2` architecture (false when it cannot be
/// read: the caller's loader reports that).
pub fn is_deepseek2_file(path: &Path) -> bool {
    Gguf::open(path).is_ok_and(|g| is_deepseek2(&g))
}

fn is_deepseek2(g: &Gguf) -> bool {
    g.meta.get("general.architecture").and_then(Value::as_str) == Some("deepseek2")
}

/// The model configuration of a `deepseek2` GGUF (module doc), the context capped at
/// `max_seq_len`.
pub fn config(g: &Gguf, max_seq_len: usize) -> Result<ModelConfig> {
    let p = g.path.display();
    let key = |k: &str| format!("deepseek2.{k}");
    let get = |k: &str| g.meta.get(&key(k));
    // A scalar, or a per-layer array whose entries must agree.
    let num = |k: &str| -> Result<Option<f64>> {
        let vals: Vec<f64> = match get(k) {
            None => return Ok(None),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_f64).collect(),
            Some(v) => v.as_f64().into_iter().collect(),
        };
        let Some(&first) = vals.first() else {
            bail!("{p}: metadata `{}` holds no number", key(k));
        };
        if let Some(o) = vals.iter().find(|&&x| x != first) {
            bail!(
                "{p}: metadata `{}` varies by layer ({first} and {o}): not supported",
                key(k)
            );
        }
        Ok(Some(first))
    };
    let uint = |k: &str| -> Result<usize> {
        num(k)?
            .filter(|x| *x >= 0.0 && x.fract() == 0.0)
            .map(|x| x as usize)
            .with_context(|| format!("{p}: metadata `{}` is missing or not an integer", key(k)))
    };
    let uint_or = |k: &str, d: usize| -> Result<usize> {
        if get(k).is_some() {
            uint(k)
        } else {
            Ok(d)
        }
    };
    let d = uint("embedding_length")?;
    let n_layers = uint("block_count")?;
    let heads = uint("attention.head_count")?;
    let vocab = match num("vocab_size")? {
        Some(v) => v as usize,
        None => match g.meta.get("tokenizer.ggml.tokens") {
            Some(Value::Array(t)) => t.len(),
            _ => bail!("{p}: neither `deepseek2.vocab_size` nor tokenizer.ggml.tokens"),
        },
    };
    let split = get("attention.key_length_mla").is_some();
    let (kl, vl) = if split {
        (
            uint("attention.key_length_mla")?,
            uint("attention.value_length_mla")?,
        )
    } else {
        (
            uint("attention.key_length")?,
            uint("attention.value_length")?,
        )
    };
    let rope = uint("rope.dimension_count")?;
    if rope >= kl {
        bail!(
            "{p}: metadata `{}` ({rope}) leaves no non-RoPE key channels of the key length {kl}",
            key("rope.dimension_count")
        );
    }
    let mla = MlaConfig {
        q_lora_rank: uint_or("attention.q_lora_rank", 0)?,
        kv_lora_rank: uint("attention.kv_lora_rank")?,
        qk_nope_head_dim: kl - rope,
        v_head_dim: vl,
    };
    for k in ["attention.temperature_scale", "rope.scaling.attn_factor"] {
        let neutral = if k.ends_with("attn_factor") { 1.0 } else { 0.0 };
        if let Some(v) = num(k)? {
            if v != neutral {
                bail!("{p}: metadata `{}` = {v} is not supported", key(k));
            }
        }
    }
    let mut max_len = uint_or("context_length", 4096)?.min(max_seq_len);
    let rope_scaling = match get("rope.scaling.type").and_then(Value::as_str) {
        None | Some("none") => None,
        Some("yarn") => {
            let factor = num("rope.scaling.factor")?.with_context(|| {
                format!("{p}: metadata `{}` is missing", key("rope.scaling.factor"))
            })?;
            let mut y = RopeScaling::yarn(factor, uint("rope.scaling.original_context_length")?);
            if let Some(v) = num("rope.scaling.yarn_beta_fast")? {
                y.beta_fast = v;
            }
            if let Some(v) = num("rope.scaling.yarn_beta_slow")? {
                y.beta_slow = v;
            }
            // llama.cpp's [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]: the converter wrote 0.1·mscale_all_dim.
            y.mscale = num("rope.scaling.yarn_log_multiplier")?.map_or(0.0, |v| v / 0.1);
            max_len = max_len.min(y.max_context());
            Some(y)
        }
        Some(t) => bail!(
            "{p}: metadata `{}` = {t:?} is not supported (none, yarn)",
            key("rope.scaling.type")
        ),
    };
    let n_exp = uint_or("expert_count", 0)?;
    let dense_lead = uint_or("leading_dense_block_count", 0)?.min(n_layers);
    let moe = n_exp > 0 && dense_lead < n_layers;
    let score_func = match num("expert_gating_func")? {
        None | Some(1.0) => ScoreFunc::Softmax,
        Some(2.0) => ScoreFunc::Sigmoid,
        Some(f) => bail!(
            "{p}: metadata `{}` = {f} is not supported for deepseek2 (1 = softmax, 2 = sigmoid)",
            key("expert_gating_func")
        ),
    };
    let norm_topk_prob = match get("expert_weights_norm") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => v.as_u64().map(|x| x != 0).with_context(|| {
            format!(
                "{p}: metadata `{}` is not a bool",
                key("expert_weights_norm")
            )
        })?,
    };
    let scale = num("expert_weights_scale")?.unwrap_or(0.0);
    let has_output = g.tensors.iter().any(|t| t.name == "output.weight");
    let mut c = ModelConfig {
        vocab_size: vocab,
        d_model: d,
        n_layers,
        n_heads: heads,
        n_kv_heads: heads,
        head_dim: kl,
        rope_theta: num("rope.freq_base")?.unwrap_or(10000.0),
        rope_dim: rope,
        rope_layout: RopeLayout::Interleaved,
        ffn_hidden: uint_or("feed_forward_length", 0)?,
        tied_embeddings: !has_output,
        norm_eps: num("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6) as f32,
        init_std: 0.02,
        max_seq_len: max_len,
        rope_scaling,
        mla: Some(mla),
        ..ModelConfig::dense_defaults()
    };
    if moe {
        c.ffn = FfnKind::Moe;
        c.n_dense_layers = dense_lead;
        c.n_routed_experts = n_exp;
        c.top_k = uint("expert_used_count")?;
        c.n_shared_experts = uint_or("expert_shared_count", 0)?;
        c.moe_inter = uint("expert_feed_forward_length")?;
        c.score_func = score_func;
        c.norm_topk_prob = norm_topk_prob;
        // llama.cpp scales only by a value other than 0 and 1.
        c.routed_scaling_factor = if scale == 0.0 { 1.0 } else { scale as f32 };
        c.n_group = uint_or("expert_group_count", 0)?;
        c.topk_group = uint_or("expert_group_used_count", 0)?;
    }
    if c.ffn_hidden == 0 && c.n_dense_layers + usize::from(!moe) * n_layers > 0 {
        bail!(
            "{p}: metadata `{}` is missing (the dense blocks' width)",
            key("feed_forward_length")
        );
    }
    if c.ffn_hidden == 0 {
        c.ffn_hidden = c.moe_inter.max(1);
    }
    if let Some(n) = num("nextn_predict_layers")?.filter(|&n| n > 0.0) {
        if n as usize >= n_layers {
            bail!("{p}: metadata `deepseek2.nextn_predict_layers` = {n} leaves no main layers");
        }
        c.n_layers = n_layers - n as usize;
    }
    Ok(c)
}

/// The GGUF name of a mnemo parameter of a deepseek2 model, and the expert index for a routed
/// expert's slice of its stacked tensor.
fn gguf_name(ours: &str) -> (String, Option<usize>) {
    let root = |s: &str| (s.to_string(), None);
    let Some(rest) = ours.strip_prefix("layers.") else {
        return match ours {
            "tok_embeddings.weight" => root("token_embd.weight"),
            "norm.weight" => root("output_norm.weight"),
            other => root(other),
        };
    };
    let (i, t) = rest.split_once('.').expect("layer tensor names have a dot");
    if let Some(e) = t.strip_prefix("ffn.experts.") {
        let (j, w) = e.split_once('.').expect("expert tensor names have a dot");
        let proj = match w {
            "w1.weight" => "ffn_gate_exps",
            "w3.weight" => "ffn_up_exps",
            _ => "ffn_down_exps",
        };
        return (format!("blk.{i}.{proj}.weight"), j.parse().ok());
    }
    let g = match t {
        "attention_norm.weight" => "attn_norm.weight",
        "attention.wq.weight" => "attn_q.weight",
        "attention.wq_a.weight" => "attn_q_a.weight",
        "attention.q_a_norm.weight" => "attn_q_a_norm.weight",
        "attention.wq_b.weight" => "attn_q_b.weight",
        "attention.wkv_a.weight" => "attn_kv_a_mqa.weight",
        "attention.kv_a_norm.weight" => "attn_kv_a_norm.weight",
        "attention.wkv_b.weight" => "attn_kv_b.weight",
        "attention.wo.weight" => "attn_output.weight",
        "ffn_norm.weight" => "ffn_norm.weight",
        "feed_forward.w1.weight" => "ffn_gate.weight",
        "feed_forward.w3.weight" => "ffn_up.weight",
        "feed_forward.w2.weight" => "ffn_down.weight",
        "ffn.gate.weight" => "ffn_gate_inp.weight",
        "ffn.gate.bias" => "exp_probs_b.bias",
        "ffn.shared_experts.w1.weight" => "ffn_gate_shexp.weight",
        "ffn.shared_experts.w3.weight" => "ffn_up_shexp.weight",
        "ffn.shared_experts.w2.weight" => "ffn_down_shexp.weight",
        other => other,
    };
    (format!("blk.{i}.{g}"), None)
}

/// Load a `deepseek2` GGUF (module doc), the context capped at `max_seq_len`, with its
/// tokenizer when the file carries a usable one (`Err` with the reason otherwise).
pub fn load(path: &Path, max_seq_len: usize) -> Result<Loaded> {
    load_impl(path, max_seq_len, false)
}

/// [`load`] keeping the quantised matrices packed (module `deepseek2_packed`): no f32 copy,
/// so only the cached drivers run the model (the full forward refuses it). What makes
/// DeepSeek-V2-Lite (15.7B parameters, ~63 GB in f32) fit in memory.
pub fn load_packed(path: &Path, max_seq_len: usize) -> Result<Loaded> {
    load_impl(path, max_seq_len, true)
}

/// Bytes of the parameters of the `deepseek2` GGUF at `path` in f32 (what [`load`] allocates).
pub fn f32_bytes(path: &Path) -> Result<usize> {
    let g = Gguf::open(path)?;
    let c = config(&g, 1)?;
    Ok(4 * crate::model::ParamLayout::new(&c).total)
}

/// A loaded model and its tokenizer (or why it has none).
pub type Loaded = (Model, std::result::Result<Tokenizer, String>);

fn load_impl(path: &Path, max_seq_len: usize, packed: bool) -> Result<Loaded> {
    let g = Gguf::open(path)?;
    let p = g.path.display().to_string();
    if !is_deepseek2(&g) {
        bail!("{p}: architecture is not `deepseek2`");
    }
    let cfg = config(&g, max_seq_len)?;
    let mut model = if packed {
        Model::new_reserved(cfg)
    } else {
        Model::new(cfg).map_err(anyhow::Error::from)
    }
    .with_context(|| format!("{p}: inconsistent deepseek2 metadata"))?;
    let packer = match packed {
        true => Some(super::deepseek2_packed::Packer::open(&g)?),
        false => None,
    };
    let mut fused_w3: HashSet<usize> = HashSet::new();
    let c = model.cfg.clone();
    let m = c.mla.clone().expect("an MLA config");
    let by_name: HashMap<&str, &super::TensorInfo> =
        g.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let has = |n: &str| by_name.contains_key(n);
    let mut used: HashSet<String> = HashSet::new();
    let mut missing: Vec<String> = Vec::new();
    let mut stacks: HashMap<String, (Vec<usize>, Vec<f32>)> = HashMap::new();
    let bias_offsets: HashSet<usize> = model
        .layout
        .layers
        .iter()
        .filter_map(|lo| match lo.ffn {
            Ffn::Moe(mo) => Some(mo.bias),
            Ffn::Dense { .. } => None,
        })
        .collect();
    for spec in model.layout.tensors.clone() {
        let (gname, expert) = gguf_name(&spec.name);
        if fused_w3.contains(&spec.offset) {
            continue;
        }
        if let Some(pk) = &packer {
            if let Some((q, srcs)) = pack(pk, &g, &spec, &gname, expert, &model)? {
                if spec.name.ends_with("feed_forward.w1.weight") {
                    fused_w3.insert(spec.offset + spec.len());
                }
                model.quant.insert(spec.offset, q);
                used.extend(srcs);
                continue;
            }
        }
        let w: Vec<f32> = if let Some(j) = expert {
            match expert_slice(&g, &mut stacks, &gname, j, c.n_routed_experts, &spec.shape)? {
                Some((w, src)) => {
                    used.insert(src);
                    w
                }
                None => {
                    missing.push(gname);
                    continue;
                }
            }
        } else if spec.name.ends_with("attention.wkv_b.weight") && !has(&gname) {
            let b = gname.trim_end_matches("attn_kv_b.weight");
            let (kb, vb) = (format!("{b}attn_k_b.weight"), format!("{b}attn_v_b.weight"));
            match (has(&kb), has(&vb)) {
                (true, true) => {}
                (false, false) => {
                    missing.push(format!("{gname} (or the split {kb} and {vb})"));
                    continue;
                }
                (k_, _) => {
                    let (miss, got) = if k_ { (&vb, &kb) } else { (&kb, &vb) };
                    missing.push(format!("{miss} (to go with {got})"));
                    continue;
                }
            }
            let w = kv_b_from_split(&g, &kb, &vb, &c, &m)?;
            used.insert(kb);
            used.insert(vb);
            w
        } else if !has(&gname) {
            if !bias_offsets.contains(&spec.offset) {
                missing.push(gname);
            }
            continue; // the selection bias stays zero
        } else {
            let (shape, w) = g.tensor_f32(&gname)?;
            if shape != spec.shape {
                bail!(
                    "{p}: tensor `{gname}` has shape {shape:?}, expected {:?}",
                    spec.shape
                );
            }
            used.insert(gname.clone());
            w
        };
        if let Some(i) = w.iter().position(|x| !x.is_finite()) {
            bail!("{p}: tensor `{}` holds {} at index {i}", gname, w[i]);
        }
        model.params[spec.range()].copy_from_slice(&w);
    }
    let mut extra = Vec::new();
    let mut mtp_skipped = 0;
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
            "{p}: the tensors do not match the deepseek2 metadata\n  missing: {}\n  unexpected: {}",
            list(missing.iter().map(String::as_str).collect()),
            list(extra)
        );
    }
    if mtp_skipped > 0 {
        tracing::warn!("{p}: skipped {mtp_skipped} tensors of the MTP blocks");
    }
    model.packed_only = packed;
    let tok = match g.meta.get("tokenizer.ggml.tokens") {
        Some(Value::Array(v)) => {
            let tokens: Vec<String> = v
                .iter()
                .map(|x| x.as_str().unwrap_or("").to_string())
                .collect();
            super::tokenizer_from_gguf(&g, &tokens).map_err(|e| format!("{e:#}"))
        }
        _ => Err(format!("{p}: no tokenizer.ggml.tokens")),
    };
    Ok((model, tok))
}

/// The packed copy of parameter `spec` (GGUF tensor `gname`, expert `expert` of its stack)
/// when it is multiplied through the quantised copies and stored in a type with a quantised
/// product, and the GGUF tensors it came from; the dense `w1` takes `w3` along (`[W1; W3]`).
fn pack(
    pk: &super::deepseek2_packed::Packer,
    g: &Gguf,
    spec: &crate::model::TensorSpec,
    gname: &str,
    expert: Option<usize>,
    model: &Model,
) -> Result<Option<(crate::kernels::quant::QMatrix, Vec<String>)>> {
    let has = |n: &str| g.tensors.iter().any(|t| t.name == n);
    if spec.name.ends_with("feed_forward.w1.weight") {
        let up = gname.replace("ffn_gate", "ffn_up");
        if !(has(gname) && has(&up)) {
            return Ok(None);
        }
        return Ok(pk
            .stacked(g, gname, &up)?
            .filter(|q| q.rows == 2 * spec.shape[0] && q.cols == spec.shape[1])
            .map(|q| (q, vec![gname.to_string(), up])));
    }
    let untied_head = spec.name == "output.weight" && !model.cfg.tied_embeddings;
    if !(super::deepseek2_packed::packable(&spec.name) || untied_head) || !has(gname) {
        return Ok(None);
    }
    let (rows, cols) = (spec.shape[0], spec.shape[1]);
    let mut want = vec![cols as u64, rows as u64];
    if expert.is_some() {
        want.push(model.cfg.n_routed_experts as u64);
    }
    if !g.tensors.iter().any(|t| t.name == gname && t.dims == want) {
        return Ok(None); // the f32 path names the shape at fault
    }
    let q = pk.matrix(g, gname, expert.unwrap_or(0) * rows, rows)?;
    Ok(q.filter(|q| q.cols == cols)
        .map(|q| (q, vec![gname.to_string()])))
}

/// Expert `j`'s `[out, in]` slice of the stacked tensor `name` (`[E, out, in]`; the fused
/// `ffn_gate_up_exps` `[E, 2I, d]` for a missing gate or up stack), and the tensor it came
/// from; `None` when neither exists.
fn expert_slice(
    g: &Gguf,
    stacks: &mut HashMap<String, (Vec<usize>, Vec<f32>)>,
    name: &str,
    j: usize,
    n_exp: usize,
    shape: &[usize],
) -> Result<Option<(Vec<f32>, String)>> {
    let exists = |n: &str| g.tensors.iter().any(|t| t.name == n);
    let fused = name
        .replace("ffn_gate_exps", "ffn_gate_up_exps")
        .replace("ffn_up_exps", "ffn_gate_up_exps");
    let (src, part) = if exists(name) {
        (name.to_string(), None)
    } else if fused != name && exists(&fused) {
        (fused, Some(usize::from(name.contains("ffn_up_exps"))))
    } else {
        return Ok(None);
    };
    if !stacks.contains_key(&src) {
        stacks.insert(src.clone(), g.tensor_f32(&src)?);
    }
    let (have, all) = &stacks[&src];
    let rows = shape[0] * if part.is_some() { 2 } else { 1 };
    let want = [n_exp, rows, shape[1]];
    if have[..] != want {
        bail!(
            "{}: tensor `{src}` has shape {have:?}, expected {want:?}",
            g.path.display()
        );
    }
    let n = shape[0] * shape[1];
    let base = j * rows * shape[1] + part.unwrap_or(0) * n;
    Ok(Some((all[base..base + n].to_vec(), src)))
}

/// Hugging Face's `kv_b_proj` `[H·(d_n+d_v), r]` from the converter's split `attn_k_b`
/// `[H, r, d_n]` (each head's `W_UK` transposed) and `attn_v_b` `[H, d_v, r]`.
fn kv_b_from_split(
    g: &Gguf,
    kb: &str,
    vb: &str,
    c: &ModelConfig,
    m: &MlaConfig,
) -> Result<Vec<f32>> {
    let (h, r, dn, dv) = (c.n_heads, m.kv_lora_rank, m.qk_nope_head_dim, m.v_head_dim);
    let (ks, k) = g.tensor_f32(kb)?;
    let (vs, v) = g.tensor_f32(vb)?;
    for (name, have, want) in [(kb, &ks, [h, r, dn]), (vb, &vs, [h, dv, r])] {
        if have[..] != want {
            bail!(
                "{}: tensor `{name}` has shape {have:?}, expected {want:?}",
                g.path.display()
            );
        }
    }
    let mut w = vec![0.0f32; h * (dn + dv) * r];
    for hh in 0..h {
        let base = hh * (dn + dv) * r;
        for i in 0..dn {
            for cc in 0..r {
                w[base + i * r + cc] = k[(hh * r + cc) * dn + i];
            }
        }
        w[base + dn * r..base + (dn + dv) * r].copy_from_slice(&v[hh * dv * r..(hh + 1) * dv * r]);
    }
    Ok(w)
}
