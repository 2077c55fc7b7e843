//! The bf16 GEMM alone (`kernels::bf16::gemm`, bf16 operands, f32 accumulation and output) at
//! given shapes and operand layouts, the median GFLOP/s of each: the mnemo arm of
//! `scripts/bench-bf16-gemm.sh` (the PyTorch arm is `reference/bench_bf16_gemm.py`).
//!
//! A shape is `MxKxN:LAYOUT`, the product `C[m,n] = A[m,k]·B[k,n]` with
//! - `nn`: A and B row-major (a linear layer's input gradient `dy·W`),
//! - `nt`: B stored `[n,k]` row-major and read transposed (a linear layer's forward `x·Wᵀ`),
//! - `tn`: A stored `[k,m]` row-major and read transposed, accumulating into C (the weight
//!   gradient `dW += dyᵀ·x`).
//!
//! `cargo run --release -p mnemo --example bench_bf16_gemm -- [--threads 2] [--iters 10]
//! 1024x1024x1024:nn 2048x512x2816:nt …` prints one JSON line per shape.

use mnemo::kernels::bf16;
use mnemo::kernels::matmul::MatRef;
use std::time::Instant;

fn fail(msg: String) -> ! {
    eprintln!("bench_bf16_gemm: {msg}");
    std::process::exit(2)
}

/// `MxKxN:LAYOUT` → `(m, k, n, layout)`.
fn parse_shape(s: &str) -> (usize, usize, usize, String) {
    let (dims, layout) = s.split_once(':').unwrap_or((s, "nn"));
    if !["nn", "nt", "tn"].contains(&layout) {
        fail(format!("`{s}`: layout must be nn, nt or tn"));
    }
    let d: Vec<usize> = dims
        .split('x')
        .map(|x| x.parse::<usize>().unwrap_or(0))
        .collect();
    if d.len() != 3 || d.contains(&0) {
        fail(format!("`{s}`: expected MxKxN:LAYOUT with M, K, N > 0"));
    }
    (d[0], d[1], d[2], layout.to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut threads, mut iters, mut shapes) = (2usize, 10usize, vec![]);
    let mut i = 0;
    while i < args.len() {
        let num = |j: usize| -> usize {
            args.get(j)
                .and_then(|v| v.parse().ok())
                .filter(|&v| v > 0)
                .unwrap_or_else(|| fail(format!("{} needs a positive integer", args[i])))
        };
        match args[i].as_str() {
            "--threads" => (threads, i) = (num(i + 1), i + 2),
            "--iters" => (iters, i) = (num(i + 1), i + 2),
            s => (shapes.push(parse_shape(s)), i += 1).1,
        }
    }
    if shapes.is_empty() {
        shapes.push((1024, 1024, 1024, "nn".to_string()));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap_or_else(|e| fail(format!("--threads {threads}: {e}")));
    for (m, k, n, layout) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i % 7) as f32 - 3.0) * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i % 5) as f32 - 2.0) * 0.1).collect();
        let mut c = vec![0.0f32; m * n];
        let acc = layout == "tn";
        let mut run = || {
            let av = match layout.as_str() {
                "tn" => MatRef::new(&a, k, m).t(),
                _ => MatRef::new(&a, m, k),
            };
            let bv = match layout.as_str() {
                "nt" => MatRef::new(&b, n, k).t(),
                _ => MatRef::new(&b, k, n),
            };
            bf16::gemm(&mut c, n, av, bv, 1.0, acc, true);
        };
        run();
        let mut rates: Vec<f64> = (0..iters)
            .map(|_| {
                let t = Instant::now();
                run();
                2.0 * (m * n * k) as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .collect();
        rates.sort_by(|x, y| x.total_cmp(y));
        println!(
            "{{\"impl\":\"mnemo\",\"m\":{m},\"k\":{k},\"n\":{n},\"layout\":\"{layout}\",\
             \"threads\":{threads},\"avx512_bf16\":{},\"gflops_median\":{:.2}}}",
            bf16::has_avx512_bf16(),
            rates[rates.len() / 2]
        );
    }
}
