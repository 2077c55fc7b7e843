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
}
