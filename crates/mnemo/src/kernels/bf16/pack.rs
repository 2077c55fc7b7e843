//! Packing f32 operands into bf16 depth-pair panels for the `vdpbf16ps` micro-kernel.
//!
//! A `[m, k]` is cut into panels of `MR` rows, B `[k, n]` into panels of `NR` columns; both are
//! "lines" (a row of A, a column of B) read at depth `p`. A panel of width `W` holds, for each
//! depth pair `q < kp = ⌈k/2⌉` and line `r < W`, the `u32`
//! `bf16(x[r, 2q]) | bf16(x[r, 2q+1]) << 16`, at `q·W + r`; lines past the matrix and the depth
//! past `k` are zeros. Panels are consecutive: panel `P` starts at `P·kp·W`.
//!
//! Contiguous lines or contiguous depth take the AVX-512 packers (`vcvtneps2bf16`); any other
//! stride the scalar one, which rounds identically ([`bf16_bits`]).

use super::{bf16_bits, MatRef, MR, NR};
use rayon::prelude::*;

/// A strided f32 operand seen as `lines × depth`.
#[derive(Clone, Copy)]
pub(crate) struct Lines<'a> {
    pub data: &'a [f32],
    pub lines: usize,
    pub depth: usize,
    /// Element step from one line to the next.
    pub ls: usize,
    /// Element step from one depth index to the next.
    pub ds: usize,
}

impl Lines<'_> {
    #[inline]
    fn at(&self, l: usize, p: usize) -> f32 {
        self.data[l * self.ls + p * self.ds]
    }
}

/// Pack A (lines = rows) into `MR`-row panels, in `out` (resized; every entry written).
pub(crate) fn pack_a(a: &MatRef, kp: usize, par: bool, out: &mut Vec<u32>) {
    let x = Lines {
        data: a.data,
        lines: a.rows,
        depth: a.cols,
        ls: a.rs,
        ds: a.cs,
    };
    pack::<MR>(x, kp, par, out)
}

/// Pack B (lines = columns) into `NR`-column panels, in `out` (resized; every entry written).
pub(crate) fn pack_b(b: &MatRef, kp: usize, par: bool, out: &mut Vec<u32>) {
    let x = Lines {
        data: b.data,
        lines: b.cols,
        depth: b.rows,
        ls: b.cs,
        ds: b.rs,
    };
    pack::<NR>(x, kp, par, out)
}

/// Lines packed together by the contiguous-lines packer: one sequential stretch of 256 f32
/// (1 KiB) of each depth row per pass, instead of `W` (48 or 128 bytes) per panel.
const GROUP_LINES: usize = 256;

/// Every panel of width `W` (see the module doc) into `out`, in parallel when `par`. The
/// buffer is reused from call to call (no fresh pages to fault in), so each panel writer
/// writes all its entries, padding included. With contiguous lines the panels go in groups
/// of `GROUP_LINES / W` (see [`GROUP_LINES`]); the bits are the same either way.
pub(crate) fn pack<const W: usize>(x: Lines, kp: usize, par: bool, out: &mut Vec<u32>) {
    let panels = x.lines.div_ceil(W);
    out.resize(panels * kp * W, 0);
    let group = if x.ls == 1 && x.ds != 1 {
        // At least four groups per thread when parallel, so that the threads share evenly.
        let share = if par {
            panels.div_ceil(4 * rayon::current_num_threads())
        } else {
            panels
        };
        (GROUP_LINES / W).min(share).max(1)
    } else {
        1
    };
    let one = |(gi, dst): (usize, &mut [u32])| {
        panels_into::<W>(&x, gi * group * W, dst.len() / (kp * W), kp, dst)
    };
    if par {
        out.par_chunks_mut(group * kp * W).enumerate().for_each(one);
    } else {
        out.chunks_mut(group * kp * W).enumerate().for_each(one);
    }
}

/// `np` consecutive panels (lines `l0..l0 + np·W`) into `dst` (`np·kp·W` entries, all
/// written).
fn panels_into<const W: usize>(x: &Lines, l0: usize, np: usize, kp: usize, dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx512_bf16() && (x.ls == 1 || x.ds == 1) {
        // SAFETY: the feature was detected; the view was bounds-checked by the caller, and
        // `l0 < x.lines` (one chunk per group of panels that holds at least one line).
        unsafe {
            if x.ls == 1 {
                super::avx512::pack_lines_contiguous::<W>(x, l0, np, kp, dst);
            } else {
                for (pi, d) in dst.chunks_mut(kp * W).enumerate() {
                    super::avx512::pack_depth_contiguous::<W>(x, l0 + pi * W, kp, d);
                }
            }
        }
        return;
    }
    for (pi, d) in dst.chunks_mut(kp * W).enumerate() {
        panel_scalar::<W>(x, l0 + pi * W, kp, d);
    }
}

/// The scalar packer (any strides): the reference the vector packers are tested against.
pub(crate) fn panel_scalar<const W: usize>(x: &Lines, l0: usize, kp: usize, dst: &mut [u32]) {
    let nl = W.min(x.lines - l0);
    for q in 0..kp {
        let (p0, p1) = (2 * q, 2 * q + 1);
        for r in 0..nl {
            let lo = bf16_bits(x.at(l0 + r, p0)) as u32;
            let hi = if p1 < x.depth {
                bf16_bits(x.at(l0 + r, p1)) as u32
            } else {
                0
            };
            dst[q * W + r] = lo | (hi << 16);
        }
        dst[q * W + nl..(q + 1) * W].fill(0);
    }
}
