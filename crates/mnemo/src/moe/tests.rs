use super::*;

/// A layer that is only a router (`W_g: [E, d]` at offset 0), for the balancing tests.
fn router_only(d: usize, e: usize, k: usize) -> (MoeSpec, MoeOffsets) {
    let spec = MoeSpec {
        d,
        inter: 1,
        n_shared: 0,
        n_experts: e,
        top_k: k,
        score: ScoreFunc::Sqrtsoftplus,
        scale: 1.0,
        norm_topk: true,
        aux_coef: 0.0,
        limit: 0.0,
        act_quant: [None; 5],
        weight_before_w2: false,
        n_group: 0,
        topk_group: 0,
    };
    let o = MoeOffsets {
        gate: 0,
        bias: e * d,
        shared_w13: 0,
        shared_w2: 0,
        experts: 0,
        hash: false,
    };
    (spec, o)
}

#[test]
fn top_k_respects_bias_and_ties() {
    let s = [0.1, 0.5, 0.5, 0.2];
    let mut sel = [0u32; 2];
    top_k(&s, &[0.0; 4], &mut sel);
    assert_eq!(sel, [1, 2]);
    top_k(&s, &[0.0, 0.0, 0.0, 0.4], &mut sel);
    assert_eq!(sel, [3, 1]);
}

/// Scores with a large common mode (every token prefers the same experts) and a small
/// token-specific part, as early in training: one sign step leaves the collapse, the
/// refit on the same scores balances it.
#[test]
fn fit_bias_balances_a_collapsed_batch() {
    use crate::rng::Rng;
    let (n, e, k) = (2048, 16, 2);
    let mut r = Rng::new(5);
    let common: Vec<f32> = (0..e).map(|j| 0.8 + 0.05 * j as f32).collect();
    let mut noise = vec![0.0f32; n * e];
    r.fill_normal(&mut noise, 0.01);
    let scores: Vec<f32> = (0..n * e).map(|i| common[i % e] + noise[i]).collect();
    let load_of = |bias: &[f32]| topk_load(&scores, bias, k);
    let mut one = vec![0.0f32; e];
    let l0 = load_of(&one);
    update_bias(&mut one, &l0, 0.01);
    assert!(
        load_stats(&load_of(&one)).0 > 7.0,
        "one step cannot undo the collapse"
    );
    let mut fit = vec![0.0f32; e];
    fit_bias(&mut fit, &scores, k, 16, 0);
    let (mx, mn) = load_stats(&load_of(&fit));
    assert!(
        mx < 1.5 && mn > 0.5,
        "refitted load max {mx:.2} min {mn:.2}"
    );
    // The exact hard-load sweeps close the gap the soft (softmax) model leaves: every
    // expert gets its share of this batch to within a few tokens.
    let mut hard = vec![0.0f32; e];
    fit_bias(&mut hard, &scores, k, 16, 8);
    let (hx, hn) = load_stats(&load_of(&hard));
    assert!(
        hx < mx && hx < 1.03 && hn > 0.97,
        "soft fit max {mx:.3} min {mn:.3}, with hard sweeps max {hx:.3} min {hn:.3}"
    );
    eprintln!("soft fit max {mx:.3} min {mn:.3}, with hard sweeps max {hx:.3} min {hn:.3}");
    // From a bias that starves one expert, with a soft fit far from converged (one
    // round): the sweeps still balance, where a step on ln(load) would overshoot (an
    // empty expert's ln(target / ½) is large next to the scores' spread).
    let mut starved = vec![0.0f32; e];
    starved[e - 1] = -1.0;
    fit_bias(&mut starved, &scores, k, 1, 3);
    let (sx, sn) = load_stats(&load_of(&starved));
    assert!(
        sx < 1.03 && sn > 0.97,
        "from a starved expert: max {sx:.3} min {sn:.3}"
    );
}

/// A drifting stream of batches like the real corpus gives: each batch holds a few
/// documents of a few kinds, each kind preferring its own experts, on top of a common mode
/// that drifts. Every batch is routed with the bias left by the previous ones, then the
/// bias takes the sign step and the refit. Jumping to each batch's fit (`rate = 1`)
/// carries that batch's composition into the next one's routing; averaging the fits
/// (`rate = 0.2`) lowers the max share per batch and over 10-batch windows.
#[test]
fn refit_rate_below_one_balances_a_drifting_stream_better() {
    use crate::rng::Rng;
    let (e, k, docs, doc_len, kinds) = (16, 2, 4, 128, 6);
    let n = docs * doc_len;
    let run = |rate: f32| {
        let mut r = Rng::new(11);
        let mut pref = vec![0.0f32; kinds * e];
        r.fill_normal(&mut pref, 0.05);
        let mut drift = vec![0.0f32; e];
        r.fill_normal(&mut drift, 0.004);
        let mut bias = vec![0.0f32; e];
        let (mut per_batch, mut windows) = (Vec::new(), Vec::new());
        let mut acc = vec![0u64; e];
        let mut noise = vec![0.0f32; n * e];
        for t in 0..120 {
            r.fill_normal(&mut noise, 0.03);
            let mut s = vec![0.0f32; n * e];
            for d in 0..docs {
                let kind = r.below(kinds as u64) as usize;
                for i in d * doc_len..(d + 1) * doc_len {
                    for j in 0..e {
                        s[i * e + j] =
                            0.6 + drift[j] * t as f32 + pref[kind * e + j] + noise[i * e + j];
                    }
                }
            }
            let load = topk_load(&s, &bias, k);
            if t >= 20 {
                per_batch.push(load_stats(&load).0);
                acc.iter_mut().zip(&load).for_each(|(a, l)| *a += l);
                if (t + 1) % 10 == 0 {
                    windows.push(load_stats(&acc).0);
                    acc.iter_mut().for_each(|a| *a = 0);
                }
            }
            update_bias(&mut bias, &load, 0.01);
            refit_bias(&mut bias, &s, k, 16, 0, rate);
        }
        let mean = per_batch.iter().sum::<f64>() / per_batch.len() as f64;
        let worst_window = windows.iter().cloned().fold(0.0, f64::max);
        (mean, worst_window)
    };
    let (old_mean, old_win) = run(1.0);
    let (new_mean, new_win) = run(0.2);
    assert!(
        new_mean < 0.9 * old_mean && new_win < old_win,
        "per batch {old_mean:.3} -> {new_mean:.3}, worst 10-batch window {old_win:.3} -> {new_win:.3}"
    );
    eprintln!(
        "per batch {old_mean:.3} -> {new_mean:.3}, worst window {old_win:.3} -> {new_win:.3}"
    );
}

/// A router whose weights drift in a persistent direction every step, over inputs that
/// share a common mode (as in training): refitting to the batch just routed as the
/// *updated* router scores it (`bias_fit_rescore`) leaves the next batch better balanced
/// than refitting to the stale scores, which always lag one step of drift.
#[test]
fn refit_on_rescored_batch_follows_a_drifting_router() {
    use crate::rng::Rng;
    let (d, e, k, n) = (16, 16, 2, 512);
    let (spec, o) = router_only(d, e, k);
    let run = |rescore: bool| {
        let mut r = Rng::new(3);
        let mut w = vec![0.0f32; e * d];
        r.fill_normal(&mut w, 0.3);
        let mut dw = vec![0.0f32; e * d];
        r.fill_normal(&mut dw, 0.02);
        let mut mu = vec![0.0f32; d];
        r.fill_normal(&mut mu, 1.0);
        let mut bias = vec![0.0f32; e];
        let mut per_batch = Vec::new();
        for t in 0..80 {
            let mut f = vec![0.0f32; n * d];
            r.fill_normal(&mut f, 0.3);
            f.iter_mut().enumerate().for_each(|(i, x)| *x += mu[i % d]);
            let s = router_scores(&spec, &w, &o, &f);
            let load = topk_load(&s, &bias, k);
            if t >= 10 {
                per_batch.push(load_stats(&load).0);
            }
            // The optimizer step, then the balancing.
            w.iter_mut().zip(&dw).for_each(|(w, dw)| *w += dw);
            update_bias(&mut bias, &load, 0.01);
            let s = if rescore {
                router_scores(&spec, &w, &o, &f)
            } else {
                s
            };
            refit_bias(&mut bias, &s, k, 16, 0, 1.0);
        }
        per_batch.iter().sum::<f64>() / per_batch.len() as f64
    };
    let (stale, fresh) = (run(false), run(true));
    assert!(
        fresh < 0.9 * stale,
        "mean max share per batch {stale:.3} -> {fresh:.3}"
    );
    eprintln!("mean max share per batch: stale {stale:.3} -> rescored {fresh:.3}");
}

/// The pool keeps every `stride`-th row of the last `window` batches and survives the
/// round trip through its checkpoint parts; parts that do not fit are refused.
#[test]
fn bias_pool_keeps_a_strided_window_and_round_trips() {
    let d = 3;
    let batch =
        |v: f32, n: usize| -> Vec<f32> { (0..n * d).map(|i| v + (i / d) as f32 * 0.01).collect() };
    let mut p = BiasPool::new(2, 2, d);
    p.push(&batch(1.0, 5)); // rows 0, 2, 4
    assert_eq!(p.rows(), 3);
    assert_eq!(&p.joined()[3..6], &[1.02; 3]);
    p.push(&batch(2.0, 4)); // the offset moved: rows 1, 3
    p.push(&batch(3.0, 2)); // row 0; the first batch leaves
    assert_eq!((p.rows(), p.len()), (3, 2));
    assert_eq!(p.joined()[0], 2.01);
    assert_eq!(p.joined()[3], 2.03);
    assert_eq!(p.joined()[6], 3.0);
    let (x, rows, offset) = p.to_parts();
    assert_eq!((rows.clone(), offset), (vec![2, 1], 1));
    let back = BiasPool::from_parts(2, 2, d, &x, &rows, offset);
    assert_eq!(back, Some(p.clone()));
    // The restored pool continues where the saved one would.
    let (mut a, mut b) = (p.clone(), back.unwrap_or_default());
    a.push(&batch(4.0, 4));
    b.push(&batch(4.0, 4));
    assert_eq!(a, b);
    assert_eq!(BiasPool::from_parts(2, 2, d, &x[1..], &rows, 0), None);
    assert_eq!(BiasPool::from_parts(1, 2, d, &x, &rows, 0), None);
    assert_eq!(BiasPool::from_parts(2, 2, d, &x, &rows, 2), None);
    // Window 0 keeps nothing.
    let mut off = BiasPool::new(0, 1, d);
    off.push(&batch(1.0, 4));
    assert_eq!(off.rows(), 0);
}

/// Documents of a few kinds, each pulling the router input its own way, under a router
/// that drifts every step: a bias refitted to the last batch (re-scored) carries that
/// batch's handful of documents, while a bias fitted to the re-scored pool of the last 16
/// batches balances held-out text of every kind (the global load) far better.
#[test]
fn pooled_refit_balances_held_out_text_better_than_the_last_batch() {
    use crate::rng::Rng;
    let (d, e, k, kinds, docs, doc_len) = (16, 16, 2, 6, 4, 64);
    let (spec, o) = router_only(d, e, k);
    let run = |window: usize| {
        let mut r = Rng::new(5);
        let mut w = vec![0.0f32; e * d];
        r.fill_normal(&mut w, 0.3);
        let mut dw = vec![0.0f32; e * d];
        r.fill_normal(&mut dw, 0.005);
        let mut mu = vec![0.0f32; d];
        r.fill_normal(&mut mu, 1.0);
        let mut kind_mu = vec![0.0f32; kinds * d];
        r.fill_normal(&mut kind_mu, 0.6);
        let doc = |r: &mut Rng, kind: usize, len: usize| {
            let mut f = vec![0.0f32; len * d];
            r.fill_normal(&mut f, 0.3);
            for (i, x) in f.iter_mut().enumerate() {
                *x += mu[i % d] + kind_mu[kind * d + i % d];
            }
            f
        };
        // Held-out text: every kind equally.
        let held: Vec<f32> = (0..kinds * 8)
            .flat_map(|i| doc(&mut r, i % kinds, 32))
            .collect();
        let mut pool = BiasPool::new(window, 4, d);
        let mut bias = vec![0.0f32; e];
        let mut global = Vec::new();
        for t in 0..100 {
            let f: Vec<f32> = (0..docs)
                .flat_map(|_| {
                    let kind = r.below(kinds as u64) as usize;
                    doc(&mut r, kind, doc_len)
                })
                .collect();
            let s = router_scores(&spec, &w, &o, &f);
            let load = topk_load(&s, &bias, k);
            // The optimizer step, then the balancing on the re-scored batch or pool.
            w.iter_mut().zip(&dw).for_each(|(w, dw)| *w += dw);
            update_bias(&mut bias, &load, 0.01);
            let s = if window > 0 {
                pool.push(&f);
                router_scores(&spec, &w, &o, &pool.joined())
            } else {
                router_scores(&spec, &w, &o, &f)
            };
            refit_bias(&mut bias, &s, k, 16, 8, 1.0);
            if t >= 20 {
                let hs = router_scores(&spec, &w, &o, &held);
                let hl = topk_load(&hs, &bias, k);
                global.push(load_stats(&hl).0);
            }
        }
        let mean = global.iter().sum::<f64>() / global.len() as f64;
        (mean, global.iter().cloned().fold(0.0, f64::max))
    };
    let (last, pooled) = (run(0), run(16));
    assert!(
        pooled.0 < 0.85 * last.0 && pooled.1 < last.1,
        "held-out max share mean/worst: last batch {last:.3?}, pool of 16 {pooled:.3?}"
    );
    eprintln!("held-out max share mean/worst: last batch {last:.3?}, pool of 16 {pooled:.3?}");
}

/// The refit leaves a zero-mean bias (the common shift does not change any selection and
/// would otherwise drift up step after step) and the same selections as before centring.
#[test]
fn fit_bias_is_centred_and_selection_invariant() {
    let (n, e, k) = (256, 8, 2);
    let mut rng = crate::rng::Rng::new(11);
    // Uneven scores: expert 0 is everyone's favourite.
    let scores: Vec<f32> = (0..n * e)
        .map(|i| rng.next_f64() as f32 * 0.1 + if i % e == 0 { 0.5 } else { 0.0 })
        .collect();
    let mut bias = vec![3.0f32; e];
    for _ in 0..50 {
        fit_bias(&mut bias, &scores, k, 16, 8);
    }
    let mean = bias.iter().sum::<f32>() / e as f32;
    assert!(mean.abs() < 1e-4, "mean bias {mean}");
    // A shifted copy selects exactly the same experts.
    let shifted: Vec<f32> = bias.iter().map(|b| b + 40.0).collect();
    let (mut a, mut b) = (vec![0u32; k], vec![0u32; k]);
    for row in scores.chunks_exact(e) {
        top_k(row, &bias, &mut a);
        top_k(row, &shifted, &mut b);
        assert_eq!(a, b);
    }
}

#[test]
fn bias_moves_toward_balance() {
    let mut b = vec![0.0; 3];
    update_bias(&mut b, &[10, 5, 3], 0.01);
    assert_eq!(b, vec![-0.01, 0.01, 0.01]); // mean 6: only expert 0 is over
    assert_eq!(load_stats(&[10, 5, 3]), (10.0 / 6.0, 3.0 / 6.0));
}

#[test]
fn score_gradients_match_finite_differences() {
    for f in [ScoreFunc::Sigmoid, ScoreFunc::Sqrtsoftplus] {
        for &x in &[-3.0f32, -0.5, 0.0, 0.7, 4.0] {
            let h = 1e-3;
            let num = (score_fn(f, x + h) - score_fn(f, x - h)) / (2.0 * h);
            let ana = score_grad(f, x, score_fn(f, x));
            assert!((num - ana).abs() < 1e-3, "{f:?} at {x}: {num} vs {ana}");
        }
    }
}

/// Finite differences through the whole layer (router, gate weights, shared and routed
/// experts, balance loss). The selection bias separates experts 0 and 1 from the rest by far
/// more than any score, so the selection is constant and the loss smooth.
#[test]
fn moe_layer_gradients_match_finite_differences() {
    use crate::kernels::gradcheck::check;
    use crate::rng::Rng;
    for (score, norm, aux, shared, limit) in [
        (ScoreFunc::Sigmoid, true, 0.0, 1),
        (ScoreFunc::Sqrtsoftplus, false, 0.3, 0),
        (ScoreFunc::Sqrtsoftplus, true, 0.3, 2),
        (ScoreFunc::Softmax, false, 0.0, 1),
    ]
    .into_iter()
    .flat_map(|(s, n, a, sh)| [(s, n, a, sh, 0.0f32), (s, n, a, sh, 2.5)])
    {
        let spec = MoeSpec {
            d: 6,
            inter: 4,
            n_shared: shared,
            n_experts: 5,
            top_k: 2,
            score,
            scale: 1.7,
            norm_topk: norm,
            aux_coef: aux,
            limit,
            act_quant: [None; 5],
            weight_before_w2: false,
            n_group: 0,
            topk_group: 0,
        };
        let (d, i, e) = (spec.d, spec.inter, spec.n_experts);
        let si = shared * i;
        let o = MoeOffsets {
            gate: 0,
            bias: e * d,
            shared_w13: e * d + e,
            shared_w2: e * d + e + 2 * si * d,
            experts: e * d + e + 3 * si * d,
            hash: false,
        };
        let total = o.experts + e * spec.expert_len();
        let mut r = Rng::new(21);
        let mut params = vec![0.0f32; total];
        r.fill_normal(&mut params, 0.5);
        params[o.bias..o.bias + e].copy_from_slice(&[30.0, 20.0, 0.0, 0.0, 0.0]);
        let (b, t) = (2, 3);
        let n = b * t;
        let tokens: Vec<u32> = (0..n as u32).collect();
        let mut f = vec![0.0f32; n * d];
        let mut g = vec![0.0f32; n * d];
        r.fill_normal(&mut f, 1.0);
        r.fill_normal(&mut g, 1.0);
        let loss = |p: &[f32], f: &[f32]| {
            let mut acts = MoeActs::default();
            let mut y = vec![0.0f32; n * d];
            forward(&spec, p, &o, f, &tokens, None, t, &mut acts, &mut y);
            y.iter()
                .zip(&g)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                + acts.aux_loss
        };
        let mut acts = MoeActs::default();
        let mut y = vec![0.0f32; n * d];
        forward(&spec, &params, &o, &f, &tokens, None, t, &mut acts, &mut y);
        assert!(acts.sel.chunks(2).all(|s| s.contains(&0) && s.contains(&1)));
        let mut grads = vec![0.0f32; total];
        let mut df = vec![0.0f32; n * d];
        backward(
            &spec, &params, &mut grads, &o, &f, &acts, &g, &mut df, t, 1.0,
        );
        assert!(
            grads[o.bias..o.bias + e].iter().all(|&x| x == 0.0),
            "the bias gets no gradient"
        );
        let mut trainable = params.clone();
        let mut tg = grads.clone();
        // Exclude the bias from the check (it is not differentiable-in-use).
        trainable.drain(o.bias..o.bias + e);
        tg.drain(o.bias..o.bias + e);
        let with_bias = |p: &[f32]| {
            let mut full = p[..o.bias].to_vec();
            full.extend_from_slice(&params[o.bias..o.bias + e]);
            full.extend_from_slice(&p[o.bias..]);
            full
        };
        check(&trainable, &tg, |p| loss(&with_bias(p), &f), 1e-2, 5e-3);
        check(&f, &df, |x| loss(&params, x), 1e-2, 5e-3);
    }
}

/// The refit with its token loops on the calling thread (as the model runs it, one layer per
/// task) gives the parallel refit's bits, on a sample large enough (3,000 rows) that the
/// parallel one splits both its soft rounds and its hard sweeps.
#[test]
fn serial_and_parallel_refits_give_the_same_bits() {
    let (n, e, k) = (3000, 8, 2);
    let mut rng = crate::rng::Rng::new(12);
    let scores: Vec<f32> = (0..n * e)
        .map(|i| rng.next_f64() as f32 * 0.2 + if i % e == 1 { 0.3 } else { 0.0 })
        .collect();
    let start: Vec<f32> = (0..e).map(|j| 0.01 * j as f32).collect();
    for rate in [1.0, 0.5] {
        let (mut a, mut b) = (start.clone(), start.clone());
        refit_bias_in(&mut a, &scores, k, 16, 8, rate, true);
        refit_bias_in(&mut b, &scores, k, 16, 8, rate, false);
        assert_eq!(a, b, "rate {rate}");
        assert_ne!(a, start);
    }
}
