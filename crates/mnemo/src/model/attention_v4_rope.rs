//! DeepSeek-V4's rotary embedding (`docs/deepseek-v4-equations.md` §1.4, §3.1): partial,
//! interleaved, on the last `r = qk_rope_head_dim` channels; `rope_theta` for sliding layers,
//! `compress_rope_theta` with YaRN for compressed ones; the inverse rotation for the
//! attention output. Tables of the first positions are computed once per process.

use crate::config::{ModelConfig, V4Config};

/// Partial interleaved RoPE on the last `r` channels (`docs/deepseek-v4-equations.md` §1.4,
/// §3.1): `inv_freq[i] = θ^(−2i/r)` (YaRN-blended for compressed layers), cos and sin of
/// `f32(p)·inv_freq[i]` scaled by the attention factor.
#[derive(Clone, Debug)]
pub struct V4Rope {
    inv_freq: Vec<f32>,
    scale: f32,
    /// `(cos, sin)` pairs of positions `0..TABLE_POSITIONS` (shared by every rope with these
    /// frequencies and scale; [`V4Rope::table`] computes the positions beyond).
    cached: std::sync::Arc<Vec<f32>>,
}

/// Positions whose rope tables are computed once per process and kept.
const TABLE_POSITIONS: usize = 4096;

/// The kept tables, one per distinct (frequencies, scale).
fn cached_table(inv_freq: &[f32], scale: f32) -> std::sync::Arc<Vec<f32>> {
    use std::sync::{Arc, Mutex};
    type Tables = Vec<(Vec<u32>, Arc<Vec<f32>>)>;
    static TABLES: Mutex<Tables> = Mutex::new(Vec::new());
    let key: Vec<u32> = inv_freq
        .iter()
        .chain([&scale])
        .map(|x| x.to_bits())
        .collect();
    let mut tables = TABLES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, t)) = tables.iter().find(|(k, _)| *k == key) {
        return t.clone();
    }
    let r = 2 * inv_freq.len();
    let mut tab = vec![0.0f32; TABLE_POSITIONS * r];
    for (p, cs) in tab.chunks_mut(r.max(1)).enumerate() {
        table_at(inv_freq, scale, p, cs);
    }
    let t = Arc::new(tab);
    tables.push((key, t.clone()));
    t
}

/// `(cos, sin)` of every pair at position `p` into `cs: [r]`.
fn table_at(inv_freq: &[f32], scale: f32, p: usize, cs: &mut [f32]) {
    for (i, &f) in inv_freq.iter().enumerate() {
        let a = p as f32 * f;
        cs[2 * i] = a.cos() * scale;
        cs[2 * i + 1] = a.sin() * scale;
    }
}

impl V4Rope {
    /// The rope of the sliding layers (`rope_theta`, no scaling).
    pub fn main(c: &ModelConfig, r: usize) -> Self {
        Self::new(c.rope_theta, r, None)
    }

    /// The rope of the compressed layers.
    pub fn compress(v: &V4Config, r: usize) -> Self {
        Self::new(v.compress_rope_theta, r, v.compress_rope_scaling.as_ref())
    }

    fn new(theta: f64, r: usize, yarn: Option<&crate::config::V4Yarn>) -> Self {
        let half = r / 2;
        let mut inv: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / r as f64))
            .collect();
        let mut scale = 1.0;
        if let Some(y) = yarn {
            let corr = |nu: f64| {
                r as f64
                    * (y.original_max_position_embeddings as f64
                        / (2.0 * std::f64::consts::PI * nu))
                        .ln()
                    / (2.0 * theta.ln())
            };
            let lo = corr(y.beta_fast).floor().max(0.0);
            let mut hi = corr(y.beta_slow).ceil().min(r as f64 - 1.0);
            if lo == hi {
                hi += 0.001;
            }
            for (i, f) in inv.iter_mut().enumerate() {
                let ramp = ((i as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
                let keep = 1.0 - ramp;
                *f = *f / y.factor * (1.0 - keep) + *f * keep;
            }
            scale = y.attention_factor;
        }
        let inv_freq: Vec<f32> = inv.iter().map(|&f| f as f32).collect();
        let scale = scale as f32;
        V4Rope {
            cached: cached_table(&inv_freq, scale),
            inv_freq,
            scale,
        }
    }

    /// Length of one position's `(cos, sin)` table: two values per rotated pair.
    pub(super) fn table_len(&self) -> usize {
        self.inv_freq.len() * 2
    }

    /// `(cos, sin)` of every pair at position `p`, into `cs: [r]` (cos at `2i`, sin at `2i+1`).
    pub(super) fn table(&self, p: usize, cs: &mut [f32]) {
        let r = cs.len();
        match self.cached.get(p * r..(p + 1) * r) {
            Some(t) => cs.copy_from_slice(t),
            None => table_at(&self.inv_freq, self.scale, p, cs),
        }
    }

    /// Rotate the last `r` channels of every `c`-wide vector of `x` to position `p`
    /// (`inverse`: back from it).
    pub(super) fn rotate_at(&self, p: usize, x: &mut [f32], c: usize, inverse: bool) {
        let mut cs = vec![0.0f32; self.inv_freq.len() * 2];
        self.table(p, &mut cs);
        Self::rotate(&cs, x, c, inverse);
    }

    /// Rotate the last `r` channels of every `c`-wide vector in `x` by the table `cs`
    /// (`inverse`: by `−sin`).
    pub(super) fn rotate(cs: &[f32], x: &mut [f32], c: usize, inverse: bool) {
        let r = cs.len();
        for v in x.chunks_mut(c) {
            let tail = &mut v[c - r..];
            for i in 0..r / 2 {
                let (cos, sin) = (
                    cs[2 * i],
                    if inverse {
                        -cs[2 * i + 1]
                    } else {
                        cs[2 * i + 1]
                    },
                );
                let (u, w) = (tail[2 * i], tail[2 * i + 1]);
                tail[2 * i] = u * cos - w * sin;
                tail[2 * i + 1] = u * sin + w * cos;
            }
        }
    }
}
