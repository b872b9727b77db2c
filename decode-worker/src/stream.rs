//! A `Decode` call's stream: a request's engine events as `DecodeResponse`s, until
//! it finishes, fails, or its client goes away (which ends the request, through its
//! reservation if it still has one).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tandem_engine::llm_engine::SeqOutput;
use tandem_engine::scheduler::RequestId;
use tandem_proto::ids::ClusterRequestId;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_worker_runtime::convert::{finish_to_pb, kv_fault, logprobs_to_pb};
use tandem_worker_runtime::{Active, DecodeStream, Event, InFlight, WorkerState};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::migrate::{Streaming, Streams};
use crate::reservations::Reservations;

/// When a reserved request was reserved, and when (if yet) its KV arrived.
pub(crate) type KvTiming = (Instant, Arc<OnceLock<Instant>>);

/// Ends the request when its stream goes away before the request did.
struct StreamEnd {
    reservations: Reservations,
    streams: Streams,
    rid: ClusterRequestId,
    id: RequestId,
    active: Active,
    done: bool,
}

impl Drop for StreamEnd {
    fn drop(&mut self) {
        let mut streams = self.streams.lock().expect("streams");
        if streams.get(&self.rid).is_some_and(|s| s.id == self.id) {
            streams.remove(&self.rid);
        }
        drop(streams);
        // The request's end is this guard's to make, not the active guard's.
        self.active.finish();
        if !self.done {
            self.reservations.stream_dropped(self.rid, self.id);
        }
    }
}

/// Streams request `id`'s (router id `rid`) `events` as `DecodeResponse`s. `timing`: a
/// reserved request's reservation and KV arrival times.
pub(crate) fn stream_events(
    state: &Arc<WorkerState>,
    (reservations, streams): (&Reservations, &Streams),
    (rid, id): (ClusterRequestId, RequestId),
    mut events: mpsc::UnboundedReceiver<Event>,
    timing: Option<KvTiming>,
) -> DecodeStream {
    let (tx, rx) = mpsc::channel(64);
    let active = state.track(rid, id);
    let state = state.clone();
    let reservations = reservations.clone();
    let streams = streams.clone();
    let streaming = Streaming { id, started: Instant::now(), asked: false, last_ask: None };
    streams.lock().expect("streams").insert(rid, streaming);
    // Detached on purpose: the task ends with its request or its client (a closed `tx`),
    // and a drain waits for it through `InFlight`.
    tokio::spawn(async move {
        let _inflight = InFlight::new(&state);
        let mut end = StreamEnd { reservations, streams, rid, id, active, done: false };
        let started = Instant::now();
        let mut first_at = None;
        loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                _ = tx.closed() => break,
            };
            let msg = match ev {
                Some(Event::Output(o)) => {
                    let first = *first_at.get_or_insert_with(Instant::now);
                    let resp = response(&state, &o, started, first, timing.as_ref());
                    if o.finish.is_some() {
                        end.done = true;
                        end.reservations.stream_ended(rid, id);
                    }
                    Ok(resp)
                }
                Some(Event::Failed(why)) => {
                    end.done = true;
                    end.reservations.stream_ended(rid, id);
                    let kv_missing = timing.as_ref().is_some_and(|(_, arrived)| arrived.get().is_none());
                    Err(state.failed_status(rid, why, |why| {
                        if kv_missing {
                            kv_fault(Status::unavailable(why))
                        } else {
                            Status::unavailable(why)
                        }
                    }))
                }
                Some(Event::MoveWanted { to, required }) => {
                    let signal = if required { pb::MigrationSignal::Required } else { pb::MigrationSignal::Wanted };
                    Ok(signal_response(signal, to))
                }
                Some(Event::Frozen) => Ok(signal_response(pb::MigrationSignal::Frozen, String::new())),
                Some(Event::Moved) => {
                    // Its KV is on its new worker, where it decodes on; it is over here.
                    end.done = true;
                    end.reservations.stream_ended(rid, id);
                    Ok(signal_response(pb::MigrationSignal::Moved, String::new()))
                }
                None => Err(Status::internal("the engine dropped the request")),
            };
            let stop = msg.is_err() || end.done;
            if tx.send(msg).await.is_err() || stop {
                break;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// A message that carries a migration signal and nothing else.
fn signal_response(signal: pb::MigrationSignal, to: String) -> pb::DecodeResponse {
    pb::DecodeResponse { migration: signal as i32, migrate_to: to, ..Default::default() }
}

/// One engine output as a `DecodeResponse`; the last one carries the request's timing.
fn response(
    state: &WorkerState,
    o: &SeqOutput,
    started: Instant,
    first: Instant,
    timing: Option<&KvTiming>,
) -> pb::DecodeResponse {
    let tok = &state.tokenizer;
    let timing = o.finish.is_some().then(|| {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let (kv_wait, queue) = match timing {
            Some((reserved_at, arrived)) => {
                let arrived = arrived.get().copied().unwrap_or(first);
                (ms(arrived - *reserved_at), ms(first.saturating_duration_since(arrived)))
            }
            None => (0.0, ms(first - started)),
        };
        pb::DecodeTiming { kv_wait_time_ms: kv_wait, queue_time_ms: queue, decode_time_ms: ms(first.elapsed()) }
    });
    pb::DecodeResponse {
        migration: pb::MigrationSignal::Unspecified as i32,
        migrate_to: String::new(),
        token_ids: o.token_ids.clone(),
        text: o.text.clone(),
        logprobs: o.logprobs.iter().map(|t| logprobs_to_pb(tok, t)).collect(),
        finish_reason: finish_to_pb(o.finish) as i32,
        timing,
        prompt_logprobs: o.prompt_logprobs.iter().map(|t| logprobs_to_pb(tok, t)).collect(),
        cached_tokens: o.cached_tokens as u32,
    }
}
