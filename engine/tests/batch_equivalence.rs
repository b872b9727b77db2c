//! A batched forward over many sequences equals running each sequence alone.
//!
//! Three sequences go through three steps that mix prefill chunks and decode
//! tokens in one flat batch, with block tables interleaved in the pool; every
//! token's logits must equal those of the same sequence prefilled alone in a
//! cache of its own.

use std::path::PathBuf;

use tandem_engine::kv_cache::{blocks_for_tokens, BlockId, KvCache, KvDtype};
use tandem_engine::model::{ForwardBatch, LogitsWanted, Model, ModelOptions, Scratch};

fn model() -> Model {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "model missing: run scripts/fetch-model.sh first");
    Model::load(&path, &ModelOptions::default()).expect("model loads")
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_103_515_245).wrapping_add(12345);
            200 + (s >> 8) % 40_000
        })
        .collect()
}

/// Logits for every position of `toks`, run alone.
fn alone(m: &Model, toks: &[u32], bs: usize) -> Vec<f32> {
    let mut kv =
        KvCache::new(m.kv_shape(bs), m.config.n_layers, blocks_for_tokens(toks.len(), bs), KvDtype::F16).unwrap();
    let table: Vec<BlockId> = (0..kv.n_blocks as u32).map(BlockId).collect();
    let mut batch = ForwardBatch::default();
    let s = batch.add_seq(&table);
    batch.add_tokens(s, toks, 0, LogitsWanted::All);
    let mut scratch = Scratch::default();
    m.forward(&batch, &mut kv, &mut scratch).unwrap().to_vec()
}

#[test]
fn mixed_batch_equals_one_sequence_at_a_time() {
    let m = model();
    let v = m.config.vocab_size;
    let bs = 16;
    let seqs = [tokens(41, 1), tokens(25, 2), tokens(71, 3)];
    let reference: Vec<Vec<f32>> = seqs.iter().map(|t| alone(&m, t, bs)).collect();

    // Steps as (sequence, start, end): prefill chunks and single decode tokens mixed.
    let steps: [&[(usize, usize, usize)]; 3] =
        [&[(0, 0, 30), (2, 0, 50), (1, 0, 24)], &[(1, 24, 25), (0, 30, 40), (2, 50, 70)], &[(2, 70, 71), (0, 40, 41)]];
    // Interleave the sequences' blocks in one pool, each table in scrambled order.
    let need: Vec<usize> = seqs.iter().map(|s| blocks_for_tokens(s.len(), bs)).collect();
    let mut next = 0u32;
    let mut tables: Vec<Vec<BlockId>> = vec![Vec::new(); 3];
    for round in 0..*need.iter().max().unwrap() {
        for (i, t) in tables.iter_mut().enumerate() {
            if round < need[i] {
                t.push(BlockId(next));
                next += 1;
            }
        }
    }
    for t in tables.iter_mut() {
        // Scrambled but valid: a table maps logical block i to any physical block.
        t.reverse();
    }
    let mut kv = KvCache::new(m.kv_shape(bs), m.config.n_layers, next as usize + 2, KvDtype::F16).unwrap();
    let mut scratch = Scratch::default();
    let mut worst = 0f32;
    let mut checked = 0;
    for step in steps {
        let mut batch = ForwardBatch::default();
        let ids: Vec<u32> = tables.iter().map(|t| batch.add_seq(t)).collect();
        for &(sq, a, b) in step {
            batch.add_tokens(ids[sq], &seqs[sq][a..b], a, LogitsWanted::All);
        }
        let logits = m.forward(&batch, &mut kv, &mut scratch).unwrap();
        let mut row = 0;
        for &(sq, a, b) in step {
            for pos in a..b {
                let got = &logits[row * v..(row + 1) * v];
                let want = &reference[sq][pos * v..(pos + 1) * v];
                for (g, w) in got.iter().zip(want) {
                    worst = worst.max((g - w).abs());
                }
                row += 1;
                checked += 1;
            }
        }
    }
    eprintln!("checked {checked} tokens; worst logit difference {worst:e}");
    assert_eq!(checked, 41 + 25 + 71);
    assert!(worst <= 1e-4, "batched logits differ from one-at-a-time by {worst}");
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let m = model();
    let bs = 16;
    let mut kv = KvCache::new(m.kv_shape(bs), m.config.n_layers, 2, KvDtype::F16).unwrap();
    let mut scratch = Scratch::default();
    let table = [BlockId(0)];
    let outside = [BlockId(7)];
    let cases: Vec<(&str, ForwardBatch)> = vec![
        ("empty", ForwardBatch::default()),
        ("position without a block", {
            let mut b = ForwardBatch::default();
            let s = b.add_seq(&table);
            b.add_tokens(s, &[5], 16, LogitsWanted::Last);
            b
        }),
        ("block outside the pool", {
            let mut b = ForwardBatch::default();
            let s = b.add_seq(&outside);
            b.add_tokens(s, &[5], 0, LogitsWanted::Last);
            b
        }),
        ("token outside the vocabulary", {
            let mut b = ForwardBatch::default();
            let s = b.add_seq(&table);
            b.add_tokens(s, &[1_000_000], 0, LogitsWanted::Last);
            b
        }),
    ];
    for (name, batch) in cases {
        let err = m.forward(&batch, &mut kv, &mut scratch).expect_err(name);
        assert_eq!(err.kind(), "invalid_request", "{name}: {err}");
    }
}
