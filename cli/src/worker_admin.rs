//! `tandem worker ...`: calls on one running worker's control API, as the router and
//! the planner make them, with the cluster's token (and its TLS, when the cluster uses
//! it).
//!
//! - `tandem worker set-role --worker HOST:PORT --role prefill|decode|both`: changes an
//!   elastic worker's role (`SetRole`): it drains what it holds, then registers again
//!   under the new role.

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
}

#[derive(Args, Debug)]
pub struct SetRoleArgs {
    /// The worker's gRPC address (HOST:PORT), as `tandem prefill`/`decode` printed it.
    #[arg(long)]
    pub worker: String,
    /// The new role: prefill, decode or both.
    #[arg(long)]
    pub role: String,
    /// Seconds in-flight work may take to finish; past them the role stays as it was.
    #[arg(long, default_value_t = 120)]
    pub deadline_s: u32,
    /// The cluster the worker serves (names the default token file).
    #[arg(long, env = "TANDEM_CLUSTER", default_value = "default")]
    pub cluster: String,
    #[command(flatten)]
    pub token: TokenFlags,
    #[command(flatten)]
    pub tls: TlsFlags,
}

pub fn run(cmd: WorkerCommand) -> Result<()> {
    match cmd {
        WorkerCommand::SetRole(a) => set_role(a),
    }
}

fn set_role(a: SetRoleArgs) -> Result<()> {
    let role = Role::parse(&a.role).ok_or_else(|| anyhow!("--role {:?}: expected prefill, decode or both", a.role))?;
    let (token, _) = a.token.load(&a.cluster)?;
    let tls = match a.tls.files()? {
        Some(files) => Some(tandem_router::server::worker_tls(&files).map_err(|e| anyhow!(e))?),
        None => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let host = a.worker.split_once("://").map_or(a.worker.as_str(), |(_, h)| h);
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
        let mut client = tandem_proto::auth::worker_client(channel, Some(&token));
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
