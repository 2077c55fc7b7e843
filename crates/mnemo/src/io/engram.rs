//! The Engram file (`engram.safetensors`): compression table, hash multipliers and primes,
//! gate parameters and (optionally) the tables of an [`Engram`], as
//! [`Engram::to_safetensors`] / [`Engram::from_safetensors`]; and the tables' lazy-Adam state
//! ([`optimizer_to_safetensors`] / [`optimizer_from_safetensors`]). The memory itself is
//! [`crate::engram`], which knows nothing of files but its memory-mappable tables
//! ([`EngramTable::open_mapped`]).

use super::safetensors::{serialize_mixed, Data, TensorFile};
use crate::config::EngramConfig;
use crate::engram::{CompressedTokenizer, Engram, EngramTable, LayerHash, SparseAdam};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;

/// The file format of an [`Engram`] (methods here, beside the format, rather than in
/// `crate::engram`, which imports no file format).
impl Engram {
    /// Serialise to safetensors bytes: metadata `engram` = JSON `{config, d, n_branch,
    /// hashes}` (multipliers and primes as data), `engram.compress.lookup` (I32 `[V]`),
    /// `engram.{layer}.gate.{name}` (F32, [`GateSpec::tensors`] names) and, with
    /// `include_tables`, `engram.{layer}.table` (F32 `[R, D_h]`; leave large tables out and
    /// keep them as mappable files, [`EngramTable::write_file`]).
    pub fn to_safetensors(&self, include_tables: bool) -> Result<Vec<u8>> {
        let first = self.layers.first();
        let meta = serde_json::json!({
            "config": self.cfg,
            "d": first.map_or(0, |l| l.gate.d),
            "n_branch": first.map_or(0, |l| l.gate.n_branch),
            "hashes": self.layers.iter().map(|l| &l.hash).collect::<Vec<_>>(),
        });
        let lookup: Vec<i32> = self.compress.lookup().iter().map(|&x| x as i32).collect();
        let mut t: Vec<(String, Vec<usize>, Data)> = vec![(
            "engram.compress.lookup".into(),
            vec![lookup.len()],
            Data::I32(lookup),
        )];
        for l in &self.layers {
            let lid = l.hash.layer_id;
            for (name, shape, off) in l.gate.tensors() {
                let len: usize = shape.iter().product();
                t.push((
                    format!("engram.{lid}.gate.{name}"),
                    shape,
                    Data::F32(&l.params[off..off + len]),
                ));
            }
            if include_tables {
                t.push((
                    format!("engram.{lid}.table"),
                    vec![l.table.rows(), l.table.dim()],
                    Data::F32(l.table.as_slice()),
                ));
            }
        }
        let mut m = std::collections::HashMap::new();
        m.insert("engram".to_string(), meta.to_string());
        serialize_mixed(&t, m)
    }

    /// Inverse of [`Engram::to_safetensors`]. `tables`: the layers' tables when they were not
    /// stored in the file (e.g. [`EngramTable::open_mapped`]), in layer order.
    pub fn from_safetensors(f: &TensorFile, tables: Option<Vec<EngramTable>>) -> Result<Engram> {
        let meta = f.metadata()?;
        let text = meta
            .get("engram")
            .context("no `engram` metadata: not an Engram file")?;
        let v: serde_json::Value = serde_json::from_str(text).context("engram metadata")?;
        let cfg: EngramConfig =
            serde_json::from_value(v["config"].clone()).context("engram config")?;
        let hashes: Vec<LayerHash> =
            serde_json::from_value(v["hashes"].clone()).context("engram hashes")?;
        let d = v["d"].as_u64().context("engram metadata: d")? as usize;
        let n_branch = v["n_branch"]
            .as_u64()
            .context("engram metadata: n_branch")? as usize;
        let compress = CompressedTokenizer::from_lookup(f.u32("engram.compress.lookup")?)?;
        let spec = cfg.gate_spec(d, n_branch);
        let mut tables = tables.map(|t| t.into_iter());
        let mut parts = Vec::new();
        for h in hashes {
            let lid = h.layer_id;
            let mut params = vec![0.0f32; spec.n_params()];
            for (name, shape, off) in spec.tensors() {
                let x = f.f32(&format!("engram.{lid}.gate.{name}"), Some(&shape))?;
                params[off..off + x.len()].copy_from_slice(&x);
            }
            let table = match tables.as_mut() {
                Some(it) => it
                    .next()
                    .with_context(|| format!("no table given for engram layer {lid}"))?,
                None => {
                    let rows = h.total_rows() as usize;
                    let x = f.f32(&format!("engram.{lid}.table"), Some(&[rows, cfg.head_dim]))?;
                    EngramTable::from_vec(rows, cfg.head_dim, x)?
                }
            };
            parts.push((h, table, params));
        }
        Engram::from_parts(cfg, compress, d, n_branch, parts)
    }
}

/// The lazy-Adam states `opt` of `e`'s tables as safetensors bytes: `engram.{l}.adam.m` and
/// `.v` (F32 `[R, D_h]`), `engram.{l}.adam.row_steps` (I32 `[R]`), and metadata
/// `engram_adam_steps` (JSON, one step count per layer).
pub fn optimizer_to_safetensors(e: &Engram, opt: &[SparseAdam]) -> Result<Vec<u8>> {
    if opt.len() != e.layers.len() {
        bail!(
            "{} Engram optimizer states for {} layers",
            opt.len(),
            e.layers.len()
        );
    }
    let mut t: Vec<(String, Vec<usize>, Data)> = Vec::new();
    let mut steps = Vec::new();
    for (l, o) in e.layers.iter().zip(opt) {
        let (lid, r, d) = (l.hash.layer_id, l.table.rows(), l.table.dim());
        t.push((format!("engram.{lid}.adam.m"), vec![r, d], Data::F32(&o.m)));
        t.push((format!("engram.{lid}.adam.v"), vec![r, d], Data::F32(&o.v)));
        t.push((
            format!("engram.{lid}.adam.row_steps"),
            vec![r],
            Data::I32(o.row_steps.iter().map(|&x| x as i32).collect()),
        ));
        steps.push(o.step);
    }
    let mut meta = HashMap::new();
    meta.insert(
        "engram_adam_steps".to_string(),
        serde_json::to_string(&steps)?,
    );
    serialize_mixed(&t, meta)
}

/// Inverse of [`optimizer_to_safetensors`] for the layers of `e` (`p`: the file, for errors).
pub fn optimizer_from_safetensors(f: &TensorFile, p: &Path, e: &Engram) -> Result<Vec<SparseAdam>> {
    let steps: Vec<u64> = serde_json::from_str(
        f.metadata()?
            .get("engram_adam_steps")
            .with_context(|| format!("{}: no step counts", p.display()))?,
    )?;
    if steps.len() != e.layers.len() {
        bail!(
            "{}: {} layers, expected {}",
            p.display(),
            steps.len(),
            e.layers.len()
        );
    }
    let mut out = Vec::new();
    for (l, step) in e.layers.iter().zip(steps) {
        let (lid, r, d) = (l.hash.layer_id, l.table.rows(), l.table.dim());
        let mut o = SparseAdam::new(r, d);
        o.m = f.f32(&format!("engram.{lid}.adam.m"), Some(&[r, d]))?;
        o.v = f.f32(&format!("engram.{lid}.adam.v"), Some(&[r, d]))?;
        o.row_steps = f.u32_shaped(&format!("engram.{lid}.adam.row_steps"), Some(&[r]))?;
        o.step = step;
        out.push(o);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engram::tests::tiny_engram;

    #[test]
    fn engram_safetensors_round_trip_with_and_without_tables() {
        let eng = tiny_engram(2, 4);
        let dir = std::env::temp_dir().join(format!("mnemo-engram-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("engram.safetensors");
        std::fs::write(&path, eng.to_safetensors(true).unwrap()).unwrap();
        let f = TensorFile::open(&path).unwrap();
        let back = Engram::from_safetensors(&f, None).unwrap();
        assert_eq!(back.cfg, eng.cfg);
        assert_eq!(back.compress.lookup(), eng.compress.lookup());
        for (a, b) in back.layers.iter().zip(&eng.layers) {
            assert_eq!(a.hash, b.hash);
            assert_eq!(a.params, b.params);
            assert_eq!(a.table.as_slice(), b.table.as_slice());
        }
        // Tables kept as mapped files beside a table-less file.
        std::fs::write(&path, eng.to_safetensors(false).unwrap()).unwrap();
        let f = TensorFile::open(&path).unwrap();
        assert!(Engram::from_safetensors(&f, None).is_err());
        let tables: Vec<EngramTable> = eng
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let p = dir.join(format!("table{i}.f32"));
                l.table.write_file(&p).unwrap();
                EngramTable::open_mapped(&p, l.table.rows(), l.table.dim(), false).unwrap()
            })
            .collect();
        let back = Engram::from_safetensors(&f, Some(tables)).unwrap();
        assert!(back.inspect().iter().all(|i| i.mapped));
        assert_eq!(
            back.layers[1].table.as_slice(),
            eng.layers[1].table.as_slice()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
