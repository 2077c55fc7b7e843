//! GGUF reading: block dequantisation, k-quant tensors, a tiny k-quant Llama, and clear
//! errors for bad files, over files written by a minimal GGUF writer.

use super::*;
use crate::rng::Rng;

/// A minimal GGUF v3 writer: metadata (u32, f32, string, string arrays) and tensors of
/// any type, each at a 32-byte-aligned offset.
#[derive(Default)]
struct GgufWriter {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

impl GgufWriter {
    fn key(&mut self, k: &str, ty: u32) -> &mut Vec<u8> {
        self.n_kv += 1;
        put_str(&mut self.kv, k);
        self.kv.extend_from_slice(&ty.to_le_bytes());
        &mut self.kv
    }
    fn u32(&mut self, k: &str, v: u32) {
        self.key(k, 4).extend_from_slice(&v.to_le_bytes());
    }
    fn f32(&mut self, k: &str, v: f32) {
        self.key(k, 6).extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, k: &str, v: &str) {
        put_str(self.key(k, 8), v);
    }
    fn strs(&mut self, k: &str, v: &[String]) {
        let b = self.key(k, 9);
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&(v.len() as u64).to_le_bytes());
        for s in v {
            put_str(b, s);
        }
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) {
        self.tensors.push((name.into(), dims.to_vec(), ty, data));
    }
    /// The file, its last `cut` bytes left off.
    fn write(&self, path: &Path, cut: usize) {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&self.n_kv.to_le_bytes());
        b.extend_from_slice(&self.kv);
        let mut data = Vec::new();
        for (name, dims, ty, bytes) in &self.tensors {
            put_str(&mut b, name);
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&(data.len() as u64).to_le_bytes());
            data.extend_from_slice(bytes);
            data.resize(data.len().div_ceil(32) * 32, 0);
        }
        b.resize(b.len().div_ceil(32) * 32, 0);
        b.extend_from_slice(&data);
        b.truncate(b.len() - cut);
        std::fs::write(path, b).unwrap();
    }
}

/// `n` values of ggml type `ty` as random blocks whose f16 scales (at the byte offsets
/// `scales` of each block) are set to small finite values (`BF16`: moderate values).
fn random_blocks(r: &mut Rng, ty: u32, n: usize) -> Vec<u8> {
    let f = kquant::format(ty).unwrap();
    let scales: &[usize] = match f.name {
        "Q5_0" | "IQ4_NL" => &[0],
        "Q5_1" | "Q4_K" | "Q5_K" => &[0, 2],
        "Q2_K" => &[80, 82],
        "Q3_K" => &[108],
        "Q6_K" => &[208],
        _ => &[],
    };
    let mut b: Vec<u8> = (0..f.byte_len(n).unwrap())
        .map(|_| (r.next_u64() & 0xff) as u8)
        .collect();
    for blk in b.chunks_exact_mut(f.block_bytes) {
        if f.name == "BF16" {
            blk[1] = (blk[1] & 0x80) | 0x3f; // magnitude 0.5 .. 2
        }
        for &o in scales {
            // f16 exponent 5..12 (2^-10 .. 2^-3), random sign and mantissa.
            let h = (blk[o + 1] as u16 & 0x83) | ((5 + (blk[o] as u16 & 7)) << 2);
            blk[o + 1] = h as u8;
        }
    }
    b
}

fn tmp(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mnemo-gguf-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn k_quant_tensors_load_and_errors_name_the_tensor() {
    let dir = tmp("kquant");
    let p = dir.join("k.gguf");
    let mut r = Rng::new(7);
    let mut w = GgufWriter::default();
    w.str("general.architecture", "llama");
    let cases: [(&str, u32, &[u64]); 6] = [
        ("a", 12, &[256, 2]),
        ("b", 14, &[512]),
        ("c", 6, &[64, 3]),
        ("d", 30, &[5]),
        ("e", 11, &[256]),
        ("f", 20, &[32, 2]),
    ];
    for (name, ty, dims) in cases {
        let n = dims.iter().product::<u64>() as usize;
        w.tensor(name, dims, ty, random_blocks(&mut r, ty, n));
    }
    w.write(&p, 0);
    let g = Gguf::open(&p).unwrap();
    for (name, ty, dims) in cases {
        let (shape, got) = g.tensor_f32(name).unwrap();
        let want_shape: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
        assert_eq!(shape, want_shape);
        let bytes = &w.tensors.iter().find(|t| t.0 == name).unwrap().3;
        let mut want = vec![0.0f32; got.len()];
        kquant::format(ty).unwrap().dequantize(bytes, &mut want);
        assert_eq!(got, want, "{name}");
        assert!(got.iter().all(|x| x.is_finite()) && got.iter().any(|&x| x != 0.0));
    }
    // Truncated: the last tensor named.
    w.write(&p, 40);
    let e = format!("{:#}", Gguf::open(&p).err().unwrap());
    assert!(e.contains("tensor `f` is truncated"), "{e}");
    // A type nobody reads: named, with the supported ones listed.
    w.tensor("g", &[256], 16, vec![0; 66]);
    w.write(&p, 0);
    let e = format!("{:#}", Gguf::open(&p).err().unwrap());
    assert!(
        e.contains("tensor `g` has unsupported type IQ2_XXS (ggml type 16)")
            && e.contains("supported: F32, F16, Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q2_K, Q3_K")
            && e.contains("IQ4_NL, BF16"),
        "{e}"
    );
    w.tensors.pop();
    w.tensor("h", &[256], 99, vec![]);
    w.write(&p, 0);
    let e = format!("{:#}", Gguf::open(&p).err().unwrap());
    assert!(
        e.contains("tensor `h` has unsupported type ggml type 99"),
        "{e}"
    );
    // Rows that are not whole blocks.
    w.tensors.pop();
    w.tensor("i", &[128, 2], 12, vec![0; 144]);
    w.write(&p, 0);
    let e = format!("{:#}", Gguf::open(&p).err().unwrap());
    assert!(
        e.contains("tensor `i` of type Q4_K has rows of 128 values"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A GGUF writer holding the metadata of a small Llama (width `d`, 4 heads of which 2 KV
/// heads, `blocks` layers, FFN width `ffn`, context 64) and a `gpt2` tokenizer of `vocab`
/// made-up tokens without merges.
fn llama_meta(d: u64, blocks: u32, ffn: u64, vocab: u64) -> GgufWriter {
    let mut w = GgufWriter::default();
    w.str("general.architecture", "llama");
    w.u32("llama.embedding_length", d as u32);
    w.u32("llama.attention.head_count", 4);
    w.u32("llama.attention.head_count_kv", 2);
    w.u32("llama.block_count", blocks);
    w.u32("llama.feed_forward_length", ffn as u32);
    w.u32("llama.context_length", 64);
    w.f32("llama.attention.layer_norm_rms_epsilon", 1e-5);
    w.str("tokenizer.ggml.model", "gpt2");
    let mut tokens: Vec<String> = (1..vocab).map(|i| format!("t{i}")).collect();
    tokens.push("<|endoftext|>".into());
    w.strs("tokenizer.ggml.tokens", &tokens);
    w.strs("tokenizer.ggml.merges", &[]);
    w
}

/// A one-layer Llama whose linear weights use a llama.cpp-style mix of k-quant and other
/// block types loads (weights dequantised to f32, and a quantised decode copy of every linear
/// weight: one matrix for `attn_output` (`Q3_K`), `ffn_down` (`IQ4_NL`) and the output
/// (`Q6_K`), parts of different types for q|k|v and gate|up) and decodes on them as on the
/// f32 weights up to the 8-bit activation rounding.
#[test]
fn llama_with_k_quant_mix_loads() {
    let dir = tmp("kmix");
    let p = dir.join("mix.gguf");
    let mut r = Rng::new(11);
    let (d, kv, ffn, vocab) = (256u64, 128u64, 256u64, 300u64);
    let mut w = llama_meta(d, 1, ffn, vocab);
    let ones: Vec<u8> = (0..d).flat_map(|_| 1.0f32.to_le_bytes()).collect();
    let mut q = |w: &mut GgufWriter, name: &str, ty: u32, dims: &[u64]| {
        let n = dims.iter().product::<u64>() as usize;
        w.tensor(name, dims, ty, random_blocks(&mut r, ty, n));
    };
    q(&mut w, "token_embd.weight", 14, &[d, vocab]);
    q(&mut w, "output.weight", 14, &[d, vocab]);
    q(&mut w, "blk.0.attn_q.weight", 12, &[d, d]);
    q(&mut w, "blk.0.attn_k.weight", 12, &[d, kv]);
    q(&mut w, "blk.0.attn_v.weight", 13, &[d, kv]);
    q(&mut w, "blk.0.attn_output.weight", 11, &[d, d]);
    q(&mut w, "blk.0.ffn_gate.weight", 10, &[d, ffn]);
    q(&mut w, "blk.0.ffn_up.weight", 6, &[d, ffn]);
    q(&mut w, "blk.0.ffn_down.weight", 20, &[ffn, d]);
    for n in ["output_norm", "blk.0.attn_norm", "blk.0.ffn_norm"] {
        w.tensor(&format!("{n}.weight"), &[d], F32, ones.clone());
    }
    w.write(&p, 0);
    let (model, _tok) = load_llama(&p, 64).unwrap();
    assert_eq!(model.quant.len(), 3);
    assert_eq!(model.quant[&model.layout.output].ty, QType::Q6_K);
    let lo = &model.layout.layers[0];
    assert_eq!(model.quant[&lo.wo].ty, QType::Q3_K);
    let tys = |o: usize| {
        model.quant_parts[&o]
            .iter()
            .map(|q| q.ty)
            .collect::<Vec<_>>()
    };
    assert_eq!(tys(lo.wqkv), [QType::Q4_K, QType::Q4_K, QType::Q5_K]);
    assert_eq!(model.quant_parts.len(), 2);
    let g = Gguf::open(&p).unwrap();
    let (_, emb) = g.tensor_f32("token_embd.weight").unwrap();
    let spec = model
        .layout
        .tensors
        .iter()
        .find(|t| t.name == "tok_embeddings.weight")
        .unwrap();
    assert_eq!(&model.params[spec.range()], &emb[..]);
    let mut cache = crate::generate::KvCache::new(&model);
    let logits = model.forward_cached(&[1, 2, 3], &mut cache).unwrap();
    assert_eq!(logits.len(), vocab as usize);
    assert!(logits.iter().all(|x| x.is_finite()));
    let (mut f32_model, _) = load_llama(&p, 64).unwrap();
    f32_model.quant.clear();
    f32_model.quant_parts.clear();
    let mut cache = crate::generate::KvCache::new(&f32_model);
    let exact = f32_model.forward_cached(&[1, 2, 3], &mut cache).unwrap();
    let top = exact.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let d = logits
        .iter()
        .zip(&exact)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("quantised vs f32 decode: max |Δ| {d} of {top}");
    assert!(d > 0.0 && d < 0.05 * top, "max |Δ| {d} of {top}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn block_dequantisation() {
    // Q4_1 block: d = 0.5, m = -1, nibbles j (low) and 15 - j (high).
    let mut blk = vec![];
    blk.extend_from_slice(&0x3800u16.to_le_bytes());
    blk.extend_from_slice(&0xbc00u16.to_le_bytes());
    blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut out = vec![0.0; 32];
    dequantize(Q4_1, &blk, &mut out).unwrap();
    assert_eq!(out[3], 0.5 * 3.0 - 1.0);
    assert_eq!(out[16 + 3], 0.5 * 12.0 - 1.0);
    // Q8_0: d = 2, q = -3.
    let mut blk = 0x4000u16.to_le_bytes().to_vec();
    blk.extend(std::iter::repeat_n((-3i8) as u8, 32));
    dequantize(Q8_0, &blk, &mut out).unwrap();
    assert!(out.iter().all(|&x| x == -6.0));
    assert!(dequantize(16, &blk, &mut out).is_err());
    // A k-quant type checks its byte count.
    assert!(dequantize(14, &blk, &mut out).is_err());
}

#[test]
fn bad_files_give_clear_errors() {
    let dir = std::env::temp_dir().join(format!("mnemo-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("bad.gguf");
    std::fs::write(&p, b"NOPE").unwrap();
    assert!(format!("{:#}", Gguf::open(&p).err().unwrap()).contains("bad magic"));
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    assert!(format!("{:#}", Gguf::open(&p).err().unwrap()).contains("truncated"));
    std::fs::remove_dir_all(&dir).ok();
}

/// Random `Q4_K`/`Q6_K` blocks (ggml type 12/14) with roughly zero-mean weights of size
/// O(0.01–0.1), like a trained model's: `d = ±2^-12..2^-11`; `Q4_K` with every sub-block's
/// scale and minimum one random `v < 16` and `dmin = 7.5·d` (the mean of `q` is 7.5).
fn small_k_blocks(r: &mut Rng, ty: u32, n: usize) -> Vec<u8> {
    use crate::kernels::f16::f32_to_f16_truncated;
    let f = kquant::format(ty).unwrap();
    let mut b: Vec<u8> = (0..f.byte_len(n).unwrap())
        .map(|_| (r.next_u64() & 0xff) as u8)
        .collect();
    for blk in b.chunks_exact_mut(f.block_bytes) {
        let h = (r.next_u64() as u16 & 0x83ff) | ((3 + (r.next_u64() as u16 & 1)) << 10);
        if ty == 12 {
            blk[0..2].copy_from_slice(&h.to_le_bytes());
            let dmin = f32_to_f16_truncated(7.5 * f16_to_f32(&h.to_le_bytes()));
            blk[2..4].copy_from_slice(&dmin);
            let v = 1 + (r.next_u64() % 15) as u8;
            blk[4..12].fill(v);
            blk[12..16].fill(v | (v << 4));
        } else {
            blk[208..210].copy_from_slice(&h.to_le_bytes());
        }
    }
    b
}

/// A two-layer Llama with `Q4_K` attention/gate/up weights and `Q6_K` down, output and
/// embedding weights keeps quantised copies of every linear weight, decodes through them
/// (the logits differ from the f32 path's, so the quantised product ran), and its logits stay
/// close to the f32 path's: max |Δlogit| within 1.5e-2 of the largest |logit| for the prompt
/// (only the output product quantised; measured 6.9e-3) and 6e-2 over the decode steps, where
/// every product is quantised and the caches drift apart (measured 3.1e-2). The difference is
/// the 8-bit `Q8_K` activations (one scale per 256 values): the kernels themselves match the
/// dequantised product to ~1e-8 (`kernels::kdot` tests).
#[test]
fn llama_q4_k_q6_k_decodes_quantised() {
    let dir = tmp("q4k");
    let p = dir.join("q4k.gguf");
    let mut r = Rng::new(12);
    let (d, kv, ffn, vocab) = (256u64, 128u64, 512u64, 300u64);
    let mut w = llama_meta(d, 2, ffn, vocab);
    let ones: Vec<u8> = (0..d).flat_map(|_| 1.0f32.to_le_bytes()).collect();
    let mut q = |w: &mut GgufWriter, name: &str, ty: u32, dims: &[u64]| {
        let n = dims.iter().product::<u64>() as usize;
        w.tensor(name, dims, ty, small_k_blocks(&mut r, ty, n));
    };
    q(&mut w, "token_embd.weight", 14, &[d, vocab]);
    q(&mut w, "output.weight", 14, &[d, vocab]);
    for i in 0..2 {
        let b = |s: &str| format!("blk.{i}.{s}.weight");
        q(&mut w, &b("attn_q"), 12, &[d, d]);
        q(&mut w, &b("attn_k"), 12, &[d, kv]);
        q(&mut w, &b("attn_v"), 12, &[d, kv]);
        q(&mut w, &b("attn_output"), 12, &[d, d]);
        q(&mut w, &b("ffn_gate"), 12, &[d, ffn]);
        q(&mut w, &b("ffn_up"), 12, &[d, ffn]);
        q(&mut w, &b("ffn_down"), 14, &[ffn, d]);
        for n in ["attn_norm", "ffn_norm"] {
            w.tensor(&b(n), &[d], F32, ones.clone());
        }
    }
    w.tensor("output_norm.weight", &[d], F32, ones.clone());
    w.write(&p, 0);
    let (model, _tok) = load_llama(&p, 64).unwrap();
    // 4 per layer (qkv, wo, gate+up, down) + output.
    assert_eq!(model.quant.len(), 9);
    let n_q6 = model.quant.values().filter(|m| m.ty == QType::Q6_K).count();
    assert_eq!(n_q6, 3);
    assert!(model
        .quant
        .values()
        .all(|m| matches!(m.ty, QType::Q4_K | QType::Q6_K)));
    let (mut f32_model, _) = load_llama(&p, 64).unwrap();
    f32_model.quant.clear();
    let mut cq = crate::generate::KvCache::new(&model);
    let mut cf = crate::generate::KvCache::new(&f32_model);
    // A prefill, then single-token decode steps (every product quantised on `model`, prompt
    // rows included: `decode::Plan`).
    let mut worst = 0.0f32;
    for toks in [&[1u32, 2, 3][..], &[4], &[150], &[7], &[299]] {
        let a = model.forward_cached(toks, &mut cq).unwrap();
        let b = f32_model.forward_cached(toks, &mut cf).unwrap();
        let t = toks[0];
        assert_ne!(a, b, "the quantised path did not run");
        let top = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let diff = a
            .iter()
            .zip(&b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(top > 0.1, "degenerate logits");
        worst = worst.max(diff / top);
        assert!(
            diff < 6e-2 * top,
            "token {t}: max |Δ| {diff} vs max |logit| {top}"
        );
    }
    eprintln!("worst max|Δlogit| / max|logit|: {worst:e}");
    std::fs::remove_dir_all(&dir).ok();
}
