//! Quantise a row-major f32 matrix into a GGUF block type, row by row in parallel:
//! `[rows, cols]` f32 → `rows · bytes(cols)` bytes of ggml type `ty` (ggml's
//! `ggml_quantize_chunk` without an importance matrix). The per-type algorithms are in
//! [`super::quant_b32`] (32-value blocks) and [`super::quant_kq`] (256-value k-quants);
//! `F32`, `F16` and `BF16` are plain conversions (round to nearest even).

use super::f16::{f32_to_bf16_bits, f32_to_f16_bits};
use super::{quant_b32 as b32, quant_kq as kq};
use rayon::prelude::*;

/// A quantiser of whole blocks: `x` (a multiple of the block size) appended to `out`.
type RowFn = fn(&[f32], &mut Vec<u8>);

fn f32_row(x: &[f32], out: &mut Vec<u8>) {
    out.extend(x.iter().flat_map(|v| v.to_le_bytes()));
}
fn f16_row(x: &[f32], out: &mut Vec<u8>) {
    out.extend(x.iter().flat_map(|&v| f32_to_f16_bits(v).to_le_bytes()));
}
fn bf16_row(x: &[f32], out: &mut Vec<u8>) {
    out.extend(x.iter().flat_map(|&v| f32_to_bf16_bits(v).to_le_bytes()));
}

/// The types this module writes: `(ggml type id, name, values per block, bytes per block,
/// quantiser)`.
const WRITERS: &[(u32, &str, usize, usize, RowFn)] = &[
    (0, "F32", 1, 4, f32_row),
    (1, "F16", 1, 2, f16_row),
    (30, "BF16", 1, 2, bf16_row),
    (2, "Q4_0", 32, 18, b32::quantize_q4_0),
    (3, "Q4_1", 32, 20, b32::quantize_q4_1),
    (6, "Q5_0", 32, 22, b32::quantize_q5_0),
    (7, "Q5_1", 32, 24, b32::quantize_q5_1),
    (8, "Q8_0", 32, 34, b32::quantize_q8_0),
    (10, "Q2_K", 256, 84, kq::quantize_q2_k),
    (11, "Q3_K", 256, 110, kq::quantize_q3_k),
    (12, "Q4_K", 256, 144, kq::quantize_q4_k),
    (13, "Q5_K", 256, 176, kq::quantize_q5_k),
    (14, "Q6_K", 256, 210, kq::quantize_q6_k),
];

/// Name, values per block and bytes per block of a type this module writes.
pub fn block_geometry(ty: u32) -> Option<(&'static str, usize, usize)> {
    WRITERS.iter().find(|w| w.0 == ty).map(|w| (w.1, w.2, w.3))
}

/// Names of the types this module writes (for error messages).
pub fn writable_types() -> Vec<&'static str> {
    WRITERS.iter().map(|w| w.1).collect()
}

/// Quantise `x` (`rows × cols`, row-major) to type `ty`. `None` when the type is not one this
/// module writes or `cols` is not a whole number of its blocks.
pub fn quantize_rows(ty: u32, x: &[f32], cols: usize) -> Option<Vec<u8>> {
    let &(_, _, be, bb, f) = WRITERS.iter().find(|w| w.0 == ty)?;
    if cols == 0 || !cols.is_multiple_of(be) || !x.len().is_multiple_of(cols) {
        return None;
    }
    let row_bytes = cols / be * bb;
    // Rows in chunks so that small rows still amortise the task overhead.
    let per_task = (16384 / cols).max(1);
    let parts: Vec<Vec<u8>> = x
        .par_chunks(cols * per_task)
        .map(|c| {
            let mut out = Vec::with_capacity(c.len() / cols * row_bytes);
            for row in c.chunks_exact(cols) {
                f(row, &mut out);
            }
            out
        })
        .collect();
    Some(parts.concat())
}
