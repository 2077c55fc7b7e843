//! `mnemo serve`: a local OpenAI-compatible HTTP server.
//!
//! Tokio runs the HTTP side (hyper HTTP/1.1 with a header-read timeout against slow clients,
//! axum routing); one engine thread owns the model (see [`engine`]). Shutdown (SIGINT or
//! SIGTERM): new requests get 503, in-flight ones finish within `--shutdown-grace` seconds
//! (then their streams end with an error event and `data: [DONE]`), and the process exits.
//!
//! For operators ([`ops`]): `/health`, Prometheus `/metrics` ([`metrics`]), and with `--log-requests`
//! one JSON log line per finished request (on stderr, through `tracing`).

mod api;
mod engine;
mod http;
mod metrics;
mod ops;

pub use ops::REQUEST_LOG_TARGET;

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// Run directory, checkpoint directory, `.gguf` file or Hugging Face directory.
    pub run_dir: PathBuf,
    /// Address to bind (use 0.0.0.0 to listen on all interfaces).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` [default: $MNEMO_API_KEY if set].
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Name reported by /v1/models [default: the model file or directory name]. A request
    /// whose `model` is neither this name, its file stem (the name without an extension such
    /// as `.gguf`) nor a --model-alias is answered 404 `model_not_found`; a request without
    /// `model` gets the served model.
    #[arg(long)]
    pub model_name: Option<String>,
    /// Another name requests may use for the served model (repeatable), e.g. `gpt-4o` for a
    /// client that cannot be configured.
    #[arg(long, value_name = "NAME")]
    pub model_alias: Vec<String>,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Requests waiting beyond the active batch at most; more are answered 429.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Prompt tokens one engine step prefills at most while other requests are decoding (a
    /// long prompt is prefilled over several steps, each also advancing every decoding
    /// request by a token); a step with nothing decoding prefills up to 256. At least 3.
    #[arg(long, default_value_t = 64)]
    pub prefill_chunk: usize,
    /// Context per sequence in tokens [default: the model's max_seq_len].
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Longest prompt in tokens [default: the context].
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
    /// Largest `max_tokens` a request may ask for.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens_limit: u64,
    /// `max_tokens` when a request gives none.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: u64,
    /// Lookup-first decoding for every request: N-gram drafts from the prompt and output,
    /// verified in one pass (greedy output is unchanged). Without it a request can still ask
    /// for it with `"mnemo": {"lookup": true}` (and opt out with `false`).
    #[arg(long)]
    pub lookup: bool,
    /// Draft tokens per step at most (lookup-first decoding).
    #[arg(long, default_value_t = 8)]
    pub lookup_draft: usize,
    /// Lossy lookup: emit continuations with empirical N-gram probability >= P unverified.
    #[arg(long, value_name = "P")]
    pub lookup_threshold: Option<f32>,
    /// Prompts of at least this many tokens are kept in the prompt (prefix) cache.
    #[arg(long, default_value_t = 512)]
    pub prefix_min_tokens: usize,
    /// Prompt-cache entries kept in memory (0 disables the cache).
    #[arg(long, default_value_t = 4)]
    pub prefix_entries: usize,
    /// Also save prompt-cache entries here, and load them at start.
    #[arg(long, value_name = "DIR")]
    pub prefix_cache_dir: Option<PathBuf>,
    /// Most bytes the files in --prefix-cache-dir may take together (e.g. 512M, 2G); the least
    /// recently used are deleted first [default: $MNEMO_PREFIX_CACHE_LIMIT, else 1G].
    #[arg(long, value_name = "SIZE", value_parser = crate::args::size, requires = "prefix_cache_dir")]
    pub prefix_cache_limit: Option<u64>,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_grace: f64,
    /// Seconds a client has to send the request headers, and the body.
    #[arg(long, default_value_t = 10.0)]
    pub read_timeout: f64,
    /// Open connections at most.
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Write one JSON line per finished completion/chat request to stderr (id, endpoint,
    /// status, finish_reason, prompt/completion/cached tokens, ttft_s, duration_s, error).
    /// Other log lines are not JSON: select these with `grep '^{'`.
    #[arg(long)]
    pub log_requests: bool,
    /// Testing aid: sleep this many milliseconds after every engine step.
    #[arg(long, default_value_t = 0, hide = true)]
    pub debug_step_delay_ms: u64,
}

pub fn run(a: ServeArgs) -> Result<()> {
    if a.max_batch == 0 || a.queue == 0 {
        bail!("--max-batch and --queue must be at least 1");
    }
    if !(a.shutdown_grace >= 0.0 && a.read_timeout > 0.0) {
        bail!("--shutdown-grace must be >= 0 and --read-timeout > 0");
    }
    if let Some(p) = a.lookup_threshold {
        if !(p > 0.0 && p <= 1.0) {
            bail!("--lookup-threshold must be in (0, 1]");
        }
    }
    let l = mnemo::checkpoint::load(&a.run_dir, false)?;
    let model = Arc::new(l.model);
    let tok = Arc::new(l.tokenizer);
    let ctx = a
        .ctx
        .unwrap_or(model.cfg.max_seq_len)
        .min(model.cfg.max_seq_len);
    if ctx < 2 {
        bail!("--ctx must be at least 2");
    }
    let name = a.model_name.clone().unwrap_or_else(|| {
        let p = a.run_dir.canonicalize().unwrap_or(a.run_dir.clone());
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "mnemo".into())
    });
    let mut aliases = vec![name.clone()];
    if let Some((stem, _)) = name.rsplit_once('.') {
        if !stem.is_empty() {
            aliases.push(stem.to_string());
        }
    }
    aliases.extend(a.model_alias.iter().cloned());
    let prefix_limit = crate::cache_cmd::prefix_limit(a.prefix_cache_limit)?;
    if let Some(d) = &a.prefix_cache_dir {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let lookup_ok = model.cfg.engram.is_none();
    if (a.lookup || a.lookup_threshold.is_some()) && !lookup_ok {
        bail!("--lookup is not supported for Engram models yet (rejected drafts cannot rewind the Engram decode state)");
    }
    let lookup = mnemo::lookup::LookupConfig {
        max_draft: a.lookup_draft,
        threshold: a.lookup_threshold,
        ..Default::default()
    };
    let shared = Arc::new(engine::Shared::default());
    let ecfg = engine::EngineConfig {
        max_batch: a.max_batch,
        ctx,
        prefill_chunk: a.prefill_chunk.max(3),
        lookup,
        lookup_default: a.lookup || a.lookup_threshold.is_some(),
        prefix_min_tokens: a.prefix_min_tokens.max(1),
        prefix_max_entries: a.prefix_entries,
        prefix_dir: a.prefix_cache_dir.clone(),
        prefix_dir_limit: prefix_limit,
        shutdown_grace: Duration::from_secs_f64(a.shutdown_grace),
        step_delay: Duration::from_millis(a.debug_step_delay_ms),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(a.queue);
    let eng = engine::Engine::new(model.clone(), tok.clone(), ecfg, shared.clone());
    let engine_thread = std::thread::Builder::new()
        .name("mnemo-engine".into())
        .spawn(move || eng.run(rx))
        .context("cannot start the engine thread")?;
    let api_key = a.api_key.clone().or_else(|| {
        std::env::var("MNEMO_API_KEY")
            .ok()
            .filter(|k| !k.is_empty())
    });
    let app = Arc::new(http::App {
        tx,
        engine: engine_thread.thread().clone(),
        vocab: tok.vocab_size().min(model.cfg.vocab_size),
        tok,
        model_name: name.clone(),
        model_aliases: aliases,
        api_key,
        limits: http::Limits {
            max_body_bytes: a.max_body_bytes,
            max_prompt_tokens: a.max_prompt_tokens.unwrap_or(ctx - 1),
            max_tokens: a.max_tokens_limit.max(1),
            default_max_tokens: a.default_max_tokens.max(1),
            body_timeout: Duration::from_secs_f64(a.read_timeout),
            ctx,
        },
        shared: shared.clone(),
        queue_cap: a.queue,
        ids: AtomicU64::new(1),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        started: std::time::Instant::now(),
        log_requests: a.log_requests,
        lookup_ok,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(a, app, shared.clone(), name))?;
    // The engine ends once nothing is active (bounded by the shutdown grace) and its
    // prompt-cache files are written.
    let t0 = std::time::Instant::now();
    while !shared.exited.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(10));
    }
    if shared.exited.load(Ordering::SeqCst) {
        let _ = engine_thread.join();
    }
    eprintln!("server stopped");
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn serve(
    a: ServeArgs,
    app: http::AppState,
    shared: Arc<engine::Shared>,
    name: String,
) -> Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let addr = format!("{}:{}", a.host, a.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    eprintln!("mnemo serve: {name} listening on http://{local}");
    let router = http::router(app);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let conns = Arc::new(AtomicUsize::new(0));
    let read_timeout = Duration::from_secs_f64(a.read_timeout);
    let mut signal = std::pin::pin!(shutdown_signal());
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut signal => break,
        };
        if conns.load(Ordering::SeqCst) >= a.max_connections {
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        conns.fetch_add(1, Ordering::SeqCst);
        let svc = TowerToHyperService::new(router.clone());
        let mut stop = stop_rx.clone();
        let conns = conns.clone();
        tokio::spawn(async move {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(read_timeout)
                .keep_alive(true);
            let conn = b.serve_connection(TokioIo::new(stream), svc);
            let mut conn = std::pin::pin!(conn);
            let mut stopping = false;
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    r = stop.changed(), if !stopping => {
                        let _ = r;
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            conns.fetch_sub(1, Ordering::SeqCst);
        });
    }
    eprintln!("shutting down: finishing in-flight requests");
    shared.begin_shutdown();
    drop(listener);
    let _ = stop_tx.send(true);
    // Wait for open connections (streams end within the grace period, then the engine ends
    // them); a margin on top for the last bytes to be written.
    let limit = Duration::from_secs_f64(a.shutdown_grace) + Duration::from_secs(5);
    let t0 = std::time::Instant::now();
    while conns.load(Ordering::SeqCst) > 0 && t0.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
