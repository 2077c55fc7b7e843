//! `mnemo pack`: pack a repository into one context document (see the `mnemo-pack` crate).
//!
//! The document (or the JSON, or the `--count` table) goes to stdout or `--out`; the excluded
//! files, the budget cut report and a one-line timing summary go to stderr.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use mnemo::tokenizer::Tokenizer;
use mnemo_pack::{self as pack, PackOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

const AFTER_HELP: &str = "\
Excluded by default, each listed on stderr with its reason: git-ignored paths (silently), hidden \
files, symlinks (never followed), binary files, secrets (names like .env, *.pem, id_rsa*; \
contents like private keys and cloud tokens), generated files (lock files, minified bundles, \
vendor/ node_modules/ third_party/ dist/ build/ target/).

With --max-tokens, files are ranked (by --query relevance, else README/docs and top-level files \
first, then smaller files), taken whole while they fit, then as signatures only, and the rest \
is dropped; the cut is reported on stderr and in the JSON.

Exit codes: 0 ok; 1 error (bad directory, tokenizer or glob, failed write); 2 usage error; \
3 partial: packed, but some files could not be read (permission denied, non-UTF-8 names).";

/// Output form of the document.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// `==> path (language, size, tokens) <==` headers, each followed by the content.
    Plain,
    /// One JSON object: root, files, excluded, cut, totals.
    Json,
}

// (No doc comment here: the `pack` subcommand's description comes from main.rs.)
#[derive(Args, Clone, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct PackArgs {
    /// Repository directory to pack.
    #[arg(value_name = "DIR", default_value = ".")]
    pub dir: PathBuf,
    /// Write the output to FILE (atomically: temporary file, then rename) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Plain)]
    pub format: Format,
    /// Count tokens with this tokenizer: a tokenizer.json, a `.gguf` model, or a run,
    /// checkpoint or Hugging Face directory.
    #[arg(long, value_name = "PATH")]
    pub tokenizer: Option<PathBuf>,
    /// Print only the count table (total, every directory, every file; by tokens, descending;
    /// bytes only and `-` for tokens without --tokenizer). Ignores --format.
    #[arg(long)]
    pub count: bool,
    /// Fit the document into N tokens (needs --tokenizer).
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<usize>,
    /// With --max-tokens: rank files by relevance to TEXT (BM25 over identifiers and paths).
    #[arg(long, value_name = "TEXT", requires = "max_tokens")]
    pub query: Option<String>,
    /// Pack files that look like secrets (by name or content).
    #[arg(long)]
    pub include_secrets: bool,
    /// Pack lock files, minified bundles and vendored/build directories.
    #[arg(long)]
    pub include_generated: bool,
    /// Pack hidden files and directories (`.git` always stays out).
    #[arg(long)]
    pub hidden: bool,
    /// Skip files and directories matching GLOB (path relative to DIR, or file name;
    /// repeatable).
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Only pack files matching GLOB (path relative to DIR, or file name; repeatable).
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,
    /// Skip files larger than BYTES.
    #[arg(long, value_name = "BYTES", default_value_t = pack::DEFAULT_MAX_FILE_BYTES)]
    pub max_file_bytes: u64,
}

/// Load a tokenizer from a `tokenizer.json`, a `.gguf` model (its vocabulary and merges, as
/// `generate` uses them), or a run, checkpoint or Hugging Face directory (its checkpoint's
/// `tokenizer.json`, else a `tokenizer.json` directly inside it).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        return mnemo::gguf::load_tokenizer(path);
    }
    if path.is_file() {
        return Tokenizer::load(path);
    }
    if !path.is_dir() {
        bail!("tokenizer {} does not exist", path.display());
    }
    let located = mnemo::checkpoint::locate(path);
    if let Ok(ckpt) = &located {
        let file = ckpt.join("tokenizer.json");
        if file.is_file() {
            return Tokenizer::load(&file);
        }
    }
    let direct = path.join("tokenizer.json");
    if direct.is_file() {
        return Tokenizer::load(&direct);
    }
    match located {
        Ok(ckpt) => bail!(
            "no tokenizer.json in {} or its checkpoint {}",
            path.display(),
            ckpt.display()
        ),
        Err(e) => Err(e).with_context(|| {
            format!(
                "no tokenizer in {} (expected a tokenizer.json or a run directory)",
                path.display()
            )
        }),
    }
}

/// Run `mnemo pack`; returns the exit code: 0, or 3 when some files could not be read.
pub fn run(a: PackArgs) -> Result<i32> {
    let tok = match &a.tokenizer {
        Some(p) => Some(load_tokenizer(p).with_context(|| format!("--tokenizer {}", p.display()))?),
        None => None,
    };
    if a.max_tokens.is_some() && tok.is_none() {
        bail!(
            "--max-tokens needs a tokenizer to count tokens: pass --tokenizer PATH (a \
             tokenizer.json or a run directory)"
        );
    }
    let mut opts = PackOptions::new(&a.dir);
    opts.include_secrets = a.include_secrets;
    opts.include_generated = a.include_generated;
    opts.hidden = a.hidden;
    opts.include = a.include.clone();
    opts.exclude = a.exclude.clone();
    opts.max_file_bytes = a.max_file_bytes;
    opts.max_tokens = a.max_tokens;
    opts.query = a.query.clone();
    if let Some(out) = &a.out {
        opts.skip.push(out.clone()); // do not pack a previous run's output
    }
    let p = pack::pack(&opts, tok.as_ref())?;

    let text = if a.count {
        pack::count_table(&p)
    } else {
        match a.format {
            Format::Plain => pack::render_plain(&p),
            Format::Json => {
                let mut s = serde_json::to_string_pretty(&pack::render_json(&p))
                    .context("cannot serialize the pack")?;
                s.push('\n');
                s
            }
        }
    };
    match &a.out {
        Some(out) => mnemo::util::write_atomic(out, text.as_bytes())
            .with_context(|| format!("cannot write {}", out.display()))?,
        None => {
            let mut o = std::io::stdout().lock();
            if let Err(e) = o.write_all(text.as_bytes()).and_then(|_| o.flush()) {
                // `mnemo pack | head` is fine.
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    return Err(e).context("cannot write to stdout");
                }
            }
        }
    }

    let mut err = std::io::stderr().lock();
    let mut report = pack::excluded_report(&p);
    if let Some(c) = pack::cut_report(&p) {
        report.push_str(&c);
    }
    report.push_str(&pack::summary_line(&p));
    report.push('\n');
    err.write_all(report.as_bytes()).ok();
    Ok(if p.is_partial() { 3 } else { 0 })
}
