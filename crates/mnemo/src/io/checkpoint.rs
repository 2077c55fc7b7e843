//! The files of a checkpoint directory, one format each. Where a checkpoint lives, how it is
//! swapped in atomically, kept, found and loaded is [`crate::checkpoint`].
//!
//! - `model.safetensors`: [`model_bytes`] / [`load_weights`]: parameters by name (`[out, in]`
//!   linear weights) with the config as metadata `mnemo_config`, and the MoE hash layers'
//!   token → experts tables ([`hash_table_name`]).
//! - `optimizer.safetensors`: [`optimizer_bytes`] / [`read_optimizer`]: the AdamW moments and
//!   the MoE refit pools.
//! - `config.json`: [`read_config`].
//! - Engram models: [`write_engram`] / [`read_engram`] / [`read_engram_opt`]:
//!   `engram.safetensors` ([`crate::io::engram`]), one `engram_table.{l}.f32` per table
//!   ([`engram_table_file`]: raw little-endian f32 `[rows, head_dim]`, memory-mappable) and
//!   `engram_optimizer.safetensors`.

use super::engram::{optimizer_from_safetensors, optimizer_to_safetensors};
use super::safetensors::{serialize_mixed, Data, TensorFile};
use crate::config::{EngramConfig, ModelConfig};
use crate::engram::{Engram, EngramTable, LayerHash, SparseAdam};
use crate::model::{engram_gate_spec, Model};
use crate::moe::BiasPool;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;

/// File name of the table of Engram block `l`.
pub fn engram_table_file(l: usize) -> String {
    format!("engram_table.{l}.f32")
}

/// Write the Engram files of a checkpoint into `dir`: `engram.safetensors` (without the
/// tables), one `engram_table.{l}.f32` per table, and `engram_optimizer.safetensors` (`opt`).
pub fn write_engram(dir: &Path, e: &Engram, opt: &[SparseAdam]) -> Result<()> {
    write_file(dir, "engram.safetensors", &e.to_safetensors(false)?)?;
    for l in &e.layers {
        l.table
            .write_file(&dir.join(engram_table_file(l.hash.layer_id)))?;
    }
    write_file(
        dir,
        "engram_optimizer.safetensors",
        &optimizer_to_safetensors(e, opt)?,
    )
}

/// Read the Engram files of checkpoint `dir` for `model` (tables in RAM when `writable`,
/// else memory-mapped read-only). Multipliers and primes are taken as stored.
pub fn read_engram(dir: &Path, model: &ModelConfig, writable: bool) -> Result<Engram> {
    let want = model.engram.as_ref().context("no engram config")?;
    let p = dir.join("engram.safetensors");
    let f = TensorFile::open(&p)?;
    let meta = f.metadata()?;
    let v: serde_json::Value = serde_json::from_str(
        meta.get("engram")
            .with_context(|| format!("{}: no `engram` metadata", p.display()))?,
    )
    .with_context(|| format!("{}: engram metadata", p.display()))?;
    let stored: EngramConfig = serde_json::from_value(v["config"].clone())
        .with_context(|| format!("{}: engram config", p.display()))?;
    if &stored != want {
        bail!(
            "{}: the stored Engram config differs from the model config's `engram` ({} vs {})",
            p.display(),
            serde_json::to_string(&stored)?,
            serde_json::to_string(want)?
        );
    }
    let hashes: Vec<LayerHash> = serde_json::from_value(v["hashes"].clone())
        .with_context(|| format!("{}: engram hashes", p.display()))?;
    let mut tables = Vec::new();
    for h in &hashes {
        h.validate()?;
        let tp = dir.join(engram_table_file(h.layer_id));
        let (rows, d) = (h.total_rows() as usize, want.head_dim);
        let t = EngramTable::open_mapped(&tp, rows, d, false)?;
        tables.push(if writable {
            EngramTable::from_vec(rows, d, t.as_slice().to_vec())?
        } else {
            t
        });
    }
    let e = Engram::from_safetensors(&f, Some(tables))
        .with_context(|| format!("in {}", p.display()))?;
    let nb = engram_gate_spec(model).n_branch;
    if e.layers
        .iter()
        .any(|l| l.gate.d != model.d_model || l.gate.n_branch != nb)
    {
        bail!(
            "{}: Engram gates for another model width or stream count",
            p.display()
        );
    }
    Ok(e)
}

/// Read the tables' lazy-Adam state of checkpoint `dir` for `e`.
pub fn read_engram_opt(dir: &Path, e: &Engram) -> Result<Vec<SparseAdam>> {
    let p = dir.join("engram_optimizer.safetensors");
    let f = TensorFile::open(&p)?;
    optimizer_from_safetensors(&f, &p, e)
}

/// Write `name` into `dir` and sync it to disk.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let p = dir.join(name);
    let mut f =
        std::fs::File::create(&p).with_context(|| format!("cannot create {}", p.display()))?;
    std::io::Write::write_all(&mut f, bytes)
        .with_context(|| format!("cannot write {}", p.display()))?;
    f.sync_all()
        .with_context(|| format!("cannot sync {}", p.display()))?;
    Ok(())
}

/// The model's tensors as safetensors bytes.
pub fn model_bytes(model: &Model) -> Result<Vec<u8>> {
    // One metadata key only: safetensors stores the map unordered, and checkpoints must be
    // byte-reproducible.
    let mut meta = HashMap::new();
    meta.insert("mnemo_config".into(), serde_json::to_string(&model.cfg)?);
    let mut tensors: Vec<(String, Vec<usize>, Data)> = model
        .layout
        .tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.shape.clone(),
                Data::F32(&model.params[t.range()]),
            )
        })
        .collect();
    for (l, tab) in model.hash_tables.iter().enumerate() {
        if let Some(tab) = tab {
            let ints = tab.iter().map(|&x| x as i32).collect();
            tensors.push((
                hash_table_name(l),
                vec![model.cfg.vocab_size, model.cfg.top_k],
                Data::I32(ints),
            ));
        }
    }
    serialize_mixed(&tensors, meta)
}

/// Name of layer `l`'s token → experts table.
pub fn hash_table_name(l: usize) -> String {
    format!("layers.{l}.ffn.tid2eid")
}

/// Load model weights (and MoE hash tables) from a safetensors file into `model`, checking
/// every name, shape and value.
pub fn load_weights(model: &mut Model, path: &Path) -> Result<()> {
    let f = TensorFile::open(path)?;
    let (v, k, e) = (
        model.cfg.vocab_size,
        model.cfg.top_k,
        model.cfg.n_routed_experts,
    );
    for l in 0..model.cfg.n_layers {
        if model.cfg.is_hash(l) {
            let name = hash_table_name(l);
            let tab = f.u32_shaped(&name, Some(&[v, k]))?;
            if let Some(bad) = tab.iter().find(|&&x| x as usize >= e) {
                bail!(
                    "{}: `{name}` routes to expert {bad}, but the model has {e} experts",
                    path.display()
                );
            }
            model.hash_tables[l] = Some(tab);
        }
    }
    for t in model.layout.tensors.clone() {
        let w = f.f32(&t.name, Some(&t.shape))?;
        if w.iter().any(|x| !x.is_finite()) {
            bail!(
                "{}: tensor `{}` contains NaN or infinite values",
                path.display(),
                t.name
            );
        }
        model.params[t.range()].copy_from_slice(&w);
    }
    Ok(())
}

/// `optimizer.safetensors`: the AdamW moments `adam.m`, `adam.v` (flat, parameter layout
/// order) and the non-empty MoE refit pools `moe_pools` (one per layer, or none).
pub fn optimizer_bytes(
    model: &Model,
    adam: (&[f32], &[f32]),
    moe_pools: &[BiasPool],
) -> Result<Vec<u8>> {
    let n = model.layout.total;
    let pools: Vec<_> = moe_pools
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.is_empty())
        .map(|(l, p)| (l, p.to_parts()))
        .collect();
    let mut tensors: Vec<(String, Vec<usize>, Data)> = vec![
        ("adam.m".into(), vec![n], Data::F32(adam.0)),
        ("adam.v".into(), vec![n], Data::F32(adam.1)),
    ];
    let d = model.cfg.d_model;
    for (l, (x, rows, offset)) in &pools {
        let [xn, rn, on] = pool_names(*l);
        tensors.push((xn, vec![x.len() / d, d], Data::F32(x)));
        let rows: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        tensors.push((rn, vec![rows.len()], Data::I32(rows)));
        tensors.push((on, vec![1], Data::I32(vec![*offset as i32])));
    }
    serialize_mixed(&tensors, HashMap::new())
}

/// The AdamW moments `(m, v)`, flat in parameter layout order.
pub type Moments = (Vec<f32>, Vec<f32>);

/// The AdamW moments and MoE refit pools of the optimizer file `p` for `model` (inverse of
/// [`optimizer_bytes`]).
pub fn read_optimizer(p: &Path, model: &Model) -> Result<(Moments, Vec<BiasPool>)> {
    let f = TensorFile::open(p)?;
    let n = model.layout.total;
    let adam = (f.f32("adam.m", Some(&[n]))?, f.f32("adam.v", Some(&[n]))?);
    Ok((adam, read_moe_pools(&f, p, model)?))
}

/// Names of layer `l`'s refit pool in `optimizer.safetensors`: inputs `[R, d]`, rows per batch,
/// and the next sampling offset `[1]`.
fn pool_names(l: usize) -> [String; 3] {
    [
        format!("moe_pool.{l}.inputs"),
        format!("moe_pool.{l}.rows"),
        format!("moe_pool.{l}.offset"),
    ]
}

/// The MoE refit pools saved beside the Adam moments (empty pools where none was saved, e.g. a
/// run without `bias_fit_window`).
fn read_moe_pools(f: &TensorFile, p: &Path, model: &Model) -> Result<Vec<BiasPool>> {
    let names = f.names();
    let mut pools = model.new_moe_pools();
    let (c, d) = (&model.cfg, model.cfg.d_model);
    for (l, pool) in pools.iter_mut().enumerate() {
        let [xn, rn, on] = pool_names(l);
        if !names.contains(&xn) {
            continue;
        }
        let rows = f.u32(&rn)?;
        let total: usize = rows.iter().map(|&r| r as usize).sum();
        let x = f.f32(&xn, Some(&[total, d]))?;
        let offset = f.u32_shaped(&on, Some(&[1]))?[0] as usize;
        *pool = BiasPool::from_parts(c.bias_fit_window, c.bias_fit_stride, d, &x, &rows, offset)
            .with_context(|| {
                format!(
                    "{}: the MoE refit pool of layer {l} ({} batches, offset {offset}) does not fit bias_fit_window = {}, bias_fit_stride = {}",
                    p.display(),
                    rows.len(),
                    c.bias_fit_window,
                    c.bias_fit_stride
                )
            })?;
    }
    Ok(pools)
}

/// Read a model config file.
pub fn read_config(path: &Path) -> Result<ModelConfig> {
    let s =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let c: ModelConfig = serde_json::from_str(&s)
        .with_context(|| format!("{} is not a valid model config", path.display()))?;
    c.validate()
        .with_context(|| format!("in {}", path.display()))?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moe_hash_tables_roundtrip_and_out_of_range_ids_are_rejected() {
        let mut cfg = ModelConfig::preset("tiny-moe").unwrap();
        cfg.vocab_size = 50;
        cfg.n_layers = 2;
        cfg.num_hash_layers = 1;
        let mut m = Model::new(cfg.clone()).unwrap();
        m.init(4);
        let tab = m.hash_tables[1].clone().expect("layer 1 is the hash layer");
        assert!(tab
            .chunks(cfg.top_k)
            .all(|r| r[0] != r[1] && r.iter().all(|&x| (x as usize) < 16)));
        let dir = std::env::temp_dir().join(format!("mnemo-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.safetensors");
        std::fs::write(&p, model_bytes(&m).unwrap()).unwrap();
        let mut m2 = Model::new(cfg.clone()).unwrap();
        load_weights(&mut m2, &p).unwrap();
        assert_eq!(m2.hash_tables[1].as_ref(), Some(&tab));
        assert_eq!(m2.params, m.params);
        // A table that routes to an expert the model does not have.
        m.hash_tables[1].as_mut().unwrap()[7] = 16;
        std::fs::write(&p, model_bytes(&m).unwrap()).unwrap();
        let err = format!("{:#}", load_weights(&mut m2, &p).unwrap_err());
        assert!(
            err.contains("layers.1.ffn.tid2eid") && err.contains("expert 16"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
