//! The operators' side of the HTTP server: `/health`, the `/metrics` page, the middleware that
//! counts every answered request, and [`ReqLog`], the record of one completion/chat request
//! (its duration histogram and, with `--log-requests`, its JSON log line).

use super::engine::Finish;
use super::http::AppState;
use super::metrics::{self, Snapshot};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Count every answered request by endpoint and status (`mnemo_requests_total`).
pub async fn count(
    State(app): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let ep = metrics::endpoint_label(req.uri().path());
    let r = next.run(req).await;
    app.shared.metrics.count_request(ep, r.status().as_u16());
    r
}

/// `/health`: 200 `{"status": "ok", …}` while serving, 503 `"shutting_down"` while draining
/// (reachable on a keep-alive connection opened before the signal; the listener closes at
/// once). Needs no API key.
pub async fn health(State(app): State<AppState>) -> Response {
    let shutting = app.shared.shutdown.load(Ordering::SeqCst);
    let body = json!({
        "status": if shutting { "shutting_down" } else { "ok" },
        "model": app.model_name,
        "uptime_s": app.started.elapsed().as_secs_f64(),
        "active": app.shared.active.load(Ordering::Relaxed),
        "queued": app.queued(),
    });
    let code = if shutting {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, axum::Json(body)).into_response()
}

/// `/metrics`: the Prometheus text exposition format. Needs no API key.
pub async fn metrics_page(State(app): State<AppState>) -> Response {
    let s = &app.shared;
    let r = |x: &AtomicU64| x.load(Ordering::Relaxed);
    let page = s.metrics.render(&Snapshot {
        queue_depth: app.queued(),
        active: s.active.load(Ordering::Relaxed),
        completion_tokens: r(&s.generated_tokens),
        cached_tokens: r(&s.cached_tokens),
        prefix_hits: r(&s.prefix_hits),
        drafted: r(&s.drafted),
        accepted: r(&s.accepted),
    });
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        page,
    )
        .into_response()
}

/// One completion/chat request's record: ended once (`end`), or on drop (the client left),
/// it observes `mnemo_request_duration_seconds` (requests that reached the queue) and, with
/// `--log-requests`, writes the request's JSON log line.
pub struct ReqLog {
    pub app: AppState,
    pub endpoint: &'static str,
    pub arrived: Instant,
    pub id: Option<String>,
    pub stream: bool,
    pub prompt_tokens: Option<usize>,
    /// A response head went out (the middleware counted it).
    pub responded: bool,
    pub ended: bool,
}

/// The `tracing` target of the request log lines (`main` writes their message verbatim).
pub const REQUEST_LOG_TARGET: &str = "mnemo::request";

impl ReqLog {
    pub fn new(app: AppState, endpoint: &'static str) -> Self {
        ReqLog {
            app,
            endpoint,
            arrived: Instant::now(),
            id: None,
            stream: false,
            prompt_tokens: None,
            responded: false,
            ended: false,
        }
    }

    /// `reason` overrides the finish reason of `fin` (`error`, `cancelled`).
    pub fn end(
        &mut self,
        status: u16,
        fin: Option<&Finish>,
        reason: Option<&str>,
        error: Option<&str>,
    ) {
        if self.ended {
            return;
        }
        self.ended = true;
        let dur = self.arrived.elapsed().as_secs_f64();
        let m = &self.app.shared.metrics;
        if self.id.is_some() {
            m.duration.observe(dur);
        }
        if !self.responded && status == 499 {
            m.count_request(self.endpoint, 499);
        }
        if !self.app.log_requests {
            return;
        }
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let line = json!({
            "ts": ts,
            "id": self.id,
            "endpoint": self.endpoint,
            "stream": self.stream,
            "status": status,
            "finish_reason": reason.or(fin.map(|f| f.reason)),
            "prompt_tokens": fin.map(|f| f.prompt_tokens).or(self.prompt_tokens),
            "completion_tokens": fin.map(|f| f.completion_tokens),
            "cached_tokens": fin.map(|f| f.cached_tokens),
            "ttft_s": fin.and_then(|f| f.ttft).map(|t| t.as_secs_f64()),
            "duration_s": dur,
            "error": error,
        });
        tracing::info!(target: "mnemo::request", "{line}");
    }
}

impl Drop for ReqLog {
    fn drop(&mut self) {
        // The client went away first: mid-stream (the 200 was sent) or before the answer.
        let status = if self.responded { 200 } else { 499 };
        self.end(status, None, Some("cancelled"), None);
    }
}
