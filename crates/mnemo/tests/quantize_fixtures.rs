//! mnemo's GGUF quantisers against ggml's own: rows of f32 (Gaussian at several scales,
//! heavy-tailed, offset, all-zero and constant blocks, f16-subnormal scales, large values,
//! values on a rounding grid) quantised by `ggml_quantize_chunk` of llama.cpp's
//! libggml-base (`reference/quantize_fixture.py`); mnemo's bytes must be identical, type by
//! type. Then a round trip through mnemo's dequantiser stays within each type's error bound.

use mnemo::io::safetensors::TensorFile;
use mnemo::kernels::quantize::{block_geometry, quantize_rows};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn fixture() -> TensorFile {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quantize/rows.safetensors");
    TensorFile::open(&p).unwrap()
}

#[test]
fn quantized_bytes_equal_ggml() {
    let f = fixture();
    let types: BTreeMap<String, u32> =
        serde_json::from_str(&f.metadata().unwrap()["types"]).unwrap();
    let x = f.f32("x", None).unwrap();
    let cols = 512;
    assert!(types.len() >= 12);
    for (name, &ty) in &types {
        let want = f.raw(&format!("{name}.bytes")).unwrap().data;
        let got = quantize_rows(ty, &x, cols).unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        let (_, be, bb) = block_geometry(ty).unwrap();
        if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
            let row_bytes = cols / be * bb;
            panic!(
                "{name}: first differing byte {i} (row {}, block {}, byte {} of the block): \
                 mnemo {:#04x}, ggml {:#04x}",
                i / row_bytes,
                i % row_bytes / bb,
                i % bb,
                got[i],
                want[i]
            );
        }
    }
}

/// Round trip: quantise, dequantise with mnemo's GGUF reader, and bound the error by the
/// type's step: per row, RMS error ≤ `k · RMS(x)` with `k` from the type's bits.
#[test]
fn round_trip_error_within_type_bound() {
    let f = fixture();
    let x = f.f32("x", None).unwrap();
    let cols = 512;
    // (type, name, bound on RMS error relative to the row's RMS, for Gaussian-like rows)
    let bounds = [
        (1u32, "F16", 1e-3),
        (30, "BF16", 5e-3),
        (8, "Q8_0", 0.01),
        (6, "Q5_0", 0.05),
        (7, "Q5_1", 0.05),
        (2, "Q4_0", 0.1),
        (3, "Q4_1", 0.1),
        (14, "Q6_K", 0.03),
        (13, "Q5_K", 0.05),
        (12, "Q4_K", 0.1),
        (11, "Q3_K", 0.2),
        (10, "Q2_K", 0.4),
    ];
    for (ty, name, k) in bounds {
        let q = quantize_rows(ty, &x, cols).unwrap();
        let mut back = vec![0.0f32; x.len()];
        mnemo::gguf::dequantize(ty, &q, &mut back).unwrap();
        // Rows 0..3 are Gaussian at three scales, row 4 offset Gaussian.
        for r in [0usize, 1, 2, 4] {
            let xs = &x[r * cols..(r + 1) * cols];
            let bs = &back[r * cols..(r + 1) * cols];
            let rms = (xs.iter().map(|v| v * v).sum::<f32>() / cols as f32).sqrt();
            let err = (xs
                .iter()
                .zip(bs)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                / cols as f32)
                .sqrt();
            assert!(
                err <= k * rms,
                "{name} row {r}: rms error {err} > {k} × {rms}"
            );
            // Not trivially exact either (except the float types on f16-representable data).
            if ty > 1 && ty != 30 {
                assert!(err > 0.0, "{name} row {r}: exact?");
            }
        }
    }
}

#[test]
fn rejects_rows_that_are_not_whole_blocks() {
    let x = vec![0.5f32; 2 * 96];
    assert!(
        quantize_rows(12, &x, 96).is_none(),
        "Q4_K needs rows of 256k"
    );
    assert!(quantize_rows(8, &x, 96).is_some(), "Q8_0 takes rows of 32k");
    assert!(quantize_rows(99, &x, 96).is_none(), "unknown type");
}
