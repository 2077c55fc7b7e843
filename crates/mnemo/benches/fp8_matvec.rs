//! Packed FP8 / FP4 products ([`mnemo::kernels::fp8dot`]) against the f32 product of the same
//! (dequantised) weights: a 4096×4096 FP8 matrix (128×128 block scales) and a 2048×4096 FP4
//! one (per-32 scales), 1 and 4 vectors, every kernel this CPU runs. Rounds of all arms
//! alternate; medians are printed (ms, GB/s of weights read, GFLOP/s) with the CPU threads.
//! `cargo bench -p mnemo --bench fp8_matvec [-- ROUNDS]`.

use mnemo::kernels::fp8::{dequant_fp4, dequant_fp8};
use mnemo::kernels::fp8dot::{self, expand_block_scales, Isa};
use mnemo::kernels::matmul::linear_forward;
use mnemo::kernels::quant::{QMatrix, QType};
use mnemo::rng::Rng;
use std::time::Instant;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(15);
    let mut r = Rng::new(1);
    let mut byte = || (r.next_u64() & 0x7e) as u8 | ((r.next_u64() & 1) << 7) as u8;
    // FP8 4096×4096 (codes without NaN: 0x7f/0xff masked out above), FP4 2048×4096.
    let (r8, c8) = (4096, 4096);
    let q8: Vec<u8> = (0..r8 * c8).map(|_| byte()).collect();
    let s8 = vec![2f32.powi(-9); (r8 / 128) * (c8 / 128)];
    let w8 = dequant_fp8(&q8, &s8, r8, c8, [128, 128]);
    let m8 = QMatrix::packed(
        QType::Fp8,
        r8,
        c8,
        q8,
        expand_block_scales(&s8, r8, c8, [128, 128]),
        128,
    )
    .unwrap();
    let (r4, c4) = (2048, 4096);
    let q4: Vec<u8> = (0..r4 * c4 / 2).map(|_| byte()).collect();
    let s4 = vec![2f32.powi(-5); r4 * c4 / 32];
    let w4 = dequant_fp4(&q4, &s4, r4, c4, 32);
    let m4 = QMatrix::packed(QType::Fp4, r4, c4, q4, s4, 32).unwrap();
    let isas: Vec<Isa> = match fp8dot::isa() {
        Isa::Avx512 => vec![Isa::Avx512, Isa::Avx2, Isa::Generic],
        Isa::Avx2 => vec![Isa::Avx2, Isa::Generic],
        Isa::Generic => vec![Isa::Generic],
    };
    println!("threads {}", rayon::current_num_threads());
    for (name, m, w, bytes) in [
        ("fp8 4096x4096", &m8, &w8, r8 * c8 + r8 * c8 / 128 * 4),
        ("fp4 2048x4096", &m4, &w4, r4 * c4 / 2 + r4 * c4 / 32 * 4),
    ] {
        for n in [1usize, 4] {
            let (rows, cols) = (m.rows, m.cols);
            let mut x = vec![0.0f32; n * cols];
            Rng::new(2).fill_normal(&mut x, 1.0);
            let mut y = vec![0.0f32; n * rows];
            // Arms: f32 product, then each packed kernel (the portable one only at n = 1:
            // it is slow, and its rounds would dominate).
            let arms: Vec<Option<Isa>> = std::iter::once(None)
                .chain(
                    isas.iter()
                        .filter(|&&i| i != Isa::Generic || n == 1)
                        .map(|&i| Some(i)),
                )
                .collect();
            let mut t = vec![Vec::new(); arms.len()];
            for round in 0..rounds + 1 {
                for (a, arm) in arms.iter().enumerate() {
                    let s = Instant::now();
                    match arm {
                        None => linear_forward(&mut y, &x, w, n, cols, rows, false),
                        Some(i) => fp8dot::matmat_with(*i, m, &x, n, &mut y, false),
                    }
                    if round > 0 {
                        t[a].push(s.elapsed().as_secs_f64());
                    }
                }
            }
            for (a, arm) in arms.iter().enumerate() {
                let ms = median(&mut t[a]);
                let rd = if arm.is_none() {
                    rows * cols * 4
                } else {
                    bytes
                };
                println!(
                    "{name} n={n} {:>9}: {:8.3} ms  {:6.2} GB/s weights  {:6.2} GFLOP/s",
                    match arm {
                        None => "f32".to_string(),
                        Some(i) => format!("{i:?}"),
                    },
                    ms * 1e3,
                    rd as f64 / ms / 1e9,
                    2.0 * (rows * cols * n) as f64 / ms / 1e9
                );
            }
        }
    }
}
