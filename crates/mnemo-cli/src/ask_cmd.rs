//! `mnemo ask`: ask a model about a repository — pack it, prefill it once (the prefix cache is
//! reused while the repository and the model are unchanged, whatever the question), stream the
//! answer.
//!
//! The context is `[chat header] STABLE QUESTION_FILES "Question: …" [assistant header]`.
//! STABLE is the whole repository when it fits; otherwise the files ranked without the question
//! (READMEs, docs, top-level and small files first) within three quarters of the room
//! (`--question-tokens` sets the rest, for the question and its files). Only `[chat header] STABLE` is cached, so a second,
//! different question reuses it and prefills just the files picked for it (BM25 over the
//! question, among those not already whole in STABLE) and the question itself.

use crate::cache_cmd;
use crate::generate_cmd::stream_answer;
use anyhow::{bail, Result};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
pub struct AskArgs {
    /// Repository to ask about.
    dir: PathBuf,
    /// The question.
    question: String,
    /// The model: a run or checkpoint directory, a Llama-architecture `.gguf` file, or a
    /// Hugging Face Llama directory.
    #[arg(long, value_name = "MODEL")]
    model: PathBuf,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Softmax temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true, value_parser = crate::args::temperature)]
    temperature: f32,
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// When the repository does not fit: tokens of context for the question and the files most
    /// relevant to it, placed after the cached part (the rest of the room holds the cached,
    /// question-independent files). Smaller: a cheaper second question, fewer files chosen for
    /// it [default: a quarter of the room left after --max-tokens; at least 64].
    #[arg(long, value_name = "N")]
    question_tokens: Option<usize>,
    /// Do not read or write the saved prefix cache.
    #[arg(long)]
    no_cache: bool,
    /// Where prefix caches are kept [default: $MNEMO_CACHE or ~/.cache/mnemo].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Most bytes the saved prefix caches may take together (e.g. 512M, 2G; 0 = save none);
    /// the least recently used go first [default: $MNEMO_PREFIX_CACHE_LIMIT, else 1G].
    /// `mnemo cache list` shows them, `mnemo cache clear` deletes them.
    #[arg(long, value_name = "SIZE", value_parser = crate::args::size)]
    cache_limit: Option<u64>,
}

/// `mnemo ask`: the repository packed to fit the model's context (a question-independent part
/// first, then the files most relevant to the question), the first part restored from the prefix
/// cache or prefilled and saved, then the answer streamed to stdout.
pub fn run(a: AskArgs) -> Result<()> {
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    let limit = cache_cmd::prefix_limit(a.cache_limit)?;
    let l = mnemo::checkpoint::load(&a.model, false)?;
    let (model, tok) = (&l.model, &l.tokenizer);
    let max_ctx = model.cfg.max_seq_len;
    // With a chat template: [user header] context "Question: …" [end of turn, assistant header];
    // without: context "Question: … Answer:". Only the part up to the question's files is cached.
    let (before, after) = mnemo::chat::split_prompt(tok)?;
    let head = tok.encode_with_special(&before)?;
    let question = if tok.chat_template().is_some() {
        tok.encode_with_special(&format!("\n\nQuestion: {}{after}", a.question))?
    } else {
        tok.encode(&format!("\n\nQuestion: {}\nAnswer:", a.question))?
    };
    // The room for the repository does not depend on the question; what it may use does.
    let room = max_ctx.saturating_sub(head.len() + a.max_tokens);
    let ctx = room.saturating_sub(question.len());
    if ctx == 0 {
        bail!(
            "the model's context ({max_ctx} tokens) leaves no room for the repository after the \
             question ({} tokens) and --max-tokens {}",
            question.len(),
            a.max_tokens
        );
    }
    // The question and its files get `share` tokens after the cached part (at least 64, so a
    // short question never cuts into it); the cached part gets the rest of the room.
    let share = a.question_tokens.unwrap_or(room / 4).max(64).min(room);
    if question.len() > share {
        eprintln!(
            "note: the question ({} tokens) is longer than the {share} tokens kept for it \
             (--question-tokens): the cached part is cut for it, so it will not be reused",
            question.len()
        );
    }
    let stable_budget = room - share;
    let t0 = std::time::Instant::now();
    let opts = mnemo_pack::PackOptions::new(&a.dir);
    let qp = mnemo_pack::pack_for_question(&opts, tok, ctx, stable_budget, &a.question)?;
    let mut prefix = tok.encode(&mnemo_pack::context_text(&qp.stable))?;
    prefix.truncate(ctx); // (the pack is checked against its budget; this never cuts)
    let mut extra = match &qp.question {
        Some(p) => tok.encode(&mnemo_pack::context_text(p))?,
        None => Vec::new(),
    };
    extra.truncate(ctx - prefix.len());
    let (stable_files, stable_tokens) = (qp.stable.files.len(), prefix.len());
    prefix.splice(0..0, head);
    if prefix.is_empty() {
        prefix.push(tok.eot());
    }
    match &qp.question {
        None => eprintln!(
            "context: the whole repository, {stable_files} files, {stable_tokens} tokens of \
             {max_ctx} (packed in {:.2}s)",
            t0.elapsed().as_secs_f64()
        ),
        Some(p) => {
            // The question's files, most relevant first.
            let mut picked: Vec<&mnemo_pack::PackedFile> = p.files.iter().collect();
            picked.sort_by_key(|f| f.rank);
            let mut names: Vec<&str> = picked.iter().take(4).map(|f| f.path.as_str()).collect();
            if picked.len() > 4 {
                names.push("…");
            }
            if names.is_empty() {
                names.push("none fit");
            }
            eprintln!(
                "context: {stable_files} files ranked without the question ({stable_tokens} \
                 tokens, cacheable) + {} files for this question ({} tokens: {}), of {max_ctx} \
                 (packed in {:.2}s)",
                p.files.len(),
                extra.len(),
                names.join(", "),
                t0.elapsed().as_secs_f64()
            )
        }
    }
    let key = {
        let bytes: Vec<u8> = prefix.iter().flat_map(|x| x.to_le_bytes()).collect();
        mnemo::util::fnv1a64(&bytes) ^ mnemo::generate::model_fingerprint(model)
    };
    let dir = a
        .cache_dir
        .clone()
        .unwrap_or_else(mnemo::data::default_cache_root)
        .join("prefix");
    let path = dir.join(format!("{key:016x}.safetensors"));
    let t1 = std::time::Instant::now();
    let mut cache = match (!a.no_cache && path.is_file())
        .then(|| mnemo::generate::KvCache::load(&path, model))
    {
        Some(Ok((c, toks))) if toks == prefix => {
            cache_cmd::touch(&path);
            eprintln!(
                "prefix cache hit: {} tokens reused from {} ({:.2}s, no prefill of them)",
                prefix.len(),
                path.display(),
                t1.elapsed().as_secs_f64()
            );
            c
        }
        other => {
            if let Some(Err(e)) = other {
                eprintln!("ignoring unusable prefix cache: {e:#}");
            }
            let mut c = mnemo::generate::KvCache::new(model);
            prefill(model, &prefix, &mut c)?;
            eprintln!(
                "prefilled {} tokens in {:.2}s",
                prefix.len(),
                t1.elapsed().as_secs_f64()
            );
            if !a.no_cache {
                save(&c, &path, model, &prefix, limit);
            }
            c
        }
    };
    let s = mnemo::generate::Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
    };
    let mut suffix = extra;
    let n_extra = suffix.len();
    suffix.extend_from_slice(&question);
    let t2 = std::time::Instant::now();
    // The last chunk of the whole prompt is a single token in a fresh prefill exactly when it
    // is one here (see `prefill`); the rest of the suffix runs first.
    let c = mnemo::generate::PREFILL_CHUNK;
    let len = prefix.len() + suffix.len();
    let split = if (len - 1).is_multiple_of(c) {
        suffix.len() - 1
    } else if suffix.len() > 1 && (suffix.len() - 1).is_multiple_of(c) {
        suffix.len() - 2
    } else {
        0
    };
    prefill(model, &suffix[..split], &mut cache)?;
    let before = t2.elapsed();
    let mut stdout = std::io::stdout().lock();
    let st = stream_answer(
        model,
        tok,
        &mut cache,
        &suffix[split..],
        a.max_tokens,
        s,
        a.seed,
        &mut stdout,
    )?;
    writeln!(stdout)?;
    eprintln!(
        "answer: {} tokens run after the cached part ({n_extra} of files for this question + {} \
         of the question), first token after {:.2}s, {} tokens generated in {:.2}s{}",
        suffix.len(),
        question.len(),
        st.first_token.map_or(0.0, |d| (before + d).as_secs_f64()),
        st.generated,
        t2.elapsed().as_secs_f64(),
        if st.context_full {
            "; stopped: the context is full"
        } else {
            ""
        }
    );
    Ok(())
}

/// Prefill `tokens` after what `cache` holds without a chunk of a single token (unless
/// `tokens` is one token), the chunk shape of a fresh prefill (every row runs on a quantised
/// model's quantised blocks whatever the chunk, `decode::Plan`; the shape keeps the attention's
/// summation order, i.e. f32 rounding, the same too). `generate`
/// and the server prefill a whole prompt in chunks of `PREFILL_CHUNK` from its start, so a
/// prompt row ends a one-token chunk there only when it is the prompt's last; `ask`, which
/// runs its cached part and the rest separately, keeps every other row in a longer chunk and
/// so gives the same tokens (docs/model-block.md).
fn prefill(
    model: &mnemo::model::Model,
    tokens: &[u32],
    cache: &mut mnemo::generate::KvCache,
) -> Result<()> {
    let n = tokens.len();
    if n > 1 && n % mnemo::generate::PREFILL_CHUNK == 1 {
        model.forward_cached(&tokens[..n - 2], cache)?;
        model.forward_cached(&tokens[n - 2..], cache)?;
    } else if n > 0 {
        model.forward_cached(tokens, cache)?;
    }
    Ok(())
}

/// Save the prefilled cache under the size limit (least recently used entries evicted first);
/// a failure is a warning: the answer does not depend on it.
fn save(
    c: &mnemo::generate::KvCache,
    path: &std::path::Path,
    model: &mnemo::model::Model,
    prefix: &[u32],
    limit: u64,
) {
    use crate::args::human_size;
    if limit == 0 {
        eprintln!(
            "prefix cache not saved: its size limit is 0 (--cache-limit, ${})",
            cache_cmd::LIMIT_ENV
        );
        return;
    }
    if let Err(e) = c.save(path, model, prefix) {
        eprintln!("prefix cache not saved: {e:#}");
        return;
    }
    let bytes = path.metadata().map(|m| m.len()).unwrap_or(0);
    let dir = path.parent().unwrap_or(path);
    let gone = cache_cmd::evict(dir, limit, Some(path));
    if !path.exists() {
        eprintln!(
            "prefix cache not kept: {} is over the limit of {} (--cache-limit, ${})",
            human_size(bytes),
            human_size(limit),
            cache_cmd::LIMIT_ENV
        );
        return;
    }
    eprintln!(
        "prefix cache saved: {} ({})",
        path.display(),
        human_size(bytes)
    );
    if !gone.is_empty() {
        eprintln!(
            "prefix cache: evicted {} least recently used entries ({}) to stay under {}",
            gone.len(),
            human_size(gone.iter().map(|g| g.1).sum()),
            human_size(limit)
        );
    }
}
