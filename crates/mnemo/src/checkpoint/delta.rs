//! Memory-only fine-tuning runs kept as a delta: loading such a run directory as its base plus
//! the delta ([`load_delta_run`], used by [`load`]). The delta's format is
//! [`crate::io::delta`] (re-exported here).

use super::{load, locate, Loaded};
pub use crate::config::TrainOnly;
pub use crate::io::delta::{
    apply_delta, fingerprint, read_delta_meta, to_safetensors, DeltaMeta, DELTA_FILE,
};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Load a run directory that holds only a delta: the base it names (whose fingerprint must
/// match) plus the delta.
pub fn load_delta_run(dir: &Path) -> Result<Loaded> {
    let p = dir.join(DELTA_FILE);
    let (_, meta) = read_delta_meta(&p)?;
    let base = locate(&meta.base).with_context(|| {
        format!(
            "{}: the base run {} of this delta cannot be found",
            p.display(),
            meta.base.display()
        )
    })?;
    let fp = fingerprint(&base)?;
    if fp != meta.base_fingerprint {
        bail!(
            "{}: the base {} has changed since the delta was made (fingerprint {fp}, delta made for {})",
            p.display(),
            base.display(),
            meta.base_fingerprint
        );
    }
    let mut l = load(&base, false)?;
    apply_delta(&mut l.model, &p)?;
    l.state = None;
    l.dir = dir.to_path_buf();
    Ok(l)
}
