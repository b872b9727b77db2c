//! The router's picture of the cluster: discovery's membership, a gRPC client
//! per worker (requests reach it as a `worker::WorkerApi`, the pollers directly),
//! each worker's last load report (polled), the prefix index of what each worker
//! caches (fed by its KV events, `follow`), and the router's own count of requests in
//! flight on each worker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tandem_cluster::{ClusterView, DiscoveryEvent, Role, ViewChange, WorkerDescriptor, WorkerId};
use tandem_proto::auth::{ClusterToken, WorkerChannel};
use tandem_proto::ids::LeaseId;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_proto::tandem::worker::v1::worker_client::WorkerClient;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tonic::Status;

use crate::index::PrefixIndex;
use crate::metrics;
use crate::pick::{self, Pick, Seen};
use crate::placement::PlacementControl;
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
    inflight: Arc<InFlight>,
    /// The worker names its blocks as this router does (block size and hash scheme): its
    /// KV events are followed into the index. Otherwise it is routed to by load only.
    comparable: bool,
    tasks: Vec<JoinHandle<()>>,
    /// Cancelled when the worker leaves the view (its lease ended, or it deregistered):
    /// requests still waiting on it stop waiting and move elsewhere.
    gone: CancellationToken,
}

impl Entry {
    /// This worker, picked for a request outside routing (a recompute, a live migration's
    /// destination): one more request in flight on it.
    fn pick(&self) -> Picked {
        self.inflight.requests.fetch_add(1, Ordering::Relaxed);
        Picked {
            id: self.desc.id.clone(),
            worker: self.worker.clone(),
            gone: self.gone.clone(),
            lease: self.desc.lease,
            predicted_cached: None,
            queue_ahead: 0,
            inflight: self.inflight.clone(),
            charge: AtomicU64::new(0),
            priority: 0,
        }
    }
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
    /// Prompt tokens it was predicted to find in its prefix cache when picked (`None`:
    /// unknown, its hashing differs from the router's, or it was not picked by the index).
    pub predicted_cached: Option<usize>,
    /// Prompt tokens queued ahead of this request on it when picked, counting requests of
    /// the same or a more urgent priority (this router's live count, plus what its last load
    /// report had beyond that: other routers'). 0 for a pick that computes no prompt.
    pub queue_ahead: u64,
    inflight: Arc<InFlight>,
    /// Prompt tokens this pick still counts in `InFlight::prefill_tokens`.
    charge: AtomicU64,
    /// The request's priority, under which `charge` is counted.
    priority: i32,
}

impl Picked {
    /// The worker has computed the prompt (its prefill answered, or a local generation's
    /// first token came): the prompt no longer counts as queued work there.
    pub fn prefill_done(&self) {
        let c = self.charge.swap(0, Ordering::Relaxed);
        self.inflight.prefill_tokens.fetch_sub(c, Ordering::Relaxed);
        if c > 0 {
            let mut by = self.inflight.by_priority.lock().expect("in flight");
            if let Some(n) = by.get_mut(&self.priority) {
                *n = n.saturating_sub(c);
                if *n == 0 {
                    by.remove(&self.priority);
                }
            }
        }
    }

    /// Prompt tokens this pick computes (0 once it has, or for a pick that computes none).
    pub fn uncached(&self) -> u64 {
        self.charge.load(Ordering::Relaxed)
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.prefill_done();
        self.inflight.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What this router has in flight on one worker, live (load reports are up to a poll old).
#[derive(Debug, Default)]
pub struct InFlight {
    /// Requests picked for it and not yet ended.
    pub requests: AtomicU64,
    /// Prompt tokens it is predicted to compute for them and has not yet answered.
    pub prefill_tokens: AtomicU64,
    /// The same tokens by the requests' priority.
    pub by_priority: Mutex<std::collections::BTreeMap<i32, u64>>,
}

impl InFlight {
    /// Tokens of requests at least as urgent as `priority` (a value no greater).
    fn ahead_of(&self, priority: i32) -> u64 {
        self.by_priority.lock().expect("in flight").range(..=priority).map(|(_, n)| n).sum()
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
    /// Blocks the prefix index says it caches.
    pub cached_blocks: usize,
    /// Whether it hashes blocks as the router does (else routed to by load only).
    pub comparable: bool,
}

/// How this router names prompt blocks, which a worker must match for its KV events to
/// count, and how long a block sent to a worker counts as held before its event comes.
#[derive(Debug, Clone)]
pub struct Hashing {
    /// Tokens per block (the workers' `--block-size`).
    pub block_size: u32,
    /// `tandem_text::prefix::SCHEME` unless a test says otherwise.
    pub scheme: String,
    /// How long routed blocks count as pending on the chosen workers.
    pub pending_ttl: Duration,
}

/// Blocks sent to a worker count as held for this long, unless its events say so first.
pub const PENDING_TTL: Duration = Duration::from_secs(2);

impl Default for Hashing {
    fn default() -> Self {
        Hashing { block_size: 16, scheme: tandem_text::prefix::SCHEME.to_string(), pending_ttl: PENDING_TTL }
    }
}

/// What placement needs to know of one attempt's prompt.
pub struct RouteAsk<'a> {
    /// The model's name as clients use it.
    pub model: &'a str,
    /// The prompt's token ids (with, after a migration, the tokens generated so far).
    pub prompt: &'a [u32],
    /// The request's prefix-cache salt, as sent to the workers.
    pub salt: Option<&'a str>,
    /// Its `priority` (lower is more urgent): the prompt tokens queued ahead of it on the
    /// worker that computes it count the same or more urgent requests only.
    pub priority: i32,
}

#[derive(Default)]
pub struct Members {
    view: RwLock<ClusterView>,
    entries: Mutex<HashMap<WorkerId, Entry>>,
    /// What each comparable worker caches. Never locked while `entries` is.
    pub(crate) index: Mutex<PrefixIndex>,
    hashing: Hashing,
    /// Mutual TLS of the channels to the workers; `None`: plaintext.
    tls: Option<ClientTlsConfig>,
    /// Sent with every call to a worker; `None`: none (workers without a token).
    token: Option<ClusterToken>,
}

impl Members {
    /// `tls`: the channels to the workers present this certificate and verify the workers'.
    /// `token`: the cluster token every call to a worker carries.
    /// `hashing`: how this router names prompt blocks (see `Hashing`).
    pub fn new(tls: Option<ClientTlsConfig>, token: Option<ClusterToken>, hashing: Hashing) -> Arc<Members> {
        Arc::new(Members { tls, token, hashing, ..Members::default() })
    }

    /// Whether `desc` names its blocks as this router does; logged and counted when not.
    fn comparable(&self, desc: &WorkerDescriptor) -> bool {
        let Some(scheme) = desc.hash_scheme.as_deref() else {
            // No prefix cache (or a worker that does not say): nothing to follow or predict.
            tracing::info!(worker = %desc.id, "worker announces no prefix cache; routing to it by load only");
            metrics::index_mismatch(&desc.id, false);
            return false;
        };
        let same = desc.block_size == self.hashing.block_size && scheme == self.hashing.scheme;
        if !same {
            tracing::warn!(
                worker = %desc.id,
                block_size = desc.block_size,
                scheme,
                router_block_size = self.hashing.block_size,
                router_scheme = %self.hashing.scheme,
                "worker names its cached blocks differently from this router; routing to it by load only"
            );
        }
        metrics::index_mismatch(&desc.id, !same);
        same
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
                self.index.lock().expect("index").leave(&id);
                metrics::index_left(&id);
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
        let comparable = self.comparable(&desc);
        // A re-registered worker (a new process under the same id) starts from its snapshot.
        self.index.lock().expect("index").leave(&desc.id);
        let mut tasks = vec![tokio::spawn(poll_load(Arc::downgrade(self), desc.id.clone(), client.clone()))];
        if comparable {
            tasks.push(tokio::spawn(crate::follow::follow_kv_events(
                Arc::downgrade(self),
                desc.id.clone(),
                client.clone(),
            )));
        }
        Ok(Entry {
            desc,
            worker: Arc::new(GrpcWorker(client)),
            stats: None,
            liveness: Liveness::default(),
            inflight: Arc::default(),
            comparable,
            tasks,
            gone: CancellationToken::new(),
        })
    }

    /// `tenant`'s weighted service on every worker that reported some, as last polled.
    pub fn tenant_service(&self, tenant: &str) -> crate::fairness::Reported {
        let entries = self.entries.lock().expect("entries");
        entries
            .values()
            .filter_map(|e| {
                let s = e.stats.as_ref()?.tenant_service.iter().find(|t| t.tenant == tenant)?;
                (s.service.is_finite() && s.service > 0.0).then(|| (e.desc.id.clone(), s.service))
            })
            .collect()
    }

    /// Every known worker, in id order.
    pub fn snapshot(&self) -> Vec<WorkerStatus> {
        let mut out: Vec<WorkerStatus> = {
            let entries = self.entries.lock().expect("entries");
            entries
                .values()
                .map(|e| WorkerStatus {
                    desc: e.desc.clone(),
                    healthy: e.liveness.healthy(),
                    stats: e.stats.clone(),
                    inflight: e.inflight.requests.load(Ordering::Relaxed),
                    cached_blocks: 0,
                    comparable: e.comparable,
                })
                .collect()
        };
        let index = self.index.lock().expect("index");
        for w in &mut out {
            w.cached_blocks = index.blocks(&w.desc.id);
        }
        out.sort_by(|a, b| a.desc.id.cmp(&b.desc.id));
        out
    }

    /// The chained hashes of the prompt's blocks that a worker could reuse (never the
    /// block holding the last token, which is always computed), as this router names them.
    pub fn prompt_hashes(&self, prompt: &[u32], salt: Option<&str>) -> Vec<u64> {
        let usable = &prompt[..prompt.len().saturating_sub(1)];
        tandem_text::prefix::prefix_hashes(usable, self.hashing.block_size as usize, salt)
            .into_iter()
            .map(|h| h.0)
            .collect()
    }

    /// Picks where one attempt of a request goes: `policy` weighs each candidate's load and
    /// the prompt tokens the prefix index predicts it caches. Workers in `excluded` (failed
    /// under this request before) are not picked. The prompt's blocks then count as pending
    /// on the chosen workers, so siblings that follow before any KV event find them there.
    pub fn route(
        &self,
        policy: &dyn RoutingPolicy,
        placement: &PlacementControl,
        ask: &RouteAsk<'_>,
        excluded: &[WorkerId],
    ) -> Result<Route, Status> {
        let hashes = self.prompt_hashes(ask.prompt, ask.salt);
        let now = Instant::now();
        let block = self.hashing.block_size as usize;
        let (held, sizes): (HashMap<WorkerId, usize>, HashMap<WorkerId, usize>) = {
            let index = self.index.lock().expect("index");
            let held = index.lookup(&hashes, now).into_iter().collect();
            let sizes = index.sizes().into_iter().collect();
            (held, sizes)
        };
        let cache = |e: &Entry| {
            let predicted = e.comparable.then(|| held.get(&e.desc.id).copied().unwrap_or(0) * block);
            (predicted, sizes.get(&e.desc.id).copied().unwrap_or(0))
        };
        let route = self.route_with(policy, placement, ask, excluded, &cache, now)?;
        let computes = match &route {
            Route::Disaggregated { prefill, .. } => prefill,
            Route::Local(w) => w,
        };
        placement.observe_prompt_at(ask.prompt.len().saturating_sub(computes.predicted_cached.unwrap_or(0)), now);
        let until = now + self.hashing.pending_ttl;
        let mut index = self.index.lock().expect("index");
        let chosen: Vec<&Picked> = match &route {
            Route::Disaggregated { prefill, decode } => vec![prefill, decode],
            Route::Local(w) => vec![w],
        };
        for p in chosen.into_iter().filter(|p| p.predicted_cached.is_some()) {
            index.add_pending(&p.id, &hashes, now, until);
        }
        Ok(route)
    }

    /// `route`, with `cache(e)` the prompt tokens worker `e` is predicted to hold and the
    /// blocks it caches in all.
    fn route_with(
        &self,
        policy: &dyn RoutingPolicy,
        placement: &PlacementControl,
        ask: &RouteAsk<'_>,
        excluded: &[WorkerId],
        cache: &dyn Fn(&Entry) -> (Option<usize>, usize),
        now: Instant,
    ) -> Result<Route, Status> {
        let (model, prompt_len) = (ask.model, ask.prompt.len());
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
            all.into_iter().filter(|e| !e.liveness.refused && e.stats.as_ref().is_some_and(takes_work)).collect()
        };
        let mut prefill = of_role(&|r| r == Role::Prefill);
        let mut decode = of_role(&|r| r.can_decode());
        prefill.sort_by(|a, b| a.desc.id.cmp(&b.desc.id));
        decode.sort_by(|a, b| a.desc.id.cmp(&b.desc.id));
        fn seen<'a>(es: &[&'a Entry], cache: &dyn Fn(&Entry) -> (Option<usize>, usize)) -> Vec<Seen<'a>> {
            es.iter()
                .map(|e| {
                    let (cached, indexed_blocks) = cache(e);
                    Seen {
                        desc: &e.desc,
                        stats: e.stats.as_ref(),
                        inflight: e.inflight.requests.load(Ordering::Relaxed),
                        inflight_tokens: e.inflight.prefill_tokens.load(Ordering::Relaxed),
                        cached,
                        indexed_blocks,
                    }
                })
                .collect()
        }
        let (seen_prefill, seen_decode) = (seen(&prefill, cache), seen(&decode, cache));
        let pick = pick::choose(policy, placement, model, prompt_len, &seen_prefill, &seen_decode, now)?;
        // A prefill (or local) pick counts the prompt tokens it will compute until it
        // answers; a decode pick counts as a request only.
        let take = |e: &Entry, predicted_cached: Option<usize>, computes: bool| {
            let charge = if computes { prompt_len.saturating_sub(predicted_cached.unwrap_or(0)) as u64 } else { 0 };
            let queue_ahead = if computes {
                // What others' routers queued there: its report beyond this router's count.
                let mine = e.inflight.prefill_tokens.load(Ordering::Relaxed);
                let others = e.stats.as_ref().map_or(0, |s| s.queued_prefill_tokens.saturating_sub(mine));
                e.inflight.ahead_of(ask.priority) + others
            } else {
                0
            };
            e.inflight.requests.fetch_add(1, Ordering::Relaxed);
            e.inflight.prefill_tokens.fetch_add(charge, Ordering::Relaxed);
            if charge > 0 {
                *e.inflight.by_priority.lock().expect("in flight").entry(ask.priority).or_default() += charge;
            }
            Picked {
                id: e.desc.id.clone(),
                worker: e.worker.clone(),
                gone: e.gone.clone(),
                lease: e.desc.lease,
                predicted_cached,
                queue_ahead,
                inflight: e.inflight.clone(),
                charge: AtomicU64::new(charge),
                priority: ask.priority,
            }
        };
        Ok(match pick {
            Pick::Disaggregated { prefill: p, decode: d } => Route::Disaggregated {
                prefill: take(prefill[p], seen_prefill[p].cached, true),
                decode: take(decode[d], seen_decode[d].cached, false),
            },
            Pick::Local(d) => Route::Local(take(decode[d], seen_decode[d].cached, true)),
        })
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

    /// Whether a worker of `model` not in `excluded` answers its polls but takes no new
    /// work for now (fenced while it registers again, changing role, draining): a route
    /// that found no worker may find one when it is back.
    pub fn has_paused(&self, model: &str, excluded: &[WorkerId]) -> bool {
        self.entries.lock().expect("entries").values().any(|e| {
            e.liveness.health == Health::Refusing && e.desc.model.name == model && !excluded.contains(&e.desc.id)
        })
    }

    /// Decode-capable worker `id`, if it is healthy: where a request whose KV transfer
    /// failed is recomputed.
    pub fn decoder(&self, id: &WorkerId) -> Option<Picked> {
        let entries = self.entries.lock().expect("entries");
        let e = entries.get(id).filter(|e| e.liveness.healthy() && e.desc.role.can_decode())?;
        Some(e.pick())
    }

    /// Where a request decoding on `from` moves (live migration): a healthy decode-capable
    /// worker of `model` with `from`'s weights and block size, other than `from`; `to`, when
    /// given, names it (and is `None` unless it qualifies); else `policy` picks by load.
    /// Returns the pick and the block size both use.
    pub fn migration_target(
        &self,
        policy: &dyn RoutingPolicy,
        model: &str,
        from: &WorkerId,
        to: Option<&str>,
        prompt_len: usize,
    ) -> Option<(Picked, usize)> {
        let entries = self.entries.lock().expect("entries");
        let src = entries.get(from)?;
        let (fingerprint, block_size) = (src.desc.model.fingerprint, src.desc.block_size);
        let mut fit: Vec<&Entry> = entries
            .values()
            .filter(|e| {
                e.desc.id != *from
                    && e.liveness.healthy()
                    && e.desc.role.can_decode()
                    && e.desc.model.name == model
                    && e.desc.model.fingerprint == fingerprint
                    && e.desc.block_size == block_size
                    && to.is_none_or(|t| e.desc.id.as_str() == t)
            })
            .collect();
        if fit.is_empty() {
            return None;
        }
        fit.sort_by(|a, b| a.desc.id.cmp(&b.desc.id));
        let c: Vec<Candidate> = fit
            .iter()
            .map(|e| Candidate {
                worker: &e.desc,
                stats: e.stats.as_ref(),
                inflight: e.inflight.requests.load(Ordering::Relaxed),
                inflight_tokens: e.inflight.prefill_tokens.load(Ordering::Relaxed),
                cached_tokens: None,
                indexed_blocks: 0,
            })
            .collect();
        Some((fit[policy.pick_decode(&c, prompt_len)].pick(), block_size as usize))
    }

    /// The discovery lease worker `id`'s record is held by, as this router's view has it.
    pub fn lease_of(&self, id: &WorkerId) -> Option<LeaseId> {
        self.entries.lock().expect("entries").get(id).and_then(|e| e.desc.lease)
    }

    /// Worker `id`'s client, if it is in the view (the planner's role changes).
    pub fn worker(&self, id: &WorkerId) -> Option<Arc<dyn WorkerApi>> {
        self.entries.lock().expect("entries").get(id).map(|e| e.worker.clone())
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
            inflight: Arc::default(),
            comparable: true,
            tasks: Vec::new(),
            gone: CancellationToken::new(),
        };
        self.entries.lock().expect("entries").insert(id, entry);
    }

    /// Tests: worker `id` answered a load poll, taking new work or not (fenced, draining).
    #[cfg(test)]
    pub(crate) fn answered_fake(&self, id: &WorkerId, takes_work: bool) {
        self.update(id, |e| {
            e.liveness.observe(Poll::Answered { takes_work });
        });
    }

    fn update(&self, id: &WorkerId, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = self.entries.lock().expect("entries").get_mut(id) {
            f(e);
        }
    }
}

/// Whether a worker's last report says it takes new work: not draining, fenced, or
/// changing its role.
fn takes_work(s: &pb::StatsResponse) -> bool {
    !s.draining && !s.fenced && !s.changing_role
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
                    let change = e.liveness.observe(Poll::Answered { takes_work: takes_work(&s) });
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
