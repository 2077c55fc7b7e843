//! Where every tensor sits in the model's flat parameter buffer: names (the checkpoint's),
//! shapes, offsets, and which tensors AdamW decays or trains. One [`LayerOffsets`] per block
//! names the offsets of its sublayers; [`Ffn`] chooses the feed-forward module. The MTP blocks
//! (DeepSeek-V4, module `mtp`) come last, after the output head: one more block each (built by
//! the same code, block index `n_layers + j`) and their own tensors ([`MtpOffsets`]).

use crate::config::{ModelConfig, Residual};
use crate::dsa::IndexerOffsets;
use crate::engram;
use crate::mhc::{HcDims, HcOffsets};
use crate::moe::MoeOffsets;

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
    /// DeepSeek-V4 attention (`layers.{i}.attn.*`) in place of `wqkv`/`wo` (both 0).
    pub v4: Option<super::attention_v4::V4AttnOffsets>,
    /// The q/k/v biases and the per-head q/k norms (`qkv_bias`, `qk_norm`).
    pub qk: super::attention_qk::QkOffsets,
    /// Multi-head latent attention (`cfg.mla`) in place of `wqkv`/`wo` (both 0).
    pub mla: Option<super::attention_mla::MlaOffsets>,
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
    /// The `n_layers` main layers, then the MTP blocks' transformer blocks (`n_blocks()` in
    /// all): block `l` of `block_forward`.
    pub layers: Vec<LayerOffsets>,
    pub norm: usize,
    /// Output projection; equals `embed` when tied.
    pub output: usize,
    /// The mHC collapse head (`hc_head.{fn,scale,base}`), mHC only.
    pub hc_head: Option<HcOffsets>,
    /// Offset of each Engram layer's gate parameters (`layers.{l}.engram.*`, laid out by
    /// `GateSpec::offsets`), in `engram.layer_ids` order.
    pub engram_gate: Vec<usize>,
    /// The MTP blocks' own tensors (their transformer blocks are `layers[n_layers..]`).
    pub mtp: Vec<MtpOffsets>,
    /// Where the MTP blocks begin: the main model is `params[..main_total]`.
    pub main_total: usize,
    pub total: usize,
}

#[derive(Default)]
pub(crate) struct LayoutBuilder {
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
    pub(crate) fn add(&mut self, name: String, shape: Vec<usize>, decay: bool) -> usize {
        self.add_t(name, shape, decay, true)
    }
    /// The tensors of one hyper-connection layer, `name(s)` for `s` in `fn, scale, base` (mHC)
    /// or `fn, scale, static_alpha, static_beta` (HC).
    fn add_hc(&mut self, name: &dyn Fn(&str) -> String, dm: &HcDims) -> HcOffsets {
        let offs: Vec<usize> = dm
            .layer_tensors()
            .into_iter()
            .map(|(suffix, shape, decay)| self.add(name(suffix), shape, decay))
            .collect();
        HcOffsets {
            fn_: offs[0],
            scale: offs[1],
            stat: offs[2],
            in_quant: None,
        }
    }
}

impl ParamLayout {
    pub fn new(c: &ModelConfig) -> Self {
        let mut bld = LayoutBuilder::default();
        let d = c.d_model;
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
            layers.push(add_block(&mut bld, c, i, &p));
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
                in_quant: None,
            }
        });
        let norm = bld.add("norm.weight".into(), vec![d], false);
        let output = if c.tied_embeddings {
            embed
        } else {
            bld.add("output.weight".into(), vec![c.vocab_size, d], true)
        };
        // The MTP blocks, after the main model (its offsets do not depend on them), in the
        // official checkpoint's names (`mtp.{j}.…`).
        let main_total = bld.off;
        let mut mtp = Vec::new();
        for j in 0..c.mtp_layers() {
            let p = |s: &str| format!("mtp.{j}.{}", official_block_name(s));
            let e_proj = bld.add(p("e_proj.weight"), vec![d, d], true);
            let h_proj = bld.add(p("h_proj.weight"), vec![d, d], true);
            let enorm = bld.add(p("enorm.weight"), vec![d], false);
            let hnorm = bld.add(p("hnorm.weight"), vec![d], false);
            layers.push(add_block(&mut bld, c, c.n_layers + j, &p));
            let hc_head = hcd.filter(|_| c.residual == Residual::Mhc).map(|dm| {
                let n = dm.n;
                HcOffsets {
                    fn_: bld.add(p("hc_head_fn"), vec![n, n * d], true),
                    scale: bld.add(p("hc_head_scale"), vec![1], false),
                    stat: bld.add(p("hc_head_base"), vec![n], false),
                    in_quant: None,
                }
            });
            let norm = bld.add(p("norm.weight"), vec![d], false);
            mtp.push(MtpOffsets {
                e_proj,
                h_proj,
                enorm,
                hnorm,
                hc_head,
                norm,
            });
        }
        ParamLayout {
            tensors: bld.tensors,
            embed,
            layers,
            norm,
            output,
            hc_head,
            engram_gate,
            mtp,
            main_total,
            total: bld.off,
        }
    }

    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Lay out block `i`'s tensors (layer `i` of the main model, or MTP block `i − n_layers`),
/// named by `p` from mnemo's block suffixes (`attention_norm.weight`, `attn_hc.fn`, …).
fn add_block(
    bld: &mut LayoutBuilder,
    c: &ModelConfig,
    i: usize,
    p: &dyn Fn(&str) -> String,
) -> LayerOffsets {
    let (d, hd, f) = (c.d_model, c.head_dim, c.ffn_hidden);
    let hcd = HcDims::from_config(c);
    let attn_hc = hcd.map(|dm| bld.add_hc(&|s| p(&format!("attn_hc.{s}")), &dm));
    let attn_norm = bld.add(p("attention_norm.weight"), vec![d], false);
    let (mut wqkv, mut wo, mut indexer, mut v4) = (0, 0, None, None);
    let mut qk = super::attention_qk::QkOffsets::default();
    let mut mla = None;
    if let Some(m) = &c.mla {
        mla = Some(super::attention_mla::MlaOffsets::add(bld, c, m, p));
    } else if c.v4.is_some() {
        v4 = Some(super::attention_v4::V4AttnOffsets::add(
            bld,
            &p("attn"),
            c,
            i,
        ));
    } else {
        wqkv = bld.add(p("attention.wq.weight"), vec![c.n_heads * hd, d], true);
        bld.add(p("attention.wk.weight"), vec![c.n_kv_heads * hd, d], true);
        bld.add(p("attention.wv.weight"), vec![c.n_kv_heads * hd, d], true);
        wo = bld.add(p("attention.wo.weight"), vec![d, c.n_heads * hd], true);
        qk = super::attention_qk::QkOffsets::add(bld, c, p);
        indexer = c.dsa.as_ref().map(|x| {
            let (hi, di) = (x.index_n_heads, x.index_head_dim);
            IndexerOffsets {
                wq: bld.add(p("indexer.wq"), vec![hi * di, d], true),
                wk: bld.add(p("indexer.wk"), vec![di, d], true),
                k_norm_w: bld.add(p("indexer.k_norm.weight"), vec![di], false),
                k_norm_b: bld.add(p("indexer.k_norm.bias"), vec![di], false),
                wproj: bld.add(p("indexer.weights_proj"), vec![hi, d], true),
            }
        });
    }
    let ffn_hc = hcd.map(|dm| bld.add_hc(&|s| p(&format!("ffn_hc.{s}")), &dm));
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
    LayerOffsets {
        attn_norm,
        wqkv,
        wo,
        ffn_norm,
        ffn,
        attn_hc,
        ffn_hc,
        indexer,
        v4,
        qk,
        mla,
    }
}

/// The official checkpoint's name of a block tensor given mnemo's suffix (the MTP block keeps
/// the official names): `attn_norm.weight`, `hc_attn_{fn,scale,base}`, `hc_ffn_*`; the
/// attention and feed-forward tensors are named alike.
fn official_block_name(s: &str) -> String {
    if s == "attention_norm.weight" {
        return "attn_norm.weight".into();
    }
    for (ours, theirs) in [("attn_hc.", "hc_attn_"), ("ffn_hc.", "hc_ffn_")] {
        if let Some(rest) = s.strip_prefix(ours) {
            return format!("{theirs}{rest}");
        }
    }
    s.to_string()
}

/// Offsets of one MTP block's own tensors (its transformer block is `layers[n_layers + j]`).
#[derive(Clone, Copy, Debug)]
pub struct MtpOffsets {
    /// `[D, D]` each: the projections of the normed next-token embedding and of the normed
    /// incoming streams.
    pub e_proj: usize,
    pub h_proj: usize,
    /// `[D]` each: the norms of the embedding and of each incoming stream.
    pub enorm: usize,
    pub hnorm: usize,
    /// The block's own mHC head (`hc_head_{fn,scale,base}`), mHC only.
    pub hc_head: Option<HcOffsets>,
    /// `[D]`: the final norm before the shared output head.
    pub norm: usize,
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
    /// Parameters that one token uses: everything but the routed experts it is not sent to
    /// (and the MTP blocks, a training objective and a draft model).
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
    /// The MTP blocks, all their tensors (counted in no other kind).
    pub mtp: usize,
}

/// Whether a parameter belongs to a hyper-connection layer or an mHC head (the MTP blocks'
/// official names: `mtp.{j}.hc_attn_fn`, `mtp.{j}.hc_head_base`, …).
pub fn is_hc_tensor(name: &str) -> bool {
    name.contains("_hc.") || name.starts_with("hc_head.") || name.contains(".hc_")
}

/// Whether a parameter belongs to an MTP block (`mtp.{j}.*`).
pub fn is_mtp_tensor(name: &str) -> bool {
    name.starts_with("mtp.")
}
