//! `mnemo export RUN --format hf --out DIR`: a trained run (or checkpoint) as a Hugging Face
//! directory that transformers' `from_pretrained` loads: DeepSeek-V4 models in transformers'
//! `deepseek_v4` layout (`mnemo::io::hf_v4::export`), dense plain-residual models in the Llama
//! layout (`mnemo::io::hf::export`). The tokenizer goes beside the weights.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    /// Hugging Face transformers (config.json + model.safetensors + tokenizer.json).
    Hf,
}

#[derive(Args)]
pub struct ExportArgs {
    /// Run directory or checkpoint directory to export.
    pub run: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "hf")]
    pub format: Format,
    /// Output directory (created; files in it are replaced atomically).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: ExportArgs) -> Result<()> {
    let Format::Hf = a.format;
    if a.out.exists() && !a.out.is_dir() {
        bail!("--out {}: exists and is not a directory", a.out.display());
    }
    let l = mnemo::checkpoint::load(&a.run, false)
        .with_context(|| format!("loading {}", a.run.display()))?;
    if l.model.cfg.v4.is_some() {
        mnemo::io::hf_v4::export(&l.model, Some(&l.tokenizer), &a.out)?;
        eprintln!(
            "wrote {} (transformers deepseek_v4: config.json, model.safetensors, tokenizer.json)",
            a.out.display()
        );
    } else {
        mnemo::io::hf::export(&l.model, &l.tokenizer, &a.out)?;
        eprintln!("wrote {} (Llama layout)", a.out.display());
    }
    Ok(())
}
