//! `tandem router`, `tandem prefill`, `tandem decode`: the serving processes, one role per
//! process against etcd, and the flags they share with `tandem up` (`up.rs`), which runs
//! a router and its workers in one process.
//! Every flag can also be set through its `TANDEM_*` environment variable.
//! SIGINT or SIGTERM drains (no new requests, in-flight ones finish) and exits 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use tandem_cluster::{ClusterName, Discovery, EtcdConfig, EtcdDiscovery, Role};
use tandem_decode_worker::DecodeWorker;
use tandem_engine::scheduler::Policy;
use tandem_engine::share::{FairConfig, SjfConfig};
use tandem_prefill_worker::PrefillWorker;
use tandem_router::http::{HttpLimits, MetricsAccess};
use tandem_router::recovery::KvFailurePolicy;
use tandem_router::ModelSpec;
use tandem_router::{RouterConfig, RunningRouter};
use tandem_worker_runtime::{RoleBuilders, RunningWorker, WorkerConfig};

use crate::cluster_token::TokenFlags;
use crate::model_flags::{model_arg, ModelArg};

const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Flags every serving process shares.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// GGUF model file, as PATH or NAME=PATH (NAME: what clients give as `model`). A router or
    /// `tandem up` serves every --model given (repeat it; `TANDEM_MODEL` takes a
    /// comma-separated list), the first for requests that name none; a worker serves one.
    #[arg(long, env = "TANDEM_MODEL", default_value = DEFAULT_MODEL, value_delimiter = ',',
          value_parser = model_arg)]
    pub model: Vec<ModelArg>,
    /// The name clients use for the model, with a single --model (default: the file name
    /// without `.gguf`).
    #[arg(long, env = "TANDEM_MODEL_NAME")]
    pub model_name: Option<String>,
    /// etcd client URLs, comma-separated (e.g. http://127.0.0.1:2379).
    #[arg(long, env = "TANDEM_ETCD")]
    pub etcd: Option<String>,
    /// The cluster's name: its workers are under /tandem/<cluster>/ in etcd.
    #[arg(long, env = "TANDEM_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Seconds a worker's registration outlives its last keep-alive.
    #[arg(long, env = "TANDEM_LEASE_TTL", default_value_t = 5)]
    pub lease_ttl: u64,
    /// Seconds to let in-flight requests finish on SIGTERM before exiting anyway.
    #[arg(long, env = "TANDEM_DRAIN_TIMEOUT", default_value_t = 30)]
    pub drain_timeout: u64,
}

/// How the router treats requests whose worker fails.
#[derive(Args, Debug, Clone)]
pub struct Migration {
    /// Times a request may move to other workers when one dies under it (its prompt and the
    /// tokens generated so far are prefilled again; the client sees no gap). 0: fail instead.
    #[arg(long, env = "TANDEM_MIGRATION_LIMIT", default_value_t = 3)]
    pub migration_limit: usize,
    /// When a worker asks for its requests to move (its drain, a role change, an operator,
    /// the planner), move their KV to another decode worker (live migration: nothing is
    /// recomputed). `false`: a leaving worker's requests are recomputed elsewhere.
    #[arg(long, env = "TANDEM_LIVE_MIGRATION", default_value_t = true, action = clap::ArgAction::Set)]
    pub live_migration: bool,
    /// What a request whose KV transfer fails (its prefill worker died, the stream was cut or
    /// corrupted) gets, unless it chooses: `fail` (an error), `recompute` (its decode worker
    /// prefills it), `retry` (another prefill worker; recompute when there is none).
    #[arg(long, env = "TANDEM_KV_FAILURE_POLICY", default_value = "retry", value_parser = ["fail", "recompute", "retry"])]
    pub kv_failure_policy: String,
    /// Seconds a decode worker holds a prompt's blocks for KV that does not come; the
    /// prefill side abandons the transfer then too.
    #[arg(long, env = "TANDEM_KV_LEASE", default_value_t = 30)]
    pub kv_lease: u64,
    /// Seconds a request waits for KV room when every decode worker's pool is full (it is
    /// tried again as requests finish); past it, RESOURCE_EXHAUSTED / 429. 0: refuse at once.
    #[arg(long, env = "TANDEM_KV_WAIT", value_parser = non_negative_secs, default_value_t = 30.0)]
    pub kv_wait: f64,
    /// Seconds a request may go without its first token (waiting for KV room, queued behind
    /// other prompts, computing); past it, RESOURCE_EXHAUSTED / 429 and it is cancelled on its
    /// workers. A client's own deadline, if sooner, wins.
    #[arg(long, env = "TANDEM_FIRST_TOKEN_TIMEOUT", value_parser = positive_secs,
          default_value_t = tandem_router::state::FIRST_TOKEN_TIMEOUT.as_secs_f64())]
    pub first_token_timeout: f64,
}

impl Migration {
    fn policy(&self) -> KvFailurePolicy {
        KvFailurePolicy::parse(&self.kv_failure_policy).expect("clap checked the value")
    }
}

/// Bounds of the OpenAI-compatible HTTP API (docs/operations.md, "Front-door limits").
#[derive(Args, Debug, Clone)]
pub struct HttpFlags {
    /// Seconds a client has to send its request line and headers (also how long a kept-alive
    /// connection may idle); past it the connection is closed.
    #[arg(long, env = "TANDEM_HTTP_HEADER_TIMEOUT", value_parser = positive_secs,
          default_value_t = HttpLimits::default().header_read_timeout.as_secs_f64())]
    pub http_header_timeout: f64,
    /// Seconds a client has to send its request body once its headers are in; past it, 408.
    #[arg(long, env = "TANDEM_HTTP_BODY_TIMEOUT", value_parser = positive_secs,
          default_value_t = HttpLimits::default().body_read_timeout.as_secs_f64())]
    pub http_body_timeout: f64,
    /// Seconds an HTTP request may run, headers to last token; past it, 504. A client may ask
    /// for less with an `x-request-timeout: SECONDS` header.
    #[arg(long, env = "TANDEM_HTTP_REQUEST_TIMEOUT", value_parser = positive_secs,
          default_value_t = HttpLimits::default().request_timeout.as_secs_f64())]
    pub http_request_timeout: f64,
    /// Bytes of request line and headers at most; beyond, 431.
    #[arg(long, env = "TANDEM_HTTP_MAX_HEADER_BYTES", default_value_t = HttpLimits::default().max_header_bytes)]
    pub http_max_header_bytes: usize,
    /// Connections the HTTP port holds open at once; one more is closed at accept.
    #[arg(long, env = "TANDEM_HTTP_MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..),
          default_value_t = HttpLimits::default().max_connections as u32)]
    pub http_max_connections: u32,
    /// Connections one client (an IPv4 address, an IPv6 /64) holds open on the HTTP port at
    /// once; one more is closed at accept. Behind a proxy every client is the proxy: raise it
    /// to --http-max-connections there.
    #[arg(long, env = "TANDEM_HTTP_MAX_CONNECTIONS_PER_IP", value_parser = clap::value_parser!(u32).range(1..),
          default_value_t = HttpLimits::default().max_connections_per_ip as u32)]
    pub http_max_connections_per_ip: u32,
    /// `/metrics` on the HTTP port requires `Authorization: Bearer <an API key>` (401
    /// otherwise); needs --api-key. `/health` and `/ready` stay open.
    #[arg(long, env = "TANDEM_METRICS_REQUIRE_KEY")]
    pub metrics_require_key: bool,
}

impl HttpFlags {
    fn limits(&self) -> HttpLimits {
        HttpLimits {
            max_header_bytes: self.http_max_header_bytes,
            header_read_timeout: Duration::from_secs_f64(self.http_header_timeout),
            body_read_timeout: Duration::from_secs_f64(self.http_body_timeout),
            request_timeout: Duration::from_secs_f64(self.http_request_timeout),
            max_connections: self.http_max_connections as usize,
            max_connections_per_ip: self.http_max_connections_per_ip as usize,
            ..HttpLimits::default()
        }
    }

    fn metrics_access(&self) -> MetricsAccess {
        if self.metrics_require_key {
            MetricsAccess::ApiKey
        } else {
            MetricsAccess::Open
        }
    }
}

/// A positive, finite number of seconds (up to a year).
fn positive_secs(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 && x <= 31_536_000.0 => Ok(x),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

fn non_negative_secs(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && (0.0..=31_536_000.0).contains(&x) => Ok(x),
        _ => Err(format!("{s:?} is not a number of seconds (0 or more)")),
    }
}

/// Mutual TLS between the router and the workers and on the KV plane
/// (docs/operations.md, "Mutual TLS").
#[derive(Args, Debug, Clone)]
pub struct TlsFlags {
    /// This process's certificate chain (PEM). With --tls-key and --tls-ca, the workers' gRPC
    /// and KV ports require certificates from that CA, and the router and prefill workers
    /// present theirs. None of the three: plaintext.
    #[arg(long, env = "TANDEM_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "TANDEM_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate(s) every peer's certificate must chain to (PEM).
    #[arg(long, env = "TANDEM_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The DNS name a worker's certificate must carry: clients verify it, not the worker's IP.
    #[arg(long, env = "TANDEM_TLS_SERVER_NAME", default_value = tandem_proto::tls::DEFAULT_SERVER_NAME)]
    pub tls_server_name: String,
}

impl TlsFlags {
    pub(crate) fn files(&self) -> Result<Option<tandem_proto::tls::TlsFiles>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(tandem_proto::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
                server_name: self.tls_server_name.clone(),
            })),
            _ => bail!("--tls-cert, --tls-key and --tls-ca go together: give all three, or none for plaintext"),
        }
    }
}

/// API keys the router accepts.
#[derive(Args, Debug, Clone)]
pub struct ApiKeys {
    /// An accepted API key (repeatable; `TANDEM_API_KEYS` takes a comma-separated list), as
    /// `KEY` (its own tenant) or `TENANT:KEY` (keys of one tenant share its prefix cache; no
    /// tenant reuses another's cached prompts, whatever `cache_salt` a client sends).
    /// Clients send `Authorization: Bearer <key>` (HTTP) or `authorization` metadata (gRPC).
    /// None: the API is open.
    #[arg(long = "api-key", env = "TANDEM_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,
}

impl ApiKeys {
    pub(crate) fn keys(&self) -> Vec<String> {
        self.api_keys.iter().map(|k| k.trim().to_string()).filter(|k| !k.is_empty()).collect()
    }
}

/// Per-tenant limits and the bound on stalled streams (docs/operations.md, "Per-tenant
/// limits and stalled streams").
#[derive(Args, Debug, Clone)]
pub struct QuotaFlags {
    /// Requests one tenant (what an API key names) may hold in flight; beyond, RESOURCE_EXHAUSTED
    /// (HTTP 429). Default: half of --max-inflight, rounded up, when the API keys name two
    /// tenants or more; with one tenant or an open API, none (--max-inflight bounds it).
    #[arg(long, env = "TANDEM_TENANT_MAX_INFLIGHT", value_parser = clap::value_parser!(u32).range(1..))]
    pub tenant_max_inflight: Option<u32>,
    /// A tenant's own limit in place of --tenant-max-inflight, as TENANT=N (repeatable;
    /// `TANDEM_TENANT_LIMITS` takes a comma-separated list). The tenant must be one an API key
    /// names.
    #[arg(long = "tenant-limit", env = "TANDEM_TENANT_LIMITS", value_delimiter = ',', value_parser = tenant_limit)]
    pub tenant_limits: Vec<(String, usize)>,
    /// Seconds a stream (gRPC GenerateStream, HTTP streaming) may wait for its client to take
    /// the next chunk; past it the request is cancelled and its KV blocks freed. Positive;
    /// there is no "never".
    #[arg(long, env = "TANDEM_STREAM_STALL_TIMEOUT", value_parser = positive_secs,
          default_value_t = tandem_router::stall::STREAM_STALL_TIMEOUT.as_secs_f64())]
    pub stream_stall_timeout: f64,
}

/// `TENANT=N`, N at least 1.
fn tenant_limit(s: &str) -> Result<(String, usize), String> {
    let (tenant, n) = s.trim().split_once('=').ok_or_else(|| format!("{s:?} is not TENANT=N"))?;
    match n.trim().parse::<usize>() {
        Ok(n) if n >= 1 && !tenant.trim().is_empty() => Ok((tenant.trim().to_string(), n)),
        _ => Err(format!("{s:?} is not TENANT=N with N at least 1")),
    }
}

/// Flags of a worker.
#[derive(Args, Debug, Clone)]
pub struct WorkerFlags {
    /// Seconds a reservation's lease (or a prefill's transfer) lasts at most, whatever the
    /// router asks: what one caller can hold a decode worker's blocks for.
    #[arg(long, env = "TANDEM_MAX_KV_LEASE", value_parser = positive_secs, default_value_t = 60.0)]
    pub max_kv_lease: f64,
    /// KV blocks in the pool (default: one full context's worth).
    #[arg(long, env = "TANDEM_KV_BLOCKS")]
    pub kv_blocks: Option<usize>,
    /// Tokens per KV block.
    #[arg(long, env = "TANDEM_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// Tokens per engine step at most (chunked prefill).
    #[arg(long, env = "TANDEM_MAX_BATCHED_TOKENS", default_value_t = 512)]
    pub max_batched_tokens: usize,
    /// Sequences decoding at once at most.
    #[arg(long, env = "TANDEM_MAX_SEQS", default_value_t = 64)]
    pub max_seqs: usize,
    /// Requests queued at most; beyond, RESOURCE_EXHAUSTED.
    #[arg(long, env = "TANDEM_MAX_WAITING", default_value_t = 1024)]
    pub max_waiting: usize,
    /// Turn the prefix cache off (every prompt is computed in full; for comparisons).
    #[arg(long, env = "TANDEM_NO_PREFIX_CACHE")]
    pub no_prefix_cache: bool,
    /// Which waiting request a worker admits first (and which running one it preempts
    /// first): `fcfs` (in arrival order), `priority` (the request's `priority`, lower values
    /// first, then arrival), `fair` (the tenant with the least weighted service across the
    /// cluster first: virtual token counters) or `sjf` (the least predicted work first, aged
    /// by the wait). See docs/operations.md, "Scheduling".
    #[arg(long, env = "TANDEM_SCHEDULING_POLICY", default_value = "fcfs", value_parser = scheduling_policy())]
    pub scheduling_policy: Policy,
    /// fair: the service one prompt token costs.
    #[arg(long, env = "TANDEM_FAIR_PREFILL_COST", default_value_t = FairConfig::default().prefill_cost)]
    pub fair_prefill_cost: f64,
    /// fair: the service one generated token costs.
    #[arg(long, env = "TANDEM_FAIR_DECODE_COST", default_value_t = FairConfig::default().decode_cost)]
    pub fair_decode_cost: f64,
    /// fair: tenant weights, `TENANT=WEIGHT` (comma-separated; default 1): a tenant of weight
    /// 2 gets twice the service of one of weight 1 while both wait. Every worker must be
    /// given the same weights (the router sums the weighted service they report).
    #[arg(long, env = "TANDEM_TENANT_WEIGHTS", value_delimiter = ',', value_parser = tenant_weight)]
    pub tenant_weight: Vec<(String, f64)>,
    /// sjf: rank (in tokens of predicted work) a waiting request gains per second of wait.
    #[arg(long, env = "TANDEM_SJF_AGING", default_value_t = SjfConfig::default().aging)]
    pub sjf_aging: f64,
    /// sjf: a request that waited this long (ms) goes before every other, in arrival order.
    #[arg(long, env = "TANDEM_SJF_MAX_WAIT_MS", default_value_t = SjfConfig::default().max_wait_ms)]
    pub sjf_max_wait_ms: u64,
    /// A prompt with more tokens than this left to compute is long: while shorter prompts
    /// wait, it takes only part of each step, so they are not queued behind it.
    #[arg(long, env = "TANDEM_LONG_PREFILL_THRESHOLD", default_value_t = 512)]
    pub long_prefill_threshold: usize,
    /// Percent of each step's tokens (--max-batched-tokens) long prompts take at most while
    /// shorter prompts wait; 100 turns the yielding off (plain first come, first served).
    #[arg(long, env = "TANDEM_LONG_PREFILL_SHARE", default_value_t = 25,
          value_parser = percent())]
    pub long_prefill_share: usize,
}

/// A whole percentage, 1 to 100.
fn percent() -> impl clap::builder::TypedValueParser<Value = usize> {
    use clap::builder::TypedValueParser;
    clap::value_parser!(u8).range(1..=100).map(usize::from)
}

/// `--scheduling-policy`: the engine's built-in policies by name.
fn scheduling_policy() -> impl clap::builder::TypedValueParser<Value = Policy> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Policy::NAMES)
        .map(|s| Policy::parse(&s).expect("one of the possible values"))
}

/// `--tenant-weight TENANT=WEIGHT`, a positive finite weight.
pub(crate) fn tenant_weight(s: &str) -> Result<(String, f64), String> {
    let (t, w) = s.split_once('=').ok_or_else(|| format!("{s:?} is not TENANT=WEIGHT"))?;
    let w: f64 = w.trim().parse().map_err(|_| format!("{w:?} is not a number"))?;
    if t.is_empty() || !(w.is_finite() && w > 0.0) {
        return Err(format!("{s:?}: the tenant must be named and its weight positive"));
    }
    Ok((t.to_string(), w))
}

impl WorkerFlags {
    /// The `fair` policy's costs and weights.
    pub(crate) fn fair(&self) -> FairConfig {
        FairConfig {
            prefill_cost: self.fair_prefill_cost.max(0.0),
            decode_cost: self.fair_decode_cost.max(0.0),
            weights: self.tenant_weight.iter().cloned().collect(),
        }
    }
}

#[derive(Args, Debug)]
pub struct RouterArgs {
    #[command(flatten)]
    pub common: Common,
    /// Where the public gRPC API listens.
    #[arg(long, env = "TANDEM_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    pub grpc_listen: SocketAddr,
    /// Where the OpenAI-compatible HTTP API listens.
    #[arg(long, env = "TANDEM_HTTP_LISTEN", default_value = "127.0.0.1:8000")]
    pub http_listen: SocketAddr,
    #[command(flatten)]
    pub keys: ApiKeys,
    #[command(flatten)]
    pub http: HttpFlags,
    #[command(flatten)]
    pub migration: Migration,
    #[command(flatten)]
    pub placement: Placement,
    /// Tokens per KV block, as the workers have it (their --block-size): how the router names
    /// a prompt's blocks to find them in the workers' caches. A worker with another block
    /// size is routed to by load only.
    #[arg(long, env = "TANDEM_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// Requests in flight at most; beyond, RESOURCE_EXHAUSTED.
    #[arg(long, env = "TANDEM_MAX_INFLIGHT", default_value_t = 512)]
    pub max_inflight: usize,
    /// The order requests wait for KV room in when every decode worker is full: the name of
    /// the workers' --scheduling-policy (fcfs, priority, fair: the tenant with the least
    /// cluster-wide service first, sjf: the shortest predicted output first).
    #[arg(long, env = "TANDEM_SCHEDULING_POLICY", default_value = "fcfs",
          value_parser = clap::builder::PossibleValuesParser::new(tandem_router::fairness::Policy::NAMES))]
    pub scheduling_policy: String,
    #[command(flatten)]
    pub quotas: QuotaFlags,
    #[command(flatten)]
    pub tls: TlsFlags,
    #[command(flatten)]
    pub token: TokenFlags,
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub worker: WorkerFlags,
    #[command(flatten)]
    pub tls: TlsFlags,
    #[command(flatten)]
    pub token: TokenFlags,
    /// Also answer grpc.health.v1, plaintext and alone, here: for probes that cannot speak
    /// TLS (Kubernetes' gRPC probe) when --tls-cert is set.
    #[arg(long, env = "TANDEM_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Compute threads of the engine.
    #[arg(long, env = "TANDEM_THREADS", default_value_t = 1)]
    pub threads: usize,
    /// The worker's id in the cluster (default: role and process id).
    #[arg(long, env = "TANDEM_WORKER_ID")]
    pub id: Option<String>,
    /// Where the worker's gRPC server listens (port 0: any).
    #[arg(long, env = "TANDEM_GRPC_LISTEN", default_value = "127.0.0.1:0")]
    pub grpc_listen: SocketAddr,
    /// Where the KV receiver listens over TCP (decode roles; port 0: any).
    #[arg(long, env = "TANDEM_KV_LISTEN", default_value = "127.0.0.1:0")]
    pub kv_listen: SocketAddr,
    /// The IP others reach this worker at (default: the listen address's).
    #[arg(long, env = "TANDEM_ADVERTISE_HOST", default_value = "")]
    pub advertise_host: String,
    /// The address prefill workers send KV to (decode roles), when a proxy, NAT or port
    /// forwarding sits in front of the KV listener (default: the KV listen address).
    #[arg(long, env = "TANDEM_KV_ADVERTISE")]
    pub kv_advertise: Option<SocketAddr>,
    /// Decode workers only: `decode`, or `both` to also prefill locally when the
    /// router has no prefill worker.
    #[arg(long, env = "TANDEM_ROLE")]
    pub role: Option<String>,
    /// Do not offer same-host KV transfer through shared memory.
    #[arg(long, env = "TANDEM_NO_SHM")]
    pub no_shm: bool,
    /// Build every role's parts (a KV receiver, a shared-memory cache, a KV sender), so
    /// the worker's role can be changed while it runs (`tandem worker set-role`, or the
    /// router's `--planner`). Costs the other role's cache memory and a KV port.
    #[arg(long, env = "TANDEM_ELASTIC")]
    pub elastic: bool,
    /// On SIGTERM, move running decodes to other decode workers (live migration: their KV
    /// moves, nothing is recomputed; recomputed where it cannot move) before leaving,
    /// instead of waiting for them to finish. `false` to wait.
    #[arg(long, env = "TANDEM_MIGRATE_ON_DRAIN", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate_on_drain: bool,
    /// Serve Prometheus metrics (`/metrics`) and a liveness probe (`/health`) over HTTP here.
    #[arg(long, env = "TANDEM_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

/// Serves the process's metrics and a liveness probe on `addr`; returns the bound address.
async fn serve_metrics(addr: SocketAddr) -> Result<SocketAddr> {
    use axum::routing::get;
    let handle = tandem_router::telemetry::install().map_err(|e| anyhow!("metrics recorder: {e}"))?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let body = handle.render();
                async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body) }
            }),
        )
        .route("/health", get(|| async { "ok" }));
    let l =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the metrics server on {addr}"))?;
    let local = l.local_addr()?;
    tokio::spawn(async move { axum::serve(l, app).await });
    Ok(local)
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tandem-io")
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub(crate) async fn discovery(common: &Common) -> Result<Option<Arc<dyn Discovery>>> {
    let Some(urls) = &common.etcd else { return Ok(None) };
    let endpoints: Vec<String> = urls.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    let d = EtcdDiscovery::connect(EtcdConfig { endpoints, ..EtcdConfig::default() })
        .await
        .map_err(|e| anyhow!("etcd at {urls}: {e}"))?;
    Ok(Some(Arc::new(d)))
}

impl Common {
    /// The models a router serves, named, the default first (`model_flags::served`).
    pub(crate) fn served(&self) -> Result<Vec<ModelSpec>> {
        crate::model_flags::served(&self.model, self.model_name.as_deref())
    }

    /// The one model a worker serves.
    fn single(&self) -> Result<ModelSpec> {
        crate::model_flags::single(&self.model, self.model_name.as_deref())
    }
}

/// The served models' names as a startup line says them: `model NAME` or `models A,B`.
pub(crate) fn model_words(models: &[ModelSpec]) -> String {
    let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    match names.as_slice() {
        [one] => format!("model {one}"),
        many => format!("models {}", many.join(",")),
    }
}

/// Waits for SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

/// The roles a worker is built with: the one place the two role crates meet. A worker
/// of role `both` gets both.
pub(crate) const ROLES: RoleBuilders =
    RoleBuilders { prefill: Some(PrefillWorker::build), decode: Some(DecodeWorker::build) };

pub(crate) fn worker_config(
    id: String,
    role: Role,
    model: &ModelSpec,
    w: &WorkerFlags,
    threads: usize,
    grpc: SocketAddr,
    kv: SocketAddr,
) -> WorkerConfig {
    WorkerConfig {
        threads,
        kv_blocks: w.kv_blocks,
        block_size: w.block_size,
        max_batched_tokens: w.max_batched_tokens,
        max_seqs: w.max_seqs,
        max_waiting: w.max_waiting,
        prefix_caching: !w.no_prefix_cache,
        scheduling_policy: w.scheduling_policy.clone(),
        fair: w.fair(),
        sjf: SjfConfig { aging: w.sjf_aging.max(0.0), max_wait_ms: w.sjf_max_wait_ms },
        long_prefill_threshold: w.long_prefill_threshold,
        long_prefill_share: w.long_prefill_share,
        grpc_listen: grpc,
        kv_listen: kv,
        model_name: model.name.clone(),
        max_kv_lease: Duration::from_secs_f64(w.max_kv_lease),
        ..WorkerConfig::new(id, role, model.path.clone())
    }
}

/// Where the router places requests: the policy and what the prefix index needs.
#[derive(Args, Debug)]
pub struct Placement {
    /// Routing policy: cache-aware (prefix-cache overlap against load), least-loaded or round-robin.
    #[arg(long, env = "TANDEM_POLICY", default_value = "cache-aware",
          value_parser = clap::builder::PossibleValuesParser::new(tandem_router::policy::POLICIES))]
    pub policy: String,
    /// cache-aware: how much a prompt token a worker would compute weighs against a token of
    /// prefill work queued on it.
    #[arg(long, env = "TANDEM_CACHE_WEIGHT", default_value_t = 2.0, value_parser = non_negative)]
    pub cache_weight: f64,
    /// How long a prompt's blocks count as cached on the workers it was sent to before their
    /// KV events say so, in ms: requests sharing a new prefix that arrive together follow the
    /// first.
    #[arg(long, env = "TANDEM_PENDING_TTL_MS", default_value_t = 2000)]
    pub pending_ttl_ms: u64,
    /// Where a prompt is computed when its decode worker can prefill (role both): adaptive
    /// (per request; a controller moves the local budget with observed TTFT and TPOT),
    /// threshold (locally up to --local-prefill-threshold uncached tokens), or remote.
    #[arg(long, env = "TANDEM_PREFILL_PLACEMENT", default_value = "adaptive",
          value_parser = clap::builder::PossibleValuesParser::new(tandem_router::placement::Mode::NAMES))]
    pub prefill_placement: String,
    /// The longest uncached prompt a decode worker prefills itself under `threshold`, and
    /// where `adaptive` starts.
    #[arg(long, env = "TANDEM_LOCAL_PREFILL_THRESHOLD", default_value_t = 256)]
    pub local_prefill_threshold: usize,
    /// The time-to-first-token objective, in ms: placement and the planner aim at it.
    #[arg(long, env = "TANDEM_SLO_TTFT_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub slo_ttft_ms: u64,
    /// The time-per-output-token objective, in ms.
    #[arg(long, env = "TANDEM_SLO_TPOT_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub slo_tpot_ms: u64,
    /// Run the planner: it changes elastic workers' roles (`--elastic`) as the load moves,
    /// and publishes tandem_planner_desired_workers{role} for autoscalers.
    #[arg(long, env = "TANDEM_PLANNER")]
    pub planner: bool,
    /// The planner's least time between two changes of the split (and of one worker), s.
    #[arg(long, env = "TANDEM_PLANNER_DWELL_S", default_value_t = 30.0, value_parser = non_negative)]
    pub planner_dwell_s: f64,
    /// How often the planner looks, in ms.
    #[arg(long, env = "TANDEM_PLANNER_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..))]
    pub planner_interval_ms: u64,
    /// The planner moves decodes (live) off a decode worker whose KV use (used blocks over
    /// its pool) is at least this, to one at or below `--rebalance-low`. Above 1: never.
    #[arg(long, env = "TANDEM_REBALANCE_HIGH", default_value_t = 0.8, value_parser = non_negative)]
    pub rebalance_high: f64,
    #[arg(long, env = "TANDEM_REBALANCE_LOW", default_value_t = 0.5, value_parser = non_negative)]
    pub rebalance_low: f64,
    /// Refuse requests predicted to miss their TTFT objective (429 / RESOURCE_EXHAUSTED with
    /// retry-after): `explicit` (only requests that give one: `slo_ttft_ms`, the
    /// `x-slo-ttft-ms` header), `all` (others are held to --slo-ttft-ms) or `off`.
    #[arg(long, env = "TANDEM_SLO_ADMISSION", default_value = "explicit",
          value_parser = clap::builder::PossibleValuesParser::new(tandem_router::slo::SloAdmission::NAMES))]
    pub slo_admission: String,
    /// The output-length predictor for `sjf`: `builtin` (fitted on SmolLM2-135M-Instruct's
    /// generations, scripts/train-length-predictor.sh), `none`, or a file that script wrote.
    #[arg(long, env = "TANDEM_LENGTH_PREDICTOR", default_value = "builtin")]
    pub length_predictor: String,
}

impl Placement {
    fn length_predictor(&self) -> Result<Option<tandem_router::predict::LengthPredictor>> {
        use tandem_router::predict::LengthPredictor;
        Ok(match self.length_predictor.as_str() {
            "none" => None,
            "builtin" => Some(LengthPredictor::built_in()),
            path => {
                Some(LengthPredictor::load(std::path::Path::new(path)).map_err(|e| anyhow!("--length-predictor {e}"))?)
            }
        })
    }

    fn prefill_placement(&self) -> tandem_router::placement::PlacementConfig {
        use tandem_router::placement::{Mode, PlacementConfig, Slo};
        PlacementConfig {
            mode: Mode::parse(&self.prefill_placement).expect("clap checked the name"),
            threshold: self.local_prefill_threshold,
            slo: Slo { ttft: Duration::from_millis(self.slo_ttft_ms), tpot: Duration::from_millis(self.slo_tpot_ms) },
        }
    }

    fn planner(&self) -> Option<tandem_router::planner::PlannerConfig> {
        self.planner.then(|| tandem_router::planner::PlannerConfig {
            interval: Duration::from_millis(self.planner_interval_ms),
            dwell: Duration::from_secs_f64(self.planner_dwell_s),
            rebalance_high: self.rebalance_high,
            rebalance_low: self.rebalance_low,
            ..Default::default()
        })
    }
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("{s:?} is not a finite number >= 0")),
    }
}

/// The flags a router is configured from, as `tandem up` and `tandem router` both have them.
pub(crate) struct RouterFlags<'a> {
    /// The models served, the default first.
    pub(crate) models: Vec<ModelSpec>,
    pub(crate) placement: &'a Placement,
    /// The workers' tokens per KV block: how the router names prompt blocks.
    pub(crate) block_size: usize,
    pub(crate) max_inflight: usize,
    pub(crate) keys: &'a ApiKeys,
    pub(crate) http: &'a HttpFlags,
    pub(crate) migration: &'a Migration,
    pub(crate) quotas: &'a QuotaFlags,
    /// The workers' scheduling policy: the router's queue for KV room follows it.
    pub(crate) scheduling_policy: &'a str,
}

impl RouterFlags<'_> {
    /// The router's configuration: its gRPC and HTTP addresses, the TLS to its workers and
    /// the cluster token from the caller, everything else from the flags.
    pub(crate) fn config(
        &self,
        (grpc, http): (SocketAddr, SocketAddr),
        tls: Option<tandem_proto::tls::TlsFiles>,
        token: tandem_proto::auth::ClusterToken,
    ) -> Result<RouterConfig> {
        Ok(RouterConfig {
            models: self.models.clone(),
            grpc_listen: grpc,
            policy: self.placement.policy.clone(),
            cache_weight: self.placement.cache_weight,
            hashing: tandem_router::members::Hashing {
                block_size: self.block_size as u32,
                pending_ttl: Duration::from_millis(self.placement.pending_ttl_ms),
                ..Default::default()
            },
            max_inflight: self.max_inflight,
            http_listen: Some(http),
            tls,
            cluster_token: Some(token),
            http_limits: self.http.limits(),
            api_keys: self.keys.keys(),
            metrics_access: self.http.metrics_access(),
            migration_limit: self.migration.migration_limit,
            live_migration: self.migration.live_migration,
            kv_failure_policy: self.migration.policy(),
            kv_lease: Duration::from_secs(self.migration.kv_lease.max(1)),
            kv_wait: Duration::from_secs_f64(self.migration.kv_wait),
            first_token_timeout: Duration::from_secs_f64(self.migration.first_token_timeout),
            tenant_max_inflight: self.quotas.tenant_max_inflight.map(|n| n as usize),
            tenant_limits: self.quotas.tenant_limits.clone(),
            stream_stall_timeout: Duration::from_secs_f64(self.quotas.stream_stall_timeout),
            placement: self.placement.prefill_placement(),
            planner: self.placement.planner(),
            queue_policy: tandem_router::fairness::Policy::parse(self.scheduling_policy).unwrap_or_default(),
            slo_admission: tandem_router::slo::SloAdmission::parse(&self.placement.slo_admission)
                .expect("clap checked the name"),
            length_predictor: self.placement.length_predictor()?,
        })
    }
}

pub(crate) fn describe(w: &RunningWorker) -> String {
    let kv = if w.descriptor.role.can_decode() {
        let shm = if w.descriptor.kv.local.is_some() { " (+shm)" } else { "" };
        format!(" kv {}{shm}", w.descriptor.kv.tcp)
    } else {
        String::new()
    };
    let elastic = if w.state().elastic { ", elastic" } else { "" };
    format!("worker {} ({}{elastic}) grpc {}{kv}", w.descriptor.id, w.descriptor.role, w.grpc_addr)
}

pub fn router(a: RouterArgs) -> Result<()> {
    let models = a.common.served()?;
    let tls = a.tls.files()?;
    let rt = runtime()?;
    rt.block_on(async move {
        tandem_router::telemetry::install().map_err(|e| anyhow!("metrics recorder: {e}"))?;
        let cluster = ClusterName::new(a.common.cluster.clone()).map_err(|e| anyhow!("{e}"))?;
        let d = discovery(&a.common)
            .await?
            .ok_or_else(|| anyhow!("tandem router needs --etcd (or TANDEM_ETCD) to find its workers"))?;
        let (token, token_path) = a.token.load(cluster.as_str())?;
        let flags = RouterFlags {
            models: models.clone(),
            placement: &a.placement,
            block_size: a.block_size,
            max_inflight: a.max_inflight,
            keys: &a.keys,
            http: &a.http,
            migration: &a.migration,
            quotas: &a.quotas,
            scheduling_policy: &a.scheduling_policy,
        };
        let rcfg = flags.config((a.grpc_listen, a.http_listen), tls.clone(), token)?;
        let router = RunningRouter::start(rcfg, d.clone(), cluster).await.map_err(|e| anyhow!(e))?;
        println!(
            "tandem: router grpc {} http {} ({})",
            router.grpc_addr,
            router.http_addr.map(|a| a.to_string()).unwrap_or_default(),
            model_words(&models)
        );
        println!("tandem: cluster token from {}", token_path.display());
        if let Some(t) = &tls {
            println!("tandem: mutual TLS to the workers (verified as {})", t.server_name);
        }
        println!("tandem: ready");
        shutdown_signal().await;
        println!("tandem: draining");
        let clean = router.drain(Duration::from_secs(a.common.drain_timeout)).await;
        d.shutdown().await;
        println!("tandem: stopped{}", if clean { "" } else { " (some requests did not finish in time)" });
        Ok(())
    })
}

pub fn worker(a: WorkerArgs, default_role: Role) -> Result<()> {
    let model = a.common.single()?;
    let role = match a.role.as_deref() {
        None => default_role,
        Some(r) => {
            let role = Role::parse(r).ok_or_else(|| anyhow!("--role {r:?}: expected decode or both"))?;
            if default_role == Role::Prefill && role != Role::Prefill
                || default_role != Role::Prefill && !role.can_decode()
            {
                bail!(
                    "--role {r}: a {default_role} worker's role is {default_role}{}",
                    if default_role == Role::Decode { " or both" } else { "" }
                );
            }
            role
        }
    };
    let tls = a.tls.files()?;
    let rt = runtime()?;
    rt.block_on(async move {
        let cluster = ClusterName::new(a.common.cluster.clone()).map_err(|e| anyhow!("{e}"))?;
        let d = discovery(&a.common).await?.ok_or_else(|| {
            anyhow!("tandem {default_role} needs --etcd (or TANDEM_ETCD) to register with the router")
        })?;
        let id = a.id.clone().unwrap_or_else(|| format!("{role}-{}", std::process::id()));
        let mut cfg = worker_config(id, role, &model, &a.worker, a.threads, a.grpc_listen, a.kv_listen);
        cfg.advertise_host = a.advertise_host.clone();
        cfg.kv_advertise = a.kv_advertise;
        cfg.shm = !a.no_shm;
        cfg.elastic = a.elastic;
        cfg.migrate_on_drain = a.migrate_on_drain;
        cfg.tls = tls.clone();
        cfg.health_listen = a.health_listen;
        let (token, token_path) = a.token.load(cluster.as_str())?;
        cfg.cluster_token = Some(token);
        let ttl = Duration::from_secs(a.common.lease_ttl.max(1));
        let metrics = match a.metrics_listen {
            Some(addr) => Some(serve_metrics(addr).await?),
            None => None,
        };
        let w = RunningWorker::start(cfg, Some((d.clone(), cluster, ttl)), ROLES).await.map_err(|e| anyhow!(e))?;
        println!("tandem: {}", describe(&w));
        println!("tandem: cluster token from {}", token_path.display());
        if let Some(t) = &tls {
            println!("tandem: mutual TLS on gRPC and KV (workers verified as {})", t.server_name);
        }
        if let Some(h) = w.health_addr {
            println!("tandem: health {h} (plaintext grpc.health.v1 only)");
        }
        if let Some(m) = metrics {
            println!("tandem: metrics http://{m}/metrics");
        }
        println!("tandem: ready");
        shutdown_signal().await;
        println!("tandem: draining");
        let clean = w.drain(Duration::from_secs(a.common.drain_timeout)).await;
        d.shutdown().await;
        println!("tandem: stopped{}", if clean { "" } else { " (some requests did not finish in time)" });
        Ok(())
    })
}
