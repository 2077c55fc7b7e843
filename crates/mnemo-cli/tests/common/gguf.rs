//! A tiny quantised Llama model written as a GGUF file, for the tests that need a model with
//! quantised weights: random blocks (`Q8_0` attention and embedding, `Q4_1` gate/up, `Q4_0`
//! down projection, f32 norms) from a seeded generator, and a GPT-2-style byte-level BPE
//! whose vocabulary is printable ASCII, space and newline (so every token decodes to valid
//! UTF-8 on its own) plus a few merges and `<|endoftext|>`.
//!
//! Shape: d = 64, 2 layers, 4 query heads and 2 key/value heads of 16 dims, feed-forward 128,
//! context 512, an untied output head (`output.weight`, quantised).

use std::path::Path;

const F32: u32 = 0;
const Q4_0: u32 = 2;
const Q4_1: u32 = 3;
const Q8_0: u32 = 8;

/// Width, layers, heads, key/value heads, feed-forward width, context.
const D: usize = 64;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const FFN: usize = 128;
const CTX: usize = 512;

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() % (1 << 24)) as f32 / (1u32 << 24) as f32
    }
}

/// f16 bits of a positive normal `x` (truncated mantissa: the value the file holds is what
/// it decodes to, whatever it is).
fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    assert!((1..31).contains(&exp), "{x} is not a normal f16");
    ((exp as u16) << 10) | ((b >> 13) & 0x3ff) as u16
}

/// `rows × cols` values (`cols` a multiple of 32) of type `ty`, uniform with standard
/// deviation about `std`, as raw blocks.
fn blocks(r: &mut Lcg, ty: u32, rows: usize, cols: usize, std: f32) -> Vec<u8> {
    assert_eq!(cols % 32, 0);
    let half_range = std * 3f32.sqrt();
    let mut out = Vec::new();
    for _ in 0..rows * cols / 32 {
        match ty {
            Q8_0 => {
                out.extend_from_slice(&f16_bits(half_range / 127.0).to_le_bytes());
                out.extend((0..32).map(|_| ((r.next() % 255) as i32 - 127) as i8 as u8));
            }
            Q4_0 => {
                out.extend_from_slice(&f16_bits(half_range / 8.0).to_le_bytes());
                out.extend((0..16).map(|_| r.next() as u8));
            }
            Q4_1 => {
                // x = d·q + m, q in 0..16, centred: m = -7.5·d (negative: sign bit set).
                let d = half_range / 7.5;
                out.extend_from_slice(&f16_bits(d).to_le_bytes());
                out.extend_from_slice(&(f16_bits(7.5 * d) | 0x8000).to_le_bytes());
                out.extend((0..16).map(|_| r.next() as u8));
            }
            _ => unreachable!("type {ty}"),
        }
    }
    out
}

fn put_str(b: &mut Vec<u8>, x: &str) {
    b.extend_from_slice(&(x.len() as u64).to_le_bytes());
    b.extend_from_slice(x.as_bytes());
}

enum Meta {
    U32(u32),
    F32(f32),
    Str(String),
    Strs(Vec<String>),
}

/// The tokenizer's vocabulary (GPT-2 byte symbols: `Ġ` is the space, `Ċ` the newline) and
/// merges; `<|endoftext|>` is the last token.
fn vocabulary() -> (Vec<String>, Vec<String>) {
    let mut tokens: Vec<String> = (33u8..=126).map(|b| (b as char).to_string()).collect();
    tokens.push("Ġ".into());
    tokens.push("Ċ".into());
    let merges = ["f n", "Ġ x", "Ġ +", "Ġ =", "Ġ Ġ", "ĠĠ ĠĠ", "Ġ i", "- >"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    tokens.push("<|endoftext|>".into());
    (tokens, merges.iter().map(|m| m.to_string()).collect())
}

/// Write the model to `path`; `seed` picks its weights.
pub fn write_tiny_llama(path: &Path, seed: u64) {
    let mut r = Lcg(seed);
    let (tokens, merges) = vocabulary();
    let v = tokens.len();
    let eot = (v - 1) as u32;
    let hd = D / HEADS;
    let kv = KV_HEADS * hd;
    let meta: Vec<(&str, Meta)> = vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("general.alignment", Meta::U32(32)),
        ("llama.embedding_length", Meta::U32(D as u32)),
        ("llama.block_count", Meta::U32(LAYERS as u32)),
        ("llama.attention.head_count", Meta::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Meta::U32(KV_HEADS as u32)),
        ("llama.feed_forward_length", Meta::U32(FFN as u32)),
        ("llama.context_length", Meta::U32(CTX as u32)),
        ("llama.rope.freq_base", Meta::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.tokens", Meta::Strs(tokens)),
        ("tokenizer.ggml.merges", Meta::Strs(merges)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(eot)),
    ];
    // (name, GGUF dims: fastest first, i.e. [in, out] for a linear weight, type, data)
    let mut tensors: Vec<(String, Vec<usize>, u32, Vec<u8>)> = Vec::new();
    let norm = |r: &mut Lcg, n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|_| (1.0 + 0.2 * (r.unit() - 0.5)).to_le_bytes())
            .collect()
    };
    let embd = blocks(&mut r, Q8_0, v, D, 0.5);
    tensors.push(("token_embd.weight".into(), vec![D, v], Q8_0, embd));
    let outw = blocks(&mut r, Q8_0, v, D, 0.3);
    tensors.push(("output.weight".into(), vec![D, v], Q8_0, outw));
    let on = norm(&mut r, D);
    tensors.push(("output_norm.weight".into(), vec![D], F32, on));
    // The blocks' outputs outweigh the token's embedding (else a random model mostly repeats
    // a token), and the logits are not so peaked that a rounding-sized change never shows.
    let s = 1.0 / (D as f32).sqrt();
    let so2 = 4.0 * s;
    for i in 0..LAYERS {
        let b = |t: &str| format!("blk.{i}.{t}.weight");
        let linear: [(&str, usize, usize, u32, f32); 7] = [
            ("attn_q", D, D, Q8_0, s),
            ("attn_k", D, kv, Q8_0, s),
            ("attn_v", D, kv, Q8_0, s),
            ("attn_output", D, D, Q8_0, so2),
            ("ffn_gate", D, FFN, Q4_1, s),
            ("ffn_up", D, FFN, Q4_1, s),
            ("ffn_down", FFN, D, Q4_0, 4.0 / (FFN as f32).sqrt()),
        ];
        let an = norm(&mut r, D);
        tensors.push((b("attn_norm"), vec![D], F32, an));
        let fnorm = norm(&mut r, D);
        tensors.push((b("ffn_norm"), vec![D], F32, fnorm));
        for (name, din, dout, ty, std) in linear {
            let data = blocks(&mut r, ty, dout, din, std);
            tensors.push((b(name), vec![din, dout], ty, data));
        }
    }

    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, m) in &meta {
        put_str(&mut out, k);
        match m {
            Meta::U32(x) => {
                out.extend_from_slice(&4u32.to_le_bytes());
                out.extend_from_slice(&x.to_le_bytes());
            }
            Meta::F32(x) => {
                out.extend_from_slice(&6u32.to_le_bytes());
                out.extend_from_slice(&x.to_le_bytes());
            }
            Meta::Str(x) => {
                out.extend_from_slice(&8u32.to_le_bytes());
                put_str(&mut out, x);
            }
            Meta::Strs(xs) => {
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&8u32.to_le_bytes());
                out.extend_from_slice(&(xs.len() as u64).to_le_bytes());
                for x in xs {
                    put_str(&mut out, x);
                }
            }
        }
    }
    let mut offset = 0u64;
    for (name, dims, ty, data) in &tensors {
        put_str(&mut out, name);
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for &d in dims {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    for (_, _, _, data) in &tensors {
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(32) * 32, 0);
    }
    std::fs::write(path, out).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
