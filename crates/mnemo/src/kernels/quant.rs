//! Matrix–vector products straight from quantised GGUF blocks, for decoding: a token's forward
//! pass reads every weight once, so reading 4.5–8.5 bits per weight instead of 32 is what
//! sets the decode speed.
//!
//! Rows are independent runs of 32-value blocks (`Q8_0`, `Q4_0`, `Q4_1`; see `gguf.rs` for
//! the formats). For a block with scale `d` (and minimum `m` for `Q4_1`):
//! `Σ_j w_j x_j = d · Σ_j q_j x_j + m · Σ_j x_j`, so the block sums of `x` are computed once
//! per vector. The inner loops are written to auto-vectorise and compiled twice, for AVX2+FMA
//! and for the baseline, chosen at run time.

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

/// One row's dot product. Lane-wise accumulators (no reduction inside the block loop) let the
/// compiler vectorise the loops; the lanes are summed once at the end.
#[inline(always)]
fn row_dot(ty: QType, row: &[u8], ds: &[f32], ms: &[f32], x: &[f32], xsum: &[f32]) -> f32 {
    match ty {
        QType::Q8_0 => {
            let mut v = [0.0f32; 32];
            for ((blk, xb), &d) in row.chunks_exact(34).zip(x.chunks_exact(32)).zip(ds) {
                let q: &[u8; 32] = blk[2..34].try_into().expect("32 bytes");
                let xb: &[f32; 32] = xb.try_into().expect("32 values");
                for j in 0..32 {
                    v[j] += d * ((q[j] as i8) as f32 * xb[j]);
                }
            }
            v.iter().sum()
        }
        QType::Q4_0 | QType::Q4_1 => {
            let bs = ty.block_bytes();
            let mut v = [0.0f32; 16];
            let mut tail = 0.0f32;
            for (b, (blk, xb)) in row.chunks_exact(bs).zip(x.chunks_exact(32)).enumerate() {
                let (d, m) = (ds[b], ms[b]);
                let qs = if ty == QType::Q4_0 {
                    &blk[2..18]
                } else {
                    &blk[4..20]
                };
                let qs: &[u8; 16] = qs.try_into().expect("16 bytes");
                let (xl, xh) = xb.split_at(16);
                let xl: &[f32; 16] = xl.try_into().expect("16 values");
                let xh: &[f32; 16] = xh.try_into().expect("16 values");
                for j in 0..16 {
                    v[j] += d * ((qs[j] & 0x0f) as f32 * xl[j] + (qs[j] >> 4) as f32 * xh[j]);
                }
                tail += m * xsum[b];
            }
            v.iter().sum::<f32>() + tail
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(m: &QMatrix, r0: usize, y: &mut [f32], x: &[f32], xsum: &[f32], acc: bool) {
    rows_generic(m, r0, y, x, xsum, acc)
}

#[inline(always)]
fn rows_generic(m: &QMatrix, r0: usize, y: &mut [f32], x: &[f32], xsum: &[f32], acc: bool) {
    let rb = m.row_bytes();
    let nb = m.cols / 32;
    for (i, yi) in y.iter_mut().enumerate() {
        let r = r0 + i;
        let ms = if m.m.is_empty() {
            &[][..]
        } else {
            &m.m[r * nb..(r + 1) * nb]
        };
        let v = row_dot(
            m.ty,
            &m.data[r * rb..(r + 1) * rb],
            &m.d[r * nb..(r + 1) * nb],
            ms,
            x,
            xsum,
        );
        if acc {
            *yi += v;
        } else {
            *yi = v;
        }
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `y (+)= M · x` for one vector `x: [cols]`, `y: [rows]`, parallel over row chunks.
pub fn matvec(m: &QMatrix, x: &[f32], y: &mut [f32], accumulate: bool) {
    assert_eq!(x.len(), m.cols);
    assert_eq!(y.len(), m.rows);
    assert_eq!(m.data.len(), m.rows * m.row_bytes());
    let xsum: Vec<f32> = x.chunks_exact(32).map(|c| c.iter().sum()).collect();
    const ROWS: usize = 64;
    let avx2 = has_avx2();
    y.par_chunks_mut(ROWS).enumerate().for_each(|(c, yc)| {
        let r0 = c * ROWS;
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            unsafe { rows_avx2(m, r0, yc, x, &xsum, accumulate) };
            return;
        }
        let _ = avx2;
        rows_generic(m, r0, yc, x, &xsum, accumulate);
    });
}

/// `y[n, rows] (+)= X[n, cols] · Mᵀ` for `n` vectors at once: every weight row is read once
/// for all of them (a batch of decoding sequences, or a run of draft tokens being verified).
/// Each output is computed exactly as [`matvec`] computes it, bit for bit.
pub fn matmat(m: &QMatrix, x: &[f32], n: usize, y: &mut [f32], accumulate: bool) {
    if n == 1 {
        return matvec(m, x, y, accumulate);
    }
    assert_eq!(x.len(), n * m.cols);
    assert_eq!(y.len(), n * m.rows);
    assert_eq!(m.data.len(), m.rows * m.row_bytes());
    let xsum: Vec<f32> = x.chunks_exact(32).map(|c| c.iter().sum()).collect();
    let nb = m.cols / 32;
    const ROWS: usize = 32;
    let avx2 = has_avx2();
    // yt[r, i]: weight row r against vector i (transposed so row chunks are contiguous).
    let mut yt = vec![0.0f32; m.rows * n];
    yt.par_chunks_mut(ROWS * n).enumerate().for_each(|(c, yc)| {
        let r0 = c * ROWS;
        let nr = yc.len() / n;
        let mut tmp = vec![0.0f32; nr];
        for i in 0..n {
            let xi = &x[i * m.cols..(i + 1) * m.cols];
            let si = &xsum[i * nb..(i + 1) * nb];
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                unsafe { rows_avx2(m, r0, &mut tmp, xi, si, false) };
            } else {
                rows_generic(m, r0, &mut tmp, xi, si, false);
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = avx2;
                rows_generic(m, r0, &mut tmp, xi, si, false);
            }
            for (r, &t) in tmp.iter().enumerate() {
                yc[r * n + i] = t;
            }
        }
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
    assert!(x.len() >= n * cols && cols % 8 == 0);
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
    let avx2 = has_avx2();
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

    #[test]
    fn matvec_equals_dequantised_product() {
        let mut r = Rng::new(3);
        for (ty, gg) in [(QType::Q8_0, 8u32), (QType::Q4_0, 2), (QType::Q4_1, 3)] {
            let (rows, cols) = (70, 96);
            let bb = ty.block_bytes();
            let mut data = vec![0u8; rows * cols / 32 * bb];
            for blk in data.chunks_exact_mut(bb) {
                for b in blk.iter_mut() {
                    *b = (r.next_u64() & 0xff) as u8;
                }
                blk[..2].copy_from_slice(&0x2c00u16.to_le_bytes()); // d = 1/16
                if ty == QType::Q4_1 {
                    blk[2..4].copy_from_slice(&0xb800u16.to_le_bytes()); // m = -0.5
                }
            }
            let m = QMatrix::new(ty, rows, cols, data);
            let mut w = vec![0.0f32; rows * cols];
            crate::gguf::dequantize(gg, &m.data, &mut w).unwrap();
            let mut x = vec![0.0f32; cols];
            r.fill_normal(&mut x, 1.0);
            let mut y = vec![1.0f32; rows];
            matvec(&m, &x, &mut y, true);
            for i in 0..rows {
                let want: f32 = 1.0 + (0..cols).map(|j| w[i * cols + j] * x[j]).sum::<f32>();
                assert!(
                    (y[i] - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "{ty:?} row {i}: {} vs {want}",
                    y[i]
                );
            }
        }
    }

    #[test]
    fn matmat_equals_matvec_bit_for_bit() {
        let mut r = Rng::new(5);
        for ty in [QType::Q8_0, QType::Q4_0, QType::Q4_1] {
            let (rows, cols, n) = (77, 64, 5);
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
            let m = QMatrix::new(ty, rows, cols, data);
            let mut x = vec![0.0f32; n * cols];
            r.fill_normal(&mut x, 1.0);
            let mut y = vec![0.5f32; n * rows];
            matmat(&m, &x, n, &mut y, true);
            for i in 0..n {
                let mut want = vec![0.5f32; rows];
                matvec(&m, &x[i * cols..(i + 1) * cols], &mut want, true);
                assert_eq!(&y[i * rows..(i + 1) * rows], &want[..], "{ty:?} vector {i}");
            }
        }
    }

    #[test]
    fn matmat_fast_agrees_with_matvec() {
        let mut r = Rng::new(6);
        for ty in [QType::Q8_0, QType::Q4_0, QType::Q4_1] {
            let (rows, cols, n) = (45, 96, 7);
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
            let m = QMatrix::new(ty, rows, cols, data);
            let mut x = vec![0.0f32; n * cols];
            r.fill_normal(&mut x, 1.0);
            let mut y = vec![0.5f32; n * rows];
            matmat_fast(&m, &x, n, &mut y, true);
            for i in 0..n {
                let mut want = vec![0.5f32; rows];
                matvec(&m, &x[i * cols..(i + 1) * cols], &mut want, true);
                for (a, b) in y[i * rows..(i + 1) * rows].iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{ty:?}: {a} vs {b}");
                }
            }
        }
    }
}
