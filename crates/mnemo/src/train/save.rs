//! Saving a run: the checkpoint (weights, optimizer state, Engram tables, MoE pools, data
//! order; atomic), the kept checkpoints of `train.keep_steps`, and with memory-only fine-tuning
//! the Engram delta against the base run.

use super::log::println_above;
use super::start::Session;
use crate::checkpoint;
use anyhow::Result;
use std::path::Path;

/// Save the checkpoint of `sess` (at its current step) in `out`; `keep`: also keep it as
/// `checkpoint-step{N}`. With memory-only fine-tuning, write the Engram delta too and report
/// its size.
pub(super) fn save(
    out: &Path,
    sess: &mut Session,
    keep: bool,
    pb: &indicatif::ProgressBar,
) -> Result<()> {
    let step = sess.state.step;
    checkpoint::save_with(
        out,
        &mut sess.model,
        &sess.tok,
        (&sess.adam_m, &sess.adam_v),
        &sess.table_opt,
        &sess.moe_pools,
        &sess.state,
    )?;
    if keep {
        checkpoint::keep(out, step)?;
    }
    if let Some(base) = &sess.base {
        let mode = sess.run.train.train_only;
        let st = crate::finetune::write_delta(out, &sess.model, base, mode, step)?;
        println_above(
            pb,
            format!(
                "engram delta: {} of {} rows changed, {} bytes (full tables {} bytes)",
                st.rows.iter().sum::<usize>(),
                st.table_rows.iter().sum::<usize>(),
                st.delta_bytes,
                st.table_bytes
            ),
        );
    }
    Ok(())
}
