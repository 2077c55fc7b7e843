//! Attention over per-query index lists (the main attention of DeepSeek Sparse Attention).
//!
//! Query row `t` attends only to the key rows `idx[t, 0..k_max]` (`−1` = unused slot), the
//! same set for every head; query head `h` reads kv head `h / (H / KV)` (GQA as in
//! [`super::attention`]). Rows are absolute rows of the `k`/`v` views, so the caller decides
//! what "causal" means (the indexer only ever selects `s ≤ t`).
//!
//! ```text
//! forward   s_j = q_h·k_{idx_j}/√d_h     lse_h = log Σ_j exp s_j     o_h = Σ_j exp(s_j − lse_h)·v_{idx_j}
//! backward  p_j = exp(s_j − lse_h)   D = dO_h·o_h   dS_j = p_j·(dO_h·v_{idx_j} − D)
//!           dq_h = Σ_j dS_j·k_{idx_j}/√d_h     dk_s += Σ_{(t,j): idx=s} dS_j·q_h/√d_h     dv_s += Σ p_j·dO_h
//! ```
//!
//! Cost per query is `O(k_max·H·d_h)`: no `T×T` score matrix exists at any point. Shapes:
//! `q: [n_q, H·d_h]`-like [`Heads`] view, `k, v: [n_k, KV·d_h]` views, `idx: [n_q, k_max]`,
//! `o: [n_q, H·d_h]`, `lse: [n_q, H]` (`−∞` for a row with no valid index, whose output is 0).
//!
//! Parallelism and determinism: the forward pass and the dq part of the backward run one task
//! per query row; dk/dv run one task per key row over an inverted index (the `(t, j)` pairs
//! that selected the key, in increasing `t`), so every sum has a fixed order.

use super::attention::{Heads, QkvLayout};
use super::{has_avx512f, SendPtr};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
pub struct SparseDims {
    /// Query rows.
    pub n_q: usize,
    /// Slots per query row in `idx`.
    pub k_max: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Dot product with 8 independent accumulators (vectorises; fixed summation order).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

fn row<'a>(v: &Heads<'a>, r: usize, head: usize, hd: usize) -> &'a [f32] {
    &v.data[r * v.rs + v.off + head * hd..][..hd]
}

/// Forward pass: writes `o` and `lse` entirely. Parallel over query rows.
pub fn forward(
    dims: SparseDims,
    q: Heads,
    k: Heads,
    v: Heads,
    idx: &[i32],
    o: &mut [f32],
    lse: &mut [f32],
) {
    let SparseDims {
        n_q,
        k_max,
        n_heads,
        n_kv_heads,
        head_dim: hd,
    } = dims;
    assert!(
        n_heads.is_multiple_of(n_kv_heads),
        "n_heads must be a multiple of n_kv_heads"
    );
    assert!(k_max > 0, "k_max must be > 0");
    assert_eq!(idx.len(), n_q * k_max, "idx must be [n_q, k_max]");
    assert_eq!(o.len(), n_q * n_heads * hd);
    assert_eq!(lse.len(), n_q * n_heads);
    let rep = n_heads / n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let avx512 = hd.is_multiple_of(16) && rep <= 64 && has_avx512f();
    o.par_chunks_mut(n_heads * hd)
        .zip(lse.par_chunks_mut(n_heads))
        .zip(idx.par_chunks(k_max))
        .enumerate()
        .for_each(|(t, ((orow, lrow), ids))| {
            let mut s = vec![0.0f32; k_max];
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: AVX-512F detected at run time; head_dim % 16 == 0 checked below.
                unsafe {
                    x86::row_forward(
                        &q, &k, &v, t, ids, n_heads, rep, hd, scale, &mut s, orow, lrow,
                    )
                };
                return;
            }
            for h in 0..n_heads {
                let g = h / rep;
                let qh = row(&q, t, h, hd);
                let mut mx = f32::NEG_INFINITY;
                for (sj, &r) in s.iter_mut().zip(ids) {
                    *sj = if r >= 0 {
                        dot(qh, row(&k, r as usize, g, hd)) * scale
                    } else {
                        f32::NEG_INFINITY
                    };
                    mx = mx.max(*sj);
                }
                let oh = &mut orow[h * hd..(h + 1) * hd];
                oh.fill(0.0);
                if mx == f32::NEG_INFINITY {
                    lrow[h] = f32::NEG_INFINITY;
                    continue;
                }
                let mut sum = 0.0f32;
                for (sj, &r) in s.iter_mut().zip(ids) {
                    if r >= 0 {
                        *sj = (*sj - mx).exp();
                        sum += *sj;
                        axpy(oh, *sj, row(&v, r as usize, g, hd));
                    }
                }
                let inv = 1.0 / sum;
                oh.iter_mut().for_each(|x| *x *= inv);
                lrow[h] = mx + sum.ln();
            }
        });
}

/// The forward row with AVX-512 (16-wide FMAs; `head_dim % 16 == 0`, at most 64 query heads
/// per kv head): per kv head, each
/// selected key row is loaded once for the `rep` query heads that read it, and so is each value
/// row. Same maths as the portable loop; the summation order differs (FMA, 16 lanes).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::attention::Heads;
    use std::arch::x86_64::*;

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_forward(
        q: &Heads,
        k: &Heads,
        v: &Heads,
        t: usize,
        ids: &[i32],
        n_heads: usize,
        rep: usize,
        hd: usize,
        scale: f32,
        s: &mut Vec<f32>,
        orow: &mut [f32],
        lrow: &mut [f32],
    ) {
        let kk = ids.len();
        s.resize(rep * kk, 0.0);
        let nv = hd / 16;
        for g in 0..n_heads / rep {
            let qbase = q.data.as_ptr().add(t * q.rs + q.off + g * rep * hd);
            // Scores s[r, j] = q_r · k_j · scale.
            let mut mx = [f32::NEG_INFINITY; 64];
            for (j, &r) in ids.iter().enumerate() {
                if r < 0 {
                    for hr in 0..rep {
                        s[hr * kk + j] = f32::NEG_INFINITY;
                    }
                    continue;
                }
                let kp = k.data.as_ptr().add(r as usize * k.rs + k.off + g * hd);
                for hr in 0..rep {
                    let qp = qbase.add(hr * hd);
                    let mut acc = _mm512_setzero_ps();
                    for c in 0..nv {
                        acc = _mm512_fmadd_ps(
                            _mm512_loadu_ps(qp.add(c * 16)),
                            _mm512_loadu_ps(kp.add(c * 16)),
                            acc,
                        );
                    }
                    let x = _mm512_reduce_add_ps(acc) * scale;
                    s[hr * kk + j] = x;
                    mx[hr] = mx[hr].max(x);
                }
            }
            // Softmax weights, then o_r = Σ_j p[r, j]·v_j with each v row read once.
            let mut sum = [0.0f32; 64];
            for hr in 0..rep {
                let m = mx[hr];
                let row = &mut s[hr * kk..(hr + 1) * kk];
                let mut tot = 0.0f32;
                if m == f32::NEG_INFINITY {
                    row.fill(0.0);
                } else {
                    for x in row.iter_mut() {
                        *x = (*x - m).exp();
                        tot += *x;
                    }
                }
                sum[hr] = tot;
                let h = g * rep + hr;
                lrow[h] = if m == f32::NEG_INFINITY {
                    f32::NEG_INFINITY
                } else {
                    m + tot.ln()
                };
                orow[h * hd..(h + 1) * hd].fill(0.0);
            }
            for (j, &r) in ids.iter().enumerate() {
                if r < 0 {
                    continue;
                }
                let vp = v.data.as_ptr().add(r as usize * v.rs + v.off + g * hd);
                for hr in 0..rep {
                    let p = _mm512_set1_ps(s[hr * kk + j]);
                    let op = orow.as_mut_ptr().add((g * rep + hr) * hd);
                    for c in 0..nv {
                        let o = _mm512_loadu_ps(op.add(c * 16));
                        _mm512_storeu_ps(
                            op.add(c * 16),
                            _mm512_fmadd_ps(p, _mm512_loadu_ps(vp.add(c * 16)), o),
                        );
                    }
                }
            }
            for (hr, &tot) in sum.iter().enumerate().take(rep) {
                let h = g * rep + hr;
                if lrow[h] == f32::NEG_INFINITY || tot == 0.0 {
                    continue;
                }
                let inv = 1.0 / tot;
                orow[h * hd..(h + 1) * hd]
                    .iter_mut()
                    .for_each(|x| *x *= inv);
            }
        }
    }
}

/// The inverse of an index list: for every key row `s < n_k`, the flat slots `t·k_max + j`
/// with `idx[t, j] = s`, in increasing order (CSR: `entries[offsets[s]..offsets[s + 1]]`).
pub fn invert_index(idx: &[i32], n_k: usize) -> (Vec<usize>, Vec<usize>) {
    let mut offsets = vec![0usize; n_k + 1];
    for &r in idx {
        if r >= 0 {
            assert!((r as usize) < n_k, "index {r} outside the {n_k} key rows");
            offsets[r as usize + 1] += 1;
        }
    }
    for s in 0..n_k {
        offsets[s + 1] += offsets[s];
    }
    let mut fill = offsets.clone();
    let mut entries = vec![0usize; offsets[n_k]];
    for (slot, &r) in idx.iter().enumerate() {
        if r >= 0 {
            entries[fill[r as usize]] = slot;
            fill[r as usize] += 1;
        }
    }
    (offsets, entries)
}

/// Backward pass in the training layout: q, k, v inside one fused buffer `qkv` (rows are both
/// query and key rows, `n_k = n_q`), gradient `dqkv` of the same layout, written entirely.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dims: SparseDims,
    qkv: &[f32],
    lay: QkvLayout,
    idx: &[i32],
    o: &[f32],
    lse: &[f32],
    dout: &[f32],
    dqkv: &mut [f32],
) {
    let SparseDims {
        n_q,
        k_max,
        n_heads,
        n_kv_heads,
        head_dim: hd,
    } = dims;
    assert_eq!(qkv.len(), n_q * lay.rs);
    assert_eq!(dqkv.len(), qkv.len());
    assert!(k_max > 0, "k_max must be > 0");
    assert_eq!(idx.len(), n_q * k_max);
    let rep = n_heads / n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let o_rs = n_heads * hd;
    let view = |off| Heads {
        data: qkv,
        rs: lay.rs,
        off,
    };
    let (qv, kv, vv) = (view(lay.q_off), view(lay.k_off), view(lay.v_off));
    // P and dS of every (query, head, slot), for the key-side pass.
    let mut p = vec![0.0f32; n_q * n_heads * k_max];
    let mut ds = vec![0.0f32; n_q * n_heads * k_max];
    let dptr = SendPtr(dqkv.as_mut_ptr());
    p.par_chunks_mut(n_heads * k_max)
        .zip(ds.par_chunks_mut(n_heads * k_max))
        .enumerate()
        .for_each(|(t, (pt, dst))| {
            // SAFETY: this task writes only the q columns of row t.
            let dq = unsafe {
                std::slice::from_raw_parts_mut(dptr.get().add(t * lay.rs + lay.q_off), n_heads * hd)
            };
            dq.fill(0.0);
            let ids = &idx[t * k_max..(t + 1) * k_max];
            for h in 0..n_heads {
                let g = h / rep;
                let qh = row(&qv, t, h, hd);
                let doh = &dout[t * o_rs + h * hd..][..hd];
                let dsum = dot(doh, &o[t * o_rs + h * hd..][..hd]);
                let l = lse[t * n_heads + h];
                let dqh = &mut dq[h * hd..(h + 1) * hd];
                for (j, &r) in ids.iter().enumerate() {
                    if r < 0 || l == f32::NEG_INFINITY {
                        continue;
                    }
                    let kr = row(&kv, r as usize, g, hd);
                    let pj = (dot(qh, kr) * scale - l).exp();
                    let dsj = pj * (dot(doh, row(&vv, r as usize, g, hd)) - dsum);
                    pt[h * k_max + j] = pj;
                    dst[h * k_max + j] = dsj;
                    axpy(dqh, dsj * scale, kr);
                }
            }
        });
    let (offsets, entries) = invert_index(idx, n_q);
    (0..n_q).into_par_iter().for_each(|s| {
        // SAFETY: this task writes only the k and v columns of row s.
        let (dk, dv) = unsafe {
            let base = dptr.get().add(s * lay.rs);
            (
                std::slice::from_raw_parts_mut(base.add(lay.k_off), n_kv_heads * hd),
                std::slice::from_raw_parts_mut(base.add(lay.v_off), n_kv_heads * hd),
            )
        };
        dk.fill(0.0);
        dv.fill(0.0);
        for &slot in &entries[offsets[s]..offsets[s + 1]] {
            let (t, j) = (slot / k_max, slot % k_max);
            for h in 0..n_heads {
                let g = h / rep;
                let f = (t * n_heads + h) * k_max + j;
                axpy(
                    &mut dk[g * hd..(g + 1) * hd],
                    ds[f] * scale,
                    row(&qv, t, h, hd),
                );
                axpy(
                    &mut dv[g * hd..(g + 1) * hd],
                    p[f],
                    &dout[t * o_rs + h * hd..][..hd],
                );
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::attention::{self, AttnDims};
    use crate::kernels::gradcheck::check;
    use crate::rng::Rng;

    fn setup(n: usize, h: usize, kv: usize, hd: usize, seed: u64) -> (QkvLayout, Vec<f32>) {
        let rs = (h + 2 * kv) * hd;
        let lay = QkvLayout {
            rs,
            q_off: 0,
            k_off: h * hd,
            v_off: (h + kv) * hd,
        };
        let mut qkv = vec![0.0; n * rs];
        Rng::new(seed).fill_normal(&mut qkv, 1.0);
        (lay, qkv)
    }

    fn run(dims: SparseDims, lay: QkvLayout, qkv: &[f32], idx: &[i32]) -> (Vec<f32>, Vec<f32>) {
        let mut o = vec![0.0; dims.n_q * dims.n_heads * dims.head_dim];
        let mut lse = vec![0.0; dims.n_q * dims.n_heads];
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
            idx,
            &mut o,
            &mut lse,
        );
        (o, lse)
    }

    /// Random causal index lists over sequences of length `t`: each query row picks up to
    /// `k_max` distinct earlier-or-equal rows of its own sequence (in random order), rest −1.
    fn random_idx(b: usize, t: usize, k_max: usize, seed: u64) -> Vec<i32> {
        let mut r = Rng::new(seed);
        let mut idx = vec![-1i32; b * t * k_max];
        for bb in 0..b {
            for i in 0..t {
                let mut cand: Vec<i32> = (0..=i).map(|s| (bb * t + s) as i32).collect();
                for j in (1..cand.len()).rev() {
                    let x = r.below(j as u64 + 1) as usize;
                    cand.swap(j, x);
                }
                let m = cand.len().min(k_max);
                // Leave a hole in the middle sometimes.
                for (j, &c) in cand[..m].iter().enumerate() {
                    let slot = if m < k_max && j == m - 1 {
                        k_max - 1
                    } else {
                        j
                    };
                    idx[(bb * t + i) * k_max + slot] = c;
                }
            }
        }
        idx
    }

    #[test]
    fn full_index_lists_equal_dense_causal_attention() {
        // k_max ≥ T with every earlier key listed: identical to the flash kernel.
        let (b, t, h, kv, hd) = (2, 9, 4, 2, 8);
        let (lay, qkv) = setup(b * t, h, kv, hd, 1);
        let k_max = t + 2;
        let mut idx = vec![-1i32; b * t * k_max];
        for bb in 0..b {
            for i in 0..t {
                for s in 0..=i {
                    // Reverse order: the set, not the order, matters.
                    idx[(bb * t + i) * k_max + (i - s)] = (bb * t + s) as i32;
                }
            }
        }
        let dims = SparseDims {
            n_q: b * t,
            k_max,
            n_heads: h,
            n_kv_heads: kv,
            head_dim: hd,
        };
        let (o, lse) = run(dims, lay, &qkv, &idx);
        let ad = AttnDims {
            batch: b,
            tq: t,
            tk: t,
            q_pos0: 0,
            n_heads: h,
            n_kv_heads: kv,
            head_dim: hd,
        };
        let hv = |off| Heads {
            data: &qkv,
            rs: lay.rs,
            off,
        };
        let mut od = vec![0.0; o.len()];
        let mut lsed = vec![0.0; lse.len()];
        attention::forward(
            ad,
            hv(lay.q_off),
            hv(lay.k_off),
            hv(lay.v_off),
            &mut od,
            &mut lsed,
        );
        for (x, y) in o.iter().zip(&od) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
        // lse layouts: sparse [n, H], dense [b, H, t].
        for bb in 0..b {
            for hh in 0..h {
                for i in 0..t {
                    let x = lse[(bb * t + i) * h + hh];
                    let y = lsed[(bb * h + hh) * t + i];
                    assert!((x - y).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        for &(b, t, h, kv, hd, k_max) in &[(2, 7, 2, 1, 4, 3), (1, 12, 4, 2, 8, 5)] {
            let (lay, qkv) = setup(b * t, h, kv, hd, 7);
            let idx = random_idx(b, t, k_max, 3);
            let dims = SparseDims {
                n_q: b * t,
                k_max,
                n_heads: h,
                n_kv_heads: kv,
                head_dim: hd,
            };
            let mut g = vec![0.0; b * t * h * hd];
            Rng::new(8).fill_normal(&mut g, 1.0);
            let loss = |p: &[f32]| {
                let (o, _) = run(dims, lay, p, &idx);
                o.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum()
            };
            let (o, lse) = run(dims, lay, &qkv, &idx);
            let mut d = vec![f32::NAN; qkv.len()];
            backward(dims, &qkv, lay, &idx, &o, &lse, &g, &mut d);
            assert!(d.iter().all(|x| x.is_finite()));
            check(&qkv, &d, loss, 1e-2, 5e-3);
        }
    }

    #[test]
    fn invert_index_lists_slots_in_order() {
        let idx = [0, 1, -1, 1, 2, 0];
        let (off, ent) = invert_index(&idx, 3);
        assert_eq!(off, vec![0, 2, 4, 5]);
        assert_eq!(ent, vec![0, 5, 1, 3, 4]);
    }
}
