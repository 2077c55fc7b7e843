//! The process-wide GEMM precision that [`matmul::gemm`](super::matmul::gemm) and the linear
//! layers built on it consult: `f32` (the default; gradient checks and every test that does
//! not set it) or `bf16` mixed precision (bf16 operands, f32 accumulation and output, see
//! [`bf16`](super::bf16)). Set once by a run (`train.precision`, `--precision`) before its
//! first step; everything else (norms, softmax, loss, master weights, optimizer state) stays
//! f32 whatever it says.
//!
//! What bf16 covers: every product through [`matmul::gemm`](super::matmul::gemm) and the
//! `linear_*` layers (projections, FFN, output head, MoE experts, and their backward), when
//! `m, n ≥ 16` (decode GEMVs stay f32), and the block products of the fused attention core
//! (`QKᵀ`, `PV` and their backward: [`attention_bf16`](super::attention_bf16)); its softmax
//! stays f32. Decoding attention (`attention::decode_rows`) stays f32.
//!
//! It is a process-wide setting, not a per-call argument, so that the model code needs no
//! change; a test that sets it must own its process (`tests/bf16_train.rs`).

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU8, Ordering};

/// Operand precision of the model's matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 operands and accumulation.
    #[default]
    F32,
    /// bf16 operands (rounded to nearest even), f32 accumulation and output.
    Bf16,
}

impl Precision {
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }
    pub fn name(&self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!("unknown precision `{s}` (expected f32 or bf16)")),
        }
    }
}

static GEMM_PRECISION: AtomicU8 = AtomicU8::new(0);

/// Set the precision of every later [`matmul::gemm`](super::matmul::gemm) in this process.
pub fn set_gemm_precision(p: Precision) {
    GEMM_PRECISION.store(p as u8, Ordering::Relaxed);
}

/// The precision set by [`set_gemm_precision`] (f32 until then).
pub fn gemm_precision() -> Precision {
    match GEMM_PRECISION.load(Ordering::Relaxed) {
        0 => Precision::F32,
        _ => Precision::Bf16,
    }
}
