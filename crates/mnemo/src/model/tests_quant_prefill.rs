//! Prompt rows on the quantised weights (`decode::Plan`): a prefill chunk's rows run the same
//! integer products as one-token decoding (8-bit activations per 32-value block), so its
//! logits are within the activation rounding of the f32 path over the dequantised weights
//! (what the prefill used before), and each row equals one-token decoding's.

use super::*;
use crate::batch::forward_all;
use crate::config::ModelConfig;
use crate::kernels::quant::{dequantize_matrix, quantize_matrix, QType};
use crate::kernels::rope::RopeLayout;

/// A small model with `Q4_1`, `Q4_0` and `Q8_0` copies of its linear layers whose f32
/// parameters are replaced by the dequantised weights (as a GGUF model's are), and the same
/// model without the quantised copies (every product on the f32 dequantised weights).
fn quantised_and_dequantised(seed: u64) -> (Model, Model) {
    (build(seed, true), build(seed, false))
}

/// One of the pair of [`quantised_and_dequantised`] (`quantised`: with the quantised copies).
fn build(seed: u64, quantised: bool) -> Model {
    let cfg = ModelConfig {
        vocab_size: 61,
        d_model: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
        rope_theta: 10000.0,
        rope_dim: 16,
        rope_layout: RopeLayout::Half,
        ffn_hidden: 96,
        tied_embeddings: false,
        norm_eps: 1e-5,
        init_std: INIT_STD,
        max_seq_len: 400,
        ..ModelConfig::dense_defaults()
    };
    let mut m = Model::new(cfg).unwrap();
    m.init(seed);
    let c = m.cfg.clone();
    let (d, f, v, qd) = (c.d_model, c.ffn_hidden, c.vocab_size, c.qkv_dim());
    let mut mats = vec![];
    for lo in &m.layout.layers {
        mats.push((lo.wqkv, qd, d, QType::Q4_1));
        mats.push((lo.wo, d, c.n_heads * c.head_dim, QType::Q4_0));
        if let Ffn::Dense { w13, w2 } = lo.ffn {
            mats.push((w13, 2 * f, d, QType::Q8_0));
            mats.push((w2, d, f, QType::Q4_1));
        }
    }
    // (The head is Q8_0 in both: the prefill rule is about the blocks' products.)
    for (off, rows, cols, ty) in mats {
        let q = quantize_matrix(ty, rows, cols, &m.params[off..off + rows * cols]);
        let w = dequantize_matrix(&q);
        m.params[off..off + rows * cols].copy_from_slice(&w);
        if quantised {
            m.quant.insert(off, q);
        }
    }
    let q = quantize_matrix(QType::Q8_0, v, d, &m.params[m.layout.output..][..v * d]);
    let w = dequantize_matrix(&q);
    let out = m.layout.output;
    m.params[out..out + v * d].copy_from_slice(&w);
    m.quant.insert(out, q);
    m
}

/// Weight scale of the test model (larger scales make the random network chaotic: at 0.2
/// its logits already move by ~5% under the same activation rounding).
const INIT_STD: f32 = 0.1;

fn prompt(n: usize, s: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 17 + s * 5 + 3) % 61).collect()
}

/// Tolerance: `max |quantised − f32| ≤ 0.03 · max |f32|` over the last row's logits (the
/// 8-bit activations round each block to 1/254 of its largest value; measured here: at most
/// 1.9%), and the same argmax wherever the f32 path's top two logits are 0.1 or more apart.
#[test]
fn a_prefill_on_quantised_weights_is_close_to_the_dequantised_f32_prefill() {
    let mut worst: f32 = 0.0;
    for seed in [1u64, 2, 3] {
        let (q, f) = quantised_and_dequantised(seed);
        for (n, s) in [(5, 0), (40, 1), (130, 2)] {
            let p = prompt(n, s);
            let lq = q.forward_cached(&p, &mut KvCache::new(&q)).unwrap();
            let lf = f.forward_cached(&p, &mut KvCache::new(&f)).unwrap();
            let scale = lf.iter().fold(0.0f32, |a, x| a.max(x.abs()));
            let err = lq
                .iter()
                .zip(&lf)
                .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
            worst = worst.max(err / scale);
            assert!(
                err <= 0.03 * scale,
                "seed {seed} n {n}: max error {err} of {scale}"
            );
            let mut order: Vec<usize> = (0..lf.len()).collect();
            order.sort_by(|&a, &b| lf[b].total_cmp(&lf[a]));
            if lf[order[0]] - lf[order[1]] >= 0.1 {
                let am = (0..lq.len())
                    .max_by(|&a, &b| lq[a].total_cmp(&lq[b]))
                    .unwrap();
                assert_eq!(am, order[0], "seed {seed} n {n}: argmax");
            }
        }
    }
    eprintln!("worst relative logit error {worst}");
}

/// Each row of a prompt chunk runs the products one-token decoding runs: the chunk's rows give
/// the logits of feeding the same tokens one at a time (up to the attention's summation order,
/// which differs between a chunk and one row), and the products themselves are exact per row
/// whatever the chunking (two chunkings agree to the same tolerance).
#[test]
fn a_quantised_prompt_chunk_matches_one_token_decoding_row_by_row() {
    let (q, _) = quantised_and_dequantised(4);
    let head = prompt(9, 3);
    let rows = prompt(23, 4);
    let mut c = KvCache::new(&q);
    q.forward_cached(&head, &mut c).unwrap();
    let all = forward_all(&q, &rows, &mut c).unwrap();
    let mut c = KvCache::new(&q);
    q.forward_cached(&head, &mut c).unwrap();
    let v = q.cfg.vocab_size;
    for (i, &t) in rows.iter().enumerate() {
        let one = q.forward_cached(&[t], &mut c).unwrap();
        for (j, (a, b)) in all[i * v..(i + 1) * v].iter().zip(&one).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "row {i} logit {j}: {a} vs {b}"
            );
        }
    }
}
