//! The engine thread waits, rather than spins, while nothing it holds can run: a local
//! request queued behind blocks that a request waiting for remote KV holds used to keep
//! the thread stepping an empty plan at full speed until the KV came.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tandem_engine::llm_engine::{EngineRequest, LlmEngine, LlmEngineConfig};
use tandem_engine::model::{Model, ModelOptions};
use tandem_engine::sampling::SamplingParams;
use tandem_prefill_worker::{Admission, EngineHandle, Event};
use tandem_text::gguf::GgufFile;
use tandem_text::tokenizer::Tokenizer;

fn model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "model missing: run scripts/fetch-model.sh first");
    p
}

/// CPU time (user + system, in clock ticks) of this process's thread named `name`.
fn thread_ticks(name: &str) -> u64 {
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
            // Fields after the command's closing parenthesis: state is field 3, utime 14, stime 15.
            let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
            return rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
        }
    }
    panic!("no thread named {name}");
}

/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens, ignore_eos: true, ..SamplingParams::default() }
}

#[test]
fn a_request_that_cannot_run_leaves_the_engine_thread_idle_until_the_kv_comes() {
    let file = GgufFile::open(&model_path()).unwrap();
    let model = Model::from_gguf(&file, &ModelOptions::default()).unwrap();
    let tokenizer = Tokenizer::from_gguf(&file).unwrap();
    // Four blocks of 16 tokens: the remote request takes all of them.
    let cfg = LlmEngineConfig { kv_blocks: 4, ..LlmEngineConfig::default() };
    let engine = LlmEngine::new(model, tokenizer, cfg).unwrap();
    let name = "engine-idle";
    let h = EngineHandle::spawn(engine, name).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let remote = h.submit(EngineRequest::new((1..61).collect(), greedy(2)), Admission::Remote).await.unwrap();
        assert_eq!(remote.blocks.len(), 4, "the remote request holds the whole pool");
        let mut local = h.submit(EngineRequest::new((100..120).collect(), greedy(2)), Admission::Local).await.unwrap();
        // Nothing can run: the local request waits for blocks, the remote one for its KV.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (t0, before) = (Instant::now(), thread_ticks(name));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let spent = thread_ticks(name) - before;
        let wall = t0.elapsed().as_secs_f64() * USER_HZ;
        eprintln!("engine thread: {spent} of {wall:.0} clock ticks while nothing could run");
        assert!((spent as f64) < wall * 0.25, "the engine thread spun: {spent} of {wall:.0} ticks");
        // The KV comes: the remote request finishes, frees its blocks, and the local one runs.
        h.remote_ready(remote.id, 7);
        let end = Instant::now() + Duration::from_secs(30);
        let mut tokens = 0;
        while tokens < 2 {
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, local.events.recv()).await.expect("the local request ran") {
                Some(Event::Output(o)) => tokens += o.token_ids.len(),
                other => panic!("{other:?}"),
            }
        }
    });
}
