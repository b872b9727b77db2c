//! What the `control_messages` fuzz targets check, shared by the libFuzzer target
//! (`fuzz_targets/control_messages.rs`) and the stable-Rust mutation loop
//! (`src/bin/control_messages_stable.rs`), plus the seeds and the mutator of the latter.
//!
//! [`check`] feeds arbitrary bytes, for every request message of `tandem.v1` and
//! `tandem.worker.v1`, to:
//! - prost's decoder: a message that decodes re-encodes to bytes that decode to the same
//!   encoding, of the length `encoded_len` announced;
//! - the servers' own decode path, tonic's request `Streaming` over Tandem's codec
//!   (`TandemCodec`, 4 MiB message limit), once with the bytes as one well-framed
//!   message and once with the bytes as the whole gRPC body: each message it yields up to
//!   the first error is prost's decoding of its frame, and an undecodable message is
//!   INVALID_ARGUMENT (the client's fault, never INTERNAL);
//! - for a decoded `GenerateRequest`, the router's `validate` (with the real model's
//!   tokenizer, chat template and context, when the model file is there): what it accepts
//!   is complete and within every limit, and whatever the cheap size pre-check that every
//!   API runs before tokenizing (`validate::check_input_size`) refuses, `validate` refuses too.

use std::fmt::Debug;
use std::future::Future;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use prost::Message;
use tandem_proto::codec::TandemCodec;
use tandem_proto::tandem::v1 as api;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_router::validate::{validate, ModelFacts, MAX_LOGPROBS, MAX_N, MAX_STOP};
use tonic::codec::Codec;

/// The servers' largest accepted message (tonic's default, which Tandem keeps).
pub const MAX_MESSAGE: usize = 4 << 20;

/// The whole check for one input. Panics (an assertion) on a violated property.
pub fn check(data: &[u8]) {
    check_type::<api::GenerateRequest>(data);
    check_type::<api::TokenizeRequest>(data);
    check_type::<api::ListModelsRequest>(data);
    check_type::<pb::ReserveRequest>(data);
    check_type::<pb::PrefillRequest>(data);
    check_type::<pb::DecodeRequest>(data);
    check_type::<pb::CancelRequest>(data);
    check_type::<pb::StatsRequest>(data);
    check_type::<pb::KvEventsRequest>(data);
    check_type::<pb::DrainRequest>(data);
    if let Ok(req) = api::GenerateRequest::decode(data) {
        check_validation(&req);
    }
}

/// Prost, then the server's path with `data` as one framed message and as the whole body.
fn check_type<T: Message + Default + Debug + Send + 'static>(data: &[u8]) {
    let direct = T::decode(data);
    if let Ok(m) = &direct {
        let bytes = m.encode_to_vec();
        assert_eq!(bytes.len(), m.encoded_len(), "encoded_len of {m:?}");
        let again = T::decode(&bytes[..]).expect("a re-encoded message decodes");
        assert_eq!(again.encode_to_vec(), bytes, "re-encoding of {m:?} is not stable");
    }
    let mut framed = Vec::with_capacity(data.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(data.len() as u32).to_be_bytes());
    framed.extend_from_slice(data);
    check_stream::<T>(&framed);
    check_stream::<T>(data);
}

/// The complete uncompressed frames at the start of a gRPC body, within the size limit,
/// and whether they are all of it.
fn frames(body: &[u8]) -> (Vec<&[u8]>, bool) {
    let (mut at, mut out) = (0, Vec::new());
    while body.len() - at >= 5 {
        let len = u32::from_be_bytes(body[at + 1..at + 5].try_into().expect("4 bytes")) as usize;
        if body[at] != 0 || len > MAX_MESSAGE || body.len() - at - 5 < len {
            return (out, false);
        }
        out.push(&body[at + 5..at + 5 + len]);
        at += 5 + len;
    }
    (out, at == body.len())
}

/// Decodes `body` as a server decodes a request's body and compares with [`frames`].
fn check_stream<T: Message + Default + Debug + Send + 'static>(body: &[u8]) {
    let (frames, clean) = frames(body);
    let decoder = TandemCodec::<T, T>::default().decoder();
    let body = http_body_util::Full::new(Bytes::copy_from_slice(body));
    let mut stream = tonic::Streaming::new_request(decoder, body, None, Some(MAX_MESSAGE));
    let mut i = 0;
    loop {
        match block_on(stream.message()) {
            Ok(Some(m)) => {
                let frame = frames.get(i).unwrap_or_else(|| panic!("message {i} ({m:?}) from no complete frame"));
                let want = T::decode(*frame).expect("the server decoded what prost does not");
                assert_eq!(m.encode_to_vec(), want.encode_to_vec(), "message {i} differs from prost's decoding");
            }
            Ok(None) => {
                // (tonic also ends quietly on a header whose body never came: a unary server
                // then answers "Missing request message".)
                assert!(!clean || i == frames.len(), "a clean body ended after {i} of {} frames", frames.len());
                return;
            }
            Err(status) => {
                match frames.get(i) {
                    // A complete frame that fails: it did not decode, the client's fault.
                    Some(frame) => {
                        assert!(T::decode(*frame).is_err(), "a decodable frame failed: {status:?}");
                        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
                    }
                    // Otherwise the framing itself is bad.
                    None => assert!(!clean, "a clean body failed after its {i} frames: {status:?}"),
                }
                // The servers' rpcs take one request message: the first error is the answer.
                return;
            }
        }
        i += 1;
    }
}

/// Runs a future that never waits (its body is in memory) to completion.
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1000 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("decoding an in-memory body did not finish");
}

/// The model the router would serve: `TANDEM_MODEL`, or the repository's default. None
/// (validation is skipped, said once) when the file is not there.
pub fn facts() -> Option<&'static ModelFacts> {
    static FACTS: OnceLock<Option<ModelFacts>> = OnceLock::new();
    FACTS
        .get_or_init(|| {
            let path = std::env::var_os("TANDEM_MODEL").map(PathBuf::from).unwrap_or_else(|| {
                PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"))
            });
            let load = || -> Result<ModelFacts, String> {
                use tandem_text::{chat::ChatTemplate, config::ModelConfig, gguf::GgufFile, tokenizer::Tokenizer};
                let f = GgufFile::open(&path).map_err(|e| e.to_string())?;
                let config = ModelConfig::from_gguf(&f).map_err(|e| e.to_string())?;
                Ok(ModelFacts {
                    name: String::new(),
                    tokenizer: Tokenizer::from_gguf(&f).map_err(|e| e.to_string())?,
                    template: ChatTemplate::from_gguf(&f).map_err(|e| e.to_string())?,
                    max_model_len: config.context_length,
                    vocab_size: config.vocab_size,
                    guides: Default::default(),
                })
            };
            load().map_err(|e| eprintln!("control fuzz: no validation ({}: {e})", path.display())).ok()
        })
        .as_ref()
}

/// The router's checks of a decoded request.
fn check_validation(req: &api::GenerateRequest) {
    let Some(facts) = facts() else { return };
    let checked = validate(req, facts, || "fuzz".into());
    if tandem_router::validate::check_input_size(req.input.as_ref(), facts).is_err() {
        assert!(checked.is_err(), "the size pre-check refused what validate accepts: {req:?}");
    }
    let Ok(v) = checked else { return };
    let s = &v.sampling;
    assert!(!v.prompt.is_empty() && v.prompt.iter().all(|&t| (t as usize) < facts.vocab_size));
    assert!(s.max_tokens >= 1 && v.prompt.len() + s.max_tokens as usize <= facts.max_model_len, "{v:?}");
    assert!((1..=MAX_N).contains(&v.n), "n {}", v.n);
    assert!(s.stop.len() <= MAX_STOP && s.stop.iter().all(|x| !x.is_empty()));
    assert!(s.logprobs.is_none_or(|l| l <= MAX_LOGPROBS) && s.prompt_logprobs.is_none_or(|l| l <= MAX_LOGPROBS));
    assert!(s.temperature.is_finite() && s.temperature >= 0.0);
    assert!(s.top_p > 0.0 && s.top_p <= 1.0 && (0.0..=1.0).contains(&s.min_p));
    assert!(s.repetition_penalty.is_finite() && s.repetition_penalty > 0.0);
    assert!(s.stop_token_ids.iter().all(|&t| (t as usize) < facts.vocab_size));
}

// ---------------------------------------------------------------------------
// Seeds and mutations for the stable loop (the libFuzzer target brings its own).

/// The PRNG of the shared stable loop, so a run is reproducible from its seed.
use crate::stable::Rng;

/// Valid requests of every kind, encoded, and a few gRPC bodies of them.
pub fn seeds() -> Vec<Vec<u8>> {
    let sampling = api::SamplingParams {
        max_tokens: Some(16),
        temperature: Some(0.7),
        top_p: Some(0.9),
        top_k: Some(40),
        seed: Some(7),
        stop: vec!["\n\n".into(), "END".into()],
        stop_token_ids: vec![2],
        n: Some(2),
        logprobs: Some(3),
        ..Default::default()
    };
    let chat = api::GenerateRequest {
        input: Some(api::generate_request::Input::Messages(api::Messages {
            messages: vec![
                api::ChatMessage { role: "system".into(), content: "Be brief.".into(), ..Default::default() },
                api::ChatMessage {
                    role: "user".into(),
                    content: "Name three primary colors.".into(),
                    ..Default::default()
                },
            ],
            tools: vec![],
        })),
        sampling: Some(sampling.clone()),
        cache_salt: Some("tenant".into()),
        ..Default::default()
    };
    let text = api::GenerateRequest {
        input: Some(api::generate_request::Input::Prompt("The three laws of motion are".into())),
        sampling: Some(api::SamplingParams { max_tokens: Some(8), ..Default::default() }),
        request_id: Some("client-1".into()),
        ..Default::default()
    };
    let ids = api::GenerateRequest {
        input: Some(api::generate_request::Input::PromptTokens(api::PromptTokens {
            token_ids: vec![1, 504, 3458, 314],
        })),
        sampling: Some(api::SamplingParams { prompt_logprobs: Some(1), ..sampling.clone() }),
        priority: -3,
        ..Default::default()
    };
    let wsampling = pb::SamplingParams { temperature: 0.0, top_p: 1.0, max_tokens: 16, ..Default::default() };
    // Guides: the validation compiles them, so mutated schemas, regexes and grammars reach
    // llguidance.
    let guided = |kind: api::guide::Kind| {
        let mut r = chat.clone();
        r.sampling.as_mut().expect("set").guide = Some(api::Guide { kind: Some(kind) });
        r.sampling.as_mut().expect("set").n = Some(1);
        r.encode_to_vec()
    };
    let mut out = vec![
        guided(api::guide::Kind::JsonSchema(
            r#"{"type":"object","properties":{"a":{"type":"integer","minimum":0},"b":{"enum":["x","y"]}},"required":["a"]}"#.into(),
        )),
        guided(api::guide::Kind::Regex("[a-z]{2,5}(-[0-9]+)?".into())),
        guided(api::guide::Kind::Grammar("start: \"(\" start \")\" | \"x\"".into())),
        chat.encode_to_vec(),
        text.encode_to_vec(),
        ids.encode_to_vec(),
        api::TokenizeRequest {
            input: Some(api::tokenize_request::Input::Prompt("hello".into())),
            return_token_strs: true,
            ..Default::default()
        }
        .encode_to_vec(),
        pb::ReserveRequest {
            request_id: u64::MAX - 1,
            prompt_token_ids: vec![1, 2, 3, 4, 5],
            lease_ms: 30_000,
            max_tokens: 16,
            sampling: Some(wsampling.clone()),
            ..Default::default()
        }
        .encode_to_vec(),
        pb::PrefillRequest {
            request_id: 9,
            prompt_token_ids: vec![1, 2, 3],
            sampling: Some(wsampling.clone()),
            destination: Some(pb::KvDestination {
                worker_id: "decode-0".into(),
                block_ids: vec![0, 1, 2],
                layout: Some(pb::KvLayout {
                    n_layers: 30,
                    n_kv_heads: 3,
                    head_dim: 64,
                    block_size: 16,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec(),
        pb::DecodeRequest { request_id: 9, sampling: Some(wsampling), ..Default::default() }.encode_to_vec(),
        pb::CancelRequest { request_id: 9, reason: "client left".into() }.encode_to_vec(),
        pb::DrainRequest { deadline_ms: Some(1000), migrate: false }.encode_to_vec(),
        Vec::new(),
    ];
    // Whole gRPC bodies: one message, and two back to back.
    let frame = |m: &[u8]| {
        let mut f = vec![0];
        f.extend_from_slice(&(m.len() as u32).to_be_bytes());
        f.extend_from_slice(m);
        f
    };
    let mut two = frame(&out[0]);
    two.extend(frame(&out[1]));
    out.push(frame(&out[2]));
    out.push(two);
    out
}

/// Varint-sized values that sit on boundaries (lengths, ids, counts).
const INTERESTING: [u64; 9] = [0, 1, 0x7f, 0x80, 0x3fff, 0x4000, u32::MAX as u64, 1 << 35, u64::MAX];

/// Applies 1 to 4 random mutations to `buf`; `pool` supplies material for splices.
pub fn mutate(rng: &mut Rng, buf: &mut Vec<u8>, pool: &[Vec<u8>]) {
    for _ in 0..1 + rng.below(4) {
        let len = buf.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                buf[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                buf[i] = [0u8, 1, 0x7f, 0x80, 0xff, rng.next_u64() as u8][rng.below(6)];
            }
            2 => {
                // An interesting varint, often after a tag of a random field and wire type.
                let at = rng.below(len + 1);
                let mut v = Vec::new();
                if rng.below(2) == 0 {
                    v.push((1 + rng.below(20) as u8) << 3 | rng.below(8) as u8);
                }
                let mut x = INTERESTING[rng.below(INTERESTING.len())];
                loop {
                    let b = (x & 0x7f) as u8;
                    x >>= 7;
                    v.push(if x == 0 { b } else { b | 0x80 });
                    if x == 0 {
                        break;
                    }
                }
                buf.splice(at..at, v);
            }
            3 => {
                let at = rng.below(len + 1);
                let bytes: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next_u64() as u8).collect();
                buf.splice(at..at, bytes);
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(16));
                buf.drain(at..at + n);
            }
            5 if len > 0 => buf.truncate(rng.below(len)),
            6 => {
                let other = &pool[rng.below(pool.len())];
                buf.extend_from_slice(other);
            }
            7 if len > 0 => {
                let other = &pool[rng.below(pool.len())];
                if !other.is_empty() {
                    let from = rng.below(other.len());
                    let n = 1 + rng.below(other.len() - from);
                    let at = rng.below(len);
                    let end = (at + n).min(len);
                    buf.splice(at..end, other[from..from + n].iter().copied());
                }
            }
            _ if len > 0 => {
                // Duplicate a chunk (grows repeated fields).
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(32));
                let chunk = buf[at..at + n].to_vec();
                buf.splice(at..at, chunk);
            }
            _ => buf.push(rng.next_u64() as u8),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_pass_and_a_short_run_passes() {
        let pool = seeds();
        for s in &pool {
            check(s);
        }
        let mut rng = Rng::new(42);
        for i in 0..2_000 {
            let mut buf = pool[i % pool.len()].clone();
            mutate(&mut rng, &mut buf, &pool);
            check(&buf);
        }
    }
}
