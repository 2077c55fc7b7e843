//! Lightning-indexer scoring against a cache of indexer keys, and top-k selection, for
//! inference with DeepSeek Sparse Attention (spec `dsa.md` §1, §3 steps 7–11).
//!
//! ```text
//! I(t, s) = Σ_j w(t, j) · ReLU(q(t, j) · k(s))      q: [n_q, H, d]   w: [n_q, H]   k: [L, d]
//! S_t     = top-k of I(t, 0..limit_t)              ranked by (score desc, position asc)
//! ```
//!
//! Both stores keep the keys in blocks of 16 keys so that one SIMD register holds one
//! dimension (or four) of 16 keys and a query is a broadcast:
//! - **f32** (exact), block `[d][16]`: the scores are bit-identical to the training forward's
//!   `dsa::score` (same products, same 8-lane summation tree, no FMA), so cached
//!   decoding selects exactly the keys the full forward selects.
//! - **8-bit** (optional), one f32 scale per key (`k ≈ scale·k8`, `|k8| ≤ 127`; the spec's FP8
//!   cache with a per-token scale, in int8), block `[d/4][16][4]` bytes offset by +128 (so they
//!   are unsigned): one AVX-512 VNNI `vpdpbusd` multiplies four dimensions of 16 keys by four
//!   broadcast query bytes, so a query head against 16 keys is `d/4` instructions.
//!
//! With 8-bit keys the query is quantised per head (`q ≈ sq·q8`); because
//! `ReLU(a·s) = s·ReLU(a)` for `s > 0`, the score is
//! `scale_k(s) · Σ_j (w_j·sq_j) · ReLU(Σ_e q8_je·k8_se)`, with the +128 offset removed by
//! subtracting `128·Σ_e q8_je`. Decoding reads 1 byte per key dimension instead of 4.
//!
//! Scores are written row-major `[n_q, L]`; entries at or beyond a query's `limit` are
//! `-inf`. Work is split across key ranges (rayon), each task writing its own columns.

use crate::kernels::{has_avx512f, SendPtr};
use rayon::prelude::*;

/// Keys per block of the 8-bit layout.
const BLK: usize = 16;

/// A growable cache of indexer keys for one layer of one sequence.
#[derive(Clone, Debug)]
pub enum KeyStore {
    F32 {
        dim: usize,
        len: usize,
        data: Vec<f32>,
    },
    I8 {
        dim: usize,
        len: usize,
        data: Vec<u8>,
        scale: Vec<f32>,
    },
}

impl KeyStore {
    /// An empty store with room for `cap` keys of `dim` values (`dim` a multiple of 4 for 8-bit).
    pub fn new(dim: usize, cap: usize, quantized: bool) -> Self {
        if quantized {
            assert!(
                dim.is_multiple_of(4),
                "8-bit indexer keys need dim % 4 == 0"
            );
            let blocks = cap.div_ceil(BLK);
            KeyStore::I8 {
                dim,
                len: 0,
                data: vec![128; blocks * BLK * dim],
                scale: vec![0.0; blocks * BLK],
            }
        } else {
            KeyStore::F32 {
                dim,
                len: 0,
                data: vec![0.0; cap.div_ceil(BLK) * BLK * dim],
            }
        }
    }
    pub fn len(&self) -> usize {
        match self {
            KeyStore::F32 { len, .. } | KeyStore::I8 { len, .. } => *len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dim(&self) -> usize {
        match self {
            KeyStore::F32 { dim, .. } | KeyStore::I8 { dim, .. } => *dim,
        }
    }
    pub fn capacity(&self) -> usize {
        match self {
            KeyStore::F32 { dim, data, .. } => data.len() / (*dim).max(1),
            KeyStore::I8 { scale, .. } => scale.len(),
        }
    }
    pub fn is_quantized(&self) -> bool {
        matches!(self, KeyStore::I8 { .. })
    }
    /// Bytes held for the keys in use (`len` keys).
    pub fn bytes_used(&self) -> usize {
        match self {
            KeyStore::F32 { dim, len, .. } => len * dim * 4,
            KeyStore::I8 { dim, len, .. } => len * (dim + 4),
        }
    }
    /// Make room for `cap` keys (amortised growth is the caller's: the KV cache doubles).
    pub fn reserve(&mut self, cap: usize) {
        if cap <= self.capacity() {
            return;
        }
        let blocks = cap.div_ceil(BLK);
        match self {
            KeyStore::F32 { dim, data, .. } => data.resize(blocks * BLK * *dim, 0.0),
            KeyStore::I8 {
                dim, data, scale, ..
            } => {
                data.resize(blocks * BLK * *dim, 128);
                scale.resize(blocks * BLK, 0.0);
            }
        }
    }

    /// Forget keys from `len` on.
    pub fn truncate(&mut self, new_len: usize) {
        match self {
            KeyStore::F32 { len, .. } | KeyStore::I8 { len, .. } => *len = (*len).min(new_len),
        }
    }

    /// Append keys `k: [n, dim]`. Panics past capacity (callers check the context first).
    pub fn push(&mut self, k: &[f32]) {
        let d = self.dim();
        let n = k.len() / d;
        assert!(self.len() + n <= self.capacity(), "indexer key cache full");
        match self {
            KeyStore::F32 { dim, len, data } => {
                for row in k.chunks_exact(*dim) {
                    let (b, j) = (*len / BLK, *len % BLK);
                    for (e, &x) in row.iter().enumerate() {
                        data[b * BLK * *dim + e * BLK + j] = x;
                    }
                    *len += 1;
                }
            }
            KeyStore::I8 {
                dim,
                len,
                data,
                scale,
            } => {
                for row in k.chunks_exact(*dim) {
                    let s = *len;
                    let amax = row.iter().fold(0.0f32, |a, &x| a.max(x.abs()));
                    let sc = amax / 127.0;
                    let inv = if sc > 0.0 { 1.0 / sc } else { 0.0 };
                    let (b, j) = (s / BLK, s % BLK);
                    let base = b * BLK * *dim;
                    for (e, &x) in row.iter().enumerate() {
                        let q = (x * inv).round().clamp(-127.0, 127.0) as i32;
                        data[base + (e / 4) * BLK * 4 + j * 4 + e % 4] = (q + 128) as u8;
                    }
                    scale[s] = sc;
                    *len += 1;
                }
            }
        }
    }

    /// Key `s` as f32 (dequantised for the 8-bit store).
    pub fn key(&self, s: usize) -> Vec<f32> {
        match self {
            KeyStore::F32 { dim, data, .. } => {
                let (b, j) = (s / BLK, s % BLK);
                (0..*dim)
                    .map(|e| data[b * BLK * dim + e * BLK + j])
                    .collect()
            }
            KeyStore::I8 {
                dim, data, scale, ..
            } => {
                let (b, j) = (s / BLK, s % BLK);
                let base = b * BLK * dim;
                (0..*dim)
                    .map(|e| {
                        (data[base + (e / 4) * BLK * 4 + j * 4 + e % 4] as i32 - 128) as f32
                            * scale[s]
                    })
                    .collect()
            }
        }
    }
}

/// Index scores of `n_q` queries against the cached keys: `out[i, s] = I(i, s)` for
/// `s < limit[i]`, `-inf` for `limit[i] ≤ s < width` where `width = max(limit)`.
/// `q: [n_q, h, d]`, `w: [n_q, h]` (the head weights with every scale folded in), `out` is
/// resized to `[n_q, width]`. Returns `width`.
pub fn scores(
    q: &[f32],
    w: &[f32],
    h: usize,
    keys: &KeyStore,
    limit: &[usize],
    out: &mut Vec<f32>,
) -> usize {
    let nq = limit.len();
    let d = keys.dim();
    assert_eq!(q.len(), nq * h * d, "indexer q must be [n_q, H, d]");
    assert_eq!(w.len(), nq * h, "indexer weights must be [n_q, H]");
    let width = limit.iter().copied().max().unwrap_or(0);
    assert!(width <= keys.len(), "query limit beyond the cached keys");
    out.clear();
    out.resize(nq * width, f32::NEG_INFINITY);
    if width == 0 {
        return 0;
    }
    let ptr = SendPtr(out.as_mut_ptr());
    let ptr = &ptr;
    match keys {
        KeyStore::F32 { data, .. } => {
            const TB: usize = 256;
            let blocks = width.div_ceil(BLK);
            let avx512 = has_avx512f();
            (0..blocks.div_ceil(TB)).into_par_iter().for_each(|ti| {
                let mut acc = [0.0f32; BLK];
                for b in ti * TB..((ti + 1) * TB).min(blocks) {
                    let s0 = b * BLK;
                    let blk = &data[b * BLK * d..(b + 1) * BLK * d];
                    for (i, &lim) in limit.iter().enumerate() {
                        if lim <= s0 {
                            continue;
                        }
                        let qi = &q[i * h * d..(i + 1) * h * d];
                        block_scores_f32(avx512, qi, &w[i * h..(i + 1) * h], blk, &mut acc);
                        let n = (lim - s0).min(BLK);
                        // SAFETY: row i, columns s0..s0+n belong to this block only.
                        let o = unsafe {
                            std::slice::from_raw_parts_mut(ptr.get().add(i * width + s0), n)
                        };
                        o.copy_from_slice(&acc[..n]);
                    }
                }
            });
        }
        KeyStore::I8 {
            data, scale, dim, ..
        } => {
            let qq = QuantQuery::new(q, w, nq, h, *dim);
            // Tasks of 256 blocks (4096 keys).
            const TB: usize = 256;
            let blocks = width.div_ceil(BLK);
            let vnni = has_vnni();
            (0..blocks.div_ceil(TB)).into_par_iter().for_each(|ti| {
                let mut acc = [0.0f32; BLK];
                for b in ti * TB..((ti + 1) * TB).min(blocks) {
                    let s0 = b * BLK;
                    let blk = &data[b * BLK * dim..(b + 1) * BLK * dim];
                    for (i, &lim) in limit.iter().enumerate() {
                        if lim <= s0 {
                            continue;
                        }
                        block_scores(vnni, &qq, i, blk, &scale[s0..s0 + BLK], &mut acc);
                        let n = (lim - s0).min(BLK);
                        // SAFETY: row i, columns s0..s0+n belong to this block only.
                        let o = unsafe {
                            std::slice::from_raw_parts_mut(ptr.get().add(i * width + s0), n)
                        };
                        o.copy_from_slice(&acc[..n]);
                    }
                }
            });
        }
    }
    width
}

/// Scores of one query (`q: [h, d]`, `w: [h]`) against one f32 block of 16 keys, computed
/// exactly as `dsa::score` does for each key: per head the dot product over 8 lane
/// accumulators (dimension `e` into lane `e % 8`, multiply then add), combined as
/// `((a0+a4)+(a1+a5))+((a2+a6)+(a3+a7))`, the tail added in order; then
/// `acc += w_j·z` only where `z > 0`.
#[inline]
fn block_scores_f32(avx512: bool, q: &[f32], w: &[f32], blk: &[f32], acc: &mut [f32; BLK]) {
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // SAFETY: AVX-512F detected at run time; `blk` holds d·16 values, `q` h·d.
        unsafe { block_scores_f32_avx512(q, w, blk, acc) };
        return;
    }
    let _ = avx512;
    let h = w.len();
    let d = q.len() / h;
    let d8 = d - d % 8;
    acc.fill(0.0);
    for (j, &wj) in w.iter().enumerate() {
        let qj = &q[j * d..(j + 1) * d];
        for key in 0..BLK {
            let mut a = [0.0f32; 8];
            for e in 0..d8 {
                a[e % 8] += qj[e] * blk[e * BLK + key];
            }
            let mut z = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
            for e in d8..d {
                z += qj[e] * blk[e * BLK + key];
            }
            if z > 0.0 {
                acc[key] += wj * z;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_scores_f32_avx512(q: &[f32], w: &[f32], blk: &[f32], acc: &mut [f32; BLK]) {
    use std::arch::x86_64::*;
    let h = w.len();
    let d = q.len() / h;
    let d8 = d - d % 8;
    let zero = _mm512_setzero_ps();
    let mut total = zero;
    let bp = blk.as_ptr();
    for j in 0..h {
        let qp = q.as_ptr().add(j * d);
        let mut a = [zero; 8];
        let mut e = 0;
        while e < d8 {
            for (lane, al) in a.iter_mut().enumerate() {
                let k = _mm512_loadu_ps(bp.add((e + lane) * BLK));
                *al = _mm512_add_ps(*al, _mm512_mul_ps(_mm512_set1_ps(*qp.add(e + lane)), k));
            }
            e += 8;
        }
        let mut z = _mm512_add_ps(
            _mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[1], a[5])),
            _mm512_add_ps(_mm512_add_ps(a[2], a[6]), _mm512_add_ps(a[3], a[7])),
        );
        for e in d8..d {
            let k = _mm512_loadu_ps(bp.add(e * BLK));
            z = _mm512_add_ps(z, _mm512_mul_ps(_mm512_set1_ps(*qp.add(e)), k));
        }
        let pos = _mm512_cmp_ps_mask(z, zero, _CMP_GT_OQ);
        let wz = _mm512_mul_ps(_mm512_set1_ps(*w.get_unchecked(j)), z);
        total = _mm512_mask_add_ps(total, pos, total, wz);
    }
    _mm512_storeu_ps(acc.as_mut_ptr(), total);
}

/// Queries quantised per head to 8 bits: `q ≈ sq·q8`, with `w·sq` folded into one weight and
/// `128·Σq8` kept to undo the +128 offset of the keys.
struct QuantQuery {
    h: usize,
    d: usize,
    q8: Vec<i8>,
    wq: Vec<f32>,
    off: Vec<i32>,
}

impl QuantQuery {
    fn new(q: &[f32], w: &[f32], nq: usize, h: usize, d: usize) -> Self {
        let mut r = QuantQuery {
            h,
            d,
            q8: vec![0; nq * h * d],
            wq: vec![0.0; nq * h],
            off: vec![0; nq * h],
        };
        for (row, qv) in q.chunks_exact(d).enumerate() {
            let amax = qv.iter().fold(0.0f32, |a, &x| a.max(x.abs()));
            let sq = amax / 127.0;
            let inv = if sq > 0.0 { 1.0 / sq } else { 0.0 };
            let mut sum = 0i32;
            for (o, &x) in r.q8[row * d..(row + 1) * d].iter_mut().zip(qv) {
                *o = (x * inv).round().clamp(-127.0, 127.0) as i8;
                sum += *o as i32;
            }
            r.wq[row] = w[row] * sq;
            r.off[row] = 128 * sum;
        }
        r
    }
}

fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *V.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Scores of query `i` against one block of 16 keys with scales `ks: [16]`:
/// `acc[j] = ks[j] · Σ_h wq_h · ReLU(Σ_e q8_he·k8_je)`.
#[inline]
fn block_scores(
    vnni: bool,
    qq: &QuantQuery,
    i: usize,
    blk: &[u8],
    ks: &[f32],
    acc: &mut [f32; BLK],
) {
    assert_eq!(ks.len(), BLK);
    #[cfg(target_arch = "x86_64")]
    if vnni {
        // SAFETY: VNNI/AVX-512 detected at run time; `blk` holds d·16 bytes, the query d,
        // `ks` 16 scales.
        unsafe { block_scores_vnni(qq, i, blk, ks, acc) };
        return;
    }
    let _ = vnni;
    let (h, d) = (qq.h, qq.d);
    acc.fill(0.0);
    for j in 0..h {
        let r = i * h + j;
        let qv = &qq.q8[r * d..(r + 1) * d];
        let mut dots = [0i32; BLK];
        for g in 0..d / 4 {
            let kb = &blk[g * BLK * 4..(g + 1) * BLK * 4];
            for (key, dot) in dots.iter_mut().enumerate() {
                for e in 0..4 {
                    *dot += kb[key * 4 + e] as i32 * qv[g * 4 + e] as i32;
                }
            }
        }
        for (a, &dot) in acc.iter_mut().zip(&dots) {
            // mul_add: the same rounding as the VNNI path's FMA.
            *a = qq.wq[r].mul_add(((dot - qq.off[r]) as f32).max(0.0), *a);
        }
    }
    for (a, &k) in acc.iter_mut().zip(ks) {
        *a *= k;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn block_scores_vnni(
    qq: &QuantQuery,
    i: usize,
    blk: &[u8],
    ks: &[f32],
    acc: &mut [f32; BLK],
) {
    use std::arch::x86_64::*;
    let (h, d) = (qq.h, qq.d);
    let mut total = _mm512_setzero_ps();
    let zero = _mm512_setzero_ps();
    for j in 0..h {
        let r = i * h + j;
        let qp = qq.q8.as_ptr().add(r * d) as *const i32;
        let mut dot = _mm512_setzero_si512();
        for g in 0..d / 4 {
            let kv = _mm512_loadu_si512(blk.as_ptr().add(g * BLK * 4) as *const _);
            let qb = _mm512_set1_epi32(std::ptr::read_unaligned(qp.add(g)));
            dot = _mm512_dpbusd_epi32(dot, kv, qb);
        }
        let dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(*qq.off.get_unchecked(r)));
        let f = _mm512_max_ps(_mm512_cvtepi32_ps(dot), zero);
        total = _mm512_fmadd_ps(_mm512_set1_ps(*qq.wq.get_unchecked(r)), f, total);
    }
    let total = _mm512_mul_ps(total, _mm512_loadu_ps(ks.as_ptr()));
    _mm512_storeu_ps(acc.as_mut_ptr(), total);
}

/// Running top-k of one query: candidates that beat the current k-th best enter a buffer,
/// which is cut back to `k` when it reaches `4k` (see [`topk`]).
struct TopK {
    k: usize,
    buf: Vec<(f32, u32)>,
    thr: f32,
    full: bool,
}

fn better(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

impl TopK {
    fn new(k: usize) -> Self {
        TopK {
            k,
            buf: Vec::with_capacity(4 * k),
            thr: f32::NEG_INFINITY,
            full: false,
        }
    }
    #[inline]
    fn push(&mut self, v: f32, s: u32) {
        // NaN ranks lowest (as −∞), so a NaN score never displaces a real one.
        let v = if v.is_nan() { f32::NEG_INFINITY } else { v };
        if !self.full || v > self.thr {
            self.buf.push((v, s));
            if self.buf.len() == 4 * self.k {
                self.buf.select_nth_unstable_by(self.k - 1, better);
                self.buf.truncate(self.k);
                self.thr = self.buf.iter().map(|x| x.0).fold(f32::INFINITY, f32::min);
                self.full = true;
            }
        }
    }
    /// The selected positions, ascending, into `out` (length ≥ k; the rest left untouched).
    fn finish(mut self, out: &mut [i32]) {
        if self.buf.len() > self.k {
            self.buf.select_nth_unstable_by(self.k - 1, better);
            self.buf.truncate(self.k);
        }
        self.buf.sort_unstable_by_key(|x| x.1);
        for (o, x) in out.iter_mut().zip(&self.buf) {
            *o = x.1 as i32;
        }
    }
}

/// The top-`k` key positions of every query, straight from the keys: `idx: [n_q, k_max]`
/// (ascending positions, `-1` in unused slots; `k_max ≥ min(k, max limit)`). The same sets
/// as [`scores`] followed by [`topk`] on each row, but for many queries (prefill) no score
/// matrix is stored: queries are split into groups (one per task), and each group walks the
/// keys in tiles that stay in cache while every query of the group scores them and keeps
/// only the candidates above its running threshold. A query whose `limit ≤ k` takes every
/// visible position. With few queries (decoding) the work is split across keys instead.
#[allow(clippy::too_many_arguments)]
pub fn select(
    q: &[f32],
    w: &[f32],
    h: usize,
    keys: &KeyStore,
    limit: &[usize],
    k: usize,
    k_max: usize,
    idx: &mut [i32],
) {
    let nq = limit.len();
    let d = keys.dim();
    assert!(k > 0, "top-k must be > 0");
    assert_eq!(idx.len(), nq * k_max, "idx must be [n_q, k_max]");
    assert!(limit.iter().all(|&l| l.min(k) <= k_max), "k_max too small");
    idx.fill(-1);
    let threads = rayon::current_num_threads().max(1);
    if nq < 4 * threads {
        let mut sc = Vec::new();
        let width = scores(q, w, h, keys, limit, &mut sc);
        let mut sel = Vec::new();
        for (i, &lim) in limit.iter().enumerate() {
            topk(&sc[i * width..i * width + lim], k, &mut sel);
            for (o, &s) in idx[i * k_max..(i + 1) * k_max].iter_mut().zip(&sel) {
                *o = s as i32;
            }
        }
        return;
    }
    let group = nq.div_ceil(threads).min(256);
    let quant = match keys {
        KeyStore::I8 { dim, .. } => Some(QuantQuery::new(q, w, nq, h, *dim)),
        KeyStore::F32 { .. } => None,
    };
    let (avx512, vnni) = (has_avx512f(), has_vnni());
    idx.par_chunks_mut(group * k_max)
        .enumerate()
        .for_each(|(gi, out)| {
            let i0 = gi * group;
            let i1 = (i0 + group).min(nq);
            let mut tops: Vec<Option<TopK>> = (i0..i1)
                .map(|i| (limit[i] > k).then(|| TopK::new(k)))
                .collect();
            let top_lim = limit[i0..i1].iter().copied().max().unwrap_or(0);
            const TILE_BLOCKS: usize = 256;
            let blocks = top_lim.div_ceil(BLK);
            let mut acc = [0.0f32; BLK];
            for t0 in (0..blocks).step_by(TILE_BLOCKS) {
                for (r, top) in tops.iter_mut().enumerate() {
                    let Some(top) = top.as_mut() else { continue };
                    let i = i0 + r;
                    let lim = limit[i];
                    for b in t0..(t0 + TILE_BLOCKS).min(lim.div_ceil(BLK)) {
                        let s0 = b * BLK;
                        match keys {
                            KeyStore::F32 { data, .. } => block_scores_f32(
                                avx512,
                                &q[i * h * d..(i + 1) * h * d],
                                &w[i * h..(i + 1) * h],
                                &data[b * BLK * d..(b + 1) * BLK * d],
                                &mut acc,
                            ),
                            KeyStore::I8 { data, scale, .. } => {
                                let qq = quant.as_ref().expect("quantised queries");
                                block_scores(
                                    vnni,
                                    qq,
                                    i,
                                    &data[b * BLK * d..(b + 1) * BLK * d],
                                    &scale[s0..s0 + BLK],
                                    &mut acc,
                                );
                            }
                        }
                        let n = (lim - s0).min(BLK);
                        // Most blocks hold nothing above the running threshold: one max.
                        let mx = acc[..n].iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                        if top.full && mx <= top.thr {
                            continue;
                        }
                        for (j, &v) in acc[..n].iter().enumerate() {
                            top.push(v, (s0 + j) as u32);
                        }
                    }
                }
            }
            for (r, top) in tops.into_iter().enumerate() {
                let row = &mut out[r * k_max..(r + 1) * k_max];
                match top {
                    Some(t) => t.finish(row),
                    None => {
                        for (s, o) in row.iter_mut().take(limit[i0 + r]).enumerate() {
                            *o = s as i32;
                        }
                    }
                }
            }
        });
}

/// The `k` best positions of `row` ranked by (score desc, position asc; NaN lowest),
/// ascending by position, into `out`. All positions when `row.len() ≤ k`. One pass with a running
/// threshold: a candidate enters a buffer only if it beats the current k-th best, and the
/// buffer is cut back to `k` when it reaches `4k`, so the cost is about one compare per score.
pub fn topk(row: &[f32], k: usize, out: &mut Vec<u32>) {
    out.clear();
    if row.len() <= k {
        out.extend(0..row.len() as u32);
        return;
    }
    if k == 0 {
        return;
    }
    let mut t = TopK::new(k);
    for (s, &v) in row.iter().enumerate() {
        t.push(v, s as u32);
    }
    let mut sel = vec![0i32; k];
    t.finish(&mut sel);
    out.extend(sel.iter().map(|&s| s as u32));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn randv(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    fn naive(
        q: &[f32],
        w: &[f32],
        h: usize,
        d: usize,
        keys: &[Vec<f32>],
        t: usize,
        s: usize,
    ) -> f32 {
        (0..h)
            .map(|j| {
                let dot: f32 = (0..d).map(|e| q[(t * h + j) * d + e] * keys[s][e]).sum();
                w[t * h + j] * dot.max(0.0)
            })
            .sum()
    }

    #[test]
    fn f32_scores_match_the_definition_with_causal_limits() {
        let mut rng = Rng::new(3);
        let (h, d, l, nq) = (3, 8, 2500, 4);
        let keys: Vec<Vec<f32>> = (0..l).map(|_| randv(&mut rng, d)).collect();
        let mut st = KeyStore::new(d, l + 10, false);
        for k in &keys {
            st.push(k);
        }
        let q = randv(&mut rng, nq * h * d);
        let w = randv(&mut rng, nq * h);
        let limit = [1, 700, 2500, 2049];
        let mut out = Vec::new();
        let width = scores(&q, &w, h, &st, &limit, &mut out);
        assert_eq!(width, 2500);
        for t in 0..nq {
            for s in 0..width {
                let got = out[t * width + s];
                if s >= limit[t] {
                    assert_eq!(got, f32::NEG_INFINITY);
                } else {
                    let want = naive(&q, &w, h, d, &keys, t, s);
                    assert!((got - want).abs() < 1e-4, "t {t} s {s}: {got} vs {want}");
                }
            }
        }
    }

    /// The training forward's score: 8-lane dot products, ReLU, weighted sum in head order.
    fn score_ref(q_t: &[f32], w_t: &[f32], k_s: &[f32]) -> f32 {
        let d = k_s.len();
        let mut acc = 0.0f32;
        for (j, &wj) in w_t.iter().enumerate() {
            let qj = &q_t[j * d..(j + 1) * d];
            let mut a = [0.0f32; 8];
            let d8 = d - d % 8;
            for e in 0..d8 {
                a[e % 8] += qj[e] * k_s[e];
            }
            let mut z = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
            for e in d8..d {
                z += qj[e] * k_s[e];
            }
            if z > 0.0 {
                acc += wj * z;
            }
        }
        acc
    }

    #[test]
    fn f32_scores_are_bit_identical_to_the_training_score_on_every_path() {
        let mut rng = Rng::new(4);
        for &(h, d) in &[(4usize, 32usize), (3, 12), (2, 5)] {
            let l = 300;
            let keys: Vec<Vec<f32>> = (0..l).map(|_| randv(&mut rng, d)).collect();
            let mut st = KeyStore::new(d, l, false);
            for k in &keys {
                st.push(k);
            }
            let q = randv(&mut rng, 2 * h * d);
            let w = randv(&mut rng, 2 * h);
            let mut out = Vec::new();
            let width = scores(&q, &w, h, &st, &[l, 77], &mut out);
            for t in 0..2 {
                for s in 0..[l, 77][t] {
                    let want = score_ref(
                        &q[t * h * d..(t + 1) * h * d],
                        &w[t * h..(t + 1) * h],
                        &keys[s],
                    );
                    assert_eq!(
                        out[t * width + s].to_bits(),
                        want.to_bits(),
                        "h {h} d {d} t {t} s {s}"
                    );
                }
            }
            // The portable block kernel agrees bit for bit with the AVX-512 one.
            if let KeyStore::F32 { data, .. } = &st {
                let (mut a, mut b) = ([0.0; BLK], [0.0; BLK]);
                for blk in 0..l / BLK {
                    let kb = &data[blk * BLK * d..(blk + 1) * BLK * d];
                    block_scores_f32(false, &q[..h * d], &w[..h], kb, &mut a);
                    block_scores_f32(has_avx512f(), &q[..h * d], &w[..h], kb, &mut b);
                    assert_eq!(a, b);
                }
            }
        }
    }

    #[test]
    fn int8_scores_follow_the_dequantised_keys_and_vnni_equals_portable() {
        let mut rng = Rng::new(5);
        let (h, d, l, nq) = (4, 32, 1000, 3);
        let keys: Vec<Vec<f32>> = (0..l).map(|_| randv(&mut rng, d)).collect();
        let mut st = KeyStore::new(d, l, true);
        for k in &keys {
            st.push(k);
        }
        let deq: Vec<Vec<f32>> = (0..l).map(|s| st.key(s)).collect();
        for (a, b) in deq[17].iter().zip(&keys[17]) {
            assert!((a - b).abs() < 0.02, "dequantised key {a} vs {b}");
        }
        let q = randv(&mut rng, nq * h * d);
        let w = randv(&mut rng, nq * h);
        let limit = [1000, 33, 999];
        let mut out = Vec::new();
        let width = scores(&q, &w, h, &st, &limit, &mut out);
        let mut err = 0.0f32;
        let mut mag = 0.0f32;
        for t in 0..nq {
            for s in 0..limit[t] {
                let want = naive(&q, &w, h, d, &deq, t, s);
                err = err.max((out[t * width + s] - want).abs());
                mag = mag.max(want.abs());
            }
            assert!(out[t * width + limit[t]..(t + 1) * width]
                .iter()
                .all(|&x| x == f32::NEG_INFINITY));
        }
        // Only the query's 8-bit rounding remains (~1% of the score scale).
        assert!(err < 0.02 * mag, "int8 scores off by {err} (scale {mag})");
        // The portable block kernel computes the same integers as the VNNI one.
        let qq = QuantQuery::new(&q, &w, nq, h, d);
        if let KeyStore::I8 { data, .. } = &st {
            let (mut a, mut b) = ([0.0; BLK], [0.0; BLK]);
            for blk in 0..l / BLK {
                let kb = &data[blk * BLK * d..(blk + 1) * BLK * d];
                let ks = [0.5f32; BLK];
                block_scores(false, &qq, 1, kb, &ks, &mut a);
                block_scores(has_vnni(), &qq, 1, kb, &ks, &mut b);
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn fused_selection_equals_scores_then_topk_for_both_stores() {
        let mut rng = Rng::new(11);
        let (h, d, l, k) = (2, 8, 1500, 40);
        let keys: Vec<f32> = randv(&mut rng, l * d);
        for quant in [false, true] {
            let mut st = KeyStore::new(d, l, quant);
            st.push(&keys);
            for nq in [1usize, 37] {
                let q = randv(&mut rng, nq * h * d);
                let w = randv(&mut rng, nq * h);
                let limit: Vec<usize> = (0..nq).map(|i| l - nq + 1 + i - (i % 3) * 500).collect();
                let mut got = vec![0i32; nq * k];
                select(&q, &w, h, &st, &limit, k, k, &mut got);
                let mut sc = Vec::new();
                let width = scores(&q, &w, h, &st, &limit, &mut sc);
                let mut sel = Vec::new();
                for i in 0..nq {
                    topk(&sc[i * width..i * width + limit[i]], k, &mut sel);
                    let want: Vec<i32> = sel.iter().map(|&s| s as i32).collect();
                    assert_eq!(
                        &got[i * k..(i + 1) * k],
                        &want[..],
                        "quant {quant} nq {nq} i {i}"
                    );
                }
            }
            // Short rows take every visible position and pad with -1.
            let q = randv(&mut rng, 20 * h * d);
            let w = randv(&mut rng, 20 * h);
            let limit: Vec<usize> = (1..=20).collect();
            let mut got = vec![0i32; 20 * k];
            select(&q, &w, h, &st, &limit, k, k, &mut got);
            assert_eq!(&got[2 * k..2 * k + 4], &[0, 1, 2, -1]);
        }
    }

    #[test]
    fn topk_equals_a_full_sort_with_ties_broken_by_position() {
        let mut rng = Rng::new(9);
        for &(l, k) in &[(10usize, 20usize), (5000, 64), (3000, 1), (4096, 512)] {
            // Quantised values make many exact ties.
            let row: Vec<f32> = (0..l)
                .map(|_| (rng.normal() * 4.0).round() as f32)
                .collect();
            let mut got = Vec::new();
            topk(&row, k, &mut got);
            let mut idx: Vec<u32> = (0..l as u32).collect();
            idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
            let mut want: Vec<u32> = idx.into_iter().take(k.min(l)).collect();
            want.sort_unstable();
            assert_eq!(got, want, "l {l} k {k}");
        }
        // Rows with -inf beyond a causal limit still give k positions, preferring finite ones.
        let mut row = vec![f32::NEG_INFINITY; 100];
        row[3] = 1.0;
        let mut got = Vec::new();
        topk(&row, 4, &mut got);
        assert_eq!(got, vec![0, 1, 2, 3]);
    }
}
