//! Matrix–vector products straight from quantised GGUF blocks, for decoding: a token's forward
//! pass reads every weight once, so reading 4.5–8.5 bits per weight instead of 32 is what
//! sets the decode speed.
//!
//! Rows are independent runs of 32-value blocks (`Q8_0`, `Q4_0`, `Q4_1` here; `Q5_0`, `Q5_1`,
//! `IQ4_NL` in [`super::qdot32`], k-quants in [`super::kdot`]; formats: [`super::kquant`]). For a block with scale `d` (and minimum `m` for `Q4_1`):
//! `Σ_j w_j x_j = d · Σ_j q_j x_j + m · Σ_j x_j`, so the block sums of `x` are computed once
//! per vector. As in llama.cpp, `x` is first quantised to 8 bits per 32-value block
//! (`x ≈ dx·qx`), so each block is an integer dot product `Σ q_j·qx_j` (AVX2 `maddubs`, or one
//! AVX-512 VNNI `vpdpbusd`, chosen at run time; a portable loop otherwise) and one FMA with
//! `d·dx`.
//!
//! Several vectors at once (`matmat`: a decode batch, or lookup decoding's verification rows):
//! for each weight row, each block is loaded and unpacked once and applied to up to 8 vectors
//! (one 8-lane accumulator per vector in registers); the minimum term of all of them is one
//! 8-lane multiply-add per block (lane = vector). A vector's arithmetic is the same whatever
//! the other vectors, so every output equals the one-vector product (`matvec`) bit for bit.

use super::f16::f16_to_f32;
use rayon::prelude::*;

pub use super::qtype::QType;

/// A row-major `[rows, cols]` matrix of quantised blocks (`cols` a multiple of the block
/// size), with the blocks' f16 scales (and minimums) converted to f32 once, at construction
/// (k-quants: the super-block's `d`, and `dmin` for `Q4_K`; packed floats: their scales,
/// `[rows, ceil(cols/block)]`).
#[derive(Clone, Debug)]
pub struct QMatrix {
    pub ty: QType,
    pub rows: usize,
    pub cols: usize,
    /// The blocks (owned, or a range of a shared buffer such as a mapped file).
    pub data: super::qbytes::QBytes,
    pub(crate) d: Vec<f32>,
    /// Packed floats only: the scales as E8M0 exponent bytes (`2^(e−127)`, `[rows,
    /// ceil(cols/block)]`), in place of `d` (then empty), converted by each product
    /// ([`QMatrix::packed_lazy`]).
    pub(crate) d8: Option<super::qbytes::QBytes>,
    pub(crate) m: Vec<f32>,
    /// Values per scale along a row.
    pub block: usize,
}

impl QMatrix {
    pub fn new(
        ty: QType,
        rows: usize,
        cols: usize,
        data: impl Into<super::qbytes::QBytes>,
    ) -> Self {
        let data = data.into();
        let bs = ty.block_bytes();
        let d_at = match ty {
            QType::Q6_K => 208,
            QType::Q2_K => 80,
            QType::Q3_K => 108,
            _ => 0,
        };
        let d = data
            .chunks_exact(bs)
            .map(|b| f16_to_f32(&b[d_at..d_at + 2]))
            .collect();
        let m = match ty {
            QType::Q2_K => data
                .chunks_exact(bs)
                .map(|b| f16_to_f32(&b[82..84]))
                .collect(),
            QType::Q4_1 | QType::Q5_1 | QType::Q4_K | QType::Q5_K => data
                .chunks_exact(bs)
                .map(|b| f16_to_f32(&b[2..4]))
                .collect(),
            QType::Q4_0 => data
                .chunks_exact(bs)
                .map(|b| -8.0 * f16_to_f32(&b[..2]))
                .collect(),
            _ if ty.is_packed_float() => panic!("packed floats are built by QMatrix::packed"),
            _ => Vec::new(),
        };
        QMatrix {
            ty,
            rows,
            cols,
            data,
            d,
            m,
            d8: None,
            block: ty.block_elems(),
        }
    }

    /// A packed `Fp8`/`Fp4` matrix `[rows, cols]`: `data` its codes (FP8 `rows·cols` bytes,
    /// FP4 `rows·cols/2`, even element in the low nibble), `scales` one per `block` values of
    /// a row (`[rows, ceil(cols/block)]`, powers of two; an FP8 `128 × 128` block scale
    /// repeated for each of its rows: [`super::fp8dot::expand_block_scales`]). Errors (the caller adds the
    /// tensor's name): sizes that do not match, `block` not a multiple of 16, a scale that is
    /// not a finite power of two, an FP8 NaN code (`0x7f`, `0xff`).
    pub fn packed(
        ty: QType,
        rows: usize,
        cols: usize,
        data: impl Into<super::qbytes::QBytes>,
        scales: Vec<f32>,
        block: usize,
    ) -> Result<Self, String> {
        let q = Self::packed_lazy(
            ty,
            rows,
            cols,
            data.into(),
            PackedScales::F32(scales),
            block,
        )?;
        let (data, scales) = (&q.data, &q.d);
        let pow2 = |s: f32| {
            let b = s.to_bits();
            s.is_finite()
                && s > 0.0
                && (b & 0x007f_ffff == 0 || (b >> 23 == 0 && b.is_power_of_two()))
        };
        if let Some(i) = scales.iter().position(|&s| !pow2(s)) {
            return Err(format!("scale {i} is {}, not a power of two", scales[i]));
        }
        if ty == QType::Fp8 {
            if let Some(i) = data.iter().position(|&b| b & 0x7f == 0x7f) {
                return Err(format!(
                    "a NaN code {:#04x} at [{}, {}]",
                    data[i],
                    i / cols,
                    i % cols
                ));
            }
        }
        Ok(q)
    }

    /// A packed `Fp8`/`Fp4` matrix like [`QMatrix::packed`], its codes kept as they are
    /// (typically a range of a mapped file: nothing is read here) and its scales as f32 values
    /// or as E8M0 exponent bytes `[rows, ceil(cols/block)]` (also kept as they are, converted
    /// by each product). Only the sizes are checked: an FP8 NaN code or an E8M0 NaN scale
    /// (`0xff`) gives NaN outputs instead of an error, since checking would read every byte.
    pub fn packed_lazy(
        ty: QType,
        rows: usize,
        cols: usize,
        data: super::qbytes::QBytes,
        scales: PackedScales,
        block: usize,
    ) -> Result<Self, String> {
        let want = match ty {
            QType::Fp8 => rows * cols,
            QType::Bf16 => 2 * rows * cols,
            QType::Fp4 if cols.is_multiple_of(2) => rows * cols / 2,
            QType::Fp4 => return Err(format!("FP4 needs an even column count, not {cols}")),
            _ => return Err(format!("{ty:?} is not a packed float type")),
        };
        if block == 0 || !block.is_multiple_of(16) {
            return Err(format!(
                "the packed kernels need scale blocks of a multiple of 16 values, not {block}"
            ));
        }
        if data.len() != want {
            return Err(format!("{} bytes of codes, expected {want}", data.len()));
        }
        let ns = rows * cols.div_ceil(block);
        let (d, d8) = match scales {
            PackedScales::F32(v) => (v, None),
            PackedScales::E8m0(b) => (Vec::new(), Some(b)),
        };
        let got = d8.as_ref().map_or(d.len(), |b| b.len());
        if got != ns {
            return Err(format!("{got} scales, expected {ns}"));
        }
        Ok(QMatrix {
            ty,
            rows,
            cols,
            data,
            d,
            m: Vec::new(),
            d8,
            block,
        })
    }

    /// A BF16 matrix `[rows, cols]` whose little-endian values `data` (`2·rows·cols` bytes,
    /// typically a range of a mapped file) are multiplied as stored ([`super::fp8dot`]: a
    /// packed float with one scale of 1 per row). Errors: a size that does not match.
    pub fn bf16(rows: usize, cols: usize, data: super::qbytes::QBytes) -> Result<Self, String> {
        let block = cols.div_ceil(16).max(1) * 16;
        Self::packed_lazy(
            QType::Bf16,
            rows,
            cols,
            data,
            PackedScales::F32(vec![1.0; rows]),
            block,
        )
    }

    /// The scales of a packed-float matrix as f32 (`d`, or `d8` converted).
    pub fn scales_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        match &self.d8 {
            Some(e) => e.iter().map(|&b| super::fp8::e8m0_to_f32(b)).collect(),
            None => std::borrow::Cow::Borrowed(&self.d),
        }
    }

    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_elems() * self.ty.block_bytes()
    }
}

/// The scales of a packed-float matrix ([`QMatrix::packed_lazy`]).
pub enum PackedScales {
    /// f32 powers of two.
    F32(Vec<f32>),
    /// E8M0 exponent bytes, `2^(e−127)`.
    E8m0(super::qbytes::QBytes),
}

/// An input vector quantised like llama.cpp's `Q8_1`: per 32-value block a scale `dx`,
/// 32 signed bytes `qx` with `x ≈ dx·qx`, and `sx = dx·Σ qx` (for the weight minimums).
pub(super) struct Q8Vec {
    pub(super) qx: Vec<i8>,
    pub(super) dx: Vec<f32>,
    pub(super) sx: Vec<f32>,
}

pub(super) fn quantize_q8(x: &[f32]) -> Q8Vec {
    let nb = x.len() / 32;
    let mut v = Q8Vec {
        qx: vec![0; x.len()],
        dx: vec![0.0; nb],
        sx: vec![0.0; nb],
    };
    super::q8_act::quantize(x, &mut v.qx, &mut v.dx, &mut v.sx);
    v
}

/// Vectors per group: each weight block is unpacked once and applied to up to this many
/// vectors, with one 8-lane accumulator per vector in registers.
const GROUP: usize = 8;

/// Up to [`GROUP`] quantised vectors, laid out for the kernels: `sxt[b·GROUP + i]` is `sx` of
/// vector `i`, block `b` (transposed and zero-padded, so the minimum term of all the vectors is
/// one 8-lane multiply-add per block), and `qxu = qx + 128` as unsigned bytes for the VNNI
/// `Q8_0` kernel.
struct Group<'a> {
    v: &'a [Q8Vec],
    sxt: Vec<f32>,
    qxu: Vec<Vec<u8>>,
}

impl<'a> Group<'a> {
    fn new(v: &'a [Q8Vec], ty: QType, isa: Isa) -> Self {
        assert!(!v.is_empty() && v.len() <= GROUP);
        let nb = v[0].dx.len();
        let mut sxt = vec![0.0f32; nb * GROUP];
        for (i, q) in v.iter().enumerate() {
            for (b, &s) in q.sx.iter().enumerate() {
                sxt[b * GROUP + i] = s;
            }
        }
        let qxu = if ty == QType::Q8_0 && isa == Isa::Vnni {
            v.iter()
                .map(|q| q.qx.iter().map(|&t| (t as u8) ^ 0x80).collect())
                .collect()
        } else {
            Vec::new()
        };
        Group { v, sxt, qxu }
    }
}

/// The minimum (`Q4_1`) or offset (`Q4_0`) term of one weight row against one vector:
/// `Σ_b m_b · sx_b`, summed in block order from `0` (the SIMD kernels compute exactly this,
/// one vector per lane).
#[inline(always)]
fn min_term(ms: &[f32], sx: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for (m, x) in ms.iter().zip(sx) {
        s += m * x;
    }
    s
}

/// Weight rows `r0..r0 + nr` against every vector of `g`, portable:
/// `out[k·n + i] = Σ_b d_b·dx_b·Σ_j q_j·qx_j` (+ the minimum term), with the same integer block
/// sums as the SIMD kernels (the float sums are in another order).
fn rows_generic(m: &QMatrix, r0: usize, nr: usize, g: &Group, out: &mut [f32]) {
    let (ty, n) = (m.ty, g.v.len());
    let bs = ty.block_bytes();
    let nb = m.cols / 32;
    for k in 0..nr {
        let r = r0 + k;
        let row = &m.data[r * nb * bs..(r + 1) * nb * bs];
        let ds = &m.d[r * nb..(r + 1) * nb];
        for (i, x) in g.v.iter().enumerate() {
            let mut acc = 0.0f32;
            for (b, blk) in row.chunks_exact(bs).enumerate() {
                let qx = &x.qx[b * 32..(b + 1) * 32];
                let isum: i32 = match ty {
                    QType::Q8_0 => blk[2..34]
                        .iter()
                        .zip(qx)
                        .map(|(&w, &q)| (w as i8) as i32 * q as i32)
                        .sum(),
                    QType::Q4_0 | QType::Q4_1 => {
                        let qs = &blk[bs - 16..];
                        (0..16)
                            .map(|j| {
                                (qs[j] & 0x0f) as i32 * qx[j] as i32
                                    + (qs[j] >> 4) as i32 * qx[j + 16] as i32
                            })
                            .sum()
                    }
                    _ => unreachable!("k-quants run in kdot, packed floats in fp8dot"),
                };
                acc += ds[b] * x.dx[b] * isum as f32;
            }
            out[k * n + i] = if ty == QType::Q8_0 {
                acc
            } else {
                acc + min_term(&m.m[r * nb..(r + 1) * nb], &x.sx)
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Group, QMatrix, QType, GROUP};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The 32 nibbles of a `Q4_*` block as unsigned bytes in element order (byte `j` of the
    /// block holds elements `j` and `j + 16`).
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let t = _mm_loadu_si128(p as *const __m128i);
        let w = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
        _mm256_and_si256(w, _mm256_set1_epi8(0x0f))
    }

    /// Rows `r0..r0 + nr` of `m` against the `N` vectors of `g` (`out[k·N + i]`). Each weight
    /// block is loaded and unpacked once; per vector, its integer block sum (8 lanes of 4
    /// products) is converted and added with one FMA by `d·dx` into the vector's accumulator;
    /// then a horizontal sum and the minimum term (one vector per lane). The arithmetic of an
    /// output does not depend on `N` or on the other vectors.
    ///
    /// `VNNI`: `vpdpbusd` (u8·i8 products summed into i32 lanes); `Q8_0` runs it on
    /// `(qx + 128)·w` starting from `−128·Σw` (per lane), which is `Σ qx·w` exactly. Otherwise
    /// AVX2 `maddubs` (u8·i8 → i16 pairs, no overflow: 2·15·127 and 2·128·127 < 2¹⁵) then `madd`
    /// with ones, `Q8_0` with the sign moved onto the activations. Same integer sums.
    #[inline(always)]
    unsafe fn rows_impl<const N: usize, const VNNI: bool>(
        m: &QMatrix,
        r0: usize,
        nr: usize,
        g: &Group,
        out: &mut [f32],
    ) {
        let ty = m.ty;
        let bs = ty.block_bytes();
        let nb = m.cols / 32;
        let qoff = bs - if ty == QType::Q8_0 { 32 } else { 16 };
        let ones = _mm256_set1_epi16(1);
        let zero = _mm256_setzero_si256();
        let xq: [*const i8; N] = std::array::from_fn(|i| g.v[i].qx.as_ptr());
        let xd: [*const f32; N] = std::array::from_fn(|i| g.v[i].dx.as_ptr());
        let xu: [*const u8; N] = std::array::from_fn(|i| {
            if VNNI && ty == QType::Q8_0 {
                g.qxu[i].as_ptr()
            } else {
                std::ptr::null()
            }
        });
        for k in 0..nr {
            let r = r0 + k;
            let row = m.data.as_ptr().add(r * nb * bs + qoff);
            let ds = m.d.as_ptr().add(r * nb);
            let mut acc = [_mm256_setzero_ps(); N];
            if ty == QType::Q8_0 {
                for b in 0..nb {
                    let w = _mm256_loadu_si256(row.add(b * bs) as *const __m256i);
                    let sd = _mm256_set1_ps(*ds.add(b));
                    if VNNI {
                        let c = _mm256_dpbusd_epi32(zero, _mm256_set1_epi8(-128), w);
                        let negc = _mm256_sub_epi32(zero, c);
                        for i in 0..N {
                            let x = _mm256_loadu_si256(xu[i].add(b * 32) as *const __m256i);
                            let p = _mm256_dpbusd_epi32(negc, x, w);
                            let sc = _mm256_mul_ps(sd, _mm256_set1_ps(*xd[i].add(b)));
                            acc[i] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(p), acc[i]);
                        }
                    } else {
                        let wa = _mm256_sign_epi8(w, w);
                        for i in 0..N {
                            let x = _mm256_loadu_si256(xq[i].add(b * 32) as *const __m256i);
                            let p = _mm256_madd_epi16(
                                _mm256_maddubs_epi16(wa, _mm256_sign_epi8(x, w)),
                                ones,
                            );
                            let sc = _mm256_mul_ps(sd, _mm256_set1_ps(*xd[i].add(b)));
                            acc[i] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(p), acc[i]);
                        }
                    }
                }
                for i in 0..N {
                    out[k * N + i] = hsum(acc[i]);
                }
            } else {
                for b in 0..nb {
                    let w = nibbles(row.add(b * bs));
                    let sd = _mm256_set1_ps(*ds.add(b));
                    for i in 0..N {
                        let x = _mm256_loadu_si256(xq[i].add(b * 32) as *const __m256i);
                        let p = if VNNI {
                            _mm256_dpbusd_epi32(zero, w, x)
                        } else {
                            _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones)
                        };
                        let sc = _mm256_mul_ps(sd, _mm256_set1_ps(*xd[i].add(b)));
                        acc[i] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(p), acc[i]);
                    }
                }
                // Minimum term, lane i = vector i: mt_i += m_b · sx_ib in block order.
                let ms = m.m.as_ptr().add(r * nb);
                let mut mt = _mm256_setzero_ps();
                for b in 0..nb {
                    let t = _mm256_mul_ps(
                        _mm256_set1_ps(*ms.add(b)),
                        _mm256_loadu_ps(g.sxt.as_ptr().add(b * GROUP)),
                    );
                    mt = _mm256_add_ps(mt, t);
                }
                let mut mts = [0.0f32; 8];
                _mm256_storeu_ps(mts.as_mut_ptr(), mt);
                for i in 0..N {
                    out[k * N + i] = hsum(acc[i]) + mts[i];
                }
            }
        }
    }

    macro_rules! dispatch {
        ($name:ident, $vnni:expr, $feat:literal) => {
            #[target_feature(enable = $feat)]
            pub unsafe fn $name(m: &QMatrix, r0: usize, nr: usize, g: &Group, out: &mut [f32]) {
                assert!(out.len() >= nr * g.v.len() && r0 + nr <= m.rows);
                match g.v.len() {
                    1 => rows_impl::<1, $vnni>(m, r0, nr, g, out),
                    2 => rows_impl::<2, $vnni>(m, r0, nr, g, out),
                    3 => rows_impl::<3, $vnni>(m, r0, nr, g, out),
                    4 => rows_impl::<4, $vnni>(m, r0, nr, g, out),
                    5 => rows_impl::<5, $vnni>(m, r0, nr, g, out),
                    6 => rows_impl::<6, $vnni>(m, r0, nr, g, out),
                    7 => rows_impl::<7, $vnni>(m, r0, nr, g, out),
                    _ => rows_impl::<8, $vnni>(m, r0, nr, g, out),
                }
            }
        };
    }
    dispatch!(rows_avx2, false, "avx2,fma");
    dispatch!(rows_vnni, true, "avx2,fma,avx512vl,avx512vnni");
}

/// Which row kernel this CPU runs (detected once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Generic,
    Avx2,
    Vnni,
}

/// Every kernel level this CPU runs, lowest first: tests run each path and compare them.
#[cfg(test)]
pub(crate) fn isas() -> Vec<Isa> {
    match isa() {
        Isa::Vnni => vec![Isa::Generic, Isa::Avx2, Isa::Vnni],
        Isa::Avx2 => vec![Isa::Generic, Isa::Avx2],
        Isa::Generic => vec![Isa::Generic],
    }
}

pub(crate) fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let vnni =
                is_x86_feature_detected!("avx512vl") && is_x86_feature_detected!("avx512vnni");
            match (avx2, vnni) {
                (true, true) => Isa::Vnni,
                (true, false) => Isa::Avx2,
                _ => Isa::Generic,
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Isa::Generic
    }
}

/// Rows `r0..r0 + nr` of `m` against the vectors of `g` into `out[k·n + i]`.
fn rows(isa: Isa, m: &QMatrix, r0: usize, nr: usize, g: &Group, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the features were detected at run time (tests force lower ones only);
        // `out` and the row range are checked inside.
        Isa::Vnni => return unsafe { x86::rows_vnni(m, r0, nr, g, out) },
        Isa::Avx2 => return unsafe { x86::rows_avx2(m, r0, nr, g, out) },
        Isa::Generic => {}
    }
    let _ = isa;
    rows_generic(m, r0, nr, g, out)
}

/// `y (+)= M · x` for one vector `x: [cols]`, `y: [rows]`: [`matmat`] with one vector. `x` is
/// first quantised to 8 bits per 32-value block (as llama.cpp does), so the inner loops are
/// integer multiply-adds; the relative error this adds is about 1e-3 of the row's scale.
pub fn matvec(m: &QMatrix, x: &[f32], y: &mut [f32], accumulate: bool) {
    matmat_with(isa(), m, x, 1, y, accumulate)
}

/// `y[n, rows] (+)= X[n, cols] · Mᵀ` for `n` vectors at once (a batch of decoding sequences,
/// or a run of draft tokens being verified), parallel over chunks of weight rows. Vectors go
/// in groups of up to 8: each weight block is read and unpacked once per group, so extra
/// vectors cost only their integer dot products and FMAs. Each output is computed exactly as
/// [`matvec`] computes it, bit for bit (its arithmetic does not depend on the other vectors).
pub fn matmat(m: &QMatrix, x: &[f32], n: usize, y: &mut [f32], accumulate: bool) {
    matmat_with(isa(), m, x, n, y, accumulate)
}

fn matmat_with(isa: Isa, m: &QMatrix, x: &[f32], n: usize, y: &mut [f32], accumulate: bool) {
    if m.ty.is_packed_float() {
        return super::fp8dot::matmat(m, x, n, y, accumulate);
    }
    if m.ty.is_k() {
        return super::kdot::matmat(isa, m, x, n, y, accumulate);
    }
    if m.ty.is_dot32() {
        return super::qdot32::matmat(isa, m, x, n, y, accumulate);
    }
    assert_eq!(x.len(), n * m.cols);
    assert_eq!(y.len(), n * m.rows);
    assert_eq!(m.data.len(), m.rows * m.row_bytes());
    assert!(m.cols.is_multiple_of(32) && m.rows * (m.cols / 32) == m.d.len());
    if n == 0 {
        return;
    }
    let xq: Vec<Q8Vec> = match n {
        1 => vec![quantize_q8(x)],
        _ => x.par_chunks_exact(m.cols).map(quantize_q8).collect(),
    };
    if n == 1 && isa == Isa::Vnni && m.ty == QType::Q8_0 && super::qdot_dec::available() {
        // One vector: the decode kernel (same integers and float operations, same bits).
        let off = super::qdot_dec::offsets(m.ty, &xq[0]);
        return super::qdot_dec::matvec(m, &xq[0], &off, y, accumulate);
    }
    let groups: Vec<Group> = xq.chunks(GROUP).map(|v| Group::new(v, m.ty, isa)).collect();
    let nrows = m.rows;
    const ROWS: usize = 32;
    let yp = super::SendPtr(y.as_mut_ptr());
    (0..nrows.div_ceil(ROWS)).into_par_iter().for_each(|c| {
        let (r0, nr) = (c * ROWS, ROWS.min(nrows - c * ROWS));
        let mut buf = [0.0f32; ROWS * GROUP];
        for (gi, g) in groups.iter().enumerate() {
            let gn = g.v.len();
            rows(isa, m, r0, nr, g, &mut buf[..nr * gn]);
            for i in 0..gn {
                // SAFETY: chunk c alone writes rows r0..r0 + nr of every output vector, all
                // inside y (n · rows elements).
                let yi = unsafe {
                    std::slice::from_raw_parts_mut(yp.get().add((gi * GROUP + i) * nrows + r0), nr)
                };
                for (k, o) in yi.iter_mut().enumerate() {
                    let v = buf[k * gn + i];
                    if accumulate {
                        *o += v;
                    } else {
                        *o = v;
                    }
                }
            }
        }
    });
}

/// Dequantise row `r` of `m` into `w` (`w = d·q + m` per block; k-quants as
/// [`super::kquant`] does).
#[inline(always)]
fn dequant_row(m: &QMatrix, r: usize, w: &mut [f32]) {
    let rb = m.row_bytes();
    if m.ty.is_k() || m.ty.is_dot32() {
        let f = super::kquant::format(m.ty.ggml_type()).expect("a k-quant format");
        return f.dequantize_seq(&m.data[r * rb..(r + 1) * rb], w);
    }
    let nb = m.cols / 32;
    let bs = m.ty.block_bytes();
    let row = &m.data[r * rb..(r + 1) * rb];
    for (b, (blk, wb)) in row.chunks_exact(bs).zip(w.chunks_exact_mut(32)).enumerate() {
        let d = m.d[r * nb + b];
        match m.ty {
            QType::Q8_0 => {
                for j in 0..32 {
                    wb[j] = d * (blk[2 + j] as i8) as f32;
                }
            }
            QType::Q4_0 | QType::Q4_1 => {
                let mm = m.m[r * nb + b];
                let qs = if m.ty == QType::Q4_0 {
                    &blk[2..18]
                } else {
                    &blk[4..20]
                };
                for j in 0..16 {
                    wb[j] = d * (qs[j] & 0x0f) as f32 + mm;
                    wb[j + 16] = d * (qs[j] >> 4) as f32 + mm;
                }
            }
            _ => unreachable!("dequantised by kquant"),
        }
    }
}

/// The whole matrix dequantised, row-major `[rows, cols]` (what a GGUF loader puts in the f32
/// parameters), for tests comparing the quantised products with the f32 path.
#[cfg(test)]
pub(crate) fn dequantize_matrix(m: &QMatrix) -> Vec<f32> {
    let mut w = vec![0.0f32; m.rows * m.cols];
    for (r, wr) in w.chunks_exact_mut(m.cols).enumerate() {
        dequant_row(m, r, wr);
    }
    w
}

/// `a (+)= w · x` lane-wise (8 lanes), fused multiply-add when `FMA`.
#[inline(always)]
fn madd<const FMA: bool>(a: &mut [f32; 8], w: &[f32], x: &[f32]) {
    for j in 0..8 {
        a[j] = if FMA {
            w[j].mul_add(x[j], a[j])
        } else {
            a[j] + w[j] * x[j]
        };
    }
}

/// Rows `r0..r0 + y.len() / n` of `X · Mᵀ` into `y` (row-major `[rows, n]`): each row is
/// dequantised once into an L1-resident buffer and multiplied into the `n` vectors, four at a
/// time with register accumulators.
#[inline(always)]
fn rows_deq<const FMA: bool>(m: &QMatrix, r0: usize, n: usize, x: &[f32], y: &mut [f32]) {
    let cols = m.cols;
    let mut w = vec![0.0f32; cols];
    for (k, yr) in y.chunks_exact_mut(n).enumerate() {
        dequant_row(m, r0 + k, &mut w);
        let mut i = 0;
        while i + 4 <= n {
            let xs = &x[i * cols..(i + 4) * cols];
            let (x0, rest) = xs.split_at(cols);
            let (x1, rest) = rest.split_at(cols);
            let (x2, x3) = rest.split_at(cols);
            let mut a = [[0.0f32; 8]; 4];
            for c in 0..cols / 8 {
                let wc = &w[c * 8..c * 8 + 8];
                madd::<FMA>(&mut a[0], wc, &x0[c * 8..c * 8 + 8]);
                madd::<FMA>(&mut a[1], wc, &x1[c * 8..c * 8 + 8]);
                madd::<FMA>(&mut a[2], wc, &x2[c * 8..c * 8 + 8]);
                madd::<FMA>(&mut a[3], wc, &x3[c * 8..c * 8 + 8]);
            }
            for (q, acc) in a.iter().enumerate() {
                yr[i + q] = acc.iter().sum();
            }
            i += 4;
        }
        while i < n {
            let xi = &x[i * cols..(i + 1) * cols];
            let mut a = [0.0f32; 8];
            for c in 0..cols / 8 {
                madd::<FMA>(&mut a, &w[c * 8..c * 8 + 8], &xi[c * 8..c * 8 + 8]);
            }
            yr[i] = a.iter().sum();
            i += 1;
        }
    }
}

/// [`rows_deq`] with AVX2/FMA intrinsics: four vectors at a time, 8-wide accumulators in
/// registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_deq_avx2(m: &QMatrix, r0: usize, n: usize, x: &[f32], y: &mut [f32]) {
    use std::arch::x86_64::*;
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
    let cols = m.cols;
    assert!(x.len() >= n * cols && cols.is_multiple_of(8));
    let mut w = vec![0.0f32; cols];
    for (k, yr) in y.chunks_exact_mut(n).enumerate() {
        dequant_row(m, r0 + k, &mut w);
        let wp = w.as_ptr();
        let mut i = 0;
        while i + 4 <= n {
            let xp = x.as_ptr().add(i * cols);
            let (mut a0, mut a1, mut a2, mut a3) = (
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
            );
            let mut c = 0;
            while c < cols {
                let wv = _mm256_loadu_ps(wp.add(c));
                a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(c)), a0);
                a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(cols + c)), a1);
                a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(2 * cols + c)), a2);
                a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(3 * cols + c)), a3);
                c += 8;
            }
            yr[i] = hsum(a0);
            yr[i + 1] = hsum(a1);
            yr[i + 2] = hsum(a2);
            yr[i + 3] = hsum(a3);
            i += 4;
        }
        while i < n {
            let xp = x.as_ptr().add(i * cols);
            let mut a = _mm256_setzero_ps();
            let mut c = 0;
            while c < cols {
                a = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(c)), _mm256_loadu_ps(xp.add(c)), a);
                c += 8;
            }
            yr[i] = hsum(a);
            i += 1;
        }
    }
}

/// `y[n, rows] (+)= X[n, cols] · Mᵀ` for a few vectors, fast: each block is dequantised once
/// and used for all `n` vectors, so the cost grows slowly with `n` (decode batches, draft
/// verification). Agrees with [`matvec`] up to f32 rounding (not bit for bit; see [`matmat`]).
pub fn matmat_fast(m: &QMatrix, x: &[f32], n: usize, y: &mut [f32], accumulate: bool) {
    if m.ty.is_packed_float() {
        // Already f32 activations, each weight decoded once per row for all the vectors.
        return super::fp8dot::matmat(m, x, n, y, accumulate);
    }
    assert_eq!(x.len(), n * m.cols);
    assert_eq!(y.len(), n * m.rows);
    assert_eq!(m.data.len(), m.rows * m.row_bytes());
    const ROWS: usize = 16;
    let avx2 = isa() != Isa::Generic;
    let mut yt = vec![0.0f32; m.rows * n];
    yt.par_chunks_mut(ROWS * n).enumerate().for_each(|(c, yc)| {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            unsafe { rows_deq_avx2(m, c * ROWS, n, x, yc) };
            return;
        }
        let _ = avx2;
        rows_deq::<false>(m, c * ROWS, n, x, yc);
    });
    for i in 0..n {
        let yi = &mut y[i * m.rows..(i + 1) * m.rows];
        for (r, out) in yi.iter_mut().enumerate() {
            let t = yt[r * n + i];
            if accumulate {
                *out += t;
            } else {
                *out = t;
            }
        }
    }
}

/// Quantise a row-major `[rows, cols]` f32 matrix to `ty` blocks (round to nearest; f16
/// scales truncated), for tests that need a quantised model without a GGUF file.
#[cfg(test)]
pub(crate) fn quantize_matrix(ty: QType, rows: usize, cols: usize, w: &[f32]) -> QMatrix {
    assert!(cols.is_multiple_of(32) && w.len() == rows * cols);
    let h = super::f16::f32_to_f16_truncated;
    let mut data = Vec::with_capacity(rows * cols / 32 * ty.block_bytes());
    for blk in w.chunks_exact(32) {
        match ty {
            QType::Q8_0 => {
                let amax = blk.iter().fold(0.0f32, |a, &x| a.max(x.abs()));
                let hd = h(amax / 127.0);
                let d = f16_to_f32(&hd);
                data.extend_from_slice(&hd);
                for &x in blk {
                    let q = if d > 0.0 {
                        (x / d).round().clamp(-127.0, 127.0)
                    } else {
                        0.0
                    };
                    data.push(q as i8 as u8);
                }
            }
            QType::Q4_0 | QType::Q4_1 => {
                let (lo, hi) = blk
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
                let (d, m) = if ty == QType::Q4_0 {
                    // Symmetric: w = d·(q − 8).
                    let amax = lo.abs().max(hi.abs());
                    let hd = h(amax / 7.0);
                    data.extend_from_slice(&hd);
                    (f16_to_f32(&hd), -8.0 * f16_to_f32(&hd))
                } else {
                    let (hd, hm) = (h((hi - lo) / 15.0), h(lo));
                    data.extend_from_slice(&hd);
                    data.extend_from_slice(&hm);
                    (f16_to_f32(&hd), f16_to_f32(&hm))
                };
                let q = |x: f32| -> u8 {
                    if d > 0.0 {
                        ((x - m) / d).round().clamp(0.0, 15.0) as u8
                    } else {
                        0
                    }
                };
                for j in 0..16 {
                    data.push(q(blk[j]) | (q(blk[j + 16]) << 4));
                }
            }
            _ => unimplemented!("quantize_matrix: Q8_0, Q4_0, Q4_1 only"),
        }
    }
    QMatrix::new(ty, rows, cols, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Random blocks with scale d = 1/16 (and, for `Q4_1`, minimum m = -0.5).
    fn random_qmatrix(r: &mut Rng, ty: QType, rows: usize, cols: usize) -> QMatrix {
        let bb = ty.block_bytes();
        let mut data = vec![0u8; rows * cols / 32 * bb];
        for blk in data.chunks_exact_mut(bb) {
            for b in blk.iter_mut() {
                *b = (r.next_u64() & 0xff) as u8;
            }
            blk[..2].copy_from_slice(&0x2c00u16.to_le_bytes());
            if ty == QType::Q4_1 {
                blk[2..4].copy_from_slice(&0xb800u16.to_le_bytes());
            }
        }
        QMatrix::new(ty, rows, cols, data)
    }

    #[test]
    fn matvec_equals_dequantised_product() {
        let mut r = Rng::new(3);
        for (ty, gg) in [(QType::Q8_0, 8u32), (QType::Q4_0, 2), (QType::Q4_1, 3)] {
            let (rows, cols) = (70, 96);
            let m = random_qmatrix(&mut r, ty, rows, cols);
            let mut w = vec![0.0f32; rows * cols];
            crate::io::gguf::dequantize(gg, &m.data, &mut w).unwrap();
            let mut x = vec![0.0f32; cols];
            r.fill_normal(&mut x, 1.0);
            let want: Vec<f32> = (0..rows)
                .map(|i| 1.0 + (0..cols).map(|j| w[i * cols + j] * x[j]).sum::<f32>())
                .collect();
            // Row scale: Σ|w·x| bounds the error of 8-bit activations (~1/254 per term).
            let scale: Vec<f32> = (0..rows)
                .map(|i| {
                    (0..cols)
                        .map(|j| (w[i * cols + j] * x[j]).abs())
                        .sum::<f32>()
                })
                .collect();
            let mut generic = vec![1.0f32; rows];
            matmat_with(Isa::Generic, &m, &x, 1, &mut generic, true);
            for i in 0..rows {
                assert!(
                    (generic[i] - want[i]).abs() < 5e-3 * scale[i] + 1e-4,
                    "{ty:?} row {i}: {} vs {}",
                    generic[i],
                    want[i]
                );
            }
            // Every SIMD path computes the same integer sums as the portable one.
            for isa_ in [Isa::Avx2, Isa::Vnni] {
                if isa_ == Isa::Vnni && isa() != Isa::Vnni || isa() == Isa::Generic {
                    continue;
                }
                let mut y = vec![1.0f32; rows];
                matmat_with(isa_, &m, &x, 1, &mut y, true);
                for i in 0..rows {
                    assert!(
                        (y[i] - generic[i]).abs() < 1e-5 * (1.0 + scale[i]),
                        "{ty:?} {isa_:?} row {i}: {} vs {}",
                        y[i],
                        generic[i]
                    );
                }
            }
        }
    }

    /// The ISAs this CPU can run.
    #[test]
    fn matmat_equals_matvec_bit_for_bit() {
        // Every vector of a multi-vector product (1..=19 vectors: partial and several groups
        // of 8) equals the one-vector product bit for bit, on every kernel; the AVX2 and VNNI
        // kernels also agree with each other bit for bit (same integer sums, same float ops).
        let mut r = Rng::new(5);
        for ty in [QType::Q8_0, QType::Q4_0, QType::Q4_1] {
            let (rows, cols) = (77, 160);
            let m = random_qmatrix(&mut r, ty, rows, cols);
            for n in [1usize, 2, 3, 5, 8, 9, 19] {
                let mut x = vec![0.0f32; n * cols];
                r.fill_normal(&mut x, 1.0);
                let mut simd: Option<Vec<f32>> = None;
                for isa_ in isas() {
                    let mut y = vec![0.5f32; n * rows];
                    matmat_with(isa_, &m, &x, n, &mut y, true);
                    for i in 0..n {
                        let mut yi = vec![0.5f32; rows];
                        matmat_with(isa_, &m, &x[i * cols..(i + 1) * cols], 1, &mut yi, true);
                        assert_eq!(
                            &y[i * rows..(i + 1) * rows],
                            &yi[..],
                            "{ty:?} {isa_:?} n {n} vector {i}"
                        );
                    }
                    if isa_ != Isa::Generic {
                        match &simd {
                            Some(s) => assert_eq!(s, &y, "{ty:?} n {n}: AVX2 vs VNNI"),
                            None => simd = Some(y),
                        }
                    }
                }
                // Overwrite mode writes the same values.
                let mut a = vec![0.0f32; n * rows];
                let mut b = vec![7.0f32; n * rows];
                matmat(&m, &x, n, &mut a, true);
                matmat(&m, &x, n, &mut b, false);
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn quantize_matrix_round_trips_within_a_step() {
        let mut r = Rng::new(8);
        let (rows, cols) = (6, 64);
        let mut w = vec![0.0f32; rows * cols];
        r.fill_normal(&mut w, 0.3);
        for (ty, gg, step) in [
            (QType::Q8_0, 8u32, 0.02),
            (QType::Q4_0, 2, 0.2),
            (QType::Q4_1, 3, 0.15),
        ] {
            let q = quantize_matrix(ty, rows, cols, &w);
            let mut back = vec![0.0f32; rows * cols];
            crate::io::gguf::dequantize(gg, &q.data, &mut back).unwrap();
            for (a, b) in w.iter().zip(&back) {
                assert!((a - b).abs() < step, "{ty:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn matmat_fast_agrees_with_matvec() {
        let mut r = Rng::new(6);
        for ty in [QType::Q8_0, QType::Q4_0, QType::Q4_1] {
            let (rows, cols, n) = (45, 96, 7);
            let m = random_qmatrix(&mut r, ty, rows, cols);
            let mut x = vec![0.0f32; n * cols];
            r.fill_normal(&mut x, 1.0);
            let mut y = vec![0.5f32; n * rows];
            matmat_fast(&m, &x, n, &mut y, true);
            // matmat_fast keeps f32 activations: compare with the dequantised f32 product.
            let mut w = vec![0.0f32; cols];
            for i in 0..n {
                let xi = &x[i * cols..(i + 1) * cols];
                for (rr, a) in y[i * rows..(i + 1) * rows].iter().enumerate() {
                    dequant_row(&m, rr, &mut w);
                    let b = 0.5 + w.iter().zip(xi).map(|(p, q)| p * q).sum::<f32>();
                    assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{ty:?}: {a} vs {b}");
                }
            }
        }
    }
}
