//! The GGUF metadata convert_hf_to_gguf.py writes for a Hugging Face directory, key by key in
//! its order: [`Kv`] (encoded GGUF values, insertion-ordered, a second write of a key
//! replacing the value in place as gguf-py's `GGUFWriter` does); `general.*` from gguf-py's
//! `Metadata` heuristics ([`general`]: `generation_config.json` sampling keys, the model name,
//! basename, finetune, version and size label taken from `_name_or_path` in config.json and
//! from the directory's name, the size label otherwise from the parameter count); and the
//! model's hyper-parameters ([`hparams`], `TextModel.set_gguf_parameters`).
//!
//! Not read (differences from convert_hf_to_gguf.py): a model card's (README.md) YAML header
//! and `--metadata` overrides.

use anyhow::{bail, Result};
use regex::Regex;
use serde_json::Value;
use std::path::Path;

/// GGUF metadata entries `(key, type tag + value)`, in insertion order.
#[derive(Default, Clone)]
pub struct Kv(pub Vec<(String, Vec<u8>)>);

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

impl Kv {
    /// Set `key` (in place if present, else appended).
    pub fn set(&mut self, key: &str, v: Vec<u8>) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = v,
            None => self.0.push((key.to_string(), v)),
        }
    }
    pub fn remove(&mut self, key: &str) {
        self.0.retain(|(k, _)| k != key);
    }
    pub fn u32(&mut self, key: &str, v: u32) {
        let mut b = 4u32.to_le_bytes().to_vec();
        b.extend_from_slice(&v.to_le_bytes());
        self.set(key, b);
    }
    pub fn i32(&mut self, key: &str, v: i32) {
        let mut b = 5u32.to_le_bytes().to_vec();
        b.extend_from_slice(&v.to_le_bytes());
        self.set(key, b);
    }
    pub fn f32(&mut self, key: &str, v: f32) {
        let mut b = 6u32.to_le_bytes().to_vec();
        b.extend_from_slice(&v.to_le_bytes());
        self.set(key, b);
    }
    pub fn bool(&mut self, key: &str, v: bool) {
        let mut b = 7u32.to_le_bytes().to_vec();
        b.push(v as u8);
        self.set(key, b);
    }
    pub fn str(&mut self, key: &str, v: &str) {
        let mut b = 8u32.to_le_bytes().to_vec();
        put_str(&mut b, v);
        self.set(key, b);
    }
    pub fn strs(&mut self, key: &str, v: &[String]) {
        let mut b = 9u32.to_le_bytes().to_vec();
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&(v.len() as u64).to_le_bytes());
        for s in v {
            put_str(&mut b, s);
        }
        self.set(key, b);
    }
    pub fn i32s(&mut self, key: &str, v: &[i32]) {
        let mut b = 9u32.to_le_bytes().to_vec();
        b.extend_from_slice(&5u32.to_le_bytes());
        b.extend_from_slice(&(v.len() as u64).to_le_bytes());
        for x in v {
            b.extend_from_slice(&x.to_le_bytes());
        }
        self.set(key, b);
    }
    pub fn u32s(&mut self, key: &str, v: &[u32]) {
        let mut b = 9u32.to_le_bytes().to_vec();
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&(v.len() as u64).to_le_bytes());
        for x in v {
            b.extend_from_slice(&x.to_le_bytes());
        }
        self.set(key, b);
    }
}

/// Python's `str.title()`: a cased character after a cased one is lowered, others raised.
fn title(w: &str) -> String {
    let mut out = String::new();
    let mut prev_cased = false;
    for c in w.chars() {
        let cased = c.is_lowercase() || c.is_uppercase();
        if prev_cased {
            out.extend(c.to_lowercase());
        } else {
            out.extend(c.to_uppercase());
        }
        prev_cased = cased;
    }
    out
}

/// Python's `str.islower()`: at least one cased character and none upper case.
fn islower(w: &str) -> bool {
    w.chars().any(|c| c.is_lowercase()) && !w.chars().any(|c| c.is_uppercase())
}

/// gguf-py `Metadata.id_to_title`.
fn id_to_title(s: &str) -> String {
    let keep = Regex::new(r"^(v\d+(?:\.\d+)*|\d.*)$").expect("pattern");
    s.trim()
        .replace('-', " ")
        .split_whitespace()
        .map(|w| {
            if islower(w) && !keep.is_match(w) {
                title(w)
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// gguf-py `Metadata.get_model_id_components`: (full name, org, basename, finetune, version,
/// size label).
#[allow(clippy::type_complexity)]
fn id_components(
    model_id: &str,
    total_params: i64,
) -> (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
) {
    if model_id.contains(' ') {
        return (Some(model_id.into()), None, None, None, None, None);
    }
    let (mut org, full) = match model_id.split_once('/') {
        Some((o, f)) => (Some(o.to_string()), f.to_string()),
        None => (None, model_id.to_string()),
    };
    if org.as_deref().is_some_and(|o| o.starts_with('.')) {
        org = None;
    }
    let mut parts: Vec<String> = full
        .split('-')
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect();
    let version = Regex::new(r"(?i)^(v|iter)?\d+([.]\d+)*$").expect("pattern");
    let typ = Regex::new(r"(?i)^(i?q\d(_\w)*|b?fp?(16|32))$").expect("pattern");
    let size =
        Regex::new(r"(?i)^((([A]|\d+[x])?\d+([._]\d+)?[KMBT][\d]?|small|mini|medium|large|x?xl))$")
            .expect("pattern");
    let fine = Regex::new(r"(?i)^(chat|instruct|vision|lora)$").expect("pattern");
    let mut types: Vec<Vec<&str>> = vec![Vec::new(); parts.len()];
    let add = |t: &mut Vec<&'static str>, x: &'static str| {
        if !t.contains(&x) {
            t.push(x)
        }
    };
    for i in 0..parts.len() {
        let part = parts[i].clone();
        if version.is_match(&part) {
            add(&mut types[i], "version");
        } else if typ.is_match(&part) {
            add(&mut types[i], "type");
            parts[i] = part.to_uppercase();
        } else if i > 0 && size.is_match(&part) {
            let mut p: Vec<char> = part.replace('_', ".").chars().collect();
            if p.last().is_some_and(|c| c.is_ascii_digit()) {
                let n = p.len();
                let (a, b) = (p[n - 2], p[n - 1]);
                p.truncate(n - 2);
                p.extend(['.', b, a]);
            }
            let n = p.len();
            if n > 1 && p[n - 2].is_ascii_digit() && "kmbt".contains(p[n - 1]) {
                p[n - 1] = p[n - 1].to_ascii_uppercase();
            }
            if total_params != 0 {
                let num: String = p[..p.len() - 1].iter().collect();
                let last = p[p.len() - 1];
                if let Ok(x) = num.parse::<f64>() {
                    let pow = " KMBT".find(last).map(|k| k as i32).unwrap_or(-1);
                    let label = x * 1000f64.powi(pow);
                    let t = total_params as f64;
                    let off = if total_params < 0 {
                        label < (total_params.abs() / 8) as f64
                    } else {
                        (label - t).abs() > (7 * total_params / 8) as f64
                    };
                    if off {
                        add(&mut types[i], "finetune");
                        let l = p.len() - 1;
                        p[l] = p[l].to_ascii_lowercase();
                    }
                }
            }
            if types[i].is_empty() {
                add(&mut types[i], "size_label");
            }
            parts[i] = p.into_iter().collect();
        } else if i > 0 && fine.is_match(&part) {
            if total_params < 0 && part.eq_ignore_ascii_case("lora") {
                add(&mut types[i], "type");
            } else {
                add(&mut types[i], "finetune");
            }
        }
    }
    let sized_digit = parts
        .iter()
        .zip(&types)
        .any(|(n, t)| t.contains(&"size_label") && n.chars().any(|c| c.is_ascii_digit()));
    if sized_digit {
        for (n, t) in parts.iter().zip(types.iter_mut()) {
            if t.contains(&"size_label") && n.chars().all(|c| c.is_alphabetic()) {
                t.retain(|x| *x != "size_label");
            }
        }
    }
    let mut at_start = true;
    for (part, t) in parts.iter().zip(types.iter_mut()) {
        let alpha0 = part.chars().next().is_some_and(|c| c.is_alphabetic());
        if at_start && ((t.is_empty() && alpha0) || t.contains(&"version")) {
            add(t, "basename");
        } else {
            at_start = false;
            if t.is_empty() {
                add(t, "finetune");
            }
        }
    }
    for t in types.iter_mut().rev() {
        if t.contains(&"basename") && t.len() > 1 {
            t.retain(|x| *x != "basename");
        } else {
            break;
        }
    }
    let join = |f: &dyn Fn(&Vec<&str>) -> bool| {
        let mut v: Vec<String> = Vec::new();
        for (n, t) in parts.iter().zip(&types) {
            if f(t) {
                v.push(n.clone());
            }
        }
        (!v.is_empty()).then(|| v.join("-"))
    };
    let mut basename = join(&|t| t.contains(&"basename"));
    let size_label = {
        let mut v: Vec<String> = Vec::new();
        for (n, t) in parts.iter().zip(&types) {
            if t.contains(&"size_label") && !v.contains(n) {
                v.push(n.clone());
            }
        }
        (!v.is_empty()).then(|| v.join("-"))
    };
    let finetune = join(&|t| t.contains(&"finetune"));
    let version = join(&|t| t.contains(&"version") && !t.contains(&"basename"));
    if size_label.is_none() && finetune.is_none() && version.is_none() {
        basename = None;
    }
    (Some(full), org, basename, finetune, version, size_label)
}

/// gguf-py `model_weight_count_rounded_notation(n, 2)`.
fn rounded_notation(n: u64) -> String {
    let x = n as f64;
    let (s, suf) = if x > 1e12 {
        (x * 1e-12, "T")
    } else if x > 1e9 {
        (x * 1e-9, "B")
    } else if x > 1e6 {
        (x * 1e-6, "M")
    } else {
        (x * 1e-3, "K")
    };
    let r = format!("{}", s.round_ties_even() as i64);
    let fix = 2usize.saturating_sub(r.trim_start_matches('0').len());
    format!("{s:.fix$}{suf}")
}

/// The `general.*` entries (after `general.architecture`, `general.type`): sampling defaults
/// from generation_config.json, then name, version, organization, finetune, basename, size
/// label. `total_params`: the element count of every tensor written.
pub fn general(kv: &mut Kv, dir: &Path, config: &Value, total_params: u64) {
    let gen: Value = std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let f = |k: &str| gen.get(k).and_then(Value::as_f64);
    let i = |k: &str| gen.get(k).and_then(Value::as_i64);
    if let Some(s) = gen.get("sequence").and_then(Value::as_str) {
        kv.str("general.sampling.sequence", s);
    }
    if let Some(v) = i("top_k") {
        kv.i32("general.sampling.top_k", v as i32);
    }
    for (k, key) in [
        ("top_p", "top_p"),
        ("min_p", "min_p"),
        ("xtc_probability", "xtc_probability"),
        ("xtc_threshold", "xtc_threshold"),
        ("temperature", "temp"),
    ] {
        if let Some(v) = f(k) {
            kv.f32(&format!("general.sampling.{key}"), v as f32);
        }
    }
    if let Some(v) = i("penalty_last_n") {
        kv.i32("general.sampling.penalty_last_n", v as i32);
    }
    if let Some(v) = f("penalty_repeat").or_else(|| f("repetition_penalty")) {
        kv.f32("general.sampling.penalty_repeat", v as f32);
    }
    if let Some(v) = i("mirostat") {
        kv.i32("general.sampling.mirostat", v as i32);
    }
    for k in ["mirostat_tau", "mirostat_eta"] {
        if let Some(v) = f(k) {
            kv.f32(&format!("general.sampling.{k}"), v as f32);
        }
    }
    let (mut name, mut org, mut base, mut fine, mut ver, mut size) =
        (None, None, None, None, None, None);
    let mut ids: Vec<String> = Vec::new();
    if let Some(n) = config.get("_name_or_path").and_then(Value::as_str) {
        if n.matches('/').count() <= 1 {
            ids.push(n.to_string());
        }
    }
    if let Some(n) = dir.file_name().and_then(|n| n.to_str()) {
        ids.push(n.to_string());
    }
    for id in ids {
        let (n, o, b, fi, v, s) = id_components(&id, total_params as i64);
        name = name.or(n.map(|x| id_to_title(&x)));
        org = org.or(o.map(|x| id_to_title(&x)));
        base = base.or(b);
        fine = fine.or(fi);
        ver = ver.or(v);
        size = size.or(s);
    }
    let name = name.unwrap_or_else(|| {
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    if size.is_none() && total_params > 0 {
        size = Some(rounded_notation(total_params));
    }
    kv.str("general.name", &name);
    if let Some(v) = ver {
        kv.str("general.version", &v);
    }
    if let Some(v) = org {
        kv.str("general.organization", &v);
    }
    if let Some(v) = fine {
        kv.str("general.finetune", &v);
    }
    if let Some(v) = base {
        kv.str("general.basename", &v);
    }
    if let Some(v) = size {
        kv.str("general.size_label", &v);
    }
}

/// The first of `keys` present in `h`.
pub fn find<'a>(h: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().find_map(|k| h.get(*k))
}

/// `TextModel.set_gguf_parameters` for a dense model without sliding windows or experts:
/// block count, context, widths, head counts, RoPE (base, linear/YaRN scaling), norm epsilons,
/// head dims (when config.json has `head_dim`), and `general.file_type`.
pub fn hparams(kv: &mut Kv, arch: &str, h: &Value, ftype: u32, cfg: &Path) -> Result<()> {
    let p = cfg.display();
    let u = |keys: &[&str]| find(h, keys).and_then(Value::as_u64);
    let n_layer =
        u(&["n_layers", "num_hidden_layers", "n_layer", "num_layers"]).ok_or_else(|| {
            anyhow::anyhow!("{p}: `num_hidden_layers` is missing (the number of layers)")
        })?;
    kv.u32(&format!("{arch}.block_count"), n_layer as u32);
    let ctx = [
        "max_position_embeddings",
        "n_ctx",
        "n_positions",
        "max_length",
        "max_sequence_length",
        "model_max_length",
    ];
    if let Some(v) = u(&ctx) {
        kv.u32(&format!("{arch}.context_length"), v as u32);
    }
    if let Some(v) = u(&["hidden_size", "n_embd", "dim"]) {
        kv.u32(&format!("{arch}.embedding_length"), v as u32);
    }
    let ff = [
        "prefix_dense_intermediate_size",
        "dense_intermediate_size",
        "intermediate_size",
        "n_inner",
        "hidden_dim",
    ];
    if let Some(v) = u(&ff) {
        kv.u32(&format!("{arch}.feed_forward_length"), v as u32);
    }
    if let Some(v) = u(&["num_attention_heads", "n_head", "n_heads"]) {
        kv.u32(&format!("{arch}.attention.head_count"), v as u32);
    }
    if let Some(v) = u(&["num_key_value_heads", "n_kv_heads"]) {
        kv.u32(&format!("{arch}.attention.head_count_kv"), v as u32);
    }
    if h.get("is_causal") == Some(&Value::Bool(false)) {
        kv.bool(&format!("{arch}.attention.causal"), false);
    }
    let rope = rope_params(h);
    if let Some(t) = rope.get("rope_type").and_then(Value::as_str) {
        let factor = rope.get("factor").and_then(Value::as_f64);
        match (t, factor) {
            ("linear", Some(fa)) => {
                kv.str(&format!("{arch}.rope.scaling.type"), "linear");
                kv.f32(&format!("{arch}.rope.scaling.factor"), fa as f32);
            }
            ("yarn", Some(fa)) => {
                kv.str(&format!("{arch}.rope.scaling.type"), "yarn");
                kv.f32(&format!("{arch}.rope.scaling.factor"), fa as f32);
                let orig = rope
                    .get("original_max_position_embeddings")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "{p}: YaRN rope scaling without `original_max_position_embeddings`"
                        )
                    })?;
                kv.u32(
                    &format!("{arch}.rope.scaling.original_context_length"),
                    orig as u32,
                );
                let g = |k: &str| rope.get(k).and_then(Value::as_f64);
                if let Some(v) = g("extrapolation_factor") {
                    kv.f32(&format!("{arch}.rope.scaling.yarn_ext_factor"), v as f32);
                }
                if let Some(v) = g("attention_factor").or_else(|| g("attn_factor")) {
                    kv.f32(&format!("{arch}.rope.scaling.yarn_attn_factor"), v as f32);
                }
                if let Some(v) = g("beta_fast") {
                    kv.f32(&format!("{arch}.rope.scaling.yarn_beta_fast"), v as f32);
                }
                if let Some(v) = g("beta_slow") {
                    kv.f32(&format!("{arch}.rope.scaling.yarn_beta_slow"), v as f32);
                }
            }
            ("su" | "longrope", _) => kv.str(&format!("{arch}.rope.scaling.type"), "longrope"),
            (t, _) if t.eq_ignore_ascii_case("llama3") => bail!(
                "{p}: rope_type llama3 (Llama 3.1+ frequency factors, a generated \
                 `rope_freqs` tensor) is not supported yet"
            ),
            _ => {}
        }
    }
    if let Some(v) = rope.get("rope_theta").and_then(Value::as_f64) {
        kv.f32(&format!("{arch}.rope.freq_base"), v as f32);
    }
    if let Some(v) = find(h, &["rms_norm_eps", "norm_eps"]).and_then(Value::as_f64) {
        kv.f32(
            &format!("{arch}.attention.layer_norm_rms_epsilon"),
            v as f32,
        );
    }
    let ln = ["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"];
    if let Some(v) = find(h, &ln).and_then(Value::as_f64) {
        kv.f32(&format!("{arch}.attention.layer_norm_epsilon"), v as f32);
    }
    if let Some(v) = h.get("head_dim").and_then(Value::as_u64) {
        kv.u32(&format!("{arch}.attention.key_length"), v as u32);
        kv.u32(&format!("{arch}.attention.value_length"), v as u32);
    }
    kv.u32("general.file_type", ftype);
    Ok(())
}

/// `rope_parameters` (or `rope_scaling`) with the top-level `rope_theta` etc. mirrored in, as
/// `TextModel.__init__` does.
pub fn rope_params(h: &Value) -> serde_json::Map<String, Value> {
    let mut r = h
        .get("rope_parameters")
        .or_else(|| h.get("rope_scaling"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if let Some(full) = r.get("full_attention").and_then(Value::as_object) {
        return full.clone();
    }
    let theta = find(
        h,
        &[
            "global_rope_theta",
            "rope_global_theta",
            "rope_theta_global",
            "rope_theta",
            "rotary_emb_base",
        ],
    );
    if !r.contains_key("rope_theta") {
        if let Some(t) = theta {
            r.insert("rope_theta".into(), t.clone());
        }
    }
    if !r.contains_key("rope_type") {
        if let Some(t) = r.get("type").cloned() {
            r.insert("rope_type".into(), t);
        }
    }
    if !r.contains_key("original_max_position_embeddings") {
        if let Some(t) = h.get("original_max_position_embeddings") {
            r.insert("original_max_position_embeddings".into(), t.clone());
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_id_heuristics_match_gguf_py() {
        // Values from gguf-py's Metadata.get_model_id_components / id_to_title.
        let c = id_components("SmolLM2-135M-Instruct", 134_515_008);
        assert_eq!(c.2.as_deref(), Some("SmolLM2"));
        assert_eq!(c.3.as_deref(), Some("Instruct"));
        assert_eq!(c.5.as_deref(), Some("135M"));
        let c = id_components("tiny-llama-f32", 1_441_792);
        assert_eq!((c.2, c.3, c.4, c.5), (None, None, None, None));
        assert_eq!(id_to_title("tiny-llama-f32"), "Tiny Llama F32");
        assert_eq!(id_to_title("tiny-qwen3-bf16"), "Tiny Qwen3 Bf16");
        assert_eq!(id_to_title("Qwen2.5-Coder-1.5B"), "Qwen2.5 Coder 1.5B");
        assert_eq!(rounded_notation(1_441_792), "1.4M");
        assert_eq!(rounded_notation(134_515_008), "135M");
        assert_eq!(rounded_notation(999), "1.0K");
    }
}
