//! The row-wise f32 pieces of the attention core that the f32 ([`attention`](super::attention))
//! and bf16 ([`attention_bf16`](super::attention_bf16)) cores share, so that both run the same
//! softmax and gradient arithmetic:
//!
//! ```text
//! forward (one span of keys s0.. per query block):  m' = max(m, max_j S[i,j]),
//!     P[i,j] = exp(S[i,j] − m'), l' = l·e^(m−m') + Σ_j P[i,j], acc[i] ·= e^(m−m')
//!     finish: O[i] = acc[i] / l,  lse[i] = m + ln l
//! backward:  D[i] = Σ_c O[i,c]·dO[i,c],  P = exp(S − lse),  dS = P ⊙ (dP − D)
//! ```
//!
//! Masked (future) keys get `P = 0`. Shapes: `S, P, dP, dS: [bq, bk]` row-major,
//! `acc: [bq, d_h]`.

use super::attention::QkvLayout;
use super::vexp::{exp_sub, exp_sub_sum};

/// One span of the online softmax: `s: [bq, bk]` holds the scaled scores of queries at
/// positions `pos0..pos0 + bq` against keys `s0..s0 + bk`; each row becomes its unnormalised
/// probabilities `exp(s − m_new)` (zeros where masked), and the row's running max `m`, sum `l`
/// and output accumulator `acc: [bq, hd]` are rescaled to the new max.
pub(crate) fn softmax_span(
    s: &mut [f32],
    bk: usize,
    pos0: usize,
    s0: usize,
    (m, l): (&mut [f32], &mut [f32]),
    acc: &mut [f32],
) {
    let hd = acc.len() / m.len();
    for (i, row) in s.chunks_exact_mut(bk).enumerate() {
        let valid = (pos0 + i + 1).saturating_sub(s0).min(bk);
        let mx = super::vecops::max(&row[..valid], m[i]);
        if mx == f32::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        let corr = (m[i] - mx).exp();
        let sum = exp_sub_sum(&mut row[..valid], mx);
        row[valid..].fill(0.0);
        l[i] = l[i] * corr + sum;
        m[i] = mx;
        if corr != 1.0 {
            for a in &mut acc[i * hd..(i + 1) * hd] {
                *a *= corr;
            }
        }
    }
}

/// `o[i] = acc[i] / l[i]` (row stride `o_rs`) and `lse[i] = m[i] + ln l[i]` for the rows of a
/// query block.
///
/// # Safety
/// `o` valid for writes at `i·o_rs + c`, `c < hd`, and `lse` at `i`, for `i < m.len()`.
pub(crate) unsafe fn finish_rows(
    acc: &[f32],
    m: &[f32],
    l: &[f32],
    hd: usize,
    o: *mut f32,
    o_rs: usize,
    lse: *mut f32,
) {
    for i in 0..m.len() {
        let inv = 1.0 / l[i];
        let dst = o.add(i * o_rs);
        for c in 0..hd {
            *dst.add(c) = acc[i * hd + c] * inv;
        }
        *lse.add(i) = m[i] + l[i].ln();
    }
}

/// Zero the columns a backward task (sequence rows `base..base + t`, kv group `g`) owns: dq of
/// its `rep` query heads, dk and dv of its kv head.
///
/// # Safety
/// `d` is the `dqkv` buffer of layout `lay`, and no other thread touches these columns.
pub(crate) unsafe fn zero_task_columns(
    d: *mut f32,
    lay: QkvLayout,
    base: usize,
    t: usize,
    g: usize,
    rep: usize,
    hd: usize,
) {
    for r in base..base + t {
        let row = d.add(r * lay.rs);
        std::ptr::write_bytes(row.add(lay.q_off + g * rep * hd), 0, rep * hd);
        std::ptr::write_bytes(row.add(lay.k_off + g * hd), 0, hd);
        std::ptr::write_bytes(row.add(lay.v_off + g * hd), 0, hd);
    }
}

/// `D[i] = Σ_c o[off + i·rs + c]·dout[off + i·rs + c]` (`c < hd`) for `i < dsum.len()`.
pub(crate) fn row_dots(
    dsum: &mut [f32],
    o: &[f32],
    dout: &[f32],
    off: usize,
    rs: usize,
    hd: usize,
) {
    for (i, ds) in dsum.iter_mut().enumerate() {
        let orow = &o[off + i * rs..][..hd];
        let drow = &dout[off + i * rs..][..hd];
        *ds = orow.iter().zip(drow).map(|(a, b)| a * b).sum();
    }
}

/// [`row_dots`] summed in 16 lanes (`c mod 16`, products and sums unfused) that are then
/// added as a tree (8, 4, 2, 1 apart): the same bits on every CPU, and 4× shorter dependency
/// chains at `hd = 64`. The bf16 core's `D`; the f32 core keeps [`row_dots`]'s bits.
pub(crate) fn row_dots_lanes(
    dsum: &mut [f32],
    o: &[f32],
    dout: &[f32],
    off: usize,
    rs: usize,
    hd: usize,
) {
    const L: usize = 16;
    for (i, ds) in dsum.iter_mut().enumerate() {
        let orow = &o[off + i * rs..][..hd];
        let drow = &dout[off + i * rs..][..hd];
        let mut acc = [0.0f32; L];
        for (oc, dc) in orow.chunks(L).zip(drow.chunks(L)) {
            for ((a, &x), &y) in acc.iter_mut().zip(oc).zip(dc) {
                *a += x * y;
            }
        }
        let mut w = L / 2;
        while w > 0 {
            for j in 0..w {
                acc[j] += acc[j + w];
            }
            w /= 2;
        }
        *ds = acc[0];
    }
}

/// `P = exp(S − lse)` in place for a block `p: [bq, bk]` of queries `t0..` against keys `s0..`
/// (training positions), zeros where masked; `lse` holds the block's rows.
pub(crate) fn probs_block(p: &mut [f32], bk: usize, t0: usize, s0: usize, lse: &[f32]) {
    for (i, row) in p.chunks_exact_mut(bk).enumerate() {
        let valid = (t0 + i + 1).saturating_sub(s0).min(bk);
        exp_sub(&mut row[..valid], lse[i]);
        row[valid..].fill(0.0);
    }
}

/// `dS = P ⊙ (dP − D)` in place of `dp: [bq, bk]`; `dsum` holds the block's rows of `D`.
pub(crate) fn ds_block(dp: &mut [f32], p: &[f32], bk: usize, dsum: &[f32]) {
    for (i, (drow, prow)) in dp.chunks_exact_mut(bk).zip(p.chunks_exact(bk)).enumerate() {
        let di = dsum[i];
        for (x, &pv) in drow.iter_mut().zip(prow) {
            *x = pv * (*x - di);
        }
    }
}
