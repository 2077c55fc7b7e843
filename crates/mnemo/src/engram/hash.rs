//! N-gram hashing (demo `NgramHashMapping`, spec §1.2).
//!
//! Per Engram layer, with compressed ids `x'` and odd multipliers `m[0..N)`:
//!
//! ```text
//! shift_k(x')[t] = x'[t-k]   if k ≤ pos[t]  (same document)   else pad
//! mix_n[t]       = (shift_0·m[0]) ^ (shift_1·m[1]) ^ … ^ (shift_{n-1}·m[n-1])     n = 2..=N
//! idx[t, (n-2)·K + j] = mix_n[t] mod prime[n-2][j]                                j = 0..K
//! row[t, h]      = offset[h] + idx[t, h]        offset = exclusive prefix sum of the primes
//! ```
//!
//! `pos[t]` is the position of token `t` inside its document (0 at a document's first token and
//! at the start of every batch row), so the look-back never crosses a document boundary; with
//! `pos = 0, 1, 2, …` per row it is exactly the demo's left-padding. Products cannot overflow:
//! `x' < V'` and `m ≤ 2·⌊⌊i64::MAX / V'⌋ / 2⌋ − 1`, so `x'·m < i64::MAX` and XOR stays
//! non-negative.
//!
//! Prime table sizes ([`layer_primes`]): one `seen` set across all layers; for each layer (in
//! `layer_ids` order) and order `n`, the search restarts at `vocab[n-2] − 1` and each head takes
//! the next prime `> start` not yet used, then `start = p`.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// `a·b mod m` without overflow.
#[inline]
fn mul_mod(a: u64, b: u64, m: u64) -> u64 {
    ((a as u128 * b as u128) % m as u128) as u64
}

fn pow_mod(mut a: u64, mut e: u64, m: u64) -> u64 {
    let mut r = 1 % m;
    a %= m;
    while e > 0 {
        if e & 1 == 1 {
            r = mul_mod(r, a, m);
        }
        a = mul_mod(a, a, m);
        e >>= 1;
    }
    r
}

/// Deterministic Miller–Rabin for every `u64` (the first 12 prime bases suffice below 3.3e24).
pub fn is_prime(n: u64) -> bool {
    const BASES: [u64; 12] = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37];
    if n < 2 {
        return false;
    }
    for p in BASES {
        if n.is_multiple_of(p) {
            return n == p;
        }
    }
    let (mut d, mut s) = (n - 1, 0);
    while d % 2 == 0 {
        d /= 2;
        s += 1;
    }
    'outer: for a in BASES {
        let mut x = pow_mod(a, d, n);
        if x == 1 || x == n - 1 {
            continue;
        }
        for _ in 1..s {
            x = mul_mod(x, x, n);
            if x == n - 1 {
                continue 'outer;
            }
        }
        return false;
    }
    true
}

/// The demo's `calculate_vocab_size_across_layers`: per layer, per order (2..=N), `n_head`
/// distinct primes; returns `[layer][(n-2)·K + j]`.
pub fn layer_primes(n_layers: usize, vocab_per_order: &[u64], n_head: usize) -> Vec<Vec<u64>> {
    let mut seen = HashSet::new();
    (0..n_layers)
        .map(|_| {
            let mut primes = Vec::with_capacity(vocab_per_order.len() * n_head);
            for &v in vocab_per_order {
                let mut start = v.saturating_sub(1);
                for _ in 0..n_head {
                    let mut p = start + 1;
                    while !is_prime(p) || seen.contains(&p) {
                        p += 1;
                    }
                    seen.insert(p);
                    primes.push(p);
                    start = p;
                }
            }
            primes
        })
        .collect()
}

/// Largest allowed multiplier half-range for a compressed vocabulary of `v'` ids (spec §1.2).
pub fn multiplier_half(compressed_vocab: u64) -> u64 {
    let m_max = i64::MAX as u64 / compressed_vocab.max(1);
    (m_max / 2).max(1)
}

/// Odd multipliers `2r + 1`, `r` uniform in `[0, half)`, exactly as the demo draws them:
/// `numpy.random.default_rng(seed + 10007·layer_id).integers(0, half, N, dtype=int64)`
/// (SeedSequence → PCG64 → Lemire's bounded integers, re-implemented in [`numpy_integers`]).
pub fn draw_multipliers(
    seed: u64,
    layer_id: usize,
    max_ngram: usize,
    compressed_vocab: u64,
) -> Vec<u64> {
    let half = multiplier_half(compressed_vocab);
    numpy_integers(seed.wrapping_add(10007 * layer_id as u64), half, max_ngram)
        .into_iter()
        .map(|r| 2 * r + 1)
        .collect()
}

/// `numpy.random.default_rng(seed).integers(0, high, size=n, dtype=int64)` for
/// `high − 1 > u32::MAX` (numpy's 64-bit Lemire path; smaller ranges take a buffered 32-bit
/// path that is not reproduced here and panic). Bit-exact with numpy ≥ 1.17.
pub fn numpy_integers(seed: u64, high: u64, n: usize) -> Vec<u64> {
    assert!(
        high - 1 > u32::MAX as u64,
        "numpy_integers: ranges below 2^32 use numpy's 32-bit path (not implemented)"
    );
    let mut pcg = Pcg64::from_seed_sequence(seed);
    let rng = high - 1; // numpy's inclusive range
    let excl = high;
    (0..n)
        .map(|_| {
            // bounded_lemire_uint64
            let mut m = pcg.next_u64() as u128 * excl as u128;
            let mut leftover = m as u64;
            if leftover < excl {
                let threshold = (u64::MAX - rng) % excl;
                while leftover < threshold {
                    m = pcg.next_u64() as u128 * excl as u128;
                    leftover = m as u64;
                }
            }
            (m >> 64) as u64
        })
        .collect()
}

/// numpy's `SeedSequence(entropy).generate_state(n_words32)` (pool size 4, no spawn key).
fn seed_sequence_state(entropy: u64, n_words32: usize) -> Vec<u32> {
    const INIT_A: u32 = 0x43b0_d7e5;
    const MULT_A: u32 = 0x931e_8875;
    const INIT_B: u32 = 0x8b51_f9dd;
    const MULT_B: u32 = 0x58f3_8ded;
    const MIX_MULT_L: u32 = 0xca01_f9dd;
    const MIX_MULT_R: u32 = 0x4973_f715;
    let words: Vec<u32> = if entropy >> 32 == 0 {
        vec![entropy as u32]
    } else {
        vec![entropy as u32, (entropy >> 32) as u32]
    };
    let mut hc = INIT_A;
    let mut hashmix = |v: u32| {
        let mut v = v ^ hc;
        hc = hc.wrapping_mul(MULT_A);
        v = v.wrapping_mul(hc);
        v ^ (v >> 16)
    };
    let mix = |x: u32, y: u32| {
        let r = MIX_MULT_L
            .wrapping_mul(x)
            .wrapping_sub(MIX_MULT_R.wrapping_mul(y));
        r ^ (r >> 16)
    };
    let mut pool = [0u32; 4];
    for (i, p) in pool.iter_mut().enumerate() {
        *p = hashmix(words.get(i).copied().unwrap_or(0));
    }
    for src in 0..4 {
        for dst in 0..4 {
            if src != dst {
                let h = hashmix(pool[src]);
                pool[dst] = mix(pool[dst], h);
            }
        }
    }
    let mut hc = INIT_B;
    (0..n_words32)
        .map(|i| {
            let mut v = pool[i % 4] ^ hc;
            hc = hc.wrapping_mul(MULT_B);
            v = v.wrapping_mul(hc);
            v ^ (v >> 16)
        })
        .collect()
}

/// numpy's PCG64 (XSL-RR 128/64).
struct Pcg64 {
    state: u128,
    inc: u128,
}

impl Pcg64 {
    const MULT: u128 = (2549297995355413924u128 << 64) + 4865540595714422341u128;

    fn from_seed_sequence(entropy: u64) -> Self {
        let w = seed_sequence_state(entropy, 8);
        let u = |i: usize| w[2 * i] as u64 | (w[2 * i + 1] as u64) << 32;
        let initstate = ((u(0) as u128) << 64) | u(1) as u128;
        let initseq = ((u(2) as u128) << 64) | u(3) as u128;
        let mut p = Pcg64 {
            state: 0,
            inc: (initseq << 1) | 1,
        };
        p.step();
        p.state = p.state.wrapping_add(initstate);
        p.step();
        p
    }

    fn step(&mut self) {
        self.state = self.state.wrapping_mul(Self::MULT).wrapping_add(self.inc);
    }

    fn next_u64(&mut self) -> u64 {
        self.step();
        let s = self.state;
        ((s >> 64) as u64 ^ s as u64).rotate_right((s >> 122) as u32)
    }
}

/// Position of each token inside its document for `b` rows of `t` tokens: 0 at the start of
/// each row and right after every `eot` token (the data pipeline appends one after each
/// document), counting up otherwise.
pub fn positions_in_documents(tokens: &[u32], b: usize, t: usize, eot: Option<u32>) -> Vec<u32> {
    assert_eq!(tokens.len(), b * t);
    let mut pos = vec![0u32; b * t];
    for r in 0..b {
        for i in 1..t {
            let prev = tokens[r * t + i - 1];
            pos[r * t + i] = if Some(prev) == eot {
                0
            } else {
                pos[r * t + i - 1] + 1
            };
        }
    }
    pos
}

/// Hash parameters of one Engram layer. Multipliers and primes are model data: saved with the
/// model and used as stored, never recomputed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerHash {
    pub layer_id: usize,
    /// Largest N-gram order `N` (orders 2..=N).
    pub max_ngram: usize,
    /// Heads per order `K`.
    pub n_head: usize,
    /// `m[0..N)`, odd.
    pub multipliers: Vec<u64>,
    /// Table size of each head, `(N-1)·K` primes in (order, head) order.
    pub primes: Vec<u64>,
    /// Compressed pad id used before a document's start.
    pub pad: u32,
    /// `V'`, the compressed vocabulary the multipliers were bounded for.
    pub compressed_vocab: u64,
}

impl LayerHash {
    pub fn new(
        layer_id: usize,
        max_ngram: usize,
        n_head: usize,
        multipliers: Vec<u64>,
        primes: Vec<u64>,
        pad: u32,
        compressed_vocab: u64,
    ) -> Result<Self> {
        let h = LayerHash {
            layer_id,
            max_ngram,
            n_head,
            multipliers,
            primes,
            pad,
            compressed_vocab,
        };
        h.validate()?;
        Ok(h)
    }

    /// Checks shapes and the no-overflow bound (for data read from a checkpoint).
    pub fn validate(&self) -> Result<()> {
        let l = self.layer_id;
        if self.max_ngram < 2 || self.n_head == 0 {
            bail!(
                "engram layer {l}: max N-gram order {} and {} heads (need N ≥ 2, K ≥ 1)",
                self.max_ngram,
                self.n_head
            );
        }
        if self.multipliers.len() != self.max_ngram {
            bail!(
                "engram layer {l}: {} multipliers for max N-gram order {}",
                self.multipliers.len(),
                self.max_ngram
            );
        }
        if self.primes.len() != self.n_heads() {
            bail!(
                "engram layer {l}: {} table sizes for {} heads",
                self.primes.len(),
                self.n_heads()
            );
        }
        if self.compressed_vocab == 0 || self.pad as u64 >= self.compressed_vocab {
            bail!(
                "engram layer {l}: pad id {} outside the compressed vocabulary of {}",
                self.pad,
                self.compressed_vocab
            );
        }
        let bound = i64::MAX as u64 / self.compressed_vocab;
        if let Some(m) = self.multipliers.iter().find(|&&m| m > bound) {
            bail!("engram layer {l}: multiplier {m} could overflow (bound {bound})");
        }
        if let Some(p) = self.primes.iter().find(|&&p| p < 2 || p > u32::MAX as u64) {
            bail!("engram layer {l}: table size {p} out of range");
        }
        Ok(())
    }

    /// Heads per layer, `(N-1)·K`.
    pub fn n_heads(&self) -> usize {
        (self.max_ngram - 1) * self.n_head
    }

    /// Rows of the layer's table, `Σ primes`.
    pub fn total_rows(&self) -> u64 {
        self.primes.iter().sum()
    }

    /// First row of each head in the layer's table.
    pub fn offsets(&self) -> Vec<u64> {
        let mut o = 0;
        self.primes
            .iter()
            .map(|&p| {
                let r = o;
                o += p;
                r
            })
            .collect()
    }

    /// `mix_n` for n = 2..=N at token `i` (see the module docs); `ids` compressed.
    #[inline]
    fn mixes(&self, ids: &[u32], pos: &[u32], i: usize, out: &mut [u64]) {
        let mut mix = 0u64;
        for k in 0..self.max_ngram {
            let x = if k as u32 <= pos[i] {
                ids[i - k]
            } else {
                self.pad
            };
            mix ^= x as u64 * self.multipliers[k];
            if k >= 1 {
                out[k - 1] = mix;
            }
        }
    }

    /// Per-head LOCAL indices `[n, (N-1)·K]` (the demo's `idx`).
    pub fn local_indices(&self, ids: &[u32], pos: &[u32]) -> Vec<u32> {
        self.indices(ids, pos, false)
    }

    /// Global rows `[n, (N-1)·K]` of the layer's table (`offset[h] + idx`).
    pub fn rows(&self, ids: &[u32], pos: &[u32]) -> Vec<u32> {
        self.indices(ids, pos, true)
    }

    fn indices(&self, ids: &[u32], pos: &[u32], global: bool) -> Vec<u32> {
        assert_eq!(ids.len(), pos.len());
        debug_assert!(ids.iter().all(|&x| (x as u64) < self.compressed_vocab));
        let h = self.n_heads();
        let offs = if global { self.offsets() } else { vec![0; h] };
        let mut out = vec![0u32; ids.len() * h];
        let mut mix = vec![0u64; self.max_ngram - 1];
        for i in 0..ids.len() {
            assert!(
                pos[i] as usize <= i,
                "engram: position {} of token {i} reaches before the batch",
                pos[i]
            );
            self.mixes(ids, pos, i, &mut mix);
            for (hh, o) in out[i * h..(i + 1) * h].iter_mut().enumerate() {
                let m = mix[hh / self.n_head];
                *o = (offs[hh] + m % self.primes[hh]) as u32;
            }
        }
        out
    }

    /// Global rows of one token given the previous `N-1` compressed ids of its document
    /// (`history`, oldest first, possibly shorter at a document start): decode-time hashing.
    pub fn rows_step(&self, history: &[u32], id: u32) -> Vec<u32> {
        let n = history.len().min(self.max_ngram - 1);
        let mut ids: Vec<u32> = history[history.len() - n..].to_vec();
        ids.push(id);
        let pos: Vec<u32> = (0..ids.len() as u32).collect();
        let h = self.n_heads();
        let all = self.rows(&ids, &pos);
        all[all.len() - h..].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engram_primes_match_the_spec_test_vectors() {
        let p = layer_primes(2, &[646400, 646400], 8);
        assert_eq!(
            p[0],
            [
                646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523, // L1 2-gram
                646537, 646543, 646549, 646571, 646573, 646577, 646609, 646619, // L1 3-gram
            ]
        );
        assert_eq!(
            p[1],
            [
                646631, 646637, 646643, 646669, 646687, 646721, 646757, 646771, // L15 2-gram
                646781, 646823, 646831, 646837, 646843, 646859, 646873, 646879, // L15 3-gram
            ]
        );
        // 27B-like: layer 2's 2-grams start at 2262409, layer 15's 3-grams end at 2262859, and
        // 16 heads of 80 wide over two layers come to 5.792 B parameters.
        let p = layer_primes(2, &[2262400, 2262400], 8);
        assert_eq!(p[0][0], 2262409);
        assert_eq!(*p[1].last().unwrap(), 2262859);
        let params: u64 = p.iter().flatten().sum::<u64>() * 80;
        assert_eq!(params / 1_000_000, 5792);
        // Restarting from the same start skips primes already taken by an earlier order.
        let q = layer_primes(1, &[10, 10], 2);
        assert_eq!(q[0], [11, 13, 17, 19]);
        assert!(is_prime(18446744073709551557) && !is_prime(18446744073709551559));
    }

    #[test]
    fn engram_multipliers_match_numpy_and_the_spec() {
        assert_eq!(i64::MAX as u64 / 98627, 93517718645551);
        assert_eq!(multiplier_half(98627), 46758859322775);
        // Demo (V' = 98627, seed 0).
        assert_eq!(
            draw_multipliers(0, 1, 3, 98627),
            [76993395940407, 4862694818241, 36129212583461]
        );
        assert_eq!(
            draw_multipliers(0, 15, 3, 98627),
            [29055444938695, 56284491166079, 54183298291715]
        );
        assert_eq!(
            draw_multipliers(0, 2, 3, 98627),
            [76868182044803, 37272711521967, 22754161933167]
        );
        // DeepSeek-V4.1 (V' = 99092, orders 2..4).
        assert_eq!(
            draw_multipliers(0, 1, 4, 99092),
            [
                76632096046245,
                4839876093313,
                35959672319349,
                73987337458391
            ]
        );
        assert_eq!(
            draw_multipliers(0, 14, 4, 99092),
            [
                67716810739261,
                51510806800915,
                30921347202721,
                82619226485591
            ]
        );
    }

    fn demo_layer1() -> LayerHash {
        let primes = layer_primes(2, &[646400, 646400], 8).remove(0);
        let mult = vec![76993395940407, 4862694818241, 36129212583461];
        LayerHash::new(1, 3, 8, mult, primes, 2, 98627).unwrap()
    }

    #[test]
    fn engram_hash_matches_the_spec_test_vector() {
        let h = demo_layer1();
        let ids = [10u32, 20, 30, 40];
        let pos = [0u32, 1, 2, 3];
        let mut mix = [0u64; 2];
        let (mut m2, mut m3) = (vec![], vec![]);
        for i in 0..4 {
            h.mixes(&ids, &pos, i, &mut mix);
            m2.push(mix[0]);
            m3.push(mix[1]);
        }
        assert_eq!(
            m2,
            [
                761516597156260,
                1500531242837446,
                2371315994586470,
                2944137392380934
            ]
        );
        assert_eq!(
            m3,
            [
                832534841656814,
                1430526342183308,
                2573015708852244,
                2503049609561826
            ]
        );
        let idx = h.local_indices(&ids, &pos);
        assert_eq!(
            &idx[..16],
            [
                333479, 339243, 28077, 138866, 265078, 318036, 621172, 346465, 173433, 263005,
                495977, 206314, 275573, 461887, 366953, 446191
            ]
        );
        assert_eq!(
            &idx[48..],
            [
                75563, 442366, 68304, 421160, 445228, 195553, 246065, 66463, 281032, 448564,
                400683, 465246, 640961, 489514, 355769, 444093
            ]
        );
        // Global rows add the per-head offsets.
        let rows = h.rows(&ids, &pos);
        let offs = h.offsets();
        for (i, (&r, &l)) in rows.iter().zip(&idx).enumerate() {
            assert_eq!(r as u64, offs[i % 16] + l as u64);
        }
        assert_eq!(h.total_rows(), h.primes.iter().sum::<u64>());
    }

    #[test]
    fn engram_hash_stops_at_document_boundaries_and_steps_match() {
        let h = demo_layer1();
        // Two documents packed in one row: the second starts at index 3 (after EOT id 7).
        let tokens = [5u32, 6, 7, 10, 20, 30];
        let pos = positions_in_documents(&tokens, 1, 6, Some(7));
        assert_eq!(pos, [0, 1, 2, 0, 1, 2]);
        let rows = h.rows(&tokens, &pos);
        // The second document hashes as if it were alone.
        let alone = h.rows(&[10, 20, 30], &[0, 1, 2]);
        assert_eq!(&rows[3 * 16..], &alone[..]);
        // Two rows of a batch never see each other.
        let pos2 = positions_in_documents(&[1, 2, 3, 10, 20, 30], 2, 3, None);
        assert_eq!(pos2, [0, 1, 2, 0, 1, 2]);
        // Token-by-token hashing with a history equals the full hash.
        let mut hist: Vec<u32> = Vec::new();
        for (i, &id) in [10u32, 20, 30].iter().enumerate() {
            assert_eq!(h.rows_step(&hist, id), alone[i * 16..(i + 1) * 16]);
            hist.push(id);
        }
        assert!(LayerHash::new(1, 3, 8, vec![1, 3], h.primes.clone(), 2, 98627).is_err());
        assert!(LayerHash::new(1, 3, 8, vec![1, 3, u64::MAX], h.primes.clone(), 2, 98627).is_err());
    }
}
