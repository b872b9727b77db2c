//! One worker process (or one worker inside `tandem up`): the model, the engine
//! thread, the KV endpoints its role needs, the gRPC server with health and
//! reflection, and its registration in discovery. `drain` is the graceful exit.
//!
//! With a cluster token (`WorkerConfig::cluster_token`; the `tandem` commands always
//! give one) the `Worker` service refuses calls without it and the KV receiver refuses
//! Hellos not signed with it; a prefill-capable worker with discovery sends KV only to
//! the decode workers discovery lists (`service::Peers`).
//!
//! With TLS (`WorkerConfig::tls`) the gRPC server requires client certificates from
//! the cluster's CA and the KV plane's TCP connections are mutual TLS both ways; a
//! plaintext health-only server (`health_listen`) then serves probes that cannot
//! speak TLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_cluster::{
    ClusterName, Discovery, KvEndpoints, LeaseState, LocalKvEndpoint, ModelInfo, Registration, Role, WorkerDescriptor,
    WorkerId,
};
use tandem_engine::kv_cache::{blocks_for_tokens, KvCache, KvDtype};
use tandem_engine::llm_engine::{LlmEngine, LlmEngineConfig};
use tandem_engine::model::{Model, ModelOptions};
use tandem_engine::scheduler::{Policy, SchedulerConfig};
use tandem_kvtransfer::{host_id, KvAuth, KvReceiver, KvSender, ShmKv, TcpConfig};
use tandem_prefill_worker::EngineHandle;
use tandem_proto::auth::{ClusterToken, RequireToken};
use tandem_proto::tandem::worker::v1 as pb;
use tandem_proto::tandem::worker::v1::worker_server::{WorkerServer, SERVICE_NAME};
use tandem_proto::tls::{MutualTls, TlsFiles};
use tandem_proto::{HealthReporter, ServingStatus};
use tandem_text::tokenizer::Tokenizer;
use tandem_text::ModelText;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::peers::Peers;
use crate::service::{WorkerService, WorkerState};

/// How to run one worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Unique in the cluster: letters, digits, `-`, `_`, `.`.
    pub id: String,
    pub role: Role,
    pub model_path: PathBuf,
    /// The name the router serves the model under.
    pub model_name: String,
    /// Compute threads of this worker's engine.
    pub threads: usize,
    /// KV blocks in the pool; `None`: enough for one full context.
    pub kv_blocks: Option<usize>,
    pub block_size: usize,
    pub max_batched_tokens: usize,
    pub max_seqs: usize,
    /// Requests queued in the engine at most; beyond it, RESOURCE_EXHAUSTED.
    pub max_waiting: usize,
    /// Reuse cached prompt prefixes (the default).
    pub prefix_caching: bool,
    /// Which waiting request the engine admits first (and which running one it preempts
    /// first, the other end of the same order): `Policy::Fcfs`, by arrival (the default),
    /// or `Policy::Priority`, by the request's `priority`, lower values first, then arrival.
    pub scheduling_policy: Policy,
    /// A prefill with more tokens than this left to compute yields step budget to shorter
    /// prompts (`SchedulerConfig::long_prefill_threshold`).
    pub long_prefill_threshold: usize,
    /// Percent of a step's tokens long prefills take at most while shorter prompts wait; 100
    /// turns the yielding off (`SchedulerConfig::long_prefill_share`).
    pub long_prefill_share: usize,
    /// Where the gRPC server listens (port 0: any free port).
    pub grpc_listen: SocketAddr,
    /// Where the KV receiver listens over TCP (decode-capable roles).
    pub kv_listen: SocketAddr,
    /// The host others reach this worker at; empty: the listen address's IP.
    pub advertise_host: String,
    /// The address prefill workers send KV to over TCP, when it is not the KV listen
    /// address (a proxy, NAT or port forwarding in between); `None`: the listen address.
    pub kv_advertise: Option<SocketAddr>,
    /// Offer same-host KV transfer through shared memory.
    pub shm: bool,
    /// Mutual TLS on the gRPC server and the KV plane's TCP connections; `None`: plaintext.
    pub tls: Option<TlsFiles>,
    /// Where a second, plaintext gRPC server answers `grpc.health.v1` alone (for probes
    /// that cannot speak TLS, such as Kubernetes' gRPC probe); `None`: no such server.
    pub health_listen: Option<SocketAddr>,
    /// The cluster's token: the `Worker` service refuses calls without it, and the KV
    /// plane's Hellos are signed and checked with a key derived from it. `None`: open
    /// (tests, and embeddings whose ports nobody else reaches).
    pub cluster_token: Option<ClusterToken>,
    /// Longest lease a reservation (or a prefill's transfer) gets, whatever it asks.
    pub max_kv_lease: Duration,
}

impl WorkerConfig {
    /// Defaults for a worker of `role` serving `model_path` on loopback.
    pub fn new(id: impl Into<String>, role: Role, model_path: impl Into<PathBuf>) -> WorkerConfig {
        let model_path = model_path.into();
        WorkerConfig {
            id: id.into(),
            role,
            model_name: model_name_of(&model_path),
            model_path,
            threads: 1,
            kv_blocks: None,
            block_size: 16,
            max_batched_tokens: 512,
            max_seqs: 64,
            max_waiting: 1024,
            prefix_caching: true,
            scheduling_policy: Policy::Fcfs,
            long_prefill_threshold: SchedulerConfig::default().long_prefill_threshold,
            long_prefill_share: SchedulerConfig::default().long_prefill_share,
            grpc_listen: "127.0.0.1:0".parse().expect("literal"),
            kv_listen: "127.0.0.1:0".parse().expect("literal"),
            advertise_host: String::new(),
            kv_advertise: None,
            shm: true,
            tls: None,
            health_listen: None,
            cluster_token: None,
            max_kv_lease: crate::service::MAX_LEASE,
        }
    }
}

/// The served name of a model file: its file name without `.gguf`.
pub fn model_name_of(path: &std::path::Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    name.strip_suffix(".gguf").unwrap_or(&name).to_string()
}

/// A started worker.
pub struct RunningWorker {
    pub descriptor: WorkerDescriptor,
    pub grpc_addr: SocketAddr,
    /// Where the plaintext health-only server listens, if it runs.
    pub health_addr: Option<SocketAddr>,
    pub state: Arc<WorkerState>,
    health: HealthReporter,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    health_server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    stop_server: CancellationToken,
    registration: Option<RegistrationTask>,
    /// The shared segment and the Unix socket: removed when the worker stops.
    segment: Option<Arc<ShmKv>>,
    socket: Option<PathBuf>,
    /// Publishes the engine's load as metrics.
    gauges: JoinHandle<()>,
    /// Keeps the view of the cluster's decode workers (prefill-capable workers).
    peers_task: Option<JoinHandle<()>>,
}

/// Registers (retrying while discovery is unreachable) and holds the registration.
struct RegistrationTask {
    stop: CancellationToken,
    task: JoinHandle<Option<Registration>>,
}

impl RunningWorker {
    /// Loads the model and starts serving; registers in `discovery` under `cluster` when given.
    pub async fn start(
        cfg: WorkerConfig,
        discovery: Option<(Arc<dyn Discovery>, ClusterName, Duration)>,
    ) -> Result<RunningWorker, String> {
        let id = WorkerId::new(cfg.id.clone()).map_err(|e| e.to_string())?;
        if !cfg.model_path.exists() {
            return Err(format!(
                "model file {} does not exist (scripts/fetch-model.sh fetches the default model)",
                cfg.model_path.display()
            ));
        }
        // Checked before the model loads: a bad file fails the start at once.
        let tls = match &cfg.tls {
            Some(files) => {
                let tls = MutualTls::load(files).map_err(|e| e.to_string())?;
                tls.check_server_name().map_err(|e| e.to_string())?;
                Some(tls)
            }
            None => None,
        };
        let c2 = cfg.clone();
        let loaded = tokio::task::spawn_blocking(move || load(&c2)).await.map_err(|e| e.to_string())??;
        let Loaded { engine, tokenizer, layout, shm, context_length } = loaded;
        let fingerprint = layout.fingerprint;
        let handle = EngineHandle::spawn(engine, &format!("engine-{}", cfg.id)).map_err(|e| e.to_string())?;
        let auth = cfg.cluster_token.as_ref().map(|t| KvAuth::from_secret(t.secret()));
        let tcp_cfg = TcpConfig { tls: tls.clone(), auth, ..TcpConfig::default() };

        let segment = shm.clone();
        let (receiver, kv) = match shm {
            Some(shm) => {
                let rx = KvReceiver::bind(cfg.kv_listen, shm.clone(), tcp_cfg.clone())
                    .await
                    .map_err(|e| format!("binding the KV receiver on {}: {e}", cfg.kv_listen))?;
                let local = if cfg.shm {
                    // Next to the segment: a sender derives the segment from this registered path.
                    let uds = rx
                        .listen_shm(tcp_cfg.clone())
                        .map_err(|e| format!("listening on {}: {e}", shm.socket_path().display()))?;
                    Some(LocalKvEndpoint { uds, host_id: host_id() })
                } else {
                    None
                };
                let tcp = match cfg.kv_advertise {
                    Some(addr) => addr,
                    None => advertised(rx.local_addr(), &cfg.advertise_host)?,
                };
                (Some(rx), Some(KvEndpoints { tcp, local }))
            }
            None => (None, None),
        };
        let sender = cfg.role.can_prefill().then(|| Arc::new(KvSender::new(layout, tcp_cfg)));
        let kv_pb = kv.as_ref().map(|k| pb::KvEndpoints {
            tcp_address: k.tcp.to_string(),
            shm: k.local.as_ref().map(|l| pb::ShmEndpoint {
                socket_path: l.uds.to_string_lossy().into_owned(),
                host_id: l.host_id.clone(),
            }),
            nccl: false,
        });
        let mut state =
            WorkerState::new(cfg.id.clone(), cfg.role, handle, Arc::new(tokenizer), layout, receiver, kv_pb, sender);
        state.max_lease = cfg.max_kv_lease.max(Duration::from_millis(1));
        // A prefill worker sends KV only to decode workers discovery lists.
        let peers_task = match (&discovery, cfg.role.can_prefill()) {
            (Some((d, cluster, _)), true) => {
                let peers = Peers::default();
                state.peers = Some(peers.clone());
                Some(tokio::spawn(crate::peers::follow_peers(d.clone(), cluster.clone(), peers)))
            }
            _ => None,
        };
        let state = Arc::new(state);

        let listener = tokio::net::TcpListener::bind(cfg.grpc_listen)
            .await
            .map_err(|e| format!("binding the gRPC server on {}: {e}", cfg.grpc_listen))?;
        let grpc_addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (health, health_svc) = tandem_proto::health_service(&[SERVICE_NAME]).await;
        let stop_server = CancellationToken::new();
        let stop = stop_server.clone();
        let svc = WorkerService(state.clone());
        let (health_addr, health_server) = match cfg.health_listen {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("binding the health server on {addr}: {e}"))?;
                let local = l.local_addr().map_err(|e| e.to_string())?;
                let serve =
                    tandem_proto::incoming::server().add_service(health_svc.clone()).serve_with_incoming_shutdown(
                        tandem_proto::incoming::incoming(l, tandem_proto::incoming::HANDSHAKE_TIMEOUT),
                        stop_server.clone().cancelled_owned(),
                    );
                (Some(local), Some(tokio::spawn(serve)))
            }
            None => (None, None),
        };
        let mut builder = tandem_proto::incoming::server();
        if let Some(tls) = &tls {
            use tonic::transport::{Certificate, Identity, ServerTlsConfig};
            let server_tls = ServerTlsConfig::new()
                .identity(Identity::from_pem(tls.cert_pem(), tls.key_pem()))
                .client_ca_root(Certificate::from_pem(tls.ca_pem()))
                .timeout(Duration::from_secs(10));
            builder = builder.tls_config(server_tls).map_err(|e| format!("the gRPC server's TLS: {e}"))?;
        }
        let server = tokio::spawn(
            builder
                .add_service(health_svc)
                .add_service(tandem_proto::reflection_service(&[SERVICE_NAME]))
                .add_service(tandem_proto::reflection_service_v1alpha(&[SERVICE_NAME]))
                .add_service(WorkerServer::with_interceptor(svc, RequireToken::new(cfg.cluster_token.clone())))
                .serve_with_incoming_shutdown(
                    tandem_proto::incoming::incoming(listener, tandem_proto::incoming::HANDSHAKE_TIMEOUT),
                    stop.cancelled_owned(),
                ),
        );
        let descriptor = WorkerDescriptor {
            id,
            role: cfg.role,
            grpc_addr: advertised(grpc_addr, &cfg.advertise_host)?.to_string(),
            kv: kv.unwrap_or(KvEndpoints { tcp: advertised(grpc_addr, &cfg.advertise_host)?, local: None }),
            model: ModelInfo { name: cfg.model_name.clone(), fingerprint },
            block_size: cfg.block_size as u32,
            context_length: context_length as u32,
            lease: None,
        };
        let registration =
            discovery.map(|(d, cluster, ttl)| register_forever(d, cluster, descriptor.clone(), ttl, state.clone()));
        let socket = descriptor.kv.local.as_ref().map(|l| l.uds.clone());
        crate::metrics::describe();
        let gauges = tokio::spawn(publish_load(state.clone()));
        Ok(RunningWorker {
            descriptor,
            grpc_addr,
            health_addr,
            state,
            health,
            server,
            health_server,
            stop_server,
            registration,
            segment,
            socket,
            gauges,
            peers_task,
        })
    }

    /// Graceful exit: leaves discovery, refuses new work, waits (up to `deadline`) for
    /// in-flight requests, then stops the server and the engine. Returns whether every
    /// request finished in time.
    pub async fn drain(self, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        self.state.draining.store(true, Ordering::SeqCst);
        self.health.set_service_status(SERVICE_NAME, ServingStatus::NotServing).await;
        self.health.set_service_status("", ServingStatus::NotServing).await;
        if let Some(r) = self.registration {
            r.stop.cancel();
            if let Ok(Ok(Some(reg))) = tokio::time::timeout(Duration::from_secs(2), r.task).await {
                let _ = reg.deregister().await;
            }
        }
        let mut clean = true;
        loop {
            let idle = self.state.outstanding() == 0 && self.state.inflight.load(Ordering::SeqCst) == 0;
            if idle {
                break;
            }
            if Instant::now() >= end {
                clean = false;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop_server.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.server).await;
        if let Some(h) = self.health_server {
            let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
        }
        self.gauges.abort();
        if let Some(t) = &self.peers_task {
            t.abort();
        }
        if let Some(rx) = &self.state.receiver {
            rx.shutdown();
        }
        if let Some(tx) = &self.state.sender {
            tx.shutdown().await;
        }
        // The engine thread holds the segment until the process ends: remove the files now.
        if let Some(seg) = &self.segment {
            seg.unlink();
        }
        if let Some(sock) = &self.socket {
            let _ = std::fs::remove_file(sock);
        }
        clean
    }
}

/// How often a worker's load is published as metrics.
const LOAD_INTERVAL: Duration = Duration::from_millis(500);

async fn publish_load(state: Arc<WorkerState>) {
    loop {
        if let Ok(l) = state.engine.load().await {
            let fallbacks = state.sender.as_ref().map_or(0, |s| s.fallbacks());
            crate::metrics::set_load(&state.id, state.role.as_str(), &l, fallbacks);
        }
        // Like every failure series, it appears with the first refusal.
        if let Some(n) = state.receiver.as_ref().map(|rx| rx.refused_connections()).filter(|&n| n > 0) {
            crate::metrics::kv_connections_refused(&state.id, n);
        }
        tokio::time::sleep(LOAD_INTERVAL).await;
    }
}

fn advertised(addr: SocketAddr, host: &str) -> Result<SocketAddr, String> {
    if host.is_empty() {
        return Ok(addr);
    }
    let ip = host.parse().map_err(|_| format!("advertise host {host:?} is not an IP address"))?;
    Ok(SocketAddr::new(ip, addr.port()))
}

/// Keeps trying to register until it works (etcd may be down at start), then holds the
/// registration until stopped.
fn register_forever(
    d: Arc<dyn Discovery>,
    cluster: ClusterName,
    descriptor: WorkerDescriptor,
    ttl: Duration,
    state: Arc<WorkerState>,
) -> RegistrationTask {
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        let mut wait = Duration::from_millis(100);
        loop {
            let attempt = tokio::select! {
                r = d.register(&cluster, descriptor.clone(), ttl) => r,
                _ = s.cancelled() => return None,
            };
            match attempt {
                Ok(reg) => {
                    follow_lease(&reg, &state, &s).await;
                    return Some(reg);
                }
                Err(e) => {
                    let worker = &descriptor.id;
                    tracing::warn!(worker = %worker, error = %e, retry_in = ?wait, "registration failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = s.cancelled() => return None,
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    });
    RegistrationTask { stop, task }
}

/// Fences the worker while its registration has lost its lease (the store dropped its
/// record, so routers dropped it and another incarnation may take its id): new work is
/// refused until it holds a new lease. Returns when `stop` is cancelled.
async fn follow_lease(reg: &Registration, state: &WorkerState, stop: &CancellationToken) {
    let mut lease = reg.lease();
    let mut last = None;
    loop {
        let now = *lease.borrow_and_update();
        state.fenced.store(now == LeaseState::Lost, Ordering::SeqCst);
        if last.is_some() && last != Some(now) {
            match now {
                LeaseState::Lost => tracing::warn!(worker = %state.id, "lost its discovery lease; fenced"),
                LeaseState::Held(id) => {
                    tracing::info!(worker = %state.id, lease = id.get(), "registered again; serving")
                }
            }
        }
        last = Some(now);
        if let (LeaseState::Held(id), Some(tx)) = (now, &state.sender) {
            tx.set_lease(Some(id)).await;
        }
        tokio::select! {
            r = lease.changed() => {
                if r.is_err() {
                    // The registration's task ended: nothing changes any more.
                    return stop.cancelled().await;
                }
            }
            _ = stop.cancelled() => return,
        }
    }
}

struct Loaded {
    engine: LlmEngine,
    tokenizer: Tokenizer,
    layout: tandem_kvtransfer::KvLayout,
    /// The shared segment the decode side's cache lives in.
    shm: Option<Arc<ShmKv>>,
    context_length: usize,
}

fn load(cfg: &WorkerConfig) -> Result<Loaded, String> {
    if cfg.block_size == 0 || cfg.block_size > 1024 {
        return Err(format!("block size must be in 1..=1024, got {}", cfg.block_size));
    }
    let opts = ModelOptions { threads: cfg.threads.max(1), isa: None };
    let (text, model) =
        ModelText::open_with(&cfg.model_path, |file| Model::from_gguf(file, &opts)).map_err(|e| e.to_string())?;
    // One tokenizer for the process: the engine's copy and the service's share it.
    let tokenizer = text.tokenizer;
    let engine_tok = tokenizer.clone();
    let ctx = model.config.context_length;
    let kv_blocks = cfg.kv_blocks.unwrap_or_else(|| blocks_for_tokens(ctx, cfg.block_size));
    let lcfg = LlmEngineConfig {
        scheduler: SchedulerConfig {
            max_batched_tokens: cfg.max_batched_tokens,
            max_seqs: cfg.max_seqs,
            max_waiting: cfg.max_waiting,
            max_model_len: ctx,
            policy: cfg.scheduling_policy.clone(),
            long_prefill_threshold: cfg.long_prefill_threshold,
            long_prefill_share: cfg.long_prefill_share,
            ..SchedulerConfig::default()
        },
        block_size: cfg.block_size,
        kv_blocks,
        kv_dtype: KvDtype::F16,
        prefix_caching: cfg.prefix_caching,
    };
    let layout = tandem_prefill_worker::kv_layout(&model, cfg.block_size);
    let (engine, shm) = if cfg.role.can_decode() {
        // The cache lives in a shared segment: received KV lands where attention reads it.
        let shm = Arc::new(ShmKv::create(layout, kv_blocks).map_err(|e| format!("creating the KV segment: {e}"))?);
        let shape = model.kv_shape(cfg.block_size);
        let n_layers = model.config.n_layers;
        if shm.len() != KvCache::region_bytes(shape, n_layers, kv_blocks, KvDtype::F16) {
            return Err("the KV segment's size does not match the engine's cache".into());
        }
        // SAFETY: the segment is `len()` bytes, page-aligned, and `shm` (the owner) keeps it
        // mapped; the receiver writes only blocks reserved for requests waiting for KV.
        let kv = unsafe { KvCache::from_raw(shape, n_layers, kv_blocks, KvDtype::F16, shm.region_ptr(), shm.clone()) }
            .map_err(|e| e.to_string())?;
        (LlmEngine::with_cache(model, engine_tok, lcfg, kv).map_err(|e| e.to_string())?, Some(shm))
    } else {
        (LlmEngine::new(model, engine_tok, lcfg).map_err(|e| e.to_string())?, None)
    };
    Ok(Loaded { engine, tokenizer, layout, shm, context_length: ctx })
}
