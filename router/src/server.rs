//! A running router: each served model's tokenizer and limits, membership followed from
//! discovery, and the public gRPC server with health and reflection. What can stop it
//! from starting is a [`StartError`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_cluster::{ClusterName, Discovery, DiscoveryEvent};
use tandem_proto::auth::ClusterToken;
use tandem_proto::tandem::v1::generate_server::{GenerateServer, SERVICE_NAME};
use tandem_proto::tls::{MutualTls, TlsFiles};
use tandem_proto::{HealthReporter, ServingStatus};
use tandem_text::ModelText;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::admission::Admission;
use crate::members::Members;
use crate::models::{check_specs, ModelSpec, ModelsError, ServedModels};
use crate::policy::policy_by_name;
use crate::quota::{LimitError, Quotas, TenantLimits};
use crate::recovery::KvFailurePolicy;
use crate::routing::Routing;
use crate::service::{check_api_key, GenerateService};
use crate::state::RouterState;
use crate::validate::ModelFacts;

/// Why a router did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("unknown routing policy {0:?} (cache-aware, least-loaded, round-robin)")]
    UnknownPolicy(String),
    #[error("--metrics-require-key needs at least one API key (--api-key or TANDEM_API_KEYS)")]
    MetricsKeyMissing,
    #[error("--stream-stall-timeout must be positive")]
    NoStallTimeout,
    #[error(transparent)]
    TenantLimits(#[from] LimitError),
    /// The TLS files of the channels to the workers.
    #[error("{0}")]
    Tls(#[from] tandem_proto::tls::TlsError),
    #[error("model file {} does not exist (scripts/fetch-model.sh fetches the default model)", .0.display())]
    NoModel(PathBuf),
    /// The list of models: none, or a name twice.
    #[error(transparent)]
    Models(#[from] ModelsError),
    /// A model file's tokenizer, chat template or configuration.
    #[error("model file {}: {source}", .path.display())]
    Model { path: PathBuf, source: Box<dyn std::error::Error + Send + Sync> },
    /// The task loading the models' facts did not finish.
    #[error("{0}")]
    Loading(#[from] tokio::task::JoinError),
    #[error("binding the {what} server on {addr}: {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    LocalAddr(std::io::Error),
}

#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// The models served, the default (for requests that name none) first: the router reads
    /// each file's tokenizer, chat template and context length, and routes a request only to
    /// workers announcing its model's name.
    pub models: Vec<ModelSpec>,
    pub grpc_listen: SocketAddr,
    /// `cache-aware`, `least-loaded` or `round-robin`.
    pub policy: String,
    /// `cache-aware`: how much a prompt token to compute weighs against a token of queued
    /// prefill work (`policy::CacheAware`).
    pub cache_weight: f64,
    /// How this router names prompt blocks (the workers' block size) and how long routed
    /// blocks count as pending on the chosen workers.
    pub hashing: crate::members::Hashing,
    /// Requests in flight at most.
    pub max_inflight: usize,
    /// Where the OpenAI-compatible HTTP API listens; `None`: no HTTP.
    pub http_listen: Option<SocketAddr>,
    /// What the HTTP API bounds: header size and read time, body read time, request deadline.
    pub http_limits: crate::http::HttpLimits,
    /// Accepted API keys (HTTP `Authorization: Bearer`, gRPC `authorization`); empty: open.
    pub api_keys: Vec<String>,
    /// Who may read `/metrics` on the HTTP port; `ApiKey` needs `api_keys`.
    pub metrics_access: crate::http::MetricsAccess,
    /// Times a choice may move to other workers when one fails under it (0: fail instead).
    pub migration_limit: usize,
    /// A worker's ask to move a request is carried out by moving its KV (live migration);
    /// off: a leaving worker's requests are recomputed elsewhere, the others stay.
    pub live_migration: bool,
    /// Mutual TLS on the channels to the workers (the public API stays plaintext); `None`: plaintext.
    pub tls: Option<TlsFiles>,
    /// The cluster token every call to a worker carries (workers refuse calls without
    /// theirs); `None`: none, for workers started without one.
    pub cluster_token: Option<ClusterToken>,
    /// What a request whose KV transfer fails gets, unless it chooses.
    pub kv_failure_policy: KvFailurePolicy,
    /// How long a decode worker holds a prompt's blocks for KV that does not come (the
    /// prefill side abandons the transfer then too).
    pub kv_lease: Duration,
    /// How long a request waits for KV room when every decode worker's pool is full
    /// (zero: refused at once).
    pub kv_wait: Duration,
    /// How long a request may go without its first token before it is refused as
    /// overloaded (`state::FIRST_TOKEN_TIMEOUT` by default).
    pub first_token_timeout: Duration,
    /// Requests one tenant may hold in flight unless `tenant_limits` names it; `None`: half
    /// of `max_inflight` (rounded up) when the API keys name two tenants or more, else no
    /// per-tenant bound (see `quota::TenantLimits::resolve`).
    pub tenant_max_inflight: Option<usize>,
    /// Per-tenant limits in place of the default: (tenant, requests in flight at most).
    pub tenant_limits: Vec<(String, usize)>,
    /// How long a stream may wait for its client to take the next chunk before the request
    /// is cancelled (must be positive).
    pub stream_stall_timeout: Duration,
    /// Per-request disaggregation: its mode, fixed threshold and SLOs (`placement`).
    pub placement: crate::placement::PlacementConfig,
    /// Runs the planner (`planner`) when set.
    pub planner: Option<crate::planner::PlannerConfig>,
    /// The order requests wait for KV room in (`fairness`): the workers' policy's name.
    pub queue_policy: crate::fairness::Policy,
    /// Which requests are refused when predicted to miss their TTFT objective (`slo`).
    pub slo_admission: crate::slo::SloAdmission,
    /// Predicts each request's output length for `sjf` workers (`predict`); `None`: none.
    pub length_predictor: Option<crate::predict::LengthPredictor>,
}

pub struct RunningRouter {
    pub grpc_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    http: Option<JoinHandle<std::io::Result<()>>>,
    pub state: Arc<RouterState>,
    health: HealthReporter,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    stop_server: CancellationToken,
    membership: JoinHandle<()>,
    /// The planner's task and its stop, when it runs.
    planner: Option<(JoinHandle<()>, CancellationToken)>,
}

impl RunningRouter {
    pub async fn start(
        cfg: RouterConfig,
        discovery: Arc<dyn Discovery>,
        cluster: ClusterName,
    ) -> Result<RunningRouter, StartError> {
        let policy = policy_by_name(&cfg.policy, cfg.cache_weight)
            .ok_or_else(|| StartError::UnknownPolicy(cfg.policy.clone()))?;
        if cfg.metrics_access == crate::http::MetricsAccess::ApiKey && cfg.api_keys.is_empty() {
            return Err(StartError::MetricsKeyMissing);
        }
        if cfg.stream_stall_timeout.is_zero() {
            return Err(StartError::NoStallTimeout);
        }
        let tenants = crate::keys::tenants(&cfg.api_keys);
        let limits = TenantLimits::resolve(cfg.tenant_max_inflight, &cfg.tenant_limits, &tenants, cfg.max_inflight)?;
        let tls = cfg.tls.as_ref().map(worker_tls).transpose()?;
        check_specs(&cfg.models)?;
        let specs = cfg.models.clone();
        let models = tokio::task::spawn_blocking(move || {
            specs.iter().map(|m| load_facts(&m.name, &m.path)).collect::<Result<Vec<_>, _>>()
        })
        .await??;
        let models = ServedModels::new(models);
        crate::metrics::describe();
        let members = Members::new(tls, cfg.cluster_token.clone(), cfg.hashing.clone());
        let membership = tokio::spawn(follow_membership(discovery, cluster, members.clone()));
        let mut routing = Routing::new(members, policy);
        routing.migration_limit = cfg.migration_limit;
        routing.live_migration = cfg.live_migration;
        routing.kv_failure_policy = cfg.kv_failure_policy;
        routing.kv_lease = cfg.kv_lease;
        routing.kv_wait = cfg.kv_wait;
        routing.placement = Arc::new(crate::placement::PlacementControl::new(cfg.placement));
        routing.queue_policy = cfg.queue_policy;
        routing.slo_admission = cfg.slo_admission;
        routing.predictor = cfg.length_predictor.map(Arc::new);
        let stop_planner = CancellationToken::new();
        let planner = cfg.planner.map(|mut p| {
            p.long_prompt = cfg.placement.threshold;
            tracing::info!(interval = ?p.interval, dwell = ?p.dwell, "planner on: it changes elastic workers' roles as the load moves");
            let run = crate::planner::run(routing.members.clone(), routing.placement.clone(), p, stop_planner.clone());
            tokio::spawn(run)
        });
        tracing::info!(
            tenants = tenants.len(),
            default = ?limits.default,
            overrides = limits.overrides.len(),
            stream_stall_secs = cfg.stream_stall_timeout.as_secs_f64(),
            "per-tenant limits on requests in flight"
        );
        let admission = Admission::new(cfg.max_inflight, Quotas::new(limits));
        let mut state = RouterState::new(models, routing, admission);
        // Every router of the cluster derives the same tenant salts from the cluster's secret.
        if let Some(token) = &cfg.cluster_token {
            state.salt_key = crate::salt::SaltKey::derive(token.secret());
        }
        state.api_keys = cfg.api_keys.clone();
        state.first_token_timeout = cfg.first_token_timeout;
        state.stream_stall = cfg.stream_stall_timeout;
        let state = Arc::new(state);

        let listener = tokio::net::TcpListener::bind(cfg.grpc_listen).await.map_err(|source| StartError::Bind {
            what: "gRPC",
            addr: cfg.grpc_listen,
            source,
        })?;
        let grpc_addr = listener.local_addr().map_err(StartError::LocalAddr)?;
        let (health, health_svc) = tandem_proto::health_service(&[SERVICE_NAME]).await;
        let stop_server = CancellationToken::new();
        let stop = stop_server.clone();
        let keys = cfg.api_keys.clone();
        // Health and reflection stay open (probes, discovery); the API needs a key if any is set.
        let generate = tonic::service::interceptor::InterceptedService::new(
            GenerateServer::new(GenerateService(state.clone())),
            move |mut req: tonic::Request<()>| check_api_key(&keys, &mut req).map(|_| req),
        );
        let server = tokio::spawn(
            tandem_proto::incoming::server()
                .add_service(health_svc)
                .add_service(tandem_proto::reflection_service(&[SERVICE_NAME]))
                .add_service(tandem_proto::reflection_service_v1alpha(&[SERVICE_NAME]))
                .add_service(generate)
                .serve_with_incoming_shutdown(
                    tandem_proto::incoming::incoming(listener, tandem_proto::incoming::HANDSHAKE_TIMEOUT),
                    stop.cancelled_owned(),
                ),
        );
        let (http_addr, http) = match cfg.http_listen {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr).await.map_err(|source| StartError::Bind {
                    what: "HTTP",
                    addr,
                    source,
                })?;
                let local = l.local_addr().map_err(StartError::LocalAddr)?;
                let app = crate::http::routes(state.clone(), cfg.http_limits, cfg.metrics_access);
                let task = tokio::spawn(crate::http::serve(l, app, cfg.http_limits, stop_server.clone()));
                (Some(local), Some(task))
            }
            None => (None, None),
        };
        Ok(RunningRouter {
            grpc_addr,
            http_addr,
            http,
            state,
            health,
            server,
            stop_server,
            membership,
            planner: planner.map(|task| (task, stop_planner)),
        })
    }

    /// Waits (up to `within`) until the router knows at least `n` workers; returns whether it does.
    pub async fn wait_for_workers(&self, n: usize, within: Duration) -> bool {
        let end = Instant::now() + within;
        while self.state.routing.members.snapshot().len() < n {
            if Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Refuses new requests (UNAVAILABLE), lets those in flight finish (up to `deadline`),
    /// then stops. Returns whether all finished in time.
    pub async fn drain(self, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        self.state.admission.draining.store(true, Ordering::SeqCst);
        self.health.set_service_status(SERVICE_NAME, ServingStatus::NotServing).await;
        self.health.set_service_status("", ServingStatus::NotServing).await;
        let mut clean = true;
        while self.state.admission.inflight.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= end {
                clean = false;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop_server.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.server).await;
        if let Some(http) = self.http {
            let _ = tokio::time::timeout(Duration::from_secs(2), http).await;
        }
        if let Some((task, stop)) = self.planner {
            stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        self.membership.abort();
        clean
    }
}

/// The channels' TLS: this router's certificate, the CA that workers' certificates must
/// chain to, and the name they must carry. The files are checked here, at start.
pub fn worker_tls(files: &TlsFiles) -> Result<ClientTlsConfig, StartError> {
    let tls = MutualTls::load(files)?;
    Ok(ClientTlsConfig::new()
        .identity(Identity::from_pem(tls.cert_pem(), tls.key_pem()))
        .ca_certificate(Certificate::from_pem(tls.ca_pem()))
        .domain_name(tls.server_name())
        .timeout(Duration::from_secs(5)))
}

/// What the router needs of the model file at `path` (its text side only), served as `name`.
fn load_facts(name: &str, path: &Path) -> Result<ModelFacts, StartError> {
    if !path.exists() {
        return Err(StartError::NoModel(path.to_path_buf()));
    }
    let text =
        ModelText::open(path).map_err(|e| StartError::Model { path: path.to_path_buf(), source: Box::new(e) })?;
    tracing::info!(model = name, path = %path.display(), context = text.config.context_length, "serving model");
    Ok(ModelFacts {
        name: name.to_string(),
        vocab_size: text.config.vocab_size,
        max_model_len: text.config.context_length,
        tokenizer: text.tokenizer,
        template: text.chat_template,
        guides: Default::default(),
    })
}

/// Lists and watches the cluster's workers for as long as the router runs. If the
/// watch ends (discovery unreachable for long), the router keeps its last view and
/// lists again after a pause; a fresh listing replaces the view.
async fn follow_membership(discovery: Arc<dyn Discovery>, cluster: ClusterName, members: Arc<Members>) {
    let m = members.clone();
    let snapshot = move |listed: Vec<tandem_cluster::WorkerDescriptor>| {
        // Workers that left while the watch was down, then everyone listed now.
        let ids: std::collections::HashSet<_> = listed.iter().map(|d| d.id.clone()).collect();
        for gone in m.snapshot().into_iter().filter(|w| !ids.contains(&w.desc.id)) {
            m.apply(DiscoveryEvent::Removed(gone.desc.id));
        }
        for d in listed {
            m.apply(DiscoveryEvent::Added(d));
        }
    };
    tandem_cluster::follow_members(discovery, cluster, snapshot, |ev| members.apply(ev)).await
}
