//! The Llama-family architectures of GGUF files (`general.architecture`): what each one's
//! metadata and tensor names mean as a mnemo [`ModelConfig`] and parameter names.
//!
//! | arch    | attention extras                        | RoPE (llama.cpp)        | head width |
//! |---------|-----------------------------------------|-------------------------|------------|
//! | `llama` | none                                    | normal: adjacent pairs  | `d / H`    |
//! | `qwen2` | q/k/v biases (`attn_{q,k,v}.bias`)      | NeoX: rotate-half pairs | `d / H`    |
//! | `qwen3` | per-head q/k RMSNorm (`attn_{q,k}_norm`) | NeoX: rotate-half pairs | `attention.key_length` |
//!
//! Llama GGUFs store q/k rows permuted so that RoPE pairs adjacent dims (mnemo's
//! `interleaved` layout); Qwen GGUFs keep the Hugging Face order (mnemo's `half`). Metadata
//! keys are `{arch}.{key}`.

use super::{Gguf, Value};
use crate::config::ModelConfig;
use crate::kernels::rope::RopeLayout;
use anyhow::{bail, Result};

/// The architectures [`llama_family_config`] reads.
pub const LLAMA_FAMILY: &[&str] = &["llama", "qwen2", "qwen3"];

/// The model configuration of a Llama-family GGUF (`arch` one of [`LLAMA_FAMILY`]) with
/// `vocab` tokens, the context capped at `max_seq_len`.
pub(super) fn llama_family_config(
    g: &Gguf,
    arch: &str,
    vocab: usize,
    max_seq_len: usize,
) -> Result<ModelConfig> {
    let (rope_layout, qkv_bias, qk_norm) = match arch {
        "llama" => (RopeLayout::Interleaved, false, false),
        "qwen2" => (RopeLayout::Half, true, false),
        "qwen3" => (RopeLayout::Half, false, true),
        other => bail!(
            "{}: architecture `{other}` is not supported (supported: {})",
            g.path.display(),
            LLAMA_FAMILY.join(", ")
        ),
    };
    let a = |k: &str| format!("{arch}.{k}");
    let f = |k: &str| g.meta.get(&a(k)).and_then(Value::as_f64);
    let d = g.get_u(&a("embedding_length"))?;
    let heads = g.get_u(&a("attention.head_count"))?;
    let head_dim = g.get_u(&a("attention.key_length")).unwrap_or(d / heads);
    if let Ok(vd) = g.get_u(&a("attention.value_length")) {
        if vd != head_dim {
            bail!(
                "{}: {} ({vd}) differs from {} ({head_dim}); mnemo needs equal key and value \
                 head widths",
                g.path.display(),
                a("attention.value_length"),
                a("attention.key_length")
            );
        }
    }
    let has_output = g.tensors.iter().any(|t| t.name == "output.weight");
    Ok(ModelConfig {
        vocab_size: vocab,
        d_model: d,
        n_layers: g.get_u(&a("block_count"))?,
        n_heads: heads,
        n_kv_heads: g.get_u(&a("attention.head_count_kv")).unwrap_or(heads),
        head_dim,
        rope_theta: f("rope.freq_base").unwrap_or(10000.0),
        rope_dim: g.get_u(&a("rope.dimension_count")).unwrap_or(head_dim),
        rope_layout,
        ffn_hidden: g.get_u(&a("feed_forward_length"))?,
        tied_embeddings: !has_output,
        norm_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f32,
        init_std: 0.02,
        max_seq_len: g
            .get_u(&a("context_length"))
            .unwrap_or(2048)
            .min(max_seq_len),
        qkv_bias,
        qk_norm,
        ..ModelConfig::dense_defaults()
    })
}

/// The GGUF name of a mnemo parameter of a Llama-family model.
pub(super) fn gguf_name(ours: &str) -> String {
    if let Some(rest) = ours.strip_prefix("layers.") {
        let (i, t) = rest.split_once('.').expect("layer tensor names have a dot");
        let t = match t {
            "attention_norm.weight" => "attn_norm.weight",
            "attention.wq.weight" => "attn_q.weight",
            "attention.wk.weight" => "attn_k.weight",
            "attention.wv.weight" => "attn_v.weight",
            "attention.wq.bias" => "attn_q.bias",
            "attention.wk.bias" => "attn_k.bias",
            "attention.wv.bias" => "attn_v.bias",
            "attention.q_norm.weight" => "attn_q_norm.weight",
            "attention.k_norm.weight" => "attn_k_norm.weight",
            "attention.wo.weight" => "attn_output.weight",
            "ffn_norm.weight" => "ffn_norm.weight",
            "feed_forward.w1.weight" => "ffn_gate.weight",
            "feed_forward.w3.weight" => "ffn_up.weight",
            "feed_forward.w2.weight" => "ffn_down.weight",
            other => other,
        };
        format!("blk.{i}.{t}")
    } else {
        match ours {
            "tok_embeddings.weight" => "token_embd.weight".into(),
            "norm.weight" => "output_norm.weight".into(),
            other => other.into(),
        }
    }
}
