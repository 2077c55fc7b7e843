//! DSA at inference: the attention of one layer for the new rows of a cached forward
//! (chunked prefill or decoding), reading the layer's KV cache and its indexer-key cache.
//!
//! ```text
//! new rows r = 0..n at positions p0 + r, attention input a: [n, d], fused q|k|v: [n, qd]
//! q_I, k_I, w = indexer_project(a)          k_I appended to the key cache  [p0+n, d_I]
//! S_r = top-k of I(r, 0..=p0+r)             (kernels::indexer::select; all positions if ≤ k)
//! o_r = Attn(q_r, {K, V rows s ∈ S_r})      (kernels::sparse_attention::forward)  [n, H·d_h]
//! ```
//!
//! Cost per new token: the indexer's scan `O(L·H_I·d_I)` (1 byte per key dimension with the
//! 8-bit key store) and `O(k·H·d_h)` of attention, instead of dense attention's
//! `O(L·H·d_h)` reads of K and V. The selection is the same set the training forward
//! ([`crate::model::Model::forward`]) picks for that position: with f32 keys the scores are
//! bit-identical (see `kernels::indexer`).

use super::{indexer_project, IndexerOffsets};
use crate::kernels::attention::Heads;
use crate::kernels::indexer::{select, KeyStore};
use crate::kernels::sparse_attention::{self, SparseDims};
use crate::model::Model;

/// Sparse attention of layer rows `p0..p0+n` against the cache. `a: [n, d]` is the attention
/// input, `qkv: [n, qd]` the fused projections with RoPE applied (K/V rows already written to
/// `kc`/`vc`, which hold `[p0 + n, KV·d_h]` at least); the new indexer keys are appended to
/// `keys`. Writes `o: [n, H·d_h]` and `lse: [n, H]`. With `window` (benchmarks only, see
/// `CacheOptions::window_prefill`) each row attends to its last `k` positions instead.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    model: &Model,
    io: &IndexerOffsets,
    a: &[f32],
    qkv: &[f32],
    p0: usize,
    n: usize,
    window: bool,
    keys: &mut KeyStore,
    kc: &[f32],
    vc: &[f32],
    o: &mut [f32],
    lse: &mut [f32],
) {
    let c = &model.cfg;
    let dc = c.dsa.as_ref().expect("a DSA model");
    let (hi, di) = (dc.index_n_heads, dc.index_head_dim);
    let mut qi = vec![0.0f32; n * hi * di];
    let mut ki = vec![0.0f32; n * di];
    let mut wi = vec![0.0f32; n * hi];
    indexer_project(model, io, a, n, |r| p0 + r, &mut qi, &mut ki, &mut wi);
    keys.truncate(p0);
    keys.push(&ki);
    let k = dc.index_topk;
    let k_max = k.min(p0 + n);
    let limit: Vec<usize> = (0..n).map(|r| p0 + r + 1).collect();
    let mut idx = vec![-1i32; n * k_max];
    if window {
        for (r, row) in idx.chunks_mut(k_max).enumerate() {
            let end = limit[r];
            let start = end.saturating_sub(k);
            for (o, s) in row.iter_mut().zip(start..end) {
                *o = s as i32;
            }
        }
    } else {
        select(&qi, &wi, hi, keys, &limit, k, k_max, &mut idx);
    }
    let kw = c.n_kv_heads * c.head_dim;
    let view = |data| Heads {
        data,
        rs: kw,
        off: 0,
    };
    sparse_attention::forward(
        SparseDims {
            n_q: n,
            k_max,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        },
        Heads {
            data: qkv,
            rs: c.qkv_dim(),
            off: 0,
        },
        view(&kc[..(p0 + n) * kw]),
        view(&vc[..(p0 + n) * kw]),
        &idx,
        o,
        lse,
    );
}
