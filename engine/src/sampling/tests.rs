//! Unit tables for the sampler and its parameters.
use super::*;

fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams::default();
    f(&mut p);
    p
}

/// A pseudo-random logits row of vocabulary size.
fn row(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Xoshiro256::new(seed);
    (0..n).map(|_| (r.next_f64() * 20.0 - 10.0) as f32).collect()
}

/// Empirical frequencies of `draws` samples.
fn histogram(p: &SamplingParams, logits: &[f32], draws: usize) -> Vec<usize> {
    let mut s = Sampler::new(p);
    let mut h = vec![0; logits.len()];
    for _ in 0..draws {
        h[s.sample(logits, &[], &[]).id as usize] += 1;
    }
    h
}

#[test]
fn xoshiro_reference_values() {
    // Reference outputs of xoshiro256** for state {1, 2, 3, 4}.
    let mut r = Xoshiro256 { s: [1, 2, 3, 4] };
    let got: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
    assert_eq!(got, vec![11520, 0, 1509978240]);
    let mut a = Xoshiro256::new(7);
    let mut b = Xoshiro256::new(7);
    for _ in 0..100 {
        let x = a.next_f64();
        assert!((0.0..1.0).contains(&x));
        assert_eq!(x, b.next_f64());
    }
}

#[test]
fn greedy_takes_argmax_lowest_id_on_ties() {
    let mut s = Sampler::new(&params(|p| p.temperature = 0.0));
    assert_eq!(s.sample(&[0.5, 2.0, -1.0, 2.0], &[], &[]).id, 1);
    assert_eq!(s.sample(&[f32::NAN, -3.0, -2.0], &[], &[]).id, 2);
    let big = row(49152, 3);
    let want = big.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0;
    assert_eq!(s.sample(&big, &[], &[]).id as usize, want);
}

#[test]
fn top_k_one_equals_greedy() {
    let logits = row(49152, 11);
    let greedy = Sampler::new(&params(|p| p.temperature = 0.0)).sample(&logits, &[], &[]).id;
    let mut s = Sampler::new(&params(|p| {
        p.top_k = 1;
        p.temperature = 1.5;
        p.seed = Some(1);
    }));
    for _ in 0..20 {
        assert_eq!(s.sample(&logits, &[], &[]).id, greedy);
    }
}

#[test]
fn seeded_sampling_is_reproducible() {
    let logits = row(49152, 5);
    let p = params(|p| {
        p.temperature = 1.0;
        p.seed = Some(42);
    });
    let run = |p: &SamplingParams| {
        let mut s = Sampler::new(p);
        (0..50).map(|_| s.sample(&logits, &[], &[]).id).collect::<Vec<_>>()
    };
    let a = run(&p);
    assert_eq!(a, run(&p));
    assert_ne!(a, run(&params(|q| q.seed = Some(43))));
    for variant in [
        params(|q| {
            q.seed = Some(9);
            q.top_k = 50
        }),
        params(|q| {
            q.seed = Some(9);
            q.top_p = 0.9
        }),
        params(|q| {
            q.seed = Some(9);
            q.min_p = 0.05
        }),
    ] {
        assert_eq!(run(&variant), run(&variant));
    }
}

#[test]
fn sampling_follows_the_distribution() {
    // p = softmax(ln [0.1, 0.2, 0.3, 0.4]).
    let logits: Vec<f32> = [0.1f32, 0.2, 0.3, 0.4].iter().map(|p| p.ln()).collect();
    let draws = 40_000;
    let h = histogram(&params(|p| p.seed = Some(3)), &logits, draws);
    for (i, &c) in h.iter().enumerate() {
        let f = c as f64 / draws as f64;
        assert!((f - 0.1 * (i + 1) as f64).abs() < 0.01, "token {i}: {f}");
    }
    // Temperature 0.5 squares the probabilities: [1, 4, 9, 16] / 30.
    let h = histogram(
        &params(|p| {
            p.seed = Some(4);
            p.temperature = 0.5
        }),
        &logits,
        draws,
    );
    for (i, &c) in h.iter().enumerate() {
        let want = ((i + 1) * (i + 1)) as f64 / 30.0;
        assert!((c as f64 / draws as f64 - want).abs() < 0.01, "token {i}");
    }
}

#[test]
fn top_k_top_p_min_p_filter() {
    let logits: Vec<f32> = [0.05f32, 0.1, 0.15, 0.3, 0.4].iter().map(|p| p.ln()).collect();
    let seen = |p: SamplingParams| -> Vec<usize> {
        let h = histogram(&p, &logits, 5_000);
        (0..h.len()).filter(|&i| h[i] > 0).collect()
    };
    assert_eq!(
        seen(params(|p| {
            p.seed = Some(1);
            p.top_k = 2
        })),
        vec![3, 4]
    );
    // Mass before token 3 is 0.4 < 0.5 → kept; before token 2 is 0.7 → dropped.
    assert_eq!(
        seen(params(|p| {
            p.seed = Some(1);
            p.top_p = 0.5
        })),
        vec![3, 4]
    );
    assert_eq!(
        seen(params(|p| {
            p.seed = Some(1);
            p.top_p = 0.75
        })),
        vec![2, 3, 4]
    );
    assert_eq!(
        seen(params(|p| {
            p.seed = Some(1);
            p.top_p = 0.01
        })),
        vec![4]
    );
    // min_p 0.3 keeps p >= 0.12.
    assert_eq!(
        seen(params(|p| {
            p.seed = Some(1);
            p.min_p = 0.3
        })),
        vec![2, 3, 4]
    );
    // min_p after top_k: relative to the max, so top_k=4 and min_p=0.3 → {2, 3, 4}.
    assert_eq!(
        seen(params(|p| {
            p.seed = Some(1);
            p.top_k = 4;
            p.min_p = 0.3
        })),
        vec![2, 3, 4]
    );
    assert_eq!(
        seen(params(|p| {
            p.seed = Some(1);
            p.min_p = 1.0
        })),
        vec![4]
    );
}

#[test]
fn top_p_on_a_large_vocab_matches_a_full_sort() {
    let logits = row(49152, 21);
    let top_p = 0.3f32;
    // Reference nucleus with a full sort.
    let mut order: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let max = order[0].1;
    let w: Vec<f64> = order.iter().map(|&(_, l)| ((l - max) as f64).exp()).collect();
    let total: f64 = w.iter().sum();
    let mut acc = 0.0;
    let mut nucleus = std::collections::HashSet::new();
    for (i, &(id, _)) in order.iter().enumerate() {
        if acc >= top_p as f64 * total {
            break;
        }
        acc += w[i];
        nucleus.insert(id);
    }
    assert!(nucleus.len() > 64, "test should need more than one doubling step");
    let mut s = Sampler::new(&params(|p| {
        p.seed = Some(8);
        p.top_p = top_p
    }));
    for _ in 0..2000 {
        assert!(nucleus.contains(&s.sample(&logits, &[], &[]).id));
    }
}

#[test]
fn rank_keys_order_like_logits() {
    let vals = [f32::NEG_INFINITY, -3.5, -0.0, 0.0, 1e-30, 2.0, 2.0, f32::INFINITY];
    for (i, &a) in vals.iter().enumerate() {
        for (j, &b) in vals.iter().enumerate() {
            let want = a.total_cmp(&b).then((j as u32).cmp(&(i as u32)));
            assert_eq!(rank_key(a, i as u32).cmp(&rank_key(b, j as u32)), want, "{a} {b}");
        }
        assert_eq!(key_id(rank_key(a, i as u32)), i as u32);
    }
}

#[test]
fn top_keys_matches_a_full_sort() {
    let mut logits = row(5000, 12);
    logits[7] = f32::NEG_INFINITY;
    logits[9] = logits[10];
    let mut all: Vec<u64> =
        logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| rank_key(l, i as u32)).collect();
    all.sort_by(|a, b| b.cmp(a));
    let mut keys = Vec::new();
    for k in [1, 2, 31, 64, 65, 1000, 4998, 4999, 5000, 6000] {
        top_keys(&logits, k, &mut keys);
        keys.sort_by(|a, b| b.cmp(a));
        assert_eq!(keys, all[..k.min(all.len())].to_vec(), "k={k}");
    }
    // Rising rows refill the buffer many times.
    let rising: Vec<f32> = (0..3000).map(|i| i as f32).collect();
    top_keys(&rising, 3, &mut keys);
    keys.sort_by(|a, b| b.cmp(a));
    assert_eq!(keys.iter().map(|&k| key_id(k)).collect::<Vec<_>>(), vec![2999, 2998, 2997]);
}

#[test]
fn nucleus_len_matches_a_full_sort() {
    for (n, seed) in [(1usize, 1u64), (10, 2), (64, 3), (65, 4), (1000, 5), (49152, 6)] {
        let logits = row(n, seed);
        let max = max_value(&logits);
        let weights: Vec<f32> = logits.iter().map(|&l| exp_fast(l - max)).collect();
        let weight = |k: u64| weights[key_id(k) as usize];
        let keys: Vec<u64> = logits.iter().enumerate().map(|(i, &l)| rank_key(l, i as u32)).collect();
        let mut sorted = keys.clone();
        sorted.sort_by(|a, b| b.cmp(a));
        let total: f64 = weights.iter().map(|&w| w as f64).sum();
        for top_p in [1e-6, 0.01, 0.1, 0.3, 0.5, 0.9, 0.99, 1.0] {
            let budget = top_p * total;
            let mut acc = 0.0;
            let mut want = sorted.len();
            for (i, &k) in sorted.iter().enumerate() {
                if acc >= budget {
                    want = i.max(1);
                    break;
                }
                acc += weight(k) as f64;
            }
            let mut work = keys.clone();
            let got = nucleus_len(&mut work, budget, weight);
            // Float sums in a different order may move the cut by one token.
            assert!(got.abs_diff(want) <= 1, "n={n} top_p={top_p}: {got} vs {want}");
            let mut kept = work[..got].to_vec();
            kept.sort_by(|a, b| b.cmp(a));
            assert_eq!(kept, sorted[..got].to_vec(), "n={n} top_p={top_p}: kept set is not the head");
        }
    }
}

#[test]
fn fast_exp_is_accurate() {
    let mut x = -90.0f32;
    while x <= 10.0 {
        let want = (x as f64).exp();
        let got = exp_fast(x) as f64;
        if x < -87.33 {
            assert_eq!(got, 0.0);
        } else {
            assert!(((got - want) / want).abs() < 4e-7, "x={x}: {got} vs {want}");
        }
        x += 0.0137;
    }
    assert_eq!(exp_fast(0.0), 1.0);
    assert_eq!(exp_fast(f32::NEG_INFINITY), 0.0);
    assert_eq!(max_value(&[f32::NAN, 1.0, 3.0, 2.0, f32::NAN, 0.0, -1.0, 2.5, 2.9, 3.0]), 3.0);
    assert_eq!(argmax(&[1.0, 3.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0]), 1);
}

#[test]
fn penalties_change_the_right_logits() {
    let logits = [2.0f32, -2.0, 1.0, 0.5, 3.0];
    let run = |p: SamplingParams, prompt: &[u32], gen: &[u32]| {
        let mut s = Sampler::new(&p);
        s.work = logits.to_vec();
        s.apply_penalties(prompt, gen);
        s.work.clone()
    };
    let rep = run(params(|p| p.repetition_penalty = 2.0), &[0, 1, 1], &[4, 99]);
    assert_eq!(rep, vec![1.0, -4.0, 1.0, 0.5, 1.5]);
    let freq = run(params(|p| p.frequency_penalty = 0.5), &[2], &[3, 3, 0, 3]);
    assert_eq!(freq, vec![1.5, -2.0, 1.0, -1.0, 3.0]);
    let pres = run(params(|p| p.presence_penalty = 1.0), &[2], &[3, 3, 0]);
    assert_eq!(pres, vec![1.0, -2.0, 1.0, -0.5, 3.0]);
    let both = run(
        params(|p| {
            p.presence_penalty = -1.0;
            p.frequency_penalty = 1.0
        }),
        &[],
        &[1, 1],
    );
    assert_eq!(both, vec![2.0, -3.0, 1.0, 0.5, 3.0]);
    // Scratch state is clean for the next call.
    let mut s = Sampler::new(&params(|p| {
        p.repetition_penalty = 2.0;
        p.frequency_penalty = 1.0
    }));
    s.work = logits.to_vec();
    s.apply_penalties(&[0], &[0]);
    assert!(s.seen.iter().all(|&x| !x) && s.counts.iter().all(|&c| c == 0));
    // Greedy honours penalties: token 4 (3.0) loses to token 0 (2.0) after a 2x penalty.
    let mut g = Sampler::new(&params(|p| {
        p.temperature = 0.0;
        p.repetition_penalty = 2.0
    }));
    assert_eq!(g.sample(&logits, &[], &[4]).id, 0);
}

#[test]
fn logprobs_are_raw_log_softmax() {
    let logits = [1.0f32, 3.0, 2.0, 3.0];
    let mut s = Sampler::new(&params(|p| {
        p.temperature = 0.0;
        p.repetition_penalty = 2.0;
        p.logprobs = Some(3);
    }));
    let out = s.sample(&logits, &[1, 3], &[]);
    let lse = logits.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
    let lp = |i: usize| (logits[i] as f64 - lse) as f32;
    // Penalised, 2 wins; its logprob is from the raw row.
    assert_eq!(out.id, 2);
    assert!((out.logprob - lp(2)).abs() < 1e-6);
    let ids: Vec<u32> = out.top_logprobs.iter().map(|x| x.0).collect();
    assert_eq!(ids, vec![1, 3, 2]);
    for &(i, l) in &out.top_logprobs {
        assert!((l - lp(i as usize)).abs() < 1e-6);
    }
    let none = Sampler::new(&params(|p| p.temperature = 0.0)).sample(&logits, &[], &[]);
    assert!(none.top_logprobs.is_empty());
    assert_eq!(top_n(&[1.0, 5.0, 5.0, f32::NAN, 2.0], 10), vec![(1, 5.0), (2, 5.0), (4, 2.0), (0, 1.0)]);
}

#[test]
fn degenerate_rows_do_not_panic() {
    let mut s = Sampler::new(&params(|p| p.seed = Some(1)));
    assert_eq!(s.sample(&[], &[], &[]).id, 0);
    assert_eq!(s.sample(&[f32::NEG_INFINITY; 4], &[7], &[9]).id, 0);
    assert_eq!(s.sample(&[f32::NAN, 0.0, f32::NAN], &[], &[]).id, 1);
    let mut k = Sampler::new(&params(|p| {
        p.seed = Some(1);
        p.top_k = 3;
        p.top_p = 0.5
    }));
    assert_eq!(k.sample(&[f32::NEG_INFINITY, 1.0], &[], &[]).id, 1);
}

#[test]
fn validation_errors() {
    let v = 100;
    assert!(SamplingParams::default().validate(v).is_ok());
    let cases: Vec<(SamplingParams, &str)> = vec![
        (params(|p| p.temperature = -0.1), "temperature"),
        (params(|p| p.temperature = f32::NAN), "temperature"),
        (params(|p| p.temperature = f32::INFINITY), "temperature"),
        (params(|p| p.top_p = 0.0), "top_p"),
        (params(|p| p.top_p = 1.01), "top_p"),
        (params(|p| p.top_p = f32::NAN), "top_p"),
        (params(|p| p.min_p = -0.01), "min_p"),
        (params(|p| p.min_p = 1.5), "min_p"),
        (params(|p| p.repetition_penalty = 0.0), "repetition_penalty"),
        (params(|p| p.repetition_penalty = -1.0), "repetition_penalty"),
        (params(|p| p.presence_penalty = 2.5), "presence_penalty"),
        (params(|p| p.frequency_penalty = -2.01), "frequency_penalty"),
        (params(|p| p.frequency_penalty = f32::NAN), "frequency_penalty"),
        (params(|p| p.max_tokens = 0), "max_tokens"),
        (params(|p| p.logprobs = Some(21)), "logprobs"),
        (params(|p| p.stop_token_ids = vec![3, 100]), "stop_token_ids"),
        (params(|p| p.stop = vec![String::new()]), "stop"),
    ];
    for (p, field) in cases {
        match p.validate(v) {
            Err(EngineError::InvalidRequest(msg)) => assert!(msg.contains(field), "{field}: {msg}"),
            other => panic!("{field}: expected InvalidRequest, got {other:?}"),
        }
    }
    let edge = params(|p| {
        p.temperature = 0.0;
        p.top_p = 1.0;
        p.min_p = 1.0;
        p.presence_penalty = -2.0;
        p.frequency_penalty = 2.0;
        p.logprobs = Some(20);
        p.stop_token_ids = vec![99];
    });
    assert!(edge.validate(v).is_ok());
}

#[test]
fn sampler_moves_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Sampler>();
    assert_send_sync::<SamplingParams>();
}

#[test]
fn params_deserialize_with_defaults() {
    let p: SamplingParams = serde_json::from_str(r#"{"temperature":0.7,"stop":["\n"]}"#).unwrap();
    assert_eq!(p.temperature, 0.7);
    assert_eq!(p.stop, vec!["\n".to_string()]);
    assert_eq!(p.max_tokens, SamplingParams::default().max_tokens);
}
