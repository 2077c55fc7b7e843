//! The attention sublayer: causal GQA attention with partial RoPE, dense or DeepSeek Sparse
//! Attention (DSA), for every driver.
//!
//! ```text
//! a: [N, d] (normed input)     q|k|v = a·[Wq; Wk; Wv]ᵀ                 [N, (H+2KV)·d_h]
//! q, k ← RoPE(q, k, pos(r))    o = Attn(q, K, V)                        [N, H·d_h]
//! out (+)= o·Woᵀ                                                        [N, d]
//! ```
//!
//! Qwen models add q/k/v biases or per-head q/k RMSNorms between the projection and RoPE
//! ([`super::attention_qk`]). DeepSeek-V4's attention ([`super::attention_v4`]) and DeepSeek-V2's
//! multi-head latent attention ([`super::attention_mla`]) replace the whole sublayer, driven by
//! the same [`Kv`].
//!
//! `Attn` is dense causal attention, or (DSA) attention over the lightning indexer's top-k
//! keys (module [`crate::dsa`]). What a driver decides is [`Kv`]: where the keys and values
//! come from and the positions of the rows —
//! - [`Kv::Batch`]: `b` sequences × `t` positions that attend causally to themselves (training,
//!   full forward); DSA runs in a training stage ([`DsaRun`]) with its KL/recall statistics.
//! - [`Kv::Cache`]: rows grouped by sequence ([`Span`]); each sequence appends its keys and
//!   values (and indexer keys) to its own [`KvCache`] and attends to all of it (prefill,
//!   decoding, batched serving, lookup verification).
//!
//! The backward pass exists for [`Kv::Batch`] only.

use super::decode::Plan;
use super::KvCache;
use super::{LayerOffsets, Model};
use crate::config::ModelConfig;
use crate::dsa::{self, DsaActs, DsaRun};
use crate::kernels::attention::{self, AttnDims, Heads, QkvLayout};
use crate::kernels::matmul::linear_backward_frozen;
use crate::kernels::sparse_attention::{self, SparseDims};

/// One sequence's rows of a cached forward: rows `r0..r0 + n` of the stacked batch are its
/// positions `p0..p0 + n` (`p0` = what its cache held before).
pub(crate) struct Span<'c> {
    pub(crate) r0: usize,
    pub(crate) n: usize,
    pub(crate) p0: usize,
    pub(crate) cache: &'c mut KvCache,
}

/// The training-stage side of a DSA batch forward.
pub(crate) struct DsaBatch<'w> {
    pub(crate) run: DsaRun,
    /// Keep the previous selection (finite-difference tests).
    pub(crate) freeze: bool,
    /// Scratch for the dense attention of the recall.
    pub(crate) od: &'w mut Vec<f32>,
    pub(crate) lsed: &'w mut Vec<f32>,
    /// Sums over layers and query rows of the indexer KL and recall.
    pub(crate) kl: f64,
    pub(crate) recall: f64,
}

/// Where keys and values come from, and the rows' positions (module docs).
pub(crate) enum Kv<'a, 'w, 'c> {
    Batch {
        b: usize,
        t: usize,
        dsa: Option<&'a mut DsaBatch<'w>>,
    },
    Cache(&'a mut [Span<'c>]),
}

/// The attention activations of one block.
#[derive(Default)]
pub(crate) struct AttnActs {
    /// Fused q|k|v with RoPE applied `[N, qd]`.
    pub(crate) qkv: Vec<f32>,
    /// Attention output `[N, H·d_h]`.
    pub(crate) o: Vec<f32>,
    /// Log-sum-exp per (row, head): `[b, H, t]` when dense, `[N, H]` when sparse.
    pub(crate) lse: Vec<f32>,
    /// DSA: the indexer's activations and selection.
    pub(crate) dsa: DsaActs,
    /// DeepSeek-V4 attention's activations.
    pub(crate) v4: super::attention_v4::V4Acts,
    /// The q/k norms' pre-norm values (`qk_norm`).
    pub(crate) qk: super::attention_qk::QkActs,
    /// Multi-head latent attention's scratch (`mla`).
    pub(crate) mla: super::attention_mla::MlaActs,
}

impl AttnActs {
    pub(crate) fn new(c: &ModelConfig, n: usize) -> Self {
        AttnActs {
            qkv: vec![0.0; n * c.qkv_dim()],
            o: vec![0.0; n * c.n_heads * c.head_dim],
            lse: vec![0.0; n * c.n_heads],
            dsa: DsaActs::default(),
            v4: Default::default(),
            qk: Default::default(),
            mla: Default::default(),
        }
    }
}

/// The fused q|k|v layout of a model.
pub(crate) fn qkv_layout(c: &ModelConfig) -> QkvLayout {
    let (h, kv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
    QkvLayout {
        rs: c.qkv_dim(),
        q_off: 0,
        k_off: h * hd,
        v_off: (h + kv) * hd,
    }
}

/// The attention shapes of a training batch `[b, t]`.
pub(crate) fn batch_dims(c: &ModelConfig, b: usize, t: usize) -> AttnDims {
    AttnDims {
        batch: b,
        tq: t,
        tk: t,
        q_pos0: 0,
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
    }
}

impl Model {
    /// The attention sublayer of block `l` on its normed input `a: [N, d]`: writes (`acc`:
    /// adds) `o·Woᵀ` into `out: [N, d]`. `plan`: which rows use the model's quantised
    /// weights (cached drivers).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_forward(
        &self,
        l: usize,
        lo: &LayerOffsets,
        a: &[f32],
        acts: &mut AttnActs,
        kv: &mut Kv,
        plan: &Plan,
        out: &mut [f32],
        acc: bool,
    ) {
        if let Some(vo) = &lo.v4 {
            return self.v4_attention_forward(l, vo, a, kv, plan, &mut acts.v4, out, acc);
        }
        if let Some(mo) = &lo.mla {
            return self.mla_attention_forward(l, mo, a, kv, plan, &mut acts.mla, out, acc);
        }
        let c = &self.cfg;
        let n = a.len() / c.d_model;
        let (d, h, kvh, hd) = (c.d_model, c.n_heads, c.n_kv_heads, c.head_dim);
        let qd = c.qkv_dim();
        acts.qkv.resize(n * qd, 0.0);
        acts.o.resize(n * h * hd, 0.0);
        self.lin(
            plan,
            super::decode::profile::QKV,
            &mut acts.qkv,
            a,
            lo.wqkv,
            n,
            d,
            qd,
            false,
        );
        if lo.qk.bqkv.is_some() || lo.qk.q_norm.is_some() {
            self.qk_forward(&lo.qk, &mut acts.qkv, &mut acts.qk);
        }
        let qkv = &mut acts.qkv;
        match kv {
            Kv::Batch { b, t, dsa } => {
                let t = *t;
                self.rope.apply(qkv, n, qd, 0, h, hd, |r| r % t, false);
                self.rope
                    .apply(qkv, n, qd, h * hd, kvh, hd, |r| r % t, false);
                match (dsa.as_deref_mut(), &lo.indexer) {
                    (Some(db), Some(io)) => self.dsa_attention(io, (*b, t), a, acts, db),
                    _ => {
                        let lay = qkv_layout(c);
                        let hv = |off| Heads {
                            data: &acts.qkv,
                            rs: qd,
                            off,
                        };
                        acts.lse.resize(n * h, 0.0);
                        attention::forward_scaled(
                            batch_dims(c, *b, t),
                            c.attn_scale(),
                            hv(lay.q_off),
                            hv(lay.k_off),
                            hv(lay.v_off),
                            &mut acts.o,
                            &mut acts.lse,
                        );
                    }
                }
            }
            Kv::Cache(spans) => {
                let t0 = super::decode::profile::start();
                for sp in spans.iter_mut() {
                    self.attend_cached(l, lo, sp, a, acts);
                }
                super::decode::profile::stop(super::decode::profile::ATTN, t0);
            }
        }
        self.lin(
            plan,
            super::decode::profile::WO,
            out,
            &acts.o,
            lo.wo,
            n,
            h * hd,
            d,
            acc,
        );
    }

    /// One sequence's rows of a cached forward: RoPE at their positions, their keys and
    /// values appended to the cache, attention over the whole cache (dense, or DSA over the
    /// indexer's top-k unless the cache attends densely).
    fn attend_cached(
        &self,
        l: usize,
        lo: &LayerOffsets,
        sp: &mut Span,
        a: &[f32],
        acts: &mut AttnActs,
    ) {
        let c = &self.cfg;
        let (d, h, kvh, hd) = (c.d_model, c.n_heads, c.n_kv_heads, c.head_dim);
        let (qd, kw) = (c.qkv_dim(), kvh * hd);
        let (r0, ni, p0) = (sp.r0, sp.n, sp.p0);
        let rows = &mut acts.qkv[r0 * qd..(r0 + ni) * qd];
        self.rope.apply(rows, ni, qd, 0, h, hd, |r| p0 + r, false);
        self.rope
            .apply(rows, ni, qd, h * hd, kvh, hd, |r| p0 + r, false);
        let cache = &mut *sp.cache;
        {
            let (kc, vc) = cache.layer_mut(l);
            for r in 0..ni {
                let row = &rows[r * qd..(r + 1) * qd];
                kc[(p0 + r) * kw..(p0 + r + 1) * kw].copy_from_slice(&row[h * hd..h * hd + kw]);
                vc[(p0 + r) * kw..(p0 + r + 1) * kw]
                    .copy_from_slice(&row[h * hd + kw..h * hd + 2 * kw]);
            }
        }
        let orows = &mut acts.o[r0 * h * hd..(r0 + ni) * h * hd];
        acts.lse.resize(acts.lse.len().max(ni * h), 0.0);
        let lse = &mut acts.lse[..ni * h];
        let (kc, vc, ik) = cache.attention_parts(l, p0 + ni);
        match (&lo.indexer, ik) {
            (Some(io), Some((keys, window))) => self.attend_dsa_cached(
                io,
                &a[r0 * d..(r0 + ni) * d],
                rows,
                p0,
                ni,
                window && ni > 1,
                keys,
                kc,
                vc,
                orows,
                lse,
            ),
            // Up to QUANT_FAST_MAX_ROWS rows (decode steps, draft verification), the decoding
            // kernel, in which a row's output does not depend on the other rows: a verified
            // row's logits equal one-token decoding's bit for bit. Longer chunks (prefill) use
            // the blocked kernel over all their rows at once.
            _ if ni <= super::decode::QUANT_FAST_MAX_ROWS => attention::decode_rows(
                rows,
                qd,
                kc,
                vc,
                kw,
                ni,
                p0,
                h,
                kvh,
                hd,
                c.attn_scale(),
                orows,
            ),
            _ => {
                let dims = AttnDims {
                    batch: 1,
                    tq: ni,
                    tk: p0 + ni,
                    q_pos0: p0,
                    n_heads: h,
                    n_kv_heads: kvh,
                    head_dim: hd,
                };
                let heads = |data, rs| Heads { data, rs, off: 0 };
                attention::forward_scaled(
                    dims,
                    c.attn_scale(),
                    heads(rows, qd),
                    heads(kc, kw),
                    heads(vc, kw),
                    orows,
                    lse,
                );
            }
        }
    }

    /// Backward of [`Model::attention_forward`] over a training batch `[b, t]`: from
    /// `dout = dL/dout` into `da = dL/da` (overwritten), accumulating `dWqkv`, `dWo` into
    /// `grads` unless `frozen`. `sparse`: the forward attended over the DSA selection.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_backward(
        &self,
        l: usize,
        lo: &LayerOffsets,
        (b, t): (usize, usize),
        a: &[f32],
        acts: &AttnActs,
        sparse: bool,
        frozen: bool,
        (dout, da): (&[f32], &mut [f32]),
        grads: &mut [f32],
        (dattn, dqkv): (&mut [f32], &mut [f32]),
    ) {
        if let Some(vo) = &lo.v4 {
            return self.v4_attention_backward(l, vo, a, (b, t), &acts.v4, (dout, da), grads);
        }
        assert!(
            lo.mla.is_none(),
            "multi-head latent attention (mla) is inference only: it has no backward pass"
        );
        let c = &self.cfg;
        let n = b * t;
        let (d, h, kv, hd) = (c.d_model, c.n_heads, c.n_kv_heads, c.head_dim);
        let qd = c.qkv_dim();
        let lay = qkv_layout(c);
        linear_backward_frozen(
            Some((dattn, false)),
            (!frozen).then_some(&mut grads[lo.wo..lo.wo + d * h * hd]),
            dout,
            &acts.o,
            self.w(lo.wo, d * h * hd),
            n,
            h * hd,
            d,
        );
        if sparse && lo.indexer.is_some() {
            let da_ = &acts.dsa;
            let sd = SparseDims {
                n_q: n,
                k_max: da_.k_max,
                n_heads: h,
                n_kv_heads: kv,
                head_dim: hd,
            };
            sparse_attention::backward(
                sd, &acts.qkv, lay, &da_.idx, &acts.o, &acts.lse, dattn, dqkv,
            );
        } else {
            attention::backward_scaled(
                batch_dims(c, b, t),
                c.attn_scale(),
                &acts.qkv,
                lay,
                &acts.o,
                &acts.lse,
                dattn,
                dqkv,
            );
        }
        self.rope
            .apply(dqkv, n, qd, lay.q_off, h, hd, |r| r % t, true);
        self.rope
            .apply(dqkv, n, qd, lay.k_off, kv, hd, |r| r % t, true);
        self.qk_backward(&lo.qk, &acts.qk, &mut dqkv[..n * qd], grads);
        linear_backward_frozen(
            Some((da, false)),
            (!frozen).then_some(&mut grads[lo.wqkv..lo.wqkv + qd * d]),
            dqkv,
            a,
            self.w(lo.wqkv, qd * d),
            n,
            d,
            qd,
        );
    }
}

/// The DSA helpers' shapes of a training batch `[b, t]`.
pub(crate) fn dsa_shapes(c: &ModelConfig, b: usize, t: usize) -> dsa::Shapes {
    dsa::Shapes {
        b,
        t,
        d: c.d_model,
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
    }
}
