//! The etcd side of `list_and_watch`: list the prefix, then watch it from the revision
//! after the list, forever.
//!
//! When the watch breaks (etcd down, connection lost, watch cancelled or compacted),
//! the task keeps its last view and sends nothing; it retries with backoff, lists
//! again, reports the difference from what it had reported, and watches on from the
//! new list's revision. Records that do not decode are logged and left out.

use std::collections::HashMap;

use tandem_proto::ids::LeaseId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::client::pb::{event::EventType, KeyValue};
use super::client::EtcdClient;
use super::{deadline, EtcdConfig};
use crate::backoff::{sleep_or_cancel, Backoff};
use crate::descriptor::WorkerDescriptor;
use crate::discovery::DiscoveryEvent;
use crate::error::DiscoveryError;
use crate::members::{Members, Record};

/// The records under `prefix` and the revision they were read at.
pub(super) async fn list(
    client: &EtcdClient,
    prefix: &str,
    timeout: std::time::Duration,
) -> Result<(HashMap<String, Record>, i64), DiscoveryError> {
    let response = deadline("get", timeout, client.get_prefix(prefix)).await?;
    let revision = response.header.as_ref().map_or(0, |h| h.revision);
    Ok((response.kvs.iter().filter_map(decode).collect(), revision))
}

/// A worker record from a key-value pair, or `None` (logged) if it is not one.
fn decode(kv: &KeyValue) -> Option<(String, Record)> {
    let key = match std::str::from_utf8(&kv.key) {
        Ok(key) => key,
        Err(_) => {
            tracing::warn!(key = ?kv.key, "ignoring a non-UTF-8 key under the workers prefix");
            return None;
        }
    };
    match WorkerDescriptor::from_json(key, &kv.value) {
        Ok(descriptor) => {
            let descriptor = WorkerDescriptor { lease: LeaseId::from_wire(kv.lease), ..descriptor };
            Some((key.to_string(), Record { descriptor, revision: kv.mod_revision }))
        }
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a worker record");
            None
        }
    }
}

pub(super) struct Watcher {
    client: EtcdClient,
    prefix: String,
    members: Members,
    tx: mpsc::UnboundedSender<DiscoveryEvent>,
    cancel: CancellationToken,
    config: EtcdConfig,
    /// Failed attempts since the watch last worked.
    failures: u32,
}

/// Why one watch stream ended.
enum Ended {
    Cancelled,
    /// Resync and watch again.
    Broken(String),
}

impl Watcher {
    pub(super) fn new(
        client: EtcdClient,
        prefix: String,
        members: Members,
        tx: mpsc::UnboundedSender<DiscoveryEvent>,
        cancel: CancellationToken,
        config: EtcdConfig,
    ) -> Watcher {
        Watcher { client, prefix, members, tx, cancel, config, failures: 0 }
    }

    /// Watches from `revision + 1` (the list was read at `revision`) until cancelled or
    /// the receiver is gone.
    pub(super) async fn run(mut self, mut revision: i64) {
        let mut backoff = Backoff::new(self.config.retry_min, self.config.retry_max);
        loop {
            match self.watch_from(revision + 1, &mut backoff).await {
                Ended::Cancelled => return,
                Ended::Broken(why) => self.failed("worker watch", &why),
            }
            // Events may have been missed: list again (until it works), then watch on.
            revision = loop {
                if !sleep_or_cancel(&self.cancel, backoff.next_wait()).await {
                    return;
                }
                let listed = tokio::select! {
                    biased;
                    _ = self.cancel.cancelled() => return,
                    r = list(&self.client, &self.prefix, self.config.request_timeout) => r,
                };
                match listed {
                    Ok((records, at)) => {
                        let events = self.members.replace(records);
                        let changes = events.len();
                        tracing::debug!(prefix = self.prefix, revision = at, changes, "worker list resynced");
                        if !self.send_all(events) {
                            return;
                        }
                        break at;
                    }
                    Err(e) => self.failed("listing workers", &e),
                }
            };
        }
    }

    /// Logs a failure: the first of a streak as a warning, the rest as debug lines, so
    /// an outage does not flood the log.
    fn failed(&mut self, what: &str, why: &dyn std::fmt::Display) {
        if self.failures == 0 {
            tracing::warn!(prefix = self.prefix, reason = %why, "{what} failed; keeping the last view and retrying");
        } else {
            tracing::debug!(prefix = self.prefix, reason = %why, attempt = self.failures + 1, "{what} failed again");
        }
        self.failures += 1;
    }

    /// One watch stream from `start`, applied until it ends.
    async fn watch_from(&mut self, start: i64, backoff: &mut Backoff) -> Ended {
        let timeout = self.config.request_timeout;
        let opened = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return Ended::Cancelled,
            r = deadline("watch", timeout, self.client.watch_prefix(&self.prefix, start)) => r,
        };
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(e) => return Ended::Broken(e.to_string()),
        };
        loop {
            let message = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Ended::Cancelled,
                m = stream.message() => m,
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) => return Ended::Broken("stream ended".into()),
                Err(e) => return Ended::Broken(DiscoveryError::etcd("watch", e).to_string()),
            };
            if response.canceled {
                let why = format!(
                    "watch cancelled by etcd (compact revision {}): {}",
                    response.compact_revision, response.cancel_reason
                );
                return Ended::Broken(why);
            }
            if response.created {
                backoff.reset();
                if self.failures > 0 {
                    tracing::info!(prefix = self.prefix, failures = self.failures, "worker watch resumed");
                    self.failures = 0;
                }
            }
            for event in &response.events {
                let Some(kv) = &event.kv else { continue };
                let key = std::str::from_utf8(&kv.key).ok();
                let change = match event.r#type() {
                    EventType::Put => match decode(kv) {
                        Some((key, record)) => self.members.put(key, record),
                        // An undecodable overwrite removes the worker.
                        None => key.and_then(|key| self.members.delete(key)),
                    },
                    EventType::Delete => key.and_then(|key| self.members.delete(key)),
                };
                if let Some(change) = change {
                    if self.tx.send(change).is_err() {
                        return Ended::Cancelled;
                    }
                }
            }
        }
    }

    /// False if the receiver is gone.
    fn send_all(&self, events: Vec<DiscoveryEvent>) -> bool {
        events.into_iter().all(|e| self.tx.send(e).is_ok())
    }
}
