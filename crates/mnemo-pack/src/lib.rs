//! Pack a repository into one context document (`mnemo pack`, `mnemo ask`).
//!
//! # What is packed
//!
//! [`pack`] walks a directory the way git sees it, in parallel (`ignore::WalkBuilder::
//! build_parallel`): `.gitignore`, `.ignore`, `.git/info/exclude` and the user's global git
//! excludes apply, with or without a `.git` directory; ignored paths are skipped silently, as
//! git would. Everything else that is *not* packed is listed in [`Pack::excluded`] with a
//! reason ([`ExcludeKind`] + detail, e.g. `secret: AWS access key id on line 3`), never with
//! any of its content:
//!
//! - `symlink`: symlinks are never followed, whether they point inside the directory or out.
//! - `hidden`: names starting with `.` (unless [`PackOptions::hidden`]); a hidden directory is
//!   reported once and not entered. `.git` itself is always skipped silently.
//! - `secret` (unless [`PackOptions::include_secrets`]): names in [`SECRET_NAMES`] (checked
//!   first, so `.env` is reported as a secret, not as hidden) and contents matching
//!   [`SECRET_PATTERNS`] anywhere in the file (the first match is reported by kind and line).
//! - `generated` (unless [`PackOptions::include_generated`]): [`LOCK_FILES`], [`MINIFIED`]
//!   names, any line over 1000 characters in the first 8 KiB, [`VENDORED_DIRS`] at any
//!   depth and [`BUILD_OUTPUT_DIRS`] at the top level (reported once per directory).
//! - `binary`: a NUL byte in the first 8 KiB, or content that is not valid UTF-8.
//! - `filtered`: matched by an [`PackOptions::exclude`] glob, or not a regular file.
//! - `too-large`: over [`PackOptions::max_file_bytes`].
//! - `unreadable` (permission denied, I/O errors) and `non-UTF-8 name`: packing continues and
//!   [`Pack::is_partial`] is true (the CLI exits with code 3).
//!
//! Files not matched by the [`PackOptions::include`] globs (when there are any) are not
//! listed, only counted ([`Stats::not_included`]). Globs match the path relative to the root
//! (`src/**/*.rs`) or the bare file name (`*.rs`); an `--exclude` glob matching a directory
//! skips all of it.
//!
//! # Document
//!
//! [`render_plain`] (= [`context_text`]) writes, for each file in path order, a header line
//! `==> src/main.rs (rust, 1.2 KB, 345 tokens) <==` (no token part without a tokenizer; a
//! signatures-only summary says `; signatures only, N tokens`), the content, and a blank line.
//! Nothing else: exclusions, the cut report and the timing summary go to stderr
//! ([`excluded_report`], [`cut_report`], [`summary_line`]) and into [`render_json`]. The JSON
//! holds no timings, so both forms are byte-for-byte deterministic for a given tree.
//!
//! # Token counts
//!
//! With a tokenizer every packed file is tokenized (in parallel) and [`count_table`] shows the
//! total, every directory at every level (aggregated over all files below it), and every
//! file, each section sorted by tokens descending (bytes without a tokenizer, the token
//! column then reads `-`). Counts are of the packed content, without headers.
//!
//! # Budget
//!
//! With [`PackOptions::max_tokens`] (which needs a tokenizer) the files are ranked, then:
//!
//! 1. whole files are taken in rank order, each one that still fits (a file that does not
//!    fit is passed over, smaller lower-ranked files can still go in);
//! 2. the files left over are reduced to their signature lines ([`signatures`]: declarations
//!    such as `fn`, `pub`, `struct`, `class`, `def`, `func`, `interface`, `#define`, Markdown
//!    headings, TOML tables, top-level YAML keys; no doc comments) and taken in rank order
//!    while they fit;
//! 3. the rest is dropped.
//!
//! A section costs its header's tokens plus its content's tokens plus the separating
//! newline(s); at the end the whole document is tokenized once more and, if token merges at
//! the section boundaries pushed it over the budget, the lowest-ranked packed file is dropped
//! until it fits. So `tokenize(context_text(&pack)).len() <= max_tokens` always holds.
//!
//! **Ranking.** With a query, files are scored by BM25 (k1 = 1.2, b = 0.75) over terms:
//! identifiers in the content and the path's components, lower-cased, also split at `_` and
//! camelCase boundaries, with a plural `s` stripped and a few English stop words dropped; a
//! path term counts 3 times. Ties (and every file without a query) fall back to a prior: the
//! root README first, then other READMEs, files under `doc/` or `docs/` and top-level files
//! (shallowest, then smallest first), then all other files from the smallest up; the path
//! breaks the last ties.
//!
//! # Modules
//!
//! [`pack`] runs the stages in order: the parallel walk (`walk`: names, directories, links and
//! globs, nothing read), reading and checking each candidate (`check`: binary, generated and
//! secret content, tokenization), then with a budget the ranking (`rank`) and the fit
//! (`budget`, which falls back to signatures from `lang`); `render` writes the document, the
//! JSON, the token table and the reports.

mod budget;
mod check;
mod lang;
mod rank;
mod render;
mod types;
mod walk;

#[cfg(test)]
mod tests;

pub use check::{find_secret, SECRET_PATTERNS};
pub use lang::{language_of, signatures};
pub use render::{
    context_text, count_table, cut_report, excluded_report, human_bytes, render_json, render_plain,
    summary_line,
};
pub use types::{
    Cut, ExcludeKind, Excluded, Mode, Pack, PackOptions, PackedFile, Stats, DEFAULT_MAX_FILE_BYTES,
};
pub use walk::{BUILD_OUTPUT_DIRS, LOCK_FILES, MINIFIED, SECRET_NAMES, VENDORED_DIRS};

use anyhow::{bail, Context, Result};
use mnemo::tokenizer::Tokenizer;
use rayon::prelude::*;
use std::time::Instant;

use budget::fit_budget;
use check::{read_one, TextFile};
use walk::{visit, Found, WalkCtx};

/// Pack `opts.root`. Errors: the root is missing or not a directory, a glob is invalid, a
/// budget is given without a tokenizer. Unreadable files do not fail the pack (see
/// [`Pack::is_partial`]).
pub fn pack(opts: &PackOptions, tok: Option<&Tokenizer>) -> Result<Pack> {
    if opts.max_tokens.is_some() && tok.is_none() {
        bail!(
            "a token budget (--max-tokens) needs a tokenizer to count tokens: pass --tokenizer \
             PATH (a tokenizer.json or a run directory)"
        );
    }
    let s = scan(opts, tok)?;
    let (files, cut) = match (opts.max_tokens, tok) {
        (Some(budget), Some(tok)) => {
            let (files, cut) = fit_budget(s.texts, budget, opts.query.as_deref(), tok)?;
            (files, Some(cut))
        }
        _ => (s.texts.into_iter().map(TextFile::whole).collect(), None),
    };
    Ok(Pack {
        root: opts.root.clone(),
        files,
        excluded: s.excluded,
        cut,
        stats: Stats {
            elapsed_s: s.t0.elapsed().as_secs_f64(),
            ..s.stats
        },
        tokenized: tok.is_some(),
    })
}

/// The context for a question about a repository ([`pack_for_question`]): a part that does not
/// depend on the question, and the files picked for the question after it.
#[derive(Clone, Debug)]
pub struct QuestionPack {
    /// The whole repository when it fits in the total budget; otherwise the files ranked
    /// without the question (READMEs, docs and top-level files first, then the smallest), cut
    /// to the stable budget. The same for every question while the repository is unchanged.
    pub stable: Pack,
    /// When the repository does not fit: files not already whole in `stable`, ranked by the
    /// question (BM25), cut to what the total budget leaves after `stable`.
    pub question: Option<Pack>,
}

/// Pack `opts.root` for a question in at most `total` tokens (`opts.max_tokens` and
/// `opts.query` are ignored), walking and reading it once. If the whole repository fits in
/// `total`, it is all in [`QuestionPack::stable`]. Otherwise `stable` gets the files ranked
/// without the question within `stable_budget` (capped at `total`), and
/// [`QuestionPack::question`] the files ranked by `question` among the rest, within `total`
/// minus the exact tokens of `stable`'s document. So `stable` (a prefix worth caching) only
/// changes with the repository and the budgets, never with the question.
pub fn pack_for_question(
    opts: &PackOptions,
    tok: &Tokenizer,
    total: usize,
    stable_budget: usize,
    question: &str,
) -> Result<QuestionPack> {
    let s = scan(opts, Some(tok))?;
    let pack_of = |files: Vec<PackedFile>, cut: Cut, excluded: Vec<Excluded>| Pack {
        root: opts.root.clone(),
        files,
        excluded,
        cut: Some(cut),
        stats: Stats {
            elapsed_s: s.t0.elapsed().as_secs_f64(),
            ..s.stats.clone()
        },
        tokenized: true,
    };
    // Everything, if it fits (file tokens are a lower bound of the document's).
    if s.stats.scanned_tokens.unwrap_or(0) <= total {
        let (files, cut) = fit_budget(s.texts.clone(), total, None, tok)?;
        if cut.signatures.is_empty() && cut.dropped.is_empty() {
            return Ok(QuestionPack {
                stable: pack_of(files, cut, s.excluded.clone()),
                question: None,
            });
        }
    }
    let (files, cut) = fit_budget(s.texts.clone(), stable_budget.min(total), None, tok)?;
    let left = total.saturating_sub(cut.document_tokens);
    let whole: std::collections::HashSet<&str> = cut.whole.iter().map(String::as_str).collect();
    let rest: Vec<TextFile> = s
        .texts
        .iter()
        .filter(|t| !whole.contains(t.rel.as_str()))
        .cloned()
        .collect();
    let question = if left > 0 && !rest.is_empty() {
        let (qf, qcut) = fit_budget(rest, left, Some(question), tok)?;
        Some(pack_of(qf, qcut, Vec::new()))
    } else {
        None
    };
    Ok(QuestionPack {
        stable: pack_of(files, cut, s.excluded.clone()),
        question,
    })
}

/// What [`scan`] found: the text files (sorted by path), the exclusions, the statistics
/// (without the elapsed time) and when it started.
struct Scan {
    texts: Vec<TextFile>,
    excluded: Vec<Excluded>,
    stats: Stats,
    t0: Instant,
}

/// Walk, read, check and tokenize `opts.root` (stages 1 and 2 of [`pack`]).
fn scan(opts: &PackOptions, tok: Option<&Tokenizer>) -> Result<Scan> {
    let t0 = Instant::now();
    let root = &opts.root;
    let meta = match std::fs::metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{} does not exist", root.display())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", root.display())),
    };
    if !meta.is_dir() {
        bail!("{} is not a directory", root.display());
    }
    let canon = std::fs::canonicalize(root)
        .with_context(|| format!("cannot resolve {}", root.display()))?;
    let ctx = WalkCtx::new(&canon, opts)?;

    // 1. Walk (parallel): names, directories and symlinks are decided here, without reading.
    let (tx, rx) = std::sync::mpsc::channel::<Found>();
    ignore::WalkBuilder::new(&canon)
        .hidden(false) // hidden entries are reported by `visit`, not dropped silently
        .follow_links(false)
        .require_git(false)
        .git_ignore(true)
        .git_global(true)
        .git_exclude(true)
        .ignore(true)
        .parents(true)
        .threads(rayon::current_num_threads())
        .build_parallel()
        .run(|| {
            let tx = tx.clone();
            let ctx = &ctx;
            Box::new(move |res| {
                let (found, state) = visit(ctx, res);
                if let Some(f) = found {
                    tx.send(f).ok();
                }
                state
            })
        });
    drop(tx);
    let mut candidates = Vec::new();
    let mut excluded = Vec::new();
    let mut not_included = 0;
    for f in rx {
        match f {
            Found::File(c) => candidates.push(c),
            Found::Excluded(e) => excluded.push(e),
            Found::NotIncluded => not_included += 1,
        }
    }
    candidates.sort_by(|a, b| a.rel.cmp(&b.rel));

    // 2. Read, check and tokenize (parallel, order kept).
    let read: Vec<Result<TextFile, Excluded>> = candidates
        .par_iter()
        .map(|c| read_one(c, opts, tok))
        .collect();
    let mut texts = Vec::with_capacity(read.len());
    for r in read {
        match r {
            Ok(t) => texts.push(t),
            Err(e) => excluded.push(e),
        }
    }
    excluded.sort_by(|a, b| a.path.cmp(&b.path).then(a.kind.cmp(&b.kind)));
    let stats = Stats {
        elapsed_s: 0.0,
        scanned_files: texts.len(),
        scanned_bytes: texts.iter().map(|t| t.bytes).sum::<u64>(),
        scanned_tokens: tok.map(|_| texts.iter().map(|t| t.tokens.unwrap_or(0)).sum::<usize>()),
        not_included,
    };
    Ok(Scan {
        texts,
        excluded,
        stats,
        t0,
    })
}
