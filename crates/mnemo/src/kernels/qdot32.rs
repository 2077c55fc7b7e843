//! Matrix–vector products straight from `Q5_0`, `Q5_1` and `IQ4_NL` blocks (32 values each:
//! the types llama.cpp's k-quant mixes fall back to for rows that are not a multiple of 256),
//! as ggml's `ggml_vec_dot_{q5_0_q8_0, q5_1_q8_1, iq4_nl_q8_0}` compute them. Byte layouts:
//! see [`super::kquant`].
//!
//! The activation `x: [cols]` is quantised per 32-value block to `x ≈ dx·qx`, `qx ∈ [−127,
//! 127]` ([`super::quant`]'s `Q8_0`/`Q8_1` quantiser; `sx = dx·Σ qx`). Per block `b` of a
//! weight row, with the block's codes as unsigned bytes `u` and an offset `o`:
//! - `Q5_0` (`w = d·(q − 16)`, `q ∈ 0..32`): `u = q`, `o = 16`;
//! - `Q5_1` (`w = d·q + m`): `u = q`, `o = 0`, plus `m·sx`;
//! - `IQ4_NL` (`w = d·L[q]`, `L` its 16 levels in −127..113): `u = L[q] + 128`, `o = 128`.
//!
//! As ggml's AVX2 kernels, a row keeps 8 f32 lanes per vector and sums them once at the end:
//! lane `j` of block `b` holds the integer `S_bj = Σ_{t<4} (u − o)_{4j+t}·qx_{4j+t}` (at most
//! 4·128·127 in magnitude, exact in f32), and
//!
//! ```text
//! acc_j ← fma(d_b·dx_b, S_bj, acc_j)   for b = 0, 1, …      y = hsum(acc) (+ Σ_b m_b·sx_b)
//! hsum(a) = ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))
//! ```
//!
//! `S_bj` is computed by a portable loop, with AVX2 (`maddubs` then `madd` with ones; for
//! `IQ4_NL` of `|L|` with `qx` carrying `L`'s sign, since `u·qx` pairs could overflow i16) or
//! with AVX-512 VNNI (`vpdpbusd` of `u` with `qx` on 256-bit lanes), chosen at run time; the
//! offset `−o·Σ_{t<4} qx_{4j+t}` is computed once per vector (`Acts::off`). All three give the
//! same integers and run the same float operations in the same order, so the paths agree bit
//! for bit. Several vectors (prefill rows, a decode batch) share each unpacked weight block:
//! up to 8 at a time, one accumulator each, every output computed exactly as for one vector.
//! One `Q5_0` vector on AVX-512 BW/VL/VNNI machines runs in [`super::qdot_dec`] (the same
//! integers and float operations, fewer instructions per block).

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

/// The sum of 8 lanes in the order of the SIMD kernels' horizontal sum (module doc).
#[inline(always)]
fn hsum8(a: &[f32; 8]) -> f32 {
    let s: [f32; 4] = std::array::from_fn(|k| a[k] + a[k + 4]);
    (s[0] + s[2]) + (s[1] + s[3])
}

/// Vectors per group: each weight block is unpacked once for up to this many vectors.
const GROUP: usize = 8;

/// The quantised vectors of a product and, per vector, the lane offsets `off[b·8 + j] =
/// −o·Σ_{t<4} qx_{32b+4j+t}` (empty for `Q5_1`, whose `o` is 0).
struct Acts {
    xs: Vec<Q8Vec>,
    off: Vec<Vec<i32>>,
}

impl Acts {
    fn new(ty: QType, x: &[f32], cols: usize) -> Acts {
        let o = match ty {
            QType::Q5_0 => 16,
            QType::IQ4_NL => 128,
            _ => 0,
        };
        // Several vectors are quantised in parallel (each one's bits do not depend on it).
        let xs: Vec<Q8Vec> = match x.len() / cols {
            1 => vec![quantize_q8(x)],
            _ => x.par_chunks_exact(cols).map(quantize_q8).collect(),
        };
        let off = xs
            .iter()
            .map(|v| match o {
                0 => Vec::new(),
                _ => {
                    v.qx.chunks_exact(4)
                        .map(|c| -o * c.iter().map(|&q| q as i32).sum::<i32>())
                        .collect()
                }
            })
            .collect();
        Acts { xs, off }
    }
}

/// A group of `n ≤ GROUP` vectors interleaved block by block for the SIMD kernels: block `b`
/// of vector `i` at `qx[(b·n + i)·32..]`, its lane offsets at `off[(b·n + i)·8..]` (zeros for
/// `Q5_1`) and its scale 8 times at `dx[(b·n + i)·8..]` (a full vector, so that the kernel
/// multiplies by it from memory), so a block's loads for every vector are adjacent.
struct Packed {
    qx: Vec<i8>,
    off: Vec<i32>,
    dx: Vec<f32>,
    /// The scales transposed, one lane per vector: `dxt[b·8 + i]` (zero-padded), so that
    /// the scale products of a weight block and all the vectors are one multiply.
    dxt: Vec<f32>,
}

impl Packed {
    fn new(xs: &[Q8Vec], off: &[Vec<i32>]) -> Packed {
        let (n, nb) = (xs.len(), xs[0].dx.len());
        let mut p = Packed {
            qx: Vec::with_capacity(nb * n * 32),
            off: Vec::with_capacity(nb * n * 8),
            dx: Vec::with_capacity(nb * n * 8),
            dxt: vec![0.0; nb * 8],
        };
        for b in 0..nb {
            for (x, o) in xs.iter().zip(off) {
                p.qx.extend_from_slice(&x.qx[b * 32..(b + 1) * 32]);
                match o.is_empty() {
                    true => p.off.extend_from_slice(&[0; 8]),
                    false => p.off.extend_from_slice(&o[b * 8..(b + 1) * 8]),
                }
                p.dx.extend_from_slice(&[x.dx[b]; 8]);
            }
            for (i, x) in xs.iter().enumerate() {
                p.dxt[b * 8 + i] = x.dx[b];
            }
        }
        p
    }
}

/// Rows `r0..r0 + nr` of `m` against the vectors `xs` (`n ≤ GROUP`) into `out[i·nr + k]`,
/// portable (the reference the SIMD kernels are tested against).
fn rows_generic(m: &QMatrix, r0: usize, nr: usize, xs: &[Q8Vec], out: &mut [f32]) {
    let (n, bs, nb) = (xs.len(), m.ty.block_bytes(), m.cols / 32);
    let q51 = m.ty == QType::Q5_1;
    for k in 0..nr {
        let r = r0 + k;
        let row = &m.data[r * nb * bs..(r + 1) * nb * bs];
        let mut acc = [[0.0f32; 8]; GROUP];
        let mut mt = [0.0f32; GROUP];
        for (b, blk) in row.chunks_exact(bs).enumerate() {
            let (u, o) = codes(m.ty, blk);
            let d = m.d[r * nb + b];
            for (i, x) in xs.iter().enumerate() {
                let qx = &x.qx[b * 32..(b + 1) * 32];
                let sc = d * x.dx[b];
                for (j, a) in acc[i].iter_mut().enumerate() {
                    let s: i32 = (4 * j..4 * j + 4)
                        .map(|t| (u[t] as i32 - o) * qx[t] as i32)
                        .sum();
                    *a = sc.mul_add(s as f32, *a);
                }
                if q51 {
                    mt[i] += m.m[r * nb + b] * x.sx[b];
                }
            }
        }
        for i in 0..n {
            let s = hsum8(&acc[i]);
            out[i * nr + k] = if q51 { s + mt[i] } else { s };
        }
    }
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

    /// [`super::hsum8`] of 8 f32 lanes, in the same order.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Block types, as const parameters.
    pub(super) const Q50: u8 = 0;
    pub(super) const Q51: u8 = 1;
    pub(super) const IQ4: u8 = 2;

    /// [`super::rows_generic`] for the `N` vectors of `p` (`xs`: the same vectors, for
    /// `Q5_1`'s minimum term) of block type `T` with AVX2 (`VNNI`: with AVX-512 VNNI's
    /// `vpdpbusd`): the same lane integers and float operations. `R` rows at a time share each
    /// vector's loads.
    ///
    /// # Safety
    /// AVX2 and FMA (and, for `VNNI`, AVX-512 VL + VNNI) must be available; `p` holds `N`
    /// vectors of `m.cols` values, rows `r0..r0 + nr` are in `m`, `out` holds `nr·N`
    /// (`out[i·nr + k]`: vector-major, so that the caller's copy is contiguous).
    #[inline(always)]
    pub(super) unsafe fn rows<const T: u8, const N: usize, const VNNI: bool, const R: usize>(
        m: &QMatrix,
        r0: usize,
        nr: usize,
        p: &Packed,
        xs: &[Q8Vec],
        out: &mut [f32],
    ) {
        let mut k = 0;
        while k < nr {
            if R > 1 && k + R <= nr {
                tile::<T, N, VNNI, R>(m, r0 + k, p, xs, out.as_mut_ptr().add(k), nr);
                k += R;
            } else {
                tile::<T, N, VNNI, 1>(m, r0 + k, p, xs, out.as_mut_ptr().add(k), nr);
                k += 1;
            }
        }
    }

    /// Rows `r..r + R` against the `N` vectors of `p` into `out[i·vs + rr]`.
    #[inline(always)]
    unsafe fn tile<const T: u8, const N: usize, const VNNI: bool, const R: usize>(
        m: &QMatrix,
        r: usize,
        p: &Packed,
        xs: &[Q8Vec],
        out: *mut f32,
        vs: usize,
    ) {
        let (bs, nb) = (m.ty.block_bytes(), m.cols / 32);
        let ones = _mm256_set1_epi16(1);
        let lv = _mm_loadu_si128(IQ4_NL_LEVELS.as_ptr() as *const __m128i);
        let lv = _mm256_set_m128i(lv, lv);
        let rowp: [*const u8; R] =
            std::array::from_fn(|rr| m.data.as_ptr().add((r + rr) * nb * bs));
        let dsp: [*const f32; R] = std::array::from_fn(|rr| m.d.as_ptr().add((r + rr) * nb));
        let (mut xp, mut op, mut dp) = (p.qx.as_ptr(), p.off.as_ptr(), p.dx.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); N]; R];
        let mut mt = [[0.0f32; N]; R];
        // Several vectors: the scale products `d_b·dx_ib` of a chunk of blocks, one multiply
        // per row and block (`sct[(c·R + rr)·8 + i]`), read back as broadcasts: the inner loop
        // then has no multiply (the same products as one multiply per row and vector).
        const CH: usize = 8;
        let mut sct = [0.0f32; CH * 4 * 8];
        debug_assert!(R <= 4);
        for b in 0..nb {
            let c = b % CH;
            if N > 1 && c == 0 {
                for cc in 0..CH.min(nb - b) {
                    let dxv = _mm256_loadu_ps(p.dxt.as_ptr().add((b + cc) * 8));
                    for (rr, ds) in dsp.iter().enumerate() {
                        let sd = _mm256_set1_ps(*ds.add(b + cc));
                        let t = _mm256_mul_ps(sd, dxv);
                        _mm256_storeu_ps(sct.as_mut_ptr().add((cc * R + rr) * 8), t);
                    }
                }
            }
            // Per row: `u` (unsigned codes), `l` (for `IQ4_NL`: the signed levels), `d`.
            let mut u = [_mm256_setzero_si256(); R];
            let mut l = [_mm256_setzero_si256(); R];
            let mut sd = [_mm256_setzero_ps(); R];
            for rr in 0..R {
                let blk = rowp[rr].add(b * bs);
                sd[rr] = _mm256_set1_ps(*dsp[rr].add(b));
                match T {
                    Q50 | Q51 => {
                        let at = if T == Q50 { 2 } else { 4 };
                        let qh = u32::from_le((blk.add(at) as *const u32).read_unaligned());
                        u[rr] = _mm256_or_si256(nibbles(blk.add(at + 4)), high_bits(qh));
                    }
                    _ => {
                        l[rr] = _mm256_shuffle_epi8(lv, nibbles(blk.add(2)));
                        u[rr] = _mm256_xor_si256(l[rr], _mm256_set1_epi8(-128));
                    }
                }
            }
            for i in 0..N {
                let x = _mm256_loadu_si256(xp.add(i * 32) as *const __m256i);
                let base = match T {
                    Q51 => _mm256_setzero_si256(),
                    _ => _mm256_loadu_si256(op.add(i * 8) as *const __m256i),
                };
                let dx = _mm256_set1_ps(*dp.add(i * 8));
                for rr in 0..R {
                    let p = if VNNI {
                        _mm256_dpbusd_epi32(base, u[rr], x)
                    } else if T == IQ4 {
                        // Σ L·qx as Σ |L|·(qx·sign L): i16 pairs within 2·127·127.
                        let al = _mm256_sign_epi8(l[rr], l[rr]);
                        let sx = _mm256_sign_epi8(x, l[rr]);
                        _mm256_madd_epi16(_mm256_maddubs_epi16(al, sx), ones)
                    } else {
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(u[rr], x), ones);
                        _mm256_add_epi32(p, base)
                    };
                    let sc = match N {
                        1 => _mm256_mul_ps(sd[rr], dx),
                        _ => _mm256_set1_ps(*sct.as_ptr().add((c * R + rr) * 8 + i)),
                    };
                    acc[rr][i] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(p), acc[rr][i]);
                    if T == Q51 {
                        mt[rr][i] += *m.m.as_ptr().add((r + rr) * nb + b) * xs[i].sx[b];
                    }
                }
            }
            xp = xp.add(N * 32);
            op = op.add(N * 8);
            dp = dp.add(N * 8);
        }
        for rr in 0..R {
            for i in 0..N {
                let s = hsum(acc[rr][i]);
                *out.add(i * vs + rr) = if T == Q51 { s + mt[rr][i] } else { s };
            }
        }
    }

    macro_rules! dispatch {
        ($name:ident, $vnni:expr, $rows:expr, $feat:literal) => {
            /// [`rows`] for this CPU level, dispatched on the block type and vector count.
            ///
            /// # Safety
            /// The CPU features named must be available; sizes as [`rows`].
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name(
                m: &QMatrix,
                r0: usize,
                nr: usize,
                p: &Packed,
                xs: &[Q8Vec],
                out: &mut [f32],
            ) {
                const R: usize = $rows;
                macro_rules! by_n {
                    ($t:expr) => {
                        match xs.len() {
                            1 => rows::<$t, 1, $vnni, R>(m, r0, nr, p, xs, out),
                            2 => rows::<$t, 2, $vnni, R>(m, r0, nr, p, xs, out),
                            3 => rows::<$t, 3, $vnni, R>(m, r0, nr, p, xs, out),
                            4 => rows::<$t, 4, $vnni, R>(m, r0, nr, p, xs, out),
                            5 => rows::<$t, 5, $vnni, R>(m, r0, nr, p, xs, out),
                            6 => rows::<$t, 6, $vnni, R>(m, r0, nr, p, xs, out),
                            7 => rows::<$t, 7, $vnni, R>(m, r0, nr, p, xs, out),
                            _ => rows::<$t, 8, $vnni, R>(m, r0, nr, p, xs, out),
                        }
                    };
                }
                match m.ty {
                    QType::Q5_0 => by_n!(Q50),
                    QType::Q5_1 => by_n!(Q51),
                    _ => by_n!(IQ4),
                }
            }
        };
    }
    // Two rows at a time where AVX-512 gives 32 vector registers (2·8 accumulators).
    dispatch!(rows_avx2, false, 1, "avx2,fma");
    dispatch!(rows_vnni, true, 2, "avx2,fma,avx512vl,avx512vnni");
}

/// Rows `r0..r0 + nr` of `m` against the vectors `xs` (with their offsets `off`) into
/// `out[k·n + i]`.
fn rows(
    isa: Isa,
    m: &QMatrix,
    r0: usize,
    nr: usize,
    xs: &[Q8Vec],
    p: Option<&Packed>,
    o: &mut [f32],
) {
    assert!(!xs.is_empty() && xs.len() <= GROUP && o.len() >= nr * xs.len());
    assert!(r0 + nr <= m.rows && xs.iter().all(|x| x.qx.len() == m.cols));
    #[cfg(target_arch = "x86_64")]
    if let Some(p) = p {
        let nb = m.cols / 32;
        let n = xs.len();
        assert!(p.qx.len() == nb * n * 32 && p.off.len() == nb * n * 8 && p.dx.len() == nb * n * 8);
        match isa {
            // SAFETY: the features were detected at run time (tests force lower ones only);
            // the sizes were checked above.
            Isa::Vnni => return unsafe { x86::rows_vnni(m, r0, nr, p, xs, o) },
            Isa::Avx2 => return unsafe { x86::rows_avx2(m, r0, nr, p, xs, o) },
            Isa::Generic => {}
        }
    }
    let _ = (isa, p);
    rows_generic(m, r0, nr, xs, o)
}

/// `y[n, rows] (+)= X[n, cols] · Mᵀ` for a `Q5_0`/`Q5_1`/`IQ4_NL` matrix (each vector
/// quantised to 8 bits per 32 values first), parallel over chunks of weight rows; what
/// [`super::quant::matmat`] runs for these types. Vectors go in groups of up to 8, each weight
/// block unpacked once per group; each output is computed as for one vector, whatever `n`.
pub(crate) fn matmat(isa: Isa, m: &QMatrix, x: &[f32], n: usize, y: &mut [f32], accumulate: bool) {
    assert!(m.ty.is_dot32());
    assert_eq!(x.len(), n * m.cols);
    assert_eq!(y.len(), n * m.rows);
    assert!(m.cols.is_multiple_of(32) && m.data.len() == m.rows * m.row_bytes());
    assert_eq!(m.d.len(), m.rows * (m.cols / 32));
    if n == 0 {
        return;
    }
    let a = Acts::new(m.ty, x, m.cols);
    if n == 1 && isa == Isa::Vnni && m.ty == QType::Q5_0 && super::qdot_dec::available() {
        // One vector: the decode kernel (same integers and float operations, same bits).
        return super::qdot_dec::matvec(m, &a.xs[0], &a.off[0], y, accumulate);
    }
    let packed: Vec<Packed> = match isa {
        Isa::Generic => Vec::new(),
        _ => {
            a.xs.par_chunks(GROUP)
                .zip(a.off.par_chunks(GROUP))
                .map(|(xs, off)| Packed::new(xs, off))
                .collect()
        }
    };
    let nrows = m.rows;
    const ROWS: usize = 16;
    let yp = SendPtr(y.as_mut_ptr());
    (0..nrows.div_ceil(ROWS)).into_par_iter().for_each(|c| {
        let (r0, nr) = (c * ROWS, ROWS.min(nrows - c * ROWS));
        let mut buf = [0.0f32; ROWS * GROUP];
        for g0 in (0..n).step_by(GROUP) {
            let gn = GROUP.min(n - g0);
            let p = packed.get(g0 / GROUP);
            rows(isa, m, r0, nr, &a.xs[g0..g0 + gn], p, &mut buf[..nr * gn]);
            for (i, bi) in buf[..nr * gn].chunks_exact(nr).enumerate() {
                // SAFETY: chunk c alone writes rows r0..r0 + nr of every output vector, all
                // inside y (n · rows elements).
                let yi = unsafe {
                    std::slice::from_raw_parts_mut(yp.get().add((g0 + i) * nrows + r0), nr)
                };
                if accumulate {
                    yi.iter_mut().zip(bi).for_each(|(o, &v)| *o += v);
                } else {
                    yi.copy_from_slice(bi);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::kquant;
    use crate::kernels::quant::isas;
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

    /// The product equals `Σ w·(dx·qx)` over the dequantised weights and the quantised
    /// activation in f64 within `4e-6 · Σ|w·dx·qx|`; the portable, AVX2 and VNNI paths agree
    /// bit for bit, also with extreme codes (`qx = ±127` everywhere), and several vectors at
    /// once (11: a full group of 8 and a partial one) equal one-vector products bit for bit.
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
                let n = 11;
                let mut xs = vec![0.0f32; n * cols];
                r.fill_normal(&mut xs, 1.0);
                let mut first: Option<Vec<f32>> = None;
                for isa in isas() {
                    let mut yb = vec![0.0f32; n * rows];
                    matmat(isa, &m, &xs, n, &mut yb, false);
                    for i in 0..n {
                        let mut yi = vec![0.0f32; rows];
                        matmat(isa, &m, &xs[i * cols..(i + 1) * cols], 1, &mut yi, false);
                        assert_eq!(&yb[i * rows..(i + 1) * rows], &yi[..]);
                    }
                    match &first {
                        Some(f) => assert_eq!(f, &yb, "{ty:?} {isa:?}: {n} vectors vs portable"),
                        None => first = Some(yb),
                    }
                }
            }
        }
    }
}
