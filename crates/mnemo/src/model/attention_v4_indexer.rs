//! Training the lightning indexer of a DeepSeek-V4 CSA layer by the DSA recipe (module
//! [`crate::dsa`]; `train.dsa_stage`): the indexer learns to score the compressed entries the
//! layer's attention puts its mass on, from a KL loss of its own, with its inputs detached (no
//! gradient flows from it into the model, and the LM loss gives it none: its top-k is a set of
//! integers).
//!
//! ```text
//! I[t,w] = Σ_h ω[t,h]·ReLU(qᴵ[t,h]·Kᴵ[w])·c_s        c_s = (Hi·dᴵ)^-½     (w visible to t)
//! S_t    = every visible entry (dense and warm-up stages: the attention reads them all)
//!          | TopK(t) (sparse stage: the entries the attention reads)
//! p_t(w) = Σ_h P_h(t,w) / Σ_{w'∈S_t} Σ_h P_h(t,w')    P_h: the layer's attention probabilities
//!                                                      (window keys and sink in the softmax)
//! L_I    = mean over CSA layers and rows of KL(p_t ‖ softmax_{S_t}(I_t))
//! dI[t,w] = c·(softmax_{S_t}(I_t)(w) − p_t(w)),  c = 1/(n_CSA·N)
//! dω[t,h] = Σ_w dI·c_s·ReLU(z)     dqᴵ[t,h] = Σ_w dI·ω·c_s·[z>0]·Kᴵ[w]
//! dKᴵ[w]  = Σ_{t,h} dI·ω·c_s·[z>0]·qᴵ[t,h]                              (z = qᴵ[t,h]·Kᴵ[w])
//! ```
//! then the inverse rope of `dqᴵ` and `Wq_bᴵ`'s gradient (input `q_res`), `weights_proj`'s
//! (input `a`), and the indexer compressor's backward from `dKᴵ` (input `a`); the input
//! gradients are dropped. The recall (logged) is the share of the attention's mass over all
//! visible entries that falls in `TopK(t)` (1 where no entry is visible).

use super::attention_v4::{
    dot, index_score, probs, CompActs, IndexProj, IndexerV4Offsets, V4Acts, V4AttnOffsets, V4Rope,
};
use super::Model;
use crate::dsa::DsaRun;
use crate::kernels::matmul::linear_backward;
use rayon::prelude::*;

/// One sequence's indexer activations on a CSA layer in a training stage.
#[derive(Default)]
pub(crate) struct IndexActs {
    comp: CompActs,
    /// The indexer's compressed keys `[n_e, dᴵ]`, queries (roped) `[t, Hi·dᴵ]`, weights `[t, Hi]`.
    keys: Vec<f32>,
    qi: Vec<f32>,
    wts: Vec<f32>,
    /// Per row: the scores of the visible entries, the top-k, the loss pairs `S_t` and `dL/dI`
    /// on them (× `c`, without the step's gradient scale).
    scores: Vec<Vec<f32>>,
    pub(super) topk: Vec<Vec<usize>>,
    pairs: Vec<Vec<usize>>,
    di: Vec<Vec<f32>>,
}

impl Model {
    /// The indexer of one sequence from its row-wise projections (`[IndexProj]`: its
    /// compressor's values and logits, its queries and head weights, computed for the whole
    /// batch at once): keys, roped queries, weights, every row's scores of its visible entries
    /// and its top-k.
    pub(super) fn v4_index_forward(
        &self,
        io: &IndexerV4Offsets,
        rope: &V4Rope,
        (kproj, (qi, wts)): IndexProj,
    ) -> IndexActs {
        let v = self.cfg.v4.as_ref().expect("a DeepSeek-V4 config");
        let (hi, di, k) = (v.index_n_heads, v.index_head_dim, v.index_topk);
        let m = io.comp.ratio;
        let mut ia = IndexActs::default();
        ia.keys = self.v4_compress_projected(&io.comp, kproj, rope, &mut ia.comp);
        (ia.qi, ia.wts) = (qi, wts);
        let keys = &ia.keys;
        let total = keys.len() / di;
        let rows: Vec<(Vec<f32>, Vec<usize>)> = ia
            .qi
            .par_chunks_mut(hi * di)
            .zip(ia.wts.par_chunks(hi))
            .enumerate()
            .map(|(tq, (q, w))| {
                rope.rotate_at(tq, q, di, false);
                let visible = (tq + 1) / m;
                let scores: Vec<f32> = (0..visible)
                    .map(|e| index_score(q, w, &keys[e * di..(e + 1) * di]))
                    .collect();
                let top = crate::kernels::torch_topk::torch_topk_visible(&scores, k, total);
                (scores, top)
            })
            .collect();
        (ia.scores, ia.topk) = rows.into_iter().unzip();
        ia
    }

    /// The indexer loss of one sequence (pairs and `dL/dI` kept in `ia`): returns the sums
    /// over its rows of the KL and (`run.recall`) the recall. `(qs, kvs)`: the sequence's
    /// queries and K = V rows; `entries`: its attention entries.
    pub(super) fn v4_index_loss(
        &self,
        vo: &V4AttnOffsets,
        (qs, kvs): (&[f32], &[f32]),
        entries: &[f32],
        ia: &mut IndexActs,
        run: DsaRun,
        norm: f32,
    ) -> (f64, f64) {
        let (h, d) = (self.cfg.n_heads, self.cfg.head_dim);
        let sinks = self.w(vo.sink, h);
        let scale = (d as f32).powf(-0.5);
        let sparse = run.stage.is_sparse();
        // Head-summed attention mass on each entry the row attends to (in `pairs` order).
        let mass = |tq: usize, sel: Option<&[usize]>| -> Vec<f32> {
            let keys = self.v4_keys(vo, tq, (kvs, 0), entries, sel);
            let mut p = vec![0.0f32; keys.len()];
            let mut out = Vec::new();
            for hh in 0..h {
                let den = probs(
                    &qs[(tq * h + hh) * d..][..d],
                    &keys,
                    sinks[hh],
                    scale,
                    &mut p,
                );
                let ent = keys
                    .iter()
                    .zip(&p)
                    .filter(|(k, _)| k.0)
                    .map(|(_, x)| x / den);
                if hh == 0 {
                    out = ent.collect();
                } else {
                    out.iter_mut().zip(ent).for_each(|(o, x)| *o += x);
                }
            }
            out
        };
        let (scores, topk) = (&ia.scores, &ia.topk);
        let rows: Vec<(Vec<usize>, Vec<f32>, f64, f64)> = (0..scores.len())
            .into_par_iter()
            .map(|tq| {
                let visible = scores[tq].len();
                let pairs: Vec<usize> = match sparse {
                    true => topk[tq].clone(),
                    false => (0..visible).collect(),
                };
                if pairs.is_empty() {
                    return (pairs, Vec::new(), 0.0, 1.0);
                }
                let pm = mass(tq, sparse.then_some(&pairs[..]));
                let total: f64 = pm.iter().map(|&x| x as f64).sum();
                let iv: Vec<f64> = pairs.iter().map(|&w| scores[tq][w] as f64).collect();
                let mx = iv.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lz = mx + iv.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
                let mut kl = 0.0f64;
                let mut di = Vec::with_capacity(pairs.len());
                for (x, &pw) in iv.iter().zip(&pm) {
                    let p = pw as f64 / total;
                    if p > 0.0 {
                        kl += p * (p.ln() - (x - lz));
                    }
                    di.push((((x - lz).exp() - p) * norm as f64) as f32);
                }
                let recall = if !run.recall {
                    0.0
                } else {
                    let dense = if sparse { mass(tq, None) } else { pm.clone() };
                    let all: f64 = dense.iter().map(|&x| x as f64).sum();
                    topk[tq].iter().map(|&w| dense[w] as f64).sum::<f64>() / all
                };
                (pairs, di, kl, recall)
            })
            .collect();
        let (mut kl, mut recall) = (0.0, 0.0);
        ia.pairs.clear();
        ia.di.clear();
        for (p, g, k, r) in rows {
            ia.pairs.push(p);
            ia.di.push(g);
            kl += k;
            recall += r;
        }
        (kl, recall)
    }

    /// Backward of a CSA layer's indexer loss (training batch `[b, t]`) into the indexer's
    /// parameters only: adds `grad_scale · dL_I/dθ` to `grads` (module docs).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn v4_indexer_backward(
        &self,
        l: usize,
        vo: &V4AttnOffsets,
        a: &[f32],
        (b, t): (usize, usize),
        acts: &V4Acts,
        grads: &mut [f32],
        grad_scale: f32,
    ) {
        let Some(io) = &vo.indexer else { return };
        let c = &self.cfg;
        let v = c.v4.as_ref().expect("a DeepSeek-V4 config");
        let (dm, ql) = (c.d_model, v.q_lora_rank);
        let (hi, di) = (v.index_n_heads, v.index_head_dim);
        let cs_scale = (hi as f32).powf(-0.5) * (di as f32).powf(-0.5);
        let rope = self.v4_rope(l);
        for (s, ia) in acts.index.iter().enumerate().take(b) {
            let rows = s * t..(s + 1) * t;
            let xs = &a[rows.start * dm..rows.end * dm];
            let q_res = &acts.q_res[rows.start * ql..rows.end * ql];
            let mut dq = vec![0.0f32; t * hi * di];
            let mut dw = vec![0.0f32; t * hi];
            let mut dk = vec![0.0f32; ia.keys.len()];
            for tq in 0..t.min(ia.pairs.len()) {
                let (q, w) = (&ia.qi[tq * hi * di..][..hi * di], &ia.wts[tq * hi..][..hi]);
                for (&e, &g) in ia.pairs[tq].iter().zip(&ia.di[tq]) {
                    let g = g * grad_scale;
                    if g == 0.0 {
                        continue;
                    }
                    let kw = &ia.keys[e * di..(e + 1) * di];
                    for h in 0..hi {
                        let qh = &q[h * di..(h + 1) * di];
                        let z = dot(qh, kw);
                        if z <= 0.0 {
                            continue;
                        }
                        dw[tq * hi + h] += g * cs_scale * z;
                        let f = g * w[h] * cs_scale;
                        let dqh = &mut dq[(tq * hi + h) * di..][..di];
                        dqh.iter_mut().zip(kw).for_each(|(x, y)| *x += f * y);
                        let dke = &mut dk[e * di..(e + 1) * di];
                        dke.iter_mut().zip(qh).for_each(|(x, y)| *x += f * y);
                    }
                }
            }
            for (tq, row) in dq.chunks_mut(hi * di).enumerate() {
                rope.rotate_at(tq, row, di, true);
            }
            let (wq, wp) = (io.wq_b, io.weights_proj);
            linear_backward(
                None,
                &mut grads[wq..wq + hi * di * ql],
                &dq,
                q_res,
                self.w(wq, hi * di * ql),
                t,
                ql,
                hi * di,
            );
            linear_backward(
                None,
                &mut grads[wp..wp + hi * dm],
                &dw,
                xs,
                self.w(wp, hi * dm),
                t,
                dm,
                hi,
            );
            let mut dx = vec![0.0f32; t * dm];
            self.v4_compress_backward(&io.comp, xs, &rope, &ia.comp, &dk, &mut dx, grads);
        }
    }

    /// The `c = 1/(n_CSA·N)` of the indexer loss of a training batch of `n` rows.
    pub(super) fn v4_index_norm(&self, n: usize) -> f32 {
        1.0 / (self.cfg.n_indexer_layers().max(1) * n) as f32
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{DsaStage, ModelConfig, V4LayerType};
    use crate::dsa::DsaRun;
    use crate::model::{is_indexer_tensor, Model, Workspace};
    use crate::rng::Rng;

    /// A DeepSeek-V4 model small enough to difference every indexer parameter: one CSA layer
    /// (ratio 4, top-3 of up to 6 entries) and one HCA layer, window 4.
    fn model(seed: u64) -> Model {
        let mut c = ModelConfig::preset("v4-tiny").unwrap();
        (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.head_dim) = (50, 16, 2, 2, 8);
        (c.n_routed_experts, c.top_k, c.moe_inter, c.hc_mult) = (4, 2, 8, 2);
        c.max_seq_len = 32;
        let v = c.v4.as_mut().unwrap();
        (v.q_lora_rank, v.o_lora_rank, v.o_groups, v.sliding_window) = (8, 4, 2, 4);
        v.layer_types = vec![
            V4LayerType::CompressedSparseAttention,
            V4LayerType::HeavilyCompressedAttention,
        ];
        v.num_nextn_predict_layers = 0;
        (v.compress_rate_hca, v.index_n_heads, v.index_head_dim) = (8, 2, 4);
        (v.index_topk, v.qk_rope_head_dim) = (3, 4);
        let mut m = Model::new(c).unwrap();
        m.init(seed);
        let mut r = Rng::new(seed + 1);
        for t in m.layout.tensors.clone() {
            let s = if t.shape.len() == 1 || t.name.ends_with("ape") {
                0.5
            } else {
                1.0
            };
            for p in &mut m.params[t.range()] {
                *p += s * 0.2 * r.normal() as f32;
            }
        }
        m
    }

    fn run(stage: DsaStage) -> DsaRun {
        DsaRun {
            stage,
            kl: true,
            recall: true,
        }
    }

    /// The indexer loss `L_I` of the batch (the mean KL the forward reports) and every
    /// sequence's top-k on layer 0.
    fn loss(m: &Model, ids: &[u32], stage: DsaStage) -> (f64, Vec<Vec<Vec<usize>>>) {
        let mut ws = Workspace::default();
        m.forward_dsa(ids, 2, ids.len() / 2, &mut ws, run(stage));
        let idx = &ws.layers[0].attn.v4.index;
        (
            ws.dsa_stats.kl,
            idx.iter().map(|ia| ia.topk.clone()).collect(),
        )
    }

    #[test]
    fn indexer_kl_gradient_matches_finite_differences() {
        let m = model(3);
        let t = 24;
        let ids: Vec<u32> = (0..2 * t as u32).map(|i| (i * 17 + 3) % 50).collect();
        for stage in [DsaStage::Warmup, DsaStage::Sparse] {
            let mut grads = vec![0.0f32; m.layout.total];
            let mut ws = Workspace::default();
            m.forward_backward_dsa(&ids, &ids, 2, t, &mut grads, 1.0, &mut ws, run(stage));
            let (l0, sel0) = loss(&m, &ids, stage);
            assert_eq!(l0, ws.dsa_stats.kl);
            let recall = ws.dsa_stats.recall.unwrap();
            assert!(
                l0 > 1e-3 && recall > 0.0 && recall < 1.0,
                "{stage:?}: {l0} {recall}"
            );
            let (mut num, mut den, mut checked) = (0.0f64, 0.0f64, 0);
            for tn in &m.layout.tensors {
                if !is_indexer_tensor(&tn.name) {
                    // Warm-up: nothing else moves; sparse: the LM gradient reaches them.
                    if stage == DsaStage::Warmup {
                        assert!(grads[tn.range()].iter().all(|&g| g == 0.0), "{}", tn.name);
                    }
                    continue;
                }
                for i in tn.range() {
                    let eps = 1e-3f32; // larger steps cross ReLU kinks (3e-3: 1.4e-2)
                    let mut mp = model(3);
                    mp.params[i] += eps;
                    let (lp, sp) = loss(&mp, &ids, stage);
                    mp.params[i] -= 2.0 * eps;
                    let (lm, sm) = loss(&mp, &ids, stage);
                    if sp != sel0 || sm != sel0 {
                        continue; // the top-k changed: L_I jumps (sparse stage)
                    }
                    let fd = (lp - lm) / (2.0 * eps as f64);
                    num += (fd - grads[i] as f64).powi(2);
                    den += fd.powi(2);
                    checked += 1;
                }
            }
            let rel = (num / den).sqrt();
            eprintln!("{stage:?}: L_I {l0:.4}, recall {recall:.3}, {checked} parameters, relative error {rel:.2e}");
            assert!(
                checked > 250 && rel < 5e-3,
                "{stage:?}: relative error {rel}"
            );
        }
    }

    #[test]
    fn dense_stages_attend_to_every_entry_and_sparse_to_the_top_k() {
        let m = model(5);
        let t = 24;
        let ids: Vec<u32> = (0..2 * t as u32).map(|i| (i * 7 + 1) % 50).collect();
        let logits = |stage: Option<DsaStage>| {
            let mut ws = Workspace::default();
            match stage {
                Some(s) => m.forward_dsa(&ids, 2, t, &mut ws, run(s)),
                None => m.forward(&ids, 2, t, &mut ws),
            }
            ws.logits.clone()
        };
        // The model itself (sparse) with and without the loss measured: the same logits.
        assert_eq!(logits(None), logits(Some(DsaStage::Sparse)));
        // Dense attention over every visible entry differs once the top-k selects.
        let (a, b) = (
            logits(Some(DsaStage::Dense)),
            logits(Some(DsaStage::Sparse)),
        );
        assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-4));
        assert_eq!(a, logits(Some(DsaStage::Warmup)));
    }
}
