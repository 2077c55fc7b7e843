//! `mnemo eval --task niah|vt`: synthetic long-context accuracy by context length and depth
//! (see `mnemo::longctx`).

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use mnemo::longctx::{self, EvalConfig, Task};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, ValueEnum)]
pub enum TaskArg {
    /// Needle in a haystack: recall `secret_key_K` from one line of the filler.
    Niah,
    /// Variable tracking: follow a chain of assignments to its value.
    Vt,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ExtendMode {
    /// Zero-shot YaRN (scaled frequencies and attention temperature).
    Yarn,
    /// Plain RoPE extrapolation (a longer table, the same frequencies).
    Plain,
}

#[derive(Args)]
pub struct LongCtxArgs {
    /// Synthetic long-context task: accuracy table by context length and needle depth.
    #[arg(long, value_enum)]
    pub task: Option<TaskArg>,
    /// Run directory, checkpoint directory, Hugging Face directory or `.gguf` model (with --task).
    #[arg(long, value_name = "MODEL", requires = "task")]
    pub model: Option<PathBuf>,
    /// Context lengths in tokens (prompt + answer), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1024", requires = "task")]
    pub context: Vec<usize>,
    /// Needle depths in [0, 1] (0 = start of the context, 1 = just before the question).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,0.25,0.5,0.75,1",
        requires = "task"
    )]
    pub depths: Vec<f64>,
    /// Samples per (context, depth) cell.
    #[arg(long, default_value_t = 5, requires = "task")]
    pub samples: usize,
    /// Seed of the synthetic documents.
    #[arg(long, default_value_t = 0, requires = "task")]
    pub seed: u64,
    /// Write the result as JSON to FILE (`-`: standard output). With --task: the cells and
    /// settings; without: the validation loss.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Extend the model's context F× without training before evaluating (see --extend-mode).
    #[arg(long, value_name = "F", requires = "task")]
    pub extend: Option<f64>,
    #[arg(long, value_enum, default_value = "yarn", requires = "extend")]
    pub extend_mode: ExtendMode,
    /// No progress bar.
    #[arg(long, requires = "task")]
    pub quiet: bool,
}

pub fn run(a: LongCtxArgs, positional: Option<&Path>) -> Result<()> {
    let task = match a.task {
        Some(TaskArg::Niah) => Task::Niah,
        Some(TaskArg::Vt) => Task::Vt,
        None => bail!("--task is required"),
    };
    let path = match (&a.model, positional) {
        (Some(m), None) => m.clone(),
        (None, Some(p)) => p.to_path_buf(),
        (Some(_), Some(_)) => {
            bail!("give the model either as --model or as the run directory, not both")
        }
        (None, None) => bail!("--task needs --model RUN_DIR_OR_GGUF"),
    };
    let cfg = EvalConfig {
        task,
        contexts: a.context.clone(),
        depths: a.depths.clone(),
        samples: a.samples,
        seed: a.seed,
    };
    // Settings that need no model are checked before loading it.
    longctx::check_contexts(&cfg, usize::MAX)?;
    if let Some(j) = &a.json {
        if let Some(dir) = j.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                bail!(
                    "--json {}: the directory {} does not exist",
                    j.display(),
                    dir.display()
                );
            }
        }
    }
    let mut l = mnemo::checkpoint::load(&path, false)?;
    if let Some(f) = a.extend {
        longctx::extend_context(&mut l.model, f, matches!(a.extend_mode, ExtendMode::Yarn))
            .context("--extend")?;
    }
    longctx::check_contexts(&cfg, l.model.cfg.max_seq_len)?;
    let total = (cfg.contexts.len() * cfg.depths.len() * cfg.samples) as u64;
    let pb = if a.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let pb = indicatif::ProgressBar::new(total);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    };
    let t0 = std::time::Instant::now();
    let cells = longctx::run_eval(&l.model, &l.tokenizer, &cfg, |c| {
        pb.inc(1);
        pb.set_message(format!(
            "context {} depth {:.2}: {}/{}",
            c.context, c.depth, c.correct, c.total
        ));
    })?;
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let name = match task {
        Task::Niah => "niah",
        Task::Vt => "vt",
        Task::Mix => "mix",
    };
    println!(
        "{name} accuracy of {} ({} samples per cell, {:.1}s):",
        path.display(),
        cfg.samples,
        secs
    );
    print!("{}", longctx::table(&cells));
    if let Some(j) = &a.json {
        let v = serde_json::json!({
            "task": name,
            "model": path.display().to_string(),
            "max_seq_len": l.model.cfg.max_seq_len,
            "rope_scaling": l.model.cfg.rope_scaling,
            "extend": a.extend,
            "extend_mode": a.extend.map(|_| match a.extend_mode { ExtendMode::Yarn => "yarn", ExtendMode::Plain => "plain" }),
            "samples": cfg.samples,
            "seed": cfg.seed,
            "seconds": secs,
            "cells": cells,
        });
        mnemo::util::write_atomic(j, serde_json::to_string_pretty(&v)?.as_bytes())
            .with_context(|| format!("--json {}", j.display()))?;
    }
    Ok(())
}
