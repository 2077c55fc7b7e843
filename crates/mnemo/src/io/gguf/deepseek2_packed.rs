//! Which weights of a quantised `deepseek2` GGUF stay packed ([`super::deepseek2::load_packed`]):
//! every matrix that the cached drivers multiply through [`Model::quant`] (`Model::lin`: the
//! MLA projections `W_q`/`W_qa`/`W_qb`/`W_kva`/`W_o`, the dense blocks' `[W1; W3]` and `W2`,
//! the output head; `moe::packed`: every routed and shared expert's `W1`, `W3`, `W2`), stored
//! in a type with a quantised product (`Q4_0`, `Q4_1`, `Q8_0`, `Q2_K`, `Q4_K`, `Q5_K`,
//! `Q6_K`), keeps its blocks — a range of the memory-mapped file, read from the page cache —
//! and gets no f32 copy. Everything else (embedding, norms, routers, `W_kvb`, matrices of other
//! types) is dequantised into the model's reserved parameter mapping as usual.
//!
//! [`Model::quant`]: crate::model::Model::quant

use super::Gguf;
use crate::kernels::qbytes::{QBytes, SharedBuf};
use crate::kernels::quant::{QMatrix, QType};
use anyhow::{Context, Result};
use std::sync::Arc;

/// The file mapped once more, shared by the packed matrices.
pub(super) struct Packer {
    map: SharedBuf,
}

/// Whether mnemo parameter `name` is multiplied through the quantised copies (module doc;
/// the dense `w1`/`w3` pair is fused by the caller).
pub(super) fn packable(name: &str) -> bool {
    [
        "attention.wq.weight",
        "attention.wq_a.weight",
        "attention.wq_b.weight",
        "attention.wkv_a.weight",
        "attention.wo.weight",
        "feed_forward.w2.weight",
        "w1.weight",
        "w2.weight",
        "w3.weight",
    ]
    .iter()
    .any(|s| name.ends_with(s) && (!s.starts_with('w') || name.contains("experts.")))
        || name == "output.weight"
}

impl Packer {
    pub(super) fn open(g: &Gguf) -> Result<Self> {
        let f = std::fs::File::open(&g.path)
            .with_context(|| format!("cannot open {}", g.path.display()))?;
        // SAFETY: read-only map of a model file, as `Gguf::open` does.
        let map = unsafe { memmap2::Mmap::map(&f) }
            .with_context(|| format!("cannot map {}", g.path.display()))?;
        Ok(Packer { map: Arc::new(map) })
    }

    /// Rows `r0..r0 + rows` of the 2-D or 3-D (stacked experts: `[E·rows_e, cols]` as rows)
    /// tensor `name`, sharing the mapping; `None` when its type has no quantised product.
    pub(super) fn matrix(
        &self,
        g: &Gguf,
        name: &str,
        r0: usize,
        rows: usize,
    ) -> Result<Option<QMatrix>> {
        let t = g
            .tensors
            .iter()
            .find(|t| t.name == name)
            .with_context(|| format!("{}: tensor `{name}` is missing", g.path.display()))?;
        let Some(ty) = QType::from_ggml(t.ggml_type) else {
            return Ok(None);
        };
        let cols = t.dims[0] as usize;
        let all = g.tensor_bytes(t)?;
        let row_bytes = all.len() / (t.dims[1..].iter().product::<u64>() as usize);
        let start = all.as_ptr() as usize - g.mmap.as_ptr() as usize + r0 * row_bytes;
        let range = start..start + rows * row_bytes;
        Ok(Some(QMatrix::new(
            ty,
            rows,
            cols,
            QBytes::shared(self.map.clone(), range),
        )))
    }

    /// Two tensors stacked as one matrix (the dense gate and up projections, `[W1; W3]`),
    /// when both have the same quantised type and width; `None` otherwise.
    pub(super) fn stacked(&self, g: &Gguf, a: &str, b: &str) -> Result<Option<QMatrix>> {
        let rows = |n: &str| -> Result<usize> {
            let t = g
                .tensors
                .iter()
                .find(|t| t.name == n)
                .with_context(|| format!("{}: tensor `{n}` is missing", g.path.display()))?;
            Ok(t.dims.get(1).copied().unwrap_or(1) as usize)
        };
        let (Some(qa), Some(qb)) = (
            self.matrix(g, a, 0, rows(a)?)?,
            self.matrix(g, b, 0, rows(b)?)?,
        ) else {
            return Ok(None);
        };
        if qa.ty != qb.ty || qa.cols != qb.cols {
            return Ok(None);
        }
        let mut data = qa.data.to_vec();
        data.extend_from_slice(&qb.data);
        Ok(Some(QMatrix::new(qa.ty, qa.rows + qb.rows, qa.cols, data)))
    }
}
