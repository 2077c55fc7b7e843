//! HTTP handlers: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (JSON or
//! server-sent events), and, not part of the OpenAI API, `/v1/stats` (engine counters, JSON),
//! `/health` (liveness and load, JSON) and `/metrics` (Prometheus text); those two, the request
//! counter and the request log are in [`super::ops`].
//!
//! Streams are framed incrementally: the JSON of a text chunk is rendered once per request
//! around a placeholder, so each event costs one string escape, and the events that are
//! waiting when the stream is polled go out in one write.

use super::api::{self, ApiError, Params, Prompt};
use super::engine::{Event, Finish, Request, Shared};
use super::ops::{count, health, metrics_page, ReqLog};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use mnemo::generate::Sampling;
use mnemo::tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Server limits.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_prompt_tokens: usize,
    pub max_tokens: u64,
    pub default_max_tokens: u64,
    pub body_timeout: Duration,
    pub ctx: usize,
}

pub struct App {
    pub tx: mpsc::Sender<Request>,
    /// The engine thread (unparked when a request is queued).
    pub engine: std::thread::Thread,
    pub tok: Arc<Tokenizer>,
    pub model_name: String,
    /// Names a request's `model` may give: the served name, its file stem, `--model-alias`.
    pub model_aliases: Vec<String>,
    pub api_key: Option<String>,
    pub limits: Limits,
    pub shared: Arc<Shared>,
    pub vocab: usize,
    pub queue_cap: usize,
    pub ids: AtomicU64,
    pub created: u64,
    /// When the server started (`/health`'s uptime).
    pub started: Instant,
    /// `--log-requests`: one JSON line per finished completion/chat request.
    pub log_requests: bool,
    /// Whether the model can run lookup-first decoding (`"mnemo": {"lookup": true}`).
    pub lookup_ok: bool,
}

impl App {
    pub fn queued(&self) -> usize {
        self.queue_cap.saturating_sub(self.tx.capacity())
    }
}

pub type AppState = Arc<App>;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn router(app: AppState) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/stats", get(stats))
        .route("/health", get(health))
        .route("/metrics", get(metrics_page))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "no such route",
            )
            .code("not_found")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method not allowed on this route",
            )
            .code("method_not_allowed")
        })
        .layer(axum::middleware::from_fn_with_state(app.clone(), count))
        .with_state(app)
}

fn check_key(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &app.api_key else {
        return Ok(());
    };
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // Constant-time comparison.
    let ok = got.is_some_and(|g| {
        g.len() == key.len()
            && g.bytes()
                .zip(key.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing or incorrect API key (send `Authorization: Bearer <key>`)",
        )
        .code("invalid_api_key"))
    }
}

async fn models(State(app): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = check_key(&app, &headers) {
        return e.into_response();
    }
    axum::Json(json!({"object": "list", "data": [{
        "id": app.model_name, "object": "model", "created": app.created, "owned_by": "mnemo",
    }]}))
    .into_response()
}

async fn stats(State(app): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = check_key(&app, &headers) {
        return e.into_response();
    }
    let s = &app.shared;
    let r = |x: &AtomicU64| x.load(Ordering::Relaxed);
    axum::Json(json!({
        "active": s.active.load(Ordering::Relaxed),
        "queued": app.queued(),
        "completed": r(&s.completed),
        "cancelled": r(&s.cancelled),
        "rejected": r(&s.rejected),
        "generated_tokens": r(&s.generated_tokens),
        "steps": r(&s.steps),
        "prefix_cache": {"entries": s.prefix_entries.load(Ordering::Relaxed),
                         "hits": r(&s.prefix_hits), "cached_tokens": r(&s.cached_tokens)},
        "lookup": {"drafted": r(&s.drafted), "accepted": r(&s.accepted)},
        "shutting_down": s.shutdown.load(Ordering::Relaxed),
    }))
    .into_response()
}

/// Read the body: 413 past the limit, 408 when it arrives too slowly.
async fn read_body(app: &App, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let too_big = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "the request body exceeds {} bytes",
                app.limits.max_body_bytes
            ),
        )
        .code("body_too_large")
    };
    if let Some(n) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if n > app.limits.max_body_bytes as u64 {
            return Err(too_big());
        }
    }
    match tokio::time::timeout(
        app.limits.body_timeout,
        axum::body::to_bytes(body, app.limits.max_body_bytes),
    )
    .await
    {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "the request body did not arrive in time",
        )
        .code("timeout")),
        Ok(Err(e)) => {
            let msg = format!("{e}");
            if msg.contains("length limit") {
                Err(too_big())
            } else {
                Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    format!("cannot read the request body: {msg}"),
                ))
            }
        }
        Ok(Ok(b)) => Ok(b),
    }
}

enum Kind {
    Completion,
    Chat,
}

async fn completions(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    generate(app, headers, body, Kind::Completion).await
}

async fn chat(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    generate(app, headers, body, Kind::Chat).await
}

async fn generate(app: AppState, headers: HeaderMap, body: Body, kind: Kind) -> Response {
    let endpoint = match kind {
        Kind::Completion => "/v1/completions",
        Kind::Chat => "/v1/chat/completions",
    };
    let mut log = Some(ReqLog::new(app.clone(), endpoint));
    match handle(app, headers, body, kind, &mut log).await {
        Ok(r) => r,
        Err(e) => {
            if let Some(l) = log.as_mut() {
                l.end(e.status.as_u16(), None, None, Some(&e.message));
            }
            e.into_response()
        }
    }
}

fn encode_err(e: anyhow::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        format!("{e:#}"),
    )
}

/// The prompt's token ids for either endpoint.
fn prompt_tokens(
    app: &App,
    o: &serde_json::Map<String, Value>,
    kind: &Kind,
) -> Result<Vec<u32>, ApiError> {
    let tok = &app.tok;
    match kind {
        Kind::Completion => match api::parse_prompt(o, app.vocab)? {
            Prompt::Tokens(t) => Ok(t),
            Prompt::Text(s) => tok.encode(&s).map_err(encode_err),
        },
        Kind::Chat => {
            let msgs = api::parse_messages(o)?;
            match tok.chat_template() {
                Some(tpl) => {
                    let eos = tok.id_to_token(tok.eot()).unwrap_or_default();
                    let text = mnemo::chat::render(tpl, &msgs, true, "", &eos).map_err(|e| {
                        ApiError::invalid("messages", format!("{e:#}")).code("template_error")
                    })?;
                    tok.encode_with_special(&text).map_err(encode_err)
                }
                None => {
                    // No template: a plain transcript ending in the assistant's turn.
                    let mut text = String::new();
                    for m in &msgs {
                        text.push_str(&format!("{}: {}\n", m.role, m.content));
                    }
                    text.push_str("assistant:");
                    tok.encode(&text).map_err(encode_err)
                }
            }
        }
    }
}

async fn handle(
    app: AppState,
    headers: HeaderMap,
    body: Body,
    kind: Kind,
    log: &mut Option<ReqLog>,
) -> Result<Response, ApiError> {
    check_key(&app, &headers)?;
    if app.shared.shutdown.load(Ordering::SeqCst) {
        return Err(shutting_down());
    }
    let bytes = read_body(&app, &headers, body).await?;
    let o = api::parse_object(&bytes)?;
    let p: Params = api::parse_params(&o, app.limits.max_tokens)?;
    if p.lookup == Some(true) && !app.lookup_ok {
        return Err(ApiError::invalid(
            "mnemo.lookup",
            "lookup-first decoding is not supported for this model (Engram models cannot rewind rejected drafts)",
        ));
    }
    if let Some(m) = o.get("model").and_then(Value::as_str) {
        if !app.model_aliases.iter().any(|a| a == m) {
            return Err(model_not_found(&app, m));
        }
    }
    let prompt = prompt_tokens(&app, &o, &kind)?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            "prompt",
            "the prompt encodes to no tokens",
        ));
    }
    let ctx = app.limits.ctx;
    if prompt.len() > app.limits.max_prompt_tokens || prompt.len() >= ctx {
        return Err(ApiError::invalid(
            if matches!(kind, Kind::Chat) {
                "messages"
            } else {
                "prompt"
            },
            format!(
                "the prompt is {} tokens; this server accepts at most {} (context {ctx})",
                prompt.len(),
                app.limits.max_prompt_tokens.min(ctx - 1)
            ),
        )
        .code("context_length_exceeded"));
    }
    let max_tokens = (p.max_tokens.unwrap_or(app.limits.default_max_tokens) as usize)
        .min(ctx - prompt.len())
        .max(1);
    let (etx, erx) = mpsc::unbounded_channel();
    let seed = p.seed.unwrap_or_else(|| {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        t ^ app.ids.load(Ordering::Relaxed).rotate_left(32)
    });
    let req = Request {
        prompt,
        max_tokens,
        sampling: Sampling {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
        },
        seed,
        stop: p.stop.clone(),
        ignore_eos: p.ignore_eos,
        lookup: p.lookup,
        arrived: log.as_ref().map_or_else(Instant::now, |l| l.arrived),
        tx: etx,
    };
    let n_prompt = req.prompt.len();
    match app.tx.try_send(req) {
        Ok(()) => app.engine.unpark(),
        Err(mpsc::error::TrySendError::Full(_)) => {
            app.shared.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "the server's queue is full; retry later",
            )
            .code("queue_full"));
        }
        Err(mpsc::error::TrySendError::Closed(_)) => return Err(shutting_down()),
    }
    let n = app.ids.fetch_add(1, Ordering::Relaxed);
    let id = match kind {
        Kind::Completion => format!("cmpl-{n:x}{:08x}", app.created as u32),
        Kind::Chat => format!("chatcmpl-{n:x}{:08x}", app.created as u32),
    };
    if let Some(l) = log.as_mut() {
        l.id = Some(id.clone());
        l.stream = p.stream;
        l.prompt_tokens = Some(n_prompt);
    }
    let meta = Meta::new(
        id,
        now(),
        app.model_name.clone(),
        matches!(kind, Kind::Chat),
        p.include_usage,
    );
    if p.stream {
        let mut l = log.take();
        if let Some(l) = l.as_mut() {
            l.responded = true;
        }
        Ok(stream_response(meta, erx, l))
    } else {
        collect_response(meta, erx, log).await
    }
}

/// OpenAI's answer to an unknown model: 404, `model_not_found`.
fn model_not_found(app: &App, m: &str) -> ApiError {
    let others: Vec<String> = app.model_aliases[1..]
        .iter()
        .map(|a| format!("`{a}`"))
        .collect();
    let also = if others.is_empty() {
        String::new()
    } else {
        format!(" (also accepted: {})", others.join(", "))
    };
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "The model `{m}` does not exist: this server serves `{}`{also}",
            app.model_name
        ),
    )
    .code("model_not_found")
}

fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "the server is shutting down",
    )
    .code("shutting_down")
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    chat: bool,
    include_usage: bool,
    /// The SSE event of a text chunk (not the first of a chat) around its JSON-escaped text:
    /// `pre + "\"text\"" + post`, the same bytes as `sse(&chunk(Some(text), false, None))`.
    text_frame: Option<(String, String)>,
}

fn usage(f: &Finish) -> Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": f.cached_tokens},
    })
}

async fn collect_response(
    m: Meta,
    mut rx: mpsc::UnboundedReceiver<Event>,
    log: &mut Option<ReqLog>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let fin = loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done(f)) => {
                if let Some(l) = log.as_mut() {
                    l.end(200, Some(&f), None, None);
                }
                break f;
            }
            Some(Event::Error(e)) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    e,
                ))
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "the engine dropped the request",
                ))
            }
        }
    };
    let body = if m.chat {
        json!({
            "id": m.id, "object": "chat.completion", "created": m.created, "model": m.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": null, "finish_reason": fin.reason}],
            "usage": usage(&fin),
        })
    } else {
        json!({
            "id": m.id, "object": "text_completion", "created": m.created, "model": m.model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": fin.reason}],
            "usage": usage(&fin),
        })
    };
    Ok(axum::Json(body).into_response())
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Stands for the text in [`Meta::text_frame`]'s template.
const HOLE: &str = "\u{1}mnemo-text\u{1}";

impl Meta {
    fn new(id: String, created: u64, model: String, chat: bool, include_usage: bool) -> Meta {
        let mut m = Meta {
            id,
            created,
            model,
            chat,
            include_usage,
            text_frame: None,
        };
        let full = String::from_utf8_lossy(&sse(&m.chunk(Some(HOLE), false, None))).into_owned();
        let hole = serde_json::to_string(HOLE).unwrap_or_default();
        if full.matches(&hole).count() == 1 {
            if let Some((pre, post)) = full.split_once(&hole) {
                m.text_frame = Some((pre.to_string(), post.to_string()));
            }
        }
        m
    }

    /// The SSE event of a text chunk.
    fn text_event(&self, text: &str, first: bool, out: &mut Vec<u8>) {
        match &self.text_frame {
            Some((pre, post)) if !first => {
                out.extend_from_slice(pre.as_bytes());
                // A `String` always serialises.
                let _ = serde_json::to_writer(&mut *out, text);
                out.extend_from_slice(post.as_bytes());
            }
            _ => out.extend_from_slice(&sse(&self.chunk(Some(text), first, None))),
        }
    }

    fn chunk(&self, text: Option<&str>, first: bool, finish: Option<&str>) -> Value {
        if self.chat {
            let mut delta = serde_json::Map::new();
            if first {
                delta.insert("role".into(), "assistant".into());
            }
            if let Some(t) = text {
                delta.insert("content".into(), t.into());
            }
            json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                   "model": self.model,
                   "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
        } else {
            json!({"id": self.id, "object": "text_completion", "created": self.created,
                   "model": self.model,
                   "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null,
                                "finish_reason": finish}]})
        }
    }
}

fn stream_response(m: Meta, rx: mpsc::UnboundedReceiver<Event>, log: Option<ReqLog>) -> Response {
    struct St {
        m: Meta,
        rx: mpsc::UnboundedReceiver<Event>,
        first: bool,
        done: bool,
        /// Ended at the last event; dropped with the stream if the client leaves first.
        log: Option<ReqLog>,
    }
    let st = St {
        m,
        rx,
        first: true,
        done: false,
        log,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        let mut ev = st.rx.recv().await;
        let mut b: Vec<u8> = Vec::new();
        // This event and every one already waiting go out in one write.
        loop {
            match ev {
                Some(Event::Text(t)) => {
                    st.m.text_event(&t, st.first, &mut b);
                    st.first = false;
                }
                Some(Event::Done(f)) => {
                    if st.first && st.m.chat {
                        b.extend_from_slice(&sse(&st.m.chunk(Some(""), true, None)));
                    }
                    b.extend_from_slice(&sse(&st.m.chunk(None, false, Some(f.reason))));
                    if st.m.include_usage {
                        let mut u = st.m.chunk(None, false, None);
                        u["choices"] = json!([]);
                        u["usage"] = usage(&f);
                        b.extend_from_slice(&sse(&u));
                    }
                    b.extend_from_slice(b"data: [DONE]\n\n");
                    st.done = true;
                    if let Some(l) = st.log.as_mut() {
                        l.end(200, Some(&f), None, None);
                    }
                }
                Some(Event::Error(e)) => {
                    if let Some(l) = st.log.as_mut() {
                        l.end(200, None, Some("error"), Some(&e));
                    }
                    let err = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e);
                    b.extend_from_slice(&sse(&err.body()));
                    b.extend_from_slice(b"data: [DONE]\n\n");
                    st.done = true;
                }
                None => {
                    st.done = true;
                    let msg = "the engine dropped the request";
                    if let Some(l) = st.log.as_mut() {
                        l.end(200, None, Some("error"), Some(msg));
                    }
                    let err = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", msg);
                    b.extend_from_slice(&sse(&err.body()));
                    b.extend_from_slice(b"data: [DONE]\n\n");
                }
            }
            if st.done {
                break;
            }
            match st.rx.try_recv() {
                Ok(e) => ev = Some(e),
                Err(_) => break,
            }
        }
        Some((Ok::<Bytes, std::convert::Infallible>(Bytes::from(b)), st))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    use super::{sse, Meta};

    /// The pre-rendered text frame gives the bytes of the full rendering, for both endpoints
    /// and texts that need escaping.
    #[test]
    fn text_frames_equal_the_full_rendering() {
        for chat in [false, true] {
            let m = Meta::new("id-1".into(), 7, "m \"x\"".into(), chat, false);
            assert!(m.text_frame.is_some());
            for t in [
                "",
                "a",
                "say \"hi\"\n\t\\",
                "é 😀 \u{1} \u{7f}",
                "mnemo-text",
            ] {
                let mut got = Vec::new();
                m.text_event(t, false, &mut got);
                assert_eq!(got, sse(&m.chunk(Some(t), false, None)).to_vec(), "{t:?}");
                let mut first = Vec::new();
                m.text_event(t, true, &mut first);
                assert_eq!(first, sse(&m.chunk(Some(t), true, None)).to_vec());
            }
        }
    }
}
