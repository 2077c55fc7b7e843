//! DeepSeek-V4 with DeepSeek's official inference numerics (`Model::use_official_numerics`,
//! `--numerics official`) against transformers 5.23.0 with the same round trips inserted at the
//! official call sites (`reference/v4_official_numerics.py`): a tiny random model in the
//! official layout (FP8/FP4 weights), CSA + HCA layers, 144 tokens.
//!
//! Tolerance. Both sides compute in f32 on the same dequantised weights, so before rounding
//! they differ by summation order (~1e-7 relative). A value that lands within that distance
//! of an FP8/FP4 rounding midpoint can round the other way on the two sides: one step of
//! e4m3 (2⁻³ relative) or e2m1, a local change of one activation. Hence a per-position
//! criterion: the median position within 1e-5 relative (L2 over the vocabulary; measured
//! 2.2e-7) and every position within 1e-3 (measured 1.0e-5: no flip on this fixture; the
//! bound leaves room for one after a change of summation order, while the official numerics
//! move positions by 7% median, up to 55%, from `exact`, so a missing or misplaced round trip
//! fails). The fixture's discrete choices (routing and indexer top-k) have margins ≥ 5e-4 in
//! the oracle (exact ties resolved to the lower entries, as mnemo resolves them).

use mnemo::io::safetensors::TensorFile;
use mnemo::model::{Model, Workspace};
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/deepseek_v4_numerics/official_csa_hca")
}

fn load() -> (Model, Vec<u32>, Vec<f32>, Vec<f32>) {
    let dir = fixture();
    let model = mnemo::checkpoint::load_model(&dir)
        .unwrap_or_else(|e| panic!("{e:#}"))
        .model;
    let exp = TensorFile::open(&dir.join("expected.safetensors")).unwrap();
    let ids = exp.u32("input_ids").unwrap();
    let official = exp.f32("logits", None).unwrap();
    let exact = exp.f32("logits_exact", None).unwrap();
    (model, ids, official, exact)
}

/// Per position: `|a − b| / |b|` (L2 over the vocabulary).
fn rel_errors(a: &[f32], b: &[f32], v: usize) -> Vec<f64> {
    a.chunks(v)
        .zip(b.chunks(v))
        .map(|(x, y)| {
            let d: f64 = x.iter().zip(y).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
            let n: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum();
            (d / n).sqrt()
        })
        .collect()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn full_forward(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut ws = Workspace::default();
    model.forward(ids, 1, ids.len(), &mut ws);
    std::mem::take(&mut ws.logits)
}

fn cached(model: &Model, ids: &[u32], chunk: usize) -> Vec<f32> {
    use mnemo::batch::BatchSeq;
    use mnemo::model::KvCache;
    let mut cache = KvCache::new(model);
    let mut out = Vec::new();
    for c in ids.chunks(chunk) {
        let mut seq = [BatchSeq {
            tokens: c,
            cache: &mut cache,
            logits_from: 0,
        }];
        out.extend(model.forward_batch(&mut seq).unwrap().remove(0));
    }
    out
}

#[test]
fn official_numerics_match_the_oracle() {
    let (mut model, ids, official, exact) = load();
    let v = model.cfg.vocab_size;
    // The default mode is transformers' arithmetic: it matches the unmodified oracle.
    let plain = full_forward(&model, &ids);
    let e = rel_errors(&plain, &exact, v);
    let max_e = e.iter().cloned().fold(0.0, f64::max);
    eprintln!("exact vs transformers: max per-position rel err {max_e:.2e}");
    assert!(max_e < 1e-4, "exact mode vs transformers: {max_e}");
    let away = rel_errors(&plain, &official, v);
    eprintln!(
        "exact vs official oracle: median {:.2e}, max {:.2e}",
        median(&away),
        away.iter().cloned().fold(0.0, f64::max)
    );
    assert!(
        median(&away) > 1e-2,
        "the fixture does not separate the modes"
    );

    model.use_official_numerics().unwrap();
    let got = full_forward(&model, &ids);
    let r = rel_errors(&got, &official, v);
    let (med, max) = (median(&r), r.iter().cloned().fold(0.0, f64::max));
    let argmax = |x: &[f32]| {
        x.chunks(v)
            .map(|row| (0..v).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap())
            .collect::<Vec<_>>()
    };
    let same_top = argmax(&got)
        .iter()
        .zip(argmax(&official))
        .filter(|(a, b)| **a == *b)
        .count();
    eprintln!(
        "official vs oracle: median per-position rel err {med:.2e}, max {max:.2e} (position {}), \
         argmax agrees at {same_top}/{} positions",
        r.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0,
        ids.len()
    );
    assert!(med < 1e-5, "median {med}");
    assert!(max < 1e-3, "max {max}");
    assert_eq!(same_top, ids.len(), "argmax");
}

#[test]
fn official_numerics_cached_decoding_matches_the_full_forward() {
    let (mut model, ids, official, _) = load();
    model.use_official_numerics().unwrap();
    let v = model.cfg.vocab_size;
    let full = full_forward(&model, &ids);
    // The cache holds the rounded rows and entries: one token at a time, odd chunks, and
    // one prefill give the full forward's logits.
    for chunk in [1, 5, ids.len()] {
        let got = cached(&model, &ids, chunk);
        let r = rel_errors(&got, &full, v);
        let max = r.iter().cloned().fold(0.0, f64::max);
        let o = rel_errors(&got, &official, v);
        eprintln!(
            "chunks of {chunk}: vs full forward max {max:.2e}; vs oracle median {:.2e}",
            median(&o)
        );
        assert!(max < 1e-5 && median(&o) < 1e-5, "chunk {chunk}: {max}");
    }
    // The FP8/FP4 weights kept packed (memory-mapped codes, f32 activations): the same
    // rounded inputs reach the packed products, so the same logits.
    let mut packed = mnemo::io::v4_packed::load_dir_packed(&fixture()).unwrap();
    packed.use_official_numerics().unwrap();
    let got = cached(&packed, &ids, 7);
    let r = rel_errors(&got, &full, v);
    let max = r.iter().cloned().fold(0.0, f64::max);
    eprintln!("packed, chunks of 7: vs full forward max {max:.2e}");
    assert!(max < 1e-5, "packed: {max}");
}

#[test]
fn official_numerics_refuse_partial_blocks() {
    // A DeepSeek-V4 model whose widths are not whole blocks (the transformers fixtures).
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/deepseek_v4/hc2_hca16_csa_5heads");
    let mut model = mnemo::io::hf_v4::load_dir(&dir).unwrap();
    let err = format!("{:#}", model.use_official_numerics().unwrap_err());
    assert!(
        err.contains("hidden_size = 32 (a multiple of 128)")
            && err.contains("index_head_dim = 16 (a multiple of 32)"),
        "{err}"
    );
}
