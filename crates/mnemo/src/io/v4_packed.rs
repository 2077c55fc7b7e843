//! Running an official DeepSeek-V4 checkpoint from its packed FP8 / FP4 weights
//! ([`load_dir_packed`]): the weights that cached decoding multiplies through its products
//! ([`is_product_weight`]: the attention projections `wq_a`, `wq_b`, `wkv`, `wo_b`, the
//! indexer's `wq_b`, the shared and routed experts' `w1`, `w2`, `w3`, and the output head)
//! become [`QMatrix`]es of type
//! `Fp8`/`Fp4` in [`Model::quant`] (keyed by their offset in the flat parameters) and get
//! **no f32 copy**: the model's [`crate::model::Params`] is a reserved mapping whose ranges
//! for them are never written ([`Model::packed_only`]: every row of every product, prefill
//! included, reads the packed weights).
//!
//! Memory: the codes of every packed weight, and the E8M0 scales of the FP4 experts, stay
//! byte ranges of the memory-mapped checkpoint files ([`crate::kernels::qbytes::QBytes`]):
//! loading reads the headers and the other (small) tensors only, so its time does not grow
//! with the experts' size, and a decoded token reads (faults into the page cache) the codes
//! of the experts it routes to. FP8 block scales are expanded per row
//! ([`expand_block_scales`]) and are resident (1/32 of their weight's bytes in f32). Checks
//! that would read every byte are not made for the mapped weights (an FP8 NaN code or an
//! E8M0 NaN scale gives NaN outputs; `mnemo logits` without `--keep-packed` reads and checks
//! them all).
//!
//! The BF16 weights that decoding multiplies ([`is_bf16_product_weight`]: `wo_a`, split into
//! its `o_groups` diagonal blocks as the grouped product reads them, the compressors' and the
//! indexer's projections, the router) are kept mapped as stored too (`QType::Bf16`, two bytes a
//! value, multiplied by the same packed kernels): at V4-Flash's shapes they are ~210 MB a layer
//! as f32 copies. So is the BF16 embedding (`embed.weight`: each token decodes its row; 2.1 GB
//! as f32 at V4-Flash's vocabulary). Everything else (norms, position biases, scales, the MTP
//! blocks) is dequantised into the parameters as [`super::v4_official::load_dir`] does.
//!
//! [`load_dir_packed`] is the loader for commands that run an official directory packed
//! (`mnemo generate --keep-packed`, `mnemo logits --keep-packed`; serving can call it too).

use super::shards::Shards;
use super::v4_coded::read_coded;
use super::v4_official::{fp8_block, Storage, FP4_BLOCK};
use crate::kernels::fp8dot::expand_block_scales;
use crate::kernels::quant::{PackedScales, QMatrix, QType};
use crate::model::Model;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Official tensor names (suffixes) that cached decoding multiplies through its products
/// (`Model::lin`, the MoE expert products), so they can run packed without an f32 copy.
const PRODUCT_SUFFIXES: [&str; 5] = [
    "attn.wq_a.weight",
    "attn.wq_b.weight",
    "attn.wkv.weight",
    "attn.wo_b.weight",
    "attn.indexer.wq_b.weight",
];

/// Expert weight suffixes (routed and shared experts).
const EXPERT_SUFFIXES: [&str; 3] = [".w1.weight", ".w2.weight", ".w3.weight"];

/// Whether the official tensor `name` is one cached decoding multiplies through its products
/// (module doc); the MTP blocks' are not (they keep their f32 copies).
pub fn is_product_weight(name: &str) -> bool {
    if name == "head.weight" {
        return true;
    }
    name.starts_with("layers.")
        && (PRODUCT_SUFFIXES.iter().any(|s| name.ends_with(s))
            || ((name.contains(".ffn.experts.") || name.contains(".ffn.shared_experts."))
                && EXPERT_SUFFIXES.iter().any(|s| name.ends_with(s))))
}

/// BF16 tensors (suffixes of `layers.N.`) that cached decoding multiplies through
/// `Model::lin` or the router product: kept mapped when stored as BF16 (module doc).
const BF16_SUFFIXES: [&str; 8] = [
    "attn.wo_a.weight",
    "attn.compressor.wkv.weight",
    "attn.compressor.wgate.weight",
    "attn.indexer.compressor.wkv.weight",
    "attn.indexer.compressor.wgate.weight",
    "attn.indexer.wq_b.weight",
    "attn.indexer.weights_proj.weight",
    "ffn.gate.weight",
];

/// Whether the official tensor `name` is one cached decoding multiplies (or, the embedding,
/// reads by rows) and that may be kept mapped when stored as BF16 (module doc); not the MTP
/// blocks'.
pub fn is_bf16_product_weight(name: &str) -> bool {
    name == "embed.weight"
        || (name.starts_with("layers.") && BF16_SUFFIXES.iter().any(|s| name.ends_with(s)))
}

/// The BF16 tensor `name` (model shape `[rows, cols]`) as mapped matrices, `None` when it is
/// not stored as BF16: `groups` of `rows / groups` rows each (`wo_a`'s diagonal blocks), each
/// keyed by its offset from the tensor's. Errors name the file and tensor.
fn read_bf16(
    src: &Shards,
    name: &str,
    shape: &[usize],
    groups: usize,
) -> Result<Option<Vec<(usize, QMatrix)>>> {
    let (raw, file) = src.raw(name)?;
    if raw.dtype != super::safetensors::Dtype::BF16 {
        return Ok(None);
    }
    let &[rows, cols] = shape else {
        bail!("{}: tensor `{name}` is not a matrix", file.path().display());
    };
    if raw.shape != shape || groups == 0 || !rows.is_multiple_of(groups) {
        bail!(
            "{}: tensor `{name}` has shape {:?}, expected {shape:?} in {groups} groups",
            file.path().display(),
            raw.shape
        );
    }
    let bytes = src.shared(name)?;
    let gr = rows / groups;
    (0..groups)
        .map(|g| {
            let part = bytes.slice(2 * g * gr * cols..2 * (g + 1) * gr * cols);
            let q = QMatrix::bf16(gr, cols, part).map_err(|e| {
                anyhow::anyhow!(
                    "{}: tensor `{name}` cannot be kept mapped: {e}",
                    file.path().display()
                )
            })?;
            Ok((g * gr * cols, q))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Weight `name` (model shape `shape`) as a packed matrix whose codes are a range of the
/// mapped file, `None` when it is stored as F32/BF16/F16. FP4 with E8M0/U8 scales keeps its
/// scales mapped too; other scales are read (and checked). Errors name the file and tensor.
pub fn read_packed(
    src: &Shards,
    name: &str,
    shape: &[usize],
    fp8_block: [usize; 2],
) -> Result<Option<QMatrix>> {
    let Some(c) = read_coded(src, name, shape, fp8_block)? else {
        return Ok(None);
    };
    let codes = src.shared(name)?;
    let (sraw, _) = src.raw(&c.scale)?;
    let mapped_scales = matches!(
        sraw.dtype,
        super::safetensors::Dtype::F8_E8M0 | super::safetensors::Dtype::U8
    );
    let q = match c.kind {
        Storage::Fp8 => {
            let s = c.scales(src, name)?;
            let per_row = expand_block_scales(&s, c.rows, c.cols, fp8_block);
            let ty = QType::Fp8;
            let block = fp8_block[1];
            QMatrix::packed_lazy(ty, c.rows, c.cols, codes, PackedScales::F32(per_row), block)
        }
        _ => {
            let scales = if mapped_scales {
                PackedScales::E8m0(src.shared(&c.scale)?)
            } else {
                PackedScales::F32(c.scales(src, name)?)
            };
            QMatrix::packed_lazy(QType::Fp4, c.rows, c.cols, codes, scales, FP4_BLOCK)
        }
    };
    q.map(Some)
        .map_err(|e| anyhow::anyhow!("{}: tensor `{name}` cannot be kept packed: {e}", c.file))
}

/// Load the official DeepSeek-V4 directory `dir` with its product weights packed and mapped
/// (module doc). Every other check of [`super::v4_official::load_dir`] applies (missing and
/// unexpected tensors, shapes, dtypes, shards). Errors: a product weight stored as
/// F32/BF16/F16 is dequantised like the rest (not an error); an expert whose dtype the
/// kernels do not know, a scale of the wrong shape or a shard the index names but that is
/// missing are errors naming the tensor and the file.
pub fn load_dir_packed(dir: &Path) -> Result<Model> {
    let cpath = dir.join("config.json");
    let text =
        std::fs::read_to_string(&cpath).with_context(|| format!("reading {}", cpath.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", cpath.display()))?;
    let block = fp8_block(&v).with_context(|| format!("{}", cpath.display()))?;
    let o_groups = v.get("o_groups").and_then(|g| g.as_u64()).unwrap_or(1) as usize;
    let mut got: Vec<(usize, QMatrix)> = Vec::new();
    let mut take = |src: &Shards, spec: &crate::model::TensorSpec, key: &str| -> Result<bool> {
        if is_bf16_product_weight(key) {
            let groups = if key.ends_with("attn.wo_a.weight") {
                o_groups
            } else {
                1
            };
            if let Some(parts) = read_bf16(src, key, &spec.shape, groups)? {
                got.extend(parts.into_iter().map(|(o, q)| (spec.offset + o, q)));
                return Ok(true);
            }
        }
        if !is_product_weight(key) {
            return Ok(false);
        }
        match read_packed(src, key, &spec.shape, block)? {
            Some(q) => {
                got.push((spec.offset, q));
                Ok(true)
            }
            None => Ok(false),
        }
    };
    let mut model = super::v4_official::load_dir_with(dir, Some(&mut take))?;
    if got.is_empty() {
        bail!(
            "{}: no FP8/FP4 weight to keep packed (the product weights are all stored as \
             F32/BF16/F16); load it without --keep-packed",
            dir.display()
        );
    }
    let n = got.len();
    model.quant.extend(got);
    model.packed_only = true;
    tracing::info!("{}: {n} FP8/FP4 matrices kept packed", dir.display());
    Ok(model)
}
