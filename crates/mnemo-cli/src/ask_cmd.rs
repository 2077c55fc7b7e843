//! `mnemo ask`: ask a model about a repository — pack it, prefill it once (the prefix cache is
//! reused while the repository and the model are unchanged), stream the answer.

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
    /// Run directory (or checkpoint directory) of the model to ask.
    #[arg(long, value_name = "RUN_DIR")]
    model: PathBuf,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Softmax temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Do not read or write the saved prefix cache.
    #[arg(long)]
    no_cache: bool,
    /// Where prefix caches are kept [default: $MNEMO_CACHE or ~/.cache/mnemo].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

/// `mnemo ask`: the repository packed to fit the model's context (most relevant files first),
/// prefilled or restored from the prefix cache, then the answer streamed to stdout.
pub fn run(a: AskArgs) -> Result<()> {
    let l = mnemo::checkpoint::load(&a.model, false)?;
    let (model, tok) = (&l.model, &l.tokenizer);
    // With a chat template: [user header] context "Question: …" [end of turn, assistant header];
    // without: context "Question: … Answer:". Only the part up to the context is cached.
    let (before, after) = mnemo::chat::split_prompt(tok)?;
    let head = tok.encode_with_special(&before)?;
    let suffix = if tok.chat_template().is_some() {
        tok.encode_with_special(&format!("\n\nQuestion: {}{after}", a.question))?
    } else {
        tok.encode(&format!("\n\nQuestion: {}\nAnswer:", a.question))?
    };
    let ctx = model
        .cfg
        .max_seq_len
        .saturating_sub(head.len() + suffix.len() + a.max_tokens);
    if ctx == 0 {
        bail!(
            "the model's context ({} tokens) leaves no room for the repository after the question and \
             --max-tokens {}",
            model.cfg.max_seq_len,
            a.max_tokens
        );
    }
    let t0 = std::time::Instant::now();
    let mut opts = mnemo_pack::PackOptions::new(&a.dir);
    opts.max_tokens = Some(ctx);
    opts.query = Some(a.question.clone());
    let pack = mnemo_pack::pack(&opts, Some(tok))?;
    let mut prefix = tok.encode(&mnemo_pack::context_text(&pack))?;
    if prefix.len() > ctx {
        // File headers and separators are not in the per-file budget; cut the tail.
        prefix.truncate(ctx);
    }
    prefix.splice(0..0, head);
    if prefix.is_empty() {
        prefix.push(tok.eot());
    }
    eprintln!(
        "context: {} files, {} tokens of {} (packed in {:.2}s)",
        pack.files.len(),
        prefix.len(),
        model.cfg.max_seq_len,
        t0.elapsed().as_secs_f64()
    );
    let key = {
        let bytes: Vec<u8> = prefix.iter().flat_map(|x| x.to_le_bytes()).collect();
        mnemo::util::fnv1a64(&bytes) ^ mnemo::generate::model_fingerprint(model)
    };
    let root = a
        .cache_dir
        .clone()
        .unwrap_or_else(mnemo::data::default_cache_root);
    let path = root.join("prefix").join(format!("{key:016x}.safetensors"));
    let t1 = std::time::Instant::now();
    let mut cache = match (!a.no_cache && path.is_file())
        .then(|| mnemo::generate::KvCache::load(&path, model))
    {
        Some(Ok((c, toks))) if toks == prefix => {
            eprintln!(
                "prefix cache hit: {} ({:.2}s, no prefill)",
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
            model.forward_cached(&prefix, &mut c)?;
            eprintln!(
                "prefilled {} tokens in {:.2}s",
                prefix.len(),
                t1.elapsed().as_secs_f64()
            );
            if !a.no_cache {
                c.save(&path, model, &prefix)?;
            }
            c
        }
    };
    let s = mnemo::generate::Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
    };
    let mut stdout = std::io::stdout().lock();
    stream_answer(
        model,
        tok,
        &mut cache,
        &suffix,
        a.max_tokens,
        s,
        a.seed,
        &mut stdout,
    )?;
    writeln!(stdout)?;
    Ok(())
}
