//! `mnemo generate --lookup` and `mnemo bench lookup`: lookup-first decoding from the command
//! line (see `mnemo::lookup`).

use anyhow::{bail, Result};
use clap::Args;
use mnemo::generate::{KvCache, Sampling};
use mnemo::lookup::{generate_lookup, LookupConfig};
use std::io::Write;
use std::path::PathBuf;

/// Stream `max_new` tokens after `tokens` with lookup decoding, writing text to `out`.
#[allow(clippy::too_many_arguments)]
pub fn stream_lookup(
    model: &mnemo::model::Model,
    tok: &mnemo::tokenizer::Tokenizer,
    cache: &mut KvCache,
    tokens: &[u32],
    max_new: usize,
    s: Sampling,
    seed: u64,
    cfg: LookupConfig,
    out: &mut impl Write,
) -> Result<mnemo::lookup::LookupStats> {
    let mut stream = mnemo::tokenizer::StreamDecoder::new(tok);
    let (_, st) = generate_lookup(
        model,
        cache,
        tokens,
        max_new,
        s,
        seed,
        tok.vocab_size(),
        Some(tok.eot()),
        Some(cfg),
        |t| {
            write!(out, "{}", stream.push(t)?)?;
            Ok(out.flush()?)
        },
    )?;
    Ok(st)
}

#[derive(Args)]
pub struct BenchLookupArgs {
    /// Run directory, checkpoint directory or `.gguf` file.
    pub model: PathBuf,
    /// The user's message (e.g. a source file and an edit request).
    #[arg(long, value_name = "FILE")]
    pub prompt_file: PathBuf,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Tokens to generate at most (greedy).
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Draft tokens per step at most.
    #[arg(long, default_value_t = 8)]
    pub draft: usize,
    /// Also measure the lossy mode at these thresholds (repeatable).
    #[arg(long = "threshold", value_name = "P")]
    pub thresholds: Vec<f32>,
    /// Repetitions of each timing, interleaved over the configurations (medians reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Also time lookup with a fixed draft length (`--draft`) instead of adaptive drafting.
    #[arg(long)]
    pub fixed_draft: bool,
    /// Verify drafts with the fast multi-row product (f32 activations, each weight block
    /// dequantised once) instead of the exact one (rows bit-identical to one-token decoding).
    #[arg(long)]
    pub fast_verify: bool,
}

pub fn bench(a: BenchLookupArgs) -> Result<()> {
    if a.fast_verify {
        mnemo::batch::set_quant_max_rows(1);
    }
    let l = mnemo::checkpoint::load(&a.model, false)?;
    let tok = &l.tokenizer;
    let text = std::fs::read_to_string(&a.prompt_file)?;
    let prompt = if a.chat {
        if tok.chat_template().is_none() {
            bail!("{} has no chat template; drop --chat", a.model.display());
        }
        let (before, after) = mnemo::chat::split_prompt(tok)?;
        tok.encode_with_special(&format!("{before}{text}{after}"))?
    } else {
        tok.encode(&text)?
    };
    if prompt.len() < 2 || prompt.len() + a.max_tokens > l.model.cfg.max_seq_len {
        bail!(
            "the prompt ({} tokens) + --max-tokens must fit the context {}",
            prompt.len(),
            l.model.cfg.max_seq_len
        );
    }
    let cfg = LookupConfig {
        max_draft: a.draft,
        ..Default::default()
    };
    let mut configs = vec![None, Some(cfg)];
    if a.fixed_draft {
        configs.push(Some(LookupConfig {
            adaptive: false,
            ..cfg
        }));
    }
    let n_base = configs.len();
    configs.extend(a.thresholds.iter().map(|&p| {
        Some(LookupConfig {
            threshold: Some(p),
            ..cfg
        })
    }));
    // Repetitions alternate between the configurations (a shared machine's load drifts):
    // per configuration, the output (identical in every repetition: greedy), the counters and
    // the wall and CPU times of every repetition.
    let load0 = loadavg();
    let mut outs: Vec<Option<(Vec<u32>, mnemo::lookup::LookupStats)>> = vec![None; configs.len()];
    let mut walls = vec![Vec::new(); configs.len()];
    let mut cpus = vec![Vec::new(); configs.len()];
    for _ in 0..a.reps.max(1) {
        for (i, c) in configs.iter().enumerate() {
            let c0 = mnemo::batch::profile::cpu_secs();
            let (out, t, st) = run_with_history(&l, &prompt, a.max_tokens, *c)?;
            cpus[i].push(mnemo::batch::profile::cpu_secs() - c0);
            walls[i].push(t);
            if let Some((o, _)) = &outs[i] {
                if *o != out {
                    bail!("configuration {i}: greedy output changed between repetitions");
                }
            }
            outs[i] = Some((out, st));
        }
    }
    let load1 = loadavg();
    let outs: Vec<(Vec<u32>, mnemo::lookup::LookupStats)> = outs
        .into_iter()
        .map(|o| o.expect("one repetition"))
        .collect();
    let plain = &outs[0].0;
    let timing = |i: usize| {
        let n = outs[i].0.len() as f64;
        let (mw, mc) = (median(&walls[i]), median(&cpus[i]));
        // Per repetition, plain time / this time (same-moment ratio), then the median.
        let ratios: Vec<f64> = walls[0]
            .iter()
            .zip(&walls[i])
            .map(|(p, t)| (p / plain.len().max(1) as f64) / (t / n.max(1.0)))
            .collect();
        serde_json::json!({
            "tokens": outs[i].0.len(), "secs_median": mw, "secs_all": walls[i],
            "tok_s": n / mw, "tok_s_best": n / walls[i].iter().cloned().fold(f64::MAX, f64::min),
            "cpu_secs_median": mc, "cpu_tok_s": n / mc,
            "speedup_vs_plain_per_rep": ratios, "speedup_vs_plain_median": median(&ratios),
            "cpu_speedup_vs_plain": (median(&cpus[0]) / plain.len().max(1) as f64) / (mc / n.max(1.0)),
            "identical_to_plain": outs[i].0 == *plain, "stats": outs[i].1,
            "tokens_per_pass": n / outs[i].1.passes.max(1) as f64,
            "rows_per_pass": (outs[i].1.drafted + outs[i].1.passes) as f64 / outs[i].1.passes.max(1) as f64,
        })
    };
    let mut lossy = Vec::new();
    for (j, &p) in a.thresholds.iter().enumerate() {
        let i = n_base + j;
        let out = &outs[i].0;
        let same = out.iter().zip(plain).take_while(|(x, y)| x == y).count();
        let agree = out.iter().zip(plain).filter(|(x, y)| x == y).count();
        let mut t = timing(i);
        t["threshold"] = p.into();
        t["identical"] = (out == plain).into();
        t["common_prefix_tokens"] = same.into();
        t["position_agreement"] = (agree as f64 / plain.len().max(1) as f64).into();
        t["text"] = tok.decode(out)?.into();
        lossy.push(t);
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "model": a.model.display().to_string(),
            "threads": rayon::current_num_threads(),
            "prompt_tokens": prompt.len(),
            "max_tokens": a.max_tokens,
            "max_draft": a.draft,
            "reps": a.reps.max(1),
            "loadavg_start": load0, "loadavg_end": load1,
            "verify": if a.fast_verify { "fast product (f32 activations, dequantised once per block)" } else { "exact quantised product (rows bit-identical to one-token decoding)" },
            "plain": timing(0),
            "lookup": timing(1),
            "lookup_fixed_draft": if a.fixed_draft { timing(2) } else { serde_json::Value::Null },
            "speedup": timing(1)["speedup_vs_plain_median"],
            "lossy": lossy,
            "plain_text": tok.decode(plain)?,
        }))?
    );
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// The 1-, 5- and 15-minute load averages (`/proc/loadavg`), if readable.
fn loadavg() -> Option<[f64; 3]> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = s.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// Greedy decode of `max` tokens after `prompt`, with the whole prompt as lookup memory;
/// returns the tokens, the decode time (prefill excluded) and the counters.
fn run_with_history(
    l: &mnemo::checkpoint::Loaded,
    prompt: &[u32],
    max: usize,
    cfg: Option<LookupConfig>,
) -> Result<(Vec<u32>, f64, mnemo::lookup::LookupStats)> {
    let s = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };
    let n = prompt.len() - 1;
    let mut cache = KvCache::new(&l.model);
    l.model.forward_cached(&prompt[..n], &mut cache)?;
    let t0 = std::time::Instant::now();
    let (out, st) = mnemo::lookup::generate_lookup_with_prefix(
        &l.model,
        &mut cache,
        &prompt[..n],
        &prompt[n..],
        max,
        s,
        0,
        l.tokenizer.vocab_size(),
        Some(l.tokenizer.eot()),
        cfg,
        |_| Ok(()),
    )?;
    Ok((out, t0.elapsed().as_secs_f64(), st))
}

/// Time one forward of `n` rows (one sequence, as a verification pass) after a `prefix`-token
/// context, for n in `ns`, repetitions interleaved over the n's; the fastest repetition of each
/// n is kept, with its per-component times (`mnemo::batch::profile`) and its ratio to one
/// row. JSON.
pub fn bench_rows(model: &std::path::Path, ns: &[usize], reps: usize, prefix: usize) -> Result<()> {
    use mnemo::batch::profile;
    let l = mnemo::checkpoint::load(model, false)?;
    if ns.is_empty() || ns.contains(&0) {
        bail!("--rows needs positive row counts");
    }
    let longest = ns.iter().max().copied().unwrap_or(1);
    if prefix + longest > l.model.cfg.max_seq_len {
        bail!(
            "--prefix {prefix} + {longest} rows exceed the model's context {}",
            l.model.cfg.max_seq_len
        );
    }
    let vocab = l.model.cfg.vocab_size as u32;
    let ctx: Vec<u32> = (0..prefix as u32).map(|i| (i * 7 + 3) % vocab).collect();
    let mut cache = KvCache::new(&l.model);
    l.model.forward_cached(&ctx, &mut cache)?;
    // Per n: the fastest repetition's (wall secs, cpu secs, component wall ns, component CPU ns).
    type Best = (f64, f64, [u64; 7], [u64; 7]);
    let mut best: Vec<Option<Best>> = vec![None; ns.len()];
    for _ in 0..reps.max(1) {
        for (j, &n) in ns.iter().enumerate() {
            let toks: Vec<u32> = (0..n as u32).map(|i| (i * 13 + 5) % vocab).collect();
            cache.truncate(prefix)?;
            profile::enable(true);
            let (t0, c0) = (std::time::Instant::now(), profile::cpu_secs());
            mnemo::batch::forward_all(&l.model, &toks, &mut cache)?;
            let (wall, cpu) = (t0.elapsed().as_secs_f64(), profile::cpu_secs() - c0);
            let (cw, cc) = profile::take();
            profile::enable(false);
            // Keep the repetition with the least CPU time (robust under load).
            if best[j].is_none_or(|b| cpu < b.1) {
                best[j] = Some((wall, cpu, cw, cc));
            }
        }
    }
    let base = ns.iter().position(|&n| n == 1).and_then(|j| best[j]);
    let ms = |c: &[u64; 7]| {
        let mut m = serde_json::Map::new();
        for (i, name) in profile::NAMES.iter().enumerate() {
            m.insert(name.to_string(), (c[i] as f64 * 1e-6).into());
        }
        let named: u64 = c[..profile::TOTAL].iter().sum();
        m.insert(
            "other".into(),
            (c[profile::TOTAL].saturating_sub(named) as f64 * 1e-6).into(),
        );
        m
    };
    let mut out = Vec::new();
    for (j, &n) in ns.iter().enumerate() {
        let (wall, cpu, cw, cc) = best[j].expect("one repetition");
        let (wall_ms, cpu_ms) = (ms(&cw), ms(&cc));
        let ratios: serde_json::Map<String, serde_json::Value> = match base {
            Some(b) => {
                let b_ms = ms(&b.3);
                cpu_ms
                    .iter()
                    .map(|(k, v)| {
                        let r =
                            v.as_f64().unwrap_or(0.0) / b_ms[k].as_f64().unwrap_or(1.0).max(1e-9);
                        (k.clone(), r.into())
                    })
                    .collect()
            }
            None => Default::default(),
        };
        out.push(serde_json::json!({
            "rows": n, "secs": wall, "cpu_secs": cpu, "rows_per_s": n as f64 / wall,
            "wall_ms": wall_ms, "cpu_ms": cpu_ms,
            "cost_vs_1_row": base.map(|b| wall / b.0),
            "cpu_vs_1_row": base.map(|b| cpu / b.1),
            "component_cpu_vs_1_row": ratios,
        }));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "model": model.display().to_string(),
            "threads": rayon::current_num_threads(),
            "prefix_tokens": prefix,
            "reps": reps,
            "rows": out,
        }))?
    );
    Ok(())
}
