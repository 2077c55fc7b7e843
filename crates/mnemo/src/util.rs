//! Small helpers shared across the crate: hashing, atomic file writes, human-readable sizes.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// FNV-1a, 64 bit: a stable hash (does not change with Rust versions), used for the train/val
/// split and for cache keys.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// Write `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename.
/// A crash leaves either the old file or the new one, never a partial file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all().ok();
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// `1234567` → `"1.23M"`.
pub fn human_count(n: f64) -> String {
    let a = n.abs();
    if a >= 1e9 {
        format!("{:.2}G", n / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if a >= 1e3 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

/// `Σ x²` in f64 over chunks in a fixed order: deterministic whatever the thread count. Each
/// chunk keeps eight running sums (lanes `i mod 8`), so the adds do not wait on each other.
pub fn det_sum_sq(x: &[f32]) -> f64 {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    let part = |c: &[f32]| {
        let mut acc = [0.0f64; 8];
        let mut w = c.chunks_exact(8);
        for v in &mut w {
            for (a, &v) in acc.iter_mut().zip(v) {
                *a += (v as f64) * (v as f64);
            }
        }
        let tail: f64 = w.remainder().iter().map(|&v| (v as f64) * (v as f64)).sum();
        acc.iter().sum::<f64>() + tail
    };
    if x.len() <= CHUNK {
        return part(x);
    }
    let parts: Vec<f64> = x.par_chunks(CHUNK).map(part).collect();
    parts.iter().sum()
}

/// `x ← s·x`, in parallel for long slices.
pub fn scale_in_place(x: &mut [f32], s: f32) {
    use rayon::prelude::*;
    x.par_chunks_mut(1 << 16)
        .for_each(|c| c.iter_mut().for_each(|v| *v *= s));
}

/// CPU time (user + system, all threads) this process has used, in seconds, from
/// `/proc/self/stat` (Linux; 10 ms resolution); `None` elsewhere. Benchmarks on a shared machine
/// report it beside wall-clock time, which other processes' load inflates.
pub fn process_cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}
