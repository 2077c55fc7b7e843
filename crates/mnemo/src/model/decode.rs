//! The cached driver: rows of one or more sequences through every block, each sequence's
//! keys and values appended to its own [`KvCache`] — prefill, one-token decoding, batched
//! serving and lookup verification are all this one function ([`Model::forward_batch`]).
//!
//! ```text
//! rows of sequence i: stacked at r0_i..r0_i + n_i, positions p0_i..p0_i + n_i
//! x⁰ = expand(E[tokens])                          [N, w]
//! x^{l+1} = Block_l(x^l)   (attention: per sequence against its cache; module `block`)
//! logits = RMSNorm(collapse(x^L[requested rows]))·Woutᵀ      [M, V]
//! ```
//!
//! Every linear layer is a single product over all stacked rows (for quantised weights, one
//! pass over the quantised blocks per 8 rows, see [`crate::kernels::quant::matmat`]); RoPE, the cache writes and attention run per sequence.
//! A row's logits do not depend on the other rows up to f32 rounding (≈1e-6), and for a
//! quantised model's weights every row is computed exactly as one-token decoding computes it
//! (see [`set_quant_max_rows`]).

use super::attention::{Kv, Span};
use super::block::{BlockRows, Mem};
use super::ffn::FfnRows;
use super::residual::{NormActs, Stream};
use super::workspace::LayerActs;
use super::{KvCache, Model, PREFILL_CHUNK};
use crate::kernels::matmul::linear_forward;
use crate::kernels::{embedding, qparts, rmsnorm};
use crate::mhc::HcActs;
use anyhow::{bail, Result};
use std::sync::atomic::{AtomicUsize, Ordering};

/// At most this many rows use the bit-exact quantised product [`crate::kernels::quant::matmat`]
/// (each output exactly as one-token decoding computes it: 8-bit activations, integer block
/// sums); more rows (up to [`QUANT_FAST_MAX_ROWS`]) use [`crate::kernels::quant::matmat_fast`]
/// (f32 activations, each block dequantised once for all rows).
///
/// The default is exact for every row: the multi-row integer kernel unpacks each weight block
/// once for up to 8 rows, so an extra row costs about 0.3 of one (SmolLM2, one thread: 8 rows
/// 2.9–3.6× one row's product time; `mnemo bench rows`), and exact rows make lookup decoding's
/// greedy output identical to plain decoding on quantised models too. `set_quant_max_rows(1)`
/// selects the fast product.
static QUANT_MAX_ROWS: AtomicUsize = AtomicUsize::new(QUANT_FAST_MAX_ROWS);

/// Quantised products run on at most this many rows at a time (more rows: several products).
pub const QUANT_FAST_MAX_ROWS: usize = 64;

/// See [`QUANT_MAX_ROWS`]: rows up to `n` use the exact quantised product (default: all).
pub fn set_quant_max_rows(n: usize) {
    QUANT_MAX_ROWS.store(n.max(1), Ordering::Relaxed);
}

/// Optional per-component timing of [`forward_batch`] (for `mnemo bench rows`): wall-clock and
/// process CPU nanoseconds spent in each part, summed over calls while enabled (CPU time is
/// the robust measure on a loaded machine with one worker thread).
pub mod profile {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// Components, in the order of [`NAMES`].
    pub const QKV: usize = 0;
    pub const WO: usize = 1;
    pub const FFN_UP: usize = 2;
    pub const FFN_DOWN: usize = 3;
    pub const HEAD: usize = 4;
    pub const ATTN: usize = 5;
    pub const TOTAL: usize = 6;
    pub const NAMES: [&str; 7] = [
        "qkv",
        "wo",
        "ffn_up",
        "ffn_down",
        "lm_head",
        "attention",
        "total",
    ];

    static ON: AtomicBool = AtomicBool::new(false);
    static NS: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];
    static CPU_NS: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];

    /// Start (and zero) or stop the counters.
    pub fn enable(on: bool) {
        for c in NS.iter().chain(&CPU_NS) {
            c.store(0, Ordering::Relaxed);
        }
        ON.store(on, Ordering::Relaxed);
    }

    /// The counters since [`enable`] (wall ns, process CPU ns), zeroing them.
    pub fn take() -> ([u64; 7], [u64; 7]) {
        (
            std::array::from_fn(|i| NS[i].swap(0, Ordering::Relaxed)),
            std::array::from_fn(|i| CPU_NS[i].swap(0, Ordering::Relaxed)),
        )
    }

    /// CPU time of the whole process (all threads), seconds.
    pub fn cpu_secs() -> f64 {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `t` is a valid timespec to write to.
        unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
        t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
    }

    /// Start times (wall, process CPU) when enabled (for [`stop`]).
    #[inline]
    pub(crate) fn start() -> Option<(std::time::Instant, f64)> {
        ON.load(Ordering::Relaxed)
            .then(|| (std::time::Instant::now(), cpu_secs()))
    }

    /// Add the time since `t0` (from [`start`]) to component `c`.
    #[inline]
    pub(crate) fn stop(c: usize, t0: Option<(std::time::Instant, f64)>) {
        if let Some((t0, c0)) = t0 {
            NS[c].fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            CPU_NS[c].fetch_add(((cpu_secs() - c0) * 1e9) as u64, Ordering::Relaxed);
        }
    }

    /// Run `f`, adding its time to component `c` when enabled.
    #[inline]
    pub(crate) fn time<T>(c: usize, f: impl FnOnce() -> T) -> T {
        let t0 = start();
        let r = f();
        stop(c, t0);
        r
    }
}

/// One sequence's part of a batched forward.
pub struct BatchSeq<'a> {
    /// Tokens at positions `cache.len()..` (non-empty).
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Logits are returned for the rows `logits_from..tokens.len()` (`tokens.len() - 1`: the
    /// last token only).
    pub logits_from: usize,
}

/// Which rows of a forward pass run their products on the model's quantised weights
/// (GGUF models; f32 models have none). A cached forward (prefill chunks, one-token decoding,
/// draft verification, batched serving) runs every row on the quantised products, each row
/// exactly as one-token decoding computes it (8-bit activations per 32-value block, integer
/// block sums, as llama.cpp's CPU batch path; module docs), so a row's numerics never depend
/// on what else is in the batch or on how a prompt is chunked. Prompt rows used the f32
/// (dequantised) weights before: reading those (4 bytes a weight) made a short prompt's
/// prefill cost as much as ~10 decode steps; the logits of the two paths differ by the 8-bit
/// activation rounding (see the `quantised_prefill` tests).
///
/// `generate`, `serve`, `ask` and lookup decoding all run this one rule, so they agree token
/// for token at temperature 0.
#[derive(Clone, Debug)]
pub(crate) enum Plan {
    /// Every row in f32 (training, full forwards).
    F32,
    /// Contiguous row runs `(r0, n, quantised)`, in order, covering the stacked rows.
    Runs(Vec<(usize, usize, bool)>),
}

impl Plan {
    /// The plan of a cached forward over `n` stacked rows: all on the quantised weights.
    pub(crate) fn cached(n: usize) -> Plan {
        Plan::Runs(vec![(0, n, true)])
    }

    /// Per row of `n`, whether it uses the quantised weights (`None`: none does).
    pub(crate) fn quantised_rows(&self, n: usize) -> Option<Vec<bool>> {
        let Plan::Runs(runs) = self else {
            return None;
        };
        if !runs.iter().any(|r| r.2) {
            return None;
        }
        let mut v = vec![false; n];
        for &(r0, nr, q) in runs {
            v[r0..r0 + nr].fill(q);
        }
        Some(v)
    }
}

impl Model {
    /// `y (+)= x · Wᵀ` for `n` rows and the weight at `off` (`[dout, din]`), each run of rows
    /// of `plan` from the f32 parameters or (when the model has a quantised copy of this
    /// weight) the quantised one, in products of at most [`QUANT_FAST_MAX_ROWS`] rows; timed
    /// as profile component `part`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn lin(
        &self,
        plan: &Plan,
        part: usize,
        y: &mut [f32],
        x: &[f32],
        off: usize,
        n: usize,
        din: usize,
        dout: usize,
        acc: bool,
    ) {
        // llama.cpp's numerics: the input rounded as ggml converts it for this weight's type.
        let xq =
            crate::kernels::act_quant::rounded_rows(self.act_quant_at.get(&off).copied(), x, din);
        let x = &xq[..];
        let f32_rows = |y: &mut [f32], x: &[f32], n: usize| {
            linear_forward(y, x, self.w(off, din * dout), n, din, dout, acc)
        };
        // A packed-only model's quantised weights have no f32 copy: every row uses them.
        let all = [(0, n, true)];
        let parts = match (self.quant.get(&off), self.quant_parts.get(&off)) {
            (Some(q), _) => std::slice::from_ref(q),
            (None, Some(p)) => &p[..],
            (None, None) => &[],
        };
        let fits =
            !parts.is_empty() && qparts::rows(parts) == dout && parts.iter().all(|q| q.cols == din);
        let runs = match plan {
            _ if fits && self.packed_only => &all[..],
            Plan::Runs(runs) if fits => &runs[..],
            _ => return profile::time(part, || f32_rows(y, x, n)),
        };
        profile::time(part, || {
            for &(r0, nr, quantised) in runs {
                let (yr, xr) = (
                    &mut y[r0 * dout..(r0 + nr) * dout],
                    &x[r0 * din..(r0 + nr) * din],
                );
                if !quantised {
                    f32_rows(yr, xr, nr);
                    continue;
                }
                let exact = QUANT_MAX_ROWS.load(Ordering::Relaxed);
                for (yc, xc) in yr
                    .chunks_mut(QUANT_FAST_MAX_ROWS * dout)
                    .zip(xr.chunks(QUANT_FAST_MAX_ROWS * din))
                {
                    let m = xc.len() / din;
                    qparts::matmat(parts, xc, m, yc, acc, m > exact);
                }
            }
        })
    }

    /// The embedding rows of `tokens` into `out: [n, d]`: from the f32 table, or from a
    /// packed-only model's mapped copy of it (the official BF16 `embed.weight`).
    pub(crate) fn embed_rows(&self, out: &mut [f32], tokens: &[u32]) {
        let (d, v) = (self.cfg.d_model, self.cfg.vocab_size);
        let off = self.layout.embed;
        match self.quant.get(&off) {
            Some(q) if self.packed_only && q.ty.is_packed_float() && q.cols == d => {
                use rayon::prelude::*;
                out.par_chunks_mut(d)
                    .zip(tokens.par_iter())
                    .for_each(|(o, &t)| crate::kernels::fp8dot::decode_row(q, t as usize, o));
            }
            _ => embedding::forward(out, self.w(off, v * d), tokens, d),
        }
    }

    /// The output head over the rows `sel` of the last streams `x: [N, w]` (`ssq`: their
    /// per-stream sums of squares, hc/mhc; empty when plain): `logits = rms(collapse(x[sel]);
    /// norm)·Woutᵀ` `[sel.len(), V]`, with the mHC head `hc_head` (the main model's, or an MTP
    /// block's) and the final norm at `norm`. The head's rows are all wanted rows, so it runs
    /// on the quantised weights where there are any (as one-token decoding's).
    pub(crate) fn head_logits(
        &self,
        hc_head: Option<crate::mhc::HcOffsets>,
        norm: usize,
        x: &[f32],
        ssq: Option<&[f32]>,
        sel: &[usize],
    ) -> Vec<f32> {
        let c = &self.cfg;
        let (d, v) = (c.d_model, c.vocab_size);
        let st = Stream::of(c);
        let w = st.width();
        let nh = w / d;
        let m = sel.len();
        let gather = |x: &[f32], k: usize| -> Vec<f32> {
            sel.iter()
                .flat_map(|&r| x[r * k..(r + 1) * k].iter().copied())
                .collect()
        };
        let xm = gather(x, w);
        let sm = ssq.map(|s| gather(s, nh)).unwrap_or_default();
        let mut head = match st {
            Stream::Hc(dm) => HcActs::new(&dm, m, true),
            Stream::Plain { .. } => HcActs::default(),
        };
        let y = st.collapse(&self.params, hc_head, (&xm, &sm), &mut head);
        let mut nf = NormActs::new(m, d);
        rmsnorm::forward(&mut nf.y, &mut nf.rstd, y, self.w(norm, d), d, c.norm_eps);
        let mut logits = vec![0.0f32; m * v];
        let head_plan = Plan::cached(m);
        self.lin(
            &head_plan,
            profile::HEAD,
            &mut logits,
            &nf.y,
            self.layout.output,
            m,
            d,
            v,
            false,
        );
        logits
    }

    /// Run `tokens` (positions `cache.len()..`) through the model, appending to the cache;
    /// returns the logits `[V]` of the last token. Long inputs run in chunks of
    /// [`PREFILL_CHUNK`] tokens.
    pub fn forward_cached(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            bail!("forward_cached needs at least one token");
        }
        if cache.len() + tokens.len() > cache.capacity() {
            bail!(
                "context of {} tokens exceeds the model's max_seq_len {}",
                cache.len() + tokens.len(),
                cache.capacity()
            );
        }
        self.check_engram_tokens(tokens)?;
        let mut logits = Vec::new();
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            let mut seq = [BatchSeq {
                tokens: chunk,
                cache: &mut *cache,
                logits_from: chunk.len() - 1,
            }];
            logits = self.forward_batch(&mut seq)?.pop().unwrap_or_default();
        }
        Ok(logits)
    }

    /// Run every sequence's tokens through the model, appending to its cache. Returns, per
    /// sequence, the logits `[rows, V]` of its rows `logits_from..` (row-major).
    pub fn forward_batch(&self, seqs: &mut [BatchSeq<'_>]) -> Result<Vec<Vec<f32>>> {
        self.check_seqs(seqs)?;
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        // The whole forward runs on a rayon worker, so the many small parallel loops inside it
        // (per layer: norms, products, attention) start without waking a blocked caller thread
        // each time; the arithmetic is the same.
        rayon::scope(|_| self.forward_rows(seqs, None))
    }

    /// [`Self::forward_batch`], also returning the last streams `X^L` (before the head) of
    /// every stacked row `[N, w]` (`w` = streams × `d_model`): what MTP drafting reads
    /// (module [`super::mtp_decode`]).
    pub fn forward_batch_streams(
        &self,
        seqs: &mut [BatchSeq<'_>],
    ) -> Result<(Vec<Vec<f32>>, Vec<f32>)> {
        self.check_seqs(seqs)?;
        if seqs.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut xl = Vec::new();
        let logits = rayon::scope(|_| self.forward_rows(seqs, Some(&mut xl)))?;
        Ok((logits, xl))
    }

    /// Every sequence's rows fit its cache (checked before any cache is touched).
    fn check_seqs(&self, seqs: &[BatchSeq<'_>]) -> Result<()> {
        for s in seqs.iter() {
            if s.tokens.is_empty() {
                bail!("forward_batch: a sequence has no tokens");
            }
            if s.logits_from >= s.tokens.len() {
                bail!("forward_batch: logits_from is past the last token");
            }
            self.check_engram_tokens(s.tokens)?;
            if s.cache.len() + s.tokens.len() > s.cache.capacity() {
                bail!(
                    "context of {} tokens exceeds the cache's capacity {}",
                    s.cache.len() + s.tokens.len(),
                    s.cache.capacity()
                );
            }
        }
        Ok(())
    }

    fn forward_rows(
        &self,
        seqs: &mut [BatchSeq<'_>],
        keep_streams: Option<&mut Vec<f32>>,
    ) -> Result<Vec<Vec<f32>>> {
        let t_total = profile::start();
        let c = &self.cfg;
        let (d, v) = (c.d_model, c.vocab_size);
        let ly = &self.layout;
        let st = Stream::of(c);
        let w = st.width();
        let nh = w / d;
        // Stack the rows of every sequence; the rows whose logits are wanted.
        let mut sel = Vec::new();
        let mut r0 = 0;
        for s in seqs.iter() {
            sel.extend((s.logits_from..s.tokens.len()).map(|r| r0 + r));
            r0 += s.tokens.len();
        }
        let plan = Plan::cached(n_rows(seqs));
        let mut tokens = Vec::new();
        let mut spans = Vec::with_capacity(seqs.len());
        for s in seqs.iter_mut() {
            let (p0, ni) = (s.cache.len(), s.tokens.len());
            s.cache.reserve(p0 + ni);
            spans.push(Span {
                r0: tokens.len(),
                n: ni,
                p0,
                cache: &mut *s.cache,
            });
            tokens.extend_from_slice(s.tokens);
        }
        let n = tokens.len();
        let mut x0 = vec![0.0f32; n * d];
        self.embed_rows(&mut x0, &tokens);
        // Stream buffers: entering the block, between its sublayers, after it.
        let hc = !matches!(st, Stream::Plain { .. });
        let mut xs: Vec<Vec<f32>> = (0..3).map(|_| vec![0.0f32; n * w]).collect();
        let mut ssq: Vec<Vec<f32>> = match hc {
            true => (0..3).map(|_| vec![0.0f32; n * nh]).collect(),
            false => Vec::new(),
        };
        {
            let mut none = [];
            let s0 = ssq.first_mut().map_or(&mut none[..], |v| &mut v[..]);
            st.expand(&mut xs[0], s0, &x0);
        }
        let mut la = LayerActs::new(c, 0, n);
        let cids = self
            .engram
            .as_ref()
            .map(|e| e.compress.compress(&tokens))
            .unwrap_or_default();
        let ffn = FfnRows {
            tokens: &tokens,
            seq_len: n,
            aux: false,
            plan: &plan,
        };
        for l in 0..c.n_layers {
            let mut rows = BlockRows {
                kv: Kv::Cache(&mut spans),
                ffn,
                mem: match self.engram_layer_of(l) {
                    Some(_) => Mem::Cache { cids: &cids },
                    None => Mem::None,
                },
            };
            self.block_forward(l, &mut xs, &mut ssq, &mut la, &mut rows)?;
            xs.swap(0, 2);
            if hc {
                ssq.swap(0, 2);
            }
        }
        self.engram_advance(&tokens, &cids, &mut spans);
        // The head over the requested rows only, as one product.
        let mut logits = self.head_logits(
            ly.hc_head,
            ly.norm,
            &xs[0],
            ssq.first().map(|s| &s[..]),
            &sel,
        );
        if let Some(keep) = keep_streams {
            *keep = std::mem::take(&mut xs[0]);
        }
        let lens: Vec<usize> = spans.iter().map(|sp| sp.p0 + sp.n).collect();
        drop(spans);
        let mut out = Vec::with_capacity(seqs.len());
        let mut j = 0;
        let one = seqs.len() == 1;
        for (s, len) in seqs.iter_mut().zip(lens) {
            let k = s.tokens.len() - s.logits_from;
            if one {
                out.push(std::mem::take(&mut logits));
            } else {
                out.push(logits[j * v..(j + k) * v].to_vec());
            }
            j += k;
            s.cache.set_len(len);
        }
        profile::stop(profile::TOTAL, t_total);
        Ok(out)
    }
}

/// The number of stacked rows of `seqs`.
fn n_rows(seqs: &[BatchSeq<'_>]) -> usize {
    seqs.iter().map(|s| s.tokens.len()).sum()
}
