//! Matrix multiplication through the `gemm` crate (AVX-512 micro-kernels chosen at run time when
//! the CPU has them, AVX2/FMA or scalar otherwise).
//!
//! Every matrix is a row-major f32 buffer described by a [`MatRef`]: pointer offset, row stride
//! and column stride, so transposes and sub-blocks (one attention head inside a fused QKV row)
//! cost nothing.
//!
//! Backward of `C = A·B` (shapes `[m,k]·[k,n]`): `dA = dC·Bᵀ`, `dB = Aᵀ·dC`; both are plain calls
//! of [`gemm`] with transposed views, see [`linear_forward`] / [`linear_backward`].

use gemm::Parallelism;

/// Read-only strided view of a matrix inside a slice.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// Contiguous row-major `[rows, cols]`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    /// Row-major `[rows, cols]` with a given row stride (a column block of a wider matrix).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }
    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
    fn check(&self, what: &str) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            assert!(last < self.data.len(), "{what}: view exceeds its buffer");
        }
    }
}

/// Whether a product is big enough to be worth splitting across threads.
fn parallelism(m: usize, n: usize, k: usize, allow: bool) -> Parallelism {
    if allow && (m * n * k) >= 48 * 48 * 48 && rayon::current_num_threads() > 1 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    }
}

/// `C = beta·C + alpha·A·B`, with `beta ∈ {0, 1}` given by `accumulate`.
///
/// `c` is row-major `[a.rows, b.cols]` with row stride `c_rs`. `parallel` allows the call to use
/// the rayon pool (pass `false` from inside an already-parallel loop).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    c: &mut [f32],
    c_rs: usize,
    a: MatRef,
    b: MatRef,
    alpha: f32,
    accumulate: bool,
    parallel: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(
        b.rows, k,
        "gemm: inner dimensions differ ({}x{} · {}x{})",
        a.rows, a.cols, b.rows, b.cols
    );
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * c_rs + n <= c.len(),
        "gemm: output view exceeds its buffer"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * c_rs..i * c_rs + n].fill(0.0);
            }
        }
        return;
    }
    a.check("gemm lhs");
    b.check("gemm rhs");
    // SAFETY: all three views were bounds-checked above; `c` is exclusively borrowed and does
    // not alias `a` or `b` (Rust borrow rules on the slices).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism(m, n, k, parallel),
        );
    }
}

/// Like [`gemm`] but the output is a raw pointer, for kernels whose parallel tasks write
/// disjoint, interleaved column blocks of one buffer (attention heads inside a fused row).
///
/// # Safety
/// `c` must be valid for writes at `i·c_rs + j` for `i < a.rows`, `j < b.cols`, and no other
/// thread may access those elements during the call.
pub unsafe fn gemm_ptr(
    c: *mut f32,
    c_rs: usize,
    a: MatRef,
    b: MatRef,
    alpha: f32,
    accumulate: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm_ptr: inner dimensions differ");
    if m == 0 || n == 0 || k == 0 {
        assert!(k != 0 || accumulate, "gemm_ptr with k = 0 must accumulate");
        return;
    }
    a.check("gemm lhs");
    b.check("gemm rhs");
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        c_rs as isize,
        accumulate,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        1.0,
        alpha,
        false,
        false,
        false,
        Parallelism::None,
    );
}

/// Linear layer forward: `y[n, out] (+)= x[n, in] · Wᵀ` with `W` stored `[out, in]`.
pub fn linear_forward(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    n: usize,
    din: usize,
    dout: usize,
    accumulate: bool,
) {
    gemm(
        y,
        dout,
        MatRef::new(x, n, din),
        MatRef::new(w, dout, din).t(),
        1.0,
        accumulate,
        true,
    );
}

/// Linear layer backward. `dx[n, in] (+)= dy · W` (when `dx` is given) and `dW[out, in] += dyᵀ · x`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dx: Option<(&mut [f32], bool)>,
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    n: usize,
    din: usize,
    dout: usize,
) {
    if let Some((dx, acc)) = dx {
        gemm(
            dx,
            din,
            MatRef::new(dy, n, dout),
            MatRef::new(w, dout, din),
            1.0,
            acc,
            true,
        );
    }
    gemm(
        dw,
        din,
        MatRef::new(dy, n, dout).t(),
        MatRef::new(x, n, din),
        1.0,
        true,
        true,
    );
}

/// [`linear_backward`] with the weight gradient skipped (`dw` is `None`: a frozen weight, as
/// in memory-only fine-tuning): only `dx (+)= dy · W` when `dx` is given.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_frozen(
    dx: Option<(&mut [f32], bool)>,
    dw: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    n: usize,
    din: usize,
    dout: usize,
) {
    match dw {
        Some(dw) => linear_backward(dx, dw, dy, x, w, n, din, dout),
        None => {
            if let Some((dx, acc)) = dx {
                gemm(
                    dx,
                    din,
                    MatRef::new(dy, n, dout),
                    MatRef::new(w, dout, din),
                    1.0,
                    acc,
                    true,
                );
            }
        }
    }
}

/// Median GFLOP/s of `n×n×n` f32 GEMMs over `iters` runs (the peak used for MFU).
pub fn bench_gemm(n: usize, iters: usize) -> f64 {
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0.0f32; n * n];
    gemm(
        &mut c,
        n,
        MatRef::new(&a, n, n),
        MatRef::new(&b, n, n),
        1.0,
        false,
        true,
    );
    let mut rates: Vec<f64> = (0..iters)
        .map(|_| {
            let t = std::time::Instant::now();
            gemm(
                &mut c,
                n,
                MatRef::new(&a, n, n),
                MatRef::new(&b, n, n),
                1.0,
                false,
                true,
            );
            2.0 * (n as f64).powi(3) / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    rates.sort_by(|x, y| x.partial_cmp(y).unwrap());
    rates[rates.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    s += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn gemm_matches_naive_with_transposes_and_accumulation() {
        let mut r = Rng::new(3);
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 7), (67, 33, 129), (130, 70, 65)] {
            let mut a = vec![0.0; m * k];
            let mut b = vec![0.0; k * n];
            r.fill_normal(&mut a, 1.0);
            r.fill_normal(&mut b, 1.0);
            let want = naive(&a, &b, m, k, n);
            let mut c = vec![0.0; m * n];
            gemm(
                &mut c,
                n,
                MatRef::new(&a, m, k),
                MatRef::new(&b, k, n),
                1.0,
                false,
                true,
            );
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
            }
            // Transposed storage of both operands: (Bᵀ)ᵀ etc.
            let at: Vec<f32> = (0..k * m).map(|idx| a[(idx % m) * k + idx / m]).collect();
            let bt: Vec<f32> = (0..n * k).map(|idx| b[(idx % k) * n + idx / k]).collect();
            let mut c2 = vec![1.0; m * n];
            gemm(
                &mut c2,
                n,
                MatRef::new(&at, k, m).t(),
                MatRef::new(&bt, n, k).t(),
                2.0,
                true,
                true,
            );
            for (x, y) in c2.iter().zip(&want) {
                assert!(
                    (x - (1.0 + 2.0 * y)).abs() < 1e-4 * (1.0 + y.abs()),
                    "{x} vs {y}"
                );
            }
        }
    }

    #[test]
    fn linear_backward_matches_finite_differences() {
        let (n, din, dout) = (5, 4, 3);
        let mut r = Rng::new(11);
        let mut x = vec![0.0; n * din];
        let mut w = vec![0.0; dout * din];
        let mut g = vec![0.0; n * dout];
        r.fill_normal(&mut x, 1.0);
        r.fill_normal(&mut w, 1.0);
        r.fill_normal(&mut g, 1.0);
        let loss = |x: &[f32], w: &[f32]| -> f64 {
            let mut y = vec![0.0; n * dout];
            linear_forward(&mut y, x, w, n, din, dout, false);
            y.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let mut dx = vec![0.0; n * din];
        let mut dw = vec![0.0; dout * din];
        linear_backward(Some((&mut dx, false)), &mut dw, &g, &x, &w, n, din, dout);
        crate::kernels::gradcheck::check(&x, &dx, |p| loss(p, &w), 1e-2, 1e-3);
        crate::kernels::gradcheck::check(&w, &dw, |p| loss(&x, p), 1e-2, 1e-3);
    }
}
