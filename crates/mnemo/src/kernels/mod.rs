//! Compute kernels over contiguous f32 buffers. They know nothing about models: each takes
//! slices and shapes, and every kernel with a backward pass has a finite-difference check.

pub mod act_quant;
pub mod adamw;
pub mod attention;
pub mod attention_bf16;
pub mod attn_pack_bf16;
pub mod attn_rows;
pub mod attn_tile;
pub mod attn_tile_bf16;
pub mod bf16;
pub mod cross_entropy;
pub mod embedding;
pub mod f16;
pub mod fp8;
pub mod fp8dot;
pub mod fp_round;
pub mod gemm_log;
#[cfg(test)]
pub mod gradcheck;
pub mod hadamard;
pub mod indexer;
pub mod kdot;
pub mod kdot_dec;
pub mod kdot_q2k;
pub mod kdot_q3k;
pub mod kdot_q5k;
mod kdot_rows;
pub mod kquant;
pub mod matmul;
pub mod matmul_rows;
pub mod precision;
pub mod q8_act;
pub mod qbytes;
pub mod qdot32;
mod qdot_dec;
pub mod qparts;
pub mod qtype;
pub mod quant;
pub mod quant_b32;
pub mod quant_fit;
pub mod quant_kq;
pub mod quantize;
pub mod rmsnorm;
pub mod rope;
pub mod sparse_attention;
pub mod swiglu;
pub mod torch_topk;
pub mod vecops;
pub mod vexp;

/// A raw pointer that parallel tasks may share, for kernels whose tasks write provably
/// disjoint parts of one buffer (each use states why its writes are disjoint).
pub(crate) struct SendPtr(pub(crate) *mut f32);
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}
impl SendPtr {
    pub(crate) fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Whether this CPU runs AVX2 and FMA (detected once), for kernels with an AVX2 path.
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static F: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *F.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs AVX-512F (detected once), for kernels with an AVX-512 path.
pub(crate) fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *V.get_or_init(|| is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
