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
//! The delta's format is [`crate::io::delta`], and loading a run kept as a delta
//! [`crate::checkpoint::delta`]; this module opens the base ([`DeltaBase`]) and decides what
//! the delta holds ([`write_delta`]).

pub use crate::config::TrainOnly;
use crate::engram::EngramTable;
use crate::io::delta::{self, fingerprint, DeltaMeta, DELTA_FILE};
use crate::model::{is_engram_tensor, Model};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Which flat-buffer tensors a [`TrainOnly`] mode trains (here rather than in `config`: it
/// needs the model's tensor names).
impl TrainOnly {
    /// Whether the flat-buffer tensor `name` is trained.
    pub fn trains(&self, name: &str) -> bool {
        match self {
            TrainOnly::All => true,
            TrainOnly::Engram => false,
            TrainOnly::EngramGates => is_engram_tensor(name),
        }
    }
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
                .join(crate::io::checkpoint::engram_table_file(lay.hash.layer_id));
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
    match model.engram.as_mut() {
        Some(e) => e.tables_to_ram(),
        None => Ok(()),
    }
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
    let meta = DeltaMeta {
        base: base.dir.clone(),
        base_fingerprint: base.fingerprint.clone(),
        step,
        train_only: mode,
    };
    let bytes = delta::to_safetensors(model, &changed, &meta)?;
    stats.delta_bytes = bytes.len() as u64;
    crate::util::write_atomic(&run_dir.join(DELTA_FILE), &bytes)?;
    Ok(stats)
}
