//! `tandem.worker.v1` messages to and from the engine's types.

use tandem_engine::sampling::{SampledToken, SamplingParams};
use tandem_engine::FinishReason;
use tandem_kvtransfer::{KvDtypeWire, KvLayout};
use tandem_proto::tandem::v1 as api;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_text::tokenizer::Tokenizer;

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
    }
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
