//! A quantised weight of an official DeepSeek-V4 checkpoint as stored ([`read_coded`]): its
//! FP8 / FP4 codes and its scale grid, checked against the model's shape from the headers
//! alone; the scales read by [`Coded::scales`] ([`read_scale`]). Both the dequantising loader
//! ([`super::v4_official`]) and the packed one ([`super::v4_packed`]) read weights this way.

use super::safetensors::Dtype;
use super::shards::Shards;
use super::v4_official::{scale_name, storage, Storage, FP4_BLOCK};
use crate::kernels::f16::{bf16_to_f32, f16_to_f32};
use crate::kernels::fp8::e8m0_to_f32;
use anyhow::{bail, Context, Result};

/// A quantised weight as stored, checked against the model's shape: its codes (FP8 e4m3
/// bytes, or FP4 e2m1 two per byte) and where its scale grid is (FP8
/// `[ceil(rows/br), ceil(cols/bc)]`, FP4 `[rows, ceil(cols/32)]`; its shape checked, its values
/// read by [`Coded::scales`]).
pub(crate) struct Coded<'a> {
    pub kind: Storage,
    pub codes: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    /// The file that holds it (for messages).
    pub file: String,
    /// The scale tensor's name, its shape, and what its blocks are (for messages).
    pub scale: String,
    pub scale_shape: [usize; 2],
    scale_what: String,
}

impl Coded<'_> {
    /// The scale grid as f32 values ([`read_scale`]).
    pub fn scales(&self, src: &Shards, name: &str) -> Result<Vec<f32>> {
        read_scale(src, &self.scale, name, &self.scale_shape, &self.scale_what)
    }
}

/// Weight `name` of model shape `shape` as stored codes with its scale tensor's name, `None`
/// when it is stored as F32/BF16/F16. The scale must exist with the right shape; nothing but the headers is read. Errors name the file, the tensor and
/// the value.
pub(crate) fn read_coded<'a>(
    src: &'a Shards,
    name: &str,
    shape: &[usize],
    fp8_block: [usize; 2],
) -> Result<Option<Coded<'a>>> {
    let (t, f) = src.raw(name)?;
    let file = f.path().display().to_string();
    let kind = storage(t.dtype).with_context(|| {
        format!(
            "{file}: tensor `{name}` has dtype {:?}; supported: F32, BF16, F16, F8_E4M3 (FP8) \
             and I8, U8 or F4 (FP4, two values per byte), the quantised ones with a `.scale`",
            t.dtype
        )
    })?;
    if kind == Storage::Plain {
        return Ok(None);
    }
    let &[rows, cols] = shape else {
        bail!(
            "{file}: tensor `{name}` is quantised ({:?}) but the model wants shape {shape:?}: \
             only matrices are",
            t.dtype
        );
    };
    let (want, what) = match kind {
        Storage::Fp8 => {
            if t.shape != shape {
                bail!(
                    "{file}: tensor `{name}` has shape {:?}, expected {shape:?}",
                    t.shape
                );
            }
            let [br, bc] = fp8_block;
            (
                [rows.div_ceil(br), cols.div_ceil(bc)],
                format!("FP8 blocks of {br}×{bc}"),
            )
        }
        Storage::Fp4 => {
            if !cols.is_multiple_of(2) {
                bail!("{file}: tensor `{name}` is FP4 ({:?}) but the model wants {cols} columns: FP4 packs two per byte", t.dtype);
            }
            let stored = if t.dtype == Dtype::F4 {
                [rows, cols]
            } else {
                [rows, cols / 2]
            };
            if t.shape != stored {
                bail!(
                    "{file}: tensor `{name}` ({:?}, FP4) has shape {:?}, expected {stored:?} for \
                     the {shape:?} weight{}",
                    t.dtype,
                    t.shape,
                    if t.dtype == Dtype::F4 {
                        ""
                    } else {
                        " (two values per byte)"
                    }
                );
            }
            (
                [rows, cols.div_ceil(FP4_BLOCK)],
                format!("FP4 blocks of 1×{FP4_BLOCK}"),
            )
        }
        Storage::Plain => unreachable!("returned above"),
    };
    let sname = scale_name(name);
    let (st, sf) = src.raw(&sname).with_context(|| {
        format!("tensor `{name}` is quantised but its scale `{sname}` is missing")
    })?;
    if st.shape != want {
        bail!(
            "{}: scale `{sname}` of `{name}` has shape {:?}, expected {want:?} ({what})",
            sf.path().display(),
            st.shape
        );
    }
    Ok(Some(Coded {
        kind,
        codes: t.data,
        rows,
        cols,
        file,
        scale: sname,
        scale_shape: want,
        scale_what: what,
    }))
}

/// Scale tensor `sname` of weight `weight` as f32 values, checking its shape `want`.
pub(crate) fn read_scale(
    src: &Shards,
    sname: &str,
    weight: &str,
    want: &[usize; 2],
    what: &str,
) -> Result<Vec<f32>> {
    let (t, f) = src.raw(sname).with_context(|| {
        format!("tensor `{weight}` is quantised but its scale `{sname}` is missing")
    })?;
    let file = f.path().display();
    if t.shape != want {
        bail!(
            "{file}: scale `{sname}` of `{weight}` has shape {:?}, expected {want:?} ({what})",
            t.shape
        );
    }
    let s: Vec<f32> = match t.dtype {
        Dtype::F8_E8M0 | Dtype::U8 => t.data.iter().map(|&e| e8m0_to_f32(e)).collect(),
        Dtype::F32 => t
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => t.data.chunks_exact(2).map(bf16_to_f32).collect(),
        Dtype::F16 => t.data.chunks_exact(2).map(f16_to_f32).collect(),
        d => bail!(
            "{file}: scale `{sname}` has dtype {d:?}; supported: F8_E8M0 or U8 (exponents), \
             F32, BF16, F16"
        ),
    };
    if let Some(i) = s.iter().position(|x| !x.is_finite()) {
        bail!(
            "{file}: scale `{sname}` of `{weight}` is not finite at [{}, {}] ({}; E8M0 255 is NaN)",
            i / want[1],
            i % want[1],
            match t.dtype {
                Dtype::F8_E8M0 | Dtype::U8 => format!("byte {}", t.data[i]),
                _ => format!("{}", s[i]),
            }
        );
    }
    Ok(s)
}
