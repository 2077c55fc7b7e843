//! The block formats of a [`super::quant::QMatrix`]: ggml's 32-value blocks (`Q4_0`, `Q4_1`,
//! `Q5_0`, `Q5_1`, `Q8_0`, `IQ4_NL`), its 256-value k-quant super-blocks (`Q2_K` … `Q6_K`,
//! multiplied by [`super::kdot`]), and DeepSeek's packed floats (`Fp8` e4m3, one byte a value;
//! `Fp4` e2m1, two a byte; a power-of-two scale per `block` values of a row, multiplied by
//! [`super::fp8dot`], built by [`super::quant::QMatrix::packed`]; `Bf16` as stored, built by
//! [`super::quant::QMatrix::bf16`]). Byte layouts: see
//! [`super::kquant`].

/// A quantised block format.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    IQ4_NL,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Fp8,
    Fp4,
    /// bfloat16 kept as stored (two bytes a value, no scale): DeepSeek-V4's BF16 weights
    /// multiplied straight from a mapped checkpoint (a packed float of scale 1).
    Bf16,
}

impl QType {
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q5_0 => 22,
            QType::Q5_1 => 24,
            QType::Q8_0 => 34,
            QType::IQ4_NL => 18,
            QType::Q2_K => 84,
            QType::Q3_K => 110,
            QType::Q4_K => 144,
            QType::Q5_K => 176,
            QType::Q6_K => 210,
            QType::Fp8 | QType::Fp4 => 1,
            QType::Bf16 => 2,
        }
    }

    /// Values per block (packed floats: per byte; their scale blocks are
    /// [`super::quant::QMatrix::block`]).
    pub fn block_elems(self) -> usize {
        match self {
            QType::Fp8 | QType::Bf16 => 1,
            QType::Fp4 => 2,
            _ if self.is_k() => 256,
            _ => 32,
        }
    }

    /// DeepSeek's packed FP8 / FP4, and BF16 as stored ([`super::fp8dot`]).
    pub fn is_packed_float(self) -> bool {
        matches!(self, QType::Fp8 | QType::Fp4 | QType::Bf16)
    }

    /// A 256-value k-quant type ([`super::kdot`]).
    pub fn is_k(self) -> bool {
        matches!(
            self,
            QType::Q2_K | QType::Q3_K | QType::Q4_K | QType::Q5_K | QType::Q6_K
        )
    }

    /// A 32-value type multiplied by [`super::qdot32`] (`Q5_0`, `Q5_1`, `IQ4_NL`).
    pub fn is_dot32(self) -> bool {
        matches!(self, QType::Q5_0 | QType::Q5_1 | QType::IQ4_NL)
    }

    /// ggml's type id (`u32::MAX` for the packed floats, which ggml does not have).
    pub fn ggml_type(self) -> u32 {
        match self {
            QType::Q4_0 => 2,
            QType::Q4_1 => 3,
            QType::Q5_0 => 6,
            QType::Q5_1 => 7,
            QType::Q8_0 => 8,
            QType::Q2_K => 10,
            QType::Q3_K => 11,
            QType::Q4_K => 12,
            QType::Q5_K => 13,
            QType::Q6_K => 14,
            QType::IQ4_NL => 20,
            QType::Fp8 | QType::Fp4 | QType::Bf16 => u32::MAX,
        }
    }

    /// The type of ggml type id `t`, where mnemo multiplies it quantised.
    pub fn from_ggml(t: u32) -> Option<QType> {
        [
            QType::Q4_0,
            QType::Q4_1,
            QType::Q5_0,
            QType::Q5_1,
            QType::Q8_0,
            QType::IQ4_NL,
            QType::Q2_K,
            QType::Q3_K,
            QType::Q4_K,
            QType::Q5_K,
            QType::Q6_K,
        ]
        .into_iter()
        .find(|q| q.ggml_type() == t)
    }
}
