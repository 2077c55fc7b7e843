//! `mnemo config`: print the resolved run config; and the config flags ([`ConfigArgs`]) that
//! `train` and the benchmarks share, resolved by [`mnemo::config_resolve`].

use anyhow::Result;
use clap::Args;
use mnemo::config::RunConfig;
use std::path::PathBuf;

#[derive(Args, Clone)]
pub struct ConfigArgs {
    /// Model preset: tiny (4.26M parameters, minutes on 2 cores), small (21.9M, GQA), or one of
    /// tiny-moe, small-moe, tiny-hc, tiny-mhc, small-mhc, tiny-engram, tiny-mhc-engram,
    /// small-engram, tiny-dsa, small-dsa, v4-tiny, v4-small [default: tiny].
    #[arg(long)]
    pub(crate) preset: Option<String>,
    /// JSON config file: {"preset": ..., "model": {...}, "train": {...}, "data": {...}}; every
    /// field optional, overriding the preset.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Override any config field: `--set d_model=512`, `--set train.lr=1e-3`,
    /// `--set rope_layout=half` (repeatable; bare names are looked up in model, train, data).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(crate) sets: Vec<String>,
    /// Directory of text/code files to train on [default: the current directory].
    #[arg(long, value_name = "DIR")]
    pub(crate) data: Option<PathBuf>,
    /// Only files matching these globs (repeatable) [default: common source extensions].
    #[arg(long, value_name = "GLOB")]
    pub(crate) include: Vec<String>,
    /// Skip files matching these globs (repeatable).
    #[arg(long, value_name = "GLOB")]
    pub(crate) exclude: Vec<String>,
    /// Optimizer steps.
    #[arg(long)]
    pub(crate) steps: Option<u64>,
    /// Sequences per micro-batch.
    #[arg(long)]
    pub(crate) batch_size: Option<usize>,
    /// Tokens per sequence.
    #[arg(long)]
    pub(crate) seq_len: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    pub(crate) lr: Option<f32>,
    /// Random seed (initialisation and data order).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// DSA models: training stage `dense` (dense attention, everything trains, the indexer
    /// beside it), `warmup` (dense attention, only the indexer trains) or `sparse` (top-k
    /// attention; default). Allowed with --resume to switch stage.
    #[arg(long, value_name = "STAGE")]
    pub(crate) dsa_stage: Option<mnemo::config::DsaStage>,
    /// Matrix-product precision: `f32` (default) or `bf16` (mixed precision: bf16 operands and
    /// f32 accumulation in the GEMMs, with the AVX-512 BF16 `vdpbf16ps` kernel when the CPU
    /// has it; weights, optimizer state, norms, softmax and loss stay f32). Sets
    /// `train.precision`; a resumed run keeps its own.
    #[arg(long, value_name = "P")]
    pub(crate) precision: Option<mnemo::config::Precision>,
    /// Start from this run's weights (not its optimizer state) in a new run whose model, training
    /// and data settings default to that run's: e.g. a long-context stage with `--seq-len 1024
    /// --rope-scaling-factor 4`. Only the context length and RoPE scaling of the model may change.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "preset")]
    pub(crate) init: Option<PathBuf>,
    /// YaRN RoPE scaling by this factor over the original context (the model's current
    /// `max_seq_len`, or its existing scaling's original); sets `max_seq_len = original · F`.
    #[arg(long, value_name = "F")]
    pub(crate) rope_scaling_factor: Option<f64>,
    /// Replace training rows with synthetic long-context documents: niah, vt or mix.
    #[arg(long, value_name = "TASK")]
    pub(crate) synthetic: Option<String>,
    /// Share of the training rows that are synthetic (with --synthetic) [default: 1].
    #[arg(long, value_name = "P", requires = "synthetic")]
    pub(crate) synthetic_mix: Option<f64>,
    /// Which targets of a synthetic row count in the loss: all (every next token) or answers
    /// (only the answer tokens; the filler's targets are ignored) [default: all].
    #[arg(long, value_name = "WHICH", requires = "synthetic")]
    pub(crate) synthetic_loss: Option<String>,
}

impl ConfigArgs {
    /// The flags as the library's config sources.
    pub fn sources(&self) -> mnemo::config::ConfigSources {
        mnemo::config::ConfigSources {
            preset: self.preset.clone(),
            config: self.config.clone(),
            sets: self.sets.clone(),
            data: self.data.clone(),
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            steps: self.steps,
            batch_size: self.batch_size,
            seq_len: self.seq_len,
            lr: self.lr,
            seed: self.seed,
            dsa_stage: self.dsa_stage,
            precision: self.precision,
            init: self.init.clone(),
            rope_scaling_factor: self.rope_scaling_factor,
            synthetic: self.synthetic.clone(),
            synthetic_mix: self.synthetic_mix,
            synthetic_loss: self.synthetic_loss.clone(),
        }
    }
}

/// [`mnemo::config_resolve::resolve`] of the config flags: the run config and its preset.
pub fn resolve(a: &ConfigArgs) -> Result<(RunConfig, String)> {
    mnemo::config_resolve::resolve(&a.sources())
}

/// `mnemo config`: the resolved run config as JSON on stdout.
pub fn run(a: &ConfigArgs) -> Result<()> {
    let (run, _) = resolve(a)?;
    println!("{}", serde_json::to_string_pretty(&run)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// The parameter counts `--preset`'s help states are the presets' true sizes, and every
    /// preset is named.
    #[test]
    fn preset_help_states_true_sizes_and_every_preset() {
        let mut cmd = crate::Cli::command();
        let train = cmd.find_subcommand_mut("train").unwrap();
        let help = train
            .get_arguments()
            .find(|a| a.get_id() == "preset")
            .and_then(|a| a.get_help())
            .unwrap()
            .to_string();
        for (name, want) in [("tiny", "4.26M"), ("small", "21.9M")] {
            let cfg = mnemo::config::ModelConfig::preset(name).unwrap();
            let n = mnemo::model::Model::new(cfg).unwrap().counts().total;
            let shown = if n < 10_000_000 {
                format!("{:.2}M", n as f64 / 1e6)
            } else {
                format!("{:.1}M", n as f64 / 1e6)
            };
            assert_eq!(shown, want, "{name}: {n} parameters");
            assert!(
                help.contains(&format!("{name} ({want} parameters"))
                    || help.contains(&format!("{name} ({want},")),
                "{help}"
            );
        }
        for p in mnemo::config::ModelConfig::PRESETS {
            assert!(help.contains(p), "`{p}` missing from: {help}");
        }
    }
}
