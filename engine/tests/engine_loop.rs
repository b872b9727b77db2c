//! The engine loop with the real model: continuous batching, preemption and
//! prefix caching change nothing about what each request generates.

use std::collections::HashMap;
use std::path::PathBuf;

use tandem_engine::chat::{ChatMessage, ChatTemplate};
use tandem_engine::gguf::GgufFile;
use tandem_engine::llm_engine::{EngineRequest, FinishReason, LlmEngine, LlmEngineConfig};
use tandem_engine::model::{Model, ModelOptions};
use tandem_engine::sampling::SamplingParams;
use tandem_engine::scheduler::{RequestId, SchedulerConfig};
use tandem_engine::tokenizer::Tokenizer;

struct Loaded {
    file: GgufFile,
}

fn load() -> Loaded {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "model missing: run scripts/fetch-model.sh first");
    Loaded { file: GgufFile::open(&path).unwrap() }
}

fn engine(l: &Loaded, kv_blocks: usize, max_seqs: usize) -> LlmEngine {
    let model = Model::from_gguf(&l.file, &ModelOptions::default()).unwrap();
    let tok = Tokenizer::from_gguf(&l.file).unwrap();
    let cfg = LlmEngineConfig {
        kv_blocks,
        scheduler: SchedulerConfig { max_seqs, ..SchedulerConfig::default() },
        ..LlmEngineConfig::default()
    };
    LlmEngine::new(model, tok, cfg).unwrap()
}

fn prompts(l: &Loaded, n: usize) -> Vec<Vec<u32>> {
    let tpl = ChatTemplate::from_gguf(&l.file).unwrap().unwrap();
    let tok = Tokenizer::from_gguf(&l.file).unwrap();
    let topics = ["rivers", "bread", "the moon", "chess", "volcanoes", "bees", "trains", "jazz"];
    let asks = [
        "Tell me one fact about",
        "Write a haiku about",
        "Explain in one sentence",
        "List three words about",
        "Why do people like",
        "What is the history of",
        "Give a tip about",
        "Describe",
    ];
    (0..n)
        .map(|i| {
            let text = format!("{} {}.", asks[i % asks.len()], topics[(i / asks.len() + i) % topics.len()]);
            if i % 3 == 2 {
                // Some raw prompts of different lengths too.
                tok.encode(&format!("{text} {}", "Once upon a time ".repeat(i % 7)), true).unwrap()
            } else {
                tok.encode(&tpl.render(&[ChatMessage::new("user", text)], true).unwrap(), true).unwrap()
            }
        })
        .collect()
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens, ..SamplingParams::default() }
}

/// Runs all prompts at once; returns (text, ids, finish) per prompt.
fn run_all(e: &mut LlmEngine, ps: &[Vec<u32>], params: &SamplingParams) -> Vec<(String, Vec<u32>, FinishReason)> {
    let mut ids = Vec::new();
    for p in ps {
        let req = EngineRequest { prompt: p.clone(), params: params.clone(), n: 1, priority: 0, cache_salt: None };
        ids.push(e.add_request(req).unwrap());
    }
    let mut acc: HashMap<RequestId, (String, Vec<u32>, Option<FinishReason>)> = HashMap::new();
    let mut steps = 0;
    while e.has_unfinished() {
        steps += 1;
        assert!(steps < 100_000, "the engine does not drain");
        for o in e.step().unwrap() {
            let a = acc.entry(o.id).or_default();
            a.0.push_str(&o.text);
            a.1.extend(o.token_ids);
            if o.finish.is_some() {
                a.2 = o.finish;
            }
        }
    }
    ids.iter()
        .map(|id| {
            let (t, i, f) = acc.remove(id).expect("every request produced output");
            (t, i, f.expect("every request finished"))
        })
        .collect()
}

#[test]
fn concurrent_greedy_requests_equal_their_solo_runs() {
    let l = load();
    let ps = prompts(&l, 64);
    let params = greedy(24);
    let mut solo_engine = engine(&l, 512, 64);
    let solo: Vec<_> =
        ps.iter().map(|p| run_all(&mut solo_engine, std::slice::from_ref(p), &params).remove(0)).collect();
    let mut e = engine(&l, 512, 64);
    let together = run_all(&mut e, &ps, &params);
    for (i, (a, b)) in solo.iter().zip(&together).enumerate() {
        assert_eq!(a.1, b.1, "prompt {i}: token ids differ when batched");
        assert_eq!(a.0, b.0, "prompt {i}: text differs when batched");
        assert_eq!(a.2, b.2, "prompt {i}: finish differs");
    }
    let s = e.stats();
    assert_eq!(s.blocks_used, 0, "every block is released (cached ones are free to evict)");
    assert!(s.prefix_hit_tokens > 0, "chat prompts share the system prompt's blocks");
    eprintln!(
        "64 requests: {} steps, {} tokens scheduled, prefix hits {}/{} tokens",
        s.steps, s.scheduled_tokens, s.prefix_hit_tokens, s.prefix_queried_tokens
    );
}

#[test]
fn forced_preemption_gives_the_same_greedy_text() {
    let l = load();
    let ps = prompts(&l, 16);
    let params = greedy(40);
    let mut roomy = engine(&l, 512, 64);
    let want = run_all(&mut roomy, &ps, &params);
    assert_eq!(roomy.stats().preemptions, 0);
    // 24 blocks of 16 tokens: far less than 16 requests of ~50-90 tokens need at once.
    let mut tight = engine(&l, 24, 64);
    let got = run_all(&mut tight, &ps, &params);
    let s = tight.stats();
    assert!(s.preemptions > 0, "the small pool must force preemption");
    for (i, (a, b)) in want.iter().zip(&got).enumerate() {
        assert_eq!(a.1, b.1, "prompt {i}: preemption changed the tokens");
    }
    assert_eq!(s.blocks_used, 0);
    eprintln!("tight pool: {} preemptions over {} steps", s.preemptions, s.steps);
}

#[test]
fn prefix_cache_hit_changes_nothing_but_work() {
    let l = load();
    let ps = prompts(&l, 1);
    let mut e = engine(&l, 256, 8);
    let params = greedy(16);
    let first = run_all(&mut e, &ps, &params);
    let before = e.stats().prefix_hit_tokens;
    let second = run_all(&mut e, &ps, &params);
    let hit = e.stats().prefix_hit_tokens - before;
    assert_eq!(first, second);
    assert_eq!(hit as usize, (ps[0].len() - 1) / 16 * 16, "every full block but one token is reused");
    // A different tenant salt must not hit.
    let before = e.stats().prefix_hit_tokens;
    let req = EngineRequest {
        prompt: ps[0].clone(),
        params: params.clone(),
        n: 1,
        priority: 0,
        cache_salt: Some("tenant-b".into()),
    };
    e.add_request(req).unwrap();
    while e.has_unfinished() {
        e.step().unwrap();
    }
    assert_eq!(e.stats().prefix_hit_tokens, before, "salted prompts do not share another tenant's blocks");
}

#[test]
fn abort_mid_flight_returns_every_block() {
    let l = load();
    let ps = prompts(&l, 8);
    let mut e = engine(&l, 256, 64);
    let mut groups = Vec::new();
    for p in &ps {
        let req = EngineRequest { prompt: p.clone(), params: greedy(100), n: 2, priority: 0, cache_salt: None };
        groups.push(e.add_request(req).unwrap());
    }
    for _ in 0..5 {
        e.step().unwrap();
    }
    assert!(e.stats().blocks_used > 0);
    for g in groups {
        e.abort(g);
    }
    assert!(!e.has_unfinished());
    assert_eq!(e.stats().blocks_used, 0, "abort frees every block, including forked children's");
}

#[test]
fn parallel_samples_share_the_prompt_and_differ() {
    let l = load();
    let ps = prompts(&l, 1);
    let mut e = engine(&l, 256, 8);
    let params = SamplingParams {
        temperature: 1.0,
        seed: Some(3),
        max_tokens: 12,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let req = EngineRequest { prompt: ps[0].clone(), params, n: 4, priority: 0, cache_salt: None };
    let group = e.add_request(req).unwrap();
    let mut by_index: HashMap<usize, Vec<u32>> = HashMap::new();
    while e.has_unfinished() {
        for o in e.step().unwrap() {
            assert_eq!(o.group, group);
            by_index.entry(o.index).or_default().extend(o.token_ids);
        }
    }
    assert_eq!(by_index.len(), 4);
    assert!(by_index.values().all(|v| v.len() == 12));
    let distinct: std::collections::HashSet<_> = by_index.values().collect();
    assert!(distinct.len() > 1, "independent samples differ");
    assert_eq!(e.stats().blocks_used, 0);
}
