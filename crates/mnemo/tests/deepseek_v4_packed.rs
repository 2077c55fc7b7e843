//! An official DeepSeek-V4 checkpoint run from its packed FP8 / FP4 weights, memory-mapped
//! with no f32 copy (`io::v4_packed`, `kernels::fp8dot`), against the same checkpoint
//! dequantised to f32:
//! the fixture of `deepseek_v4_official.rs` (FP8 with partial 128×128 blocks, FP4 routed
//! experts stored as I8, U8 and F4 with E8M0, U8 and F32 scales).
//!
//! The packed kernels decode every weight to exactly the f32 value dequantisation gives, so
//! the two models differ only in the order of the f32 sums: logits agree to 2e-5 of the
//! largest logit at every decoded position (prefill rows too: a packed-only model has no f32
//! copy to fall back to), greedy decoding gives the same tokens, and both stay within the
//! 1e-4 of transformers' logits that the f32 model meets. The BF16 weights that decoding
//! multiplies (`wo_a`, compressors, indexer, router) are mapped as stored too. (Bad directories: `deepseek_v4_quantize.rs`.)

use mnemo::generate::KvCache;
use mnemo::io::safetensors::TensorFile;
use mnemo::kernels::quant::QType;
use mnemo::model::Model;
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deepseek_v4_official")
}

/// The logits of every position, one token at a time through the cache.
fn decode_all(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut cache = KvCache::new(model);
    ids.iter()
        .flat_map(|&id| model.forward_cached(&[id], &mut cache).unwrap())
        .collect()
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b }) as u32
}

#[test]
fn packed_decoding_matches_the_dequantised_model() {
    let dir = fixture();
    let f32m = mnemo::io::v4_official::load_dir(&dir).unwrap();
    let packed = mnemo::io::v4_packed::load_dir_packed(&dir).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(f32m.quant.is_empty() && !f32m.packed_only);
    assert!(packed.packed_only && packed.params.is_reserved());
    // Every FP8 product weight and every routed expert (w1, w2, w3) is packed, the experts'
    // codes as ranges of the mapped shards, and none of them has an f32 copy.
    let c = &packed.cfg;
    let n8 = packed.quant.values().filter(|q| q.ty == QType::Fp8).count();
    let n4 = packed.quant.values().filter(|q| q.ty == QType::Fp4).count();
    assert_eq!(n4, c.n_layers * c.n_routed_experts * 3, "routed experts");
    assert!(n8 >= c.n_layers * 4, "FP8 matrices: {n8}");
    // The BF16 products are mapped as stored: `wo_a` as its 2 diagonal blocks in each of the
    // 3 layers (6), the 3 routers, the compressors' wkv/wgate of layers 1 (CSA) and 2 (HCA)
    // (4), layer 1's indexer compressor (2) and weights_proj (1), and the embedding: 17. The
    // indexer's FP8 wq_b is packed too (in n8).
    let nb = packed
        .quant
        .values()
        .filter(|q| q.ty == QType::Bf16)
        .count();
    assert_eq!(nb, 17, "BF16 matrices kept mapped");
    assert!(packed.quant.values().all(|q| q.data.is_shared()));
    let mut covered = vec![false; packed.params.len()];
    for (&off, q) in &packed.quant {
        covered[off..off + q.rows * q.cols].fill(true);
    }
    for (i, (a, b)) in packed.params.iter().zip(f32m.params.iter()).enumerate() {
        assert_eq!(*a, if covered[i] { 0.0 } else { *b }, "parameter {i}");
    }

    let exp = TensorFile::open(&dir.join("expected.safetensors")).unwrap();
    let ids = exp.u32("input_ids").unwrap();
    let want = exp.f32("logits", None).unwrap();
    let a = decode_all(&f32m, &ids);
    let b = decode_all(&packed, &ids);
    let top = want.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
    let max_diff = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .fold(0.0f32, |m, (p, q)| m.max((p - q).abs()))
    };
    let (d_ab, d_a, d_b) = (max_diff(&a, &b), max_diff(&a, &want), max_diff(&b, &want));
    eprintln!(
        "packed vs f32 decode: max |Δlogit| {d_ab:.2e}; vs transformers: f32 {d_a:.2e}, packed {d_b:.2e} (largest logit {top:.2})"
    );
    assert!(d_ab <= 2e-5 * top.max(1.0), "packed vs f32: {d_ab}");
    assert!(d_b <= 1e-4 * top.max(1.0), "packed vs transformers: {d_b}");
    // A prefill chunk runs the packed weights too, and agrees with the f32 prefill.
    let prefill = |m: &Model| {
        let mut cache = KvCache::new(m);
        m.forward_cached(&ids[..5], &mut cache).unwrap()
    };
    let (pa, pb) = (prefill(&f32m), prefill(&packed));
    assert!(max_diff(&pa, &pb) <= 2e-5 * top.max(1.0));

    // Greedy decoding from the first 3 ids: the same 12 tokens.
    let greedy = |m: &Model| {
        let mut cache = KvCache::new(m);
        let mut l = m.forward_cached(&ids[..3], &mut cache).unwrap();
        let mut out = Vec::new();
        for _ in 0..12 {
            let t = argmax(&l);
            out.push(t);
            l = m.forward_cached(&[t], &mut cache).unwrap();
        }
        out
    };
    let (ga, gb) = (greedy(&f32m), greedy(&packed));
    assert_eq!(ga, gb);

    // The full forward needs f32 weights: refused, not run on the missing copies.
    let mut ws = mnemo::model::Workspace::default();
    let err = format!(
        "{:#}",
        packed.try_forward(&ids[..4], 1, 4, &mut ws).unwrap_err()
    );
    assert!(err.contains("packed only"), "{err}");

    // Decoding and prefill read the packed copies: zeroed codes (copied on write, the mapped
    // files untouched) change both.
    // The mapped BF16 copies alone are read as well: zeroing only them changes decoding.
    let mut bf16_zeroed = mnemo::io::v4_packed::load_dir_packed(&dir).unwrap();
    bf16_zeroed
        .quant
        .values_mut()
        .filter(|q| q.ty == QType::Bf16)
        .for_each(|q| q.data.fill(0));
    let z = decode_all(&bf16_zeroed, &ids[..2]);
    assert!(max_diff(&z, &a[..z.len()]) > 1e-3 * top);
    let mut zeroed = packed;
    zeroed.quant.values_mut().for_each(|q| q.data.fill(0));
    let z = decode_all(&zeroed, &ids[..2]);
    assert!(max_diff(&z, &a[..z.len()]) > 1e-3 * top);
    assert!(max_diff(&prefill(&zeroed), &pa) > 1e-3 * top);
    let again = mnemo::io::v4_packed::load_dir_packed(&dir).unwrap();
    assert!(max_diff(&prefill(&again), &pa) <= 2e-5 * top.max(1.0));
}
