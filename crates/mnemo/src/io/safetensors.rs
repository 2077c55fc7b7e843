//! Reading and writing f32 tensors as safetensors, with errors that name the file and tensor.

use crate::kernels::f16::{bf16_to_f32, f16_to_f32};
pub use ::safetensors::tensor::Dtype;
use ::safetensors::tensor::{Metadata, SafeTensors, TensorView};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;

/// A memory-mapped safetensors file (its header parsed once, at [`TensorFile::open`]).
pub struct TensorFile {
    path: std::path::PathBuf,
    mmap: std::sync::Arc<memmap2::Mmap>,
    /// Where the data section starts (after the 8-byte length and the JSON header).
    data_start: usize,
    meta: Metadata,
}

/// One tensor as stored: dtype, shape and raw little-endian bytes.
pub struct RawTensor<'a> {
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// For a truncated file: `"; tensor `NAME` ends at byte E, past the data's end D"` naming the
/// first tensor (by offset) whose bytes are not all there, else "".
fn past_end(b: &[u8]) -> String {
    let Some(n) = b
        .get(..8)
        .map(|h| u64::from_le_bytes(h.try_into().expect("8 bytes")) as usize)
    else {
        return String::new();
    };
    let Some(h) = b
        .get(8..8usize.saturating_add(n))
        .and_then(|h| serde_json::from_slice::<serde_json::Value>(h).ok())
    else {
        return String::new();
    };
    let have = b.len().saturating_sub(8 + n) as u64;
    let mut bad: Vec<(u64, &str)> = h
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((v["data_offsets"][1].as_u64()?, k.as_str())))
        .filter(|(end, _)| *end > have)
        .collect();
    bad.sort();
    match bad.first() {
        Some((end, k)) => {
            format!("; tensor `{k}` ends at data byte {end}, past the data's end {have}")
        }
        None => String::new(),
    }
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self> {
        let f =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the file is opened read-only; mnemo never modifies checkpoint files in place
        // (they are replaced by rename), so the mapping does not change under us.
        let mmap = unsafe { memmap2::Mmap::map(&f) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        // `read_metadata` checks every tensor's offsets and byte size against its dtype and
        // shape, and that the data section fills the file.
        let (n, meta) = SafeTensors::read_metadata(&mmap).with_context(|| {
            format!(
                "{} is not a valid safetensors file (corrupt or truncated?){}",
                path.display(),
                past_end(&mmap)
            )
        })?;
        Ok(TensorFile {
            path: path.to_path_buf(),
            mmap: std::sync::Arc::new(mmap),
            data_start: 8 + n,
            meta,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file holds tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.meta.info(name).is_some()
    }

    /// Tensor `name` as stored, or `None`.
    pub fn raw(&self, name: &str) -> Option<RawTensor<'_>> {
        let info = self.meta.info(name)?;
        let (a, b) = info.data_offsets;
        Some(RawTensor {
            dtype: info.dtype,
            shape: &info.shape,
            data: &self.mmap[self.data_start + a..self.data_start + b],
        })
    }

    /// Tensor `name`'s bytes as a range of the shared mapping (nothing is read), or `None`.
    pub fn shared(&self, name: &str) -> Option<crate::kernels::qbytes::QBytes> {
        let info = self.meta.info(name)?;
        let (a, b) = info.data_offsets;
        let buf: crate::kernels::qbytes::SharedBuf = self.mmap.clone();
        Some(crate::kernels::qbytes::QBytes::shared(
            buf,
            self.data_start + a..self.data_start + b,
        ))
    }

    fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let t = self
            .raw(name)
            .with_context(|| format!("{}: tensor `{name}` is missing", self.path.display()))?;
        TensorView::new(t.dtype, t.shape.to_vec(), t.data)
            .with_context(|| format!("{}: tensor `{name}`", self.path.display()))
    }

    /// The `__metadata__` string map.
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        Ok(self.meta.metadata().clone().unwrap_or_default())
    }

    /// The tensor names, in the order of their data in the file.
    pub fn names(&self) -> Vec<String> {
        self.meta.offset_keys()
    }

    /// A tensor as f32 values (F32 stored; F16/BF16 converted), checking the shape if given.
    pub fn f32(&self, name: &str, shape: Option<&[usize]>) -> Result<Vec<f32>> {
        let t = self.tensor(name)?;
        if let Some(s) = shape {
            if t.shape() != s {
                bail!(
                    "{}: tensor `{name}` has shape {:?}, expected {:?}",
                    self.path.display(),
                    t.shape(),
                    s
                );
            }
        }
        let data = t.data();
        Ok(match t.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => data.chunks_exact(2).map(bf16_to_f32).collect(),
            Dtype::F16 => data.chunks_exact(2).map(f16_to_f32).collect(),
            other => bail!(
                "{}: tensor `{name}` has dtype {other:?}; F32, F16 and BF16 are supported",
                self.path.display()
            ),
        })
    }

    /// An integer tensor (I64, I32 or U32) as u32 values; negative values are an error.
    pub fn u32(&self, name: &str) -> Result<Vec<u32>> {
        self.u32_shaped(name, None)
    }

    /// Like [`TensorFile::u32`], checking the shape if given.
    pub fn u32_shaped(&self, name: &str, shape: Option<&[usize]>) -> Result<Vec<u32>> {
        let t = self.tensor(name)?;
        if let Some(s) = shape {
            if t.shape() != s {
                bail!(
                    "{}: tensor `{name}` has shape {:?}, expected {:?}",
                    self.path.display(),
                    t.shape(),
                    s
                );
            }
        }
        let neg = |v: i64| -> Result<u32> {
            u32::try_from(v).map_err(|_| {
                anyhow::anyhow!(
                    "{}: tensor `{name}` holds {v}, not a valid id",
                    self.path.display()
                )
            })
        };
        let d = t.data();
        Ok(match t.dtype() {
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|b| neg(i64::from_le_bytes(b.try_into().expect("8 bytes"))))
                .collect::<Result<_>>()?,
            Dtype::I32 => d
                .chunks_exact(4)
                .map(|b| neg(i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64))
                .collect::<Result<_>>()?,
            Dtype::U32 => d
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect(),
            other => bail!(
                "{}: tensor `{name}` has dtype {other:?}, expected an integer type",
                self.path.display()
            ),
        })
    }
}

/// Tensor contents to serialise.
pub enum Data<'a> {
    F32(&'a [f32]),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

/// Serialise named f32 tensors (name, shape, data) plus string metadata to safetensors bytes.
pub fn serialize(
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let t: Vec<(String, Vec<usize>, Data)> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), Data::F32(d)))
        .collect();
    serialize_mixed(&t, metadata)
}

/// Serialise named tensors of mixed dtypes plus string metadata to safetensors bytes.
pub fn serialize_mixed(
    tensors: &[(String, Vec<usize>, Data)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let bytes: Vec<(Dtype, Vec<u8>)> = tensors
        .iter()
        .map(|(_, _, d)| match d {
            Data::F32(d) => (Dtype::F32, d.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Data::I32(d) => (Dtype::I32, d.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Data::I64(d) => (Dtype::I64, d.iter().flat_map(|x| x.to_le_bytes()).collect()),
        })
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), (dt, b))| Ok((n.clone(), TensorView::new(*dt, s.clone(), b)?)))
        .collect::<Result<_, ::safetensors::SafeTensorError>>()?;
    let meta = if metadata.is_empty() {
        None
    } else {
        Some(metadata)
    };
    Ok(::safetensors::serialize(views, meta)?)
}
