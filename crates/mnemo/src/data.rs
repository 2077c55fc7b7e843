//! Corpora and the memory-mapped token cache.
//!
//! # Design
//!
//! A corpus is a directory of text and code files described by a [`CorpusSpec`]. Preparing it
//! for training happens in three steps, each deterministic:
//!
//! 1. [`scan`] walks the directory with the `ignore` crate (so `.gitignore`/`.ignore` rules
//!    apply even outside a git repository, hidden files are skipped and symlinks are never
//!    followed; the user's global git excludes are *not* read, so a corpus is the same on every
//!    machine), keeps the files matching the include globs and not the exclude globs, drops
//!    files over [`MAX_FILE_BYTES`] and files that look binary, and sorts them by relative path.
//!    Each file goes to the train or validation split by a hash of its relative path
//!    ([`split_of`]), so adding a file never moves another one between splits.
//! 2. [`prepare`] tokenizes every file once, appending the tokenizer's end-of-text id after each
//!    document, and writes the concatenated ids of each split as little-endian `u32`s under
//!    `cache_root/tokens/<key>/`. The key hashes everything the ids depend on (tokenizer, split
//!    parameters, and each file's path, size and mtime), so a later run over the same data
//!    reuses the cache instantly and any change produces a fresh one. Files are written to
//!    temporaries and renamed, `meta.json` last: a cache directory with a valid `meta.json`
//!    whose sizes match is always complete.
//! 3. The training loop reads the ids through an `mmap` ([`TokenSplit::tokens`]): nothing is
//!    loaded up front, and the OS page cache shares them between runs. [`sample_batch`] draws
//!    random windows from the [`crate::rng::Rng`] stream (so a resumed run samples exactly what
//!    an uninterrupted one would) and [`eval_windows`] gives fixed, evenly spread windows for a
//!    comparable validation loss.
//!
//! Bad input (a missing directory, an invalid glob, a split too short for the sequence length)
//! is reported as an error that names the path, flag or value at fault, never as a panic.

use anyhow::{bail, Context, Result};
use globset::{Glob, GlobSet, GlobSetBuilder};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

pub use crate::config::data::DEFAULT_INCLUDE;
pub use crate::config::CorpusSpec;

use crate::rng::Rng;
use crate::tokenizer::Tokenizer;
use crate::util::fnv1a64;

/// Files larger than this (8 MiB) are skipped: they are almost always generated or data.
pub const MAX_FILE_BYTES: u64 = 8 << 20;

/// How much of each file [`scan`] reads to recognise binary content.
const SNIFF_BYTES: u64 = 8 << 10;

/// The tokenizing progress bar: bytes (with throughput) as the position, files as the message.
const PROGRESS_TEMPLATE: &str =
    "tokenizing {bar:30} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {msg} eta {eta}";

/// Format version of the token cache; part of the key and checked in `meta.json`.
const CACHE_VERSION: u32 = 1;

/// Training or validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Split {
    Train,
    Val,
}

/// One file of a corpus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorpusFile {
    /// Full path (root joined with `rel`).
    pub path: PathBuf,
    /// Path relative to the root, `/`-separated: the sort key and the split hash input.
    pub rel: String,
    /// Size in bytes when scanned.
    pub bytes: u64,
    pub split: Split,
}

/// The files of a corpus, sorted by relative path, and what was skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corpus {
    pub files: Vec<CorpusFile>,
    /// Files with a NUL byte or invalid UTF-8 in their first 8 KiB.
    pub skipped_binary: usize,
    /// Files or directories that could not be read.
    pub skipped_unreadable: usize,
    /// Files over [`MAX_FILE_BYTES`].
    pub skipped_too_large: usize,
}

impl Corpus {
    /// Number of files in `split`.
    pub fn count(&self, split: Split) -> usize {
        self.files.iter().filter(|f| f.split == split).count()
    }

    /// Total bytes (as scanned) of the files in `split`.
    pub fn bytes(&self, split: Split) -> u64 {
        self.files
            .iter()
            .filter(|f| f.split == split)
            .map(|f| f.bytes)
            .sum()
    }
}

fn build_globset(globs: &[String], what: &str) -> Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        let glob = Glob::new(g).with_context(|| format!("invalid {what} glob {g:?}"))?;
        b.add(glob);
    }
    b.build()
        .with_context(|| format!("cannot compile the {what} globs {globs:?}"))
}

/// `path` relative to `root`, with `/` separators.
fn rel_path(root: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.is_empty() {
        None
    } else {
        Some(parts.join("/"))
    }
}

/// Whether the first bytes of a file look like binary data: a NUL byte, or bytes that are not
/// UTF-8 (a multi-byte character cut by the end of a full sniff buffer is allowed).
fn looks_binary(head: &[u8], full_buffer: bool) -> bool {
    if head.contains(&0) {
        return true;
    }
    match std::str::from_utf8(head) {
        Ok(_) => false,
        Err(e) => !(full_buffer && e.error_len().is_none()),
    }
}

enum Sniff {
    Text,
    Binary,
    Unreadable,
}

fn sniff(path: &Path) -> Sniff {
    let mut head = Vec::with_capacity(SNIFF_BYTES as usize);
    let read = std::fs::File::open(path).and_then(|f| f.take(SNIFF_BYTES).read_to_end(&mut head));
    match read {
        Err(e) => {
            tracing::debug!("skipping unreadable {}: {e}", path.display());
            Sniff::Unreadable
        }
        Ok(_) if looks_binary(&head, head.len() as u64 == SNIFF_BYTES) => Sniff::Binary,
        Ok(_) => Sniff::Text,
    }
}

/// The split a file goes to by the hash rule alone (before the fallbacks of [`scan`]).
pub fn split_of(rel: &str, val_fraction: f64) -> Split {
    if ((fnv1a64(rel.as_bytes()) % 1_000_000) as f64) < val_fraction * 1e6 {
        Split::Val
    } else {
        Split::Train
    }
}

fn check_val_fraction(v: f64) -> Result<()> {
    if !(v.is_finite() && (0.0..1.0).contains(&v)) {
        bail!("val_fraction (--val-fraction) is {v}: it must be at least 0 and below 1");
    }
    Ok(())
}

/// List the corpus files of `spec`: see the module docs. Errors if the root is missing or not
/// a directory, a glob is invalid, `val_fraction` is outside `[0, 1)`, or no file is usable.
pub fn scan(spec: &CorpusSpec) -> Result<Corpus> {
    let root = &spec.root;
    check_val_fraction(spec.val_fraction)?;
    let meta = match std::fs::metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("data directory {} does not exist", root.display())
        }
        Err(e) => bail!("cannot access data directory {}: {e}", root.display()),
    };
    if !meta.is_dir() {
        bail!("data directory {} is not a directory", root.display());
    }
    let include_globs = spec.effective_include();
    let include = build_globset(&include_globs, "include")?;
    let exclude = build_globset(&spec.exclude, "exclude")?;

    let mut corpus = Corpus {
        files: Vec::new(),
        skipped_binary: 0,
        skipped_unreadable: 0,
        skipped_too_large: 0,
    };
    let mut candidates: Vec<(PathBuf, String, u64)> = Vec::new();
    let walk = ignore::WalkBuilder::new(root)
        .hidden(true)
        .follow_links(false)
        .require_git(false)
        .git_global(false)
        .build();
    for entry in walk {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!("skipping an unreadable entry under {}: {e}", root.display());
                corpus.skipped_unreadable += 1;
                continue;
            }
        };
        if !entry.file_type().is_some_and(|t| t.is_file()) {
            continue; // directories, symlinks, sockets, …
        }
        let path = entry.path();
        let Some(rel) = rel_path(root, path) else {
            continue;
        };
        let name = path.file_name().map(Path::new).unwrap_or(Path::new(""));
        let matches = |set: &GlobSet| set.is_match(&rel) || set.is_match(name);
        if !matches(&include) || matches(&exclude) {
            continue;
        }
        let bytes = match entry.metadata() {
            Ok(m) => m.len(),
            Err(e) => {
                tracing::debug!("skipping {}: {e}", path.display());
                corpus.skipped_unreadable += 1;
                continue;
            }
        };
        if bytes > MAX_FILE_BYTES {
            corpus.skipped_too_large += 1;
            continue;
        }
        candidates.push((path.to_path_buf(), rel, bytes));
    }

    let sniffed: Vec<Sniff> = candidates.par_iter().map(|(p, _, _)| sniff(p)).collect();
    for ((path, rel, bytes), s) in candidates.into_iter().zip(sniffed) {
        match s {
            Sniff::Binary => corpus.skipped_binary += 1,
            Sniff::Unreadable => corpus.skipped_unreadable += 1,
            Sniff::Text => {
                let split = split_of(&rel, spec.val_fraction);
                corpus.files.push(CorpusFile {
                    path,
                    rel,
                    bytes,
                    split,
                });
            }
        }
    }
    if corpus.files.is_empty() {
        bail!(
            "no text files matching {} under {} (skipped: {} binary, {} unreadable, {} over {} MiB)",
            include_globs.join(" "),
            root.display(),
            corpus.skipped_binary,
            corpus.skipped_unreadable,
            corpus.skipped_too_large,
            MAX_FILE_BYTES >> 20
        );
    }
    corpus.files.sort_by(|a, b| a.rel.cmp(&b.rel));

    // Both splits non-empty whenever there are two files or more; a single file trains.
    let hash = |f: &CorpusFile| (fnv1a64(f.rel.as_bytes()), f.rel.clone());
    if corpus.files.len() == 1 {
        corpus.files[0].split = Split::Train;
    } else if corpus.count(Split::Val) == 0 {
        if let Some(f) = corpus.files.iter_mut().min_by_key(|f| hash(f)) {
            f.split = Split::Val;
        }
    } else if corpus.count(Split::Train) == 0 {
        if let Some(f) = corpus.files.iter_mut().max_by_key(|f| hash(f)) {
            f.split = Split::Train;
        }
    }
    Ok(corpus)
}

/// Where token caches go by default: `$MNEMO_CACHE`, else `$XDG_CACHE_HOME/mnemo`, else
/// `$HOME/.cache/mnemo`, else `./.mnemo-cache`.
pub fn default_cache_root() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("MNEMO_CACHE") {
        p
    } else if let Some(p) = var("XDG_CACHE_HOME") {
        p.join("mnemo")
    } else if let Some(p) = var("HOME") {
        p.join(".cache").join("mnemo")
    } else {
        PathBuf::from(".mnemo-cache")
    }
}

enum Store {
    Empty,
    Mapped(memmap2::Mmap),
    Owned(Vec<u32>),
}

/// The token ids of one split: a read-only memory map of the cache file (or owned ids).
pub struct TokenSplit {
    store: Store,
    pub n_tokens: usize,
    /// Bytes of text the ids came from (for bits per byte).
    pub n_bytes: u64,
    /// Documents (files) in the split.
    pub n_files: usize,
}

impl std::fmt::Debug for TokenSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.store {
            Store::Empty => "empty",
            Store::Mapped(_) => "mmap",
            Store::Owned(_) => "owned",
        };
        f.debug_struct("TokenSplit")
            .field("store", &kind)
            .field("n_tokens", &self.n_tokens)
            .field("n_bytes", &self.n_bytes)
            .field("n_files", &self.n_files)
            .finish()
    }
}

impl TokenSplit {
    /// A split held in memory (for tests and small tools).
    pub fn from_tokens(tokens: Vec<u32>, n_bytes: u64, n_files: usize) -> Self {
        TokenSplit {
            n_tokens: tokens.len(),
            store: Store::Owned(tokens),
            n_bytes,
            n_files,
        }
    }

    /// Map `path`, which must hold exactly `meta.n_tokens` little-endian u32s.
    fn open(path: &Path, meta: &SplitMeta) -> Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open token file {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("cannot stat token file {}", path.display()))?
            .len();
        let want = meta.n_tokens as u64 * 4;
        if len != want {
            bail!(
                "token file {} has {len} bytes, expected {want} ({} tokens)",
                path.display(),
                meta.n_tokens
            );
        }
        let store = if len == 0 {
            Store::Empty
        } else {
            // SAFETY: the cache files are written once (temp file + rename) and never modified in
            // place, so the mapping stays valid for the lifetime of `Mmap`.
            let map = unsafe { memmap2::Mmap::map(&file) }
                .with_context(|| format!("cannot memory-map token file {}", path.display()))?;
            if cfg!(target_endian = "little") && (map.as_ptr() as usize).is_multiple_of(4) {
                Store::Mapped(map)
            } else {
                let ids = map
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                Store::Owned(ids)
            }
        };
        Ok(TokenSplit {
            store,
            n_tokens: meta.n_tokens,
            n_bytes: meta.n_bytes,
            n_files: meta.n_files,
        })
    }

    /// The token ids.
    pub fn tokens(&self) -> &[u32] {
        match &self.store {
            Store::Empty => &[],
            // SAFETY: `open` only keeps a mapping on little-endian targets when it is 4-byte
            // aligned and exactly `n_tokens * 4` bytes long; any bit pattern is a valid u32.
            Store::Mapped(m) => unsafe {
                std::slice::from_raw_parts(m.as_ptr() as *const u32, m.len() / 4)
            },
            Store::Owned(v) => v,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.n_tokens == 0
    }
}

/// The prepared token ids of a corpus.
#[derive(Debug)]
pub struct TokenCache {
    /// `cache_root/tokens/<key>/`.
    pub dir: PathBuf,
    pub train: TokenSplit,
    pub val: TokenSplit,
    /// Whether an existing cache was used (nothing was tokenized).
    pub reused: bool,
    /// Files left out because they were not valid UTF-8 when read in full.
    pub skipped_non_utf8: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct SplitMeta {
    n_tokens: usize,
    n_bytes: u64,
    n_files: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct CacheMeta {
    version: u32,
    train: SplitMeta,
    val: SplitMeta,
    root: PathBuf,
    /// Unix seconds.
    created: u64,
    eot: u32,
    skipped_non_utf8: usize,
}

fn push_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    buf.extend_from_slice(&(b.len() as u64).to_le_bytes());
    buf.extend_from_slice(b);
}

/// The cache key: everything the token ids depend on.
fn cache_key(corpus: &Corpus, spec: &CorpusSpec, tok: &Tokenizer) -> Result<u64> {
    let mut buf = Vec::new();
    push_bytes(
        &mut buf,
        format!("mnemo-token-cache-v{CACHE_VERSION}").as_bytes(),
    );
    push_bytes(&mut buf, tok.to_json()?.as_bytes());
    buf.extend_from_slice(&spec.val_fraction.to_bits().to_le_bytes());
    for globs in [spec.effective_include(), spec.exclude.clone()] {
        buf.extend_from_slice(&(globs.len() as u64).to_le_bytes());
        for g in &globs {
            push_bytes(&mut buf, g.as_bytes());
        }
    }
    buf.extend_from_slice(&(corpus.files.len() as u64).to_le_bytes());
    for f in &corpus.files {
        let mtime = std::fs::metadata(&f.path)
            .and_then(|m| m.modified())
            .with_context(|| {
                format!("cannot read the modification time of {}", f.path.display())
            })?;
        let nanos = match mtime.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        };
        push_bytes(&mut buf, f.rel.as_bytes());
        buf.extend_from_slice(&f.bytes.to_le_bytes());
        buf.extend_from_slice(&nanos.to_le_bytes());
        buf.push(match f.split {
            Split::Train => 0,
            Split::Val => 1,
        });
    }
    Ok(fnv1a64(&buf))
}

fn split_file(dir: &Path, split: Split) -> PathBuf {
    dir.join(match split {
        Split::Train => "train.u32",
        Split::Val => "val.u32",
    })
}

/// Open an existing complete cache in `dir`, or `None` if there is none (or it is stale).
fn try_reuse(dir: &Path) -> Option<(TokenSplit, TokenSplit, usize)> {
    let text = std::fs::read_to_string(dir.join("meta.json")).ok()?;
    let meta: CacheMeta = serde_json::from_str(&text).ok()?;
    if meta.version != CACHE_VERSION {
        return None;
    }
    let open = |split, m: &SplitMeta| match TokenSplit::open(&split_file(dir, split), m) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("rebuilding the token cache in {}: {e:#}", dir.display());
            None
        }
    };
    let train = open(Split::Train, &meta.train)?;
    let val = open(Split::Val, &meta.val)?;
    Some((train, val, meta.skipped_non_utf8))
}

/// Shared progress state of one `prepare`.
struct Progress {
    bar: indicatif::ProgressBar,
    files_done: AtomicUsize,
    files_total: usize,
}

impl Progress {
    fn file_done(&self, bytes: u64) {
        let n = self.files_done.fetch_add(1, Ordering::Relaxed) + 1;
        self.bar.inc(bytes);
        self.bar
            .set_message(format!("{n}/{} files", self.files_total));
    }
}

/// The ids of one document (EOT included) and its size in bytes.
type DocIds = (Vec<u32>, u64);

/// Tokenize `files` in order into `out` (little-endian u32, each document followed by `eot`).
/// Returns the split's stats and the number of non-UTF-8 files skipped.
fn tokenize_split(
    files: &[&CorpusFile],
    tok: &Tokenizer,
    out: &Path,
    progress: &Progress,
) -> Result<(SplitMeta, usize)> {
    let file = std::fs::File::create(out)
        .with_context(|| format!("cannot create token file {}", out.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut meta = SplitMeta::default();
    let mut skipped = 0usize;
    let eot = tok.eot();
    // Batches of about 64 MiB of text keep memory bounded while all cores stay busy.
    const BATCH_BYTES: u64 = 64 << 20;
    let mut start = 0;
    while start < files.len() {
        let mut end = start;
        let mut batch_bytes = 0u64;
        while end < files.len() && (end == start || batch_bytes + files[end].bytes <= BATCH_BYTES) {
            batch_bytes += files[end].bytes;
            end += 1;
        }
        let results: Vec<Result<Option<DocIds>>> = files[start..end]
            .par_iter()
            .map(|f| {
                let raw = std::fs::read(&f.path)
                    .with_context(|| format!("cannot read corpus file {}", f.path.display()))?;
                let n = raw.len() as u64;
                let r = match String::from_utf8(raw) {
                    Ok(text) => {
                        let mut ids = tok
                            .encode(&text)
                            .with_context(|| format!("cannot tokenize {}", f.path.display()))?;
                        ids.push(eot);
                        Some((ids, n))
                    }
                    Err(_) => {
                        tracing::warn!("skipping {}: not valid UTF-8", f.path.display());
                        None
                    }
                };
                progress.file_done(f.bytes);
                Ok(r)
            })
            .collect();
        let mut bytes = Vec::new();
        for r in results {
            match r? {
                None => skipped += 1,
                Some((ids, n)) => {
                    bytes.clear();
                    bytes.reserve(ids.len() * 4);
                    for id in &ids {
                        bytes.extend_from_slice(&id.to_le_bytes());
                    }
                    w.write_all(&bytes)
                        .with_context(|| format!("cannot write token file {}", out.display()))?;
                    meta.n_tokens += ids.len();
                    meta.n_bytes += n;
                    meta.n_files += 1;
                }
            }
        }
        start = end;
    }
    let file = w
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("cannot write token file {}", out.display()))?;
    file.sync_all()
        .with_context(|| format!("cannot flush token file {}", out.display()))?;
    Ok((meta, skipped))
}

/// Tokenize the corpus into the cache under `cache_root` (or reuse a complete cache with the
/// same key): see the module docs. Shows a progress bar on stderr when `progress` is true.
pub fn prepare(
    corpus: &Corpus,
    spec: &CorpusSpec,
    tok: &Tokenizer,
    cache_root: &Path,
    progress: bool,
) -> Result<TokenCache> {
    let key = cache_key(corpus, spec, tok)?;
    let dir = cache_root.join("tokens").join(format!("{key:016x}"));
    if let Some((train, val, skipped_non_utf8)) = try_reuse(&dir) {
        return Ok(TokenCache {
            dir,
            train,
            val,
            reused: true,
            skipped_non_utf8,
        });
    }
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create token cache directory {}", dir.display()))?;
    // A stale meta.json must not vouch for the files about to be replaced.
    let meta_path = dir.join("meta.json");
    match std::fs::remove_file(&meta_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot remove stale {}", meta_path.display()))
        }
    }

    let bar = if progress {
        let style = indicatif::ProgressStyle::with_template(PROGRESS_TEMPLATE)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        indicatif::ProgressBar::with_draw_target(
            Some(corpus.files.iter().map(|f| f.bytes).sum()),
            indicatif::ProgressDrawTarget::stderr(),
        )
        .with_style(style)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let progress = Progress {
        bar,
        files_done: AtomicUsize::new(0),
        files_total: corpus.files.len(),
    };

    let pid = std::process::id();
    let mut metas = Vec::new();
    let mut skipped_non_utf8 = 0;
    for split in [Split::Train, Split::Val] {
        let files: Vec<&CorpusFile> = corpus.files.iter().filter(|f| f.split == split).collect();
        let final_path = split_file(&dir, split);
        let name = final_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        let tmp = dir.join(format!(".{}.tmp-{pid}", name.unwrap_or_default()));
        let result = tokenize_split(&files, tok, &tmp, &progress).and_then(|(meta, skipped)| {
            std::fs::rename(&tmp, &final_path).with_context(|| {
                format!(
                    "cannot rename {} to {}",
                    tmp.display(),
                    final_path.display()
                )
            })?;
            Ok((meta, skipped))
        });
        match result {
            Ok((meta, skipped)) => {
                skipped_non_utf8 += skipped;
                metas.push(meta);
            }
            Err(e) => {
                std::fs::remove_file(&tmp).ok();
                progress.bar.abandon();
                return Err(e);
            }
        }
    }
    progress.bar.finish_and_clear();
    let val_meta = metas.pop().unwrap_or_default();
    let train_meta = metas.pop().unwrap_or_default();
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let meta = CacheMeta {
        version: CACHE_VERSION,
        train: train_meta.clone(),
        val: val_meta.clone(),
        root: spec.root.clone(),
        created,
        eot: tok.eot(),
        skipped_non_utf8,
    };
    let json =
        serde_json::to_string_pretty(&meta).context("cannot serialize the cache metadata")?;
    crate::util::write_atomic(&meta_path, json.as_bytes())?;
    if skipped_non_utf8 > 0 {
        tracing::warn!("{skipped_non_utf8} files were skipped because they are not valid UTF-8");
    }
    Ok(TokenCache {
        train: TokenSplit::open(&split_file(&dir, Split::Train), &train_meta)?,
        val: TokenSplit::open(&split_file(&dir, Split::Val), &val_meta)?,
        dir,
        reused: false,
        skipped_non_utf8,
    })
}

/// The texts of the files of `split`, in order, skipping files that cannot be read or are not
/// UTF-8, and stopping once `max_bytes` bytes have been yielded (the last text may overshoot).
pub fn texts(
    corpus: &Corpus,
    split: Split,
    max_bytes: u64,
) -> impl Iterator<Item = String> + Send + '_ {
    let mut files = corpus.files.iter().filter(move |f| f.split == split);
    let mut yielded = 0u64;
    std::iter::from_fn(move || {
        while yielded < max_bytes {
            let f = files.next()?;
            match std::fs::read(&f.path).map(String::from_utf8) {
                Ok(Ok(text)) => {
                    yielded += text.len() as u64;
                    return Some(text);
                }
                _ => tracing::debug!("skipping {} for tokenizer training", f.path.display()),
            }
        }
        None
    })
}

/// Fill `inputs` and `targets` (each `b * t` long) with `b` random windows of `split`: row `i`
/// is `tokens[s..s + t]` and `tokens[s + 1..s + t + 1]` for a start `s` drawn from `rng`.
pub fn sample_batch(
    split: &TokenSplit,
    rng: &mut Rng,
    b: usize,
    t: usize,
    inputs: &mut [u32],
    targets: &mut [u32],
) -> Result<()> {
    if t == 0 {
        bail!("the sequence length (--seq-len) must be at least 1");
    }
    let n = b
        .checked_mul(t)
        .with_context(|| format!("batch size {b} × sequence length {t} overflows"))?;
    if inputs.len() != n || targets.len() != n {
        bail!(
            "batch buffers hold {} inputs and {} targets, expected {b} × {t} = {n}",
            inputs.len(),
            targets.len()
        );
    }
    let toks = split.tokens();
    if toks.len() < t + 1 {
        bail!(
            "the split has only {} tokens, fewer than sequence length + 1 = {}: --seq-len must be \
             smaller (or use more data)",
            toks.len(),
            t + 1
        );
    }
    let starts = (toks.len() - t) as u64; // s in [0, len - t - 1]
    for (x, y) in inputs.chunks_exact_mut(t).zip(targets.chunks_exact_mut(t)) {
        let s = rng.below(starts) as usize;
        x.copy_from_slice(&toks[s..s + t]);
        y.copy_from_slice(&toks[s + 1..s + t + 1]);
    }
    Ok(())
}

/// `count` evaluation window starts spread evenly over `split` (window `i` starts at
/// `i * (n - t - 1) / max(count - 1, 1)`), deduplicated; empty if the split has fewer than
/// `t + 1` tokens.
pub fn eval_windows(split: &TokenSplit, t: usize, count: usize) -> Vec<usize> {
    let n = split.tokens().len();
    if t == 0 || count == 0 || n < t + 1 {
        return Vec::new();
    }
    let last = (n - t - 1) as u128;
    let denom = count.saturating_sub(1).max(1) as u128;
    let mut starts: Vec<usize> = (0..count as u128)
        .map(|i| (i * last / denom) as usize)
        .collect();
    starts.dedup();
    starts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "mnemo-data-test-{name}-{}-{}",
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

    fn rels(c: &Corpus) -> Vec<&str> {
        c.files.iter().map(|f| f.rel.as_str()).collect()
    }

    #[test]
    fn scan_filters_and_counts() {
        let root = temp_dir("scan");
        write(&root, "a.rs", b"fn main() {}\n");
        write(&root, "pkg/b.py", b"print('hi')\n");
        write(&root, "pkg/deep/c.md", b"# title\n");
        write(&root, "bin.rs", b"abc\0\x01\x02def");
        write(&root, "latin1.txt", b"caf\xe9 au lait\n");
        write(&root, "ignored/x.rs", b"fn ignored() {}\n");
        write(&root, ".gitignore", b"ignored/\n");
        write(&root, ".hidden/y.rs", b"fn hidden() {}\n");
        write(&root, "notes.xyz", b"not included\n");
        write(
            &root,
            "gen/big.txt",
            &vec![b'a'; (MAX_FILE_BYTES + 1) as usize],
        );
        write(&root, "vendor/z.rs", b"fn vendored() {}\n");
        #[cfg(unix)]
        std::os::unix::fs::symlink(root.join("a.rs"), root.join("link.rs")).unwrap();

        let mut spec = CorpusSpec::new(&root);
        spec.exclude = vec!["vendor/**".into()];
        let c = scan(&spec).unwrap();
        assert_eq!(rels(&c), ["a.rs", "pkg/b.py", "pkg/deep/c.md"]);
        assert_eq!(c.skipped_binary, 2);
        assert_eq!(c.skipped_too_large, 1);
        assert_eq!(c.skipped_unreadable, 0);
        assert_eq!(c.files[1].path, root.join("pkg/b.py"));
        assert_eq!(c.files[1].bytes, 12);
        assert_eq!(c.count(Split::Train) + c.count(Split::Val), 3);
        assert!(c.count(Split::Train) >= 1 && c.count(Split::Val) >= 1);

        #[cfg(unix)]
        {
            // A symlinked root is walked like the directory it names.
            let link = root.with_extension("link");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&root, &link).unwrap();
            let via = scan(&CorpusSpec {
                root: link.clone(),
                ..spec.clone()
            })
            .unwrap();
            assert_eq!(rels(&via), rels(&c));
            std::fs::remove_file(&link).ok();
        }

        spec.include = vec!["pkg/*.py".into()];
        let c = scan(&spec).unwrap();
        assert_eq!(rels(&c), ["pkg/b.py"]);
        assert_eq!(c.files[0].split, Split::Train); // a single file trains

        spec.include = vec!["[".into()];
        let err = scan(&spec).unwrap_err().to_string();
        assert!(err.contains("include glob"), "{err}");
        spec.include.clear();
        spec.val_fraction = 1.5;
        let err = scan(&spec).unwrap_err().to_string();
        assert!(err.contains("1.5"), "{err}");
        std::fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn split_is_deterministic_and_follows_the_hash() {
        let root = temp_dir("split");
        for i in 0..40 {
            write(
                &root,
                &format!("src/m{i}.rs"),
                format!("fn f{i}() {{}}\n").as_bytes(),
            );
        }
        let mut spec = CorpusSpec::new(&root);
        spec.val_fraction = 0.1;
        let a = scan(&spec).unwrap();
        let b = scan(&spec).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.files.len(), 40);
        let val = a.count(Split::Val);
        assert!((1..40).contains(&val), "val {val}");
        for f in &a.files {
            let h = fnv1a64(f.rel.as_bytes()) % 1_000_000;
            assert_eq!(f.split == Split::Val, h < 100_000, "{}", f.rel);
        }
        let mut sorted = rels(&a);
        sorted.sort();
        assert_eq!(sorted, rels(&a));

        // Nothing hashes into a tiny fraction: the smallest hash becomes Val.
        spec.val_fraction = 0.0;
        let c = scan(&spec).unwrap();
        assert_eq!(c.count(Split::Val), 1);
        let min = a
            .files
            .iter()
            .min_by_key(|f| fnv1a64(f.rel.as_bytes()))
            .unwrap();
        assert_eq!(
            c.files.iter().find(|f| f.split == Split::Val).unwrap().rel,
            min.rel
        );
        std::fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn scan_errors_name_the_path() {
        let root = temp_dir("errors");
        let missing = root.join("nope");
        let err = scan(&CorpusSpec::new(&missing)).unwrap_err().to_string();
        assert!(
            err.contains("does not exist") && err.contains(&missing.display().to_string()),
            "{err}"
        );

        let empty = root.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        write(&empty, "data.bin", b"\0\0\0");
        let err = scan(&CorpusSpec::new(&empty)).unwrap_err().to_string();
        assert!(
            err.contains("no text files") && err.contains(&empty.display().to_string()),
            "{err}"
        );

        let file = root.join("file.rs");
        std::fs::write(&file, "fn x() {}").unwrap();
        let err = scan(&CorpusSpec::new(&file)).unwrap_err().to_string();
        assert!(
            err.contains("not a directory") && err.contains(&file.display().to_string()),
            "{err}"
        );
        std::fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn prepare_tokenizes_once_and_reuses() {
        let root = temp_dir("prepare");
        let corpus_dir = root.join("corpus");
        let mut docs = Vec::new();
        for i in 0..12 {
            let text = format!("fn f{i}(x: u32) -> u32 {{\n    x * {i} // 🦀 é\n}}\n");
            write(&corpus_dir, &format!("f{i:02}.rs"), text.as_bytes());
            docs.push(text);
        }
        let mut spec = CorpusSpec::new(&corpus_dir);
        spec.val_fraction = 0.25;
        let corpus = scan(&spec).unwrap();
        let tok = Tokenizer::train(texts(&corpus, Split::Train, u64::MAX), 300).unwrap();
        let cache_root = root.join("cache");

        let first = prepare(&corpus, &spec, &tok, &cache_root, false).unwrap();
        assert!(!first.reused);
        assert!(first.dir.starts_with(cache_root.join("tokens")));
        assert!(first.dir.join("meta.json").is_file());
        let second = prepare(&corpus, &spec, &tok, &cache_root, false).unwrap();
        assert!(second.reused);
        assert_eq!(second.dir, first.dir);
        assert_eq!(first.train.tokens(), second.train.tokens());
        assert_eq!(first.val.tokens(), second.val.tokens());

        for (split, ts) in [(Split::Train, &second.train), (Split::Val, &second.val)] {
            let files: Vec<&CorpusFile> =
                corpus.files.iter().filter(|f| f.split == split).collect();
            assert_eq!(ts.n_files, files.len());
            assert_eq!(ts.n_tokens, ts.tokens().len());
            assert_eq!(ts.n_bytes, files.iter().map(|f| f.bytes).sum::<u64>());
            assert!(!ts.is_empty());
            // Every document ends with EOT and decodes back to its file.
            assert_eq!(ts.tokens().last(), Some(&tok.eot()));
            let parts: Vec<&[u32]> = ts.tokens().split(|&id| id == tok.eot()).collect();
            assert_eq!(parts.len(), files.len() + 1);
            for (ids, f) in parts.iter().zip(&files) {
                assert_eq!(
                    tok.decode(ids).unwrap(),
                    std::fs::read_to_string(&f.path).unwrap()
                );
            }
        }

        // A changed file gives a new cache.
        write(
            &corpus_dir,
            "f00.rs",
            b"fn changed() {}\n// longer than before\n",
        );
        let corpus2 = scan(&spec).unwrap();
        let third = prepare(&corpus2, &spec, &tok, &cache_root, false).unwrap();
        assert!(!third.reused);
        assert_ne!(third.dir, first.dir);

        // A truncated token file is detected and rebuilt.
        let train_file = third.dir.join("train.u32");
        drop(third);
        std::fs::write(&train_file, [0u8; 4]).unwrap();
        let fourth = prepare(&corpus2, &spec, &tok, &cache_root, false).unwrap();
        assert!(!fourth.reused);
        assert_eq!(fourth.train.tokens().last(), Some(&tok.eot()));
        std::fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn texts_stop_after_max_bytes() {
        let root = temp_dir("texts");
        for i in 0..5 {
            write(&root, &format!("t{i}.txt"), &[b'a' + i as u8; 10]);
        }
        let mut spec = CorpusSpec::new(&root);
        spec.val_fraction = 0.0;
        let corpus = scan(&spec).unwrap();
        let all: Vec<String> = texts(&corpus, Split::Train, u64::MAX).collect();
        assert_eq!(all.len(), 4);
        let some: Vec<String> = texts(&corpus, Split::Train, 15).collect();
        assert_eq!(some, all[..2]);
        assert_eq!(texts(&corpus, Split::Train, 0).count(), 0);
        assert_eq!(texts(&corpus, Split::Val, u64::MAX).count(), 1);
        std::fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn sample_batch_shifts_targets() {
        let split = TokenSplit::from_tokens((0..100).collect(), 400, 1);
        let mut rng = Rng::new(3);
        let (b, t) = (8, 16);
        let mut x = vec![0; b * t];
        let mut y = vec![0; b * t];
        sample_batch(&split, &mut rng, b, t, &mut x, &mut y).unwrap();
        for (xr, yr) in x.chunks(t).zip(y.chunks(t)) {
            let s = xr[0];
            assert!(s as usize + t < 100);
            for j in 0..t {
                assert_eq!(xr[j], s + j as u32);
                assert_eq!(yr[j], xr[j] + 1);
            }
        }
        // Same seed, same batch.
        let (mut x2, mut y2) = (vec![0; b * t], vec![0; b * t]);
        sample_batch(&split, &mut Rng::new(3), b, t, &mut x2, &mut y2).unwrap();
        assert_eq!((x, y), (x2, y2));

        // The full range is reachable, including the last window.
        let short = TokenSplit::from_tokens(vec![1, 2, 3], 3, 1);
        let (mut x, mut y) = (vec![0; 64 * 2], vec![0; 64 * 2]);
        sample_batch(&short, &mut rng, 64, 2, &mut x, &mut y).unwrap();
        assert!(x.chunks(2).all(|r| r == [1, 2]) && y.chunks(2).all(|r| r == [2, 3]));

        let (mut x, mut y) = (vec![0; 3], vec![0; 3]);
        let err = sample_batch(&short, &mut rng, 1, 3, &mut x, &mut y)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("only 3 tokens") && err.contains("--seq-len"),
            "{err}"
        );
        assert!(sample_batch(&split, &mut rng, 2, 3, &mut x, &mut y).is_err());
    }

    #[test]
    fn eval_windows_spread_evenly() {
        let split = TokenSplit::from_tokens(vec![0; 101], 0, 1);
        assert_eq!(eval_windows(&split, 10, 5), [0, 22, 45, 67, 90]);
        assert_eq!(eval_windows(&split, 10, 1), [0]);
        assert_eq!(eval_windows(&split, 100, 3), [0]);
        assert!(eval_windows(&split, 101, 3).is_empty());
        assert!(eval_windows(&split, 10, 0).is_empty());
        let w = eval_windows(&split, 98, 10);
        assert_eq!(w, [0, 1, 2]);
        let empty = TokenSplit::from_tokens(Vec::new(), 0, 0);
        assert!(empty.is_empty() && eval_windows(&empty, 1, 4).is_empty());
    }

    #[test]
    fn progress_template_parses() {
        assert!(indicatif::ProgressStyle::with_template(PROGRESS_TEMPLATE).is_ok());
    }

    #[test]
    fn cache_root_prefers_mnemo_cache() {
        // Only read the environment: changing it would race with other tests.
        let root = default_cache_root();
        if let Some(p) = std::env::var_os("MNEMO_CACHE").filter(|v| !v.is_empty()) {
            assert_eq!(root, PathBuf::from(p));
        } else {
            assert!(
                root.ends_with("mnemo") || root.ends_with(".mnemo-cache"),
                "{}",
                root.display()
            );
        }
    }
}
