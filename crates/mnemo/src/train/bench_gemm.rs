//! The GEMM floor of a training step: every matrix product the step ran (from the GEMM log,
//! [`crate::prof::log_gemms`]), each shape timed again alone, hot in cache, with the same
//! kernel, precision and threading. The sum is what the step's products would cost if they
//! ran back to back at their isolated speed and everything else were free:
//!
//! ```text
//! floor = Σ_shapes calls · t_alone(shape) / (parallel ? 1 : threads)
//! ```
//!
//! A product that runs inside a parallel loop (`parallel = false`) shares the pool with its
//! siblings, so its alone time is divided by the thread count (perfect overlap: optimistic,
//! as a floor should be). The attention core's tile products (`kernels::attn_tile`) are not
//! GEMM calls and are not counted, so the floor is lower still than the step's true minimum.

use crate::kernels::matmul::{self, MatRef};
use crate::kernels::precision::Precision;
use crate::prof::GemmShape;
use serde::Serialize;
use std::time::Instant;

/// The step's products, per step, against their floor.
#[derive(Debug, Serialize)]
pub struct GemmFloor {
    /// Wall time of the step's GEMM calls as they ran (sum over calls; calls from parallel
    /// loops overlap, so this may exceed their share of the step).
    pub in_step_ms: f64,
    /// The floor (see the module docs).
    pub floor_ms: f64,
    /// GFLOP of the step's GEMM calls (`2·m·n·k` each).
    pub gflop: f64,
    pub calls: f64,
    /// The shapes that weigh most in the floor, heaviest first (at most 24).
    pub shapes: Vec<ShapeCost>,
}

/// One shape's share of a step.
#[derive(Debug, Serialize)]
pub struct ShapeCost {
    #[serde(flatten)]
    pub shape: GemmShape,
    pub calls: f64,
    pub in_step_ms: f64,
    pub alone_ms: f64,
    pub alone_gflops: f64,
}

/// Median milliseconds of one `[m,k]·[k,n]` product alone (row-major operands, hot), with
/// the kernel, precision and threading `shape` names.
pub fn time_alone(shape: GemmShape) -> f64 {
    let GemmShape { m, k, n, .. } = shape;
    let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0.0f32; m * n];
    let prec = if shape.bf16 {
        Precision::Bf16
    } else {
        Precision::F32
    };
    let run = |c: &mut [f32]| {
        let (av, bv) = (MatRef::new(&a, m, k), MatRef::new(&b, k, n));
        match prec {
            Precision::F32 => matmul::gemm_f32(c, n, av, bv, 1.0, false, shape.parallel),
            Precision::Bf16 => crate::kernels::bf16::gemm(c, n, av, bv, 1.0, false, shape.parallel),
        }
    };
    run(&mut c);
    // Repeat small products so that each timed batch lasts ≥ ~0.3 ms.
    let t = Instant::now();
    run(&mut c);
    let once = t.elapsed().as_secs_f64().max(1e-7);
    let reps = ((3e-4 / once).ceil() as usize).clamp(1, 10_000);
    let mut ms: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                run(&mut c);
            }
            t.elapsed().as_secs_f64() * 1e3 / reps as f64
        })
        .collect();
    ms.sort_by(|x, y| x.total_cmp(y));
    ms[ms.len() / 2]
}

/// The floor of `steps` steps' logged products (`log`: shape, total ms, calls over all of
/// them) on `threads` threads, per step.
pub fn floor(log: &[(GemmShape, f64, u64)], steps: usize, threads: usize) -> GemmFloor {
    let per = 1.0 / steps.max(1) as f64;
    let mut shapes: Vec<ShapeCost> = log
        .iter()
        .map(|&(shape, ms, calls)| {
            let alone = time_alone(shape);
            let flop = 2.0 * (shape.m * shape.n * shape.k) as f64;
            ShapeCost {
                shape,
                calls: calls as f64 * per,
                in_step_ms: ms * per,
                alone_ms: alone,
                alone_gflops: flop / (alone * 1e-3) / 1e9,
            }
        })
        .collect();
    let share = |s: &ShapeCost| {
        let div = if s.shape.parallel {
            1.0
        } else {
            threads.max(1) as f64
        };
        s.calls * s.alone_ms / div
    };
    let floor_ms = shapes.iter().map(share).sum();
    let gflop = shapes
        .iter()
        .map(|s| s.calls * 2.0 * (s.shape.m * s.shape.n * s.shape.k) as f64 / 1e9)
        .sum();
    let in_step_ms = shapes.iter().map(|s| s.in_step_ms).sum();
    let calls = shapes.iter().map(|s| s.calls).sum();
    shapes.sort_by(|a, b| share(b).total_cmp(&share(a)));
    shapes.truncate(24);
    GemmFloor {
        in_step_ms,
        floor_ms,
        gflop,
        calls,
        shapes,
    }
}

/// Add one step's log to `acc` (same shape → summed).
pub fn merge(acc: &mut Vec<(GemmShape, f64, u64)>, step: Vec<(GemmShape, f64, u64)>) {
    for (s, ms, n) in step {
        match acc.iter_mut().find(|e| e.0 == s) {
            Some(e) => {
                e.1 += ms;
                e.2 += n;
            }
            None => acc.push((s, ms, n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two serial calls of a shape count twice its alone time shared over the threads; the
    /// GFLOP is the calls' `2mnk`.
    #[test]
    fn floor_sums_calls_times_alone_time() {
        let s = GemmShape {
            m: 32,
            k: 48,
            n: 40,
            parallel: false,
            bf16: false,
        };
        let f = floor(&[(s, 10.0, 4)], 2, 2);
        assert_eq!(f.calls, 2.0);
        assert!((f.in_step_ms - 5.0).abs() < 1e-12);
        assert!((f.gflop - 2.0 * 2.0 * (32 * 48 * 40) as f64 / 1e9).abs() < 1e-15);
        let alone = f.shapes[0].alone_ms;
        assert!(alone > 0.0 && (f.floor_ms - 2.0 * alone / 2.0).abs() < 1e-12);
        let mut acc = vec![];
        merge(&mut acc, vec![(s, 1.0, 1)]);
        merge(&mut acc, vec![(s, 2.0, 3)]);
        assert_eq!(acc, vec![(s, 3.0, 4)]);
    }
}
