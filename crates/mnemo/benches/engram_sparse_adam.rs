//! The Engram tables' lazy Adam step costs what the touched rows cost, not what the table
//! holds: the same 4,096 touched rows on a 1M-row and a 10M-row table (a dense step would take
//! 10× longer on the large one). A timing, so a benchmark rather than a test:
//! `cargo bench -p mnemo --bench engram_sparse_adam`. Prints both times and exits non-zero
//! when the large table's step is over 4× the small one's (+ 2 ms).

use mnemo::engram::{EngramTable, SparseAdam, SparseAdamParams, SparseGrad};
use mnemo::rng::Rng;

fn main() {
    let dim = 8;
    let mut rng = Rng::new(2);
    let rows: Vec<u32> = (0..4096).map(|_| rng.below(1_000_000) as u32).collect();
    let de = vec![0.1f32; rows.len() * dim];
    let g = SparseGrad::from_gather(&rows, &de, dim);
    let time = |n_rows: usize| {
        let mut t = EngramTable::zeros(n_rows, dim);
        let mut opt = SparseAdam::new(n_rows, dim);
        let h = SparseAdamParams::default();
        opt.update(&mut t, &g, 1e-3, &h).unwrap(); // commit the touched pages
        let mut best = f64::MAX;
        for _ in 0..5 {
            let s = std::time::Instant::now();
            opt.update(&mut t, &g, 1e-3, &h).unwrap();
            best = best.min(s.elapsed().as_secs_f64());
        }
        best
    };
    let (small, large) = (time(1_000_000), time(10_000_000));
    println!(
        "sparse Adam step, 4096 rows x {dim}: 1M-row table {:.1} us, 10M-row table {:.1} us (best of 5; ratio {:.2})",
        small * 1e6,
        large * 1e6,
        large / small
    );
    if large >= 4.0 * small + 2e-3 {
        eprintln!("the step grew with the table size: {small} s vs {large} s");
        std::process::exit(1);
    }
}
