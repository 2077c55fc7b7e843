//! Temperature / top-k / top-p sampling in O(V): partial selection instead of sorting the
//! vocabulary, drawing exactly the token the sorted reference ([`crate::generate::distribution`]
//! walked with the same uniform `u`) draws.
//!
//! The distribution (both implementations; `x` the logits `[V]`, `T` the temperature):
//!
//! ```text
//! order:  ids by descending x, ties by ascending id (packed u64 keys, see `desc_key`)
//! m = x[order[0]]          e_i = exp((x_i − m)/T)    (f32: (x_i − m)/T, then `vexp::exp`)
//! kept K = the first top_k of the order (all when top_k = 0)
//! z = Σ_{i ∈ K, ascending id} e_i   (f64)          p_i = e_i / z
//! top-p (0 < top_p < 1): K ← the shortest prefix of the order (within K) with Σ p ≥ top_p,
//!                        z' = Σ_{K, in order} p_i,  p_i ← p_i / z'
//! draw:   the first i in order with u < Σ_{j ≤ i} p_j   (else the last of K)
//! ```
//!
//! Only `z` involves every token, and it is summed in id order, so it needs no sort. The walk
//! over the order is lazy: the next batch of the largest remaining keys is found with
//! `select_nth_unstable` (O(remaining)) and sorted (the batch only); batches double. The
//! cumulative sums are the same f64 operations in the same order as the reference's, so the
//! drawn token is the same bit for bit. At chat temperatures the walk ends within the first
//! batch of 64: the cost is four linear passes (keys, exponentials, `z`, one selection)
//! instead of a 49k-element sort and 49k libm `exp` calls per token.

use crate::kernels::vexp;

/// The sort key of logit `x` at id `i`: ascending keys are descending logits, ties by
/// ascending id (`-0.0` equals `0.0`; NaN sorts first). Unique per id.
#[inline]
pub(crate) fn desc_key(i: usize, x: f32) -> u64 {
    let b = (x + 0.0).to_bits();
    // Ascending total order of the bits, inverted for descending.
    let asc = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
    (u64::from(!asc) << 32) | i as u64
}

/// The id of a key.
#[inline]
pub(crate) fn key_id(k: u64) -> usize {
    (k & 0xffff_ffff) as usize
}

/// `e_i = exp((x_i − m)/T)` for every logit (f32, the vectorised `exp`; same bits on every
/// path).
pub(crate) fn weights(logits: &[f32], m: f32, temperature: f32) -> Vec<f32> {
    let mut e: Vec<f32> = logits.iter().map(|&x| (x - m) / temperature).collect();
    vexp::exp_sub_sum(&mut e, 0.0);
    e
}

/// `z = Σ e_i` over the ids whose key is at most `last` (all when `None`), in id order.
pub(crate) fn normaliser(logits: &[f32], e: &[f32], last: Option<u64>) -> f64 {
    match last {
        None => e.iter().map(|&w| w as f64).sum(),
        Some(kth) => logits
            .iter()
            .zip(e)
            .enumerate()
            .filter(|(i, (&x, _))| desc_key(*i, x) <= kth)
            .map(|(_, (_, &w))| w as f64)
            .sum(),
    }
}

/// The keys of a candidate set in ascending order, produced lazily in sorted batches.
struct Walk {
    keys: Vec<u64>,
    /// `keys[..sorted]` are in final order.
    sorted: usize,
    batch: usize,
}

impl Walk {
    fn new(keys: Vec<u64>) -> Self {
        Walk {
            keys,
            sorted: 0,
            batch: 64,
        }
    }

    /// The key at position `j` of the order (`None` past the end).
    fn get(&mut self, j: usize) -> Option<u64> {
        if j >= self.keys.len() {
            return None;
        }
        while j >= self.sorted {
            let rest = &mut self.keys[self.sorted..];
            let b = self.batch.min(rest.len());
            if b < rest.len() {
                rest.select_nth_unstable(b - 1);
            }
            rest[..b].sort_unstable();
            self.sorted += b;
            self.batch *= 2;
        }
        Some(self.keys[j])
    }
}

/// The token drawn with uniform `u ∈ [0, 1)` from `logits` at temperature `temperature > 0`
/// with `top_k` (0: all) and `top_p` (outside (0, 1): all): module docs. `logits` non-empty.
pub(crate) fn draw(logits: &[f32], temperature: f32, top_k: usize, top_p: f32, u: f64) -> u32 {
    let mut keys: Vec<u64> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| desc_key(i, x))
        .collect();
    let first = keys.iter().copied().min().expect("non-empty logits");
    let m = logits[key_id(first)];
    let e = weights(logits, m, temperature);
    let last = if top_k > 0 && top_k < keys.len() {
        keys.select_nth_unstable(top_k - 1);
        keys.truncate(top_k);
        keys.iter().copied().max()
    } else {
        None
    };
    let z = normaliser(logits, &e, last);
    let mut walk = Walk::new(keys);
    let p = |k: u64| e[key_id(k)] as f64 / z;
    if top_p > 0.0 && top_p < 1.0 {
        // The kept prefix, then its renormalised walk.
        let mut kept: Vec<(u64, f64)> = Vec::new();
        let mut cum = 0.0;
        let mut j = 0;
        while let Some(k) = walk.get(j) {
            let pk = p(k);
            kept.push((k, pk));
            cum += pk;
            j += 1;
            if cum >= top_p as f64 {
                break;
            }
        }
        let z2: f64 = kept.iter().map(|t| t.1).sum();
        let mut cum = 0.0;
        for &(k, pk) in &kept {
            cum += pk / z2;
            if u < cum {
                return key_id(k) as u32;
            }
        }
        return key_id(kept.last().expect("a kept token").0) as u32;
    }
    let mut cum = 0.0;
    let mut j = 0;
    let mut prev = first;
    while let Some(k) = walk.get(j) {
        cum += p(k);
        if u < cum {
            return key_id(k) as u32;
        }
        prev = k;
        j += 1;
    }
    key_id(prev) as u32
}

#[cfg(test)]
mod tests {
    use crate::generate::{distribution, Sampling};
    use crate::rng::Rng;

    /// The reference: walk the sorted distribution with `u`.
    fn reference(logits: &[f32], s: Sampling, u: f64) -> u32 {
        let dist = distribution(logits, logits.len(), s);
        let mut cum = 0.0;
        for &(t, p) in &dist {
            cum += p;
            if u < cum {
                return t;
            }
        }
        dist.last().expect("non-empty").0
    }

    /// Same token as the sorted reference for peaked and flat logits, ties, every top-k /
    /// top-p mode, and `u` at the extremes (where the fallback to the last kept token and the
    /// lazy batches past the first are exercised).
    #[test]
    fn draw_matches_the_sorted_reference() {
        let mut rng = Rng::new(7);
        for (n, spread) in [(1, 1.0), (5, 1.0), (300, 0.5), (3000, 8.0), (20000, 20.0)] {
            for trial in 0..6 {
                let logits: Vec<f32> = (0..n)
                    .map(|_| {
                        let r = rng.next_f64() as f32;
                        match trial % 3 {
                            // Coarse values: many ties.
                            0 => (r * 8.0).floor() * spread / 8.0,
                            _ => r * spread,
                        }
                    })
                    .collect();
                for (t, k, p) in [
                    (0.7, 0, 1.0),
                    (1.0, 0, 0.9),
                    (2.5, 0, 0.999),
                    (0.7, 40, 1.0),
                    (1.3, 7, 0.5),
                    (0.3, n + 5, 0.95),
                ] {
                    let s = Sampling {
                        temperature: t,
                        top_k: k,
                        top_p: p,
                    };
                    let mut us: Vec<f64> = (0..40).map(|_| rng.next_f64()).collect();
                    us.extend([0.0, 0.5, 0.999_999_999, 1.0 - f64::EPSILON]);
                    for u in us {
                        assert_eq!(
                            super::draw(&logits, t, k, p, u),
                            reference(&logits, s, u),
                            "n {n} trial {trial} T {t} k {k} p {p} u {u}"
                        );
                    }
                }
            }
        }
    }
}
