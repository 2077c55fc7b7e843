//! Matrix–vector products straight from `Q5_0`, `Q5_1` and `IQ4_NL` blocks (32 values each:
//! the types llama.cpp's k-quant mixes fall back to for rows that are not a multiple of 256),
//! for decoding, as ggml's `ggml_vec_dot_{q5_0_q8_0, q5_1_q8_1, iq4_nl_q8_0}` compute them.
//! Byte layouts: see [`super::kquant`].
//!
//! The activation `x: [cols]` is quantised per 32-value block to `x ≈ dx·qx`, `qx ∈ [−127,
//! 127]` ([`super::quant`]'s `Q8_0`/`Q8_1` quantiser; `sx = dx·Σ qx`). Per block `b` of a
//! weight row, with the block's codes as unsigned bytes `u` and an offset `o`:
//! - `Q5_0` (`w = d·(q − 16)`, `q ∈ 0..32`): `u = q`, `o = 16`;
//! - `Q5_1` (`w = d·q + m`): `u = q`, `o = 0`, plus `m·sx`;
//! - `IQ4_NL` (`w = d·L[q]`, `L` its 16 levels in −127..113): `u = L[q] + 128`, `o = 128`;
//!
//! `Σ w·(dx·qx) = (d·dx)·S (+ m·sx)` with the integer `S = Σ u·qx − o·Σ qx = Σ (u − o)·qx`
//! (at most 32·128·127 in magnitude). `S` is computed by a portable loop, with AVX2
//! (`maddubs`; for `IQ4_NL` of `|L|` with `qx` carrying `L`'s sign, since `u·qx` pairs could
//! overflow i16) or with AVX-512 VNNI (`vpdpbusd` of `u` with `qx` on 256-bit lanes), chosen at
//! run time; all three give the same `S`, and the float part is the same scalar code on every
//! path, so the paths agree bit for bit.

use super::kquant::IQ4_NL_LEVELS;
use super::quant::{quantize_q8, Isa, Q8Vec, QMatrix, QType};
use super::SendPtr;
use rayon::prelude::*;

/// The unsigned codes `u` and offset `o` of a block (`blk`: its bytes).
#[inline(always)]
fn codes(ty: QType, blk: &[u8]) -> ([u8; 32], i32) {
    let mut u = [0u8; 32];
    match ty {
        QType::Q5_0 | QType::Q5_1 => {
            let at = if ty == QType::Q5_0 { 2 } else { 4 };
            let qh = u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]]);
            let qs = &blk[at + 4..at + 20];
            for j in 0..16 {
                u[j] = (qs[j] & 15) | ((((qh >> j) & 1) as u8) << 4);
                u[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            }
            (u, if ty == QType::Q5_0 { 16 } else { 0 })
        }
        QType::IQ4_NL => {
            for j in 0..16 {
                u[j] = (IQ4_NL_LEVELS[(blk[2 + j] & 15) as usize] as i32 + 128) as u8;
                u[j + 16] = (IQ4_NL_LEVELS[(blk[2 + j] >> 4) as usize] as i32 + 128) as u8;
            }
            (u, 128)
        }
        _ => unreachable!("not a qdot32 type"),
    }
}

/// `S` of one block, portable (`qsum = Σ qx` of the block).
#[inline(always)]
fn block_sum_generic(ty: QType, blk: &[u8], qx: &[i8], qsum: i32) -> i32 {
    let (u, o) = codes(ty, blk);
    let p: i32 = u.iter().zip(qx).map(|(&a, &b)| a as i32 * b as i32).sum();
    p - o * qsum
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// 32 bytes, `0x10` where bit `j` of `qh` is set (ggml's `bytes_from_bits_32`).
    #[inline(always)]
    unsafe fn high_bits(qh: u32) -> __m256i {
        let shuf = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0,
        );
        let b = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuf);
        let b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        let set = _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1));
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    /// The 32 nibbles of 16 bytes: low nibbles in bytes 0..16, high ones in 16..32.
    #[inline(always)]
    unsafe fn nibbles(qs: *const u8) -> __m256i {
        let raw = _mm_loadu_si128(qs as *const __m128i);
        let m4 = _mm_set1_epi8(0x0f);
        _mm256_set_m128i(
            _mm_and_si128(_mm_srli_epi16(raw, 4), m4),
            _mm_and_si128(raw, m4),
        )
    }

    /// [`super::block_sum_generic`] with AVX2 (`VNNI`: with AVX-512 VNNI's `vpdpbusd`).
    ///
    /// # Safety
    /// AVX2 (and, for `VNNI`, AVX-512 VL + VNNI) must be available; `blk` must hold one
    /// block and `qx` 32 bytes.
    #[inline(always)]
    pub(super) unsafe fn block_sum<const VNNI: bool>(
        ty: QType,
        blk: *const u8,
        qx: *const i8,
        qsum: i32,
    ) -> i32 {
        let y = _mm256_loadu_si256(qx as *const __m256i);
        let zero = _mm256_setzero_si256();
        let (u, o) = match ty {
            QType::Q5_0 | QType::Q5_1 => {
                let at = if ty == QType::Q5_0 { 2 } else { 4 };
                let qh = (blk.add(at) as *const u32).read_unaligned();
                let u = _mm256_or_si256(nibbles(blk.add(at + 4)), high_bits(u32::from_le(qh)));
                (u, if ty == QType::Q5_0 { 16 } else { 0 })
            }
            _ => {
                let nib = nibbles(blk.add(2));
                let lv = _mm_loadu_si128(IQ4_NL_LEVELS.as_ptr() as *const __m128i);
                let lv = _mm256_set_m128i(lv, lv);
                let l = _mm256_shuffle_epi8(lv, nib);
                if !VNNI {
                    // Σ L·qx as Σ |L|·(qx·sign L): i16 pairs within 2·127·127.
                    let p = _mm256_maddubs_epi16(_mm256_sign_epi8(l, l), _mm256_sign_epi8(y, l));
                    let s = _mm256_madd_epi16(p, _mm256_set1_epi16(1));
                    return super::super::kdot::hsum_i32(s);
                }
                (_mm256_xor_si256(l, _mm256_set1_epi8(-128)), 128)
            }
        };
        let s = if VNNI {
            _mm256_dpbusd_epi32(zero, u, y)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, y), _mm256_set1_epi16(1))
        };
        super::super::kdot::hsum_i32(s) - o * qsum
    }
}

/// Row kernels: 0 portable, 1 AVX2, 2 AVX-512 VNNI.
const GENERIC: u8 = 0;
const AVX2: u8 = 1;
const VNNI: u8 = 2;

/// Rows `r0..r0 + nr` of `m` against every vector of `xs` (with their block sums `qs`) into
/// `out[k·n + i]`: `Σ_b (d_b·dx_b)·S_b (+ m_b·sx_b)` in block order.
#[inline(always)]
fn rows_impl<const V: u8>(
    m: &QMatrix,
    r0: usize,
    nr: usize,
    xs: &[Q8Vec],
    qs: &[Vec<i32>],
    out: &mut [f32],
) {
    let (n, bs, nb) = (xs.len(), m.ty.block_bytes(), m.cols / 32);
    for k in 0..nr {
        let r = r0 + k;
        let row = &m.data[r * nb * bs..(r + 1) * nb * bs];
        for (i, (x, q)) in xs.iter().zip(qs).enumerate() {
            let mut acc = 0.0f32;
            for (b, blk) in row.chunks_exact(bs).enumerate() {
                let qx = &x.qx[b * 32..(b + 1) * 32];
                let s = match V {
                    GENERIC => block_sum_generic(m.ty, blk, qx, q[b]),
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the caller checked the CPU; `blk` is one block, `qx` 32 codes.
                    AVX2 => unsafe {
                        x86::block_sum::<false>(m.ty, blk.as_ptr(), qx.as_ptr(), q[b])
                    },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    _ => unsafe { x86::block_sum::<true>(m.ty, blk.as_ptr(), qx.as_ptr(), q[b]) },
                    #[cfg(not(target_arch = "x86_64"))]
                    _ => unreachable!(),
                };
                acc += (m.d[r * nb + b] * x.dx[b]) * s as f32;
                if m.ty == QType::Q5_1 {
                    acc += m.m[r * nb + b] * x.sx[b];
                }
            }
            out[k * n + i] = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rows_avx2(
    m: &QMatrix,
    r0: usize,
    nr: usize,
    xs: &[Q8Vec],
    qs: &[Vec<i32>],
    o: &mut [f32],
) {
    rows_impl::<AVX2>(m, r0, nr, xs, qs, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512vl,avx512vnni")]
unsafe fn rows_vnni(
    m: &QMatrix,
    r0: usize,
    nr: usize,
    xs: &[Q8Vec],
    qs: &[Vec<i32>],
    o: &mut [f32],
) {
    rows_impl::<VNNI>(m, r0, nr, xs, qs, o)
}

fn rows(isa: Isa, m: &QMatrix, r0: usize, nr: usize, xs: &[Q8Vec], qs: &[Vec<i32>], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the features were detected at run time (tests force lower ones only).
        Isa::Vnni => return unsafe { rows_vnni(m, r0, nr, xs, qs, o) },
        Isa::Avx2 => return unsafe { rows_avx2(m, r0, nr, xs, qs, o) },
        Isa::Generic => {}
    }
    let _ = isa;
    rows_impl::<GENERIC>(m, r0, nr, xs, qs, o)
}

/// `y[n, rows] (+)= X[n, cols] · Mᵀ` for a `Q5_0`/`Q5_1`/`IQ4_NL` matrix (each vector
/// quantised to 8 bits per 32 values first), parallel over chunks of weight rows; what
/// [`super::quant::matmat`] runs for these types. Each output is computed as for one vector,
/// whatever `n`.
pub(crate) fn matmat(isa: Isa, m: &QMatrix, x: &[f32], n: usize, y: &mut [f32], accumulate: bool) {
    assert!(m.ty.is_dot32());
    assert_eq!(x.len(), n * m.cols);
    assert_eq!(y.len(), n * m.rows);
    assert!(m.cols.is_multiple_of(32) && m.data.len() == m.rows * m.row_bytes());
    assert_eq!(m.d.len(), m.rows * (m.cols / 32));
    if n == 0 {
        return;
    }
    let xq: Vec<Q8Vec> = x.chunks_exact(m.cols).map(quantize_q8).collect();
    let qs: Vec<Vec<i32>> = xq
        .iter()
        .map(|v| {
            v.qx.chunks_exact(32)
                .map(|c| c.iter().map(|&q| q as i32).sum())
                .collect()
        })
        .collect();
    let nrows = m.rows;
    const ROWS: usize = 16;
    let yp = SendPtr(y.as_mut_ptr());
    (0..nrows.div_ceil(ROWS)).into_par_iter().for_each(|c| {
        let (r0, nr) = (c * ROWS, ROWS.min(nrows - c * ROWS));
        let mut buf = vec![0.0f32; nr * n];
        rows(isa, m, r0, nr, &xq, &qs, &mut buf);
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

    /// Random blocks: random bytes, the f16 scale (and `Q5_1`'s minimum) 2^-10..2^-3 with
    /// random sign and mantissa.
    pub(crate) fn random_matrix(r: &mut Rng, ty: QType, rows: usize, cols: usize) -> QMatrix {
        let bb = ty.block_bytes();
        let mut data: Vec<u8> = (0..rows * cols / 32 * bb)
            .map(|_| (r.next_u64() & 0xff) as u8)
            .collect();
        let offs: &[usize] = if ty == QType::Q5_1 { &[0, 2] } else { &[0] };
        for blk in data.chunks_exact_mut(bb) {
            for &o in offs {
                blk[o + 1] = ((blk[o + 1] as u16 & 0x83) | ((5 + (blk[o] as u16 & 7)) << 2)) as u8;
            }
        }
        QMatrix::new(ty, rows, cols, data)
    }

    fn isas() -> Vec<Isa> {
        match crate::kernels::quant::isa() {
            Isa::Vnni => vec![Isa::Generic, Isa::Avx2, Isa::Vnni],
            Isa::Avx2 => vec![Isa::Generic, Isa::Avx2],
            Isa::Generic => vec![Isa::Generic],
        }
    }

    /// The product equals `Σ w·(dx·qx)` over the dequantised weights and the quantised
    /// activation in f64 within `4e-6 · Σ|w·dx·qx|`; the portable, AVX2 and VNNI paths agree
    /// bit for bit, also with extreme codes (`qx = ±127` everywhere), and several vectors at
    /// once equal one-vector products bit for bit.
    #[test]
    fn qdot32_equals_reference_and_paths_agree() {
        let mut r = Rng::new(32);
        for ty in [QType::Q5_0, QType::Q5_1, QType::IQ4_NL] {
            for (rows, cols, extreme) in [
                (1usize, 32usize, false),
                (7, 96, false),
                (33, 576, false),
                (5, 64, true),
            ] {
                let m = random_matrix(&mut r, ty, rows, cols);
                let mut w = vec![0.0f32; rows * cols];
                kquant::format(ty.ggml_type())
                    .unwrap()
                    .dequantize(&m.data, &mut w);
                let mut x = vec![0.0f32; cols];
                r.fill_normal(&mut x, 1.0);
                if extreme {
                    x.iter_mut()
                        .for_each(|v| *v = if *v > 0.0 { 1.0 } else { -1.0 });
                }
                let q = quantize_q8(&x);
                let xd: Vec<f64> = (0..cols)
                    .map(|j| q.dx[j / 32] as f64 * q.qx[j] as f64)
                    .collect();
                let outs: Vec<Vec<f32>> = isas()
                    .into_iter()
                    .map(|isa| {
                        let mut y = vec![0.25f32; rows];
                        matmat(isa, &m, &x, 1, &mut y, true);
                        y
                    })
                    .collect();
                for i in 0..rows {
                    let wr = &w[i * cols..(i + 1) * cols];
                    let want: f64 = wr.iter().zip(&xd).map(|(&a, b)| a as f64 * b).sum();
                    let scale: f64 = wr.iter().zip(&xd).map(|(&a, b)| (a as f64 * b).abs()).sum();
                    let err = (outs[0][i] as f64 - 0.25 - want).abs() / scale;
                    assert!(err < 4e-6, "{ty:?} {rows}x{cols} row {i}: rel {err:e}");
                }
                for y in &outs[1..] {
                    assert_eq!(y, &outs[0], "{ty:?} {rows}x{cols}: SIMD vs portable");
                }
                let n = 3;
                let mut xs = vec![0.0f32; n * cols];
                r.fill_normal(&mut xs, 1.0);
                for isa in isas() {
                    let mut yb = vec![0.0f32; n * rows];
                    matmat(isa, &m, &xs, n, &mut yb, false);
                    for i in 0..n {
                        let mut yi = vec![0.0f32; rows];
                        matmat(isa, &m, &xs[i * cols..(i + 1) * cols], 1, &mut yi, false);
                        assert_eq!(&yb[i * rows..(i + 1) * rows], &yi[..]);
                    }
                }
            }
        }
    }
}
