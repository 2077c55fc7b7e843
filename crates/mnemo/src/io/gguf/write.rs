//! Writing a GGUF file (v3, little-endian; the layout in [`super`]): metadata entries given
//! as already-encoded `(type, value)` bytes (copied from a source file, or built with
//! [`kv_u32`]), tensor infos with offsets from the start of the data section, each tensor's
//! data starting at a multiple of the alignment (zero padding), and the data section itself
//! starting at a multiple of the alignment after the header.
//!
//! The writer is streaming: the tensor infos (names, dims, types, byte sizes) are known up
//! front, so the header is written first and tensor data follows as it is produced.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One tensor of the file to write: GGUF dims (`dims[0]` fastest), ggml type, byte size.
pub struct OutTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub bytes: usize,
}

/// `(u32 type tag 4, value)`: a metadata value of type u32.
pub fn kv_u32(v: u32) -> Vec<u8> {
    let mut b = 4u32.to_le_bytes().to_vec();
    b.extend_from_slice(&v.to_le_bytes());
    b
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    w.extend_from_slice(&(s.len() as u64).to_le_bytes());
    w.extend_from_slice(s.as_bytes());
}

/// A GGUF file being written to `<path>.tmp`, renamed to `path` by [`GgufOut::finish`]; the
/// temporary file is removed if it is dropped unfinished (an error on the way).
pub struct GgufOut {
    path: PathBuf,
    tmp: PathBuf,
    f: Option<std::io::BufWriter<std::fs::File>>,
    tensors: Vec<OutTensor>,
    align: usize,
    /// Index of the next tensor whose data [`GgufOut::tensor_data`] expects.
    next: usize,
    /// Bytes of the data section written so far.
    pos: usize,
}

impl GgufOut {
    /// Create the file and write its header: `kv` are `(key, encoded type + value)`.
    pub fn create(
        path: &Path,
        kv: &[(String, Vec<u8>)],
        tensors: Vec<OutTensor>,
        align: usize,
    ) -> Result<GgufOut> {
        if align == 0 || !align.is_power_of_two() {
            bail!("GGUF alignment {align} is not a power of two");
        }
        let mut h = Vec::new();
        h.extend_from_slice(b"GGUF");
        h.extend_from_slice(&3u32.to_le_bytes());
        h.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(kv.len() as u64).to_le_bytes());
        for (k, v) in kv {
            put_str(&mut h, k);
            h.extend_from_slice(v);
        }
        let mut off = 0usize;
        for t in &tensors {
            put_str(&mut h, &t.name);
            h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&t.ggml_type.to_le_bytes());
            h.extend_from_slice(&(off as u64).to_le_bytes());
            off = (off + t.bytes).div_ceil(align) * align;
        }
        h.resize(h.len().div_ceil(align) * align, 0);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut f = std::io::BufWriter::with_capacity(1 << 20, file);
        f.write_all(&h)
            .with_context(|| format!("writing {}", tmp.display()))?;
        Ok(GgufOut {
            path: path.to_path_buf(),
            tmp,
            f: Some(f),
            tensors,
            align,
            next: 0,
            pos: 0,
        })
    }

    /// Write the data of the next tensor (in the order given to [`GgufOut::create`]).
    pub fn tensor_data(&mut self, data: &[u8]) -> Result<()> {
        let Some(t) = self.tensors.get(self.next) else {
            bail!("more tensor data than tensors");
        };
        if data.len() != t.bytes {
            bail!(
                "tensor `{}`: {} bytes of data, its info says {}",
                t.name,
                data.len(),
                t.bytes
            );
        }
        let pad = self.pos.div_ceil(self.align) * self.align - self.pos;
        let f = self.f.as_mut().expect("open until finish");
        f.write_all(&vec![0u8; pad])
            .and_then(|_| f.write_all(data))
            .with_context(|| format!("writing {}", self.tmp.display()))?;
        self.pos += pad + data.len();
        self.next += 1;
        Ok(())
    }

    /// Check that every tensor was written, flush, and move the file into place.
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.tensors.len() {
            bail!("{} of {} tensors written", self.next, self.tensors.len());
        }
        let mut f = self.f.take().expect("open until finish");
        let r = f
            .flush()
            .with_context(|| format!("writing {}", self.tmp.display()))
            .and_then(|_| {
                drop(f);
                std::fs::rename(&self.tmp, &self.path).with_context(|| {
                    format!(
                        "cannot rename {} to {}",
                        self.tmp.display(),
                        self.path.display()
                    )
                })
            });
        if r.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        r
    }
}

impl Drop for GgufOut {
    fn drop(&mut self) {
        if self.f.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
