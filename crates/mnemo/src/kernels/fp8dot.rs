//! Matrix–vector and small-batch products straight from packed FP8 / FP4 weights (DeepSeek's
//! block-scaled formats, values in [`super::fp8`]): `y[i, r] (+)= Σ_j W[r, j]·x[i, j]` for
//! `n` f32 vectors `x: [n, cols]`, `y: [n, rows]`, reading 1 (FP8) or ½ (FP4) byte per weight
//! plus a scale per block instead of 4 bytes. BF16 weights (`QType::Bf16`, two bytes a value,
//! scales of 1) run the same way: DeepSeek-V4 stores `wo_a`, the compressors, the indexer's
//! `weights_proj` and the router in BF16, and a mapped checkpoint multiplies them as stored.
//!
//! Weights (a [`QMatrix`] of type `Fp8`/`Fp4`): `data` holds the codes row-major (FP8 one byte
//! per value; FP4 two per byte, even element in the low nibble), `d` the scales per row and
//! per `block` values along it (`[rows, ceil(cols/block)]`, f32 powers of two; an FP8
//! `128 × 128` block scale is repeated for each of its rows, so fused `[W1; W3]` stacks keep
//! their scales; or, `QMatrix::packed_lazy`, E8M0 exponent bytes converted by each product, so
//! a memory-mapped expert's scales are read only when it runs). `block` is a multiple of 16.
//! The codes may be a range of a shared buffer (`super::qbytes`).
//!
//! Activations stay f32: every weight is decoded to the exact f32 `w = value·scale` that
//! dequantise-then-f32 gives (`round(value·scale)`, one rounding, the same real product), and
//! multiplied with FMA. FP8 e4m3 decodes with integer ops: the byte's 7 magnitude bits shifted
//! to bit 20 are an f32 equal to `value·2⁻¹²⁰` (subnormals included), and one multiply by
//! `scale·2¹²⁰` gives `round(value·scale)` (blocks with `scale > 2⁷`, never seen in practice,
//! multiply twice: `(f·2¹²⁰)·scale`, the same value). FP4 e2m1 decodes by a 16-entry table of
//! `2·value` as int8 (`pshufb`), converted and multiplied by `scale/2`. An int8-activation path
//! (llama.cpp's way) is possible for FP4 only (e4m3 is not an 8-bit integer grid); this f32
//! path is exact in the weights and memory-bound at the sizes that matter (see
//! `docs/deepseek-v4.md` for the measurements).
//!
//! Order of the sums (the same on every path, so AVX-512, AVX2 and portable agree bit for
//! bit): 16 lanes, element `j` of a row goes to lane `j mod 16`, `acc[l] = fma(w_j, x_j,
//! acc[l])` in column order (a partial last chunk of 16 padded with zeros); then
//! `t8[l] = acc[l] + acc[l+8]`, `t4[l] = t8[l] + t8[l+4]`, `t2[l] = t4[l] + t4[l+2]`,
//! `y = t2[0] + t2[1]`. A vector's arithmetic does not depend on the other vectors, so
//! [`matmat`] equals [`matmat`] of one vector bit for bit.

use super::quant::{QMatrix, QType};
use super::SendPtr;
use rayon::prelude::*;

/// The e2m1 values doubled, as int8 by code (the FP4 decode table).
const E2M1X2: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// `2¹²⁰`: the factor between an e4m3 byte's magnitude bits at bit 20 (as f32) and its value.
const TWO_120: f32 = f32::from_bits((127 + 120) << 23);

/// Which row kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Generic,
    Avx2,
    Avx512,
}

/// The best kernel this CPU runs (detected once).
pub fn isa() -> Isa {
    if super::has_avx512f() && super::has_avx2_fma() {
        Isa::Avx512
    } else if super::has_avx2_fma() {
        Isa::Avx2
    } else {
        Isa::Generic
    }
}

/// A packed matrix's per-block multipliers for the decode: FP8 `c = scale·2¹²⁰` (or `NaN`
/// when `scale > 2⁷`, which takes the two-multiply path), FP4 `scale/2`.
fn multipliers(m: &QMatrix, d: &[f32]) -> Vec<f32> {
    match m.ty {
        QType::Fp8 => d
            .iter()
            .map(|&s| if s <= 128.0 { s * TWO_120 } else { f32::NAN })
            .collect(),
        QType::Bf16 => d.to_vec(),
        _ => d.iter().map(|&s| s * 0.5).collect(),
    }
}

/// Chunk `ch` (16 values) of row `r` decoded, portable: `round(value·scale)`.
#[inline(always)]
fn decode_chunk(m: &QMatrix, d: &[f32], r: usize, ch: usize, w: &mut [f32; 16]) {
    let nb = m.cols.div_ceil(m.block);
    let s = d[r * nb + ch * 16 / m.block];
    let c0 = ch * 16;
    let n = 16.min(m.cols - c0);
    w.fill(0.0);
    match m.ty {
        QType::Fp8 => {
            let row = &m.data[r * m.cols..(r + 1) * m.cols];
            for (o, &b) in w.iter_mut().zip(&row[c0..c0 + n]) {
                *o = super::fp8::e4m3_to_f32(b) * s;
            }
        }
        QType::Bf16 => {
            let row = &m.data[2 * r * m.cols..2 * (r + 1) * m.cols];
            for (o, b) in w.iter_mut().zip(row[2 * c0..2 * (c0 + n)].chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16) * s;
            }
        }
        _ => {
            let row = &m.data[r * m.cols / 2..(r + 1) * m.cols / 2];
            for (k, o) in w[..n].iter_mut().enumerate() {
                let b = row[(c0 + k) / 2];
                let code = if (c0 + k).is_multiple_of(2) {
                    b
                } else {
                    b >> 4
                };
                *o = super::fp8::e2m1_to_f32(code) * s;
            }
        }
    }
}

/// Row `r` of a packed FP8/FP4/BF16 matrix decoded into `out` (`cols` values): the exact
/// f32 values dequantisation gives (an embedding row read from a mapped checkpoint).
pub fn decode_row(m: &QMatrix, r: usize, out: &mut [f32]) {
    assert!(m.ty.is_packed_float() && r < m.rows && out.len() == m.cols);
    let d = m.scales_f32();
    let mut w = [0.0f32; 16];
    for (ch, o) in out.chunks_mut(16).enumerate() {
        decode_chunk(m, &d, r, ch, &mut w);
        o.copy_from_slice(&w[..o.len()]);
    }
}

/// The fixed 16-lane reduction of the module doc.
#[inline(always)]
fn hsum16(a: &[f32; 16]) -> f32 {
    let mut t8 = [0.0f32; 8];
    for l in 0..8 {
        t8[l] = a[l] + a[l + 8];
    }
    let t4: [f32; 4] = std::array::from_fn(|l| t8[l] + t8[l + 4]);
    let t2: [f32; 2] = std::array::from_fn(|l| t4[l] + t4[l + 2]);
    t2[0] + t2[1]
}

/// Rows `r0..r0 + nr` against the vectors `xs` (each `cols16` long, zero-padded), portable,
/// into `out[k·n + i]`.
fn rows_generic(m: &QMatrix, d: &[f32], r0: usize, nr: usize, xs: &[&[f32]], out: &mut [f32]) {
    let n = xs.len();
    let nch = m.cols.div_ceil(16);
    let mut w = [0.0f32; 16];
    let mut acc = vec![[0.0f32; 16]; n];
    for k in 0..nr {
        acc.iter_mut().for_each(|a| *a = [0.0; 16]);
        for ch in 0..nch {
            decode_chunk(m, d, r0 + k, ch, &mut w);
            for (a, x) in acc.iter_mut().zip(xs) {
                let xc = &x[ch * 16..ch * 16 + 16];
                for l in 0..16 {
                    a[l] = w[l].mul_add(xc[l], a[l]);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            out[k * n + i] = hsum16(a);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{E2M1X2, TWO_120};
    use crate::kernels::quant::{QMatrix, QType};
    use std::arch::x86_64::*;

    /// Row-chunk bytes: 16 FP8 bytes, 8 FP4 bytes or 32 BF16 bytes of chunk `ch` of row `r`,
    /// copied into a zero-padded buffer when the chunk is the partial last one.
    #[inline(always)]
    unsafe fn chunk_ptr(m: &QMatrix, r: usize, ch: usize, pad: &mut [u8; 32]) -> *const u8 {
        let (rb, cb) = match m.ty {
            QType::Fp8 => (m.cols, 16),
            QType::Bf16 => (2 * m.cols, 32),
            _ => (m.cols / 2, 8),
        };
        let start = r * rb + ch * cb;
        let end = (r + 1) * rb;
        if start + cb <= end {
            m.data.as_ptr().add(start)
        } else {
            *pad = [0; 32];
            pad[..end - start].copy_from_slice(&m.data[start..end]);
            pad.as_ptr()
        }
    }

    /// The f32 bits of `value·2⁻¹²⁰` from an e4m3 byte sign-extended to 32 bits: shifted left
    /// by 20, the 7 magnitude bits land at 20..27 and the sign (extended) at 27..32; keep bit
    /// 31 and bits 20..27.
    const E4M3_MASK: i32 = 0x87f0_0000u32 as i32;

    /// FP8: 8 bytes (low half of `b`) to the 8 f32 `value·2⁻¹²⁰`.
    #[inline(always)]
    unsafe fn e4m3_raw8(b: __m128i) -> __m256 {
        let v = _mm256_slli_epi32(_mm256_cvtepi8_epi32(b), 20);
        _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(E4M3_MASK)))
    }

    /// FP4: 8 bytes to 16 int8 `2·value` in element order.
    #[inline(always)]
    unsafe fn e2m1_x2_16(p: *const u8) -> __m128i {
        let b = _mm_loadl_epi64(p as *const __m128i);
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(b, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
        let idx = _mm_unpacklo_epi8(lo, hi);
        let lut = _mm_loadu_si128(E2M1X2.as_ptr() as *const __m128i);
        _mm_shuffle_epi8(lut, idx)
    }

    /// The two 8-lane halves of a decoded chunk: `round(value·scale)`.
    #[inline(always)]
    unsafe fn decode_avx2(m: &QMatrix, p: *const u8, c: f32, s: f32) -> (__m256, __m256) {
        if m.ty == QType::Fp8 {
            let b = _mm_loadu_si128(p as *const __m128i);
            let (f0, f1) = (e4m3_raw8(b), e4m3_raw8(_mm_srli_si128(b, 8)));
            if c.is_nan() {
                let (t, sv) = (_mm256_set1_ps(TWO_120), _mm256_set1_ps(s));
                (
                    _mm256_mul_ps(_mm256_mul_ps(f0, t), sv),
                    _mm256_mul_ps(_mm256_mul_ps(f1, t), sv),
                )
            } else {
                let cv = _mm256_set1_ps(c);
                (_mm256_mul_ps(f0, cv), _mm256_mul_ps(f1, cv))
            }
        } else if m.ty == QType::Bf16 {
            let lo = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            let hi = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(16) as *const __m128i));
            let cv = _mm256_set1_ps(c);
            let f = |v: __m256i| _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            (_mm256_mul_ps(f(lo), cv), _mm256_mul_ps(f(hi), cv))
        } else {
            let v = e2m1_x2_16(p);
            let cv = _mm256_set1_ps(c);
            let w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
            let w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
            (_mm256_mul_ps(w0, cv), _mm256_mul_ps(w1, cv))
        }
    }

    /// The reduction of the module doc on lanes `0..8` (`a0`) and `8..16` (`a1`).
    #[inline(always)]
    unsafe fn hsum(a0: __m256, a1: __m256) -> f32 {
        let t8 = _mm256_add_ps(a0, a1);
        let t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
        let t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
        _mm_cvtss_f32(_mm_add_ss(t2, _mm_movehdup_ps(t2)))
    }

    /// Rows against `N` vectors (AVX2: two 8-lane accumulators per vector).
    #[inline(always)]
    unsafe fn rows_avx2_n<const N: usize>(
        m: &QMatrix,
        mult: &[f32],
        d: &[f32],
        r0: usize,
        nr: usize,
        xs: &[&[f32]],
        out: &mut [f32],
        stride: usize,
    ) {
        let nb = m.cols.div_ceil(m.block);
        let nch = m.cols.div_ceil(16);
        let bpc = m.block / 16;
        let xp: [*const f32; N] = std::array::from_fn(|i| xs[i].as_ptr());
        let mut pad = [0u8; 32];
        for k in 0..nr {
            let r = r0 + k;
            let mut a0 = [_mm256_setzero_ps(); N];
            let mut a1 = [_mm256_setzero_ps(); N];
            for b in 0..nb {
                let bi = r * nb + b;
                let (c, s) = (mult[bi], d[bi]);
                for ch in b * bpc..((b + 1) * bpc).min(nch) {
                    let p = chunk_ptr(m, r, ch, &mut pad);
                    let (w0, w1) = decode_avx2(m, p, c, s);
                    for i in 0..N {
                        let xc = xp[i].add(ch * 16);
                        a0[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xc), a0[i]);
                        a1[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xc.add(8)), a1[i]);
                    }
                }
            }
            for i in 0..N {
                out[k * stride + i] = hsum(a0[i], a1[i]);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows_avx2(
        m: &QMatrix,
        mult: &[f32],
        d: &[f32],
        r0: usize,
        nr: usize,
        xs: &[&[f32]],
        out: &mut [f32],
    ) {
        // Groups of up to 4 vectors: 8 accumulators in registers.
        let n = xs.len();
        for g0 in (0..n).step_by(4) {
            let g = &xs[g0..n.min(g0 + 4)];
            let o = &mut out[g0..];
            match g.len() {
                1 => rows_avx2_n::<1>(m, mult, d, r0, nr, g, o, n),
                2 => rows_avx2_n::<2>(m, mult, d, r0, nr, g, o, n),
                3 => rows_avx2_n::<3>(m, mult, d, r0, nr, g, o, n),
                _ => rows_avx2_n::<4>(m, mult, d, r0, nr, g, o, n),
            }
        }
    }

    /// Rows against `N` vectors (AVX-512: one 16-lane accumulator per vector).
    #[inline(always)]
    unsafe fn rows_avx512_n<const N: usize>(
        m: &QMatrix,
        mult: &[f32],
        d: &[f32],
        r0: usize,
        nr: usize,
        xs: &[&[f32]],
        out: &mut [f32],
        stride: usize,
    ) {
        let nb = m.cols.div_ceil(m.block);
        let nch = m.cols.div_ceil(16);
        let bpc = m.block / 16;
        let xp: [*const f32; N] = std::array::from_fn(|i| xs[i].as_ptr());
        let mut pad = [0u8; 32];
        let fp8 = m.ty == QType::Fp8;
        let bf16 = m.ty == QType::Bf16;
        let lut = _mm_loadu_si128(E2M1X2.as_ptr() as *const __m128i);
        for k in 0..nr {
            let r = r0 + k;
            let mut acc = [_mm512_setzero_ps(); N];
            for b in 0..nb {
                let bi = r * nb + b;
                let c = mult[bi];
                for ch in b * bpc..((b + 1) * bpc).min(nch) {
                    let p = chunk_ptr(m, r, ch, &mut pad);
                    let w = if fp8 {
                        let v = _mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i));
                        let v = _mm512_slli_epi32(v, 20);
                        let f =
                            _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(E4M3_MASK)));
                        if c.is_nan() {
                            let t = _mm512_mul_ps(f, _mm512_set1_ps(TWO_120));
                            _mm512_mul_ps(t, _mm512_set1_ps(d[bi]))
                        } else {
                            _mm512_mul_ps(f, _mm512_set1_ps(c))
                        }
                    } else if bf16 {
                        let v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
                        let f = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
                        _mm512_mul_ps(f, _mm512_set1_ps(c))
                    } else {
                        let b = _mm_loadl_epi64(p as *const __m128i);
                        let mask = _mm_set1_epi8(0x0f);
                        let lo = _mm_and_si128(b, mask);
                        let hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
                        let v = _mm_shuffle_epi8(lut, _mm_unpacklo_epi8(lo, hi));
                        let f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
                        _mm512_mul_ps(f, _mm512_set1_ps(c))
                    };
                    for i in 0..N {
                        let x = _mm512_loadu_ps(xp[i].add(ch * 16));
                        acc[i] = _mm512_fmadd_ps(w, x, acc[i]);
                    }
                }
            }
            for i in 0..N {
                let lo = _mm512_castps512_ps256(acc[i]);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[i]), 1));
                out[k * stride + i] = hsum(lo, hi);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn rows_avx512(
        m: &QMatrix,
        mult: &[f32],
        d: &[f32],
        r0: usize,
        nr: usize,
        xs: &[&[f32]],
        out: &mut [f32],
    ) {
        let n = xs.len();
        for g0 in (0..n).step_by(8) {
            let g = &xs[g0..n.min(g0 + 8)];
            let o = &mut out[g0..];
            match g.len() {
                1 => rows_avx512_n::<1>(m, mult, d, r0, nr, g, o, n),
                2 => rows_avx512_n::<2>(m, mult, d, r0, nr, g, o, n),
                3 => rows_avx512_n::<3>(m, mult, d, r0, nr, g, o, n),
                4 => rows_avx512_n::<4>(m, mult, d, r0, nr, g, o, n),
                5 => rows_avx512_n::<5>(m, mult, d, r0, nr, g, o, n),
                6 => rows_avx512_n::<6>(m, mult, d, r0, nr, g, o, n),
                7 => rows_avx512_n::<7>(m, mult, d, r0, nr, g, o, n),
                _ => rows_avx512_n::<8>(m, mult, d, r0, nr, g, o, n),
            }
        }
    }
}

/// FP8 block scales `[ceil(rows/br), ceil(cols/bc)]` repeated for each row of their block:
/// `[rows, ceil(cols/bc)]`, the per-row layout of [`QMatrix::packed`].
pub fn expand_block_scales(
    scales: &[f32],
    rows: usize,
    cols: usize,
    block: [usize; 2],
) -> Vec<f32> {
    let [br, bc] = block;
    let sc = cols.div_ceil(bc);
    assert_eq!(scales.len(), rows.div_ceil(br) * sc, "FP8 block scales");
    (0..rows)
        .flat_map(|r| scales[(r / br) * sc..(r / br + 1) * sc].iter().copied())
        .collect()
}

/// `y[n, rows] (+)= X[n, cols] · Mᵀ` for a packed `Fp8`/`Fp4` matrix on the best kernel of
/// this CPU (what [`super::quant::matmat`] runs for these types).
pub fn matmat(m: &QMatrix, x: &[f32], n: usize, y: &mut [f32], accumulate: bool) {
    matmat_with(isa(), m, x, n, y, accumulate)
}

/// [`matmat`] on kernel `isa` (tests force each one the CPU runs).
pub fn matmat_with(isa: Isa, m: &QMatrix, x: &[f32], n: usize, y: &mut [f32], accumulate: bool) {
    assert!(
        matches!(m.ty, QType::Fp8 | QType::Fp4 | QType::Bf16),
        "a packed FP8/FP4/BF16 matrix"
    );
    assert_eq!(x.len(), n * m.cols);
    assert_eq!(y.len(), n * m.rows);
    assert!(m.block > 0 && m.block.is_multiple_of(16));
    assert_eq!(m.data.len(), m.rows * m.row_bytes());
    let d = m.scales_f32();
    assert_eq!(d.len(), m.rows * m.cols.div_ceil(m.block));
    if n == 0 || m.rows == 0 {
        return;
    }
    let cols = m.cols;
    let c16 = cols.div_ceil(16) * 16;
    // Vectors zero-padded to whole chunks of 16 (copied only when needed).
    let padded: Vec<f32>;
    let xs: Vec<&[f32]> = if c16 == cols {
        x.chunks_exact(cols.max(1)).collect()
    } else {
        let mut p = vec![0.0f32; n * c16];
        for (d, s) in p.chunks_exact_mut(c16).zip(x.chunks_exact(cols.max(1))) {
            d[..cols].copy_from_slice(s);
        }
        padded = p;
        padded.chunks_exact(c16).collect()
    };
    let mult = multipliers(m, &d);
    let nrows = m.rows;
    // Rows per task: enough work per task (~64K weights) for big matrices, one task for small.
    let rows_per = (65536 / cols.max(1)).clamp(4, 256);
    let yp = SendPtr(y.as_mut_ptr());
    let task = |c: usize| {
        let (r0, nr) = (c * rows_per, rows_per.min(nrows - c * rows_per));
        let mut buf = vec![0.0f32; nr * n];
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the features were detected at run time (tests force lower ones only);
            // every chunk read is inside the row (the last one copied to a padded buffer),
            // every vector has whole chunks.
            Isa::Avx512 => unsafe { x86::rows_avx512(m, &mult, &d, r0, nr, &xs, &mut buf) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe { x86::rows_avx2(m, &mult, &d, r0, nr, &xs, &mut buf) },
            _ => rows_generic(m, &d, r0, nr, &xs, &mut buf),
        }
        for i in 0..n {
            // SAFETY: task c alone writes rows r0..r0 + nr of every output vector, all inside
            // y (n · rows elements).
            let yi = unsafe { std::slice::from_raw_parts_mut(yp.get().add(i * nrows + r0), nr) };
            for (k, o) in yi.iter_mut().enumerate() {
                let v = buf[k * n + i];
                if accumulate {
                    *o += v;
                } else {
                    *o = v;
                }
            }
        }
    };
    let tasks = nrows.div_ceil(rows_per);
    if tasks == 1 {
        task(0);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

#[cfg(test)]
#[path = "fp8dot_tests.rs"]
mod tests;
