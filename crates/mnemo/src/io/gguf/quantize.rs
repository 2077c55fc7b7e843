//! Quantise a GGUF model into one of llama.cpp's mixes (`mnemo quantize IN.gguf OUT.gguf
//! --type Q4_K_M`): each tensor's type from [`super::mix`], its values dequantised to f32
//! (F32/F16/BF16 inputs; quantised ones with `allow_requantize`) and quantised row by row with
//! [`crate::kernels::quantize`] (ggml's reference quantisers, byte-identical), every metadata
//! entry of the input copied verbatim except `general.file_type` (set to the mix's
//! `llama_ftype`) and `general.quantization_version` (2), both moved to the end as llama.cpp
//! does, split keys dropped. Tensors are
//! written in llama.cpp's order ([`super::mix::llama_order`]) with 32-byte alignment (or
//! the input's `general.alignment`).
//!
//! Architecture-independent: any GGUF whose weights use llama.cpp's tensor names (`llama`,
//! `qwen2`, `qwen3`, `deepseek2`, …) gets the mix llama.cpp's own `llama-quantize` gives it.

use super::mix::{llama_order, Mix, ModelFacts, Planner};
use super::write::{kv_u32, GgufOut, OutTensor};
use super::{type_name, Gguf, Value};
use crate::kernels::quantize::{block_geometry, quantize_rows, writable_types};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// What [`quantize_gguf`] did: per tensor `(name, input type, output type)` in file order,
/// and the output's size in bytes.
pub struct QuantizeReport {
    pub tensors: Vec<(String, String, String)>,
    pub bytes: u64,
}

/// Float types that are not quantisation (re-encoding them is no requantisation).
fn is_float(t: u32) -> bool {
    matches!(t, 0 | 1 | 30)
}

/// One tensor of the plan: name, GGUF dims, input and output ggml types.
pub struct Planned {
    pub name: String,
    pub dims: Vec<u64>,
    pub cur: u32,
    pub ty: u32,
}

/// The per-tensor plan, in llama.cpp's order.
pub fn plan(g: &Gguf, mix: Mix) -> Result<Vec<Planned>> {
    let p = g.path.display();
    let arch = g
        .meta
        .get("general.architecture")
        .and_then(Value::as_str)
        .with_context(|| format!("{p}: metadata `general.architecture` is missing"))?
        .to_string();
    let get = |k: &str| {
        g.meta
            .get(&format!("{arch}.{k}"))
            .and_then(Value::as_u64)
            .map(|v| v as usize)
    };
    let n_layer = get("block_count")
        .with_context(|| format!("{p}: metadata `{arch}.block_count` is missing"))?;
    let n_head = get("attention.head_count").unwrap_or(0);
    let n_head_kv = get("attention.head_count_kv").unwrap_or(n_head);
    let facts = ModelFacts {
        n_layer,
        n_gqa: n_head.checked_div(n_head_kv).unwrap_or(0),
        n_expert: get("expert_count").unwrap_or(0),
    };
    let mut names: Vec<String> = g.tensors.iter().map(|t| t.name.clone()).collect();
    llama_order(&mut names);
    let mut planner = Planner::new(mix, facts, &names);
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        let t = g
            .tensors
            .iter()
            .find(|t| t.name == n)
            .expect("name from the list");
        let ty = planner.choose(&n, &t.dims, t.ggml_type)?;
        out.push(Planned {
            name: n,
            dims: t.dims.clone(),
            cur: t.ggml_type,
            ty,
        });
    }
    Ok(out)
}

/// Quantise the GGUF model `input` into `output` with `mix`. A tensor already stored in a
/// quantised type that the mix would change is refused unless `allow_requantize` (it is then
/// dequantised and quantised again, which loses more than quantising the float original).
pub fn quantize_gguf(
    input: &Path,
    output: &Path,
    mix: Mix,
    allow_requantize: bool,
) -> Result<QuantizeReport> {
    let g = Gguf::open(input)?;
    let p = input.display();
    let plan = plan(&g, mix)?;
    if !allow_requantize {
        if let Some(Planned { name: n, cur, .. }) =
            plan.iter().find(|p| p.cur != p.ty && !is_float(p.cur))
        {
            let ft = g
                .meta
                .get("general.file_type")
                .and_then(Value::as_u64)
                .and_then(|f| Mix::from_ftype(f as u32))
                .map(|m| format!(" (general.file_type {})", m.name))
                .unwrap_or_default();
            bail!(
                "{p} is already quantised{ft}: tensor `{n}` is {}. Quantise the F32/F16/BF16 \
                 original, or pass --allow-requantize to dequantise and quantise again (worse \
                 than quantising the original)",
                type_name(*cur)
            );
        }
    }
    // Output tensor infos (sizes known up front).
    let mut infos = Vec::with_capacity(plan.len());
    for Planned {
        name,
        dims,
        cur,
        ty,
    } in &plan
    {
        let n: u64 = dims.iter().product();
        let bytes = match block_geometry(*ty) {
            Some((_, be, bb)) if cur != ty => n as usize / be * bb,
            _ => {
                let t = g
                    .tensors
                    .iter()
                    .find(|t| &t.name == name)
                    .expect("planned tensor");
                g.tensor_bytes(t)?.len()
            }
        };
        infos.push(OutTensor {
            name: name.clone(),
            dims: dims.clone(),
            ggml_type: *ty,
            bytes,
        });
    }
    // Metadata: the input's, verbatim, then the quantisation version and file type moved to
    // the end (llama.cpp's `gguf_set_val_u32` removes a key and appends it).
    let mut kv: Vec<(String, Vec<u8>)> = Vec::with_capacity(g.meta_raw.len() + 2);
    for (k, r) in &g.meta_raw {
        let set_below = k == "general.file_type" || k == "general.quantization_version";
        if k.starts_with("split.") || set_below {
            continue;
        }
        kv.push((k.clone(), g.mmap[r.clone()].to_vec()));
    }
    kv.push(("general.quantization_version".into(), kv_u32(2)));
    kv.push(("general.file_type".into(), kv_u32(mix.ftype)));
    let align = g
        .meta
        .get("general.alignment")
        .and_then(Value::as_u64)
        .unwrap_or(32) as usize;
    let mut out = GgufOut::create(output, &kv, infos, align)?;
    let mut report = QuantizeReport {
        tensors: Vec::with_capacity(plan.len()),
        bytes: 0,
    };
    for Planned {
        name,
        dims,
        cur,
        ty,
    } in &plan
    {
        let t = g
            .tensors
            .iter()
            .find(|t| &t.name == name)
            .expect("planned tensor");
        if cur == ty {
            out.tensor_data(g.tensor_bytes(t)?)?;
        } else {
            let (_, x) = g.tensor_f32(name)?;
            let cols = dims[0] as usize;
            let q = quantize_rows(*ty, &x, cols).with_context(|| {
                format!(
                    "{p}: tensor `{name}` (rows of {cols}): cannot write type {} (writable: {})",
                    type_name(*ty),
                    writable_types().join(", ")
                )
            })?;
            out.tensor_data(&q)?;
        }
        report
            .tensors
            .push((name.clone(), type_name(*cur), type_name(*ty)));
    }
    out.finish()?;
    report.bytes = std::fs::metadata(output)
        .with_context(|| format!("cannot stat {}", output.display()))?
        .len();
    Ok(report)
}
