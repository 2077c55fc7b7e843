//! Matrix multiplication through the `gemm` crate (AVX-512 micro-kernels chosen at run time when
//! the CPU has them, AVX2/FMA or scalar otherwise), or, when the process-wide
//! [`gemm_precision`](super::precision::gemm_precision) is bf16, through the bf16 mixed-precision
//! GEMM of [`super::bf16`] for products big enough to pay for packing (see [`gemm`]).
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
    /// Panics naming `what` and `side` (lhs/rhs) when the view reaches past its buffer.
    pub(super) fn check(&self, what: &str, side: &str) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            assert!(
                last < self.data.len(),
                "{what} {side}: view exceeds its buffer"
            );
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

/// Whether a product in bf16 precision goes to the bf16 kernel: packing both operands costs
/// `O(mk + kn)` against `O(mnk)` of work, so thin products (decode GEMVs, `m` or `n` < 16) and
/// tiny ones stay f32.
fn bf16_worth_it(m: usize, n: usize, k: usize) -> bool {
    m >= 16 && n >= 16 && m * n * k >= 32 * 32 * 32
}

/// `C = beta·C + alpha·A·B`, with `beta ∈ {0, 1}` given by `accumulate`, in the process-wide
/// GEMM precision ([`super::precision`]): f32 ([`gemm_f32`]) by default, bf16 operands with f32
/// accumulation ([`super::bf16::gemm`]) when set to bf16 and the product is big enough.
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
    let bf16 = super::precision::gemm_precision() == super::precision::Precision::Bf16
        && bf16_worth_it(a.rows, b.cols, a.cols);
    let _log = super::gemm_log::gemm(super::gemm_log::GemmShape {
        m: a.rows,
        k: a.cols,
        n: b.cols,
        parallel,
        bf16,
    });
    if bf16 {
        super::bf16::gemm(c, c_rs, a, b, alpha, accumulate, parallel);
    } else {
        gemm_f32(c, c_rs, a, b, alpha, accumulate, parallel);
    }
}

/// [`gemm`] in f32 whatever the process-wide precision: `C = beta·C + alpha·A·B`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32(
    c: &mut [f32],
    c_rs: usize,
    a: MatRef,
    b: MatRef,
    alpha: f32,
    accumulate: bool,
    parallel: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if !prepare(c, c_rs, &a, &b, accumulate, "gemm") {
        return;
    }
    if super::matmul_rows::applies(&a, &b) {
        return super::matmul_rows::gemm_rows(c, c_rs, a, b, alpha, accumulate, parallel);
    }
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

/// Shape and bounds checks of a product `C = β·C + α·A·B` (`what` names the caller in the
/// panic messages); `false` when there is nothing to multiply: an empty output, or `k = 0`,
/// where `C` is zeroed unless accumulating.
pub(super) fn prepare(
    c: &mut [f32],
    c_rs: usize,
    a: &MatRef,
    b: &MatRef,
    accumulate: bool,
    what: &str,
) -> bool {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(
        b.rows, k,
        "{what}: inner dimensions differ ({}x{} · {}x{})",
        a.rows, a.cols, b.rows, b.cols
    );
    if m == 0 || n == 0 {
        return false;
    }
    assert!(
        (m - 1) * c_rs + n <= c.len(),
        "{what}: output view exceeds its buffer"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * c_rs..i * c_rs + n].fill(0.0);
            }
        }
        return false;
    }
    a.check(what, "lhs");
    b.check(what, "rhs");
    true
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
    a.check("gemm", "lhs");
    b.check("gemm", "rhs");
    let _log = super::gemm_log::gemm(super::gemm_log::GemmShape {
        m,
        k,
        n,
        parallel: false,
        bf16: false,
    });
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
    bench_gemm_shape(n, n, n, iters, super::precision::Precision::F32)
}

/// Median GFLOP/s of `[m,k]·[k,n]` GEMMs (row-major operands, parallel) in the given
/// precision over `iters` runs, after one untimed run.
pub fn bench_gemm_shape(
    m: usize,
    k: usize,
    n: usize,
    iters: usize,
    precision: super::precision::Precision,
) -> f64 {
    let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0.0f32; m * n];
    let mut run = || {
        let (av, bv) = (MatRef::new(&a, m, k), MatRef::new(&b, k, n));
        match precision {
            super::precision::Precision::F32 => gemm_f32(&mut c, n, av, bv, 1.0, false, true),
            super::precision::Precision::Bf16 => {
                super::bf16::gemm(&mut c, n, av, bv, 1.0, false, true)
            }
        }
    };
    run();
    let mut rates: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let t = std::time::Instant::now();
            run();
            2.0 * (m * n * k) as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    rates.sort_by(|x, y| x.total_cmp(y));
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
