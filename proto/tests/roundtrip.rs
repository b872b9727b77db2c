//! The contract round-trips: every message of both packages, built with every field
//! set to a non-default value, encodes and decodes to itself. Coverage is checked
//! against the descriptor set, so a field added to a `.proto` without a sample here
//! fails the test instead of going untested.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use prost::Message;

use tandem_proto::tandem::v1 as api;
use tandem_proto::tandem::worker::v1 as wk;

/// One message instance, encoded, with its round-trip check.
struct Sample {
    name: &'static str,
    bytes: Vec<u8>,
    check: Box<dyn Fn()>,
}

fn sample<M: Message + Default + PartialEq + Debug + 'static>(name: &'static str, msg: M) -> Sample {
    let bytes = msg.encode_to_vec();
    let encoded = bytes.clone();
    let check = Box::new(move || {
        let back = M::decode(encoded.as_slice()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(back, msg, "{name} changed in a round trip");
        assert_eq!(back.encode_to_vec(), encoded, "{name} re-encodes differently");
    });
    Sample { name, bytes, check }
}

fn chat() -> api::ChatMessage {
    api::ChatMessage { role: "user".into(), content: "Name a prime.".into(), ..Default::default() }
}

/// An assistant turn that called a tool, and the tool's answer.
fn tool_turns() -> [api::ChatMessage; 2] {
    [
        api::ChatMessage {
            role: "assistant".into(),
            tool_calls_json: r#"[{"id":"call_1","type":"function","function":{"name":"f","arguments":"{}"}}]"#.into(),
            ..Default::default()
        },
        api::ChatMessage {
            role: "tool".into(),
            content: "42".into(),
            tool_call_id: Some("call_1".into()),
            name: Some("f".into()),
            ..Default::default()
        },
    ]
}

fn messages() -> api::Messages {
    let mut messages = vec![api::ChatMessage { role: "system".into(), content: "Be terse.".into(), ..chat() }, chat()];
    messages.extend(tool_turns());
    api::Messages {
        messages,
        tools: vec![r#"{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}"#.into()],
    }
}

fn sampling() -> api::SamplingParams {
    api::SamplingParams {
        max_tokens: Some(64),
        temperature: Some(0.7),
        top_p: Some(0.9),
        top_k: Some(40),
        min_p: Some(0.05),
        seed: Some(1234),
        stop: vec!["\n\n".into(), "END".into()],
        stop_token_ids: vec![2, 49152 - 1],
        n: Some(3),
        logprobs: Some(5),
        presence_penalty: Some(0.5),
        frequency_penalty: Some(-0.25),
        repetition_penalty: Some(1.1),
        ignore_eos: true,
        prompt_logprobs: Some(2),
        guide: Some(guide(api::guide::Kind::Regex("[0-9]{3}".into()))),
    }
}

fn guide(kind: api::guide::Kind) -> api::Guide {
    api::Guide { kind: Some(kind) }
}

fn guides() -> Vec<api::Guide> {
    use api::guide::Kind;
    vec![
        guide(Kind::JsonSchema(r#"{"type":"object","properties":{"a":{"type":"integer"}}}"#.into())),
        guide(Kind::JsonObject(true)),
        guide(Kind::Regex("(yes|no)".into())),
        guide(Kind::Choice(api::Choices { choices: vec!["red".into(), "green".into()] })),
        guide(Kind::Grammar("start: \"a\"+".into())),
    ]
}

fn token_logprob(id: u32) -> api::TokenLogprob {
    api::TokenLogprob { token_id: id, text: format!("t{id}"), logprob: -0.125 * id as f32, bytes: vec![0xe2, 0x82] }
}

fn token_logprobs() -> api::TokenLogprobs {
    api::TokenLogprobs { token: Some(token_logprob(7)), top_logprobs: vec![token_logprob(7), token_logprob(9)] }
}

fn usage() -> api::Usage {
    api::Usage { prompt_tokens: 20, completion_tokens: 12, total_tokens: 32, cached_tokens: 16 }
}

fn timing() -> api::Timing {
    api::Timing {
        time_to_first_token_ms: 41.5,
        queue_time_ms: 1.25,
        prefill_time_ms: 30.0,
        kv_transfer_time_ms: 2.5,
        decode_time_ms: 120.0,
        mean_inter_token_ms: 10.0,
        total_time_ms: 161.5,
    }
}

fn model() -> api::Model {
    api::Model {
        id: "smollm2-135m-instruct".into(),
        owned_by: "tandem".into(),
        created: 1_700_000_000,
        max_model_len: 8192,
    }
}

fn public_samples() -> Vec<Sample> {
    use api::generate_request::Input;
    use api::tokenize_request::Input as TokInput;
    let request = |input| api::GenerateRequest {
        model: "smollm2-135m-instruct".into(),
        input: Some(input),
        sampling: Some(sampling()),
        request_id: Some("client-req-1".into()),
        cache_salt: Some("tenant-a".into()),
        priority: -2,
        kv_failure_policy: api::KvFailurePolicy::Recompute.into(),
        slo_ttft_ms: Some(250),
        expected_output_tokens: Some(77),
    };
    let tokenize = |input| api::TokenizeRequest {
        model: "smollm2-135m-instruct".into(),
        input: Some(input),
        add_special_tokens: Some(false),
        add_generation_prompt: Some(false),
        return_token_strs: true,
    };
    vec![
        sample("tandem.v1.ChatMessage", chat()),
        sample("tandem.v1.ChatMessage", tool_turns()[0].clone()),
        sample("tandem.v1.ChatMessage", tool_turns()[1].clone()),
        sample("tandem.v1.Messages", messages()),
        sample("tandem.v1.SamplingParams", sampling()),
        sample("tandem.v1.Choices", api::Choices { choices: vec!["a".into(), "b c".into()] }),
        sample("tandem.v1.GenerateRequest", request(Input::Prompt("Once upon a time".into()))),
        sample("tandem.v1.GenerateRequest", request(Input::Messages(messages()))),
        sample("tandem.v1.PromptTokens", api::PromptTokens { token_ids: vec![1, 504, 3003] }),
        sample(
            "tandem.v1.GenerateRequest",
            request(Input::PromptTokens(api::PromptTokens { token_ids: vec![1, 504, 3003] })),
        ),
        sample("tandem.v1.TokenLogprob", token_logprob(3)),
        sample("tandem.v1.TokenLogprobs", token_logprobs()),
        sample("tandem.v1.Usage", usage()),
        sample("tandem.v1.Timing", timing()),
        sample(
            "tandem.v1.GenerateStreamResponse",
            api::GenerateStreamResponse {
                index: 2,
                text: " seven".into(),
                token_ids: vec![7, 8],
                logprobs: vec![token_logprobs(), token_logprobs()],
                finish_reason: api::FinishReason::Length.into(),
                usage: Some(usage()),
                timing: Some(timing()),
                request_id: "client-req-1".into(),
                model: "smollm2-135m-instruct".into(),
                prompt_logprobs: vec![token_logprobs()],
            },
        ),
        sample(
            "tandem.v1.Choice",
            api::Choice {
                index: 1,
                text: "Seven.".into(),
                token_ids: vec![7, 8, 9],
                logprobs: vec![token_logprobs()],
                finish_reason: api::FinishReason::Stop.into(),
                timing: Some(timing()),
                prompt_logprobs: vec![token_logprobs()],
            },
        ),
        sample(
            "tandem.v1.GenerateResponse",
            api::GenerateResponse {
                request_id: "client-req-1".into(),
                model: "smollm2-135m-instruct".into(),
                choices: vec![api::Choice { index: 0, text: "Two.".into(), ..Default::default() }],
                usage: Some(usage()),
            },
        ),
        sample("tandem.v1.TokenizeRequest", tokenize(TokInput::Prompt("hello".into()))),
        sample("tandem.v1.TokenizeRequest", tokenize(TokInput::Messages(messages()))),
        sample(
            "tandem.v1.TokenizeResponse",
            api::TokenizeResponse {
                token_ids: vec![1, 2, 3],
                count: 3,
                max_model_len: 8192,
                token_strs: vec!["<s>".into(), "hel".into(), "lo".into()],
                rendered_prompt: "<|im_start|>user\nhello<|im_end|>\n".into(),
            },
        ),
        sample("tandem.v1.ListModelsRequest", api::ListModelsRequest {}),
        sample("tandem.v1.Model", model()),
        sample("tandem.v1.ListModelsResponse", api::ListModelsResponse { models: vec![model(), model()] }),
    ]
    .into_iter()
    .chain(guides().into_iter().map(|g| sample("tandem.v1.Guide", g)))
    .collect()
}

fn layout() -> wk::KvLayout {
    wk::KvLayout {
        n_layers: 30,
        n_kv_heads: 3,
        head_dim: 64,
        block_size: 16,
        dtype: wk::KvDtype::F16.into(),
        fingerprint: 0xdead_beef_cafe_f00d,
    }
}

fn shm() -> wk::ShmEndpoint {
    wk::ShmEndpoint { socket_path: "run/tandem/decode-0.sock".into(), host_id: "3f1c9a1e-boot".into() }
}

fn endpoints() -> wk::KvEndpoints {
    wk::KvEndpoints { tcp_address: "10.0.0.7:7100".into(), shm: Some(shm()), nccl: true }
}

fn worker_sampling() -> wk::SamplingParams {
    wk::SamplingParams {
        temperature: 0.8,
        top_k: 50,
        top_p: 0.95,
        min_p: 0.02,
        repetition_penalty: 1.05,
        presence_penalty: 0.1,
        frequency_penalty: 0.2,
        seed: Some(99),
        max_tokens: 128,
        stop: vec!["###".into()],
        stop_token_ids: vec![2],
        ignore_eos: true,
        logprobs: Some(2),
        prompt_logprobs: Some(1),
        guide: Some(guide(api::guide::Kind::Choice(api::Choices { choices: vec!["yes".into()] }))),
    }
}

fn scheduling() -> wk::Scheduling {
    wk::Scheduling { tenant: "acme".into(), tenant_service_elsewhere: 4096.5, predicted_output_tokens: 120 }
}

fn destination() -> wk::KvDestination {
    wk::KvDestination {
        worker_id: "decode-0".into(),
        endpoints: Some(endpoints()),
        block_ids: vec![10, 11, 12],
        cached_blocks: 1,
        layout: Some(layout()),
        lease_ms: 30_000,
    }
}

fn kv_event(event: wk::kv_event::Event, id: u64) -> wk::KvEvent {
    wk::KvEvent { event_id: id, event: Some(event) }
}

fn stored() -> wk::KvStored {
    wk::KvStored { parent_hash: Some(0x1111), block_hashes: vec![0x2222, 0x3333] }
}

fn worker_samples() -> Vec<Sample> {
    use wk::kv_event::Event;
    vec![
        sample("tandem.worker.v1.KvLayout", layout()),
        sample("tandem.worker.v1.ShmEndpoint", shm()),
        sample("tandem.worker.v1.KvEndpoints", endpoints()),
        sample("tandem.worker.v1.SamplingParams", worker_sampling()),
        sample(
            "tandem.worker.v1.ReserveRequest",
            wk::ReserveRequest {
                request_id: u64::MAX - 1,
                prompt_token_ids: vec![1, 2, 3, 4, 5],
                cache_salt: Some("tenant-a".into()),
                lease_ms: 5_000,
                max_tokens: 256,
                priority: 1,
                sampling: Some(worker_sampling()),
                resumed_tokens: 3,
                sender_lease: 0x694d_8a5c_1f00_0042,
                // Both set only to cover the fields: a worker refuses the pair.
                cache_only: true,
                first_token_delivered: true,
                scheduling: Some(scheduling()),
            },
        ),
        sample("tandem.worker.v1.Scheduling", scheduling()),
        sample("tandem.worker.v1.TenantService", wk::TenantService { tenant: "acme".into(), service: 1.5e9 }),
        sample(
            "tandem.worker.v1.ReserveResponse",
            wk::ReserveResponse {
                block_ids: vec![10, 11, 12],
                cached_blocks: 1,
                kv_endpoints: Some(endpoints()),
                layout: Some(layout()),
                lease_ms: 4_000,
            },
        ),
        sample("tandem.worker.v1.KvDestination", destination()),
        sample(
            "tandem.worker.v1.PrefillRequest",
            wk::PrefillRequest {
                request_id: 42,
                prompt_token_ids: vec![1, 2, 3],
                sampling: Some(worker_sampling()),
                cache_salt: Some("tenant-a".into()),
                destination: Some(destination()),
                priority: -1,
                resumed_tokens: 2,
                scheduling: Some(scheduling()),
            },
        ),
        sample(
            "tandem.worker.v1.PrefillTiming",
            wk::PrefillTiming {
                queue_time_ms: 0.5,
                compute_time_ms: 25.0,
                kv_transfer_tail_ms: 1.5,
                total_time_ms: 27.0,
            },
        ),
        sample(
            "tandem.worker.v1.PrefillResponse",
            wk::PrefillResponse {
                first_token_id: 314,
                text: "Pi".into(),
                logprobs: Some(token_logprobs()),
                finish_reason: api::FinishReason::Stop.into(),
                cached_tokens: 16,
                timing: Some(wk::PrefillTiming { total_time_ms: 3.0, ..Default::default() }),
                prompt_logprobs: vec![token_logprobs()],
            },
        ),
        sample(
            "tandem.worker.v1.DecodeRequest",
            wk::DecodeRequest {
                request_id: 42,
                sampling: Some(worker_sampling()),
                resumed_tokens: 9,
                prompt_token_ids: vec![7, 8, 9],
                cache_salt: Some("tenant-b".into()),
                priority: -2,
                recompute: true,
                scheduling: Some(scheduling()),
            },
        ),
        sample(
            "tandem.worker.v1.DecodeTiming",
            wk::DecodeTiming { kv_wait_time_ms: 28.0, queue_time_ms: 0.25, decode_time_ms: 300.0 },
        ),
        sample(
            "tandem.worker.v1.DecodeResponse",
            wk::DecodeResponse {
                token_ids: vec![5, 6],
                text: "e is".into(),
                logprobs: vec![token_logprobs(), token_logprobs()],
                finish_reason: api::FinishReason::Abort.into(),
                timing: Some(wk::DecodeTiming { decode_time_ms: 1.0, ..Default::default() }),
                prompt_logprobs: vec![token_logprobs()],
                cached_tokens: 16,
                migration: wk::MigrationSignal::Wanted.into(),
                migrate_to: "decode-1".into(),
            },
        ),
        sample(
            "tandem.worker.v1.MigrateRequest",
            wk::MigrateRequest {
                request_id: 42,
                step: wk::MigrateStep::Commit.into(),
                destination: Some(destination()),
                destination_request_id: u64::MAX - 7,
                token_ids: vec![1, 2, 3],
                to_worker: "decode-1".into(),
                count: 2,
                required: true,
            },
        ),
        sample(
            "tandem.worker.v1.MigrateResponse",
            wk::MigrateResponse { num_tokens: 300, kv_bytes: 1 << 33, request_ids: vec![42, 43] },
        ),
        sample(
            "tandem.worker.v1.CancelRequest",
            wk::CancelRequest { request_id: 42, reason: "client_cancelled".into() },
        ),
        sample("tandem.worker.v1.CancelResponse", wk::CancelResponse { found: true, freed_blocks: 3 }),
        sample("tandem.worker.v1.StatsRequest", wk::StatsRequest {}),
        sample(
            "tandem.worker.v1.StatsResponse",
            wk::StatsResponse {
                running: 8,
                waiting: 2,
                waiting_for_kv: 1,
                queued_prefill_tokens: 4096,
                kv_blocks_used: 300,
                kv_blocks_total: 1024,
                prefix_cache_queried_tokens: 1 << 40,
                prefix_cache_hit_tokens: 1 << 39,
                preemptions: 5,
                draining: true,
                fenced: true,
                role: wk::WorkerRole::Both.into(),
                elastic: true,
                prefills_in_flight: 2,
                changing_role: true,
                tenant_service: vec![wk::TenantService { tenant: "acme".into(), service: 12.5 }],
            },
        ),
        sample(
            "tandem.worker.v1.SetRoleRequest",
            wk::SetRoleRequest { role: wk::WorkerRole::Prefill.into(), deadline_ms: Some(60_000) },
        ),
        sample(
            "tandem.worker.v1.SetRoleResponse",
            wk::SetRoleResponse {
                previous: wk::WorkerRole::Decode.into(),
                role: wk::WorkerRole::Prefill.into(),
                changed: true,
                drained_ms: 1234.5,
            },
        ),
        sample("tandem.worker.v1.KvEventsRequest", wk::KvEventsRequest {}),
        sample("tandem.worker.v1.KvStored", stored()),
        sample("tandem.worker.v1.KvRemoved", wk::KvRemoved { block_hashes: vec![0x3333] }),
        sample("tandem.worker.v1.KvCleared", wk::KvCleared {}),
        sample("tandem.worker.v1.KvEvent", kv_event(Event::Stored(stored()), 1)),
        sample("tandem.worker.v1.KvEvent", kv_event(Event::Removed(wk::KvRemoved { block_hashes: vec![7] }), 2)),
        sample("tandem.worker.v1.KvEvent", kv_event(Event::Cleared(wk::KvCleared {}), 3)),
        sample("tandem.worker.v1.KvSnapshot", wk::KvSnapshot { block_hashes: vec![0x2222, u64::MAX], last: true }),
        sample(
            "tandem.worker.v1.KvEvent",
            kv_event(Event::Snapshot(wk::KvSnapshot { block_hashes: vec![5, 6], last: false }), 4),
        ),
        sample(
            "tandem.worker.v1.KvEventBatch",
            wk::KvEventBatch {
                events: vec![kv_event(Event::Cleared(wk::KvCleared {}), 1), kv_event(Event::Stored(stored()), 2)],
            },
        ),
        sample("tandem.worker.v1.DrainRequest", wk::DrainRequest { deadline_ms: Some(30_000), migrate: true }),
        sample(
            "tandem.worker.v1.DrainStatus",
            wk::DrainStatus { running: 1, waiting: 2, waiting_for_kv: 3, aborted: 4, drained: true },
        ),
        sample(
            "tandem.worker.v1.WorkerDescriptor",
            wk::WorkerDescriptor {
                id: "decode-0".into(),
                role: wk::WorkerRole::Both.into(),
                grpc_address: "10.0.0.7:7000".into(),
                kv_endpoints: Some(endpoints()),
                model_name: "smollm2-135m-instruct".into(),
                kv_layout: Some(layout()),
                max_model_len: 8192,
                max_num_batched_tokens: 2048,
                max_num_seqs: 64,
                kv_blocks_total: 1024,
                version: "0.1.0".into(),
            },
        ),
    ]
}

/// The field numbers at the top level of an encoded message.
fn top_level_fields(mut b: &[u8]) -> BTreeSet<i32> {
    fn varint(b: &mut &[u8]) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let byte = b[0];
            *b = &b[1..];
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return v;
            }
            shift += 7;
        }
    }
    let mut fields = BTreeSet::new();
    while !b.is_empty() {
        let key = varint(&mut b);
        fields.insert((key >> 3) as i32);
        let skip = match key & 7 {
            0 => {
                varint(&mut b);
                0
            }
            1 => 8,
            2 => varint(&mut b) as usize,
            5 => 4,
            wire => panic!("unexpected wire type {wire}"),
        };
        b = &b[skip..];
    }
    fields
}

/// Every Tandem message in the descriptor set, by full name, with its field numbers.
fn declared_messages() -> BTreeMap<String, BTreeSet<i32>> {
    let fds = prost_types::FileDescriptorSet::decode(tandem_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut out = BTreeMap::new();
    for file in fds.file.iter().filter(|f| f.package().starts_with("tandem.")) {
        for msg in &file.message_type {
            assert!(msg.nested_type.is_empty(), "nested messages are not sampled: {}", msg.name());
            let fields = msg.field.iter().map(|f| f.number()).collect();
            out.insert(format!("{}.{}", file.package(), msg.name()), fields);
        }
    }
    out
}

#[test]
fn every_message_round_trips() {
    for s in public_samples().iter().chain(&worker_samples()) {
        (s.check)();
    }
}

#[test]
fn samples_cover_every_message_and_field() {
    let mut seen: BTreeMap<String, BTreeSet<i32>> = BTreeMap::new();
    for s in public_samples().iter().chain(&worker_samples()) {
        seen.entry(s.name.to_string()).or_default().extend(top_level_fields(&s.bytes));
    }
    let declared = declared_messages();
    let missing: Vec<_> = declared.keys().filter(|k| !seen.contains_key(*k)).collect();
    assert!(missing.is_empty(), "messages without a sample: {missing:?}");
    for (name, fields) in &declared {
        let unset: Vec<_> = fields.difference(&seen[name]).collect();
        assert!(unset.is_empty(), "{name}: fields {unset:?} never set to a non-default value");
    }
    let unknown: Vec<_> = seen.keys().filter(|k| !declared.contains_key(*k)).collect();
    assert!(unknown.is_empty(), "samples named after no message: {unknown:?}");
}

#[test]
fn enums_round_trip_by_name_and_number() {
    for reason in
        [api::FinishReason::Unspecified, api::FinishReason::Stop, api::FinishReason::Length, api::FinishReason::Abort]
    {
        assert_eq!(api::FinishReason::from_str_name(reason.as_str_name()), Some(reason));
        assert_eq!(api::FinishReason::try_from(reason as i32), Ok(reason));
    }
    let openai: Vec<_> =
        [api::FinishReason::Unspecified, api::FinishReason::Stop, api::FinishReason::Length, api::FinishReason::Abort]
            .map(api::FinishReason::as_openai_str)
            .into();
    assert_eq!(openai, [None, Some("stop"), Some("length"), Some("abort")]);
    for role in [wk::WorkerRole::Prefill, wk::WorkerRole::Decode, wk::WorkerRole::Both] {
        assert_eq!(wk::WorkerRole::try_from(role as i32), Ok(role));
    }
    // The KV transfer protocol numbers dtypes the same way (f16 = 1, f32 = 2).
    assert_eq!((wk::KvDtype::F16 as i32, wk::KvDtype::F32 as i32), (1, 2));
}

#[test]
fn unknown_fields_are_skipped() {
    // An older reader ignores fields a newer writer added: field 99 is unknown here.
    let mut bytes = api::Usage { prompt_tokens: 5, ..Default::default() }.encode_to_vec();
    bytes.extend_from_slice(&[0x98, 0x06, 0x01]); // field 99, varint, value 1
    assert_eq!(api::Usage::decode(bytes.as_slice()).unwrap().prompt_tokens, 5);
}
