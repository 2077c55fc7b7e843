//! # mnemo
//!
//! An engine that trains, evaluates and runs DeepSeek-V4-family language models on CPU.
//!
//! Data flows one way: the CLI (`mnemo-cli`) builds a [`config`], the [`model`] uses the
//! [`kernels`], and nothing below knows about what is above it.
//!
//! - [`kernels`]: matmul, RMSNorm, RoPE, fused causal attention, SwiGLU, cross-entropy,
//!   embedding, AdamW — forward and backward over f32 slices; quantised matrix–vector products.
//! - [`config`]: every serde settings type (model with presets and validation, Engram, DSA,
//!   training, data) and their resolution from a preset, a config file, flags and `--set`
//!   overrides; [`config_resolve`] binds `--init` runs to the checkpoint loader.
//! - [`model`]: the transformer: parameters, forward, backward, initialisation.
//! - [`moe`]: DeepSeekMoE feed-forward (shared + routed experts, bias balancing, hash routing).
//! - [`mhc`]: hyper-connection residuals (HC, and mHC with Sinkhorn-projected stream mixing).
//! - [`engram`]: Engram conditional memory (hashed N-gram tables, context-aware gate).
//! - [`dsa`]: DeepSeek Sparse Attention (lightning indexer, top-k selection, indexer KL
//!   training stages); the sparse attention kernel is `kernels::sparse_attention`.
//! - [`tokenizer`], [`data`]: byte-level BPE and the memory-mapped token cache of a corpus.
//! - [`io`]: every file format (safetensors, checkpoint files, Engram files and deltas, prefix
//!   caches, GGUF, Hugging Face); `model` and everything below it import none of it.
//! - [`checkpoint`], [`train`], [`generate`]: runs, resumption, sampling.
//! - [`heap`]: glibc allocator settings for training (freed steps' memory kept mapped).
//!
//! Tools built on the engine live in their own crates: `mnemo-pack` (a repository packed into
//! a model's context) and `mnemo-eval` (HumanEval pass@k, with the sandbox generated code
//! runs in).

pub mod batch;
pub mod bench;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod config_resolve;
pub mod data;
pub mod dsa;
pub mod engram;
pub mod finetune;
pub mod generate;
pub mod heap;
pub mod io;
pub mod kernels;
pub mod longctx;
pub mod lookup;
pub mod memstat;
pub mod mhc;
pub mod model;
pub mod moe;
pub mod plot;
pub mod prof;
pub mod rng;
pub mod sampler;
pub mod speculate;
pub mod tokenizer;
pub mod train;
pub mod util;

// Old paths of the formats now in `io`.
pub use io::safetensors as safetensors_io;
pub use io::{gguf, hf, hf_v4};
