//! Benchmarks of the engine that need more than one module (the training-step benchmarks are in
//! [`crate::train::bench`]).
//!
//! - [`long_context`]: prefill and decode time of a DSA model at growing context lengths,
//!   sparse against dense attention (`mnemo bench long-context`).
//! - [`membw`]: memory read bandwidth, the bound of a memory-bound decode (`mnemo bench membw`).

pub mod long_context;
pub mod membw;
