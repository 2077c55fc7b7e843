//! Matrix–vector products straight from quantised GGUF blocks, for decoding: a token's forward
//! pass reads every weight once, so reading 4.5–8.5 bits per weight instead of 32 is what
//! sets the decode speed.
//!
//! Rows are independent runs of 32-value blocks (`Q8_0`, `Q4_0`, `Q4_1`; see `gguf.rs` for
//! the formats). For a block with scale `d` (and minimum `m` for `Q4_1`):
//! `Σ_j w_j x_j = d · Σ_j q_j x_j + m · Σ_j x_j`, so the block sums of `x` are computed once
//! per vector. As in llama.cpp, `x` is first quantised to 8 bits per 32-value block
//! (`x ≈ dx·qx`), so each block is an integer dot product `Σ q_j·qx_j` (AVX2 `maddubs`, or one
//! AVX-512 VNNI `vpdpbusd`, chosen at run time; a portable loop otherwise) and one FMA with
//! `d·dx`.

use rayon::prelude::*;

/// Block formats with 32 values per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QType {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl QType {
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q8_0 => 34,
        }
    }
}

/// A row-major `[rows, cols]` matrix of quantised blocks (`cols` a multiple of 32), with the
/// blocks' f16 scales (and minimums) converted to f32 once, at construction.
#[derive(Clone, Debug)]
pub struct QMatrix {
    pub ty: QType,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
    d: Vec<f32>,
    m: Vec<f32>,
}

impl QMatrix {
    pub fn new(ty: QType, rows: usize, cols: usize, data: Vec<u8>) -> Self {
        let bs = ty.block_bytes();
        let d = data.chunks_exact(bs).map(|b| half(&b[..2])).collect();
        let m = match ty {
            QType::Q4_1 => data.chunks_exact(bs).map(|b| half(&b[2..4])).collect(),
            QType::Q4_0 => data
                .chunks_exact(bs)
                .map(|b| -8.0 * half(&b[..2]))
                .collect(),
            QType::Q8_0 => Vec::new(),
        };
        QMatrix {
            ty,
            rows,
            cols,
            data,
            d,
            m,
        }
    }

    pub fn row_bytes(&self) -> usize {
        self.cols / 32 * self.ty.block_bytes()
    }
}

#[inline(always)]
fn half(b: &[u8]) -> f32 {
    crate::gguf::f16(b)
}

/// The input vector quantised like llama.cpp's `Q8_1`: per 32-value block a scale `dx`,
/// 32 signed bytes `qx` with `x ≈ dx·qx`, and `sx = dx·Σ qx` (for the weight minimums).
struct Q8Vec {
    qx: Vec<i8>,
    dx: Vec<f32>,
    sx: Vec<f32>,
}

fn quantize_q8(x: &[f32]) -> Q8Vec {
    let nb = x.len() / 32;
    let mut v = Q8Vec {
        qx: vec![0; x.len()],
        dx: vec![0.0; nb],
        sx: vec![0.0; nb],
    };
    for (b, xb) in x.chunks_exact(32).enumerate() {
        let amax = xb.iter().fold(0.0f32, |a, &t| a.max(t.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut s = 0i32;
        for (q, &t) in v.qx[b * 32..(b + 1) * 32].iter_mut().zip(xb) {
            *q = (t * id).round() as i8;
            s += *q as i32;
        }
        v.dx[b] = d;
        v.sx[b] = d * s as f32;
    }
    v
}

/// `Σ_b m_b · sx_b`: the contribution of the blocks' minimums (`Q4_1`) or offsets (`Q4_0`).
#[inline(always)]
fn min_term(ms: &[f32], sx: &[f32]) -> f32 {
    ms.iter().zip(sx).map(|(m, s)| m * s).sum()
}

/// One row's dot product with integer block sums, portable: `Σ_b d_b·dx_b·Σ_j q_j·qx_j`
/// (+ the minimum term). The SIMD kernels compute exactly these integer sums.
fn row_dot_generic(ty: QType, row: &[u8], ds: &[f32], ms: &[f32], x: &Q8Vec) -> f32 {
    let bs = ty.block_bytes();
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
        };
        acc += ds[b] * x.dx[b] * isum as f32;
    }
    if ty == QType::Q8_0 {
        acc
    } else {
        acc + min_term(ms, &x.sx)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{min_term, Q8Vec, QType};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The 32 weights of a block as bytes in element order: unsigned nibbles `0..=15` for
    /// `Q4_*` (byte `j` holds elements `j` and `j + 16`), or `|w|` for `Q8_0` with the sign moved
    /// onto the activations (the `maddubs` operand order is unsigned × signed).
    #[inline(always)]
    unsafe fn block_operands(ty: QType, p: *const u8, x: __m256i) -> (__m256i, __m256i) {
        match ty {
            QType::Q8_0 => {
                let w = _mm256_loadu_si256(p as *const __m256i);
                (_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
            }
            _ => {
                let t = _mm_loadu_si128(p as *const __m128i);
                let w = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
                (_mm256_and_si256(w, _mm256_set1_epi8(0x0f)), x)
            }
        }
    }

    /// AVX2: `maddubs` (u8·i8 → i16 pairs, no overflow: 2·15·127 and 2·128·127 < 2¹⁵) then
    /// `madd` with ones (→ i32), one FMA per block with `d·dx`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_dot_avx2(ty: QType, row: &[u8], ds: &[f32], ms: &[f32], x: &Q8Vec) -> f32 {
        let bs = ty.block_bytes();
        let qoff = bs - if ty == QType::Q8_0 { 32 } else { 16 };
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        for b in 0..ds.len() {
            let xv = _mm256_loadu_si256(x.qx.as_ptr().add(b * 32) as *const __m256i);
            let (w, xs) = block_operands(ty, row.as_ptr().add(b * bs + qoff), xv);
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xs), ones);
            let scale = _mm256_set1_ps(*ds.get_unchecked(b) * *x.dx.get_unchecked(b));
            acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc);
        }
        let dot = hsum(acc);
        if ty == QType::Q8_0 {
            dot
        } else {
            dot + min_term(ms, &x.sx)
        }
    }

    /// AVX-512 VNNI on 256-bit vectors: `vpdpbusd` does the u8·i8 products and the i32 sums in
    /// one instruction. Same integer results as the AVX2 path.
    #[target_feature(enable = "avx2,fma,avx512vl,avx512vnni")]
    pub unsafe fn row_dot_vnni(ty: QType, row: &[u8], ds: &[f32], ms: &[f32], x: &Q8Vec) -> f32 {
        let bs = ty.block_bytes();
        let qoff = bs - if ty == QType::Q8_0 { 32 } else { 16 };
        let mut acc = _mm256_setzero_ps();
        for b in 0..ds.len() {
            let xv = _mm256_loadu_si256(x.qx.as_ptr().add(b * 32) as *const __m256i);
            let (w, xs) = block_operands(ty, row.as_ptr().add(b * bs + qoff), xv);
            let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, xs);
            let scale = _mm256_set1_ps(*ds.get_unchecked(b) * *x.dx.get_unchecked(b));
            acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc);
        }
        let dot = hsum(acc);
        if ty == QType::Q8_0 {
            dot
        } else {
            dot + min_term(ms, &x.sx)
        }
    }
}

/// Which row kernel this CPU runs (detected once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Generic,
    Avx2,
    Vnni,
}

fn isa() -> Isa {
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

fn row_dot(isa: Isa, ty: QType, row: &[u8], ds: &[f32], ms: &[f32], x: &Q8Vec) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the features were detected at run time; slices have `ds.len()` blocks.
        Isa::Vnni => return unsafe { x86::row_dot_vnni(ty, row, ds, ms, x) },
        Isa::Avx2 => return unsafe { x86::row_dot_avx2(ty, row, ds, ms, x) },
        Isa::Generic => {}
    }
    let _ = isa;
    row_dot_generic(ty, row, ds, ms, x)
}

/// `y (+)= M · x` for one vector `x: [cols]`, `y: [rows]`, parallel over row chunks. `x` is
/// first quantised to 8 bits per 32-value block (as llama.cpp does), so the inner loops are
/// integer multiply-adds; the relative error this adds is about 1e-3 of the row's scale.
pub fn matvec(m: &QMatrix, x: &[f32], y: &mut [f32], accumulate: bool) {
    matvec_with(isa(), m, x, y, accumulate)
}

fn matvec_with(isa: Isa, m: &QMatrix, x: &[f32], y: &mut [f32], accumulate: bool) {
    assert_eq!(x.len(), m.cols);
    assert_eq!(y.len(), m.rows);
    assert_eq!(m.data.len(), m.rows * m.row_bytes());
    assert!(m.cols.is_multiple_of(32) && m.rows * (m.cols / 32) == m.d.len());
    let xq = quantize_q8(x);
    let (rb, nb) = (m.row_bytes(), m.cols / 32);
    const ROWS: usize = 64;
    y.par_chunks_mut(ROWS).enumerate().for_each(|(c, yc)| {
        for (i, yi) in yc.iter_mut().enumerate() {
            let r = c * ROWS + i;
            let ms = if m.m.is_empty() {
                &[][..]
            } else {
                &m.m[r * nb..(r + 1) * nb]
            };
            let v = row_dot(
                isa,
                m.ty,
                &m.data[r * rb..(r + 1) * rb],
                &m.d[r * nb..(r + 1) * nb],
                ms,
                &xq,
            );
            if accumulate {
                *yi += v;
            } else {
                *yi = v;
            }
        }
    });
}

/// `y[n, rows] (+)= X[n, cols] · Mᵀ` for `n` vectors at once (a batch of decoding sequences,
/// or a run of draft tokens being verified): each weight row chunk is read once for all of
/// them. Each output is computed exactly as [`matvec`] computes it, bit for bit.
pub fn matmat(m: &QMatrix, x: &[f32], n: usize, y: &mut [f32], accumulate: bool) {
    if n == 1 {
        return matvec(m, x, y, accumulate);
    }
    assert_eq!(x.len(), n * m.cols);
    assert_eq!(y.len(), n * m.rows);
    assert_eq!(m.data.len(), m.rows * m.row_bytes());
    let isa = isa();
    let xq: Vec<Q8Vec> = x.chunks_exact(m.cols).map(quantize_q8).collect();
    let (rb, nb) = (m.row_bytes(), m.cols / 32);
    const ROWS: usize = 32;
    // yt[r, i]: weight row r against vector i (row chunks contiguous for the parallel loop).
    let mut yt = vec![0.0f32; m.rows * n];
    yt.par_chunks_mut(ROWS * n).enumerate().for_each(|(c, yc)| {
        for (ri, out) in yc.chunks_exact_mut(n).enumerate() {
            let r = c * ROWS + ri;
            let ms = if m.m.is_empty() {
                &[][..]
            } else {
                &m.m[r * nb..(r + 1) * nb]
            };
            let (row, ds) = (&m.data[r * rb..(r + 1) * rb], &m.d[r * nb..(r + 1) * nb]);
            for (o, xi) in out.iter_mut().zip(&xq) {
                *o = row_dot(isa, m.ty, row, ds, ms, xi);
            }
        }
    });
    for (i, yi) in y.chunks_exact_mut(m.rows).enumerate() {
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

/// Dequantise row `r` of `m` into `w` (`w = d·q + m` per block).
#[inline(always)]
fn dequant_row(m: &QMatrix, r: usize, w: &mut [f32]) {
    let rb = m.row_bytes();
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
        }
    }
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
            crate::gguf::dequantize(gg, &m.data, &mut w).unwrap();
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
            matvec_with(Isa::Generic, &m, &x, &mut generic, true);
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
                matvec_with(isa_, &m, &x, &mut y, true);
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

    #[test]
    fn matmat_equals_matvec_bit_for_bit() {
        let mut r = Rng::new(5);
        for ty in [QType::Q8_0, QType::Q4_0, QType::Q4_1] {
            let (rows, cols, n) = (77, 64, 5);
            let m = random_qmatrix(&mut r, ty, rows, cols);
            let mut x = vec![0.0f32; n * cols];
            r.fill_normal(&mut x, 1.0);
            let mut y = vec![0.5f32; n * rows];
            matmat(&m, &x, n, &mut y, true);
            for i in 0..n {
                let mut yi = vec![0.5f32; rows];
                matvec(&m, &x[i * cols..(i + 1) * cols], &mut yi, true);
                assert_eq!(&y[i * rows..(i + 1) * rows], &yi[..], "{ty:?} vector {i}");
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
