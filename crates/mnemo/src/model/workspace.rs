//! The training driver's memory: the activations of one batch kept for the backward pass,
//! and the backward scratch. Allocated once per (B, T) and reused every step.
//!
//! ```text
//! streams[s]   residual stream entering sublayer s (attention of block l: s = 2l, its
//!              feed-forward: 2l + 1; s = 2L after the last)   [N, w]   w = d, or n·d (hc/mhc)
//!              then per MTP block j (when it runs): entering it, between its sublayers,
//!              after it: s = 2L + 1 + 3j + {0, 1, 2}                     (`block_stream`)
//! layers[l]    per block: each sublayer's norm (y, 1/rms), hyper-connection coefficients,
//!              attention (q|k|v, o, lse, indexer) and feed-forward (h13, g, MoE) activations
//!              (the L main layers, then the MTP blocks that run)
//! mtp          the MTP blocks' own activations (module `mtp`)
//! ```

use super::attention::AttnActs;
use super::ffn::FfnActs;
use super::mtp::MtpWs;
use super::residual::{HcScratch, NormActs};
use crate::config::{ModelConfig, Residual};
use crate::dsa::{DsaRun, DsaStats};
use crate::engram::{EngramActs, SparseGrad};
use crate::mhc::{self, HcActs, HcDims};

/// Activations of one training batch, kept for the backward pass, plus backward scratch.
#[derive(Default)]
pub struct Workspace {
    pub(crate) b: usize,
    pub(crate) t: usize,
    /// Main layers `L` of the model the buffers are sized for.
    pub(crate) n_layers: usize,
    /// The embedding `[N, d]` (plain: also `streams[0]`'s source; hc: expanded into it).
    pub(crate) x0: Vec<f32>,
    /// Residual stream entering each sublayer and after the last: `2L + 1` × `[N, w]`.
    pub(crate) streams: Vec<Vec<f32>>,
    /// hc/mhc: per-stream sums of squares `[N, n]` of each entry of `streams` (empty when plain).
    pub(crate) ssq: Vec<Vec<f32>>,
    pub(crate) layers: Vec<LayerActs>,
    /// hc/mhc: the collapse before the final norm (`head.y`: the collapsed stream `[N, d]`).
    pub(crate) hc_head: HcActs,
    /// The final norm of the last stream (or of the collapse).
    pub(crate) norm_f: NormActs,
    /// `[n, V]` logits; replaced by their gradient during the backward pass.
    pub logits: Vec<f32>,
    pub(crate) losses: Vec<f32>,
    /// Backward scratch: `dL/dstream` `[N, w]`, `dL/d(normed input)` `[N, d]`, and the
    /// sublayers' own.
    pub(crate) dx: Vec<f32>,
    pub(crate) dtmp: Vec<f32>,
    pub(crate) dqkv: Vec<f32>,
    pub(crate) dattn: Vec<f32>,
    pub(crate) dh13: Vec<f32>,
    pub(crate) dg: Vec<f32>,
    pub(crate) hcs: HcScratch,
    /// Sum over MoE layers of the sequence-wise balance loss of the last forward pass.
    pub aux_loss: f64,
    /// Weight λ of the MTP loss in the passes run with this workspace (`train.mtp_weight`): a
    /// model with MTP blocks runs them (and [`Model::forward_backward`] trains them) only when
    /// it is > 0 and the backbone is not frozen. 0 by default: evaluation and inference
    /// workspaces do not run them.
    pub mtp_weight: f32,
    /// The MTP loss of the last [`Model::forward_backward`]: the mean over the MTP blocks of
    /// each one's mean cross-entropy (0 when they did not run).
    pub mtp_loss: f64,
    /// The MTP blocks' own activations and backward scratch.
    pub(crate) mtp: MtpWs,
    /// Engram activations of the last forward pass (positions, gates, lookups).
    pub(crate) eng: EngramWs,
    /// After a backward pass: each Engram table's sparse gradient, already scaled by
    /// `grad_scale`.
    pub engram_table_grads: Vec<SparseGrad>,
    pub(crate) residual: Residual,
    /// DSA: what the last forward pass did, and its stats.
    pub(crate) dsa_run: Option<DsaRun>,
    /// Memory-only fine-tuning (`--train-only engram`): the backbone is frozen, so the backward
    /// pass skips its weight-gradient GEMMs (those gradients stay untouched) and stops after the
    /// lowest Engram block (nothing below it is trained). Engram gate and table gradients are
    /// exact.
    pub frozen_backbone: bool,
    /// Stop the forward pass after the last layer: no final norm, no output projection, no
    /// logits. For passes that only need the layers' activations (the MoE balancing sample).
    pub skip_head: bool,
    /// Keep the selection of the previous forward pass (tests: finite differences with the
    /// top-k fixed).
    pub(crate) dsa_freeze_selection: bool,
    pub dsa_stats: DsaStats,
    /// DSA recall: the dense attention's output and lse (scratch).
    pub(crate) dsa_o: Vec<f32>,
    pub(crate) dsa_lse: Vec<f32>,
}

/// Engram activations of a training batch: positions inside documents `[N]`, per-layer gate
/// activations and lookups, the gate output `[N, w]` and its gradient scratch.
#[derive(Default)]
pub(crate) struct EngramWs {
    pub(crate) pos: Vec<u32>,
    pub(crate) acts: Vec<EngramActs>,
    pub(crate) y: Vec<f32>,
    pub(crate) dy: Vec<f32>,
}

/// One block's activations.
#[derive(Default)]
pub(crate) struct LayerActs {
    /// The norms of the attention (`[0]`) and feed-forward (`[1]`) sublayers.
    pub(crate) norm: [NormActs; 2],
    /// Their hyper-connection coefficients and outputs (hc/mhc; default-empty when plain).
    pub(crate) hc: [HcActs; 2],
    pub(crate) attn: AttnActs,
    pub(crate) ffn: FfnActs,
}

impl LayerActs {
    /// The activations of block `l` of `c` over `n` rows.
    pub(crate) fn new(c: &ModelConfig, l: usize, n: usize) -> Self {
        let hc = |_| match HcDims::from_config(c) {
            Some(dm) => HcActs::new(&dm, n, false),
            None => HcActs::default(),
        };
        LayerActs {
            norm: [NormActs::new(n, c.d_model), NormActs::new(n, c.d_model)],
            hc: [hc(0), hc(1)],
            attn: AttnActs::new(c, n),
            ffn: FfnActs::new(c, l, n),
        }
    }
}

impl Workspace {
    /// A workspace whose forward passes stop after the last layer (`skip_head`).
    pub fn headless() -> Workspace {
        Workspace {
            skip_head: true,
            ..Workspace::default()
        }
    }

    /// Engram gate values `a` of the last forward pass, per Engram layer `[N, n]` (token-major,
    /// `n` streams); empty without Engram.
    pub fn engram_gates(&self) -> Vec<Vec<f32>> {
        self.eng.acts.iter().map(|a| a.gate.gates()).collect()
    }

    /// Tokens routed to each expert of each layer in the last forward pass (`None` for dense
    /// layers).
    pub fn moe_loads(&self) -> Vec<Option<&[u64]>> {
        self.layers
            .iter()
            .map(|l| {
                if l.ffn.moe.load.is_empty() {
                    None
                } else {
                    Some(&l.ffn.moe.load[..])
                }
            })
            .collect()
    }

    /// DSA: layer `l`'s top-k selection of the last (sparse) forward pass: key rows
    /// `[b·t, k_max]` (−1 = unused slot), and `k_max`.
    pub fn dsa_selection(&self, l: usize) -> Option<(&[i32], usize)> {
        let da = &self.layers.get(l)?.attn.dsa;
        (!da.idx.is_empty()).then_some((&da.idx[..], da.k_max))
    }

    /// DSA activations of layer `l` (indexer projections, selection).
    #[cfg(test)]
    pub(crate) fn dsa(&self, l: usize) -> &crate::dsa::DsaActs {
        &self.layers[l].attn.dsa
    }

    /// Router scores `[N, E]` of each layer in the last forward pass (empty for dense layers).
    pub fn moe_scores(&self) -> Vec<&[f32]> {
        self.layers.iter().map(|l| &l.ffn.moe.scores[..]).collect()
    }

    /// The feed-forward input (normed) of block `l` in the last forward pass: the MoE router's
    /// input `[N, d]`.
    pub(crate) fn ffn_input(&self, l: usize) -> &[f32] {
        self.layers.get(l).map_or(&[], |la| &la.norm[1].y[..])
    }

    /// The stream layout `[N, n, d]` entering sublayer `s` (attention of layer l is `2l`, its
    /// FFN `2l + 1`, `2L` is after the last) of the last forward pass; `None` when plain.
    /// (The Engram module's per-branch gate reads each stream from here.)
    pub fn hc_streams(&self, s: usize) -> Option<&[f32]> {
        if self.residual.is_plain() {
            return None;
        }
        self.streams.get(s).map(|v| &v[..])
    }

    /// Amax gain magnitudes of the composite residual mapping (see [`mhc::amax_gains`]) over the
    /// first sequence of the last forward pass, per hyper-connection layer:
    /// `[composite fwd, composite bwd, single-layer fwd, single-layer bwd]`.
    pub fn hc_amax(&self) -> Option<Vec<[f64; 4]>> {
        if self.residual.is_plain() || self.layers.is_empty() {
            return None;
        }
        let n = self.layers[0].hc[0].pre.len() / (self.b * self.t);
        let layers: Vec<&[f32]> = self.layers[..self.n_layers]
            .iter()
            .flat_map(|la| la.hc.iter().map(|a| &a.comb[..]))
            .collect();
        Some(mhc::amax_gains(&layers, n, self.t))
    }

    /// Where the last forward pass first produced a non-finite value: the residual stream after
    /// a sublayer, or (hc/mhc) a sublayer's coefficients. For error messages after a NaN loss.
    pub fn first_nonfinite(&self) -> Option<String> {
        let bad = |v: &[f32]| v.iter().any(|x| !x.is_finite());
        let plain = self.residual.is_plain();
        let what = |s: usize| {
            let part = if s.is_multiple_of(2) {
                "attention"
            } else {
                "FFN"
            };
            if plain {
                format!("the {part} of layer {}", s / 2)
            } else {
                format!("layer {} ({part})", s / 2)
            }
        };
        let nl = self.n_layers;
        let what = |l: usize, s: usize| {
            if l < nl {
                what(s)
            } else {
                let part = if s.is_multiple_of(2) {
                    "attention"
                } else {
                    "FFN"
                };
                format!("MTP block {} ({part})", l - nl)
            }
        };
        for (l, la) in self.layers.iter().enumerate() {
            for (k, a) in la.hc.iter().enumerate() {
                let s = 2 * l + k;
                let what = |s| what(l, s);
                if !plain {
                    if bad(&a.pre) || bad(&a.post) || bad(&a.comb) {
                        return Some(format!(
                            "non-finite hyper-connection coefficients (H_pre/H_post/H_res) in {}",
                            what(s)
                        ));
                    }
                    if bad(&a.out) {
                        return Some(format!("sublayer output of {}", what(s)));
                    }
                }
                if bad(&self.streams[block_stream(nl, l) + k + 1]) {
                    return Some(if plain {
                        format!("residual stream after {}", what(s))
                    } else {
                        format!("residual streams after {}", what(s))
                    });
                }
            }
        }
        if bad(&self.logits) {
            return Some("logits".into());
        }
        None
    }

    /// MTP blocks the passes of this workspace run on model `c` (see `mtp_weight`).
    pub(crate) fn mtp_depths(&self, c: &ModelConfig) -> usize {
        if self.mtp_weight > 0.0 && !self.frozen_backbone {
            c.mtp_layers()
        } else {
            0
        }
    }

    /// Size every buffer for a batch `[b, t]` of model `c` (a no-op when already sized).
    pub(crate) fn ensure(&mut self, c: &ModelConfig, b: usize, t: usize) {
        let depths = self.mtp_depths(c);
        if self.b == b
            && self.t == t
            && self.n_layers == c.n_layers
            && self.layers.len() == c.n_layers + depths
            && self.residual == c.residual
        {
            return;
        }
        self.ensure_main(c, b, t);
        self.ensure_mtp(c, depths);
    }

    /// Size the buffers of `depths` MTP blocks (dropping or adding blocks after the main ones;
    /// the main buffers are sized for `c` already).
    pub(crate) fn ensure_mtp(&mut self, c: &ModelConfig, depths: usize) {
        let nl = self.n_layers;
        if self.layers.len() == nl + depths && self.mtp.depths.len() == depths {
            return;
        }
        let n = self.b * self.t;
        let hcd = HcDims::from_config(c);
        let nh = hcd.map_or(1, |dm| dm.n);
        let ns = block_stream(nl, nl + depths); // 2L + 1 + 3·depths
        self.streams
            .resize_with(ns, || vec![0.0; n * nh * c.d_model]);
        if hcd.is_some() {
            self.ssq.resize_with(ns, || vec![0.0; n * nh]);
        }
        self.layers.truncate(nl);
        self.layers
            .extend((nl..nl + depths).map(|l| LayerActs::new(c, l, n)));
        self.mtp = MtpWs::new(c, n, depths);
    }

    fn ensure_main(&mut self, c: &ModelConfig, b: usize, t: usize) {
        let n = b * t;
        let d = c.d_model;
        let z = |len: usize| vec![0.0f32; len];
        self.b = b;
        self.t = t;
        self.n_layers = c.n_layers;
        self.residual = c.residual;
        let hcd = HcDims::from_config(c);
        let nh = hcd.map_or(1, |dm| dm.n);
        let ns = 2 * c.n_layers;
        self.x0 = z(n * d);
        self.streams = (0..=ns).map(|_| z(n * nh * d)).collect();
        self.ssq = match hcd {
            Some(_) => (0..=ns).map(|_| z(n * nh)).collect(),
            None => Vec::new(),
        };
        self.layers = (0..c.n_layers).map(|l| LayerActs::new(c, l, n)).collect();
        self.hc_head = hcd.map_or_else(HcActs::default, |dm| HcActs::new(&dm, n, true));
        self.norm_f = NormActs::new(n, d);
        self.logits = z(n * c.vocab_size);
        self.losses = z(n);
        self.dx = z(n * nh * d);
        self.dtmp = z(n * d);
        self.dqkv = z(n * c.qkv_dim());
        self.dattn = z(n * c.n_heads * c.head_dim);
        self.dh13 = z(n * 2 * c.ffn_hidden);
        self.dg = z(n * c.ffn_hidden);
        self.hcs = hcd.map_or_else(HcScratch::default, |dm| HcScratch::new(&dm, n, d));
    }
}

/// Index in `Workspace::streams` of the stream entering block `l` of a model with `nl` main
/// layers (its sublayers' outputs follow): `2l` for a main layer (the output of one is the
/// input of the next), `2L + 1 + 3j` for MTP block `j = l − L` (it starts from the main
/// model's last stream `2L`, or MTP block `j − 1`'s output, through its own input
/// projections).
pub(crate) fn block_stream(nl: usize, l: usize) -> usize {
    if l < nl {
        2 * l
    } else {
        2 * nl + 1 + 3 * (l - nl)
    }
}
