//! Auxiliary-loss-free MoE balancing of a model (module [`crate::moe`] has the rules): the
//! sign step, the refit of the selection bias to pooled or re-scored router inputs, and the
//! diagnostics the training loop logs.

use super::{Ffn, Model, Workspace};
use crate::moe::{self, MoeSpec};
use rayon::prelude::*;

impl Model {
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
        let score = crate::prof::span("moe.fit.score");
        let owned = if self.cfg.bias_fit_window > 0 {
            Some(self.moe_pool_scores(pools))
        } else if self.cfg.bias_fit_rescore {
            Some(self.moe_rescore(ws))
        } else {
            None
        };
        drop(score);
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
        // The layers' fits are independent: one layer per task, the same bits as one after
        // another (every fit is deterministic).
        let jobs: Vec<(usize, &[f32])> = self
            .layout
            .layers
            .iter()
            .zip(scores)
            .filter_map(|(lo, sc)| match lo.ffn {
                Ffn::Moe(mo) if !mo.hash && !sc.is_empty() => Some((mo.bias, *sc)),
                _ => None,
            })
            .collect();
        let params = &self.params;
        // With several layers the layers are the parallel tasks (each fit's token loops run
        // on its thread: no pool synchronisation per Sinkhorn round and per expert sweep).
        let inner = jobs.len() < 2;
        let fitted: Vec<Vec<f32>> = jobs
            .par_iter()
            .map(|&(at, sc)| {
                let mut b = params[at..at + e].to_vec();
                moe::refit_bias_in(&mut b, sc, k, iters, hard, rate, inner);
                b
            })
            .collect();
        for ((at, _), b) in jobs.iter().zip(fitted) {
            self.params[*at..*at + e].copy_from_slice(&b);
        }
    }

    /// Router scores `[N, E]` of the last forward pass's MoE inputs under the *current* router
    /// weights (empty for dense and hash layers): after the optimizer step, the batch just
    /// routed as the updated router scores it (see [`moe::router_scores`]).
    pub fn moe_rescore(&self, ws: &Workspace) -> Vec<Vec<f32>> {
        self.score_routed(|l| {
            let f = ws.ffn_input(l);
            if f.is_empty() {
                Vec::new()
            } else {
                vec![f]
            }
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
        for ((l, lo), pool) in self.layout.layers.iter().enumerate().zip(pools) {
            let f = ws.ffn_input(l);
            if let Ffn::Moe(mo) = lo.ffn {
                if !mo.hash && !f.is_empty() {
                    pool.push(f);
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
}

#[cfg(test)]
mod tests {
    use crate::config::{ModelConfig, V4LayerType};
    use crate::dsa::DsaRun;
    use crate::model::{Ffn, Model, Workspace};
    use crate::moe::{self, MoeSpec};
    use crate::rng::Rng;

    /// The expert loads the balancing's sign step uses are counted where the training
    /// forward's router picks the experts: they equal a separate count of the same batch's
    /// routing (its router inputs scored again, top-k on score + bias), for every routed
    /// layer of a DeepSeek-V4 model (a hash layer first), with a bias that moves selections.
    #[test]
    fn training_forward_loads_equal_a_recount_of_the_batch_routing() {
        let mut c = ModelConfig::preset("v4-tiny").unwrap();
        (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.head_dim) = (50, 16, 3, 2, 8);
        (c.n_routed_experts, c.top_k, c.moe_inter, c.hc_mult) = (6, 2, 8, 2);
        c.max_seq_len = 32;
        let v = c.v4.as_mut().unwrap();
        (v.q_lora_rank, v.o_lora_rank, v.o_groups, v.sliding_window) = (8, 4, 2, 4);
        v.layer_types = vec![
            V4LayerType::SlidingAttention,
            V4LayerType::CompressedSparseAttention,
            V4LayerType::HeavilyCompressedAttention,
        ];
        v.num_nextn_predict_layers = 0;
        (v.compress_rate_hca, v.index_n_heads, v.index_head_dim) = (8, 2, 4);
        (v.index_topk, v.qk_rope_head_dim) = (3, 4);
        let mut m = Model::new(c).unwrap();
        m.init(5);
        let (e, k) = (m.cfg.n_routed_experts, m.cfg.top_k);
        let mut r = Rng::new(6);
        for lo in m.layout.layers.clone() {
            if let Ffn::Moe(mo) = lo.ffn {
                for b in &mut m.params[mo.bias..mo.bias + e] {
                    *b = 0.05 * r.normal() as f32;
                }
            }
        }
        let (b, t) = (2, 24);
        let ids: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 17 + 3) % 50).collect();
        let mut grads = vec![0.0f32; m.layout.total];
        let mut ws = Workspace::default();
        let run = DsaRun {
            stage: crate::config::DsaStage::Sparse,
            kl: true,
            recall: false,
        };
        m.forward_backward_dsa(&ids, &ids, b, t, &mut grads, 1.0, &mut ws, run);
        let loads = ws.moe_loads();
        let routed = m.routed_moe_layers();
        assert_eq!(routed, vec![1, 2], "layer 0 routes by hash");
        let spec = MoeSpec::new(&m.cfg);
        for (l, load) in loads.iter().enumerate() {
            let load = load.expect("every layer is MoE");
            assert_eq!(load.iter().sum::<u64>(), (b * t * k) as u64, "layer {l}");
            if let Ffn::Moe(mo) = m.layout.layers[l].ffn {
                if mo.hash {
                    continue;
                }
                let scores = moe::router_scores(&spec, &m.params, &mo, ws.ffn_input(l));
                let recount = moe::topk_load(&scores, &m.params[mo.bias..mo.bias + e], k);
                assert_eq!(load, &recount[..], "layer {l}");
                assert!(load.iter().any(|&x| x != load[0]), "layer {l}: {load:?}");
            }
        }
    }
}
