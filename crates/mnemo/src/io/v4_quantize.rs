//! A float DeepSeek-V4 model written as a checkpoint in the official release layout
//! ([`write_official`]), the mix `inference/model.py` reads and [`super::v4_official`] loads:
//!
//! - FP8 e4m3 (`F8_E4M3` `[out, in]`, `.scale` `F8_E8M0` `[ceil(out/128), ceil(in/128)]`):
//!   attention `wq_a`, `wq_b`, `wkv`, `wo_b`, indexer `wq_b`, shared experts `w1`, `w2`, `w3`;
//!   and the routed experts with [`QuantMix::Fp8`];
//! - FP4 e2m1 (`I8` `[out, in/2]`, even element in the low nibble, `.scale` `F8_E8M0`
//!   `[out, in/32]`): the routed experts with [`QuantMix::Fp8Fp4`] (the release's mix);
//! - BF16: `embed`, `wo_a`, indexer `weights_proj`, the router `gate.weight`, the compressors'
//!   `wkv`/`wgate`; F32 the rest (head, norms, sinks, `ape`, hyper-connections, gate bias);
//!   `tid2eid` I32.
//!
//! Scales are powers of two, `2^k` with `k` the smallest such that the block's largest
//! magnitude fits (`kernels::fp8::quantize_fp8` / `quantize_fp4`). `config.json` is
//! transformers' `deepseek_v4` config ([`super::hf_v4::config_to_hf`]) with the
//! `quantization_config` transformers' fine-grained FP8 loader expects (`quant_method: fp8`,
//! `fmt: e4m3`, `scale_fmt: ue8m0`, `weight_block_size: [128, 128]`, `activation_scheme:
//! dynamic`) and `expert_dtype`. The MTP blocks are not written.

use super::hf_v4::config_to_hf;
use super::safetensors::Dtype;
use super::v4_official::{official_name, scale_name, FP4_BLOCK};
use crate::kernels::fp8::{quantize_fp4, quantize_fp8};
use crate::model::{Ffn, Model};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Which weights go to which format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantMix {
    /// The release's mix: FP8 attention and shared experts, FP4 routed experts.
    Fp8Fp4,
    /// FP8 everywhere the release has FP8 or FP4.
    Fp8,
}

/// FP8 block of the written checkpoints.
pub const FP8_BLOCK: [usize; 2] = [128, 128];

const FP8_SUFFIXES: [&str; 8] = [
    "attn.wq_a.weight",
    "attn.wq_b.weight",
    "attn.wkv.weight",
    "attn.wo_b.weight",
    "attn.indexer.wq_b.weight",
    "ffn.shared_experts.w1.weight",
    "ffn.shared_experts.w2.weight",
    "ffn.shared_experts.w3.weight",
];
const BF16_SUFFIXES: [&str; 6] = [
    "embed.weight",
    "attn.wo_a.weight",
    "attn.indexer.weights_proj.weight",
    "ffn.gate.weight",
    "compressor.wkv.weight",
    "compressor.wgate.weight",
];

/// How the official tensor `name` is stored under `mix`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    Fp8,
    Fp4,
    Bf16,
    F32,
}

pub fn stored_as(name: &str, mix: QuantMix) -> Stored {
    if name.contains(".ffn.experts.") {
        return match mix {
            QuantMix::Fp8Fp4 => Stored::Fp4,
            QuantMix::Fp8 => Stored::Fp8,
        };
    }
    if FP8_SUFFIXES.iter().any(|s| name.ends_with(s)) {
        Stored::Fp8
    } else if BF16_SUFFIXES.iter().any(|s| name.ends_with(s)) {
        Stored::Bf16
    } else {
        Stored::F32
    }
}

/// f32 to bf16 bytes, round to nearest even.
fn bf16(x: f32) -> [u8; 2] {
    let b = x.to_bits();
    let r = b.wrapping_add(0x7fff + ((b >> 16) & 1));
    ((r >> 16) as u16).to_le_bytes()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Write `model` (a DeepSeek-V4 model, f32) to `dir` in the official layout (module doc):
/// `config.json` and `model.safetensors`. Returns the number of tensors written.
pub fn write_official(model: &Model, dir: &Path, mix: QuantMix) -> Result<usize> {
    let c = &model.cfg;
    let mut cfg = config_to_hf(c)?;
    cfg["quantization_config"] = serde_json::json!({
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "scale_fmt": "ue8m0",
        "weight_block_size": FP8_BLOCK,
    });
    cfg["expert_dtype"] = match mix {
        QuantMix::Fp8Fp4 => "fp4",
        QuantMix::Fp8 => "fp8",
    }
    .into();
    cfg["num_nextn_predict_layers"] = 0.into();
    let mut out: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut put = |name: String, w: &[f32], shape: &[usize]| -> Result<()> {
        match (stored_as(&name, mix), shape) {
            (Stored::Fp8, &[rows, cols]) => {
                let (q, e) = quantize_fp8(w, rows, cols, FP8_BLOCK);
                let sshape = vec![rows.div_ceil(FP8_BLOCK[0]), cols.div_ceil(FP8_BLOCK[1])];
                out.push((scale_name(&name), Dtype::F8_E8M0, sshape, e));
                out.push((name, Dtype::F8_E4M3, shape.to_vec(), q));
            }
            (Stored::Fp4, &[rows, cols]) => {
                if !cols.is_multiple_of(FP4_BLOCK) {
                    bail!(
                        "`{name}` [{rows}, {cols}]: FP4 needs a multiple of {FP4_BLOCK} \
                         columns (use --type fp8)"
                    );
                }
                let (p, e) = quantize_fp4(w, rows, cols, FP4_BLOCK);
                out.push((
                    scale_name(&name),
                    Dtype::F8_E8M0,
                    vec![rows, cols / FP4_BLOCK],
                    e,
                ));
                out.push((name, Dtype::I8, vec![rows, cols / 2], p));
            }
            (Stored::Fp8 | Stored::Fp4, _) => {
                bail!("`{name}` has shape {shape:?}: only matrices are quantised")
            }
            (Stored::Bf16, _) => {
                let b = w.iter().flat_map(|&x| bf16(x)).collect();
                out.push((name, Dtype::BF16, shape.to_vec(), b));
            }
            (Stored::F32, _) => out.push((name, Dtype::F32, shape.to_vec(), f32_bytes(w))),
        }
        Ok(())
    };
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
            continue; // hash layers route by table: no bias
        }
        put(
            official_name(&spec.name),
            &model.params[spec.range()],
            &spec.shape,
        )?;
    }
    // Tied embeddings: no `head.weight` (the config says they are tied).
    for (l, tab) in model.hash_tables.iter().enumerate().take(c.n_layers) {
        if let Some(tab) = tab {
            let b = tab.iter().flat_map(|&e| (e as i32).to_le_bytes()).collect();
            out.push((
                format!("layers.{l}.ffn.gate.tid2eid"),
                Dtype::I32,
                vec![c.vocab_size, c.top_k],
                b,
            ));
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let views = out
        .iter()
        .map(|(n, dt, s, b)| {
            ::safetensors::tensor::TensorView::new(*dt, s.clone(), b)
                .map(|v| (n.clone(), v))
                .with_context(|| format!("tensor `{n}`"))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    let bytes = ::safetensors::serialize(views, Some(meta))?;
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
    Ok(out.len())
}
