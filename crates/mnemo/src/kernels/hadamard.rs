//! The orthonormal Walsh–Hadamard transform: `y = x · H_n · n^(−1/2)` over each row of `n`
//! values (`n` a power of two), `H_n` the Sylvester Hadamard matrix
//! (`H_1 = [1]`, `H_2n = [[H_n, H_n], [H_n, −H_n]]`, so `H_n[i][j] = (−1)^popcount(i & j)`).
//! DeepSeek's `rotate_activation` (`fast_hadamard_transform.hadamard_transform(x, n^(−1/2))`)
//! before the indexer's FP4 round trip. `H_n / √n` is symmetric and its own inverse.
//!
//! In place, by `log2 n` butterfly passes (`(a, b) → (a + b, a − b)` on pairs `h` apart,
//! `h = 1, 2, 4, …`), then one scaling: `n·log2 n` additions instead of the `n²` of the
//! matrix product (the f32 sums differ from the matrix product's by rounding order only).

/// Transform every row of `n` values of `x` in place (module doc). Panics when `n` is not a
/// power of two or `x` is not whole rows.
pub fn rows(x: &mut [f32], n: usize) {
    assert!(
        n.is_power_of_two(),
        "Hadamard transform: width {n} is not a power of 2"
    );
    assert!(
        x.len().is_multiple_of(n),
        "Hadamard transform: {} values are not whole rows of {n}",
        x.len()
    );
    let scale = (1.0 / (n as f64).sqrt()) as f32;
    for row in x.chunks_exact_mut(n) {
        let mut h = 1;
        while h < n {
            for blk in row.chunks_exact_mut(2 * h) {
                let (lo, hi) = blk.split_at_mut(h);
                for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                    let (u, v) = (*a, *b);
                    *a = u + v;
                    *b = u - v;
                }
            }
            h *= 2;
        }
        row.iter_mut().for_each(|v| *v *= scale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_the_sylvester_matrix_product() {
        for n in [1usize, 2, 4, 8, 64, 128] {
            let x: Vec<f32> = (0..2 * n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
                .collect();
            let mut y = x.clone();
            rows(&mut y, n);
            let s = 1.0 / (n as f64).sqrt();
            for r in 0..2 {
                for j in 0..n {
                    let want: f64 = (0..n)
                        .map(|i| {
                            let sign = if (i & j).count_ones() % 2 == 0 {
                                1.0
                            } else {
                                -1.0
                            };
                            sign * x[r * n + i] as f64
                        })
                        .sum::<f64>()
                        * s;
                    let got = y[r * n + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "n {n} row {r} col {j}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn is_its_own_inverse_and_keeps_the_norm() {
        let x: Vec<f32> = (0..256).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut y = x.clone();
        rows(&mut y, 64);
        let (nx, ny) = (
            x.iter().map(|v| v * v).sum::<f32>(),
            y.iter().map(|v| v * v).sum::<f32>(),
        );
        assert!((nx - ny).abs() < 1e-4 * nx);
        rows(&mut y, 64);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
        // An exact case: H_4 · [1, 0, 0, 0] / 2 = [0.5; 4].
        let mut e = vec![1.0, 0.0, 0.0, 0.0];
        rows(&mut e, 4);
        assert_eq!(e, [0.5; 4]);
    }

    #[test]
    #[should_panic(expected = "not a power of 2")]
    fn refuses_other_widths() {
        rows(&mut [0.0; 12], 12);
    }
}
