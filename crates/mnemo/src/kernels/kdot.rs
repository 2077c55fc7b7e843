//! Matrix–vector products straight from `Q4_K`, `Q5_K` and `Q6_K` super-blocks (the types
//! that make up most of llama.cpp's `Q4_K_M` and `Q5_K_M` files), for decoding, as llama.cpp's
//! `ggml_vec_dot_q{2,4,5,6}_K_q8_K` compute them (`Q5_K`'s and `Q2_K`'s integer sums:
//! [`super::kdot_q5k`], [`super::kdot_q2k`]). Block layouts: see
//! [`super::kquant`]; weights are `[rows, cols]` row-major runs of 256-value super-blocks
//! (`cols` a multiple of 256).
//!
//! The activation `x: [cols]` is first quantised to `Q8_K` per 256-value block: `dy = m/−127`
//! where `m` is the block's value of largest magnitude (with its sign, as ggml), `qy =
//! round(x/dy) ∈ [−127, 127]`, and the 16 sums of 16 consecutive `qy` (`bsums`).
//!
//! Per super-block `b` of a weight row, with integer sums only inside the block:
//! - `Q4_K` (`w = (d·s_j)·q − (dmin·m_j)`, sub-blocks `j` of 32 values):
//!   `Σ w·(dy·qy) = d·dy·Σ_j s_j·Σ_{l∈j} q_l·qy_l − dmin·dy·Σ_{k<16} m_{k/2}·bsums_k`.
//! - `Q6_K` (`w = (d·sc_k)·(q − 32)`, sub-blocks `k` of 16 values):
//!   `Σ w·(dy·qy) = d·dy·Σ_k sc_k·Σ_{l∈k} (q_l − 32)·qy_l`.
//!
//! The integer sums (`i32`, no overflow: at most 8·63·32·15·127 and 16·128·16·32·127 in
//! magnitude) are computed by a portable loop or with AVX2 (`maddubs` of the unsigned weight
//! codes with `qy`, then `madd` with the scales), chosen at run time; they are identical, and
//! the float part (`acc += (d·dy)·S`, `acc −= (dmin·dy)·M`, in block order) is the same scalar
//! code on every path, so the paths agree bit for bit. A VNNI CPU runs the AVX2 path.

use super::kquant::scale_min_k4;
use super::quant::{Isa, QMatrix, QType};
use super::SendPtr;
use rayon::prelude::*;

/// Values per super-block.
pub const QK_K: usize = 256;

/// A vector quantised to `Q8_K`: per 256-value block the scale `d`, 256 codes `qs`
/// (`x ≈ d·qs`) and the 16 sums of 16 consecutive codes `bsums`.
#[derive(Clone, Debug)]
pub(crate) struct Q8K {
    pub d: Vec<f32>,
    pub qs: Vec<i8>,
    pub bsums: Vec<i16>,
}

/// Quantise `x` (length a multiple of 256) to `Q8_K` as ggml's `quantize_row_q8_K_ref`
/// does: `d = m/−127` for the block's value `m` of largest magnitude, `q = round(x/d)` (ties
/// to even) capped at 127.
pub(crate) fn quantize_q8k(x: &[f32]) -> Q8K {
    assert!(x.len().is_multiple_of(QK_K));
    let nb = x.len() / QK_K;
    let mut v = Q8K {
        d: vec![0.0; nb],
        qs: vec![0; x.len()],
        bsums: vec![0; nb * 16],
    };
    for (b, xb) in x.chunks_exact(QK_K).enumerate() {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &t in xb {
            if t.abs() > amax {
                amax = t.abs();
                max = t;
            }
        }
        if amax == 0.0 {
            continue;
        }
        let iscale = -127.0 / max;
        let qs = &mut v.qs[b * QK_K..(b + 1) * QK_K];
        for (q, &t) in qs.iter_mut().zip(xb) {
            *q = (iscale * t).round_ties_even().min(127.0) as i8;
        }
        for (s, c) in v.bsums[b * 16..(b + 1) * 16]
            .iter_mut()
            .zip(qs.chunks_exact(16))
        {
            *s = c.iter().map(|&q| q as i16).sum();
        }
        v.d[b] = 1.0 / iscale;
    }
    v
}

/// `Q4_K`'s eight 6-bit scales and minimums of one super-block (`sc` = its 12 scale bytes).
#[inline(always)]
fn q4k_scales(sc: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut s = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..8 {
        (s[j], m[j]) = scale_min_k4(j, sc);
    }
    (s, m)
}

/// The minimum term `M = Σ_k m_{k/2}·bsums_k` of a `Q4_K` super-block.
#[inline(always)]
fn q4k_min_sum(m: &[u8; 8], bsums: &[i16]) -> i32 {
    (0..16).map(|k| m[k / 2] as i32 * bsums[k] as i32).sum()
}

/// `S = Σ_j s_j·Σ_{l∈j} q_l·qy_l` of a `Q4_K` super-block, portable. Each 64-value chunk
/// `c` is 32 bytes: low nibbles are elements `64c..64c+32`, high nibbles `64c+32..64c+64`.
fn q4k_sum_generic(qs: &[u8], s: &[u8; 8], qy: &[i8]) -> i32 {
    let mut tot = 0i32;
    for c in 0..4 {
        let bytes = &qs[32 * c..32 * c + 32];
        let (lo, hi) = (&qy[64 * c..64 * c + 32], &qy[64 * c + 32..64 * c + 64]);
        let (mut a, mut b) = (0i32, 0i32);
        for l in 0..32 {
            a += (bytes[l] & 15) as i32 * lo[l] as i32;
            b += (bytes[l] >> 4) as i32 * hi[l] as i32;
        }
        tot += s[2 * c] as i32 * a + s[2 * c + 1] as i32 * b;
    }
    tot
}

/// `S = Σ_k sc_k·Σ_{l∈k} (q_l − 32)·qy_l` of a `Q6_K` super-block (210 bytes), portable.
fn q6k_sum_generic(blk: &[u8], qy: &[i8]) -> i32 {
    let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
    let mut q = [0i32; QK_K];
    for h in 0..2 {
        let (l, hb) = (&ql[64 * h..64 * h + 64], &qh[32 * h..32 * h + 32]);
        let o = &mut q[128 * h..128 * h + 128];
        for i in 0..32 {
            o[i] = ((l[i] & 15) | ((hb[i] & 3) << 4)) as i32 - 32;
            o[i + 32] = ((l[i + 32] & 15) | (((hb[i] >> 2) & 3) << 4)) as i32 - 32;
            o[i + 64] = ((l[i] >> 4) | (((hb[i] >> 4) & 3) << 4)) as i32 - 32;
            o[i + 96] = ((l[i + 32] >> 4) | (((hb[i] >> 6) & 3) << 4)) as i32 - 32;
        }
    }
    (0..16)
        .map(|k| {
            let p: i32 = (0..16).map(|l| q[16 * k + l] * qy[16 * k + l] as i32).sum();
            sc[k] as i8 as i32 * p
        })
        .sum()
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::hsum_i32;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[inline(always)]
    pub(in crate::kernels) unsafe fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    /// [`super::q4k_sum_generic`] with AVX2: `maddubs` of the nibbles (0..15) with `qy`
    /// (i16 pairs, at most 2·15·127), `madd` with the sub-block's scale into i32 lanes.
    #[inline(always)]
    pub unsafe fn q4k_sum(qs: *const u8, s: &[u8; 8], qy: *const i8) -> i32 {
        let m4 = _mm256_set1_epi8(0x0f);
        let mut acc = _mm256_setzero_si256();
        for c in 0..4 {
            let raw = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
            let lo = _mm256_and_si256(raw, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            let y0 = _mm256_loadu_si256(qy.add(64 * c) as *const __m256i);
            let y1 = _mm256_loadu_si256(qy.add(64 * c + 32) as *const __m256i);
            let p0 = _mm256_madd_epi16(
                _mm256_maddubs_epi16(lo, y0),
                _mm256_set1_epi16(s[2 * c] as i16),
            );
            let p1 = _mm256_madd_epi16(
                _mm256_maddubs_epi16(hi, y1),
                _mm256_set1_epi16(s[2 * c + 1] as i16),
            );
            acc = _mm256_add_epi32(acc, _mm256_add_epi32(p0, p1));
        }
        hsum_i32(acc)
    }

    /// [`super::q6k_sum_generic`] with AVX2: the 6-bit codes `q` (0..63) rebuilt 32 at a
    /// time, `maddubs(q, qy) − maddubs(32, qy)` (i16 pairs within ±24130), `madd` with the two
    /// 16-value sub-blocks' scales into i32 lanes.
    #[inline(always)]
    pub unsafe fn q6k_sum(blk: *const u8, qy: *const i8) -> i32 {
        let (ql, qh, sc) = (blk, blk.add(128), blk.add(192) as *const i8);
        let m4 = _mm256_set1_epi8(0x0f);
        let m3 = _mm256_set1_epi8(0x30);
        let m32 = _mm256_set1_epi8(32);
        let mut acc = _mm256_setzero_si256();
        for h in 0..2 {
            let l0 = _mm256_loadu_si256(ql.add(64 * h) as *const __m256i);
            let l1 = _mm256_loadu_si256(ql.add(64 * h + 32) as *const __m256i);
            let hb = _mm256_loadu_si256(qh.add(32 * h) as *const __m256i);
            let q = [
                _mm256_or_si256(
                    _mm256_and_si256(l0, m4),
                    _mm256_and_si256(_mm256_slli_epi16(hb, 4), m3),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(l1, m4),
                    _mm256_and_si256(_mm256_slli_epi16(hb, 2), m3),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                    _mm256_and_si256(hb, m3),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                    _mm256_and_si256(_mm256_srli_epi16(hb, 2), m3),
                ),
            ];
            for (g, &qg) in q.iter().enumerate() {
                let y = _mm256_loadu_si256(qy.add(128 * h + 32 * g) as *const __m256i);
                let p = _mm256_sub_epi16(_mm256_maddubs_epi16(qg, y), _mm256_maddubs_epi16(m32, y));
                let k = 8 * h + 2 * g;
                let s = _mm256_set_m128i(
                    _mm_set1_epi16(*sc.add(k + 1) as i16),
                    _mm_set1_epi16(*sc.add(k) as i16),
                );
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, s));
            }
        }
        hsum_i32(acc)
    }
}

/// Row `r` of `m` against `x`: `Σ_b (d_b·dy_b)·S_b − (dmin_b·dy_b)·M_b`, in block order
/// (the integer sums with AVX2 when `AVX2`, the caller having checked the CPU).
#[inline(always)]
fn row_dot<const AVX2: bool>(m: &QMatrix, r: usize, x: &Q8K) -> f32 {
    let bs = m.ty.block_bytes();
    let nb = m.cols / QK_K;
    let row = &m.data[r * nb * bs..(r + 1) * nb * bs];
    let ds = &m.d[r * nb..(r + 1) * nb];
    let mut acc = 0.0f32;
    for (b, blk) in row.chunks_exact(bs).enumerate() {
        let qy = &x.qs[b * QK_K..(b + 1) * QK_K];
        let dy = x.d[b];
        match m.ty {
            QType::Q4_K => {
                let (s, mn) = q4k_scales(&blk[4..16]);
                let si = if AVX2 {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: AVX2 was detected by the caller; 128 + 256 bytes are in range.
                    unsafe {
                        x86::q4k_sum(blk[16..].as_ptr(), &s, qy.as_ptr())
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    unreachable!()
                } else {
                    q4k_sum_generic(&blk[16..144], &s, qy)
                };
                let mi = q4k_min_sum(&mn, &x.bsums[b * 16..(b + 1) * 16]);
                acc += (ds[b] * dy) * si as f32;
                acc -= (m.m[r * nb + b] * dy) * mi as f32;
            }
            QType::Q5_K => {
                let (s, mn) = q4k_scales(&blk[4..16]);
                let si = if AVX2 {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: AVX2 was detected by the caller; 176 + 256 bytes are in range.
                    unsafe {
                        super::kdot_q5k::x86::q5k_sum(blk.as_ptr(), &s, qy.as_ptr())
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    unreachable!()
                } else {
                    super::kdot_q5k::q5k_sum_generic(blk, &s, qy)
                };
                let mi = q4k_min_sum(&mn, &x.bsums[b * 16..(b + 1) * 16]);
                acc += (ds[b] * dy) * si as f32;
                acc -= (m.m[r * nb + b] * dy) * mi as f32;
            }
            QType::Q2_K => {
                use super::kdot_q2k as k2;
                let si = if AVX2 {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: AVX2 was detected by the caller; 84 + 256 bytes are in range.
                    unsafe {
                        k2::x86::q2k_sum(blk.as_ptr(), qy.as_ptr())
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    unreachable!()
                } else {
                    k2::q2k_sum_generic(blk, qy)
                };
                let mi = k2::q2k_min_sum(&blk[..16], &x.bsums[b * 16..(b + 1) * 16]);
                acc += (ds[b] * dy) * si as f32;
                acc -= (m.m[r * nb + b] * dy) * mi as f32;
            }
            QType::Q6_K => {
                let si = if AVX2 {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: AVX2 was detected by the caller; 210 + 256 bytes are in range.
                    unsafe {
                        x86::q6k_sum(blk.as_ptr(), qy.as_ptr())
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    unreachable!()
                } else {
                    q6k_sum_generic(blk, qy)
                };
                acc += (ds[b] * dy) * si as f32;
            }
            _ => unreachable!("not a k-quant type"),
        }
    }
    acc
}

/// Rows `r0..r0 + nr` of `m` against every vector of `xs` into `out[k·n + i]`.
#[inline(always)]
fn rows_impl<const AVX2: bool>(m: &QMatrix, r0: usize, nr: usize, xs: &[Q8K], out: &mut [f32]) {
    let n = xs.len();
    for k in 0..nr {
        for (i, x) in xs.iter().enumerate() {
            out[k * n + i] = row_dot::<AVX2>(m, r0 + k, x);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rows_avx2(m: &QMatrix, r0: usize, nr: usize, xs: &[Q8K], out: &mut [f32]) {
    rows_impl::<true>(m, r0, nr, xs, out)
}

fn rows(isa: Isa, m: &QMatrix, r0: usize, nr: usize, xs: &[Q8K], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Generic {
        // SAFETY: AVX2 was detected at run time (`Isa::Vnni` implies it too).
        return unsafe { rows_avx2(m, r0, nr, xs, out) };
    }
    let _ = isa;
    rows_impl::<false>(m, r0, nr, xs, out)
}

/// `y[n, rows] (+)= X[n, cols] · Mᵀ` for a `Q4_K`/`Q6_K` matrix (`x` quantised to `Q8_K`
/// first), parallel over chunks of weight rows; what [`super::quant::matmat`] runs for these
/// types. Each output is computed as for one vector, whatever `n`.
pub(crate) fn matmat(isa: Isa, m: &QMatrix, x: &[f32], n: usize, y: &mut [f32], accumulate: bool) {
    assert!(m.ty.is_k());
    assert_eq!(x.len(), n * m.cols);
    assert_eq!(y.len(), n * m.rows);
    assert!(m.cols.is_multiple_of(QK_K) && m.data.len() == m.rows * m.row_bytes());
    assert_eq!(m.d.len(), m.rows * (m.cols / QK_K));
    if n == 0 {
        return;
    }
    let xq: Vec<Q8K> = x.chunks_exact(m.cols).map(quantize_q8k).collect();
    let nrows = m.rows;
    const ROWS: usize = 16;
    let yp = SendPtr(y.as_mut_ptr());
    (0..nrows.div_ceil(ROWS)).into_par_iter().for_each(|c| {
        let (r0, nr) = (c * ROWS, ROWS.min(nrows - c * ROWS));
        let mut buf = vec![0.0f32; nr * n];
        rows(isa, m, r0, nr, &xq, &mut buf);
        for i in 0..n {
            // SAFETY: chunk c alone writes rows r0..r0 + nr of every output vector, all
            // inside y (n · rows elements).
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
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::kquant;
    use crate::rng::Rng;

    /// Random valid super-blocks: random bytes, the f16 scales (`d`, `dmin`) set to
    /// 2^-10..2^-3 with random sign and mantissa.
    fn random_kmatrix(r: &mut Rng, ty: QType, rows: usize, cols: usize) -> QMatrix {
        let bb = ty.block_bytes();
        let mut data: Vec<u8> = (0..rows * cols / QK_K * bb)
            .map(|_| (r.next_u64() & 0xff) as u8)
            .collect();
        let offs: &[usize] = match ty {
            QType::Q6_K => &[208],
            QType::Q2_K => &[80, 82],
            _ => &[0, 2],
        };
        for blk in data.chunks_exact_mut(bb) {
            for &o in offs {
                blk[o + 1] = ((blk[o + 1] as u16 & 0x83) | ((5 + (blk[o] as u16 & 7)) << 2)) as u8;
            }
        }
        QMatrix::new(ty, rows, cols, data)
    }

    fn ggml_id(ty: QType) -> u32 {
        ty.ggml_type()
    }

    /// Every vector: the generic (and, where the CPU has it, AVX2) product.
    fn isas() -> Vec<Isa> {
        if crate::kernels::quant::isa() == Isa::Generic {
            vec![Isa::Generic]
        } else {
            vec![Isa::Generic, Isa::Avx2]
        }
    }

    #[test]
    fn q8k_quantisation_is_ggmls() {
        let mut r = Rng::new(1);
        let mut x = vec![0.0f32; 512];
        r.fill_normal(&mut x, 2.0);
        x[300] = -9.0; // block 1's largest magnitude, negative
        let q = quantize_q8k(&x);
        assert_eq!(q.d[1], 1.0 / (-127.0 / -9.0));
        assert_eq!(q.qs[300], -127);
        for b in 0..2 {
            for k in 0..16 {
                let s: i32 = q.qs[b * 256 + 16 * k..b * 256 + 16 * k + 16]
                    .iter()
                    .map(|&v| v as i32)
                    .sum();
                assert_eq!(q.bsums[b * 16 + k] as i32, s);
            }
            for (j, &t) in x[b * 256..(b + 1) * 256].iter().enumerate() {
                assert!((q.d[b] * q.qs[b * 256 + j] as f32 - t).abs() <= 0.5001 * q.d[b].abs());
            }
        }
        // A zero block stays zero.
        let z = quantize_q8k(&[0.0; 256]);
        assert!(z.d[0] == 0.0 && z.qs.iter().all(|&v| v == 0));
    }

    /// The quantised product equals `Σ w·(dy·qy)` over the dequantised weights and the
    /// `Q8_K`-quantised activation, evaluated in f64, within `4e-6 · Σ|w·dy·qy|` (what remains
    /// is f32 rounding: of `d·dy`, of each block's contribution, of the running sum, and of the
    /// dequantised reference weights); the AVX2 and portable paths agree bit for bit.
    #[test]
    fn kquant_matvec_equals_reference_and_paths_agree() {
        let mut r = Rng::new(21);
        let mut worst = 0.0f64;
        for ty in [QType::Q2_K, QType::Q4_K, QType::Q5_K, QType::Q6_K] {
            for (rows, cols) in [(1usize, 256usize), (7, 512), (33, 768), (5, 2048)] {
                let m = random_kmatrix(&mut r, ty, rows, cols);
                let mut w = vec![0.0f32; rows * cols];
                kquant::format(ggml_id(ty))
                    .unwrap()
                    .dequantize(&m.data, &mut w);
                let mut x = vec![0.0f32; cols];
                r.fill_normal(&mut x, 1.0);
                let q = quantize_q8k(&x);
                let xd: Vec<f64> = (0..cols)
                    .map(|j| q.d[j / QK_K] as f64 * q.qs[j] as f64)
                    .collect();
                let mut outs = Vec::new();
                for isa_ in isas() {
                    let mut y = vec![0.25f32; rows];
                    matmat(isa_, &m, &x, 1, &mut y, true);
                    outs.push(y);
                }
                for i in 0..rows {
                    let wr = &w[i * cols..(i + 1) * cols];
                    let want: f64 = wr.iter().zip(&xd).map(|(&a, b)| a as f64 * b).sum();
                    let scale: f64 = wr.iter().zip(&xd).map(|(&a, b)| (a as f64 * b).abs()).sum();
                    let err = (outs[0][i] as f64 - 0.25 - want).abs() / scale;
                    worst = worst.max(err);
                    assert!(
                        err < 4e-6,
                        "{ty:?} {rows}x{cols} row {i}: {} vs {want} (rel {err:e})",
                        outs[0][i] - 0.25
                    );
                }
                for y in &outs[1..] {
                    assert_eq!(y, &outs[0], "{ty:?} {rows}x{cols}: AVX2 vs portable");
                }
            }
        }
        eprintln!("worst relative error {worst:e}");
    }

    /// Extreme codes (all scales and codes at their largest, activations at ±127) do not
    /// overflow, and several vectors at once equal one-vector products bit for bit.
    #[test]
    fn kquant_extremes_and_several_vectors() {
        let mut r = Rng::new(4);
        for ty in [QType::Q2_K, QType::Q4_K, QType::Q5_K, QType::Q6_K] {
            let (rows, cols) = (3, 512);
            let mut m = random_kmatrix(&mut r, ty, rows, cols);
            for blk in m.data.chunks_exact_mut(ty.block_bytes()) {
                if ty == QType::Q2_K {
                    blk[..80].fill(0xff);
                } else if ty != QType::Q6_K {
                    blk[4..].fill(0xff);
                } else {
                    blk[..192].fill(0); // q = 0 → −32
                    blk[192..208].fill(0x80); // scale −128
                }
            }
            let m = QMatrix::new(ty, rows, cols, m.data);
            let mut w = vec![0.0f32; rows * cols];
            kquant::format(ggml_id(ty))
                .unwrap()
                .dequantize(&m.data, &mut w);
            let x: Vec<f32> = (0..cols)
                .map(|j| if j == 0 { -1.0 } else { -0.999 })
                .collect();
            let q = quantize_q8k(&x);
            assert!(q.qs.iter().all(|&v| v == -127));
            for isa_ in isas() {
                let mut y = vec![0.0f32; rows];
                matmat(isa_, &m, &x, 1, &mut y, false);
                for i in 0..rows {
                    let t = |j: usize| w[i * cols + j] as f64 * (q.d[j / QK_K] as f64 * -127.0);
                    let want: f64 = (0..cols).map(t).sum();
                    let scale: f64 = (0..cols).map(|j| t(j).abs()).sum();
                    assert!(
                        (y[i] as f64 - want).abs() < 4e-6 * scale,
                        "{ty:?} {isa_:?}: {} vs {want}",
                        y[i]
                    );
                }
            }
            let n = 5;
            let mut xs = vec![0.0f32; n * cols];
            r.fill_normal(&mut xs, 1.0);
            for isa_ in isas() {
                let mut y = vec![0.0f32; n * rows];
                matmat(isa_, &m, &xs, n, &mut y, false);
                for i in 0..n {
                    let mut yi = vec![0.0f32; rows];
                    matmat(isa_, &m, &xs[i * cols..(i + 1) * cols], 1, &mut yi, false);
                    assert_eq!(&y[i * rows..(i + 1) * rows], &yi[..]);
                }
            }
        }
    }

    /// `matmat_fast` (f32 activations, each row dequantised once) handles the k-quants too.
    #[test]
    fn kquant_matmat_fast_equals_dequantised_product() {
        let mut r = Rng::new(9);
        for ty in [QType::Q2_K, QType::Q4_K, QType::Q5_K, QType::Q6_K] {
            let (rows, cols, n) = (19, 512, 3);
            let m = random_kmatrix(&mut r, ty, rows, cols);
            let mut w = vec![0.0f32; rows * cols];
            kquant::format(ggml_id(ty))
                .unwrap()
                .dequantize(&m.data, &mut w);
            let mut x = vec![0.0f32; n * cols];
            r.fill_normal(&mut x, 1.0);
            let mut y = vec![0.0f32; n * rows];
            crate::kernels::quant::matmat_fast(&m, &x, n, &mut y, false);
            for i in 0..n {
                for k in 0..rows {
                    let t = |j: usize| w[k * cols + j] as f64 * x[i * cols + j] as f64;
                    let want: f64 = (0..cols).map(t).sum();
                    let scale: f64 = (0..cols).map(|j| t(j).abs()).sum();
                    let got = y[i * rows + k] as f64;
                    assert!((got - want).abs() < 1e-5 * scale, "{ty:?}: {got} vs {want}");
                }
            }
        }
    }
}
