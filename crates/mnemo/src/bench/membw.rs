//! Memory read bandwidth: the bound a memory-bound decode is held to.
//!
//! A buffer much larger than the last-level cache (default 1 GiB) is filled once, then read
//! `reps` times by the current rayon pool, each thread summing a contiguous share with eight
//! independent 64-bit accumulators (so the loads, not an add chain, set the pace). Bandwidth
//! = bytes / seconds of each pass; the median and the best pass are reported. This is what
//! decoding must do with its weights: stream every byte once per token, in order.

use rayon::prelude::*;
use std::time::Instant;

/// Read bandwidth over `reps` passes of a buffer of `bytes` bytes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemBw {
    pub bytes: usize,
    pub threads: usize,
    /// GB/s (1e9 bytes) of each pass.
    pub passes_gb_s: Vec<f64>,
    pub median_gb_s: f64,
    pub best_gb_s: f64,
}

/// Sum of the words of `a` (wrapping), eight lanes wide.
fn sum_words(a: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = a.chunks_exact(8);
    for c in &mut chunks {
        for (s, &v) in acc.iter_mut().zip(c) {
            *s = s.wrapping_add(v);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(0u64, |s, &v| s.wrapping_add(v));
    acc.iter().fold(tail, |s, &v| s.wrapping_add(v))
}

/// Measure: `bytes` rounded down to whole 64-byte lines, at least one line.
pub fn measure(bytes: usize, reps: usize) -> MemBw {
    let words = (bytes / 64).max(1) * 8;
    let threads = rayon::current_num_threads().max(1);
    let mut buf = vec![0u64; words];
    // Touch every page with distinct values (no zero-page sharing, no lazy allocation).
    buf.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
        for (j, v) in c.iter_mut().enumerate() {
            *v = (i as u64) << 32 | j as u64;
        }
    });
    let share = words.div_ceil(threads).div_ceil(8) * 8;
    let mut passes = Vec::with_capacity(reps);
    let mut check = 0u64;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let s = buf
            .par_chunks(share)
            .map(sum_words)
            .reduce(|| 0, u64::wrapping_add);
        let dt = t.elapsed().as_secs_f64();
        check = check.wrapping_add(s);
        passes.push(words as f64 * 8.0 / dt / 1e9);
    }
    std::hint::black_box(check);
    let mut sorted = passes.clone();
    sorted.sort_by(f64::total_cmp);
    MemBw {
        bytes: words * 8,
        threads,
        median_gb_s: sorted[sorted.len() / 2],
        best_gb_s: sorted[sorted.len() - 1],
        passes_gb_s: passes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_words_adds_every_word_including_the_tail() {
        let a: Vec<u64> = (1..=21).collect();
        assert_eq!(sum_words(&a), 21 * 22 / 2);
        assert_eq!(sum_words(&[u64::MAX, 2]), 1);
    }

    #[test]
    fn measure_reads_whole_lines_and_reports_each_pass() {
        let m = measure(100_000, 3);
        assert_eq!(m.bytes, 100_000 / 64 * 64);
        assert_eq!(m.passes_gb_s.len(), 3);
        assert!(m.passes_gb_s.iter().all(|&g| g > 0.0 && g.is_finite()));
        assert!(m.median_gb_s <= m.best_gb_s);
    }
}
