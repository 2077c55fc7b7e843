//! Multi-vector (prefill, draft verification) `Q4_K` and `Q6_K` products with one f32 lane
//! per vector: the arithmetic of [`super::kdot`]'s portable and one-vector paths, bit for bit,
//! with fewer instructions per output.
//!
//! Per weight row `r`, super-block `b` and vector `i` (`x_i ≈ dy_ib·qy_i`, [`super::kdot::Q8K`])
//! the integer sums `S_ib` (and, for `Q4_K`, the minimum sums `M_ib`) are exact `i32`s, and
//! the output is the float recurrence of the scalar code
//!
//! ```text
//! a_i ← a_i + (d_b·dy_ib)·S_ib          (Q4_K, Q6_K)
//! a_i ← a_i − (dmin_b·dy_ib)·M_ib       (Q4_K)          for b = 0, 1, …;   y_ri = a_i
//! ```
//!
//! Here a super-block is unpacked once ([`super::kdot::x86::Q4kBlock`] /
//! [`super::kdot::x86::Q6kBlock`]) for every vector of the product; for a group of up to 8
//! vectors, vector `i`'s integer partial sums (8 `i32` lanes each: `maddubs` + `madd` /
//! `vpdpwssd` with the sub-block scales) are reduced together by a tree of `hadd`s into one
//! vector whose lane `i` is `S_ib` (exact: integer sums in any order), and the recurrence runs
//! on 8 lanes at once with separate IEEE multiplies and adds (no FMA), as the scalar code does.
//! `dy` comes transposed (`dyt[(g·nb + b)·8 + i]`: group `g`, zero-padded), so a group's scales
//! are one load. Shapes: `m: [rows, cols]` (`cols` a multiple of 256), `xs: n` vectors,
//! `out[i·nr + k]` for rows `r0 + k` (vector-major, so that the caller's copy is contiguous).

#[cfg(target_arch = "x86_64")]
pub(super) use x86::rows;

use super::kdot::{Q8K, QK_K};

/// Vectors per lane group (8 f32 lanes).
pub(super) const LANES: usize = 8;

/// `dy` of every vector transposed per group of [`LANES`]: `[(g·nb + b)·8 + i]` is vector
/// `8g + i`'s scale of super-block `b` (0 past the last vector).
pub(super) fn transposed_scales(xs: &[Q8K], nb: usize) -> Vec<f32> {
    let ng = xs.len().div_ceil(LANES);
    let mut t = vec![0.0f32; ng * nb * LANES];
    for (v, x) in xs.iter().enumerate() {
        let (g, i) = (v / LANES, v % LANES);
        for b in 0..nb {
            t[(g * nb + b) * LANES + i] = x.d[b];
        }
    }
    t
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::kdot::x86::{scaled_add, Q4kBlock, Q6kBlock};
    use super::super::kquant::scale_min_k4;
    use super::super::quant::{QMatrix, QType};
    use super::{LANES, Q8K, QK_K};
    use std::arch::x86_64::*;

    /// Lane `i` = the sum of `a[i]`'s 8 lanes (`i < 8`; integer, so exact in any order).
    #[inline(always)]
    unsafe fn reduce8(a: &[__m256i; 8]) -> __m256i {
        let h01 = _mm256_hadd_epi32(a[0], a[1]);
        let h23 = _mm256_hadd_epi32(a[2], a[3]);
        let h45 = _mm256_hadd_epi32(a[4], a[5]);
        let h67 = _mm256_hadd_epi32(a[6], a[7]);
        // [a0..a3 low-half sums | a0..a3 high-half sums], then the same for a4..a7.
        let q0 = _mm256_hadd_epi32(h01, h23);
        let q1 = _mm256_hadd_epi32(h45, h67);
        let lo = _mm256_permute2x128_si256(q0, q1, 0x20);
        let hi = _mm256_permute2x128_si256(q0, q1, 0x31);
        _mm256_add_epi32(lo, hi)
    }

    /// An unpacked super-block: code vectors `q`, their i16 scales `s` and `extra` (`Q4_K`:
    /// the minimums per 16-value sum, `Q6_K`: the scales per 16-value sum).
    struct Unpacked {
        q: [__m256i; 8],
        s: [__m256i; 8],
        extra: __m256i,
    }

    /// `(S, M)` lanes of an unpacked super-block against `N ≤ 8` vectors (`ys[i]`: vector
    /// `i`'s 256 codes of this block, `bs[i]` its 16 sums; lanes `≥ N` are 0): for `Q4_K`
    /// (`Q4`) `S = Σ_j s_j·Σ q·qy`, `M = Σ_k m_{k/2}·bsums_k`; for `Q6_K` `S = Σ_k sc_k·Σ q·qy
    /// − 32·Σ_k sc_k·bsums_k`, `M = 0`.
    #[inline(always)]
    unsafe fn lanes<const N: usize, const VNNI: bool, const Q4: bool>(
        u: &Unpacked,
        ys: &[*const i8; N],
        bs: &[*const i16; N],
    ) -> (__m256i, __m256i) {
        let mut acc = [_mm256_setzero_si256(); 8];
        let mut mv = [_mm256_setzero_si256(); 8];
        for j in 0..8 {
            for i in 0..N {
                let y = _mm256_loadu_si256(ys[i].add(32 * j) as *const __m256i);
                acc[i] = scaled_add::<VNNI>(acc[i], u.q[j], y, u.s[j]);
            }
        }
        for i in 0..N {
            let t = _mm256_madd_epi16(u.extra, _mm256_loadu_si256(bs[i] as *const __m256i));
            if Q4 {
                mv[i] = t;
            } else {
                acc[i] = _mm256_sub_epi32(acc[i], _mm256_slli_epi32(t, 5));
            }
        }
        let m = if Q4 {
            reduce8(&mv)
        } else {
            _mm256_setzero_si256()
        };
        (reduce8(&acc), m)
    }

    /// Group `g`'s `N` vectors (`xs[8g..8g + N]`) against super-block `b` (unpacked as `u`)
    /// into the lanes of `acc` (`dyv`: their `dy_b`; `d`, `dmin`: the block's scales).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn group<const N: usize, const VNNI: bool, const Q4: bool>(
        u: &Unpacked,
        xs: &[Q8K],
        b: usize,
        d: f32,
        dmin: f32,
        dyv: __m256,
        acc: &mut __m256,
    ) {
        let ys: [*const i8; N] = std::array::from_fn(|i| xs[i].qs.as_ptr().add(b * QK_K));
        let bs: [*const i16; N] = std::array::from_fn(|i| xs[i].bsums.as_ptr().add(b * 16));
        let (s, m) = lanes::<N, VNNI, Q4>(u, &ys, &bs);
        let sc = _mm256_mul_ps(_mm256_set1_ps(d), dyv);
        *acc = _mm256_add_ps(*acc, _mm256_mul_ps(sc, _mm256_cvtepi32_ps(s)));
        if Q4 {
            let mc = _mm256_mul_ps(_mm256_set1_ps(dmin), dyv);
            *acc = _mm256_sub_ps(*acc, _mm256_mul_ps(mc, _mm256_cvtepi32_ps(m)));
        }
    }

    /// Rows `r0..r0 + nr` of a `Q4_K` / `Q6_K` matrix `m` against every vector of `xs` (`n ≥
    /// 1`) into `out[i·nr + k]`; `dyt`: [`super::transposed_scales`] of `xs`.
    #[inline(always)]
    unsafe fn rows_impl<const VNNI: bool, const Q4: bool>(
        m: &QMatrix,
        r0: usize,
        nr: usize,
        xs: &[Q8K],
        dyt: &[f32],
        out: &mut [f32],
    ) {
        let (n, bs) = (xs.len(), m.ty.block_bytes());
        let nb = m.cols / QK_K;
        // Up to 8 groups (64 vectors) of accumulators at a time.
        for s0 in (0..n).step_by(8 * LANES) {
            let sn = (8 * LANES).min(n - s0);
            let ng = sn.div_ceil(LANES);
            for k in 0..nr {
                let r = r0 + k;
                let row = m.data.as_ptr().add(r * nb * bs);
                let mut acc = [_mm256_setzero_ps(); 8];
                for b in 0..nb {
                    let blk = row.add(b * bs);
                    let d = m.d[r * nb + b];
                    let (u, dmin) = if Q4 {
                        let sc = std::slice::from_raw_parts(blk.add(4), 12);
                        let mut s = [0u8; 8];
                        let mut mn = [0u8; 8];
                        for j in 0..8 {
                            (s[j], mn[j]) = scale_min_k4(j, sc);
                        }
                        let t = Q4kBlock::new(blk.add(16), &s, &mn);
                        let u = Unpacked {
                            q: t.q,
                            s: t.s,
                            extra: t.mins,
                        };
                        (u, m.m[r * nb + b])
                    } else {
                        let t = Q6kBlock::new(blk);
                        (
                            Unpacked {
                                q: t.q,
                                s: t.s,
                                extra: t.sc,
                            },
                            0.0,
                        )
                    };
                    for (g, a) in acc[..ng].iter_mut().enumerate() {
                        let v0 = s0 + g * LANES;
                        let gx = &xs[v0..(v0 + LANES).min(n)];
                        let dyv = _mm256_loadu_ps(dyt.as_ptr().add(((v0 / LANES) * nb + b) * 8));
                        macro_rules! go {
                            ($n:literal) => {
                                group::<$n, VNNI, Q4>(&u, gx, b, d, dmin, dyv, a)
                            };
                        }
                        match gx.len() {
                            1 => go!(1),
                            2 => go!(2),
                            3 => go!(3),
                            4 => go!(4),
                            5 => go!(5),
                            6 => go!(6),
                            7 => go!(7),
                            _ => go!(8),
                        }
                    }
                }
                let mut lanes = [0.0f32; 8];
                for (g, a) in acc[..ng].iter().enumerate() {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
                    let v0 = s0 + g * LANES;
                    for (i, &v) in lanes[..LANES.min(n - v0)].iter().enumerate() {
                        out[(v0 + i) * nr + k] = v;
                    }
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_avx2(
        m: &QMatrix,
        r0: usize,
        nr: usize,
        xs: &[Q8K],
        dyt: &[f32],
        out: &mut [f32],
    ) {
        match m.ty {
            QType::Q4_K => rows_impl::<false, true>(m, r0, nr, xs, dyt, out),
            _ => rows_impl::<false, false>(m, r0, nr, xs, dyt, out),
        }
    }

    #[target_feature(enable = "avx2,fma,avx512vl,avx512vnni")]
    unsafe fn rows_vnni(
        m: &QMatrix,
        r0: usize,
        nr: usize,
        xs: &[Q8K],
        dyt: &[f32],
        out: &mut [f32],
    ) {
        match m.ty {
            QType::Q4_K => rows_impl::<true, true>(m, r0, nr, xs, dyt, out),
            _ => rows_impl::<true, false>(m, r0, nr, xs, dyt, out),
        }
    }

    /// Rows `r0..r0 + nr` of a `Q4_K`/`Q6_K` matrix against `xs` into `out[i·nr + k]` with
    /// AVX2 (`vnni`: AVX-512 VNNI's `vpdpwssd`).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA (and, for `vnni`, AVX-512 VL + VNNI).
    pub(in crate::kernels) unsafe fn rows(
        vnni: bool,
        m: &QMatrix,
        r0: usize,
        nr: usize,
        xs: &[Q8K],
        dyt: &[f32],
        out: &mut [f32],
    ) {
        let nb = m.cols / QK_K;
        assert!(matches!(m.ty, QType::Q4_K | QType::Q6_K) && !xs.is_empty());
        assert!(r0 + nr <= m.rows && out.len() >= nr * xs.len());
        assert!(xs.iter().all(|x| x.qs.len() == m.cols && x.d.len() == nb));
        assert_eq!(dyt.len(), xs.len().div_ceil(LANES) * nb * LANES);
        if vnni {
            rows_vnni(m, r0, nr, xs, dyt, out)
        } else {
            rows_avx2(m, r0, nr, xs, dyt, out)
        }
    }
}
