//! The dense decoder-only transformer ("V4-mini dense"): pre-norm blocks of causal GQA
//! attention with partial RoPE and a SwiGLU feed-forward, RMSNorm everywhere.
//!
//! ```text
//! h⁰ = E[tokens]                                                   [n, d]   (n = B·T)
//! a  = RMSNorm(hˡ)          q|k|v = a·[Wq; Wk; Wv]ᵀ                [n, (H+2KV)·d_h]
//! q, k ← RoPE(q, k)         o = CausalAttn(q, k, v)                [n, H·d_h]
//! m  = hˡ + o·Woᵀ
//! f  = RMSNorm(m)           g = silu(f·W1ᵀ) ⊙ (f·W3ᵀ)              [n, F]
//! hˡ⁺¹ = m + g·W2ᵀ
//! logits = RMSNorm(hᴸ)·Woutᵀ      (Wout = E when embeddings are tied)  [n, V]
//! loss = mean CE(logits, targets)   over the targets ≠ cross_entropy::IGNORE (masked rows: 0
//!                                     loss, 0 gradient; the mean divides by the counted ones)
//! ```
//!
//! With `residual = "hc" | "mhc"` the residual stream is `n = hc_mult` streams `[n_tok, n, d]`
//! (module [`crate::mhc`]): expanded once after the embedding, each sublayer reads
//! `y = Σ_j H_pre[j]·x[j]`, computes `F(RMSNorm(y))` and merges `x ← H_resᵀ-mix(x) + H_post ⊗ F`,
//! and the streams are collapsed once before the final norm (mHC head or HC sum). Each
//! sublayer's hyper-connection tensors (`layers.{i}.attn_hc.*`, `layers.{i}.ffn_hc.*`) sit
//! just before its norm weight in the flat buffer; `hc_head.*` just before `norm.weight`. The
//! plain path is a separate function and unchanged.
//!
//! With Engram (module [`crate::engram`]) block `l ∈ layer_ids` first adds `y = gate(e, hˡ)` to
//! its input (`e` gathered from the table by hashed N-grams before the blocks run). A
//! frozen-backbone backward (`Workspace::frozen_backbone`, memory-only fine-tuning) propagates
//! only `dL/dh` (no `dW = dYᵀ·X` GEMMs of the frozen linear weights, no embedding gradient;
//! MoE experts, hyper-connections and the O(d) norm weights still compute theirs) and stops
//! after the lowest Engram block: the gate and table gradients are exactly the full ones.
//!
//! All parameters live in one flat `Vec<f32>` (and the gradients in one of the same layout),
//! so the optimiser and gradient clipping are single loops. Within a layer `wq, wk, wv` are
//! adjacent and so form one `[(H+2KV)·d_h, d]` matrix (one GEMM for q, k and v); `w1, w3`
//! likewise form `[2F, d]`. Linear weights are stored `[out, in]` as in PyTorch.
//!
//! **Initialisation** ([`Model::init`]): every matrix and the embedding ~ N(0, init_std²); the
//! two projections that write into the residual stream (`wo`, `w2`) are further scaled by
//! `1/√(2·n_layers)` (GPT-2); RMSNorm weights are 1.

use crate::config::{ModelConfig, Residual};
use crate::dsa::{self, DsaActs, DsaRun, DsaStage, DsaStats, IndexerOffsets};
use crate::engram::{self, CompressedTokenizer, Engram, EngramActs, SparseGrad};
use crate::kernels::attention::{self, AttnDims, Heads, QkvLayout};
use crate::kernels::matmul::{linear_backward_frozen, linear_forward};
use crate::kernels::rope::RopeTable;
use crate::kernels::sparse_attention::{self, SparseDims};
use crate::kernels::{cross_entropy, embedding, rmsnorm, swiglu};
use crate::mhc::{self, HcActs, HcDims, HcOffsets};
use crate::moe::{self, MoeActs, MoeOffsets, MoeSpec};
use crate::rng::Rng;
use anyhow::Context;

/// A named tensor inside the flat parameter buffer.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    /// Whether AdamW applies weight decay (matrices yes; norms and embeddings no).
    pub decay: bool,
    /// Whether the optimizer updates it (the MoE selection bias is moved by the balancing
    /// rule instead, see `moe::update_bias`).
    pub trainable: bool,
}

impl TensorSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// Offsets of one layer's tensors.
#[derive(Clone, Debug)]
pub struct LayerOffsets {
    pub attn_norm: usize,
    /// `wq`, `wk`, `wv` back to back.
    pub wqkv: usize,
    pub wo: usize,
    pub ffn_norm: usize,
    pub ffn: Ffn,
    /// Hyper-connection layers of the attention and FFN sublayers (`residual` = hc/mhc).
    pub attn_hc: Option<HcOffsets>,
    pub ffn_hc: Option<HcOffsets>,
    /// The DSA lightning indexer (`layers.{i}.indexer.*`, right after `wo`), DSA models only.
    pub indexer: Option<IndexerOffsets>,
}

/// The feed-forward of a layer.
#[derive(Clone, Copy, Debug)]
pub enum Ffn {
    /// SwiGLU of width `ffn_hidden`: `w13` = `w1` (gate) then `w3` (up), then `w2`.
    Dense {
        w13: usize,
        w2: usize,
    },
    Moe(MoeOffsets),
}

/// Where every tensor sits in the flat buffer.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub tensors: Vec<TensorSpec>,
    pub embed: usize,
    pub layers: Vec<LayerOffsets>,
    pub norm: usize,
    /// Output projection; equals `embed` when tied.
    pub output: usize,
    /// The mHC collapse head (`hc_head.{fn,scale,base}`), mHC only.
    pub hc_head: Option<HcOffsets>,
    /// Offset of each Engram layer's gate parameters (`layers.{l}.engram.*`, laid out by
    /// `GateSpec::offsets`), in `engram.layer_ids` order.
    pub engram_gate: Vec<usize>,
    pub total: usize,
}

#[derive(Default)]
struct LayoutBuilder {
    tensors: Vec<TensorSpec>,
    off: usize,
}

impl LayoutBuilder {
    fn add_t(&mut self, name: String, shape: Vec<usize>, decay: bool, trainable: bool) -> usize {
        let o = self.off;
        self.off += shape.iter().product::<usize>();
        self.tensors.push(TensorSpec {
            name,
            shape,
            offset: o,
            decay,
            trainable,
        });
        o
    }
    fn add(&mut self, name: String, shape: Vec<usize>, decay: bool) -> usize {
        self.add_t(name, shape, decay, true)
    }
    /// The tensors of one hyper-connection layer, `{prefix}.{fn,scale,base}` (mHC) or
    /// `{prefix}.{fn,scale,static_alpha,static_beta}` (HC).
    fn add_hc(&mut self, prefix: &str, dm: &HcDims) -> HcOffsets {
        let offs: Vec<usize> = dm
            .layer_tensors()
            .into_iter()
            .map(|(suffix, shape, decay)| self.add(format!("{prefix}.{suffix}"), shape, decay))
            .collect();
        HcOffsets {
            fn_: offs[0],
            scale: offs[1],
            stat: offs[2],
        }
    }
}

impl ParamLayout {
    pub fn new(c: &ModelConfig) -> Self {
        let mut bld = LayoutBuilder::default();
        let (d, hd, f) = (c.d_model, c.head_dim, c.ffn_hidden);
        let embed = bld.add("tok_embeddings.weight".into(), vec![c.vocab_size, d], false);
        let hcd = HcDims::from_config(c);
        let mut layers = Vec::new();
        let ec = c.engram.as_ref();
        let mut engram_gate = vec![0; ec.map_or(0, |e| e.layer_ids.len())];
        for i in 0..c.n_layers {
            let p = |s: &str| format!("layers.{i}.{s}");
            if let Some(k) = ec.and_then(|e| e.layer_ids.iter().position(|&l| l == i)) {
                // The Engram gate of this block (no weight decay: the paper's Engram uses 0).
                let spec = engram_gate_spec(c);
                let base = bld.off;
                for (name, shape, off) in spec.tensors() {
                    let o = bld.add(p(&format!("engram.{name}")), shape, false);
                    debug_assert_eq!(o, base + off);
                }
                engram_gate[k] = base;
            }
            let attn_hc = hcd.map(|dm| bld.add_hc(&p("attn_hc"), &dm));
            let attn_norm = bld.add(p("attention_norm.weight"), vec![d], false);
            let wqkv = bld.add(p("attention.wq.weight"), vec![c.n_heads * hd, d], true);
            bld.add(p("attention.wk.weight"), vec![c.n_kv_heads * hd, d], true);
            bld.add(p("attention.wv.weight"), vec![c.n_kv_heads * hd, d], true);
            let wo = bld.add(p("attention.wo.weight"), vec![d, c.n_heads * hd], true);
            let indexer = c.dsa.as_ref().map(|x| {
                let (hi, di) = (x.index_n_heads, x.index_head_dim);
                IndexerOffsets {
                    wq: bld.add(p("indexer.wq"), vec![hi * di, d], true),
                    wk: bld.add(p("indexer.wk"), vec![di, d], true),
                    k_norm_w: bld.add(p("indexer.k_norm.weight"), vec![di], false),
                    k_norm_b: bld.add(p("indexer.k_norm.bias"), vec![di], false),
                    wproj: bld.add(p("indexer.weights_proj"), vec![hi, d], true),
                }
            });
            let ffn_hc = hcd.map(|dm| bld.add_hc(&p("ffn_hc"), &dm));
            let ffn_norm = bld.add(p("ffn_norm.weight"), vec![d], false);
            let ffn = if c.is_moe(i) {
                let (e, mi, si) = (
                    c.n_routed_experts,
                    c.moe_inter,
                    c.n_shared_experts * c.moe_inter,
                );
                let gate = bld.add(p("ffn.gate.weight"), vec![e, d], true);
                let bias = bld.add_t(p("ffn.gate.bias"), vec![e], false, false);
                let (mut shared_w13, mut shared_w2) = (0, 0);
                if si > 0 {
                    shared_w13 = bld.add(p("ffn.shared_experts.w1.weight"), vec![si, d], true);
                    bld.add(p("ffn.shared_experts.w3.weight"), vec![si, d], true);
                    shared_w2 = bld.add(p("ffn.shared_experts.w2.weight"), vec![d, si], true);
                }
                let mut experts = 0;
                for x in 0..e {
                    let o = bld.add(p(&format!("ffn.experts.{x}.w1.weight")), vec![mi, d], true);
                    bld.add(p(&format!("ffn.experts.{x}.w3.weight")), vec![mi, d], true);
                    bld.add(p(&format!("ffn.experts.{x}.w2.weight")), vec![d, mi], true);
                    if x == 0 {
                        experts = o;
                    }
                }
                Ffn::Moe(MoeOffsets {
                    gate,
                    bias,
                    shared_w13,
                    shared_w2,
                    experts,
                    hash: c.is_hash(i),
                })
            } else {
                let w13 = bld.add(p("feed_forward.w1.weight"), vec![f, d], true);
                bld.add(p("feed_forward.w3.weight"), vec![f, d], true);
                let w2 = bld.add(p("feed_forward.w2.weight"), vec![d, f], true);
                Ffn::Dense { w13, w2 }
            };
            layers.push(LayerOffsets {
                attn_norm,
                wqkv,
                wo,
                ffn_norm,
                ffn,
                attn_hc,
                ffn_hc,
                indexer,
            });
        }
        let hc_head = hcd.filter(|_| c.residual == Residual::Mhc).map(|dm| {
            let n = dm.n;
            let f = bld.add("hc_head.fn".into(), vec![n, n * d], true);
            let sc = bld.add("hc_head.scale".into(), vec![1], false);
            let b = bld.add("hc_head.base".into(), vec![n], false);
            HcOffsets {
                fn_: f,
                scale: sc,
                stat: b,
            }
        });
        let norm = bld.add("norm.weight".into(), vec![d], false);
        let output = if c.tied_embeddings {
            embed
        } else {
            bld.add("output.weight".into(), vec![c.vocab_size, d], true)
        };
        ParamLayout {
            tensors: bld.tensors,
            embed,
            layers,
            norm,
            output,
            hc_head,
            engram_gate,
            total: bld.off,
        }
    }

    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// The Engram gate shapes of a model (`n` streams with hc/mhc, else 1).
pub fn engram_gate_spec(c: &ModelConfig) -> engram::GateSpec {
    let n = if c.residual.is_plain() { 1 } else { c.hc_mult };
    c.engram
        .as_ref()
        .expect("an Engram config")
        .gate_spec(c.d_model, n)
}

/// Whether a parameter belongs to a DSA lightning indexer (`layers.{i}.indexer.*`).
pub fn is_indexer_tensor(name: &str) -> bool {
    name.contains(".indexer.")
}

/// Whether a parameter is an Engram gate parameter.
pub fn is_engram_tensor(name: &str) -> bool {
    name.contains(".engram.")
}

/// Parameter counts by kind, for the start-of-run summary.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ParamCounts {
    pub total: usize,
    /// Parameters that one token uses: everything but the routed experts it is not sent to.
    pub activated: usize,
    pub embedding: usize,
    pub attention: usize,
    pub dense_ffn: usize,
    pub router: usize,
    pub shared_experts: usize,
    pub routed_experts: usize,
    pub norms: usize,
    pub output: usize,
    /// Hyper-connection parameters (hc/mhc residual).
    pub hyper_connections: usize,
    /// Engram gate parameters (in the flat buffer) and table entries (outside it).
    pub engram_gates: usize,
    pub engram_tables: usize,
}

/// The model: config, flat parameters, their layout, and the RoPE table.
pub struct Model {
    pub cfg: ModelConfig,
    pub layout: ParamLayout,
    pub params: Vec<f32>,
    pub rope: RopeTable,
    /// Token id → experts table `[V, top_k]` of each hash-routed MoE layer (`None` elsewhere).
    pub hash_tables: Vec<Option<Vec<u32>>>,
    /// Quantised copies of linear weights (keyed by their offset in `params`, possibly spanning
    /// a fused range such as q|k|v), used by one-token decoding when present (GGUF models).
    pub quant: std::collections::HashMap<usize, crate::kernels::quant::QMatrix>,
    /// Engram memory (`cfg.engram`): compression, hashes and tables. Its gate parameters live
    /// in `params` (`layout.engram_gate`); `EngramLayer::params` is only a copy for saving
    /// ([`Model::sync_engram_gates`]).
    pub engram: Option<Engram>,
    /// End-of-text id of the tokenizer: Engram's hash and convolution restart after it.
    pub engram_eot: Option<u32>,
    /// Rotate-half RoPE table of the DSA indexer (`cfg.dsa`; dims `0..index_rope_dim`).
    pub index_rope: Option<RopeTable>,
}

/// Activations of one training batch, kept for the backward pass, plus backward scratch.
/// Allocated once per (B, T) and reused every step.
#[derive(Default)]
pub struct Workspace {
    b: usize,
    t: usize,
    /// Residual stream entering each layer, and after the last: `n_layers + 1` × `[n, d]`.
    xs: Vec<Vec<f32>>,
    layers: Vec<LayerActs>,
    rstd_f: Vec<f32>,
    hf: Vec<f32>,
    /// `[n, V]` logits; replaced by their gradient during the backward pass.
    pub logits: Vec<f32>,
    losses: Vec<f32>,
    dx: Vec<f32>,
    dtmp: Vec<f32>,
    dqkv: Vec<f32>,
    dattn: Vec<f32>,
    dh13: Vec<f32>,
    dg: Vec<f32>,
    /// Sum over MoE layers of the sequence-wise balance loss of the last forward pass.
    pub aux_loss: f64,
    /// Engram: positions in documents `[N]`, per-layer activations, the gate output `[N, n, d]`
    /// and scratch, and (after a backward pass) each table's sparse gradient, already scaled
    /// by `grad_scale`.
    eng_pos: Vec<u32>,
    eng_acts: Vec<EngramActs>,
    eng_y: Vec<f32>,
    eng_dy: Vec<f32>,
    pub engram_table_grads: Vec<SparseGrad>,
    /// Streams and coefficients of the hyper-connection residual (empty when plain).
    hc: HcWorkspace,
    residual: Residual,
    /// DSA: per-layer indexer activations, what the last forward pass did, and its stats.
    pub(crate) dsa: Vec<DsaActs>,
    dsa_run: Option<DsaRun>,
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
    dsa_o: Vec<f32>,
    dsa_lse: Vec<f32>,
}

/// The `n`-stream residual of one batch (hc/mhc) and its backward scratch.
#[derive(Default)]
struct HcWorkspace {
    /// The streams `[N, n, d]` entering every sublayer and after the last: `2L + 1` of them.
    streams: Vec<Vec<f32>>,
    /// Per-stream sums of squares `[N, n]` of each entry of `streams`.
    ssq: Vec<Vec<f32>>,
    /// One per sublayer (attention of layer l is `2l`, its FFN `2l + 1`).
    acts: Vec<HcActs>,
    /// The collapse: `head.y` is the collapsed stream `[N, d]` fed to the final norm.
    head: HcActs,
    dxs: Vec<f32>,
    dxs2: Vec<f32>,
    dout: Vec<f32>,
    dy: Vec<f32>,
    dcoef: Vec<f32>,
    draw: Vec<f32>,
}

#[derive(Default)]
struct LayerActs {
    rstd1: Vec<f32>,
    a: Vec<f32>,
    qkv: Vec<f32>,
    o: Vec<f32>,
    lse: Vec<f32>,
    xmid: Vec<f32>,
    rstd2: Vec<f32>,
    f: Vec<f32>,
    h13: Vec<f32>,
    g: Vec<f32>,
    moe: MoeActs,
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
        self.eng_acts.iter().map(|a| a.gate.gates()).collect()
    }

    /// Tokens routed to each expert of each layer in the last forward pass (`None` for dense
    /// layers).
    pub fn moe_loads(&self) -> Vec<Option<&[u64]>> {
        self.layers
            .iter()
            .map(|l| {
                if l.moe.load.is_empty() {
                    None
                } else {
                    Some(&l.moe.load[..])
                }
            })
            .collect()
    }

    /// DSA: layer `l`'s top-k selection of the last (sparse) forward pass: key rows
    /// `[b·t, k_max]` (−1 = unused slot), and `k_max`.
    pub fn dsa_selection(&self, l: usize) -> Option<(&[i32], usize)> {
        let da = self.dsa.get(l)?;
        (!da.idx.is_empty()).then_some((&da.idx[..], da.k_max))
    }

    /// Router scores `[N, E]` of each layer in the last forward pass (empty for dense layers).
    pub fn moe_scores(&self) -> Vec<&[f32]> {
        self.layers.iter().map(|l| &l.moe.scores[..]).collect()
    }

    /// The stream layout `[N, n, d]` entering sublayer `s` (attention of layer l is `2l`, its
    /// FFN `2l + 1`, `2L` is after the last) of the last forward pass; `None` when plain.
    /// (The Engram module's per-branch gate reads each stream from here.)
    pub fn hc_streams(&self, s: usize) -> Option<&[f32]> {
        self.hc.streams.get(s).map(|v| &v[..])
    }

    /// Amax gain magnitudes of the composite residual mapping (see [`mhc::amax_gains`]) over the
    /// first sequence of the last forward pass, per hyper-connection layer:
    /// `[composite fwd, composite bwd, single-layer fwd, single-layer bwd]`.
    pub fn hc_amax(&self) -> Option<Vec<[f64; 4]>> {
        if self.residual == Residual::Plain || self.hc.acts.is_empty() {
            return None;
        }
        let n = self.hc.acts[0].pre.len() / (self.b * self.t);
        let layers: Vec<&[f32]> = self.hc.acts.iter().map(|a| &a.comb[..]).collect();
        Some(mhc::amax_gains(&layers, n, self.t))
    }

    /// Where the last forward pass first produced a non-finite value: the residual stream after
    /// a layer, or (hc/mhc) a sublayer's coefficients. For error messages after a NaN loss.
    pub fn first_nonfinite(&self) -> Option<String> {
        let bad = |v: &[f32]| v.iter().any(|x| !x.is_finite());
        if self.residual == Residual::Plain {
            for (l, la) in self.layers.iter().enumerate() {
                if bad(&la.xmid) {
                    return Some(format!("residual stream after the attention of layer {l}"));
                }
                if bad(&self.xs[l + 1]) {
                    return Some(format!("residual stream after the FFN of layer {l}"));
                }
            }
        } else {
            let what = |s: usize| {
                format!(
                    "layer {} ({})",
                    s / 2,
                    if s.is_multiple_of(2) {
                        "attention"
                    } else {
                        "FFN"
                    }
                )
            };
            for (s, a) in self.hc.acts.iter().enumerate() {
                if bad(&a.pre) || bad(&a.post) || bad(&a.comb) {
                    return Some(format!(
                        "non-finite hyper-connection coefficients (H_pre/H_post/H_res) in {}",
                        what(s)
                    ));
                }
                if bad(&a.out) {
                    return Some(format!("sublayer output of {}", what(s)));
                }
                if bad(&self.hc.streams[s + 1]) {
                    return Some(format!("residual streams after {}", what(s)));
                }
            }
        }
        if bad(&self.logits) {
            return Some("logits".into());
        }
        None
    }

    fn ensure(&mut self, c: &ModelConfig, b: usize, t: usize) {
        if self.b == b
            && self.t == t
            && self.layers.len() == c.n_layers
            && self.residual == c.residual
        {
            return;
        }
        let n = b * t;
        let (d, f, ho) = (c.d_model, c.ffn_hidden, c.n_heads * c.head_dim);
        let z = |len: usize| vec![0.0f32; len];
        self.b = b;
        self.t = t;
        self.residual = c.residual;
        let plain = c.residual == Residual::Plain;
        // With hyper-connections only xs[0] (the embedding) is used.
        let nxs = if plain { c.n_layers + 1 } else { 1 };
        self.xs = (0..nxs).map(|_| z(n * d)).collect();
        self.layers = (0..c.n_layers)
            .map(|l| (l, if c.is_moe(l) { 0 } else { f }))
            .map(|(_, f)| LayerActs {
                rstd1: z(n),
                a: z(n * d),
                qkv: z(n * c.qkv_dim()),
                o: z(n * ho),
                lse: z(b * c.n_heads * t),
                xmid: if plain { z(n * d) } else { vec![] },
                rstd2: z(n),
                f: z(n * d),
                h13: z(n * 2 * f),
                g: z(n * f),
                moe: MoeActs::default(),
            })
            .collect();
        self.rstd_f = z(n);
        self.hf = z(n * d);
        self.logits = z(n * c.vocab_size);
        self.losses = z(n);
        self.dx = z(n * d);
        self.dtmp = z(n * d);
        self.dqkv = z(n * c.qkv_dim());
        self.dattn = z(n * ho);
        self.dh13 = z(n * 2 * f);
        self.dg = z(n * f);
        self.hc = HcWorkspace::default();
        self.dsa = (0..c.n_layers).map(|_| DsaActs::default()).collect();
        if let Some(dm) = HcDims::from_config(c) {
            let nh = dm.n;
            let ns = 2 * c.n_layers;
            self.hc = HcWorkspace {
                streams: (0..=ns).map(|_| z(n * nh * d)).collect(),
                ssq: (0..=ns).map(|_| z(n * nh)).collect(),
                acts: (0..ns).map(|_| HcActs::new(&dm, n, false)).collect(),
                head: HcActs::new(&dm, n, true),
                dxs: z(n * nh * d),
                dxs2: z(n * nh * d),
                dout: z(n * d),
                dy: z(n * d),
                dcoef: z(n * (nh + nh * nh)),
                draw: Vec::new(),
            };
        }
    }
}

impl Model {
    /// A model with all-zero parameters (call [`Model::init`] or load weights).
    pub fn new(cfg: ModelConfig) -> Result<Self, crate::config::ConfigError> {
        cfg.validate()?;
        let layout = ParamLayout::new(&cfg);
        let rope = cfg.rope_table();
        let hash_tables = (0..cfg.n_layers)
            .map(|l| {
                cfg.is_hash(l)
                    .then(|| hash_table(cfg.vocab_size, cfg.n_routed_experts, cfg.top_k, &mut None))
            })
            .collect();
        // A placeholder Engram (identity compression over the model vocabulary) until
        // `init_engram` gives it the tokenizer's compression or a checkpoint replaces it.
        let engram = match &cfg.engram {
            Some(ec) => {
                let ident = CompressedTokenizer::from_lookup((0..cfg.vocab_size as u32).collect())
                    .map_err(|e| crate::config::ConfigError {
                        field: "engram",
                        problem: format!("{e:#}"),
                    })?;
                let nb = if cfg.residual.is_plain() {
                    1
                } else {
                    cfg.hc_mult
                };
                Some(
                    Engram::new(ec.clone(), ident, cfg.d_model, nb, 0, cfg.init_std).map_err(
                        |e| crate::config::ConfigError {
                            field: "engram",
                            problem: format!("{e:#}"),
                        },
                    )?,
                )
            }
            None => None,
        };
        let index_rope = dsa::rope_table(&cfg);
        Ok(Model {
            params: vec![0.0; layout.total],
            layout,
            rope,
            cfg,
            hash_tables,
            quant: Default::default(),
            engram,
            engram_eot: None,
            index_rope,
        })
    }

    /// (Re)initialise the Engram memory with the tokenizer compression `compress`: multipliers
    /// drawn for its `V'`, tables and gates from `seed` (gates copied into `params`).
    pub fn init_engram(&mut self, compress: CompressedTokenizer, seed: u64) -> anyhow::Result<()> {
        let Some(ec) = self.cfg.engram.clone() else {
            anyhow::bail!("the model has no Engram config");
        };
        let nb = engram_gate_spec(&self.cfg).n_branch;
        let e = Engram::new(ec, compress, self.cfg.d_model, nb, seed, self.cfg.init_std)?;
        for (l, &o) in e.layers.iter().zip(&self.layout.engram_gate) {
            self.params[o..o + l.params.len()].copy_from_slice(&l.params);
        }
        self.engram = Some(e);
        Ok(())
    }

    /// The gate parameters of Engram layer `i` (in the flat buffer).
    pub fn engram_gate_params(&self, i: usize) -> &[f32] {
        let o = self.layout.engram_gate[i];
        let n = self.engram.as_ref().expect("engram").layers[i]
            .gate
            .n_params();
        &self.params[o..o + n]
    }

    /// Copy the gate parameters from the flat buffer into the Engram layers (before saving
    /// the Engram file).
    pub fn sync_engram_gates(&mut self) {
        let Some(e) = self.engram.as_mut() else {
            return;
        };
        for (l, &o) in e.layers.iter_mut().zip(&self.layout.engram_gate) {
            let n = l.params.len();
            l.params.copy_from_slice(&self.params[o..o + n]);
        }
    }

    /// Engram: an error if a memory-mapped table's file vanished or changed size (call before
    /// a forward pass, which cannot return an error).
    pub fn check_engram_tables(&self) -> anyhow::Result<()> {
        if let Some(e) = &self.engram {
            for l in &e.layers {
                l.table.check()?;
            }
        }
        Ok(())
    }

    /// Engram: token ids must lie inside the compression table (the tokenizer's range).
    pub fn check_engram_tokens(&self, tokens: &[u32]) -> anyhow::Result<()> {
        if let Some(e) = &self.engram {
            let v = e.compress.tokenizer_vocab_size();
            if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= v) {
                anyhow::bail!(
                    "token id {bad} is outside the tokenizer's range 0..{v} (the Engram compression table)"
                );
            }
        }
        Ok(())
    }

    /// The documented initialisation (module docs), fully determined by `seed`.
    pub fn init(&mut self, seed: u64) {
        let mut rng = Rng::derived(seed, "init");
        let std = self.cfg.init_std;
        let resid_scale = 1.0 / (2.0 * self.cfg.n_layers as f32).sqrt();
        for t in &self.layout.tensors {
            let p = &mut self.params[t.range()];
            if is_hc_tensor(&t.name) || is_engram_tensor(&t.name) {
                continue; // below
            } else if !t.trainable || t.name.ends_with("indexer.k_norm.bias") {
                p.fill(0.0); // MoE selection bias, LayerNorm bias
            } else if t.shape.len() == 1 {
                p.fill(1.0);
            } else if t.name.ends_with("attention.wo.weight") || t.name.ends_with("w2.weight") {
                rng.fill_normal(p, std * resid_scale);
            } else {
                rng.fill_normal(p, std);
            }
        }
        if let Some(dm) = HcDims::from_config(&self.cfg) {
            let mut rng = Rng::derived(seed, "hyper-connections");
            let mut normal = |p: &mut [f32]| rng.fill_normal(p, std);
            for (l, lo) in self.layout.layers.iter().enumerate() {
                for (s, o) in [(2 * l, lo.attn_hc), (2 * l + 1, lo.ffn_hc)] {
                    if let Some(o) = o {
                        mhc::init_layer(&dm, &mut self.params, o, s, false, &mut normal);
                    }
                }
            }
            if let Some(o) = self.layout.hc_head {
                mhc::init_layer(&dm, &mut self.params, o, 0, true, &mut normal);
            }
        }
        if let Some(e) = self.engram.take() {
            self.init_engram(e.compress, seed)
                .expect("a validated Engram config initialises");
        }
        let mut rng = Some(Rng::derived(seed, "tid2eid"));
        let c = &self.cfg;
        for (l, tab) in self.hash_tables.iter_mut().enumerate() {
            if c.is_hash(l) {
                *tab = Some(hash_table(
                    c.vocab_size,
                    c.n_routed_experts,
                    c.top_k,
                    &mut rng,
                ));
            }
        }
    }

    pub fn counts(&self) -> ParamCounts {
        let mut c = ParamCounts {
            total: 0,
            activated: 0,
            embedding: 0,
            attention: 0,
            dense_ffn: 0,
            router: 0,
            shared_experts: 0,
            routed_experts: 0,
            norms: 0,
            output: 0,
            hyper_connections: 0,
            engram_gates: 0,
            engram_tables: 0,
        };
        for t in &self.layout.tensors {
            let n = t.len();
            c.total += n;
            let slot = if is_engram_tensor(&t.name) {
                &mut c.engram_gates
            } else if is_hc_tensor(&t.name) {
                &mut c.hyper_connections
            } else if t.name.starts_with("tok_embeddings") {
                &mut c.embedding
            } else if t.name == "output.weight" {
                &mut c.output
            } else if t.name.contains(".ffn.gate.") {
                &mut c.router
            } else if t.shape.len() == 1 {
                &mut c.norms
            } else if t.name.contains(".attention.") || t.name.contains(".indexer.") {
                &mut c.attention
            } else if t.name.contains(".shared_experts.") {
                &mut c.shared_experts
            } else if t.name.contains(".experts.") {
                &mut c.routed_experts
            } else {
                &mut c.dense_ffn
            };
            *slot += n;
        }
        let k_over_e = if self.cfg.n_routed_experts > 0 {
            self.cfg.top_k as f64 / self.cfg.n_routed_experts as f64
        } else {
            0.0
        };
        c.activated =
            c.total - c.routed_experts + (c.routed_experts as f64 * k_over_e).round() as usize;
        if let Some(e) = &self.engram {
            c.engram_tables = e
                .layers
                .iter()
                .map(|l| l.table.rows() * l.table.dim())
                .sum();
            // Each token reads H rows of D_h per layer.
            c.activated += e.layers.len() * e.cfg.d_mem();
        }
        c
    }

    /// Auxiliary-loss-free balancing after an optimizer step: every routed (non-hash) MoE
    /// layer's selection bias moves toward equal load (`loads` from the step's batches).
    pub fn update_moe_bias(&mut self, loads: &[Option<Vec<u64>>]) {
        let speed = self.cfg.bias_update_speed;
        for (lo, load) in self.layout.layers.iter().zip(loads) {
            if let (Ffn::Moe(mo), Some(load)) = (lo.ffn, load) {
                if !mo.hash {
                    let e = self.cfg.n_routed_experts;
                    moe::update_bias(&mut self.params[mo.bias..mo.bias + e], load, speed);
                }
            }
        }
    }

    /// The whole auxiliary-loss-free balancing after optimizer step `step`: the sign step on
    /// the step's `loads`, then (with `bias_fit_iters > 0`) the refit to the pooled router
    /// inputs `pools` (`bias_fit_window > 0`; the caller has pushed the step's batches, or with
    /// `bias_fit_sample` the fresh sample it forwarded after the optimizer step), to the
    /// last batch re-scored by the updated router (`bias_fit_rescore`), or to the scores that
    /// routed it (`ws`: the workspace of the step's last forward pass).
    pub fn balance_moe(
        &mut self,
        loads: &[Option<Vec<u64>>],
        ws: &Workspace,
        pools: &[moe::BiasPool],
        step: u64,
    ) {
        self.update_moe_bias(loads);
        let iters = self.cfg.bias_fit_iters;
        if iters == 0 {
            return;
        }
        let owned = if self.cfg.bias_fit_window > 0 {
            Some(self.moe_pool_scores(pools))
        } else if self.cfg.bias_fit_rescore {
            Some(self.moe_rescore(ws))
        } else {
            None
        };
        match owned {
            Some(sc) => {
                let sc: Vec<&[f32]> = sc.iter().map(|v| &v[..]).collect();
                self.fit_moe_bias(&sc, iters, step);
            }
            None => self.fit_moe_bias(&ws.moe_scores(), iters, step),
        }
    }

    /// Refit every routed layer's selection bias against the scores of the last batch with
    /// `iters` Sinkhorn rounds, moving `bias_fit_rate` of the way (see [`moe::refit_bias`]).
    /// `step`: the optimizer step just taken (the rate is 1 up to `bias_fit_rate_after`).
    pub fn fit_moe_bias(&mut self, scores: &[&[f32]], iters: usize, step: u64) {
        let rate = if step <= self.cfg.bias_fit_rate_after {
            1.0
        } else {
            self.cfg.bias_fit_rate
        };
        let (e, k, hard) = (
            self.cfg.n_routed_experts,
            self.cfg.top_k,
            self.cfg.bias_fit_hard_rounds,
        );
        for (lo, sc) in self.layout.layers.iter().zip(scores) {
            if let Ffn::Moe(mo) = lo.ffn {
                if !mo.hash && !sc.is_empty() {
                    moe::refit_bias(
                        &mut self.params[mo.bias..mo.bias + e],
                        sc,
                        k,
                        iters,
                        hard,
                        rate,
                    );
                }
            }
        }
    }

    /// Router scores `[N, E]` of the last forward pass's MoE inputs under the *current* router
    /// weights (empty for dense and hash layers): after the optimizer step, the batch just
    /// routed as the updated router scores it (see [`moe::router_scores`]).
    pub fn moe_rescore(&self, ws: &Workspace) -> Vec<Vec<f32>> {
        self.score_routed(|l| {
            ws.layers
                .get(l)
                .map(|la| vec![&la.f[..]])
                .unwrap_or_default()
        })
    }

    /// Router scores under the current weights of each routed (non-hash) layer `l`'s inputs
    /// `inputs(l)` (`[n_i, d]` parts, scored one after another), empty for the other layers.
    fn score_routed<'a>(&self, inputs: impl Fn(usize) -> Vec<&'a [f32]>) -> Vec<Vec<f32>> {
        let spec = MoeSpec::new(&self.cfg);
        self.layout
            .layers
            .iter()
            .enumerate()
            .map(|(l, lo)| match lo.ffn {
                Ffn::Moe(mo) if !mo.hash => inputs(l)
                    .into_iter()
                    .filter(|f| !f.is_empty())
                    .flat_map(|f| moe::router_scores(&spec, &self.params, &mo, f))
                    .collect(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// The MoE layers routed by the router (not by hash): those the balancing bias and its
    /// refit act on.
    pub fn routed_moe_layers(&self) -> Vec<usize> {
        self.layout
            .layers
            .iter()
            .enumerate()
            .filter(|(_, lo)| matches!(lo.ffn, Ffn::Moe(mo) if !mo.hash))
            .map(|(l, _)| l)
            .collect()
    }

    /// Empty refit pools (`bias_fit_window` batches, every `bias_fit_stride`-th token), one per
    /// layer; only routed MoE layers fill theirs (see [`moe::BiasPool`]).
    pub fn new_moe_pools(&self) -> Vec<moe::BiasPool> {
        let c = &self.cfg;
        self.layout
            .layers
            .iter()
            .map(|lo| match lo.ffn {
                Ffn::Moe(mo) if !mo.hash => {
                    moe::BiasPool::new(c.bias_fit_window, c.bias_fit_stride, c.d_model)
                }
                _ => moe::BiasPool::new(0, 1, c.d_model),
            })
            .collect()
    }

    /// Add the router inputs of the last forward pass to each routed layer's refit pool.
    pub fn push_moe_pools(&self, pools: &mut [moe::BiasPool], ws: &Workspace) {
        for ((lo, la), pool) in self.layout.layers.iter().zip(&ws.layers).zip(pools) {
            if let Ffn::Moe(mo) = lo.ffn {
                if !mo.hash && !la.f.is_empty() {
                    pool.push(&la.f);
                }
            }
        }
    }

    /// Router scores `[R, E]` of each routed layer's pooled inputs under the *current* router
    /// weights (empty for the other layers): what the pooled refit balances.
    pub fn moe_pool_scores(&self, pools: &[moe::BiasPool]) -> Vec<Vec<f32>> {
        self.score_routed(|l| {
            pools
                .get(l)
                .map(|p| p.batches().collect())
                .unwrap_or_default()
        })
    }

    /// (min, max) of layer `l`'s MoE selection bias.
    pub fn moe_bias_range(&self, l: usize) -> Option<(f32, f32)> {
        match self.layout.layers.get(l)?.ffn {
            Ffn::Moe(mo) => {
                let b = &self.params[mo.bias..mo.bias + self.cfg.n_routed_experts];
                Some((
                    b.iter().copied().fold(f32::INFINITY, f32::min),
                    b.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                ))
            }
            Ffn::Dense { .. } => None,
        }
    }

    /// The fused q|k|v layout and the attention shapes of a training batch `[b, t]`.
    fn attn_shapes(&self, b: usize, t: usize) -> (QkvLayout, AttnDims) {
        let c = &self.cfg;
        let (h, kv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let lay = QkvLayout {
            rs: c.qkv_dim(),
            q_off: 0,
            k_off: h * hd,
            v_off: (h + kv) * hd,
        };
        let dims = AttnDims {
            batch: b,
            tq: t,
            tk: t,
            q_pos0: 0,
            n_heads: h,
            n_kv_heads: kv,
            head_dim: hd,
        };
        (lay, dims)
    }

    fn w(&self, off: usize, len: usize) -> &[f32] {
        &self.params[off..off + len]
    }

    /// DSA attention of one layer (plain residual): the indexer on `la.a`, then sparse
    /// attention over its top-k (sparse stage) or dense attention (warm-up), writing `la.o`
    /// and `la.lse` (`[n, H]` when sparse, `[b, H, t]` when dense). Returns the layer's sums
    /// over query rows of the indexer KL and recall.
    #[allow(clippy::too_many_arguments)]
    fn dsa_attention(
        &self,
        io: &IndexerOffsets,
        run: DsaRun,
        (b, t): (usize, usize),
        la: &mut LayerActs,
        da: &mut DsaActs,
        freeze: bool,
        (od, lsed): (&mut Vec<f32>, &mut Vec<f32>),
    ) -> (f64, f64) {
        let c = &self.cfg;
        let dc = c.dsa.as_ref().expect("a DSA config");
        let irope = self.index_rope.as_ref().expect("the indexer RoPE table");
        let n = b * t;
        let (h, kv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let (lay, dims) = self.attn_shapes(b, t);
        let sh = self.dsa_shapes(b, t);
        da.project(&self.params, dc, irope, io, &la.a, sh);
        let norm = 1.0 / (c.n_layers * n) as f32;
        let dense_lse = |r: usize, hh: usize| ((r / t) * h + hh) * t + r % t;
        let (mut kl, mut recall) = (0.0, 0.0);
        let qkv = &la.qkv;
        let hv = |off| Heads {
            data: qkv,
            rs: lay.rs,
            off,
        };
        if run.stage.is_sparse() {
            let k_max = dc.index_topk.min(t);
            if freeze && da.k_max == k_max && da.idx.len() == n * k_max {
                da.rescore(dc);
            } else {
                da.select(dc, sh);
            }
            let sd = SparseDims {
                n_q: n,
                k_max,
                n_heads: h,
                n_kv_heads: kv,
                head_dim: hd,
            };
            sparse_attention::forward(
                sd,
                hv(lay.q_off),
                hv(lay.k_off),
                hv(lay.v_off),
                &da.idx,
                &mut la.o,
                &mut la.lse,
            );
            if run.kl {
                let lse = &la.lse;
                let f = |r: usize, hh: usize| lse[r * h + hh];
                kl = da.kl(dc, sh, qkv, lay, &f, DsaStage::Sparse, norm).0;
            }
            if run.recall {
                // The dense attention's probabilities, for the recall only (bounded cost: the
                // caller asks for it on logging steps).
                od.resize(n * h * hd, 0.0);
                lsed.resize(n * h, 0.0);
                attention::forward(dims, hv(lay.q_off), hv(lay.k_off), hv(lay.v_off), od, lsed);
                let l2 = &*lsed;
                recall = da.recall_dense(sh, qkv, lay, &|r, hh| l2[dense_lse(r, hh)]);
            }
        } else {
            attention::forward(
                dims,
                hv(lay.q_off),
                hv(lay.k_off),
                hv(lay.v_off),
                &mut la.o,
                &mut la.lse,
            );
            if run.kl || run.recall {
                let lse = &la.lse;
                let f = |r: usize, hh: usize| lse[dense_lse(r, hh)];
                (kl, recall) = da.kl(dc, sh, qkv, lay, &f, run.stage, norm);
            }
        }
        (kl, recall)
    }

    fn dsa_shapes(&self, b: usize, t: usize) -> dsa::Shapes {
        let c = &self.cfg;
        dsa::Shapes {
            b,
            t,
            d: c.d_model,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        }
    }

    /// Backward of every layer's indexer loss into the indexer parameters (input detached).
    fn dsa_indexer_backward(
        &self,
        b: usize,
        t: usize,
        grads: &mut [f32],
        grad_scale: f32,
        ws: &Workspace,
    ) {
        let (Some(dc), Some(irope)) = (self.cfg.dsa.as_ref(), self.index_rope.as_ref()) else {
            return;
        };
        let sh = self.dsa_shapes(b, t);
        for (l, lo) in self.layout.layers.iter().enumerate() {
            if let Some(io) = &lo.indexer {
                ws.dsa[l].backward(
                    &self.params,
                    grads,
                    dc,
                    irope,
                    io,
                    &ws.layers[l].a,
                    sh,
                    grad_scale,
                );
            }
        }
    }

    /// Forward pass over `tokens: [b, t]`, keeping every activation in `ws`; leaves the logits
    /// in `ws.logits` (`[b·t, V]`). A DSA model attends over its indexer's top-k selection
    /// (no indexer loss; see [`Model::forward_dsa`]).
    pub fn forward(&self, tokens: &[u32], b: usize, t: usize, ws: &mut Workspace) {
        self.try_forward(tokens, b, t, ws)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`Model::forward`] of a DSA model in a given training mode: dense or sparse attention,
    /// with the indexer KL loss and/or recall measured (`ws.dsa_stats`).
    pub fn forward_dsa(&self, tokens: &[u32], b: usize, t: usize, ws: &mut Workspace, run: DsaRun) {
        assert!(self.cfg.dsa.is_some(), "forward_dsa needs a DSA model");
        self.forward_run(tokens, b, t, ws, Some(run))
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`Model::forward`] that returns an error where the Engram lookup fails (a memory-mapped
    /// table whose file vanished or changed size) instead of panicking.
    pub fn try_forward(
        &self,
        tokens: &[u32],
        b: usize,
        t: usize,
        ws: &mut Workspace,
    ) -> anyhow::Result<()> {
        let run = self.cfg.dsa.as_ref().map(|_| DsaRun::INFERENCE);
        self.forward_run(tokens, b, t, ws, run)
    }

    fn forward_run(
        &self,
        tokens: &[u32],
        b: usize,
        t: usize,
        ws: &mut Workspace,
        run: Option<DsaRun>,
    ) -> anyhow::Result<()> {
        let c = &self.cfg;
        assert_eq!(tokens.len(), b * t, "tokens must be [b, t]");
        assert!(
            t <= c.max_seq_len,
            "sequence length {t} exceeds max_seq_len {}",
            c.max_seq_len
        );
        ws.ensure(c, b, t);
        ws.dsa_run = run;
        ws.dsa_stats = DsaStats::default();
        let mut mems = self.engram_prelude(tokens, b, t, ws)?;
        if let Some(dm) = HcDims::from_config(c) {
            self.forward_hc(tokens, b, t, ws, dm, mems);
            return Ok(());
        }
        let (mut kl_sum, mut recall_sum) = (0.0f64, 0.0f64);
        let n = b * t;
        let (d, hd, f, v) = (c.d_model, c.head_dim, c.ffn_hidden, c.vocab_size);
        let (h, kv) = (c.n_heads, c.n_kv_heads);
        let qd = c.qkv_dim();
        let (lay, dims) = self.attn_shapes(b, t);
        embedding::forward(&mut ws.xs[0], self.w(self.layout.embed, v * d), tokens, d);
        for (l, lo) in self.layout.layers.iter().enumerate() {
            if let Some(i) = self.engram.as_ref().and_then(|e| e.layer_of_block(l)) {
                // Engram before attention: x += gate(memory, x).
                let h = std::mem::take(&mut ws.xs[l]);
                self.engram_gate_forward(i, &mut mems, &h, ws);
                ws.xs[l] = h;
                for (a, y) in ws.xs[l].iter_mut().zip(&ws.eng_y) {
                    *a += y;
                }
            }
            let (before, after) = ws.xs.split_at_mut(l + 1);
            let x = &before[l];
            let xnext = &mut after[0];
            let la = &mut ws.layers[l];
            rmsnorm::forward(
                &mut la.a,
                &mut la.rstd1,
                x,
                self.w(lo.attn_norm, d),
                d,
                c.norm_eps,
            );
            linear_forward(&mut la.qkv, &la.a, self.w(lo.wqkv, qd * d), n, d, qd, false);
            self.rope
                .apply(&mut la.qkv, n, qd, lay.q_off, h, hd, |r| r % t, false);
            self.rope
                .apply(&mut la.qkv, n, qd, lay.k_off, kv, hd, |r| r % t, false);
            let hv = |off| Heads {
                data: &la.qkv,
                rs: qd,
                off,
            };
            match (run, lo.indexer) {
                (Some(run), Some(io)) => {
                    let (kl, recall) = self.dsa_attention(
                        &io,
                        run,
                        (b, t),
                        la,
                        &mut ws.dsa[l],
                        ws.dsa_freeze_selection,
                        (&mut ws.dsa_o, &mut ws.dsa_lse),
                    );
                    kl_sum += kl;
                    recall_sum += recall;
                }
                _ => attention::forward_scaled(
                    dims,
                    c.attn_scale(),
                    hv(lay.q_off),
                    hv(lay.k_off),
                    hv(lay.v_off),
                    &mut la.o,
                    &mut la.lse,
                ),
            }
            la.xmid.copy_from_slice(x);
            linear_forward(
                &mut la.xmid,
                &la.o,
                self.w(lo.wo, d * h * hd),
                n,
                h * hd,
                d,
                true,
            );
            rmsnorm::forward(
                &mut la.f,
                &mut la.rstd2,
                &la.xmid,
                self.w(lo.ffn_norm, d),
                d,
                c.norm_eps,
            );
            xnext.copy_from_slice(&la.xmid);
            match lo.ffn {
                Ffn::Dense { w13, w2 } => {
                    linear_forward(
                        &mut la.h13,
                        &la.f,
                        self.w(w13, 2 * f * d),
                        n,
                        d,
                        2 * f,
                        false,
                    );
                    swiglu::forward(&mut la.g, &la.h13, f);
                    linear_forward(xnext, &la.g, self.w(w2, d * f), n, f, d, true);
                }
                Ffn::Moe(mo) => {
                    let table = self.hash_tables[l].as_deref();
                    moe::forward(
                        &MoeSpec::new(c),
                        &self.params,
                        &mo,
                        &la.f,
                        tokens,
                        table,
                        t,
                        &mut la.moe,
                        xnext,
                    );
                }
            }
        }
        ws.aux_loss = ws.layers.iter().map(|la| la.moe.aux_loss).sum();
        if let Some(run) = run {
            let denom = (c.n_layers * n) as f64;
            ws.dsa_stats = DsaStats {
                kl: kl_sum / denom,
                recall: run.recall.then_some(recall_sum / denom),
            };
        }
        if ws.skip_head {
            return Ok(());
        }
        let xl = &ws.xs[c.n_layers];
        rmsnorm::forward(
            &mut ws.hf,
            &mut ws.rstd_f,
            xl,
            self.w(self.layout.norm, d),
            d,
            c.norm_eps,
        );
        linear_forward(
            &mut ws.logits,
            &ws.hf,
            self.w(self.layout.output, v * d),
            n,
            d,
            v,
            false,
        );
        Ok(())
    }

    /// Mean cross-entropy of the logits left by [`Model::forward`] (no gradient), over the
    /// targets other than [`cross_entropy::IGNORE`] (0 when none counts).
    pub fn loss(&self, targets: &[u32], ws: &mut Workspace) -> f64 {
        let v = self.cfg.vocab_size;
        cross_entropy::forward(&mut ws.losses, &ws.logits, targets, v);
        cross_entropy::sum(&ws.losses) / cross_entropy::counted(targets).max(1) as f64
    }

    /// Forward + backward on one batch: adds `grad_scale · dL/dθ` into `grads` and returns the
    /// (unscaled) loss L = mean CE over the batch + the MoE balance loss when enabled.
    /// A DSA model trains in the sparse stage (see [`Model::forward_backward_dsa`]).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward(
        &self,
        tokens: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        grads: &mut [f32],
        grad_scale: f32,
        ws: &mut Workspace,
    ) -> f64 {
        let run = self.cfg.dsa.as_ref().map(|_| DsaRun {
            stage: DsaStage::Sparse,
            kl: true,
            recall: false,
        });
        self.forward_backward_run(tokens, targets, b, t, grads, grad_scale, ws, run)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`Model::forward_backward`] that returns an error where the Engram lookup fails (a
    /// memory-mapped table whose file vanished or changed size) instead of panicking.
    #[allow(clippy::too_many_arguments)]
    pub fn try_forward_backward(
        &self,
        tokens: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        grads: &mut [f32],
        grad_scale: f32,
        ws: &mut Workspace,
    ) -> anyhow::Result<f64> {
        let run = self.cfg.dsa.as_ref().map(|_| DsaRun {
            stage: DsaStage::Sparse,
            kl: true,
            recall: false,
        });
        self.forward_backward_run(tokens, targets, b, t, grads, grad_scale, ws, run)
    }

    /// Forward + backward of a DSA model in a training stage (module [`crate::dsa`]):
    /// - `Dense`: dense attention; LM-loss gradients for the model, the dense KL gradient for
    ///   the indexer (input detached).
    /// - `Warmup`: dense attention; only the indexer's parameters receive gradients (of the
    ///   KL to the dense attention when `run.kl`); every other gradient stays untouched.
    /// - `Sparse`: top-k sparse attention; LM-loss gradients for the model, the selected-set
    ///   KL gradient for the indexer (its input detached).
    ///
    /// Returns the LM loss (+ MoE balance loss); the indexer KL and recall are in `ws.dsa_stats`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward_dsa(
        &self,
        tokens: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        grads: &mut [f32],
        grad_scale: f32,
        ws: &mut Workspace,
        run: DsaRun,
    ) -> f64 {
        assert!(
            self.cfg.dsa.is_some(),
            "forward_backward_dsa needs a DSA model"
        );
        self.forward_backward_run(tokens, targets, b, t, grads, grad_scale, ws, Some(run))
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_backward_run(
        &self,
        tokens: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        grads: &mut [f32],
        grad_scale: f32,
        ws: &mut Workspace,
        run: Option<DsaRun>,
    ) -> anyhow::Result<f64> {
        assert_eq!(grads.len(), self.layout.total);
        assert_eq!(targets.len(), b * t);
        self.forward_run(tokens, b, t, ws, run)?;
        if let Some(r) = run.filter(|r| r.stage == DsaStage::Warmup) {
            // Everything but the indexer is frozen: no LM backward at all.
            let loss = self.loss(targets, ws) + ws.aux_loss;
            if r.kl {
                self.dsa_indexer_backward(b, t, grads, grad_scale, ws);
            }
            return Ok(loss);
        }
        let c = &self.cfg;
        let n = b * t;
        let (d, hd, f, v) = (c.d_model, c.head_dim, c.ffn_hidden, c.vocab_size);
        let (h, kv) = (c.n_heads, c.n_kv_heads);
        let qd = c.qkv_dim();
        let (lay, dims) = self.attn_shapes(b, t);
        let ly = &self.layout;

        // Mean over the counted targets (all but `IGNORE`); none counted: zero LM gradient.
        let kept = cross_entropy::counted(targets).max(1);
        cross_entropy::forward_backward(
            &mut ws.losses,
            &mut ws.logits,
            targets,
            v,
            grad_scale / kept as f32,
        );
        let loss = cross_entropy::sum(&ws.losses) / kept as f64 + ws.aux_loss;
        if let Some(dm) = HcDims::from_config(c) {
            self.backward_hc(tokens, b, t, grads, grad_scale, ws, dm);
            return Ok(loss);
        }
        let (fz, lowest) = (ws.frozen_backbone, self.lowest_engram_block());
        // Output projection and final norm. ws.dtmp = dL/dhf.
        let out_w = self.w(ly.output, v * d);
        linear_backward_frozen(
            Some((&mut ws.dtmp, false)),
            (!fz).then_some(&mut grads[ly.output..ly.output + v * d]),
            &ws.logits,
            &ws.hf,
            out_w,
            n,
            d,
            v,
        );
        rmsnorm::backward(
            &mut ws.dx,
            &mut grads[ly.norm..ly.norm + d],
            &ws.dtmp,
            &ws.xs[c.n_layers],
            self.w(ly.norm, d),
            &ws.rstd_f,
            d,
            false,
        );
        for (l, lo) in ly.layers.iter().enumerate().rev() {
            let la = &ws.layers[l];
            // Feed-forward: x_{l+1} = xmid + FFN(f); ws.dtmp = dL/df.
            match lo.ffn {
                Ffn::Dense { w13, w2 } => {
                    linear_backward_frozen(
                        Some((&mut ws.dg, false)),
                        (!fz).then_some(&mut grads[w2..w2 + d * f]),
                        &ws.dx,
                        &la.g,
                        self.w(w2, d * f),
                        n,
                        f,
                        d,
                    );
                    swiglu::backward(&mut ws.dh13, &ws.dg, &la.h13, f);
                    linear_backward_frozen(
                        Some((&mut ws.dtmp, false)),
                        (!fz).then_some(&mut grads[w13..w13 + 2 * f * d]),
                        &ws.dh13,
                        &la.f,
                        self.w(w13, 2 * f * d),
                        n,
                        d,
                        2 * f,
                    );
                }
                Ffn::Moe(mo) => {
                    let spec = MoeSpec::new(c);
                    moe::backward(
                        &spec,
                        &self.params,
                        grads,
                        &mo,
                        &la.f,
                        &la.moe,
                        &ws.dx,
                        &mut ws.dtmp,
                        t,
                        grad_scale,
                    );
                }
            }
            rmsnorm::backward(
                &mut ws.dx,
                &mut grads[lo.ffn_norm..lo.ffn_norm + d],
                &ws.dtmp,
                &la.xmid,
                self.w(lo.ffn_norm, d),
                &la.rstd2,
                d,
                true,
            );
            // Attention: xmid = x + o Woᵀ
            linear_backward_frozen(
                Some((&mut ws.dattn, false)),
                (!fz).then_some(&mut grads[lo.wo..lo.wo + d * h * hd]),
                &ws.dx,
                &la.o,
                self.w(lo.wo, d * h * hd),
                n,
                h * hd,
                d,
            );
            if ws.dsa_run.is_some_and(|r| r.stage.is_sparse()) && lo.indexer.is_some() {
                let da = &ws.dsa[l];
                let sd = SparseDims {
                    n_q: n,
                    k_max: da.k_max,
                    n_heads: h,
                    n_kv_heads: kv,
                    head_dim: hd,
                };
                sparse_attention::backward(
                    sd,
                    &la.qkv,
                    lay,
                    &da.idx,
                    &la.o,
                    &la.lse,
                    &ws.dattn,
                    &mut ws.dqkv,
                );
            } else {
                attention::backward_scaled(
                    dims,
                    c.attn_scale(),
                    &la.qkv,
                    lay,
                    &la.o,
                    &la.lse,
                    &ws.dattn,
                    &mut ws.dqkv,
                );
            }
            self.rope
                .apply(&mut ws.dqkv, n, qd, lay.q_off, h, hd, |r| r % t, true);
            self.rope
                .apply(&mut ws.dqkv, n, qd, lay.k_off, kv, hd, |r| r % t, true);
            linear_backward_frozen(
                Some((&mut ws.dtmp, false)),
                (!fz).then_some(&mut grads[lo.wqkv..lo.wqkv + qd * d]),
                &ws.dqkv,
                &la.a,
                self.w(lo.wqkv, qd * d),
                n,
                d,
                qd,
            );
            rmsnorm::backward(
                &mut ws.dx,
                &mut grads[lo.attn_norm..lo.attn_norm + d],
                &ws.dtmp,
                &ws.xs[l],
                self.w(lo.attn_norm, d),
                &la.rstd1,
                d,
                true,
            );
            if let Some(i) = self.engram.as_ref().and_then(|e| e.layer_of_block(l)) {
                let mut dx = std::mem::take(&mut ws.dx);
                self.engram_gate_backward(i, &mut dx, grads, ws);
                ws.dx = dx;
            }
            if fz && lowest == Some(l) {
                return Ok(loss); // frozen below: nothing left to train
            }
        }
        if fz {
            return Ok(loss);
        }
        embedding::backward(&mut grads[ly.embed..ly.embed + v * d], &ws.dx, tokens, d);
        if ws.dsa_run.is_some_and(|r| r.kl) {
            self.dsa_indexer_backward(b, t, grads, grad_scale, ws);
        }
        Ok(loss)
    }
}

impl Model {
    /// [`Model::forward`] with the `n`-stream residual (module `mhc`): expand, then per
    /// sublayer `(y, post, comb) = coefficients(x); F(RMSNorm(y)); x = merge(x, F, post, comb)`,
    /// then collapse (mHC head or HC sum) and the final norm.
    fn forward_hc(
        &self,
        tokens: &[u32],
        b: usize,
        t: usize,
        ws: &mut Workspace,
        dm: HcDims,
        mut mems: Vec<engram::Memory>,
    ) {
        let c = &self.cfg;
        let n = b * t;
        let nh = dm.n;
        let (d, hd, f, v) = (c.d_model, c.head_dim, c.ffn_hidden, c.vocab_size);
        let (h, kv) = (c.n_heads, c.n_kv_heads);
        let qd = c.qkv_dim();
        let (lay, dims) = self.attn_shapes(b, t);
        let p = &self.params;
        embedding::forward(&mut ws.xs[0], self.w(self.layout.embed, v * d), tokens, d);
        mhc::expand(&mut ws.hc.streams[0], &mut ws.hc.ssq[0], &ws.xs[0], nh, d);
        for (l, lo) in self.layout.layers.iter().enumerate() {
            if let Some(i) = self.engram.as_ref().and_then(|e| e.layer_of_block(l)) {
                // Engram before attention: every stream m gets y_m (its own gate, query x_m).
                let h = std::mem::take(&mut ws.hc.streams[2 * l]);
                self.engram_gate_forward(i, &mut mems, &h, ws);
                ws.hc.streams[2 * l] = h;
                let hw = &mut ws.hc;
                mhc::add_streams(&mut hw.streams[2 * l], &mut hw.ssq[2 * l], &ws.eng_y, nh, d);
            }
            let hw = &mut ws.hc;
            let la = &mut ws.layers[l];
            // ---- attention sublayer (s = 2l) ----
            let s = 2 * l;
            let ha = &mut hw.acts[s];
            let ho = lo.attn_hc.expect("hyper-connection offsets");
            mhc::coeffs_forward(&dm, p, ho, &hw.streams[s], &hw.ssq[s], ha, false);
            mhc::readout(&mut ha.y, &hw.streams[s], &ha.pre, nh, d);
            rmsnorm::forward(
                &mut la.a,
                &mut la.rstd1,
                &ha.y,
                self.w(lo.attn_norm, d),
                d,
                c.norm_eps,
            );
            linear_forward(&mut la.qkv, &la.a, self.w(lo.wqkv, qd * d), n, d, qd, false);
            self.rope
                .apply(&mut la.qkv, n, qd, lay.q_off, h, hd, |r| r % t, false);
            self.rope
                .apply(&mut la.qkv, n, qd, lay.k_off, kv, hd, |r| r % t, false);
            let hv = |off| Heads {
                data: &la.qkv,
                rs: qd,
                off,
            };
            attention::forward_scaled(
                dims,
                c.attn_scale(),
                hv(lay.q_off),
                hv(lay.k_off),
                hv(lay.v_off),
                &mut la.o,
                &mut la.lse,
            );
            linear_forward(
                &mut ha.out,
                &la.o,
                self.w(lo.wo, d * h * hd),
                n,
                h * hd,
                d,
                false,
            );
            {
                let (xa, xb) = hw.streams.split_at_mut(s + 1);
                let (_, qb) = hw.ssq.split_at_mut(s + 1);
                mhc::merge(
                    &mut xb[0], &mut qb[0], &xa[s], &ha.out, &ha.post, &ha.comb, nh, d,
                );
            }
            // ---- FFN sublayer (s = 2l + 1) ----
            let s = 2 * l + 1;
            let ha = &mut hw.acts[s];
            let ho = lo.ffn_hc.expect("hyper-connection offsets");
            mhc::coeffs_forward(&dm, p, ho, &hw.streams[s], &hw.ssq[s], ha, false);
            mhc::readout(&mut ha.y, &hw.streams[s], &ha.pre, nh, d);
            rmsnorm::forward(
                &mut la.f,
                &mut la.rstd2,
                &ha.y,
                self.w(lo.ffn_norm, d),
                d,
                c.norm_eps,
            );
            match lo.ffn {
                Ffn::Dense { w13, w2 } => {
                    linear_forward(
                        &mut la.h13,
                        &la.f,
                        self.w(w13, 2 * f * d),
                        n,
                        d,
                        2 * f,
                        false,
                    );
                    swiglu::forward(&mut la.g, &la.h13, f);
                    linear_forward(&mut ha.out, &la.g, self.w(w2, d * f), n, f, d, false);
                }
                Ffn::Moe(mo) => {
                    ha.out.fill(0.0);
                    let table = self.hash_tables[l].as_deref();
                    moe::forward(
                        &MoeSpec::new(c),
                        &self.params,
                        &mo,
                        &la.f,
                        tokens,
                        table,
                        t,
                        &mut la.moe,
                        &mut ha.out,
                    );
                }
            }
            let (xa, xb) = hw.streams.split_at_mut(s + 1);
            let (_, qb) = hw.ssq.split_at_mut(s + 1);
            mhc::merge(
                &mut xb[0], &mut qb[0], &xa[s], &ha.out, &ha.post, &ha.comb, nh, d,
            );
        }
        ws.aux_loss = ws.layers.iter().map(|la| la.moe.aux_loss).sum();
        let hw = &mut ws.hc;
        let last = 2 * c.n_layers;
        match self.layout.hc_head {
            Some(o) => {
                mhc::coeffs_forward(
                    &dm,
                    p,
                    o,
                    &hw.streams[last],
                    &hw.ssq[last],
                    &mut hw.head,
                    true,
                );
                mhc::readout(&mut hw.head.y, &hw.streams[last], &hw.head.pre, nh, d);
            }
            None => mhc::readout(&mut hw.head.y, &hw.streams[last], &[], nh, d),
        }
        if ws.skip_head {
            return;
        }
        rmsnorm::forward(
            &mut ws.hf,
            &mut ws.rstd_f,
            &hw.head.y,
            self.w(self.layout.norm, d),
            d,
            c.norm_eps,
        );
        linear_forward(
            &mut ws.logits,
            &ws.hf,
            self.w(self.layout.output, v * d),
            n,
            d,
            v,
            false,
        );
    }

    /// The backward half of [`Model::forward_backward`] with hyper-connections (`ws.logits`
    /// already holds dL/dlogits).
    #[allow(clippy::too_many_arguments)]
    fn backward_hc(
        &self,
        tokens: &[u32],
        b: usize,
        t: usize,
        grads: &mut [f32],
        grad_scale: f32,
        ws: &mut Workspace,
        dm: HcDims,
    ) {
        let c = &self.cfg;
        let n = b * t;
        let nh = dm.n;
        let (d, hd, f, v) = (c.d_model, c.head_dim, c.ffn_hidden, c.vocab_size);
        let (h, kv) = (c.n_heads, c.n_kv_heads);
        let qd = c.qkv_dim();
        let (lay, dims) = self.attn_shapes(b, t);
        let ly = &self.layout;
        let p = &self.params;
        let (fz, lowest) = (ws.frozen_backbone, self.lowest_engram_block());
        let hw = &mut ws.hc;
        let out_w = self.w(ly.output, v * d);
        linear_backward_frozen(
            Some((&mut ws.dtmp, false)),
            (!fz).then_some(&mut grads[ly.output..ly.output + v * d]),
            &ws.logits,
            &ws.hf,
            out_w,
            n,
            d,
            v,
        );
        rmsnorm::backward(
            &mut hw.dy,
            &mut grads[ly.norm..ly.norm + d],
            &ws.dtmp,
            &hw.head.y,
            self.w(ly.norm, d),
            &ws.rstd_f,
            d,
            false,
        );
        let last = 2 * c.n_layers;
        match ly.hc_head {
            Some(o) => {
                hw.dxs.fill(0.0);
                mhc::coeffs_backward(
                    &dm,
                    p,
                    grads,
                    o,
                    &hw.streams[last],
                    &hw.head,
                    &hw.dy,
                    &[],
                    &mut hw.dxs,
                    &mut hw.draw,
                    true,
                );
            }
            None => {
                for (dx, dy) in hw.dxs.chunks_mut(nh * d).zip(hw.dy.chunks(d)) {
                    for k in 0..nh {
                        dx[k * d..(k + 1) * d].copy_from_slice(dy);
                    }
                }
            }
        }
        for (l, lo) in ly.layers.iter().enumerate().rev() {
            let hw = &mut ws.hc;
            let la = &ws.layers[l];
            // ---- FFN sublayer (s = 2l + 1) ----
            let s = 2 * l + 1;
            let ha = &hw.acts[s];
            mhc::merge_backward(
                &mut hw.dout,
                &mut hw.dxs2,
                &mut hw.dcoef,
                &hw.dxs,
                &hw.streams[s],
                &ha.out,
                &ha.post,
                &ha.comb,
                nh,
                d,
            );
            match lo.ffn {
                Ffn::Dense { w13, w2 } => {
                    linear_backward_frozen(
                        Some((&mut ws.dg, false)),
                        (!fz).then_some(&mut grads[w2..w2 + d * f]),
                        &hw.dout,
                        &la.g,
                        self.w(w2, d * f),
                        n,
                        f,
                        d,
                    );
                    swiglu::backward(&mut ws.dh13, &ws.dg, &la.h13, f);
                    linear_backward_frozen(
                        Some((&mut ws.dtmp, false)),
                        (!fz).then_some(&mut grads[w13..w13 + 2 * f * d]),
                        &ws.dh13,
                        &la.f,
                        self.w(w13, 2 * f * d),
                        n,
                        d,
                        2 * f,
                    );
                }
                Ffn::Moe(mo) => {
                    let spec = MoeSpec::new(c);
                    moe::backward(
                        &spec,
                        &self.params,
                        grads,
                        &mo,
                        &la.f,
                        &la.moe,
                        &hw.dout,
                        &mut ws.dtmp,
                        t,
                        grad_scale,
                    );
                }
            }
            rmsnorm::backward(
                &mut hw.dy,
                &mut grads[lo.ffn_norm..lo.ffn_norm + d],
                &ws.dtmp,
                &ha.y,
                self.w(lo.ffn_norm, d),
                &la.rstd2,
                d,
                false,
            );
            mhc::coeffs_backward(
                &dm,
                p,
                grads,
                lo.ffn_hc.expect("hyper-connection offsets"),
                &hw.streams[s],
                ha,
                &hw.dy,
                &hw.dcoef,
                &mut hw.dxs2,
                &mut hw.draw,
                false,
            );
            std::mem::swap(&mut hw.dxs, &mut hw.dxs2);
            // ---- attention sublayer (s = 2l) ----
            let s = 2 * l;
            let ha = &hw.acts[s];
            mhc::merge_backward(
                &mut hw.dout,
                &mut hw.dxs2,
                &mut hw.dcoef,
                &hw.dxs,
                &hw.streams[s],
                &ha.out,
                &ha.post,
                &ha.comb,
                nh,
                d,
            );
            linear_backward_frozen(
                Some((&mut ws.dattn, false)),
                (!fz).then_some(&mut grads[lo.wo..lo.wo + d * h * hd]),
                &hw.dout,
                &la.o,
                self.w(lo.wo, d * h * hd),
                n,
                h * hd,
                d,
            );
            attention::backward_scaled(
                dims,
                c.attn_scale(),
                &la.qkv,
                lay,
                &la.o,
                &la.lse,
                &ws.dattn,
                &mut ws.dqkv,
            );
            self.rope
                .apply(&mut ws.dqkv, n, qd, lay.q_off, h, hd, |r| r % t, true);
            self.rope
                .apply(&mut ws.dqkv, n, qd, lay.k_off, kv, hd, |r| r % t, true);
            linear_backward_frozen(
                Some((&mut ws.dtmp, false)),
                (!fz).then_some(&mut grads[lo.wqkv..lo.wqkv + qd * d]),
                &ws.dqkv,
                &la.a,
                self.w(lo.wqkv, qd * d),
                n,
                d,
                qd,
            );
            rmsnorm::backward(
                &mut hw.dy,
                &mut grads[lo.attn_norm..lo.attn_norm + d],
                &ws.dtmp,
                &ha.y,
                self.w(lo.attn_norm, d),
                &la.rstd1,
                d,
                false,
            );
            mhc::coeffs_backward(
                &dm,
                p,
                grads,
                lo.attn_hc.expect("hyper-connection offsets"),
                &hw.streams[s],
                ha,
                &hw.dy,
                &hw.dcoef,
                &mut hw.dxs2,
                &mut hw.draw,
                false,
            );
            std::mem::swap(&mut hw.dxs, &mut hw.dxs2);
            if let Some(i) = self.engram.as_ref().and_then(|e| e.layer_of_block(l)) {
                let mut dx = std::mem::take(&mut hw.dxs);
                self.engram_gate_backward(i, &mut dx, grads, ws);
                ws.hc.dxs = dx;
            }
            if fz && lowest == Some(l) {
                return; // frozen below: nothing left to train
            }
        }
        if fz {
            return;
        }
        let hw = &mut ws.hc;
        mhc::expand_backward(&mut ws.dx, &hw.dxs, nh, d);
        embedding::backward(&mut grads[ly.embed..ly.embed + v * d], &ws.dx, tokens, d);
    }
}

impl Model {
    /// The lowest block with an active Engram layer (where a frozen-backbone backward stops).
    fn lowest_engram_block(&self) -> Option<usize> {
        let e = self.engram.as_ref().filter(|e| !e.off)?;
        e.layers.iter().map(|l| l.hash.layer_id).min()
    }

    /// Engram prelude of a forward pass: positions inside documents and every layer's lookup
    /// (hash + gather; ids only, so it runs before the blocks).
    fn engram_prelude(
        &self,
        tokens: &[u32],
        b: usize,
        t: usize,
        ws: &mut Workspace,
    ) -> anyhow::Result<Vec<engram::Memory>> {
        let Some(e) = &self.engram else {
            return Ok(Vec::new());
        };
        ws.eng_pos = engram::positions_in_documents(tokens, b, t, self.engram_eot);
        ws.eng_acts.resize_with(e.layers.len(), Default::default);
        let cids = e.compress.compress(tokens);
        e.lookup_all(&cids, &ws.eng_pos)
            .context("engram lookup failed")
    }

    /// Engram layer `i`'s gate on the streams `h: [N, n, d]` into `ws.eng_y`, keeping its
    /// activations.
    fn engram_gate_forward(
        &self,
        i: usize,
        mems: &mut [engram::Memory],
        h: &[f32],
        ws: &mut Workspace,
    ) {
        let layer = &self.engram.as_ref().expect("engram").layers[i];
        let mem = std::mem::take(&mut mems[i]);
        ws.eng_y.resize(h.len(), 0.0);
        engram::gate::forward(
            &layer.gate,
            self.engram_gate_params(i),
            &mem.e,
            h,
            &ws.eng_pos,
            &mut ws.eng_y,
            &mut ws.eng_acts[i].gate,
        );
        ws.eng_acts[i].rows = mem.rows;
    }

    /// Backward of Engram layer `i` given `dx = dL/dh` after the addition: adds the query-path
    /// gradient to `dx` (the residual passes `dx` through unchanged), accumulates the gate
    /// gradient into `grads` and stores the table gradient in `ws.engram_table_grads[i]`.
    fn engram_gate_backward(
        &self,
        i: usize,
        dx: &mut [f32],
        grads: &mut [f32],
        ws: &mut Workspace,
    ) {
        let e = self.engram.as_ref().expect("engram");
        let layer = &e.layers[i];
        let o = self.layout.engram_gate[i];
        let np = layer.gate.n_params();
        ws.eng_dy.clear();
        ws.eng_dy.extend_from_slice(dx);
        let acts = &ws.eng_acts[i];
        let dim = layer.table.dim();
        let mut de = vec![0.0f32; acts.rows.len() * dim];
        engram::gate::backward(
            &layer.gate,
            &self.params[o..o + np],
            &acts.gate,
            &ws.eng_dy,
            dx,
            &mut de,
            &mut grads[o..o + np],
        );
        ws.engram_table_grads
            .resize_with(e.layers.len(), Default::default);
        ws.engram_table_grads[i] = SparseGrad::from_gather(&acts.rows, &de, dim);
    }
}

/// Whether a parameter belongs to a hyper-connection layer or the mHC head.
pub fn is_hc_tensor(name: &str) -> bool {
    name.contains("_hc.") || name.starts_with("hc_head.")
}

/// A token → `k` distinct experts table `[V, k]`: uniform without replacement from `rng`
/// (all zeros when `rng` is `None`: a placeholder that loading or `init` replaces).
fn hash_table(v: usize, e: usize, k: usize, rng: &mut Option<Rng>) -> Vec<u32> {
    let mut tab = vec![0u32; v * k];
    let Some(rng) = rng else {
        for row in tab.chunks_mut(k) {
            for (j, x) in row.iter_mut().enumerate() {
                *x = j as u32;
            }
        }
        return tab;
    };
    let mut perm: Vec<u32> = (0..e as u32).collect();
    for row in tab.chunks_mut(k) {
        for j in 0..k {
            let r = j + rng.below((e - j) as u64) as usize;
            perm.swap(j, r);
            row[j] = perm[j];
        }
    }
    tab
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::rope::RopeLayout;

    fn small_cfg(tied: bool, kv: usize, layout: RopeLayout) -> ModelConfig {
        ModelConfig {
            vocab_size: 19,
            d_model: 12,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: kv,
            head_dim: 6,
            rope_theta: 10000.0,
            rope_dim: 4,
            rope_layout: layout,
            ffn_hidden: 10,
            tied_embeddings: tied,
            norm_eps: 1e-5,
            init_std: 0.3,
            max_seq_len: 16,
            ..ModelConfig::dense_defaults()
        }
    }

    /// [`small_cfg`] with MoE layers: 1 shared + 4 routed experts of width 4, top-2.
    fn small_moe_cfg() -> ModelConfig {
        ModelConfig {
            ffn: crate::config::FfnKind::Moe,
            n_routed_experts: 4,
            n_shared_experts: 1,
            moe_inter: 4,
            top_k: 2,
            ..small_cfg(true, 2, RopeLayout::Interleaved)
        }
    }

    /// The mean loss of `m`'s architecture with parameters `p` on (`tokens`, `targets`): the
    /// function a finite-difference check differentiates.
    fn loss_at<'a>(
        m: &'a Model,
        tokens: &'a [u32],
        targets: &'a [u32],
        b: usize,
        t: usize,
    ) -> impl Fn(&[f32]) -> f64 + 'a {
        move |p: &[f32]| {
            let mm = Model {
                params: p.to_vec(),
                ..Model::new(m.cfg.clone()).unwrap()
            };
            let mut ws = Workspace::default();
            mm.forward(tokens, b, t, &mut ws);
            mm.loss(targets, &mut ws)
        }
    }

    /// `skip_head` (the MoE balancing sample's forward) stops after the last layer: the same
    /// router scores as a full forward, plain and with hyper-connections, and no logits.
    #[test]
    fn skip_head_keeps_the_layers_and_drops_the_logits() {
        for residual in [crate::config::Residual::Plain, crate::config::Residual::Mhc] {
            let cfg = ModelConfig {
                residual,
                ..small_moe_cfg()
            };
            let mut m = Model::new(cfg).unwrap();
            m.init(5);
            let tokens: Vec<u32> = (0..2 * 7).map(|i| (i * 5 % 19) as u32).collect();
            let mut full = Workspace::default();
            m.forward(&tokens, 2, 7, &mut full);
            let mut cut = Workspace {
                skip_head: true,
                ..Default::default()
            };
            m.forward(&tokens, 2, 7, &mut cut);
            assert!(!full.moe_scores()[1].is_empty());
            assert_eq!(full.moe_scores(), cut.moe_scores(), "{residual:?}");
            assert!(full.logits.iter().any(|&x| x != 0.0));
            assert!(cut.logits.iter().all(|&x| x == 0.0), "{residual:?}");
        }
    }

    /// `bias_fit_rate_after`: up to that step the refit jumps to the batch's fit (rate 1),
    /// after it the bias moves `bias_fit_rate` of the way.
    #[test]
    fn moe_bias_refit_rate_applies_after_its_step() {
        let mut cfg = small_moe_cfg();
        cfg.bias_fit_iters = 8;
        cfg.bias_fit_hard_rounds = 2;
        cfg.bias_fit_rate = 0.25;
        cfg.bias_fit_rate_after = 10;
        let mut rng = crate::rng::Rng::new(3);
        let scores: Vec<f32> = (0..64 * 4).map(|_| rng.next_f64() as f32).collect();
        let per_layer: Vec<&[f32]> = vec![&scores[..]; cfg.n_layers];
        let bias_after = |step: u64, rate_one: bool| {
            let mut c = cfg.clone();
            if rate_one {
                c.bias_fit_rate = 1.0;
            }
            let mut m = Model::new(c).unwrap();
            m.fit_moe_bias(&per_layer, 8, step);
            m.moe_bias_range(1).unwrap()
        };
        let full = bias_after(1, true);
        assert_ne!(full, (0.0, 0.0), "the refit moved nothing");
        assert_eq!(
            bias_after(10, false),
            full,
            "rate 1 up to bias_fit_rate_after"
        );
        let (lo, hi) = bias_after(11, false);
        assert!(
            (lo - 0.25 * full.0).abs() < 1e-6 && (hi - 0.25 * full.1).abs() < 1e-6,
            "{lo} {hi} vs {full:?}"
        );
    }

    #[test]
    fn whole_model_gradient_matches_finite_differences() {
        for (tied, kv, layout, yarn) in [
            (true, 2, RopeLayout::Interleaved, false),
            (false, 1, RopeLayout::Half, false),
            // YaRN: scaled frequencies and the mscale² softmax temperature.
            (false, 2, RopeLayout::Half, true),
        ] {
            let mut cfg = small_cfg(tied, kv, layout);
            if yarn {
                cfg.rope_scaling = Some(crate::kernels::rope::RopeScaling::yarn(4.0, 4));
            }
            let mut m = Model::new(cfg).unwrap();
            m.init(1);
            // Perturb norms away from 1 so their gradients are exercised generically.
            let mut r = Rng::new(5);
            for t in m.layout.tensors.clone() {
                if t.shape.len() == 1 {
                    for p in &mut m.params[t.range()] {
                        *p += 0.2 * r.normal() as f32;
                    }
                }
            }
            let (b, t) = (2, 5);
            let tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % 19) as u32).collect();
            let targets: Vec<u32> = (0..b * t).map(|i| (i * 5 % 19) as u32).collect();
            let mut ws = Workspace::default();
            let mut grads = vec![0.0; m.layout.total];
            m.forward_backward(&tokens, &targets, b, t, &mut grads, 1.0, &mut ws);
            let params = m.params.clone();
            let loss = loss_at(&m, &tokens, &targets, b, t);
            crate::kernels::gradcheck::check(&params, &grads, loss, 1e-2, 1e-2);
        }
    }

    #[test]
    fn ignored_targets_are_left_out_of_the_loss_and_its_gradient() {
        use crate::kernels::cross_entropy::IGNORE;
        let mut m = Model::new(small_cfg(false, 2, RopeLayout::Half)).unwrap();
        m.init(3);
        let (b, t) = (2, 5);
        let tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % 19) as u32).collect();
        let full: Vec<u32> = (0..b * t).map(|i| (i * 5 % 19) as u32).collect();
        let kept = [1usize, 4, 5, 9];
        let targets: Vec<u32> = (0..b * t)
            .map(|i| if kept.contains(&i) { full[i] } else { IGNORE })
            .collect();
        // The loss is the mean over the kept positions only, computed by hand from the logits.
        let mut ws = Workspace::default();
        m.forward(&tokens, b, t, &mut ws);
        let v = m.cfg.vocab_size;
        let manual = kept
            .iter()
            .map(|&i| {
                let z = &ws.logits[i * v..(i + 1) * v];
                let mx = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let s: f64 = z.iter().map(|&x| (x as f64 - mx).exp()).sum();
                mx + s.ln() - z[full[i] as usize] as f64
            })
            .sum::<f64>()
            / kept.len() as f64;
        assert!((m.loss(&targets, &mut ws) - manual).abs() < 1e-5);
        let mut grads = vec![0.0; m.layout.total];
        let l = m.forward_backward(&tokens, &targets, b, t, &mut grads, 1.0, &mut ws);
        assert!((l - manual).abs() < 1e-5);
        let params = m.params.clone();
        let loss = loss_at(&m, &tokens, &targets, b, t);
        crate::kernels::gradcheck::check(&params, &grads, loss, 1e-2, 1e-2);
        // Nothing counted: zero loss and zero gradient.
        let none = vec![IGNORE; b * t];
        let mut g0 = vec![0.0; m.layout.total];
        assert_eq!(
            m.forward_backward(&tokens, &none, b, t, &mut g0, 1.0, &mut ws),
            0.0
        );
        assert!(g0.iter().all(|&g| g == 0.0));
        // The sentinel can never be a token id.
        let mut big = small_cfg(false, 2, RopeLayout::Half);
        big.vocab_size = IGNORE as usize;
        let e = big.validate().unwrap_err().to_string();
        assert!(e.contains("vocab_size"), "{e}");
    }

    #[test]
    fn whole_model_gradient_matches_finite_differences_with_hyper_connections() {
        for (residual, n) in [(Residual::Mhc, 3), (Residual::Hc, 3), (Residual::Mhc, 1)] {
            let mut cfg = small_cfg(false, 2, RopeLayout::Half);
            cfg.residual = residual;
            cfg.hc_mult = n;
            cfg.hc_sinkhorn_iters = 20;
            let mut m = Model::new(cfg).unwrap();
            m.init(1);
            // Move every norm and hyper-connection parameter away from its init so that the
            // dynamic coefficient paths are exercised.
            let mut r = Rng::new(5);
            for t in m.layout.tensors.clone() {
                let s = if is_hc_tensor(&t.name) {
                    0.4
                } else if t.shape.len() == 1 {
                    0.2
                } else {
                    continue;
                };
                for p in &mut m.params[t.range()] {
                    *p += s * r.normal() as f32;
                }
            }
            let (b, t) = (2, 5);
            let tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % 19) as u32).collect();
            let targets: Vec<u32> = (0..b * t).map(|i| (i * 5 % 19) as u32).collect();
            let mut ws = Workspace::default();
            let mut grads = vec![0.0; m.layout.total];
            m.forward_backward(&tokens, &targets, b, t, &mut grads, 1.0, &mut ws);
            let loss = loss_at(&m, &tokens, &targets, b, t);
            crate::kernels::gradcheck::check(&m.params, &grads, &loss, 1e-2, 1e-2);
            // Just the hyper-connection parameters (a small share of the whole vector).
            // (f32 central differences resolve gradients down to ~1e-5; smaller ones are
            // covered by the per-layer checks in `mhc`.)
            let mut checked = 0;
            for spec in m.layout.tensors.iter().filter(|t| is_hc_tensor(&t.name)) {
                let r = spec.range();
                let gn = grads[r.clone()].iter().map(|g| g * g).sum::<f32>().sqrt();
                if gn < 1e-3 * (spec.len() as f32).sqrt() {
                    continue;
                }
                let sub = |q: &[f32]| {
                    let mut p = m.params.clone();
                    p[r.clone()].copy_from_slice(q);
                    loss(&p)
                };
                crate::kernels::gradcheck::check(
                    &m.params[r.clone()],
                    &grads[r.clone()],
                    sub,
                    1e-2,
                    2e-2,
                );
                checked += 1;
            }
            assert!(
                checked >= 4,
                "only {checked} hyper-connection tensors checked"
            );
            assert!(ws.first_nonfinite().is_none());
        }
    }

    /// A deep copy of an Engram (tables copied into RAM), for finite differences.
    pub(crate) fn clone_engram(e: &Engram) -> Engram {
        let nb = e.layers[0].gate.n_branch;
        let d = e.layers[0].gate.d;
        let parts = e
            .layers
            .iter()
            .map(|l| {
                let t = crate::engram::EngramTable::from_vec(
                    l.table.rows(),
                    l.table.dim(),
                    l.table.as_slice().to_vec(),
                )
                .unwrap();
                (l.hash.clone(), t, l.params.clone())
            })
            .collect();
        Engram::from_parts(e.cfg.clone(), e.compress.clone(), d, nb, parts).unwrap()
    }

    pub(crate) fn engram_test_cfg(residual: Residual) -> ModelConfig {
        let mut cfg = small_cfg(false, 2, RopeLayout::Half);
        cfg.residual = residual;
        cfg.hc_mult = 2;
        cfg.hc_sinkhorn_iters = 20;
        cfg.engram = Some(crate::engram::EngramConfig {
            layer_ids: vec![1, 0],
            max_ngram_size: 3,
            n_head_per_ngram: 2,
            head_dim: 3,
            vocab_size_per_ngram: vec![7, 11],
            kernel_size: 2,
            ..Default::default()
        });
        cfg
    }

    /// Move the Engram gates (conv included) and norms away from their init.
    pub(crate) fn perturb_engram(m: &mut Model, seed: u64) {
        let mut r = Rng::new(seed);
        for t in m.layout.tensors.clone() {
            let s = if is_engram_tensor(&t.name) || is_hc_tensor(&t.name) {
                0.3
            } else if t.shape.len() == 1 {
                0.2
            } else {
                continue;
            };
            for p in &mut m.params[t.range()] {
                *p += s * r.normal() as f32;
            }
        }
        m.sync_engram_gates();
    }

    /// Memory-only fine-tuning's backward (frozen backbone) gives exactly the Engram gate and
    /// table gradients of the full backward, and no gradient at all for the backbone.
    #[test]
    fn frozen_backbone_backward_keeps_engram_gradients_exact() {
        for residual in [Residual::Plain, Residual::Mhc] {
            for ids in [vec![1, 0], vec![1]] {
                let mut cfg = engram_test_cfg(residual);
                cfg.engram.as_mut().unwrap().layer_ids = ids.clone();
                let mut m = Model::new(cfg).unwrap();
                m.init(1);
                perturb_engram(&mut m, 5);
                let (b, t) = (2, 6);
                let tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % 19) as u32).collect();
                let targets: Vec<u32> = (0..b * t).map(|i| (i * 5 % 19) as u32).collect();
                let run = |frozen: bool| {
                    let mut ws = Workspace {
                        frozen_backbone: frozen,
                        ..Workspace::default()
                    };
                    let mut grads = vec![0.0; m.layout.total];
                    let loss = m
                        .try_forward_backward(&tokens, &targets, b, t, &mut grads, 1.0, &mut ws)
                        .unwrap();
                    (loss, grads, ws.engram_table_grads)
                };
                let (l_full, g_full, tg_full) = run(false);
                let (l_fz, g_fz, tg_fz) = run(true);
                assert_eq!(l_full, l_fz);
                assert_eq!(tg_full, tg_fz, "{residual:?} {ids:?}: table gradients");
                assert!(tg_fz.iter().all(|g| !g.rows.is_empty()));
                let mut engram_seen = 0;
                for spec in &m.layout.tensors {
                    let r = spec.range();
                    if is_engram_tensor(&spec.name) {
                        assert_eq!(
                            g_full[r.clone()],
                            g_fz[r],
                            "{residual:?} {ids:?}: {}",
                            spec.name
                        );
                        engram_seen += 1;
                    } else if (spec.shape.len() >= 2 && !is_hc_tensor(&spec.name))
                        || (ids == [1] && spec.name.starts_with("layers.0."))
                    {
                        // Linear weights and the embedding get no gradient, nor anything
                        // below the lowest Engram block; norm weights and hyper-connections
                        // above it still get theirs (dropped by the optimiser).
                        assert!(g_fz[r].iter().all(|&g| g == 0.0), "{}: frozen", spec.name);
                    }
                }
                assert!(engram_seen > 0);
            }
        }
    }

    /// A token id inside the model's vocabulary but outside the tokenizer's (the Engram
    /// compression table) is a clear error on the cached (generate, serve) and batched paths.
    #[test]
    fn engram_token_outside_the_tokenizer_range_is_an_error() {
        let mut m = Model::new(engram_test_cfg(Residual::Plain)).unwrap();
        m.init(1);
        let v = m.cfg.vocab_size as u32;
        let comp = CompressedTokenizer::from_lookup((0..v - 3).collect()).unwrap();
        m.init_engram(comp, 2).unwrap();
        let bad = v - 2; // a valid embedding row, outside the tokenizer
        let tokens = vec![1, 2, bad, 3];
        let want = format!(
            "token id {bad} is outside the tokenizer's range 0..{}",
            v - 3
        );
        let e = m.check_engram_tokens(&tokens).unwrap_err();
        assert!(e.to_string().contains(&want), "{e}");
        let mut cache = crate::generate::KvCache::with_capacity(&m, 16);
        let e = m.forward_cached(&tokens, &mut cache).unwrap_err();
        assert!(e.to_string().contains(&want), "{e}");
        let e = crate::batch::forward_all(&m, &tokens, &mut cache).unwrap_err();
        assert!(format!("{e:#}").contains(&want), "{e:#}");
        assert_eq!(cache.len(), 0);
        m.check_engram_tokens(&[1, 2, v - 4]).unwrap();
        assert!(!m.forward_cached(&[1, 2, 3], &mut cache).unwrap().is_empty());
    }

    /// A memory-mapped table whose file vanishes before a training step is an error naming
    /// the file (no panic), from both the training and the inference forward.
    #[test]
    fn vanished_mapped_table_is_an_error_naming_the_file() {
        let mut m = Model::new(engram_test_cfg(Residual::Plain)).unwrap();
        m.init(1);
        let dir = std::env::temp_dir().join(format!("mnemo-vanish-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("engram_table.1.f32");
        {
            let e = m.engram.as_mut().unwrap();
            let l = &mut e.layers[0];
            l.table.write_file(&path).unwrap();
            l.table = engram::EngramTable::open_mapped(&path, l.table.rows(), l.table.dim(), true)
                .unwrap();
        }
        let (b, t) = (1, 5);
        let tokens: Vec<u32> = (0..5).collect();
        let mut grads = vec![0.0; m.layout.total];
        let mut ws = Workspace::default();
        m.try_forward_backward(&tokens, &tokens, b, t, &mut grads, 1.0, &mut ws)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        let e = m
            .try_forward_backward(&tokens, &tokens, b, t, &mut grads, 1.0, &mut ws)
            .unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("engram_table.1.f32") && msg.contains("vanished"),
            "{msg}"
        );
        let e = m.try_forward(&tokens, b, t, &mut ws).unwrap_err();
        assert!(format!("{e:#}").contains("engram_table.1.f32"));
        assert!(m.check_engram_tables().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn whole_model_gradient_matches_finite_differences_with_engram() {
        for residual in [Residual::Plain, Residual::Mhc] {
            let mut m = Model::new(engram_test_cfg(residual)).unwrap();
            m.init(1);
            m.engram_eot = Some(3);
            perturb_engram(&mut m, 5);
            let (b, t) = (2, 6);
            // Token 3 (the EOT) ends a document inside the first row.
            let mut tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % 19) as u32).collect();
            tokens[3] = 3;
            let targets: Vec<u32> = (0..b * t).map(|i| (i * 5 % 19) as u32).collect();
            let mut ws = Workspace::default();
            let mut grads = vec![0.0; m.layout.total];
            m.forward_backward(&tokens, &targets, b, t, &mut grads, 1.0, &mut ws);
            let mm = std::cell::RefCell::new(Model {
                params: m.params.clone(),
                engram: Some(clone_engram(m.engram.as_ref().unwrap())),
                engram_eot: m.engram_eot,
                ..Model::new(m.cfg.clone()).unwrap()
            });
            let loss_with = |p: &[f32]| {
                let mut mm = mm.borrow_mut();
                mm.params.copy_from_slice(p);
                let mut ws = Workspace::default();
                mm.forward(&tokens, b, t, &mut ws);
                mm.loss(&targets, &mut ws)
            };
            crate::kernels::gradcheck::check(&m.params, &grads, loss_with, 1e-2, 1e-2);
            // Every Engram gate tensor on its own.
            let mut checked = 0;
            for spec in m
                .layout
                .tensors
                .iter()
                .filter(|t| is_engram_tensor(&t.name))
            {
                let r = spec.range();
                let gn = grads[r.clone()].iter().map(|g| g * g).sum::<f32>().sqrt();
                if gn < 1e-3 * (spec.len() as f32).sqrt() {
                    continue;
                }
                let sub = |q: &[f32]| {
                    let mut p = m.params.clone();
                    p[r.clone()].copy_from_slice(q);
                    loss_with(&p)
                };
                crate::kernels::gradcheck::check(
                    &m.params[r.clone()],
                    &grads[r.clone()],
                    sub,
                    1e-2,
                    2e-2,
                );
                checked += 1;
            }
            assert!(checked >= 6, "only {checked} engram tensors checked");
            mm.borrow_mut().params.copy_from_slice(&m.params);
            // Table rows: the sparse gradient against finite differences of the entries.
            let e = m.engram.as_ref().unwrap();
            assert_eq!(ws.engram_table_grads.len(), 2);
            for (i, tg) in ws.engram_table_grads.iter().enumerate() {
                let dim = e.layers[i].table.dim();
                assert!(!tg.rows.is_empty());
                let mut dense = vec![0.0f32; e.layers[i].table.rows() * dim];
                tg.add_to_dense(&mut dense);
                let orig = e.layers[i].table.as_slice().to_vec();
                let sub = |q: &[f32]| {
                    let mut g = mm.borrow_mut();
                    let tab = g.engram.as_mut().unwrap().layers[i].table.as_mut_slice();
                    tab.unwrap().copy_from_slice(q);
                    let mut ws = Workspace::default();
                    g.forward(&tokens, b, t, &mut ws);
                    g.loss(&targets, &mut ws)
                };
                crate::kernels::gradcheck::check(&orig, &dense, sub, 1e-2, 2e-2);
                mm.borrow_mut().engram.as_mut().unwrap().layers[i]
                    .table
                    .as_mut_slice()
                    .unwrap()
                    .copy_from_slice(&orig);
            }
        }
    }

    #[test]
    fn mhc_streams_amax_diagnostics_and_nan_location() {
        let mut cfg = small_cfg(true, 2, RopeLayout::Interleaved);
        cfg.residual = Residual::Mhc;
        let mut m = Model::new(cfg).unwrap();
        m.init(2);
        let (b, t) = (1, 6);
        let tokens: Vec<u32> = (0..6).collect();
        let mut ws = Workspace::default();
        m.forward(&tokens, b, t, &mut ws);
        assert!(m.loss(&tokens, &mut ws).is_finite());
        assert_eq!(ws.hc_streams(0).unwrap().len(), t * 4 * 12);
        let g = ws.hc_amax().unwrap();
        assert_eq!(g.len(), 4);
        for x in &g {
            assert!(
                (x[0] - 1.0).abs() < 1e-3 && (x[1] - 1.0).abs() < 1e-2,
                "{x:?}"
            );
        }
        let o = m.layout.get("layers.1.attn_hc.base").unwrap().offset;
        m.params[o + 3] = f32::NAN;
        m.forward(&tokens, b, t, &mut ws);
        assert!(!m.loss(&tokens, &mut ws).is_finite());
        let e = ws.first_nonfinite().unwrap();
        assert!(
            e.contains("coefficients") && e.contains("layer 1 (attention)"),
            "{e}"
        );
    }
}
