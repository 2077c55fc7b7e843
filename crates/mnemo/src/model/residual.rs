//! The residual strategy around a pre-norm sublayer `F` (attention or feed-forward): how its
//! input is read from the residual stream and how its output joins it. Written once for every
//! driver and every sublayer.
//!
//! ```text
//! plain   x: [N, d]      x' = x + F(RMSNorm(x))
//! hc/mhc  x: [N, n, d]   (pre, post, comb) = coefficients(x)            (module `mhc`)
//!                        y = Σ_j pre[j]·x[j]                             [N, d]
//!                        x'[k] = Σ_j comb[j, k]·x[j] + post[k]·F(RMSNorm(y))
//! ```
//!
//! Backward (given `dL/dx'`): plain `dL/dx = dL/dx' + RMSNorm'ᵀ(F'ᵀ(dL/dx'))`; hc/mhc through
//! `mhc::merge_backward`, `F`, the norm, and `mhc::coeffs_backward`.

use crate::kernels::rmsnorm;
use crate::mhc::{self, HcActs, HcDims, HcOffsets};

/// `y = RMSNorm(x)` of a sublayer's input, and `1/rms` per row, kept for the backward pass.
#[derive(Default)]
pub(crate) struct NormActs {
    pub(crate) y: Vec<f32>,
    pub(crate) rstd: Vec<f32>,
}

impl NormActs {
    pub(crate) fn new(n: usize, d: usize) -> Self {
        NormActs {
            y: vec![0.0; n * d],
            rstd: vec![0.0; n],
        }
    }
}

/// Backward scratch of the hyper-connection residual over `N` rows.
#[derive(Default)]
pub(crate) struct HcScratch {
    /// `dL/dx` of the stream before the sublayer `[N, n, d]` (swapped with the caller's).
    pub(crate) dx2: Vec<f32>,
    /// `dL/dF` `[N, d]` and `dL/dy` `[N, d]`.
    pub(crate) dout: Vec<f32>,
    pub(crate) dy: Vec<f32>,
    /// `dL/d(post, comb)` `[N, n + n²]`, and the coefficient GEMM's scratch.
    pub(crate) dcoef: Vec<f32>,
    pub(crate) draw: Vec<f32>,
}

impl HcScratch {
    pub(crate) fn new(dm: &HcDims, n: usize, d: usize) -> Self {
        let nh = dm.n;
        let z = |len| vec![0.0f32; len];
        HcScratch {
            dx2: z(n * nh * d),
            dout: z(n * d),
            dy: z(n * d),
            dcoef: z(n * (nh + nh * nh)),
            draw: Vec::new(),
        }
    }
}

/// Which residual stream a model has (config `residual`).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Stream {
    Plain { d: usize },
    Hc(HcDims),
}

/// One sublayer's parameters as the residual sees them: its norm weight (`[d]`, at
/// `norm`) and its hyper-connection layer (hc/mhc).
#[derive(Clone, Copy)]
pub(crate) struct Pre {
    pub(crate) norm: usize,
    pub(crate) hc: Option<HcOffsets>,
}

impl Stream {
    pub(crate) fn of(c: &crate::config::ModelConfig) -> Stream {
        match HcDims::from_config(c) {
            Some(dm) => Stream::Hc(dm),
            None => Stream::Plain { d: c.d_model },
        }
    }

    /// Values per row of the stream: `d`, or `n·d`.
    pub(crate) fn width(&self) -> usize {
        match self {
            Stream::Plain { d } => *d,
            Stream::Hc(dm) => dm.n * dm.d,
        }
    }

    /// Forward of one pre-norm sublayer (module docs): from the stream `x` (`ssq`: its
    /// per-stream sums of squares, hc/mhc) into `xn` (`ssqn`). `f(a, out, acc)` is the
    /// sublayer: it reads the normed input `a: [N, d]` and writes (`acc`: adds) its output
    /// into `out: [N, d]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward<R>(
        &self,
        params: &[f32],
        pre: Pre,
        eps: f32,
        (x, ssq): (&[f32], &[f32]),
        (xn, ssqn): (&mut [f32], &mut [f32]),
        ha: &mut HcActs,
        norm: &mut NormActs,
        f: impl FnOnce(&[f32], &mut [f32], bool) -> R,
    ) -> R {
        match self {
            Stream::Plain { d } => {
                let w = &params[pre.norm..pre.norm + d];
                rmsnorm::forward(&mut norm.y, &mut norm.rstd, x, w, *d, eps);
                xn.copy_from_slice(x);
                f(&norm.y, xn, true)
            }
            Stream::Hc(dm) => {
                let (n, d) = (dm.n, dm.d);
                let o = pre.hc.expect("hyper-connection offsets");
                mhc::coeffs_forward(dm, params, o, x, ssq, ha, false);
                mhc::readout(&mut ha.y, x, &ha.pre, n, d);
                let w = &params[pre.norm..pre.norm + d];
                rmsnorm::forward(&mut norm.y, &mut norm.rstd, &ha.y, w, d, eps);
                let r = f(&norm.y, &mut ha.out, false);
                mhc::merge(xn, ssqn, x, &ha.out, &ha.post, &ha.comb, n, d);
                r
            }
        }
    }

    /// Backward of [`Stream::forward`]: `dx` holds `dL/dx'` and leaves with `dL/dx`. `fb(dout,
    /// da, grads)` is the sublayer's backward: from `dL/dF` into `da = dL/da` (overwritten),
    /// accumulating its parameter gradients. Norm and hyper-connection gradients accumulate
    /// into `grads` too.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &self,
        params: &[f32],
        grads: &mut [f32],
        pre: Pre,
        x: &[f32],
        ha: &HcActs,
        norm: &NormActs,
        dx: &mut Vec<f32>,
        da: &mut [f32],
        sc: &mut HcScratch,
        fb: impl FnOnce(&[f32], &mut [f32], &mut [f32]),
    ) {
        match self {
            Stream::Plain { d } => {
                fb(dx, da, grads);
                let w = &params[pre.norm..pre.norm + d];
                let dw = &mut grads[pre.norm..pre.norm + d];
                rmsnorm::backward(dx, dw, da, x, w, &norm.rstd, *d, true);
            }
            Stream::Hc(dm) => {
                let (n, d) = (dm.n, dm.d);
                mhc::merge_backward(
                    &mut sc.dout,
                    &mut sc.dx2,
                    &mut sc.dcoef,
                    dx,
                    x,
                    &ha.out,
                    &ha.post,
                    &ha.comb,
                    n,
                    d,
                );
                fb(&sc.dout, da, grads);
                let w = &params[pre.norm..pre.norm + d];
                let dw = &mut grads[pre.norm..pre.norm + d];
                rmsnorm::backward(&mut sc.dy, dw, da, &ha.y, w, &norm.rstd, d, false);
                let o = pre.hc.expect("hyper-connection offsets");
                mhc::coeffs_backward(
                    dm,
                    params,
                    grads,
                    o,
                    x,
                    ha,
                    &sc.dy,
                    &sc.dcoef,
                    &mut sc.dx2,
                    &mut sc.draw,
                    false,
                );
                std::mem::swap(dx, &mut sc.dx2);
            }
        }
    }

    /// The collapse before the final norm: the stream itself (plain), the mHC head
    /// (`head: Some`) or the HC sum of the streams, into `ha.y: [N, d]`. Returns the
    /// collapsed rows.
    pub(crate) fn collapse<'a>(
        &self,
        params: &[f32],
        head: Option<HcOffsets>,
        (x, ssq): (&'a [f32], &[f32]),
        ha: &'a mut HcActs,
    ) -> &'a [f32] {
        match self {
            Stream::Plain { .. } => x,
            Stream::Hc(dm) => {
                let (n, d) = (dm.n, dm.d);
                match head {
                    Some(o) => {
                        mhc::coeffs_forward(dm, params, o, x, ssq, ha, true);
                        mhc::readout(&mut ha.y, x, &ha.pre, n, d);
                    }
                    None => mhc::readout(&mut ha.y, x, &[], n, d),
                }
                &ha.y
            }
        }
    }

    /// Backward of [`Stream::collapse`]: from `dy = dL/d(collapsed)` `[N, d]` into `dx`
    /// `[N, w]` (overwritten).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn collapse_backward(
        &self,
        params: &[f32],
        grads: &mut [f32],
        head: Option<HcOffsets>,
        x: &[f32],
        ha: &HcActs,
        dy: &[f32],
        dx: &mut [f32],
        draw: &mut Vec<f32>,
    ) {
        match self {
            Stream::Plain { .. } => dx.copy_from_slice(dy),
            Stream::Hc(dm) => {
                let (n, d) = (dm.n, dm.d);
                match head {
                    Some(o) => {
                        dx.fill(0.0);
                        mhc::coeffs_backward(dm, params, grads, o, x, ha, dy, &[], dx, draw, true);
                    }
                    None => {
                        for (dx, dy) in dx.chunks_mut(n * d).zip(dy.chunks(d)) {
                            for k in 0..n {
                                dx[k * d..(k + 1) * d].copy_from_slice(dy);
                            }
                        }
                    }
                }
            }
        }
    }

    /// The stream entering block 0 from the embedding `h: [N, d]`: itself, or `n` copies.
    pub(crate) fn expand(&self, x: &mut [f32], ssq: &mut [f32], h: &[f32]) {
        match self {
            Stream::Plain { .. } => x.copy_from_slice(h),
            Stream::Hc(dm) => mhc::expand(x, ssq, h, dm.n, dm.d),
        }
    }

    /// Backward of [`Stream::expand`]: `dh = Σ_k dx[k]` (plain: `dx`).
    pub(crate) fn expand_backward(&self, dh: &mut [f32], dx: &[f32]) {
        match self {
            Stream::Plain { .. } => dh.copy_from_slice(dx),
            Stream::Hc(dm) => mhc::expand_backward(dh, dx, dm.n, dm.d),
        }
    }

    /// `x += y` over the whole stream (the Engram sublayer's output, one per stream),
    /// keeping the sums of squares current.
    pub(crate) fn add(&self, x: &mut [f32], ssq: &mut [f32], y: &[f32]) {
        match self {
            Stream::Plain { .. } => x.iter_mut().zip(y).for_each(|(a, b)| *a += b),
            Stream::Hc(dm) => mhc::add_streams(x, ssq, y, dm.n, dm.d),
        }
    }
}
