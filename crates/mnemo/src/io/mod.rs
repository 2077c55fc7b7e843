//! The io layer: every file format the engine reads or writes, and nothing else. The engine
//! below it (`model` and what it is built from: `config`, `kernels`, `engram`, `dsa`, `moe`,
//! `mhc`) imports no format; the drivers above it (`checkpoint`, `finetune`, `generate`,
//! `train`) read and write files only through it. `tests/module_deps.rs` checks both.
//!
//! - [`safetensors`]: f32 (and F16/BF16/I32) tensors by name, memory-mapped; [`shards`]: the
//!   tensors of a directory, in one file or sharded with `model.safetensors.index.json`.
//! - [`checkpoint`]: the files of a checkpoint directory (model, optimizer, config, Engram).
//! - [`engram`]: the Engram file (compression, hashes, gates, tables) and its optimizer state.
//! - [`delta`]: the Engram delta of a memory-only fine-tuning run, and the base fingerprint.
//! - [`prefix_cache`]: saved K/V prefixes of a model.
//! - [`gguf`], [`hf`]: imported Llama-family models (llama.cpp's GGUF, Hugging Face
//!   directories), and export to Hugging Face; [`hf_v4`]: DeepSeek-V4 Hugging Face directories;
//!   [`v4_official`]: DeepSeek-V4 in the official release layout (FP8/FP4, sharded), and
//!   [`v4_packed`]: its FP8/FP4 weights kept packed for decoding; [`v4_quantize`]: a float
//!   V4 model written in that layout (`mnemo quantize`).

pub mod checkpoint;
pub mod delta;
pub mod engram;
pub mod gguf;
pub mod hf;
pub mod hf_v4;
pub mod prefix_cache;
pub mod safetensors;
pub mod shards;
pub mod v4_coded;
pub mod v4_official;
pub mod v4_packed;
pub mod v4_quantize;
pub mod v4_random;
