//! DeepSeek-V4 in the official release layout (`io::v4_official`) against transformers 5.23.0:
//! `tests/fixtures/deepseek_v4_official/` (`reference/v4_official_fixture.py`) is a tiny random
//! model under the `inference/model.py` names, FP8 (128×128 blocks, partial at the edges) and
//! FP4 (routed experts) with E8M0 scales, in two shards, with `mtp.*` tensors and no tokenizer;
//! `expected.safetensors` holds transformers' logits for the dequantised weights. mnemo loads
//! the directory through `checkpoint::load_model` and must give the same logits (max |Δ| ≤ 1e-4
//! of the largest logit). Then: the same checkpoint in one file, and the errors of broken
//! copies (missing / unexpected tensors listed, a bad scale shape or a NaN named).

use mnemo::io::safetensors::{Dtype, TensorFile};
use mnemo::model::{Model, Workspace};
use safetensors::tensor::TensorView;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deepseek_v4_official")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mnemo-v4off-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Max |Δlogit| of `model` on the fixture's ids, and the largest |logit|.
fn logit_error(model: &Model) -> (f32, f32) {
    let exp = TensorFile::open(&fixture().join("expected.safetensors")).unwrap();
    let ids = exp.u32("input_ids").unwrap();
    let want = exp.f32("logits", None).unwrap();
    let mut ws = Workspace::default();
    model.forward(&ids, 1, ids.len(), &mut ws);
    assert_eq!(ws.logits.len(), want.len());
    let top = want.iter().fold(0.0f32, |a, &b| a.max(b.abs()));
    let worst = ws
        .logits
        .iter()
        .zip(&want)
        .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
    (worst, top)
}

#[test]
fn official_checkpoint_matches_transformers() {
    let dir = fixture();
    assert!(!dir.join("tokenizer.json").exists());
    assert!(mnemo::io::hf_v4::is_v4_dir(&dir));
    assert!(mnemo::io::v4_official::is_official_dir(&dir));
    let l = mnemo::checkpoint::load_model(&dir).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(l.tokenizer.is_none());
    let c = &l.model.cfg;
    let v4 = c.v4.as_ref().unwrap();
    assert_eq!((c.n_layers, c.d_model, c.num_hash_layers), (3, 96, 2));
    assert_eq!(v4.compress_rate_hca, 128);
    let (worst, top) = logit_error(&l.model);
    eprintln!("official FP8/FP4 checkpoint: max |Δlogit| {worst:.2e} (largest logit {top:.2})");
    assert!(
        worst <= 1e-4 * top.max(1.0),
        "logits differ by {worst} (largest {top})"
    );
    // Commands that need text say what is missing.
    let err = format!("{:#}", mnemo::checkpoint::load(&dir, false).err().unwrap());
    assert!(
        err.contains("tokenizer.json") && err.contains("mnemo logits"),
        "{err}"
    );
}

/// Every tensor of the fixture as stored: name → (dtype, shape, bytes).
type Raw = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn read_all(dir: &Path) -> Raw {
    let mut out = Raw::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !name.starts_with("model-") {
            continue;
        }
        let f = TensorFile::open(&p).unwrap();
        for n in f.names() {
            let t = f.raw(&n).unwrap();
            out.insert(n, (t.dtype, t.shape.to_vec(), t.data.to_vec()));
        }
    }
    out
}

/// A copy of the fixture as one `model.safetensors` (config copied), from `tensors`.
fn write_single(name: &str, tensors: &Raw) -> PathBuf {
    let d = tmpdir(name);
    std::fs::copy(fixture().join("config.json"), d.join("config.json")).unwrap();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, (dt, s, b))| (n.clone(), TensorView::new(*dt, s.clone(), b).unwrap()))
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(d.join("model.safetensors"), bytes).unwrap();
    d
}

fn load_err(dir: &Path) -> String {
    format!(
        "{:#}",
        mnemo::checkpoint::load_model(dir)
            .err()
            .expect("the load should fail")
    )
}

#[test]
fn one_file_loads_like_the_shards_and_mtp_is_optional() {
    let all = read_all(&fixture());
    assert!(all.keys().any(|k| k.starts_with("mtp.")));
    let sharded = mnemo::checkpoint::load_model(&fixture()).unwrap().model;
    let d = write_single("single", &all);
    let single = mnemo::checkpoint::load_model(&d).unwrap().model;
    assert_eq!(single.params, sharded.params);
    assert_eq!(single.hash_tables, sharded.hash_tables);
    // Without the MTP tensors: the same model.
    let no_mtp: Raw = all
        .into_iter()
        .filter(|(k, _)| !k.starts_with("mtp."))
        .collect();
    let d2 = write_single("nomtp", &no_mtp);
    assert_eq!(
        mnemo::checkpoint::load_model(&d2).unwrap().model.params,
        sharded.params
    );
    std::fs::remove_dir_all(&d).ok();
    std::fs::remove_dir_all(&d2).ok();
}

/// A complete MTP block loads (the fixture's FP8 `e_proj`/`h_proj` dequantised like the main
/// weights, the rest of the block added in F32 here), the main layers unchanged; MTP
/// speculation then runs on it and gives plain greedy decoding's tokens.
#[test]
fn a_complete_mtp_block_loads_and_drafts() {
    let mut all = read_all(&fixture());
    let main = mnemo::checkpoint::load_model(&fixture()).unwrap().model;
    assert_eq!(
        main.cfg.mtp_layers(),
        0,
        "the fixture's MTP block is incomplete"
    );
    let text = std::fs::read_to_string(fixture().join("config.json")).unwrap();
    let cfg = mnemo::io::hf_v4::config_from_hf(&serde_json::from_str(&text).unwrap()).unwrap();
    assert_eq!(cfg.mtp_layers(), 1);
    let mut donor = Model::new(cfg).unwrap();
    donor.init(9);
    let mut added = Vec::new();
    for t in donor
        .layout
        .tensors
        .iter()
        .filter(|t| t.name.starts_with("mtp."))
    {
        if !all.contains_key(&t.name) {
            let bytes = donor.params[t.range()]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            all.insert(t.name.clone(), (Dtype::F32, t.shape.clone(), bytes));
            added.push(t.clone());
        }
    }
    assert!(added.iter().any(|t| t.name == "mtp.0.attn.wq_a.weight"));
    let d = write_single("mtp-full", &all);
    let m = mnemo::checkpoint::load_model(&d).unwrap().model;
    std::fs::remove_dir_all(&d).ok();
    assert_eq!(m.cfg.mtp_layers(), 1);
    let k = main.layout.total;
    assert_eq!(m.params[..k], main.params[..k]);
    for t in &added {
        assert_eq!(m.params[t.range()], donor.params[t.range()], "{}", t.name);
    }
    let e_proj = m.layout.mtp[0].e_proj;
    assert!(m.params[e_proj..e_proj + 8].iter().any(|&x| x != 0.0));
    let v = m.cfg.vocab_size;
    let prompt: Vec<u32> = (0..20u32).map(|i| (i * 37 + 11) % v as u32).collect();
    let greedy = mnemo::generate::Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };
    let want = mnemo::generate::generate(&m, &prompt, 24, greedy, 0, v, None, |_| Ok(())).unwrap();
    let mut c = mnemo::generate::KvCache::new(&m);
    let (got, st) =
        mnemo::speculate::generate_mtp(&m, &mut c, &prompt, 24, greedy, 0, v, None, 3, |_| Ok(()))
            .unwrap();
    assert_eq!(got, want, "{st:?}");
    assert!(st.drafted > 0);
}

#[test]
fn missing_and_unexpected_tensors_are_listed() {
    let mut t = read_all(&fixture());
    t.remove("layers.0.ffn.experts.2.w3.weight").unwrap(); // its scale stays: unexpected
    t.remove("layers.2.attn.wkv.scale").unwrap(); // FP8 weight without its scale
    t.remove("layers.1.ffn.gate.tid2eid").unwrap(); // hash layer without its table
    let extra = t["layers.0.attn_norm.weight"].clone();
    t.insert("layers.0.attn.bogus".into(), extra);
    let d = write_single("missing", &t);
    let err = load_err(&d);
    for needle in [
        "model.safetensors",
        "missing: ",
        "layers.0.ffn.experts.2.w3.weight",
        "layers.2.attn.wkv.scale",
        "layers.1.ffn.gate.tid2eid",
        "unexpected: layers.0.attn.bogus, layers.0.ffn.experts.2.w3.scale",
    ] {
        assert!(err.contains(needle), "`{needle}` not in:\n{err}");
    }
    assert!(
        !err.contains("mtp."),
        "an incomplete MTP block is skipped, not unexpected:\n{err}"
    );
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn bad_scales_and_values_are_named() {
    let all = read_all(&fixture());
    let case = |name: &str, edit: &dyn Fn(&mut Raw), needles: &[&str]| {
        let mut t = all.clone();
        edit(&mut t);
        let d = write_single(name, &t);
        let err = load_err(&d);
        for n in needles {
            assert!(err.contains(n), "{name}: `{n}` not in:\n{err}");
        }
        std::fs::remove_dir_all(&d).ok();
    };
    // wq_b is [160, 64]: 2×1 blocks of 128×128. A [1, 1] scale is named with what it should be.
    case(
        "scale_shape",
        &|t| {
            let s = t.get_mut("layers.1.attn.wq_b.scale").unwrap();
            assert_eq!(s.1, [2, 1]);
            s.1 = vec![1, 1];
            s.2.truncate(1);
        },
        &[
            "scale `layers.1.attn.wq_b.scale`",
            "`layers.1.attn.wq_b.weight`",
            "[1, 1]",
            "expected [2, 1]",
            "128×128",
        ],
    );
    // FP4 scales are [out, in/32]: w2 of an expert is [96, 64] → [96, 2].
    case(
        "fp4_scale_shape",
        &|t| {
            let s = t.get_mut("layers.0.ffn.experts.1.w2.scale").unwrap();
            assert_eq!(s.1, [96, 2]);
            s.1 = vec![48, 4];
        },
        &[
            "layers.0.ffn.experts.1.w2.scale",
            "expected [96, 2]",
            "1×32",
        ],
    );
    // A packed FP4 weight of the wrong width.
    case(
        "fp4_shape",
        &|t| {
            let w = t.get_mut("layers.0.ffn.experts.1.w1.weight").unwrap();
            assert_eq!((w.0, w.1.clone()), (Dtype::I8, vec![64, 48]));
            w.1 = vec![32, 96];
        },
        &[
            "layers.0.ffn.experts.1.w1.weight",
            "[32, 96]",
            "expected [64, 48]",
        ],
    );
    // An FP8 NaN code (0x7f) and an E8M0 NaN scale (255).
    case(
        "nan",
        &|t| {
            let w = t.get_mut("layers.0.attn.wq_a.weight").unwrap();
            assert_eq!((w.0, w.1.clone()), (Dtype::F8_E4M3, vec![64, 96]));
            w.2[96 + 5] = 0x7f;
        },
        &["layers.0.attn.wq_a.weight", "NaN at [1, 5]", "0x7f"],
    );
    case(
        "nan_scale",
        &|t| t.get_mut("layers.1.attn.wq_b.scale").unwrap().2[1] = 255,
        &["layers.1.attn.wq_b.scale", "[1, 0]", "byte 255"],
    );
    // A dtype the loader does not read.
    case(
        "dtype",
        &|t| t.get_mut("layers.0.attn.wkv.weight").unwrap().0 = Dtype::F8_E5M2,
        &["layers.0.attn.wkv.weight", "F8_E5M2", "supported"],
    );
}
