//! Prefill on one engine, ship the KV over real TCP layer by layer while the
//! forward pass runs, decode on another cache from the received blocks: the
//! decode produces exactly the tokens of an undivided run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tandem_engine::kv_cache::{BlockId, KvCache, KvDtype};
use tandem_engine::model::{ForwardBatch, LogitsWanted, Model, ModelOptions, Scratch};
use tandem_kvtransfer::{HostKv, KvReceiver, KvSender, TcpConfig};
use tandem_prefill_worker::LayerShipper;
use tandem_proto::ids::ClusterRequestId;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn argmax(row: &[f32]) -> u32 {
    (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b }) as u32
}

fn decode(m: &Model, kv: &mut KvCache, table: &[BlockId], first: u32, pos: usize, steps: usize) -> Vec<u32> {
    let mut scratch = Scratch::default();
    let mut out = vec![first];
    for i in 0..steps {
        let mut b = ForwardBatch::default();
        let s = b.add_seq(table);
        b.add_tokens(s, &[out[i]], pos + i, LogitsWanted::Last);
        out.push(argmax(m.forward(&b, kv, &mut scratch).unwrap()));
    }
    out
}

#[test]
fn kv_shipped_during_prefill_decodes_like_an_undivided_run() {
    let model_path = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model_path.exists(), "model missing: run scripts/fetch-model.sh first");
    let m = Model::load(&model_path, &ModelOptions::default()).unwrap();
    let fx: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/llama_cpp/reference.json")).unwrap())
            .unwrap();
    let case = fx["cases"].as_array().unwrap().iter().find(|c| c["name"] == "printing-press-long").unwrap();
    let prompt: Vec<u32> =
        case["prompt_token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let bs = 16;
    let n_blocks = prompt.len().div_ceil(bs) + 2; // room for the decode steps
    let layout = tandem_prefill_worker::kv_layout(&m, bs);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let sink = Arc::new(HostKv::new(layout, 64));
    let rx = rt.block_on(KvReceiver::bind("127.0.0.1:0".parse().unwrap(), sink.clone(), TcpConfig::default())).unwrap();
    // Destination blocks on the decode side: scattered, unlike the prefill side's.
    let dst: Vec<BlockId> = (0..n_blocks as u32).map(|i| BlockId(63 - 2 * i)).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let reservation = rx.reserve(ClusterRequestId(9), &dst, deadline).unwrap();

    // Prefill side.
    let mut kv_a = KvCache::new(m.kv_shape(bs), m.config.n_layers, 64, KvDtype::F16).unwrap();
    let src: Vec<BlockId> = (0..n_blocks as u32).map(BlockId).collect();
    let sender = KvSender::new(layout, TcpConfig::default());
    let session = rt.block_on(sender.open(rx.local_addr(), ClusterRequestId(9), deadline)).unwrap();
    let mut shipper = LayerShipper::start(rt.handle(), session, src.clone(), dst.clone());
    let mut scratch = Scratch::default();
    let mut batch = ForwardBatch::default();
    let s = batch.add_seq(&src);
    batch.add_tokens(s, &prompt, 0, LogitsWanted::Last);
    let logits = m.forward_with_hook(&batch, &mut kv_a, &mut scratch, &mut |l, kv| shipper.on_layer(l, kv)).unwrap();
    let first = argmax(logits);
    assert_eq!(
        first as u64,
        case["generated_token_ids"][0].as_u64().unwrap(),
        "prefill's first token equals llama.cpp's"
    );
    shipper.finish(rt.handle(), first, prompt.len() as u32).unwrap();

    // Decode side: the reservation completes with the first token.
    let arrived = rt.block_on(reservation.wait()).unwrap();
    assert_eq!((arrived.first_token, arrived.num_tokens as usize), (first, prompt.len()));
    let mut kv_b = KvCache::new(m.kv_shape(bs), m.config.n_layers, 64, KvDtype::F16).unwrap();
    for layer in 0..m.config.n_layers {
        for (i, &d) in dst.iter().enumerate() {
            let got = sink.read_block(layer, d.index());
            let mut want = Vec::new();
            kv_a.layer_bytes(layer).gather(&src[i..i + 1], &mut want);
            assert_eq!(got, want, "layer {layer}: block {i} arrived bit-exact");
            kv_b.scatter_block(layer, d, &got);
        }
    }
    let remote = decode(&m, &mut kv_b, &dst, first, prompt.len(), 20);
    let local = decode(&m, &mut kv_a, &src, first, prompt.len(), 20);
    assert_eq!(remote, local, "decoding from shipped KV equals decoding in place");
    assert_eq!(rx.active(), 0);
}
