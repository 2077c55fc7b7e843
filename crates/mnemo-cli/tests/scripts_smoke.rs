//! The scripts behind the numbers in the docs, in their cheap mode: every script in `scripts/`
//! that needs no download and no Python package runs here with `MNEMO_SMOKE=1`
//! (`scripts/smoke-env.sh`: seconds-long sizes, outputs in this test's scratch directory, never
//! in `results/`), with this build's `mnemo` (`MNEMO_BIN`, so the scripts do not call cargo).
//! Each test checks the exit status and that the files the docs quote appear, parse and hold
//! plausible numbers. The scripts need `bash` and `python3` (standard library only).
//! `docs/scripts.md` lists every script, what it needs and why the others do not run here.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Run `scripts/NAME` with `MNEMO_SMOKE=1`; the directory it wrote its outputs to.
fn smoke(name: &str) -> PathBuf {
    let dir = common::tmpdir(name);
    let t = Instant::now();
    let out = Command::new("bash")
        .arg(repo().join("scripts").join(name))
        .current_dir(repo())
        .env("MNEMO_SMOKE", "1")
        .env("MNEMO_SMOKE_DIR", &dir)
        .env("MNEMO_BIN", env!("CARGO_BIN_EXE_mnemo"))
        .env_remove("MNEMO_CACHE")
        .env_remove("PYTHON")
        .output()
        .unwrap_or_else(|e| panic!("cannot run bash scripts/{name}: {e}"));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success(),
        "MNEMO_SMOKE=1 scripts/{name} failed ({}); it needs bash and python3 (standard \
         library only)\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    eprintln!("scripts/{name}: {:.1} s", t.elapsed().as_secs_f64());
    dir
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn json(p: &Path) -> Value {
    serde_json::from_str(&read(p)).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn jsonl(p: &Path) -> Vec<Value> {
    let rows: Vec<Value> = read(p)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", p.display())))
        .collect();
    assert!(!rows.is_empty(), "{} is empty", p.display());
    rows
}

/// `v[key]`, a finite positive number.
fn pos(v: &Value, key: &str) -> f64 {
    let x = v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number `{key}` in {v}"));
    assert!(x.is_finite() && x > 0.0, "`{key}` = {x} in {v}");
    x
}

/// A validation loss: finite, and near the loss of a 4096-token vocabulary at random (ln 4096
/// = 8.3) after two steps.
fn loss(x: &Value) -> f64 {
    let l = x.as_f64().unwrap_or_else(|| panic!("no loss: {x}"));
    assert!(l.is_finite() && l > 1.0 && l < 20.0, "loss {l}");
    l
}

#[test]
fn every_script_is_in_the_inventory() {
    let doc = read(&repo().join("docs/scripts.md"));
    let mut missing = vec![];
    for e in std::fs::read_dir(repo().join("scripts")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if (name.ends_with(".sh") || name.ends_with(".py")) && !doc.contains(&format!("`{name}`")) {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "scripts not in docs/scripts.md: {missing:?}"
    );
}

#[test]
fn bench_mhc() {
    let d = smoke("bench-mhc.sh");
    let r = json(&d.join("bench-mhc/tiny-T32.json"));
    assert_eq!(r["hc_mult"], 4);
    for k in ["plain", "mhc", "hc"] {
        pos(&r, &format!("{k}_step_ms_median"));
        pos(&r, &format!("{k}_step_cpu_ms_median"));
    }
    assert!(
        r["mhc_overhead_cpu"].is_number() && r["hc_overhead_wall"].is_number(),
        "{r}"
    );
}

#[test]
fn bench_moe() {
    let d = smoke("bench-moe.sh");
    let r = json(&d.join("bench-moe/tiny-moe.json"));
    pos(&r, "dense_ffn_hidden");
    pos(&r, "moe_over_dense");
    assert!(r["moe_params"].as_f64() > r["dense_params"].as_f64(), "{r}");
    for v in ["moe", "dense"] {
        pos(&r["phase_ms"][v], "forward");
        // `backward` is (forward + backward) − forward, two separately timed runs: at one
        // smoke step on a busy machine the difference can be negative; only its presence is
        // checked (timing belongs in benchmarks, not tests).
        let b = r["phase_ms"][v]["backward"].as_f64();
        assert!(b.is_some_and(f64::is_finite), "{r}");
    }
}

#[test]
fn engram_overhead() {
    let d = smoke("engram-overhead.sh");
    let rows = json(&d.join("engram-overhead/steps.json"));
    let rows = rows.as_array().expect("steps.json: an array");
    assert_eq!(rows.len(), 3, "{rows:?}");
    for r in rows {
        pos(r, "step_ms_median");
        assert!(r["label"].is_string(), "{r}");
    }
    assert!(read(&d.join("engram-overhead/summary.txt")).contains("phases (ms)"));
}

#[test]
fn engram_offload() {
    let d = smoke("engram-offload.sh");
    let r = json(&d.join("engram-offload/offload-0.01GB.json"));
    pos(&r, "table_bytes");
    pos(&r, "ram_tokens_per_s_median");
    pos(&r, "mapped_tokens_per_s_median");
    assert_eq!(r["ram_ms_all"].as_array().map(Vec::len), Some(2), "{r}");
    assert!(read(&d.join("engram-offload/summary.txt")).contains("GB table"));
    // The table file is deleted at the end.
    assert!(!d.join("engram-offload-table").exists());
}

#[test]
fn v4_long_context() {
    let d = smoke("v4-long-context.sh");
    for p in ["v4-small", "small-dsa"] {
        let r = json(&d.join(format!("v4-long/{p}.json")));
        let rows = r["rows"]
            .as_array()
            .unwrap_or_else(|| panic!("{p}: no rows"));
        let ctx: Vec<_> = rows.iter().map(|r| r["context"].as_u64()).collect();
        assert_eq!(ctx, [Some(128), Some(256)], "{p}");
        for row in rows {
            pos(row, "kv_bytes");
            pos(row, "sparse_decode_ms");
        }
    }
}

#[test]
fn dsa_long_context() {
    let d = smoke("dsa-long-context.sh");
    let r = json(&d.join("dsa-long/long-context.json"));
    let rows = r["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2, "{r}");
    for row in rows {
        for k in [
            "sparse_prefill_s",
            "dense_prefill_s",
            "sparse_decode_ms",
            "dense_decode_ms",
        ] {
            pos(row, k);
        }
    }
    let m = json(&d.join("dsa-long/million.json"));
    assert_eq!(m["rows"][0]["context"], 1024, "{m}");
    pos(&m["rows"][0], "sparse_decode_ms");
}

#[test]
fn dsa_train_step() {
    let d = smoke("dsa_train_step.sh");
    let rows = jsonl(&d.join("dsa/train_step.jsonl"));
    let presets: Vec<_> = rows.iter().map(|r| r["preset"].as_str().unwrap()).collect();
    assert_eq!(presets, ["tiny", "tiny-dsa"]);
    for r in &rows {
        pos(r, "step_ms");
        pos(r, "cpu_ms");
    }
}

#[test]
fn mhc_compare() {
    let d = smoke("mhc-compare.sh");
    let s = json(&d.join("mhc/tiny/summary.json"));
    for k in ["plain", "hc", "mhc"] {
        let r = &s["runs"][k];
        assert_eq!(r["exit_code"], 0, "{k}: {r}");
        assert_eq!(r["steps_logged"], 2, "{k}: {r}");
        loss(&r["final_val_loss"]);
        assert!(d.join(format!("mhc/tiny/{k}/metrics.jsonl")).is_file());
    }
    assert!(s["runs"]["mhc"]["max_amax_fwd"].is_number(), "{s}");
}

#[test]
fn v4_quality() {
    let d = smoke("v4-quality.sh");
    let s = json(&d.join("v4-quality/summary.json"));
    for p in ["tiny-dsa", "tiny-moe", "v4-tiny"] {
        let r = &s["runs"][p];
        assert_eq!(r["rc"], 0, "{p}: {r}");
        loss(&r["final_val_loss"]);
        pos(r, "tokens");
    }
}

/// A NIAH result of `mnemo eval --task niah --json`: one cell per (context, depth), each with
/// its accuracy in [0, 1].
fn niah(p: &Path, contexts: &[u64]) {
    let r = json(p);
    let cells = r["cells"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no cells", p.display()));
    assert_eq!(cells.len(), contexts.len() * 5, "{}", p.display());
    let mut seen: Vec<u64> = cells
        .iter()
        .map(|c| c["context"].as_u64().unwrap())
        .collect();
    seen.dedup();
    assert_eq!(seen, contexts, "{}", p.display());
    for c in cells {
        let a = c["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a), "{c}");
    }
}

#[test]
fn niah_yarn() {
    let d = smoke("niah.sh");
    niah(&d.join("niah/base.json"), &[256]);
    for f in [
        "base_plain_extrapolation",
        "base_zero_shot_yarn",
        "yarn4_continued",
    ] {
        niah(&d.join(format!("niah/{f}.json")), &[256, 512, 1024]);
    }
}

#[test]
fn niah_answers() {
    let d = smoke("niah-answers.sh");
    niah(&d.join("niah-answers/base.json"), &[256]);
    for f in [
        "base_plain_extrapolation",
        "base_zero_shot_yarn",
        "yarn4_continued",
    ] {
        niah(&d.join(format!("niah-answers/{f}.json")), &[256, 512, 1024]);
    }
    niah(
        &d.join("niah-answers/base_zero_shot_yarn8_2048.json"),
        &[2048],
    );
}

#[test]
fn dsa_quality() {
    let d = smoke("dsa-quality.sh");
    let dense = jsonl(&d.join("dsa-quality/dense_metrics.jsonl"));
    let sparse = jsonl(&d.join("dsa-quality/sparse_metrics.jsonl"));
    let last_val = |rows: &[Value]| {
        rows.iter()
            .rev()
            .find(|r| r["val_loss"].is_number())
            .cloned()
    };
    let (dv, sv) = (last_val(&dense).unwrap(), last_val(&sparse).unwrap());
    assert_eq!(
        (&dv["step"], &sv["step"]),
        (&Value::from(2), &Value::from(2))
    );
    loss(&dv["val_loss"]);
    loss(&sv["val_loss"]);
    let recall = sv["val_dsa_recall"].as_f64().expect("val_dsa_recall");
    assert!((0.0..=1.0).contains(&recall), "{sv}");
    assert!(
        sparse.iter().any(|r| r["dsa_stage"] == "sparse"),
        "no sparse step logged"
    );
}

#[test]
fn dsa_stages() {
    let d = smoke("dsa_stages.sh");
    let rows = jsonl(&d.join("dsa/tiny_dsa_stages_metrics.jsonl"));
    let stages: Vec<_> = rows
        .iter()
        .filter_map(|r| r["dsa_stage"].as_str())
        .collect();
    assert_eq!(stages, ["dense", "dense", "warmup", "sparse"]);
    let last = rows
        .iter()
        .rev()
        .find(|r| r["val_loss"].is_number())
        .unwrap();
    assert_eq!(last["step"], 4, "{last}");
    loss(&last["val_loss"]);
}

#[test]
fn engram_rho_sweep() {
    let d = smoke("engram-rho-sweep.sh");
    let rows = json(&d.join("engram-rho/rho.json"));
    let rows = rows.as_array().expect("rho.json: an array");
    let rhos: Vec<_> = rows.iter().map(|r| r["rho"].as_f64().unwrap()).collect();
    assert_eq!(rhos, [1.0, 0.6]);
    for r in rows {
        loss(&r["val_loss"]);
        pos(r, "total_params");
        assert_eq!(r["steps"], 2, "{r}");
    }
    // ρ = 1 is all experts; ρ = 0.6 pays for Engram table rows with the freed experts.
    assert_eq!(rows[0]["engram_tables"], 0.0);
    pos(&rows[1], "engram_tables");
    assert!(d.join("engram-rho/configs/rho-0.6.json").is_file());
}

/// Also the regression test of full fine-tuning from an Engram run (`train --init` without
/// `--train-only`), whose tables are loaded memory-mapped read-only.
#[test]
fn engram_finetune() {
    let d = smoke("engram-finetune.sh");
    let r = json(&d.join("engram-finetune/finetune.json"));
    loss(&r["val_loss_new_before"]);
    for k in ["memory_only", "memory_and_gates", "full"] {
        loss(&r[k]["val_loss"]);
        pos(&r[k], "step_ms_median");
    }
    pos(&r["memory_only"], "delta_bytes");
    pos(&r["full"], "changed_bytes");
    assert_eq!(r["delta_only_equals_finetuned"], true, "{r}");
    assert!(r["ablation_on_corpus"]["delta"].is_number(), "{r}");
}
