//! Live migration, the router's side: a worker asks (on a request's decode stream) for the
//! request to move; the choice relaying it moves its KV to another decode worker without
//! recomputing it, while the client's stream goes on. The steps (see `MigrateStep` in the
//! worker proto):
//!
//! 1. [`precopy`], concurrent with the relay: pick a destination, reserve the whole blocks
//!    the source has computed as a cache-only reservation there, and have the source copy
//!    them while the request keeps decoding.
//! 2. `FREEZE` on the source; the relay reads its stream on to the `FROZEN` mark, so every
//!    token the source made reaches the client.
//! 3. [`finalize`], the only time the request makes no progress: reserve on the
//!    destination for every token but the last (the pre-copied blocks are found in its
//!    prefix cache), open its stream, and `COMMIT` on the source, which sends the few
//!    blocks left and the last token. The relay then reads the destination's stream.
//!
//! Whatever fails before the destination has the KV leaves the request where it was
//! (`RESUME`), or, when the source is leaving, moves it the old way, by recompute. Each
//! ask ends counted in `tandem_live_migrations_total{outcome,reason}`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_cluster::WorkerId;
use tandem_proto::ids::{ClusterRequestId, LeaseId};
use tandem_proto::tandem::worker::v1 as pb;
use tonic::Status;

use crate::ids::worker_request_id;
use crate::members::Picked;
use crate::routing::Routing;
use crate::validate::Validated;
use crate::worker::{CancelOnDrop, DecodeStream, WorkerApi};

/// Longest a single migration call may take (a pre-copy of a whole context included).
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Whole blocks below which a pre-copy is not worth its round trips: the final step sends them.
const MIN_PRECOPY_BLOCKS: usize = 4;

/// Why a live migration was given up (the metric's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// No other decode worker of the model (or not the one an operator named).
    NoDestination,
    /// The destination had no free blocks.
    NoRoom,
    /// The destination refused or failed a call.
    Destination,
    /// The source refused a step (the request finished, was not decoding, or its tokens differ).
    Source,
    /// The KV did not reach the destination.
    Transfer,
    /// Live migration is off (`--live-migration false`).
    Disabled,
}

impl GiveUp {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            GiveUp::NoDestination => "no_destination",
            GiveUp::NoRoom => "no_room",
            GiveUp::Destination => "destination_failed",
            GiveUp::Source => "source_refused",
            GiveUp::Transfer => "transfer_failed",
            GiveUp::Disabled => "disabled",
        }
    }
}

/// Where a moving request decodes now: its worker, and its id there.
pub(crate) struct Source {
    pub(crate) id: WorkerId,
    pub(crate) worker: Arc<dyn WorkerApi>,
    pub(crate) rid: ClusterRequestId,
    pub(crate) lease: Option<LeaseId>,
}

/// A destination chosen and warmed by a pre-copy.
pub(crate) struct Ready {
    pub(crate) dest: Picked,
    /// KV bytes the pre-copy sent.
    pub(crate) bytes: u64,
}

/// A request now decoding on its new worker.
pub(crate) struct Moved {
    pub(crate) picked: Picked,
    pub(crate) rid: ClusterRequestId,
    /// Cancels the request on its new worker unless it finishes there.
    pub(crate) guard: CancelOnDrop,
    pub(crate) stream: DecodeStream,
    /// KV bytes the final step sent.
    pub(crate) bytes: u64,
}

/// What every step sends for the request: its choice's sampling, salt and priority.
#[derive(Clone)]
pub(crate) struct Request {
    pub(crate) v: Arc<Validated>,
    /// The choice's sampling (its seed offset by its index), before the resumed tokens.
    pub(crate) sampling: pb::SamplingParams,
}

async fn call<T>(f: impl std::future::Future<Output = Result<T, Status>>) -> Result<T, Status> {
    tokio::time::timeout(STEP_TIMEOUT, f).await.map_err(|_| Status::deadline_exceeded("no answer in time"))?
}

fn destination(picked: &Picked, res: pb::ReserveResponse) -> pb::KvDestination {
    pb::KvDestination {
        worker_id: picked.id.to_string(),
        endpoints: res.kv_endpoints,
        block_ids: res.block_ids,
        cached_blocks: res.cached_blocks,
        layout: res.layout,
        lease_ms: res.lease_ms,
    }
}

/// Step 1: picks a destination (`to`, when an operator named one) and copies the whole
/// blocks of `tokens` (the request's prompt and output as the client has them, all but
/// the last computed on the source) into its prefix cache.
pub(crate) async fn precopy(
    routing: Arc<Routing>,
    req: Request,
    from: Arc<Source>,
    to: Option<String>,
    tokens: Vec<u32>,
) -> Result<Ready, GiveUp> {
    let v = &req.v;
    let (dest, bs) = routing
        .members
        .migration_target(routing.policy.as_ref(), &v.model, &from.id, to.as_deref(), tokens.len())
        .ok_or(GiveUp::NoDestination)?;
    let whole = tokens.len().saturating_sub(1) / bs;
    if whole < MIN_PRECOPY_BLOCKS {
        return Ok(Ready { dest, bytes: 0 });
    }
    let rid = worker_request_id();
    let mut sampling = req.sampling.clone();
    sampling.max_tokens = 1;
    sampling.prompt_logprobs = None;
    let reserve = pb::ReserveRequest {
        request_id: rid.0,
        prompt_token_ids: tokens[..whole * bs].to_vec(),
        cache_salt: v.cache_salt.clone(),
        lease_ms: routing.kv_lease.as_millis() as u32,
        max_tokens: 1,
        priority: v.priority,
        sampling: Some(sampling),
        resumed_tokens: 0,
        sender_lease: LeaseId::to_wire(from.lease),
        cache_only: true,
        first_token_delivered: false,
        scheduling: Some(crate::fairness::scheduling(&routing.ledger, &routing.members, v, &dest.id)),
    };
    // A pre-copy given up (or dropped with its choice) frees the reservation at once.
    let mut guard = CancelOnDrop { rid, workers: vec![dest.worker.clone()], done: false };
    let res = call(dest.worker.reserve(reserve)).await.map_err(|e| match e.code() {
        tonic::Code::ResourceExhausted => GiveUp::NoRoom,
        _ => GiveUp::Destination,
    })?;
    let step = pb::MigrateRequest {
        request_id: from.rid.0,
        step: pb::MigrateStep::Precopy as i32,
        destination: Some(destination(&dest, res)),
        destination_request_id: rid.0,
        token_ids: tokens[..whole * bs].to_vec(),
        ..Default::default()
    };
    let sent = call(from.worker.migrate(step)).await.map_err(|e| {
        tracing::info!(request = ?v.request_id, from = %from.id, to = %dest.id, error = e.message(), "pre-copy failed");
        match e.code() {
            tonic::Code::Unavailable => GiveUp::Transfer,
            _ => GiveUp::Source,
        }
    })?;
    // The destination ended the reservation itself once the KV was whole.
    guard.done = true;
    Ok(Ready { dest, bytes: sent.kv_bytes })
}

/// Step 2: stops the request on the source between two steps.
pub(crate) async fn freeze(from: &Source) -> Result<u32, GiveUp> {
    let step =
        pb::MigrateRequest { request_id: from.rid.0, step: pb::MigrateStep::Freeze as i32, ..Default::default() };
    call(from.worker.migrate(step)).await.map(|r| r.num_tokens).map_err(|_| GiveUp::Source)
}

/// Gives the move up on the source: a frozen request decodes there again. False if the
/// source could not (it no longer holds the request).
pub(crate) async fn resume(from: &Source) -> bool {
    let step =
        pb::MigrateRequest { request_id: from.rid.0, step: pb::MigrateStep::Resume as i32, ..Default::default() };
    call(from.worker.migrate(step)).await.is_ok()
}

/// Step 3, with the request frozen and `tokens` (prompt then every token generated, the
/// last included) delivered: reserves on the destination, opens its stream and has the
/// source send the rest. `resumed`: how many of `tokens` were generated.
pub(crate) async fn finalize(
    routing: &Routing,
    req: &Request,
    from: &Source,
    ready: Ready,
    tokens: &[u32],
    generated: usize,
) -> Result<Moved, (GiveUp, Ready)> {
    let v = &req.v;
    let dest = &ready.dest;
    let n = tokens.len();
    // Every token but the last has its KV on the source; the last is the new worker's first.
    let resumed = (generated - 1) as u32;
    let mut sampling = req.sampling.clone();
    sampling.max_tokens = sampling.max_tokens.saturating_sub(resumed).max(1);
    sampling.prompt_logprobs = None;
    let rid = worker_request_id();
    let reserve = pb::ReserveRequest {
        request_id: rid.0,
        prompt_token_ids: tokens[..n - 1].to_vec(),
        cache_salt: v.cache_salt.clone(),
        lease_ms: routing.kv_lease.as_millis() as u32,
        max_tokens: sampling.max_tokens,
        priority: v.priority,
        sampling: Some(sampling.clone()),
        resumed_tokens: resumed,
        sender_lease: LeaseId::to_wire(from.lease),
        cache_only: false,
        first_token_delivered: true,
        scheduling: Some(crate::fairness::scheduling(&routing.ledger, &routing.members, v, &dest.id)),
    };
    let guard = CancelOnDrop { rid, workers: vec![dest.worker.clone()], done: false };
    let res = match call(dest.worker.reserve(reserve)).await {
        Ok(r) => r,
        Err(e) if e.code() == tonic::Code::ResourceExhausted => return Err((GiveUp::NoRoom, ready)),
        Err(_) => return Err((GiveUp::Destination, ready)),
    };
    let dreq = pb::DecodeRequest {
        request_id: rid.0,
        sampling: Some(sampling),
        resumed_tokens: resumed,
        ..Default::default()
    };
    let stream = match call(dest.worker.decode(dreq)).await {
        Ok(s) => s,
        Err(_) => return Err((GiveUp::Destination, ready)),
    };
    let step = pb::MigrateRequest {
        request_id: from.rid.0,
        step: pb::MigrateStep::Commit as i32,
        destination: Some(destination(dest, res)),
        destination_request_id: rid.0,
        token_ids: tokens[..n - 1].to_vec(),
        ..Default::default()
    };
    let sent = match call(from.worker.migrate(step)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(request = ?v.request_id, from = %from.id, to = %dest.id, error = e.message(), "commit failed");
            let why = if e.code() == tonic::Code::Unavailable { GiveUp::Transfer } else { GiveUp::Source };
            return Err((why, ready));
        }
    };
    let Ready { dest, .. } = ready;
    Ok(Moved { picked: dest, rid, guard, stream, bytes: sent.kv_bytes })
}

/// A live migration under way in a choice's relay.
pub(crate) struct InFlight {
    /// When the worker asked.
    pub(crate) asked: Instant,
    /// The worker is leaving: recompute elsewhere if the KV cannot move.
    pub(crate) required: bool,
    /// Set once frozen: the pre-copied destination, and when the freeze was asked.
    pub(crate) frozen: Option<(Ready, Instant)>,
}
