//! `mnemo serve` end to end: a tiny random model behind the server on an ephemeral port, a
//! hand-written HTTP/1.1 client over `TcpStream` (the harness is in `common/server.rs`).

mod common;

use common::server::{
    completion_text, connect, http, parse_response, tiny_run, write_request, Server,
};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

/// Server-sent events of a streaming response, read as they arrive.
struct Events {
    r: BufReader<TcpStream>,
    buf: String,
    pub status: u16,
}

impl Events {
    fn open(port: u16, path: &str, body: &Value) -> Events {
        let mut s = connect(port);
        write_request(&mut s, "POST", path, &[], body.to_string().as_bytes());
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut chunked = false;
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            if line
                .to_lowercase()
                .starts_with("transfer-encoding: chunked")
            {
                chunked = true;
            }
            if line == "\r\n" {
                break;
            }
        }
        assert!(chunked || status != 200, "a stream is chunked");
        Events {
            r,
            buf: String::new(),
            status,
        }
    }

    /// The next `data:` payload, or None at the end of the body.
    fn next(&mut self) -> Option<String> {
        loop {
            if let Some(p) = self.buf.find("\n\n") {
                let ev: String = self.buf.drain(..p + 2).collect();
                let data = ev
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not an SSE data event: {ev:?}"));
                return Some(data.trim_end().to_string());
            }
            let mut line = String::new();
            if self.r.read_line(&mut line).ok()? == 0 {
                return None;
            }
            let n = usize::from_str_radix(line.trim(), 16).ok()?;
            if n == 0 {
                return None;
            }
            let mut chunk = vec![0u8; n + 2];
            self.r.read_exact(&mut chunk).ok()?;
            self.buf
                .push_str(std::str::from_utf8(&chunk[..n]).expect("UTF-8 event"));
        }
    }

    /// All remaining payloads.
    fn rest(&mut self) -> Vec<String> {
        std::iter::from_fn(|| self.next()).collect()
    }
}

fn assert_error_shape(v: &Value) {
    let e = &v["error"];
    assert!(e["message"].is_string(), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
}

#[test]
fn models_completions_chat_usage_and_seeds() {
    let s = Server::start(&[]);
    let (st, b) = http(s.port, "GET", "/v1/models", &[], b"");
    assert_eq!(st, 200);
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "run");

    // Token-id prompt: exact prompt count; max_tokens bounds the completion.
    let (st, v) = s.post(
        "/v1/completions",
        &json!({"prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let u = &v["usage"];
    assert_eq!(u["prompt_tokens"], 3);
    let n = u["completion_tokens"].as_u64().unwrap();
    assert!(n <= 8);
    assert_eq!(u["total_tokens"].as_u64().unwrap(), 3 + n);
    let fr = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(fr == "length" && n == 8 || fr == "stop", "{v}");

    // Chat (no template in this model: a plain transcript).
    let (st, v) = s.post(
        "/v1/chat/completions",
        &json!({"model": "run", "messages": [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "fn f"}], "max_tokens": 6, "temperature": 0.7, "seed": 3}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["choices"][0]["message"]["content"].is_string());
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 3);

    // Seeds: the same seed gives the same sample.
    let req = json!({"prompt": "fn f_1", "max_tokens": 16, "temperature": 1.0, "seed": 42});
    let a = completion_text(&s.post("/v1/completions", &req).1);
    let b = completion_text(&s.post("/v1/completions", &req).1);
    assert_eq!(a, b);
    // Nucleus sampling with a tiny top_p is greedy.
    let g = completion_text(
        &s.post(
            "/v1/completions",
            &json!({"prompt": "fn f_1", "max_tokens": 16, "temperature": 0}),
        )
        .1,
    );
    let p = completion_text(
        &s.post(
            "/v1/completions",
            &json!({"prompt": "fn f_1", "max_tokens": 16, "top_p": 1e-6, "seed": 9}),
        )
        .1,
    );
    assert_eq!(g, p);
}

#[test]
fn streaming_sse_format_matches_the_non_streaming_answer() {
    let s = Server::start(&[]);
    let body = json!({"prompt": "fn f_2_3(x", "max_tokens": 12, "temperature": 0});
    let whole = completion_text(&s.post("/v1/completions", &body).1);
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let mut ev = Events::open(s.port, "/v1/completions", &sb);
    assert_eq!(ev.status, 200);
    let evs = ev.rest();
    assert_eq!(evs.last().unwrap(), "[DONE]", "{evs:?}");
    let mut text = String::new();
    let mut finish = None;
    let mut usage = None;
    for e in &evs[..evs.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert_eq!(v["object"], "text_completion");
        if let Some(c) = v["choices"].as_array().unwrap().first() {
            text.push_str(c["text"].as_str().unwrap());
            if !c["finish_reason"].is_null() {
                finish = Some(c["finish_reason"].as_str().unwrap().to_string());
            }
        } else {
            usage = Some(v["usage"].clone());
        }
    }
    assert_eq!(text, whole);
    assert!(finish.is_some());
    let u = usage.expect("a usage chunk");
    assert!(u["completion_tokens"].as_u64().unwrap() <= 12);

    // Chat streaming: role first, then content deltas, a finish chunk, [DONE].
    let mut ev = Events::open(
        s.port,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                "temperature": 0, "stream": true}),
    );
    let evs = ev.rest();
    assert_eq!(evs.last().unwrap(), "[DONE]");
    let first: Value = serde_json::from_str(&evs[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let last: Value = serde_json::from_str(&evs[evs.len() - 2]).unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
}

#[test]
fn stop_sequences_cut_the_text() {
    let s = Server::start(&[]);
    let req = json!({"prompt": "fn f_4_1", "max_tokens": 40, "temperature": 0});
    let full = completion_text(&s.post("/v1/completions", &req).1);
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "{full:?}");
    // Stop at the first occurrence of a two-character piece from the middle.
    let stop: String = chars[3..5].iter().collect();
    let want = &full[..full.find(&stop).unwrap()];
    let mut r2 = req.clone();
    r2["stop"] = json!([stop, "\u{0}never"]);
    let (st, v) = s.post("/v1/completions", &r2);
    assert_eq!(st, 200);
    assert_eq!(completion_text(&v), want);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Streamed, the stop sequence is never sent either.
    r2["stream"] = json!(true);
    let evs = Events::open(s.port, "/v1/completions", &r2).rest();
    let text: String = evs[..evs.len() - 1]
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_str(e).unwrap();
            v["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(text, want);
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let s = Server::start(&["--max-body-bytes", "2000", "--max-tokens-limit", "100"]);
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{not json".to_vec(), 400, "invalid_json"),
        (b"[1,2]".to_vec(), 400, "invalid_json"),
        (b"{\"prompt\":\"\xff\xfe\"}".to_vec(), 400, "invalid_json"),
        (
            br#"{"prompt":"a","max_tokens":"ten"}"#.to_vec(),
            400,
            "invalid_type",
        ),
        (
            br#"{"prompt":"a","max_tokens":-5}"#.to_vec(),
            400,
            "invalid_value",
        ),
        (
            br#"{"prompt":"a","max_tokens":1e12}"#.to_vec(),
            400,
            "invalid_type",
        ),
        (
            br#"{"prompt":"a","max_tokens":1000000}"#.to_vec(),
            400,
            "invalid_value",
        ),
        (
            br#"{"prompt":"a","temperature":[1]}"#.to_vec(),
            400,
            "invalid_type",
        ),
        (br#"{"prompt":{"a":1}}"#.to_vec(), 400, "invalid_type"),
        (br#"{"prompt":[1,2,99999]}"#.to_vec(), 400, "invalid_type"),
        (br#"{"max_tokens":3}"#.to_vec(), 400, "missing_field"),
        (
            format!("{{\"prompt\":\"{}\"}}", "x".repeat(3000)).into_bytes(),
            413,
            "body_too_large",
        ),
    ];
    for (body, want, code) in cases {
        let (st, b) = http(s.port, "POST", "/v1/completions", &[], &body);
        let v: Value = serde_json::from_str(&b).unwrap_or_else(|_| panic!("{st}: {b}"));
        assert_eq!(st, want, "{}: {b}", String::from_utf8_lossy(&body));
        assert_error_shape(&v);
        assert_eq!(v["error"]["code"], code, "{b}");
    }
    let (st, v) = s.post(
        "/v1/completions",
        &json!({"prompt": "a", "max_tokens": "ten"}),
    );
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("max_tokens"))
    );
    // A prompt longer than the context (512): 400 context_length_exceeded.
    let ids: Vec<u32> = (0..600).map(|i| i % 10).collect();
    let (st, v) = s.post("/v1/completions", &json!({"prompt": ids}));
    assert_eq!(st, 400);
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let (st, v) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": 5}]}),
    );
    assert_eq!(st, 400);
    assert_eq!(v["error"]["param"], "messages[0].content");
    let (st, b) = http(s.port, "GET", "/v1/nothing", &[], b"");
    assert_eq!(st, 404);
    assert_error_shape(&serde_json::from_str(&b).unwrap());
    let (st, _) = http(s.port, "GET", "/v1/completions", &[], b"");
    assert_eq!(st, 405);
    // Still serving.
    let (st, _) = s.post("/v1/completions", &json!({"prompt": "fn", "max_tokens": 2}));
    assert_eq!(st, 200);
}

#[test]
fn api_key_is_required_when_set() {
    let s = Server::start(&["--api-key", "sekret"]);
    let (st, b) = http(s.port, "GET", "/v1/models", &[], b"");
    assert_eq!(st, 401);
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_error_shape(&v);
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let body = br#"{"prompt":"fn","max_tokens":2}"#;
    let (st, _) = http(
        s.port,
        "POST",
        "/v1/completions",
        &[("Authorization", "Bearer wrong")],
        body,
    );
    assert_eq!(st, 401);
    let (st, _) = http(
        s.port,
        "POST",
        "/v1/completions",
        &[("Authorization", "Bearer sekret")],
        body,
    );
    assert_eq!(st, 200);
}

#[test]
fn a_full_queue_answers_429_and_a_disconnect_frees_the_slot() {
    let s = Server::start(&[
        "--max-batch",
        "1",
        "--queue",
        "1",
        "--debug-step-delay-ms",
        "20",
    ]);
    let long = json!({"prompt": "fn", "max_tokens": 400, "stream": true, "temperature": 0.5,
                      "ignore_eos": true});
    let mut a = Events::open(s.port, "/v1/completions", &long);
    assert_eq!(a.status, 200);
    a.next().expect("a first event");
    // B waits in the queue; C finds it full.
    let short = json!({"prompt": "fn", "max_tokens": 3, "stream": true, "temperature": 0.5});
    let mut b = Events::open(s.port, "/v1/completions", &short);
    assert_eq!(b.status, 200);
    let t0 = Instant::now();
    while s.stats()["queued"] != 1 {
        assert!(t0.elapsed() < Duration::from_secs(10), "{}", s.stats());
        std::thread::sleep(Duration::from_millis(10));
    }
    let (st, v) = s.post("/v1/completions", &json!({"prompt": "fn", "max_tokens": 3}));
    assert_eq!(st, 429, "{v}");
    assert_error_shape(&v);
    assert_eq!(v["error"]["type"], "rate_limit_error");
    // A's client goes away: its sequence is freed at once and B runs (A alone would hold
    // the only slot for 400 × 20 ms = 8 s).
    let t0 = Instant::now();
    drop(a);
    let evs = b.rest();
    assert_eq!(evs.last().unwrap(), "[DONE]");
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    // B's last event is sent inside the decode step; the loop drops the finished sequence from
    // the active count just after, so the count may lag the client by a moment.
    let t1 = Instant::now();
    while s.stats()["active"] != 0 {
        assert!(t1.elapsed() < Duration::from_secs(10), "{}", s.stats());
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = s.stats();
    assert_eq!(st["cancelled"], 1, "{st}");
    assert_eq!(st["rejected"], 1, "{st}");
    assert_eq!(st["active"], 0, "{st}");
}

#[test]
fn concurrent_requests_are_batched_and_match_sequential_greedy() {
    let s = Server::start(&["--max-batch", "8"]);
    let prompts: Vec<String> = (0..6).map(|i| format!("fn f_{i}_{}(x", i * 3)).collect();
    let seq: Vec<String> = prompts
        .iter()
        .map(|p| {
            completion_text(
                &s.post(
                    "/v1/completions",
                    &json!({"prompt": p, "max_tokens": 24, "temperature": 0}),
                )
                .1,
            )
        })
        .collect();
    let steps0 = s.stats()["steps"].as_u64().unwrap();
    let port = s.port;
    let handles: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|p| {
            std::thread::spawn(move || {
                let body = json!({"prompt": p, "max_tokens": 24, "temperature": 0}).to_string();
                let (st, b) = http(port, "POST", "/v1/completions", &[], body.as_bytes());
                assert_eq!(st, 200, "{b}");
                completion_text(&serde_json::from_str(&b).unwrap())
            })
        })
        .collect();
    let par: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(par, seq);
    let steps = s.stats()["steps"].as_u64().unwrap() - steps0;
    // Alone they take ≥ 6 × 24 steps; shared decode steps take fewer.
    assert!(steps < 6 * 24, "{steps} steps");
}

#[test]
fn lookup_decoding_and_the_prompt_cache_keep_greedy_output() {
    let plain = Server::start(&["--prefix-entries", "0"]);
    let dir = common::root().join("prefix");
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let fancy = Server::start(&[
        "--lookup",
        "--prefix-min-tokens",
        "64",
        "--prefix-cache-dir",
        d,
    ]);
    let context: String = (0..12)
        .map(|j| format!("fn f_1_{j}(x: i32) -> i32 {{ x * {j} }}\n"))
        .collect();
    let mut answers = Vec::new();
    for q in ["fn f_1_3(x", "fn f_1_7(x: i32)"] {
        let req = json!({"prompt": format!("{context}{q}"), "max_tokens": 40, "temperature": 0});
        let want = completion_text(&plain.post("/v1/completions", &req).1);
        let (st, v) = fancy.post("/v1/completions", &req);
        assert_eq!(st, 200);
        assert_eq!(completion_text(&v), want);
        answers.push((
            req,
            want,
            v["usage"]["prompt_tokens_details"]["cached_tokens"].clone(),
        ));
    }
    // The second question reused the context's K/V.
    let cached = answers[1].2.as_u64().unwrap();
    assert!(cached >= 64, "{:?}", answers[1].2);
    let st = fancy.stats();
    assert!(st["prefix_cache"]["hits"].as_u64().unwrap() >= 1, "{st}");
    assert!(st["lookup"]["drafted"].as_u64().unwrap() > 0, "{st}");
    drop(fancy);
    // Saved to disk: a new server starts with it.
    let again = Server::start(&["--prefix-min-tokens", "64", "--prefix-cache-dir", d]);
    let (st, v) = again.post("/v1/completions", &answers[0].0);
    assert_eq!(st, 200);
    assert_eq!(completion_text(&v), answers[0].1);
    assert!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            >= 64,
        "{v}\n{}",
        again.log.lock().unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn graceful_shutdown_finishes_streams_then_exits() {
    let mut s = Server::start(&["--debug-step-delay-ms", "10"]);
    let mut ev = Events::open(
        s.port,
        "/v1/completions",
        &json!({"prompt": "fn", "max_tokens": 60, "temperature": 0.8, "stream": true,
                "ignore_eos": true}),
    );
    ev.next().unwrap();
    let st = Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let evs = ev.rest();
    assert_eq!(evs.last().unwrap(), "[DONE]", "{evs:?}");
    let fin: Value = serde_json::from_str(&evs[evs.len() - 2]).unwrap();
    assert_eq!(fin["choices"][0]["finish_reason"], "length", "{fin}");
    let t0 = Instant::now();
    while s.alive() {
        assert!(t0.elapsed() < Duration::from_secs(10), "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.child.wait().unwrap().code(), Some(0));

    // With a short grace period an endless stream is ended cleanly: an error event, [DONE].
    let mut s = Server::start(&["--debug-step-delay-ms", "20", "--shutdown-grace", "0.3"]);
    let mut ev = Events::open(
        s.port,
        "/v1/completions",
        &json!({"prompt": "fn", "max_tokens": 400, "temperature": 0.8, "stream": true,
                "ignore_eos": true}),
    );
    ev.next().unwrap();
    Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    let evs = ev.rest();
    assert_eq!(evs.last().unwrap(), "[DONE]", "{evs:?}");
    let err: Value = serde_json::from_str(&evs[evs.len() - 2]).unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{err}"
    );
    let t0 = Instant::now();
    while s.alive() {
        assert!(t0.elapsed() < Duration::from_secs(10), "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn slow_clients_are_cut_off_without_blocking_others() {
    let s = Server::start(&["--read-timeout", "1"]);
    // Slow headers: the connection is closed after the timeout.
    let mut slow = connect(s.port);
    slow.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // Slow body: 408.
    let mut slow_body = connect(s.port);
    slow_body
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
        .unwrap();
    // Others are served meanwhile.
    for _ in 0..3 {
        let (st, _) = s.post("/v1/completions", &json!({"prompt": "fn", "max_tokens": 2}));
        assert_eq!(st, 200);
    }
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    assert!(t0.elapsed() < Duration::from_secs(5));
    let mut raw = Vec::new();
    let _ = slow_body.read_to_end(&mut raw);
    let (st, b) = parse_response(&raw);
    assert_eq!(st, 408, "{b}");
    assert_error_shape(&serde_json::from_str(&b).unwrap());
    let (st, _) = s.post("/v1/completions", &json!({"prompt": "fn", "max_tokens": 2}));
    assert_eq!(st, 200);
}

/// A small deterministic generator (no dependency).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_value(r: &mut Lcg, depth: u32) -> Value {
    match r.below(if depth > 2 { 7 } else { 9 }) {
        0 => Value::Null,
        1 => json!(r.below(2) == 0),
        2 => json!(r.next() as i64 - (1 << 30)),
        3 => json!((r.next() as f64) * 1e-3 - 1e6),
        4 => json!(["", "fn", "\u{0}", "é🦀", "[DONE]", "data: x\n\n"][r.below(6) as usize]),
        5 => json!(u64::MAX),
        6 => json!(-1e308),
        7 => Value::Array(
            (0..r.below(4))
                .map(|_| random_value(r, depth + 1))
                .collect(),
        ),
        _ => {
            let mut m = serde_json::Map::new();
            for _ in 0..r.below(4) {
                m.insert(format!("k{}", r.below(5)), random_value(r, depth + 1));
            }
            Value::Object(m)
        }
    }
}

#[test]
fn fuzzed_request_bodies_never_crash_the_server() {
    let mut s = Server::start(&["--max-tokens-limit", "8", "--max-body-bytes", "4096"]);
    let mut r = Lcg(12345);
    let keys = [
        "prompt",
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop",
        "seed",
        "stream",
        "stream_options",
        "n",
        "model",
        "max_completion_tokens",
    ];
    let valid = [
        json!({"prompt": "fn f", "max_tokens": 4}),
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
        json!({"prompt": [1, 2, 3], "max_tokens": 3, "stream": true, "stop": ["x"]}),
    ];
    for i in 0..400 {
        let path = if r.below(2) == 0 {
            "/v1/completions"
        } else {
            "/v1/chat/completions"
        };
        let body: Vec<u8> = match r.below(4) {
            // Random bytes.
            0 => (0..r.below(200)).map(|_| r.below(256) as u8).collect(),
            // A valid body, cut short or with a byte flipped.
            1 => {
                let mut b = valid[r.below(3) as usize].to_string().into_bytes();
                let k = r.below(b.len() as u64) as usize;
                if r.below(2) == 0 {
                    b.truncate(k);
                } else {
                    b[k] = r.below(256) as u8;
                }
                b
            }
            // A valid body with fields replaced by random values or removed.
            _ => {
                let mut v = valid[r.below(3) as usize].clone();
                for _ in 0..1 + r.below(3) {
                    let k = keys[r.below(keys.len() as u64) as usize];
                    if r.below(4) == 0 {
                        v.as_object_mut().unwrap().remove(k);
                    } else {
                        v[k] = random_value(&mut r, 0);
                    }
                }
                v.to_string().into_bytes()
            }
        };
        let (st, b) = http(s.port, "POST", path, &[], &body);
        assert!(
            [200, 400, 404, 413, 422, 429].contains(&st),
            "case {i}: {st} for {:?}: {b}",
            String::from_utf8_lossy(&body)
        );
        if st != 200 {
            assert_error_shape(&serde_json::from_str(&b).unwrap_or_else(|_| panic!("{b}")));
        }
        assert!(s.alive(), "case {i} killed the server");
    }
    let (st, _) = s.post("/v1/completions", &json!({"prompt": "fn", "max_tokens": 2}));
    assert_eq!(st, 200);
    assert!(!s.log.lock().unwrap().contains("panicked"));
}

#[test]
fn generate_with_lookup_prints_the_same_greedy_text() {
    let run = tiny_run();
    let gen = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mnemo"))
            .args(["--threads", "1", "generate", run.to_str().unwrap()])
            .args([
                "--prompt",
                "fn f_3_1(x: i32) -> i32 { x * 1 }\nfn f_3_2(x: i32) -> i32",
            ])
            .args(["--temperature", "0", "--max-tokens", "60"])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (plain, _) = gen(&[]);
    let (look, err) = gen(&["--lookup"]);
    assert_eq!(look, plain);
    assert!(err.contains("lookup:"), "{err}");
}

/// A request for a model this server does not serve gets OpenAI's 404 `model_not_found`; the
/// served name (the run directory's name), no `model` at all, and a `--model-alias` are served.
#[test]
fn unknown_models_are_404_model_not_found() {
    let s = Server::start(&["--model-alias", "my-alias"]);
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let body = json!({"model": "gpt-4o", "prompt": "fn f", "max_tokens": 2,
                          "messages": [{"role": "user", "content": "hi"}]});
        let (st, v) = s.post(path, &body);
        assert_eq!(st, 404, "{v}");
        assert_error_shape(&v);
        assert_eq!(v["error"]["code"], "model_not_found", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("`gpt-4o`") && msg.contains("`run`") && msg.contains("`my-alias`"),
            "{msg}"
        );
    }
    for model in [json!("run"), json!("my-alias"), Value::Null] {
        let mut body = json!({"prompt": "fn f", "max_tokens": 2});
        if !model.is_null() {
            body["model"] = model.clone();
        }
        let (st, v) = s.post("/v1/completions", &body);
        assert_eq!(st, 200, "{model}: {v}");
        assert_eq!(v["model"], "run");
    }
}
