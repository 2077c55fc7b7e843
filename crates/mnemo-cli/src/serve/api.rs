//! The OpenAI wire format: request validation (every field type-checked by hand, so an error
//! names its field) and the error body `{"error": {"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

/// An API error: status code and the OpenAI error object.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            code: Some("invalid_value"),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Sampling and length settings common to both endpoints.
#[derive(Debug, Clone)]
pub struct Params {
    pub max_tokens: Option<u64>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
    /// Not OpenAI (vLLM's extension): keep generating past the end-of-text token.
    pub ignore_eos: bool,
    /// mnemo's extension `"mnemo": {"lookup": bool}`: lookup-first decoding for this request
    /// (`None`: the server's `--lookup` setting).
    pub lookup: Option<bool>,
}

fn type_err(param: &str, want: &str) -> ApiError {
    ApiError::invalid(param, format!("`{param}` must be {want}")).code("invalid_type")
}

fn opt<'a>(o: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    o.get(k).filter(|v| !v.is_null())
}

fn opt_f32(o: &Map<String, Value>, k: &str, lo: f64, hi: f64) -> Result<Option<f32>, ApiError> {
    match opt(o, k) {
        None => Ok(None),
        Some(v) => {
            let x = v.as_f64().ok_or_else(|| type_err(k, "a number"))?;
            if !(lo..=hi).contains(&x) {
                return Err(ApiError::invalid(
                    k,
                    format!("`{k}` must be between {lo} and {hi}, got {x}"),
                ));
            }
            Ok(Some(x as f32))
        }
    }
}

fn opt_int(o: &Map<String, Value>, k: &str) -> Result<Option<i64>, ApiError> {
    match opt(o, k) {
        None => Ok(None),
        Some(v) => match v.as_i64() {
            Some(x) => Ok(Some(x)),
            None if v.as_u64().is_some() => Ok(Some(i64::MAX)),
            None => Err(type_err(k, "an integer")),
        },
    }
}

fn opt_bool(o: &Map<String, Value>, k: &str) -> Result<Option<bool>, ApiError> {
    match opt(o, k) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| type_err(k, "a boolean")),
    }
}

/// Parse the body as a JSON object.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("the request body is not valid JSON: {e}"),
        )
        .code("invalid_json")
    })?;
    match v {
        Value::Object(o) => Ok(o),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "the request body must be a JSON object",
        )
        .code("invalid_json")),
    }
}

/// The common parameters; `max_tokens` is checked against `max_tokens_limit`.
pub fn parse_params(o: &Map<String, Value>, max_tokens_limit: u64) -> Result<Params, ApiError> {
    if let Some(m) = opt(o, "model") {
        if !m.is_string() {
            return Err(type_err("model", "a string"));
        }
    }
    let mt_key = if opt(o, "max_completion_tokens").is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_tokens = match opt_int(o, mt_key)? {
        None => None,
        Some(x) if x < 1 => {
            return Err(ApiError::invalid(
                mt_key,
                format!("`{mt_key}` must be at least 1, got {x}"),
            ))
        }
        Some(x) if x as u64 > max_tokens_limit => {
            return Err(ApiError::invalid(
                mt_key,
                format!("`{mt_key}` is {x}; this server allows at most {max_tokens_limit}"),
            ))
        }
        Some(x) => Some(x as u64),
    };
    let temperature = opt_f32(o, "temperature", 0.0, 2.0)?.unwrap_or(1.0);
    let top_p = opt_f32(o, "top_p", 0.0, 1.0)?.unwrap_or(1.0);
    if top_p <= 0.0 {
        return Err(ApiError::invalid("top_p", "`top_p` must be greater than 0"));
    }
    let top_k = match opt_int(o, "top_k")? {
        None => 0,
        Some(x) if x < 0 => return Err(ApiError::invalid("top_k", "`top_k` must be >= 0")),
        Some(x) => x as usize,
    };
    let stop = match opt(o, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            let mut v = Vec::new();
            for x in a {
                v.push(
                    x.as_str()
                        .ok_or_else(|| type_err("stop", "a string or an array of strings"))?
                        .to_string(),
                );
            }
            v
        }
        Some(_) => return Err(type_err("stop", "a string or an array of strings")),
    };
    if stop.len() > 4 {
        return Err(ApiError::invalid("stop", "at most 4 stop sequences"));
    }
    if stop.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(ApiError::invalid(
            "stop",
            "stop sequences must be 1 to 256 bytes",
        ));
    }
    let seed = match opt(o, "seed") {
        None => None,
        Some(v) => Some(
            v.as_i64()
                .map(|x| x as u64)
                .or_else(|| v.as_u64())
                .ok_or_else(|| type_err("seed", "an integer"))?,
        ),
    };
    let n = opt_int(o, "n")?.unwrap_or(1);
    if n != 1 {
        return Err(ApiError::invalid("n", "only n = 1 is supported"));
    }
    let stream = opt_bool(o, "stream")?.unwrap_or(false);
    let ignore_eos = opt_bool(o, "ignore_eos")?.unwrap_or(false);
    let include_usage = match opt(o, "stream_options") {
        None => false,
        Some(Value::Object(so)) => opt_bool(so, "include_usage")?.unwrap_or(false),
        Some(_) => return Err(type_err("stream_options", "an object")),
    };
    for k in ["frequency_penalty", "presence_penalty"] {
        opt_f32(o, k, -2.0, 2.0)?;
    }
    let lookup = match opt(o, "mnemo") {
        None => None,
        Some(Value::Object(m)) => {
            if let Some(k) = m.keys().find(|k| k.as_str() != "lookup") {
                return Err(ApiError::invalid(
                    &format!("mnemo.{k}"),
                    format!("unknown field `mnemo.{k}` (known: `lookup`)"),
                ));
            }
            match opt(m, "lookup") {
                None => None,
                Some(v) => Some(
                    v.as_bool()
                        .ok_or_else(|| type_err("mnemo.lookup", "a boolean"))?,
                ),
            }
        }
        Some(_) => return Err(type_err("mnemo", "an object such as {\"lookup\": true}")),
    };
    Ok(Params {
        max_tokens,
        temperature,
        top_p,
        top_k,
        stop,
        seed,
        stream,
        include_usage,
        ignore_eos,
        lookup,
    })
}

/// A completion prompt: text, or token ids.
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

fn token_array(a: &[Value], vocab: usize) -> Option<Vec<u32>> {
    a.iter()
        .map(|x| {
            x.as_u64()
                .filter(|&t| (t as usize) < vocab)
                .map(|t| t as u32)
        })
        .collect()
}

/// `prompt`: a string, an array of one string, an array of token ids, or an array of one
/// array of token ids (ids must be `< vocab`).
pub fn parse_prompt(o: &Map<String, Value>, vocab: usize) -> Result<Prompt, ApiError> {
    let bad = || {
        type_err(
            "prompt",
            "a string, an array of one string, or an array of token ids",
        )
    };
    match opt(o, "prompt") {
        None => Err(ApiError::invalid("prompt", "`prompt` is required").code("missing_field")),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(a)) => match a.as_slice() {
            [Value::String(s)] => Ok(Prompt::Text(s.clone())),
            [Value::Array(inner)] => token_array(inner, vocab)
                .map(Prompt::Tokens)
                .ok_or_else(bad),
            [] => Err(ApiError::invalid("prompt", "`prompt` is empty")),
            xs if xs.iter().all(|x| x.is_number()) => {
                token_array(xs, vocab).map(Prompt::Tokens).ok_or_else(bad)
            }
            xs if xs.iter().all(|x| x.is_string()) => Err(ApiError::invalid(
                "prompt",
                "only one prompt per request is supported",
            )),
            _ => Err(bad()),
        },
        Some(_) => Err(bad()),
    }
}

/// `messages`: `[{role, content}]` where content is a string, null, or an array of text parts.
pub fn parse_messages(o: &Map<String, Value>) -> Result<Vec<mnemo::chat::Message>, ApiError> {
    let arr = match opt(o, "messages") {
        None => {
            return Err(
                ApiError::invalid("messages", "`messages` is required").code("missing_field")
            )
        }
        Some(Value::Array(a)) => a,
        Some(_) => return Err(type_err("messages", "an array of messages")),
    };
    if arr.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` is empty"));
    }
    let mut out = Vec::new();
    for (i, m) in arr.iter().enumerate() {
        let p = format!("messages[{i}]");
        let m = m.as_object().ok_or_else(|| type_err(&p, "an object"))?;
        let role = m
            .get("role")
            .and_then(|r| r.as_str())
            .ok_or_else(|| type_err(&format!("{p}.role"), "a string"))?;
        if !["system", "user", "assistant", "developer", "tool"].contains(&role) {
            return Err(ApiError::invalid(
                &format!("{p}.role"),
                format!("unknown role `{role}`"),
            ));
        }
        let content = match m.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for part in parts {
                    let t = part
                        .get("text")
                        .and_then(|t| t.as_str())
                        .filter(|_| part.get("type").and_then(|t| t.as_str()) == Some("text"))
                        .ok_or_else(|| {
                            type_err(&format!("{p}.content"), "a string or text parts")
                        })?;
                    s.push_str(t);
                }
                s
            }
            Some(_) => return Err(type_err(&format!("{p}.content"), "a string")),
        };
        let role = if role == "developer" { "system" } else { role };
        out.push(mnemo::chat::Message::new(role, &content));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(s: &str) -> Map<String, Value> {
        parse_object(s.as_bytes()).unwrap()
    }

    #[test]
    fn params_are_type_checked_and_name_the_field() {
        let e = parse_params(&obj(r#"{"max_tokens":"x"}"#), 100).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        for bad in [
            r#"{"max_tokens":-1}"#,
            r#"{"max_tokens":0}"#,
            r#"{"max_tokens":1e300}"#,
            r#"{"max_tokens":99999999999999999999999}"#,
            r#"{"max_tokens":101}"#,
            r#"{"temperature":"hot"}"#,
            r#"{"temperature":3}"#,
            r#"{"top_p":0}"#,
            r#"{"stop":5}"#,
            r#"{"stop":["a","b","c","d","e"]}"#,
            r#"{"seed":1.5}"#,
            r#"{"n":2}"#,
            r#"{"stream":"yes"}"#,
            r#"{"model":3}"#,
            r#"{"mnemo":true}"#,
            r#"{"mnemo":{"lookup":1}}"#,
            r#"{"mnemo":{"lokup":true}}"#,
        ] {
            assert!(parse_params(&obj(bad), 100).is_err(), "{bad}");
        }
        let p = parse_params(
            &obj(r#"{"max_tokens":5,"temperature":0,"stop":"\n","seed":-3,"stream":true}"#),
            100,
        )
        .unwrap();
        assert_eq!(p.max_tokens, Some(5));
        assert_eq!(p.stop, vec!["\n".to_string()]);
        assert!(p.stream);
        assert_eq!(p.lookup, None);
        let p = parse_params(&obj(r#"{"mnemo":{"lookup":false}}"#), 100).unwrap();
        assert_eq!(p.lookup, Some(false));
        let e = parse_params(&obj(r#"{"mnemo":{"lokup":true}}"#), 100).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("mnemo.lokup"));
        assert!(parse_object(b"[1]").is_err());
        assert!(parse_object(b"{\"a\":\"\xff\"}").is_err());
    }

    #[test]
    fn prompts_and_messages() {
        assert!(matches!(
            parse_prompt(&obj(r#"{"prompt":[1,2,3]}"#), 10).unwrap(),
            Prompt::Tokens(t) if t == vec![1, 2, 3]
        ));
        assert!(parse_prompt(&obj(r#"{"prompt":[1,2,30]}"#), 10).is_err());
        assert!(parse_prompt(&obj(r#"{"prompt":{}}"#), 10).is_err());
        assert!(parse_prompt(&obj(r#"{}"#), 10).is_err());
        let m = parse_messages(&obj(
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#,
        ))
        .unwrap();
        assert_eq!(m[0].content, "hi");
        assert!(parse_messages(&obj(r#"{"messages":[{"role":"x","content":"a"}]}"#)).is_err());
        assert!(parse_messages(&obj(r#"{"messages":[]}"#)).is_err());
    }
}
