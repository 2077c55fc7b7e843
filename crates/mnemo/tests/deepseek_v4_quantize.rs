//! `mnemo quantize` (`io::v4_quantize`) against transformers 5.23.0, and the errors of broken
//! quantised directories. `tests/fixtures/deepseek_v4_quantized/` is what
//! `mnemo quantize FLOAT OUT --type fp8+fp4` wrote for a tiny random transformers model
//! (`reference/v4_quantize_fixture.py`); `expected.safetensors` holds the logits transformers
//! gives after loading THAT directory (its FP8 loader dequantises on CPU, exactly: every
//! FP8/FP4 value times its power-of-two scale fits bf16). mnemo decoding from the packed
//! weights and its f32 full forward must match them to 1e-5 of the largest logit: the weight
//! values are identical on both sides and only the f32 summation order differs (measured:
//! 2.0e-6 with the largest logit 3.2).

use mnemo::generate::KvCache;
use mnemo::io::safetensors::{Dtype, TensorFile};
use mnemo::io::v4_quantize::{write_official, QuantMix};
use mnemo::model::Workspace;
use safetensors::tensor::TensorView;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deepseek_v4_quantized")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mnemo-v4q-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn quantized_directory_matches_transformers_packed_and_f32() {
    let dir = fixture();
    assert!(mnemo::io::v4_official::is_official_dir(&dir));
    let exp = TensorFile::open(&dir.join("expected.safetensors")).unwrap();
    let ids = exp.u32("input_ids").unwrap();
    let want = exp.f32("logits", None).unwrap();
    let top = want.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
    let packed = mnemo::io::v4_packed::load_dir_packed(&dir).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!packed.quant.is_empty());
    let mut cache = KvCache::new(&packed);
    let got: Vec<f32> = ids
        .iter()
        .flat_map(|&id| packed.forward_cached(&[id], &mut cache).unwrap())
        .collect();
    // The full forward needs f32 weights (a packed-only model refuses it): the dequantised load.
    let f32m = mnemo::io::v4_official::load_dir(&dir).unwrap();
    let mut ws = Workspace::default();
    f32m.forward(&ids, 1, ids.len(), &mut ws);
    let (dp, df) = (max_diff(&got, &want), max_diff(&ws.logits, &want));
    eprintln!("vs transformers: packed decode {dp:.2e}, f32 forward {df:.2e} (largest {top:.2})");
    assert!(
        dp <= 1e-5 * top.max(1.0) && df <= 1e-5 * top.max(1.0),
        "{dp} {df}"
    );
}

/// Every stored tensor of `dir`'s `model.safetensors`: name → (dtype, shape, bytes).
type Raw = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn read_raw(dir: &Path) -> Raw {
    let f = TensorFile::open(&dir.join("model.safetensors")).unwrap();
    f.names()
        .into_iter()
        .map(|n| {
            let t = f.raw(&n).unwrap();
            (n, (t.dtype, t.shape.to_vec(), t.data.to_vec()))
        })
        .collect()
}

fn write_raw(dir: &Path, file: &str, t: &Raw) {
    let views: Vec<(String, TensorView)> = t
        .iter()
        .map(|(n, (dt, s, b))| (n.clone(), TensorView::new(*dt, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(dir.join(file), safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn quantize_round_trips_and_fp8_mix_quantises_the_experts_to_fp8() {
    let src = mnemo::io::v4_official::load_dir(&fixture()).unwrap();
    // Re-quantising the dequantised model gives back the same values (fp8+fp4).
    let d = tmpdir("again");
    write_official(&src, &d, QuantMix::Fp8Fp4).unwrap();
    let back = mnemo::io::v4_official::load_dir(&d).unwrap();
    assert_eq!(back.params, src.params);
    assert_eq!(back.hash_tables, src.hash_tables);
    let raw = read_raw(&d);
    let dt = |n: &str| raw[n].0;
    assert_eq!(dt("layers.1.attn.wq_a.weight"), Dtype::F8_E4M3);
    assert_eq!(dt("layers.1.attn.wq_a.scale"), Dtype::F8_E8M0);
    assert_eq!(dt("layers.1.ffn.experts.0.w1.weight"), Dtype::I8);
    assert_eq!(raw["layers.1.ffn.experts.0.w1.scale"].1, vec![64, 2]);
    assert_eq!(dt("embed.weight"), Dtype::BF16);
    assert_eq!(dt("layers.0.ffn.gate.tid2eid"), Dtype::I32);
    // --type fp8: the routed experts in FP8 too, within FP8's rounding of the FP4 values.
    let d8 = tmpdir("fp8");
    write_official(&src, &d8, QuantMix::Fp8).unwrap();
    let raw8 = read_raw(&d8);
    assert_eq!(raw8["layers.1.ffn.experts.0.w1.weight"].0, Dtype::F8_E4M3);
    assert_eq!(raw8["layers.1.ffn.experts.0.w1.scale"].1, vec![1, 1]);
    let m8 = mnemo::io::v4_official::load_dir(&d8).unwrap();
    for spec in &src.layout.tensors {
        let (a, b) = (&src.params[spec.range()], &m8.params[spec.range()]);
        let amax = a.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(max_diff(a, b) <= amax / 16.0, "{}", spec.name);
    }
    // The packed kernels decode the FP8 experts like the f32 model.
    let p8 = mnemo::io::v4_packed::load_dir_packed(&d8).unwrap();
    let (mut c1, mut c2) = (KvCache::new(&p8), KvCache::new(&m8));
    for id in [3u32, 9, 27] {
        let (x, y) = (
            p8.forward_cached(&[id], &mut c1).unwrap(),
            m8.forward_cached(&[id], &mut c2).unwrap(),
        );
        assert!(max_diff(&x, &y) < 1e-5, "{}", max_diff(&x, &y));
    }
    for d in [d, d8] {
        std::fs::remove_dir_all(d).ok();
    }
}

fn load_err(dir: &Path) -> String {
    let e = mnemo::io::v4_packed::load_dir_packed(dir)
        .err()
        .expect("the load should fail");
    format!("{e:#}")
}

#[test]
fn broken_quantized_directories_name_the_tensor_and_the_file() {
    let raw = read_raw(&fixture());
    let copy = |name: &str, t: &Raw| {
        let d = tmpdir(name);
        std::fs::copy(fixture().join("config.json"), d.join("config.json")).unwrap();
        write_raw(&d, "model.safetensors", t);
        d
    };
    // A scale tensor of the wrong shape.
    let mut t = raw.clone();
    t.get_mut("layers.2.attn.wo_b.scale").unwrap().1 = vec![1, 1, 1];
    let d = copy("scale", &t);
    let e = load_err(&d);
    assert!(
        e.contains("layers.2.attn.wo_b.scale")
            && e.contains("model.safetensors")
            && e.contains("expected [1, 1]"),
        "{e}"
    );
    // An expert dtype the kernels do not know (I16 bytes).
    let mut t = raw.clone();
    let w = t.get_mut("layers.1.ffn.experts.2.w2.weight").unwrap();
    w.0 = Dtype::I16;
    w.1 = vec![64, 16];
    let d2 = copy("dtype", &t);
    let e = load_err(&d2);
    assert!(
        e.contains("layers.1.ffn.experts.2.w2.weight")
            && e.contains("model.safetensors")
            && e.contains("I16"),
        "{e}"
    );
    // A shard named by the index that is not there.
    let d3 = tmpdir("shard");
    std::fs::copy(fixture().join("config.json"), d3.join("config.json")).unwrap();
    let (a, b): (Raw, Raw) = raw
        .clone()
        .into_iter()
        .partition(|(n, _)| !n.starts_with("layers.2."));
    write_raw(&d3, "model-00001-of-00002.safetensors", &a);
    let map: serde_json::Map<String, serde_json::Value> = a
        .keys()
        .map(|n| (n.clone(), "model-00001-of-00002.safetensors".into()))
        .chain(
            b.keys()
                .map(|n| (n.clone(), "model-00002-of-00002.safetensors".into())),
        )
        .collect();
    let idx = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(d3.join("model.safetensors.index.json"), idx.to_string()).unwrap();
    let e = load_err(&d3);
    assert!(
        e.contains("model-00002-of-00002.safetensors")
            && e.contains("layers.2.")
            && e.contains("cannot be read"),
        "{e}"
    );
    for d in [d, d2, d3] {
        std::fs::remove_dir_all(d).ok();
    }
}
