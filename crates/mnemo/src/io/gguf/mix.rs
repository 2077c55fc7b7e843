//! llama.cpp's quantisation mixes (`Q4_K_M`, `Q5_K_M`, …): which ggml type each tensor of a
//! model gets, as `llama_tensor_get_type` in llama.cpp's `src/llama-quant.cpp` (the version
//! vendored by llama-cpp-python 0.3.36) decides it without an importance matrix or
//! user overrides.
//!
//! - Only tensors of ≥ 2 dims whose name ends in `weight` are quantised, and not norms,
//!   MoE routers (`ffn_gate_inp`), nor a few small special tensors; the rest keep their type.
//! - The mix's default type (`Q4_K` for `Q4_K_M`, …), raised for sensitive tensors:
//!   `output.weight` (and `token_embd.weight` when the embeddings are tied) → `Q6_K`
//!   (`Q8_0` if its rows are not whole 256-blocks; kept for `Q8_0`); `attn_v` (also
//!   `attn_qkv`, `attn_kv_b`) and `ffn_down` by mix and layer, with
//!   `use_more_bits(i, n) = i < n/8 ∨ i ≥ 7n/8 ∨ (i − n/8) mod 3 = 2` picking the layers
//!   that `Q4_K_M` / `Q5_K_M` store as `Q6_K`; `attn_output` for `Q2_K` / `Q3_K_*`;
//!   8-expert models' `attn_v`/`attn_k` → `Q8_0`.
//! - Rows that are not whole blocks of the chosen type fall back: `Q2_K`, `Q3_K` → `Q4_0`,
//!   `Q4_K` → `Q5_0`, `Q5_K` → `Q5_1`, `Q6_K` → `Q8_0`; rows not a multiple of 32 → `F16`.
//!
//! Tensors are visited in llama.cpp's order (by block number, non-block tensors first, then
//! by name): the `attn_v` rule counts them. Not reproduced: Falcon's rules, the IQ mixes,
//! the `LLM_TYPE_70B` bump of `attn_v` (llama.cpp keys it on the 80-layer 70B Llama), imatrix-
//! dependent choices.

use anyhow::{bail, Result};

/// A quantisation mix, with its llama.cpp `llama_ftype` number (`general.file_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mix {
    pub name: &'static str,
    pub ftype: u32,
    /// ggml type of the default (most tensors).
    pub default_type: u32,
}

// ggml type ids
const F32: u32 = 0;
const F16: u32 = 1;
const Q4_0: u32 = 2;
const Q4_1: u32 = 3;
const Q5_0: u32 = 6;
const Q5_1: u32 = 7;
const Q8_0: u32 = 8;
const Q2_K: u32 = 10;
const Q3_K: u32 = 11;
const Q4_K: u32 = 12;
const Q5_K: u32 = 13;
const Q6_K: u32 = 14;
const BF16: u32 = 30;

/// Every mix this module knows.
pub const MIXES: &[Mix] = &[
    mix("Q2_K", 10, Q2_K),
    mix("Q3_K_S", 11, Q3_K),
    mix("Q3_K_M", 12, Q3_K),
    mix("Q3_K_L", 13, Q3_K),
    mix("Q4_K_S", 14, Q4_K),
    mix("Q4_K_M", 15, Q4_K),
    mix("Q5_K_S", 16, Q5_K),
    mix("Q5_K_M", 17, Q5_K),
    mix("Q6_K", 18, Q6_K),
    mix("Q8_0", 7, Q8_0),
    mix("Q4_0", 2, Q4_0),
    mix("Q4_1", 3, Q4_1),
    mix("Q5_0", 8, Q5_0),
    mix("Q5_1", 9, Q5_1),
    mix("F16", 1, F16),
    mix("BF16", 32, BF16),
    mix("F32", 0, F32),
];

const fn mix(name: &'static str, ftype: u32, default_type: u32) -> Mix {
    Mix {
        name,
        ftype,
        default_type,
    }
}

impl Mix {
    /// The mix named `s` (case-insensitive), or an error listing the known ones.
    pub fn parse(s: &str) -> Result<Mix> {
        match MIXES.iter().find(|m| m.name.eq_ignore_ascii_case(s)) {
            Some(m) => Ok(*m),
            None => bail!(
                "unknown GGUF quantisation type `{s}` (supported: {})",
                MIXES.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// The mix whose `general.file_type` is `ftype` (for describing an input file).
    pub fn from_ftype(ftype: u32) -> Option<Mix> {
        MIXES.iter().find(|m| m.ftype == ftype).copied()
    }

    fn is_quantized(&self) -> bool {
        !matches!(self.default_type, F32 | F16 | BF16)
    }
}

/// The model-level facts the rules use.
pub struct ModelFacts {
    /// `{arch}.block_count`.
    pub n_layer: usize,
    /// `head_count / head_count_kv`.
    pub n_gqa: usize,
    /// `{arch}.expert_count` (0 for dense models).
    pub n_expert: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Category {
    Output,
    TokenEmbd,
    AttnQkv,
    AttnKvB,
    AttnV,
    AttnK,
    AttnQ,
    AttnOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Other,
}

fn category(name: &str) -> Category {
    use Category::*;
    let has = |s: &str| name.contains(s);
    if name == "output.weight" {
        Output
    } else if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        TokenEmbd
    } else if has("attn_qkv.weight") {
        AttnQkv
    } else if has("attn_kv_b.weight") {
        AttnKvB
    } else if has("attn_v.weight") {
        AttnV
    } else if has("attn_k.weight") {
        AttnK
    } else if has("attn_q.weight") {
        AttnQ
    } else if has("attn_output.weight") {
        AttnOutput
    } else if has("ffn_up") {
        FfnUp
    } else if has("ffn_gate") {
        FfnGate
    } else if has("ffn_down") {
        FfnDown
    } else {
        Other
    }
}

fn is_attn_v(c: Category) -> bool {
    matches!(c, Category::AttnV | Category::AttnQkv | Category::AttnKvB)
}

/// Whether llama.cpp quantises this tensor at all (`tensor_allows_quantization`).
pub fn allows_quantization(name: &str, n_dims: usize) -> bool {
    if n_dims < 2 || !name.ends_with("weight") {
        return false;
    }
    const NEVER: &[&str] = &[
        "_norm.weight",
        "ffn_gate_inp.weight",
        "ffn_gate_tid2eid.weight",
        "altup",
        "laurel",
        "per_layer_model_proj",
        "ssm_conv1d",
        "shortconv.conv.weight",
        "indexer.k_proj.weight",
        "indexer.q_proj.weight",
        "time_mix_",
        "attn_rel_b.weight",
        ".position_embd",
        "sam.pos_embd",
        "sam.neck.",
        "sam.net_",
        ".rel_pos",
        ".patch_embd",
        ".patch_merger",
        "a.rvq.codebook",
        "mm.a.code_embd",
    ];
    name != "position_embd.weight"
        && name != "token_types.weight"
        && !NEVER.iter().any(|s| name.contains(s))
}

/// The block number of `blk.N.…` (`None` for other names).
pub fn block_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// Sort tensor names into llama.cpp's order: non-block tensors first, then by block, then by
/// name (`llama_model_loader::weight_name_comparer`).
pub fn llama_order(names: &mut [String]) {
    let key = |s: &String| (block_of(s).map(|b| b as i64).unwrap_or(-1), s.clone());
    names.sort_by_key(key);
}

fn block_elems(ty: u32) -> usize {
    match ty {
        Q2_K | Q3_K | Q4_K | Q5_K | Q6_K => 256,
        Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 => 32,
        _ => 1,
    }
}

fn use_more_bits(i: usize, n: usize) -> bool {
    let (i, n) = (i as i64, n as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// Chooses each tensor's type; call [`Planner::choose`] in [`llama_order`].
pub struct Planner {
    mix: Mix,
    facts: ModelFacts,
    tied: bool,
    n_attention_wv: usize,
    i_attention_wv: usize,
    i_ffn_down: usize,
}

impl Planner {
    /// `names`: every tensor of the model (for the counts the rules use).
    pub fn new(mix: Mix, facts: ModelFacts, names: &[String]) -> Planner {
        let tied = !names.iter().any(|n| n == "output.weight");
        let n_attention_wv = names.iter().filter(|n| is_attn_v(category(n))).count();
        Planner {
            mix,
            facts,
            tied,
            n_attention_wv,
            i_attention_wv: 0,
            i_ffn_down: 0,
        }
    }

    /// The type of tensor `name` with GGUF dims `dims` (`dims[0]` = row length) stored now
    /// as `cur_type`.
    pub fn choose(&mut self, name: &str, dims: &[u64], cur_type: u32) -> Result<u32> {
        if !allows_quantization(name, dims.len()) {
            return Ok(cur_type);
        }
        let mut t = self.mix.default_type;
        if !self.mix.is_quantized() {
            return Ok(t);
        }
        t = self.rules(t, name, dims[0] as usize)?;
        Ok(fallback(t, dims[0] as usize))
    }

    fn rules(&mut self, mut t: u32, name: &str, nx: usize) -> Result<u32> {
        use Category::*;
        let ft = self.mix.name;
        let (n_gqa, n_expert) = (self.facts.n_gqa, self.facts.n_expert);
        let cat = category(name);
        if cat == Output || (self.tied && cat == TokenEmbd) {
            if !nx.is_multiple_of(block_elems(t)) {
                t = Q8_0;
            } else if t != Q8_0 {
                t = Q6_K;
            }
        } else if cat == TokenEmbd {
        } else if is_attn_v(cat) {
            let i = self.i_attention_wv;
            t = match ft {
                "Q2_K" if n_gqa >= 4 => Q4_K,
                "Q2_K" => Q3_K,
                "Q3_K_M" if i < 2 => Q5_K,
                "Q3_K_M" => Q4_K,
                "Q3_K_L" => Q5_K,
                "Q4_K_M" | "Q5_K_M" if use_more_bits(i, self.n_attention_wv) => Q6_K,
                "Q4_K_S" if i < 4 => Q5_K,
                _ => t,
            };
            if n_expert == 8 {
                t = Q8_0;
            }
            self.i_attention_wv += 1;
        } else if cat == AttnK {
            if n_expert == 8 {
                t = Q8_0;
            }
        } else if cat == FfnDown {
            let n = self.facts.n_layer;
            let i = if n_expert > 1 {
                match block_of(name) {
                    Some(b) if b < n => b,
                    _ => bail!("tensor `{name}`: cannot tell its layer (of {n})"),
                }
            } else {
                self.i_ffn_down
            };
            t = match ft {
                "Q2_K" => Q3_K,
                "Q3_K_M" if i < n / 16 => Q5_K,
                "Q3_K_M" => Q4_K,
                "Q3_K_L" => Q5_K,
                "Q4_K_M" if use_more_bits(i, n) => Q6_K,
                "Q5_K_M" if use_more_bits(i, n) => Q6_K,
                "Q4_K_S" if i < n / 8 => Q5_K,
                _ => t,
            };
            self.i_ffn_down += 1;
        } else if cat == AttnOutput {
            if n_expert == 8 {
                if matches!(ft, "Q2_K" | "Q3_K_S" | "Q3_K_M" | "Q4_K_S" | "Q4_K_M") {
                    t = Q5_K;
                }
            } else {
                t = match ft {
                    "Q2_K" => Q3_K,
                    "Q3_K_M" => Q4_K,
                    "Q3_K_L" => Q5_K,
                    _ => t,
                };
            }
        }
        Ok(t)
    }
}

/// llama.cpp's `tensor_type_fallback`: a type whose blocks divide rows of `nx` values.
pub fn fallback(t: u32, nx: usize) -> u32 {
    if nx.is_multiple_of(block_elems(t)) {
        return t;
    }
    let r = match t {
        Q2_K | Q3_K => Q4_0,
        Q4_K => Q5_0,
        Q5_K => Q5_1,
        Q6_K => Q8_0,
        other => other,
    };
    if nx.is_multiple_of(block_elems(r)) {
        r
    } else {
        F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_more_bits_layers_of_a_30_layer_model() {
        let more: Vec<usize> = (0..30).filter(|&i| use_more_bits(i, 30)).collect();
        // n/8 = 3, 7n/8 = 26: layers 0..3, 26..30, and 3 + 2 + 3k.
        assert_eq!(
            more,
            vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
        );
    }

    #[test]
    fn fallbacks() {
        assert_eq!(fallback(Q4_K, 576), Q5_0);
        assert_eq!(fallback(Q5_K, 576), Q5_1);
        assert_eq!(fallback(Q6_K, 576), Q8_0);
        assert_eq!(fallback(Q2_K, 576), Q4_0);
        assert_eq!(fallback(Q4_K, 512), Q4_K);
        assert_eq!(fallback(Q4_K, 100), F16);
    }

    #[test]
    fn unknown_mix_lists_the_known_ones() {
        let e = Mix::parse("Q4_K_X").unwrap_err().to_string();
        assert!(
            e.contains("Q4_K_X") && e.contains("Q4_K_M") && e.contains("Q8_0"),
            "{e}"
        );
        assert_eq!(Mix::parse("q4_k_m").unwrap().ftype, 15);
    }

    #[test]
    fn llama_order_is_by_block_then_name() {
        let mut v: Vec<String> = [
            "blk.10.a",
            "output.weight",
            "blk.2.b",
            "blk.2.a",
            "token_embd.weight",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        llama_order(&mut v);
        assert_eq!(
            v,
            [
                "output.weight",
                "token_embd.weight",
                "blk.2.a",
                "blk.2.b",
                "blk.10.a"
            ]
        );
    }
}
