//! One worker process (or one worker inside `tandem up`): the model, the engine
//! thread, the KV endpoints its role needs, the gRPC server with health and
//! reflection, and its registration in discovery. `drain` is the graceful exit.
//!
//! The roles are built by the caller's [`RoleBuilders`] from a [`RoleContext`] (the
//! shared state and the KV endpoints made here): this crate knows the role traits,
//! never the role crates.
//!
//! With a cluster token (`WorkerConfig::cluster_token`; the `tandem` commands always
//! give one) the `Worker` service refuses calls without it and the KV receiver refuses
//! Hellos not signed with it.
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

use tandem_cluster::{ClusterName, Discovery, KvEndpoints, LocalKvEndpoint, ModelInfo, WorkerDescriptor, WorkerId};
use tandem_engine::kv_cache::{blocks_for_tokens, KvCache, KvDtype};
use tandem_engine::llm_engine::{LlmEngine, LlmEngineConfig};
use tandem_engine::model::{Model, ModelOptions};
use tandem_engine::scheduler::SchedulerConfig;
use tandem_kvtransfer::{host_id, KvAuth, KvReceiver, KvSender, ShmKv, TcpConfig};
use tandem_proto::auth::RequireToken;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_proto::tandem::worker::v1::worker_server::{WorkerServer, SERVICE_NAME};
use tandem_proto::tls::MutualTls;
use tandem_proto::{HealthReporter, ServingStatus};
use tandem_text::tokenizer::Tokenizer;
use tandem_text::ModelText;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::actor::EngineHandle;
use crate::config::WorkerConfig;
use crate::error::StartError;
use crate::registration::Registering;
use crate::role_switch::RoleSwitch;
use crate::service::{DecodeRole, PrefillRole, Roles, WorkerService};
use crate::state::{WorkerParts, WorkerState};

/// What a role is built from.
pub struct RoleContext {
    pub state: Arc<WorkerState>,
    /// Decode-capable workers: where KV arrives.
    pub receiver: Option<Arc<KvReceiver>>,
    /// Decode-capable workers: the KV endpoints a `Reserve` answers with.
    pub kv_endpoints: Option<pb::KvEndpoints>,
    /// Where KV leaves: a prefill's, or a live migration's (every worker has one).
    pub sender: Option<Arc<KvSender>>,
    /// Decode-capable workers: the shared segment the engine's cache lives in (a live
    /// migration reads a request's blocks from it).
    pub segment: Option<Arc<ShmKv>>,
    /// The cluster's decode workers as this worker's discovery watch lists them (workers
    /// with discovery): the only destinations KV leaves for. `None`: no check.
    pub peers: Option<crate::peers::Peers>,
    /// The discovery the worker registers in, and its cluster (a prefill role sends KV
    /// only to the decode workers listed there).
    pub discovery: Option<(Arc<dyn Discovery>, ClusterName)>,
}

/// Builds a worker's prefill role (`PrefillWorker::build` in `tandem-prefill-worker`).
pub type BuildPrefill = fn(&RoleContext) -> Arc<dyn PrefillRole>;
/// Builds a worker's decode role (`DecodeWorker::build` in `tandem-decode-worker`).
pub type BuildDecode = fn(&RoleContext) -> Arc<dyn DecodeRole>;

/// How to build the roles a worker's `Role` names; wired by a caller that sees the
/// role crates (the `tandem` binary, tests).
#[derive(Clone, Copy, Default)]
pub struct RoleBuilders {
    pub prefill: Option<BuildPrefill>,
    pub decode: Option<BuildDecode>,
}

impl RoleBuilders {
    /// The roles `cfg` builds: its role's, or every one for an elastic worker.
    fn build(&self, ctx: &RoleContext, cfg: &WorkerConfig) -> Result<Roles, StartError> {
        let s = &ctx.state;
        let missing = |missing| StartError::MissingRole { id: s.id.clone(), role: cfg.role, missing };
        let prefill = match (cfg.builds_prefill(), self.prefill) {
            (false, _) => None,
            (true, Some(build)) => Some(build(ctx)),
            (true, None) => return Err(missing("prefill")),
        };
        let decode = match (cfg.builds_decode(), self.decode) {
            (false, _) => None,
            (true, Some(build)) => Some(build(ctx)),
            (true, None) => return Err(missing("decode")),
        };
        Ok(Roles { prefill, decode })
    }
}

/// A started worker.
pub struct RunningWorker {
    pub descriptor: WorkerDescriptor,
    pub grpc_addr: SocketAddr,
    /// Where the plaintext health-only server listens, if it runs.
    pub health_addr: Option<SocketAddr>,
    pub service: WorkerService,
    health: HealthReporter,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    health_server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    stop_server: CancellationToken,
    receiver: Option<Arc<KvReceiver>>,
    sender: Option<Arc<KvSender>>,
    /// The shared segment and the Unix socket: removed when the worker stops.
    segment: Option<Arc<ShmKv>>,
    socket: Option<PathBuf>,
    /// Publishes the engine's load as metrics.
    gauges: JoinHandle<()>,
    /// Keeps the roles' view of the cluster's decode workers in step with discovery.
    follow: Option<JoinHandle<()>>,
    /// See `WorkerConfig::migrate_on_drain`.
    migrate_on_drain: bool,
}

/// The KV plane of a worker: what receives (decode-capable roles) and what sends
/// (prefill-capable roles).
struct KvPlane {
    receiver: Option<Arc<KvReceiver>>,
    endpoints: Option<KvEndpoints>,
    sender: Option<Arc<KvSender>>,
}

impl RunningWorker {
    /// Loads the model and starts serving with the roles `roles` builds; registers in
    /// `discovery` under `cluster` when given.
    pub async fn start(
        cfg: WorkerConfig,
        discovery: Option<(Arc<dyn Discovery>, ClusterName, Duration)>,
        roles: RoleBuilders,
    ) -> Result<RunningWorker, StartError> {
        let id = WorkerId::new(cfg.id.clone()).map_err(|e| StartError::Config(e.to_string()))?;
        if !cfg.model_path.exists() {
            return Err(StartError::ModelMissing(cfg.model_path.clone()));
        }
        // Checked before the model loads: a bad file fails the start at once.
        let tls = match &cfg.tls {
            Some(files) => {
                let tls = MutualTls::load(files).map_err(|e| StartError::Tls(e.to_string()))?;
                tls.check_server_name().map_err(|e| StartError::Tls(e.to_string()))?;
                Some(tls)
            }
            None => None,
        };
        let c2 = cfg.clone();
        let loaded =
            tokio::task::spawn_blocking(move || load(&c2)).await.map_err(|e| StartError::Load(e.to_string()))??;
        let Loaded { engine, tokenizer, layout, shm, context_length } = loaded;
        let fingerprint = layout.fingerprint;
        let handle =
            EngineHandle::spawn(engine, &format!("engine-{}", cfg.id)).map_err(|e| StartError::Load(e.to_string()))?;
        let auth = cfg.cluster_token.as_ref().map(|t| KvAuth::from_secret(t.secret()));
        let tcp_cfg = TcpConfig { tls: tls.clone(), auth, ..TcpConfig::default() };
        let segment = shm.clone();
        let kv = kv_plane(&cfg, shm, layout, tcp_cfg).await?;
        let state = Arc::new(WorkerState::new(WorkerParts {
            id: cfg.id.clone(),
            role: cfg.role,
            engine: handle,
            tokenizer: Arc::new(tokenizer),
            layout,
            max_lease: cfg.max_kv_lease.max(Duration::from_millis(1)),
            elastic: cfg.elastic,
        }));
        let (peers, follow) = match &discovery {
            Some((d, cluster, _)) => {
                let peers = crate::peers::Peers::default();
                let task = tokio::spawn(crate::peers::follow_peers(d.clone(), cluster.clone(), peers.clone()));
                (Some(peers), Some(task))
            }
            None => (None, None),
        };
        let ctx = RoleContext {
            state: state.clone(),
            receiver: kv.receiver.clone(),
            kv_endpoints: kv.endpoints.as_ref().map(endpoints_to_pb),
            sender: kv.sender.clone(),
            segment: segment.clone(),
            peers,
            discovery: discovery.as_ref().map(|(d, cluster, _)| (d.clone(), cluster.clone())),
        };
        let roles = roles.build(&ctx, &cfg)?;
        let switch = Arc::new(RoleSwitch::new());
        let service = WorkerService { state: state.clone(), roles, sender: kv.sender.clone(), switch };

        let listener = tokio::net::TcpListener::bind(cfg.grpc_listen)
            .await
            .map_err(|e| StartError::Listen(format!("binding the gRPC server on {}: {e}", cfg.grpc_listen)))?;
        let grpc_addr = listener.local_addr().map_err(|e| StartError::Listen(e.to_string()))?;
        let (health, health_svc) = tandem_proto::health_service(&[SERVICE_NAME]).await;
        let stop_server = CancellationToken::new();
        let (health_addr, health_server) = match cfg.health_listen {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| StartError::Listen(format!("binding the health server on {addr}: {e}")))?;
                let local = l.local_addr().map_err(|e| StartError::Listen(e.to_string()))?;
                let serve =
                    tandem_proto::incoming::server().add_service(health_svc.clone()).serve_with_incoming_shutdown(
                        tandem_proto::incoming::incoming(l, tandem_proto::incoming::HANDSHAKE_TIMEOUT),
                        stop_server.clone().cancelled_owned(),
                    );
                (Some(local), Some(tokio::spawn(serve)))
            }
            None => (None, None),
        };
        let server = tokio::spawn(
            grpc_server(tls.as_ref())?
                .add_service(health_svc)
                .add_service(tandem_proto::reflection_service(&[SERVICE_NAME]))
                .add_service(tandem_proto::reflection_service_v1alpha(&[SERVICE_NAME]))
                .add_service(WorkerServer::with_interceptor(
                    service.clone(),
                    RequireToken::new(cfg.cluster_token.clone()),
                ))
                .serve_with_incoming_shutdown(
                    tandem_proto::incoming::incoming(listener, tandem_proto::incoming::HANDSHAKE_TIMEOUT),
                    stop_server.clone().cancelled_owned(),
                ),
        );
        let advertised_grpc = advertised(grpc_addr, &cfg.advertise_host)?;
        let descriptor = WorkerDescriptor {
            id,
            role: cfg.role,
            grpc_addr: advertised_grpc.to_string(),
            kv: kv.endpoints.unwrap_or(KvEndpoints { tcp: advertised_grpc, local: None }),
            model: ModelInfo { name: cfg.model_name.clone(), fingerprint },
            block_size: cfg.block_size as u32,
            // A worker without a prefix cache names no blocks: routers place it by load only.
            hash_scheme: cfg.prefix_caching.then(|| tandem_text::prefix::SCHEME.to_string()),
            context_length: context_length as u32,
            lease: None,
        };
        if let Some((discovery, cluster, ttl)) = discovery {
            let r = Registering { discovery, cluster, descriptor: descriptor.clone(), ttl };
            service.switch.register(r, state.clone(), kv.sender.clone());
        }
        let socket = descriptor.kv.local.as_ref().map(|l| l.uds.clone());
        crate::metrics::describe();
        let gauges = tokio::spawn(publish_load(state, kv.receiver.clone(), kv.sender.clone()));
        Ok(RunningWorker {
            descriptor,
            grpc_addr,
            health_addr,
            service,
            health,
            server,
            health_server,
            stop_server,
            receiver: kv.receiver,
            sender: kv.sender,
            segment,
            socket,
            gauges,
            follow,
            migrate_on_drain: cfg.migrate_on_drain,
        })
    }

    /// The state the roles and the shell share.
    pub fn state(&self) -> &Arc<WorkerState> {
        &self.service.state
    }

    /// Where a prefill-capable worker's KV leaves.
    pub fn sender(&self) -> Option<&Arc<KvSender>> {
        self.sender.as_ref()
    }

    /// Graceful exit: refuses new work, moves its decodes elsewhere (`migrate_on_drain`),
    /// leaves discovery, waits (up to `deadline`) for in-flight requests, then stops the
    /// server, the roles' tasks and the KV plane.
    /// Returns whether every request finished in time.
    pub async fn drain(self, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        let state = self.service.state.clone();
        state.draining.store(true, Ordering::SeqCst);
        self.health.set_service_status(SERVICE_NAME, ServingStatus::NotServing).await;
        self.health.set_service_status("", ServingStatus::NotServing).await;
        if self.migrate_on_drain {
            // Still registered, so routers keep relaying its decodes while they move:
            // each is asked to move (again as more start decoding) until none is left
            // here, or half the deadline has passed; the rest finish here.
            let moving_until = Instant::now() + deadline / 2;
            while Instant::now() < moving_until && self.service.decoding() > 0 {
                self.service.ask_moves(true).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if let Some(r) = self.service.switch.take_registration().await {
            r.stop.cancel();
            if let Ok(Ok(Some(reg))) = tokio::time::timeout(Duration::from_secs(2), r.task).await {
                let _ = reg.deregister().await;
            }
        }
        let mut clean = true;
        loop {
            let idle = self.service.outstanding() == 0 && state.inflight.load(Ordering::SeqCst) == 0;
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
        if let Some(f) = &self.follow {
            f.abort();
        }
        if let Some(p) = &self.service.roles.prefill {
            p.shutdown().await;
        }
        if let Some(d) = &self.service.roles.decode {
            d.shutdown().await;
        }
        if let Some(rx) = &self.receiver {
            rx.shutdown();
        }
        if let Some(tx) = &self.sender {
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

/// The gRPC server's builder, requiring client certificates from the cluster's CA when
/// `tls` is given.
fn grpc_server(tls: Option<&MutualTls>) -> Result<tonic::transport::Server, StartError> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let builder = tandem_proto::incoming::server();
    let Some(tls) = tls else { return Ok(builder) };
    let server_tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(tls.cert_pem(), tls.key_pem()))
        .client_ca_root(Certificate::from_pem(tls.ca_pem()))
        .timeout(Duration::from_secs(10));
    builder.tls_config(server_tls).map_err(|e| StartError::Tls(format!("the gRPC server's TLS: {e}")))
}

/// Binds the KV receiver (and its Unix socket) of a decode-capable worker whose cache
/// lives in `shm`, and makes the sender of a prefill-capable one.
async fn kv_plane(
    cfg: &WorkerConfig,
    shm: Option<Arc<ShmKv>>,
    layout: tandem_kvtransfer::KvLayout,
    tcp_cfg: TcpConfig,
) -> Result<KvPlane, StartError> {
    let (receiver, endpoints) = match shm {
        Some(shm) => {
            let rx = KvReceiver::bind(cfg.kv_listen, shm.clone(), tcp_cfg.clone())
                .await
                .map_err(|e| StartError::Listen(format!("binding the KV receiver on {}: {e}", cfg.kv_listen)))?;
            let local = if cfg.shm {
                // Next to the segment: a sender derives the segment from this registered path.
                let uds = rx
                    .listen_shm(tcp_cfg.clone())
                    .map_err(|e| StartError::Listen(format!("listening on {}: {e}", shm.socket_path().display())))?;
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
    // A prefill's KV leaves through it, and a decode's when it moves (live migration).
    let sender = Some(Arc::new(KvSender::new(layout, tcp_cfg)));
    Ok(KvPlane { receiver, endpoints, sender })
}

fn endpoints_to_pb(k: &KvEndpoints) -> pb::KvEndpoints {
    pb::KvEndpoints {
        tcp_address: k.tcp.to_string(),
        shm: k
            .local
            .as_ref()
            .map(|l| pb::ShmEndpoint { socket_path: l.uds.to_string_lossy().into_owned(), host_id: l.host_id.clone() }),
        nccl: false,
    }
}

/// How often a worker's load is published as metrics.
const LOAD_INTERVAL: Duration = Duration::from_millis(500);

async fn publish_load(state: Arc<WorkerState>, receiver: Option<Arc<KvReceiver>>, sender: Option<Arc<KvSender>>) {
    loop {
        if let Ok(l) = state.engine.load().await {
            let fallbacks = sender.as_ref().map_or(0, |s| s.fallbacks());
            crate::metrics::set_load(&state.id, state.role().as_str(), &l, fallbacks);
        }
        // Like every failure series, it appears with the first refusal.
        if let Some(n) = receiver.as_ref().map(|rx| rx.refused_connections()).filter(|&n| n > 0) {
            crate::metrics::kv_connections_refused(&state.id, n);
        }
        tokio::time::sleep(LOAD_INTERVAL).await;
    }
}

fn advertised(addr: SocketAddr, host: &str) -> Result<SocketAddr, StartError> {
    if host.is_empty() {
        return Ok(addr);
    }
    let ip = host.parse().map_err(|_| StartError::Config(format!("advertise host {host:?} is not an IP address")))?;
    Ok(SocketAddr::new(ip, addr.port()))
}

struct Loaded {
    engine: LlmEngine,
    tokenizer: Tokenizer,
    layout: tandem_kvtransfer::KvLayout,
    /// The shared segment the decode side's cache lives in.
    shm: Option<Arc<ShmKv>>,
    context_length: usize,
}

fn load(cfg: &WorkerConfig) -> Result<Loaded, StartError> {
    if cfg.block_size == 0 || cfg.block_size > 1024 {
        return Err(StartError::Config(format!("block size must be in 1..=1024, got {}", cfg.block_size)));
    }
    let failed = |e: &dyn std::fmt::Display| StartError::Load(e.to_string());
    let opts = ModelOptions { threads: cfg.threads.max(1), isa: None };
    let (text, model) =
        ModelText::open_with(&cfg.model_path, |file| Model::from_gguf(file, &opts)).map_err(|e| failed(&e))?;
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
            fair: cfg.fair.clone(),
            sjf: cfg.sjf,
            ..SchedulerConfig::default()
        },
        block_size: cfg.block_size,
        kv_blocks,
        kv_dtype: KvDtype::F16,
        prefix_caching: cfg.prefix_caching,
    };
    let layout = crate::convert::kv_layout(&model, cfg.block_size);
    let (engine, shm) = if cfg.builds_decode() {
        // The cache lives in a shared segment: received KV lands where attention reads it.
        let shm = Arc::new(
            ShmKv::create(layout, kv_blocks).map_err(|e| StartError::Load(format!("creating the KV segment: {e}")))?,
        );
        let shape = model.kv_shape(cfg.block_size);
        let n_layers = model.config.n_layers;
        if shm.len() != KvCache::region_bytes(shape, n_layers, kv_blocks, KvDtype::F16) {
            return Err(StartError::Load("the KV segment's size does not match the engine's cache".into()));
        }
        // SAFETY: the segment is `len()` bytes, page-aligned, and `shm` (the owner) keeps it
        // mapped; the receiver writes only blocks reserved for requests waiting for KV.
        let kv = unsafe { KvCache::from_raw(shape, n_layers, kv_blocks, KvDtype::F16, shm.region_ptr(), shm.clone()) }
            .map_err(|e| failed(&e))?;
        (LlmEngine::with_cache(model, engine_tok, lcfg, kv).map_err(|e| failed(&e))?, Some(shm))
    } else {
        (LlmEngine::new(model, engine_tok, lcfg).map_err(|e| failed(&e))?, None)
    };
    Ok(Loaded { engine, tokenizer, layout, shm, context_length: ctx })
}
