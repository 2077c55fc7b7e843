//! `mnemo quantize`, three paths chosen by the input and `--type`:
//! - `IN.gguf OUT.gguf --type Q4_K_M|Q5_K_M|…`: a GGUF model quantised into one of llama.cpp's
//!   mixes (`mnemo::gguf::quantize`);
//! - `HF_DIR OUT.gguf --type Q4_K_M|…|F32|F16|BF16`: a Hugging Face Llama / Qwen2 / Qwen3
//!   directory converted as convert_hf_to_gguf.py does (then quantised as by llama-quantize)
//!   (`mnemo::gguf::hf`);
//! - `IN_DIR OUT_DIR --type fp8+fp4|fp8`: a float DeepSeek-V4 checkpoint (a mnemo run or
//!   checkpoint directory, or a transformers `save_pretrained` directory) written in the
//!   official release layout with FP8 / FP4 weights (`mnemo::io::v4_quantize`).

use anyhow::{bail, Context, Result};
use clap::Args;
use mnemo::gguf::mix::{Mix, MIXES};
use mnemo::io::v4_quantize::{write_official, QuantMix};
use std::path::PathBuf;

/// The long `--help` text of `mnemo quantize`.
pub const LONG_ABOUT: &str = "Quantise a model. Three kinds of input:\n\n\
    1. A GGUF file (IN ends in .gguf, or --type names a GGUF mix): OUT is a GGUF file in \
    llama.cpp's quantisation mix --type (Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, \
    Q5_K_M, Q6_K, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16, F32), as llama.cpp's own \
    `llama-quantize` (without an importance matrix) writes it: the same type per tensor (e.g. \
    Q4_K_M: Q4_K, with output.weight Q6_K and attn_v / ffn_down of every third layer plus the \
    first and last eighth Q6_K; rows that are not whole 256-value blocks fall back to Q5_0, \
    Q5_1 or Q8_0; 1-D tensors and norms stay as they are) and the same bytes (ggml's reference \
    quantisers). Metadata (architecture, tokenizer, chat template) is copied; \
    general.file_type is set to the mix. Any architecture with llama.cpp's tensor names \
    (llama, qwen2, qwen3, deepseek2, ...). The input should be F32, F16 or BF16; an input \
    already quantised is refused unless --allow-requantize (then its values are dequantised \
    and quantised again, which loses more than quantising the original).\n\n\
    2. A Hugging Face directory (config.json, model.safetensors or model-0000x-of-0000y \
    shards with model.safetensors.index.json, tokenizer.json, tokenizer_config.json; f32, f16 \
    or bf16 weights) of LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM, with --type \
    a GGUF mix: OUT is the file llama.cpp's convert_hf_to_gguf.py followed by llama-quantize \
    writes (the same bytes): tensors renamed to llama.cpp's names (Llama's q/k rows permuted \
    for its rotary layout), metadata (context length, widths, head counts, RoPE base and \
    scaling, norm epsilon, name and size label from the directory name), the tokenizer \
    (tokens, token types, merges, special tokens, chat template; the pre-tokenizer named by \
    convert_hf_to_gguf.py's table of tokenizer hashes), then the mix, quantised from the \
    source values (the conversion to the source dtype is lossless). --type F32, F16 or BF16 \
    is the plain conversion (convert_hf_to_gguf.py --outtype f32|f16|bf16). Tensors are \
    streamed one at a time. A tokenizer convert_hf_to_gguf.py would not recognise is refused \
    with its hash; --tokenizer-pre NAME (e.g. smollm, qwen2, llama-bpe) names llama.cpp's \
    pre-tokenizer for it. Only byte-level BPE tokenizers (tokenizer.json) are read.\n\n\
    3. A DeepSeek-V4 directory (--type fp8+fp4 or fp8): write the float model as a checkpoint \
    in the official release layout (the tensor names of DeepSeek's inference/model.py, FP8 e4m3 weights with \
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
    Examples:\n  mnemo quantize SmolLM2-F32.gguf SmolLM2-Q4_K_M.gguf --type Q4_K_M\n  \
    mnemo quantize ./SmolLM2-135M-Instruct SmolLM2-Q4_K_M.gguf --type Q4_K_M\n  \
    mnemo quantize runs/v4-small runs/v4-small-fp8 --type fp8+fp4";

#[derive(Clone, Copy, Debug)]
pub enum QType {
    /// FP8 attention and shared experts, FP4 routed experts (the official mix).
    Fp8Fp4,
    /// FP8 for every quantised weight, routed experts included.
    Fp8,
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// The model: a GGUF file (F32/F16/BF16), a Hugging Face Llama/Qwen2/Qwen3 directory, or
    /// for fp8+fp4/fp8 a mnemo run or checkpoint directory or a transformers DeepSeek-V4
    /// directory.
    pub input: PathBuf,
    /// Output: a GGUF file (replaced atomically), or for fp8+fp4/fp8 a directory (created;
    /// config.json and model.safetensors replaced atomically).
    pub output: PathBuf,
    /// GGUF mix (Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, Q8_0,
    /// Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16, F32; case-insensitive) or DeepSeek-V4 layout
    /// (fp8+fp4, fp8).
    #[arg(long = "type")]
    pub ty: String,
    /// GGUF input only: accept an input that is already quantised (dequantise, quantise
    /// again).
    #[arg(long)]
    pub allow_requantize: bool,
    /// Hugging Face input only: llama.cpp's pre-tokenizer name (tokenizer.ggml.pre, e.g.
    /// smollm, qwen2, llama-bpe) for a tokenizer whose check hash convert_hf_to_gguf.py does
    /// not know (e.g. a cut or edited vocabulary).
    #[arg(long)]
    pub tokenizer_pre: Option<String>,
}

fn is_gguf_file(p: &std::path::Path) -> bool {
    p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        || p.is_file()
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let v4 = match a.ty.as_str() {
        "fp8+fp4" => Some(QType::Fp8Fp4),
        "fp8" => Some(QType::Fp8),
        _ => None,
    };
    let Some(ty) = v4 else {
        let mix = Mix::parse(&a.ty).map_err(|e| {
            anyhow::anyhow!("--type: {e}; or fp8+fp4, fp8 for a DeepSeek-V4 directory")
        })?;
        return run_gguf(&a, mix);
    };
    if is_gguf_file(&a.input) {
        bail!(
            "--type {}: is the DeepSeek-V4 directory layout; for the GGUF file {} name a GGUF \
             mix: {}",
            a.ty,
            a.input.display(),
            MIXES.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
        );
    }
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
    let mix = match ty {
        QType::Fp8Fp4 => QuantMix::Fp8Fp4,
        QType::Fp8 => QuantMix::Fp8,
    };
    let n = write_official(&l.model, &a.output, mix)
        .with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "wrote {} ({n} tensors, official DeepSeek-V4 layout, {:?})",
        a.output.display(),
        ty
    );
    Ok(())
}

fn run_hf(a: &QuantizeArgs, mix: Mix) -> Result<()> {
    if a.allow_requantize {
        bail!("--allow-requantize: only for a GGUF input (a Hugging Face directory is float)");
    }
    if a.output.is_dir() {
        bail!(
            "OUT {}: is a directory; name the GGUF file to write",
            a.output.display()
        );
    }
    let t0 = std::time::Instant::now();
    let pre = a.tokenizer_pre.as_deref();
    let r = match mix.name {
        "F32" => mnemo::gguf::hf::convert_hf(&a.input, &a.output, 0, pre),
        "F16" => mnemo::gguf::hf::convert_hf(&a.input, &a.output, 1, pre),
        "BF16" => mnemo::gguf::hf::convert_hf(&a.input, &a.output, 30, pre),
        _ => mnemo::gguf::hf::quantize_hf(&a.input, &a.output, mix, pre),
    }
    .with_context(|| format!("converting {} to {}", a.input.display(), mix.name))?;
    let types = r.tensors.iter().map(|(_, t)| t.as_str());
    report(&a.output, types, r.bytes, mix.name, t0);
    Ok(())
}

/// A DeepSeek-V4 directory (mnemo run/checkpoint or transformers `deepseek_v4`), which takes
/// --type fp8+fp4 / fp8 rather than a GGUF mix.
fn is_v4_dir(d: &std::path::Path) -> bool {
    std::fs::read_to_string(d.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("v4").is_some() || v["model_type"].as_str() == Some("deepseek_v4"))
}

fn run_gguf(a: &QuantizeArgs, mix: Mix) -> Result<()> {
    if a.input.is_dir() && a.input.join("config.json").is_file() && !is_v4_dir(&a.input) {
        return run_hf(a, mix);
    }
    if a.tokenizer_pre.is_some() {
        bail!("--tokenizer-pre: only for a Hugging Face directory input");
    }
    if !a.input.is_file() {
        bail!(
            "IN {}: not a GGUF file or a Hugging Face directory with config.json (--type {} is \
             a GGUF mix; a DeepSeek-V4 directory takes --type fp8+fp4 or fp8)",
            a.input.display(),
            a.ty
        );
    }
    if a.output.is_dir() {
        bail!(
            "OUT {}: is a directory; name the GGUF file to write",
            a.output.display()
        );
    }
    if a.output.canonicalize().ok() == a.input.canonicalize().ok() && a.output.exists() {
        bail!(
            "OUT is IN ({}): write the quantised model elsewhere",
            a.input.display()
        );
    }
    let t0 = std::time::Instant::now();
    let r = mnemo::gguf::quantize::quantize_gguf(&a.input, &a.output, mix, a.allow_requantize)
        .with_context(|| format!("quantising {} to {}", a.input.display(), mix.name))?;
    let types = r.tensors.iter().map(|(_, _, t)| t.as_str());
    report(&a.output, types, r.bytes, mix.name, t0);
    Ok(())
}

/// The closing line: the output, its tensor count by type, size, mix and time.
fn report<'a>(
    out: &std::path::Path,
    types: impl Iterator<Item = &'a str>,
    bytes: u64,
    mix: &str,
    t0: std::time::Instant,
) {
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    let mut total = 0;
    for t in types {
        *counts.entry(t).or_default() += 1;
        total += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(t, n)| format!("{n} {t}")).collect();
    eprintln!(
        "wrote {} ({total} tensors: {}; {:.1} MiB, {mix}, {:.1} s)",
        out.display(),
        counts.join(", "),
        bytes as f64 / (1 << 20) as f64,
        t0.elapsed().as_secs_f64(),
    );
}
