//! GGUF model files (llama.cpp's format): metadata, tensors, dequantisation, and a
//! Llama-architecture model plus its GPT-2-style byte-level BPE tokenizer built from them.
//!
//! Layout (v2/v3, little-endian): `"GGUF"`, version `u32`, tensor count `u64`, metadata count
//! `u64`; metadata `(key: string, type: u32, value)`; tensor infos `(name, n_dims: u32,
//! dims: u64 × n_dims, ggml type: u32, offset: u64)`; then tensor data from the next multiple
//! of `general.alignment` (32). `dims[0]` is the fastest-varying, so a linear weight of GGUF
//! shape `[in, out]` is our row-major `[out, in]`.
//!
//! Quantised blocks of 32 values: `Q8_0` is an f16 scale and 32 `i8` (`x = d·q`); `Q4_0` an
//! f16 scale and 16 bytes (`x = d·(q − 8)`); `Q4_1` an f16 scale, an f16 minimum and 16 bytes
//! (`x = d·q + m`). In the 4-bit types the low nibbles hold elements 0..16, the high 16..32.
//! Those three, and the k-quants `Q2_K`, `Q4_K`, `Q5_K` and `Q6_K` (the bulk of the
//! `Q2_K`/`Q4_K_M`/`Q5_K_M` mixes; multiplied by [`crate::kernels::kdot`]), are kept quantised for decoding ([`QMatrix`]; a fused weight
//! such as q/k/v only when all its parts share one type), beside the f32 copy that prefill
//! uses. The other types of llama.cpp's quantisation mixes (`Q5_0`, `Q5_1`, `Q3_K`,
//! `Q8_K`, `IQ4_NL`, `BF16`; layouts in [`crate::kernels::kquant`]) are only
//! dequantised to f32 on load.
//!
//! Llama GGUFs store q/k with rows permuted so that RoPE pairs adjacent dims (llama.cpp's
//! "normal" RoPE), i.e. mnemo's `interleaved` layout.

use crate::kernels::f16::f16_to_f32;
use crate::kernels::kquant;
use crate::kernels::quant::{QMatrix, QType};
use crate::model::{Ffn, Model};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;

pub mod arch;
mod pretok;

/// A metadata value.
#[derive(Clone, Debug)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Int(i) if *i >= 0 => Some(*i as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's description.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` fastest.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
}

/// A parsed (memory-mapped) GGUF file.
pub struct Gguf {
    path: std::path::PathBuf,
    mmap: memmap2::Mmap,
    pub meta: HashMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
    /// Each metadata key with the byte range of its encoded `(type: u32, value)` in the file,
    /// in file order: what [`quantize`] copies verbatim into the files it writes.
    meta_raw: Vec<(String, std::ops::Range<usize>)>,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.pos + n > self.b.len() {
            bail!(
                "{}: truncated GGUF file (needed {n} bytes at offset {})",
                self.path.display(),
                self.pos
            );
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        let i = |b: &[u8]| -> i64 {
            match b.len() {
                1 => b[0] as i64,
                2 => u16::from_le_bytes([b[0], b[1]]) as i64,
                4 => u32::from_le_bytes(b.try_into().expect("4")) as i64,
                _ => u64::from_le_bytes(b.try_into().expect("8")) as i64,
            }
        };
        Ok(match ty {
            0 | 2 | 4 | 10 => {
                Value::Int(i(self.take([1, 0, 2, 0, 4, 0, 0, 0, 0, 0, 8][ty as usize])?))
            }
            1 => Value::Int(self.take(1)?[0] as i8 as i64),
            3 => Value::Int(i16::from_le_bytes(self.take(2)?.try_into().expect("2")) as i64),
            5 => Value::Int(i32::from_le_bytes(self.take(4)?.try_into().expect("4")) as i64),
            11 => Value::Int(i64::from_le_bytes(self.take(8)?.try_into().expect("8"))),
            6 => Value::Float(f32::from_le_bytes(self.take(4)?.try_into().expect("4")) as f64),
            12 => Value::Float(f64::from_le_bytes(self.take(8)?.try_into().expect("8"))),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    bail!("{}: nested metadata arrays too deep", self.path.display());
                }
                let et = self.u32()?;
                let n = self.u64()? as usize;
                if n > self.b.len() {
                    bail!(
                        "{}: metadata array of {n} elements is longer than the file",
                        self.path.display()
                    );
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(et, depth + 1)?);
                }
                Value::Array(v)
            }
            t => bail!("{}: unknown metadata value type {t}", self.path.display()),
        })
    }
}

const F32: u32 = 0;
const F16: u32 = 1;
const Q4_0: u32 = 2;
const Q4_1: u32 = 3;
const Q8_0: u32 = 8;

/// Names of ggml types that no reader here handles (for error messages).
const OTHER_TYPES: &[(u32, &str)] = &[
    (9, "Q8_1"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
];

fn type_name(t: u32) -> String {
    match t {
        F32 => "F32".into(),
        F16 => "F16".into(),
        Q4_0 => "Q4_0".into(),
        Q4_1 => "Q4_1".into(),
        Q8_0 => "Q8_0".into(),
        other => match kquant::format(other) {
            Some(f) => f.name.into(),
            None => match OTHER_TYPES.iter().find(|(t, _)| *t == other) {
                Some((_, name)) => format!("{name} (ggml type {other})"),
                None => format!("ggml type {other}"),
            },
        },
    }
}

/// The tensor types this reader handles, for error messages.
fn supported_types() -> String {
    let mut names = vec!["F32", "F16", "Q4_0", "Q4_1", "Q8_0"];
    names.extend(kquant::FORMATS.iter().map(|f| f.name));
    names.join(", ")
}

/// Bytes of `n` elements of a supported type (`None` for other types, and for a number of
/// elements that is not a whole number of a k-quant type's blocks).
fn byte_len(t: u32, n: usize) -> Option<usize> {
    Some(match t {
        F32 => 4 * n,
        F16 => 2 * n,
        Q4_0 => n / 32 * 18,
        Q4_1 => n / 32 * 20,
        Q8_0 => n / 32 * 34,
        other => return kquant::format(other)?.byte_len(n),
    })
}

/// Dequantise `n` elements of type `t` from `b` into `out`.
pub fn dequantize(t: u32, b: &[u8], out: &mut [f32]) -> Result<()> {
    match t {
        F32 => {
            for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                *o = f32::from_le_bytes(c.try_into().expect("4"));
            }
        }
        F16 => {
            for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                *o = f16_to_f32(c);
            }
        }
        Q8_0 => {
            for (o, blk) in out.chunks_exact_mut(32).zip(b.chunks_exact(34)) {
                let d = f16_to_f32(&blk[..2]);
                for (x, &q) in o.iter_mut().zip(&blk[2..]) {
                    *x = d * (q as i8) as f32;
                }
            }
        }
        Q4_0 | Q4_1 => {
            let bs = if t == Q4_0 { 18 } else { 20 };
            for (o, blk) in out.chunks_exact_mut(32).zip(b.chunks_exact(bs)) {
                let d = f16_to_f32(&blk[..2]);
                let (m, qs) = if t == Q4_0 {
                    (-8.0 * d, &blk[2..18])
                } else {
                    (f16_to_f32(&blk[2..4]), &blk[4..20])
                };
                for j in 0..16 {
                    o[j] = d * (qs[j] & 0x0f) as f32 + m;
                    o[j + 16] = d * (qs[j] >> 4) as f32 + m;
                }
            }
        }
        other => match kquant::format(other) {
            Some(f) => {
                if f.byte_len(out.len()) != Some(b.len()) {
                    bail!(
                        "{} data of {} bytes does not hold {} values",
                        f.name,
                        b.len(),
                        out.len()
                    );
                }
                f.dequantize(b, out);
            }
            None => bail!(
                "unsupported tensor type {} (supported: {})",
                type_name(other),
                supported_types()
            ),
        },
    }
    Ok(())
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Gguf> {
        let f =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: read-only mapping of a model file that mnemo never writes.
        let mmap = unsafe { memmap2::Mmap::map(&f) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        let mut r = Reader {
            b: &mmap,
            pos: 0,
            path,
        };
        if r.take(4)? != b"GGUF" {
            bail!("{} is not a GGUF file (bad magic)", path.display());
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            bail!(
                "{}: GGUF version {version} is not supported (2 and 3 are)",
                path.display()
            );
        }
        let n_tensors = r.u64()? as usize;
        let n_kv = r.u64()? as usize;
        let mut meta = HashMap::new();
        let mut meta_raw = Vec::with_capacity(n_kv.min(1 << 16));
        for _ in 0..n_kv {
            let k = r.string()?;
            let start = r.pos;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            meta_raw.push((k.clone(), start..r.pos));
            meta.insert(k, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(1 << 20));
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()? as usize;
            if nd > 4 {
                bail!("{}: tensor `{name}` has {nd} dimensions", path.display());
            }
            let dims = (0..nd).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let align = meta
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32) as usize;
        let data_start = r.pos.div_ceil(align) * align;
        let g = Gguf {
            path: path.to_path_buf(),
            mmap,
            meta,
            tensors,
            data_start,
            meta_raw,
        };
        for t in &g.tensors {
            g.tensor_bytes(t)?;
        }
        Ok(g)
    }

    fn tensor_bytes(&self, t: &TensorInfo) -> Result<&[u8]> {
        let n: u64 = t.dims.iter().product();
        if let Some(f) = kquant::format(t.ggml_type) {
            let row = t.dims.first().copied().unwrap_or(1) as usize;
            if !row.is_multiple_of(f.block_elems) {
                bail!(
                    "{}: tensor `{}` of type {} has rows of {row} values, not a whole number of \
                     its {}-value blocks",
                    self.path.display(),
                    t.name,
                    f.name,
                    f.block_elems
                );
            }
        }
        let len = byte_len(t.ggml_type, n as usize).with_context(|| {
            format!(
                "{}: tensor `{}` has unsupported type {} (supported: {})",
                self.path.display(),
                t.name,
                type_name(t.ggml_type),
                supported_types()
            )
        })?;
        let start = self.data_start + t.offset as usize;
        if start + len > self.mmap.len() {
            bail!(
                "{}: tensor `{}` is truncated (file too short)",
                self.path.display(),
                t.name
            );
        }
        Ok(&self.mmap[start..start + len])
    }

    /// A tensor's stored bytes, as in the file.
    pub fn tensor_data(&self, name: &str) -> Result<&[u8]> {
        let t = self
            .tensors
            .iter()
            .find(|t| t.name == name)
            .with_context(|| format!("{}: tensor `{name}` is missing", self.path.display()))?;
        self.tensor_bytes(t)
    }

    /// A tensor dequantised to f32 (row-major, GGUF `dims` reversed).
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self
            .tensors
            .iter()
            .find(|t| t.name == name)
            .with_context(|| format!("{}: tensor `{name}` is missing", self.path.display()))?;
        let n: u64 = t.dims.iter().product();
        let mut out = vec![0.0f32; n as usize];
        dequantize(t.ggml_type, self.tensor_bytes(t)?, &mut out)
            .with_context(|| format!("{}: tensor `{name}`", self.path.display()))?;
        Ok((t.dims.iter().rev().map(|&d| d as usize).collect(), out))
    }

    /// `general.architecture` (`?` when absent).
    fn arch(&self) -> &str {
        self.meta
            .get("general.architecture")
            .and_then(Value::as_str)
            .unwrap_or("?")
    }

    /// [`Gguf::tensor_f32`] straight into `out` (no temporary copy), the tensor's shape
    /// checked against `shape` first.
    pub fn tensor_f32_into(&self, name: &str, shape: &[usize], out: &mut [f32]) -> Result<()> {
        let t = self
            .tensors
            .iter()
            .find(|t| t.name == name)
            .with_context(|| format!("{}: tensor `{name}` is missing", self.path.display()))?;
        let got: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        if got != shape {
            bail!(
                "{}: tensor `{name}` has shape {got:?}, expected {shape:?}",
                self.path.display()
            );
        }
        dequantize(t.ggml_type, self.tensor_bytes(t)?, out)
            .with_context(|| format!("{}: tensor `{name}`", self.path.display()))
    }

    /// The raw blocks of a quantised 2-D tensor as a [`QMatrix`] (`None` for F32/F16).
    fn qmatrix(&self, name: &str) -> Result<Option<QMatrix>> {
        let t = self
            .tensors
            .iter()
            .find(|t| t.name == name)
            .with_context(|| format!("{}: tensor `{name}` is missing", self.path.display()))?;
        let Some(ty) = QType::from_ggml(t.ggml_type) else {
            return Ok(None);
        };
        if t.dims.len() != 2 {
            return Ok(None);
        }
        let (cols, rows) = (t.dims[0] as usize, t.dims[1] as usize);
        Ok(Some(QMatrix::new(
            ty,
            rows,
            cols,
            self.tensor_bytes(t)?.to_vec(),
        )))
    }

    fn get_u(&self, key: &str) -> Result<usize> {
        self.meta
            .get(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .with_context(|| format!("{}: metadata `{key}` is missing", self.path.display()))
    }
}

/// Load a Llama-family GGUF (`llama`, `qwen2`, `qwen3`: [`arch`]) as a mnemo model (weights
/// dequantised to f32, plus quantised copies for decoding) and its tokenizer. `max_seq_len` caps the context (KV cache and RoPE table sizes).
pub fn load_llama(path: &Path, max_seq_len: usize) -> Result<(Model, Tokenizer)> {
    load_llama_impl(path, max_seq_len, false)
}

/// [`load_llama`] keeping the quantised matrices packed: the attention and FFN projections and
/// the output head, where every part of one has a type with a quantised product, stay ranges
/// of the memory-mapped file with no f32 copy (what one-token decoding reads anyway), and the
/// model runs through its cache only (prefill, decoding, serving; the full forward refuses
/// it). The embedding, norms and biases are dequantised as usual. A model of P parameters then
/// takes its file size plus ~4 bytes per embedding and norm weight, not 4·P bytes: what lets a
/// 7B Q4_K_M file (~28 GB in f32) run in a few GB.
pub fn load_llama_packed(path: &Path, max_seq_len: usize) -> Result<(Model, Tokenizer)> {
    load_llama_impl(path, max_seq_len, true)
}

/// Bytes of the parameters of the Llama-family GGUF at `path` in f32 (what [`load_llama`]
/// allocates).
pub fn llama_f32_bytes(path: &Path) -> Result<usize> {
    let g = Gguf::open(path)?;
    let arch = g.arch();
    let vocab = match g.meta.get("tokenizer.ggml.tokens") {
        Some(Value::Array(v)) => v.len(),
        _ => bail!("{}: no tokenizer.ggml.tokens", path.display()),
    };
    let cfg = arch::llama_family_config(&g, arch, vocab, 1)?;
    Ok(4 * crate::model::ParamLayout::new(&cfg).total)
}

fn load_llama_impl(path: &Path, max_seq_len: usize, packed: bool) -> Result<(Model, Tokenizer)> {
    let g = Gguf::open(path)?;
    let arch = g.arch();
    let tokens = match g.meta.get("tokenizer.ggml.tokens") {
        Some(Value::Array(v)) => v
            .iter()
            .map(|x| x.as_str().unwrap_or("").to_string())
            .collect::<Vec<_>>(),
        _ => bail!("{}: no tokenizer.ggml.tokens", path.display()),
    };
    let cfg = arch::llama_family_config(&g, arch, tokens.len(), max_seq_len)?;
    let mut model = if packed {
        Model::new_reserved(cfg)
    } else {
        Model::new(cfg).map_err(anyhow::Error::from)
    }
    .with_context(|| format!("{}: inconsistent {arch} metadata", path.display()))?;
    // The products and the GGUF tensors they read (q|k|v and gate|up fused in mnemo).
    let mut products: Vec<(usize, Vec<String>)> = Vec::new();
    for (i, lo) in model.layout.layers.iter().enumerate() {
        let b = |s: &[&str]| s.iter().map(|s| format!("blk.{i}.{s}.weight")).collect();
        products.push((lo.wqkv, b(&["attn_q", "attn_k", "attn_v"])));
        products.push((lo.wo, b(&["attn_output"])));
        if let Ffn::Dense { w13, w2 } = lo.ffn {
            products.push((w13, b(&["ffn_gate", "ffn_up"])));
            products.push((w2, b(&["ffn_down"])));
        }
    }
    let out_name = if model.cfg.tied_embeddings {
        "token_embd.weight"
    } else {
        "output.weight"
    };
    products.push((model.layout.output, vec![out_name.to_string()]));
    // Packed: the products whose parts all have a quantised product keep the mapped blocks.
    let mut kept: Vec<std::ops::Range<usize>> = Vec::new();
    if packed {
        let pk = deepseek2_packed::Packer::open(&g)?;
        for (off, names) in &products {
            let mut parts = Vec::new();
            for n in names {
                let rows = g
                    .tensors
                    .iter()
                    .find(|t| &t.name == n)
                    .and_then(|t| t.dims.get(1))
                    .with_context(|| format!("{}: 2-D tensor `{n}` is missing", path.display()))?;
                match pk.matrix(&g, n, 0, *rows as usize)? {
                    Some(q) => parts.push(q),
                    None => break,
                }
            }
            if parts.len() != names.len() {
                continue;
            }
            // A tied head is the embedding too, whose rows are still read in f32.
            if *off != model.layout.embed {
                let n: usize = parts.iter().map(|q| q.rows * q.cols).sum();
                kept.push(*off..*off + n);
            }
            if parts.len() == 1 {
                model.quant.insert(*off, parts.pop().expect("one part"));
            } else {
                model.quant_parts.insert(*off, parts);
            }
        }
        model.packed_only = true;
    }
    let name_of = arch::gguf_name;
    for spec in model.layout.tensors.clone() {
        // Every parameter of a packed product (q, k and v; gate and up) has no f32 copy.
        if kept.iter().any(|r| r.contains(&spec.offset)) {
            continue;
        }
        let gname = name_of(&spec.name);
        g.tensor_f32_into(&gname, &spec.shape, &mut model.params[spec.range()])?;
    }
    if packed {
        let tok = tokenizer_from_gguf(&g, &tokens)?;
        return Ok((model, tok));
    }
    // Quantised copies for decoding, one per (possibly fused) linear weight: one matrix
    // where the parts share a block type, else the parts (`kernels::qparts`).
    let fuse = |names: &[String]| -> Result<Option<Vec<QMatrix>>> {
        let mut parts = Vec::new();
        for n in names {
            match g.qmatrix(n)? {
                Some(q) => parts.push(q),
                None => return Ok(None),
            }
        }
        let first = &parts[0];
        if parts.iter().any(|q| q.cols != first.cols) {
            return Ok(None);
        }
        if parts.iter().any(|q| q.ty != first.ty) {
            return Ok(Some(parts));
        }
        let (ty, cols) = (first.ty, first.cols);
        let rows = parts.iter().map(|q| q.rows).sum();
        let mut data = Vec::with_capacity(parts.iter().map(|q| q.data.len()).sum());
        for q in &parts {
            data.extend_from_slice(&q.data);
        }
        Ok(Some(vec![QMatrix::new(ty, rows, cols, data)]))
    };
    let mut quant = std::collections::HashMap::new();
    let mut quant_parts = std::collections::HashMap::new();
    for (off, names) in &products {
        match fuse(names)? {
            Some(mut q) if q.len() == 1 => {
                quant.insert(*off, q.pop().expect("one part"));
            }
            Some(q) => {
                quant_parts.insert(*off, q);
            }
            None => {}
        }
    }
    model.quant = quant;
    model.quant_parts = quant_parts;
    let tok = tokenizer_from_gguf(&g, &tokens)?;
    Ok((model, tok))
}

/// Only the tokenizer of a GGUF model (vocabulary, merges, chat template), without reading
/// its weights: what `mnemo pack --tokenizer MODEL.gguf` counts with.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let g = Gguf::open(path)?;
    let tokens = match g.meta.get("tokenizer.ggml.tokens") {
        Some(Value::Array(v)) => v
            .iter()
            .map(|x| x.as_str().unwrap_or("").to_string())
            .collect::<Vec<_>>(),
        _ => bail!("{}: no tokenizer.ggml.tokens", path.display()),
    };
    tokenizer_from_gguf(&g, &tokens)
}

/// Build the GPT-2-style byte-level BPE described by `tokenizer.ggml.*` as a Hugging Face
/// tokenizer: the pre-tokenizer of `tokenizer.ggml.pre` ([`pretok`]); control tokens (type 3)
/// are special added tokens, user-defined ones (type 4) plain added tokens.
fn tokenizer_from_gguf(g: &Gguf, tokens: &[String]) -> Result<Tokenizer> {
    let p = g.path.display();
    let model = g
        .meta
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .unwrap_or("?");
    if model != "gpt2" {
        bail!("{p}: tokenizer model `{model}` is not supported (only gpt2 byte-level BPE)");
    }
    let merges: Vec<String> = match g.meta.get("tokenizer.ggml.merges") {
        Some(Value::Array(v)) => v
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        _ => bail!("{p}: the tokenizer has no merges (tokenizer.ggml.merges)"),
    };
    let types: Vec<u64> = match g.meta.get("tokenizer.ggml.token_type") {
        Some(Value::Array(v)) => v.iter().map(|x| x.as_u64().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let pre = g.meta.get("tokenizer.ggml.pre").and_then(Value::as_str);
    let pre_tokenizer = pretok::pre_tokenizer(pre, &format!("{p}"))?;
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(&3) | Some(&4)))
        .map(|(i, t)| serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": types[i] == 3}))
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    });
    let mut tok = Tokenizer::from_json_str(&json.to_string(), &format!("the tokenizer of {p}"))?;
    if let Some(eos) = g
        .meta
        .get("tokenizer.ggml.eos_token_id")
        .and_then(Value::as_u64)
    {
        tok.set_eot(eos as u32);
    }
    let template = g
        .meta
        .get("tokenizer.chat_template")
        .and_then(Value::as_str);
    tok.set_chat_template(template.map(String::from));
    Ok(tok)
}

pub mod deepseek2;
mod deepseek2_packed;
pub mod deepseek4;
pub mod hf;
pub mod mix;
pub mod quantize;
mod write;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_arch;
