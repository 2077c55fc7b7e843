//! Quantisation of f32 values into ggml's 256-value "k-quant" super-blocks (`Q2_K`, `Q3_K`,
//! `Q4_K`, `Q5_K`, `Q6_K`; byte layouts in [`super::kquant`]): ggml's reference
//! `quantize_row_*_ref`, what `llama-quantize` runs without an importance matrix. Each
//! function takes a multiple of 256 values and appends whole super-blocks to `out`.
//!
//! Two levels of scales. First every sub-block (16 or 32 values) gets its own float scale
//! (and minimum) from a search in [`super::quant_fit`]:
//! - `Q2_K` (16 values, levels 0..=3): asymmetric, `make_qkx2_quants` with weights `|x|`,
//!   absolute error, 16 steps from `rmin = −0.5` by 0.1.
//! - `Q4_K` / `Q5_K` (32 values, 0..=15 / 0..=31): asymmetric, weights `rms(x) + |x|`,
//!   squared error, 21 / 16 steps from −1.0 / −0.5 by 0.1.
//! - `Q3_K` (16 values, −4..=3): symmetric, `make_q3_quants` (coordinate descent).
//! - `Q6_K` (16 values, −32..=31): symmetric, `make_qx_quants` (19 candidate scales).
//!
//! Then the sub-block scales are themselves quantised against the super-block's largest:
//! 4-bit (`Q2_K`: `d = max/15`), 6-bit (`Q3_K`: signed, `d = −max/32`; `Q4_K`/`Q5_K`:
//! `d = max/63`, minimums likewise with `dmin`) or 8-bit (`Q6_K`: signed, `d = −max/128`).
//! Finally each value is re-rounded against its *stored* (f16 × integer) scale:
//! `q = clamp(round((x + dmin·m)/(d·s)))` or `clamp(round(x/(d·s)))`.

use super::f16::{f16_to_f32, f32_to_f16_bits};
use super::quant_fit::{make_q3_quants, make_qkx2_quants, make_qx_quants, nearest_int};

const QK: usize = 256;

/// f32 → f16 → f32 (the value ggml reads back from the block's scale field).
fn f16_round(x: f32) -> (u16, f32) {
    let h = f32_to_f16_bits(x);
    (h, f16_to_f32(&h.to_le_bytes()))
}

/// Pack 2-bit levels: element `32·s + l` of each 128-value half is bits `2s..2s+2` of the
/// half's byte `l`.
fn pack_2bit(l: &[u8; QK], qs: &mut [u8]) {
    for j in (0..QK).step_by(128) {
        for k in 0..32 {
            qs[j / 4 + k] =
                l[j + k] | (l[j + k + 32] << 2) | (l[j + k + 64] << 4) | (l[j + k + 96] << 6);
        }
    }
}

/// `Q2_K`: 84-byte super-blocks (`scales[16]`, `qs[64]`, `d`, `dmin`).
pub fn quantize_q2_k(x: &[f32], out: &mut Vec<u8>) {
    let q4scale = 15.0f32;
    for x in x.chunks_exact(QK) {
        let mut l = [0u8; QK];
        let mut laux = [0u8; 16];
        let mut weights = [0.0f32; 16];
        let mut scales = [0.0f32; 16];
        let mut mins = [0.0f32; 16];
        let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
        for j in 0..16 {
            let xs = &x[16 * j..16 * j + 16];
            for (w, v) in weights.iter_mut().zip(xs) {
                *w = v.abs();
            }
            let (s, m) = make_qkx2_quants(
                3,
                xs,
                &weights,
                &mut l[16 * j..16 * j + 16],
                &mut laux,
                -0.5,
                0.1,
                15,
                true,
            );
            scales[j] = s;
            mins[j] = m;
            if s > max_scale {
                max_scale = s;
            }
            if m > max_min {
                max_min = m;
            }
        }
        let mut sc = [0u8; 16];
        let d = if max_scale > 0.0 {
            let iscale = q4scale / max_scale;
            for j in 0..16 {
                sc[j] = nearest_int(iscale * scales[j]) as u8;
            }
            max_scale / q4scale
        } else {
            0.0
        };
        let (dh, df) = f16_round(d);
        let dmin = if max_min > 0.0 {
            let iscale = q4scale / max_min;
            for j in 0..16 {
                sc[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
            }
            max_min / q4scale
        } else {
            0.0
        };
        let (mh, mf) = f16_round(dmin);
        for j in 0..16 {
            let dj = df * (sc[j] & 0xf) as f32;
            if dj == 0.0 {
                continue;
            }
            let dm = mf * (sc[j] >> 4) as f32;
            for ii in 0..16 {
                l[16 * j + ii] = nearest_int((x[16 * j + ii] + dm) / dj).clamp(0, 3) as u8;
            }
        }
        let mut qs = [0u8; 64];
        pack_2bit(&l, &mut qs);
        out.extend_from_slice(&sc);
        out.extend_from_slice(&qs);
        out.extend_from_slice(&dh.to_le_bytes());
        out.extend_from_slice(&mh.to_le_bytes());
    }
}

/// `Q3_K`: 110-byte super-blocks (`hmask[32]`, `qs[64]`, `scales[12]`, `d`).
pub fn quantize_q3_k(x: &[f32], out: &mut Vec<u8>) {
    for x in x.chunks_exact(QK) {
        let mut l = [0i8; QK];
        let mut scales = [0.0f32; 16];
        let (mut max_scale, mut amax) = (0.0f32, 0.0f32);
        for j in 0..16 {
            scales[j] = make_q3_quants(4, &x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
            let s = scales[j].abs();
            if s > amax {
                amax = s;
                max_scale = scales[j];
            }
        }
        let mut sb = [0u8; 12];
        let d = if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            for j in 0..16 {
                // C: `int8_t l = nearest_int(…)`, clamped to −32..=31, stored + 32.
                let lj = (nearest_int(iscale * scales[j]) as i8).clamp(-32, 31) + 32;
                let lj = lj as u8;
                if j < 8 {
                    sb[j] = lj & 0xf;
                } else {
                    sb[j - 8] |= (lj & 0xf) << 4;
                }
                sb[j % 4 + 8] |= (lj >> 4) << (2 * (j / 4));
            }
            1.0 / iscale
        } else {
            0.0
        };
        let (dh, df) = f16_round(d);
        for j in 0..16 {
            let lo = if j < 8 { sb[j] & 0xf } else { sb[j - 8] >> 4 };
            let sc = (lo | (((sb[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i32 - 32;
            let dj = df * sc as f32;
            if dj == 0.0 {
                continue;
            }
            for ii in 0..16 {
                l[16 * j + ii] = (nearest_int(x[16 * j + ii] / dj).clamp(-4, 3) + 4) as i8;
            }
        }
        let mut hmask = [0u8; 32];
        let mut lu = [0u8; QK];
        for j in 0..QK {
            let mut v = l[j] as u8;
            if v > 3 {
                hmask[j % 32] |= 1 << (j / 32);
                v -= 4;
            }
            lu[j] = v;
        }
        let mut qs = [0u8; 64];
        pack_2bit(&lu, &mut qs);
        out.extend_from_slice(&hmask);
        out.extend_from_slice(&qs);
        out.extend_from_slice(&sb);
        out.extend_from_slice(&dh.to_le_bytes());
    }
}

/// The sub-block fits shared by `Q4_K` and `Q5_K`: 8 groups of 32 with weights
/// `sqrt(mean x²) + |x|`; returns `(scales, mins)`, levels into `l`.
fn fit_k32(x: &[f32], nmax: i32, rmin: f32, nstep: i32, l: &mut [u8; QK]) -> ([f32; 8], [f32; 8]) {
    let mut laux = [0u8; 32];
    let mut weights = [0.0f32; 32];
    let (mut scales, mut mins) = ([0.0f32; 8], [0.0f32; 8]);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            &mut laux,
            rmin,
            0.1,
            nstep,
            false,
        );
        scales[j] = s;
        mins[j] = m;
    }
    (scales, mins)
}

/// The 6-bit scales and minimums of `Q4_K`/`Q5_K` packed into 12 bytes, `d` and `dmin`
/// (f16 bits and values), then every value re-rounded to `0..=nmax` against them.
fn pack_k32_scales(
    x: &[f32],
    scales: &[f32; 8],
    mins: &[f32; 8],
    nmax: i32,
    l: &mut [u8; QK],
) -> ([u8; 12], u16, u16) {
    let max_scale = scales
        .iter()
        .fold(0.0f32, |a, &s| if s > a { s } else { a });
    let max_min = mins.iter().fold(0.0f32, |a, &m| if m > a { m } else { a });
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut sb = [0u8; 12];
    for j in 0..8 {
        // C: `uint8_t ls = nearest_int(…)`, wrapped to a byte, then `MIN(63, ls)`.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sb[j] = ls;
            sb[j + 4] = lm;
        } else {
            sb[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
            sb[j - 4] |= (ls >> 4) << 6;
            sb[j] |= (lm >> 4) << 6;
        }
    }
    let (dh, df) = f16_round(max_scale / 63.0);
    let (mh, mf) = f16_round(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = if j < 4 {
            (sb[j] & 63, sb[j + 4] & 63)
        } else {
            (
                (sb[j + 4] & 0xf) | ((sb[j - 4] >> 6) << 4),
                (sb[j + 4] >> 4) | ((sb[j] >> 6) << 4),
            )
        };
        let d = df * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = mf * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax) as u8;
        }
    }
    (sb, dh, mh)
}

/// `Q4_K`: 144-byte super-blocks (`d`, `dmin`, `scales[12]`, `qs[128]`).
pub fn quantize_q4_k(x: &[f32], out: &mut Vec<u8>) {
    for x in x.chunks_exact(QK) {
        let mut l = [0u8; QK];
        let (scales, mins) = fit_k32(x, 15, -1.0, 20, &mut l);
        let (sb, dh, mh) = pack_k32_scales(x, &scales, &mins, 15, &mut l);
        out.extend_from_slice(&dh.to_le_bytes());
        out.extend_from_slice(&mh.to_le_bytes());
        out.extend_from_slice(&sb);
        for j in (0..QK).step_by(64) {
            out.extend((0..32).map(|k| l[j + k] | (l[j + k + 32] << 4)));
        }
    }
}

/// `Q5_K`: 176-byte super-blocks (`d`, `dmin`, `scales[12]`, `qh[32]`, `qs[128]`).
pub fn quantize_q5_k(x: &[f32], out: &mut Vec<u8>) {
    for x in x.chunks_exact(QK) {
        let mut l = [0u8; QK];
        let (scales, mins) = fit_k32(x, 31, -0.5, 15, &mut l);
        let (sb, dh, mh) = pack_k32_scales(x, &scales, &mins, 31, &mut l);
        out.extend_from_slice(&dh.to_le_bytes());
        out.extend_from_slice(&mh.to_le_bytes());
        out.extend_from_slice(&sb);
        let mut qh = [0u8; 32];
        let mut ql = [0u8; 128];
        let (mut m1, mut m2) = (1u8, 2u8);
        for (c, n) in (0..QK).step_by(64).enumerate() {
            for j in 0..32 {
                let mut l1 = l[n + j];
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                let mut l2 = l[n + j + 32];
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                ql[32 * c + j] = l1 | (l2 << 4);
            }
            m1 <<= 2;
            m2 <<= 2;
        }
        out.extend_from_slice(&qh);
        out.extend_from_slice(&ql);
    }
}

/// `Q6_K`: 210-byte super-blocks (`ql[128]`, `qh[64]`, `scales[16]` as `i8`, `d`).
pub fn quantize_q6_k(x: &[f32], out: &mut Vec<u8>) {
    for x in x.chunks_exact(QK) {
        let mut l = [0i8; QK];
        let mut scales = [0.0f32; 16];
        let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
        for ib in 0..16 {
            let s = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
            scales[ib] = s;
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = s;
            }
        }
        if max_abs_scale < super::quant_fit::GROUP_MAX_EPS {
            out.extend_from_slice(&[0u8; 210]);
            continue;
        }
        let iscale = -128.0 / max_scale;
        let (dh, df) = f16_round(1.0 / iscale);
        let mut sc = [0i8; 16];
        for ib in 0..16 {
            // C: `int8_t = MIN(127, nearest_int(…))` (the int wrapped to a byte).
            sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
        }
        for j in 0..16 {
            let d = df * sc[j] as f32;
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                l[16 * j + ii] = (nearest_int(x[16 * j + ii] / d).clamp(-32, 31) + 32) as i8;
            }
        }
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for (h, j) in (0..QK).step_by(128).enumerate() {
            for k in 0..32 {
                let q = |o: usize| l[j + k + o] as u8;
                ql[64 * h + k] = (q(0) & 0xf) | ((q(64) & 0xf) << 4);
                ql[64 * h + k + 32] = (q(32) & 0xf) | ((q(96) & 0xf) << 4);
                qh[32 * h + k] =
                    (q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6);
            }
        }
        out.extend_from_slice(&ql);
        out.extend_from_slice(&qh);
        out.extend(sc.iter().map(|&s| s as u8));
        out.extend_from_slice(&dh.to_le_bytes());
    }
}
