//! The router's picture of the cluster: discovery's membership, a gRPC client
//! per worker (requests reach it as a `worker::WorkerApi`, the pollers directly),
//! each worker's last load report (polled), the prefix-cache blocks each worker
//! reports (its KV events), and the router's own count of requests in flight on
//! each worker.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tandem_cluster::{ClusterView, DiscoveryEvent, Role, ViewChange, WorkerDescriptor, WorkerId};
use tandem_proto::auth::{ClusterToken, WorkerChannel};
use tandem_proto::ids::LeaseId;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_proto::tandem::worker::v1::worker_client::WorkerClient;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tonic::Status;

use crate::policy::{Candidate, RoutingPolicy};
use crate::worker::{GrpcWorker, WorkerApi};

/// How often each worker's load is polled.
pub const LOAD_INTERVAL: Duration = Duration::from_millis(250);
/// A load poll that takes longer counts as missed.
const LOAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Missed polls in a row (timeouts) before a worker is not routed to; a refused
/// connection counts at once.
const MISSES: u32 = 3;

struct Entry {
    desc: WorkerDescriptor,
    /// What requests call; the pollers keep their own tonic client.
    worker: Arc<dyn WorkerApi>,
    stats: Option<pb::StatsResponse>,
    /// Whether it is routed to, from its load polls.
    liveness: Liveness,
    inflight: Arc<AtomicU64>,
    /// Hashes of the blocks in the worker's prefix cache, from its KV events.
    cached: HashSet<u64>,
    tasks: Vec<JoinHandle<()>>,
    /// Cancelled when the worker leaves the view (its lease ended, or it deregistered):
    /// requests still waiting on it stop waiting and move elsewhere.
    gone: CancellationToken,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.gone.cancel();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A worker chosen for one request; counts as in flight on it while alive.
pub struct Picked {
    pub id: WorkerId,
    pub worker: Arc<dyn WorkerApi>,
    /// Cancelled when the worker leaves the cluster's view.
    pub gone: CancellationToken,
    /// The discovery lease its record is held by (`None`: unknown).
    pub lease: Option<LeaseId>,
    inflight: Arc<AtomicU64>,
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where one request goes.
pub enum Route {
    /// Prefill on one worker, KV to and decode on another.
    Disaggregated { prefill: Picked, decode: Picked },
    /// No prefill worker: a worker of role `both` does the whole request.
    Local(Picked),
}

/// A worker as `Members::snapshot` reports it.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    pub desc: WorkerDescriptor,
    pub healthy: bool,
    pub stats: Option<pb::StatsResponse>,
    pub inflight: u64,
    pub cached_blocks: usize,
}

#[derive(Default)]
pub struct Members {
    view: RwLock<ClusterView>,
    entries: Mutex<HashMap<WorkerId, Entry>>,
    /// Mutual TLS of the channels to the workers; `None`: plaintext.
    tls: Option<ClientTlsConfig>,
    /// Sent with every call to a worker; `None`: none (workers without a token).
    token: Option<ClusterToken>,
}

impl Members {
    /// `tls`: the channels to the workers present this certificate and verify the workers'.
    /// `token`: the cluster token every call to a worker carries.
    pub fn new(tls: Option<ClientTlsConfig>, token: Option<ClusterToken>) -> Arc<Members> {
        Arc::new(Members { tls, token, ..Members::default() })
    }

    /// Applies a discovery event: a joining worker gets a client and its pollers.
    pub fn apply(self: &Arc<Self>, event: DiscoveryEvent) {
        let desc = match &event {
            DiscoveryEvent::Added(d) => Some(d.clone()),
            DiscoveryEvent::Removed(_) => None,
        };
        let change = self.view.write().expect("view").apply(event);
        match change {
            ViewChange::Joined(id) | ViewChange::Updated(id) => {
                let desc = desc.expect("an Added event");
                tracing::info!(worker = %id, role = %desc.role, addr = %desc.grpc_addr, "worker joined");
                match self.entry_for(desc) {
                    Ok(e) => {
                        self.entries.lock().expect("entries").insert(id, e);
                    }
                    Err(e) => {
                        tracing::warn!(worker = %id, error = %e, "worker has an unusable address; not routing to it")
                    }
                }
            }
            ViewChange::Left(id) => {
                tracing::info!(worker = %id, "worker left");
                self.entries.lock().expect("entries").remove(&id);
            }
            ViewChange::Unchanged => {}
        }
    }

    fn entry_for(self: &Arc<Self>, desc: WorkerDescriptor) -> Result<Entry, String> {
        // The scheme follows this router's TLS setting: tonic speaks TLS to https:// alone.
        let host = desc.grpc_addr.split_once("://").map_or(desc.grpc_addr.as_str(), |(_, h)| h);
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{host}")).map_err(|e| e.to_string())?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(|e| e.to_string())?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        let client = tandem_proto::auth::worker_client(channel, self.token.as_ref());
        let tasks = vec![
            tokio::spawn(poll_load(Arc::downgrade(self), desc.id.clone(), client.clone())),
            tokio::spawn(follow_kv_events(Arc::downgrade(self), desc.id.clone(), client.clone())),
        ];
        Ok(Entry {
            desc,
            worker: Arc::new(GrpcWorker(client)),
            stats: None,
            liveness: Liveness::default(),
            inflight: Arc::new(AtomicU64::new(0)),
            cached: HashSet::new(),
            tasks,
            gone: CancellationToken::new(),
        })
    }

    /// Every known worker, in id order.
    pub fn snapshot(&self) -> Vec<WorkerStatus> {
        let entries = self.entries.lock().expect("entries");
        let mut out: Vec<WorkerStatus> = entries
            .values()
            .map(|e| WorkerStatus {
                desc: e.desc.clone(),
                healthy: e.liveness.healthy(),
                stats: e.stats,
                inflight: e.inflight.load(Ordering::Relaxed),
                cached_blocks: e.cached.len(),
            })
            .collect();
        out.sort_by(|a, b| a.desc.id.cmp(&b.desc.id));
        out
    }

    /// Picks where a request of `prompt_len` tokens for `model` goes.
    /// Workers in `excluded` (failed under this request before) are not picked.
    pub fn route(
        &self,
        policy: &dyn RoutingPolicy,
        model: &str,
        prompt_len: usize,
        excluded: &[WorkerId],
    ) -> Result<Route, Status> {
        let entries = self.entries.lock().expect("entries");
        let eligible = |e: &&Entry| e.desc.model.name == model && !excluded.contains(&e.desc.id);
        // Workers of a role that answer; when none does, those that are only slow to answer
        // (busy, or starved of CPU) rather than gone, draining or fenced: a slow worker serves
        // better than none.
        let of_role = |role: &dyn Fn(Role) -> bool| -> Vec<&Entry> {
            let all: Vec<&Entry> = entries.values().filter(eligible).filter(|e| role(e.desc.role)).collect();
            let healthy: Vec<&Entry> = all.iter().copied().filter(|e| e.liveness.healthy()).collect();
            if !healthy.is_empty() {
                return healthy;
            }
            all.into_iter()
                .filter(|e| !e.liveness.refused && e.stats.is_some_and(|s| !s.draining && !s.fenced))
                .collect()
        };
        let mut prefill = of_role(&|r| r == Role::Prefill);
        let mut decode = of_role(&|r| r.can_decode());
        prefill.sort_by(|a, b| a.desc.id.cmp(&b.desc.id));
        decode.sort_by(|a, b| a.desc.id.cmp(&b.desc.id));
        let candidates = |es: &[&Entry]| -> Vec<(Option<pb::StatsResponse>, u64)> {
            es.iter().map(|e| (e.stats, e.inflight.load(Ordering::Relaxed))).collect()
        };
        let pick = |es: &[&Entry], prefill_role: bool| -> usize {
            let loads = candidates(es);
            let c: Vec<Candidate> = es
                .iter()
                .zip(&loads)
                .map(|(e, (s, n))| Candidate { worker: &e.desc, stats: s.as_ref(), inflight: *n })
                .collect();
            if prefill_role {
                policy.pick_prefill(&c, prompt_len)
            } else {
                policy.pick_decode(&c, prompt_len)
            }
        };
        let take = |e: &Entry| {
            e.inflight.fetch_add(1, Ordering::Relaxed);
            Picked {
                id: e.desc.id.clone(),
                worker: e.worker.clone(),
                gone: e.gone.clone(),
                lease: e.desc.lease,
                inflight: e.inflight.clone(),
            }
        };
        if decode.is_empty() {
            return Err(Status::unavailable(format!("no decode worker serves {model:?}")));
        }
        if !prefill.is_empty() {
            let d = decode[pick(&decode, false)];
            // The pair must agree on the model's weights and the KV block size.
            let matching: Vec<&Entry> = prefill
                .iter()
                .copied()
                .filter(|p| {
                    p.desc.model.fingerprint == d.desc.model.fingerprint && p.desc.block_size == d.desc.block_size
                })
                .collect();
            if matching.is_empty() {
                return Err(Status::unavailable(format!(
                    "no prefill worker has the KV layout of decode worker {}",
                    d.desc.id
                )));
            }
            let p = matching[pick(&matching, true)];
            return Ok(Route::Disaggregated { prefill: take(p), decode: take(d) });
        }
        let both: Vec<&Entry> = decode.iter().copied().filter(|e| e.desc.role == Role::Both).collect();
        if both.is_empty() {
            return Err(Status::unavailable(format!(
                "no prefill worker serves {model:?} and no decode worker has role both"
            )));
        }
        Ok(Route::Local(take(both[pick(&both, false)])))
    }

    /// Whether a healthy prefill worker of `model` other than `failed` (and not in
    /// `excluded`) exists.
    pub fn has_other_prefill(&self, model: &str, failed: &WorkerId, excluded: &[WorkerId]) -> bool {
        self.entries.lock().expect("entries").values().any(|e| {
            e.liveness.healthy()
                && e.desc.role == Role::Prefill
                && e.desc.model.name == model
                && e.desc.id != *failed
                && !excluded.contains(&e.desc.id)
        })
    }

    /// Whether a healthy decode-capable worker of `model` other than `full` (and not in
    /// `excluded`) exists.
    pub fn has_other_decode(&self, model: &str, full: &WorkerId, excluded: &[WorkerId]) -> bool {
        self.entries.lock().expect("entries").values().any(|e| {
            e.liveness.healthy()
                && e.desc.role.can_decode()
                && e.desc.model.name == model
                && e.desc.id != *full
                && !excluded.contains(&e.desc.id)
        })
    }

    /// Decode-capable worker `id`, if it is healthy: where a request whose KV transfer
    /// failed is recomputed.
    pub fn decoder(&self, id: &WorkerId) -> Option<Picked> {
        let entries = self.entries.lock().expect("entries");
        let e = entries.get(id).filter(|e| e.liveness.healthy() && e.desc.role.can_decode())?;
        e.inflight.fetch_add(1, Ordering::Relaxed);
        Some(Picked {
            id: e.desc.id.clone(),
            worker: e.worker.clone(),
            gone: e.gone.clone(),
            lease: e.desc.lease,
            inflight: e.inflight.clone(),
        })
    }

    /// Models served by at least one healthy worker: (name, context length).
    pub fn models(&self) -> Vec<(String, u32)> {
        let entries = self.entries.lock().expect("entries");
        let mut out: Vec<(String, u32)> = Vec::new();
        for e in entries.values().filter(|e| e.liveness.healthy()) {
            match out.iter_mut().find(|(n, _)| *n == e.desc.model.name) {
                Some((_, ctx)) => *ctx = (*ctx).min(e.desc.context_length),
                None => out.push((e.desc.model.name.clone(), e.desc.context_length)),
            }
        }
        out.sort();
        out
    }

    /// Puts `desc` in the view with `worker` standing for it, and no load polls or KV
    /// events: the choice tests' fake workers.
    #[cfg(test)]
    pub(crate) fn join_fake(&self, desc: WorkerDescriptor, worker: Arc<dyn WorkerApi>) {
        let id = desc.id.clone();
        self.view.write().expect("view").apply(DiscoveryEvent::Added(desc.clone()));
        let entry = Entry {
            desc,
            worker,
            stats: None,
            liveness: Liveness::default(),
            inflight: Arc::new(AtomicU64::new(0)),
            cached: HashSet::new(),
            tasks: Vec::new(),
            gone: CancellationToken::new(),
        };
        self.entries.lock().expect("entries").insert(id, entry);
    }

    fn update(&self, id: &WorkerId, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = self.entries.lock().expect("entries").get_mut(id) {
            f(e);
        }
    }
}

/// Whether a worker is routed to, as its load polls tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Health {
    /// Answers and takes new work: routed to.
    #[default]
    Serving,
    /// Answers, but is draining or fenced: not routed to.
    Refusing,
    /// Does not answer: a refused connection, or `MISSES` slow polls in a row.
    Silent,
}

/// One load poll's outcome.
#[derive(Debug, Clone, Copy)]
enum Poll {
    /// The worker answered; it takes work unless draining or fenced.
    Answered { takes_work: bool },
    /// The call could not connect or failed outright: a dead process.
    Refused,
    /// No answer within `LOAD_TIMEOUT`: maybe a busy process.
    Slow,
}

/// A worker's health across its load polls: a pure state machine, so that each change is
/// reported (and logged) once, however long the worker stays drained, fenced or silent.
#[derive(Debug, Clone, Copy, Default)]
struct Liveness {
    health: Health,
    /// Polls missed in a row.
    misses: u32,
    /// The last poll could not connect or failed outright (not merely slow).
    refused: bool,
}

impl Liveness {
    fn healthy(&self) -> bool {
        self.health == Health::Serving
    }

    /// Applies one poll; `(before, after)` when the health changed, else `None`.
    fn observe(&mut self, poll: Poll) -> Option<(Health, Health)> {
        let before = self.health;
        match poll {
            Poll::Answered { takes_work } => {
                self.misses = 0;
                self.refused = false;
                self.health = if takes_work { Health::Serving } else { Health::Refusing };
            }
            Poll::Refused | Poll::Slow => {
                self.misses += 1;
                self.refused = matches!(poll, Poll::Refused);
                if self.refused || self.misses >= MISSES {
                    self.health = Health::Silent;
                }
            }
        }
        (self.health != before).then_some((before, self.health))
    }
}

async fn poll_load(members: std::sync::Weak<Members>, id: WorkerId, mut client: WorkerClient<WorkerChannel>) {
    loop {
        let res = tokio::time::timeout(LOAD_TIMEOUT, client.stats(pb::StatsRequest {})).await;
        let Some(m) = members.upgrade() else { return };
        match res {
            Ok(Ok(r)) => {
                let s = r.into_inner();
                m.update(&id, |e| {
                    let change = e.liveness.observe(Poll::Answered { takes_work: !s.draining && !s.fenced });
                    match change {
                        Some((Health::Silent, _)) => {
                            tracing::info!(worker = %id, draining = s.draining, fenced = s.fenced, "worker answers again")
                        }
                        Some((_, Health::Refusing)) => tracing::info!(
                            worker = %id, draining = s.draining, fenced = s.fenced,
                            "worker takes no new work; not routing to it"
                        ),
                        Some((_, Health::Serving)) => tracing::info!(worker = %id, "worker takes new work again"),
                        _ => {}
                    }
                    e.stats = Some(s);
                });
            }
            failure => m.update(&id, |e| {
                // A refused connection is a dead process; a slow answer may be a busy one.
                let refused = matches!(&failure, Ok(Err(s)) if s.code() == tonic::Code::Unavailable);
                let poll = if refused { Poll::Refused } else { Poll::Slow };
                if let Some((_, Health::Silent)) = e.liveness.observe(poll) {
                    // The reason tells a dead process from, say, a refused TLS certificate.
                    let why = match &failure {
                        Ok(Err(s)) => s.message().to_string(),
                        _ => format!("no answer within {LOAD_TIMEOUT:?}"),
                    };
                    tracing::warn!(worker = %id, reason = %why, "worker does not answer; not routing to it");
                }
            }),
        }
        drop(m);
        tokio::time::sleep(LOAD_INTERVAL).await;
    }
}

async fn follow_kv_events(members: std::sync::Weak<Members>, id: WorkerId, mut client: WorkerClient<WorkerChannel>) {
    loop {
        if let Ok(resp) = client.kv_events(pb::KvEventsRequest {}).await {
            let mut stream = resp.into_inner();
            while let Ok(Some(batch)) = stream.message().await {
                let Some(m) = members.upgrade() else { return };
                m.update(&id, |e| {
                    for ev in batch.events {
                        match ev.event {
                            Some(pb::kv_event::Event::Stored(s)) => e.cached.extend(s.block_hashes),
                            Some(pb::kv_event::Event::Removed(r)) => {
                                for h in r.block_hashes {
                                    e.cached.remove(&h);
                                }
                            }
                            Some(pb::kv_event::Event::Cleared(_)) => e.cached.clear(),
                            None => {}
                        }
                    }
                });
            }
        }
        if members.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_health_change_is_reported_once() {
        use Health::*;
        let answered = Poll::Answered { takes_work: true };
        let drained = Poll::Answered { takes_work: false };
        // The polls, and the changes they report in order.
        type Case = (Vec<Poll>, Vec<(Health, Health)>);
        let cases: Vec<Case> = vec![
            (vec![answered; 5], vec![]),
            // A worker that stays drained is reported once, not at every poll.
            (vec![drained; 40], vec![(Serving, Refusing)]),
            (vec![drained, drained, answered, answered], vec![(Serving, Refusing), (Refusing, Serving)]),
            // Slow polls count; a refused connection is silence at once.
            (vec![Poll::Slow, Poll::Slow, answered], vec![]),
            (vec![Poll::Slow; 10], vec![(Serving, Silent)]),
            (vec![Poll::Refused, Poll::Refused, drained, drained], vec![(Serving, Silent), (Silent, Refusing)]),
            (vec![Poll::Refused, answered, answered], vec![(Serving, Silent), (Silent, Serving)]),
        ];
        for (polls, expected) in cases {
            let mut l = Liveness::default();
            let got: Vec<_> = polls.iter().filter_map(|&p| l.observe(p)).collect();
            assert_eq!(got, expected, "{polls:?}");
        }
        let mut l = Liveness::default();
        l.observe(Poll::Refused);
        assert!(l.refused && !l.healthy());
        l.observe(Poll::Answered { takes_work: false });
        assert!(!l.refused && !l.healthy());
    }
}
