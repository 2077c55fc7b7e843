//! The `k` entries `torch.topk(row, k)` (CPU, largest) selects, ties included.
//!
//! Where values tie at the k-th place, which of them a top-k keeps is not a property of the
//! values but of the algorithm. transformers' DeepSeek-V4 indexer keeps whatever ATen's CPU
//! kernel keeps, and small random models tie often (an entry whose every indexer head is
//! ReLU-zeroed scores exactly 0). To give the same logits, this replays that kernel: the
//! pairs `(row[j], j)` in index order, ordered by `gt(a, b) = (a is NaN and b is not) or a > b`
//! on the values only, then
//! - when `k·64 ≤ n`: libstdc++'s `std::partial_sort` selection (`__heap_select`: a heap of
//!   the first `k`, each later pair that beats its root replacing it);
//! - else libstdc++'s `std::nth_element` (`__introselect`: median-of-three pivot moved to the
//!   front, Hoare partition, depth limit `2·⌊log₂ n⌋` then `__heap_select`, insertion sort
//!   below four elements);
//!
//! and the first `k` pairs are the selection. Only the set matters here (returned ascending);
//! torch's final sort of it is not replayed. Checked against torch on rows full of ties of
//! many lengths, both branches (`tests/fixtures/torch_topk`, `reference/torch_topk_fixture.py`).
//! Cost: O(n) expected (O(n log k) on the heap branch), as torch's.

type Pair = (f32, usize);

/// torch's "greater" on the values (NaN above everything).
#[inline(always)]
fn gt(a: &Pair, b: &Pair) -> bool {
    (a.0.is_nan() && !b.0.is_nan()) || a.0 > b.0
}

/// The indices of the `k` values of `row` that `torch.topk(row, k)` returns, ascending
/// (all of `0..n` when `k ≥ n`).
pub fn torch_topk_set(row: &[f32], k: usize) -> Vec<usize> {
    let n = row.len();
    if k >= n {
        return (0..n).collect();
    }
    if k == 0 {
        return Vec::new();
    }
    let mut q: Vec<Pair> = row.iter().copied().zip(0..).collect();
    if k * 64 <= n {
        heap_select(&mut q, k);
    } else {
        let depth = 2 * (usize::BITS - 1 - n.leading_zeros()) as usize;
        introselect(&mut q, 0, k - 1, n, depth);
    }
    let mut sel: Vec<usize> = q[..k].iter().map(|p| p.1).collect();
    sel.sort_unstable();
    sel
}

/// [`torch_topk_set`] of the row `scores` (the `visible` entries) followed by −∞ up to
/// `total` entries: what `torch.topk` picks from a row whose not-yet-visible entries are
/// masked (all visible ones while at most `k` are).
pub fn torch_topk_visible(scores: &[f32], k: usize, total: usize) -> Vec<usize> {
    if scores.len() <= k {
        return (0..scores.len()).collect();
    }
    let mut row = scores.to_vec();
    row.resize(total.max(scores.len()), f32::NEG_INFINITY);
    torch_topk_set(&row, k)
}

/// `std::__introselect(first, nth, last, depth)` on `q[first..last]`.
fn introselect(q: &mut [Pair], mut first: usize, nth: usize, mut last: usize, mut depth: usize) {
    while last - first > 3 {
        if depth == 0 {
            heap_select(&mut q[first..last], nth + 1 - first);
            q.swap(first, nth);
            return;
        }
        depth -= 1;
        let cut = partition_pivot(q, first, last);
        if cut <= nth {
            first = cut;
        } else {
            last = cut;
        }
    }
    insertion_sort(&mut q[first..last]);
}

/// `std::__unguarded_partition_pivot`: the median of `q[first+1]`, `q[mid]`, `q[last-1]`
/// swapped to `first`, then `q[first+1..last]` partitioned around it.
fn partition_pivot(q: &mut [Pair], first: usize, last: usize) -> usize {
    let mid = first + (last - first) / 2;
    let (a, b, c) = (first + 1, mid, last - 1);
    let m = if gt(&q[a], &q[b]) {
        if gt(&q[b], &q[c]) {
            b
        } else if gt(&q[a], &q[c]) {
            c
        } else {
            a
        }
    } else if gt(&q[a], &q[c]) {
        a
    } else if gt(&q[b], &q[c]) {
        c
    } else {
        b
    };
    q.swap(first, m);
    // `std::__unguarded_partition(first + 1, last, pivot = first)`.
    let (mut lo, mut hi) = (first + 1, last);
    loop {
        while gt(&q[lo], &q[first]) {
            lo += 1;
        }
        hi -= 1;
        while gt(&q[first], &q[hi]) {
            hi -= 1;
        }
        if lo >= hi {
            return lo;
        }
        q.swap(lo, hi);
        lo += 1;
    }
}

/// `std::__insertion_sort` (stable among equal values).
fn insertion_sort(q: &mut [Pair]) {
    for i in 1..q.len() {
        let v = q[i];
        if gt(&v, &q[0]) {
            q.copy_within(0..i, 1);
            q[0] = v;
        } else {
            let mut j = i;
            while gt(&v, &q[j - 1]) {
                q[j] = q[j - 1];
                j -= 1;
            }
            q[j] = v;
        }
    }
}

/// `std::__heap_select(first, first + m, last)`: a heap (root = the least by `gt`) of the
/// first `m`, each later pair that beats the root taking its place.
fn heap_select(q: &mut [Pair], m: usize) {
    make_heap(&mut q[..m]);
    for i in m..q.len() {
        if gt(&q[i], &q[0]) {
            // `std::__pop_heap(first, middle, i)`.
            let v = q[i];
            q[i] = q[0];
            adjust_heap(&mut q[..m], 0, v);
        }
    }
}

/// `std::__make_heap`.
fn make_heap(h: &mut [Pair]) {
    let len = h.len();
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        let v = h[parent];
        adjust_heap(h, parent, v);
        if parent == 0 {
            return;
        }
        parent -= 1;
    }
}

/// `std::__adjust_heap(first, hole, len, value)` with `comp = gt`: the hole sinks to a leaf
/// along the children that do not beat each other, then `value` rises from there.
fn adjust_heap(h: &mut [Pair], mut hole: usize, v: Pair) {
    let len = h.len();
    let top = hole;
    let mut child = hole;
    while child < (len - 1) / 2 {
        child = 2 * (child + 1);
        if gt(&h[child], &h[child - 1]) {
            child -= 1;
        }
        h[hole] = h[child];
        hole = child;
    }
    if len.is_multiple_of(2) && child == (len - 2) / 2 {
        child = 2 * (child + 1);
        h[hole] = h[child - 1];
        hole = child - 1;
    }
    // `std::__push_heap(first, hole, top, value)`.
    while hole > top {
        let parent = (hole - 1) / 2;
        if !gt(&h[parent], &v) {
            break;
        }
        h[hole] = h[parent];
        hole = parent;
    }
    h[hole] = v;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixture's rows (codes into its value list, `-` for −∞) and torch's selections.
    #[test]
    fn matches_torch_topk_on_rows_full_of_ties() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/torch_topk/topk.json"
        );
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let values: Vec<f32> = j["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let (mut checked, mut heap, mut tied) = (0, 0, 0);
        for case in j["cases"].as_array().unwrap() {
            let row: Vec<f32> = case["codes"]
                .as_str()
                .unwrap()
                .chars()
                .map(|c| match c {
                    '-' => f32::NEG_INFINITY,
                    d => values[d.to_digit(10).unwrap() as usize],
                })
                .collect();
            let sets = case["sets"].as_array().unwrap();
            for (k, want) in case["ks"].as_array().unwrap().iter().zip(sets) {
                let k = k.as_u64().unwrap() as usize;
                let want: Vec<usize> = want
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as usize)
                    .collect();
                let got = torch_topk_set(&row, k);
                assert_eq!(got, want, "n {} k {k}: {:?}", row.len(), case["codes"]);
                checked += 1;
                heap += usize::from(k * 64 <= row.len() && k < row.len());
                // A selection that "lowest index first" would get wrong.
                let mut by_rank: Vec<usize> = (0..row.len()).collect();
                by_rank.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                let mut naive = by_rank[..k].to_vec();
                naive.sort_unstable();
                tied += usize::from(naive != want);
            }
        }
        assert!(
            checked > 500 && heap > 10,
            "{checked} selections, {heap} on the heap"
        );
        assert!(
            tied > 50,
            "only {tied} selections differ from lowest-index-first"
        );
    }

    #[test]
    fn without_ties_it_is_the_k_largest() {
        let row: Vec<f32> = (0..300).map(|i| ((i * 37) % 301) as f32).collect();
        for k in [1, 4, 5, 100, 299, 300, 400] {
            let mut want: Vec<usize> = (0..300).collect();
            want.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            want.truncate(k.min(300));
            want.sort_unstable();
            assert_eq!(torch_topk_set(&row, k), want, "k {k}");
        }
        assert!(torch_topk_set(&row, 0).is_empty());
    }
}
