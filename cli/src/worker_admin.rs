//! `tandem worker ...`: calls on one running worker's control API, as the router and
//! the planner make them, with the cluster's token (and its TLS, when the cluster uses
//! it).
//!
//! - `tandem worker set-role --worker HOST:PORT --role prefill|decode|both`: changes an
//!   elastic worker's role (`SetRole`): it drains what it holds, then registers again
//!   under the new role.
//! - `tandem worker migrate --worker HOST:PORT (--request ID | --count N) [--to ID]`: asks
//!   the routers of running decodes to move them live to another decode worker (`Migrate`,
//!   step `REQUEST`).

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use tandem_cluster::Role;
use tandem_proto::tandem::worker::v1 as pb;
use tonic::transport::Endpoint;

use crate::cluster_token::TokenFlags;
use crate::serve::TlsFlags;

#[derive(Subcommand, Debug)]
pub enum WorkerCommand {
    /// Change an elastic worker's role while it runs (it drains first).
    SetRole(SetRoleArgs),
    /// Move running decodes off a worker, live (their KV moves; nothing is recomputed).
    Migrate(MigrateArgs),
}

/// Which worker a command calls, and how.
#[derive(Args, Debug)]
pub struct WorkerTarget {
    /// The worker's gRPC address (HOST:PORT), as `tandem prefill`/`decode` printed it.
    #[arg(long)]
    pub worker: String,
    /// The cluster the worker serves (names the default token file).
    #[arg(long, env = "TANDEM_CLUSTER", default_value = "default")]
    pub cluster: String,
    #[command(flatten)]
    pub token: TokenFlags,
    #[command(flatten)]
    pub tls: TlsFlags,
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub target: WorkerTarget,
    /// The request to move: its id on the worker (as the worker's log names it, decimal
    /// or 0x-hex).
    #[arg(long, conflicts_with = "count")]
    pub request: Option<String>,
    /// Move this many of the longest-running decodes instead.
    #[arg(long)]
    pub count: Option<u32>,
    /// The destination's worker id; default: the router picks the least loaded.
    #[arg(long)]
    pub to: Option<String>,
    /// Move them as a leaving worker's: recomputed elsewhere where their KV cannot move
    /// (by default they stay).
    #[arg(long)]
    pub required: bool,
}

#[derive(Args, Debug)]
pub struct SetRoleArgs {
    #[command(flatten)]
    pub target: WorkerTarget,
    /// The new role: prefill, decode or both.
    #[arg(long)]
    pub role: String,
    /// Seconds in-flight work may take to finish; past them the role stays as it was.
    #[arg(long, default_value_t = 120)]
    pub deadline_s: u32,
}

pub fn run(cmd: WorkerCommand) -> Result<()> {
    match cmd {
        WorkerCommand::SetRole(a) => set_role(a),
        WorkerCommand::Migrate(a) => migrate(a),
    }
}

/// The cluster's token and, when the cluster uses it, the TLS a worker is called with.
fn credentials(
    t: &WorkerTarget,
) -> Result<(tandem_proto::auth::ClusterToken, Option<tonic::transport::ClientTlsConfig>)> {
    let (token, _) = t.token.load(&t.cluster)?;
    let tls = match t.tls.files()? {
        Some(files) => Some(tandem_router::server::worker_tls(&files).map_err(|e| anyhow!(e))?),
        None => None,
    };
    Ok((token, tls))
}

/// A client of the worker at `addr` (HOST:PORT), with the cluster's token and TLS.
async fn connect(
    addr: &str,
    token: &tandem_proto::auth::ClusterToken,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> Result<pb::worker_client::WorkerClient<tandem_proto::auth::WorkerChannel>> {
    let host = addr.split_once("://").map_or(addr, |(_, h)| h);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{host}")).context("--worker")?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to worker {host}"))?;
    Ok(tandem_proto::auth::worker_client(channel, Some(token)))
}

fn migrate(a: MigrateArgs) -> Result<()> {
    let request_id = match &a.request {
        Some(r) => {
            let parsed = match r.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => r.parse(),
            };
            parsed.map_err(|_| anyhow!("--request {r:?}: expected a request id (decimal or 0x-hex)"))?
        }
        None => 0,
    };
    let count = match (request_id, a.count) {
        (0, None | Some(0)) => bail!("name a request (--request) or how many to move (--count)"),
        (_, c) => c.unwrap_or(0),
    };
    let (token, tls) = credentials(&a.target)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let mut client = connect(&a.target.worker, &token, tls).await?;
        let req = pb::MigrateRequest {
            request_id,
            step: pb::MigrateStep::Request as i32,
            to_worker: a.to.clone().unwrap_or_default(),
            count,
            required: a.required,
            ..Default::default()
        };
        let r = tokio::time::timeout(Duration::from_secs(30), client.migrate(req))
            .await
            .map_err(|_| anyhow!("worker {} did not answer within 30 s", a.target.worker))?
            .map_err(|s| anyhow!("worker {}: {}: {}", a.target.worker, s.code(), s.message()))?
            .into_inner();
        let ids: Vec<String> = r.request_ids.iter().map(|id| id.to_string()).collect();
        println!("worker {}: {} request(s) asked to move: {}", a.target.worker, ids.len(), ids.join(" "));
        Ok(())
    })
}

fn set_role(a: SetRoleArgs) -> Result<()> {
    let role = Role::parse(&a.role).ok_or_else(|| anyhow!("--role {:?}: expected prefill, decode or both", a.role))?;
    let (token, tls) = credentials(&a.target)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let host = a.target.worker.split_once("://").map_or(a.target.worker.as_str(), |(_, h)| h);
        let mut client = connect(&a.target.worker, &token, tls).await?;
        let req = pb::SetRoleRequest { role: role.to_pb(), deadline_ms: Some(a.deadline_s.saturating_mul(1000)) };
        // The worker answers within its drain deadline; a little more for the re-registration.
        let wait = Duration::from_secs(a.deadline_s as u64 + 30);
        let r = tokio::time::timeout(wait, client.set_role(req))
            .await
            .map_err(|_| anyhow!("worker {host} did not answer within {} s", wait.as_secs()))?
            .map_err(|s| anyhow!("worker {host}: {}: {}", s.code(), s.message()))?
            .into_inner();
        let name = |n: i32| Role::from_pb(n).map_or("unspecified", |r| r.as_str());
        if !r.changed {
            println!("worker {host} is already {}", name(r.role));
            return Ok(());
        }
        if Role::from_pb(r.role) != Some(role) {
            bail!("worker {host} answered role {}, not {role}", name(r.role));
        }
        println!("worker {host}: {} -> {} (drained in {:.0} ms)", name(r.previous), name(r.role), r.drained_ms);
        Ok(())
    })
}
