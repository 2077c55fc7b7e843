//! `mnemo serve` for operators, through the real HTTP server: `/health`, the Prometheus
//! `/metrics` page (parsed by a small exposition-format parser below, and checked to move by
//! the right amounts), `--log-requests` JSON lines, and per-request lookup-first decoding.

mod common;

use common::server::{completion_text, Server};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// One sample: metric name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// A parsed exposition page: family name → (type, samples). Panics on anything malformed:
/// a sample before its family's `# HELP` and `# TYPE`, a bad label set or value, a histogram
/// whose buckets are not cumulative, not ascending, or do not end in `+Inf` = `_count`.
fn parse_metrics(text: &str) -> BTreeMap<String, (String, Vec<Sample>)> {
    let mut help = std::collections::BTreeSet::new();
    let mut fams: BTreeMap<String, (String, Vec<Sample>)> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, h) = rest.split_once(' ').expect("HELP name text");
            assert!(!h.is_empty(), "{line}");
            help.insert(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, t) = rest.split_once(' ').expect("TYPE name type");
            assert!(help.contains(name), "TYPE before HELP: {line}");
            assert!(["counter", "gauge", "histogram"].contains(&t), "{line}");
            assert!(
                fams.insert(name.into(), (t.into(), vec![])).is_none(),
                "{line}"
            );
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
        let (head, value) = line.rsplit_once(' ').expect("name value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value: {line}"));
        let (name, labels) = match head.split_once('{') {
            None => (head.to_string(), BTreeMap::new()),
            Some((n, l)) => {
                let l = l.strip_suffix('}').expect("closing brace");
                let mut m = BTreeMap::new();
                for kv in l.split(',') {
                    let (k, v) = kv.split_once('=').expect("label=value");
                    let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
                    m.insert(k.to_string(), v.expect("quoted label value").to_string());
                }
                (n.to_string(), m)
            }
        };
        let fam = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .find(|f| fams.get(*f).is_some_and(|x| x.0 == "histogram"))
            .unwrap_or(&name)
            .to_string();
        let f = fams
            .get_mut(&fam)
            .unwrap_or_else(|| panic!("sample before # TYPE: {line}"));
        f.1.push((name, labels, value));
    }
    for (name, (t, samples)) in &fams {
        if t != "histogram" {
            continue;
        }
        let mut last_le = f64::NEG_INFINITY;
        let mut last_n = 0.0;
        let (mut sum, mut count, mut inf) = (None, None, None);
        for (n, l, v) in samples {
            if n.ends_with("_bucket") {
                let le = &l["le"];
                let x = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                assert!(
                    x > last_le && *v >= last_n,
                    "{name}: not cumulative at le={le}"
                );
                (last_le, last_n) = (x, *v);
                if le == "+Inf" {
                    inf = Some(*v);
                }
            } else if n.ends_with("_sum") {
                sum = Some(*v);
            } else {
                count = Some(*v);
            }
        }
        assert!(
            inf.is_some() && inf == count,
            "{name}: +Inf bucket != _count"
        );
        assert!(sum.is_some_and(|s| s >= 0.0), "{name}: _sum");
    }
    fams
}

/// The value of `name` (a sample name) with exactly these labels; 0 when absent.
fn val(m: &BTreeMap<String, (String, Vec<Sample>)>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    m.values()
        .flat_map(|f| &f.1)
        .find(|(n, l, _)| n == name && *l == want)
        .map_or(0.0, |s| s.2)
}

fn scrape(s: &Server) -> BTreeMap<String, (String, Vec<Sample>)> {
    let (st, body) = s.get("/metrics");
    assert_eq!(st, 200);
    parse_metrics(&body)
}

fn health(s: &Server) -> Value {
    let (st, body) = s.get("/health");
    assert_eq!(st, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Wait until the engine has no active sequence (it updates the gauge after the last event).
fn idle(s: &Server) {
    let t0 = Instant::now();
    while health(s)["active"] != 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the engine stays busy"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The SSE payloads of a streaming request.
fn stream(s: &Server, path: &str, body: &Value) -> Vec<Value> {
    let (st, b) = common::server::http(s.port, "POST", path, &[], body.to_string().as_bytes());
    assert_eq!(st, 200, "{b}");
    b.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[test]
fn health_and_metrics_move_by_the_right_amounts() {
    let s = Server::start(&["--prefix-min-tokens", "16"]);
    let h = health(&s);
    assert_eq!(h["status"], "ok");
    assert_eq!(h["model"], "run");
    assert!(h["uptime_s"].as_f64().unwrap() > 0.0, "{h}");
    assert_eq!(
        (h["active"].as_u64(), h["queued"].as_u64()),
        (Some(0), Some(0))
    );
    let m0 = scrape(&s);
    for fam in [
        "mnemo_requests_total",
        "mnemo_prompt_tokens_total",
        "mnemo_completion_tokens_total",
        "mnemo_prefix_cache_hits_total",
        "mnemo_prefix_cache_misses_total",
        "mnemo_queue_depth",
        "mnemo_active_sequences",
        "mnemo_time_to_first_token_seconds",
        "mnemo_inter_token_latency_seconds",
        "mnemo_request_duration_seconds",
    ] {
        assert!(m0.contains_key(fam), "{fam} missing");
    }
    assert_eq!(m0["mnemo_queue_depth"].0, "gauge");
    assert_eq!(m0["mnemo_time_to_first_token_seconds"].0, "histogram");

    // Three generations (5 + 4 + 3 tokens), a bad request, an unknown route.
    let mut prompt_tokens = 0;
    let (st, a) = s.post(
        "/v1/completions",
        &json!({"prompt": "fn f_1", "max_tokens": 5, "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(st, 200);
    prompt_tokens += a["usage"]["prompt_tokens"].as_u64().unwrap();
    let ev = stream(
        &s,
        "/v1/completions",
        &json!({"prompt": "fn f_2(x", "max_tokens": 4, "ignore_eos": true, "stream": true,
                "stream_options": {"include_usage": true}}),
    );
    let u = &ev.last().unwrap()["usage"];
    assert_eq!(u["completion_tokens"], 4);
    prompt_tokens += u["prompt_tokens"].as_u64().unwrap();
    let (st, c) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "fn"}], "max_tokens": 3,
                "ignore_eos": true}),
    );
    assert_eq!(st, 200);
    prompt_tokens += c["usage"]["prompt_tokens"].as_u64().unwrap();
    let (st, _) = s.post(
        "/v1/completions",
        &json!({"prompt": "x", "temperature": "hot"}),
    );
    assert_eq!(st, 400);
    assert_eq!(s.get("/nope").0, 404);
    // A long prompt twice: a prefix-cache miss, then a hit.
    let long: String = (0..8)
        .map(|j| format!("fn f_1_{j}(x: i32) {{}}\n"))
        .collect();
    for _ in 0..2 {
        let (st, v) = s.post(
            "/v1/completions",
            &json!({"prompt": long, "max_tokens": 1, "ignore_eos": true}),
        );
        assert_eq!(st, 200);
        prompt_tokens += v["usage"]["prompt_tokens"].as_u64().unwrap();
    }
    idle(&s);
    let m1 = scrape(&s);
    let d = |name: &str, labels: &[(&str, &str)]| val(&m1, name, labels) - val(&m0, name, labels);
    let req = "mnemo_requests_total";
    assert_eq!(
        d(req, &[("endpoint", "/v1/completions"), ("status", "200")]),
        4.0
    );
    assert_eq!(
        d(req, &[("endpoint", "/v1/completions"), ("status", "400")]),
        1.0
    );
    assert_eq!(
        d(
            req,
            &[("endpoint", "/v1/chat/completions"), ("status", "200")]
        ),
        1.0
    );
    assert_eq!(d(req, &[("endpoint", "other"), ("status", "404")]), 1.0);
    // The first scrape counted once it was answered.
    assert_eq!(d(req, &[("endpoint", "/metrics"), ("status", "200")]), 1.0);
    assert_eq!(d("mnemo_completion_tokens_total", &[]), 14.0);
    assert_eq!(d("mnemo_prompt_tokens_total", &[]), prompt_tokens as f64);
    assert_eq!(d("mnemo_prefix_cache_misses_total", &[]), 4.0);
    assert_eq!(d("mnemo_prefix_cache_hits_total", &[]), 1.0);
    assert!(d("mnemo_prompt_cached_tokens_total", &[]) >= 16.0);
    assert_eq!(val(&m1, "mnemo_queue_depth", &[]), 0.0);
    assert_eq!(val(&m1, "mnemo_active_sequences", &[]), 0.0);
    // Five generations reached the engine: one first token each, and the gaps between the
    // others (4 + 3 + 2 + 0 + 0).
    assert_eq!(d("mnemo_time_to_first_token_seconds_count", &[]), 5.0);
    assert_eq!(d("mnemo_request_duration_seconds_count", &[]), 5.0);
    assert_eq!(d("mnemo_inter_token_latency_seconds_count", &[]), 9.0);
    let ttft = d("mnemo_time_to_first_token_seconds_sum", &[]);
    let dur = d("mnemo_request_duration_seconds_sum", &[]);
    assert!(ttft > 0.0 && dur >= ttft, "ttft {ttft} duration {dur}");
    let inf = val(
        &m1,
        "mnemo_time_to_first_token_seconds_bucket",
        &[("le", "+Inf")],
    );
    assert_eq!(
        inf,
        val(&m1, "mnemo_time_to_first_token_seconds_count", &[])
    );
    // Uptime grows.
    assert!(health(&s)["uptime_s"].as_f64() > h["uptime_s"].as_f64());
}

/// The JSON lines of the server's stderr, once `n` have arrived.
fn log_lines(s: &Server, n: usize) -> Vec<Value> {
    let t0 = Instant::now();
    loop {
        let lines: Vec<Value> = s
            .log
            .lock()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        if lines.len() >= n || t0.elapsed() > Duration::from_secs(10) {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn request_logs_are_one_json_line_per_request() {
    let s = Server::start(&["--log-requests"]);
    let (st, a) = s.post(
        "/v1/completions",
        &json!({"prompt": "fn f_1", "max_tokens": 5, "ignore_eos": true}),
    );
    assert_eq!(st, 200);
    let ev = stream(
        &s,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "fn"}], "max_tokens": 3,
                "ignore_eos": true, "stream": true}),
    );
    let chat_id = ev[0]["id"].as_str().unwrap().to_string();
    let (st, _) = s.post("/v1/completions", &json!({"prompt": "x", "max_tokens": -1}));
    assert_eq!(st, 400);
    let lines = log_lines(&s, 3);
    assert_eq!(lines.len(), 3, "{lines:?}");
    let l = &lines[0];
    assert_eq!(l["id"], a["id"]);
    assert_eq!(l["endpoint"], "/v1/completions");
    assert_eq!(
        (l["status"].as_u64(), l["stream"].as_bool()),
        (Some(200), Some(false))
    );
    assert_eq!(l["finish_reason"], "length");
    assert_eq!(l["prompt_tokens"], a["usage"]["prompt_tokens"]);
    assert_eq!(l["completion_tokens"], 5);
    assert_eq!(l["cached_tokens"], 0);
    let (ttft, dur) = (
        l["ttft_s"].as_f64().unwrap(),
        l["duration_s"].as_f64().unwrap(),
    );
    assert!(ttft > 0.0 && ttft <= dur, "{l}");
    assert!(
        l["ts"].as_f64().unwrap() > 1.6e9 && l["error"].is_null(),
        "{l}"
    );
    let l = &lines[1];
    assert_eq!(l["id"], chat_id.as_str());
    assert_eq!(l["endpoint"], "/v1/chat/completions");
    assert_eq!(l["stream"], true);
    assert_eq!(l["completion_tokens"], 3);
    let l = &lines[2];
    assert_eq!(l["status"], 400);
    assert!(l["id"].is_null() && l["completion_tokens"].is_null(), "{l}");
    assert!(l["error"].as_str().unwrap().contains("max_tokens"), "{l}");
    // Without the flag: no JSON lines.
    let quiet = Server::start(&[]);
    let (st, _) = quiet.post("/v1/completions", &json!({"prompt": "fn", "max_tokens": 2}));
    assert_eq!(st, 200);
    std::thread::sleep(Duration::from_millis(100));
    assert!(log_lines(&quiet, 0).is_empty());
}

#[test]
fn lookup_per_request_keeps_greedy_output() {
    let s = Server::start(&[]);
    let context: String = (0..12)
        .map(|j| format!("fn f_1_{j}(x: i32) -> i32 {{ x * {j} }}\n"))
        .collect();
    let mut req = json!({"prompt": format!("{context}fn f_1_3(x"), "max_tokens": 40,
                         "temperature": 0, "ignore_eos": true});
    let plain = completion_text(&s.post("/v1/completions", &req).1);
    assert_eq!(s.stats()["lookup"]["drafted"], 0, "no lookup unless asked");
    req["mnemo"] = json!({"lookup": true});
    let (st, v) = s.post("/v1/completions", &req);
    assert_eq!(st, 200, "{v}");
    assert_eq!(completion_text(&v), plain);
    let drafted = s.stats()["lookup"]["drafted"].as_u64().unwrap();
    assert!(drafted > 0);
    let m = scrape(&s);
    assert_eq!(
        val(&m, "mnemo_lookup_drafted_tokens_total", &[]),
        drafted as f64
    );
    // Streaming gives the same text; a bad extension field is a 400 that names it.
    req["stream"] = json!(true);
    let text: String = stream(&s, "/v1/completions", &req)
        .iter()
        .map(|e| e["choices"][0]["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(text, plain);
    req["mnemo"] = json!({"lookup": "yes"});
    let (st, v) = s.post("/v1/completions", &req);
    assert_eq!(st, 400);
    assert_eq!(v["error"]["param"], "mnemo.lookup");
    // A server with --lookup: a request can opt out.
    let on = Server::start(&["--lookup"]);
    req["stream"] = json!(false);
    req["mnemo"] = json!({"lookup": false});
    assert_eq!(completion_text(&on.post("/v1/completions", &req).1), plain);
    assert_eq!(on.stats()["lookup"]["drafted"], 0);
}
