//! `--workload trace:FILE`: replays a request trace in the Mooncake format, JSON lines of
//! `{"timestamp": ms, "input_length": N, "output_length": M, "hash_ids": [..]}` where each
//! hash id names one 512-token block of the prompt, equal ids equal blocks. The trace has no
//! text, so prompts are made up from the ids: each id maps to its own seeded run of token ids
//! (or of words, for an API that takes text), and the prompts share exactly the prefixes the
//! trace's did.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::text::{words, Rng};
use super::workload::{Item, Workload};

/// Tokens per hash block in the traces as published.
pub const TRACE_BLOCK_TOKENS: usize = 512;

/// Token ids synthesized prompts use: above the special and byte tokens at the start of a
/// small model's vocabulary, below its end (SmolLM2's has 49,152).
const TOKEN_IDS: std::ops::Range<u32> = 200..40_000;

/// How a trace is replayed (`--trace-*`).
#[derive(Debug, Clone)]
pub struct Options {
    /// Tokens each hash block becomes: input lengths are scaled by this over 512.
    pub block_tokens: usize,
    /// Multiplies the trace's timestamps.
    pub time_scale: f64,
    /// Keep the first this many requests (after sampling).
    pub max_requests: Option<usize>,
    /// Multiplies output lengths (at least 1 token each).
    pub output_scale: f64,
    /// Prompts are cut to this many tokens, blocks dropped from the end.
    pub max_input: usize,
    /// Keep this seeded fraction of the conversations, each with all its requests.
    pub sample: f64,
    /// Send at the trace's (scaled) timestamps rather than as the run's loop decides.
    pub timed: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            block_tokens: TRACE_BLOCK_TOKENS,
            time_scale: 1.0,
            max_requests: None,
            output_scale: 1.0,
            max_input: 1800,
            sample: 1.0,
            timed: true,
        }
    }
}

/// One line of a trace.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Record {
    /// Milliseconds from the trace's start.
    pub timestamp: f64,
    pub input_length: u64,
    pub output_length: u64,
    pub hash_ids: Vec<u64>,
}

/// One request as it is sent: its prompt as blocks, its output length and its send time.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Seconds after the first request.
    pub at: f64,
    /// (hash id, tokens) of each block in order. `None`: tokens of this request alone, where
    /// the trace's input is longer than its blocks cover.
    pub blocks: Vec<(Option<u64>, usize)>,
    pub output_len: u32,
}

/// The records of a trace's text; `name` names it in errors.
pub fn parse(text: &str, name: &str) -> Result<Vec<Record>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| {
                format!("{name}:{}: not a trace record (timestamp, input_length, output_length, hash_ids)", i + 1)
            })
        })
        .collect()
}

/// A hash of `parts`: the key of a block, a prefix or a conversation.
fn keyed(parts: &[u64]) -> u64 {
    parts.iter().fold(0x7ace, |h, &p| Rng::new(h ^ p).next_u64())
}

/// Domains of `keyed`, so a block, a request's own tokens and a conversation never share a key.
const BLOCK: u64 = 1;
const UNIQUE: u64 = 2;
const CONVERSATION: u64 = 3;

/// A conversation: the requests sharing their first two hash ids (with one id, its first).
fn conversation(r: &Record, seed: u64) -> u64 {
    let id = |i: usize| r.hash_ids.get(i).map_or(0, |x| x.wrapping_add(1));
    keyed(&[seed, CONVERSATION, id(0), id(1)])
}

/// The records of a seeded `fraction` of the conversations, in order, each conversation with
/// all of its requests or none.
pub fn sample(records: Vec<Record>, fraction: f64, seed: u64) -> Vec<Record> {
    if fraction >= 1.0 {
        return records;
    }
    records.into_iter().filter(|r| Rng::new(conversation(r, seed)).unit() < fraction).collect()
}

/// The requests `records` become: input lengths scaled to `block_tokens` per hash block and
/// cut to `max_input`, outputs scaled (`output_len` overrides), times from the first record's.
pub fn shape(records: &[Record], o: &Options, output_len: Option<u32>) -> Vec<Request> {
    let t0 = records.first().map_or(0.0, |r| r.timestamp);
    let b = o.block_tokens.max(1);
    records
        .iter()
        .map(|r| {
            // Rounded up, so a last block the trace gave any tokens keeps at least one.
            let scaled = (u128::from(r.input_length) * b as u128).div_ceil(TRACE_BLOCK_TOKENS as u128);
            let mut left = scaled.clamp(1, o.max_input.max(1) as u128) as usize;
            let mut blocks = Vec::new();
            for &id in &r.hash_ids {
                if left == 0 {
                    break;
                }
                let n = left.min(b);
                blocks.push((Some(id), n));
                left -= n;
            }
            if left > 0 {
                blocks.push((None, left));
            }
            let out = output_len.unwrap_or_else(|| {
                (r.output_length as f64 * o.output_scale).round().clamp(1.0, u32::MAX as f64) as u32
            });
            Request { at: (r.timestamp - t0).max(0.0) / 1e3 * o.time_scale, blocks, output_len: out }
        })
        .collect()
}

/// Prompt tokens one infinite cache seeing every request in order would serve, and prompt
/// tokens in all. A block counts when the request's prefix up to and including it was seen
/// before (as many of its tokens as were seen), and only after every block before it did.
pub fn ideal_hits(reqs: &[Request]) -> (usize, usize) {
    // Longest run of tokens seen of each prefix's last block.
    let mut seen: HashMap<u64, usize> = HashMap::new();
    let (mut hit, mut total) = (0, 0);
    for r in reqs {
        let (mut key, mut chained) = (0, true);
        for &(id, n) in &r.blocks {
            total += n;
            let Some(id) = id else {
                chained = false;
                continue;
            };
            key = keyed(&[key, id]);
            let before = seen.get(&key).copied().unwrap_or(0);
            if chained {
                hit += before.min(n);
                chained = before >= n;
            }
            seen.insert(key, before.max(n));
        }
    }
    (hit, total)
}

/// The PRNG of one block: the same id and seed give the same block; a `None` block belongs to
/// request `index` alone.
fn block_rng(id: Option<u64>, index: usize, seed: u64) -> Rng {
    Rng::new(match id {
        Some(id) => keyed(&[seed, BLOCK, id]),
        None => keyed(&[seed, UNIQUE, index as u64]),
    })
}

/// The request's prompt: token ids, or words (about a token each) for an API that takes text.
fn synthesize(r: &Request, index: usize, seed: u64, token_ids: bool) -> Item {
    if token_ids {
        let span = (TOKEN_IDS.end - TOKEN_IDS.start) as usize;
        let tokens = r
            .blocks
            .iter()
            .flat_map(|&(id, n)| {
                let mut rng = block_rng(id, index, seed);
                (0..n).map(move |_| TOKEN_IDS.start + rng.below(span) as u32)
            })
            .collect();
        Item {
            messages: Vec::new(),
            tokens: Some(tokens),
            output_len: r.output_len,
            phase: None,
            natural: false,
            tenant: 0,
            slo_ttft_ms: None,
            expected_output: None,
        }
    } else {
        let text: Vec<String> = r.blocks.iter().map(|&(id, n)| words(&mut block_rng(id, index, seed), n)).collect();
        Item::chat(None, text.join(" "), r.output_len)
    }
}

/// The trace at `path` as `o` replays it, at most `n` requests, its prompts token ids or text.
pub fn load(
    path: &str,
    o: &Options,
    n: Option<usize>,
    seed: u64,
    output_len: Option<u32>,
    token_ids: bool,
) -> Result<Workload> {
    if o.block_tokens == 0 || o.max_input == 0 || o.max_requests == Some(0) {
        bail!("--trace-block-tokens, --trace-max-input and --trace-max-requests must be positive");
    }
    if !(o.sample > 0.0 && o.sample <= 1.0) {
        bail!("--trace-sample {}: a fraction in (0, 1]", o.sample);
    }
    if !(o.time_scale.is_finite() && o.time_scale >= 0.0 && o.output_scale.is_finite() && o.output_scale > 0.0) {
        bail!("--trace-time-scale must be finite and >= 0, --trace-output-scale finite and > 0");
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("trace {path:?} is not readable"))?;
    let mut records = sample(parse(&text, path)?, o.sample, seed);
    records.truncate([o.max_requests, n].into_iter().flatten().min().unwrap_or(usize::MAX));
    if records.is_empty() {
        bail!("trace {path:?}: no requests left (an empty file, or --trace-sample too small)");
    }
    let reqs = shape(&records, o, output_len);
    let (hit, total) = ideal_hits(&reqs);
    Ok(Workload {
        items: reqs.iter().enumerate().map(|(i, r)| synthesize(r, i, seed, token_ids)).collect(),
        times: o.timed.then(|| reqs.iter().map(|r| r.at).collect()),
        ideal_hit_rate: Some(hit as f64 / total.max(1) as f64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ts: f64, input: u64, ids: &[u64]) -> Record {
        Record { timestamp: ts, input_length: input, output_length: 10, hash_ids: ids.to_vec() }
    }

    fn opts(block_tokens: usize) -> Options {
        Options { block_tokens, ..Options::default() }
    }

    #[test]
    fn equal_ids_give_equal_blocks_and_lengths_follow_the_scale() {
        // 16 tokens a block: 1000 tokens over two 512-token blocks become 32 (16 + 16),
        // 700 over two become 22 (16 + 6), 1500 over two (more than they cover) 47.
        let recs = [record(0.0, 1000, &[1, 2]), record(5.0, 700, &[1, 3]), record(9.0, 1500, &[1, 2])];
        let reqs = shape(&recs, &opts(16), None);
        let lens: Vec<Vec<usize>> = reqs.iter().map(|r| r.blocks.iter().map(|b| b.1).collect()).collect();
        assert_eq!(lens, [vec![16, 16], vec![16, 6], vec![16, 16, 15]]);
        let items: Vec<Item> = reqs.iter().enumerate().map(|(i, r)| synthesize(r, i, 7, true)).collect();
        let toks: Vec<&Vec<u32>> = items.iter().map(|i| i.tokens.as_ref().unwrap()).collect();
        assert_eq!(toks.iter().map(|t| t.len()).collect::<Vec<_>>(), [32, 22, 47]);
        assert!(toks.iter().flat_map(|t| t.iter()).all(|t| TOKEN_IDS.contains(t)));
        assert_eq!(toks[0][..16], toks[1][..16], "hash id 1 in both");
        assert_ne!(toks[0][16..22], toks[1][16..22], "ids 2 and 3 differ");
        assert_eq!(toks[0][..], toks[2][..32], "the same ids, the same prefix");
        // Another seed, other tokens for the same ids.
        assert_ne!(synthesize(&reqs[0], 0, 8, true).tokens, items[0].tokens);
        // As text: equal ids give equal words, a word a token.
        let text: Vec<String> =
            reqs.iter().enumerate().map(|(i, r)| synthesize(r, i, 7, false).messages[0].1.clone()).collect();
        let words: Vec<Vec<&str>> = text.iter().map(|t| t.split(' ').collect()).collect();
        assert_eq!(words.iter().map(Vec::len).collect::<Vec<_>>(), [32, 22, 47]);
        assert_eq!(words[0][..16], words[1][..16]);
        assert_ne!(words[0][16..22], words[1][16..22]);
        // The cap drops blocks from the end; the original scale keeps lengths.
        let capped = shape(&recs, &Options { max_input: 20, ..opts(16) }, None);
        assert_eq!(capped[2].blocks, [(Some(1), 16), (Some(2), 4)]);
        assert_eq!(shape(&recs, &opts(512), None)[1].blocks, [(Some(1), 512), (Some(3), 188)]);
    }

    #[test]
    fn times_and_outputs_scale() {
        let recs = [record(1000.0, 10, &[1]), record(3000.0, 10, &[2])];
        let o = Options { time_scale: 0.5, output_scale: 0.01, ..Options::default() };
        let reqs = shape(&recs, &o, None);
        assert_eq!(reqs.iter().map(|r| r.at).collect::<Vec<_>>(), [0.0, 1.0]);
        assert_eq!(reqs[0].output_len, 1, "at least one token");
        assert_eq!(shape(&recs, &o, Some(7))[1].output_len, 7, "--max-tokens overrides");
    }

    #[test]
    fn sampling_keeps_whole_conversations() {
        // 40 conversations of 1 to 4 turns each, interleaved; turns extend their first blocks.
        let mut recs = Vec::new();
        for turn in 0..4u64 {
            for c in 0..40u64 {
                if turn < 1 + c % 4 {
                    let ids: Vec<u64> = [0, 100 + c].into_iter().chain((0..turn).map(|t| 1000 * c + t)).collect();
                    recs.push(record((turn * 40 + c) as f64, 512 * ids.len() as u64, &ids));
                }
            }
        }
        recs.push(record(999.0, 512, &[5]));
        let convs = |rs: &[Record]| {
            let mut m: HashMap<Vec<u64>, usize> = HashMap::new();
            for r in rs {
                *m.entry(r.hash_ids.iter().take(2).copied().collect()).or_default() += 1;
            }
            m
        };
        let all = convs(&recs);
        let kept = sample(recs.clone(), 0.5, 3);
        let some = convs(&kept);
        assert!(some.len() > 5 && some.len() < 36, "{} of 41 conversations", some.len());
        for (c, n) in &some {
            assert_eq!(all[c], *n, "conversation {c:?} kept whole");
        }
        assert_eq!(kept, sample(recs.clone(), 0.5, 3), "seeded");
        assert_ne!(kept, sample(recs.clone(), 0.5, 4));
        assert_eq!(sample(recs.clone(), 1.0, 3), recs);
    }

    #[test]
    fn ideal_hit_rate_of_a_known_trace() {
        // 4 tokens a block, so 512 trace tokens are 4 sent.
        let recs = [
            record(0.0, 1024, &[1, 2]),       // 8 tokens, none seen
            record(0.0, 1536, &[1, 2, 3]),    // 12: (1) and (1,2) seen: 8
            record(0.0, 1024, &[1, 4]),       // 8: (1) seen: 4
            record(0.0, 1024, &[2, 1]),       // 8: (2) never led a prompt: 0
            record(0.0, 1280, &[1, 2, 3]),    // 10, the last block 2 tokens: all 10
            record(0.0, 768, &[7, 8]),        // 6, block 8 with 2 tokens: 0
            record(0.0, 1024, &[7, 8]),       // 8: 4 + the 2 tokens of block 8 seen: 6
            record(0.0, 2048, &[1, 2, 3, 9]), // 16: 12
        ];
        let reqs = shape(&recs, &opts(4), None);
        assert_eq!(ideal_hits(&reqs), (8 + 4 + 10 + 6 + 12, 8 + 12 + 8 + 8 + 10 + 6 + 8 + 16));
        assert_eq!(ideal_hits(&reqs[..1]), (0, 8));
    }

    #[test]
    fn loads_a_trace_file() {
        let path = std::env::temp_dir().join(format!("tandem-mooncake-{}.jsonl", std::process::id()));
        let lines = [
            r#"{"timestamp": 0, "input_length": 600, "output_length": 40, "hash_ids": [0, 1]}"#,
            "",
            r#"{"timestamp": 2000, "input_length": 1100, "output_length": 20, "hash_ids": [0, 1, 2]}"#,
            r#"{"timestamp": 4000, "input_length": 300, "output_length": 20, "hash_ids": [0]}"#,
        ];
        std::fs::write(&path, lines.join("\n")).unwrap();
        let p = path.to_str().unwrap();
        let o = Options { block_tokens: 8, time_scale: 0.5, ..Options::default() };
        let w = load(p, &o, None, 1, None, true);
        let two = load(p, &o, Some(2), 1, Some(3), false);
        let bad = load(p, &Options { sample: 0.0, ..o.clone() }, None, 1, None, true);
        std::fs::write(&path, "{\"timestamp\": 0}\n").unwrap();
        let malformed = load(p, &o, None, 1, None, true);
        std::fs::remove_file(&path).unwrap();
        let w = w.unwrap();
        assert_eq!(w.times, Some(vec![0.0, 1.0, 2.0]));
        let lens: Vec<usize> = w.items.iter().map(|i| i.tokens.as_ref().unwrap().len()).collect();
        assert_eq!(lens, [10, 18, 5]);
        // (0, 1) again in the second: 10 of its 18; block 0's 5 in the third.
        assert_eq!(w.ideal_hit_rate, Some(15.0 / 33.0));
        let two = two.unwrap();
        assert_eq!(two.items.len(), 2);
        assert!(two.items.iter().all(|i| i.tokens.is_none() && i.output_len == 3));
        assert!(bad.is_err());
        assert!(malformed.unwrap_err().to_string().contains(":1: not a trace record"));
    }
}
