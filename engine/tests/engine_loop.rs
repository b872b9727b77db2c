//! The engine loop with the real model: continuous batching, preemption and
//! prefix caching change nothing about what each request generates.

mod llama_cpp;

use std::collections::HashMap;
use std::path::PathBuf;

use tandem_engine::llm_engine::{EngineRequest, LlmEngine, LlmEngineConfig};
use tandem_engine::model::{Model, ModelOptions};
use tandem_engine::sampling::{SamplingParams, MAX_LOGPROBS};
use tandem_engine::scheduler::{RequestId, SchedulerConfig};
use tandem_engine::FinishReason;
use tandem_text::chat::{ChatMessage, ChatTemplate};
use tandem_text::gguf::GgufFile;
use tandem_text::tokenizer::Tokenizer;

use llama_cpp::{fixture_named, ids, model_path, top5, Top5Bounds, Top5Comparison, QWEN_TOP5, SMOLLM2_TOP5};

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
        let req = EngineRequest {
            prompt: p.clone(),
            params: params.clone(),
            n: 1,
            priority: 0,
            cache_salt: None,
            share: Default::default(),
            export_kv: false,
            resumed: 0,
        };
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
        share: Default::default(),
        export_kv: false,
        resumed: 0,
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
        let req = EngineRequest {
            prompt: p.clone(),
            params: greedy(100),
            n: 2,
            priority: 0,
            cache_salt: None,
            share: Default::default(),
            export_kv: false,
            resumed: 0,
        };
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
    let req = EngineRequest {
        prompt: ps[0].clone(),
        params,
        n: 4,
        priority: 0,
        cache_salt: None,
        share: Default::default(),
        export_kv: false,
        resumed: 0,
    };
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

/// A prefill engine exports each prompt's KV through the step hook (in chunks smaller
/// than the prompts); a second engine, over an external region the test writes the
/// blocks into as a KV receiver would, continues from the first token. Every request
/// generates what one engine alone generates, seeded sampling included.
#[test]
fn exported_kv_continues_on_another_engine_like_one_engine() {
    use std::sync::{Arc, Mutex};
    use tandem_engine::kv_cache::{KvCache, KvDtype};

    let l = load();
    let ps = prompts(&l, 5);
    let params = SamplingParams { temperature: 0.8, top_k: 40, seed: Some(7), max_tokens: 24, ..Default::default() };
    let want = run_all(&mut engine(&l, 512, 8), &ps, &params);

    // Prefill side: prompts of 30+ tokens, 16-token chunks of at most 48 per step.
    let model = Model::from_gguf(&l.file, &ModelOptions::default()).unwrap();
    let tok = Tokenizer::from_gguf(&l.file).unwrap();
    let cfg = LlmEngineConfig {
        kv_blocks: 256,
        scheduler: SchedulerConfig { max_batched_tokens: 48, ..SchedulerConfig::default() },
        ..LlmEngineConfig::default()
    };
    let mut prefill = LlmEngine::new(model, tok, cfg.clone()).unwrap();

    // Decode side: its cache lives in a region the test owns, like a shared segment.
    let model = Model::from_gguf(&l.file, &ModelOptions::default()).unwrap();
    let tok = Tokenizer::from_gguf(&l.file).unwrap();
    let shape = model.kv_shape(cfg.block_size);
    let n_layers = model.config.n_layers;
    let bytes = KvCache::region_bytes(shape, n_layers, cfg.kv_blocks, KvDtype::F16);
    let region: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(vec![0u64; bytes / 8]));
    let base = region.lock().unwrap().as_mut_ptr() as *mut u8;
    // SAFETY: the Vec is never resized and the Arc outlives the cache.
    let kv = unsafe { KvCache::from_raw(shape, n_layers, cfg.kv_blocks, KvDtype::F16, base, region.clone()) }.unwrap();
    let mut decode = LlmEngine::with_cache(model, tok, cfg.clone(), kv).unwrap();

    let mut remote = HashMap::new(); // prefill id -> (decode id, decode table, prompt index)
    for (i, p) in ps.iter().enumerate() {
        let mut rp = params.clone();
        let (did, table, _) = decode.add_remote_request(EngineRequest::new(p.clone(), rp.clone())).unwrap();
        rp.max_tokens = 1;
        let req = EngineRequest { export_kv: true, ..EngineRequest::new(p.clone(), rp) };
        let pid = prefill.add_request(req).unwrap();
        remote.insert(pid, (did, table, i));
    }
    let half = shape.block_elems() * 2;
    let mut exported: HashMap<(RequestId, usize, usize), usize> = HashMap::new();
    let mut firsts = HashMap::new();
    while prefill.has_unfinished() {
        let outs = prefill
            .step_exporting(&mut |exports, layer, kvb| {
                for e in exports {
                    let (_, table, _) = &remote[&e.id];
                    for (j, b) in e.blocks.iter().enumerate() {
                        let mut data = Vec::new();
                        kvb.gather(&[*b], &mut data);
                        let dst = table[e.first + j].0 as usize;
                        // The receiver's layout: per layer, all blocks' K then all blocks' V.
                        let base = layer * 2 * cfg.kv_blocks * half;
                        let mut r = region.lock().unwrap();
                        // SAFETY: viewing the u64 region as bytes.
                        let r8 = unsafe { std::slice::from_raw_parts_mut(r.as_mut_ptr() as *mut u8, bytes) };
                        r8[base + dst * half..][..half].copy_from_slice(&data[..half]);
                        r8[base + (cfg.kv_blocks + dst) * half..][..half].copy_from_slice(&data[half..]);
                        *exported.entry((e.id, e.first + j, layer)).or_default() += 1;
                    }
                }
            })
            .unwrap();
        for o in outs {
            assert!(o.finish.is_some(), "a prefill-only request ends with its first token");
            firsts.insert(o.id, o.token_ids[0]);
        }
    }
    for (pid, (_, table, _)) in &remote {
        for idx in 0..table.len() {
            for layer in 0..n_layers {
                assert_eq!(exported.get(&(*pid, idx, layer)), Some(&1), "block {idx} layer {layer} exported once");
            }
        }
    }
    assert_eq!(prefill.stats().blocks_used, 0, "the prefill side keeps no blocks but its prefix cache");

    let mut got: HashMap<RequestId, (String, Vec<u32>, Option<FinishReason>)> = HashMap::new();
    for (pid, (did, _, _)) in &remote {
        let o = decode.remote_kv_ready(*did, firsts[pid]).unwrap();
        let e = got.entry(*did).or_default();
        e.0.push_str(&o.text);
        e.1.extend(&o.token_ids);
        e.2 = o.finish;
    }
    while decode.has_unfinished() {
        for o in decode.step().unwrap() {
            let e = got.entry(o.id).or_default();
            e.0.push_str(&o.text);
            e.1.extend(&o.token_ids);
            e.2 = o.finish.or(e.2);
        }
    }
    for (did, _, i) in remote.values() {
        let (text, ids, finish) = &got[did];
        assert_eq!((text, ids, finish.unwrap()), (&want[*i].0, &want[*i].1, want[*i].2), "prompt {i}");
    }
    assert_eq!(decode.stats().blocks_used, 0);
}

/// Prompt scoring (`prompt_logprobs`), computed in 16-token chunks, against llama.cpp's
/// logits at every prompt position (the committed fixture): every prompt token after the
/// first is scored once, in order; the most likely next token agrees wherever llama.cpp's
/// top two are not a near tie; and our log-probabilities of llama.cpp's top 5, renormalised
/// over those five, are as close to llama.cpp's as `llama_cpp/mod.rs` bounds them (per
/// position, on average, and in scale). A constant offset in the logits cannot show here:
/// log-softmax removes it (`model_reference.rs` checks the logits themselves).
#[test]
fn prompt_logprobs_in_chunks_agree_with_llama_cpp() {
    prompt_logprobs_in_chunks("SmolLM2-135M-Instruct.Q4_1.gguf", "reference.json", &SMOLLM2_TOP5);
}

/// The same for Qwen2.5-Coder-0.5B (Q4_K_M, `qwen2`), within its bounds (`model_reference.rs`).
#[test]
fn qwen_prompt_logprobs_in_chunks_agree_with_llama_cpp() {
    prompt_logprobs_in_chunks("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "qwen2.5-coder-0.5b.json", &QWEN_TOP5);
}

fn prompt_logprobs_in_chunks(model: &str, fixture: &str, bounds: &Top5Bounds) {
    let l = Loaded { file: GgufFile::open(&model_path(model)).unwrap() };
    let fx = fixture_named(fixture);
    let model = Model::from_gguf(&l.file, &ModelOptions::default()).unwrap();
    let tok = Tokenizer::from_gguf(&l.file).unwrap();
    let cfg = LlmEngineConfig {
        kv_blocks: 512,
        scheduler: SchedulerConfig { max_batched_tokens: 16, ..SchedulerConfig::default() },
        ..LlmEngineConfig::default()
    };
    let mut e = LlmEngine::new(model, tok, cfg).unwrap();
    let (mut agree, mut counted) = (0, 0);
    let mut dist = Top5Comparison::new();
    for (i, case) in fx["cases"].as_array().unwrap().iter().enumerate() {
        let name = case["name"].as_str().unwrap();
        let prompt = ids(&case["prompt_token_ids"]);
        // As many alternatives as allowed, so that llama.cpp's top 5 are among ours.
        let params = SamplingParams { prompt_logprobs: Some(MAX_LOGPROBS), ..greedy(1) };
        // The first case twice: the second time its prompt is in the prefix cache, and must
        // be computed anyway.
        for _ in 0..if i == 0 { 2 } else { 1 } {
            e.add_request(EngineRequest::new(prompt.clone(), params.clone())).unwrap();
            let mut scored = Vec::new();
            while e.has_unfinished() {
                for o in e.step().unwrap() {
                    scored.extend(o.prompt_logprobs);
                }
            }
            assert_eq!(scored.len(), prompt.len() - 1, "{name}: every prompt token after the first");
            for (p, s) in scored.iter().enumerate() {
                assert_eq!(s.id, prompt[p + 1]);
                assert!(s.logprob <= 0.0 && s.top_logprobs.len() == MAX_LOGPROBS);
                let want = top5(case, p);
                if want[0].1 - want[1].1 >= 0.5 {
                    counted += 1;
                    agree += usize::from(s.top_logprobs[0].0 == want[0].0);
                }
                let ours = |id: u32| {
                    let found = s.top_logprobs.iter().find(|t| t.0 == id).map(|t| t.1);
                    let lp = found.or((s.id == id).then_some(s.logprob));
                    lp.unwrap_or_else(|| panic!("{name}: position {p}: llama.cpp's top-5 token {id} is not in ours"))
                        as f64
                };
                dist.add(&want, ours, format!("{name}, position {p}"));
            }
        }
    }
    dist.check_within(bounds);
    assert!(counted > 200, "enough positions compared ({counted})");
    assert!(agree * 100 >= counted * 99, "top-1 agrees with llama.cpp at {agree}/{counted} positions");
}
