//! `mnemo train`: start, initialise from another run, or resume a run (the loop is
//! `mnemo::train::train`); a clean stop on Ctrl-C.

use crate::config_cmd::{resolve, ConfigArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use mnemo::train::{Start, TrainOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Run directory for checkpoints and metrics [default: runs/<preset>, or the first free runs/<preset>-N].
    #[arg(long, value_name = "RUN_DIR")]
    out: Option<PathBuf>,
    /// Continue the run in this directory from its last checkpoint (bit-identical to an
    /// uninterrupted run). `--steps` may raise the step budget.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "out")]
    resume: Option<PathBuf>,
    /// Use this tokenizer.json instead of training a byte-level BPE on the data.
    #[arg(long, value_name = "FILE", conflicts_with = "init")]
    tokenizer: Option<PathBuf>,
    /// With --init: train only the Engram tables (`engram`) or the tables and their gates
    /// (`engram+gates`), backbone frozen; writes RUN_DIR/engram_delta.safetensors (the
    /// changed rows only), which loads on its own as base + delta.
    #[arg(long, value_name = "WHAT", requires = "init")]
    train_only: Option<String>,
    /// Where tokenized corpora are cached [default: $MNEMO_CACHE or ~/.cache/mnemo].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// `mnemo train`: a fresh run, an `--init` run (memory-only fine-tuning with `--train-only`), or
/// `--resume`; Ctrl-C saves a checkpoint and exits with 130.
pub fn run(a: TrainArgs) -> Result<()> {
    // Every step frees and re-allocates the same large buffers: keep them mapped
    // (`mnemo::heap`), instead of page-faulting the step's working set back in each step.
    mnemo::heap::keep_freed_memory();
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting without saving");
                std::process::exit(130);
            }
            eprintln!(
                "\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)"
            );
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    let cache_root = a
        .cache_dir
        .clone()
        .unwrap_or_else(mnemo::data::default_cache_root);
    let start = if let (Some(init), Some(w)) = (&a.cfg.init, &a.train_only) {
        // Memory-only fine-tuning (Engram): weights, tokenizer and tables from the run.
        if a.cfg.preset.is_some() || a.cfg.config.is_some() {
            bail!(
                "--init takes the model from {}: --preset/--config cannot be given with it",
                init.display()
            );
        }
        if a.cfg.data.is_none() {
            bail!("--init needs --data DIR (the text to train on)");
        }
        let (mut run, _) = resolve(&a.cfg)?;
        run.train.init = Some(init.clone());
        run.train.train_only = mnemo::config::TrainOnly::parse(w)?;
        Start::Init { run: Box::new(run) }
    } else if a.resume.is_some() {
        // The run's own config is authoritative; only the step budget may change.
        let c = &a.cfg;
        let other = c.preset.is_some()
            || c.config.is_some()
            || !c.sets.is_empty()
            || c.data.is_some()
            || !c.include.is_empty()
            || !c.exclude.is_empty()
            || c.batch_size.is_some()
            || c.seq_len.is_some()
            || c.lr.is_some()
            || c.seed.is_some()
            || c.precision.is_some()
            || c.init.is_some()
            || c.rope_scaling_factor.is_some()
            || c.synthetic.is_some()
            || a.tokenizer.is_some();
        if other {
            bail!(
                "--resume continues a run with its own config (its precision included): only --steps and --dsa-stage may be given with it"
            );
        }
        Start::Resume {
            max_steps: c.steps,
            dsa_stage: c.dsa_stage,
        }
    } else {
        let (run, preset) = resolve(&a.cfg)?;
        if a.cfg.data.is_none() && a.cfg.config.is_none() && a.cfg.init.is_none() {
            let here = std::env::current_dir()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| ".".into());
            eprintln!("no --data given: training the `{preset}` preset on the source files of the current directory ({here})");
        }
        Start::Fresh {
            run: Box::new(run),
            tokenizer: a.tokenizer.clone(),
            init: a.cfg.init.clone(),
        }
    };
    let out = match (&a.resume, &a.out) {
        (Some(dir), _) => dir.clone(),
        (None, Some(o)) => o.clone(),
        (None, None) if a.cfg.init.is_some() => bail!("--init needs --out NEW_RUN_DIR"),
        (None, None) => free_run_dir(a.cfg.preset.as_deref().unwrap_or("tiny")),
    };
    if a.resume.is_none() {
        eprintln!("run directory: {}", out.display());
    }
    // Directories this run creates (the run directory and any missing parents): removed
    // again if training fails before a checkpoint is saved, so no empty run is left behind.
    let created: Vec<PathBuf> = if a.resume.is_some() {
        Vec::new()
    } else {
        out.ancestors()
            .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
            .map(Path::to_path_buf)
            .collect()
    };
    let opts = TrainOptions {
        out,
        start,
        cache_root,
        progress: !a.quiet,
    };
    let out = opts.out.clone();
    let s = match mnemo::train::train(opts, &stop) {
        Ok(s) => s,
        Err(e) => {
            remove_unsaved_run(&out, &created);
            return Err(e);
        }
    };
    if s.stopped_early {
        eprintln!(
            "stopped at step {}; resume with: mnemo train --resume {}",
            s.steps,
            out.display()
        );
        std::process::exit(130);
    }
    if s.steps == 0 {
        eprintln!(
            "done: 0 steps: nothing was trained and no checkpoint written (give --steps N with N >= 1)"
        );
        return Ok(());
    }
    match (s.val_loss, s.val_bpb) {
        (Some(l), Some(b)) => eprintln!(
            "done: {} steps, train loss {:.4}, val loss {l:.4} nats/token ({b:.4} bits/byte; {} \
             windows of {} tokens = train.eval_batches {}; `mnemo eval` uses 32 batches by \
             default) vs unigram entropy {:.3}; {:.0} tok/s",
            s.steps,
            s.final_loss,
            s.val_windows,
            s.seq_len,
            s.val_batches,
            s.unigram_entropy,
            s.tokens_per_s
        ),
        _ => eprintln!(
            "done: {} steps, train loss {:.4} (no validation split)",
            s.steps, s.final_loss
        ),
    }
    if mnemo::checkpoint::locate(&out).is_ok() {
        eprintln!(
            "sample with: mnemo generate {} --prompt 'fn main'",
            out.display()
        );
    }
    Ok(())
}

/// After a failed run: delete the directories in `created` (the run directory first, then the
/// parents this run made) unless a checkpoint was saved; a parent is only removed when empty.
fn remove_unsaved_run(out: &Path, created: &[PathBuf]) {
    if created.is_empty() {
        return;
    }
    if mnemo::checkpoint::locate(out).is_ok() || out.join("engram_delta.safetensors").exists() {
        eprintln!(
            "the run directory {} keeps its last checkpoint",
            out.display()
        );
        return;
    }
    for (i, d) in created.iter().enumerate() {
        let r = if i == 0 {
            std::fs::remove_dir_all(d)
        } else {
            std::fs::remove_dir(d)
        };
        if r.is_err() {
            break;
        }
    }
}

/// `runs/<preset>`, or the first of `runs/<preset>-2`, `-3`, … that does not exist.
fn free_run_dir(preset: &str) -> PathBuf {
    let base = Path::new("runs");
    let first = base.join(preset);
    if !first.exists() {
        return first;
    }
    (2..)
        .map(|i| base.join(format!("{preset}-{i}")))
        .find(|p| !p.exists())
        .expect("unbounded")
}
