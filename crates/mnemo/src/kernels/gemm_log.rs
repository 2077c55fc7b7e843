//! The GEMM log: every matrix product's shape (`m×k · k×n`, whether it may use the thread
//! pool, its precision) and wall time, recorded by [`super::matmul::gemm`] while
//! [`log_gemms`] is on (off by default: one relaxed atomic load a product). Read by
//! `bench train-step --profile` (`train/bench_gemm.rs`: the step's GEMM floor); re-exported
//! by `prof`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static GEMM_ON: AtomicBool = AtomicBool::new(false);
static GEMMS: Mutex<Vec<(GemmShape, f64, u64)>> = Mutex::new(Vec::new());

/// One matrix product's shape as the GEMM log keys it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct GemmShape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// The call may split across the thread pool (`false`: it runs inside a parallel loop,
    /// or is too small to split).
    pub parallel: bool,
    /// Operands rounded to bf16 (the bf16 kernel ran).
    pub bf16: bool,
}

/// Turn the GEMM log on or off (process-wide; independent of the spans).
pub fn log_gemms(on: bool) {
    GEMM_ON.store(on, Ordering::Relaxed);
}

/// A running product's record; its time is added to its shape's total when dropped.
#[must_use = "a GEMM record measures until it is dropped"]
pub struct GemmSpan {
    shape: GemmShape,
    t0: Option<Instant>,
}

/// Start recording one product of `shape` (records nothing unless [`log_gemms`] is on).
pub fn gemm(shape: GemmShape) -> GemmSpan {
    GemmSpan {
        shape,
        t0: GEMM_ON.load(Ordering::Relaxed).then(Instant::now),
    }
}

impl Drop for GemmSpan {
    fn drop(&mut self) {
        if let Some(t0) = self.t0 {
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            let mut t = GEMMS.lock().unwrap_or_else(|e| e.into_inner());
            match t.iter_mut().find(|(s, _, _)| *s == self.shape) {
                Some(e) => {
                    e.1 += ms;
                    e.2 += 1;
                }
                None => t.push((self.shape, ms, 1)),
            }
        }
    }
}

/// The GEMM log since the last call (shape, total milliseconds, calls); resets it.
pub fn take_gemms() -> Vec<(GemmShape, f64, u64)> {
    std::mem::take(&mut *GEMMS.lock().unwrap_or_else(|e| e.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_log_counts_shapes_only_when_on() {
        let shape = GemmShape {
            m: 7919,
            k: 3,
            n: 5,
            parallel: false,
            bf16: false,
        };
        let mine = |t: Vec<(GemmShape, f64, u64)>| {
            t.into_iter().filter(|e| e.0 == shape).collect::<Vec<_>>()
        };
        log_gemms(false);
        drop(gemm(shape));
        assert!(mine(take_gemms()).is_empty());
        log_gemms(true);
        drop(gemm(shape));
        drop(gemm(shape));
        log_gemms(false);
        let t = mine(take_gemms());
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].2, 2);
    }
}
