//! How to run one worker: `WorkerConfig`, what `RunningWorker::start` takes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tandem_cluster::Role;
use tandem_engine::scheduler::{Policy, SchedulerConfig};
use tandem_engine::share::{FairConfig, SjfConfig};
use tandem_proto::auth::ClusterToken;
use tandem_proto::tls::TlsFiles;

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
    /// `Policy::Priority`, by the request's `priority`, lower values first, then arrival;
    /// `Policy::Fair`, the tenant with the least service first; `Policy::Sjf`, the least
    /// predicted work first.
    pub scheduling_policy: Policy,
    /// Costs and tenant weights of `fair` (service is counted under every policy).
    pub fair: FairConfig,
    /// Aging of `sjf`.
    pub sjf: SjfConfig,
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
    /// Built with every role's parts (a KV receiver and a shared-memory cache, a KV
    /// sender, both roles), so `SetRole` can change its role while it runs.
    pub elastic: bool,
    /// A graceful exit (`RunningWorker::drain`) moves running decodes to other decode
    /// workers (live migration; recompute where their KV cannot move) instead of waiting
    /// for them to finish.
    pub migrate_on_drain: bool,
}

impl WorkerConfig {
    /// Whether the worker is built to prefill: its role prefills, or it is elastic.
    pub fn builds_prefill(&self) -> bool {
        self.elastic || self.role.can_prefill()
    }

    /// Whether the worker is built to decode (a KV receiver, a shared-memory cache).
    pub fn builds_decode(&self) -> bool {
        self.elastic || self.role.can_decode()
    }

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
            fair: FairConfig::default(),
            sjf: SjfConfig::default(),
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
            max_kv_lease: crate::state::MAX_LEASE,
            elastic: false,
            migrate_on_drain: true,
        }
    }
}

/// The served name of a model file: its file name without `.gguf`.
pub fn model_name_of(path: &std::path::Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    name.strip_suffix(".gguf").unwrap_or(&name).to_string()
}
