//! The engine on its own thread, driven by messages.
//!
//! `LlmEngine` is synchronous and owns the model's thread pool; async gRPC
//! handlers talk to it through an [`EngineHandle`]. The thread blocks while
//! there is nothing to do, and otherwise alternates between draining commands
//! and running one engine step. Each request's outputs go to its own channel;
//! a request whose channel's receiver is gone (the client left) is aborted at
//! the next step, so no blocks outlive their request.
//!
//! A request waiting for remote KV is the decode role's to end (a transfer may
//! still be writing its blocks), but only once the role holds it: the answer to
//! a remote submission is [`Admitted::claim`]ed by its reservation. An answer
//! dropped before that (the `Reserve` call went away while the engine admitted
//! it) leaves a request nobody would ever end; the engine aborts it like any
//! request whose client left.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_engine::block_manager::{KvEvent, SeqHash};
use tandem_engine::error::EngineError;
use tandem_engine::kv_cache::BlockId;
use tandem_engine::kv_cache::LayerKvBytes;
use tandem_engine::llm_engine::{EngineRequest, Frozen, Inspected, KvExport, LlmEngine, RemoteKv, SeqOutput};
use tandem_engine::scheduler::{RequestId, SchedulerStats};
use tokio::sync::{broadcast, mpsc, oneshot};

/// What a request's channel carries.
#[derive(Debug, Clone)]
pub enum Event {
    Output(SeqOutput),
    /// The request ended without finishing: its KV never arrived, the engine failed, ...
    Failed(String),
    /// Live migration: the worker wants the request moved elsewhere (`to`: a destination
    /// an operator named); `required`: it is leaving, so recompute if the KV cannot move.
    MoveWanted {
        to: String,
        required: bool,
    },
    /// Live migration: the request is frozen; every output came before this.
    Frozen,
    /// Live migration: the request's KV is on its new worker and it ended here.
    Moved,
}

/// Receives the KV blocks an exporting request's steps compute (on the engine thread).
pub trait ExportSink: Send {
    /// Layer `layer` of blocks `export.first..` of the request's table is in `kv`.
    fn on_layer(&mut self, export: &KvExport, layer: usize, kv: &LayerKvBytes<'_>);
}

/// How a request enters the engine.
pub enum Admission {
    /// Prefilled and decoded here.
    Local,
    /// Prefilled here; its KV goes to `sink` as it is computed.
    Export(Box<dyn ExportSink>),
    /// Its KV comes from elsewhere: blocks are reserved, it waits for `remote_ready`.
    Remote,
    /// `Remote`, doing `RemoteKv` when its KV arrives (live migration).
    RemoteAs(RemoteKv),
}

/// The engine's answer to a submission.
#[derive(Debug)]
pub struct Admitted {
    pub id: RequestId,
    /// The reserved block table (remote requests only).
    pub blocks: Vec<BlockId>,
    /// Leading blocks of `blocks` this worker's prefix cache already holds: their KV
    /// is not sent (remote requests only).
    pub cached_blocks: usize,
    pub events: mpsc::UnboundedReceiver<Event>,
    /// Set by `claim`: the caller, not the engine, ends the request.
    claimed: Arc<AtomicBool>,
}

impl Admitted {
    /// The caller takes charge of ending this remote request (`remote_ready`, `abort`).
    /// Until then, dropping the answer (and with it `events`) aborts the request as if its
    /// client had left. Local and exporting requests need no claim: a closed `events`
    /// always ends them.
    pub fn claim(&self) {
        self.claimed.store(true, Ordering::SeqCst);
    }
}

/// Counters for the Stats RPC and routing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Load {
    pub scheduler: SchedulerStats,
    pub waiting_for_kv: usize,
    pub queued_prefill_tokens: u64,
    /// Tenants' weighted service (`share::Vtc::served`), the most served `MAX_REPORTED_TENANTS`.
    pub tenant_service: Vec<(String, f64)>,
    /// Constrained decoding's costs so far (guides compiled, masks computed, their time).
    pub guides: tandem_engine::llm_engine::GuideStats,
}

/// Tenants a load report names at most.
pub const MAX_REPORTED_TENANTS: usize = 256;

enum Cmd {
    Submit(Box<EngineRequest>, Admission, oneshot::Sender<Result<Admitted, EngineError>>),
    RemoteReady(RequestId, u32),
    Abort(RequestId, Option<String>),
    Fail(RequestId, String),
    SubscribeKv(oneshot::Sender<KvSubscription>),
    Freeze(RequestId, oneshot::Sender<Result<Frozen, EngineError>>),
    Thaw(RequestId, oneshot::Sender<Result<(), EngineError>>),
    Inspect(RequestId, oneshot::Sender<Option<Inspected>>),
    /// Sends each `Event` on its decoding request's channel; answers which were decoding.
    Signal(Vec<(RequestId, Event)>, oneshot::Sender<Vec<bool>>),
    /// A frozen request moved: it ends here (`Event::Moved`), its blocks freed.
    Moved(RequestId),
}

/// A new subscriber's view of the prefix cache: what it holds, then every change after.
pub struct KvSubscription {
    /// Hashes of the blocks cached when the subscription began.
    pub snapshot: Vec<SeqHash>,
    /// The changes made after the snapshot, in order, none missed unless the receiver lags.
    pub live: broadcast::Receiver<Vec<KvEvent>>,
}

struct Tracked {
    events: mpsc::UnboundedSender<Event>,
    remote_waiting: bool,
    /// Whether the submitter holds the request (`Admitted::claim`).
    claimed: Arc<AtomicBool>,
    prompt_len: usize,
    /// Prompt tokens the prefix cache held for it when last looked (before admission): a
    /// queued request that will hit counts only its uncached part in the load report.
    cached_guess: usize,
}

impl Tracked {
    /// Its client went away and nobody else ends it: abort before spending a step on it.
    /// A request waiting for remote KV that was claimed is the decode role's to end (its
    /// blocks may still be written); an unclaimed one never had a transfer.
    fn abandoned(&self) -> bool {
        self.events.is_closed() && (!self.remote_waiting || !self.claimed.load(Ordering::SeqCst))
    }
}

/// A handle to the engine thread; cheap to clone. The thread stops when every handle is gone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: std_mpsc::Sender<Cmd>,
    /// The load as of the last step, so a load report never waits for a step to end.
    latest: Arc<Mutex<Load>>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

const GONE: &str = "the engine thread has stopped";

impl EngineHandle {
    /// Moves `engine` onto a new thread named `name`.
    pub fn spawn(engine: LlmEngine, name: &str) -> std::io::Result<EngineHandle> {
        let (tx, rx) = std_mpsc::channel();
        // The thread owns the sender; subscribers join through `subscribe_kv`.
        let (events, _) = broadcast::channel(1024);
        let latest = Arc::new(Mutex::new(Load::default()));
        let shared = latest.clone();
        let thread =
            std::thread::Builder::new().name(name.to_string()).spawn(move || run(engine, rx, events, shared))?;
        Ok(EngineHandle { tx, latest, thread: Arc::new(Mutex::new(Some(thread))) })
    }

    /// Adds a request; its outputs arrive on `Admitted::events`.
    pub async fn submit(&self, req: EngineRequest, how: Admission) -> Result<Admitted, EngineError> {
        self.ask(|tx| Cmd::Submit(Box::new(req), how, tx)).await?
    }

    /// The KV of remote request `id` has arrived; `first_token` came with it.
    pub fn remote_ready(&self, id: RequestId, first_token: u32) {
        let _ = self.tx.send(Cmd::RemoteReady(id, first_token));
    }

    /// Ends request `id` (no-op if it has finished); its blocks return at once.
    /// With a reason, its channel gets `Event::Failed(reason)` first.
    pub fn abort(&self, id: RequestId, reason: Option<String>) {
        let _ = self.tx.send(Cmd::Abort(id, reason));
    }

    /// Tells request `id`'s client it failed, keeping its blocks until `abort`: a remote
    /// request's blocks may still be written by a transfer that has not stopped yet.
    pub fn fail(&self, id: RequestId, reason: String) {
        let _ = self.tx.send(Cmd::Fail(id, reason));
    }

    /// Freezes decoding request `id` between two steps (live migration): its channel gets
    /// `Event::Frozen` after every output it made. Returns its tokens and blocks.
    pub async fn freeze(&self, id: RequestId) -> Result<Frozen, EngineError> {
        self.ask(|tx| Cmd::Freeze(id, tx)).await?
    }

    /// A frozen request decodes again.
    pub async fn thaw(&self, id: RequestId) -> Result<(), EngineError> {
        self.ask(|tx| Cmd::Thaw(id, tx)).await?
    }

    /// Request `id`'s tokens and blocks now (running or frozen), taken between steps.
    pub async fn inspect(&self, id: RequestId) -> Result<Option<Inspected>, EngineError> {
        self.ask(|tx| Cmd::Inspect(id, tx)).await
    }

    /// Sends each event on its request's channel if that request is decoding (between
    /// steps, with all but its last token computed, or frozen), all between the same two
    /// steps; returns which were.
    pub async fn signal(&self, events: Vec<(RequestId, Event)>) -> Result<Vec<bool>, EngineError> {
        self.ask(|tx| Cmd::Signal(events, tx)).await
    }

    /// Frozen request `id` moved to another worker: it ends here, its channel told so.
    pub fn moved(&self, id: RequestId) {
        let _ = self.tx.send(Cmd::Moved(id));
    }

    /// Sends the command `cmd` makes of a reply channel, and waits for the reply.
    async fn ask<T>(&self, cmd: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(cmd(tx)).map_err(|_| EngineError::Io(GONE.into()))?;
        rx.await.map_err(|_| EngineError::Io(GONE.into()))
    }

    /// The load as of the engine's last step (or command), without waiting for the
    /// current step: a busy engine answers load reports at once.
    pub async fn load(&self) -> Result<Load, EngineError> {
        if self.thread.lock().expect("thread").as_ref().is_none_or(|t| t.is_finished()) {
            return Err(EngineError::Io(GONE.into()));
        }
        Ok(self.latest.lock().expect("load").clone())
    }

    /// What the prefix cache holds now and every change after it: taken on the engine
    /// thread between steps, so no change falls between the snapshot and the first event.
    pub async fn subscribe_kv(&self) -> Result<KvSubscription, EngineError> {
        self.ask(Cmd::SubscribeKv).await
    }
}

fn run(
    mut engine: LlmEngine,
    rx: std_mpsc::Receiver<Cmd>,
    kv_events: broadcast::Sender<Vec<KvEvent>>,
    latest: Arc<Mutex<Load>>,
) {
    let mut tracked: HashMap<RequestId, Tracked> = HashMap::new();
    let mut sinks: HashMap<RequestId, Box<dyn ExportSink>> = HashMap::new();
    // The last step scheduled nothing (every request that could run waits for blocks that
    // requests waiting for KV hold): stepping again changes nothing until a command comes.
    let mut stuck = false;
    let mut guessed = Instant::now();
    loop {
        if guessed.elapsed() >= GUESS_INTERVAL {
            // Prefixes computed since a request was queued (a sibling's) count for it too.
            refresh_guesses(&engine, &mut tracked);
            guessed = Instant::now();
        }
        *latest.lock().expect("load") = load_of(&engine, &tracked);
        // Block only when no request can make progress.
        let busy = !stuck && tracked.values().any(|t| !t.remote_waiting);
        let first = if busy {
            match rx.try_recv() {
                Ok(c) => Some(c),
                Err(std_mpsc::TryRecvError::Empty) => None,
                Err(std_mpsc::TryRecvError::Disconnected) => break,
            }
        } else {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(c) => Some(c),
                Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
        };
        let mut cmds: Vec<Cmd> = first.into_iter().collect();
        cmds.extend(rx.try_iter());
        for cmd in cmds {
            handle(&mut engine, &mut tracked, &mut sinks, cmd, &latest, &kv_events);
        }
        // Clients that went away: abort before spending a step on them.
        let gone: Vec<RequestId> = tracked.iter().filter(|(_, t)| t.abandoned()).map(|(&id, _)| id).collect();
        for id in gone {
            engine.abort(id);
            tracked.remove(&id);
            sinks.remove(&id);
        }
        if !tracked.values().any(|t| !t.remote_waiting) {
            publish(&mut engine, &kv_events);
            continue;
        }
        let result = engine.step_exporting(&mut |exports, layer, kv| {
            for e in exports {
                if let Some(sink) = sinks.get_mut(&e.id) {
                    sink.on_layer(e, layer, &kv);
                }
            }
        });
        stuck = !engine.last_step_ran();
        match result {
            Ok(outputs) => {
                for out in outputs {
                    let group = out.group;
                    let done = out.finish.is_some();
                    if let Some(t) = tracked.get(&group) {
                        let _ = t.events.send(Event::Output(out));
                    }
                    // n > 1: the group ends when its last sequence does; the engine
                    // forgets finished sequences, so ask it whether any remain.
                    if done && !engine.has_group(group) {
                        tracked.remove(&group);
                        sinks.remove(&group);
                    }
                }
            }
            Err(e) => {
                // A step failed (it should not): fail every request rather than spin.
                for (id, t) in tracked.drain() {
                    let _ = t.events.send(Event::Failed(format!("engine step failed: {e}")));
                    engine.abort(id);
                }
                sinks.clear();
            }
        }
        publish(&mut engine, &kv_events);
    }
    for (id, t) in tracked.drain() {
        let _ = t.events.send(Event::Failed("the worker is shutting down".into()));
        engine.abort(id);
    }
}

fn publish(engine: &mut LlmEngine, kv_events: &broadcast::Sender<Vec<KvEvent>>) {
    let events = engine.take_kv_events();
    if !events.is_empty() {
        // No subscriber is fine: nobody routes on this worker's cache yet.
        let _ = kv_events.send(events);
    }
}

fn handle(
    engine: &mut LlmEngine,
    tracked: &mut HashMap<RequestId, Tracked>,
    sinks: &mut HashMap<RequestId, Box<dyn ExportSink>>,
    cmd: Cmd,
    latest: &Mutex<Load>,
    kv_events: &broadcast::Sender<Vec<KvEvent>>,
) {
    match cmd {
        Cmd::Submit(req, how, reply) => {
            let req = *req;
            let prompt_len = req.prompt.len();
            let cached_guess = match how {
                Admission::Remote | Admission::RemoteAs(_) => 0,
                _ => engine.cached_prefix_tokens(&req.prompt, req.cache_salt.as_deref()),
            };
            let (tx, events) = mpsc::unbounded_channel();
            let admitted = match how {
                Admission::Local => {
                    engine.add_request(EngineRequest { export_kv: false, ..req }).map(|id| (id, vec![], 0))
                }
                Admission::Export(sink) => engine.add_request(EngineRequest { export_kv: true, ..req }).map(|id| {
                    sinks.insert(id, sink);
                    (id, vec![], 0)
                }),
                Admission::Remote => engine.add_remote_request(req),
                Admission::RemoteAs(kind) => engine.add_remote_request_as(req, kind),
            };
            let remote = admitted.as_ref().is_ok_and(|(_, b, _)| !b.is_empty());
            let answer = admitted.map(|(id, blocks, cached_blocks)| {
                let claimed = Arc::new(AtomicBool::new(false));
                let t =
                    Tracked { events: tx, remote_waiting: remote, claimed: claimed.clone(), prompt_len, cached_guess };
                tracked.insert(id, t);
                Admitted { id, blocks, cached_blocks, events, claimed }
            });
            // The load the submitter reads next counts the request it is told of.
            *latest.lock().expect("load") = load_of(engine, tracked);
            if let Err(Ok(a)) = reply.send(answer) {
                // The caller left before the answer: undo.
                engine.abort(a.id);
                tracked.remove(&a.id);
                sinks.remove(&a.id);
            }
        }
        Cmd::RemoteReady(id, first) => {
            let Some(t) = tracked.get_mut(&id) else { return };
            t.remote_waiting = false;
            match engine.remote_kv_arrived(id, first) {
                Ok(out) => {
                    if let Some(out) = out {
                        let _ = t.events.send(Event::Output(out));
                    }
                    // Finished by its first token, or a cache-only request (nothing to decode).
                    if !engine.has_group(id) {
                        tracked.remove(&id);
                    }
                }
                Err(e) => {
                    let _ = t.events.send(Event::Failed(format!("starting the decode: {e}")));
                    engine.abort(id);
                    tracked.remove(&id);
                }
            }
        }
        Cmd::Abort(id, reason) => {
            engine.abort(id);
            sinks.remove(&id);
            if let Some(t) = tracked.remove(&id) {
                if let Some(r) = reason {
                    let _ = t.events.send(Event::Failed(r));
                }
            }
        }
        Cmd::Fail(id, reason) => {
            if let Some(t) = tracked.get(&id) {
                let _ = t.events.send(Event::Failed(reason));
            }
        }
        Cmd::Freeze(id, reply) => {
            let frozen = match tracked.get(&id) {
                Some(t) if !sinks.contains_key(&id) && !t.remote_waiting => engine.freeze(id),
                _ => Err(EngineError::InvalidRequest(format!("request {} is not decoding here", id.0))),
            };
            if frozen.is_ok() {
                let _ = tracked[&id].events.send(Event::Frozen);
            }
            let _ = reply.send(frozen);
        }
        Cmd::Thaw(id, reply) => {
            let _ = reply.send(engine.thaw(id));
        }
        Cmd::Inspect(id, reply) => {
            let _ = reply.send(engine.inspect(id).filter(|_| tracked.contains_key(&id)));
        }
        Cmd::Signal(events, reply) => {
            let sent = events
                .into_iter()
                .map(|(id, event)| {
                    let decoding =
                        !sinks.contains_key(&id) && engine.inspect(id).is_some_and(|r| r.decoding || r.frozen);
                    decoding && tracked.get(&id).is_some_and(|t| t.events.send(event).is_ok())
                })
                .collect();
            let _ = reply.send(sent);
        }
        Cmd::Moved(id) => {
            engine.abort(id);
            if let Some(t) = tracked.remove(&id) {
                let _ = t.events.send(Event::Moved);
            }
        }
        Cmd::SubscribeKv(reply) => {
            // Changes not yet published go to the existing subscribers first; the
            // snapshot already reflects them.
            publish(engine, kv_events);
            let _ = reply.send(KvSubscription { snapshot: engine.cached_hashes(), live: kv_events.subscribe() });
        }
    }
}

/// How often queued requests' cached-prefix guesses are looked up again.
const GUESS_INTERVAL: Duration = Duration::from_millis(200);

/// Looks up again what the prefix cache holds for each request not yet admitted.
fn refresh_guesses(engine: &LlmEngine, tracked: &mut HashMap<RequestId, Tracked>) {
    for (&id, t) in tracked.iter_mut().filter(|(_, t)| !t.remote_waiting) {
        if let Some(r) = engine.scheduler.get(id).filter(|r| r.num_computed == 0) {
            t.cached_guess = engine.cached_prefix_tokens(&r.tokens(), r.cache_salt.as_deref());
        }
    }
}

fn load_of(engine: &LlmEngine, tracked: &HashMap<RequestId, Tracked>) -> Load {
    let mut queued = 0u64;
    for (&id, t) in tracked.iter() {
        if let Some(r) = engine.scheduler.get(id) {
            if !t.remote_waiting {
                // Not yet admitted: what its prefix-cache lookup is likely to leave.
                let done = if r.num_computed == 0 { t.cached_guess } else { r.num_computed };
                queued += t.prompt_len.saturating_sub(done) as u64;
            }
        }
    }
    let mut tenant_service = engine.scheduler.tenants().served();
    if tenant_service.len() > MAX_REPORTED_TENANTS {
        tenant_service.sort_by(|a, b| b.1.total_cmp(&a.1));
        tenant_service.truncate(MAX_REPORTED_TENANTS);
    }
    Load {
        scheduler: engine.stats(),
        waiting_for_kv: tracked.values().filter(|t| t.remote_waiting).count(),
        queued_prefill_tokens: queued,
        tenant_service,
        guides: engine.guide_stats,
    }
}
