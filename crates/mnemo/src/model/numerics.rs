//! `--numerics official`: DeepSeek-V4 with the arithmetic of DeepSeek's own inference code
//! (`inference/model.py` of DeepSeek-V4-Flash), which rounds activations where the model was
//! trained to expect it (quantisation-aware training). transformers and the default
//! (`exact`) mode compute in plain f32; llama.cpp (`ggml`) rounds products' inputs its own
//! way and none of the following. The official round trips, and where they apply:
//!
//! ```text
//! window K = V     kv[:, :d−r] ← fp8(kv[:, :d−r], 64)          after kv_norm and rope
//! entries          c[:, :d−r]  ← fp8(c[:, :d−r], 64)           attention compressor (CSA, HCA)
//! index keys       Kᴵ ← fp4(H(Kᴵ), 32)                         indexer compressor, after rope
//! index queries    qᴵ[h] ← fp4(H(qᴵ[h]), 32)                   per head, after rope
//! product inputs   x ← fp8(x, 128)   before wq_a, wq_b, wkv, wo_b, indexer wq_b, shared
//!                                    experts w1|w3 and w2, routed experts w1|w3 and w2,
//!                                    the MTP blocks' e_proj and h_proj
//! routed experts   w2's input is fp8(route weight · swiglu(..)): the weight before w2
//! ```
//!
//! `fp8`, `fp4`: block round trips with power-of-two scales ([`crate::kernels::fp_round`]);
//! `H`: the orthonormal Hadamard transform ([`crate::kernels::hadamard`]); `r` =
//! `qk_rope_head_dim` (the rope channels stay exact). Not rounded, as in the official code:
//! `wo_a` (BF16 there), the indexer's `weights_proj` (BF16), the compressors' projections and
//! the router (fp32), the head (fp32), the mHC coefficients (fp32). Not simulated: the BF16
//! activations between these points (f32 here). The cache stores the rounded K = V rows and
//! entries, so cached decoding gives the full forward's numbers.
//!
//! Checked against transformers 5.23.0 with the same round trips inserted at the same sites
//! (`reference/v4_official_numerics.py`, `tests/deepseek_v4_numerics.rs`).

use super::attention_v4::CompressorOffsets;
use super::Model;
use crate::kernels::act_quant::ActQuant;
use crate::kernels::{fp_round, hadamard};
use anyhow::{bail, Result};

/// FP8 block of the K = V and entry round trips.
const KV_BLOCK: usize = 64;
/// FP8 block of the product inputs.
const ACT_BLOCK: usize = 128;
/// FP4 block of the indexer's queries and keys.
const INDEX_BLOCK: usize = 32;

impl Model {
    /// Switch a DeepSeek-V4 model to the official numerics (module doc). Fails, naming each
    /// dimension, when the model's widths are not whole blocks of the official kernels.
    pub fn use_official_numerics(&mut self) -> Result<()> {
        let c = &self.cfg;
        let Some(v) = c.v4.as_ref() else {
            bail!("--numerics official is DeepSeek-V4's inference arithmetic: this model is not a DeepSeek-V4 model");
        };
        let mut bad = Vec::new();
        let mut need = |name: &str, n: usize, b: usize| {
            if !n.is_multiple_of(b) {
                bad.push(format!("{name} = {n} (a multiple of {b})"));
            }
        };
        need("hidden_size", c.d_model, ACT_BLOCK);
        need("q_lora_rank", v.q_lora_rank, ACT_BLOCK);
        need(
            "o_groups × o_lora_rank",
            v.o_groups * v.o_lora_rank,
            ACT_BLOCK,
        );
        need("moe_intermediate_size", c.moe_inter, ACT_BLOCK);
        need(
            "head_dim − qk_rope_head_dim",
            c.head_dim - v.qk_rope_head_dim,
            KV_BLOCK,
        );
        let csa = v
            .layer_types
            .contains(&crate::config::V4LayerType::CompressedSparseAttention);
        if csa {
            need("index_head_dim", v.index_head_dim, INDEX_BLOCK);
            if !v.index_head_dim.is_power_of_two() {
                bad.push(format!(
                    "index_head_dim = {} (a power of 2, for the Hadamard rotation)",
                    v.index_head_dim
                ));
            }
        }
        if !bad.is_empty() {
            bail!(
                "--numerics official: the official kernels quantise in whole blocks, and this \
                 model has {}",
                bad.join(", ")
            );
        }
        let mut at = std::collections::HashMap::new();
        for lo in &self.layout.layers {
            if let Some(vo) = &lo.v4 {
                for off in [vo.wq_a, vo.wq_b, vo.wkv, vo.wo_b] {
                    at.insert(off, ActQuant::Fp8);
                }
                if let Some(io) = &vo.indexer {
                    at.insert(io.wq_b, ActQuant::Fp8);
                }
            }
        }
        for mo in &self.layout.mtp {
            at.insert(mo.e_proj, ActQuant::Fp8);
            at.insert(mo.h_proj, ActQuant::Fp8);
        }
        let f = Some(ActQuant::Fp8);
        self.moe_act_quant = vec![[f, f, f, f, None]; self.cfg.n_blocks()];
        self.act_quant_at = at;
        self.official_numerics = true;
        Ok(())
    }

    /// The K = V rows `kv: [n, d]` (normed and roped) as the official code caches them.
    pub(super) fn official_kv(&self, kv: &mut [f32]) {
        if self.official_numerics {
            let d = self.cfg.head_dim;
            let nope = d - self.v4_rope_dim();
            kv.chunks_exact_mut(d)
                .for_each(|row| fp_round::fp8_round_trip(&mut row[..nope], KV_BLOCK));
        }
    }

    /// Compressed entries `e: [k, dim]` (normed and roped) of compressor `co`: the attention's
    /// as the window rows, the indexer's keys rotated and FP4-rounded.
    pub(super) fn official_entries(&self, co: &CompressorOffsets, e: &mut [f32]) {
        if !self.official_numerics {
            return;
        }
        if co.index_keys {
            hadamard::rows(e, co.dim);
            fp_round::fp4_round_trip(e, INDEX_BLOCK);
        } else {
            let nope = co.dim - self.v4_rope_dim();
            e.chunks_exact_mut(co.dim)
                .for_each(|row| fp_round::fp8_round_trip(&mut row[..nope], KV_BLOCK));
        }
    }

    /// One query's indexer heads `qi: [Hi·di]` (roped), rotated and FP4-rounded per head.
    pub(super) fn official_index_query(&self, qi: &mut [f32]) {
        if self.official_numerics {
            let di = self.cfg.v4.as_ref().map_or(1, |v| v.index_head_dim);
            hadamard::rows(qi, di);
            fp_round::fp4_round_trip(qi, INDEX_BLOCK);
        }
    }

    fn v4_rope_dim(&self) -> usize {
        self.cfg.v4.as_ref().map_or(0, |v| v.qk_rope_head_dim)
    }
}
