//! The attention core alone at `small`'s training shapes (batch 8 × 256, 8 query and 4 kv
//! heads of 64): forward and backward CPU time per call on one thread, and the GFLOP/s of the
//! causal products. Used for docs/performance.md ("The attention core").
//!
//! `cargo run --release -p mnemo --example bench_attention [ITERS=40]`

use mnemo::kernels::attention::{self, AttnDims, Heads, QkvLayout};

fn main() {
    let iters: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
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
            "{{\"forward_cpu_ms\": {:.2}, \"forward_gflops\": {:.1}, \"backward_cpu_ms\": {:.2}, \"backward_gflops\": {:.1}}}",
            fw * 1e3,
            flop / fw / 1e9,
            bw * 1e3,
            2.5 * flop / bw / 1e9
        );
    });
}
