//! The run config of a command line: [`crate::config::resolve`] with `--init` runs read by the
//! checkpoint loader (run and checkpoint directories, GGUF files, Hugging Face directories).
//! The resolution itself, and [`ConfigSources`], live in the config layer.

pub use crate::config::resolve::{resolve_with, ConfigSources};
use crate::config::{ModelConfig, RunConfig};
use anyhow::Result;
use std::path::Path;

/// The run config of `a` and the name of its preset ([`resolve_with`]), the model of an
/// `--init` run without `run.json` loaded by [`crate::checkpoint::load`].
pub fn resolve(a: &ConfigSources) -> Result<(RunConfig, String)> {
    resolve_with(a, &init_model)
}

/// The model config of the run, checkpoint or imported model at `path`.
fn init_model(path: &Path) -> Result<ModelConfig> {
    Ok(crate::checkpoint::load(path, false)?.model.cfg)
}
