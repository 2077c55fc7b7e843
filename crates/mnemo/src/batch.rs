//! Batched forward over several sequences, each with its own KV cache.
//!
//! The rows of all sequences (one current token each while decoding; a run of draft tokens
//! being verified; a chunk of a prompt) are stacked into one `[N, d]` activation matrix, so
//! every linear layer is a single GEMM (or, for quantised weights and few rows, one pass over
//! the quantised blocks for all rows, see [`crate::kernels::quant::matmat`]); RoPE, the cache
//! writes and attention run per sequence against its own cache. Same kernels, same arithmetic
//! as [`Model::forward_cached`]; the logits of a row agree with decoding that sequence alone
//! up to f32 rounding (≈1e-6); for a quantised model's weights every row is computed exactly as
//! one-token decoding computes it (see [`set_quant_max_rows`]).

use crate::generate::KvCache;
use crate::kernels::attention::{self, AttnDims, Heads};
use crate::kernels::matmul::linear_forward;
use crate::kernels::{embedding, rmsnorm, swiglu};
use crate::model::{Ffn, Model};
use crate::moe::{self, MoeActs, MoeSpec};
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

/// Up to this many rows, quantised weights are used directly (beyond, the f32 GEMM: prefill).
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

/// `y (+)= x · Wᵀ` for `n` rows and the weight at `off` (`[dout, din]`).
#[allow(clippy::too_many_arguments)]
fn linear_rows(
    model: &Model,
    y: &mut [f32],
    x: &[f32],
    off: usize,
    n: usize,
    din: usize,
    dout: usize,
    acc: bool,
) {
    match model.quant.get(&off) {
        Some(q) if q.rows == dout && q.cols == din && n <= QUANT_FAST_MAX_ROWS => {
            if n <= QUANT_MAX_ROWS.load(Ordering::Relaxed) {
                crate::kernels::quant::matmat(q, x, n, y, acc)
            } else {
                crate::kernels::quant::matmat_fast(q, x, n, y, acc)
            }
        }
        _ => linear_forward(
            y,
            x,
            &model.params[off..off + din * dout],
            n,
            din,
            dout,
            acc,
        ),
    }
}

/// Run every sequence's tokens through the model, appending to its cache. Returns, per
/// sequence, the logits `[rows, V]` of its rows `logits_from..` (row-major).
pub fn forward_batch(model: &Model, seqs: &mut [BatchSeq<'_>]) -> Result<Vec<Vec<f32>>> {
    // The whole forward runs on a rayon worker, so the many small parallel loops inside it
    // (per layer: norms, products, attention) start without waking a blocked caller thread
    // each time; the arithmetic is the same.
    rayon::scope(|_| forward_batch_in_pool(model, seqs))
}

fn forward_batch_in_pool(model: &Model, seqs: &mut [BatchSeq<'_>]) -> Result<Vec<Vec<f32>>> {
    for s in seqs.iter() {
        if s.tokens.is_empty() {
            bail!("forward_batch: a sequence has no tokens");
        }
        if s.logits_from >= s.tokens.len() {
            bail!("forward_batch: logits_from is past the last token");
        }
        // Before any sequence's cache is touched.
        model.check_engram_tokens(s.tokens)?;
        if s.cache.len() + s.tokens.len() > s.cache.capacity() {
            bail!(
                "context of {} tokens exceeds the cache's capacity {}",
                s.cache.len() + s.tokens.len(),
                s.cache.capacity()
            );
        }
    }
    for s in seqs.iter_mut() {
        let need = s.cache.len() + s.tokens.len();
        s.cache.reserve(need);
    }
    if !model.cfg.residual.is_plain() || model.cfg.engram.is_some() || model.cfg.dsa.is_some() {
        // The batched layer loop below is the plain-residual one without Engram; other models
        // run each sequence through the model's own cached forward, one token at a time for
        // the rows whose logits are wanted.
        let mut out = Vec::with_capacity(seqs.len());
        for s in seqs.iter_mut() {
            let mut rows = Vec::new();
            if s.logits_from > 0 {
                model.forward_cached(&s.tokens[..s.logits_from], s.cache)?;
            }
            for &tok in &s.tokens[s.logits_from..] {
                rows.extend(model.forward_cached(&[tok], s.cache)?);
            }
            out.push(rows);
        }
        return Ok(out);
    }
    if seqs.is_empty() {
        return Ok(Vec::new());
    }
    let t_total = profile::start();
    let c = &model.cfg;
    let (d, hd, f, v) = (c.d_model, c.head_dim, c.ffn_hidden, c.vocab_size);
    let (h, kv) = (c.n_heads, c.n_kv_heads);
    let qd = c.qkv_dim();
    let kw = kv * hd;
    let ly = &model.layout;
    let w = |off: usize, len: usize| &model.params[off..off + len];
    // Row offset of each sequence in the stacked matrix.
    let mut starts = Vec::with_capacity(seqs.len());
    let mut tokens = Vec::new();
    for s in seqs.iter() {
        starts.push(tokens.len());
        tokens.extend_from_slice(s.tokens);
    }
    let n = tokens.len();
    let p0s: Vec<usize> = seqs.iter().map(|s| s.cache.len()).collect();
    let mut x = vec![0.0f32; n * d];
    let mut a = vec![0.0f32; n * d];
    let mut rstd = vec![0.0f32; n];
    let mut qkv = vec![0.0f32; n * qd];
    let mut o = vec![0.0f32; n * h * hd];
    let mut lse = vec![0.0f32; h * n];
    let mut h13 = vec![0.0f32; n * 2 * f];
    let mut g = vec![0.0f32; n * f];
    let mut moe_acts = MoeActs::default();
    embedding::forward(&mut x, w(ly.embed, v * d), &tokens, d);
    for (l, lo) in ly.layers.iter().enumerate() {
        rmsnorm::forward(&mut a, &mut rstd, &x, w(lo.attn_norm, d), d, c.norm_eps);
        profile::time(profile::QKV, || {
            linear_rows(model, &mut qkv, &a, lo.wqkv, n, d, qd, false)
        });
        for (i, s) in seqs.iter_mut().enumerate() {
            let (r0, ni, p0) = (starts[i], s.tokens.len(), p0s[i]);
            let rows = &mut qkv[r0 * qd..(r0 + ni) * qd];
            model.rope.apply(rows, ni, qd, 0, h, hd, |r| p0 + r, false);
            model
                .rope
                .apply(rows, ni, qd, h * hd, kv, hd, |r| p0 + r, false);
            let (kc, vc) = s.cache.layer_mut(l);
            for r in 0..ni {
                let row = &rows[r * qd..(r + 1) * qd];
                kc[(p0 + r) * kw..(p0 + r + 1) * kw].copy_from_slice(&row[h * hd..h * hd + kw]);
                vc[(p0 + r) * kw..(p0 + r + 1) * kw]
                    .copy_from_slice(&row[h * hd + kw..h * hd + 2 * kw]);
            }
            // Up to QUANT_FAST_MAX_ROWS rows (decode steps, draft verification), the decoding
            // kernel, in which a row's output does not depend on the other rows: a verified
            // row's logits equal one-token decoding's bit for bit. Longer chunks (prefill) use
            // the blocked kernel over all their rows at once.
            let t_attn = profile::start();
            let orows = &mut o[r0 * h * hd..(r0 + ni) * h * hd];
            if ni <= QUANT_FAST_MAX_ROWS {
                attention::decode_rows(
                    rows,
                    qd,
                    &kc[..(p0 + ni) * kw],
                    &vc[..(p0 + ni) * kw],
                    kw,
                    ni,
                    p0,
                    h,
                    kv,
                    hd,
                    c.attn_scale(),
                    orows,
                );
            } else {
                let dims = AttnDims {
                    batch: 1,
                    tq: ni,
                    tk: p0 + ni,
                    q_pos0: p0,
                    n_heads: h,
                    n_kv_heads: kv,
                    head_dim: hd,
                };
                let (kh, vh) = (&kc[..(p0 + ni) * kw], &vc[..(p0 + ni) * kw]);
                attention::forward_scaled(
                    dims,
                    c.attn_scale(),
                    Heads {
                        data: rows,
                        rs: qd,
                        off: 0,
                    },
                    Heads {
                        data: kh,
                        rs: kw,
                        off: 0,
                    },
                    Heads {
                        data: vh,
                        rs: kw,
                        off: 0,
                    },
                    orows,
                    &mut lse[..h * ni],
                );
            }
            profile::stop(profile::ATTN, t_attn);
        }
        profile::time(profile::WO, || {
            linear_rows(model, &mut x, &o, lo.wo, n, h * hd, d, true)
        });
        rmsnorm::forward(&mut a, &mut rstd, &x, w(lo.ffn_norm, d), d, c.norm_eps);
        match lo.ffn {
            Ffn::Dense { w13, w2 } => {
                profile::time(profile::FFN_UP, || {
                    linear_rows(model, &mut h13, &a, w13, n, d, 2 * f, false)
                });
                swiglu::forward(&mut g, &h13, f);
                profile::time(profile::FFN_DOWN, || {
                    linear_rows(model, &mut x, &g, w2, n, f, d, true)
                });
            }
            Ffn::Moe(mo) => {
                let spec = MoeSpec {
                    aux_coef: 0.0,
                    ..MoeSpec::new(c)
                };
                let table = model.hash_tables[l].as_deref();
                moe::forward(
                    &spec,
                    &model.params,
                    &mo,
                    &a,
                    &tokens,
                    table,
                    n,
                    &mut moe_acts,
                    &mut x,
                );
            }
        }
    }
    // Final norm and output projection of the requested rows, as one product.
    let mut rows = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        rows.extend((s.logits_from..s.tokens.len()).map(|r| starts[i] + r));
    }
    let m = rows.len();
    let mut sel = vec![0.0f32; m * d];
    for (j, &r) in rows.iter().enumerate() {
        sel[j * d..(j + 1) * d].copy_from_slice(&x[r * d..(r + 1) * d]);
    }
    let mut hf = vec![0.0f32; m * d];
    let mut r1 = vec![0.0f32; m];
    rmsnorm::forward(&mut hf, &mut r1, &sel, w(ly.norm, d), d, c.norm_eps);
    let mut logits = vec![0.0f32; m * v];
    profile::time(profile::HEAD, || {
        linear_rows(model, &mut logits, &hf, ly.output, m, d, v, false)
    });
    let mut out = Vec::with_capacity(seqs.len());
    let mut j = 0;
    let one = seqs.len() == 1;
    for (i, s) in seqs.iter_mut().enumerate() {
        let k = s.tokens.len() - s.logits_from;
        if one {
            out.push(std::mem::take(&mut logits));
        } else {
            out.push(logits[j * v..(j + k) * v].to_vec());
        }
        j += k;
        s.cache.set_len(p0s[i] + s.tokens.len());
    }
    profile::stop(profile::TOTAL, t_total);
    Ok(out)
}

/// Run `tokens` after what `cache` holds and return the logits of every one of them
/// (`[tokens.len(), V]`): the verification pass of lookup decoding.
pub fn forward_all(model: &Model, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
    let mut s = [BatchSeq {
        tokens,
        cache,
        logits_from: 0,
    }];
    Ok(forward_batch(model, &mut s)?.pop().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::kernels::rope::RopeLayout;

    pub(crate) fn tiny(seed: u64, max_seq_len: usize) -> Model {
        tiny_with(seed, max_seq_len, crate::config::Residual::Plain)
    }

    fn tiny_with(seed: u64, max_seq_len: usize, residual: crate::config::Residual) -> Model {
        let mut cfg = ModelConfig {
            vocab_size: 37,
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            rope_theta: 10000.0,
            rope_dim: 8,
            rope_layout: RopeLayout::Half,
            ffn_hidden: 48,
            tied_embeddings: false,
            norm_eps: 1e-5,
            init_std: 0.2,
            max_seq_len,
            ..ModelConfig::dense_defaults()
        };
        cfg.residual = residual;
        cfg.hc_mult = 2;
        let mut m = Model::new(cfg).unwrap();
        m.init(seed);
        m
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() < 1e-5, "{what}[{i}]: {x} vs {y}");
        }
    }

    #[test]
    fn batched_decode_matches_single_sequence_decoding() {
        for res in [crate::config::Residual::Plain, crate::config::Residual::Mhc] {
            batched_matches_single(&tiny_with(4, 128, res));
        }
    }

    fn batched_matches_single(m: &Model) {
        let prompts: Vec<Vec<u32>> = (0..5)
            .map(|s| {
                (0..(3 + 7 * s))
                    .map(|i| ((i * 5 + s) % 37) as u32)
                    .collect()
            })
            .collect();
        // Reference: each sequence alone through forward_cached.
        let mut want = Vec::new();
        for p in &prompts {
            let mut c = KvCache::new(m);
            let mut l = vec![m.forward_cached(p, &mut c).unwrap()];
            for t in 0..4u32 {
                l.push(m.forward_cached(&[(t * 3) % 37], &mut c).unwrap());
            }
            want.push(l);
        }
        // Batched: prefill all prompts in one call, then decode four steps together.
        let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(m)).collect();
        let mut seqs: Vec<BatchSeq> = prompts
            .iter()
            .zip(caches.iter_mut())
            .map(|(p, c)| BatchSeq {
                tokens: p,
                cache: c,
                logits_from: p.len() - 1,
            })
            .collect();
        let got = forward_batch(m, &mut seqs).unwrap();
        for (i, g) in got.iter().enumerate() {
            close(g, &want[i][0], &format!("prefill seq {i}"));
        }
        for t in 0..4u32 {
            let tok = [(t * 3) % 37];
            let mut seqs: Vec<BatchSeq> = caches
                .iter_mut()
                .map(|c| BatchSeq {
                    tokens: &tok,
                    cache: c,
                    logits_from: 0,
                })
                .collect();
            let got = forward_batch(m, &mut seqs).unwrap();
            for (i, g) in got.iter().enumerate() {
                close(g, &want[i][1 + t as usize], &format!("step {t} seq {i}"));
            }
        }
        for c in &caches {
            assert!(c.len() >= 7);
        }
    }

    #[test]
    fn forward_all_returns_every_rows_logits_and_truncation_rewinds() {
        let m = tiny(5, 64);
        let toks: Vec<u32> = (0..20).map(|i| (i * 11 % 37) as u32).collect();
        let mut c = KvCache::new(&m);
        m.forward_cached(&toks[..10], &mut c).unwrap();
        let all = forward_all(&m, &toks[10..], &mut c).unwrap();
        assert_eq!(c.len(), 20);
        for j in 0..10 {
            let mut r = KvCache::new(&m);
            let want = m.forward_cached(&toks[..11 + j], &mut r).unwrap();
            close(&all[j * 37..(j + 1) * 37], &want, &format!("row {j}"));
        }
        // Rewind to 13 positions and continue: same as never having seen the rest.
        c.truncate(13);
        let got = m.forward_cached(&[7], &mut c).unwrap();
        let mut r = KvCache::new(&m);
        let mut p = toks[..13].to_vec();
        p.push(7);
        close(
            &got,
            &m.forward_cached(&p, &mut r).unwrap(),
            "after truncate",
        );
        assert!(forward_all(&m, &[1; 60], &mut c).is_err(), "overflow");
    }
}
