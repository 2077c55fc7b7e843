//! Auxiliary-loss-free balancing of the routed experts' selection bias `b` (module docs of
//! [`crate::moe`]): the sign step toward equal load, the refit of `b` to a batch's (or a
//! pool's) router scores, the pool of recent router inputs, and load statistics.

use rayon::prelude::*;
use std::collections::VecDeque;

/// Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): after a step, raise the bias of every
/// expert that got fewer than the mean number of tokens by `speed`, lower the others.
pub fn update_bias(bias: &mut [f32], load: &[u64], speed: f32) {
    let mean = load.iter().sum::<u64>() as f64 / load.len().max(1) as f64;
    for (b, &l) in bias.iter_mut().zip(load) {
        let l = l as f64;
        if l < mean {
            *b += speed;
        } else if l > mean {
            *b -= speed;
        }
    }
}

/// Refit the selection bias against one batch's scores `s: [N, E]` so that this batch's
/// load would be even: the bias is the dual variable of an entropy-regularised balanced
/// assignment (each token takes `k` units, each expert receives `N·k/E`), found by `iters`
/// Sinkhorn rounds warm-started from the current bias:
///
/// ```text
/// τ     = mean_e std_t s[t, e]                     (the token-specific spread of the scores)
/// P     = softmax_e((s + b) / τ)                   [N, E]
/// b_e  += τ · (log(N·k/E) − log(k · Σ_t P[t, e]))
/// ```
///
/// then `hard_rounds` sweeps of exact per-expert updates on the hard top-k load (see
/// `hard_correct`), and finally the mean is removed (selection is shift-invariant).
///
/// Early in training every token's router input is nearly the same vector: the scores share
/// a common mode that is large next to their token-specific part, and a fixed-size sign step
/// per batch can neither reach nor follow it. The dual fit reaches it in a few rounds at any
/// scale. It only ever uses the batch already routed, so no token's routing depends on
/// tokens of its own batch.
pub fn fit_bias(bias: &mut [f32], scores: &[f32], k: usize, iters: usize, hard_rounds: usize) {
    fit_bias_in(bias, scores, k, iters, hard_rounds, true)
}

/// [`fit_bias`], its loops over tokens in parallel (`par`) or on the calling thread (for
/// callers that fit several layers side by side). The same bits either way: the per-chunk
/// sums are added in chunk order, and the per-token work does not depend on the split.
pub fn fit_bias_in(
    bias: &mut [f32],
    scores: &[f32],
    k: usize,
    iters: usize,
    hard_rounds: usize,
    par: bool,
) {
    let e = bias.len();
    if e == 0 || iters == 0 {
        return;
    }
    let n = scores.len() / e;
    let mut mean = vec![0.0f64; e];
    let mut sq = vec![0.0f64; e];
    for row in scores.chunks_exact(e) {
        for j in 0..e {
            mean[j] += row[j] as f64;
            sq[j] += row[j] as f64 * row[j] as f64;
        }
    }
    let tau = (0..e)
        .map(|j| {
            let m = mean[j] / n as f64;
            (sq[j] / n as f64 - m * m).max(0.0).sqrt()
        })
        .sum::<f64>()
        / e as f64;
    if tau <= 1e-9 {
        return; // identical rows: no bias can split them
    }
    let target = (n * k) as f64 / e as f64;
    let mut b: Vec<f64> = bias.iter().map(|&x| x as f64).collect();
    let soft = crate::prof::span("moe.fit.soft");
    for _ in 0..iters {
        let chunk_col = |chunk: &[f32]| {
            let mut col = vec![0.0f64; e];
            let mut z = vec![0.0f64; e];
            for row in chunk.chunks_exact(e) {
                let mut zmax = f64::NEG_INFINITY;
                for j in 0..e {
                    z[j] = (row[j] as f64 + b[j]) / tau;
                    zmax = zmax.max(z[j]);
                }
                let mut sum = 0.0;
                for zj in z.iter_mut() {
                    *zj = (*zj - zmax).exp();
                    sum += *zj;
                }
                for j in 0..e {
                    col[j] += k as f64 * z[j] / sum;
                }
            }
            col
        };
        let cols: Vec<Vec<f64>> = if par {
            scores.par_chunks(e * 256).map(chunk_col).collect()
        } else {
            scores.chunks(e * 256).map(chunk_col).collect()
        };
        let col = cols
            // Summed in chunk order: a rayon `reduce` groups the chunks by how the work was
            // split, which depends on the thread count and on stealing, and the f64 sums (so
            // the bias, so resume) would not be bit-reproducible.
            .into_iter()
            .fold(vec![0.0f64; e], |mut a, c| {
                a.iter_mut().zip(&c).for_each(|(a, c)| *a += c);
                a
            });
        for j in 0..e {
            b[j] += tau * (target.ln() - col[j].max(1e-12).ln());
        }
    }
    // Selection depends on the bias only up to a common shift. Each Sinkhorn round raises
    // the mean bias when the load is uneven (Σ_e ln(target/load_e) ≥ 0 by Jensen), so
    // without re-centring the mean drifts up without bound (≈ +80 after 1,000 steps of
    // `tiny-moe`) and eats f32 resolution; it is removed after the fit.
    bias.iter_mut().zip(&b).for_each(|(x, &v)| *x = v as f32);
    drop(soft);
    let _s = crate::prof::span("moe.fit.hard");
    hard_correct(bias, scores, k, hard_rounds, 1e-3 * tau as f32, par);
    let mean = bias.iter().map(|&x| x as f64).sum::<f64>() / e as f64;
    bias.iter_mut().for_each(|x| *x = (*x as f64 - mean) as f32);
}

/// A pass over a chunk of tokens: their top lists, their score rows, their gaps.
type RowsFn<'a> = dyn Fn(&mut [(f32, u32)], &[f32], &mut [f32]) + Sync + 'a;

/// After the soft fit: `sweeps` sweeps of exact coordinate updates on the *hard* top-k load.
/// For expert `j` with the other biases fixed, token `t` selects `j` iff
/// `s[t, j] + b_j > m_t`, with `m_t` the `k`-th largest `s[t, i] + b_i` over `i ≠ j`; so
/// `b_j = −(midpoint of the target-th and (target+1)-th largest of s[t, j] − m_t)` gives `j`
/// exactly its share of this sample (`⌊N·k/E⌋`, one more for the first `(N·k) mod E` experts,
/// so that the shares add up and the sweeps can settle). Experts are updated one after another
/// (Gauss–Seidel), each with the others' latest biases. The entropic model spreads each
/// token's `k` units by a softmax, which is not top-k selection: the soft fit leaves an
/// expert-specific gap that these sweeps close. Unlike a gradient step on `ln(load)`, an
/// exact update cannot overshoot when an expert's load is near zero, which is common early
/// in training when every token's scores are almost the same.
fn hard_correct(bias: &mut [f32], scores: &[f32], k: usize, sweeps: usize, tol: f32, par: bool) {
    let e = bias.len();
    let n = scores.len() / e.max(1);
    if e == 0 || n == 0 || k == 0 || k >= e {
        return;
    }
    // Shares that add up to the N·k slots: the first `(N·k) mod E` experts take one more.
    let (base, extra) = ((n * k) / e, (n * k) % e);
    // Per token, its k + 1 largest biased scores `s + b` (value, expert), descending: `m_t`
    // for expert j is the k-th of them once j is left out, read without scanning the row, and
    // a new `b_j` only rescans the rows where j was among them (O(N·k) per expert, not O(N·E)).
    let kk = k + 1;
    let mut top = vec![(f32::NEG_INFINITY, u32::MAX); n * kk];
    let rows = |f: &RowsFn, top: &mut [(f32, u32)], gap: &mut [f32]| {
        const ROWS: usize = 1024;
        if n <= ROWS || !par {
            f(top, scores, gap);
        } else {
            top.par_chunks_mut(ROWS * kk)
                .zip(scores.par_chunks(ROWS * e))
                .zip(gap.par_chunks_mut(ROWS))
                .for_each(|((t, s), g)| f(t, s, g));
        }
    };
    let mut gap = vec![0.0f32; n];
    {
        let b: &[f32] = bias;
        rows(
            &|top, sc, _| {
                for (t, row) in top.chunks_exact_mut(kk).zip(sc.chunks_exact(e)) {
                    rescan(t, row, b);
                }
            },
            &mut top,
            &mut gap,
        );
    }
    for _ in 0..sweeps {
        let mut moved = 0.0f32;
        for j in 0..e {
            rows(
                &|top, sc, gs| {
                    for ((g, t), row) in gs
                        .iter_mut()
                        .zip(top.chunks_exact(kk))
                        .zip(sc.chunks_exact(e))
                    {
                        // The k-th largest of the others: skip j if it is in the list.
                        let mut seen = 0;
                        let mut m = f32::NEG_INFINITY;
                        for &(v, i) in t {
                            if i as usize != j {
                                seen += 1;
                                if seen == k {
                                    m = v;
                                    break;
                                }
                            }
                        }
                        *g = row[j] - m;
                    }
                },
                &mut top,
                &mut gap,
            );
            let want = (base + usize::from(j < extra)).min(n);
            let cut = if want == 0 {
                // No token: the cut sits just above the largest gap.
                let top = gap.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                top + top.abs().max(1.0) * 1e-3
            } else {
                // Descending: the want-th largest gap sits at index want − 1.
                let desc = |a: &f32, b: &f32| b.total_cmp(a);
                let (_, &mut hi, rest) = gap.select_nth_unstable_by(want - 1, desc);
                let lo = rest.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                if lo.is_finite() {
                    0.5 * (hi + lo)
                } else {
                    hi - 1.0
                }
            };
            moved = moved.max((bias[j] + cut).abs());
            bias[j] = -cut;
            // Every token's list under the new b_j.
            let b: &[f32] = bias;
            rows(
                &|top, sc, _| {
                    for (t, row) in top.chunks_exact_mut(kk).zip(sc.chunks_exact(e)) {
                        if t.iter().any(|&(_, i)| i as usize == j) {
                            rescan(t, row, b); // j left or moved inside: rebuild
                        } else {
                            insert(t, row[j] + b[j], j as u32);
                        }
                    }
                },
                &mut top,
                &mut gap,
            );
        }
        // A sweep that moved no bias by more than `tol` has converged.
        if moved <= tol {
            break;
        }
    }
}

/// `t` ← the `t.len()` largest `row[i] + b[i]` with their experts, descending.
fn rescan(t: &mut [(f32, u32)], row: &[f32], b: &[f32]) {
    t.fill((f32::NEG_INFINITY, u32::MAX));
    for (i, (&sv, &bv)) in row.iter().zip(b).enumerate() {
        insert(t, sv + bv, i as u32);
    }
}

/// Insert `(v, i)` into the descending list `t` if it beats the last entry (which falls off).
fn insert(t: &mut [(f32, u32)], v: f32, i: u32) {
    let last = t.len() - 1;
    if v <= t[last].0 {
        return;
    }
    let mut p = last;
    while p > 0 && t[p - 1].0 < v {
        t[p] = t[p - 1];
        p -= 1;
    }
    t[p] = (v, i);
}

/// The refit with memory: `b ← (1 − rate)·b + rate·fit(b, scores)` ([`fit_bias`] warm-started
/// from `b`). `rate = 1` jumps to the fit of the last batch, whose composition (a handful of
/// documents) moves the fitted bias by as much as the drift of the scores; with `rate < 1`
/// the bias averages the per-batch fits over the last ~`1/rate` batches, so the next batch is
/// routed with a bias fitted to the recent mixture. The only state is the bias itself.
pub fn refit_bias(
    bias: &mut [f32],
    scores: &[f32],
    k: usize,
    iters: usize,
    hard_rounds: usize,
    rate: f32,
) {
    refit_bias_in(bias, scores, k, iters, hard_rounds, rate, true)
}

/// [`refit_bias`] with [`fit_bias_in`]'s choice of parallel (`par`) or serial token loops.
pub fn refit_bias_in(
    bias: &mut [f32],
    scores: &[f32],
    k: usize,
    iters: usize,
    hard_rounds: usize,
    rate: f32,
    par: bool,
) {
    if rate >= 1.0 {
        return fit_bias_in(bias, scores, k, iters, hard_rounds, par);
    }
    let old = bias.to_vec();
    fit_bias_in(bias, scores, k, iters, hard_rounds, par);
    for (b, o) in bias.iter_mut().zip(old) {
        *b = o + rate * (*b - o);
    }
}

/// The router inputs (`f`, `[n, d]` per batch) of one routed layer over the last `window`
/// batches, every `stride`-th token of each: the sample the refit balances when
/// `bias_fit_window > 0`. Before every fit the whole pool is scored again by the current router
/// ([`router_scores`]), so the fit follows the router without lag and averages the
/// composition of `window` batches rather than carrying one batch's handful of documents.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BiasPool {
    window: usize,
    stride: usize,
    d: usize,
    /// Row the next batch's sample starts at (`0..stride`): it moves by one per batch, so
    /// that a stride dividing the sequence length does not always keep the same positions
    /// (position 0, the token without context, would be `stride`× over-represented).
    offset: usize,
    batches: VecDeque<Vec<f32>>,
}

impl BiasPool {
    /// An empty pool of `window` batches keeping every `stride`-th row of width `d`.
    pub fn new(window: usize, stride: usize, d: usize) -> Self {
        BiasPool {
            window,
            stride: stride.max(1),
            d,
            offset: 0,
            batches: VecDeque::new(),
        }
    }

    /// Add one batch's router inputs `f: [n, d]` (rows o, o + stride, o + 2·stride, …, with
    /// the offset `o` moving by one per batch), dropping the oldest batch beyond the window.
    pub fn push(&mut self, f: &[f32]) {
        if self.window == 0 || self.d == 0 {
            return;
        }
        let rows: Vec<f32> = f
            .chunks_exact(self.d)
            .skip(self.offset)
            .step_by(self.stride)
            .flatten()
            .copied()
            .collect();
        self.batches.push_back(rows);
        self.offset = (self.offset + 1) % self.stride;
        while self.batches.len() > self.window {
            self.batches.pop_front();
        }
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.batches.iter().map(|b| b.len()).sum::<usize>() / self.d.max(1)
    }

    /// Each batch's kept inputs `[n_i, d]`, oldest first.
    pub fn batches(&self) -> impl Iterator<Item = &[f32]> {
        self.batches.iter().map(|b| &b[..])
    }

    /// The pooled inputs `[rows, d]`, oldest batch first.
    pub fn joined(&self) -> Vec<f32> {
        self.batches.iter().flatten().copied().collect()
    }

    /// Batches held.
    pub fn len(&self) -> usize {
        self.batches.len()
    }

    /// No batch held.
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// For the checkpoint: the pooled inputs, each batch's row count, and the next offset.
    pub fn to_parts(&self) -> (Vec<f32>, Vec<u32>, usize) {
        let counts = self
            .batches
            .iter()
            .map(|b| (b.len() / self.d.max(1)) as u32)
            .collect();
        (self.joined(), counts, self.offset)
    }

    /// The inverse of [`BiasPool::to_parts`]; `None` when the parts do not fit together.
    pub fn from_parts(
        window: usize,
        stride: usize,
        d: usize,
        data: &[f32],
        counts: &[u32],
        offset: usize,
    ) -> Option<Self> {
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        if d == 0
            || total.checked_mul(d)? != data.len()
            || counts.len() > window
            || offset >= stride.max(1)
        {
            return None;
        }
        let mut pool = BiasPool::new(window, stride, d);
        pool.offset = offset;
        let mut at = 0;
        for &c in counts {
            let len = c as usize * d;
            pool.batches.push_back(data[at..at + len].to_vec());
            at += len;
        }
        Some(pool)
    }
}

/// Load statistics of one layer: (max share / mean share, min share / mean share).
pub fn load_stats(load: &[u64]) -> (f64, f64) {
    let total: u64 = load.iter().sum();
    if total == 0 || load.is_empty() {
        return (0.0, 0.0);
    }
    let mean = total as f64 / load.len() as f64;
    let max = *load.iter().max().unwrap_or(&0) as f64;
    let min = *load.iter().min().unwrap_or(&0) as f64;
    (max / mean, min / mean)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sweeps as first written: every expert's `m_t` by a scan of the whole row.
    fn hard_correct_by_scan(bias: &mut [f32], scores: &[f32], k: usize, sweeps: usize, tol: f32) {
        let e = bias.len();
        let n = scores.len() / e;
        let (base, extra) = ((n * k) / e, (n * k) % e);
        let mut gap = vec![0.0f32; n];
        for _ in 0..sweeps {
            let mut moved = 0.0f32;
            for j in 0..e {
                for (g, row) in gap.iter_mut().zip(scores.chunks_exact(e)) {
                    let mut others = vec![f32::NEG_INFINITY; k];
                    for (i, (&sv, &bv)) in row.iter().zip(&*bias).enumerate() {
                        let v = sv + bv;
                        if i == j || v <= others[k - 1] {
                            continue;
                        }
                        let mut p = k - 1;
                        while p > 0 && others[p - 1] < v {
                            others[p] = others[p - 1];
                            p -= 1;
                        }
                        others[p] = v;
                    }
                    *g = row[j] - others[k - 1];
                }
                let want = (base + usize::from(j < extra)).min(n);
                let cut = if want == 0 {
                    let top = gap.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    top + top.abs().max(1.0) * 1e-3
                } else {
                    let desc = |a: &f32, b: &f32| b.total_cmp(a);
                    let (_, &mut hi, rest) = gap.select_nth_unstable_by(want - 1, desc);
                    let lo = rest.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    if lo.is_finite() {
                        0.5 * (hi + lo)
                    } else {
                        hi - 1.0
                    }
                };
                moved = moved.max((bias[j] + cut).abs());
                bias[j] = -cut;
            }
            if moved <= tol {
                break;
            }
        }
    }

    #[test]
    fn the_kept_top_lists_give_the_scan_bit_for_bit() {
        let mut rng = crate::rng::Rng::new(7);
        // (experts, k, tokens, coarse): coarse scores on a grid of 1/8 make many exact ties;
        // 3000 tokens take the parallel path.
        for &(e, k, n, coarse) in &[
            (8, 2, 200, false),
            (16, 2, 3000, false),
            (16, 6, 300, true),
            (5, 4, 64, true),
            (16, 1, 500, true),
        ] {
            let mut scores = vec![0.0f32; n * e];
            rng.fill_normal(&mut scores, 1.0);
            if coarse {
                scores
                    .iter_mut()
                    .for_each(|s| *s = (*s * 8.0).round() / 8.0);
            }
            let mut bias = vec![0.0f32; e];
            rng.fill_normal(&mut bias, 0.3);
            let (mut fast, mut scan) = (bias.clone(), bias);
            hard_correct(&mut fast, &scores, k, 8, 0.0, true);
            hard_correct_by_scan(&mut scan, &scores, k, 8, 0.0);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&fast),
                bits(&scan),
                "e {e} k {k} n {n} coarse {coarse}"
            );
        }
    }
}
