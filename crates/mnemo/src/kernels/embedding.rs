//! Token embedding: gather rows of `E: [V, d]`; backward scatter-adds into `dE`.
//!
//! The scatter is parallel over column slices of `d` (each task owns its columns for every
//! token), so there are no write conflicts and the summation order is fixed: deterministic.

use rayon::prelude::*;

pub fn forward(out: &mut [f32], table: &[f32], tokens: &[u32], d: usize) {
    out.par_chunks_mut(d)
        .zip(tokens.par_iter())
        .for_each(|(o, &t)| {
            let t = t as usize;
            o.copy_from_slice(&table[t * d..(t + 1) * d]);
        });
}

/// `dE[tokens[i]] += dout[i]`.
pub fn backward(dtable: &mut [f32], dout: &[f32], tokens: &[u32], d: usize) {
    const COLS: usize = 16;
    let n_slices = d.div_ceil(COLS);
    // Each task gets a disjoint set of columns; hand out raw pointers wrapped for Send.
    let p = super::SendPtr(dtable.as_mut_ptr());
    let len = dtable.len();
    (0..n_slices).into_par_iter().for_each(|s| {
        let c0 = s * COLS;
        let c1 = (c0 + COLS).min(d);
        for (i, &t) in tokens.iter().enumerate() {
            let t = t as usize;
            let src = &dout[i * d + c0..i * d + c1];
            assert!(t * d + c1 <= len);
            // SAFETY: in bounds (asserted); columns c0..c1 are written by this task only.
            let dst = unsafe { std::slice::from_raw_parts_mut(p.get().add(t * d + c0), c1 - c0) };
            for (a, b) in dst.iter_mut().zip(src) {
                *a += b;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_backward_sums_repeated_tokens() {
        let (v, d) = (5, 40);
        let table: Vec<f32> = (0..v * d).map(|i| i as f32).collect();
        let toks = [3u32, 1, 3];
        let mut out = vec![0.0; 3 * d];
        forward(&mut out, &table, &toks, d);
        assert_eq!(&out[..d], &table[3 * d..4 * d]);
        let dout: Vec<f32> = (0..3 * d).map(|i| (i % 7) as f32).collect();
        let mut dt = vec![0.0; v * d];
        backward(&mut dt, &dout, &toks, d);
        for c in 0..d {
            assert_eq!(dt[3 * d + c], dout[c] + dout[2 * d + c]);
            assert_eq!(dt[d + c], dout[d + c]);
            assert_eq!(dt[c], 0.0);
        }
        // Gradient check: the map is linear, so a finite difference is exact up to rounding.
        let g: Vec<f32> = (0..3 * d).map(|i| ((i * 13) % 5) as f32 - 2.0).collect();
        let loss = |t: &[f32]| {
            let mut o = vec![0.0; 3 * d];
            forward(&mut o, t, &toks, d);
            o.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let mut dt = vec![0.0; v * d];
        backward(&mut dt, &g, &toks, d);
        crate::kernels::gradcheck::check(&table, &dt, loss, 0.5, 1e-4);
    }
}
