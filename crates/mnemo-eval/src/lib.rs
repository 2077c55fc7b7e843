//! # mnemo-eval
//!
//! Code benchmarks for models run by the `mnemo` engine: [`humaneval`] (HumanEval and
//! HumanEval-Rust pass@k: problems, prompts, completions from a model, execution against each
//! problem's tests) and the [`sandbox`] the generated code runs in (timeouts, resource limits,
//! namespaces, a pids cgroup). The engine knows nothing of either; `mnemo eval humaneval` and
//! `mnemo eval humaneval-rust` drive them.

pub mod humaneval;
pub mod sandbox;
