//! What a run reports: `metrics.jsonl` (deterministic values only: a function of config, seed
//! and step) and `timing.jsonl` (wall-clock step times), the loss-curve and hyper-connection
//! charts, the start-of-run summary, and the progress bar (or plain lines without a terminal).

use super::step::StepOut;
use super::validate::{moe_stats, worst_load};
use crate::config::{RunConfig, TrainConfig};
use crate::model::{Model, Workspace};
use crate::util::human_count;
use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

pub(super) fn append_metrics(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{v}").with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Keep only the metric lines with `step <= keep` (used when resuming).
pub(super) fn truncate_metrics(path: &Path, keep: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let s =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = String::new();
    for line in s.lines() {
        let step = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["step"].as_u64());
        if matches!(step, Some(st) if st <= keep) {
            out.push_str(line);
            out.push('\n');
        }
    }
    crate::util::write_atomic(path, out.as_bytes())
}

/// Whether step `step` is logged (metrics and timing): every `log_interval` steps, the first
/// and the last.
pub(super) fn logs_at(tc: &TrainConfig, step: u64) -> bool {
    step.is_multiple_of(tc.log_interval) || step == 1 || step == tc.max_steps
}

/// The `metrics.jsonl` line of a logged step: loss (and the MTP loss), learning rate, gradient
/// norms, expert load, Engram table gradients, DSA indexer KL/recall, hyper-connection gains.
pub(super) fn step_metrics(
    run: &RunConfig,
    model: &Model,
    ws: &Workspace,
    s: &StepOut,
) -> serde_json::Value {
    let tc = &run.train;
    let (step, lr, loss, gnorm) = (s.step, s.lr, s.loss, s.gnorm);
    let mut m = serde_json::json!({"step": step, "tokens": s.tokens_seen, "lr": lr, "loss": loss, "grad_norm": gnorm});
    if let Some(x) = s.mtp_loss {
        m["mtp_loss"] = serde_json::json!(x);
    }
    if let Some(stats) = moe_stats(model, &s.loads) {
        m["moe"] = stats;
    }
    m["layer_grad_norm"] = serde_json::json!(s.layer_gnorms);
    if !s.table_rows.is_empty() {
        m["engram_table_grad_norm"] = serde_json::json!(s.table_sq.sqrt());
        m["engram_rows_touched"] = serde_json::json!(s.table_rows);
    }
    if run.model.has_indexer() {
        m["dsa_stage"] = serde_json::json!(tc.dsa_stage.name());
        m["dsa_kl"] = serde_json::json!(s.dsa_kl);
        if let Some(r) = s.dsa_recall {
            m["dsa_recall"] = serde_json::json!(r);
        }
    }
    if let Some(g) = ws.hc_amax() {
        let col = |i: usize| g.iter().map(|x| x[i]).collect::<Vec<f64>>();
        m["hc_amax_fwd"] = serde_json::json!(col(0));
        m["hc_amax_bwd"] = serde_json::json!(col(1));
        m["hc_amax_fwd_single"] = serde_json::json!(col(2));
        m["hc_amax_bwd_single"] = serde_json::json!(col(3));
    }
    m
}

/// Redraw the charts of the run in `out` from its metrics: the loss curve, and for
/// hyper-connection models the Amax gains and gradient norms. A chart that cannot be drawn
/// is a warning, not an error.
pub(super) fn plots(run: &RunConfig, metrics_path: &Path, out: &Path, title: &str) {
    if let Err(e) = crate::plot::loss_curve(metrics_path, &out.join("loss.png"), title) {
        tracing::warn!("could not draw the loss curve: {e:#}");
    }
    if !run.model.residual.is_plain() {
        if let Err(e) = crate::plot::hc_stability(
            metrics_path,
            &out.join("hc_amax.png"),
            &out.join("grad_norm.png"),
            title,
        ) {
            tracing::warn!("could not draw the Amax gain chart: {e:#}");
        }
    }
}

/// The start-of-run summary of the model: parameters by kind, FLOPs per step, and the unigram
/// entropy of the training tokens (`unigram`, the loss to beat).
pub(super) fn print_model(run: &RunConfig, model: &Model, unigram: f64) {
    let tc = &run.train;
    let (b, t) = (tc.batch_size, tc.seq_len);
    let h = model.counts();
    eprintln!(
        "model: {} parameters, {} activated per token; {:.1} GFLOP per step",
        human_count(h.total as f64),
        human_count(h.activated as f64),
        run.model.train_flops(b, t) * tc.grad_accum as f64 / 1e9
    );
    eprintln!(
        "  embedding {}, attention {}, dense FFN {}, router {}, shared experts {}, routed experts {}, norms {}, output {}",
        human_count(h.embedding as f64),
        human_count(h.attention as f64),
        human_count(h.dense_ffn as f64),
        human_count(h.router as f64),
        human_count(h.shared_experts as f64),
        human_count(h.routed_experts as f64),
        human_count(h.norms as f64),
        human_count(h.output as f64),
    );
    if !tc.precision.is_f32() {
        eprintln!(
            "  precision {}: bf16 GEMM operands, f32 accumulation ({})",
            tc.precision.name(),
            if crate::kernels::bf16::has_avx512_bf16() {
                "AVX-512 BF16 kernel"
            } else {
                "no AVX-512 BF16 on this CPU: operands rounded, f32 GEMM, slower than f32"
            }
        );
    }
    if h.mtp > 0 {
        eprintln!(
            "  MTP blocks {} (of the total, not of the kinds above nor activated; MTP loss weight {})",
            human_count(h.mtp as f64),
            tc.mtp_weight
        );
    }
    if h.engram_gates > 0 {
        eprintln!(
            "  engram gates {}, engram tables {} (outside the flat buffer; lazy Adam at {}x lr)",
            human_count(h.engram_gates as f64),
            human_count(h.engram_tables as f64),
            run.model.engram.as_ref().map_or(0.0, |e| e.table_lr_mult)
        );
    }
    eprintln!("unigram entropy of the training tokens: {unigram:.3} nats/token (the loss to beat)");
}

/// `line` above the progress bar, or on stderr when there is none.
pub(super) fn println_above(pb: &indicatif::ProgressBar, line: String) {
    if pb.is_hidden() {
        eprintln!("{line}")
    } else {
        pb.println(line)
    }
}

/// The progress of the loop: a bar on a terminal (hidden otherwise) and the throughput since
/// this invocation started.
pub(super) struct Progress {
    pub pb: indicatif::ProgressBar,
    started: Instant,
    start_step: u64,
    /// Tokens per optimizer step.
    step_tokens: usize,
}

impl Progress {
    /// Starting at step `pos` of `tc.max_steps`.
    pub fn new(enabled: bool, pos: u64, tc: &TrainConfig) -> Self {
        Progress {
            pb: progress_bar(enabled, pos, tc.max_steps),
            started: Instant::now(),
            start_step: pos,
            step_tokens: tc.batch_size * tc.seq_len * tc.grad_accum,
        }
    }

    /// Tokens per second over the steps run since the start, up to step `step`.
    pub fn tokens_per_s(&self, step: u64) -> f64 {
        let el = self.started.elapsed().as_secs_f64();
        (step - self.start_step) as f64 * self.step_tokens as f64 / el.max(1e-9)
    }

    /// After step `s`: the bar's position and message (loss, lr, throughput, expert load, DSA
    /// indexer KL), and without a bar a line every `log_interval` steps.
    pub fn update(&self, run: &RunConfig, model: &Model, s: &StepOut) {
        let tc = &run.train;
        let (step, loss, lr) = (s.step, s.loss, s.lr);
        let tps = self.tokens_per_s(step);
        let pb = &self.pb;
        pb.set_position(step);
        let mut moe_msg = worst_load(model, &s.loads)
            .map(|x| format!(" | max expert load {x:.2}x mean"))
            .unwrap_or_default();
        if run.model.has_indexer() {
            moe_msg.push_str(&format!(
                " | {} idx KL {:.4}",
                tc.dsa_stage.name(),
                s.dsa_kl
            ));
            if let Some(r) = s.dsa_recall {
                moe_msg.push_str(&format!(" recall {r:.3}"));
            }
        }
        let (mtp_bar, mtp_line) = match s.mtp_loss {
            Some(x) => (format!(" | mtp {x:.4}"), format!(", mtp loss {x:.4}")),
            None => (String::new(), String::new()),
        };
        pb.set_message(format!(
            "loss {loss:.4}{mtp_bar} | lr {lr:.2e} | {} tok/s{moe_msg}",
            human_count(tps)
        ));
        if pb.is_hidden() && step % tc.log_interval == 0 {
            eprintln!(
                "step {step}/{}: loss {loss:.4}{mtp_line}, lr {lr:.2e}, {} tok/s{moe_msg}",
                tc.max_steps,
                human_count(tps)
            );
        }
    }
}

fn progress_bar(enabled: bool, pos: u64, len: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps | {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_position(pos);
    pb
}
