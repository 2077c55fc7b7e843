//! The attention core alone at `small`'s training shapes (batch 8 × 256, 8 query and 4 kv
//! heads of 64): forward and backward CPU time per call on one thread, and the GFLOP/s of the
//! causal products. Used for docs/performance.md ("The attention core"). `--precision bf16`
//! runs the bf16 block products (`kernels::attention_bf16`); `o_hash`/`dqkv_hash` fingerprint
//! the output bits (a refactor of a path must leave them unchanged).
//!
//! `cargo run --release -p mnemo --example bench_attention [ITERS=40] [--precision f32|bf16]`

use mnemo::kernels::attention::{self, AttnDims, Heads, QkvLayout};
use mnemo::kernels::precision::{set_gemm_precision, Precision};

/// FNV-1a over the bits of `x`.
fn hash(x: &[f32]) -> u64 {
    x.iter().fold(0xcbf29ce484222325u64, |h, v| {
        (h ^ v.to_bits() as u64).wrapping_mul(0x100000001b3)
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut iters = 40;
    let mut precision = Precision::F32;
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--precision" {
            let v = args.get(i + 1).map(String::as_str).unwrap_or("");
            precision = v.parse().unwrap_or_else(|e| {
                eprintln!("--precision: {e}");
                std::process::exit(2)
            });
            i += 2;
            continue;
        }
        iters = args[i].parse().unwrap_or_else(|_| {
            eprintln!("ITERS must be a positive integer, got `{}`", args[i]);
            std::process::exit(2)
        });
        i += 1;
    }
    set_gemm_precision(precision);
    let (b, t, h, kvh, hd) = (8, 256, 8, 4, 64);
    let rs = (h + 2 * kvh) * hd;
    let mut rng = mnemo::rng::Rng::new(1);
    let mut qkv = vec![0.0f32; b * t * rs];
    rng.fill_normal(&mut qkv, 0.5);
    let mut dout = vec![0.0f32; b * t * h * hd];
    rng.fill_normal(&mut dout, 0.5);
    let lay = QkvLayout {
        rs,
        q_off: 0,
        k_off: h * hd,
        v_off: (h + kvh) * hd,
    };
    let dims = AttnDims {
        batch: b,
        tq: t,
        tk: t,
        q_pos0: 0,
        n_heads: h,
        n_kv_heads: kvh,
        head_dim: hd,
    };
    let view = |off| Heads {
        data: &qkv,
        rs,
        off,
    };
    let mut o = vec![0.0; b * t * h * hd];
    let mut lse = vec![0.0; b * h * t];
    let mut dqkv = vec![0.0; qkv.len()];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a one-thread pool");
    let cpu = || mnemo::util::process_cpu_seconds().unwrap_or(f64::NAN);
    pool.install(|| {
        let t0 = cpu();
        for _ in 0..iters {
            attention::forward(
                dims,
                view(lay.q_off),
                view(lay.k_off),
                view(lay.v_off),
                &mut o,
                &mut lse,
            );
        }
        let t1 = cpu();
        for _ in 0..iters {
            attention::backward(dims, &qkv, lay, &o, &lse, &dout, &mut dqkv);
        }
        let t2 = cpu();
        let (fw, bw) = ((t1 - t0) / iters as f64, (t2 - t1) / iters as f64);
        // The causal half of the two forward products; the backward has 2.5 times as much.
        let flop = 2.0 * 2.0 * (t * t / 2) as f64 * hd as f64 * (b * h) as f64;
        println!(
            "{{\"precision\": \"{}\", \"forward_cpu_ms\": {:.2}, \"forward_gflops\": {:.1}, \"backward_cpu_ms\": {:.2}, \"backward_gflops\": {:.1}, \"o_hash\": \"{:016x}\", \"dqkv_hash\": \"{:016x}\"}}",
            precision.name(),
            fw * 1e3,
            flop / fw / 1e9,
            bw * 1e3,
            2.5 * flop / bw / 1e9,
            hash(&o),
            hash(&dqkv)
        );
    });
}
