//! Fused causal attention with an online softmax (FlashAttention-2 style, Dao 2023) on CPU.
//!
//! `O = softmax(Q·Kᵀ/√d_h + causal mask)·V`, computed block by block so that memory stays
//! `O(T·d_h)`: no `T×T` score matrix is ever stored. The forward pass keeps the row
//! log-sum-exp `lse`; the backward pass recomputes each score block from it:
//!
//! ```text
//! P = exp(S − lse),  dV += Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ⊙ (dP − D),  D = rowsum(dO ⊙ O)
//! dQ += dS·K/√d_h,   dK += dSᵀ·Q/√d_h
//! ```
//!
//! Grouped-query attention: query head `h` reads kv head `h / (H / KV)` (KV = 1 is MQA).
//!
//! Shapes: queries are rows of `batch·tq`, keys rows of `batch·tk`; row `r` of head `h` lives at
//! `data[r·rs + off + h·d_h ..]` of a [`Heads`] view, so q, k and v can sit inside one fused
//! `[q | k | v]` projection row. Query `i` of a sequence has absolute position `q_pos0 + i`,
//! key `s` has position `s`, and `s` is visible to the query iff `s ≤ q_pos0 + i`
//! (training: `q_pos0 = 0, tq = tk`; decoding with a KV cache: `q_pos0 = cached length`).
//! Output `o: [batch·tq, H·d_h]`, `lse: [batch, H, tq]`.
//!
//! In the `bf16` precision mode ([`precision`](super::precision)) the forward and backward
//! run [`attention_bf16`](super::attention_bf16): the same loops with bf16 block products.

use super::attn_rows::{
    ds_block, finish_rows, probs_block, row_dots, softmax_span, zero_task_columns,
};
use super::attn_tile::gemm_tile;
use super::matmul::MatRef;
use super::precision::{gemm_precision, Precision};
use super::vexp::exp_sub_sum;
use super::SendPtr;
use rayon::prelude::*;

/// Block size (queries and keys) of the tiled loops.
pub const BLOCK: usize = 64;

/// Keys per step of the forward's online softmax (a multiple of [`BLOCK`]): one score product
/// `[BLOCK, KEY_SPAN]` and one `P·V` product per step keep the GEMMs big enough to run near
/// the micro-kernel's speed, while the scratch stays `O(BLOCK · KEY_SPAN)`.
pub const KEY_SPAN: usize = 512;

#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub batch: usize,
    pub tq: usize,
    pub tk: usize,
    pub q_pos0: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Strided per-head view: row `r`, head `h` at `data[r·rs + off + h·head_dim ..][..head_dim]`.
#[derive(Clone, Copy)]
pub struct Heads<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub off: usize,
}

impl<'a> Heads<'a> {
    pub(crate) fn block(&self, row0: usize, rows: usize, head: usize, hd: usize) -> MatRef<'a> {
        let start = row0 * self.rs + self.off + head * hd;
        MatRef::strided(&self.data[start..], rows, hd, self.rs)
    }

    /// Head `head` of rows `row0..row0 + rows`, transposed into `out: [hd, rows]` (the
    /// row-major `Kᵀ`/`Vᵀ` operand of the block products, see [`gemm_tile`]).
    pub(crate) fn transpose_into(
        &self,
        row0: usize,
        rows: usize,
        head: usize,
        hd: usize,
        out: &mut [f32],
    ) {
        for r in 0..rows {
            let src = &self.data[(row0 + r) * self.rs + self.off + head * hd..][..hd];
            for (c, &x) in src.iter().enumerate() {
                out[c * rows + r] = x;
            }
        }
    }
}

/// Forward pass with the default softmax scale `1/√d_h`.
pub fn forward(dims: AttnDims, q: Heads, k: Heads, v: Heads, o: &mut [f32], lse: &mut [f32]) {
    forward_scaled(dims, 1.0 / (dims.head_dim as f32).sqrt(), q, k, v, o, lse)
}

/// Forward pass with softmax scale `scale` in place of `1/√d_h` (e.g. YaRN's
/// `mscale²/√d_h`, [`crate::config::ModelConfig::attn_scale`]). Parallel over (sequence, head,
/// query block).
pub fn forward_scaled(
    dims: AttnDims,
    scale: f32,
    q: Heads,
    k: Heads,
    v: Heads,
    o: &mut [f32],
    lse: &mut [f32],
) {
    if gemm_precision() == Precision::Bf16 {
        let isa = super::attn_tile_bf16::best_isa();
        return super::attention_bf16::forward_on(isa, dims, scale, q, k, v, o, lse);
    }
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
    let rep = n_heads / n_kv_heads;
    let nqb = tq.div_ceil(BLOCK);
    let o_ptr = SendPtr(o.as_mut_ptr());
    let lse_ptr = SendPtr(lse.as_mut_ptr());
    let o_rs = n_heads * hd;
    // Kᵀ of every (sequence, kv head): [batch, n_kv_heads, hd, tk].
    let mut kt = vec![0.0f32; batch * n_kv_heads * hd * tk];
    kt.par_chunks_mut(hd * tk)
        .enumerate()
        .for_each(|(bg, out)| {
            k.transpose_into((bg / n_kv_heads) * tk, tk, bg % n_kv_heads, hd, out)
        });
    (0..batch * n_heads * nqb).into_par_iter().for_each(|task| {
        let qb = task % nqb;
        let h = (task / nqb) % n_heads;
        let b = task / (nqb * n_heads);
        let g = h / rep;
        let t0 = qb * BLOCK;
        let bq = BLOCK.min(tq - t0);
        let last_pos = q_pos0 + t0 + bq - 1;
        let qm = q.block(b * tq + t0, bq, h, hd);
        let mut acc = vec![0.0f32; bq * hd];
        let mut m = vec![f32::NEG_INFINITY; bq];
        let mut l = vec![0.0f32; bq];
        let mut s = vec![0.0f32; bq * KEY_SPAN];
        let mut s0 = 0;
        while s0 <= last_pos {
            let bk = KEY_SPAN.min(tk - s0).min(last_pos + 1 - s0);
            let ktm = MatRef::strided(&kt[(b * n_kv_heads + g) * hd * tk + s0..], hd, bk, tk);
            let vm = v.block(b * tk + s0, bk, g, hd);
            // S = scale · Q Kᵀ  [bq, bk]
            unsafe { gemm_tile(s.as_mut_ptr(), bk, qm, ktm, scale, false) };
            softmax_span(
                &mut s[..bq * bk],
                bk,
                q_pos0 + t0,
                s0,
                (&mut m, &mut l),
                &mut acc,
            );
            // acc += P V
            unsafe {
                gemm_tile(
                    acc.as_mut_ptr(),
                    hd,
                    MatRef::new(&s[..bq * bk], bq, bk),
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
            finish_rows(&acc, &m, &l, hd, dst, o_rs, lse_dst)
        };
    });
}

/// Decoding attention: `nq` query rows of one sequence, row `r` at position `pos0 + r`,
/// against its cached keys/values `0..=pos0 + r` (the K/V of the rows themselves already
/// written). `q`: row `r`, head `h` at `q[r·q_rs + h·d_h ..]`; `k`, `v`: position `s`, kv head
/// `g` at `[s·kv_rs + g·d_h ..]`; `o: [nq, H·d_h]`.
///
/// `scale` is the softmax scale (`1/√d_h`, times YaRN's mscale² when scaling is on).
/// Per (row, head), exactly: `s_j = (q·k_j)·scale` (8-lane FMA accumulation, a fixed
/// horizontal sum), `p_j = exp(s_j − max)`, `l = Σ p_j` in key order, `o = (Σ_j p_j·v_j)/l`
/// (FMA in key order), so a row's output does not depend on the other rows: one-token decoding
/// (`nq = 1`) and a verification pass over several rows give the same bits. The rows of a head
/// share each key/value load. Parallel over heads.
#[allow(clippy::too_many_arguments)]
pub fn decode_rows(
    q: &[f32],
    q_rs: usize,
    k: &[f32],
    v: &[f32],
    kv_rs: usize,
    nq: usize,
    pos0: usize,
    n_heads: usize,
    n_kv_heads: usize,
    hd: usize,
    scale: f32,
    o: &mut [f32],
) {
    assert!(n_heads.is_multiple_of(n_kv_heads) && nq > 0);
    let tk = pos0 + nq;
    assert!(q.len() >= (nq - 1) * q_rs + n_heads * hd);
    assert!(k.len() >= (tk - 1) * kv_rs + n_kv_heads * hd);
    assert!(v.len() >= (tk - 1) * kv_rs + n_kv_heads * hd);
    assert_eq!(o.len(), nq * n_heads * hd);
    let rep = n_heads / n_kv_heads;
    let o_ptr = SendPtr(o.as_mut_ptr());
    // (A head size that is not a multiple of 8 takes the portable path.)
    let avx2 = super::has_avx2_fma() && hd.is_multiple_of(8);
    (0..n_heads).into_par_iter().for_each(|h| {
        let g = h / rep;
        let mut sc = vec![0.0f32; nq * tk];
        let mut acc = vec![0.0f32; nq * hd];
        let args = DecodeHead {
            q: &q[h * hd..],
            q_rs,
            k: &k[g * hd..],
            v: &v[g * hd..],
            kv_rs,
            nq,
            pos0,
            hd,
            scale,
        };
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: AVX2 and FMA were detected at run time.
            unsafe { decode_head_avx2(&args, &mut sc, &mut acc) };
        } else {
            decode_head_generic(&args, &mut sc, &mut acc);
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = avx2;
            decode_head_generic(&args, &mut sc, &mut acc);
        }
        for r in 0..nq {
            // SAFETY: columns of head h of every row belong to this task only.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(o_ptr.get().add(r * n_heads * hd + h * hd), hd)
            };
            dst.copy_from_slice(&acc[r * hd..(r + 1) * hd]);
        }
    });
}

/// One head of [`decode_rows`]: slices start at the head's columns.
struct DecodeHead<'a> {
    q: &'a [f32],
    q_rs: usize,
    k: &'a [f32],
    v: &'a [f32],
    kv_rs: usize,
    nq: usize,
    pos0: usize,
    hd: usize,
    scale: f32,
}

/// Softmax of row `r`'s scores `sc[r·tk ..][..pos0 + r + 1]` in place; returns `1 / Σ p`.
#[inline(always)]
fn softmax_row(row: &mut [f32]) -> f32 {
    let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    1.0 / exp_sub_sum(row, mx)
}

/// Portable [`DecodeHead`]: the same operations in the same order as the AVX2 version
/// (8 accumulator lanes, `mul_add`, the same horizontal sum), so it gives the same bits.
fn decode_head_generic(a: &DecodeHead, sc: &mut [f32], acc: &mut [f32]) {
    let (nq, pos0, hd, tk) = (a.nq, a.pos0, a.hd, a.pos0 + a.nq);
    for s in 0..tk {
        let ks = &a.k[s * a.kv_rs..s * a.kv_rs + hd];
        for r in s.saturating_sub(pos0)..nq {
            let qr = &a.q[r * a.q_rs..r * a.q_rs + hd];
            let mut l = [0.0f32; 8];
            for (i, (&x, &y)) in qr.iter().zip(ks).enumerate() {
                l[i % 8] = x.mul_add(y, l[i % 8]);
            }
            let u = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
            let dot = (u[0] + u[2]) + (u[1] + u[3]);
            sc[r * tk + s] = dot * a.scale;
        }
    }
    let mut inv = vec![0.0f32; nq];
    for r in 0..nq {
        inv[r] = softmax_row(&mut sc[r * tk..r * tk + pos0 + r + 1]);
    }
    acc.fill(0.0);
    for s in 0..tk {
        let vs = &a.v[s * a.kv_rs..s * a.kv_rs + hd];
        for r in s.saturating_sub(pos0)..nq {
            let p = sc[r * tk + s];
            for (o, &x) in acc[r * hd..(r + 1) * hd].iter_mut().zip(vs) {
                *o = p.mul_add(x, *o);
            }
        }
    }
    for r in 0..nq {
        for o in &mut acc[r * hd..(r + 1) * hd] {
            *o *= inv[r];
        }
    }
}

/// [`decode_head_generic`] with AVX2/FMA intrinsics.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_head_avx2(a: &DecodeHead, sc: &mut [f32], acc: &mut [f32]) {
    use std::arch::x86_64::*;
    let (nq, pos0, hd, tk) = (a.nq, a.pos0, a.hd, a.pos0 + a.nq);
    assert!(sc.len() >= nq * tk && acc.len() >= nq * hd);
    assert!(a.q.len() >= (nq - 1) * a.q_rs + hd);
    assert!(a.k.len() >= (tk - 1) * a.kv_rs + hd && a.v.len() >= (tk - 1) * a.kv_rs + hd);
    let (qp, kp, vp) = (a.q.as_ptr(), a.k.as_ptr(), a.v.as_ptr());
    for s in 0..tk {
        let ks = kp.add(s * a.kv_rs);
        for r in s.saturating_sub(pos0)..nq {
            let qr = qp.add(r * a.q_rs);
            let mut l = _mm256_setzero_ps();
            let mut c = 0;
            while c < hd {
                l = _mm256_fmadd_ps(_mm256_loadu_ps(qr.add(c)), _mm256_loadu_ps(ks.add(c)), l);
                c += 8;
            }
            let u = _mm_add_ps(_mm256_castps256_ps128(l), _mm256_extractf128_ps(l, 1));
            let w = _mm_add_ps(u, _mm_movehl_ps(u, u));
            let d = _mm_add_ss(w, _mm_movehdup_ps(w));
            *sc.get_unchecked_mut(r * tk + s) = _mm_cvtss_f32(d) * a.scale;
        }
    }
    let mut inv = vec![0.0f32; nq];
    for r in 0..nq {
        inv[r] = softmax_row(&mut sc[r * tk..r * tk + pos0 + r + 1]);
    }
    // Row by row, 32 columns at a time in registers: each element still accumulates its
    // keys in order from 0 (the portable path's key-major loop gives the same operations).
    let ap = acc.as_mut_ptr();
    for r in 0..nq {
        let (ar, scr, ns) = (ap.add(r * hd), sc.as_ptr().add(r * tk), pos0 + r + 1);
        let mut c = 0;
        while c < hd {
            let w = if hd - c >= 32 { 4 } else { 1 };
            let mut o = [_mm256_setzero_ps(); 4];
            for s in 0..ns {
                let p = _mm256_set1_ps(*scr.add(s));
                let vs = vp.add(s * a.kv_rs + c);
                if w == 4 {
                    for (t, ot) in o.iter_mut().enumerate() {
                        *ot = _mm256_fmadd_ps(p, _mm256_loadu_ps(vs.add(8 * t)), *ot);
                    }
                } else {
                    o[0] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vs), o[0]);
                }
            }
            for (t, ot) in o.iter().enumerate().take(w) {
                _mm256_storeu_ps(ar.add(c + 8 * t), *ot);
            }
            c += 8 * w;
        }
    }
    for r in 0..nq {
        for o in &mut acc[r * hd..(r + 1) * hd] {
            *o *= inv[r];
        }
    }
}

/// Layout of a fused `[q | k | v]` projection buffer: row stride and column offsets.
#[derive(Clone, Copy, Debug)]
pub struct QkvLayout {
    pub rs: usize,
    pub q_off: usize,
    pub k_off: usize,
    pub v_off: usize,
}

/// Backward pass with the default softmax scale `1/√d_h`.
pub fn backward(
    dims: AttnDims,
    qkv: &[f32],
    lay: QkvLayout,
    o: &[f32],
    lse: &[f32],
    dout: &[f32],
    dqkv: &mut [f32],
) {
    let scale = 1.0 / (dims.head_dim as f32).sqrt();
    backward_scaled(dims, scale, qkv, lay, o, lse, dout, dqkv)
}

/// Backward pass (training: `q_pos0 = 0`, `tq = tk`) of [`forward_scaled`] with the same
/// `scale`. Writes `dqkv` (same layout as `qkv`) entirely. Parallel over (sequence, kv head):
/// each task owns the dq columns of its query heads and the dk/dv columns of its kv head, so the
/// accumulation order is fixed.
#[allow(clippy::too_many_arguments)]
pub fn backward_scaled(
    dims: AttnDims,
    scale: f32,
    qkv: &[f32],
    lay: QkvLayout,
    o: &[f32],
    lse: &[f32],
    dout: &[f32],
    dqkv: &mut [f32],
) {
    if gemm_precision() == Precision::Bf16 {
        let isa = super::attn_tile_bf16::best_isa();
        let io = (o, lse, dout);
        return super::attention_bf16::backward_on(isa, dims, scale, qkv, lay, io, dqkv);
    }
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
    let t = tq;
    let rep = n_heads / n_kv_heads;
    let o_rs = n_heads * hd;
    let nb = t.div_ceil(BLOCK);
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
        let b = task / n_kv_heads;
        let g = task % n_kv_heads;
        let base = b * t;
        let d = dptr.get();
        // SAFETY: these columns of rows base..base + t belong to this task.
        unsafe { zero_task_columns(d, lay, base, t, g, rep, hd) };
        let mut p = vec![0.0f32; BLOCK * BLOCK];
        let mut dp = vec![0.0f32; BLOCK * BLOCK];
        let mut dsum = vec![0.0f32; t];
        // Kᵀ and Vᵀ of this kv head: [hd, t] each.
        let mut kt = vec![0.0f32; hd * t];
        let mut vt = vec![0.0f32; hd * t];
        kv.transpose_into(base, t, g, hd, &mut kt);
        vv.transpose_into(base, t, g, hd, &mut vt);
        for h in g * rep..(g + 1) * rep {
            row_dots(&mut dsum, o, dout, base * o_rs + h * hd, o_rs, hd);
            let lse_h = &lse[(b * n_heads + h) * t..][..t];
            for kb in 0..nb {
                let s0 = kb * BLOCK;
                let bk = BLOCK.min(t - s0);
                let km = kv.block(base + s0, bk, g, hd);
                let ktm = MatRef::strided(&kt[s0..], hd, bk, t);
                let vtm = MatRef::strided(&vt[s0..], hd, bk, t);
                let dk_ptr = unsafe { d.add((base + s0) * lay.rs + lay.k_off + g * hd) };
                let dv_ptr = unsafe { d.add((base + s0) * lay.rs + lay.v_off + g * hd) };
                for qb in kb..nb {
                    let t0 = qb * BLOCK;
                    let bq = BLOCK.min(t - t0);
                    let qm = qv.block(base + t0, bq, h, hd);
                    let dom = dov.block(base + t0, bq, h, hd);
                    // P = exp(scale·Q Kᵀ − lse), masked.
                    unsafe { gemm_tile(p.as_mut_ptr(), bk, qm, ktm, scale, false) };
                    probs_block(&mut p[..bq * bk], bk, t0, s0, &lse_h[t0..t0 + bq]);
                    let pm = MatRef::new(&p[..bq * bk], bq, bk);
                    // dV += Pᵀ dO
                    unsafe { gemm_tile(dv_ptr, lay.rs, pm.t(), dom, 1.0, true) };
                    // dP = dO Vᵀ
                    unsafe { gemm_tile(dp.as_mut_ptr(), bk, dom, vtm, 1.0, false) };
                    // dS = P ⊙ (dP − D), stored in dp
                    ds_block(&mut dp[..bq * bk], &p[..bq * bk], bk, &dsum[t0..t0 + bq]);
                    let dsm = MatRef::new(&dp[..bq * bk], bq, bk);
                    // dQ += scale · dS K ; dK += scale · dSᵀ Q
                    unsafe {
                        let dq_ptr = d.add((base + t0) * lay.rs + lay.q_off + h * hd);
                        gemm_tile(dq_ptr, lay.rs, dsm, km, scale, true);
                        gemm_tile(dk_ptr, lay.rs, dsm.t(), qm, scale, true);
                    }
                }
            }
        }
    });
}

/// Reference implementation (materialises the score matrix); used by tests only.
#[cfg(test)]
pub fn naive_forward(dims: AttnDims, q: Heads, k: Heads, v: Heads) -> Vec<f32> {
    let AttnDims {
        batch,
        tq,
        tk,
        q_pos0,
        n_heads,
        n_kv_heads,
        head_dim: hd,
    } = dims;
    let rep = n_heads / n_kv_heads;
    let mut o = vec![0.0f32; batch * tq * n_heads * hd];
    for b in 0..batch {
        for h in 0..n_heads {
            let g = h / rep;
            for i in 0..tq {
                let qr = &q.data[(b * tq + i) * q.rs + q.off + h * hd..][..hd];
                let pos = q_pos0 + i;
                let mut sc: Vec<f64> = (0..=pos)
                    .map(|s| {
                        let kr = &k.data[(b * tk + s) * k.rs + k.off + g * hd..][..hd];
                        qr.iter()
                            .zip(kr)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let mut z = 0.0;
                for x in sc.iter_mut() {
                    *x = (*x - mx).exp();
                    z += *x;
                }
                for c in 0..hd {
                    let mut acc = 0.0;
                    for (s, w) in sc.iter().enumerate() {
                        acc += w / z * v.data[(b * tk + s) * v.rs + v.off + g * hd + c] as f64;
                    }
                    o[(b * tq + i) * n_heads * hd + h * hd + c] = acc as f32;
                }
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gradcheck::check;
    use crate::rng::Rng;

    fn setup(
        batch: usize,
        t: usize,
        h: usize,
        kv: usize,
        hd: usize,
        seed: u64,
    ) -> (AttnDims, QkvLayout, Vec<f32>) {
        let dims = AttnDims {
            batch,
            tq: t,
            tk: t,
            q_pos0: 0,
            n_heads: h,
            n_kv_heads: kv,
            head_dim: hd,
        };
        let rs = (h + 2 * kv) * hd;
        let lay = QkvLayout {
            rs,
            q_off: 0,
            k_off: h * hd,
            v_off: (h + kv) * hd,
        };
        let mut qkv = vec![0.0; batch * t * rs];
        Rng::new(seed).fill_normal(&mut qkv, 1.0);
        (dims, lay, qkv)
    }

    fn run_fwd(dims: AttnDims, lay: QkvLayout, qkv: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let mut o = vec![0.0; dims.batch * dims.tq * dims.n_heads * dims.head_dim];
        let mut lse = vec![0.0; dims.batch * dims.n_heads * dims.tq];
        let hv = |off| Heads {
            data: qkv,
            rs: lay.rs,
            off,
        };
        forward(
            dims,
            hv(lay.q_off),
            hv(lay.k_off),
            hv(lay.v_off),
            &mut o,
            &mut lse,
        );
        (o, lse)
    }

    #[test]
    fn decode_rows_match_one_row_at_a_time_bit_for_bit_and_the_reference() {
        let mut r = Rng::new(12);
        // hd 40: the AVX2 value loop's 32-column and 8-column steps.
        for hd in [16usize, 40] {
            let (h, kv, pos0, nq) = (6, 2, 37, 5);
            let (qrs, kvrs) = (h * hd + 3, kv * hd + 1);
            let tk = pos0 + nq;
            let mut q = vec![0.0f32; nq * qrs];
            let mut k = vec![0.0f32; tk * kvrs];
            let mut v = vec![0.0f32; tk * kvrs];
            r.fill_normal(&mut q, 1.0);
            r.fill_normal(&mut k, 1.0);
            r.fill_normal(&mut v, 1.0);
            let mut all = vec![0.0f32; nq * h * hd];
            let sc = 1.0 / (hd as f32).sqrt();
            decode_rows(&q, qrs, &k, &v, kvrs, nq, pos0, h, kv, hd, sc, &mut all);
            for row in 0..nq {
                let mut one = vec![0.0f32; h * hd];
                let p = pos0 + row;
                decode_rows(
                    &q[row * qrs..],
                    qrs,
                    &k[..(p + 1) * kvrs],
                    &v[..(p + 1) * kvrs],
                    kvrs,
                    1,
                    p,
                    h,
                    kv,
                    hd,
                    sc,
                    &mut one,
                );
                assert_eq!(
                    &all[row * h * hd..(row + 1) * h * hd],
                    &one[..],
                    "row {row}"
                );
            }
            // Portable and AVX2 paths agree bit for bit; both match the naive reference.
            let dims = AttnDims {
                batch: 1,
                tq: nq,
                tk,
                q_pos0: pos0,
                n_heads: h,
                n_kv_heads: kv,
                head_dim: hd,
            };
            let want = naive_forward(
                dims,
                Heads {
                    data: &q,
                    rs: qrs,
                    off: 0,
                },
                Heads {
                    data: &k,
                    rs: kvrs,
                    off: 0,
                },
                Heads {
                    data: &v,
                    rs: kvrs,
                    off: 0,
                },
            );
            for (a, b) in all.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
            for hh in 0..h {
                let g = hh / (h / kv);
                let args = DecodeHead {
                    q: &q[hh * hd..],
                    q_rs: qrs,
                    k: &k[g * hd..],
                    v: &v[g * hd..],
                    kv_rs: kvrs,
                    nq,
                    pos0,
                    hd,
                    scale: 1.0 / (hd as f32).sqrt(),
                };
                let (mut sc, mut acc) = (vec![0.0f32; nq * tk], vec![0.0f32; nq * hd]);
                decode_head_generic(&args, &mut sc, &mut acc);
                for row in 0..nq {
                    assert_eq!(
                        &acc[row * hd..(row + 1) * hd],
                        &all[row * h * hd + hh * hd..][..hd],
                        "generic head {hh} row {row}"
                    );
                }
            }
        }
    }

    #[test]
    fn forward_matches_naive_across_block_boundaries() {
        for &(b, t, h, kv, hd) in &[(2, 5, 2, 2, 4), (1, 150, 4, 2, 8), (2, 130, 3, 1, 16)] {
            let (dims, lay, qkv) = setup(b, t, h, kv, hd, 1);
            let (o, _) = run_fwd(dims, lay, &qkv);
            let hv = |off| Heads {
                data: &qkv,
                rs: lay.rs,
                off,
            };
            let want = naive_forward(dims, hv(lay.q_off), hv(lay.k_off), hv(lay.v_off));
            for (x, y) in o.iter().zip(&want) {
                assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            }
        }
    }

    #[test]
    fn decode_with_offset_matches_full_forward() {
        // Queries at positions 100..130 against 130 keys equal the last rows of a full pass.
        let (dims, lay, qkv) = setup(1, 130, 4, 2, 8, 3);
        let (full, _) = run_fwd(dims, lay, &qkv);
        let p0 = 100;
        let d2 = AttnDims {
            tq: 30,
            q_pos0: p0,
            ..dims
        };
        let mut o = vec![0.0; 30 * 4 * 8];
        let mut lse = vec![0.0; 4 * 30];
        let q = Heads {
            data: &qkv[p0 * lay.rs..],
            rs: lay.rs,
            off: lay.q_off,
        };
        let hv = |off| Heads {
            data: &qkv,
            rs: lay.rs,
            off,
        };
        forward(d2, q, hv(lay.k_off), hv(lay.v_off), &mut o, &mut lse);
        for (x, y) in o.iter().zip(&full[p0 * 32..]) {
            assert!((x - y).abs() < 1e-5);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        for &(b, t, h, kv, hd) in &[(2, 6, 2, 1, 4), (1, 70, 2, 2, 4)] {
            let (dims, lay, qkv) = setup(b, t, h, kv, hd, 7);
            let mut g = vec![0.0; b * t * h * hd];
            Rng::new(8).fill_normal(&mut g, 1.0);
            let loss = |p: &[f32]| {
                let (o, _) = run_fwd(dims, lay, p);
                o.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum()
            };
            let (o, lse) = run_fwd(dims, lay, &qkv);
            let mut d = vec![f32::NAN; qkv.len()];
            backward(dims, &qkv, lay, &o, &lse, &g, &mut d);
            check(&qkv, &d, loss, 1e-2, 5e-3);
        }
    }
}
