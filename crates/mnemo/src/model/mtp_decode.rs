//! The cached driver of an MTP block (module [`super::mtp`]): MTP block `j` run incrementally
//! over new rows of one sequence, its attention against its own decode state (a V4 layer
//! cache, [`super::attention_v4_cache`]) with the same rollback as the main model's. What MTP
//! speculative decoding ([`crate::speculate`]) drafts with.
//!
//! ```text
//! rows i = 0..n at positions p0 + i (p0 = cache.len()):
//!   h[i]    the streams entering the block [n, w]: the main model's last streams X^L at
//!           position p0 + i (a verified position), or the block's own output at the
//!           previous position (a drafted one: the block repeated, as DeepSeek's MTP
//!           drafting does)
//!   u[i]    the token after position p0 + i (its embedding)                      [n]
//!   Y       = e_proj(rms(E[u]; enorm)) + h_proj(rms(h; hnorm))   (Model::mtp_input)  [n, w]
//!   G       = Block_{L+j}(Y)   (Model::block_forward, Kv::Cache over cache.v4[L + j])  [n, w]
//!   logits  = rms(HcHead_j(G[rows]); norm_j)·Woutᵀ   (Model::head_logits)        [m, V]
//! ```
//!
//! The block's state lives in the `L + j` entry of a [`KvCache`] of its own (the main
//! layers' entries of that cache stay empty), so its length counts the block's positions,
//! and [`KvCache::truncate`] rolls it back.

use super::attention::{Kv, Span};
use super::block::{BlockRows, Mem};
use super::decode::Plan;
use super::ffn::FfnRows;
use super::mtp::MtpWs;
use super::residual::Stream;
use super::workspace::LayerActs;
use super::{KvCache, Model};
use anyhow::{bail, Result};

/// What [`Model::mtp_forward_cached`] returns.
pub struct MtpRows {
    /// Logits `[n − logits_from, V]` of the rows `logits_from..n`.
    pub logits: Vec<f32>,
    /// The block's output streams `G` of every row `[n, w]` (the next drafting step's `h`).
    pub streams: Vec<f32>,
}

impl Model {
    /// Run MTP block `j` over `n = next.len()` new rows at positions `cache.len()..` (module
    /// docs): `h: [n, w]` the streams entering it, `next[i]` the token after position
    /// `cache.len() + i`. Appends to `cache` (the block's own, `KvCache::new(model)`).
    pub fn mtp_forward_cached(
        &self,
        j: usize,
        h: &[f32],
        next: &[u32],
        cache: &mut KvCache,
        logits_from: usize,
    ) -> Result<MtpRows> {
        let c = &self.cfg;
        let (d, v) = (c.d_model, c.vocab_size);
        let st = Stream::of(c);
        let w = st.width();
        let n = next.len();
        if j >= c.mtp_layers() {
            bail!(
                "MTP block {j} does not exist (the model has {} MTP blocks, v4.num_nextn_predict_layers)",
                c.mtp_layers()
            );
        }
        if n == 0 || logits_from >= n {
            bail!("mtp_forward_cached: {n} rows, logits from row {logits_from}");
        }
        if h.len() != n * w {
            bail!(
                "mtp_forward_cached: {} stream floats for {n} rows of width {w}",
                h.len()
            );
        }
        if let Some(&x) = next.iter().find(|&&x| x as usize >= v) {
            bail!("mtp_forward_cached: token {x} is outside the vocabulary of {v}");
        }
        if cache.len() + n > cache.capacity() {
            bail!(
                "MTP block context of {} positions exceeds the cache's capacity {}",
                cache.len() + n,
                cache.capacity()
            );
        }
        rayon::scope(|_| {
            let l = c.n_layers + j;
            let mo = self.layout.mtp[j];
            let mut acts = MtpWs::new(c, n, 1).depths.remove(0);
            acts.u.copy_from_slice(next);
            let mut xs: Vec<Vec<f32>> = (0..3).map(|_| vec![0.0f32; n * w]).collect();
            let hc = !matches!(st, Stream::Plain { .. });
            let mut ssq: Vec<Vec<f32>> = match hc {
                true => (0..3).map(|_| vec![0.0f32; n * (w / d)]).collect(),
                false => Vec::new(),
            };
            {
                let mut none = [];
                let sq = ssq.first_mut().map_or(&mut none[..], |s| &mut s[..]);
                self.mtp_input(j, &mut acts, h, &mut xs[0], sq);
            }
            let p0 = cache.len();
            cache.reserve(p0 + n);
            let mut spans = [Span {
                r0: 0,
                n,
                p0,
                cache: &mut *cache,
            }];
            // The main model's rule (`Plan`): every row runs on the quantised weights where
            // there are any.
            let plan = Plan::cached(n);
            let mut la = LayerActs::new(c, l, n);
            let mut rows = BlockRows {
                kv: Kv::Cache(&mut spans),
                ffn: FfnRows {
                    tokens: next,
                    seq_len: n,
                    aux: false,
                    plan: &plan,
                },
                mem: Mem::None,
            };
            self.block_forward(l, &mut xs, &mut ssq, &mut la, &mut rows)?;
            let sel: Vec<usize> = (logits_from..n).collect();
            let last = ssq.get(2).map(|s| &s[..]);
            let logits = self.head_logits(mo.hc_head, mo.norm, &xs[2], last, &sel);
            cache.set_len(p0 + n);
            Ok(MtpRows {
                logits,
                streams: std::mem::take(&mut xs[2]),
            })
        })
    }
}
