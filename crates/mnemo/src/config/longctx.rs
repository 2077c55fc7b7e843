//! The synthetic long-context settings: [`Task`] (`niah`, `vt`, `mix`), [`SyntheticMix`]
//! (`train.synthetic`) and [`SyntheticLoss`], and [`MIN_CONTEXT`]. The documents, their
//! scoring and the evaluation runner are [`crate::longctx`].

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Shortest context a sample can be built in.
pub const MIN_CONTEXT: usize = 64;

/// Which synthetic task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Needle in a haystack.
    Niah,
    /// Variable tracking.
    Vt,
    /// Training only: NIAH or VT with equal probability.
    Mix,
}

impl std::str::FromStr for Task {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "niah" => Ok(Task::Niah),
            "vt" => Ok(Task::Vt),
            "mix" => Ok(Task::Mix),
            _ => bail!("unknown synthetic task `{s}` (expected niah, vt or mix)"),
        }
    }
}

/// `train.synthetic`: the share of training rows replaced by synthetic documents.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticMix {
    pub task: Task,
    /// Probability that a row is synthetic (0..=1).
    pub fraction: f64,
    /// Which targets of a synthetic row count in the loss (default `all`; not written when so).
    #[serde(default, skip_serializing_if = "SyntheticLoss::is_all")]
    pub loss: SyntheticLoss,
}

/// `train.synthetic.loss`: the targets of a synthetic row that count in the loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyntheticLoss {
    /// Every next token (the filler included).
    #[default]
    All,
    /// Only the answer tokens ([`Sample::answer_spans`](crate::longctx::Sample::answer_spans));
    /// the others are ignored targets.
    Answers,
}

impl SyntheticLoss {
    pub fn is_all(&self) -> bool {
        *self == SyntheticLoss::All
    }
}

impl std::str::FromStr for SyntheticLoss {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(SyntheticLoss::All),
            "answers" => Ok(SyntheticLoss::Answers),
            _ => bail!("unknown synthetic loss `{s}` (expected all or answers)"),
        }
    }
}
