//! `tandem up`: a router and its workers in one process, one pool of prefill and decode
//! workers per model (`--model` repeated), with in-memory discovery (or etcd). Each
//! pool's workers announce their own model; the one router serves them all.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::Args;
use tandem_cluster::{ClusterName, Discovery, InMemoryDiscovery, Role};
use tandem_router::{ModelSpec, RunningRouter};
use tandem_worker_runtime::RunningWorker;

use crate::cluster_token::TokenFlags;
use crate::model_flags::id_part;
use crate::serve::{
    describe, discovery, model_words, runtime, shutdown_signal, worker_config, ApiKeys, Common, HttpFlags, Migration,
    Placement, QuotaFlags, RouterFlags, WorkerFlags, ROLES,
};

#[derive(Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub worker: WorkerFlags,
    /// Prefill workers of each model; 0 gives aggregated serving on role-`both` decode workers.
    #[arg(long, env = "TANDEM_PREFILL_WORKERS", default_value_t = 1)]
    pub prefill_workers: usize,
    /// Decode workers of each model.
    #[arg(long, env = "TANDEM_DECODE_WORKERS", default_value_t = 1)]
    pub decode_workers: usize,
    /// Port of the public gRPC API.
    #[arg(long, env = "TANDEM_GRPC_PORT", default_value_t = 50051)]
    pub grpc_port: u16,
    /// Port of the OpenAI-compatible HTTP API.
    #[arg(long, env = "TANDEM_HTTP_PORT", default_value_t = 8000)]
    pub http_port: u16,
    #[command(flatten)]
    pub keys: ApiKeys,
    #[command(flatten)]
    pub http: HttpFlags,
    #[command(flatten)]
    pub migration: Migration,
    /// With --etcd (workers of other processes may join): the cluster's token, as the
    /// router and workers have it. Without: a fresh token for this process alone.
    #[command(flatten)]
    pub token: TokenFlags,
    /// Address every listener binds to (loopback by default).
    #[arg(long, env = "TANDEM_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Compute threads per worker (default: the cores shared out among all the workers).
    #[arg(long, env = "TANDEM_THREADS_PER_WORKER")]
    pub threads_per_worker: Option<usize>,
    /// KV between the workers over TCP only (no shared memory).
    #[arg(long, env = "TANDEM_NO_SHM")]
    pub no_shm: bool,
    #[command(flatten)]
    pub placement: Placement,
    /// Requests the router holds in flight at most; beyond, RESOURCE_EXHAUSTED.
    #[arg(long, env = "TANDEM_MAX_INFLIGHT", default_value_t = 512)]
    pub max_inflight: usize,
    #[command(flatten)]
    pub quotas: QuotaFlags,
}

pub fn up(a: UpArgs) -> Result<()> {
    let models = a.common.served()?;
    if a.decode_workers == 0 {
        bail!("--decode-workers must be at least 1");
    }
    let workers = models.len() * (a.prefill_workers + a.decode_workers);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = a.threads_per_worker.unwrap_or((cores / workers).max(1));
    let rt = runtime()?;
    rt.block_on(async move {
        tandem_router::telemetry::install().map_err(|e| anyhow!("metrics recorder: {e}"))?;
        let cluster = ClusterName::new(a.common.cluster.clone()).map_err(|e| anyhow!("{e}"))?;
        let d: Arc<dyn Discovery> = match discovery(&a.common).await? {
            Some(d) => d,
            None => Arc::new(InMemoryDiscovery::new()),
        };
        let token = match (&a.token.cluster_token_file, &a.common.etcd) {
            // One process, nobody else to share it with: the workers' ports still refuse
            // every caller but this process's router.
            (None, None) => tandem_proto::auth::ClusterToken::random(),
            _ => {
                let (token, path) = a.token.load(cluster.as_str())?;
                println!("tandem: cluster token from {}", path.display());
                token
            }
        };
        let ttl = Duration::from_secs(a.common.lease_ttl.max(1));
        let any = SocketAddr::new(a.host, 0);
        let mut running = Vec::new();
        for (id, role, model) in pools(&models, a.prefill_workers, a.decode_workers) {
            let mut cfg = worker_config(id, role, model, &a.worker, threads, any, any);
            if a.host.is_unspecified() {
                // Listening everywhere: the router and the other worker reach it on loopback.
                cfg.advertise_host = "127.0.0.1".into();
            }
            cfg.cluster_token = Some(token.clone());
            cfg.shm = !a.no_shm;
            if a.placement.planner {
                // The planner changes roles: every worker can, and decode workers may prefill
                // a short prompt themselves.
                cfg.elastic = true;
                if cfg.role == Role::Decode {
                    cfg.role = Role::Both;
                }
            }
            let w = RunningWorker::start(cfg, Some((d.clone(), cluster.clone(), ttl)), ROLES)
                .await
                .map_err(|e| anyhow!(e))?;
            println!("tandem: {}", describe(&w));
            running.push(w);
        }
        let flags = RouterFlags {
            models: models.clone(),
            placement: &a.placement,
            block_size: a.worker.block_size,
            max_inflight: a.max_inflight,
            keys: &a.keys,
            http: &a.http,
            migration: &a.migration,
            quotas: &a.quotas,
            scheduling_policy: a.worker.scheduling_policy.get().name(),
        };
        let listen = (SocketAddr::new(a.host, a.grpc_port), SocketAddr::new(a.host, a.http_port));
        // One process on one machine: nothing crosses a network to encrypt.
        let rcfg = flags.config(listen, None, token.clone())?;
        let router = RunningRouter::start(rcfg, d.clone(), cluster).await.map_err(|e| anyhow!(e))?;
        if !router.wait_for_workers(running.len(), Duration::from_secs(30)).await {
            bail!("the router did not see its {} workers register within 30 s", running.len());
        }
        let mode = if a.prefill_workers == 0 { "aggregated" } else { "disaggregated" };
        let per_model = if models.len() > 1 { " per model" } else { "" };
        println!(
            "tandem: router grpc {} http {} ({mode}: {} prefill, {} decode{per_model}, {threads} thread(s) each; {}{})",
            router.grpc_addr,
            router.http_addr.map(|a| a.to_string()).unwrap_or_default(),
            a.prefill_workers,
            a.decode_workers,
            model_words(&models),
            if a.keys.keys().is_empty() { "" } else { "; API keys required" }
        );
        if let Some(h) = router.http_addr {
            println!("tandem: OpenAI-compatible API at http://{h}/v1");
        }
        println!("tandem: ready");
        shutdown_signal().await;
        println!("tandem: draining");
        let deadline = Duration::from_secs(a.common.drain_timeout);
        let mut clean = router.drain(deadline).await;
        let drains: Vec<_> = running.into_iter().map(|w| tokio::spawn(w.drain(deadline))).collect();
        for d in drains {
            clean &= d.await.unwrap_or(false);
        }
        d.shutdown().await;
        println!("tandem: stopped{}", if clean { "" } else { " (some requests did not finish in time)" });
        Ok(())
    })
}

/// The workers of every model's pool: (id, role, model). One model keeps the ids
/// `prefill-0`, `decode-0`, ...; several prefix each with its model's name. With no
/// prefill worker, the decode workers have role `both`.
fn pools(models: &[ModelSpec], prefill: usize, decode: usize) -> Vec<(String, Role, &ModelSpec)> {
    let decode_role = if prefill == 0 { Role::Both } else { Role::Decode };
    let mut out = Vec::new();
    for m in models {
        let prefix = if models.len() > 1 { format!("{}-", id_part(&m.name)) } else { String::new() };
        out.extend((0..prefill).map(|i| (format!("{prefix}prefill-{i}"), Role::Prefill, m)));
        out.extend((0..decode).map(|i| (format!("{prefix}decode-{i}"), decode_role, m)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_model_gets_its_own_pool() {
        let spec = |n: &str| ModelSpec { name: n.into(), path: "m.gguf".into() };
        let ids = |models: &[ModelSpec], p, d| {
            pools(models, p, d).into_iter().map(|(id, role, m)| format!("{id}/{role}/{}", m.name)).collect::<Vec<_>>()
        };
        assert_eq!(ids(&[spec("smol")], 1, 1), ["prefill-0/prefill/smol", "decode-0/decode/smol"]);
        assert_eq!(
            ids(&[spec("smol"), spec("qwen coder")], 1, 2),
            [
                "smol-prefill-0/prefill/smol",
                "smol-decode-0/decode/smol",
                "smol-decode-1/decode/smol",
                "qwen-coder-prefill-0/prefill/qwen coder",
                "qwen-coder-decode-0/decode/qwen coder",
                "qwen-coder-decode-1/decode/qwen coder",
            ]
        );
        assert_eq!(ids(&[spec("a"), spec("b")], 0, 1), ["a-decode-0/both/a", "b-decode-0/both/b"]);
    }
}
