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
//! The format of each file is [`crate::io::checkpoint`]; this module is the directory: where
//! checkpoints live, how one is written and swapped in, kept, found and loaded (a run, a
//! checkpoint, a fine-tuning delta over its base, or an imported GGUF / Hugging Face model).
//!
//! A checkpoint is written to `RUN_DIR/.checkpoint.tmp`, synced, and swapped in by two
//! renames (`checkpoint` → `checkpoint.prev`, tmp → `checkpoint`); loading falls back to
//! `checkpoint.prev` if a crash happened between them. A partly written checkpoint is never
//! taken for a complete one.

pub mod delta;

pub use crate::io::checkpoint::{
    engram_table_file, hash_table_name, load_weights, model_bytes, read_config,
};

use crate::engram::SparseAdam;
use crate::io::checkpoint::{optimizer_bytes, read_engram, read_engram_opt, read_optimizer};
use crate::io::checkpoint::{write_engram, write_file};
use crate::io::{gguf, hf};
use crate::model::Model;
use crate::moe::BiasPool;
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
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

/// What a checkpoint holds once loaded: with its tokenizer ([`load`]), or with its tokenizer
/// when it has one (`Loaded<Option<Tokenizer>>`, [`load_model`]).
pub struct Loaded<T = Tokenizer> {
    pub model: Model,
    pub tokenizer: T,
    pub state: Option<TrainState>,
    pub adam: Option<(Vec<f32>, Vec<f32>)>,
    /// The Engram tables' lazy-Adam state (with the optimizer, Engram models only).
    pub engram_opt: Option<Vec<SparseAdam>>,
    /// The MoE refit pools, one per layer (with the optimizer; empty pools when the run keeps
    /// none, see `bias_fit_window`).
    pub moe_pools: Option<Vec<BiasPool>>,
    pub dir: PathBuf,
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
    let opt = optimizer_bytes(model, adam, moe_pools)?;
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

/// Context cap for imported models, GGUF or Hugging Face (their KV cache is allocated for the
/// whole context).
pub const IMPORTED_MAX_SEQ_LEN: usize = 4096;

/// A GGUF (`deepseek2`, or Llama-family) whose parameters would take more than this many bytes
/// in f32 is loaded with its quantised matrices packed (`io::gguf::deepseek2::load_packed`,
/// `io::gguf::load_llama_packed`): only the cached drivers (generate, serve, ask, `logits
/// --decode-from 0`) run it.
pub const GGUF_F32_MAX: usize = 4 << 30;

/// Load a checkpoint (model, tokenizer, and training state when present) from a run directory,
/// a Llama-architecture `.gguf` file, a Hugging Face Llama directory (`config.json` +
/// `model.safetensors` + `tokenizer.json`), or a DeepSeek-V4 directory in transformers' or the
/// official layout (`model.safetensors` or shards). The tokenizer is required: a directory
/// without `tokenizer.json` is an error that says so (see [`load_model`] for token ids).
pub fn load(path: &Path, with_optimizer: bool) -> Result<Loaded> {
    let l = load_inner(path, with_optimizer, true)?;
    let tokenizer = l
        .tokenizer
        .with_context(|| format!("{}: no tokenizer", path.display()))?;
    Ok(Loaded {
        model: l.model,
        tokenizer,
        state: l.state,
        adam: l.adam,
        engram_opt: l.engram_opt,
        moe_pools: l.moe_pools,
        dir: l.dir,
    })
}

/// Load the model of anything [`load`] takes, without the optimizer state, and its tokenizer
/// only when the directory has one: for commands that run token ids (`mnemo logits`) on
/// directories without tokenizer files. (An Engram model still needs its tokenizer: the
/// end-of-text id separates documents for the n-gram hashes.)
pub fn load_model(path: &Path) -> Result<Loaded<Option<Tokenizer>>> {
    load_inner(path, false, false)
}

/// [`load`] for an official DeepSeek-V4 directory, its FP8/FP4 product weights kept packed
/// and memory-mapped with no f32 copy ([`crate::io::v4_packed::load_dir_packed`]: the model
/// runs through its cache only — prefill, decoding, serving). The tokenizer is required when
/// `need_tokenizer`. An error for any other model (nothing to keep packed).
pub fn load_packed(path: &Path, need_tokenizer: bool) -> Result<Loaded<Option<Tokenizer>>> {
    if !(path.is_dir() && crate::io::v4_official::is_official_dir(path)) {
        bail!(
            "{}: keeping weights packed needs an official DeepSeek-V4 directory (FP8/FP4 \
             weights under the release's names); other models have nothing to keep packed",
            path.display()
        );
    }
    let model = crate::io::v4_packed::load_dir_packed(path)?;
    let tokenizer = tokenizer_of(path, &model, need_tokenizer)?;
    Ok(Loaded {
        model,
        tokenizer,
        state: None,
        adam: None,
        engram_opt: None,
        moe_pools: None,
        dir: path.to_path_buf(),
    })
}

/// The tokenizer of checkpoint directory `dir`: `tokenizer.json` when present (checked against
/// the model's vocabulary); when absent, an error if `need`, else `None`.
fn tokenizer_of(dir: &Path, model: &Model, need: bool) -> Result<Option<Tokenizer>> {
    let p = dir.join("tokenizer.json");
    if !p.is_file() {
        if need {
            bail!(
                "{}: no tokenizer.json: this command reads or writes text, so it needs the \
                 model's tokenizer (`mnemo logits` runs a model from token ids without one)",
                dir.display()
            );
        }
        return Ok(None);
    }
    let tokenizer = Tokenizer::load(&p)?;
    if tokenizer.vocab_size() > model.cfg.vocab_size {
        bail!(
            "{}: tokenizer has {} tokens but the model's vocab_size is {}",
            dir.display(),
            tokenizer.vocab_size(),
            model.cfg.vocab_size
        );
    }
    Ok(Some(tokenizer))
}

/// A DeepSeek-V4 directory in either layout: the official one (`embed.weight`, FP8/FP4) or
/// transformers' (`model.embed_tokens.weight`).
fn load_v4_dir(dir: &Path) -> Result<Model> {
    if crate::io::v4_official::is_official_dir(dir) {
        crate::io::v4_official::load_dir(dir)
    } else {
        crate::io::hf_v4::load_dir(dir)
    }
}

fn load_inner(
    path: &Path,
    with_optimizer: bool,
    need_tokenizer: bool,
) -> Result<Loaded<Option<Tokenizer>>> {
    let is_gguf = path.is_file() && path.extension().is_some_and(|e| e == "gguf");
    let imported = if is_gguf && gguf::deepseek4::is_deepseek4_file(path) {
        // A DeepSeek-V4 GGUF (llama.cpp's `deepseek4`): its tokenizer only when asked for.
        let (model, tokenizer) = gguf::deepseek4::load(path)?;
        let tokenizer = match tokenizer {
            Ok(t) => Some(t),
            Err(e) if need_tokenizer => bail!("{}: no usable tokenizer: {e}", path.display()),
            Err(_) => None,
        };
        Some((model, tokenizer))
    } else if is_gguf && gguf::deepseek2::is_deepseek2_file(path) {
        // A DeepSeek-V2 GGUF (llama.cpp's `deepseek2`): its tokenizer only when asked for.
        // Beyond GGUF_F32_MAX bytes of f32 parameters its quantised matrices stay packed
        // (cached drivers only), as they must for V2-Lite (~63 GB in f32).
        let big = gguf::deepseek2::f32_bytes(path)? > GGUF_F32_MAX;
        let (model, tokenizer) = if big {
            gguf::deepseek2::load_packed(path, IMPORTED_MAX_SEQ_LEN)?
        } else {
            gguf::deepseek2::load(path, IMPORTED_MAX_SEQ_LEN)?
        };
        let tokenizer = match tokenizer {
            Ok(t) => Some(t),
            Err(e) if need_tokenizer => bail!("{}: no usable tokenizer: {e}", path.display()),
            Err(_) => None,
        };
        Some((model, tokenizer))
    } else if is_gguf {
        // Llama-family: packed beyond GGUF_F32_MAX bytes of f32 parameters, as above.
        let (model, tokenizer) = if gguf::llama_f32_bytes(path)? > GGUF_F32_MAX {
            gguf::load_llama_packed(path, IMPORTED_MAX_SEQ_LEN)?
        } else {
            gguf::load_llama(path, IMPORTED_MAX_SEQ_LEN)?
        };
        Some((model, Some(tokenizer)))
    } else if path.is_dir() && crate::io::hf_v4::is_v4_dir(path) {
        // A DeepSeek-V4 directory (before the Llama check, which it also passes).
        let model = load_v4_dir(path)?;
        let tokenizer = tokenizer_of(path, &model, need_tokenizer)?;
        Some((model, tokenizer))
    } else if path.is_dir() && hf::is_hf_dir(path) {
        let model = hf::load_llama_model(path, IMPORTED_MAX_SEQ_LEN)?;
        let tokenizer = tokenizer_of(path, &model, need_tokenizer)?;
        Some((model, tokenizer))
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
        let l = delta::load_delta_run(path)?;
        return Ok(Loaded {
            model: l.model,
            tokenizer: Some(l.tokenizer),
            state: l.state,
            adam: l.adam,
            engram_opt: l.engram_opt,
            moe_pools: l.moe_pools,
            dir: l.dir,
        });
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
    let tokenizer = tokenizer_of(&dir, &model, need_tokenizer)?;
    let mut engram_opt = None;
    if let Some(e) = engram {
        let Some(tokenizer) = &tokenizer else {
            bail!(
                "{}: no tokenizer.json: an Engram model needs it even to run token ids (its \
                 end-of-text id separates documents for the n-gram hashes)",
                dir.display()
            );
        };
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
        let (adam, pools) = read_optimizer(&dir.join("optimizer.safetensors"), &model)?;
        (Some(adam), Some(pools))
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
