//! One Engram layer (hash → gather → gate → short conv) against the standalone PyTorch float64
//! reference (`reference/engram.py`): same compressed ids, positions, table and weights in;
//! table rows exactly, output within 1e-5 relative error, and the gradients of the streams, of
//! every gate parameter and of the table (sparse rows scattered to dense) within 2e-5 out
//! (achieved: outputs ~1e-7, worst gradient ~7e-6).

use mnemo::engram::{EngramActs, EngramLayer, EngramTable, GateSpec, LayerHash, Memory};
use mnemo::io::safetensors::TensorFile;
use std::path::PathBuf;

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        d += (*x as f64 - *y as f64).powi(2);
        n += (*y as f64).powi(2);
    }
    d.sqrt() / n.sqrt().max(1e-30)
}

fn check(name: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("engram_{name}.safetensors"));
    let f = TensorFile::open(&path).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&f.metadata().unwrap()["fixture"]).unwrap();
    let hash: LayerHash = serde_json::from_value(meta["hash"].clone()).unwrap();
    hash.validate().unwrap();
    // The reference drew the multipliers with numpy exactly as the demo; so does mnemo.
    assert_eq!(
        mnemo::engram::hash::draw_multipliers(
            0,
            hash.layer_id,
            hash.max_ngram,
            hash.compressed_vocab
        ),
        hash.multipliers
    );
    let s = &meta["spec"];
    let u = |k: &str| s[k].as_u64().unwrap() as usize;
    let head_dim = u("head_dim");
    let spec = GateSpec {
        d: u("d"),
        d_mem: hash.n_heads() * head_dim,
        n_branch: u("n_branch"),
        kernel: u("kernel"),
        dilation: u("dilation"),
        eps_gate: f32::EPSILON,
        eps_conv: 1e-5,
    };
    let cids = f.u32("cids").unwrap();
    let pos = f.u32("pos").unwrap();
    let nt = cids.len();
    let nd = spec.n_branch * spec.d;

    // Hash: the rows of the reference exactly (numpy int64 arithmetic, the demo's multipliers).
    let rows = hash.rows(&cids, &pos);
    assert_eq!(rows, f.u32("rows").unwrap(), "{name}: table rows");

    let r = hash.total_rows() as usize;
    let table = f.f32("table", Some(&[r, head_dim])).unwrap();
    let mut params = vec![0.0f32; spec.n_params()];
    for (tname, shape, off) in spec.tensors() {
        let v = f.f32(&format!("param.{tname}"), Some(&shape)).unwrap();
        params[off..off + v.len()].copy_from_slice(&v);
    }
    let layer = EngramLayer {
        hash,
        table: EngramTable::from_vec(r, head_dim, table).unwrap(),
        gate: spec,
        params,
    };
    let h = f.f32("hidden", Some(&[nt, spec.n_branch, spec.d])).unwrap();
    let mem: Memory = layer.lookup(&cids, &pos).unwrap();
    let mut y = vec![0.0; nt * nd];
    let mut acts = EngramActs::default();
    layer.forward(mem, &h, &pos, &mut y, &mut acts);
    let ey = rel_err(&y, &f.f32("y", None).unwrap());
    assert!(ey < 1e-5, "{name}: output relative error {ey:.2e}");

    let dy = f.f32("dy", None).unwrap();
    let mut dh = vec![0.0; nt * nd];
    let mut dp = vec![0.0; spec.n_params()];
    let tg = layer.backward(&acts, &dy, &mut dh, &mut dp);
    let mut worst = (ey, "y".to_string());
    let mut cmp = |what: &str, got: &[f32], want: &[f32]| {
        let e = rel_err(got, want);
        assert!(
            e < 1e-5,
            "{name}: gradient of {what} relative error {e:.2e}"
        );
        if e > worst.0 {
            worst = (e, what.to_string());
        }
    };
    cmp("hidden", &dh, &f.f32("grad.hidden", None).unwrap());
    for (tname, shape, off) in spec.tensors() {
        let len: usize = shape.iter().product();
        let want = f.f32(&format!("grad.{tname}"), Some(&shape)).unwrap();
        cmp(&tname, &dp[off..off + len], &want);
    }
    let mut dense = vec![0.0; r * head_dim];
    tg.add_to_dense(&mut dense);
    let want = f.f32("grad.table", Some(&[r, head_dim])).unwrap();
    cmp("table", &dense, &want);
    // The sparse gradient holds exactly the rows that have a gradient.
    let used: Vec<u32> = (0..r as u32)
        .filter(|&i| {
            want[i as usize * head_dim..(i as usize + 1) * head_dim]
                .iter()
                .any(|&x| x != 0.0)
        })
        .collect();
    assert_eq!(tg.rows, used, "{name}: touched rows");
    eprintln!(
        "{name}: output {ey:.1e}; worst {:.1e} ({}); {} of {r} rows touched",
        worst.0,
        worst.1,
        tg.rows.len()
    );
}

#[test]
fn engram_mhc_with_conv_matches_pytorch() {
    check("mhc_conv");
}

#[test]
fn engram_single_stream_without_conv_matches_pytorch() {
    check("single_noconv");
}
