//! The DSA variant of the attention sublayer (module [`crate::dsa`] has the indexer and its
//! losses): the cached rows of one sequence (chunked prefill or decoding, reading the layer's
//! KV cache and its indexer-key cache), and a training batch in a DSA stage.
//!
//! ```text
//! new rows r = 0..n at positions p0 + r, attention input a: [n, d], fused q|k|v: [n, qd]
//! q_I, k_I, w = dsa::project(a)          k_I appended to the key cache  [p0+n, d_I]
//! S_r = top-k of I(r, 0..=p0+r)             (kernels::indexer::select; all positions if ≤ k)
//! o_r = Attn(q_r, {K, V rows s ∈ S_r})      (kernels::sparse_attention::forward)  [n, H·d_h]
//! ```
//!
//! Cost per new token: the indexer's scan `O(L·H_I·d_I)` (1 byte per key dimension with the
//! 8-bit key store) and `O(k·H·d_h)` of attention, instead of dense attention's
//! `O(L·H·d_h)` reads of K and V. The selection is the same set the training forward
//! ([`crate::model::Model::forward`]) picks for that position: with f32 keys the scores are
//! bit-identical (see `kernels::indexer`).

use super::attention::{batch_dims, dsa_shapes, qkv_layout, AttnActs, DsaBatch};
use super::Model;
use crate::dsa::{self, DsaStage, IndexerOffsets};
use crate::kernels::attention::{self, Heads};
use crate::kernels::indexer::{select, KeyStore};
use crate::kernels::sparse_attention::{self, SparseDims};

impl Model {
    /// Sparse attention of layer rows `p0..p0+n` against the cache. `a: [n, d]` is the
    /// attention input, `qkv: [n, qd]` the fused projections with RoPE applied (K/V rows
    /// already written to `kc`/`vc`, which hold `[p0 + n, KV·d_h]`); the new indexer keys are
    /// appended to `keys`. Writes `o: [n, H·d_h]` and `lse: [n, H]`. With `window` (benchmarks
    /// only, see `CacheOptions::window_prefill`) each row attends to its last `k` positions.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend_dsa_cached(
        &self,
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
        let model = self;
        let c = &model.cfg;
        let dc = c.dsa.as_ref().expect("a DSA model");
        let (hi, di) = (dc.index_n_heads, dc.index_head_dim);
        let mut qi = vec![0.0f32; n * hi * di];
        let mut ki = vec![0.0f32; n * di];
        let mut wi = vec![0.0f32; n * hi];
        let rope = model.index_rope.as_ref().expect("the indexer RoPE table");
        let pos = |r| p0 + r;
        dsa::project(
            &model.params,
            c.d_model,
            dc,
            rope,
            io,
            a,
            n,
            &pos,
            &mut qi,
            &mut ki,
            &mut wi,
            None,
        );
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

    /// DSA attention of one block of a training batch: the indexer on `a`, then sparse
    /// attention over its top-k (sparse stage) or dense attention (warm-up and dense stages),
    /// writing `acts.o` and `acts.lse` (`[N, H]` when sparse, `[b, H, t]` when dense). Adds
    /// the block's sums over query rows of the indexer KL and recall to `db`.
    pub(crate) fn dsa_attention(
        &self,
        io: &IndexerOffsets,
        (b, t): (usize, usize),
        a: &[f32],
        acts: &mut AttnActs,
        db: &mut DsaBatch,
    ) {
        let c = &self.cfg;
        let dc = c.dsa.as_ref().expect("a DSA config");
        let irope = self.index_rope.as_ref().expect("the indexer RoPE table");
        let n = b * t;
        let (h, kv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let (lay, dims) = (qkv_layout(c), batch_dims(c, b, t));
        let sh = dsa_shapes(c, b, t);
        let run = db.run;
        let da = &mut acts.dsa;
        da.project(&self.params, dc, irope, io, a, sh);
        let norm = 1.0 / (c.n_layers * n) as f32;
        let dense_lse = |r: usize, hh: usize| ((r / t) * h + hh) * t + r % t;
        let qkv = &acts.qkv;
        let hv = |off| Heads {
            data: qkv,
            rs: lay.rs,
            off,
        };
        if run.stage.is_sparse() {
            let k_max = dc.index_topk.min(t);
            if db.freeze && da.k_max == k_max && da.idx.len() == n * k_max {
                da.rescore(dc);
            } else {
                da.select(dc, sh);
            }
            let sd = SparseDims {
                n_q: n,
                k_max,
                n_heads: h,
                n_kv_heads: kv,
                head_dim: hd,
            };
            sparse_attention::forward(
                sd,
                hv(lay.q_off),
                hv(lay.k_off),
                hv(lay.v_off),
                &da.idx,
                &mut acts.o,
                &mut acts.lse,
            );
            if run.kl {
                let lse = &acts.lse;
                let f = |r: usize, hh: usize| lse[r * h + hh];
                db.kl += da.kl(dc, sh, qkv, lay, &f, DsaStage::Sparse, norm).0;
            }
            if run.recall {
                // The dense attention's probabilities, for the recall only (bounded cost: the
                // caller asks for it on logging steps).
                db.od.resize(n * h * hd, 0.0);
                db.lsed.resize(n * h, 0.0);
                attention::forward(
                    dims,
                    hv(lay.q_off),
                    hv(lay.k_off),
                    hv(lay.v_off),
                    db.od,
                    db.lsed,
                );
                let l2 = &*db.lsed;
                db.recall += da.recall_dense(sh, qkv, lay, &|r, hh| l2[dense_lse(r, hh)]);
            }
        } else {
            attention::forward(
                dims,
                hv(lay.q_off),
                hv(lay.k_off),
                hv(lay.v_off),
                &mut acts.o,
                &mut acts.lse,
            );
            if run.kl || run.recall {
                let lse = &acts.lse;
                let f = |r: usize, hh: usize| lse[dense_lse(r, hh)];
                let (kl, recall) = da.kl(dc, sh, qkv, lay, &f, run.stage, norm);
                db.kl += kl;
                db.recall += recall;
            }
        }
    }
}
