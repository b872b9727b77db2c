//! Live migration at the engine level, with the real model: a request decoding on engine
//! A is frozen, its KV blocks copied into engine B (whole blocks first through B's prefix
//! cache, then the rest), and B continues it. What the client sees (A's output before the
//! freeze, then B's) equals an undisturbed run, token for token and byte for byte, for
//! greedy and for seeded sampling with penalties; no block stays held on either side.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tandem_engine::kv_cache::{BlockId, KvCache, KvDtype};
use tandem_engine::llm_engine::{EngineRequest, LlmEngine, LlmEngineConfig, RemoteKv};
use tandem_engine::model::{Model, ModelOptions};
use tandem_engine::sampling::SamplingParams;
use tandem_engine::scheduler::RequestId;
use tandem_text::gguf::GgufFile;
use tandem_text::tokenizer::Tokenizer;

const BLOCKS: usize = 128;

/// An engine whose cache lives in a region the test owns (like a worker's shared segment).
struct Side {
    engine: LlmEngine,
    region: Arc<Mutex<Vec<u64>>>,
    bytes: usize,
    half: usize,
}

impl Side {
    fn new(file: &GgufFile) -> Side {
        let model = Model::from_gguf(file, &ModelOptions::default()).unwrap();
        let tok = Tokenizer::from_gguf(file).unwrap();
        let cfg = LlmEngineConfig { kv_blocks: BLOCKS, ..LlmEngineConfig::default() };
        let shape = model.kv_shape(cfg.block_size);
        let n_layers = model.config.n_layers;
        let bytes = KvCache::region_bytes(shape, n_layers, BLOCKS, KvDtype::F16);
        let region: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(vec![0u64; bytes / 8]));
        let base = region.lock().unwrap().as_mut_ptr() as *mut u8;
        // SAFETY: the Vec is never resized and the Arc outlives the cache.
        let kv = unsafe { KvCache::from_raw(shape, n_layers, BLOCKS, KvDtype::F16, base, region.clone()) }.unwrap();
        let half = shape.block_elems() * 2;
        Side { engine: LlmEngine::with_cache(model, tok, cfg, kv).unwrap(), region, bytes, half }
    }

    fn layers(&self) -> usize {
        self.engine.model.config.n_layers
    }
}

/// Copies blocks `from[i]` of `a` into `to[i]` of `b`, every layer, K and V.
fn copy_blocks(a: &Side, from: &[BlockId], b: &Side, to: &[BlockId]) {
    assert_eq!(from.len(), to.len());
    let src = a.region.lock().unwrap();
    let mut dst = b.region.lock().unwrap();
    // SAFETY: viewing the u64 regions as bytes.
    let s8 = unsafe { std::slice::from_raw_parts(src.as_ptr() as *const u8, a.bytes) };
    let d8 = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut u8, b.bytes) };
    let h = a.half;
    for layer in 0..a.layers() {
        let base = layer * 2 * BLOCKS * h;
        for (f, t) in from.iter().zip(to) {
            let (f, t) = (f.0 as usize, t.0 as usize);
            d8[base + t * h..][..h].copy_from_slice(&s8[base + f * h..][..h]);
            d8[base + (BLOCKS + t) * h..][..h].copy_from_slice(&s8[base + (BLOCKS + f) * h..][..h]);
        }
    }
}

/// What a client gets of one request: its text and its token ids.
#[derive(Debug, Default, PartialEq)]
struct Got {
    text: String,
    ids: Vec<u32>,
}

fn run_to_end(e: &mut LlmEngine, id: RequestId, got: &mut Got) {
    while e.has_unfinished() {
        for o in e.step().unwrap() {
            assert_eq!(o.id, id);
            got.text.push_str(&o.text);
            got.ids.extend(&o.token_ids);
        }
    }
}

fn params(seeded: bool) -> SamplingParams {
    let mut p = SamplingParams { max_tokens: 60, ignore_eos: true, temperature: 0.0, ..SamplingParams::default() };
    if seeded {
        p.temperature = 0.9;
        p.top_p = 0.95;
        p.seed = Some(1234);
        p.presence_penalty = 0.6;
        p.frequency_penalty = 0.4;
    }
    p
}

/// Moves a request from A to B after `before` output tokens (and `more` after the pre-copy)
/// and returns what the client saw.
fn migrated(file: &GgufFile, prompt: &[u32], p: &SamplingParams, before: usize, more: usize) -> Got {
    let (mut a, mut b) = (Side::new(file), Side::new(file));
    let id = a.engine.add_request(EngineRequest::new(prompt.to_vec(), p.clone())).unwrap();
    let mut got = Got::default();
    let step = |a: &mut Side, got: &mut Got, n: usize| {
        while got.ids.len() < n {
            for o in a.engine.step().unwrap() {
                got.text.push_str(&o.text);
                got.ids.extend(&o.token_ids);
                assert!(o.finish.is_none(), "the request ended before its move");
            }
        }
    };
    step(&mut a, &mut got, before);
    let bs = 16;
    // Pre-copy: the whole blocks A has computed fill B's prefix cache; A keeps decoding.
    let seen = a.engine.inspect(id).unwrap();
    assert!(seen.decoding && !seen.frozen);
    let whole = seen.computed / bs * bs;
    let warm = EngineRequest::new(seen.tokens[..whole].to_vec(), p.clone());
    let (wid, wtable, wcached) = b.engine.add_remote_request_as(warm, RemoteKv::CacheOnly).unwrap();
    assert_eq!(wcached, 0);
    copy_blocks(&a, &seen.table[..wtable.len()], &b, &wtable);
    assert!(b.engine.remote_kv_arrived(wid, 0).unwrap().is_none(), "a cache-only request emits nothing");
    assert!(!b.engine.has_unfinished(), "and ends once its blocks are cached");
    assert_eq!(b.engine.stats().blocks_used, 0, "its blocks are free, cached");
    step(&mut a, &mut got, before + more);
    // Freeze, then B reserves for every token but the last and takes only what it lacks.
    let frozen = a.engine.freeze(id).unwrap();
    assert!(a.engine.freeze(id).is_err(), "frozen once");
    assert!(a.engine.step().unwrap().is_empty(), "a frozen request does not step");
    let n = frozen.tokens.len();
    let generated = n - prompt.len();
    assert_eq!(generated, got.ids.len());
    let mut bp = p.clone();
    bp.max_tokens = p.max_tokens - (generated - 1);
    let cont = EngineRequest { resumed: generated - 1, ..EngineRequest::new(frozen.tokens[..n - 1].to_vec(), bp) };
    let (bid, btable, cached) = b.engine.add_remote_request_as(cont, RemoteKv::Continue).unwrap();
    assert_eq!(cached, wtable.len().min((n - 2) / bs), "the pre-copied blocks are found in B's cache");
    assert_eq!(btable.len(), (n - 1).div_ceil(bs));
    copy_blocks(&a, &frozen.table[cached..btable.len()], &b, &btable[cached..]);
    assert!(b.engine.remote_kv_arrived(bid, frozen.tokens[n - 1]).unwrap().is_none(), "the last token was sent");
    a.engine.abort(id);
    assert_eq!(a.engine.stats().blocks_used, 0);
    run_to_end(&mut b.engine, bid, &mut got);
    assert_eq!(b.engine.stats().blocks_used, 0);
    got
}

#[test]
fn a_request_moved_between_engines_continues_as_if_it_never_moved() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "model missing: run scripts/fetch-model.sh first");
    let file = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let prompt = tok.encode(&format!("Write a long story about {}", "a lighthouse keeper. ".repeat(6)), true).unwrap();
    for seeded in [false, true] {
        let p = params(seeded);
        let mut alone = Side::new(&file);
        let id = alone.engine.add_request(EngineRequest::new(prompt.clone(), p.clone())).unwrap();
        let mut want = Got::default();
        run_to_end(&mut alone.engine, id, &mut want);
        assert_eq!(want.ids.len(), 60);
        // Moved early, mid-block and at a block's edge; with tokens after the pre-copy or none.
        for (before, more) in [(1, 0), (9, 7), (20, 0), (33, 12)] {
            let got = migrated(&file, &prompt, &p, before, more);
            assert_eq!(got, want, "seeded {seeded}, moved after {before}+{more} tokens");
        }
    }
}

#[test]
fn a_frozen_request_thaws_and_finishes_where_it_was() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let file = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let prompt = tok.encode("Name three rivers.", true).unwrap();
    let p = params(true);
    let mut alone = Side::new(&file);
    let id = alone.engine.add_request(EngineRequest::new(prompt.clone(), p.clone())).unwrap();
    let mut want = Got::default();
    run_to_end(&mut alone.engine, id, &mut want);

    let mut a = Side::new(&file);
    let id = a.engine.add_request(EngineRequest::new(prompt.clone(), p)).unwrap();
    assert!(a.engine.freeze(id).is_err(), "a request not yet prefilled cannot freeze");
    let mut got = Got::default();
    while got.ids.len() < 5 {
        for o in a.engine.step().unwrap() {
            got.text.push_str(&o.text);
            got.ids.extend(&o.token_ids);
        }
    }
    let held = a.engine.stats().blocks_used;
    a.engine.freeze(id).unwrap();
    for _ in 0..3 {
        assert!(a.engine.step().unwrap().is_empty());
    }
    assert_eq!(a.engine.stats().blocks_used, held, "a frozen request keeps its blocks");
    a.engine.thaw(id).unwrap();
    assert!(a.engine.thaw(id).is_err());
    run_to_end(&mut a.engine, id, &mut got);
    assert_eq!(got, want);
    assert_eq!(a.engine.stats().blocks_used, 0);
}
