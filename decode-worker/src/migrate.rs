//! Live migration, the source's side: a running request's KV leaves this worker for
//! another decode worker's reservation, driven step by step by the request's router
//! (`Migrate`, see `MigrateStep` in the proto), and the signals that ask the router for a
//! move (a drain, a role change, an operator, a planner's rebalancing).
//!
//! The blocks are read straight from the shared segment the engine's cache lives in. A
//! pre-copy reads whole blocks of a request that keeps decoding: the engine writes only a
//! running request's last, partial block, so those are stable while the request holds
//! them; that it still holds them (not preempted meanwhile) is checked after the copy and
//! before the destination is told the KV is whole. A commit reads a frozen request, which
//! nothing writes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_engine::kv_cache::BlockId;
use tandem_engine::scheduler::RequestId;
use tandem_kvtransfer::{KvSender, KvSink, SendSession, ShmKv, TransferError};
use tandem_proto::ids::ClusterRequestId;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_worker_runtime::convert::status_from_engine;
use tandem_worker_runtime::peers::{check_destination, Destination, Peers};
use tandem_worker_runtime::{Event, WorkerState};
use tonic::Status;

/// Blocks read and queued per layer in one go: bounds the memory a transfer holds.
const CHUNK_BLOCKS: usize = 32;
/// A frozen request that is neither committed nor resumed within this decodes here again:
/// its router went quiet (a router that died takes the stream, and the request, with it).
pub(crate) const FREEZE_LIMIT: Duration = Duration::from_secs(60);

/// A decode stream this worker serves: what a migration step needs of it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Streaming {
    pub(crate) id: RequestId,
    pub(crate) started: Instant,
    /// A move was asked for (signalled on its stream) and not given up.
    pub(crate) asked: bool,
    /// When a move was last asked for: a drain asks again (after a move given up) at most
    /// every `ASK_AGAIN`; one not decoding yet is looked at again each time.
    pub(crate) last_ask: Option<Instant>,
}

/// Least time between two asks to move one request (a drain's, after a move given up).
const ASK_AGAIN: Duration = Duration::from_secs(1);

/// The decode streams in progress, by router id.
pub(crate) type Streams = Arc<Mutex<HashMap<ClusterRequestId, Streaming>>>;

/// The source's side of live migration.
pub(crate) struct Mover {
    pub(crate) state: Arc<WorkerState>,
    pub(crate) sender: Option<Arc<KvSender>>,
    pub(crate) segment: Option<Arc<ShmKv>>,
    pub(crate) peers: Option<Peers>,
    pub(crate) streams: Streams,
    /// Each freeze's watchdog (`FREEZE_LIMIT`); aborted at shutdown.
    pub(crate) watchdogs: Arc<Mutex<tokio::task::JoinSet<()>>>,
    /// Requests whose commit is under way: no watchdog thaws them.
    pub(crate) committing: Arc<Mutex<std::collections::HashSet<ClusterRequestId>>>,
}

impl Mover {
    /// Serves one `Migrate` step.
    pub(crate) async fn migrate(&self, r: pb::MigrateRequest) -> Result<pb::MigrateResponse, Status> {
        let step = pb::MigrateStep::try_from(r.step).unwrap_or(pb::MigrateStep::Unspecified);
        if step == pb::MigrateStep::Request {
            return self.request(r).await;
        }
        let rid = ClusterRequestId(r.request_id);
        let id = self.streaming(rid)?;
        let e = &self.state.engine;
        match step {
            pb::MigrateStep::Precopy => self.precopy(id, r).await,
            pb::MigrateStep::Freeze => {
                let frozen = e.freeze(id).await.map_err(|x| Status::failed_precondition(x.to_string()))?;
                self.watch_freeze(rid, id);
                Ok(pb::MigrateResponse { num_tokens: frozen.tokens.len() as u32, ..Default::default() })
            }
            pb::MigrateStep::Commit => {
                self.committing.lock().expect("committing").insert(rid);
                let done = self.commit(id, r).await;
                self.committing.lock().expect("committing").remove(&rid);
                done
            }
            pb::MigrateStep::Resume => {
                // A frozen request decodes again; one given up before its freeze is only no
                // longer moving (it may be asked to move again).
                if self.inspect(id).await?.frozen {
                    e.thaw(id).await.map_err(|x| Status::failed_precondition(x.to_string()))?;
                }
                if let Some(s) = self.streams.lock().expect("streams").get_mut(&rid) {
                    s.asked = false;
                }
                Ok(pb::MigrateResponse::default())
            }
            _ => Err(Status::invalid_argument("Migrate needs a step")),
        }
    }

    /// Thaws request `id` (router id `rid`) if it is still frozen, and not committing, after
    /// `FREEZE_LIMIT`.
    fn watch_freeze(&self, rid: ClusterRequestId, id: RequestId) {
        let (engine, committing, streams) = (self.state.engine.clone(), self.committing.clone(), self.streams.clone());
        let worker = self.state.id.clone();
        let mut tasks = self.watchdogs.lock().expect("watchdogs");
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            tokio::time::sleep(FREEZE_LIMIT).await;
            if committing.lock().expect("committing").contains(&rid) {
                return;
            }
            if engine.inspect(id).await.ok().flatten().is_some_and(|r| r.frozen) && engine.thaw(id).await.is_ok() {
                tracing::warn!(worker = %worker, request = %rid, "a frozen request was neither moved nor resumed; it decodes here again");
                if let Some(s) = streams.lock().expect("streams").get_mut(&rid) {
                    s.asked = false;
                }
            }
        });
    }

    /// Stops the freeze watchdogs (the worker's shutdown).
    pub(crate) fn shutdown(&self) {
        self.watchdogs.lock().expect("watchdogs").abort_all();
    }

    /// The engine request of decode stream `rid`.
    fn streaming(&self, rid: ClusterRequestId) -> Result<RequestId, Status> {
        let streams = self.streams.lock().expect("streams");
        let s = streams.get(&rid).ok_or_else(|| Status::not_found(format!("request {rid} does not decode here")))?;
        Ok(s.id)
    }

    /// `REQUEST`: signals the router of the named request (or of the `count`
    /// longest-running ones) to move it.
    async fn request(&self, r: pb::MigrateRequest) -> Result<pb::MigrateResponse, Status> {
        let rids: Vec<ClusterRequestId> = if r.request_id != 0 {
            self.streaming(ClusterRequestId(r.request_id))?;
            vec![ClusterRequestId(r.request_id)]
        } else {
            if r.count == 0 {
                return Err(Status::invalid_argument("Migrate REQUEST needs a request id or a count"));
            }
            let streams = self.streams.lock().expect("streams");
            let mut by_age: Vec<(Instant, ClusterRequestId)> =
                streams.iter().filter(|(_, s)| !s.asked).map(|(&rid, s)| (s.started, rid)).collect();
            by_age.sort();
            by_age.into_iter().map(|(_, rid)| rid).collect()
        };
        let want = if r.request_id != 0 { 1 } else { r.count as usize };
        let mut asked = Vec::new();
        for rid in rids {
            if asked.len() >= want {
                break;
            }
            if self.ask(rid, &r.to_worker, r.required).await {
                asked.push(rid.0);
            }
        }
        if r.request_id != 0 && asked.is_empty() {
            return Err(Status::failed_precondition(format!("request {} is not decoding now", r.request_id)));
        }
        Ok(pb::MigrateResponse { request_ids: asked, ..Default::default() })
    }

    /// Asks the router of decode stream `rid` to move it (`to`: a destination named by an
    /// operator). False when it is not decoding now (queued, prefilling, waiting for KV).
    pub(crate) async fn ask(&self, rid: ClusterRequestId, to: &str, required: bool) -> bool {
        self.ask_many(&[rid], to, required).await == 1
    }

    /// `ask` for each of `rids`, all between the same two engine steps; returns how many
    /// were asked (those decoding now).
    async fn ask_many(&self, rids: &[ClusterRequestId], to: &str, required: bool) -> usize {
        let found: Vec<(ClusterRequestId, RequestId)> = {
            let streams = self.streams.lock().expect("streams");
            rids.iter().filter_map(|rid| streams.get(rid).map(|s| (*rid, s.id))).collect()
        };
        let events = found.iter().map(|&(_, id)| (id, Event::MoveWanted { to: to.to_string(), required })).collect();
        let sent = self.state.engine.signal(events).await.unwrap_or_default();
        let mut streams = self.streams.lock().expect("streams");
        let mut n = 0;
        for (&(rid, _), &ok) in found.iter().zip(&sent) {
            if let Some(s) = streams.get_mut(&rid).filter(|_| ok) {
                s.last_ask = Some(Instant::now());
                s.asked = true;
            }
            if ok {
                n += 1;
                tracing::info!(worker = %self.state.id, request = %rid, to, required, "asked the router to move a request");
            }
        }
        n
    }

    /// Asks for a move of every decode not yet asked (a drain or a role change: `required`);
    /// returns how many were asked now.
    pub(crate) async fn ask_all(&self, required: bool) -> usize {
        let rids: Vec<ClusterRequestId> = self
            .streams
            .lock()
            .expect("streams")
            .iter()
            .filter(|(_, s)| !s.asked && s.last_ask.is_none_or(|t| t.elapsed() >= ASK_AGAIN))
            .map(|(&r, _)| r)
            .collect();
        if rids.is_empty() {
            return 0;
        }
        self.ask_many(&rids, "", required).await
    }

    /// `PRECOPY`: the whole blocks of `token_ids` (computed here) into a cache-only
    /// reservation, while the request decodes on.
    async fn precopy(&self, id: RequestId, r: pb::MigrateRequest) -> Result<pb::MigrateResponse, Status> {
        let bs = self.state.layout.block_size as usize;
        let n = r.token_ids.len();
        if n == 0 || n % bs != 0 {
            return Err(Status::invalid_argument(format!("a pre-copy sends whole blocks of {bs} tokens, not {n}")));
        }
        let seen = self.inspect(id).await?;
        if seen.computed < n || seen.tokens[..n] != r.token_ids[..] {
            return Err(Status::failed_precondition("the tokens named are not this request's computed ones"));
        }
        let (dest, (session, bytes)) = self.open(r.destination, r.destination_request_id, n / bs).await?;
        let sent = self.send(session, &seen.table, &dest).await?;
        // Still the same blocks, never freed meanwhile: what was read is this request's KV.
        let now = self.inspect(id).await?;
        if now.preemptions != seen.preemptions || now.table.get(..n / bs) != seen.table.get(..n / bs) {
            sent.abort("the request lost its blocks during the pre-copy").await;
            return Err(Status::aborted("the request was preempted during the pre-copy"));
        }
        self.finish(sent, 0, n as u32, &dest, bytes).await?;
        Ok(pb::MigrateResponse { num_tokens: now.computed as u32, kv_bytes: bytes, ..Default::default() })
    }

    /// `COMMIT`: the frozen request's KV for `token_ids` (all its tokens but the last),
    /// its last token as the first, then it ends here.
    async fn commit(&self, id: RequestId, r: pb::MigrateRequest) -> Result<pb::MigrateResponse, Status> {
        let bs = self.state.layout.block_size as usize;
        let seen = self.inspect(id).await?;
        if !seen.frozen {
            return Err(Status::failed_precondition("the request is not frozen"));
        }
        let n = seen.tokens.len() - 1;
        if r.token_ids[..] != seen.tokens[..n] {
            return Err(Status::failed_precondition("the tokens named are not this request's"));
        }
        let (dest, (session, bytes)) = self.open(r.destination, r.destination_request_id, n.div_ceil(bs)).await?;
        let sent = self.send(session, &seen.table, &dest).await?;
        self.finish(sent, seen.tokens[n], n as u32, &dest, bytes).await?;
        // The destination has it all: it decodes there now.
        self.state.engine.moved(id);
        Ok(pb::MigrateResponse { kv_bytes: bytes, ..Default::default() })
    }

    async fn inspect(&self, id: RequestId) -> Result<tandem_engine::llm_engine::Inspected, Status> {
        self.state
            .engine
            .inspect(id)
            .await
            .map_err(status_from_engine)?
            .ok_or_else(|| Status::failed_precondition("the request is not running here"))
    }

    /// Checks the destination (`need` blocks) and opens a session to it; the bytes the
    /// blocks it lacks come to.
    async fn open(
        &self,
        dest: Option<pb::KvDestination>,
        dest_rid: u64,
        need: usize,
    ) -> Result<(Destination, (SendSession, u64)), Status> {
        let s = &self.state;
        let (Some(sender), Some(_)) = (&self.sender, &self.segment) else {
            return Err(Status::failed_precondition(format!("worker {} cannot send KV", s.id)));
        };
        let dest = dest.ok_or_else(|| Status::invalid_argument("destination: missing"))?;
        let dest = check_destination(s, self.peers.as_ref(), dest, need).await?;
        let deadline = tokio::time::Instant::now() + dest.lease;
        let session = sender.open_target(&dest.target, ClusterRequestId(dest_rid), deadline).await.map_err(|e| {
            self.kv_failed(&e);
            Status::unavailable(format!("cannot open a KV session to {}: {e}", dest.worker_id))
        })?;
        let bytes = ((need - dest.skip) * s.layout.n_layers as usize * s.layout.layer_block_bytes()) as u64;
        Ok((dest, (session, bytes)))
    }

    /// Sends blocks `dest.skip..` of `table` (every layer) into the destination's blocks.
    async fn send(
        &self,
        mut session: SendSession,
        table: &[BlockId],
        dest: &Destination,
    ) -> Result<SendSession, Status> {
        let segment = self.segment.as_ref().expect("checked when the session opened");
        let layout = self.state.layout;
        let half = layout.half_block_bytes();
        let from = &table[dest.skip..dest.block_ids.len()];
        let to = &dest.block_ids[dest.skip..];
        for (src, dst) in from.chunks(CHUNK_BLOCKS).zip(to.chunks(CHUNK_BLOCKS)) {
            for layer in 0..layout.n_layers as usize {
                let mut payload = session.buffers().take();
                payload.reserve(src.len() * 2 * half);
                for b in src {
                    let (k, v) = segment.block_ptrs(layer, b.index());
                    // SAFETY: in-bounds halves of the mapping (`block_ptrs`), of a block this
                    // request holds and the engine no longer writes (a whole block of a
                    // running request, or any block of a frozen one).
                    unsafe {
                        payload.extend_from_slice(std::slice::from_raw_parts(k, half));
                        payload.extend_from_slice(std::slice::from_raw_parts(v, half));
                    }
                }
                session.send_layer(layer as u16, dst, payload).await.map_err(|e| self.lost(&e, dest))?;
            }
            // The engine thread shares the cores: let it step between chunks.
            tokio::task::yield_now().await;
        }
        Ok(session)
    }

    /// Tells the destination the KV is whole (`first`: the token after it) and waits for
    /// its verdict; counts `bytes` sent.
    async fn finish(
        &self,
        session: SendSession,
        first: u32,
        n: u32,
        dest: &Destination,
        bytes: u64,
    ) -> Result<(), Status> {
        let started = Instant::now();
        session.finish(first, n).await.map_err(|e| self.lost(&e, dest))?;
        tandem_worker_runtime::metrics::kv_session(&self.state.id, "sent", bytes, None);
        tandem_worker_runtime::metrics::kv_seconds(&self.state.id, started.elapsed());
        Ok(())
    }

    fn lost(&self, e: &TransferError, dest: &Destination) -> Status {
        self.kv_failed(e);
        Status::unavailable(format!("KV transfer to {} failed: {e}", dest.worker_id))
    }

    fn kv_failed(&self, e: &TransferError) {
        tandem_worker_runtime::metrics::kv_session(&self.state.id, "sent", 0, Some(e.kind()));
    }
}
