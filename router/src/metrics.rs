//! The router's metrics (names, labels and meaning are listed in docs/metrics.md).

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};

pub const REQUESTS: &str = "tandem_requests_total";
pub const CONSTRAINED: &str = "tandem_constrained_requests_total";
pub const PROMPT_TOKENS: &str = "tandem_prompt_tokens_total";
pub const GENERATION_TOKENS: &str = "tandem_generation_tokens_total";
pub const TTFT: &str = "tandem_time_to_first_token_seconds";
pub const ITL: &str = "tandem_inter_token_latency_seconds";
pub const E2E: &str = "tandem_e2e_request_latency_seconds";
pub const QUEUE: &str = "tandem_request_queue_time_seconds";
pub const TTFT_STAGE: &str = "tandem_ttft_stage_seconds";
pub const IN_FLIGHT: &str = "tandem_router_requests_in_flight";
pub const MAX_IN_FLIGHT: &str = "tandem_router_max_in_flight";
pub const WORKERS: &str = "tandem_workers";
pub const MIGRATIONS: &str = "tandem_migrations_total";
pub const KV_RECOVERIES: &str = "tandem_kv_failure_recoveries_total";
pub const LIVE_MIGRATIONS: &str = "tandem_live_migrations_total";
pub const LIVE_DOWNTIME: &str = "tandem_live_migration_downtime_seconds";
pub const LIVE_DURATION: &str = "tandem_live_migration_seconds";
pub const LIVE_BYTES: &str = "tandem_live_migration_bytes_total";
pub const WAITING_FOR_ROOM: &str = "tandem_router_requests_waiting_for_kv_room";
pub const ROOM_WAITS: &str = "tandem_kv_room_waits_total";
pub const ROOM_WAIT: &str = "tandem_kv_room_wait_seconds";
pub const HTTP_CONNECTIONS: &str = "tandem_http_connections_open";
pub const HTTP_REFUSED: &str = "tandem_http_connections_refused_total";
pub const ADMISSION_REFUSED: &str = "tandem_router_admission_refusals_total";
pub const TENANT_MAX_IN_FLIGHT: &str = "tandem_router_tenant_max_in_flight";
pub const STREAM_STALLS: &str = "tandem_stream_stalls_total";
pub const INDEX_MISMATCH: &str = "tandem_router_index_mismatch";
pub const INDEX_BLOCKS: &str = "tandem_router_index_blocks";
pub const INDEX_RESYNCS: &str = "tandem_router_index_resyncs_total";
pub const PREDICTED_CACHED: &str = "tandem_router_predicted_cached_tokens";
pub const PREDICTION_ERROR: &str = "tandem_router_cache_prediction_error_tokens";
pub const PREDICTED_HITS: &str = "tandem_router_cache_predicted_hits_total";
pub const PREDICTED_HITS_MISSED: &str = "tandem_router_cache_predicted_hits_missed_total";
pub const REUSED_TOKENS: &str = "tandem_router_cache_reused_tokens_total";
pub const DECODE_CACHED: &str = "tandem_router_decode_cached_tokens_total";
pub const PLACEMENT: &str = "tandem_router_prefill_placement_total";
pub const LOCAL_BUDGET: &str = "tandem_router_local_prefill_budget_tokens";
pub const DESIRED_WORKERS: &str = "tandem_planner_desired_workers";
pub const PLANNER_DECISIONS: &str = "tandem_planner_decisions_total";
pub const TENANT_TOKENS: &str = "tandem_tenant_tokens_total";
pub const TENANT_QUEUE: &str = "tandem_tenant_queue_seconds";
pub const TTFT_PREDICTION_ERROR: &str = "tandem_ttft_prediction_error_seconds";
pub const PREDICTED_OUTPUT: &str = "tandem_router_predicted_output_tokens_total";

/// Registers every router metric's description (idempotent).
pub fn describe() {
    describe_counter!(REQUESTS, "Requests the router finished, by API, outcome (ok, error) and error kind.");
    describe_counter!(CONSTRAINED, "Requests admitted with a guide (constrained decoding), by kind.");
    describe_counter!(PROMPT_TOKENS, Unit::Count, "Prompt tokens of requests the router accepted.");
    describe_counter!(GENERATION_TOKENS, Unit::Count, "Tokens generated and sent to clients.");
    describe_histogram!(TTFT, Unit::Seconds, "From the router accepting a request to its first token (per choice).");
    describe_histogram!(ITL, Unit::Seconds, "Time between consecutive tokens of a choice, after the first.");
    describe_histogram!(E2E, Unit::Seconds, "From the router accepting a request to its last token.");
    describe_histogram!(
        QUEUE,
        Unit::Seconds,
        "Time a choice waited before its prompt computation started: routing, reservation and the prefill queue."
    );
    describe_histogram!(
        TTFT_STAGE,
        Unit::Seconds,
        "Time to first token split by stage: router (routing and reservation), prefill_queue, prefill_compute, \
         kv_transfer (the transfer's tail after the last layer), decode_wait (KV landed to first token relayed), \
         local (a role-both worker's whole prefill)."
    );
    describe_counter!(
        TENANT_TOKENS,
        Unit::Count,
        "Tokens served per tenant (the API key's tenant; default: requests without a key) and stage: prefill \
         (prompt tokens computed, prefix-cache hits excluded) and decode (tokens generated)."
    );
    describe_histogram!(
        TENANT_QUEUE,
        Unit::Seconds,
        "Per tenant: time a choice waited before its prompt computation started (the router's wait for KV room \
         and the prefill queue)."
    );
    describe_histogram!(
        TTFT_PREDICTION_ERROR,
        Unit::Seconds,
        "How far SLO admission's TTFT prediction was off, by direction: late (the first token came after the \
         prediction) or early."
    );
    describe_counter!(
        PREDICTED_OUTPUT,
        Unit::Count,
        "Output tokens the length predictor expected, beside the tokens generated (tandem_generation_tokens_total)."
    );
    describe_gauge!(IN_FLIGHT, "Requests the router is serving now.");
    describe_gauge!(MAX_IN_FLIGHT, "Requests the router serves at most (--max-inflight); beyond, it refuses.");
    describe_gauge!(WORKERS, "Workers the router knows, by role and state (healthy, unhealthy).");
    describe_counter!(
        MIGRATIONS,
        "Times a choice moved to other workers after a worker failed under it (re-prefilling its prompt and \
         the tokens generated so far)."
    );
    describe_counter!(
        KV_RECOVERIES,
        "Choices whose KV transfer failed or stayed incomplete, by the policy in force (fail, recompute, retry) \
         and what was done (fail; recompute: the decode worker prefilled itself; retry: another prefill worker; \
         gave_up: no recovery left)."
    );
    describe_counter!(
        LIVE_MIGRATIONS,
        "Live migrations a worker asked for (a drain, a role change, an operator, the planner), by outcome: moved \
         (the KV moved, nothing recomputed), stayed (given up; the request decodes where it was), recomputed (given \
         up, and the request was moved by recomputing its tokens elsewhere); and the reason (none when moved)."
    );
    describe_histogram!(
        LIVE_DOWNTIME,
        Unit::Seconds,
        "Time a moved request produced no token because of its move: from its freeze on the old worker to its \
         first token from the new one (one decode step included)."
    );
    describe_histogram!(
        LIVE_DURATION,
        Unit::Seconds,
        "A live migration from the worker's ask to the request's first token on its new worker (pre-copy included)."
    );
    describe_counter!(LIVE_BYTES, Unit::Bytes, "KV bytes live migrations sent (pre-copy and the final step).");
    describe_gauge!(
        WAITING_FOR_ROOM,
        "Choices waiting for a decode worker with free KV blocks (every pool was full; --kv-wait)."
    );
    describe_counter!(ROOM_WAITS, "Choices that had to wait for KV room because every decode worker's pool was full.");
    describe_histogram!(
        ROOM_WAIT,
        Unit::Seconds,
        "How long choices that waited for KV room waited: until an attempt found room, or until refused."
    );
    describe_gauge!(HTTP_CONNECTIONS, "Connections the HTTP front door holds open now.");
    describe_counter!(
        HTTP_REFUSED,
        "Connections the HTTP front door closed at accept, by the cap they would have passed: total \
         (--http-max-connections) or per_ip (--http-max-connections-per-ip)."
    );
    describe_counter!(
        ADMISSION_REFUSED,
        "Requests the router refused at admission, by the limit they would have passed: max_inflight \
         (--max-inflight), tenant_limit (their tenant's limit, --tenant-max-inflight / --tenant-limit) or slo_ttft \
         (predicted to miss their TTFT objective, --slo-admission)."
    );
    describe_gauge!(
        TENANT_MAX_IN_FLIGHT,
        "Requests one tenant may hold in flight unless --tenant-limit names it (--tenant-max-inflight); \
         0: no per-tenant default."
    );
    describe_counter!(
        STREAM_STALLS,
        "Streams cancelled because the client took no chunk for --stream-stall-timeout, by API (grpc, http)."
    );
    describe_gauge!(
        INDEX_MISMATCH,
        "1 for a worker that names its cached blocks differently from this router (block size or hash \
         scheme): routed to by load only; 0 otherwise."
    );
    describe_gauge!(INDEX_BLOCKS, "Blocks the router's prefix index says each worker caches.");
    describe_counter!(
        INDEX_RESYNCS,
        "Times a worker's KV event stream was dropped for a fresh snapshot, by reason: gap or order (events \
         out of sequence), lagged (the worker fell behind and said so)."
    );
    describe_histogram!(
        PREDICTED_CACHED,
        Unit::Count,
        "Prompt tokens the prefix index predicted a worker caches, at each pick: the chosen worker's \
         (pick=chosen) and the most any other candidate held (pick=runner_up), by stage (prefill, decode, local)."
    );
    describe_histogram!(
        PREDICTION_ERROR,
        Unit::Count,
        "Per attempt, |prompt tokens the worker reused - tokens the router predicted it would|, by stage \
         (prefill: the prefill worker; decode: the decode worker's reservation; local: a role-both worker)."
    );
    describe_counter!(PREDICTED_HITS, "Attempts the router sent to a worker predicted to hold part of the prompt.");
    describe_counter!(
        PREDICTED_HITS_MISSED,
        "Attempts predicted to hit the prefix cache whose worker reused nothing: the router's index and the \
         workers' caches disagree."
    );
    describe_counter!(
        REUSED_TOKENS,
        Unit::Count,
        "Prompt tokens workers reported reusing, by stage (prefill, decode: already held at the reservation, local)."
    );
    describe_counter!(
        DECODE_CACHED,
        Unit::Count,
        "Prompt tokens a decode worker already held when reserving (not sent by the prefill worker)."
    );
    describe_counter!(
        PLACEMENT,
        "Requests whose decode worker could prefill, by where the prompt was computed (remote: a prefill \
         worker, local: the decode worker) and why."
    );
    describe_gauge!(
        LOCAL_BUDGET,
        "The longest uncached prompt a decode worker prefills itself now (the placement controller's setting)."
    );
    describe_gauge!(DESIRED_WORKERS, "Workers per role the planner wants (prefill; decode counts role both too).");
    describe_counter!(PLANNER_DECISIONS, "The planner's decisions each interval, by action and reason.");
}

/// A request's prefill was placed (see `placement`).
pub fn prefill_placement(placement: &'static str, reason: &'static str) {
    counter!(PLACEMENT, "placement" => placement, "reason" => reason).increment(1);
}

pub fn local_prefill_budget(tokens: usize) {
    gauge!(LOCAL_BUDGET).set(tokens as f64);
}

/// The planner's wanted split: prefill workers, and decode-capable ones.
pub fn desired_workers(prefill: usize, decode: usize) {
    gauge!(DESIRED_WORKERS, "role" => "prefill").set(prefill as f64);
    gauge!(DESIRED_WORKERS, "role" => "decode").set(decode as f64);
}

pub fn planner_decision(action: &'static str, reason: &'static str) {
    counter!(PLANNER_DECISIONS, "action" => action, "reason" => reason).increment(1);
}

/// A finished request: `kind` is `none` for success, else the gRPC code in snake case.
pub fn request_done(api: &'static str, kind: &'static str) {
    let outcome = if kind == "none" { "ok" } else { "error" };
    counter!(REQUESTS, "api" => api, "outcome" => outcome, "kind" => kind).increment(1);
}

/// The label of a failed request's status code.
pub fn error_kind(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "none",
        Cancelled => "cancelled",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Unavailable => "unavailable",
        Unauthenticated => "unauthenticated",
        _ => "internal",
    }
}

/// A tenant's name as a label: the default tenant is `default`. Tenants come from the
/// configured API keys only, so the label's values are bounded by the configuration.
pub fn tenant_label(tenant: Option<&str>) -> String {
    match tenant {
        None | Some("") => "default".to_string(),
        Some(t) => t.to_string(),
    }
}

pub fn tenant_tokens(tenant: Option<&str>, stage: &'static str, n: usize) {
    if n > 0 {
        counter!(TENANT_TOKENS, "tenant" => tenant_label(tenant), "stage" => stage).increment(n as u64);
    }
}

pub fn tenant_queue(tenant: Option<&str>, secs: f64) {
    histogram!(TENANT_QUEUE, "tenant" => tenant_label(tenant)).record(secs.max(0.0));
}

/// `actual - predicted` TTFT, in seconds.
pub fn ttft_prediction_error(err: f64) {
    let direction = if err >= 0.0 { "late" } else { "early" };
    histogram!(TTFT_PREDICTION_ERROR, "direction" => direction).record(err.abs());
}

pub fn predicted_output(n: u32) {
    counter!(PREDICTED_OUTPUT).increment(n as u64);
}

pub fn seconds(name: &'static str, d: Duration) {
    histogram!(name).record(d.as_secs_f64());
}

pub fn stage(stage: &'static str, secs: f64) {
    histogram!(TTFT_STAGE, "stage" => stage).record(secs.max(0.0));
}

pub fn tokens(prompt: usize) {
    counter!(PROMPT_TOKENS).increment(prompt as u64);
}

pub fn generated(n: usize) {
    counter!(GENERATION_TOKENS).increment(n as u64);
}

pub fn set_in_flight(n: usize, max: usize) {
    gauge!(IN_FLIGHT).set(n as f64);
    gauge!(MAX_IN_FLIGHT).set(max as f64);
}

pub fn set_workers(role: &'static str, state: &'static str, n: usize) {
    gauge!(WORKERS, "role" => role, "state" => state).set(n as f64);
}

pub fn migration() {
    counter!(MIGRATIONS).increment(1);
}

/// A live migration ended: `outcome` moved, stayed or recomputed, with why (`none` when moved).
pub fn live_migration(outcome: &'static str, reason: &'static str) {
    counter!(LIVE_MIGRATIONS, "outcome" => outcome, "reason" => reason).increment(1);
}

pub fn live_migration_bytes(bytes: u64) {
    counter!(LIVE_BYTES).increment(bytes);
}

pub fn kv_failure(policy: &'static str, action: &'static str) {
    counter!(KV_RECOVERIES, "policy" => policy, "action" => action).increment(1);
}

pub fn set_waiting_for_room(n: usize) {
    gauge!(WAITING_FOR_ROOM).set(n as f64);
}

pub fn waited_for_room() {
    counter!(ROOM_WAITS).increment(1);
}

pub fn set_http_connections(n: usize) {
    gauge!(HTTP_CONNECTIONS).set(n as f64);
}

pub fn http_connection_refused(reason: &'static str) {
    counter!(HTTP_REFUSED, "reason" => reason).increment(1);
}

/// A request refused at admission: `reason` is `max_inflight` or `tenant_limit`.
pub fn admission_refused(reason: &'static str) {
    counter!(ADMISSION_REFUSED, "reason" => reason).increment(1);
}

pub fn set_tenant_max_in_flight(n: Option<usize>) {
    gauge!(TENANT_MAX_IN_FLIGHT).set(n.unwrap_or(0) as f64);
}

/// A stream cancelled because its client stopped reading.
pub fn stream_stalled(api: &'static str) {
    counter!(STREAM_STALLS, "api" => api).increment(1);
}

/// Whether worker `id` hashes blocks differently from this router.
pub fn index_mismatch(id: &tandem_cluster::WorkerId, mismatched: bool) {
    gauge!(INDEX_MISMATCH, "worker" => id.to_string()).set(if mismatched { 1.0 } else { 0.0 });
}

/// Worker `id` left: its index gauges go to zero.
pub fn index_left(id: &tandem_cluster::WorkerId) {
    index_mismatch(id, false);
    index_blocks(id, 0);
}

pub fn index_blocks(id: &tandem_cluster::WorkerId, n: usize) {
    gauge!(INDEX_BLOCKS, "worker" => id.to_string()).set(n as f64);
}

pub fn index_resync(id: &tandem_cluster::WorkerId, reason: &'static str) {
    counter!(INDEX_RESYNCS, "worker" => id.to_string(), "reason" => reason).increment(1);
}

/// One pick's predicted cached tokens: the chosen worker's and the best other candidate's
/// (either `None` when unknown).
pub fn predicted_cached(stage: &'static str, chosen: Option<usize>, runner_up: Option<usize>) {
    if let Some(c) = chosen {
        histogram!(PREDICTED_CACHED, "stage" => stage, "pick" => "chosen").record(c as f64);
    }
    if let Some(r) = runner_up {
        histogram!(PREDICTED_CACHED, "stage" => stage, "pick" => "runner_up").record(r as f64);
    }
}

/// What a worker reused against what the router predicted it would (`None`: no prediction).
pub fn cache_outcome(stage: &'static str, predicted: Option<usize>, reused: usize) {
    counter!(REUSED_TOKENS, "stage" => stage).increment(reused as u64);
    let Some(p) = predicted else { return };
    histogram!(PREDICTION_ERROR, "stage" => stage).record(p.abs_diff(reused) as f64);
    // Both counters exist from the first prediction on (a miss rate of 0 is a series).
    counter!(PREDICTED_HITS, "stage" => stage).increment(u64::from(p > 0));
    counter!(PREDICTED_HITS_MISSED, "stage" => stage).increment(u64::from(p > 0 && reused == 0));
}

/// Prompt tokens a decode worker already held at its reservation.
pub fn decode_cached(tokens: usize) {
    counter!(DECODE_CACHED).increment(tokens as u64);
}

/// A request with a guide of `kind` passed validation.
pub fn constrained(kind: &'static str) {
    counter!(CONSTRAINED, "kind" => kind).increment(1);
}
