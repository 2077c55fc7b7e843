//! Reading and checking a candidate: size, binary content (a NUL byte or invalid UTF-8),
//! generated content (a very long line), secrets in the content; then its tokens.

use crate::lang::language_of;
use crate::render::human_bytes;
use crate::types::{ExcludeKind, Excluded, Mode, PackOptions, PackedFile};
use crate::walk::{io_detail, Candidate};
use mnemo::tokenizer::Tokenizer;
use regex::{Regex, RegexSet};
use std::sync::OnceLock;

/// How much of a file the binary and minified-line checks look at.
const SNIFF_BYTES: usize = 8192;

/// A line longer than this (in characters) in the first 8 KiB marks a file as generated.
const MAX_LINE_CHARS: usize = 1000;

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

/// A file read in full that passed the checks.
#[derive(Clone)]
pub(crate) struct TextFile {
    pub(crate) rel: String,
    pub(crate) bytes: u64,
    pub(crate) language: &'static str,
    pub(crate) content: String,
    pub(crate) tokens: Option<usize>,
}

impl TextFile {
    pub(crate) fn whole(self) -> PackedFile {
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

pub(crate) fn read_one(
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
pub(crate) fn long_line(text: &str) -> Option<usize> {
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
