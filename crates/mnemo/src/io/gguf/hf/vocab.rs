//! The tokenizer entries convert_hf_to_gguf.py writes for a byte-level BPE tokenizer
//! (`tokenizer.json` with a `BPE` model; its `_set_vocab_gpt2`):
//!
//! - `tokenizer.ggml.model` = `gpt2`; `tokenizer.ggml.pre`: the name convert_hf_to_gguf.py's
//!   table gives the SHA-256 of `str(tokenizer.encode(CHKTXT))` (the token ids as Python
//!   prints a list; [`chkhsh`]), or the caller's override for a tokenizer not in the table;
//! - `tokenizer.ggml.tokens` / `token_type` for ids `0..vocab_size` (config.json's): added
//!   tokens CONTROL (3) when special or looking special (`<|…|>`, `<｜…｜>`, `<pad>`, …),
//!   else USER_DEFINED (4, `▁` → space); ids no token has `[PAD{id}]`, UNUSED (5); the rest
//!   NORMAL (1);
//! - gguf-py's `SpecialVocab`: merges (pairs joined by a space, spaces inside a part written
//!   `Ġ`), special token ids (tokenizer_config.json's `{bos,eos,unk,sep,pad,cls,mask}_token`
//!   looked up among `added_tokens`, then config.json's `*_token_id`), `add_*_token` (from
//!   the post-processor: ByteLevel → no BOS/EOS, TemplateProcessing → its leading/trailing
//!   special tokens; then tokenizer_config.json's `add_*_token`), and the chat template
//!   (tokenizer_config.json's, else `chat_template.jinja` / `chat_template.json`).
//!
//! Not handled (named in the error): SentencePiece `tokenizer.model`, Llama-2-style BPE with
//! byte fallback, a list of named chat templates.

use super::meta::Kv;
use super::pre_hashes::{CHKTXT, PRE_HASHES};
use super::sha256::sha256_hex;
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

fn read_json(p: &Path) -> Result<Option<Value>> {
    if !p.is_file() {
        return Ok(None);
    }
    let t = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    Ok(Some(serde_json::from_str(&t).with_context(|| {
        format!("{} is not valid JSON", p.display())
    })?))
}

/// SHA-256 of the tokenisation of convert_hf_to_gguf.py's check text, formatted as Python's
/// `str(list)`: what its `get_vocab_base_pre` looks up.
pub fn chkhsh(tokenizer_json: &Path) -> Result<String> {
    let tok = tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| {
        anyhow::anyhow!(
            "{}: cannot load the tokenizer: {e}",
            tokenizer_json.display()
        )
    })?;
    let enc = tok.encode(CHKTXT, true).map_err(|e| {
        anyhow::anyhow!(
            "{}: cannot encode the check text: {e}",
            tokenizer_json.display()
        )
    })?;
    let ids: Vec<String> = enc.get_ids().iter().map(|i| i.to_string()).collect();
    Ok(sha256_hex(format!("[{}]", ids.join(", ")).as_bytes()))
}

/// The `tokenizer.ggml.pre` name convert_hf_to_gguf.py gives the tokenizer with this check hash.
pub fn pre_name(hash: &str) -> Option<&'static str> {
    PRE_HASHES.iter().find(|(h, _)| *h == hash).map(|(_, n)| *n)
}

fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

const SPECIAL_TYPES: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

/// Append the tokenizer entries for the directory `dir` (config.json already parsed as
/// `config`); `pre_override` names the pre-tokenizer when the check hash is not in the table.
pub fn add_gpt2_vocab(
    kv: &mut Kv,
    dir: &Path,
    config: &Value,
    pre_override: Option<&str>,
) -> Result<()> {
    let tj_path = dir.join("tokenizer.json");
    let Some(tj) = read_json(&tj_path)? else {
        if dir.join("tokenizer.model").is_file() {
            bail!(
                "{}: a SentencePiece tokenizer (tokenizer.model) is not supported; only \
                 byte-level BPE tokenizers (tokenizer.json)",
                dir.display()
            );
        }
        bail!("{}: no tokenizer.json", dir.display());
    };
    let model = &tj["model"];
    if model["type"].as_str() != Some("BPE") {
        bail!(
            "{}: tokenizer model type {} is not supported (only BPE)",
            tj_path.display(),
            model["type"]
        );
    }
    if model["byte_fallback"].as_bool() == Some(true) {
        bail!(
            "{}: a BPE tokenizer with byte fallback (Llama-2 / SentencePiece style) is not \
             supported; only byte-level BPE",
            tj_path.display()
        );
    }
    let hash = chkhsh(&tj_path)?;
    let pre = match (pre_name(&hash), pre_override) {
        (_, Some(p)) => p.to_string(),
        (Some(p), None) => p.to_string(),
        (None, None) => bail!(
            "{}: the BPE pre-tokenizer is not recognised: its check hash {hash} is not in \
             convert_hf_to_gguf.py's table (llama.cpp would refuse it too). If it is a \
             known tokenizer changed (e.g. a cut vocabulary), name llama.cpp's pre-tokenizer \
             with --tokenizer-pre (e.g. smollm, qwen2, llama-bpe, deepseek-llm)",
            tj_path.display()
        ),
    };
    // The vocabulary as AutoTokenizer sees it: the model's plus the added tokens.
    let vocab = model["vocab"]
        .as_object()
        .with_context(|| format!("{}: model.vocab is not an object", tj_path.display()))?;
    let added: Vec<Value> = tj["added_tokens"].as_array().cloned().unwrap_or_default();
    let n_vocab = match config.get("vocab_size").and_then(Value::as_u64) {
        Some(n) => n as usize,
        None => vocab.len() + added.len(),
    };
    let mut rev: Vec<Option<String>> = vec![None; n_vocab];
    let mut put = |id: u64, t: &str| -> Result<()> {
        let slot = rev.get_mut(id as usize).with_context(|| {
            format!(
                "{}: token `{t}` has id {id}, not below vocab_size {n_vocab} (config.json)",
                tj_path.display()
            )
        })?;
        *slot = Some(t.to_string());
        Ok(())
    };
    for (t, id) in vocab {
        put(id.as_u64().unwrap_or(u64::MAX), t)?;
    }
    let mut added_info: std::collections::HashMap<u64, (bool, bool)> = Default::default();
    for a in &added {
        let id = a["id"].as_u64().unwrap_or(u64::MAX);
        let t = a["content"].as_str().unwrap_or_default();
        put(id, t)?;
        added_info.insert(
            id,
            (
                a["special"].as_bool().unwrap_or(false),
                a["normalized"].as_bool().unwrap_or(false),
            ),
        );
    }
    let mut tokens = Vec::with_capacity(n_vocab);
    let mut types = Vec::with_capacity(n_vocab);
    for (i, t) in rev.into_iter().enumerate() {
        match t {
            None => {
                tokens.push(format!("[PAD{i}]"));
                types.push(5);
            }
            Some(t) => match added_info.get(&(i as u64)) {
                Some(&(special, _)) if special || looks_special(&t) => {
                    tokens.push(t);
                    types.push(3);
                }
                Some(_) => {
                    tokens.push(t.replace('\u{2581}', " "));
                    types.push(4);
                }
                None => {
                    tokens.push(t);
                    types.push(1);
                }
            },
        }
    }
    kv.str("tokenizer.ggml.model", "gpt2");
    kv.str("tokenizer.ggml.pre", &pre);
    kv.strs("tokenizer.ggml.tokens", &tokens);
    kv.i32s("tokenizer.ggml.token_type", &types);
    special_vocab(kv, dir, &tj, config, n_vocab)
}

fn merges(tj: &Value, p: &Path) -> Result<Vec<String>> {
    let Some(m) = tj["model"]["merges"].as_array() else {
        return Ok(Vec::new());
    };
    m.iter()
        .map(|e| match e {
            Value::String(s) => Ok(s.clone()),
            Value::Array(pair) if pair.len() == 2 => Ok(pair
                .iter()
                .map(|s| s.as_str().unwrap_or_default().replace(' ', "\u{120}"))
                .collect::<Vec<_>>()
                .join(" ")),
            _ => bail!("{}: unknown merges format", p.display()),
        })
        .collect()
}

/// gguf-py's `SpecialVocab(dir, load_merges=True).add_to_gguf`.
fn special_vocab(
    kv: &mut Kv,
    dir: &Path,
    tj: &Value,
    config: &Value,
    n_vocab: usize,
) -> Result<()> {
    let mg = merges(tj, &dir.join("tokenizer.json"))?;
    let mut tc: Option<Map<String, Value>> =
        read_json(&dir.join("tokenizer_config.json"))?.and_then(|v| v.as_object().cloned());
    let s = |tc: &Option<Map<String, Value>>, k: &str| -> Option<String> {
        tc.as_ref()
            .and_then(|m| m.get(k))
            .and_then(|v| {
                v.as_str()
                    .map(String::from)
                    .or_else(|| v["content"].as_str().map(String::from))
            })
            .filter(|s| !s.is_empty())
    };
    let mut types: Vec<&str> = SPECIAL_TYPES.to_vec();
    let mut add: Vec<(String, bool)> = Vec::new();
    let set_add = |add: &mut Vec<(String, bool)>, k: &str, v: bool, default: bool| match add
        .iter_mut()
        .find(|(x, _)| x == k)
    {
        Some(e) if !default => e.1 = v,
        Some(_) => {}
        None => add.push((k.to_string(), v)),
    };
    let mut bos = s(&tc, "bos_token");
    let mut cls = s(&tc, "cls_token");
    let mut eos = s(&tc, "eos_token");
    let mut sep = s(&tc, "sep_token");
    if bos.is_none() && cls.is_some() {
        if let Some(m) = tc.as_mut() {
            m.insert("bos_token".into(), cls.clone().into());
            bos = cls.clone();
        }
    }
    if eos.is_none() && sep.is_some() {
        if let Some(m) = tc.as_mut() {
            m.insert("eos_token".into(), sep.clone().into());
            eos = sep.clone();
        }
    }
    if let Some(pp) = tj.get("post_processor").filter(|v| !v.is_null()) {
        let procs = pp["processors"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| vec![pp.clone()]);
        for pr in procs {
            match pr["type"].as_str() {
                Some("ByteLevel") => {
                    set_add(&mut add, "bos", false, true);
                    set_add(&mut add, "eos", false, true);
                }
                Some("RobertaProcessing") => {
                    for k in ["bos", "eos", "sep"] {
                        set_add(&mut add, k, true, false);
                    }
                    bail!(
                        "{}: RobertaProcessing post-processor is not supported",
                        dir.display()
                    );
                }
                Some("TemplateProcessing") => {
                    let single = pr["single"].as_array().cloned().unwrap_or_default();
                    let sp = |v: &Value| v["SpecialToken"]["id"].as_str().map(String::from);
                    if single.len() > 1 {
                        if let Some(first) = single.first().and_then(sp) {
                            if let Some(m) = tc.as_mut().filter(|_| {
                                Some(&first) != bos.as_ref() && Some(&first) != cls.as_ref()
                            }) {
                                if bos.is_none() {
                                    m.insert("bos_token".into(), first.clone().into());
                                    bos = Some(first.clone());
                                }
                                if cls.is_none() {
                                    m.insert("cls_token".into(), first.clone().into());
                                    cls = Some(first.clone());
                                }
                            } else if tc.is_none() {
                                bos = Some(first.clone());
                            }
                            let is = Some(&first) == bos.as_ref() || Some(&first) == cls.as_ref();
                            set_add(&mut add, "bos", is, false);
                        }
                        if let Some(last) = single.last().and_then(sp) {
                            if tc.is_none() {
                                eos = Some(last.clone());
                            } else if let Some(m) =
                                tc.as_mut().filter(|_| Some(&last) != eos.as_ref())
                            {
                                let old = eos.clone().map(Value::from).unwrap_or(Value::Null);
                                if !types.contains(&"eot") {
                                    types.push("eot");
                                    m.insert("eot_token".into(), old);
                                } else if !types.contains(&"eom") {
                                    types.push("eom");
                                    m.insert("eom_token".into(), old);
                                }
                                m.insert("eos_token".into(), last.clone().into());
                                eos = Some(last.clone());
                            }
                            set_add(&mut add, "eos", Some(&last) == eos.as_ref(), false);
                        }
                    }
                    let pair = pr["pair"].as_array().cloned().unwrap_or_default();
                    if !pair.is_empty() {
                        let first = (single.len() > 1)
                            .then(|| single.first().and_then(sp))
                            .flatten();
                        let last = (single.len() > 1)
                            .then(|| single.last().and_then(sp))
                            .flatten();
                        let start =
                            usize::from(first.is_some() && pair.first().and_then(sp) == first);
                        let stop = pair.len()
                            - usize::from(last.is_some() && pair.last().and_then(sp) == last);
                        let mid = pair.get(start..stop.max(start)).unwrap_or_default();
                        let seq = |v: &Value| v["Sequence"]["id"].as_str().map(String::from);
                        if mid.len() > 2
                            && mid.first().and_then(seq).as_deref() == Some("A")
                            && mid.last().and_then(seq).as_deref() == Some("B")
                        {
                            let inner = &mid[1..mid.len() - 1];
                            let is_sep = |t: &Option<String>| {
                                t.is_some()
                                    && (t.as_ref() == sep.as_ref() || t.as_ref() == eos.as_ref())
                            };
                            let mut add_sep = false;
                            let e0 = inner.first().and_then(sp);
                            if is_sep(&e0) && last.is_none() {
                                add_sep = true;
                            }
                            if inner.len() == 2 && is_sep(&inner[1..].first().and_then(sp)) {
                                add_sep = true;
                            }
                            set_add(&mut add, "sep", add_sep, false);
                            if add_sep && sep.is_none() {
                                if let Some(m) = tc.as_mut() {
                                    m.insert(
                                        "sep_token".into(),
                                        eos.clone().map(Value::from).unwrap_or(Value::Null),
                                    );
                                    sep = eos.clone();
                                }
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let added = tj["added_tokens"].as_array().cloned().unwrap_or_default();
    let mut ids: Vec<(String, u32)> = Vec::new();
    let set_id = |ids: &mut Vec<(String, u32)>, typ: &str, id: Option<i64>| -> Result<()> {
        let Some(id) = id else { return Ok(()) };
        if id < 0 {
            bail!("invalid value for special token type {typ}: {id}");
        }
        if (id as usize) < n_vocab && !ids.iter().any(|(t, _)| t == typ) {
            ids.push((typ.to_string(), id as u32));
        }
        Ok(())
    };
    let mut template: Option<String> = None;
    if let Some(m) = &tc {
        let ct = match m.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Null) | None => {
                let jinja = dir.join("chat_template.jinja");
                if jinja.is_file() {
                    Some(
                        std::fs::read_to_string(&jinja)
                            .with_context(|| format!("cannot read {}", jinja.display()))?,
                    )
                } else {
                    read_json(&dir.join("chat_template.json"))?
                        .and_then(|v| v["chat_template"].as_str().map(String::from))
                }
            }
            Some(_) => bail!(
                "{}: chat_template as a list of named templates is not supported",
                dir.join("tokenizer_config.json").display()
            ),
        };
        template = ct;
        for typ in &types {
            if let Some(b) = m.get(&format!("add_{typ}_token")).and_then(Value::as_bool) {
                set_add(&mut add, typ, b, true);
            }
            let Some(content) = s(&tc, &format!("{typ}_token")) else {
                continue;
            };
            let id = added
                .iter()
                .find(|a| a["content"].as_str() == Some(content.as_str()))
                .and_then(|a| a["id"].as_i64());
            set_id(&mut ids, typ, id)?;
        }
    }
    for typ in &types {
        let id = config
            .get(format!("{typ}_token_id"))
            .or_else(|| {
                config
                    .get("text_config")
                    .and_then(|t| t.get(format!("{typ}_token_id")))
            })
            .and_then(Value::as_i64);
        set_id(&mut ids, typ, id)?;
    }
    if !mg.is_empty() {
        kv.strs("tokenizer.ggml.merges", &mg);
    }
    for (typ, id) in &ids {
        // gguf-py's writer has no handler for a CLS id: it is skipped.
        let key = match typ.as_str() {
            "cls" => continue,
            "unk" => "tokenizer.ggml.unknown_token_id".to_string(),
            "sep" => "tokenizer.ggml.seperator_token_id".to_string(),
            "pad" => "tokenizer.ggml.padding_token_id".to_string(),
            t => format!("tokenizer.ggml.{t}_token_id"),
        };
        kv.u32(&key, *id);
    }
    for (typ, v) in &add {
        if matches!(typ.as_str(), "bos" | "eos" | "sep") {
            kv.bool(&format!("tokenizer.ggml.add_{typ}_token"), *v);
        }
    }
    if let Some(t) = template {
        kv.str("tokenizer.chat_template", &t);
    }
    Ok(())
}
