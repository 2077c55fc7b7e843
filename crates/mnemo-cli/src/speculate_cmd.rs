//! `mnemo generate --speculate mtp` and `mnemo bench speculate`: MTP speculative decoding
//! (`mnemo::speculate`, DeepSeek-V4 models with an MTP block) from the command line, and its
//! measurement against plain greedy and lookup-first decoding.

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use mnemo::generate::{KvCache, Sampling};
use mnemo::lookup::{LookupConfig, LookupStats};
use std::io::Write;
use std::path::PathBuf;

/// `--speculate`: who drafts the tokens the model verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Speculate {
    /// The model's own MTP block (DeepSeek-V4 `num_nextn_predict_layers` ≥ 1).
    Mtp,
    /// N-gram lookup over the prompt and the output (the same as `--lookup`).
    Lookup,
}

/// Stream `max_new` tokens after `tokens` (from an empty `cache`) with MTP speculation,
/// writing text to `out`.
#[allow(clippy::too_many_arguments)]
pub fn stream_mtp(
    model: &mnemo::model::Model,
    tok: &mnemo::tokenizer::Tokenizer,
    cache: &mut KvCache,
    tokens: &[u32],
    max_new: usize,
    s: Sampling,
    seed: u64,
    draft_len: usize,
    out: &mut impl Write,
) -> Result<LookupStats> {
    let mut stream = mnemo::tokenizer::StreamDecoder::new(tok);
    let (_, st) = mnemo::speculate::generate_mtp(
        model,
        cache,
        tokens,
        max_new,
        s,
        seed,
        tok.vocab_size(),
        Some(tok.eot()),
        draft_len,
        |t| {
            write!(out, "{}", stream.push(t)?)?;
            Ok(out.flush()?)
        },
    )?;
    Ok(st)
}

#[derive(Args)]
pub struct BenchSpeculateArgs {
    /// Run directory or checkpoint directory of a DeepSeek-V4 model with an MTP block.
    pub model: PathBuf,
    /// A prompt to continue (repeatable; e.g. a few lines of code).
    #[arg(long = "prompt", required = true)]
    pub prompts: Vec<String>,
    /// Tokens to generate per prompt (greedy; fewer if the end-of-text token comes first).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// MTP draft lengths to time (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub draft_len: Vec<usize>,
    /// Lookup-first decoding's longest draft.
    #[arg(long, default_value_t = 8)]
    pub lookup_draft: usize,
    /// Rounds; each round runs every arm on every prompt in turn (medians reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// One decode's output and counters.
type Decoded = (Vec<u32>, LookupStats);

/// One arm of the benchmark.
#[derive(Clone, Copy)]
enum Arm {
    Plain,
    Mtp(usize),
    Lookup,
}

impl Arm {
    fn name(self) -> String {
        match self {
            Arm::Plain => "plain".into(),
            Arm::Mtp(k) => format!("mtp_k{k}"),
            Arm::Lookup => "lookup".into(),
        }
    }
}

/// Greedy decode of `max` tokens after `prompt` from an empty cache with `arm`: the tokens,
/// the decode time (from the first token, which ends the prefill, to the last) and the
/// counters.
fn run_arm(
    l: &mnemo::checkpoint::Loaded,
    prompt: &[u32],
    max: usize,
    arm: Arm,
    lookup_draft: usize,
) -> Result<(Vec<u32>, f64, LookupStats)> {
    let s = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };
    let (m, nv, eot) = (&l.model, l.tokenizer.vocab_size(), Some(l.tokenizer.eot()));
    let mut cache = KvCache::new(m);
    let mut first = None;
    let on = |_| {
        first.get_or_insert_with(std::time::Instant::now);
        Ok(())
    };
    let (out, st) = match arm {
        Arm::Plain => {
            let out =
                mnemo::generate::generate_after(m, &mut cache, prompt, max, s, 0, nv, eot, on)?;
            (out, LookupStats::default())
        }
        Arm::Mtp(k) => {
            mnemo::speculate::generate_mtp(m, &mut cache, prompt, max, s, 0, nv, eot, k, on)?
        }
        Arm::Lookup => {
            let cfg = LookupConfig {
                max_draft: lookup_draft,
                ..Default::default()
            };
            mnemo::lookup::generate_lookup(
                m,
                &mut cache,
                prompt,
                max,
                s,
                0,
                nv,
                eot,
                Some(cfg),
                on,
            )?
        }
    };
    let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    Ok((out, secs, st))
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

/// `mnemo bench speculate`: plain greedy, MTP speculation (each draft length) and lookup-first
/// decoding on each prompt, rounds alternating over the arms; per arm the decode tokens/s
/// (median over rounds of the summed decode time), the acceptance rate and whether the
/// output is plain greedy's. JSON on stdout.
pub fn bench(a: BenchSpeculateArgs) -> Result<()> {
    let l = mnemo::checkpoint::load(&a.model, false)?;
    if a.draft_len.is_empty() {
        bail!("--draft-len needs at least one draft length");
    }
    for &k in &a.draft_len {
        mnemo::speculate::check_mtp(&l.model, k)?;
    }
    let mut prompts = Vec::new();
    for p in &a.prompts {
        let ids = l.tokenizer.encode(p)?;
        if ids.is_empty() || ids.len() + a.max_tokens > l.model.cfg.max_seq_len {
            bail!(
                "--prompt {p:?} ({} tokens) + --max-tokens {} must fit the context {}",
                ids.len(),
                a.max_tokens,
                l.model.cfg.max_seq_len
            );
        }
        prompts.push(ids);
    }
    let mut arms = vec![Arm::Plain];
    arms.extend(a.draft_len.iter().map(|&k| Arm::Mtp(k)));
    arms.push(Arm::Lookup);
    let np = prompts.len();
    // [arm][prompt]: output, counters; [arm][round]: decode seconds summed over the prompts.
    let mut outs: Vec<Vec<Option<Decoded>>> = vec![vec![None; np]; arms.len()];
    let mut secs = vec![Vec::new(); arms.len()];
    for _ in 0..a.rounds.max(1) {
        for (i, &arm) in arms.iter().enumerate() {
            let mut total = 0.0;
            for (j, p) in prompts.iter().enumerate() {
                let (out, t, st) = run_arm(&l, p, a.max_tokens, arm, a.lookup_draft)?;
                total += t;
                if let Some((o, _)) = &outs[i][j] {
                    if *o != out {
                        bail!("{}: greedy output changed between rounds", arm.name());
                    }
                }
                outs[i][j] = Some((out, st));
            }
            secs[i].push(total);
        }
    }
    let outs: Vec<Vec<Decoded>> = outs
        .into_iter()
        .map(|o| o.into_iter().map(|x| x.expect("one round")).collect())
        .collect();
    let plain_secs = median(&secs[0]);
    let plain_tokens: usize = outs[0].iter().map(|o| o.0.len().saturating_sub(1)).sum();
    let mut res = serde_json::Map::new();
    for (i, &arm) in arms.iter().enumerate() {
        // Decode tokens: all but the first (which comes from the prefill).
        let tokens: usize = outs[i].iter().map(|o| o.0.len().saturating_sub(1)).sum();
        let (drafted, accepted, passes) = outs[i].iter().fold((0, 0, 0), |(d, a, p), o| {
            (d + o.1.drafted, a + o.1.accepted, p + o.1.passes)
        });
        let ms = median(&secs[i]);
        let per_prompt: Vec<serde_json::Value> = outs[i]
            .iter()
            .zip(&outs[0])
            .map(|(o, p)| {
                serde_json::json!({
                    "tokens": o.0.len(), "drafted": o.1.drafted, "accepted": o.1.accepted,
                    "passes": o.1.passes, "identical_to_plain": o.0 == p.0,
                })
            })
            .collect();
        res.insert(
            arm.name(),
            serde_json::json!({
                "decode_tokens": tokens,
                "decode_secs_median": ms,
                "decode_secs_all": secs[i],
                "tok_s": tokens as f64 / ms,
                "speedup_vs_plain": (tokens as f64 / ms) / (plain_tokens as f64 / plain_secs),
                "drafted": drafted,
                "accepted": accepted,
                "acceptance_rate": if drafted > 0 { accepted as f64 / drafted as f64 } else { f64::NAN },
                "tokens_per_pass": if passes > 0 { tokens as f64 / passes as f64 } else { 1.0 },
                "identical_to_plain": outs[i].iter().zip(&outs[0]).all(|(o, p)| o.0 == p.0),
                "per_prompt": per_prompt,
            }),
        );
    }
    let texts: Result<Vec<String>> = outs[0].iter().map(|o| l.tokenizer.decode(&o.0)).collect();
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "model": a.model.display().to_string(),
            "threads": rayon::current_num_threads(),
            "prompts": a.prompts,
            "prompt_tokens": prompts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            "max_tokens": a.max_tokens,
            "rounds": a.rounds.max(1),
            "lookup_draft": a.lookup_draft,
            "arms": res,
            "plain_texts": texts?,
        }))?
    );
    Ok(())
}
