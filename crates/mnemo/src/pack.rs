//! Pack a repository into one context document (`mnemo pack`).
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

use anyhow::{bail, Context, Result};
use globset::{Glob, GlobSet, GlobSetBuilder};
use rayon::prelude::*;
use regex::{Regex, RegexSet};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use crate::tokenizer::Tokenizer;

/// Files larger than this are excluded (`too-large`) unless [`PackOptions::max_file_bytes`]
/// says otherwise.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 1 << 20;

/// How much of a file the binary and minified-line checks look at.
const SNIFF_BYTES: usize = 8192;

/// A line longer than this (in characters) in the first 8 KiB marks a file as generated.
const MAX_LINE_CHARS: usize = 1000;

/// Signature lines are cut to this many characters.
const MAX_SIGNATURE_CHARS: usize = 240;

/// File names (globs, case-insensitive) that hold secrets.
pub const SECRET_NAMES: &[&str] = &[
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".npmrc",
    ".pypirc",
    ".netrc",
    "credentials",
    "credentials.json",
    "*.keystore",
    ".htpasswd",
    "secrets.*",
];

/// Content patterns of secrets: (what is reported, regex).
pub const SECRET_PATTERNS: &[(&str, &str)] = &[
    ("private key", r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    (
        "AWS access key id",
        r"(A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}",
    ),
    ("AWS secret access key", r"(?i)aws_secret_access_key\s*[=:]"),
    ("GitHub token", r"gh[pousr]_[A-Za-z0-9]{36}"),
    ("Slack token", r"xox[baprs]-[A-Za-z0-9-]{10,}"),
    ("Google API key", r"AIza[0-9A-Za-z_-]{35}"),
    (
        "hard-coded credential",
        r#"(?i)(api[_-]?key|secret|password|token)\s*[=:]\s*['"][^'"]{16,}['"]"#,
    ),
];

/// Lock files (exact names): generated.
pub const LOCK_FILES: &[&str] = &[
    "Cargo.lock",
    "package-lock.json",
    "yarn.lock",
    "poetry.lock",
    "pnpm-lock.yaml",
    "Gemfile.lock",
    "composer.lock",
    "go.sum",
];

/// Minified bundles and source maps (globs on the file name): generated.
pub const MINIFIED: &[&str] = &["*.min.js", "*.min.css", "*.map"];

/// Vendored directories (exact names, at any depth): generated.
pub const VENDORED_DIRS: &[&str] = &["vendor", "node_modules", "third_party"];

/// Build-output directories, generated only at the top of the repository: deeper down these
/// names are often real source (e.g. `compiler/rustc_mir_build/src/build/` in rustc).
pub const BUILD_OUTPUT_DIRS: &[&str] = &["dist", "build", "target"];

/// What to pack and how. Build it with [`PackOptions::new`] and set the fields.
#[derive(Clone, Debug)]
pub struct PackOptions {
    /// The directory to pack.
    pub root: PathBuf,
    /// Pack files that look like secrets (names and contents).
    pub include_secrets: bool,
    /// Pack lock files, minified bundles and vendored directories.
    pub include_generated: bool,
    /// Pack hidden files and directories (`.git` stays out).
    pub hidden: bool,
    /// Only files matching one of these globs (when not empty).
    pub include: Vec<String>,
    /// Exclude files and directories matching one of these globs.
    pub exclude: Vec<String>,
    /// Files larger than this many bytes are excluded (`too-large`).
    pub max_file_bytes: u64,
    /// Fit the document into this many tokens (needs a tokenizer).
    pub max_tokens: Option<usize>,
    /// Rank files by relevance to this text when cutting to `max_tokens`.
    pub query: Option<String>,
    /// Paths skipped silently (e.g. the output file when it lies inside the root).
    pub skip: Vec<PathBuf>,
}

impl PackOptions {
    /// Defaults: secrets, generated and hidden files excluded, no globs, no budget.
    pub fn new(root: impl Into<PathBuf>) -> PackOptions {
        PackOptions {
            root: root.into(),
            include_secrets: false,
            include_generated: false,
            hidden: false,
            include: Vec::new(),
            exclude: Vec::new(),
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_tokens: None,
            query: None,
            skip: Vec::new(),
        }
    }
}

/// Why a path was left out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExcludeKind {
    Secret,
    Binary,
    Generated,
    Symlink,
    Hidden,
    Filtered,
    TooLarge,
    Unreadable,
    NonUtf8Name,
}

impl ExcludeKind {
    /// Every kind, in report order.
    pub const ALL: [ExcludeKind; 9] = [
        ExcludeKind::Secret,
        ExcludeKind::Binary,
        ExcludeKind::Generated,
        ExcludeKind::Symlink,
        ExcludeKind::Hidden,
        ExcludeKind::Filtered,
        ExcludeKind::TooLarge,
        ExcludeKind::Unreadable,
        ExcludeKind::NonUtf8Name,
    ];

    /// The name used in reasons and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ExcludeKind::Secret => "secret",
            ExcludeKind::Binary => "binary",
            ExcludeKind::Generated => "generated",
            ExcludeKind::Symlink => "symlink",
            ExcludeKind::Hidden => "hidden",
            ExcludeKind::Filtered => "filtered",
            ExcludeKind::TooLarge => "too-large",
            ExcludeKind::Unreadable => "unreadable",
            ExcludeKind::NonUtf8Name => "non-UTF-8 name",
        }
    }
}

/// A path that was not packed. Directories end in `/`; a non-UTF-8 path is rendered lossily.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Excluded {
    pub path: String,
    pub kind: ExcludeKind,
    /// What matched (never the content): `AWS access key id on line 3`, `permission denied`.
    pub detail: String,
}

impl Excluded {
    fn new(path: String, kind: ExcludeKind, detail: impl Into<String>) -> Excluded {
        Excluded {
            path,
            kind,
            detail: detail.into(),
        }
    }

    /// `kind: detail` (or just `kind`).
    pub fn reason(&self) -> String {
        if self.detail.is_empty() {
            self.kind.as_str().to_string()
        } else {
            format!("{}: {}", self.kind.as_str(), self.detail)
        }
    }
}

/// How a file is packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Whole,
    /// Only its declaration lines (see [`signatures`]).
    Signatures,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Whole => "whole",
            Mode::Signatures => "signatures",
        }
    }
}

/// A packed file.
#[derive(Clone, Debug)]
pub struct PackedFile {
    /// Relative to the root, `/`-separated.
    pub path: String,
    pub language: &'static str,
    /// Size of the file on disk.
    pub bytes: u64,
    /// Tokens of the whole file (None without a tokenizer).
    pub file_tokens: Option<usize>,
    /// Tokens of [`PackedFile::content`] (equal to `file_tokens` for a whole file).
    pub tokens: Option<usize>,
    pub mode: Mode,
    /// The packed text: the file, or its signatures.
    pub content: String,
    /// 1-based rank when the pack was cut to a budget.
    pub rank: Option<usize>,
}

impl PackedFile {
    /// The header line (without newline): `==> src/a.rs (rust, 1.2 KB, 345 tokens) <==`.
    pub fn header(&self) -> String {
        let mut h = format!(
            "==> {} ({}, {}",
            self.path,
            self.language,
            human_bytes(self.bytes)
        );
        if let Some(t) = self.file_tokens {
            let _ = write!(h, ", {t} tokens");
        }
        if self.mode == Mode::Signatures {
            h.push_str("; signatures only");
            if let Some(t) = self.tokens {
                let _ = write!(h, ", {t} tokens");
            }
        }
        h.push_str(") <==");
        h
    }
}

/// What a token budget cut. Path lists are in rank order (best first).
#[derive(Clone, Debug)]
pub struct Cut {
    pub max_tokens: usize,
    pub query: Option<String>,
    /// Exact tokens of [`context_text`].
    pub document_tokens: usize,
    pub whole: Vec<String>,
    pub signatures: Vec<String>,
    pub dropped: Vec<String>,
}

/// What was read and how long it took.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Walk + read + checks + tokenization + budget, in seconds.
    pub elapsed_s: f64,
    /// Text files read (and tokenized) in full.
    pub scanned_files: usize,
    pub scanned_bytes: u64,
    pub scanned_tokens: Option<usize>,
    /// Files not matched by the include globs (not listed as excluded).
    pub not_included: usize,
}

/// The result of [`pack`].
#[derive(Clone, Debug)]
pub struct Pack {
    /// The root as given.
    pub root: PathBuf,
    /// Packed files, sorted by path.
    pub files: Vec<PackedFile>,
    /// Everything left out, sorted by path.
    pub excluded: Vec<Excluded>,
    /// Present when a budget was given.
    pub cut: Option<Cut>,
    pub stats: Stats,
    /// Whether token counts were made.
    pub tokenized: bool,
}

impl Pack {
    /// Some files could not be read or named: the pack is incomplete (CLI exit code 3).
    pub fn is_partial(&self) -> bool {
        self.excluded
            .iter()
            .any(|e| matches!(e.kind, ExcludeKind::Unreadable | ExcludeKind::NonUtf8Name))
    }

    /// Bytes of packed content.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.content.len() as u64).sum()
    }

    /// Tokens of packed content (None without a tokenizer).
    pub fn total_tokens(&self) -> Option<usize> {
        self.tokenized
            .then(|| self.files.iter().map(|f| f.tokens.unwrap_or(0)).sum())
    }

    /// Number of exclusions of each kind (kinds with none are left out).
    pub fn excluded_by_kind(&self) -> BTreeMap<ExcludeKind, usize> {
        let mut m = BTreeMap::new();
        for e in &self.excluded {
            *m.entry(e.kind).or_insert(0) += 1;
        }
        m
    }
}

/// Pack `opts.root`. Errors: the root is missing or not a directory, a glob is invalid, a
/// budget is given without a tokenizer. Unreadable files do not fail the pack (see
/// [`Pack::is_partial`]).
pub fn pack(opts: &PackOptions, tok: Option<&Tokenizer>) -> Result<Pack> {
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
    if opts.max_tokens.is_some() && tok.is_none() {
        bail!(
            "a token budget (--max-tokens) needs a tokenizer to count tokens: pass --tokenizer \
             PATH (a tokenizer.json or a run directory)"
        );
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
    let stats_scanned = (
        texts.len(),
        texts.iter().map(|t| t.bytes).sum::<u64>(),
        tok.map(|_| texts.iter().map(|t| t.tokens.unwrap_or(0)).sum::<usize>()),
    );

    // 3. Budget.
    let (files, cut) = match (opts.max_tokens, tok) {
        (Some(budget), Some(tok)) => {
            let (files, cut) = fit_budget(texts, budget, opts.query.as_deref(), tok)?;
            (files, Some(cut))
        }
        _ => (texts.into_iter().map(TextFile::whole).collect(), None),
    };

    Ok(Pack {
        root: root.clone(),
        files,
        excluded,
        cut,
        stats: Stats {
            elapsed_s: t0.elapsed().as_secs_f64(),
            scanned_files: stats_scanned.0,
            scanned_bytes: stats_scanned.1,
            scanned_tokens: stats_scanned.2,
            not_included,
        },
        tokenized: tok.is_some(),
    })
}

// ---------------------------------------------------------------------------------------------
// Walking

enum Found {
    File(Candidate),
    Excluded(Excluded),
    NotIncluded,
}

struct Candidate {
    rel: String,
    abs: PathBuf,
    len: u64,
}

struct WalkCtx<'a> {
    root: &'a Path,
    opts: &'a PackOptions,
    include: Option<(GlobSet, &'a [String])>,
    exclude: (GlobSet, &'a [String]),
    secret_names: GlobSet,
    minified: GlobSet,
    skip: HashSet<PathBuf>,
}

impl<'a> WalkCtx<'a> {
    fn new(root: &'a Path, opts: &'a PackOptions) -> Result<WalkCtx<'a>> {
        let include = if opts.include.is_empty() {
            None
        } else {
            Some((
                globset(&opts.include, "--include", false)?,
                &opts.include[..],
            ))
        };
        let skip = opts
            .skip
            .iter()
            .filter_map(|p| {
                if let Ok(c) = std::fs::canonicalize(p) {
                    return Some(c);
                }
                let name = p.file_name()?;
                let parent = match p.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                std::fs::canonicalize(parent).ok().map(|d| d.join(name))
            })
            .collect();
        Ok(WalkCtx {
            root,
            opts,
            include,
            exclude: (
                globset(&opts.exclude, "--exclude", false)?,
                &opts.exclude[..],
            ),
            secret_names: globset(
                &SECRET_NAMES
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>(),
                "secret name",
                true,
            )?,
            minified: globset(
                &MINIFIED.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                "minified",
                false,
            )?,
            skip,
        })
    }

    /// The first glob of `set` matching `rel` or `name`.
    fn first_match<'g>(set: &(GlobSet, &'g [String]), rel: &str, name: &str) -> Option<&'g str> {
        let mut m = set.0.matches(rel);
        if m.is_empty() {
            m = set.0.matches(name);
        }
        m.first().map(|&i| set.1[i].as_str())
    }

    fn rel_lossy(&self, path: &Path) -> String {
        let rel = path.strip_prefix(self.root).unwrap_or(path);
        slashes(&rel.to_string_lossy())
    }
}

fn globset(globs: &[String], what: &str, case_insensitive: bool) -> Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        let glob = globset::GlobBuilder::new(g)
            .case_insensitive(case_insensitive)
            .literal_separator(false)
            .build()
            .or_else(|_| Glob::new(g))
            .with_context(|| format!("invalid {what} glob {g:?}"))?;
        b.add(glob);
    }
    b.build()
        .with_context(|| format!("cannot build the {what} globs"))
}

fn slashes(s: &str) -> String {
    if std::path::MAIN_SEPARATOR == '/' {
        s.to_string()
    } else {
        s.replace(std::path::MAIN_SEPARATOR, "/")
    }
}

fn io_detail(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        std::io::ErrorKind::NotFound => "vanished while packing".into(),
        _ => e.to_string(),
    }
}

fn error_path(e: &ignore::Error) -> Option<&Path> {
    match e {
        ignore::Error::WithPath { path, .. } => Some(path),
        ignore::Error::WithDepth { err, .. } | ignore::Error::WithLineNumber { err, .. } => {
            error_path(err)
        }
        ignore::Error::Partial(errs) => errs.iter().find_map(error_path),
        ignore::Error::Loop { child, .. } => Some(child),
        _ => None,
    }
}

fn symlink_detail(root: &Path, link: &Path) -> String {
    match std::fs::canonicalize(link) {
        Err(_) => "broken link, not followed".into(),
        Ok(target) => match target.strip_prefix(root) {
            Ok(r) if r.as_os_str().is_empty() => {
                "points to the repository root, not followed".into()
            }
            Ok(r) => format!(
                "points inside the repository (to {}), not followed",
                slashes(&r.to_string_lossy())
            ),
            Err(_) => "points outside the repository, not followed".into(),
        },
    }
}

/// Decide one walk entry: what to record, and whether to enter it.
fn visit(
    ctx: &WalkCtx,
    res: std::result::Result<ignore::DirEntry, ignore::Error>,
) -> (Option<Found>, ignore::WalkState) {
    use ignore::WalkState::{Continue, Skip};
    use ExcludeKind as K;
    let excl = |path: String, kind, detail: String| {
        Some(Found::Excluded(Excluded::new(path, kind, detail)))
    };
    let ent = match res {
        Ok(e) => e,
        Err(e) => {
            let path = error_path(&e)
                .map(|p| ctx.rel_lossy(p))
                .unwrap_or_else(|| "(unknown path)".into());
            let detail = e.io_error().map(io_detail).unwrap_or_else(|| e.to_string());
            return (excl(path, K::Unreadable, detail), Continue);
        }
    };
    if ent.depth() == 0 {
        return (None, Continue);
    }
    if let Some(e) = ent.error() {
        tracing::warn!("{}: {e}", ent.path().display());
    }
    if ent.file_name() == ".git" {
        return (None, Skip);
    }
    let path = ent.path();
    let is_dir = !ent.path_is_symlink() && ent.file_type().is_some_and(|t| t.is_dir());
    let Some(rel) = path.strip_prefix(ctx.root).ok().and_then(|r| r.to_str()) else {
        let shown = ctx.rel_lossy(path) + if is_dir { "/" } else { "" };
        return (excl(shown, K::NonUtf8Name, String::new()), Skip);
    };
    let rel = slashes(rel);
    let name = ent.file_name().to_str().unwrap_or("");
    let opts = ctx.opts;

    if ent.path_is_symlink() {
        let detail = symlink_detail(ctx.root, path);
        return (excl(rel, K::Symlink, detail), Continue);
    }
    if is_dir {
        let shown = format!("{rel}/");
        if !opts.hidden && name.starts_with('.') {
            return (excl(shown, K::Hidden, "hidden directory".into()), Skip);
        }
        if let Some(g) = WalkCtx::first_match(&ctx.exclude, &rel, name) {
            return (
                excl(shown, K::Filtered, format!("matches --exclude {g}")),
                Skip,
            );
        }
        let top_level = !rel.contains('/');
        if !opts.include_generated
            && (VENDORED_DIRS.contains(&name) || (top_level && BUILD_OUTPUT_DIRS.contains(&name)))
        {
            let detail = "vendored or build-output directory".to_string();
            return (excl(shown, K::Generated, detail), Skip);
        }
        return (None, Continue);
    }
    if !ent.file_type().is_some_and(|t| t.is_file()) {
        return (
            excl(rel, K::Filtered, "not a regular file".into()),
            Continue,
        );
    }
    if ctx.skip.contains(&ctx.root.join(&rel)) {
        return (None, Continue);
    }
    if !opts.include_secrets {
        if let Some(&i) = ctx.secret_names.matches(name).first() {
            let detail = format!("file name matches {}", SECRET_NAMES[i]);
            return (excl(rel, K::Secret, detail), Continue);
        }
    }
    if !opts.hidden && name.starts_with('.') {
        return (excl(rel, K::Hidden, "hidden file".into()), Continue);
    }
    if let Some(g) = WalkCtx::first_match(&ctx.exclude, &rel, name) {
        return (
            excl(rel, K::Filtered, format!("matches --exclude {g}")),
            Continue,
        );
    }
    if !opts.include_generated {
        if LOCK_FILES.contains(&name) {
            return (excl(rel, K::Generated, "lock file".into()), Continue);
        }
        if let Some(&i) = ctx.minified.matches(name).first() {
            let what = if MINIFIED[i] == "*.map" {
                "source map"
            } else {
                "minified bundle"
            };
            return (excl(rel, K::Generated, what.into()), Continue);
        }
    }
    if let Some(inc) = &ctx.include {
        if WalkCtx::first_match(inc, &rel, name).is_none() {
            return (Some(Found::NotIncluded), Continue);
        }
    }
    match ent.metadata() {
        Ok(m) => (
            Some(Found::File(Candidate {
                rel,
                abs: path.to_path_buf(),
                len: m.len(),
            })),
            Continue,
        ),
        Err(e) => {
            let detail = e.io_error().map(io_detail).unwrap_or_else(|| e.to_string());
            (excl(rel, K::Unreadable, detail), Continue)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading and checking

struct TextFile {
    rel: String,
    bytes: u64,
    language: &'static str,
    content: String,
    tokens: Option<usize>,
}

impl TextFile {
    fn whole(self) -> PackedFile {
        PackedFile {
            path: self.rel,
            language: self.language,
            bytes: self.bytes,
            file_tokens: self.tokens,
            tokens: self.tokens,
            mode: Mode::Whole,
            content: self.content,
            rank: None,
        }
    }
}

fn read_one(
    c: &Candidate,
    opts: &PackOptions,
    tok: Option<&Tokenizer>,
) -> std::result::Result<TextFile, Excluded> {
    use ExcludeKind as K;
    let ex = |kind, detail: String| Excluded::new(c.rel.clone(), kind, detail);
    if c.len > opts.max_file_bytes {
        return Err(ex(
            K::TooLarge,
            format!(
                "{} (limit {})",
                human_bytes(c.len),
                human_bytes(opts.max_file_bytes)
            ),
        ));
    }
    let bytes = std::fs::read(&c.abs).map_err(|e| ex(K::Unreadable, io_detail(&e)))?;
    if let Some(at) = bytes[..bytes.len().min(SNIFF_BYTES)]
        .iter()
        .position(|&b| b == 0)
    {
        return Err(ex(K::Binary, format!("NUL byte at offset {at}")));
    }
    if bytes.len() as u64 > opts.max_file_bytes {
        return Err(ex(
            K::TooLarge,
            format!("grew to {}", human_bytes(bytes.len() as u64)),
        ));
    }
    let content = String::from_utf8(bytes).map_err(|e| {
        ex(
            K::Binary,
            format!("invalid UTF-8 at byte {}", e.utf8_error().valid_up_to()),
        )
    })?;
    if !opts.include_generated {
        if let Some(line) = long_line(&content) {
            return Err(ex(
                K::Generated,
                format!("line {line} is longer than {MAX_LINE_CHARS} characters (minified?)"),
            ));
        }
    }
    if !opts.include_secrets {
        if let Some((what, line)) = find_secret(&content) {
            return Err(ex(K::Secret, format!("{what} on line {line}")));
        }
    }
    let tokens = match tok {
        Some(t) => Some(
            t.encode(&content)
                .map_err(|e| ex(K::Unreadable, format!("cannot tokenize: {e:#}")))?
                .len(),
        ),
        None => None,
    };
    Ok(TextFile {
        language: language_of(&c.rel),
        rel: c.rel.clone(),
        bytes: content.len() as u64,
        content,
        tokens,
    })
}

/// The 1-based number of the first line over [`MAX_LINE_CHARS`] characters in the first 8 KiB.
fn long_line(text: &str) -> Option<usize> {
    let mut end = text.len().min(SNIFF_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end]
        .split('\n')
        .position(|l| l.len() > MAX_LINE_CHARS && l.chars().count() > MAX_LINE_CHARS)
        .map(|i| i + 1)
}

fn secret_regexes() -> &'static (RegexSet, Vec<Regex>) {
    static R: OnceLock<(RegexSet, Vec<Regex>)> = OnceLock::new();
    R.get_or_init(|| {
        let pats = SECRET_PATTERNS.iter().map(|(_, p)| *p);
        (
            RegexSet::new(pats.clone()).expect("secret patterns compile"),
            pats.map(|p| Regex::new(p).expect("secret pattern compiles"))
                .collect(),
        )
    })
}

/// The earliest secret in `text`: (what, 1-based line), e.g. `("AWS access key id", 3)`.
pub fn find_secret(text: &str) -> Option<(&'static str, usize)> {
    let (set, res) = secret_regexes();
    let hits = set.matches(text);
    if !hits.matched_any() {
        return None;
    }
    let (pos, what) = hits
        .iter()
        .filter_map(|i| res[i].find(text).map(|m| (m.start(), SECRET_PATTERNS[i].0)))
        .min()?;
    Some((
        what,
        text.as_bytes()[..pos]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1,
    ))
}

/// The language of a file, from its name or extension (`text` when unknown).
pub fn language_of(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or(path);
    match name {
        "Makefile" | "makefile" | "GNUmakefile" => return "makefile",
        "CMakeLists.txt" => return "cmake",
        "Dockerfile" => return "dockerfile",
        _ => {}
    }
    if name.starts_with("Dockerfile.") {
        return "dockerfile";
    }
    let ext = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => ext.to_ascii_lowercase(),
        _ => return "text",
    };
    match ext.as_str() {
        "rs" => "rust",
        "py" | "pyi" | "pyw" => "python",
        "c" | "h" => "c",
        "cc" | "cpp" | "cxx" | "c++" | "hpp" | "hh" | "hxx" | "h++" | "ipp" | "tpp" => "cpp",
        "js" | "mjs" | "cjs" | "jsx" => "javascript",
        "ts" | "tsx" | "mts" | "cts" => "typescript",
        "go" => "go",
        "java" => "java",
        "kt" | "kts" => "kotlin",
        "scala" | "sc" => "scala",
        "swift" => "swift",
        "m" | "mm" => "objective-c",
        "cs" => "csharp",
        "fs" | "fsx" => "fsharp",
        "rb" => "ruby",
        "php" => "php",
        "pl" | "pm" => "perl",
        "lua" => "lua",
        "r" => "r",
        "jl" => "julia",
        "hs" => "haskell",
        "ml" | "mli" => "ocaml",
        "ex" | "exs" => "elixir",
        "erl" | "hrl" => "erlang",
        "clj" | "cljs" | "edn" => "clojure",
        "zig" => "zig",
        "nim" => "nim",
        "dart" => "dart",
        "vue" => "vue",
        "svelte" => "svelte",
        "md" | "markdown" | "mdx" => "markdown",
        "rst" => "restructuredtext",
        "adoc" | "asciidoc" => "asciidoc",
        "tex" => "latex",
        "toml" => "toml",
        "json" | "jsonl" | "json5" => "json",
        "yaml" | "yml" => "yaml",
        "xml" | "xsd" | "xsl" | "svg" => "xml",
        "ini" | "cfg" | "conf" => "ini",
        "sh" | "bash" | "zsh" | "ksh" | "fish" => "shell",
        "ps1" | "psm1" => "powershell",
        "bat" | "cmd" => "batch",
        "html" | "htm" | "xhtml" => "html",
        "css" => "css",
        "scss" | "sass" => "scss",
        "less" => "less",
        "sql" => "sql",
        "proto" => "protobuf",
        "graphql" | "gql" => "graphql",
        "cmake" => "cmake",
        "mk" => "makefile",
        "nix" => "nix",
        "tf" | "hcl" => "hcl",
        "s" | "asm" => "assembly",
        "txt" => "text",
        _ => "text",
    }
}

/// `1234` → `1.2 KB` (decimal units).
pub fn human_bytes(n: u64) -> String {
    let x = n as f64;
    if n < 1000 {
        format!("{n} B")
    } else if x < 1e6 {
        format!("{:.1} KB", x / 1e3)
    } else if x < 1e9 {
        format!("{:.1} MB", x / 1e6)
    } else {
        format!("{:.1} GB", x / 1e9)
    }
}

// ---------------------------------------------------------------------------------------------
// Signatures

struct SigRules {
    code: Vec<Regex>,
    c_like: Regex,
    shell: Regex,
    sql: Regex,
    makefile: Regex,
    markdown: Regex,
    toml: Regex,
    yaml: Regex,
}

fn sig_rules() -> &'static SigRules {
    static R: OnceLock<SigRules> = OnceLock::new();
    R.get_or_init(|| {
        let re = |p: &str| Regex::new(p).expect("signature pattern compiles");
        SigRules {
            code: vec![
                // Declarations, after any modifiers, at any indentation.
                re(concat!(
                    r#"^\s*(?:(?:pub(?:\s*\([^)]*\))?|export|default|async|unsafe"#,
                    r#"|extern(?:\s+"[^"]*")?|public|private|protected|internal|static"#,
                    r#"|abstract|final|sealed|override|virtual|inline|const|open|data|declare)\s+)*"#,
                    r#"(?:fn|struct|enum|trait|impl|mod|type|union|macro_rules|class|def"#,
                    r#"|interface|func|function\*?|module|namespace|typedef|record|object"#,
                    r#"|protocol|extension|template|package)\b"#,
                )),
                // Anything public or exported (fields, constants, re-exports).
                re(r"^\s*(?:pub|public|protected|export)\b"),
                // Top-level bindings.
                re(r"^(?:const|static|let|var)\s"),
                // Preprocessor definitions.
                re(r"^\s*#\s*define\b"),
            ],
            // A C/C++/Java/C# function head at column 0: `int main(int argc, ...)`, no `;`.
            c_like: re(r"^[A-Za-z_][\w\s\*&:<>,\[\]]*[\s\*&]\*?[A-Za-z_~][\w:~]*\s*\([^;]*$"),
            shell: re(r"^\s*(?:function\s+[\w-]+|[A-Za-z_][\w-]*\s*\(\s*\))"),
            sql: re(r"(?i)^\s*(?:create|alter)\s"),
            makefile: re(r"^[A-Za-z0-9_.\-/%$() ]+:(?:[^=]|$)"),
            markdown: re(r"^#{1,6}\s"),
            toml: re(r"^\s*\[\[?[^\]]+\]\]?\s*$"),
            yaml: re(r#"^[A-Za-z_"'][^:#]*:"#),
        }
    })
}

/// The declaration lines of `content` (a signatures-only summary), each cut to 240
/// characters, joined with newlines; empty when the language has none (JSON, plain text…).
pub fn signatures(content: &str, language: &str) -> String {
    let r = sig_rules();
    let keep: Box<dyn Fn(&str) -> bool> = match language {
        "markdown" => Box::new(|l| r.markdown.is_match(l)),
        "toml" | "ini" => Box::new(|l| r.toml.is_match(l)),
        "yaml" => Box::new(|l| r.yaml.is_match(l)),
        "shell" => Box::new(|l| r.shell.is_match(l)),
        "sql" => Box::new(|l| r.sql.is_match(l)),
        "makefile" => Box::new(|l| r.makefile.is_match(l) && !l.starts_with('\t')),
        "text" | "json" | "html" | "xml" | "css" | "scss" | "less" | "restructuredtext"
        | "asciidoc" | "latex" | "batch" => Box::new(|_| false),
        "c" | "cpp" | "java" | "csharp" | "objective-c" => Box::new(|l| {
            r.code.iter().any(|re| re.is_match(l))
                || (r.c_like.is_match(l) && !l.trim_start().starts_with("return"))
        }),
        _ => Box::new(|l| r.code.iter().any(|re| re.is_match(l))),
    };
    let mut out = String::new();
    for line in content.lines() {
        let line = line.trim_end();
        if line.is_empty() || !keep(line) {
            continue;
        }
        if line.chars().count() > MAX_SIGNATURE_CHARS {
            out.extend(line.chars().take(MAX_SIGNATURE_CHARS));
            out.push('…');
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Ranking

const STOP_WORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "by", "do", "doe", "does", "for", "from", "how",
    "in", "is", "it", "of", "on", "or", "the", "this", "that", "to", "what", "when", "where",
    "which", "why", "with",
];

fn normalize_term(t: &str) -> Option<String> {
    let mut t = t.to_ascii_lowercase();
    if t.len() > 3 && t.ends_with('s') && !t.ends_with("ss") {
        t.pop();
    }
    (t.len() >= 2 && !STOP_WORDS.contains(&t.as_str())).then_some(t)
}

/// Call `f` with every search term of `text`: identifiers, lower-cased, and their `_` /
/// camelCase parts.
fn for_each_term(text: &str, f: &mut dyn FnMut(String)) {
    let b = text.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < b.len() {
        if !word(b[i]) {
            i += 1;
            continue;
        }
        let s = i;
        while i < b.len() && word(b[i]) {
            i += 1;
        }
        let ident = text[s..i].trim_matches('_');
        if !ident
            .as_bytes()
            .first()
            .is_some_and(|c| c.is_ascii_alphabetic())
        {
            continue; // numbers
        }
        let parts = split_ident(ident);
        if let Some(t) = normalize_term(ident) {
            f(t);
        }
        if parts.len() > 1 {
            for p in parts {
                if let Some(t) = normalize_term(p) {
                    f(t);
                }
            }
        }
    }
}

/// `parseHTTPRequest_v2` → `parse`, `HTTP`, `Request`, `v2`.
fn split_ident(ident: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    for chunk in ident.split('_').filter(|c| !c.is_empty()) {
        let b = chunk.as_bytes();
        let mut start = 0;
        for i in 1..b.len() {
            let (p, c) = (b[i - 1], b[i]);
            let next_lower = b.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
            if (p.is_ascii_lowercase() && c.is_ascii_uppercase())
                || (p.is_ascii_uppercase() && c.is_ascii_uppercase() && next_lower)
            {
                parts.push(&chunk[start..i]);
                start = i;
            }
        }
        parts.push(&chunk[start..]);
    }
    parts
}

/// BM25 scores of `texts` for `query` (all zero when the query has no terms).
fn bm25(texts: &[TextFile], query: &str) -> Vec<f64> {
    let mut qterms: Vec<String> = Vec::new();
    for_each_term(query, &mut |t| {
        if !qterms.contains(&t) {
            qterms.push(t);
        }
    });
    if qterms.is_empty() || texts.is_empty() {
        return vec![0.0; texts.len()];
    }
    let index: HashMap<&str, usize> = qterms
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    const PATH_WEIGHT: f64 = 3.0;
    let docs: Vec<(Vec<f64>, f64)> = texts
        .par_iter()
        .map(|t| {
            let mut tf = vec![0.0; qterms.len()];
            let mut len = 0.0;
            let mut add = |term: String, w: f64| {
                len += w;
                if let Some(&k) = index.get(term.as_str()) {
                    tf[k] += w;
                }
            };
            for_each_term(&t.rel, &mut |term| add(term, PATH_WEIGHT));
            for_each_term(&t.content, &mut |term| add(term, 1.0));
            (tf, len)
        })
        .collect();
    let n = docs.len() as f64;
    let avgdl = (docs.iter().map(|d| d.1).sum::<f64>() / n).max(1.0);
    let idf: Vec<f64> = (0..qterms.len())
        .map(|k| {
            let df = docs.iter().filter(|d| d.0[k] > 0.0).count() as f64;
            (1.0 + (n - df + 0.5) / (df + 0.5)).ln()
        })
        .collect();
    let (k1, b) = (1.2, 0.75);
    docs.iter()
        .map(|(tf, len)| {
            tf.iter()
                .zip(&idf)
                .map(|(&f, &idf)| idf * f * (k1 + 1.0) / (f + k1 * (1.0 - b + b * len / avgdl)))
                .sum()
        })
        .collect()
}

/// The prior order key: (tier, depth within tiers 0–1, size, path).
fn prior_key(t: &TextFile) -> (u8, usize, usize, &str) {
    let comps: Vec<&str> = t.rel.split('/').collect();
    let depth = comps.len() - 1;
    let name = comps[depth].to_ascii_lowercase();
    let readme = name.starts_with("readme");
    let docs = comps[..depth]
        .iter()
        .any(|c| c.eq_ignore_ascii_case("doc") || c.eq_ignore_ascii_case("docs"));
    let tier = if readme && depth == 0 {
        0
    } else if readme || docs || depth == 0 {
        1
    } else {
        2
    };
    let size = t.tokens.unwrap_or(t.bytes as usize);
    (tier, if tier < 2 { depth } else { 0 }, size, &t.rel)
}

/// Indices of `texts`, best first.
fn rank(texts: &[TextFile], query: Option<&str>) -> Vec<usize> {
    let scores = match query {
        Some(q) => bm25(texts, q),
        None => vec![0.0; texts.len()],
    };
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by(|&a, &b| {
        scores[b]
            .total_cmp(&scores[a])
            .then_with(|| prior_key(&texts[a]).cmp(&prior_key(&texts[b])))
    });
    order
}

// ---------------------------------------------------------------------------------------------
// Budget

/// Tokens a section of `f` adds to the document (header, content, separators); exact up to
/// merges across section boundaries, which [`fit_budget`] checks afterwards.
fn section_cost(f: &PackedFile, tok: &Tokenizer) -> Result<usize> {
    let header = tok.encode(&(f.header() + "\n"))?.len();
    let newline = usize::from(!f.content.is_empty() && !f.content.ends_with('\n'));
    Ok(header + f.tokens.unwrap_or(0) + newline + 1)
}

fn fit_budget(
    texts: Vec<TextFile>,
    budget: usize,
    query: Option<&str>,
    tok: &Tokenizer,
) -> Result<(Vec<PackedFile>, Cut)> {
    let order = rank(&texts, query);
    let names: Vec<String> = texts.iter().map(|t| t.rel.clone()).collect();
    let mut rank_of = vec![0; texts.len()];
    for (r, &i) in order.iter().enumerate() {
        rank_of[i] = r;
    }
    let mut sigs: Vec<Option<PackedFile>> = texts.iter().map(|_| None).collect();
    let mut whole: Vec<Option<PackedFile>> = texts.into_iter().map(|t| Some(t.whole())).collect();
    let whole_cost: Vec<usize> = whole
        .par_iter()
        .map(|f| section_cost(f.as_ref().expect("present"), tok))
        .collect::<Result<_>>()?;

    // Pass 1: whole files in rank order, each one that fits.
    let mut chosen: Vec<Option<Mode>> = vec![None; whole.len()];
    let mut left = budget;
    for &i in &order {
        if whole_cost[i] <= left {
            chosen[i] = Some(Mode::Whole);
            left -= whole_cost[i];
        }
    }

    // Pass 2: signatures of the rest, in rank order, while they fit.
    let rest: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&i| chosen[i].is_none())
        .collect();
    let summaries: Vec<Option<(PackedFile, usize)>> = rest
        .par_iter()
        .map(|&i| -> Result<Option<(PackedFile, usize)>> {
            let f = whole[i].as_ref().expect("present");
            let content = signatures(&f.content, f.language);
            if content.is_empty() {
                return Ok(None);
            }
            let s = PackedFile {
                path: f.path.clone(),
                language: f.language,
                bytes: f.bytes,
                file_tokens: f.file_tokens,
                tokens: Some(tok.encode(&content)?.len()),
                mode: Mode::Signatures,
                content,
                rank: None,
            };
            let cost = section_cost(&s, tok)?;
            Ok(Some((s, cost)))
        })
        .collect::<Result<_>>()?;
    for (&i, s) in rest.iter().zip(summaries) {
        if let Some((s, cost)) = s {
            if cost <= left {
                left -= cost;
                chosen[i] = Some(Mode::Signatures);
                sigs[i] = Some(s);
            }
        }
    }

    // Assemble (path order = index order), then check the exact document size.
    let mut packed: Vec<(usize, PackedFile)> = Vec::new();
    for i in 0..whole.len() {
        let f = match chosen[i] {
            Some(Mode::Whole) => whole[i].take(),
            Some(Mode::Signatures) => sigs[i].take(),
            None => None,
        };
        if let Some(mut f) = f {
            f.rank = Some(rank_of[i] + 1);
            packed.push((i, f));
        }
    }
    let document_tokens = loop {
        let doc = render_files(packed.iter().map(|(_, f)| f));
        let n = tok.encode(&doc)?.len();
        if n <= budget || packed.is_empty() {
            break n;
        }
        let worst = (0..packed.len())
            .max_by_key(|&k| rank_of[packed[k].0])
            .expect("not empty");
        let (i, _) = packed.remove(worst);
        chosen[i] = None;
    };

    let mut cut = Cut {
        max_tokens: budget,
        query: query.map(str::to_string),
        document_tokens,
        whole: Vec::new(),
        signatures: Vec::new(),
        dropped: Vec::new(),
    };
    for &i in &order {
        let list = match chosen[i] {
            Some(Mode::Whole) => &mut cut.whole,
            Some(Mode::Signatures) => &mut cut.signatures,
            None => &mut cut.dropped,
        };
        list.push(names[i].clone());
    }
    Ok((packed.into_iter().map(|(_, f)| f).collect(), cut))
}

// ---------------------------------------------------------------------------------------------
// Output

fn push_section(s: &mut String, f: &PackedFile) {
    s.push_str(&f.header());
    s.push('\n');
    s.push_str(&f.content);
    if !f.content.is_empty() && !f.content.ends_with('\n') {
        s.push('\n');
    }
    s.push('\n');
}

fn render_files<'a>(files: impl Iterator<Item = &'a PackedFile>) -> String {
    let mut s = String::new();
    for f in files {
        push_section(&mut s, f);
    }
    s
}

/// The plain document: per file a header line, the content and a blank line.
pub fn render_plain(p: &Pack) -> String {
    render_files(p.files.iter())
}

/// The document to put in a model's context (the plain form).
pub fn context_text(p: &Pack) -> String {
    render_plain(p)
}

/// The JSON form: `{root, files: [{path, language, bytes, tokens, file_tokens, mode, rank,
/// content}], excluded: [{path, kind, detail, reason}], cut, totals}` (no timings, so it is
/// deterministic).
pub fn render_json(p: &Pack) -> serde_json::Value {
    use serde_json::json;
    let files: Vec<_> = p
        .files
        .iter()
        .map(|f| {
            json!({
                "path": f.path,
                "language": f.language,
                "bytes": f.bytes,
                "tokens": f.tokens,
                "file_tokens": f.file_tokens,
                "mode": f.mode.as_str(),
                "rank": f.rank,
                "content": f.content,
            })
        })
        .collect();
    let excluded: Vec<_> = p
        .excluded
        .iter()
        .map(|e| {
            json!({
                "path": e.path,
                "kind": e.kind.as_str(),
                "detail": e.detail,
                "reason": e.reason(),
            })
        })
        .collect();
    let by_kind: serde_json::Map<String, serde_json::Value> = p
        .excluded_by_kind()
        .into_iter()
        .map(|(k, n)| (k.as_str().to_string(), json!(n)))
        .collect();
    let cut = p.cut.as_ref().map(|c| {
        json!({
            "max_tokens": c.max_tokens,
            "query": c.query,
            "document_tokens": c.document_tokens,
            "whole": c.whole,
            "signatures": c.signatures,
            "dropped": c.dropped,
        })
    });
    json!({
        "root": p.root.to_string_lossy(),
        "files": files,
        "excluded": excluded,
        "cut": cut,
        "totals": {
            "files": p.files.len(),
            "bytes": p.total_bytes(),
            "tokens": p.total_tokens(),
            "excluded": p.excluded.len(),
            "excluded_by_kind": by_kind,
            "not_included": p.stats.not_included,
            "partial": p.is_partial(),
        },
    })
}

/// The token table: the total, every directory (all levels, aggregated over everything
/// below it), then every file; each section sorted by tokens (bytes without a tokenizer)
/// descending, then path. Columns: tokens (`-` without a tokenizer), bytes, files, path.
pub fn count_table(p: &Pack) -> String {
    #[derive(Default, Clone, Copy)]
    struct Agg {
        tokens: usize,
        bytes: u64,
        files: usize,
    }
    let mut dirs: BTreeMap<&str, Agg> = BTreeMap::new();
    let mut total = Agg::default();
    let mut file_rows: Vec<(Agg, String)> = Vec::new();
    for f in &p.files {
        let a = Agg {
            tokens: f.tokens.unwrap_or(0),
            bytes: f.content.len() as u64,
            files: 1,
        };
        for (i, _) in f.path.match_indices('/') {
            let d = dirs.entry(&f.path[..=i]).or_default();
            d.tokens += a.tokens;
            d.bytes += a.bytes;
            d.files += 1;
        }
        total.tokens += a.tokens;
        total.bytes += a.bytes;
        total.files += 1;
        let name = if f.mode == Mode::Signatures {
            format!("{} (signatures only)", f.path)
        } else {
            f.path.clone()
        };
        file_rows.push((a, name));
    }
    let key = |a: &Agg| {
        if p.tokenized {
            a.tokens as u64
        } else {
            a.bytes
        }
    };
    let mut dir_rows: Vec<(Agg, String)> =
        dirs.into_iter().map(|(d, a)| (a, d.to_string())).collect();
    dir_rows.sort_by(|x, y| key(&y.0).cmp(&key(&x.0)).then_with(|| x.1.cmp(&y.1)));
    file_rows.sort_by(|x, y| key(&y.0).cmp(&key(&x.0)).then_with(|| x.1.cmp(&y.1)));

    let tok_s = |a: &Agg| {
        if p.tokenized {
            a.tokens.to_string()
        } else {
            "-".to_string()
        }
    };
    let wt = tok_s(&total).len().max("tokens".len());
    let wb = total.bytes.to_string().len().max("bytes".len());
    let wf = total.files.to_string().len().max("files".len());
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>wt$}  {:>wb$}  {:>wf$}  path",
        "tokens", "bytes", "files"
    );
    let row = |s: &mut String, a: &Agg, files: String, path: &str| {
        let _ = writeln!(
            s,
            "{:>wt$}  {:>wb$}  {:>wf$}  {path}",
            tok_s(a),
            a.bytes,
            files
        );
    };
    row(&mut s, &total, total.files.to_string(), "(total)");
    for (a, d) in &dir_rows {
        row(&mut s, a, a.files.to_string(), d);
    }
    for (a, f) in &file_rows {
        row(&mut s, a, String::new(), f);
    }
    s
}

/// One line per excluded path: `excluded PATH: REASON`.
pub fn excluded_report(p: &Pack) -> String {
    let mut s = String::new();
    for e in &p.excluded {
        let _ = writeln!(s, "excluded {}: {}", e.path, e.reason());
    }
    s
}

/// What the budget cut (None without a budget): a summary line and the cut paths (up to 50
/// of each, rank order).
pub fn cut_report(p: &Pack) -> Option<String> {
    let c = p.cut.as_ref()?;
    let mut s = format!(
        "budget {} tokens{}: document is {} tokens; {} files whole, {} reduced to signatures, \
         {} dropped\n",
        c.max_tokens,
        c.query
            .as_ref()
            .map(|q| format!(" (ranked for query {q:?})"))
            .unwrap_or_default(),
        c.document_tokens,
        c.whole.len(),
        c.signatures.len(),
        c.dropped.len()
    );
    for (what, list) in [("signatures only", &c.signatures), ("dropped", &c.dropped)] {
        if list.is_empty() {
            continue;
        }
        let shown: Vec<&str> = list.iter().take(50).map(String::as_str).collect();
        let more = if list.len() > 50 {
            format!(" … and {} more (see --format json)", list.len() - 50)
        } else {
            String::new()
        };
        let _ = writeln!(s, "  {what}: {}{more}", shown.join(", "));
    }
    Some(s)
}

/// `packed N files (X MB, Y tokens) in Z s: A files/s, B MB/s, C tokens/s; excluded: …`.
/// Rates are over everything read and tokenized (before any cut).
pub fn summary_line(p: &Pack) -> String {
    let st = &p.stats;
    let secs = st.elapsed_s.max(1e-9);
    let mb = p.total_bytes() as f64 / 1e6;
    let tokens = match p.total_tokens() {
        Some(t) => format!("{t} tokens"),
        None => "tokens not counted".into(),
    };
    let mut s = format!(
        "packed {} files ({mb:.2} MB, {tokens}) in {:.2} s: {} files/s, {:.1} MB/s",
        p.files.len(),
        st.elapsed_s,
        crate::util::human_count(st.scanned_files as f64 / secs),
        st.scanned_bytes as f64 / 1e6 / secs
    );
    if let Some(t) = st.scanned_tokens {
        let _ = write!(
            s,
            ", {} tokens/s",
            crate::util::human_count(t as f64 / secs)
        );
    }
    let by_kind = p.excluded_by_kind();
    if by_kind.is_empty() {
        s.push_str("; excluded: none");
    } else {
        let parts: Vec<String> = by_kind
            .iter()
            .map(|(k, n)| format!("{n} {}", k.as_str()))
            .collect();
        let _ = write!(s, "; excluded: {}", parts.join(", "));
    }
    if st.not_included > 0 {
        let _ = write!(s, "; {} not matched by --include", st.not_included);
    }
    if p.is_partial() {
        s.push_str(" (partial: some files were unreadable or had non-UTF-8 names)");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // Secrets are assembled with `concat!` so this source file never holds one verbatim (it
    // must pack cleanly itself: see `this_file_is_not_a_secret`).
    const ENV_SECRET: &str = concat!("hunter2", "-correct-horse-battery");
    const KEY_HEADER: &str = concat!("-----BEGIN RSA PRIV", "ATE KEY-----");
    const KEY_BODY: &str = "MIIEowIBAAKCAQEAdeploykeymaterial";
    const AWS_KEY: &str = concat!("AKIA", "IOSFODNN7EXAMPLE");

    fn temp_dir(name: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "mnemo-pack-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn write(root: &Path, rel: &str, bytes: &[u8]) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }

    const MAIN_RS: &str = "//! Entry point.\nfn main() {\n    println!(\"hello\");\n}\n";

    /// A repository with one of everything that must stay out.
    fn planted_repo() -> PathBuf {
        let root = temp_dir("planted");
        write(&root, "src/main.rs", MAIN_RS.as_bytes());
        write(&root, "lib/util.py", b"def helper(x):\n    return x + 1\n");
        write(&root, "README.md", b"# Demo\n\nA demo repository.\n");
        write(
            &root,
            ".env",
            format!("DB_USER=app\nDB_PASSWORD=\"{ENV_SECRET}\"\n").as_bytes(),
        );
        write(
            &root,
            "deploy_key",
            format!("{KEY_HEADER}\n{KEY_BODY}\n-----END RSA KEY-----\n").as_bytes(),
        );
        write(
            &root,
            "config/settings.toml",
            format!("[aws]\nregion = \"us-east-1\"\naccess_key = \"{AWS_KEY}\"\n").as_bytes(),
        );
        write(&root, "logo.png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDRpngmarker");
        write(&root, ".gitignore", b"build/\n");
        write(&root, "build/out.rs", b"fn built_artifact_marker() {}\n");
        write(
            &root,
            "Cargo.lock",
            b"# @generated by Cargo.\n[[package]]\nname = \"lockmarker\"\n",
        );
        write(&root, "web/app.min.js", b"var minmarker=1;");
        let long = format!("var bundlemarker = [{}];\n", "1,".repeat(1200));
        write(&root, "web/bundle.js", long.as_bytes());
        write(
            &root,
            "node_modules/pkg/index.js",
            b"module.exports = 'nodemarker';\n",
        );
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("/etc", root.join("etc_link")).unwrap();
            std::os::unix::fs::symlink("src/main.rs", root.join("main_link.rs")).unwrap();
        }
        root
    }

    fn kind_of(p: &Pack, path: &str) -> Option<ExcludeKind> {
        p.excluded.iter().find(|e| e.path == path).map(|e| e.kind)
    }

    fn detail_of<'a>(p: &'a Pack, path: &str) -> &'a str {
        &p.excluded.iter().find(|e| e.path == path).unwrap().detail
    }

    fn paths(p: &Pack) -> Vec<&str> {
        p.files.iter().map(|f| f.path.as_str()).collect()
    }

    #[test]
    fn excludes_secrets_generated_binary_and_links() {
        let root = planted_repo();
        let p = pack(&PackOptions::new(&root), None).unwrap();
        let plain = render_plain(&p);
        let json = render_json(&p);
        let json_text = serde_json::to_string(&json).unwrap();

        assert_eq!(paths(&p), ["README.md", "lib/util.py", "src/main.rs"]);
        assert!(plain.contains(&format!("==> src/main.rs (rust, 54 B) <==\n{MAIN_RS}\n")));
        assert!(plain.contains("==> lib/util.py (python, 32 B) <==\ndef helper(x):\n"));
        assert!(plain.contains("==> README.md (markdown, 27 B) <==\n# Demo\n"));
        assert_eq!(context_text(&p), plain);

        // No excluded content anywhere; no excluded name in the document.
        for s in [
            ENV_SECRET,
            KEY_HEADER,
            KEY_BODY,
            AWS_KEY,
            "pngmarker",
            "lockmarker",
            "minmarker",
            "bundlemarker",
            "nodemarker",
            "built_artifact_marker",
            "root:x:0:0",
        ] {
            assert!(!plain.contains(s), "{s} leaked into the plain document");
            assert!(!json_text.contains(s), "{s} leaked into the JSON");
            assert!(p.excluded.iter().all(|e| !e.reason().contains(s)));
        }
        for name in [
            ".env",
            "deploy_key",
            "settings.toml",
            "logo.png",
            "Cargo.lock",
            "app.min.js",
            "bundle.js",
            "node_modules",
            "build/",
            "etc_link",
            "main_link.rs",
        ] {
            assert!(!plain.contains(name), "{name} named in the plain document");
        }
        let json_paths: Vec<&str> = json["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["path"].as_str().unwrap())
            .collect();
        assert_eq!(json_paths, paths(&p));

        // Each exclusion with its reason.
        use ExcludeKind as K;
        assert_eq!(kind_of(&p, ".env"), Some(K::Secret));
        assert_eq!(detail_of(&p, ".env"), "file name matches .env");
        assert_eq!(kind_of(&p, "deploy_key"), Some(K::Secret));
        assert_eq!(detail_of(&p, "deploy_key"), "private key on line 1");
        let aws = p.excluded.iter().find(|e| e.path == "config/settings.toml");
        assert_eq!(aws.unwrap().reason(), "secret: AWS access key id on line 3");
        assert_eq!(kind_of(&p, "logo.png"), Some(K::Binary));
        assert_eq!(kind_of(&p, "Cargo.lock"), Some(K::Generated));
        assert_eq!(detail_of(&p, "Cargo.lock"), "lock file");
        assert_eq!(kind_of(&p, "web/app.min.js"), Some(K::Generated));
        assert_eq!(kind_of(&p, "web/bundle.js"), Some(K::Generated));
        assert!(detail_of(&p, "web/bundle.js").starts_with("line 1 is longer"));
        assert_eq!(kind_of(&p, "node_modules/"), Some(K::Generated));
        assert_eq!(kind_of(&p, ".gitignore"), Some(K::Hidden));
        #[cfg(unix)]
        {
            assert_eq!(kind_of(&p, "etc_link"), Some(K::Symlink));
            assert!(detail_of(&p, "etc_link").contains("outside"));
            assert_eq!(kind_of(&p, "main_link.rs"), Some(K::Symlink));
            assert!(
                detail_of(&p, "main_link.rs").contains("inside the repository (to src/main.rs)")
            );
        }
        // Git-ignored paths are skipped silently, as git does.
        assert!(p.excluded.iter().all(|e| !e.path.starts_with("build")));
        assert!(!p.is_partial());
        assert_eq!(json["totals"]["files"], 3);
        assert_eq!(json["totals"]["excluded_by_kind"]["secret"], 3);
        assert_eq!(
            json["excluded"][0]["reason"],
            "secret: file name matches .env"
        );
        assert!(json["cut"].is_null());
        let summary = summary_line(&p);
        assert!(summary.starts_with("packed 3 files ("), "{summary}");
        assert!(
            summary.contains("excluded: 3 secret, 1 binary, 4 generated"),
            "{summary}"
        );
        assert!(
            excluded_report(&p).contains("excluded deploy_key: secret: private key on line 1\n")
        );

        // Deterministic.
        let again = pack(&PackOptions::new(&root), None).unwrap();
        assert_eq!(render_plain(&again), plain);
        assert_eq!(render_json(&again), json);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn build_output_names_are_generated_only_at_the_top() {
        let root = temp_dir("buildnames");
        write(&root, "build/out.rs", b"fn generated() {}\n");
        write(
            &root,
            "compiler/mir/src/build/expr.rs",
            b"fn real_source() {}\n",
        );
        write(
            &root,
            "web/node_modules/dep/index.js",
            b"module.exports = 1;\n",
        );
        let p = pack(&PackOptions::new(&root), None).unwrap();
        assert_eq!(paths(&p), ["compiler/mir/src/build/expr.rs"]);
        let gen: Vec<&str> = p
            .excluded
            .iter()
            .filter(|e| e.kind == ExcludeKind::Generated)
            .map(|e| e.path.as_str())
            .collect();
        assert_eq!(gen, ["build/", "web/node_modules/"]);
    }

    #[test]
    fn switches_and_globs() {
        let root = planted_repo();
        let mut o = PackOptions::new(&root);
        o.include_secrets = true;
        o.include_generated = true;
        let p = pack(&o, None).unwrap();
        let files = paths(&p);
        for f in [
            "config/settings.toml",
            "deploy_key",
            "Cargo.lock",
            "web/app.min.js",
        ] {
            assert!(files.contains(&f), "{f} missing from {files:?}");
        }
        assert!(files.contains(&"node_modules/pkg/index.js"));
        assert_eq!(kind_of(&p, ".env"), Some(ExcludeKind::Hidden));
        assert!(
            !files.iter().any(|f| f.starts_with("build/")),
            "git-ignored"
        );

        o.hidden = true;
        let p = pack(&o, None).unwrap();
        assert!(paths(&p).contains(&".env"));
        assert!(render_plain(&p).contains(ENV_SECRET));

        let mut o = PackOptions::new(&root);
        o.exclude = vec!["*.py".into(), "src".into()];
        let p = pack(&o, None).unwrap();
        assert_eq!(paths(&p), ["README.md"]);
        assert_eq!(detail_of(&p, "lib/util.py"), "matches --exclude *.py");
        assert_eq!(kind_of(&p, "src/"), Some(ExcludeKind::Filtered));

        let mut o = PackOptions::new(&root);
        o.include = vec!["*.rs".into()];
        o.skip = vec![root.join("README.md")];
        let p = pack(&o, None).unwrap();
        assert_eq!(paths(&p), ["src/main.rs"]);
        assert!(p.stats.not_included >= 2);
        assert!(p.excluded.iter().all(|e| e.path != "README.md"));

        let mut o = PackOptions::new(&root);
        o.exclude = vec!["[".into()];
        let e = pack(&o, None).unwrap_err().to_string();
        assert!(e.contains("--exclude") && e.contains("\"[\""), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    fn code_file(name: &str, n: usize) -> String {
        let mut s = format!("//! The {name} module.\n\nuse std::fmt;\n\n");
        for k in 0..n {
            s += &format!(
                "/// Compute step {k} of {name}.\npub fn {name}_step_{k}(x: f32, y: f32) -> f32 {{\n    \
                 let a = x * {k}.5 + y;\n    let b = (a * a + 1.0).sqrt();\n    \
                 if b > 10.0 {{ b - x }} else {{ a + b * y }}\n}}\n\n"
            );
        }
        s + "struct Holder {\n    value: f32,\n}\n"
    }

    #[test]
    fn budget_keeps_relevant_files_and_fits() {
        let root = temp_dir("budget");
        let mut docs = Vec::new();
        let mut add = |rel: &str, text: String| {
            write(&root, rel, text.as_bytes());
            docs.push(text);
        };
        add(
            "README.md",
            "# Engine\n\nA small engine with a tokenizer and a model.\n".into(),
        );
        add(
            "src/bpe_merge.rs",
            "//! BPE merge rules.\n\npub struct MergeRules {\n    pairs: Vec<(u32, u32)>,\n}\n\n\
             impl MergeRules {\n    /// Apply the merge rules to a byte sequence.\n    \
             pub fn apply_merges(&self, ids: &mut Vec<u32>) {\n        \
             for (a, b) in &self.pairs {\n            ids.retain(|x| x != a && x != b);\n        \
             }\n    }\n}\n"
                .into(),
        );
        for name in ["model", "kernels", "data", "train", "optimizer", "sampler"] {
            add(&format!("src/{name}.rs"), code_file(name, 12));
        }
        add(
            "docs/guide.md",
            "# Guide\n\n## Install\n\nRun it.\n\n## Use\n\nCall it.\n".into(),
        );
        add(
            "config.json",
            format!("{{\"values\": [{}]}}\n", "1, ".repeat(300) + "1"),
        );
        let tok = Tokenizer::train(docs.into_iter(), 300).unwrap();

        let full = pack(&PackOptions::new(&root), Some(&tok)).unwrap();
        let total = full.total_tokens().unwrap();
        assert_eq!(full.files.len(), 10);
        assert!(full
            .files
            .iter()
            .all(|f| f.tokens.is_some() && f.mode == Mode::Whole));
        let exact: usize = full
            .files
            .iter()
            .map(|f| tok.encode(&f.content).unwrap().len())
            .sum();
        assert_eq!(total, exact);
        assert!(render_plain(&full).contains(&format!(
            "==> README.md (markdown, 55 B, {} tokens) <==",
            full.files[0].tokens.unwrap()
        )));

        let table = count_table(&full);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("tokens") && lines[0].ends_with("path"));
        assert!(lines[1].trim_start().starts_with(&format!("{total} ")));
        assert!(lines[1].ends_with("(total)"));
        assert!(lines[2].ends_with("  src/"), "{table}");
        let file_tokens: Vec<usize> = lines[4..]
            .iter()
            .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(file_tokens.len(), 10, "{table}");
        assert!(file_tokens.windows(2).all(|w| w[0] >= w[1]), "{table}");

        let budget = total / 4;
        let mut o = PackOptions::new(&root);
        o.max_tokens = Some(budget);
        o.query = Some("how are BPE merges applied".into());
        let p = pack(&o, Some(&tok)).unwrap();
        let cut = p.cut.as_ref().unwrap();
        let doc_tokens = tok.encode(&context_text(&p)).unwrap().len();
        assert_eq!(doc_tokens, cut.document_tokens);
        assert!(doc_tokens <= budget, "{doc_tokens} > {budget}");
        assert!(p.total_tokens().unwrap() <= budget);
        assert_eq!(cut.whole[0], "src/bpe_merge.rs", "{cut:?}");
        let merge = p
            .files
            .iter()
            .find(|f| f.path == "src/bpe_merge.rs")
            .unwrap();
        assert_eq!((merge.mode, merge.rank), (Mode::Whole, Some(1)));
        assert!(!cut.signatures.is_empty(), "{cut:?}");
        assert!(!cut.dropped.is_empty(), "{cut:?}");
        assert_eq!(
            cut.whole.len() + cut.signatures.len() + cut.dropped.len(),
            10
        );
        let sig = p.files.iter().find(|f| f.mode == Mode::Signatures).unwrap();
        assert!(
            sig.content.lines().all(|l| !l.contains("let a")),
            "{}",
            sig.content
        );
        assert!(sig.content.contains("pub fn"), "{}", sig.content);
        assert!(context_text(&p).contains("; signatures only, "));
        let report = cut_report(&p).unwrap();
        assert!(report.contains("reduced to signatures") && report.contains("dropped:"));
        let json = render_json(&p);
        assert_eq!(json["cut"]["max_tokens"], budget);
        assert_eq!(json["cut"]["whole"][0], "src/bpe_merge.rs");

        // Without a query the README leads; a zero budget packs nothing.
        o.query = None;
        let p = pack(&o, Some(&tok)).unwrap();
        assert_eq!(p.cut.as_ref().unwrap().whole[0], "README.md");
        assert!(p.cut.as_ref().unwrap().document_tokens <= budget);
        o.max_tokens = Some(0);
        let p = pack(&o, Some(&tok)).unwrap();
        assert!(p.files.is_empty() && context_text(&p).is_empty());
        assert_eq!(p.cut.unwrap().dropped.len(), 10);

        // A budget needs a tokenizer.
        let e = pack(&o, None).unwrap_err().to_string();
        assert!(
            e.contains("--max-tokens") && e.contains("--tokenizer"),
            "{e}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn count_table_without_tokenizer() {
        let root = temp_dir("count");
        write(&root, "a/b/x.rs", b"fn x() {}\n");
        write(&root, "a/y.rs", b"fn yyyyyyyyyyyy() {}\n");
        write(&root, "z.md", b"# z\n");
        let p = pack(&PackOptions::new(&root), None).unwrap();
        let t = count_table(&p);
        let rows: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows[0], ["tokens", "bytes", "files", "path"]);
        assert_eq!(rows[1], ["-", "35", "3", "(total)"]);
        assert_eq!(rows[2], ["-", "31", "2", "a/"]);
        assert_eq!(rows[3], ["-", "10", "1", "a/b/"]);
        assert_eq!(rows[4], ["-", "21", "a/y.rs"]);
        assert_eq!(rows[5], ["-", "10", "a/b/x.rs"]);
        assert_eq!(rows[6], ["-", "4", "z.md"]);
        assert!(summary_line(&p).contains("tokens not counted"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn unreadable_files_and_bad_names_make_a_partial_pack() {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::PermissionsExt;
        let root = temp_dir("partial");
        write(&root, "ok.rs", b"fn ok() {}\n");
        write(&root, "locked.rs", b"fn locked() {}\n");
        write(&root, "closed/inner.rs", b"fn inner() {}\n");
        std::fs::write(
            root.join(std::ffi::OsStr::from_bytes(b"bad\xff.rs")),
            b"fn bad() {}\n",
        )
        .unwrap();
        let mode = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
        mode(&root.join("locked.rs"), 0o000).unwrap();
        mode(&root.join("closed"), 0o000).unwrap();
        let is_root = std::fs::read(root.join("locked.rs")).is_ok();

        let p = pack(&PackOptions::new(&root), None);
        mode(&root.join("locked.rs"), 0o644).unwrap();
        mode(&root.join("closed"), 0o755).unwrap();
        let p = p.unwrap();
        assert!(paths(&p).contains(&"ok.rs"));
        let bad = p
            .excluded
            .iter()
            .find(|e| e.kind == ExcludeKind::NonUtf8Name)
            .unwrap();
        assert_eq!(bad.path, "bad\u{FFFD}.rs");
        assert_eq!(bad.reason(), "non-UTF-8 name");
        assert!(p.is_partial());
        assert!(!render_plain(&p).contains("fn bad"));
        if !is_root {
            assert_eq!(
                p.excluded
                    .iter()
                    .find(|e| e.path == "locked.rs")
                    .unwrap()
                    .reason(),
                "unreadable: permission denied"
            );
            let closed = p
                .excluded
                .iter()
                .find(|e| e.path.starts_with("closed"))
                .unwrap();
            assert_eq!(closed.reason(), "unreadable: permission denied");
            assert_eq!(paths(&p), ["ok.rs"]);
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn bad_roots_are_named() {
        let root = temp_dir("bad-root");
        let missing = root.join("nope");
        let e = pack(&PackOptions::new(&missing), None)
            .unwrap_err()
            .to_string();
        assert_eq!(e, format!("{} does not exist", missing.display()));
        write(&root, "file.txt", b"x\n");
        let file = root.join("file.txt");
        let e = pack(&PackOptions::new(&file), None)
            .unwrap_err()
            .to_string();
        assert_eq!(e, format!("{} is not a directory", file.display()));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn secret_patterns() {
        let cases = [
            (
                concat!("x\n-----BEGIN OPENSSH PRIV", "ATE KEY-----\n"),
                "private key",
                2,
            ),
            (
                concat!("id = ASIA", "ABCDEFGHIJKLMNOP\n"),
                "AWS access key id",
                1,
            ),
            (
                concat!("\n\nAWS_SECRET_ACCESS", "_KEY=abc\n"),
                "AWS secret access key",
                3,
            ),
            (
                concat!("t = gh", "p_abcdefghijklmnopqrstuvwxyz0123456789\n"),
                "GitHub token",
                1,
            ),
            (concat!("xox", "b-1234567890-abc\n"), "Slack token", 1),
            (
                concat!("k = AI", "zaSyA1234567890abcdefghijklmnopqrstuv\n"),
                "Google API key",
                1,
            ),
            (
                concat!("API_KEY", " = 'abcdefghijklmnopqrstu'\n"),
                "hard-coded credential",
                1,
            ),
            (
                concat!("pass", "word: \"0123456789abcdef0\"\n"),
                "hard-coded credential",
                1,
            ),
        ];
        for (text, what, line) in cases {
            assert_eq!(find_secret(text), Some((what, line)), "{text:?}");
        }
        assert_eq!(
            find_secret("password = \"short\"\nlet token = get_token();\n"),
            None
        );
        // The earliest match wins.
        let two = format!("a = \"{}\"\n{KEY_HEADER}\n", AWS_KEY);
        assert_eq!(find_secret(&two), Some(("AWS access key id", 1)));
    }

    #[test]
    fn this_file_is_not_a_secret() {
        assert_eq!(find_secret(include_str!("pack.rs")), None);
        assert_eq!(long_line(include_str!("pack.rs")), None);
    }

    #[test]
    fn signatures_and_languages() {
        let rust = "//! Docs.\nuse std::io;\n\n/// A thing.\npub struct Thing {\n    pub a: u32,\n    b: u32,\n}\n\nimpl Thing {\n    pub(crate) fn new() -> Self {\n        let x = 1;\n        Thing { a: x, b: 2 }\n    }\n    fn private(&self) {}\n}\nconst N: usize = 3;\nmacro_rules! m { () => {} }\n";
        assert_eq!(
            signatures(rust, "rust"),
            "pub struct Thing {\n    pub a: u32,\nimpl Thing {\n    pub(crate) fn new() -> Self {\n    fn private(&self) {}\nconst N: usize = 3;\nmacro_rules! m { () => {} }\n"
        );
        let py = "import os\n\nclass A(Base):\n    \"\"\"Doc.\"\"\"\n    def f(self, x):\n        return x\n\nasync def g():\n    pass\n";
        assert_eq!(
            signatures(py, "python"),
            "class A(Base):\n    def f(self, x):\nasync def g():\n"
        );
        let c = "#include <stdio.h>\n#define MAX 10\nstatic int count;\nint main(int argc, char **argv)\n{\n    return helper(argc);\n}\ntypedef struct p p_t;\nint decl(void);\n";
        assert_eq!(
            signatures(c, "c"),
            "#define MAX 10\nstatic int count;\nint main(int argc, char **argv)\ntypedef struct p p_t;\n"
        );
        let go = "package main\n\nimport \"fmt\"\n\ntype T struct{}\n\nfunc (t T) Run() error {\n\treturn nil\n}\n";
        assert_eq!(
            signatures(go, "go"),
            "package main\ntype T struct{}\nfunc (t T) Run() error {\n"
        );
        let ts = "export interface I { a: string }\nexport default function f() {}\nconst x = 1;\n  let y = 2;\n";
        assert_eq!(
            signatures(ts, "typescript"),
            "export interface I { a: string }\nexport default function f() {}\nconst x = 1;\n"
        );
        assert_eq!(signatures("# T\ntext\n## U\n", "markdown"), "# T\n## U\n");
        assert_eq!(signatures("[a]\nx = 1\n[[b]]\n", "toml"), "[a]\n[[b]]\n");
        assert_eq!(signatures("{\"a\": 1}\n", "json"), "");
        let long = format!("pub fn f() {{ {} }}\n", "x;".repeat(300));
        assert_eq!(
            signatures(&long, "rust").chars().count(),
            MAX_SIGNATURE_CHARS + 2
        );

        let langs = [
            ("src/a.rs", "rust"),
            ("a.py", "python"),
            ("x/y.h", "c"),
            ("y.cpp", "cpp"),
            ("m.mjs", "javascript"),
            ("t.tsx", "typescript"),
            ("g.go", "go"),
            ("J.java", "java"),
            ("README.md", "markdown"),
            ("Cargo.toml", "toml"),
            ("p.json", "json"),
            ("c.yml", "yaml"),
            ("s.sh", "shell"),
            ("i.html", "html"),
            ("s.css", "css"),
            ("q.sql", "sql"),
            ("Makefile", "makefile"),
            ("LICENSE", "text"),
            (".bashrc", "text"),
            ("notes.txt", "text"),
            ("x.unknown", "text"),
        ];
        for (p, l) in langs {
            assert_eq!(language_of(p), l, "{p}");
        }
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1234), "1.2 KB");
        assert_eq!(human_bytes(5_600_000), "5.6 MB");
    }

    #[test]
    fn terms_and_ranking() {
        assert_eq!(
            split_ident("parseHTTPRequest_v2"),
            ["parse", "HTTP", "Request", "v2"]
        );
        let mut terms = Vec::new();
        for_each_term("fn apply_merges(ids) // the 42 BPEMerges", &mut |t| {
            terms.push(t)
        });
        assert_eq!(
            terms,
            [
                "fn",
                "apply_merge",
                "apply",
                "merge",
                "ids",
                "bpemerge",
                "bpe",
                "merge"
            ]
        );
        let t = |rel: &str, bytes: u64| TextFile {
            rel: rel.into(),
            bytes,
            language: language_of(rel),
            content: String::new(),
            tokens: None,
        };
        let texts = vec![
            t("src/big.rs", 900),
            t("src/small.rs", 10),
            t("Cargo.toml", 300),
            t("docs/guide.md", 50),
            t("README.md", 2000),
            t("src/README.md", 5),
        ];
        let order: Vec<&str> = rank(&texts, None)
            .iter()
            .map(|&i| texts[i].rel.as_str())
            .collect();
        assert_eq!(
            order,
            [
                "README.md",
                "Cargo.toml",
                "src/README.md",
                "docs/guide.md",
                "src/small.rs",
                "src/big.rs"
            ]
        );
        let order: Vec<&str> = rank(&texts, Some("the big one"))
            .iter()
            .map(|&i| texts[i].rel.as_str())
            .collect();
        assert_eq!(order[0], "src/big.rs");
    }
}
