//! `mnemo logits`: every position's logits as a safetensors tensor, from the full forward and
//! from the cached decoding path, and its errors on bad input.

mod common;

use mnemo::safetensors_io::TensorFile;
use std::path::{Path, PathBuf};
use std::process::Command;

fn mnemo(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mnemo"))
        .args(args)
        .env("MNEMO_CACHE", common::cache())
        .output()
        .expect("run mnemo");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tmpdir(name: &str) -> PathBuf {
    common::tmpdir(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn assert_fails(args: &[&str], needles: &[&str]) {
    let (code, _, err) = mnemo(args);
    assert_ne!(code, 0, "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: expected `{n}` in:\n{err}");
    }
}

/// Run `mnemo logits` and read back `logits` (checking its shape `[t, ·]`): (values, V).
fn logits(model: &Path, ids: &Path, out: &Path, extra: &[&str]) -> (Vec<f32>, usize) {
    let mut args = vec!["logits", s(model), "--ids-file", s(ids), "--out", s(out)];
    args.extend_from_slice(extra);
    let (code, _, err) = mnemo(&args);
    assert_eq!(code, 0, "{args:?}:\n{err}");
    assert!(err.contains("logits: T = "), "no summary line:\n{err}");
    let f = TensorFile::open(out).unwrap();
    assert_eq!(f.names(), vec!["logits".to_string()]);
    let l = f.f32("logits", None).unwrap();
    let t: usize = err
        .split("T = ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .expect("T in the summary");
    assert_eq!(l.len() % t, 0);
    let v = l.len() / t;
    (l, v)
}

/// Largest |a − b| and largest |b|.
fn max_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    let top = b.iter().fold(0.0f32, |m, y| m.max(y.abs()));
    (d, top)
}

fn v4_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../mnemo/tests/fixtures/deepseek_v4/hc2_hca16_csa_5heads")
}

#[test]
fn deepseek_v4_directory_matches_transformers() {
    let dir = v4_fixture();
    let exp = TensorFile::open(&dir.join("expected.safetensors")).unwrap();
    let ids = exp.u32("input_ids").unwrap();
    let want = exp.f32("logits", None).unwrap();
    let d = tmpdir("v4");
    let ids_file = d.join("ids.json");
    std::fs::write(
        &ids_file,
        serde_json::json!({ "input_ids": ids }).to_string(),
    )
    .unwrap();
    let out = d.join("out.safetensors");
    let (got, v) = logits(&dir, &ids_file, &out, &[]);
    assert_eq!(v, 256);
    assert_eq!(got.len(), ids.len() * v);
    let (diff, top) = max_diff(&got, &want);
    eprintln!("V4 fixture: max |Δlogit| {diff:.2e} (largest logit {top:.2})");
    assert!(
        diff <= 1e-4 * top,
        "max |Δlogit| {diff} (largest logit {top})"
    );
    // No temporary file is left beside the output.
    let left: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    // Cached decoding: the same logits.
    let (code, _, err) = mnemo(&[
        "logits",
        s(&dir),
        "--ids-file",
        s(&ids_file),
        "--out",
        s(&d.join("dec.safetensors")),
        "--decode-from",
        "5",
    ]);
    assert_eq!(code, 0, "{err}");
    let dec = TensorFile::open(&d.join("dec.safetensors"))
        .unwrap()
        .f32("logits", None)
        .unwrap();
    let (diff, top) = max_diff(&dec, &want);
    eprintln!("V4 fixture, --decode-from 5: max |Δlogit| {diff:.2e}");
    assert!(diff <= 1e-4 * top, "decode: {diff} (largest {top})");
}

/// The official-layout fixture (FP8/FP4, two shards, MTP tensors, no tokenizer files).
#[test]
fn deepseek_v4_official_directory_matches_transformers() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../mnemo/tests/fixtures/deepseek_v4_official");
    assert!(!dir.join("tokenizer.json").exists());
    let exp = TensorFile::open(&dir.join("expected.safetensors")).unwrap();
    let ids = exp.u32("input_ids").unwrap();
    let want = exp.f32("logits", None).unwrap();
    let d = tmpdir("v4off");
    let ids_file = d.join("ids.json");
    std::fs::write(&ids_file, serde_json::to_string(&ids).unwrap()).unwrap();
    let out = d.join("out.safetensors");
    let args = [
        "logits",
        s(&dir),
        "--ids-file",
        s(&ids_file),
        "--out",
        s(&out),
    ];
    let (code, _, err) = mnemo(&args);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("DeepSeek-V4 (official directory)"), "{err}");
    let got = TensorFile::open(&out).unwrap().f32("logits", None).unwrap();
    let (diff, top) = max_diff(&got, &want);
    eprintln!("V4 official fixture: max |Δlogit| {diff:.2e} (largest logit {top:.2})");
    assert!(
        diff <= 1e-4 * top,
        "max |Δlogit| {diff} (largest logit {top})"
    );
    // A command that needs text says the tokenizer is missing.
    assert_fails(
        &["generate", s(&dir), "--prompt", "hi"],
        &["tokenizer.json", "mnemo logits"],
    );
}

#[test]
fn decoding_path_matches_the_full_forward_and_bad_input_is_named() {
    let d = tmpdir("run");
    let data = d.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..4 {
        let body: String = (0..30)
            .map(|j| format!("fn h_{i}_{j}(x: u8) -> u8 {{ x + {j} }}\n"))
            .collect();
        std::fs::write(data.join(format!("m{i}.rs")), body).unwrap();
    }
    let run = d.join("run");
    let (code, _, err) = mnemo(&[
        "--threads",
        "1",
        "train",
        "--data",
        s(&data),
        "--out",
        s(&run),
        "--steps",
        "2",
        "--set",
        "vocab_size=300",
        "--set",
        "d_model=32",
        "--set",
        "n_layers=2",
        "--set",
        "head_dim=8",
        "--set",
        "rope_dim=8",
        "--set",
        "ffn_hidden=32",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--quiet",
    ]);
    assert_eq!(code, 0, "{err}");
    let ids: Vec<u32> = (0..11).map(|i| (i * 37 + 5) % 300).collect();
    let ids_file = d.join("ids.json");
    std::fs::write(&ids_file, serde_json::to_string(&ids).unwrap()).unwrap();
    let (full, v) = logits(&run, &ids_file, &d.join("full.safetensors"), &[]);
    assert_eq!(v, 300);
    assert_eq!(full.len(), ids.len() * v);
    for n in ["3", "1", "11"] {
        let out = d.join(format!("dec{n}.safetensors"));
        let (dec, _) = logits(&run, &ids_file, &out, &["--decode-from", n]);
        let (diff, top) = max_diff(&dec, &full);
        eprintln!("--decode-from {n}: max |Δlogit| {diff:.2e} (largest logit {top:.2})");
        assert!(
            diff <= 1e-4 * top.max(1.0),
            "--decode-from {n}: max |Δlogit| {diff} (largest logit {top})"
        );
    }

    // The checkpoint without its tokenizer: `logits` needs none (same logits), `generate` does.
    let notok = d.join("notok");
    std::fs::create_dir_all(&notok).unwrap();
    for e in std::fs::read_dir(run.join("checkpoint")).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != "tokenizer.json" {
            std::fs::copy(&p, notok.join(p.file_name().unwrap())).unwrap();
        }
    }
    let (bare, _) = logits(&notok, &ids_file, &d.join("notok.safetensors"), &[]);
    assert_eq!(bare, full);
    assert_fails(
        &["generate", s(&notok), "--prompt", "fn"],
        &["notok", "no tokenizer.json", "mnemo logits"],
    );

    // Bad input: each error names the file, flag or value.
    let out = d.join("bad.safetensors");
    std::fs::write(&out, "old").unwrap();
    let mut bad_ids = ids.clone();
    bad_ids[4] = 300;
    let bad = d.join("bad_ids.json");
    std::fs::write(&bad, serde_json::to_string(&bad_ids).unwrap()).unwrap();
    let logits_args = |ids: &Path, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["logits", s(&run), "--ids-file", s(ids), "--out", s(&out)]
            .iter()
            .map(|x| x.to_string())
            .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let fails = |ids: &Path, extra: &[&str], needles: &[&str]| {
        let a = logits_args(ids, extra);
        let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
        assert_fails(&a, needles);
        // The old output is untouched, and no temporary file is left.
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "old");
        assert!(std::fs::read_dir(&d).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp")));
    };
    fails(
        &bad,
        &[],
        &["id 300", "position 4", "vocab_size is 300", "bad_ids.json"],
    );
    fails(
        &ids_file,
        &["--decode-from", "0"],
        &["--decode-from 0", "11"],
    );
    fails(
        &ids_file,
        &["--decode-from", "12"],
        &["--decode-from 12", "11"],
    );
    let empty = d.join("empty.json");
    std::fs::write(&empty, "{\"input_ids\": []}").unwrap();
    fails(&empty, &[], &["empty.json", "no token ids"]);
    let neg = d.join("neg.json");
    std::fs::write(&neg, "[1, -2, 3]").unwrap();
    fails(&neg, &[], &["neg.json", "element 1", "-2"]);
    let junk = d.join("junk.json");
    std::fs::write(&junk, "[1, 2,").unwrap();
    fails(&junk, &[], &["junk.json", "not valid JSON"]);
    fails(&d.join("missing.json"), &[], &["missing.json"]);
    let long = d.join("long.json");
    std::fs::write(&long, serde_json::to_string(&vec![1u32; 5000]).unwrap()).unwrap();
    fails(&long, &[], &["long.json", "5000 ids", "max_seq_len"]);
    assert_fails(
        &[
            "logits",
            s(&d.join("nonexistent")),
            "--ids-file",
            s(&ids_file),
            "--out",
            s(&out),
        ],
        &["nonexistent"],
    );
    assert_fails(
        &[
            "logits",
            s(&run),
            "--ids-file",
            s(&ids_file),
            "--out",
            s(&d.join("no/such/dir/out.safetensors")),
        ],
        &["--out", "no/such/dir/out.safetensors"],
    );
    let (code, help, _) = mnemo(&["logits", "--help"]);
    assert_eq!(code, 0);
    assert!(
        help.contains("--decode-from")
            && help.contains("[T, V]")
            && help.contains("input_ids")
            && help.contains("decoded one token at a time")
            && help.contains("DeepSeek-V4"),
        "{help}"
    );
}

/// `mnemo quantize` then `mnemo logits --keep-packed`: the quantised directory decodes from
/// its packed weights like the dequantised full forward; the errors of both commands.
#[test]
fn quantize_then_keep_packed_logits() {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../mnemo/tests/fixtures/deepseek_v4_quantized");
    let d = tmpdir("quantize-cli");
    let q = d.join("fp8");
    let (code, _, err) = mnemo(&["quantize", s(&fixture), s(&q), "--type", "fp8"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("official DeepSeek-V4 layout"), "{err}");
    let ids = d.join("ids.json");
    std::fs::write(&ids, "[1, 5, 9, 2, 33]").unwrap();
    let (full, v) = logits(&q, &ids, &d.join("a.safetensors"), &[]);
    let (packed, v2) = logits(
        &q,
        &ids,
        &d.join("b.safetensors"),
        &["--decode-from", "1", "--keep-packed"],
    );
    assert_eq!(v, v2);
    let top = full.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let diff = full
        .iter()
        .zip(&packed)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 1e-5 * top.max(1.0), "{diff}");
    // --keep-packed needs --decode-from, and an official directory.
    let out = d.join("c.safetensors");
    assert_fails(
        &[
            "logits",
            s(&q),
            "--ids-file",
            s(&ids),
            "--out",
            s(&out),
            "--keep-packed",
        ],
        &["--decode-from"],
    );
    // A transformers-layout V4 directory has nothing packed to keep.
    let hf = fixture.join("../deepseek_v4/hc4_topk_all_window_gt_T");
    assert_fails(
        &[
            "logits",
            s(&hf),
            "--ids-file",
            s(&ids),
            "--out",
            s(&out),
            "--decode-from",
            "1",
            "--keep-packed",
        ],
        &["not an official DeepSeek-V4 directory"],
    );
    // quantize: OUT_DIR = IN_DIR.
    assert_fails(
        &["quantize", s(&q), s(&q), "--type", "fp8+fp4"],
        &["OUT_DIR is IN_DIR"],
    );
    std::fs::remove_dir_all(&d).ok();
}

/// `--numerics official`: DeepSeek's inference arithmetic (tests/deepseek_v4_numerics.rs has
/// the tolerance): the oracle's logits from the full forward and the decoding path; a model
/// whose widths are not whole blocks is refused with the widths named.
#[test]
fn official_numerics_logits_match_the_oracle() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../mnemo/tests/fixtures/deepseek_v4_numerics/official_csa_hca");
    let exp = TensorFile::open(&dir.join("expected.safetensors")).unwrap();
    let ids = exp.u32("input_ids").unwrap();
    let want = exp.f32("logits", None).unwrap();
    let d = tmpdir("v4num");
    let ids_file = d.join("ids.json");
    std::fs::write(&ids_file, serde_json::to_string(&ids).unwrap()).unwrap();
    let out = d.join("out.safetensors");
    for extra in [
        &["--numerics", "official"][..],
        &["--numerics", "official", "--decode-from", "100"],
    ] {
        let (got, _) = logits(&dir, &ids_file, &out, extra);
        let (diff, top) = max_diff(&got, &want);
        eprintln!("{extra:?}: max |Δlogit| {diff:.2e} (largest logit {top:.2})");
        assert!(diff <= 1e-3 * top, "{extra:?}: {diff} (largest {top})");
    }
    // The default is transformers' arithmetic: far from the official numbers.
    let (got, _) = logits(&dir, &ids_file, &out, &[]);
    let (diff, top) = max_diff(&got, &want);
    assert!(diff > 1e-2 * top, "exact mode vs official: {diff}");
    assert_fails(
        &[
            "logits",
            s(&v4_fixture()),
            "--ids-file",
            s(&ids_file),
            "--out",
            s(&out),
            "--numerics",
            "official",
        ],
        &[
            "--numerics official",
            "hidden_size = 32 (a multiple of 128)",
        ],
    );
}
