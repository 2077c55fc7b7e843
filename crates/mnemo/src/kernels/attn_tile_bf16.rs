//! The attention core's block products in bf16: bf16 operands, f32 accumulation and output
//! (the `bf16` precision mode's counterpart of [`attn_tile`](super::attn_tile)).
//!
//! ```text
//! C[i, j] = β·C[i, j] + α·acc[i, j]        β ∈ {0, 1} (accumulate), i < m, j < n
//! acc[i, j] = step(a[i, kp−1], b[kp−1, j], … step(a[i, 0], b[0, j], 0))
//! step(a, b, x) = ftz(fma(a.lo, b.lo, ftz(fma(a.hi, b.hi, x))))      (one vdpbf16ps lane)
//! a: [m, kp] depth pairs, pair (i, q) at a.data[i·a.rs + q·a.cs]
//! b: [kp, n] depth pairs, pair (q, j) at b.data[q·b.rs + j]
//! ```
//!
//! A *pair* is a `u32` holding two bf16 of consecutive depth indices: `lo = x[2q]` in the low
//! 16 bits, `hi = x[2q + 1]` in the high 16 bits (an odd depth is padded with a zero). One
//! AVX-512 BF16 `vdpbf16ps` adds both products of a pair to each of 16 f32 lanes; measured on
//! AMD Zen 4 (and as Intel's pseudocode states) it adds the `hi` product first, then the `lo`
//! one, each exactly (a bf16 × bf16 product fits in f32) with one rounding, and flushes
//! subnormal results to zero. `step` above is that, so the portable path (the same chain with
//! `f32::mul_add` and an explicit flush) gives the same bits: tested against each other.
//!
//! The AVX-512 BF16 tile is 6 rows × 64 columns (24 accumulators), as the f32 tile. The
//! operand layouts the attention core packs (see [`attn_pack_bf16`](super::attn_pack_bf16)):
//! `a` pairs along a row (Q, dO, P, dS: `cs = 1`) or down a column (Pᵀ, dSᵀ: `rs = 1`), `b`
//! pairs down its rows (Kᵀ, Vᵀ over the head dimension; V, K, Q, dO over positions).

use super::bf16::has_avx512_bf16;

/// Rows of the register tile.
const MR: usize = 6;

/// The instruction set a product runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 BF16 `vdpbf16ps`.
    Avx512Bf16,
    /// The `step` chain with `f32::mul_add` (FMA instructions when the CPU has AVX2/FMA).
    Portable,
}

/// The best path this CPU executes.
pub fn best_isa() -> Isa {
    if has_avx512_bf16() {
        Isa::Avx512Bf16
    } else {
        Isa::Portable
    }
}

/// The left operand: `rows × pairs`, pair `(i, q)` at `data[i·rs + q·cs]`.
#[derive(Clone, Copy)]
pub struct PairsA<'a> {
    pub data: &'a [u32],
    pub rows: usize,
    pub pairs: usize,
    pub rs: usize,
    pub cs: usize,
}

/// The right operand: `pairs × cols`, pair `(q, j)` at `data[q·rs + j]`.
#[derive(Clone, Copy)]
pub struct PairsB<'a> {
    pub data: &'a [u32],
    pub pairs: usize,
    pub cols: usize,
    pub rs: usize,
}

/// The low (even depth) bf16 of a pair as f32.
#[inline(always)]
pub fn lo(w: u32) -> f32 {
    f32::from_bits(w << 16)
}

/// The high (odd depth) bf16 of a pair as f32.
#[inline(always)]
pub fn hi(w: u32) -> f32 {
    f32::from_bits(w & 0xffff_0000)
}

/// A subnormal flushed to a zero of its sign.
#[inline(always)]
fn ftz(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// One `vdpbf16ps` lane: `x + a.hi·b.hi`, rounded and flushed, then `+ a.lo·b.lo` likewise.
#[inline(always)]
pub fn step(a: u32, b: u32, x: f32) -> f32 {
    ftz(lo(a).mul_add(lo(b), ftz(hi(a).mul_add(hi(b), x))))
}

/// `C = β·C + α·A·B` (module docs) on `isa` (an `isa` the CPU lacks falls back to the
/// portable path).
///
/// # Safety
/// `c` must be valid for reads and writes at `i·c_rs + j` for `i < a.rows`, `j < b.cols`, and
/// no other thread may access those elements during the call.
pub unsafe fn gemm_tile(
    isa: Isa,
    c: *mut f32,
    c_rs: usize,
    a: PairsA,
    b: PairsB,
    alpha: f32,
    accumulate: bool,
) {
    let (m, kp, n) = (a.rows, a.pairs, b.cols);
    assert_eq!(b.pairs, kp, "bf16 gemm_tile: inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    if kp > 0 {
        assert!(
            (m - 1) * a.rs + (kp - 1) * a.cs < a.data.len(),
            "bf16 gemm_tile: lhs view out of bounds"
        );
        assert!(
            (kp - 1) * b.rs + n <= b.data.len(),
            "bf16 gemm_tile: rhs view out of bounds"
        );
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Bf16 && has_avx512_bf16() {
        return x86::avx512(c, c_rs, &a, &b, alpha, accumulate);
    }
    let _ = isa;
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        return portable_fma(c, c_rs, &a, &b, alpha, accumulate);
    }
    portable(c, c_rs, &a, &b, alpha, accumulate)
}

/// [`portable`] compiled with FMA instructions for `mul_add` (same bits, far fewer cycles).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn portable_fma(c: *mut f32, c_rs: usize, a: &PairsA, b: &PairsB, alpha: f32, acc: bool) {
    portable(c, c_rs, a, b, alpha, acc)
}

/// The portable path: the `step` chains in depth order.
#[inline(always)]
unsafe fn portable(c: *mut f32, c_rs: usize, a: &PairsA, b: &PairsB, alpha: f32, acc_c: bool) {
    let (m, kp, n) = (a.rows, a.pairs, b.cols);
    let mut acc = vec![0.0f32; n];
    for i in 0..m {
        acc.fill(0.0);
        for q in 0..kp {
            let av = a.data[i * a.rs + q * a.cs];
            let brow = &b.data[q * b.rs..q * b.rs + n];
            for (x, &bv) in acc.iter_mut().zip(brow) {
                *x = step(av, bv, *x);
            }
        }
        for (j, &x) in acc.iter().enumerate() {
            let dst = c.add(i * c_rs + j);
            let v = alpha * x;
            *dst = if acc_c { *dst + v } else { v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{PairsA, PairsB, MR};
    use std::arch::x86_64::*;

    /// Raw operands of one tile: `a` at its first row, `b` at its first column, `c` likewise.
    #[derive(Clone, Copy)]
    struct Tile {
        a: *const u32,
        a_rs: usize,
        a_cs: usize,
        b: *const u32,
        b_rs: usize,
        kp: usize,
        c: *mut f32,
        c_rs: usize,
        alpha: f32,
        accumulate: bool,
    }

    /// Tiles of up to [`MR`] rows × 64 columns, each on the `tile::<R, NV>` of its shape.
    pub(super) unsafe fn avx512(
        c: *mut f32,
        c_rs: usize,
        a: &PairsA,
        b: &PairsB,
        alpha: f32,
        accumulate: bool,
    ) {
        let (m, n) = (a.rows, b.cols);
        for i0 in (0..m).step_by(MR) {
            for j0 in (0..n).step_by(64) {
                let t = Tile {
                    a: a.data.as_ptr().wrapping_add(i0 * a.rs),
                    a_rs: a.rs,
                    a_cs: a.cs,
                    b: b.data.as_ptr().wrapping_add(j0),
                    b_rs: b.rs,
                    kp: a.pairs,
                    c: c.add(i0 * c_rs + j0),
                    c_rs,
                    alpha,
                    accumulate,
                };
                let (r, w) = ((m - i0).min(MR), (n - j0).min(64));
                macro_rules! rows {
                    ($nv:literal) => {
                        match r {
                            1 => tile::<1, $nv>(t, w),
                            2 => tile::<2, $nv>(t, w),
                            3 => tile::<3, $nv>(t, w),
                            4 => tile::<4, $nv>(t, w),
                            5 => tile::<5, $nv>(t, w),
                            _ => tile::<MR, $nv>(t, w),
                        }
                    };
                }
                match w.div_ceil(16) {
                    1 => rows!(1),
                    2 => rows!(2),
                    3 => rows!(3),
                    _ => rows!(4),
                }
            }
        }
    }

    /// One `R × 16·NV` tile (the last vector masked to `w` columns).
    #[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
    unsafe fn tile<const R: usize, const NV: usize>(t: Tile, w: usize) {
        let mask: [__mmask16; NV] = std::array::from_fn(|v| {
            let lanes = w.saturating_sub(16 * v).min(16);
            ((1u32 << lanes) - 1) as __mmask16
        });
        let mut acc = [[_mm512_setzero_ps(); NV]; R];
        for q in 0..t.kp {
            let brow = t.b.wrapping_add(q * t.b_rs);
            let mut bv = [_mm512_setzero_si512(); NV];
            for v in 0..NV {
                bv[v] = _mm512_maskz_loadu_epi32(mask[v], brow.wrapping_add(16 * v) as *const i32);
            }
            let ap = t.a.wrapping_add(q * t.a_cs);
            for (i, row) in acc.iter_mut().enumerate() {
                let av: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*ap.add(i * t.a_rs) as i32));
                for v in 0..NV {
                    row[v] = _mm512_dpbf16_ps(
                        row[v],
                        av,
                        std::mem::transmute::<__m512i, __m512bh>(bv[v]),
                    );
                }
            }
        }
        let al = _mm512_set1_ps(t.alpha);
        for (i, row) in acc.iter().enumerate() {
            for v in 0..NV {
                let dst = t.c.wrapping_add(i * t.c_rs + 16 * v);
                let mut val = _mm512_mul_ps(al, row[v]);
                if t.accumulate {
                    val = _mm512_add_ps(_mm512_maskz_loadu_ps(mask[v], dst), val);
                }
                _mm512_mask_storeu_ps(dst, mask[v], val);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::bf16::bf16_bits;
    use crate::rng::Rng;

    fn pairs(n: usize, seed: u64) -> Vec<u32> {
        let mut x = vec![0.0f32; 2 * n];
        Rng::new(seed).fill_normal(&mut x, 1.0);
        x.chunks(2)
            .map(|p| bf16_bits(p[0]) as u32 | (bf16_bits(p[1]) as u32) << 16)
            .collect()
    }

    /// `step` is what `vdpbf16ps` does: `hi` product first, one rounding each, subnormal
    /// results flushed (values that tell the orders and the flush apart), on both paths.
    #[test]
    fn step_matches_the_instruction_on_order_revealing_values() {
        let w = |l: f32, h: f32| bf16_bits(l) as u32 | (bf16_bits(h) as u32) << 16;
        let (one, t, s) = (w(1.0, 1.0), 2f32.powi(-30), 2f32.powi(-70));
        // [a pairs], [b pairs], expected. The first pair sets the accumulator to 1; then
        // hi first: 1 + 2^-30 rounds to 1, − 1 gives 0 (lo first would give 2^-30), and the
        // other way round. 2^-70 · 2^-70 is subnormal: flushed to +0.
        let cases = [
            ([w(1.0, 0.0), w(-1.0, t)], [one, one], 0.0),
            ([w(1.0, 0.0), w(t, -1.0)], [one, one], t),
            ([w(s, 0.0), 0], [w(s, 0.0), 0], 0.0),
        ];
        for (ad, bd, want) in cases {
            let a = PairsA {
                data: &ad,
                rows: 1,
                pairs: 2,
                rs: 2,
                cs: 1,
            };
            let b = PairsB {
                data: &bd,
                pairs: 2,
                cols: 1,
                rs: 1,
            };
            assert_eq!(
                step(ad[1], bd[1], step(ad[0], bd[0], 0.0)).to_bits(),
                want.to_bits()
            );
            for isa in [Isa::Portable, Isa::Avx512Bf16] {
                let mut c = [f32::NAN];
                unsafe { gemm_tile(isa, c.as_mut_ptr(), 1, a, b, 1.0, false) };
                assert_eq!(c[0].to_bits(), want.to_bits(), "{isa:?}");
            }
        }
    }

    /// The AVX-512 BF16 and portable paths give the same bits (row- and column-pair `a`,
    /// row-strided `b`, tails in every dimension, with and without accumulation), and both
    /// are the exact products of the bf16 values to f32 accuracy.
    #[test]
    fn paths_agree_bitwise() {
        for &(m, kp, n) in &[
            (1, 1, 1),
            (6, 32, 64),
            (7, 13, 70),
            (64, 32, 64),
            (13, 5, 17),
        ] {
            for &colpairs in &[false, true] {
                for &accumulate in &[false, true] {
                    let ad = pairs(m * kp + 3, 1);
                    let a = if colpairs {
                        PairsA {
                            data: &ad,
                            rows: m,
                            pairs: kp,
                            rs: 1,
                            cs: m,
                        }
                    } else {
                        PairsA {
                            data: &ad,
                            rows: m,
                            pairs: kp,
                            rs: kp,
                            cs: 1,
                        }
                    };
                    let b_rs = n + 5;
                    let bd = pairs(kp * b_rs, 2);
                    let b = PairsB {
                        data: &bd,
                        pairs: kp,
                        cols: n,
                        rs: b_rs,
                    };
                    let c_rs = n + 2;
                    let mut c0 = vec![0.0f32; m * c_rs];
                    Rng::new(3).fill_normal(&mut c0, 1.0);
                    let mut want = c0.clone();
                    unsafe {
                        gemm_tile(
                            Isa::Portable,
                            want.as_mut_ptr(),
                            c_rs,
                            a,
                            b,
                            0.7,
                            accumulate,
                        )
                    };
                    for i in 0..m {
                        for j in 0..n {
                            let mut e = 0.0f64;
                            for q in 0..kp {
                                let (x, y) = (ad[i * a.rs + q * a.cs], bd[q * b_rs + j]);
                                e += lo(x) as f64 * lo(y) as f64 + hi(x) as f64 * hi(y) as f64;
                            }
                            let e = 0.7 * e
                                + if accumulate {
                                    c0[i * c_rs + j] as f64
                                } else {
                                    0.0
                                };
                            let got = want[i * c_rs + j] as f64;
                            assert!(
                                (got - e).abs() < 1e-5 * (1.0 + e.abs()) * kp as f64,
                                "{got} vs {e}"
                            );
                        }
                    }
                    if !has_avx512_bf16() {
                        continue;
                    }
                    let mut c = c0.clone();
                    unsafe {
                        gemm_tile(Isa::Avx512Bf16, c.as_mut_ptr(), c_rs, a, b, 0.7, accumulate)
                    };
                    for (x, y) in c.iter().zip(&want) {
                        assert_eq!(
                            x.to_bits(),
                            y.to_bits(),
                            "m={m} kp={kp} n={n} col={colpairs} acc={accumulate}"
                        );
                    }
                }
            }
        }
    }
}
