//! A linear weight stored as a stack of row blocks of different quantisation types: a fused
//! q|k|v or gate|up of a GGUF file whose parts llama.cpp quantised differently (`Q4_K_M`
//! writes `attn_v` in `Q6_K` beside `Q4_K` `attn_q`/`attn_k`, and rows that are not a
//! multiple of 256 fall back to 32-value types). Each part is multiplied by its own quantised
//! kernel, so every output is exactly the one its part alone gives.
//!
//! `W = [M_0; M_1; …]` (`[Σ rows_p, cols]`): `y[n, Σ rows_p] (+)= X[n, cols] · Wᵀ` is, for
//! each part `p` at column offset `o_p`, `y[:, o_p..o_p + rows_p] (+)= X · M_pᵀ`.

use super::quant::{self, QMatrix};

/// Rows of the stack (`Σ rows_p`).
pub fn rows(parts: &[QMatrix]) -> usize {
    parts.iter().map(|p| p.rows).sum()
}

/// `y[n, Σ rows_p] (+)= X[n, cols] · Wᵀ` part by part, with [`quant::matmat`] (8-bit
/// activations, integer sums) or, when `fast`, [`quant::matmat_fast`] (f32 activations).
pub fn matmat(parts: &[QMatrix], x: &[f32], n: usize, y: &mut [f32], accumulate: bool, fast: bool) {
    let run = |p: &QMatrix, y: &mut [f32], acc: bool| {
        if fast {
            quant::matmat_fast(p, x, n, y, acc)
        } else {
            quant::matmat(p, x, n, y, acc)
        }
    };
    if let [p] = parts {
        return run(p, y, accumulate);
    }
    let total = rows(parts);
    assert_eq!(y.len(), n * total);
    let mut off = 0;
    for p in parts {
        let mut t = vec![0.0f32; n * p.rows];
        run(p, &mut t, false);
        for (yr, tr) in y.chunks_exact_mut(total).zip(t.chunks_exact(p.rows)) {
            let o = &mut yr[off..off + p.rows];
            if accumulate {
                o.iter_mut().zip(tr).for_each(|(a, b)| *a += b);
            } else {
                o.copy_from_slice(tr);
            }
        }
        off += p.rows;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::quant::{quantize_matrix, QType};
    use crate::rng::Rng;

    /// A stack of `Q8_0`, `Q4_0` and `Q4_1` parts equals each part's own product in its
    /// columns, bit for bit, for several vectors, with and without accumulation.
    #[test]
    fn parts_equal_their_own_products() {
        let mut r = Rng::new(5);
        let (cols, n) = (64, 3);
        let parts: Vec<QMatrix> = [(QType::Q8_0, 5), (QType::Q4_0, 3), (QType::Q4_1, 7)]
            .iter()
            .map(|&(ty, rows)| {
                let mut w = vec![0.0f32; rows * cols];
                r.fill_normal(&mut w, 1.0);
                quantize_matrix(ty, rows, cols, &w)
            })
            .collect();
        let mut x = vec![0.0f32; n * cols];
        r.fill_normal(&mut x, 1.0);
        for fast in [false, true] {
            let mut y = vec![0.5f32; n * 15];
            matmat(&parts, &x, n, &mut y, true, fast);
            let mut off = 0;
            for p in &parts {
                let mut t = vec![0.0f32; n * p.rows];
                if fast {
                    quant::matmat_fast(p, &x, n, &mut t, false);
                } else {
                    quant::matmat(p, &x, n, &mut t, false);
                }
                for i in 0..n {
                    for k in 0..p.rows {
                        assert_eq!(y[i * 15 + off + k], 0.5 + t[i * p.rows + k]);
                    }
                }
                off += p.rows;
            }
        }
    }
}
