//! DeepSeek-V4 checkpoints in the official layout: the directories DeepSeek releases
//! (`deepseek-ai/DeepSeek-V4-Flash`, …), read by their `inference/model.py`.
//!
//! What such a directory holds:
//!
//! - `config.json`: `model_type: deepseek_v4` with the official (legacy) keys —
//!   `compress_ratios` (one per layer, plus trailing entries for the MTP layers),
//!   `num_hash_layers`, `qk_rope_head_dim`, a flat `rope_scaling` — which
//!   [`super::hf_v4::config_from_hf`] folds as transformers does; `quantization_config`
//!   (`weight_block_size`, default `[128, 128]`) and `expert_dtype` (`"fp4"`).
//! - The tensors, in `model.safetensors` or sharded with `model.safetensors.index.json`
//!   ([`Shards`]), under the module paths of `inference/model.py`: `embed.weight`,
//!   `head.weight`, `norm.weight`, `hc_head_{fn,base,scale}`; per layer `layers.{i}.` +
//!   `attn_norm.weight`, `ffn_norm.weight`, `hc_{attn,ffn}_{fn,base,scale}`,
//!   `attn.{wq_a,q_norm,wq_b,wkv,kv_norm,wo_a,wo_b}.weight`, `attn.attn_sink`,
//!   `attn.compressor.{wkv,wgate,norm}.weight`, `attn.compressor.ape`,
//!   `attn.indexer.{wq_b,weights_proj}.weight`, `attn.indexer.compressor.*`,
//!   `ffn.gate.weight`, `ffn.gate.bias` (top-k layers) or `ffn.gate.tid2eid` (hash layers,
//!   I32/I64 `[vocab, top_k]`), `ffn.shared_experts.{w1,w2,w3}.weight`,
//!   `ffn.experts.{j}.{w1,w2,w3}.weight`; and `mtp.{k}.*`, the multi-token-prediction
//!   layers ([`is_mtp`]). mnemo's own names are these except for five ([`official_name`]).
//! - Dtypes: F32, BF16 or F16 as they are; FP8 and FP4 dequantised on load
//!   ([`crate::kernels::fp8`]), each with a scale tensor beside it (`….weight` → `….scale`):
//!   - FP8 `F8_E4M3` weight `[out, in]`, scale `[ceil(out/128), ceil(in/128)]`, one per
//!     128 × 128 block (edge blocks partial);
//!   - FP4 (the routed experts): two e2m1 values per byte, the even element in the low
//!     nibble, stored as `I8`/`U8` `[out, in/2]` or `F4` `[out, in]`; scale `[out, in/32]`;
//!   - scales `F8_E8M0` or `U8` (exponent bytes, `2^(e−127)`), or F32/BF16/F16 values.
//!
//! Every tensor of the model must be there and every stored tensor used (the MTP layers
//! load when complete and are skipped otherwise, [`is_mtp`]): missing and unexpected names
//! are listed together.

use super::hf_v4::{config_from_hf, is_v4_dir};
use super::safetensors::Dtype;
use super::shards::Shards;
use super::v4_coded::read_coded;
use crate::kernels::fp8::{dequant_fp4, dequant_fp8};
use crate::model::{Ffn, Model};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;

/// Values per FP4 scale along a row (`fp4_block_size` of `inference/model.py`).
pub const FP4_BLOCK: usize = 32;

/// Whether `dir` holds a DeepSeek-V4 checkpoint in the official layout: a `deepseek_v4`
/// config and tensors named as `inference/model.py` names them (`embed.weight`, no
/// `model.` prefix as transformers writes).
pub fn is_official_dir(dir: &Path) -> bool {
    is_v4_dir(dir)
        && Shards::open(dir).is_ok_and(|s| {
            s.contains("embed.weight") && !s.names().iter().any(|n| n.starts_with("model."))
        })
}

/// The official name of the mnemo tensor `ours`.
pub fn official_name(ours: &str) -> String {
    match ours {
        "tok_embeddings.weight" => return "embed.weight".into(),
        "output.weight" => return "head.weight".into(),
        _ => {}
    }
    if let Some(rest) = ours.strip_prefix("hc_head.") {
        return format!("hc_head_{rest}");
    }
    let Some(rest) = ours.strip_prefix("layers.") else {
        return ours.to_string();
    };
    let Some((i, tail)) = rest.split_once('.') else {
        return ours.to_string();
    };
    let tail = if tail == "attention_norm.weight" {
        "attn_norm.weight".to_string()
    } else if let Some(s) = tail.strip_prefix("attn_hc.") {
        format!("hc_attn_{s}")
    } else if let Some(s) = tail.strip_prefix("ffn_hc.") {
        format!("hc_ffn_{s}")
    } else {
        tail.to_string()
    };
    format!("layers.{i}.{tail}")
}

/// Whether a stored tensor belongs to a multi-token-prediction layer (`mtp.{k}.*`).
///
/// mnemo's MTP tensors carry these names as they are (`model::mtp`). The loader loads the
/// MTP blocks when every tensor of them is stored; an incomplete set (e.g. a checkpoint that
/// keeps a few `mtp.*` tensors only) is skipped with a warning naming what is missing, and
/// the model is the main layers alone.
pub fn is_mtp(name: &str) -> bool {
    name.starts_with("mtp.")
}

/// The scale tensor that goes with the quantised weight `name` (`….weight` → `….scale`).
pub fn scale_name(name: &str) -> String {
    match name.strip_suffix(".weight") {
        Some(base) => format!("{base}.scale"),
        None => format!("{name}.scale"),
    }
}

/// How a weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Storage {
    /// F32, BF16 or F16: read as it is.
    Plain,
    /// FP8 e4m3 with 128 × 128 block scales.
    Fp8,
    /// FP4 e2m1, two per byte, with per-32 scales.
    Fp4,
}

pub(crate) fn storage(dtype: Dtype) -> Option<Storage> {
    match dtype {
        Dtype::F32 | Dtype::BF16 | Dtype::F16 => Some(Storage::Plain),
        Dtype::F8_E4M3 => Some(Storage::Fp8),
        Dtype::I8 | Dtype::U8 | Dtype::F4 => Some(Storage::Fp4),
        _ => None,
    }
}

/// The FP8 block size `[rows, cols]` of `config.json` (`quantization_config.weight_block_size`,
/// default `[128, 128]`).
pub fn fp8_block(v: &Value) -> Result<[usize; 2]> {
    match &v["quantization_config"]["weight_block_size"] {
        Value::Null => Ok([128, 128]),
        Value::Array(a) if a.len() == 2 => {
            let get = |x: &Value| x.as_u64().filter(|&b| b > 0).map(|b| b as usize);
            match (get(&a[0]), get(&a[1])) {
                (Some(r), Some(c)) => Ok([r, c]),
                _ => bail!("config.json: quantization_config.weight_block_size must be two positive integers, not {}", Value::Array(a.clone())),
            }
        }
        x => bail!(
            "config.json: quantization_config.weight_block_size must be [rows, cols], not {x}"
        ),
    }
}

/// Weight `name` of shape `shape` as f32, dequantised when it is FP8 or FP4 (with its scale,
/// which must exist: see [`needs_scale`]). Errors name the file, the tensor and the value.
pub fn read_weight(
    src: &Shards,
    name: &str,
    shape: &[usize],
    fp8_block: [usize; 2],
) -> Result<Vec<f32>> {
    let Some(c) = read_coded(src, name, shape, fp8_block)? else {
        return src.f32(name, Some(shape));
    };
    let scales = c.scales(src, name)?;
    let values = match c.kind {
        Storage::Fp8 => dequant_fp8(c.codes, &scales, c.rows, c.cols, fp8_block),
        _ => dequant_fp4(c.codes, &scales, c.rows, c.cols, FP4_BLOCK),
    };
    if let Some(i) = values.iter().position(|x| !x.is_finite()) {
        let (r, col) = (i / c.cols, i % c.cols);
        let raw = match c.kind {
            Storage::Fp8 => format!("byte {:#04x}", c.codes[i]),
            _ => format!("byte {:#04x}", c.codes[i / 2]),
        };
        bail!(
            "{}: tensor `{name}` holds a NaN at [{r}, {col}] ({raw}; FP8 e4m3 0x7f/0xff are NaN)",
            c.file
        );
    }
    Ok(values)
}

/// Whether stored tensor `name` is FP8 or FP4, and so needs a `.scale` beside it.
fn needs_scale(src: &Shards, name: &str) -> bool {
    src.raw(name)
        .is_ok_and(|(t, _)| matches!(storage(t.dtype), Some(Storage::Fp8 | Storage::Fp4)))
}

/// Load an official DeepSeek-V4 directory (see the module doc).
pub fn load_dir(dir: &Path) -> Result<Model> {
    load_dir_with(dir, None)
}

/// A loader's hook ([`load_dir_with`]): given the checkpoint, a model tensor and its stored
/// name (present, its scale too when quantised), `true` when it took the tensor (so its f32
/// copy is not made).
pub(crate) type Take<'a> =
    &'a mut dyn FnMut(&Shards, &crate::model::TensorSpec, &str) -> Result<bool>;

/// [`load_dir`]; with `take`, the model's parameters are a reserved mapping
/// ([`crate::model::Params::reserved`]) and the tensors `take` takes are left unwritten.
pub(crate) fn load_dir_with(dir: &Path, mut take: Option<Take>) -> Result<Model> {
    let cpath = dir.join("config.json");
    let text =
        std::fs::read_to_string(&cpath).with_context(|| format!("reading {}", cpath.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", cpath.display()))?;
    let full = config_from_hf(&v).with_context(|| format!("{}", cpath.display()))?;
    let block = fp8_block(&v).with_context(|| format!("{}", cpath.display()))?;
    let src = Shards::open(dir)?;
    // The MTP blocks load when all their tensors are stored (see [`is_mtp`]).
    let missing_mtp = missing_mtp_tensors(&full, &src)?;
    let cfg = match &missing_mtp {
        None => full,
        Some(_) => full.without_mtp(),
    };
    let mut model = match take {
        None => Model::new(cfg).context("the DeepSeek-V4 config")?,
        Some(_) => Model::new_reserved(cfg).context("the DeepSeek-V4 config")?,
    };
    let mut used = HashSet::new();
    let mut missing = Vec::new();
    for spec in model.layout.tensors.clone() {
        let key = official_name(&spec.name);
        if !src.contains(&key) {
            let hash_bias = model
                .layout
                .layers
                .iter()
                .any(|lo| matches!(lo.ffn, Ffn::Moe(mo) if mo.hash && mo.bias == spec.offset));
            if !hash_bias {
                missing.push(key); // hash layers select by table: no bias (zeros)
            }
            continue;
        }
        if needs_scale(&src, &key) {
            let s = scale_name(&key);
            if !src.contains(&s) {
                missing.push(s);
                used.insert(key); // the weight is there; its scale is what is missing
                continue;
            }
            used.insert(s);
        }
        if let Some(take) = take.as_mut() {
            if take(&src, &spec, &key)? {
                used.insert(key);
                continue;
            }
        }
        let w = read_weight(&src, &key, &spec.shape, block)?;
        if let Some(i) = w.iter().position(|x| !x.is_finite()) {
            bail!(
                "{}: tensor `{key}` holds {} at index {i}",
                src.file(&key)?.path().display(),
                w[i]
            );
        }
        model.params[spec.range()].copy_from_slice(&w);
        used.insert(key);
    }
    let c = model.cfg.clone();
    for l in (0..c.n_layers).filter(|&l| c.is_hash(l)) {
        let key = format!("layers.{l}.ffn.gate.tid2eid");
        if !src.contains(&key) {
            missing.push(key);
            continue;
        }
        let tab = src.u32_shaped(&key, Some(&[c.vocab_size, c.top_k]))?;
        if let Some(bad) = tab.iter().find(|&&e| e as usize >= c.n_routed_experts) {
            bail!(
                "{}: `{key}` routes to expert {bad} of {}",
                src.file(&key)?.path().display(),
                c.n_routed_experts
            );
        }
        model.hash_tables[l] = Some(tab);
        used.insert(key);
    }
    let names = src.names();
    let skip_mtp = missing_mtp.is_some();
    let mtp = names.iter().filter(|k| is_mtp(k)).count();
    let extra: Vec<&String> = names
        .iter()
        .filter(|k| !(used.contains(*k) || (skip_mtp && is_mtp(k))))
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        let list = |v: Vec<&str>| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        bail!(
            "{}: the tensors do not match the config (official DeepSeek-V4 layout)\n  missing: {}\n  unexpected: {}",
            src.describe(),
            list(missing.iter().map(String::as_str).collect()),
            list(extra.iter().map(|s| s.as_str()).collect())
        );
    }
    if let (Some(first), true) = (missing_mtp, mtp > 0) {
        tracing::warn!(
            "{}: skipped {mtp} multi-token-prediction tensors (mtp.*): the MTP blocks are \
             incomplete (`{first}` is missing, maybe more); the model is the main layers only",
            dir.display()
        );
    }
    Ok(model)
}

/// `None` when `src` stores every tensor of the MTP blocks of `cfg` (none: trivially);
/// otherwise the first one missing (`"mtp.*"` when there are no MTP tensors at all).
fn missing_mtp_tensors(cfg: &crate::config::ModelConfig, src: &Shards) -> Result<Option<String>> {
    if cfg.mtp_layers() == 0 {
        return Ok(None);
    }
    if !src.names().iter().any(|k| is_mtp(k)) {
        return Ok(Some("mtp.*".into()));
    }
    cfg.validate().context("the DeepSeek-V4 config")?;
    Ok(crate::model::ParamLayout::new(cfg)
        .tensors
        .iter()
        .map(|t| official_name(&t.name))
        .find(|k| is_mtp(k) && !src.contains(k)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_names_of_mnemo_tensors() {
        for (ours, theirs) in [
            ("tok_embeddings.weight", "embed.weight"),
            ("output.weight", "head.weight"),
            ("norm.weight", "norm.weight"),
            ("hc_head.fn", "hc_head_fn"),
            ("hc_head.base", "hc_head_base"),
            ("hc_head.scale", "hc_head_scale"),
            (
                "layers.3.attention_norm.weight",
                "layers.3.attn_norm.weight",
            ),
            ("layers.3.ffn_norm.weight", "layers.3.ffn_norm.weight"),
            ("layers.0.attn_hc.fn", "layers.0.hc_attn_fn"),
            ("layers.0.ffn_hc.base", "layers.0.hc_ffn_base"),
            (
                "layers.1.attn.kv_norm.weight",
                "layers.1.attn.kv_norm.weight",
            ),
            ("layers.1.attn.attn_sink", "layers.1.attn.attn_sink"),
            (
                "layers.1.attn.indexer.compressor.ape",
                "layers.1.attn.indexer.compressor.ape",
            ),
            (
                "layers.2.ffn.experts.7.w3.weight",
                "layers.2.ffn.experts.7.w3.weight",
            ),
            ("layers.2.ffn.gate.bias", "layers.2.ffn.gate.bias"),
        ] {
            assert_eq!(official_name(ours), theirs, "{ours}");
        }
        assert_eq!(
            scale_name("layers.0.attn.wq_a.weight"),
            "layers.0.attn.wq_a.scale"
        );
        assert!(is_mtp("mtp.0.e_proj.weight") && !is_mtp("layers.0.mtp"));
    }

    /// A directory with one `model.safetensors` of raw tensors (name, dtype, shape, bytes).
    fn shards_of(name: &str, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Shards {
        use ::safetensors::tensor::TensorView;
        let d = std::env::temp_dir().join(format!("mnemo-v4off-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, dt, s, b)| (n.to_string(), TensorView::new(*dt, s.clone(), b).unwrap()))
            .collect();
        let bytes = ::safetensors::serialize(views, None).unwrap();
        std::fs::write(d.join("model.safetensors"), bytes).unwrap();
        Shards::open(&d).unwrap()
    }

    #[test]
    fn quantised_weights_by_hand() {
        let one = 0x38u8; // e4m3 1.0
        let bf16 = |x: f32| ((x.to_bits() >> 16) as u16).to_le_bytes().to_vec();
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let src = shards_of(
            "byhand",
            &[
                // FP8 [3, 5] in 2×2 blocks (edge blocks partial), E8M0 scales [2, 3].
                ("a.weight", Dtype::F8_E4M3, vec![3, 5], {
                    let mut q = vec![one; 15];
                    q[14] = 0xc4; // -(1.5 · 2) = -3
                    q[0] = 0x80; // -0
                    q
                }),
                (
                    "a.scale",
                    Dtype::F8_E8M0,
                    vec![2, 3],
                    vec![127, 128, 129, 126, 127, 130],
                ),
                // FP4 U8-packed [2, 4] with F32 scales [2, 1].
                (
                    "b.weight",
                    Dtype::U8,
                    vec![2, 2],
                    vec![0x21, 0x7f, 0x98, 0x00],
                ),
                ("b.scale", Dtype::F32, vec![2, 1], f32s(&[0.5, 4.0])),
                // FP4 as F4 (logical shape), BF16 scales.
                ("c.weight", Dtype::F4, vec![1, 4], vec![0x53, 0x0a]),
                ("c.scale", Dtype::BF16, vec![1, 1], bf16(0.25)),
                (
                    "d.weight",
                    Dtype::BF16,
                    vec![2],
                    [bf16(1.5), bf16(-2.0)].concat(),
                ),
            ],
        );
        let a = read_weight(&src, "a.weight", &[3, 5], [2, 2]).unwrap();
        #[rustfmt::skip]
        assert_eq!(a, [
            -0.0, 1.0, 2.0, 2.0, 4.0,
            1.0, 1.0, 2.0, 2.0, 4.0,
            0.5, 0.5, 1.0, 1.0, -24.0,
        ]);
        assert!(a[0].is_sign_negative());
        let b = read_weight(&src, "b.weight", &[2, 4], [128, 128]).unwrap();
        // 0x21 → [0.5, 1], 0x7f → [-6, 6]; 0x98 → [-0, -0.5], 0x00 → [0, 0]
        assert_eq!(b, [0.25, 0.5, -3.0, 3.0, -0.0, -2.0, 0.0, 0.0]);
        let c = read_weight(&src, "c.weight", &[1, 4], [128, 128]).unwrap();
        // 0x53 → [1.5, 3], 0x0a → [-1, 0]
        assert_eq!(c, [0.375, 0.75, -0.25, 0.0]);
        assert_eq!(
            read_weight(&src, "d.weight", &[2], [128, 128]).unwrap(),
            [1.5, -2.0]
        );
        // A quantised tensor needs a matrix shape, and its scale.
        let err = format!(
            "{:#}",
            read_weight(&src, "a.weight", &[15], [2, 2]).unwrap_err()
        );
        assert!(err.contains("only matrices"), "{err}");
        let err = format!(
            "{:#}",
            read_weight(&src, "a.weight", &[3, 5], [4, 4]).unwrap_err()
        );
        assert!(
            err.contains("a.scale") && err.contains("expected [1, 2]"),
            "{err}"
        );
        std::fs::remove_dir_all(src.dir()).ok();
    }

    #[test]
    fn fp8_block_from_the_config() {
        assert_eq!(fp8_block(&serde_json::json!({})).unwrap(), [128, 128]);
        let v = serde_json::json!({"quantization_config": {"weight_block_size": [64, 32]}});
        assert_eq!(fp8_block(&v).unwrap(), [64, 32]);
        for bad in [
            serde_json::json!({"quantization_config": {"weight_block_size": [0, 128]}}),
            serde_json::json!({"quantization_config": {"weight_block_size": 128}}),
        ] {
            let err = format!("{:#}", fp8_block(&bad).unwrap_err());
            assert!(err.contains("weight_block_size"), "{err}");
        }
    }
}
