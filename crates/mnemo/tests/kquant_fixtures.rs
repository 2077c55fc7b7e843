//! GGUF block dequantisation against the `gguf` Python package (0.19.0), whose numpy code
//! mirrors ggml's `dequantize_row_*`: random valid blocks of every type that
//! `kernels::kquant` reads, written by `reference/kquant_fixture.py`; mnemo's values must be
//! bitwise equal (same f32 operations in the same order).

use mnemo::io::safetensors::{Dtype, TensorFile};
use mnemo::kernels::kquant;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[test]
fn kquant_blocks_match_gguf_py_bitwise() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kquant/blocks.safetensors");
    let f = TensorFile::open(&path).unwrap();
    let types: BTreeMap<String, u32> =
        serde_json::from_str(&f.metadata().unwrap()["types"]).unwrap();
    // Every format mnemo dequantises is covered, under ggml's type id.
    for fmt in kquant::FORMATS {
        assert_eq!(types.get(fmt.name), Some(&fmt.ggml_type), "{}", fmt.name);
    }
    for (name, &ty) in &types {
        let raw = f.raw(&format!("{name}.bytes")).unwrap();
        assert_eq!(raw.dtype, Dtype::U8);
        let want = f.f32(&format!("{name}.expected"), None).unwrap();
        let fmt = kquant::format(ty).unwrap();
        assert_eq!(
            raw.data.len() / fmt.block_bytes * fmt.block_elems,
            want.len()
        );
        let mut got = vec![f32::NAN; want.len()];
        mnemo::gguf::dequantize(ty, raw.data, &mut got).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{name} value {i}: {g} vs {w}");
        }
    }
}
