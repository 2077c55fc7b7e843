//! Memory-only fine-tuning (`mnemo train --init RUN --train-only engram[+gates]`): adapt the
//! Engram tables (and optionally their gates) of a trained model to new text with the backbone
//! frozen, and save the change as a small delta.
//!
//! ```text
//! base run B:  θ (backbone, flat buffer), g (Engram gates, in θ), E_l (tables [R_l, D_h])
//! fine-tune:   θ' = θ            (no AdamW step, no weight decay, no MoE bias update)
//!              g' = g  | AdamW   (`engram+gates` only)
//!              E_l' = lazy Adam on the rows each batch touches (fresh optimizer state)
//!              gradient norm / clipping over the trained tensors only
//! delta:       D = { l: (r ∈ R_l with E_l'[r] ≠ E_l[r],  E_l'[r]) } ∪ { g' (with gates) }
//!              + fingerprint(B)                      → adapted model = B + D, exactly
//! ```
//!
//! The delta (`RUN_DIR/engram_delta.safetensors`) holds, per Engram block `l`,
//! `engram.{l}.rows` (I32 `[k]`, increasing) and `engram.{l}.values` (F32 `[k, D_h]`), with
//! `engram+gates` also every gate tensor `engram.{l}.gate.{name}`, and metadata
//! `engram_delta` = JSON `{base, base_fingerprint, train_only, step}`. The fingerprint
//! ([`fingerprint`]) is a 64-bit hash of the base checkpoint's files, so a delta is never
//! applied to another model. A directory holding only `engram_delta.safetensors` loads as the
//! adapted model ([`load_delta_run`], used by `checkpoint::load`), with exactly the logits of
//! the fine-tuned checkpoint.

use crate::engram::EngramTable;
use crate::model::{is_engram_tensor, Model};
use crate::safetensors_io::{serialize_mixed, Data, TensorFile};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// File name of the delta inside a fine-tuning run directory.
pub const DELTA_FILE: &str = "engram_delta.safetensors";

/// Which parameters a run trains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrainOnly {
    /// Everything (ordinary training).
    #[default]
    #[serde(rename = "all")]
    All,
    /// Only the Engram tables.
    #[serde(rename = "engram")]
    Engram,
    /// The Engram tables and gate parameters.
    #[serde(rename = "engram+gates")]
    EngramGates,
}

impl TrainOnly {
    pub fn is_all(&self) -> bool {
        *self == TrainOnly::All
    }

    /// Whether the flat-buffer tensor `name` is trained.
    pub fn trains(&self, name: &str) -> bool {
        match self {
            TrainOnly::All => true,
            TrainOnly::Engram => false,
            TrainOnly::EngramGates => is_engram_tensor(name),
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(TrainOnly::All),
            "engram" => Ok(TrainOnly::Engram),
            "engram+gates" => Ok(TrainOnly::EngramGates),
            _ => bail!("--train-only {s}: expected `engram` or `engram+gates`"),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            TrainOnly::All => "all",
            TrainOnly::Engram => "engram",
            TrainOnly::EngramGates => "engram+gates",
        }
    }
}

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

/// The base of a memory-only fine-tuning run: where it came from and its Engram tables and
/// gates as they were (the tables memory-mapped read-only).
pub struct DeltaBase {
    pub dir: PathBuf,
    pub fingerprint: String,
    pub tables: Vec<EngramTable>,
    pub gates: Vec<Vec<f32>>,
}

impl DeltaBase {
    /// Open the base run `init` (a run or checkpoint directory).
    pub fn open(init: &Path) -> Result<(Self, crate::checkpoint::Loaded)> {
        let l = crate::checkpoint::load(init, false)
            .with_context(|| format!("cannot load the --init run {}", init.display()))?;
        let e = l.model.engram.as_ref().with_context(|| {
            format!(
                "{}: the model has no Engram memory to train",
                init.display()
            )
        })?;
        let mut tables = Vec::new();
        for lay in &e.layers {
            let p = l
                .dir
                .join(crate::checkpoint::engram_table_file(lay.hash.layer_id));
            tables.push(EngramTable::open_mapped(
                &p,
                lay.table.rows(),
                lay.table.dim(),
                false,
            )?);
        }
        let gates = (0..e.layers.len())
            .map(|i| l.model.engram_gate_params(i).to_vec())
            .collect();
        let base = DeltaBase {
            dir: l.dir.clone(),
            fingerprint: fingerprint(&l.dir)?,
            tables,
            gates,
        };
        Ok((base, l))
    }
}

/// Give every Engram table of `model` its own RAM copy (trainable), e.g. after loading a run
/// whose tables are memory-mapped read-only.
pub fn tables_to_ram(model: &mut Model) -> Result<()> {
    if let Some(e) = model.engram.as_mut() {
        for l in &mut e.layers {
            if l.table.is_mapped() {
                l.table.check()?;
                let (r, d) = (l.table.rows(), l.table.dim());
                l.table = EngramTable::from_vec(r, d, l.table.as_slice().to_vec())?;
            }
        }
    }
    Ok(())
}

/// Size summary of a written delta.
#[derive(Clone, Debug, Serialize)]
pub struct DeltaStats {
    /// Changed rows per Engram layer.
    pub rows: Vec<usize>,
    /// Rows of each full table.
    pub table_rows: Vec<usize>,
    /// Bytes of the delta file and of the full tables (f32).
    pub delta_bytes: u64,
    pub table_bytes: u64,
}

/// Write `run_dir/engram_delta.safetensors`: the rows of `model`'s tables that differ from
/// `base` (bitwise), with their values, and the gates when `mode` trains them.
pub fn write_delta(
    run_dir: &Path,
    model: &Model,
    base: &DeltaBase,
    mode: TrainOnly,
    step: u64,
) -> Result<DeltaStats> {
    let e = model.engram.as_ref().context("no Engram memory")?;
    if mode.is_all() {
        bail!("a delta needs --train-only engram or engram+gates");
    }
    let mut stats = DeltaStats {
        rows: vec![],
        table_rows: vec![],
        delta_bytes: 0,
        table_bytes: 0,
    };
    let mut changed: Vec<(Vec<i32>, Vec<f32>)> = Vec::new();
    for (l, b) in e.layers.iter().zip(&base.tables) {
        b.check()?;
        let (d, lid) = (l.table.dim(), l.hash.layer_id);
        let (new, old) = (l.table.as_slice(), b.as_slice());
        if new.len() != old.len() {
            bail!("engram layer {lid}: the base table has another size");
        }
        let mut rows = Vec::new();
        let mut vals = Vec::new();
        for (r, (a, o)) in new.chunks(d).zip(old.chunks(d)).enumerate() {
            if a.iter().zip(o).any(|(x, y)| x.to_bits() != y.to_bits()) {
                rows.push(r as i32);
                vals.extend_from_slice(a);
            }
        }
        stats.rows.push(rows.len());
        stats.table_rows.push(l.table.rows());
        stats.table_bytes += l.table.bytes();
        changed.push((rows, vals));
    }
    let mut t: Vec<(String, Vec<usize>, Data)> = Vec::new();
    for (i, (l, (rows, vals))) in e.layers.iter().zip(&changed).enumerate() {
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
        if mode == TrainOnly::EngramGates {
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
    let meta = serde_json::json!({
        "base": base.dir,
        "base_fingerprint": base.fingerprint,
        "train_only": mode,
        "step": step,
    });
    let mut m = HashMap::new();
    m.insert("engram_delta".to_string(), meta.to_string());
    let bytes = serialize_mixed(&t, m)?;
    stats.delta_bytes = bytes.len() as u64;
    crate::util::write_atomic(&run_dir.join(DELTA_FILE), &bytes)?;
    Ok(stats)
}

/// The metadata of a delta file.
#[derive(Clone, Debug, Deserialize)]
pub struct DeltaMeta {
    pub base: PathBuf,
    pub base_fingerprint: String,
    pub train_only: TrainOnly,
    pub step: u64,
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
    tables_to_ram(model)?;
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

/// Load a run directory that holds only a delta: the base it names (whose fingerprint must
/// match) plus the delta.
pub fn load_delta_run(dir: &Path) -> Result<crate::checkpoint::Loaded> {
    let p = dir.join(DELTA_FILE);
    let (_, meta) = read_delta_meta(&p)?;
    let base = crate::checkpoint::locate(&meta.base).with_context(|| {
        format!(
            "{}: the base run {} of this delta cannot be found",
            p.display(),
            meta.base.display()
        )
    })?;
    let fp = fingerprint(&base)?;
    if fp != meta.base_fingerprint {
        bail!(
            "{}: the base {} has changed since the delta was made (fingerprint {fp}, delta made for {})",
            p.display(),
            base.display(),
            meta.base_fingerprint
        );
    }
    let mut l = crate::checkpoint::load(&base, false)?;
    apply_delta(&mut l.model, &p)?;
    l.state = None;
    l.dir = dir.to_path_buf();
    Ok(l)
}
