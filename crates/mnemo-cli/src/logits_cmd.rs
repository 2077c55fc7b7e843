//! `mnemo logits`: the logits of every position of a given token-id sequence, written as one
//! f32 tensor `logits` `[T, V]` to a safetensors file, for comparing mnemo with other
//! implementations (transformers, llama.cpp) or one decoding path with another.
//!
//! Without `--decode-from`, one full forward (`Model::try_forward`, the training driver).
//! With `--decode-from N`, the cached driver: the first `N` ids prefilled on an empty cache
//! with every row's logits kept (`batch::forward_all`), then each further id decoded alone
//! (`Model::forward_cached`).

use anyhow::{bail, Context, Result};
use clap::Args;
use mnemo::model::Model;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The long `--help` text of `mnemo logits`.
pub const LONG_ABOUT: &str =
    "Write the logits of every position of a given token-id sequence to a \
    safetensors file: one f32 tensor `logits` of shape [T, V], row t holding the logits that \
    predict the id after ids[t].\n\n\
    MODEL is anything mnemo loads: a run directory, a checkpoint directory, a Hugging Face \
    Llama directory, a DeepSeek-V4 directory (`model_type: deepseek_v4`; transformers' layout \
    or the official one, FP8/FP4 weights dequantised, sharded or not), a Llama-architecture \
    `.gguf` file, a DeepSeek-V2 one (llama.cpp's `deepseek2`: V2, V2-Lite, Coder-V2-Lite) or \
    a DeepSeek-V4 one (llama.cpp's `deepseek4`); a Llama-family or DeepSeek-V2 GGUF beyond \
    4 GiB of f32 parameters keeps its quantised matrices packed, and only --decode-from runs \
    it. No text is tokenized: the ids are given, and no tokenizer file is needed \
    (an Engram model's aside).\n\n\
    Without --decode-from, the logits come from one full forward over all T ids. With \
    --decode-from N, they come from the cached decoding path: ids[..N] are prefilled on an \
    empty KV cache (every row's logits kept), then ids[N..] are decoded one token at a time, \
    each decoding step giving its position's logits. The two agree to float rounding on f32 \
    models (a DeepSeek-V4 indexer's exactly tied scores aside: each path breaks such ties as \
    transformers' own full forward and one-token decoding do). A quantised GGUF runs the cached path (every row's logits wanted) on its quantised \
    weights and the full forward on the dequantised f32 ones, so there they differ by the \
    quantisation error. With --keep-packed, an official DeepSeek-V4 directory's cached path \
    (prefill and decoding) multiplies from its FP8/FP4 codes, memory-mapped, with no \
    dequantised copy (the same weight values as the dequantised ones).\n\n\
    --numerics picks the arithmetic of a DeepSeek-V4 model. `exact` (the default, and what \
    every other command uses: generate, eval, serve, ask) is transformers' f32 arithmetic on \
    the (dequantised) weights. `ggml` (DeepSeek-V4 `.gguf` only) reproduces llama.cpp's: the \
    inputs of its quantised products rounded as ggml converts them for the stored type. \
    `official` (any DeepSeek-V4 model whose widths are whole blocks: hidden, q_lora_rank, \
    o_groups·o_lora_rank, moe_intermediate_size multiples of 128, head_dim − rope a multiple \
    of 64, index_head_dim a power of 2) reproduces DeepSeek's own inference code \
    (inference/model.py), which the model was trained to expect: FP8 round trips of the \
    K = V rows and compressed entries (blocks of 64, the rope channels exact), the indexer's \
    queries and keys Hadamard-rotated and FP4-rounded (blocks of 32), FP8 inputs (blocks of \
    128) to every product whose official weight is FP8 or FP4, routed experts weighted before \
    w2. On the tiny test models it moves the logits by ~7% per position against `exact`.\n\n\
    The output is written to a temporary file beside OUT and renamed into place, so OUT is \
    either the old file or the complete new one. A one-line summary goes to stderr.\n\n\
    Example:\n  echo '[1, 15, 27, 3]' > ids.json\n  \
    mnemo logits runs/tiny --ids-file ids.json --out logits.safetensors --decode-from 2";

#[derive(Args)]
pub struct LogitsArgs {
    /// Run directory, checkpoint directory, Hugging Face Llama or DeepSeek-V4 directory
    /// (transformers or official layout), or a `.gguf` model file.
    model: PathBuf,
    /// JSON file of the token ids: an array `[1, 2, 3]` or an object `{"input_ids": [1, 2, 3]}`.
    #[arg(long, value_name = "IDS.json")]
    ids_file: PathBuf,
    /// Output safetensors file (tensor `logits`, f32, [T, V]); replaced atomically.
    #[arg(long, value_name = "OUT.safetensors")]
    out: PathBuf,
    /// Use the cached decoding path: prefill the first N ids (1 ≤ N ≤ T), then decode the rest
    /// one token at a time. Default: one full forward.
    #[arg(long, value_name = "N")]
    decode_from: Option<usize>,
    /// Official DeepSeek-V4 directory (FP8/FP4 weights) only: keep those weights packed and
    /// run the cached path on them (prefill and decoding on the FP8/FP4 kernels, codes
    /// memory-mapped, no dequantised copy); needs --decode-from (the full forward needs f32
    /// weights).
    #[arg(long, requires = "decode_from")]
    keep_packed: bool,
    /// `exact` (default; generate, eval, serve and ask always use it): f32 products on the
    /// dequantised weights, as transformers computes. `ggml`: a DeepSeek-V4 `.gguf` only: round
    /// the products' inputs as llama.cpp's CPU products do for their stored type (Q8_0 for
    /// MXFP4 and the 32-value blocks, Q8_K for k-quants), which is what moves llama.cpp's
    /// logits away from transformers' (~1% per position). `official`: any DeepSeek-V4 model
    /// with whole blocks: DeepSeek's inference/model.py arithmetic (FP8 round trip of the KV
    /// and compressed entries, Hadamard + FP4 indexer, FP8 inputs to the FP8/FP4 products,
    /// route weight before w2; see the long help).
    #[arg(long, value_name = "exact|ggml|official", default_value = "exact", value_parser = ["exact", "ggml", "official"])]
    numerics: String,
}

/// `mnemo logits`: see [`LogitsArgs`].
pub fn run(a: LogitsArgs) -> Result<()> {
    let ids = read_ids(&a.ids_file)?;
    let t = ids.len();
    if let Some(n) = a.decode_from {
        if n == 0 || n > t {
            bail!(
                "--decode-from {n} is out of range: it must be between 1 and the number of ids, \
                 {t} (in {})",
                a.ids_file.display()
            );
        }
    }
    let out = TempOut::create(&a.out)?;
    let t0 = Instant::now();
    let (mut model, kind) = if a.keep_packed {
        if a.decode_from.is_none() {
            bail!(
                "--keep-packed runs the model through its cache (prefill and decoding) on the \
                 packed weights, which have no f32 copy: give --decode-from N too"
            );
        }
        if !mnemo::io::v4_official::is_official_dir(&a.model) {
            bail!(
                "--keep-packed: {} is not an official DeepSeek-V4 directory (FP8/FP4 weights \
                 under the release's names); other models have nothing to keep packed",
                a.model.display()
            );
        }
        let m = mnemo::io::v4_packed::load_dir_packed(&a.model)?;
        eprintln!("logits: {} FP8/FP4 matrices kept packed", m.quant.len());
        (m, "DeepSeek-V4 (official directory, packed)")
    } else {
        load(&a.model)?
    };
    match a.numerics.as_str() {
        "ggml" => {
            for note in mnemo::io::gguf::deepseek4::use_ggml_numerics(&a.model, &mut model)? {
                eprintln!("logits: {note}");
            }
        }
        "official" => model
            .use_official_numerics()
            .with_context(|| format!("{}", a.model.display()))?,
        _ => {}
    }
    let load_s = t0.elapsed().as_secs_f64();
    let (v, max_len) = (model.cfg.vocab_size, model.cfg.max_seq_len);
    if let Some((pos, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
        bail!(
            "{}: id {id} (position {pos}) is outside the vocabulary of {}: its vocab_size is \
             {v}, so ids must be below {v}",
            a.ids_file.display(),
            a.model.display()
        );
    }
    if t > max_len {
        bail!(
            "{}: {t} ids exceed the maximum context of {} ({max_len} tokens, max_seq_len)",
            a.ids_file.display(),
            a.model.display()
        );
    }
    let t1 = Instant::now();
    let logits = match a.decode_from {
        None => {
            let mut ws = mnemo::model::Workspace::default();
            model
                .try_forward(&ids, 1, t, &mut ws)
                .context("the full forward")?;
            std::mem::take(&mut ws.logits)
        }
        Some(n) => decode_logits(&model, &ids, n)?,
    };
    let fwd_s = t1.elapsed().as_secs_f64();
    if logits.len() != t * v {
        bail!(
            "internal error: {} logits for T = {t}, V = {v}",
            logits.len()
        );
    }
    let mode = match a.decode_from {
        None => "full forward".to_string(),
        Some(n) => format!(
            "prefill {n} + decode {}{}",
            t - n,
            if a.keep_packed {
                ", packed FP8/FP4"
            } else {
                ""
            }
        ),
    };
    let mut meta = HashMap::new();
    meta.insert("generator".to_string(), "mnemo logits".to_string());
    meta.insert("model".to_string(), a.model.display().to_string());
    meta.insert("model_kind".to_string(), kind.to_string());
    meta.insert("mode".to_string(), mode.clone());
    meta.insert("numerics".to_string(), a.numerics.clone());
    let bytes =
        mnemo::safetensors_io::serialize(&[("logits".to_string(), vec![t, v], &logits)], meta)
            .context("cannot serialise the logits")?;
    out.finish(&bytes)?;
    eprintln!(
        "logits: T = {t}, V = {v}, {kind}, {mode}: load {load_s:.2} s, forward {fwd_s:.2} s → {}",
        a.out.display()
    );
    Ok(())
}

/// The model at `path` and a name for its kind, by `checkpoint::load_model`: no tokenizer is
/// needed (run directories, Hugging Face and DeepSeek-V4 directories without tokenizer files).
fn load(path: &Path) -> Result<(Model, &'static str)> {
    let kind = if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        "GGUF"
    } else if path.is_dir() && mnemo::io::v4_official::is_official_dir(path) {
        "DeepSeek-V4 (official directory)"
    } else if path.is_dir() && mnemo::hf_v4::is_v4_dir(path) {
        "DeepSeek-V4 (transformers directory)"
    } else if path.is_dir() && mnemo::hf::is_hf_dir(path) {
        "Hugging Face Llama directory"
    } else {
        "mnemo checkpoint"
    };
    let l = mnemo::checkpoint::load_model(path)
        .with_context(|| format!("cannot load the model {}", path.display()))?;
    Ok((l.model, kind))
}

/// The logits of every position through the cached driver: `ids[..n]` prefilled on an empty
/// cache (all rows' logits), then `ids[n..]` one token at a time.
fn decode_logits(model: &Model, ids: &[u32], n: usize) -> Result<Vec<f32>> {
    let mut cache = mnemo::generate::KvCache::new(model);
    let mut logits = Vec::with_capacity(ids.len() * model.cfg.vocab_size);
    logits.extend(
        mnemo::batch::forward_all(model, &ids[..n], &mut cache)
            .with_context(|| format!("the cached prefill of the first {n} ids (--decode-from)"))?,
    );
    for (pos, &id) in ids.iter().enumerate().skip(n) {
        logits.extend(
            model
                .forward_cached(&[id], &mut cache)
                .with_context(|| format!("decoding position {pos}"))?,
        );
    }
    Ok(logits)
}

/// The token ids of `path`: a JSON array of non-negative integers, or an object with one in
/// `input_ids`.
fn read_ids(path: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the ids file {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let arr = match &v {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Object(o) => match o.get("input_ids") {
            Some(serde_json::Value::Array(a)) => a,
            Some(other) => bail!(
                "{}: `input_ids` must be an array of token ids, not {}",
                path.display(),
                short(other)
            ),
            None => bail!(
                "{}: the object has no `input_ids` (expected [1, 2, 3] or {{\"input_ids\": [1, 2, 3]}})",
                path.display()
            ),
        },
        other => bail!(
            "{}: expected an array of token ids or {{\"input_ids\": [...]}}, not {}",
            path.display(),
            short(other)
        ),
    };
    if arr.is_empty() {
        bail!("{} holds no token ids", path.display());
    }
    arr.iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_u64()
                .and_then(|u| u32::try_from(u).ok())
                .with_context(|| {
                    format!(
                        "{}: element {i} is {}, not a token id (a non-negative integer)",
                        path.display(),
                        short(x)
                    )
                })
        })
        .collect()
}

/// A JSON value for an error message, cut to a readable length.
fn short(v: &serde_json::Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// The output file being written: a temporary file beside it (created up front, so an
/// unwritable destination fails before the model runs), renamed into place by
/// [`TempOut::finish`], removed if dropped before.
struct TempOut {
    tmp: PathBuf,
    dst: PathBuf,
    file: Option<std::fs::File>,
}

impl TempOut {
    fn create(dst: &Path) -> Result<Self> {
        if dst.is_dir() {
            bail!("--out {} is a directory", dst.display());
        }
        let name = dst
            .file_name()
            .with_context(|| format!("--out {} names no file", dst.display()))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = dst.with_file_name(tmp_name);
        let file = std::fs::File::create(&tmp).with_context(|| {
            format!(
                "cannot create the temporary file {} for --out {}",
                tmp.display(),
                dst.display()
            )
        })?;
        Ok(TempOut {
            tmp,
            dst: dst.to_path_buf(),
            file: Some(file),
        })
    }

    fn finish(mut self, bytes: &[u8]) -> Result<()> {
        let mut f = self.file.take().expect("finish runs once");
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("cannot write {}", self.tmp.display()))?;
        drop(f);
        std::fs::rename(&self.tmp, &self.dst).with_context(|| {
            format!(
                "cannot move {} into place as {}",
                self.tmp.display(),
                self.dst.display()
            )
        })?;
        self.file = None;
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempOut {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            std::fs::remove_file(&self.tmp).ok();
        }
    }
}
