//! `mnemo quantize IN_DIR OUT_DIR --type fp8+fp4|fp8`: a float DeepSeek-V4 checkpoint (a mnemo
//! run or checkpoint directory, or a transformers `save_pretrained` directory) written in the
//! official release layout with FP8 / FP4 weights (`mnemo::io::v4_quantize`).

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use mnemo::io::v4_quantize::{write_official, QuantMix};
use std::path::PathBuf;

/// The long `--help` text of `mnemo quantize`.
pub const LONG_ABOUT: &str = "Write a float DeepSeek-V4 model as a checkpoint in the official \
    release layout (the tensor names of DeepSeek's inference/model.py, FP8 e4m3 weights with \
    128x128 ue8m0 block scales, FP4 e2m1 experts with one ue8m0 scale per 32 values, `.scale` \
    tensors beside them), which `mnemo` loads (dequantised, or packed with `mnemo logits \
    --keep-packed`) and transformers loads too (it dequantises FP8/FP4 on CPU).\n\n\
    IN_DIR is a mnemo run or checkpoint directory of a DeepSeek-V4 model, or a transformers \
    DeepSeek-V4 directory (`save_pretrained`). OUT_DIR gets config.json (transformers' \
    deepseek_v4 config with its `quantization_config`) and model.safetensors.\n\n\
    --type fp8+fp4 (the release's mix): FP8 attention projections (wq_a, wq_b, wkv, wo_b, \
    indexer wq_b) and shared experts, FP4 routed experts; --type fp8: the routed experts in FP8 \
    too. Either way the embedding, wo_a, the router, the indexer weights_proj and the \
    compressors are BF16 and the rest (head, norms, sinks, hyper-connections) F32, as released. \
    Scales are powers of two: the smallest 2^k with the block's largest magnitude at most \
    448·2^k (FP8) or 6·2^k (FP4); values round to the nearest code, ties to even. MTP blocks \
    are not written.\n\n\
    Example:\n  mnemo quantize runs/v4-small runs/v4-small-fp8 --type fp8+fp4";

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum QType {
    /// FP8 attention and shared experts, FP4 routed experts (the official mix).
    #[value(name = "fp8+fp4")]
    Fp8Fp4,
    /// FP8 for every quantised weight, routed experts included.
    Fp8,
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// The float model: a mnemo run or checkpoint directory, or a transformers DeepSeek-V4
    /// directory.
    pub input: PathBuf,
    /// Output directory (created; config.json and model.safetensors replaced atomically).
    pub output: PathBuf,
    /// Which weights become FP8 and which FP4.
    #[arg(long = "type", value_enum)]
    pub ty: QType,
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    if a.output.exists() && !a.output.is_dir() {
        bail!(
            "OUT_DIR {}: exists and is not a directory",
            a.output.display()
        );
    }
    if a.output.canonicalize().ok() == a.input.canonicalize().ok() && a.output.exists() {
        bail!(
            "OUT_DIR is IN_DIR ({}): write the quantised model elsewhere",
            a.input.display()
        );
    }
    let l = mnemo::checkpoint::load_model(&a.input)
        .with_context(|| format!("loading {}", a.input.display()))?;
    if l.model.cfg.v4.is_none() {
        bail!(
            "{}: not a DeepSeek-V4 model (no `v4` section in its config): only V4 models have \
             the official FP8/FP4 layout",
            a.input.display()
        );
    }
    let mix = match a.ty {
        QType::Fp8Fp4 => QuantMix::Fp8Fp4,
        QType::Fp8 => QuantMix::Fp8,
    };
    let n = write_official(&l.model, &a.output, mix)
        .with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "wrote {} ({n} tensors, official DeepSeek-V4 layout, {:?})",
        a.output.display(),
        a.ty
    );
    Ok(())
}
