//! The `mnemo serve` test harness, shared by the tests that talk to a server: a tiny trained
//! run, the server on an ephemeral port, and a hand-written HTTP/1.1 client over `TcpStream`.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// A tiny trained run (3 steps, 1 layer, d = 32, context 512), made once per test binary.
pub fn tiny_run() -> PathBuf {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let d = super::tmpdir("run");
        let data = d.join("data");
        std::fs::create_dir_all(&data).unwrap();
        for i in 0..10 {
            let body: String = (0..40)
                .map(|j| format!("fn f_{i}_{j}(x: i32) -> i32 {{ x * {j} }}\n"))
                .collect();
            std::fs::write(data.join(format!("m{i}.rs")), body).unwrap();
        }
        let run = d.join("run");
        let out = Command::new(env!("CARGO_BIN_EXE_mnemo"))
            .args(["--threads", "1", "train", "--data", data.to_str().unwrap()])
            .args(["--out", run.to_str().unwrap(), "--steps", "3", "--quiet"])
            .args(["--set", "vocab_size=300", "--set", "d_model=32"])
            .args([
                "--set",
                "n_layers=1",
                "--set",
                "head_dim=8",
                "--set",
                "rope_dim=8",
            ])
            .args(["--set", "ffn_hidden=32", "--set", "max_seq_len=512"])
            .args(["--batch-size", "2", "--seq-len", "16"])
            .env("MNEMO_CACHE", d.join("cache"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        run
    })
    .clone()
}

pub struct Server {
    pub child: Child,
    pub port: u16,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    /// The server of [`tiny_run`], with `extra` flags.
    pub fn start(extra: &[&str]) -> Server {
        Server::start_model(&tiny_run(), extra)
    }

    /// The server of `model` (a run directory or a `.gguf` file), with `extra` flags.
    pub fn start_model(model: &Path, extra: &[&str]) -> Server {
        let run = model;
        let mut child = Command::new(env!("CARGO_BIN_EXE_mnemo"))
            .args([
                "--threads",
                "1",
                "serve",
                run.to_str().unwrap(),
                "--port",
                "0",
            ])
            .args(extra)
            .env_remove("MNEMO_API_KEY")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening on http://127.0.0.1:").nth(1) {
                    let _ = tx.send(rest.trim().parse::<u16>().unwrap());
                }
                log2.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server did not start");
        Server { child, port, log }
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (s, b) = http(self.port, "POST", path, &[], body.to_string().as_bytes());
        (
            s,
            serde_json::from_str(&b).unwrap_or_else(|_| panic!("not JSON ({s}): {b}")),
        )
    }

    /// `GET path`: status and body.
    pub fn get(&self, path: &str) -> (u16, String) {
        http(self.port, "GET", path, &[], b"")
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn stats(&self) -> Value {
        let (s, b) = http(self.port, "GET", "/v1/stats", &[], b"");
        assert_eq!(s, 200);
        serde_json::from_str(&b).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

pub fn write_request(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    hdrs: &[(&str, &str)],
    body: &[u8],
) {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in hdrs {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
}

pub fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(p) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(std::str::from_utf8(&b[..p]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[p + 2..p + 2 + n]);
        b = &b[p + 2 + n + 2..];
    }
    out
}

/// One request on a fresh connection: status and body (de-chunked).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    hdrs: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut s = connect(port);
    write_request(&mut s, method, path, hdrs, body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> (u16, String) {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = &raw[split + 4..];
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_vec()
    };
    (status, String::from_utf8(body).unwrap())
}

/// The text of a completion's first choice.
pub fn completion_text(v: &Value) -> String {
    v["choices"][0]["text"].as_str().unwrap().to_string()
}
