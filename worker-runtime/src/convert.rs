//! `tandem.worker.v1` messages to and from the engine's types, shared by the roles:
//! sampling parameters, finish reasons, log-probabilities, KV layouts, prefix-cache
//! events, and the statuses engine errors and KV faults become.

use std::sync::Arc;

use tandem_engine::error::EngineError;
use tandem_engine::llm_engine::EngineRequest;
use tandem_engine::sampling::{SampledToken, SamplingParams};
use tandem_engine::share::Share;
use tandem_engine::FinishReason;
use tandem_kvtransfer::{KvDtypeWire, KvLayout};
use tandem_proto::tandem::v1 as api;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_text::guide::Guide;
use tandem_text::tokenizer::Tokenizer;
use tonic::Status;

pub fn sampling_from_pb(p: &pb::SamplingParams) -> SamplingParams {
    SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: p.top_p,
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        seed: p.seed,
        max_tokens: p.max_tokens as usize,
        stop: p.stop.clone(),
        stop_token_ids: p.stop_token_ids.clone(),
        ignore_eos: p.ignore_eos,
        logprobs: p.logprobs.map(|n| n as usize),
        prompt_logprobs: p.prompt_logprobs.map(|n| n as usize),
        guide: p.guide.as_ref().and_then(guide_from_pb),
    }
}

/// A `tandem.v1.Guide` as the engine takes it (`None`: no kind set). A schema that is not
/// JSON becomes one that cannot compile, so the request fails with the compiler's words.
pub fn guide_from_pb(g: &api::Guide) -> Option<Guide> {
    use api::guide::Kind;
    Some(match g.kind.as_ref()? {
        Kind::JsonSchema(s) => Guide::JsonSchema(serde_json::from_str(s).unwrap_or(serde_json::Value::Null)),
        Kind::JsonObject(_) => Guide::JsonObject,
        Kind::Regex(r) => Guide::Regex(r.clone()),
        Kind::Choice(c) => Guide::Choice(c.choices.clone()),
        Kind::Grammar(l) => Guide::Lark(l.clone()),
    })
}

/// The engine request of one choice for `prompt`, with the scheduling fields every worker
/// call carries (`priority`, `cache_salt`, `resumed_tokens`). Whether it exports its KV is
/// the `Admission`'s to say.
pub fn engine_request(
    prompt: Vec<u32>,
    params: SamplingParams,
    priority: i32,
    cache_salt: Option<String>,
    resumed_tokens: u32,
    scheduling: Option<&pb::Scheduling>,
) -> EngineRequest {
    EngineRequest {
        prompt,
        params,
        n: 1,
        priority,
        cache_salt,
        share: share_of(scheduling),
        export_kv: false,
        resumed: resumed_tokens as usize,
    }
}

/// The engine's view of a request's `Scheduling`: the default tenant when it names none,
/// no prediction for 0, and no service elsewhere that is not a finite positive number.
pub fn share_of(s: Option<&pb::Scheduling>) -> Share {
    let Some(s) = s else { return Share::default() };
    Share {
        tenant: (!s.tenant.is_empty()).then(|| Arc::from(truncate_tenant(&s.tenant))),
        predicted_output: (s.predicted_output_tokens > 0).then_some(s.predicted_output_tokens),
        elsewhere: if s.tenant_service_elsewhere.is_finite() { s.tenant_service_elsewhere.max(0.0) } else { 0.0 },
    }
}

/// Tenant names longer than this are cut (at a character boundary): a name is a label.
const MAX_TENANT_LEN: usize = 128;

fn truncate_tenant(t: &str) -> &str {
    let mut end = t.len().min(MAX_TENANT_LEN);
    while !t.is_char_boundary(end) {
        end -= 1;
    }
    &t[..end]
}

pub fn finish_to_pb(f: Option<FinishReason>) -> api::FinishReason {
    match f {
        None => api::FinishReason::Unspecified,
        Some(FinishReason::Stop) => api::FinishReason::Stop,
        Some(FinishReason::Length) => api::FinishReason::Length,
        Some(FinishReason::Abort) => api::FinishReason::Abort,
    }
}

fn token_logprob(tok: &Tokenizer, id: u32, logprob: f32) -> api::TokenLogprob {
    let bytes = tok.token_bytes(id).map(|b| b.to_vec()).unwrap_or_default();
    api::TokenLogprob { token_id: id, text: String::from_utf8_lossy(&bytes).into_owned(), logprob, bytes }
}

pub fn logprobs_to_pb(tok: &Tokenizer, t: &SampledToken) -> api::TokenLogprobs {
    api::TokenLogprobs {
        token: Some(token_logprob(tok, t.id, t.logprob)),
        top_logprobs: t.top_logprobs.iter().map(|&(id, lp)| token_logprob(tok, id, lp)).collect(),
    }
}

pub fn layout_to_pb(l: &KvLayout) -> pb::KvLayout {
    pb::KvLayout {
        n_layers: l.n_layers as u32,
        n_kv_heads: l.n_kv_heads as u32,
        head_dim: l.head_dim as u32,
        block_size: l.block_size as u32,
        dtype: match l.dtype {
            KvDtypeWire::F16 => pb::KvDtype::F16 as i32,
            KvDtypeWire::F32 => pb::KvDtype::F32 as i32,
        },
        fingerprint: l.fingerprint,
    }
}

pub fn layout_from_pb(l: &pb::KvLayout) -> Result<KvLayout, String> {
    let small = |v: u32, what: &str| u16::try_from(v).map_err(|_| format!("layout {what} {v} is too large"));
    let dtype = match pb::KvDtype::try_from(l.dtype) {
        Ok(pb::KvDtype::F16) => KvDtypeWire::F16,
        Ok(pb::KvDtype::F32) => KvDtypeWire::F32,
        _ => return Err(format!("layout dtype {} is not known", l.dtype)),
    };
    Ok(KvLayout {
        n_layers: small(l.n_layers, "n_layers")?,
        n_kv_heads: small(l.n_kv_heads, "n_kv_heads")?,
        head_dim: small(l.head_dim, "head_dim")?,
        block_size: small(l.block_size, "block_size")?,
        dtype,
        fingerprint: l.fingerprint,
    })
}

/// The transfer layout of `model`'s KV cache with f16 blocks of `block_size` tokens.
pub fn kv_layout(model: &tandem_engine::model::Model, block_size: usize) -> KvLayout {
    let c = &model.config;
    KvLayout {
        n_layers: c.n_layers as u16,
        n_kv_heads: c.n_kv_heads as u16,
        head_dim: c.head_dim as u16,
        block_size: block_size as u16,
        dtype: KvDtypeWire::F16,
        fingerprint: c.fingerprint(),
    }
}

pub fn kv_event_to_pb(e: tandem_engine::block_manager::KvEvent, event_id: u64) -> pb::KvEvent {
    use tandem_engine::block_manager::KvEvent;
    let event = match e {
        KvEvent::Stored { parent, hashes } => pb::kv_event::Event::Stored(pb::KvStored {
            parent_hash: parent.map(|h| h.0),
            block_hashes: hashes.into_iter().map(|h| h.0).collect(),
        }),
        KvEvent::Removed { hashes } => {
            pb::kv_event::Event::Removed(pb::KvRemoved { block_hashes: hashes.into_iter().map(|h| h.0).collect() })
        }
    };
    pb::KvEvent { event_id, event: Some(event) }
}

/// Marks a status as caused by a failed KV transfer (the router's KV failure policy then
/// decides what the request gets), as opposed to a failed worker.
pub fn kv_fault(mut status: Status) -> Status {
    status.metadata_mut().insert(tandem_proto::FAULT_METADATA, tonic::metadata::MetadataValue::from_static("kv"));
    status
}

pub fn status_from_engine(e: EngineError) -> Status {
    match e {
        EngineError::InvalidRequest(m) => Status::invalid_argument(m),
        EngineError::Overloaded(m) => Status::resource_exhausted(m),
        EngineError::OutOfBlocks(m) => Status::resource_exhausted(format!("out of KV cache blocks: {m}")),
        other => Status::internal(other.to_string()),
    }
}
