//! The bf16 attention core: AVX-512 BF16 and portable paths bit for bit, and both against the
//! f32 core within bf16 rounding.

use super::*;
use crate::kernels::attention::{backward_scaled, forward_scaled};
use crate::kernels::bf16::has_avx512_bf16;
use crate::rng::Rng;

/// Largest `|x − y|` over the largest `|y|`.
fn rel_err(x: &[f32], y: &[f32]) -> f32 {
    let d = x
        .iter()
        .zip(y)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    d / y.iter().fold(0.0f32, |m, b| m.max(b.abs()))
}

fn setup(b: usize, t: usize, h: usize, kv: usize, hd: usize) -> (AttnDims, QkvLayout, Vec<f32>) {
    let dims = AttnDims {
        batch: b,
        tq: t,
        tk: t,
        q_pos0: 0,
        n_heads: h,
        n_kv_heads: kv,
        head_dim: hd,
    };
    let rs = (h + 2 * kv) * hd + 3;
    let lay = QkvLayout {
        rs,
        q_off: 1,
        k_off: h * hd + 2,
        v_off: (h + kv) * hd + 3,
    };
    let mut qkv = vec![0.0; b * t * rs];
    Rng::new((t * 31 + hd) as u64).fill_normal(&mut qkv, 1.0);
    (dims, lay, qkv)
}

/// Forward with queries from row `q_row0` of the buffer; `isa = None` is the f32 core.
fn fwd(
    isa: Option<Isa>,
    dims: AttnDims,
    lay: QkvLayout,
    qkv: &[f32],
    q_row0: usize,
) -> (Vec<f32>, Vec<f32>) {
    let hd = dims.head_dim;
    let mut o = vec![0.0; dims.batch * dims.tq * dims.n_heads * hd];
    let mut lse = vec![0.0; dims.batch * dims.n_heads * dims.tq];
    let hv = |off| Heads {
        data: qkv,
        rs: lay.rs,
        off,
    };
    let q = Heads {
        data: &qkv[q_row0 * lay.rs..],
        rs: lay.rs,
        off: lay.q_off,
    };
    let scale = 0.9 / (hd as f32).sqrt();
    match isa {
        Some(isa) => forward_on(
            isa,
            dims,
            scale,
            q,
            hv(lay.k_off),
            hv(lay.v_off),
            &mut o,
            &mut lse,
        ),
        None => forward_scaled(
            dims,
            scale,
            q,
            hv(lay.k_off),
            hv(lay.v_off),
            &mut o,
            &mut lse,
        ),
    }
    (o, lse)
}

fn isas() -> Vec<Isa> {
    if has_avx512_bf16() {
        vec![Isa::Portable, Isa::Avx512Bf16]
    } else {
        vec![Isa::Portable]
    }
}

#[test]
fn forward_paths_agree_bitwise_and_match_f32_within_bf16_rounding() {
    // (batch, T, heads, kv heads, head dim, query offset): odd T and head dims, several key
    // spans, and decoding-style queries at positions 101.. against 131 keys.
    for &(b, t, h, kv, hd, p0) in &[
        (2, 5, 2, 2, 4, 0),
        (1, 149, 4, 2, 8, 0),
        (2, 130, 3, 1, 16, 0),
        (1, 70, 2, 1, 5, 0),
        (1, 600, 2, 1, 8, 0),
        (1, 131, 4, 2, 8, 101),
    ] {
        let (mut dims, lay, qkv) = setup(b, t, h, kv, hd);
        if p0 > 0 {
            dims = AttnDims {
                tq: t - p0,
                q_pos0: p0,
                ..dims
            };
        }
        let (want, want_lse) = fwd(None, dims, lay, &qkv, p0);
        let (o, lse) = fwd(Some(Isa::Portable), dims, lay, &qkv, p0);
        let (eo, el) = (rel_err(&o, &want), rel_err(&lse, &want_lse));
        eprintln!("fwd {b} {t} {h} {kv} {hd} {p0}: o {eo:.2e} lse {el:.2e}");
        assert!(eo < 1e-2 && el < 4e-3, "o {eo}, lse {el}");
        for isa in isas() {
            let (o2, lse2) = fwd(Some(isa), dims, lay, &qkv, p0);
            assert!(
                o.iter().zip(&o2).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{isa:?} o"
            );
            assert!(
                lse.iter()
                    .zip(&lse2)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{isa:?} lse"
            );
        }
    }
}

#[test]
fn backward_paths_agree_bitwise_and_match_f32_within_bf16_rounding() {
    for &(b, t, h, kv, hd) in &[
        (2, 6, 2, 1, 4),
        (1, 70, 2, 2, 4),
        (1, 149, 4, 2, 8),
        (1, 130, 2, 1, 5),
    ] {
        let (dims, lay, qkv) = setup(b, t, h, kv, hd);
        let (o, lse) = fwd(None, dims, lay, &qkv, 0);
        let mut dout = vec![0.0; o.len()];
        Rng::new(9).fill_normal(&mut dout, 1.0);
        let scale = 0.9 / (hd as f32).sqrt();
        let mut want = vec![f32::NAN; qkv.len()];
        backward_scaled(dims, scale, &qkv, lay, &o, &lse, &dout, &mut want);
        let mut first: Option<Vec<f32>> = None;
        for isa in isas() {
            let mut d = vec![f32::NAN; qkv.len()];
            backward_on(isa, dims, scale, &qkv, lay, (&o, &lse, &dout), &mut d);
            // Each of dq, dk, dv against the f32 core (the padding columns stay NaN in both).
            for (name, off, w) in [
                ("dq", lay.q_off, h),
                ("dk", lay.k_off, kv),
                ("dv", lay.v_off, kv),
            ] {
                let cols = |x: &[f32]| -> Vec<f32> {
                    x.chunks(lay.rs)
                        .flat_map(|r| r[off..off + w * hd].to_vec())
                        .collect()
                };
                let e = rel_err(&cols(&d), &cols(&want));
                eprintln!("bwd {b} {t} {h} {kv} {hd} {isa:?} {name}: {e:.2e}");
                assert!(e < 4e-2, "{name}: {e}");
            }
            match &first {
                None => first = Some(d),
                Some(f) => assert!(
                    f.iter().zip(&d).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{isa:?} differs from the portable path"
                ),
            }
        }
    }
}
