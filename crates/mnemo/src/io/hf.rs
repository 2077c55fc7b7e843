//! Hugging Face Llama checkpoints: a directory with `config.json` (`LlamaConfig` keys),
//! `model.safetensors` (`model.layers.N.self_attn.q_proj.weight`, … in F32, F16 or BF16) and
//! `tokenizer.json` (plus an optional `tokenizer_config.json` for the EOS token and chat
//! template). Hugging Face applies RoPE in the rotate-half layout over the whole head, so the
//! model uses `rope_layout = half` and needs no permutation of q/k.

use crate::config::ModelConfig;
use crate::io::safetensors::{serialize, TensorFile};
use crate::kernels::rope::{RopeLayout, RopeScaling};
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Whether `dir` looks like a Hugging Face checkpoint (its config.json has `hidden_size`).
pub fn is_hf_dir(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .is_some_and(|v| v.get("hidden_size").is_some())
}

/// Our tensor name → the Hugging Face Llama name.
pub fn hf_name(ours: &str) -> String {
    if let Some(rest) = ours.strip_prefix("layers.") {
        let (i, t) = rest.split_once('.').expect("layer tensor names have a dot");
        let t = match t {
            "attention_norm.weight" => "input_layernorm.weight",
            "attention.wq.weight" => "self_attn.q_proj.weight",
            "attention.wk.weight" => "self_attn.k_proj.weight",
            "attention.wv.weight" => "self_attn.v_proj.weight",
            "attention.wo.weight" => "self_attn.o_proj.weight",
            "ffn_norm.weight" => "post_attention_layernorm.weight",
            "feed_forward.w1.weight" => "mlp.gate_proj.weight",
            "feed_forward.w3.weight" => "mlp.up_proj.weight",
            "feed_forward.w2.weight" => "mlp.down_proj.weight",
            other => other,
        };
        format!("model.layers.{i}.{t}")
    } else {
        match ours {
            "tok_embeddings.weight" => "model.embed_tokens.weight".into(),
            "norm.weight" => "model.norm.weight".into(),
            "output.weight" => "lm_head.weight".into(),
            other => other.into(),
        }
    }
}

/// Load a Hugging Face Llama checkpoint directory with its tokenizer; `max_seq_len` caps the
/// context.
pub fn load_llama(dir: &Path, max_seq_len: usize) -> Result<(Model, Tokenizer)> {
    let model = load_llama_model(dir, max_seq_len)?;
    let tok = Tokenizer::load(&dir.join("tokenizer.json"))?;
    if tok.vocab_size() > model.cfg.vocab_size {
        bail!(
            "{}: the tokenizer has more tokens than vocab_size",
            dir.display()
        );
    }
    Ok((model, tok))
}

/// The model of a Hugging Face Llama checkpoint directory (no tokenizer read).
pub fn load_llama_model(dir: &Path, max_seq_len: usize) -> Result<Model> {
    let cpath = dir.join("config.json");
    let text = std::fs::read_to_string(&cpath)
        .with_context(|| format!("cannot read {}", cpath.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", cpath.display()))?;
    let get = |k: &str| -> Result<usize> {
        v.get(k)
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
            .with_context(|| format!("{}: `{k}` is missing or not a number", cpath.display()))
    };
    if let Some(arch) = v["architectures"]
        .as_array()
        .and_then(|a| a.first())
        .and_then(|a| a.as_str())
    {
        if arch != "LlamaForCausalLM" {
            bail!(
                "{}: architecture `{arch}` is not supported (only LlamaForCausalLM)",
                cpath.display()
            );
        }
    }
    let (d, heads) = (get("hidden_size")?, get("num_attention_heads")?);
    let rope_scaling = match v.get("rope_scaling") {
        None | Some(serde_json::Value::Null) => None,
        Some(rs) => Some(
            yarn_from_hf(rs, get("max_position_embeddings").unwrap_or(2048))
                .with_context(|| format!("{}: `rope_scaling`", cpath.display()))?,
        ),
    };
    let hd = get("head_dim").unwrap_or(d / heads);
    let cfg = ModelConfig {
        vocab_size: get("vocab_size")?,
        d_model: d,
        n_layers: get("num_hidden_layers")?,
        n_heads: heads,
        n_kv_heads: get("num_key_value_heads").unwrap_or(heads),
        head_dim: hd,
        rope_theta: v["rope_theta"].as_f64().unwrap_or(10000.0),
        rope_dim: hd,
        rope_layout: RopeLayout::Half,
        ffn_hidden: get("intermediate_size")?,
        tied_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
        norm_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
        init_std: 0.02,
        max_seq_len: get("max_position_embeddings")
            .unwrap_or(2048)
            .min(max_seq_len),
        rope_scaling,
        ..ModelConfig::dense_defaults()
    };
    let mut model = Model::new(cfg)
        .with_context(|| format!("{}: inconsistent model config", cpath.display()))?;
    let f = TensorFile::open(&dir.join("model.safetensors"))?;
    for spec in model.layout.tensors.clone() {
        let w = f.f32(&hf_name(&spec.name), Some(&spec.shape))?;
        model.params[spec.range()].copy_from_slice(&w);
    }
    Ok(model)
}

/// Hugging Face's `rope_scaling: {rope_type: yarn, factor, original_max_position_embeddings,
/// beta_fast, beta_slow[, attention_factor]}` (the original context defaults to
/// `max_position_embeddings`). Transformers multiplies cos/sin by `attention_factor`
/// (default `0.1·ln(factor) + 1`) on q and k, which for RoPE over the whole head (Llama) is
/// DeepSeek's `softmax_scale·mscale²` with `mscale = 1`; other attention factors, and the
/// DeepSeek-specific `mscale`/`mscale_all_dim` keys, are refused.
fn yarn_from_hf(rs: &serde_json::Value, max_pos: usize) -> Result<RopeScaling> {
    let kind = rs["rope_type"]
        .as_str()
        .or(rs["type"].as_str())
        .unwrap_or("");
    if kind != "yarn" {
        bail!("type `{kind}` is not supported (only yarn)");
    }
    for k in ["mscale", "mscale_all_dim", "long_factor", "short_factor"] {
        if rs.get(k).is_some_and(|x| !x.is_null()) {
            bail!("the key `{k}` is not supported");
        }
    }
    let factor = rs["factor"]
        .as_f64()
        .context("`factor` is missing or not a number")?;
    let num = |k: &str, d: f64| rs.get(k).and_then(|x| x.as_f64()).unwrap_or(d);
    let s = RopeScaling {
        factor,
        original_max_position_embeddings: rs
            .get("original_max_position_embeddings")
            .and_then(|x| x.as_u64())
            .map_or(max_pos, |x| x as usize),
        beta_fast: num("beta_fast", 32.0),
        beta_slow: num("beta_slow", 1.0),
        mscale: 1.0,
    };
    if let Some(a) = rs.get("attention_factor").and_then(|x| x.as_f64()) {
        if (a - s.mscale()).abs() > 1e-6 {
            bail!(
                "attention_factor {a} differs from 0.1·ln(factor) + 1 = {}: not supported",
                s.mscale()
            );
        }
    }
    Ok(s)
}

/// Rows of a q/k projection `[heads·hd, d]` in the interleaved RoPE layout reordered to the
/// rotate-half layout: within each head, row `2j + i` moves to `i·hd/2 + j`.
fn interleaved_to_half(w: &[f32], heads: usize, hd: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; w.len()];
    for h in 0..heads {
        for j in 0..hd / 2 {
            for i in 0..2 {
                let src = (h * hd + 2 * j + i) * d;
                let dst = (h * hd + i * hd / 2 + j) * d;
                out[dst..dst + d].copy_from_slice(&w[src..src + d]);
            }
        }
    }
    out
}

/// Write `model` and `tok` as a Hugging Face Llama directory (F32 safetensors). The model must
/// be dense with RoPE over the whole head (as Llama has).
pub fn export(model: &Model, tok: &Tokenizer, dir: &Path) -> Result<()> {
    let c = &model.cfg;
    if c.ffn != crate::config::FfnKind::Dense || c.rope_dim != c.head_dim {
        bail!("only dense models with RoPE over the whole head export to the Llama layout");
    }
    if !c.residual.is_plain() {
        bail!(
            "models with hyper-connections (residual = hc/mhc) have no Llama layout to export to"
        );
    }
    if c.rope_scaling.as_ref().is_some_and(|r| r.mscale != 1.0) {
        bail!("YaRN with mscale != 1 has no Hugging Face Llama equivalent to export to");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for spec in &model.layout.tensors {
        let mut w = model.params[spec.range()].to_vec();
        let is_q = spec.name.ends_with("attention.wq.weight");
        let is_k = spec.name.ends_with("attention.wk.weight");
        if c.rope_layout == RopeLayout::Interleaved && (is_q || is_k) {
            let heads = if is_q { c.n_heads } else { c.n_kv_heads };
            w = interleaved_to_half(&w, heads, c.head_dim, c.d_model);
        }
        tensors.push((hf_name(&spec.name), spec.shape.clone(), w));
    }
    let views: Vec<(String, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(n, s, w)| (n.clone(), s.clone(), &w[..]))
        .collect();
    crate::util::write_atomic(
        &dir.join("model.safetensors"),
        &serialize(&views, Default::default())?,
    )?;
    let mut config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "intermediate_size": c.ffn_hidden, "rope_theta": c.rope_theta, "rms_norm_eps": c.norm_eps,
        "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": c.tied_embeddings,
        "hidden_act": "silu", "torch_dtype": "float32",
    });
    if let Some(r) = &c.rope_scaling {
        config["rope_scaling"] = serde_json::json!({
            "rope_type": "yarn", "type": "yarn", "factor": r.factor,
            "original_max_position_embeddings": r.original_max_position_embeddings,
            "beta_fast": r.beta_fast, "beta_slow": r.beta_slow, "attention_factor": r.mscale(),
        });
    }
    crate::util::write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    tok.save(&dir.join("tokenizer.json"))?;
    let mut tc = serde_json::json!({"eos_token": tok.id_to_token(tok.eot())});
    if let Some(t) = tok.chat_template() {
        tc["chat_template"] = t.into();
    }
    crate::util::write_atomic(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc)?.as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An interleaved-RoPE model exported to the Hugging Face layout (q/k rows permuted to
    /// rotate-half) and loaded back computes the same logits.
    #[test]
    fn export_then_load_gives_the_same_logits() {
        let mut cfg = ModelConfig::preset("tiny").unwrap();
        cfg.vocab_size = 300;
        cfg.d_model = 48;
        cfg.n_layers = 2;
        cfg.n_heads = 4;
        cfg.n_kv_heads = 2;
        cfg.head_dim = 12;
        cfg.rope_dim = 12;
        cfg.ffn_hidden = 40;
        cfg.tied_embeddings = false;
        // YaRN travels as `rope_scaling: {rope_type: yarn, ...}`.
        cfg.rope_scaling = Some(RopeScaling::yarn(2.0, 128));
        let mut m = Model::new(cfg).unwrap();
        m.init(5);
        let tok =
            Tokenizer::train(["fn main() { let x = 1; }\n".repeat(50)].into_iter(), 300).unwrap();
        let dir = std::env::temp_dir().join(format!("mnemo-hf-{}", std::process::id()));
        export(&m, &tok, &dir).unwrap();
        assert!(is_hf_dir(&dir));
        let l = crate::checkpoint::load(&dir, false).unwrap();
        assert_eq!(l.model.cfg.rope_layout, RopeLayout::Half);
        assert_eq!(l.model.cfg.rope_scaling, m.cfg.rope_scaling);
        let toks: Vec<u32> = (0..20).map(|i| (i * 13 % 300) as u32).collect();
        let run = |m: &Model| {
            let mut c = crate::generate::KvCache::new(m);
            m.forward_cached(&toks, &mut c).unwrap()
        };
        let (a, b) = (run(&m), run(&l.model));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
        assert_eq!(l.tokenizer.eot(), tok.eot());
        let bad = serde_json::json!({"type": "linear", "factor": 2.0});
        assert!(yarn_from_hf(&bad, 64)
            .unwrap_err()
            .to_string()
            .contains("linear"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
