//! Engram conditional memory (DeepSeek, arXiv 2601.07372; spec `engram.md`): a hashed N-gram
//! embedding lookup with a context-aware gate, added to the residual stream(s) before attention
//! in a few layers. Self-contained: the model wires it in through the API below.
//!
//! ```text
//! x'   = P(tokens)                                compressed ids           [N]       (compress)
//! rows = hash_l(x', pos)                          per-head table rows      [N, H]    (hash)
//! e    = E_l[rows]                                memory, heads concat.    [N, H·D_h] (table)
//! y    = gate_l(e, h)  (value · σ(gate), + SiLU(conv))                    [N, n, d] (gate)
//! h_m += y_m   for every residual stream m, before attention
//! ```
//!
//! `N` tokens (`B` rows of `T`), `H = (N_max−1)·K` heads (orders 2..=N_max, `K` per order),
//! `D_h` per head, `d_mem = H·D_h`, `n` residual streams (1, or `hc_mult` with mHC), `d` width.
//! `pos[t]` is the position of token `t` inside its document ([`positions_in_documents`]): the
//! hash and the convolution never look across a document boundary or a batch row.
//!
//! # Using it from a model
//!
//! Config: [`EngramConfig`] (serde, [`EngramConfig::validate`]). Once per tokenizer:
//! [`CompressedTokenizer::build`] (~1 s for 129k ids; store its [`CompressedTokenizer::lookup`]
//! or [`CompressedTokenizer::to_bytes`]). Once per model: [`Engram::new`] finds the primes,
//! draws the multipliers exactly as the demo (numpy-compatible), initialises tables (N(0, 1))
//! and gates ([`GateSpec::init`]: projections N(0, init_std²), biases 0, norms 1, conv 0).
//! Multipliers and primes are data ([`LayerHash`], serde) saved by `Engram::to_safetensors`
//! and restored by `Engram::from_safetensors` (the file format, in [`crate::io::engram`]) /
//! [`Engram::from_parts`], never recomputed.
//!
//! Training step, per batch of `b` rows of `t` tokens (`h`: the residual stream(s) entering
//! block `engram.layers[i].hash.layer_id`, `[N, n, d]`):
//!
//! ```text
//! let cids = engram.compress.compress(&tokens);
//! let pos  = positions_in_documents(&tokens, b, t, Some(eot));
//! let mems = engram.lookup_all(&cids, &pos)?;        // ids only: can run ahead of the blocks
//! // forward, in the Engram block, before attention:
//! engram.layers[i].forward(mems[i], &h, &pos, &mut y, &mut acts[i]);   // then h_m += y_m
//! // backward, dy = dL/dh after the addition (the residual passes dy to h unchanged):
//! let tg = engram.layers[i].backward(&acts[i], &dy, &mut dh, &mut dgate[i]);  // dh += query path
//! // gate parameters (engram.layers[i].params, named by GateSpec::tensors) go to the model's
//! // optimiser; each table to its own lazy Adam (5x lr, no weight decay):
//! table_opt[i].update(&mut engram.layers[i].table, &tg, base_lr, &engram.cfg.table_optimizer())?;
//! ```
//!
//! The gate functions take the parameter slice explicitly ([`gate::forward`],
//! [`gate::backward`]), so the parameters can also live in the model's flat buffer.
//!
//! Decode, per sequence: `let mut st = engram.new_state();` then for each new token `tid`
//! (raw id), in each Engram block, `engram.layers[i].forward_step(&mut st, i,
//! engram.compress.compress_one(tid), &h_t, &mut y_t)?` with `h_t, y_t: [n, d]`, and after the
//! token's whole forward pass `st.push(&engram, tid, Some(eot))` (an EOT resets the state).
//! This equals the full-sequence forward position by position.
//!
//! Tables live in RAM or in a memory-mapped file ([`EngramTable::open_mapped`], errors for a
//! wrong size or a vanished file); [`Engram::inspect`] / [`Engram::inspect_text`] summarise the
//! layers for `mnemo engram inspect`, [`Engram::plan`] the layers a config would build (sizes
//! only, no tables), [`CompressedTokenizer::report`] the compression.

pub mod compress;
pub mod gate;
pub mod hash;
pub mod table;

pub use compress::{CompressedTokenizer, MergeGroup};
pub use gate::{GateActs, GateSpec, GateState};
pub use hash::{layer_primes, positions_in_documents, LayerHash};
pub use table::{BiasCorrection, EngramTable, SparseAdam, SparseAdamParams, SparseGrad};

pub use crate::config::EngramConfig;

use anyhow::{bail, Result};
use serde::Serialize;

/// The gate and table-optimizer settings an [`EngramConfig`] implies (here, beside the types
/// they build, so that the config layer imports nothing from the engine).
impl EngramConfig {
    /// The gate shapes for a model of width `d` with `n_branch` residual streams.
    pub fn gate_spec(&self, d: usize, n_branch: usize) -> GateSpec {
        GateSpec {
            d,
            d_mem: self.d_mem(),
            n_branch,
            kernel: self.kernel_size,
            dilation: self.max_ngram_size,
            eps_gate: self.gate_norm_eps,
            eps_conv: self.conv_norm_eps,
        }
    }

    /// Lazy-Adam settings for the tables (the lr multiplier from this config).
    pub fn table_optimizer(&self) -> SparseAdamParams {
        SparseAdamParams {
            lr_mult: self.table_lr_mult,
            ..SparseAdamParams::default()
        }
    }
}

/// One Engram layer: hash, table, and gate (spec and parameters).
#[derive(Debug)]
pub struct EngramLayer {
    pub hash: LayerHash,
    pub table: EngramTable,
    pub gate: GateSpec,
    /// Gate parameters, laid out by [`GateSpec::offsets`].
    pub params: Vec<f32>,
}

/// The retrieved memory of one layer for a batch: rows `[N, H]` and `e: [N, H·D_h]`.
#[derive(Clone, Debug, Default)]
pub struct Memory {
    pub rows: Vec<u32>,
    pub e: Vec<f32>,
}

/// Activations of one layer kept for the backward pass.
#[derive(Clone, Default)]
pub struct EngramActs {
    pub rows: Vec<u32>,
    pub gate: GateActs,
}

impl EngramLayer {
    /// Hash and gather (the part that depends only on token ids; can be prefetched).
    pub fn lookup(&self, cids: &[u32], pos: &[u32]) -> Result<Memory> {
        let rows = self.hash.rows(cids, pos);
        let e = self.table.prefetch(&rows)?;
        Ok(Memory { rows, e })
    }

    /// Forward on `h: [N, n, d]` into `y: [N, n, d]` (to be added to the streams).
    pub fn forward(
        &self,
        mem: Memory,
        h: &[f32],
        pos: &[u32],
        y: &mut [f32],
        acts: &mut EngramActs,
    ) {
        gate::forward(&self.gate, &self.params, &mem.e, h, pos, y, &mut acts.gate);
        acts.rows = mem.rows;
    }

    /// Backward: adds the query-path gradient to `dh`, accumulates the gate gradient into
    /// `dparams`, and returns the table gradient over the rows used.
    pub fn backward(
        &self,
        acts: &EngramActs,
        dy: &[f32],
        dh: &mut [f32],
        dparams: &mut [f32],
    ) -> SparseGrad {
        let mut de = vec![0.0f32; acts.rows.len() * self.table.dim()];
        gate::backward(
            &self.gate,
            &self.params,
            &acts.gate,
            dy,
            dh,
            &mut de,
            dparams,
        );
        SparseGrad::from_gather(&acts.rows, &de, self.table.dim())
    }

    /// One decode step of layer `i` of `state` for the compressed id `cid` of the new token:
    /// `h, y: [n, d]`.
    pub fn forward_step(
        &self,
        state: &mut EngramState,
        i: usize,
        cid: u32,
        h: &[f32],
        y: &mut [f32],
    ) -> Result<()> {
        let rows = self.hash.rows_step(&state.history, cid);
        let e = self.table.prefetch(&rows)?;
        gate::forward_step(&self.gate, &self.params, &e, h, &mut state.gates[i], y);
        Ok(())
    }
}

/// Decode-time state of one sequence: the last `N−1` compressed ids of the current document
/// and each layer's convolution history.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngramState {
    pub history: Vec<u32>,
    pub gates: Vec<GateState>,
    max_hist: usize,
}

impl EngramState {
    /// Record the token just evaluated (raw id `tid`); an end-of-text token ends the document,
    /// so the next token starts with empty histories.
    pub fn push(&mut self, engram: &Engram, tid: u32, eot: Option<u32>) {
        if Some(tid) == eot {
            self.reset();
            return;
        }
        self.history.push(engram.compress.compress_one(tid));
        if self.history.len() > self.max_hist {
            self.history.remove(0);
        }
    }

    /// Start a new document.
    pub fn reset(&mut self) {
        self.history.clear();
        self.gates.iter_mut().for_each(GateState::reset);
    }
}

/// Summary of one layer for `mnemo engram inspect`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerInfo {
    pub layer_id: usize,
    pub orders: Vec<usize>,
    pub heads_per_order: usize,
    pub head_dim: usize,
    /// Table size (a prime) of each head, `[order][head]`.
    pub primes: Vec<Vec<u64>>,
    pub multipliers: Vec<u64>,
    pub total_rows: u64,
    pub table_bytes: u64,
    pub gate_params: usize,
    pub mapped: bool,
}

impl LayerInfo {
    /// The summary of a layer hashed by `hash` with heads of `head_dim` values: its rows are
    /// [`LayerHash::total_rows`] and its bytes [`EngramTable::bytes_for`], the sizes the layer's
    /// table is built with.
    pub fn new(hash: &LayerHash, head_dim: usize, gate_params: usize, mapped: bool) -> Self {
        let total_rows = hash.total_rows();
        LayerInfo {
            layer_id: hash.layer_id,
            orders: (2..=hash.max_ngram).collect(),
            heads_per_order: hash.n_head,
            head_dim,
            primes: hash
                .primes
                .chunks(hash.n_head)
                .map(|c| c.to_vec())
                .collect(),
            multipliers: hash.multipliers.clone(),
            total_rows,
            table_bytes: EngramTable::bytes_for(total_rows as usize, head_dim),
            gate_params,
            mapped,
        }
    }
}

/// The hash parameters of every layer of `cfg` (in `layer_ids` order) for the compression
/// `compress`: table sizes from the shared prime search ([`layer_primes`]) and multipliers
/// drawn from `cfg.seed` exactly as the demo (numpy's `default_rng(seed + 10007·layer)`).
/// [`Engram::new`] builds its tables from these; [`Engram::plan`] only sizes them.
pub fn layer_hashes(cfg: &EngramConfig, compress: &CompressedTokenizer) -> Result<Vec<LayerHash>> {
    cfg.validate(None)?;
    let vp = compress.compressed_vocab_size() as u64;
    if vp >= 1 << 30 {
        bail!("engram: a compressed vocabulary of {vp} ids is too large (at most 2^30)");
    }
    let pad = compress.compress_one(cfg.pad_id);
    let primes = layer_primes(
        cfg.layer_ids.len(),
        &cfg.vocab_size_per_ngram,
        cfg.n_head_per_ngram,
    );
    cfg.layer_ids
        .iter()
        .zip(primes)
        .map(|(&lid, primes)| {
            let mult = hash::draw_multipliers(cfg.seed, lid, cfg.max_ngram_size, vp);
            LayerHash::new(
                lid,
                cfg.max_ngram_size,
                cfg.n_head_per_ngram,
                mult,
                primes,
                pad,
                vp,
            )
        })
        .collect()
}

/// The text of `mnemo engram inspect`: the compression `compress` (tokenizer ids before and
/// after), then one block per layer of `layers`.
pub fn inspect_report(compress: &CompressedTokenizer, layers: &[LayerInfo]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let v = compress.tokenizer_vocab_size();
    let vp = compress.compressed_vocab_size();
    let _ = writeln!(
        s,
        "compression: {v} tokenizer ids -> {vp} ({:.2}% fewer)",
        100.0 * (v - vp) as f64 / v.max(1) as f64
    );
    for i in layers {
        let _ = writeln!(
            s,
            "layer {}: orders {:?}, {} heads/order x {} dims, {} rows, {:.1} MB{}, {} gate params",
            i.layer_id,
            i.orders,
            i.heads_per_order,
            i.head_dim,
            i.total_rows,
            i.table_bytes as f64 / 1e6,
            if i.mapped { " (mapped)" } else { "" },
            i.gate_params
        );
        for (o, p) in i.orders.iter().zip(&i.primes) {
            let _ = writeln!(s, "  {o}-gram table sizes {p:?}");
        }
        let _ = writeln!(s, "  multipliers {:?}", i.multipliers);
    }
    s
}

/// All Engram layers of a model plus the tokenizer compression.
#[derive(Debug)]
pub struct Engram {
    pub cfg: EngramConfig,
    pub compress: CompressedTokenizer,
    pub layers: Vec<EngramLayer>,
    /// Ablation switch: when set, no block has an Engram module ([`Engram::layer_of_block`]
    /// answers `None`), so the memory contributes nothing (`mnemo eval --no-engram`).
    pub off: bool,
}

impl Engram {
    /// A freshly initialised Engram for a model of width `d` with `n_branch` residual streams:
    /// primes by the shared search, multipliers drawn from `cfg.seed` exactly as the demo
    /// (numpy's `default_rng(seed + 10007·layer)`), tables ~ N(0,
    /// table_init_std²), gates by [`GateSpec::init`] with `proj_std` (the model's `init_std`).
    pub fn new(
        cfg: EngramConfig,
        compress: CompressedTokenizer,
        d: usize,
        n_branch: usize,
        init_seed: u64,
        proj_std: f32,
    ) -> Result<Self> {
        cfg.validate(None)?;
        if d == 0 || n_branch == 0 {
            bail!("engram: model width {d} and {n_branch} residual streams");
        }
        let hashes = layer_hashes(&cfg, &compress)?;
        let spec = cfg.gate_spec(d, n_branch);
        let mut layers = Vec::new();
        for hash in hashes {
            let lid = hash.layer_id;
            let mut rng = crate::rng::Rng::derived(init_seed, &format!("engram.{lid}"));
            let table = EngramTable::normal(
                hash.total_rows() as usize,
                cfg.head_dim,
                &mut rng,
                cfg.table_init_std,
            );
            let params = spec.init(&mut rng, proj_std);
            layers.push(EngramLayer {
                hash,
                table,
                gate: spec,
                params,
            });
        }
        Ok(Engram {
            cfg,
            compress,
            layers,
            off: false,
        })
    }

    /// Reassemble from stored parts (hashes, tables and gate parameters from a checkpoint),
    /// checking that they agree with `cfg` and with each other.
    pub fn from_parts(
        cfg: EngramConfig,
        compress: CompressedTokenizer,
        d: usize,
        n_branch: usize,
        parts: Vec<(LayerHash, EngramTable, Vec<f32>)>,
    ) -> Result<Self> {
        cfg.validate(None)?;
        if parts.len() != cfg.layer_ids.len() {
            bail!(
                "engram: {} stored layers for layer_ids {:?}",
                parts.len(),
                cfg.layer_ids
            );
        }
        let spec = cfg.gate_spec(d, n_branch);
        let vp = compress.compressed_vocab_size() as u64;
        let mut layers = Vec::new();
        for ((hash, table, params), &lid) in parts.into_iter().zip(&cfg.layer_ids) {
            hash.validate()?;
            if hash.layer_id != lid
                || hash.max_ngram != cfg.max_ngram_size
                || hash.n_head != cfg.n_head_per_ngram
                || hash.compressed_vocab != vp
            {
                bail!("engram layer {lid}: stored hash settings disagree with the config or the compression table");
            }
            if table.rows() as u64 != hash.total_rows() || table.dim() != cfg.head_dim {
                bail!(
                    "engram layer {lid}: table [{}, {}], expected [{}, {}]",
                    table.rows(),
                    table.dim(),
                    hash.total_rows(),
                    cfg.head_dim
                );
            }
            if params.len() != spec.n_params() {
                bail!(
                    "engram layer {lid}: {} gate parameters, expected {}",
                    params.len(),
                    spec.n_params()
                );
            }
            layers.push(EngramLayer {
                hash,
                table,
                gate: spec,
                params,
            });
        }
        Ok(Engram {
            cfg,
            compress,
            layers,
            off: false,
        })
    }

    /// Give every table its own RAM copy (trainable, writable), e.g. after loading a run whose
    /// tables are memory-mapped read-only; tables already in RAM are left as they are.
    pub fn tables_to_ram(&mut self) -> Result<()> {
        for l in &mut self.layers {
            if l.table.is_mapped() {
                l.table.check()?;
                let (r, d) = (l.table.rows(), l.table.dim());
                l.table = EngramTable::from_vec(r, d, l.table.as_slice().to_vec())?;
            }
        }
        Ok(())
    }

    /// Hash and gather for every layer (one [`Memory`] per layer, in layer order). It depends
    /// only on token ids, so a model can run it ahead of (or beside) the blocks below.
    pub fn lookup_all(&self, cids: &[u32], pos: &[u32]) -> Result<Vec<Memory>> {
        self.layers.iter().map(|l| l.lookup(cids, pos)).collect()
    }

    /// [`Engram::inspect`] as text, one block per layer (for `mnemo engram inspect`).
    pub fn inspect_text(&self) -> String {
        inspect_report(&self.compress, &self.inspect())
    }

    /// The per-layer summary of the Engram [`Engram::new`] would build from `cfg` and
    /// `compress` for a model of width `d` with `n_branch` residual streams — the same primes,
    /// multipliers, rows and bytes ([`layer_hashes`], [`LayerInfo::new`]) — without allocating
    /// any table: instant even for tables of hundreds of millions of rows.
    pub fn plan(
        cfg: &EngramConfig,
        compress: &CompressedTokenizer,
        d: usize,
        n_branch: usize,
    ) -> Result<Vec<LayerInfo>> {
        if d == 0 || n_branch == 0 {
            bail!("engram: model width {d} and {n_branch} residual streams");
        }
        let gate_params = cfg.gate_spec(d, n_branch).n_params();
        Ok(layer_hashes(cfg, compress)?
            .iter()
            .map(|h| LayerInfo::new(h, cfg.head_dim, gate_params, false))
            .collect())
    }

    /// The Engram layer index of block `block`, if it has one.
    pub fn layer_of_block(&self, block: usize) -> Option<usize> {
        if self.off {
            return None;
        }
        self.layers.iter().position(|l| l.hash.layer_id == block)
    }

    /// An empty decode state for one sequence.
    pub fn new_state(&self) -> EngramState {
        EngramState {
            history: Vec::new(),
            gates: vec![GateState::default(); self.layers.len()],
            max_hist: self.cfg.max_ngram_size - 1,
        }
    }

    /// Per-layer summary.
    pub fn inspect(&self) -> Vec<LayerInfo> {
        self.layers
            .iter()
            .map(|l| LayerInfo::new(&l.hash, l.table.dim(), l.params.len(), l.table.is_mapped()))
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests;
