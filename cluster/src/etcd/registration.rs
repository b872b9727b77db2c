//! The etcd side of a `Registration`: one lease, one key, and the task that keeps them.
//!
//! The task renews the lease every TTL/3. A broken stream is reopened on the same
//! lease after a backoff (etcd may be restarting: it keeps leases across restarts);
//! a lease etcd no longer knows (expired while we were cut off, or revoked) is replaced
//! by a new one and the key put again. It stops when told: on deregistration it revokes
//! the lease, which deletes the key; on stop it just ends, and the lease runs out.

use std::time::Duration;

use tandem_proto::ids::LeaseId;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{EtcdClient, EtcdError};
use super::{deadline, EtcdConfig, EtcdDiscovery};
use crate::backoff::Backoff;
use crate::descriptor::{worker_key, ClusterName, WorkerDescriptor, WorkerId};
use crate::discovery::{LeaseState, Registration, RegistrationSignals};
use crate::error::DiscoveryError;

/// A granted lease.
#[derive(Debug, Clone, Copy)]
struct Lease {
    id: LeaseId,
    /// As granted: etcd raises a TTL below its minimum.
    ttl: Duration,
}

/// Why the keep-alive loop or a wait ended.
enum Signal {
    Stop,
    Deregister,
}

enum Ended {
    Signal(Signal),
    /// etcd no longer has the lease: register again.
    Expired,
    /// The keep-alive stream failed; the lease may still be alive.
    Broken(DiscoveryError),
}

/// Grants a lease, puts the worker's key with it, and starts the task that keeps it.
pub(super) async fn register(
    discovery: &EtcdDiscovery,
    cluster: &ClusterName,
    descriptor: WorkerDescriptor,
    ttl: Duration,
) -> Result<Registration, DiscoveryError> {
    let ttl_secs = whole_seconds(ttl)?;
    let key = worker_key(cluster, descriptor.role, &descriptor.id);
    let value = descriptor.to_json()?;
    let client = discovery.client.clone();
    let config = discovery.config.clone();
    let lease = grant_and_put(&client, &key, &value, ttl_secs, config.request_timeout).await?;
    tracing::info!(worker = %descriptor.id, key, lease = lease.id.get(), ttl = ?lease.ttl, "registered in etcd");

    let signals = RegistrationSignals { stop: discovery.root.child_token(), deregister: CancellationToken::new() };
    let (state, held) = tokio::sync::watch::channel(LeaseState::Held(lease.id));
    let deregister_deadline = config.request_timeout + Duration::from_secs(1);
    let keeper = Keeper {
        client,
        worker: descriptor.id.clone(),
        key,
        value,
        ttl_secs,
        config,
        signals: signals.clone(),
        failures: 0,
        state,
    };
    let task = discovery.tasks.spawn(keeper.run(lease));
    Ok(Registration::new(descriptor.id, signals, task, deregister_deadline, held))
}

/// etcd TTLs are whole seconds: round up, at least one.
fn whole_seconds(ttl: Duration) -> Result<i64, DiscoveryError> {
    if ttl.is_zero() {
        return Err(DiscoveryError::InvalidArgument("registration ttl must be positive".into()));
    }
    let secs = ttl.as_secs().saturating_add(u64::from(ttl.subsec_nanos() > 0));
    i64::try_from(secs).map_err(|_| DiscoveryError::InvalidArgument(format!("registration ttl {ttl:?} too long")))
}

async fn grant_and_put(
    client: &EtcdClient,
    key: &str,
    value: &[u8],
    ttl_secs: i64,
    timeout: Duration,
) -> Result<Lease, DiscoveryError> {
    let grant = deadline("lease grant", timeout, client.lease_grant(ttl_secs)).await?;
    // etcd's own "no lease" is 0: a grant always names another.
    let id = LeaseId::from_wire(grant.id)
        .ok_or_else(|| DiscoveryError::etcd("lease grant", EtcdError::Refused("granted lease id 0".into())))?;
    let lease = Lease { id, ttl: Duration::from_secs(grant.ttl.max(1) as u64) };
    let put = deadline("put", timeout, client.put(key, value, lease.id.get())).await;
    if let Err(e) = put {
        // The lease holds no key; revoke it rather than leave it to run out (best effort).
        let _ = deadline("lease revoke", timeout, client.lease_revoke(lease.id.get())).await;
        return Err(e);
    }
    Ok(lease)
}

/// True if the error says etcd does not know the lease.
fn lease_gone(e: &DiscoveryError) -> bool {
    matches!(e, DiscoveryError::Etcd { source, .. } if source.is_lease_not_found())
}

struct Keeper {
    client: EtcdClient,
    worker: WorkerId,
    key: String,
    value: Vec<u8>,
    ttl_secs: i64,
    config: EtcdConfig,
    signals: RegistrationSignals,
    /// Failed attempts since the last success: the first of a streak is a warning, the
    /// rest are debug lines, so an outage does not flood the log.
    failures: u32,
    /// The registration's lease, for the worker (`Registration::lease`).
    state: tokio::sync::watch::Sender<LeaseState>,
}

impl Keeper {
    fn failed(&mut self, what: &str, e: &DiscoveryError) {
        if self.failures == 0 {
            tracing::warn!(worker = %self.worker, error = %e, kind = e.kind(), "{what} failed; retrying with backoff");
        } else {
            tracing::debug!(worker = %self.worker, error = %e, attempt = self.failures + 1, "{what} failed again");
        }
        self.failures += 1;
    }

    fn recovered(&mut self, lease: Lease) {
        if self.failures > 0 {
            tracing::info!(worker = %self.worker, lease = lease.id.get(), failures = self.failures, "lease keep-alives resumed");
            self.failures = 0;
        }
    }

    async fn run(mut self, first: Lease) -> Result<(), DiscoveryError> {
        let mut backoff = Backoff::new(self.config.retry_min, self.config.retry_max);
        let mut lease = Some(first);
        loop {
            let current = match lease {
                Some(current) => current,
                None => {
                    let timeout = self.config.request_timeout;
                    let attempt = tokio::select! {
                        biased;
                        signal = signalled(&self.signals) => return self.finish(signal, None).await,
                        r = grant_and_put(&self.client, &self.key, &self.value, self.ttl_secs, timeout) => r,
                    };
                    match attempt {
                        Ok(new) => {
                            tracing::info!(worker = %self.worker, lease = new.id.get(), "registered again with a new lease");
                            self.state.send_replace(LeaseState::Held(new.id));
                            lease = Some(new);
                            new
                        }
                        Err(e) => {
                            self.failed("registration", &e);
                            if let Some(signal) = self.pause(&mut backoff).await {
                                return self.finish(signal, None).await;
                            }
                            continue;
                        }
                    }
                }
            };
            match self.keep_alive(current, &mut backoff).await {
                Ended::Signal(signal) => return self.finish(signal, Some(current)).await,
                Ended::Expired => {
                    tracing::warn!(worker = %self.worker, lease = current.id.get(), "lease expired; registering again");
                    self.state.send_replace(LeaseState::Lost);
                    lease = None;
                }
                Ended::Broken(e) => {
                    self.failed("lease keep-alive", &e);
                    if let Some(signal) = self.pause(&mut backoff).await {
                        return self.finish(signal, Some(current)).await;
                    }
                }
            }
        }
    }

    /// Renews `lease` every TTL/3 until told to stop or the stream fails.
    async fn keep_alive(&mut self, lease: Lease, backoff: &mut Backoff) -> Ended {
        let interval = (lease.ttl / 3).max(Duration::from_millis(100));
        let timeout = self.config.request_timeout;
        // Opening the stream renews the lease once (and fails if etcd does not know it).
        let opened = tokio::select! {
            biased;
            signal = signalled(&self.signals) => return Ended::Signal(signal),
            r = deadline("lease keep-alive", timeout, self.client.lease_keep_alive(lease.id.get())) => r,
        };
        let mut stream = match opened {
            Ok((stream, _ttl)) => stream,
            Err(e) if lease_gone(&e) => return Ended::Expired,
            Err(e) => return Ended::Broken(e),
        };
        backoff.reset();
        self.recovered(lease);
        let mut sent = Instant::now();
        loop {
            tokio::select! {
                biased;
                signal = signalled(&self.signals) => return Ended::Signal(signal),
                _ = tokio::time::sleep_until(sent + interval) => {}
            }
            sent = Instant::now();
            let renewed = tokio::select! {
                biased;
                signal = signalled(&self.signals) => return Ended::Signal(signal),
                r = deadline("lease keep-alive", interval, stream.renew()) => r,
            };
            match renewed {
                Ok(_ttl) => {}
                Err(e) if lease_gone(&e) => return Ended::Expired,
                Err(e) => return Ended::Broken(e),
            }
        }
    }

    /// Waits out one backoff step; the signal if one came first.
    async fn pause(&self, backoff: &mut Backoff) -> Option<Signal> {
        tokio::select! {
            biased;
            signal = signalled(&self.signals) => Some(signal),
            _ = tokio::time::sleep(backoff.next_wait()) => None,
        }
    }

    /// Ends the task: on deregistration, revokes the lease (deleting the key) unless the
    /// whole discovery is stopping too.
    async fn finish(self, signal: Signal, lease: Option<Lease>) -> Result<(), DiscoveryError> {
        let (Signal::Deregister, Some(lease)) = (signal, lease) else {
            tracing::info!(worker = %self.worker, "registration keep-alives stopped");
            return Ok(());
        };
        let timeout = self.config.request_timeout;
        let revoked = tokio::select! {
            biased;
            _ = self.signals.stop.cancelled() => Err(DiscoveryError::Shutdown),
            r = deadline("lease revoke", timeout, self.client.lease_revoke(lease.id.get())) => r.map(drop),
        };
        match revoked {
            Err(e) if !lease_gone(&e) => Err(e),
            _ => {
                tracing::info!(worker = %self.worker, lease = lease.id.get(), "deregistered from etcd");
                Ok(())
            }
        }
    }
}

async fn signalled(signals: &RegistrationSignals) -> Signal {
    tokio::select! {
        biased;
        _ = signals.deregister.cancelled() => Signal::Deregister,
        _ = signals.stop.cancelled() => Signal::Stop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_round_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::from_secs(2)).unwrap(), 2);
        assert_eq!(whole_seconds(Duration::from_millis(1500)).unwrap(), 2);
        assert_eq!(whole_seconds(Duration::from_millis(1)).unwrap(), 1);
        assert_eq!(whole_seconds(Duration::ZERO).unwrap_err().kind(), "invalid_argument");
        assert_eq!(whole_seconds(Duration::MAX).unwrap_err().kind(), "invalid_argument");
    }
}
