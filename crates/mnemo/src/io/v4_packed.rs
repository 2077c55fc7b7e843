//! Keeping an official DeepSeek-V4 checkpoint's FP8 / FP4 weights packed
//! ([`attach_packed`]): each quantised weight becomes a [`QMatrix`] of type `Fp8`/`Fp4` in
//! [`Model::quant`] (keyed by its offset in the flat parameters), which cached decoding
//! multiplies from the codes ([`crate::kernels::fp8dot`]) instead of the dequantised f32 copy.
//!
//! FP8 block scales `[ceil(out/128), ceil(in/128)]` are stored per row
//! (`[out, ceil(in/128)]`, [`expand_block_scales`]), FP4 scales as they are (`[out, in/32]`),
//! so a routed or shared expert's `w1` and `w3` (adjacent in mnemo's layout, one `[W1; W3]`
//! product) are fused into one matrix. The f32 parameters stay loaded: prefill chunks and
//! training use them; only the rows of one-token decoding (the [`crate::model`] decode plan,
//! the same rule as GGUF models) read the packed copies.

use super::shards::Shards;
use super::v4_official::{fp8_block, official_name, read_coded, Storage, FP4_BLOCK};
use crate::kernels::fp8dot::expand_block_scales;
use crate::kernels::quant::{QMatrix, QType};
use crate::model::Model;
use anyhow::{Context, Result};
use std::path::Path;

/// Weight `name` (model shape `shape`) as a packed matrix, `None` when it is stored as
/// F32/BF16/F16. Errors name the file and the tensor.
pub fn read_packed(
    src: &Shards,
    name: &str,
    shape: &[usize],
    fp8_block: [usize; 2],
) -> Result<Option<QMatrix>> {
    let Some(c) = read_coded(src, name, shape, fp8_block)? else {
        return Ok(None);
    };
    let (ty, scales, block) = match c.kind {
        Storage::Fp8 => (
            QType::Fp8,
            expand_block_scales(&c.scales, c.rows, c.cols, fp8_block),
            fp8_block[1],
        ),
        _ => (QType::Fp4, c.scales, FP4_BLOCK),
    };
    QMatrix::packed(ty, c.rows, c.cols, c.codes.to_vec(), scales, block)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("{}: tensor `{name}` cannot be kept packed: {e}", c.file))
}

/// Put the FP8 / FP4 weights of the official directory `dir` into `model.quant` (the model
/// loaded from the same directory): returns how many matrices (after fusing `w1`/`w3`).
pub fn attach_packed(model: &mut Model, dir: &Path) -> Result<usize> {
    let cpath = dir.join("config.json");
    let text =
        std::fs::read_to_string(&cpath).with_context(|| format!("reading {}", cpath.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", cpath.display()))?;
    let block = fp8_block(&v).with_context(|| format!("{}", cpath.display()))?;
    let src = Shards::open(dir)?;
    let mut got: Vec<(String, usize, QMatrix)> = Vec::new();
    for spec in &model.layout.tensors {
        let key = official_name(&spec.name);
        if !src.contains(&key) {
            continue;
        }
        if let Some(q) = read_packed(&src, &key, &spec.shape, block)? {
            got.push((spec.name.clone(), spec.offset, q));
        }
    }
    // Fuse `….w1.weight` with the `….w3.weight` right after it (same type, width, block).
    let mut out: Vec<(usize, QMatrix)> = Vec::new();
    let mut it = got.into_iter().peekable();
    while let Some((name, off, q)) = it.next() {
        let fuse = name.strip_suffix("w1.weight").is_some_and(|base| {
            it.peek().is_some_and(|(n3, o3, q3)| {
                *n3 == format!("{base}w3.weight")
                    && *o3 == off + q.rows * q.cols
                    && (q3.ty, q3.cols, q3.block) == (q.ty, q.cols, q.block)
            })
        });
        if fuse {
            let (_, _, q3) = it.next().expect("peeked");
            let mut data = q.data;
            data.extend_from_slice(&q3.data);
            let mut d = q.d;
            d.extend_from_slice(&q3.d);
            let m = QMatrix::packed(q.ty, q.rows + q3.rows, q.cols, data, d, q.block)
                .map_err(|e| anyhow::anyhow!("fusing {name} with its w3: {e}"))?;
            out.push((off, m));
        } else {
            out.push((off, q));
        }
    }
    let n = out.len();
    model.quant.extend(out);
    Ok(n)
}

/// [`super::v4_official::load_dir`], keeping the FP8 / FP4 weights packed too
/// ([`attach_packed`]).
pub fn load_dir_packed(dir: &Path) -> Result<Model> {
    let mut model = super::v4_official::load_dir(dir)?;
    let n = attach_packed(&mut model, dir)?;
    tracing::info!(
        "{}: {n} FP8/FP4 matrices kept packed for decoding",
        dir.display()
    );
    Ok(model)
}
