//! `mnemo generate`: sample from a run (or a `.gguf` model), streaming tokens to stdout; and
//! [`stream_answer`], the streaming decode that `mnemo ask` shares.

use crate::lookup_cmd;
use crate::speculate_cmd::{self, Speculate};
use anyhow::{bail, Result};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
pub struct GenerateArgs {
    /// Run directory, checkpoint directory, or a Llama-architecture `.gguf` model file.
    run_dir: PathBuf,
    /// Text to continue (or, with --chat, the user's message).
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template (e.g. the one inside a GGUF) and answer it.
    #[arg(long)]
    chat: bool,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// Softmax temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true, value_parser = crate::args::temperature)]
    temperature: f32,
    /// Sample among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// Nucleus sampling: smallest set of tokens with this total probability.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Lookup-first decoding: draft tokens from N-gram matches in the prompt and output,
    /// verified in one forward pass (same output when greedy; same distribution otherwise).
    #[arg(long)]
    lookup: bool,
    /// Lossy lookup: emit continuations whose empirical N-gram probability is >= P without
    /// verification (implies --lookup).
    #[arg(long, value_name = "P")]
    lookup_threshold: Option<f32>,
    /// Speculative decoding: `mtp` drafts with the model's own MTP block (DeepSeek-V4 models
    /// with `num_nextn_predict_layers` >= 1), `lookup` with N-gram matches (= --lookup); the
    /// model verifies the drafts in one forward pass (same output when greedy; same
    /// distribution otherwise).
    #[arg(long, value_enum, value_name = "MODE")]
    speculate: Option<Speculate>,
    /// Tokens drafted per verification pass at most (mtp: default 2, at most 63; lookup:
    /// default 8).
    #[arg(long, value_name = "K")]
    draft_len: Option<usize>,
    /// Official DeepSeek-V4 directory (FP8/FP4 weights) only: keep the big weights packed and
    /// memory-mapped (no f32 copy; only the experts a token routes to are read), and print the
    /// load time, decode speed and resident memory (now and peak) to stderr at the end.
    #[arg(long)]
    keep_packed: bool,
}

/// `mnemo generate`: continue a prompt (or answer it with the chat template), streaming the
/// text to stdout; plain, lookup-first or MTP-speculative decoding.
pub fn run(a: GenerateArgs) -> Result<()> {
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    let t_load = std::time::Instant::now();
    let l = match a.keep_packed {
        false => mnemo::checkpoint::load(&a.run_dir, false)?,
        true => {
            let l = mnemo::checkpoint::load_packed(&a.run_dir, true)?;
            mnemo::checkpoint::Loaded {
                tokenizer: l.tokenizer.expect("required above"),
                model: l.model,
                state: l.state,
                adam: l.adam,
                engram_opt: l.engram_opt,
                moe_pools: l.moe_pools,
                dir: l.dir,
            }
        }
    };
    if a.keep_packed {
        eprintln!(
            "generate: {} packed matrices, loaded in {:.2} s; {}",
            l.model.quant.len(),
            t_load.elapsed().as_secs_f64(),
            mnemo::memstat::MemStatus::now().describe()
        );
    }
    let tok = &l.tokenizer;
    let prompt = if a.chat {
        if tok.chat_template().is_none() {
            bail!("{} has no chat template; drop --chat", a.run_dir.display());
        }
        let (before, after) = mnemo::chat::split_prompt(tok)?;
        tok.encode_with_special(&format!("{before}{}{after}", a.prompt))?
    } else {
        tok.encode(&a.prompt)?
    };
    let room = l.model.cfg.max_seq_len.saturating_sub(prompt.len());
    if room == 0 {
        bail!(
            "the prompt is {} tokens, at or beyond the model's maximum context of {} tokens \
             (max_seq_len): shorten it",
            prompt.len(),
            l.model.cfg.max_seq_len
        );
    }
    let max_new = if a.max_tokens > room {
        eprintln!(
            "note: --max-tokens {} is more than the context leaves: the prompt takes {} of the \
             model's {} tokens (max_seq_len), so at most {room} tokens are generated",
            a.max_tokens,
            prompt.len(),
            l.model.cfg.max_seq_len
        );
        room
    } else {
        a.max_tokens
    };
    let s = mnemo::generate::Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
    };
    let lookup = a.lookup || a.lookup_threshold.is_some();
    if lookup && a.speculate == Some(Speculate::Mtp) {
        bail!("--lookup / --lookup-threshold and --speculate mtp exclude each other");
    }
    if a.draft_len.is_some() && a.speculate.is_none() && !lookup {
        bail!("--draft-len needs --speculate mtp or --speculate lookup");
    }
    if a.speculate == Some(Speculate::Mtp) {
        mnemo::speculate::check_mtp(&l.model, a.draft_len.unwrap_or(2))
            .map_err(|e| anyhow::anyhow!("--speculate mtp with {}: {e}", a.run_dir.display()))?;
    }
    if a.draft_len == Some(0) {
        bail!("--draft-len must be at least 1");
    }
    let mut stdout = std::io::stdout().lock();
    if !a.chat {
        write!(stdout, "{}", a.prompt)?;
    }
    stdout.flush()?;
    let mut cache = mnemo::generate::KvCache::new(&l.model);
    if a.speculate == Some(Speculate::Mtp) {
        let k = a.draft_len.unwrap_or(2);
        let st = speculate_cmd::stream_mtp(
            &l.model,
            tok,
            &mut cache,
            &prompt,
            max_new,
            s,
            a.seed,
            k,
            &mut stdout,
        )?;
        writeln!(stdout)?;
        eprintln!(
            "mtp: {} passes, {} drafted, {} accepted ({:.1}%)",
            st.passes,
            st.drafted,
            st.accepted,
            100.0 * st.accepted as f64 / st.drafted.max(1) as f64
        );
        return Ok(());
    }
    if lookup || a.speculate == Some(Speculate::Lookup) {
        if let Some(p) = a.lookup_threshold {
            if !(p > 0.0 && p <= 1.0) {
                bail!("--lookup-threshold must be in (0, 1]");
            }
        }
        let d = mnemo::lookup::LookupConfig::default();
        let cfg = mnemo::lookup::LookupConfig {
            threshold: a.lookup_threshold,
            max_draft: a.draft_len.unwrap_or(d.max_draft),
            ..d
        };
        let st = lookup_cmd::stream_lookup(
            &l.model,
            tok,
            &mut cache,
            &prompt,
            max_new,
            s,
            a.seed,
            cfg,
            &mut stdout,
        )?;
        writeln!(stdout)?;
        eprintln!(
            "lookup: {} passes, {} drafted, {} accepted, {} unverified",
            st.passes, st.drafted, st.accepted, st.unverified
        );
        return Ok(());
    }
    let t_gen = std::time::Instant::now();
    let st = stream_answer(
        &l.model,
        tok,
        &mut cache,
        &prompt,
        max_new,
        s,
        a.seed,
        &mut stdout,
    )?;
    writeln!(stdout)?;
    if a.keep_packed {
        let total = t_gen.elapsed().as_secs_f64();
        let first = st.first_token.map_or(0.0, |d| d.as_secs_f64());
        eprintln!(
            "generate: prompt {} tokens, first token after {first:.2} s; {} tokens, {:.1} ms/token \
             after the first; {}",
            prompt.len(),
            st.generated,
            1e3 * (total - first) / (st.generated.saturating_sub(1).max(1)) as f64,
            mnemo::memstat::MemStatus::now().describe()
        );
    }
    if st.context_full {
        eprintln!(
            "stopped after {} tokens: the model's context of {} tokens is full",
            st.generated, l.model.cfg.max_seq_len
        );
    }
    Ok(())
}

/// What [`stream_answer`] did.
pub struct AnswerStats {
    /// Tokens generated (the end-of-text token not counted).
    pub generated: usize,
    /// Time from the call to the first generated token (prefill included).
    pub first_token: Option<std::time::Duration>,
    /// Generation stopped because the KV cache reached the model's context.
    pub context_full: bool,
}

/// Prefill `tokens` after what `cache` holds, then sample up to `max_new` tokens, writing the
/// text to `out` as it is produced; stops at the tokenizer's end-of-text token or when the
/// context is full.
#[allow(clippy::too_many_arguments)]
pub fn stream_answer(
    model: &mnemo::model::Model,
    tok: &mnemo::tokenizer::Tokenizer,
    cache: &mut mnemo::generate::KvCache,
    tokens: &[u32],
    max_new: usize,
    s: mnemo::generate::Sampling,
    seed: u64,
    out: &mut impl Write,
) -> Result<AnswerStats> {
    let mut stream = mnemo::tokenizer::StreamDecoder::new(tok);
    let n_valid = tok.vocab_size();
    let t0 = std::time::Instant::now();
    let mut first = None;
    let ids = mnemo::generate::generate_after(
        model,
        cache,
        tokens,
        max_new,
        s,
        seed,
        n_valid,
        Some(tok.eot()),
        |t| {
            first.get_or_insert_with(|| t0.elapsed());
            write!(out, "{}", stream.push(t)?)?;
            Ok(out.flush()?)
        },
    )?;
    Ok(AnswerStats {
        generated: ids.len(),
        first_token: first,
        context_full: ids.len() < max_new && cache.len() >= cache.capacity(),
    })
}
