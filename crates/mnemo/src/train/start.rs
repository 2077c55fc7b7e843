//! The start of a run: a fresh run (tokenizer trained or given, weights initialised or taken
//! from an `--init` run), a new run from another run's model (memory-only fine-tuning), or a
//! resumed one (weights, optimizer state, data order and metrics restored from the last
//! checkpoint); then the run's token cache.

use super::log::truncate_metrics;
use super::Start;
use crate::checkpoint::{self, TrainState};
use crate::config::DsaStage;
use crate::config::RunConfig;
use crate::data;
use crate::engram::SparseAdam;
use crate::finetune::DeltaBase;
use crate::model::Model;
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;
use crate::util::human_count;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::Instant;

/// Set up the run in `out` as `start` asks (see [`Start`]); returns its session and its
/// scanned corpus.
pub(super) fn start(out: &Path, start: Start) -> Result<(Session, data::Corpus)> {
    let (sess, corpus) = match start {
        Start::Fresh {
            run,
            tokenizer,
            init,
        } => {
            let corpus = data::scan(&run.data)?;
            (
                start_fresh(out, *run, tokenizer.as_deref(), &corpus, init.as_deref())?,
                corpus,
            )
        }
        Start::Resume {
            max_steps,
            dsa_stage,
        } => {
            let sess = start_resume(out, max_steps, dsa_stage)?;
            let corpus = data::scan(&sess.run.data)?;
            (sess, corpus)
        }
        Start::Init { run } => {
            let corpus = data::scan(&run.data)?;
            (start_init(out, *run)?, corpus)
        }
    };
    // A crash between saving a kept step's checkpoint and keeping it: the run resumes from
    // that very checkpoint, so keep it now.
    let step = sess.state.step;
    if step > 0
        && sess.run.train.keep_steps.contains(&step)
        && !out.join(format!("checkpoint-step{step}")).is_dir()
    {
        checkpoint::keep(out, step)?;
    }
    Ok((sess, corpus))
}

/// The token cache of the run's data (tokenized with the run's tokenizer, or reused from
/// `cache_root`), checked: every id lies in the Engram compression table and the training
/// split holds at least one window.
pub(super) fn prepare_data(
    sess: &Session,
    corpus: &data::Corpus,
    cache_root: &Path,
    progress: bool,
) -> Result<data::TokenCache> {
    let (run, model) = (&sess.run, &sess.model);
    let cache = data::prepare(corpus, &run.data, &sess.tok, cache_root, progress)?;
    eprintln!(
        "data: {} files, train {} tokens ({} bytes), val {} tokens; token cache {}{}",
        corpus.files.len(),
        human_count(cache.train.n_tokens as f64),
        human_count(cache.train.n_bytes as f64),
        human_count(cache.val.n_tokens as f64),
        cache.dir.display(),
        if cache.reused { " (reused)" } else { "" }
    );
    // Every id the model will see must lie in the Engram compression table (a token cache
    // written with another tokenizer would otherwise index out of it).
    model
        .check_engram_tokens(cache.train.tokens())
        .and_then(|_| model.check_engram_tokens(cache.val.tokens()))
        .with_context(|| format!("token cache {}", cache.dir.display()))?;
    let t = run.train.seq_len;
    if cache.train.n_tokens < t + 1 {
        bail!(
            "the training split has only {} tokens, fewer than seq_len + 1 = {}: use more data or a smaller --seq-len",
            cache.train.n_tokens,
            t + 1
        );
    }
    Ok(cache)
}

/// The run's tokenizer for a fresh run: the given file, or a byte-level BPE trained on the
/// training split.
fn fresh_tokenizer(
    path: Option<&Path>,
    run: &RunConfig,
    corpus: &data::Corpus,
) -> Result<Tokenizer> {
    if let Some(p) = path {
        return Tokenizer::load(p);
    }
    let vocab = run.model.vocab_size;
    eprintln!("training a byte-level BPE tokenizer (vocab {vocab}) on the training split…");
    let t0 = Instant::now();
    let docs = data::texts(corpus, data::Split::Train, run.train.tokenizer_max_bytes);
    let tok = Tokenizer::train(docs, vocab)?;
    eprintln!(
        "  done in {:.1}s ({} tokens)",
        t0.elapsed().as_secs_f64(),
        tok.vocab_size()
    );
    Ok(tok)
}

/// Everything the loop mutates, set up by [`start_fresh`] or [`start_resume`].
pub(super) struct Session {
    pub run: RunConfig,
    pub model: Model,
    pub tok: Tokenizer,
    pub state: TrainState,
    pub adam_m: Vec<f32>,
    pub adam_v: Vec<f32>,
    /// Lazy Adam of each Engram table (empty without Engram).
    pub table_opt: Vec<SparseAdam>,
    /// Memory-only fine-tuning: the base run the delta is taken against.
    pub base: Option<DeltaBase>,
    /// The MoE refit pools, one per layer (empty unless `bias_fit_window > 0`).
    pub moe_pools: Vec<crate::moe::BiasPool>,
}

/// Copy the weights of `src` (an `--init` run) into `model`: the same tensors with the same
/// shapes are required (context length and RoPE scaling may differ; they have no weights).
/// One addition is allowed: a DSA model may start from a model without the lightning indexer
/// (DeepSeek-V3.2's recipe starts the indexer warm-up from a trained dense checkpoint); the
/// indexer tensors then keep their fresh initialisation.
fn init_weights(model: &mut Model, src: Model, from: &Path) -> Result<()> {
    let adds_indexer = src.cfg.dsa.is_none() && model.cfg.dsa.is_some();
    let new: Vec<_> = model
        .layout
        .tensors
        .iter()
        .filter(|t| !(adds_indexer && crate::model::is_indexer_tensor(&t.name)))
        .cloned()
        .collect();
    let (a, b) = (&new, &src.layout.tensors);
    for i in 0..a.len().max(b.len()) {
        match (a.get(i), b.get(i)) {
            (Some(x), Some(y)) if x.name == y.name && x.shape == y.shape => {}
            (x, y) => bail!(
                "--init {}: its weights do not fit the new model: tensor {} {:?} vs {} {:?} \
                 (only max_seq_len, rope_scaling, an added DSA indexer and training settings \
                 may change)",
                from.display(),
                y.map_or("(none)", |t| t.name.as_str()),
                y.map(|t| &t.shape),
                x.map_or("(none)", |t| t.name.as_str()),
                x.map(|t| &t.shape),
            ),
        }
    }
    for (x, y) in new.iter().zip(&src.layout.tensors) {
        model.params[x.range()].copy_from_slice(&src.params[y.range()]);
    }
    model.hash_tables = src.hash_tables;
    if src.engram.is_some() && src.cfg.engram == model.cfg.engram {
        model.engram = src.engram;
    }
    Ok(())
}

fn start_fresh(
    out: &Path,
    run: RunConfig,
    tokenizer: Option<&Path>,
    corpus: &data::Corpus,
    init: Option<&Path>,
) -> Result<Session> {
    if out.join(checkpoint::CHECKPOINT_DIR).exists() {
        bail!(
            "{} already holds a checkpoint: pass --resume to continue it, or choose another --out",
            out.display()
        );
    }
    run.model.validate()?;
    run.train.validate(&run.model)?;
    let init = match init {
        Some(p) => Some((
            p,
            checkpoint::load(p, false).with_context(|| format!("--init {}", p.display()))?,
        )),
        None => None,
    };
    let tok = match (&init, tokenizer) {
        (Some((_, l)), None) => l.tokenizer.clone(),
        _ => fresh_tokenizer(tokenizer, &run, corpus)?,
    };
    if tok.vocab_size() > run.model.vocab_size {
        bail!(
            "the tokenizer has {} tokens but the model's vocab_size is {}: raise vocab_size or use a smaller tokenizer",
            tok.vocab_size(),
            run.model.vocab_size
        );
    }
    let mut model = Model::new(run.model.clone())?;
    model.init(run.train.seed);
    if model.engram.is_some() {
        let t0 = Instant::now();
        let compress = crate::engram::CompressedTokenizer::build(&tok)?;
        model.init_engram(compress, run.train.seed)?;
        model.engram_eot = Some(tok.eot());
        eprintln!(
            "engram: compression table built in {:.1}s\n{}",
            t0.elapsed().as_secs_f64(),
            model
                .engram
                .as_ref()
                .map(|e| e.inspect_text())
                .unwrap_or_default()
        );
    }
    if let Some((p, l)) = init {
        init_weights(&mut model, l.model, p)?;
        // The run's tables are memory-mapped read-only: this run trains its own copy.
        crate::finetune::tables_to_ram(&mut model)?;
        eprintln!(
            "initialised from {} (weights only; fresh optimizer state, step 0)",
            p.display()
        );
    }
    let table_opt = new_table_opt(&model);
    crate::util::write_atomic(
        &out.join("run.json"),
        serde_json::to_string_pretty(&run)?.as_bytes(),
    )?;
    tok.save(&out.join("tokenizer.json"))?;
    let metrics = out.join("metrics.jsonl");
    if metrics.exists() {
        std::fs::remove_file(&metrics)
            .with_context(|| format!("cannot remove stale {}", metrics.display()))?;
    }
    let n = model.layout.total;
    let moe_pools = model.new_moe_pools();
    Ok(Session {
        state: TrainState {
            format_version: 1,
            step: 0,
            tokens_seen: 0,
            data_rng: Rng::derived(run.train.seed, "data"),
            run: serde_json::to_value(&run)?,
        },
        run,
        model,
        tok,
        adam_m: vec![0.0; n],
        adam_v: vec![0.0; n],
        table_opt,
        base: None,
        moe_pools,
    })
}

/// A new run starting from the weights of the run `run.train.init` (see [`Start::Init`]).
/// Kept apart from [`start_fresh`] so that other ways of initialising from a run can share it.
fn start_init(out: &Path, mut run: RunConfig) -> Result<Session> {
    if out.join(checkpoint::CHECKPOINT_DIR).exists() {
        bail!(
            "{} already holds a checkpoint: pass --resume to continue it, or choose another --out",
            out.display()
        );
    }
    let init = run
        .train
        .init
        .clone()
        .context("Start::Init needs train.init")?;
    let (base, l) = DeltaBase::open(&init)?;
    let mut model = l.model;
    crate::finetune::tables_to_ram(&mut model)?;
    run.model = model.cfg.clone();
    run.model.validate()?;
    run.train.validate(&run.model)?;
    let tok = l.tokenizer;
    eprintln!(
        "init: weights, tokenizer and Engram tables from {} (fingerprint {}); training {}",
        l.dir.display(),
        base.fingerprint,
        run.train.train_only.name()
    );
    crate::util::write_atomic(
        &out.join("run.json"),
        serde_json::to_string_pretty(&run)?.as_bytes(),
    )?;
    tok.save(&out.join("tokenizer.json"))?;
    for f in ["metrics.jsonl", "timing.jsonl"] {
        let p = out.join(f);
        if p.exists() {
            std::fs::remove_file(&p)
                .with_context(|| format!("cannot remove stale {}", p.display()))?;
        }
    }
    let n = model.layout.total;
    let table_opt = new_table_opt(&model);
    let moe_pools = model.new_moe_pools();
    Ok(Session {
        state: TrainState {
            format_version: 1,
            step: 0,
            tokens_seen: 0,
            data_rng: Rng::derived(run.train.seed, "data"),
            run: serde_json::to_value(&run)?,
        },
        base: (!run.train.train_only.is_all()).then_some(base),
        run,
        model,
        tok,
        adam_m: vec![0.0; n],
        adam_v: vec![0.0; n],
        table_opt,
        moe_pools,
    })
}

/// A fresh lazy Adam for each Engram table.
pub(super) fn new_table_opt(model: &Model) -> Vec<SparseAdam> {
    model.engram.as_ref().map_or_else(Vec::new, |e| {
        e.layers
            .iter()
            .map(|l| SparseAdam::new(l.table.rows(), l.table.dim()))
            .collect()
    })
}

fn start_resume(
    out: &Path,
    max_steps: Option<u64>,
    dsa_stage: Option<DsaStage>,
) -> Result<Session> {
    let l = checkpoint::load(out, true)
        .with_context(|| format!("cannot resume from {}", out.display()))?;
    let mut state = l
        .state
        .with_context(|| format!("{}: state.json is missing", l.dir.display()))?;
    let mut run: RunConfig = serde_json::from_value(state.run.clone()).with_context(|| {
        format!(
            "{}: state.json holds an unreadable run config",
            l.dir.display()
        )
    })?;
    if let Some(n) = max_steps {
        if n < state.step {
            bail!("--steps {n} is below the run's current step {}", state.step);
        }
        run.train.max_steps = n;
        let beyond: Vec<u64> = run
            .train
            .keep_steps
            .iter()
            .copied()
            .filter(|&s| s > n)
            .collect();
        if !beyond.is_empty() {
            eprintln!("--steps {n}: the checkpoints of steps {beyond:?} (train.keep_steps) will not be kept");
        }
        state.run = serde_json::to_value(&run)?;
    }
    if let Some(st) = dsa_stage {
        if !run.model.has_indexer() && !st.is_sparse() {
            bail!(
                "--dsa-stage {}: the run's model has no lightning indexer (no DSA config, no DeepSeek-V4 CSA layer)",
                st.name()
            );
        }
        if st != run.train.dsa_stage {
            eprintln!(
                "DSA stage: {} -> {} from step {}",
                run.train.dsa_stage.name(),
                st.name(),
                state.step
            );
        }
        run.train.dsa_stage = st;
        state.run = serde_json::to_value(&run)?;
    }
    truncate_metrics(&out.join("metrics.jsonl"), state.step)?;
    truncate_metrics(&out.join("timing.jsonl"), state.step)?;
    eprintln!(
        "resuming {} from step {} (of {})",
        out.display(),
        state.step,
        run.train.max_steps
    );
    let (adam_m, adam_v) = l.adam.context("optimizer state missing")?;
    let table_opt = match l.engram_opt {
        Some(o) => o,
        None if l.model.engram.is_some() => bail!(
            "{}: the Engram optimizer state (engram_optimizer.safetensors) is missing",
            l.dir.display()
        ),
        None => Vec::new(),
    };
    let base = match (&run.train.init, run.train.train_only.is_all()) {
        (Some(init), false) => Some(DeltaBase::open(init)?.0),
        _ => None,
    };
    let moe_pools = match l.moe_pools {
        Some(p) => p,
        None => l.model.new_moe_pools(),
    };
    Ok(Session {
        run,
        model: l.model,
        tok: l.tokenizer,
        state,
        adam_m,
        adam_v,
        table_opt,
        base,
        moe_pools,
    })
}
