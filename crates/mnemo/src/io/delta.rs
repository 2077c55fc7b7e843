//! The Engram delta (`RUN_DIR/engram_delta.safetensors`) of a memory-only fine-tuning run:
//! its format ([`to_safetensors`], [`read_delta_meta`], [`apply_delta`]) and the base
//! fingerprint. [`crate::finetune::write_delta`] decides what goes in it;
//! [`crate::checkpoint::delta::load_delta_run`] loads a run kept as a delta.
//!
//! The delta holds, per Engram block `l`, `engram.{l}.rows` (I32 `[k]`, increasing) and
//! `engram.{l}.values` (F32 `[k, D_h]`), with `engram+gates` also every gate tensor
//! `engram.{l}.gate.{name}`, and metadata `engram_delta` = JSON [`DeltaMeta`] `{base,
//! base_fingerprint, step, train_only}`. The fingerprint ([`fingerprint`]) is a 64-bit hash of
//! the base checkpoint's files, so a delta is never applied to another model. A directory
//! holding only `engram_delta.safetensors` loads as the adapted model (base + delta), with
//! exactly the logits of the fine-tuned checkpoint.

use super::safetensors::{serialize_mixed, Data, TensorFile};
use crate::config::TrainOnly;
use crate::model::Model;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// File name of the delta inside a fine-tuning run directory.
pub const DELTA_FILE: &str = "engram_delta.safetensors";

/// A 64-bit fingerprint (hex) of a checkpoint directory: its config, tokenizer, weights and
/// Engram files, read in a fixed order (multiply-xor over little-endian 8-byte words, the file
/// name and length mixed in).
pub fn fingerprint(ckpt_dir: &Path) -> Result<String> {
    let mut names: Vec<String> = vec![
        "config.json".into(),
        "tokenizer.json".into(),
        "model.safetensors".into(),
        "engram.safetensors".into(),
    ];
    let mut tables: Vec<String> = std::fs::read_dir(ckpt_dir)
        .with_context(|| format!("cannot list {}", ckpt_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("engram_table.") && n.ends_with(".f32"))
        .collect();
    tables.sort();
    names.extend(tables);
    const P: u64 = 0x100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mix = |h: &mut u64, w: u64| {
        *h = (*h ^ w).wrapping_mul(P);
        *h ^= *h >> 29;
    };
    for n in names {
        let p = ckpt_dir.join(&n);
        if !p.is_file() {
            continue;
        }
        n.bytes().for_each(|b| mix(&mut h, b as u64));
        let mut f =
            std::fs::File::open(&p).with_context(|| format!("cannot open {}", p.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut len = 0u64;
        loop {
            let k = f
                .read(&mut buf)
                .with_context(|| format!("cannot read {}", p.display()))?;
            if k == 0 {
                break;
            }
            len += k as u64;
            let mut chunks = buf[..k].chunks_exact(8);
            for c in &mut chunks {
                mix(&mut h, u64::from_le_bytes(c.try_into().expect("8 bytes")));
            }
            for &b in chunks.remainder() {
                mix(&mut h, b as u64);
            }
        }
        mix(&mut h, len);
    }
    Ok(format!("{h:016x}"))
}

/// The metadata of a delta file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeltaMeta {
    /// The base run or checkpoint directory, as given to `--init`.
    pub base: PathBuf,
    /// [`fingerprint`] of the base checkpoint.
    pub base_fingerprint: String,
    /// The training step the delta was written at.
    pub step: u64,
    pub train_only: TrainOnly,
}

/// Read a delta's metadata.
pub fn read_delta_meta(path: &Path) -> Result<(TensorFile, DeltaMeta)> {
    let f = TensorFile::open(path)?;
    let meta = f.metadata()?;
    let s = meta
        .get("engram_delta")
        .with_context(|| format!("{}: no `engram_delta` metadata", path.display()))?;
    let m: DeltaMeta = serde_json::from_str(s)
        .with_context(|| format!("{}: unreadable delta metadata", path.display()))?;
    Ok((f, m))
}

/// Apply the delta `path` to `model` (the base it was made from; the caller checks the
/// fingerprint): changed rows into RAM copies of the tables, and the gates when stored.
pub fn apply_delta(model: &mut Model, path: &Path) -> Result<DeltaMeta> {
    let (f, meta) = read_delta_meta(path)?;
    if let Some(e) = model.engram.as_mut() {
        e.tables_to_ram()?;
    }
    let names = f.names();
    let gate_offs = model.layout.engram_gate.clone();
    let e = model
        .engram
        .as_mut()
        .context("the base model has no Engram")?;
    let mut gates: Vec<(usize, Vec<f32>)> = Vec::new();
    for (i, l) in e.layers.iter_mut().enumerate() {
        let (lid, d, nrows) = (l.hash.layer_id, l.table.dim(), l.table.rows());
        let rows = f.u32(&format!("engram.{lid}.rows"))?;
        let vals = f.f32(&format!("engram.{lid}.values"), Some(&[rows.len(), d]))?;
        let tab = l.table.as_mut_slice()?;
        for (&r, v) in rows.iter().zip(vals.chunks(d)) {
            if r as usize >= nrows {
                bail!(
                    "{}: engram layer {lid}: row {r} is outside the table of {nrows} rows",
                    path.display()
                );
            }
            tab[r as usize * d..(r as usize + 1) * d].copy_from_slice(v);
        }
        let prefix = format!("engram.{lid}.gate.");
        if names.iter().any(|n| n.starts_with(&prefix)) {
            let mut g = vec![0.0f32; l.gate.n_params()];
            for (name, shape, off) in l.gate.tensors() {
                let x = f.f32(&format!("engram.{lid}.gate.{name}"), Some(&shape))?;
                g[off..off + x.len()].copy_from_slice(&x);
            }
            gates.push((i, g));
        }
    }
    for (i, g) in gates {
        let o = gate_offs[i];
        model.params[o..o + g.len()].copy_from_slice(&g);
    }
    model.sync_engram_gates();
    Ok(meta)
}

/// The delta file's bytes: per Engram layer of `model`, the changed rows (increasing) and their
/// values `[k, D_h]` (`changed`, in layer order), and every gate tensor when `meta.train_only`
/// is `engram+gates`.
pub fn to_safetensors(
    model: &Model,
    changed: &[(Vec<i32>, Vec<f32>)],
    meta: &DeltaMeta,
) -> Result<Vec<u8>> {
    let e = model.engram.as_ref().context("no Engram memory")?;
    let mut t: Vec<(String, Vec<usize>, Data)> = Vec::new();
    for (i, (l, (rows, vals))) in e.layers.iter().zip(changed).enumerate() {
        let (d, lid) = (l.table.dim(), l.hash.layer_id);
        t.push((
            format!("engram.{lid}.rows"),
            vec![rows.len()],
            Data::I32(rows.clone()),
        ));
        t.push((
            format!("engram.{lid}.values"),
            vec![rows.len(), d],
            Data::F32(vals),
        ));
        if meta.train_only == TrainOnly::EngramGates {
            let g = model.engram_gate_params(i);
            for (name, shape, off) in l.gate.tensors() {
                let len: usize = shape.iter().product();
                t.push((
                    format!("engram.{lid}.gate.{name}"),
                    shape,
                    Data::F32(&g[off..off + len]),
                ));
            }
        }
    }
    let mut m = HashMap::new();
    m.insert("engram_delta".to_string(), serde_json::to_string(meta)?);
    serialize_mixed(&t, m)
}
