//! `mnemo cache list|clear`: what mnemo keeps under its cache directory — the prefix caches of
//! `mnemo ask` (`prefix/`) and the tokenized corpora of `train` and `eval` (`tokens/`); and the
//! prefix-cache store that `ask` and `serve --prefix-cache-dir` share: a size limit with
//! least-recently-used eviction (a hit refreshes the file's modification time).

use crate::args::human_size;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Default limit on the prefix caches' total size: 1 GiB.
pub const DEFAULT_PREFIX_LIMIT: u64 = 1 << 30;
/// Environment variable that sets the limit when no flag does.
pub const LIMIT_ENV: &str = "MNEMO_PREFIX_CACHE_LIMIT";

#[derive(Subcommand)]
pub enum CacheCmd {
    /// List the prefix caches (newest first: size, tokens, last use) and the tokenized corpora,
    /// with their totals and the prefix caches' size limit.
    List(CacheArgs),
    /// Delete cached files: prefix caches and tokenized corpora (both are rebuilt when needed).
    Clear(ClearArgs),
}

#[derive(Args)]
pub struct CacheArgs {
    /// The cache directory [default: $MNEMO_CACHE or ~/.cache/mnemo].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct ClearArgs {
    #[command(flatten)]
    dir: CacheArgs,
    /// Only the prefix caches of `mnemo ask`.
    #[arg(long, conflicts_with = "tokens")]
    prefix: bool,
    /// Only the tokenized corpora.
    #[arg(long)]
    tokens: bool,
}

/// The prefix caches' size limit: the flag, else `$MNEMO_PREFIX_CACHE_LIMIT`, else 1 GiB.
pub fn prefix_limit(flag: Option<u64>) -> Result<u64> {
    if let Some(b) = flag {
        return Ok(b);
    }
    match std::env::var(LIMIT_ENV) {
        Ok(v) if !v.trim().is_empty() => {
            crate::args::size(&v).map_err(|e| anyhow::anyhow!("${LIMIT_ENV}: {e}"))
        }
        _ => Ok(DEFAULT_PREFIX_LIMIT),
    }
}

/// A saved prefix cache.
pub struct Entry {
    pub path: PathBuf,
    pub bytes: u64,
    /// Last use (saved or hit).
    pub used: SystemTime,
}

/// The prefix caches in `dir` (`*.safetensors`), most recently used first.
pub fn entries(dir: &Path) -> Vec<Entry> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<Entry> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|p| {
            let m = p.metadata().ok()?;
            m.is_file().then(|| Entry {
                bytes: m.len(),
                used: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                path: p,
            })
        })
        .collect();
    v.sort_by(|a, b| b.used.cmp(&a.used).then(a.path.cmp(&b.path)));
    v
}

/// Mark `path` as just used (its modification time: the eviction order).
pub fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Delete the least recently used prefix caches in `dir` until their total is at most `limit`
/// bytes. `keep` (the entry just written) goes last; if it alone is over the limit, it is the
/// one deleted and the others stay. Returns the deleted files and their sizes.
pub fn evict(dir: &Path, limit: u64, keep: Option<&Path>) -> Vec<(PathBuf, u64)> {
    let mut all = entries(dir);
    // Oldest first, `keep` at the very end.
    all.reverse();
    let mut gone = Vec::new();
    if let Some(k) = keep {
        if let Some(i) = all.iter().position(|e| e.path == k) {
            let e = all.remove(i);
            if e.bytes > limit {
                if std::fs::remove_file(&e.path).is_ok() {
                    gone.push((e.path, e.bytes));
                }
            } else {
                all.push(e);
            }
        }
    }
    let mut total: u64 = all.iter().map(|e| e.bytes).sum();
    for e in all {
        if total <= limit {
            break;
        }
        if std::fs::remove_file(&e.path).is_ok() {
            total -= e.bytes;
            gone.push((e.path, e.bytes));
        }
    }
    gone
}

/// Tokens held by a prefix cache (the `tokens` tensor's length in the safetensors header).
fn cached_tokens(path: &Path) -> Option<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n).ok()?;
    let n = u64::from_le_bytes(n);
    if n > 1 << 24 {
        return None;
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&h).ok()?;
    v["tokens"]["shape"][0].as_u64()
}

/// `3 min ago`, `2 h ago`, `5 days ago`.
fn ago(t: SystemTime) -> String {
    let s = SystemTime::now()
        .duration_since(t)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match s {
        0..=59 => format!("{s} s ago"),
        60..=3599 => format!("{} min ago", s / 60),
        3600..=86399 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86400),
    }
}

/// Total size of the files under `p`.
fn du(p: &Path) -> u64 {
    let Ok(m) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if !m.is_dir() {
        return m.len();
    }
    std::fs::read_dir(p)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| du(&e.path())).sum())
        .unwrap_or(0)
}

/// The tokenized corpora in `dir`: its sub-directories named by a 16-digit hex key.
fn token_caches(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.len() == 16 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .collect();
    v.sort();
    v
}

pub fn run(c: CacheCmd) -> Result<()> {
    let root = |a: &CacheArgs| {
        a.cache_dir
            .clone()
            .unwrap_or_else(mnemo::data::default_cache_root)
    };
    match c {
        CacheCmd::List(a) => {
            use std::fmt::Write as _;
            let mut out = String::new();
            let root = root(&a);
            let limit = prefix_limit(None)?;
            let pdir = root.join("prefix");
            let es = entries(&pdir);
            let total: u64 = es.iter().map(|e| e.bytes).sum();
            writeln!(
                out,
                "prefix caches (mnemo ask) in {}: {} entries, {} of the {} limit (--cache-limit, ${LIMIT_ENV})",
                pdir.display(),
                es.len(),
                human_size(total),
                human_size(limit)
            )?;
            for e in &es {
                writeln!(
                    out,
                    "  {:>10}  {:>7} tokens  used {:<12}  {}",
                    human_size(e.bytes),
                    cached_tokens(&e.path).map_or("?".into(), |n| n.to_string()),
                    ago(e.used),
                    e.path.file_name().unwrap_or_default().to_string_lossy()
                )?;
            }
            let tdir = root.join("tokens");
            let ts = token_caches(&tdir);
            let sizes: Vec<u64> = ts.iter().map(|p| du(p)).collect();
            writeln!(
                out,
                "tokenized corpora (train, eval) in {}: {} entries, {}",
                tdir.display(),
                ts.len(),
                human_size(sizes.iter().sum())
            )?;
            for (p, b) in ts.iter().zip(&sizes) {
                writeln!(
                    out,
                    "  {:>10}  {}",
                    human_size(*b),
                    p.file_name().unwrap_or_default().to_string_lossy()
                )?;
            }
            crate::write_stdout(out.as_bytes())
        }
        CacheCmd::Clear(a) => {
            let root = root(&a.dir);
            let (prefix, tokens) = match (a.prefix, a.tokens) {
                (false, false) => (true, true),
                x => x,
            };
            let (mut n, mut bytes) = (0usize, 0u64);
            if prefix {
                let pdir = root.join("prefix");
                for e in entries(&pdir) {
                    std::fs::remove_file(&e.path)
                        .with_context(|| format!("cannot delete {}", e.path.display()))?;
                    n += 1;
                    bytes += e.bytes;
                }
                // Left-overs of interrupted writes (`.NAME.safetensors.tmp-PID`).
                if let Ok(rd) = std::fs::read_dir(&pdir) {
                    for e in rd.filter_map(|e| e.ok()) {
                        let name = e.file_name().to_string_lossy().into_owned();
                        if name.starts_with('.') && name.contains(".safetensors.tmp-") {
                            bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                            if std::fs::remove_file(e.path()).is_ok() {
                                n += 1;
                            }
                        }
                    }
                }
            }
            if tokens {
                for p in token_caches(&root.join("tokens")) {
                    let b = du(&p);
                    std::fs::remove_dir_all(&p)
                        .with_context(|| format!("cannot delete {}", p.display()))?;
                    n += 1;
                    bytes += b;
                }
            }
            crate::write_stdout(
                format!(
                    "deleted {n} cache entries ({}) under {}\n",
                    human_size(bytes),
                    root.display()
                )
                .as_bytes(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_drops_the_least_recently_used_first_and_keeps_the_new_entry() {
        let d = std::env::temp_dir().join(format!("mnemo-evict-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let t0 = SystemTime::now() - std::time::Duration::from_secs(100);
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let p = d.join(format!("{name}.safetensors"));
            std::fs::write(&p, vec![0u8; 100]).unwrap();
            let f = std::fs::File::options().append(true).open(&p).unwrap();
            f.set_modified(t0 + std::time::Duration::from_secs(10 * i as u64))
                .unwrap();
        }
        std::fs::write(d.join("notes.txt"), b"not a cache").unwrap();
        // `a` is the oldest, but a hit makes it the newest.
        touch(&d.join("a.safetensors"));
        let names = |v: &[Entry]| -> Vec<String> {
            v.iter()
                .map(|e| e.path.file_stem().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names(&entries(&d)), ["a", "c", "b"]);
        let gone = evict(&d, 250, None);
        assert_eq!(gone.len(), 1);
        assert!(gone[0].0.ends_with("b.safetensors"));
        assert_eq!(names(&entries(&d)), ["a", "c"]);
        // The entry just written is kept unless it alone is over the limit.
        let gone = evict(&d, 100, Some(&d.join("c.safetensors")));
        assert!(gone[0].0.ends_with("a.safetensors"));
        assert_eq!(names(&entries(&d)), ["c"]);
        evict(&d, 50, Some(&d.join("c.safetensors")));
        assert!(entries(&d).is_empty());
        assert!(d.join("notes.txt").is_file());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
