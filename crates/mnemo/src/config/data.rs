//! [`CorpusSpec`] (`data` in a run config): which files of a corpus directory to read and how
//! to split them. Scanning and tokenizing the corpus is `crate::data`.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Globs used when [`CorpusSpec::include`] is empty: common source, config and text files.
pub const DEFAULT_INCLUDE: &[&str] = &[
    "*.rs", "*.py", "*.c", "*.h", "*.cc", "*.cpp", "*.hpp", "*.go", "*.java", "*.js", "*.ts",
    "*.tsx", "*.jsx", "*.rb", "*.sh", "*.toml", "*.md", "*.txt", "*.json", "*.yaml", "*.yml",
    "*.html", "*.css", "*.sql", "*.kt", "*.swift", "*.scala", "*.lua", "*.pl", "*.hs", "*.ml",
    "*.cs", "*.php", "*.zig",
];

fn default_val_fraction() -> f64 {
    0.05
}

/// What to read from a corpus directory and how to split it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CorpusSpec {
    /// The corpus directory.
    pub root: PathBuf,
    /// Globs of files to keep, matched against the path relative to `root` and against the
    /// file name (so `"*.rs"` matches at any depth); empty means [`DEFAULT_INCLUDE`].
    #[serde(default)]
    pub include: Vec<String>,
    /// Globs of files to drop, matched the same way.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Fraction of files (by path hash) held out for validation, in `[0, 1)`.
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
}

impl CorpusSpec {
    /// Every file under `root` matching [`DEFAULT_INCLUDE`], 5% held out.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        CorpusSpec {
            root: root.into(),
            include: Vec::new(),
            exclude: Vec::new(),
            val_fraction: default_val_fraction(),
        }
    }

    /// The include globs in effect ([`DEFAULT_INCLUDE`] when none are given).
    pub fn effective_include(&self) -> Vec<String> {
        if self.include.is_empty() {
            DEFAULT_INCLUDE.iter().map(|s| s.to_string()).collect()
        } else {
            self.include.clone()
        }
    }
}
