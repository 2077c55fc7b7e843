//! Run directories and checkpoints.
//!
//! ```text
//! RUN_DIR/
//!   run.json          the resolved run config (model + training + data), written at start
//!   metrics.jsonl     one JSON object per logged step (deterministic values only)
//!   loss.png          loss curves, redrawn at every evaluation
//!   checkpoint/       the latest checkpoint, everything needed to resume:
//!     model.safetensors       parameters by name ([out, in] linear weights)
//!     optimizer.safetensors   AdamW moments `adam.m`, `adam.v` (flat, parameter layout order)
//!     state.json              step, tokens seen, data RNG, run config
//!     config.json             the model config (so the directory loads on its own)
//!     tokenizer.json          the tokenizer
//!     engram.safetensors      (Engram models) compression table, hash multipliers and primes
//!                             (metadata, never recomputed on load), gate parameters (a copy;
//!                             the model file holds them too)
//!     engram_table.{l}.f32    (Engram models) table of block `l`: raw little-endian f32
//!                             `[rows, head_dim]`, memory-mappable (`EngramTable::open_mapped`)
//!     engram_optimizer.safetensors  lazy-Adam state of each table (`m`, `v`, per-row steps)
//! ```
//!
//! A checkpoint is written to `RUN_DIR/.checkpoint.tmp`, synced, and swapped in by two
//! renames (`checkpoint` → `checkpoint.prev`, tmp → `checkpoint`); loading falls back to
//! `checkpoint.prev` if a crash happened between them. A partly written checkpoint is never
//! taken for a complete one.

pub mod delta;

use crate::config::ModelConfig;
use crate::engram::{Engram, EngramTable, LayerHash, SparseAdam};
use crate::model::Model;
use crate::moe::BiasPool;
use crate::rng::Rng;
use crate::safetensors_io::{serialize_mixed, Data, TensorFile};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const CHECKPOINT_DIR: &str = "checkpoint";
const PREV_DIR: &str = "checkpoint.prev";
const TMP_DIR: &str = ".checkpoint.tmp";

/// Training state beside the weights.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainState {
    pub format_version: u32,
    pub step: u64,
    pub tokens_seen: u64,
    pub data_rng: Rng,
    /// The run config (model, train, data) as JSON.
    pub run: serde_json::Value,
}

/// What a checkpoint holds once loaded.
pub struct Loaded {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub state: Option<TrainState>,
    pub adam: Option<(Vec<f32>, Vec<f32>)>,
    /// The Engram tables' lazy-Adam state (with the optimizer, Engram models only).
    pub engram_opt: Option<Vec<SparseAdam>>,
    /// The MoE refit pools, one per layer (with the optimizer; empty pools when the run keeps
    /// none, see `bias_fit_window`).
    pub moe_pools: Option<Vec<BiasPool>>,
    pub dir: PathBuf,
}

/// File name of the table of Engram block `l`.
pub fn engram_table_file(l: usize) -> String {
    format!("engram_table.{l}.f32")
}

/// Write the Engram files of a checkpoint into `dir`.
fn write_engram(dir: &Path, e: &Engram, opt: &[SparseAdam]) -> Result<()> {
    write_file(dir, "engram.safetensors", &e.to_safetensors(false)?)?;
    for l in &e.layers {
        l.table
            .write_file(&dir.join(engram_table_file(l.hash.layer_id)))?;
    }
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
    write_file(
        dir,
        "engram_optimizer.safetensors",
        &serialize_mixed(&t, meta)?,
    )
}

/// Read the Engram files of checkpoint `dir` for `model` (tables in RAM when `writable`,
/// else memory-mapped read-only). Multipliers and primes are taken as stored.
fn read_engram(dir: &Path, model: &ModelConfig, writable: bool) -> Result<Engram> {
    let want = model.engram.as_ref().context("no engram config")?;
    let p = dir.join("engram.safetensors");
    let f = TensorFile::open(&p)?;
    let meta = f.metadata()?;
    let v: serde_json::Value = serde_json::from_str(
        meta.get("engram")
            .with_context(|| format!("{}: no `engram` metadata", p.display()))?,
    )
    .with_context(|| format!("{}: engram metadata", p.display()))?;
    let stored: crate::engram::EngramConfig = serde_json::from_value(v["config"].clone())
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
    let nb = crate::model::engram_gate_spec(model).n_branch;
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

fn read_engram_opt(dir: &Path, e: &Engram) -> Result<Vec<SparseAdam>> {
    let p = dir.join("engram_optimizer.safetensors");
    let f = TensorFile::open(&p)?;
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

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
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

/// Save a complete checkpoint of a model without Engram (see [`save_with`]).
pub fn save(
    run_dir: &Path,
    model: &Model,
    tok: &Tokenizer,
    adam: (&[f32], &[f32]),
    state: &TrainState,
) -> Result<()> {
    if model.engram.is_some() {
        bail!("checkpoint::save: an Engram model needs `save_with` (tables and their optimizer)");
    }
    save_inner(run_dir, model, tok, adam, &[], &[], state)
}

/// Save a complete checkpoint atomically into `run_dir/checkpoint`, with the Engram files and
/// the tables' lazy-Adam states `table_opt` when the model has Engram, and the MoE refit
/// pools `moe_pools` (one per layer, or none) beside the Adam moments.
#[allow(clippy::too_many_arguments)]
pub fn save_with(
    run_dir: &Path,
    model: &mut Model,
    tok: &Tokenizer,
    adam: (&[f32], &[f32]),
    table_opt: &[SparseAdam],
    moe_pools: &[BiasPool],
    state: &TrainState,
) -> Result<()> {
    model.sync_engram_gates();
    save_inner(run_dir, model, tok, adam, table_opt, moe_pools, state)
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

fn save_inner(
    run_dir: &Path,
    model: &Model,
    tok: &Tokenizer,
    adam: (&[f32], &[f32]),
    table_opt: &[SparseAdam],
    moe_pools: &[BiasPool],
    state: &TrainState,
) -> Result<()> {
    let tmp = run_dir.join(TMP_DIR);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    write_file(&tmp, "model.safetensors", &model_bytes(model)?)?;
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
    let opt = serialize_mixed(&tensors, HashMap::new())?;
    write_file(&tmp, "optimizer.safetensors", &opt)?;
    write_file(
        &tmp,
        "state.json",
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    write_file(
        &tmp,
        "config.json",
        serde_json::to_string_pretty(&model.cfg)?.as_bytes(),
    )?;
    write_file(&tmp, "tokenizer.json", tok.to_json()?.as_bytes())?;
    if let Some(e) = &model.engram {
        write_engram(&tmp, e, table_opt)?;
    }
    if let Ok(d) = std::fs::File::open(&tmp) {
        d.sync_all().ok();
    }
    let cur = run_dir.join(CHECKPOINT_DIR);
    let prev = run_dir.join(PREV_DIR);
    if prev.exists() {
        std::fs::remove_dir_all(&prev)
            .with_context(|| format!("cannot remove {}", prev.display()))?;
    }
    if cur.exists() {
        std::fs::rename(&cur, &prev)
            .with_context(|| format!("cannot move {} aside", cur.display()))?;
    }
    std::fs::rename(&tmp, &cur)
        .with_context(|| format!("cannot move the new checkpoint into {}", cur.display()))?;
    if prev.exists() {
        std::fs::remove_dir_all(&prev).ok();
    }
    if let Ok(d) = std::fs::File::open(run_dir) {
        d.sync_all().ok();
    }
    Ok(())
}

/// Keep the checkpoint just saved in `run_dir` as `run_dir/checkpoint-step{step}`: each file
/// of `checkpoint/` hard-linked (copied where the file system has no hard links) into a
/// temporary directory that is then renamed, so a kept directory is always complete. One left
/// by an earlier attempt at the same step is replaced. Returns its path; [`load`] and
/// `mnemo eval`/`generate` accept it.
pub fn keep(run_dir: &Path, step: u64) -> Result<PathBuf> {
    let cur = run_dir.join(CHECKPOINT_DIR);
    let dst = run_dir.join(format!("{CHECKPOINT_DIR}-step{step}"));
    let tmp = run_dir.join(format!(".{CHECKPOINT_DIR}-step{step}.tmp"));
    for d in [&tmp, &dst] {
        if d.exists() {
            std::fs::remove_dir_all(d)
                .with_context(|| format!("cannot replace {}", d.display()))?;
        }
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    for entry in
        std::fs::read_dir(&cur).with_context(|| format!("cannot list {}", cur.display()))?
    {
        let src = entry?.path();
        let to = tmp.join(src.file_name().context("checkpoint file without a name")?);
        if std::fs::hard_link(&src, &to).is_err() {
            std::fs::copy(&src, &to)
                .with_context(|| format!("cannot keep {} as {}", src.display(), to.display()))?;
        }
    }
    if let Ok(d) = std::fs::File::open(&tmp) {
        d.sync_all().ok();
    }
    std::fs::rename(&tmp, &dst)
        .with_context(|| format!("cannot move the kept checkpoint into {}", dst.display()))?;
    Ok(dst)
}

/// Find the checkpoint directory for a run directory (or accept a checkpoint directory itself).
pub fn locate(path: &Path) -> Result<PathBuf> {
    if !path.exists() {
        bail!("{} does not exist", path.display());
    }
    if path.join("model.safetensors").is_file() {
        return Ok(path.to_path_buf());
    }
    for name in [CHECKPOINT_DIR, PREV_DIR] {
        let c = path.join(name);
        if c.join("model.safetensors").is_file() && c.join("config.json").is_file() {
            return Ok(c);
        }
    }
    bail!(
        "{} holds no checkpoint (expected {}/model.safetensors; was the run saved?)",
        path.display(),
        CHECKPOINT_DIR
    )
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

/// Context cap for imported models, GGUF or Hugging Face (their KV cache is allocated for the
/// whole context).
pub const IMPORTED_MAX_SEQ_LEN: usize = 4096;

/// Load a checkpoint (model, tokenizer, and training state when present) from a run directory,
/// a Llama-architecture `.gguf` file, or a Hugging Face Llama directory (`config.json` +
/// `model.safetensors` + `tokenizer.json`).
pub fn load(path: &Path, with_optimizer: bool) -> Result<Loaded> {
    let imported = if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        Some(crate::gguf::load_llama(path, IMPORTED_MAX_SEQ_LEN)?)
    } else if path.is_dir() && crate::hf::is_hf_dir(path) {
        Some(crate::hf::load_llama(path, IMPORTED_MAX_SEQ_LEN)?)
    } else {
        None
    };
    if let Some((model, tokenizer)) = imported {
        return Ok(Loaded {
            model,
            tokenizer,
            state: None,
            adam: None,
            engram_opt: None,
            moe_pools: None,
            dir: path.to_path_buf(),
        });
    }
    // A memory-only fine-tuning run kept as a delta only: its base plus the delta.
    if path.is_dir() && path.join(delta::DELTA_FILE).is_file() && locate(path).is_err() {
        return delta::load_delta_run(path);
    }
    let dir = locate(path)?;
    let cfg = read_config(&dir.join("config.json"))?;
    let mut model = Model::new(cfg)?;
    // The Engram files first: a config that disagrees with them is named as such.
    let engram = match model.cfg.engram {
        Some(_) => Some(read_engram(&dir, &model.cfg, with_optimizer)?),
        None => None,
    };
    load_weights(&mut model, &dir.join("model.safetensors"))?;
    let tokenizer = Tokenizer::load(&dir.join("tokenizer.json"))?;
    if tokenizer.vocab_size() > model.cfg.vocab_size {
        bail!(
            "{}: tokenizer has {} tokens but the model's vocab_size is {}",
            dir.display(),
            tokenizer.vocab_size(),
            model.cfg.vocab_size
        );
    }
    let mut engram_opt = None;
    if let Some(e) = engram {
        let v = e.compress.tokenizer_vocab_size();
        if v != tokenizer.vocab_size() {
            bail!(
                "{}: the Engram compression table covers {v} token ids but the tokenizer has {}",
                dir.display(),
                tokenizer.vocab_size()
            );
        }
        if with_optimizer {
            engram_opt = Some(read_engram_opt(&dir, &e)?);
        }
        model.engram = Some(e);
        model.engram_eot = Some(tokenizer.eot());
    }
    let state_path = dir.join("state.json");
    let state = if state_path.is_file() {
        let s = std::fs::read_to_string(&state_path)
            .with_context(|| format!("cannot read {}", state_path.display()))?;
        Some(
            serde_json::from_str::<TrainState>(&s)
                .with_context(|| format!("{} is corrupt", state_path.display()))?,
        )
    } else {
        None
    };
    let (adam, moe_pools) = if with_optimizer {
        let p = dir.join("optimizer.safetensors");
        let f = TensorFile::open(&p)?;
        let n = model.layout.total;
        let adam = (f.f32("adam.m", Some(&[n]))?, f.f32("adam.v", Some(&[n]))?);
        (Some(adam), Some(read_moe_pools(&f, &p, &model)?))
    } else {
        (None, None)
    };
    Ok(Loaded {
        model,
        tokenizer,
        state,
        adam,
        engram_opt,
        moe_pools,
        dir,
    })
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
