//! The fused causal attention of [`attention`](super::attention) with bf16 block products:
//! the `bf16` precision mode's attention core (autocast / FlashAttention's mixed precision).
//!
//! The same loops, blocks, online softmax and equations; every block product has bf16
//! operands and f32 accumulation ([`attn_tile_bf16`](super::attn_tile_bf16), `vdpbf16ps`):
//!
//! ```text
//! forward:   S = scale·bf16(Q)·bf16(K)ᵀ      O += bf16(P)·bf16(V)
//! backward:  S as above, P = exp(S − lse)   dV += bf16(P)ᵀ·bf16(dO)   dP = bf16(dO)·bf16(V)ᵀ
//!            dS = P ⊙ (dP − D)              dQ += scale·bf16(dS)·bf16(K)
//!                                           dK += scale·bf16(dS)ᵀ·bf16(Q)
//! ```
//!
//! Softmax (row max, `exp`, row sums, the rescaling), `D = rowsum(dO ⊙ O)` (summed in 16
//! lanes, [`row_dots_lanes`](super::attn_rows::row_dots_lanes)), `dS` and every accumulator
//! stay f32; only the product operands are rounded (to nearest even). K and V are
//! packed into bf16 pairs once per (sequence, kv head), Q and dO once per (sequence, head)
//! (forward: per query block), P and dS once per block
//! ([`attn_pack_bf16`](super::attn_pack_bf16)).
//!
//! The AVX-512 BF16 and portable paths give the same bits (tested); against the f32 core the
//! difference is bf16 rounding of the operands (relative error ≤ 2⁻⁹ each): tested within a
//! stated tolerance. Gradient checks run the f32 core.

use super::attention::{AttnDims, Heads, QkvLayout, BLOCK, KEY_SPAN};
use super::attn_pack_bf16::{cols_pairs, rows_pairs, rows_pairs_t};
use super::attn_rows::{
    ds_block, finish_rows, probs_block, row_dots_lanes, softmax_span, zero_task_columns,
};
use super::attn_tile_bf16::{gemm_tile, Isa, PairsA, PairsB};
use super::matmul::MatRef;
use super::SendPtr;
use rayon::prelude::*;

/// `a` as a left operand with the pairs along its rows (`cs = 1`).
fn rows_a(data: &[u32], rows: usize, pairs: usize) -> PairsA<'_> {
    PairsA {
        data,
        rows,
        pairs,
        rs: pairs,
        cs: 1,
    }
}

/// A `[pairs, cols]` right operand with row stride `rs`.
fn b_op(data: &[u32], pairs: usize, cols: usize, rs: usize) -> PairsB<'_> {
    PairsB {
        data,
        pairs,
        cols,
        rs,
    }
}

/// [`attention::forward_scaled`](super::attention::forward_scaled) with bf16 block products
/// on `isa` (the portable path also packs with the scalar packers).
#[allow(clippy::too_many_arguments)]
pub fn forward_on(
    isa: Isa,
    dims: AttnDims,
    scale: f32,
    q: Heads,
    k: Heads,
    v: Heads,
    o: &mut [f32],
    lse: &mut [f32],
) {
    let AttnDims {
        batch,
        tq,
        tk,
        q_pos0,
        n_heads,
        n_kv_heads,
        head_dim: hd,
    } = dims;
    assert!(
        n_heads % n_kv_heads == 0,
        "n_heads must be a multiple of n_kv_heads"
    );
    assert!(q_pos0 + tq <= tk, "queries reach past the keys");
    assert_eq!(o.len(), batch * tq * n_heads * hd);
    assert_eq!(lse.len(), batch * n_heads * tq);
    let vector = isa == Isa::Avx512Bf16;
    let rep = n_heads / n_kv_heads;
    let nqb = tq.div_ceil(BLOCK);
    let (hp, tkp) = (hd.div_ceil(2), tk.div_ceil(2));
    let o_ptr = SendPtr(o.as_mut_ptr());
    let lse_ptr = SendPtr(lse.as_mut_ptr());
    let o_rs = n_heads * hd;
    // Per (sequence, kv head): Kᵀ pairs over the head dimension [hp, tk], V pairs over
    // positions [tkp, hd].
    let mut kt = vec![0u32; batch * n_kv_heads * hp * tk];
    let mut vp = vec![0u32; batch * n_kv_heads * tkp * hd];
    kt.par_chunks_mut(hp * tk)
        .zip(vp.par_chunks_mut(tkp * hd))
        .enumerate()
        .for_each(|(bg, (kt, vp))| {
            let (b, g) = (bg / n_kv_heads, bg % n_kv_heads);
            rows_pairs_t(&k.block(b * tk, tk, g, hd), kt, tk, vector);
            cols_pairs(&v.block(b * tk, tk, g, hd), vp, hd, vector);
        });
    // Each worker's scratch, reused from task to task.
    let tasks = (0..batch * n_heads * nqb).into_par_iter();
    tasks.for_each_init(FwdScratch::default, |sc, task| {
        let qb = task % nqb;
        let h = (task / nqb) % n_heads;
        let b = task / (nqb * n_heads);
        let bg = b * n_kv_heads + h / rep;
        let t0 = qb * BLOCK;
        let bq = BLOCK.min(tq - t0);
        let last_pos = q_pos0 + t0 + bq - 1;
        // The widest span this block reaches (KEY_SPAN is even).
        let span = KEY_SPAN.min((last_pos + 1).next_multiple_of(2));
        let (q1, acc, m, l, s, p1) = sc.take(bq, hp, hd, span);
        rows_pairs(&q.block(b * tq + t0, bq, h, hd), q1, hp, vector);
        let mut s0 = 0;
        while s0 <= last_pos {
            let bk = KEY_SPAN.min(tk - s0).min(last_pos + 1 - s0);
            let bkp = bk.div_ceil(2);
            // S = scale · Q Kᵀ  [bq, bk]
            let ktm = b_op(&kt[bg * hp * tk + s0..], hp, bk, tk);
            unsafe {
                gemm_tile(
                    isa,
                    s.as_mut_ptr(),
                    bk,
                    rows_a(q1, bq, hp),
                    ktm,
                    scale,
                    false,
                )
            };
            // Softmax and P's pairs a few rows at a time, while the rows are in L1.
            for i0 in (0..bq).step_by(SOFTMAX_ROWS) {
                let i1 = (i0 + SOFTMAX_ROWS).min(bq);
                let rows = &mut s[i0 * bk..i1 * bk];
                let ml = (&mut m[i0..i1], &mut l[i0..i1]);
                let pos = q_pos0 + t0 + i0;
                softmax_span(rows, bk, pos, s0, ml, &mut acc[i0 * hd..i1 * hd]);
                let pm = MatRef::new(rows, i1 - i0, bk);
                rows_pairs(&pm, &mut p1[i0 * bkp..], bkp, vector);
            }
            // acc += P V (KEY_SPAN is even, so s0 starts a pair)
            let vm = b_op(&vp[(bg * tkp + s0 / 2) * hd..], bkp, hd, hd);
            unsafe {
                gemm_tile(
                    isa,
                    acc.as_mut_ptr(),
                    hd,
                    rows_a(p1, bq, bkp),
                    vm,
                    1.0,
                    true,
                )
            };
            s0 += KEY_SPAN;
        }
        // SAFETY: (row, head h) columns and lse[b, h, t0..] of these rows belong to this task.
        unsafe {
            let dst = o_ptr.get().add((b * tq + t0) * o_rs + h * hd);
            let lse_dst = lse_ptr.get().add((b * n_heads + h) * tq + t0);
            finish_rows(acc, m, l, hd, dst, o_rs, lse_dst)
        };
    });
}

/// Query rows whose softmax and P pairs are done together in the forward pass (`bq × bk`
/// scores: 4 rows of 256 keys are 4 KiB, in L1 from the softmax to the packing).
const SOFTMAX_ROWS: usize = 4;

/// A forward worker's scratch: Q pairs `[bq, hp]`, the output accumulator `[bq, hd]`, the
/// running max and sum `[bq]`, scores `[bq, span]` and P pairs `[bq, span/2]`.
#[derive(Default)]
struct FwdScratch {
    q1: Vec<u32>,
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    s: Vec<f32>,
    p1: Vec<u32>,
}

type FwdBufs<'a> = (
    &'a mut [u32],
    &'a mut [f32],
    &'a mut [f32],
    &'a mut [f32],
    &'a mut [f32],
    &'a mut [u32],
);

impl FwdScratch {
    /// The buffers for one query block: `acc` zeroed, `m = −∞`, `l = 0`; Q pairs, scores and P
    /// pairs are written before they are read.
    fn take(&mut self, bq: usize, hp: usize, hd: usize, span: usize) -> FwdBufs<'_> {
        self.q1.resize(bq * hp, 0);
        self.acc.clear();
        self.acc.resize(bq * hd, 0.0);
        self.m.clear();
        self.m.resize(bq, f32::NEG_INFINITY);
        self.l.clear();
        self.l.resize(bq, 0.0);
        self.s.resize(bq * span, 0.0);
        self.p1.resize(bq * span / 2, 0);
        (
            &mut self.q1[..bq * hp],
            &mut self.acc,
            &mut self.m,
            &mut self.l,
            &mut self.s[..bq * span],
            &mut self.p1[..bq * span / 2],
        )
    }
}

/// [`attention::backward_scaled`](super::attention::backward_scaled) with bf16 block products
/// on `isa`; `(o, lse, dout)` as there. Parallel over (sequence, kv head).
pub fn backward_on(
    isa: Isa,
    dims: AttnDims,
    scale: f32,
    qkv: &[f32],
    lay: QkvLayout,
    (o, lse, dout): (&[f32], &[f32], &[f32]),
    dqkv: &mut [f32],
) {
    let AttnDims {
        batch,
        tq,
        tk,
        q_pos0,
        n_heads,
        n_kv_heads,
        head_dim: hd,
    } = dims;
    assert!(
        q_pos0 == 0 && tq == tk,
        "attention backward supports training layout only"
    );
    assert_eq!(qkv.len(), dqkv.len());
    let vector = isa == Isa::Avx512Bf16;
    let t = tq;
    let rep = n_heads / n_kv_heads;
    let o_rs = n_heads * hd;
    let nb = t.div_ceil(BLOCK);
    let (hp, tp) = (hd.div_ceil(2), t.div_ceil(2));
    let dptr = SendPtr(dqkv.as_mut_ptr());
    let view = |off| Heads {
        data: qkv,
        rs: lay.rs,
        off,
    };
    let (qv, kv, vv) = (view(lay.q_off), view(lay.k_off), view(lay.v_off));
    let dov = Heads {
        data: dout,
        rs: o_rs,
        off: 0,
    };
    (0..batch * n_kv_heads).into_par_iter().for_each(|task| {
        let (b, g) = (task / n_kv_heads, task % n_kv_heads);
        let base = b * t;
        let d = dptr.get();
        // SAFETY: these columns of rows base..base + t belong to this task.
        unsafe { zero_task_columns(d, lay, base, t, g, rep, hd) };
        // This kv head: Kᵀ, Vᵀ pairs over the head dimension [hp, t]; K pairs over
        // positions [tp, hd].
        let (mut kt, mut vt, mut kp) =
            (vec![0u32; hp * t], vec![0u32; hp * t], vec![0u32; tp * hd]);
        rows_pairs_t(&kv.block(base, t, g, hd), &mut kt, t, vector);
        rows_pairs_t(&vv.block(base, t, g, hd), &mut vt, t, vector);
        cols_pairs(&kv.block(base, t, g, hd), &mut kp, hd, vector);
        // Per query head: Q, dO pairs along rows [t, hp] and over positions [tp, hd].
        let (mut q1, mut qp) = (vec![0u32; t * hp], vec![0u32; tp * hd]);
        let (mut do1, mut dop) = (vec![0u32; t * hp], vec![0u32; tp * hd]);
        let mut p = vec![0.0f32; BLOCK * BLOCK];
        let mut dp = vec![0.0f32; BLOCK * BLOCK];
        // P, dS pairs over queries [⌈bq/2⌉, bk]; dS pairs over keys [bq, ⌈bk/2⌉].
        let mut pp = vec![0u32; BLOCK.div_ceil(2) * BLOCK];
        let mut dsp = vec![0u32; BLOCK.div_ceil(2) * BLOCK];
        let mut ds1 = vec![0u32; BLOCK * BLOCK.div_ceil(2)];
        let mut dsum = vec![0.0f32; t];
        for h in g * rep..(g + 1) * rep {
            rows_pairs(&qv.block(base, t, h, hd), &mut q1, hp, vector);
            cols_pairs(&qv.block(base, t, h, hd), &mut qp, hd, vector);
            rows_pairs(&dov.block(base, t, h, hd), &mut do1, hp, vector);
            cols_pairs(&dov.block(base, t, h, hd), &mut dop, hd, vector);
            row_dots_lanes(&mut dsum, o, dout, base * o_rs + h * hd, o_rs, hd);
            let lse_h = &lse[(b * n_heads + h) * t..][..t];
            for kb in 0..nb {
                let s0 = kb * BLOCK;
                let bk = BLOCK.min(t - s0);
                let bkp = bk.div_ceil(2);
                let dk_ptr = unsafe { d.add((base + s0) * lay.rs + lay.k_off + g * hd) };
                let dv_ptr = unsafe { d.add((base + s0) * lay.rs + lay.v_off + g * hd) };
                for qb in kb..nb {
                    let t0 = qb * BLOCK;
                    let bq = BLOCK.min(t - t0);
                    let bqp = bq.div_ceil(2);
                    // Block starts are even (BLOCK is), so t0 and s0 start pairs.
                    let q_a = rows_a(&q1[t0 * hp..], bq, hp);
                    let do_a = rows_a(&do1[t0 * hp..], bq, hp);
                    let do_b = b_op(&dop[t0 / 2 * hd..], bqp, hd, hd);
                    let q_b = b_op(&qp[t0 / 2 * hd..], bqp, hd, hd);
                    let k_b = b_op(&kp[s0 / 2 * hd..], bkp, hd, hd);
                    // P = exp(scale·Q Kᵀ − lse), masked.
                    let kt_b = b_op(&kt[s0..], hp, bk, t);
                    unsafe { gemm_tile(isa, p.as_mut_ptr(), bk, q_a, kt_b, scale, false) };
                    // P and its pairs over queries, two rows at a time (while in L1).
                    for (i2, rows) in p[..bq * bk].chunks_mut(2 * bk).enumerate() {
                        let (i, r) = (2 * i2, rows.len() / bk);
                        probs_block(rows, bk, t0 + i, s0, &lse_h[t0 + i..t0 + i + r]);
                        cols_pairs(&MatRef::new(rows, r, bk), &mut pp[i2 * bk..], bk, vector);
                    }
                    let pt_a = PairsA {
                        data: &pp,
                        rows: bk,
                        pairs: bqp,
                        rs: 1,
                        cs: bk,
                    };
                    // dV += Pᵀ dO
                    unsafe { gemm_tile(isa, dv_ptr, lay.rs, pt_a, do_b, 1.0, true) };
                    // dP = dO Vᵀ
                    let vt_b = b_op(&vt[s0..], hp, bk, t);
                    unsafe { gemm_tile(isa, dp.as_mut_ptr(), bk, do_a, vt_b, 1.0, false) };
                    // dS = P ⊙ (dP − D), stored in dp
                    // and its pairs along rows and over queries, two rows at a time.
                    let dss = dp[..bq * bk]
                        .chunks_mut(2 * bk)
                        .zip(p[..bq * bk].chunks(2 * bk));
                    for (i2, (rows, prows)) in dss.enumerate() {
                        let (i, r) = (2 * i2, rows.len() / bk);
                        ds_block(rows, prows, bk, &dsum[t0 + i..t0 + i + r]);
                        let dsm = MatRef::new(rows, r, bk);
                        rows_pairs(&dsm, &mut ds1[i * bkp..], bkp, vector);
                        cols_pairs(&dsm, &mut dsp[i2 * bk..], bk, vector);
                    }
                    let dst_a = PairsA {
                        data: &dsp,
                        rows: bk,
                        pairs: bqp,
                        rs: 1,
                        cs: bk,
                    };
                    // dQ += scale · dS K ; dK += scale · dSᵀ Q
                    unsafe {
                        let dq_ptr = d.add((base + t0) * lay.rs + lay.q_off + h * hd);
                        gemm_tile(isa, dq_ptr, lay.rs, rows_a(&ds1, bq, bkp), k_b, scale, true);
                        gemm_tile(isa, dk_ptr, lay.rs, dst_a, q_b, scale, true);
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests;
