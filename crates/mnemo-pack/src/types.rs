//! What [`pack`](crate::pack) takes ([`PackOptions`]) and gives back ([`Pack`]: packed files,
//! exclusions with their reasons, the budget's cut, statistics).

use crate::render::human_bytes;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

/// Files larger than this are excluded (`too-large`) unless [`PackOptions::max_file_bytes`]
/// says otherwise.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 1 << 20;

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
    pub(crate) fn new(path: String, kind: ExcludeKind, detail: impl Into<String>) -> Excluded {
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
    /// Only its declaration lines (see [`signatures`](crate::signatures)).
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
    /// Exact tokens of [`context_text`](crate::context_text).
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

/// The result of [`pack`](crate::pack).
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
