//! Mixed-precision GEMM: bfloat16 operands, f32 accumulation, f32 output.
//!
//! `C[m,n] = β·C + α·Σ_p bf16(A[i,p])·bf16(B[p,j])`, `β ∈ {0, 1}` (`accumulate`), with the same
//! arguments as [`matmul::gemm_f32`](super::matmul::gemm_f32): callers keep passing f32
//! [`MatRef`] views (any strides, transposes included) and the operands are rounded to bf16
//! (round to nearest, ties to even) while they are packed.
//!
//! Two paths, chosen at run time:
//! - AVX-512 BF16 (`vdpbf16ps`, [`has_avx512_bf16`]): A is packed into `MR`-row panels and B
//!   into `NR`-column panels, both with the depth in pairs (`u32` = two bf16 of consecutive
//!   `p`), so one `vdpbf16ps` adds two products per lane: `acc[i][j] += a[i,2q]·b[2q,j] +
//!   a[i,2q+1]·b[2q+1,j]` (an odd `k` is padded with a zero). A register-blocked `MR×NR`
//!   micro-kernel runs over `KC`-deep slices; rayon splits the output into `MC×NC` tiles.
//!   Each output element is summed in the same order whatever the thread count.
//! - Portable ([`gemm_reference`]): round both operands to bf16, then the f32 GEMM. The two
//!   differ only by the f32 summation order (and `vdpbf16ps` flushing subnormals to zero).
//!
//! The rounding is `bf16(x)`: the top 16 bits of `x + 0x7FFF + lsb` (RNE), NaN kept quiet,
//! subnormal inputs flushed to a signed zero — what `vcvtneps2bf16` does.

#[cfg(target_arch = "x86_64")]
mod avx512;
mod pack;
#[cfg(test)]
mod tests;

use super::matmul::{gemm_f32, MatRef};

/// Rows of the micro-kernel's output tile (one broadcast A pair each).
pub(crate) const MR: usize = 12;
/// Columns of the micro-kernel's output tile (two 16-lane vectors).
pub(crate) const NR: usize = 32;
/// Depth pairs per slice: a `KC_PAIRS × NR` B micro-panel (32 KiB, Zen 4's whole L1D; the
/// `vdpbf16ps` loop hides its L2 refills) is reused by the `MC / MR` A micro-panels of a
/// tile. 256 rather than 128 halves the loads and stores of `C` between slices (`k = 512`,
/// most of the `small` step, takes one slice): 1–3% faster on 2 Zen 4 threads
/// (`results/bf16-gemm/REPORT.md`).
const KC_PAIRS: usize = 256;
/// Output rows per parallel tile (a multiple of `MR`): the A block (`MC × 2·KC_PAIRS` bf16,
/// 96 KiB) stays in L2.
const MC: usize = 8 * MR;
/// Output columns per parallel tile (a multiple of `NR`).
const NC: usize = 8 * NR;

/// Whether this CPU executes AVX-512 BF16 (with AVX-512F/BW/VL), detected once.
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static F: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *F.get_or_init(|| {
            is_x86_feature_detected!("avx512bf16")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` rounded to the nearest bfloat16 (ties to even), as its 16 bits. Subnormals flush to a
/// signed zero and NaN stays a (quiet) NaN, as in `vcvtneps2bf16`.
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7f80_0000 == 0 {
        return ((b >> 16) & 0x8000) as u16;
    }
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `x` rounded to bfloat16 and widened back to f32.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

/// `C = β·C + α·bf16(A)·bf16(B)` (`β = 1` when `accumulate`), f32 accumulation: the fast
/// `vdpbf16ps` path when the CPU has it, else [`gemm_reference`]. `c` is row-major
/// `[a.rows, b.cols]` with row stride `c_rs`; `parallel` allows the rayon pool.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    c: &mut [f32],
    c_rs: usize,
    a: MatRef,
    b: MatRef,
    alpha: f32,
    accumulate: bool,
    parallel: bool,
) {
    if !check(c, c_rs, &a, &b, accumulate) {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: the feature was detected; `check` bounds-checked the three views.
        unsafe { fast(c, c_rs, a, b, alpha, accumulate, parallel) };
        return;
    }
    gemm_reference(c, c_rs, a, b, alpha, accumulate, parallel);
}

/// The portable path: both operands rounded to bf16 into contiguous copies, then the f32
/// GEMM. Also the reference the fast path is tested against.
#[allow(clippy::too_many_arguments)]
pub fn gemm_reference(
    c: &mut [f32],
    c_rs: usize,
    a: MatRef,
    b: MatRef,
    alpha: f32,
    accumulate: bool,
    parallel: bool,
) {
    if !check(c, c_rs, &a, &b, accumulate) {
        return;
    }
    let round = |v: &MatRef| -> Vec<f32> {
        let mut out = Vec::with_capacity(v.rows * v.cols);
        for i in 0..v.rows {
            out.extend((0..v.cols).map(|j| round_bf16(v.data[i * v.rs + j * v.cs])));
        }
        out
    };
    let (ar, br) = (round(&a), round(&b));
    gemm_f32(
        c,
        c_rs,
        MatRef::new(&ar, a.rows, a.cols),
        MatRef::new(&br, b.rows, b.cols),
        alpha,
        accumulate,
        parallel,
    );
}

/// Shape and bounds checks shared by both paths (`matmul`'s); `false` when there is nothing
/// to multiply (an empty output, or `k = 0`, where `C` was zeroed unless accumulating).
fn check(c: &mut [f32], c_rs: usize, a: &MatRef, b: &MatRef, accumulate: bool) -> bool {
    super::matmul::prepare(c, c_rs, a, b, accumulate, "bf16 gemm")
}

/// The `vdpbf16ps` path: pack both operands (rounding), then the micro-kernel over `MC×NC`
/// output tiles (in parallel when allowed and worth it), `KC_PAIRS`-deep slices inside each.
///
/// # Safety
/// The CPU must have AVX-512 BF16/F/BW/VL; the views must have passed [`check`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn fast(
    c: &mut [f32],
    c_rs: usize,
    a: MatRef,
    b: MatRef,
    alpha: f32,
    accumulate: bool,
    parallel: bool,
) {
    use rayon::prelude::*;
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let (tm, tn) = (m.div_ceil(MC), n.div_ceil(NC));
    // Split only with enough output tiles to share out evenly: with fewer than four per
    // thread, parallel packing and an uneven last round cost more than they save (measured on
    // 2 threads: 16×256×64 ran at 30 GFLOP/s split vs 95 alone, 256×256×234 at 164 vs 188).
    let threads = rayon::current_num_threads();
    let par = parallel && m * n * k >= 64 * 64 * 64 && threads > 1 && tm * tn >= 4 * threads;
    let kp = k.div_ceil(2);
    // The calling thread's packing buffers, taken out for the call (a nested call on this
    // thread, e.g. from a task it runs while waiting, allocates its own) and put back after.
    let (mut ap, mut bp) = BUFS.with(|c| c.take()).unwrap_or_default();
    pack::pack_a(&a, kp, par, &mut ap);
    pack::pack_b(&b, kp, par, &mut bp);
    let cp = super::SendPtr(c.as_mut_ptr());
    let tile = |t: usize| {
        let (i0, j0) = ((t / tn) * MC, (t % tn) * NC);
        let (i1, j1) = ((i0 + MC).min(m), (j0 + NC).min(n));
        let mut q0 = 0;
        while q0 < kp {
            let q1 = (q0 + KC_PAIRS).min(kp);
            let load = accumulate || q0 > 0;
            for j in (j0..j1).step_by(NR) {
                let bpanel = &bp[(j / NR) * kp * NR + q0 * NR..];
                for i in (i0..i1).step_by(MR) {
                    let apanel = &ap[(i / MR) * kp * MR + q0 * MR..];
                    // SAFETY: tiles cover disjoint output blocks, so no two tasks write the
                    // same element; `(i, j)` lies inside the checked output view.
                    unsafe {
                        avx512::tile(
                            q1 - q0,
                            apanel.as_ptr(),
                            bpanel.as_ptr(),
                            cp.get().add(i * c_rs + j),
                            c_rs,
                            (i1 - i).min(MR),
                            (j1 - j).min(NR),
                            alpha,
                            load,
                        )
                    };
                }
            }
            q0 = q1;
        }
    };
    if par {
        (0..tm * tn).into_par_iter().for_each(tile);
    } else {
        (0..tm * tn).for_each(tile);
    }
    BUFS.with(|c| c.set(Some((ap, bp))));
}

/// Packed A and B panels of the last call on this thread (see [`fast`]).
type Bufs = (Vec<u32>, Vec<u32>);
thread_local! {
    static BUFS: std::cell::Cell<Option<Bufs>> = const { std::cell::Cell::new(None) };
}
