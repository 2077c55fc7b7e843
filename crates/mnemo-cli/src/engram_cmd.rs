//! `mnemo engram`: Engram conditional-memory tools — the compression table of a tokenizer,
//! the layers of a run or a config (sizes only, nothing built), per-token gate values.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use mnemo::config::ModelConfig;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum EngramCmd {
    /// Build the Engram compression table of a tokenizer: vocabulary size before and after,
    /// and the largest merge groups.
    Compress {
        #[arg(long, value_name = "FILE")]
        tokenizer: PathBuf,
        /// Merge groups to list.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// Per Engram layer: orders, heads, table sizes (primes), rows, bytes, multipliers, of a
    /// run directory / checkpoint or a model config JSON file.
    Inspect {
        #[arg(value_name = "RUN_DIR_OR_CONFIG")]
        path: PathBuf,
    },
    /// Per-token gate values of every Engram layer over a text (one forward pass): which
    /// tokens use the memory. Writes JSON {tokens, layers: [{layer_id, gates: [[a per
    /// stream] per token]}]}.
    Gates {
        #[arg(value_name = "RUN_DIR")]
        run_dir: PathBuf,
        /// Text file to run.
        #[arg(long, value_name = "FILE")]
        text: PathBuf,
        /// Output JSON file.
        #[arg(long, value_name = "FILE")]
        json: PathBuf,
        /// Use at most this many tokens (at most the model's max_seq_len).
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
    },
}

pub fn run(cmd: EngramCmd) -> Result<()> {
    match cmd {
        EngramCmd::Compress { tokenizer, top } => {
            let tok = mnemo::tokenizer::Tokenizer::load(&tokenizer)?;
            let c = mnemo::engram::CompressedTokenizer::build(&tok)?;
            print!("{}", c.report(&tok, top));
            Ok(())
        }
        EngramCmd::Inspect { path } => {
            print!("{}", inspect(&path)?);
            Ok(())
        }
        EngramCmd::Gates {
            run_dir,
            text,
            json,
            max_tokens,
        } => gates(&run_dir, &text, &json, max_tokens),
    }
}

/// `mnemo engram gates`: one forward pass over the first tokens of `text`, gate values per
/// Engram layer and token.
fn gates(run_dir: &Path, text: &Path, out: &Path, max_tokens: usize) -> Result<()> {
    let l = mnemo::checkpoint::load(run_dir, false)?;
    let e = l.model.engram.as_ref().with_context(|| {
        format!(
            "{}: the model has no Engram (`engram` is not set)",
            run_dir.display()
        )
    })?;
    let src =
        std::fs::read_to_string(text).with_context(|| format!("cannot read {}", text.display()))?;
    let mut ids = l.tokenizer.encode(&src)?;
    ids.truncate(max_tokens.min(l.model.cfg.max_seq_len));
    if ids.is_empty() {
        bail!("{}: no tokens", text.display());
    }
    l.model.check_engram_tokens(&ids)?;
    l.model.check_engram_tables()?;
    let mut ws = mnemo::model::Workspace::default();
    l.model.forward(&ids, 1, ids.len(), &mut ws);
    let toks: Vec<String> = ids
        .iter()
        .map(|&i| l.tokenizer.decode(&[i]).unwrap_or_default())
        .collect();
    let nb = mnemo::model::engram_gate_spec(&l.model.cfg).n_branch;
    let layers: Vec<serde_json::Value> = e
        .layers
        .iter()
        .zip(ws.engram_gates())
        .map(|(lay, g)| {
            let rows: Vec<&[f32]> = g.chunks(nb).collect();
            serde_json::json!({"layer_id": lay.hash.layer_id, "gates": rows})
        })
        .collect();
    let v = serde_json::json!({"run": run_dir, "text": text, "token_ids": ids, "tokens": toks, "streams": nb, "layers": layers});
    std::fs::write(out, serde_json::to_string(&v)?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!(
        "{} tokens, {} Engram layers -> {}",
        ids.len(),
        e.layers.len(),
        out.display()
    );
    Ok(())
}

/// `mnemo engram inspect`: a run directory / checkpoint (the stored hashes and tables), or a
/// model config JSON (the Engram a fresh model would get, with an identity compression over
/// `vocab_size` since no tokenizer is known: the multipliers then differ from a trained run's).
/// A config is only sized ([`mnemo::engram::Engram::plan`]), never built: no table and no
/// model is allocated, so it answers at once for tables of any size.
fn inspect(path: &Path) -> Result<String> {
    if path.is_file() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        // A model config, or a run config ({"model": {...}, ...}).
        let m = v.get("model").cloned().unwrap_or(v);
        let cfg: ModelConfig = serde_json::from_value(m)
            .with_context(|| format!("{} is not a valid model config", path.display()))?;
        cfg.validate()
            .with_context(|| format!("in {}", path.display()))?;
        let Some(ec) = &cfg.engram else {
            bail!(
                "{}: the model has no Engram (`engram` is not set)",
                path.display()
            );
        };
        let ident = mnemo::engram::CompressedTokenizer::identity(cfg.vocab_size)?;
        let spec = mnemo::model::engram_gate_spec(&cfg);
        let layers = mnemo::engram::Engram::plan(ec, &ident, spec.d, spec.n_branch)
            .with_context(|| format!("in {}", path.display()))?;
        return Ok(format!(
            "(config only: identity compression over the model vocabulary; a trained run uses its tokenizer's)\n{}",
            mnemo::engram::inspect_report(&ident, &layers)
        ));
    }
    let l = mnemo::checkpoint::load(path, false)?;
    let e = l.model.engram.as_ref().with_context(|| {
        format!(
            "{}: the model has no Engram (`engram` is not set)",
            path.display()
        )
    })?;
    Ok(e.inspect_text())
}
