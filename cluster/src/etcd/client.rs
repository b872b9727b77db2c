//! `EtcdClient`: the few etcd v3 calls discovery makes (range, put, lease grant,
//! revoke and keep-alive, prefix watch), over tonic clients generated from
//! `proto/etcd.proto` at build time.
//!
//! It owns no task and no retry: each call is one request, and the callers
//! (`registration`, `watch`) put a deadline on it and decide what a failure means.
//! Connections open lazily, so a client can be made while etcd is down.

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::EtcdConfig;

/// The generated messages and clients (package `etcdserverpb`, etcd's own names).
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::watch_client::WatchClient;

/// What one etcd call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// An endpoint that is not a URL tonic accepts.
    #[error("invalid etcd endpoint {endpoint:?}: {source}")]
    Endpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// etcd (or the connection to it) answered with a gRPC status.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// A keep-alive was answered with no TTL: etcd does not know the lease.
    #[error("lease {0:x} not found")]
    LeaseNotFound(i64),
    /// A grant etcd refused in the response body rather than with a status.
    #[error("lease grant refused: {0}")]
    Refused(String),
    /// A stream ended while an answer was awaited.
    #[error("{0} stream closed")]
    StreamClosed(&'static str),
}

impl EtcdError {
    /// True for failures of reaching etcd rather than refusals by it: worth retrying
    /// as they are. etcd's own errors carry an `etcdserver:` message.
    pub fn is_unavailable(&self) -> bool {
        match self {
            EtcdError::Status(s) => {
                matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown)
                    && !s.message().starts_with("etcdserver:")
            }
            EtcdError::StreamClosed(_) => true,
            EtcdError::Endpoint { .. } | EtcdError::LeaseNotFound(_) | EtcdError::Refused(_) => false,
        }
    }

    /// True if etcd says the lease does not exist (expired or revoked).
    pub fn is_lease_not_found(&self) -> bool {
        match self {
            EtcdError::LeaseNotFound(_) => true,
            EtcdError::Status(s) => s.code() == tonic::Code::NotFound,
            _ => false,
        }
    }
}

/// A handle on one etcd cluster. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct EtcdClient {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    watch: WatchClient<Channel>,
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient").finish_non_exhaustive()
    }
}

/// Requests queued on a stream before the caller reads: one in flight is the norm.
const STREAM_QUEUE: usize = 4;

impl EtcdClient {
    /// A client for `config.endpoints` (requests spread over them), with the config's
    /// connect deadline and HTTP/2 pings. Opens no connection yet.
    pub fn new(config: &EtcdConfig) -> Result<EtcdClient, EtcdError> {
        let endpoints = config
            .endpoints
            .iter()
            .map(|url| {
                Endpoint::from_shared(url.clone())
                    .map(|e| {
                        e.connect_timeout(config.connect_timeout)
                            .http2_keep_alive_interval(config.ping_interval)
                            .keep_alive_timeout(config.ping_timeout)
                            .keep_alive_while_idle(true)
                    })
                    .map_err(|source| EtcdError::Endpoint { endpoint: url.clone(), source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let channel = match endpoints.as_slice() {
            [one] => one.connect_lazy(),
            _ => Channel::balance_list(endpoints.into_iter()),
        };
        Ok(EtcdClient {
            kv: KvClient::new(channel.clone()),
            lease: LeaseClient::new(channel.clone()),
            watch: WatchClient::new(channel),
        })
    }

    /// Reads one key (no key: an empty `kvs`).
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<pb::RangeResponse, EtcdError> {
        let request = pb::RangeRequest { key: key.into(), ..Default::default() };
        Ok(self.kv.clone().range(request).await?.into_inner())
    }

    /// Reads every key that starts with `prefix`, with the revision they were read at
    /// in the header.
    pub async fn get_prefix(&self, prefix: &str) -> Result<pb::RangeResponse, EtcdError> {
        let request =
            pb::RangeRequest { key: prefix.into(), range_end: prefix_end(prefix.as_bytes()), ..Default::default() };
        Ok(self.kv.clone().range(request).await?.into_inner())
    }

    /// Writes `key`, attached to `lease` (0: none).
    pub async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<(), EtcdError> {
        let request = pb::PutRequest { key: key.into(), value: value.to_vec(), lease };
        self.kv.clone().put(request).await?;
        Ok(())
    }

    /// Grants a lease of `ttl_secs`; etcd chooses the id, and may raise the TTL.
    pub async fn lease_grant(&self, ttl_secs: i64) -> Result<pb::LeaseGrantResponse, EtcdError> {
        let granted = self.lease.clone().lease_grant(pb::LeaseGrantRequest { ttl: ttl_secs, id: 0 }).await?;
        let granted = granted.into_inner();
        if !granted.error.is_empty() {
            return Err(EtcdError::Refused(granted.error));
        }
        Ok(granted)
    }

    /// Revokes a lease, deleting every key attached to it.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.lease.clone().lease_revoke(pb::LeaseRevokeRequest { id }).await?;
        Ok(())
    }

    /// Opens a keep-alive stream for lease `id` and renews it once: the stream and the
    /// lease's TTL, or `LeaseNotFound`.
    pub async fn lease_keep_alive(&self, id: i64) -> Result<(LeaseKeepAlive, i64), EtcdError> {
        let (requests, rx) = mpsc::channel(STREAM_QUEUE);
        // etcd answers the call's headers with its first message, so the first request
        // goes in before the call is awaited.
        requests.try_send(pb::LeaseKeepAliveRequest { id }).expect("a new channel has room");
        let responses = self.lease.clone().lease_keep_alive(ReceiverStream::new(rx)).await?.into_inner();
        let mut stream = LeaseKeepAlive { id, requests, responses };
        let ttl = stream.answer().await?;
        Ok((stream, ttl))
    }

    /// Watches every key under `prefix` from `start_revision` on.
    pub async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<WatchStream, EtcdError> {
        let (requests, rx) = mpsc::channel(STREAM_QUEUE);
        let create = pb::WatchCreateRequest {
            key: prefix.into(),
            range_end: prefix_end(prefix.as_bytes()),
            start_revision,
            ..Default::default()
        };
        let request = pb::WatchRequest { request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)) };
        requests.try_send(request).expect("a new channel has room");
        let responses = self.watch.clone().watch(ReceiverStream::new(rx)).await?.into_inner();
        Ok(WatchStream { _requests: requests, responses })
    }
}

/// An open keep-alive stream for one lease.
pub struct LeaseKeepAlive {
    id: i64,
    requests: mpsc::Sender<pb::LeaseKeepAliveRequest>,
    responses: tonic::Streaming<pb::LeaseKeepAliveResponse>,
}

impl LeaseKeepAlive {
    /// Renews the lease once: its remaining TTL, or `LeaseNotFound`.
    pub async fn renew(&mut self) -> Result<i64, EtcdError> {
        self.requests
            .send(pb::LeaseKeepAliveRequest { id: self.id })
            .await
            .map_err(|_| EtcdError::StreamClosed("lease keep-alive"))?;
        self.answer().await
    }

    async fn answer(&mut self) -> Result<i64, EtcdError> {
        match self.responses.message().await? {
            Some(response) if response.ttl > 0 => Ok(response.ttl),
            Some(_) => Err(EtcdError::LeaseNotFound(self.id)),
            None => Err(EtcdError::StreamClosed("lease keep-alive")),
        }
    }
}

/// An open watch. The request side stays open while it lives: etcd ends a watch
/// whose client closed its side.
pub struct WatchStream {
    _requests: mpsc::Sender<pb::WatchRequest>,
    responses: tonic::Streaming<pb::WatchResponse>,
}

impl WatchStream {
    /// The next response; `None` when etcd ended the stream.
    pub async fn message(&mut self) -> Result<Option<pb::WatchResponse>, EtcdError> {
        Ok(self.responses.message().await?)
    }
}

/// The exclusive end of the keys starting with `prefix`: the prefix with its last byte
/// below 0xff raised by one (trailing 0xff bytes dropped); `\0` (every key) if none is.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_cover_exactly_the_prefix() {
        assert_eq!(prefix_end(b"/tandem/a/"), b"/tandem/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"a\xff\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn etcd_refusals_are_not_unavailability() {
        let refused = EtcdError::Status(tonic::Status::unavailable("etcdserver: leader changed"));
        assert!(!refused.is_unavailable());
        assert!(EtcdError::Status(tonic::Status::unavailable("tcp connect error")).is_unavailable());
        assert!(
            EtcdError::Status(tonic::Status::not_found("etcdserver: requested lease not found")).is_lease_not_found()
        );
        assert!(EtcdError::LeaseNotFound(7).is_lease_not_found());
        assert!(!EtcdError::StreamClosed("watch").is_lease_not_found());
    }
}
