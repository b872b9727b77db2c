//! What a worker tells the cluster about itself, and where that is stored.
//!
//! A `WorkerDescriptor` is written once per registration (as JSON, under the key
//! `/tandem/<cluster>/workers/<role>/<id>`) and read by every router. It holds only
//! what a peer needs to reach and choose the worker; load figures travel elsewhere.
//! This module owns the key layout; it does no I/O.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tandem_proto::ids::LeaseId;

use crate::error::DiscoveryError;

/// Longest cluster name or worker id accepted (a DNS label set is 253).
const MAX_NAME_LEN: usize = 253;

/// Checks that `value` can stand as one segment of an etcd key: non-empty, at most
/// 253 bytes, only ASCII letters, digits and `-_.:`. No `/`, so a key parses back.
fn validate_segment(what: &'static str, value: &str) -> Result<(), DiscoveryError> {
    let reason = if value.is_empty() {
        Some("is empty")
    } else if value.len() > MAX_NAME_LEN {
        Some("is longer than 253 bytes")
    } else if !value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':')) {
        Some("may hold only ASCII letters, digits and '-', '_', '.', ':'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(DiscoveryError::InvalidName { what, value: value.to_string(), reason }),
        None => Ok(()),
    }
}

/// A worker's name, unique within its cluster across roles (a worker registers under
/// one role at a time). Safe to use as an etcd key segment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WorkerId(String);

impl WorkerId {
    pub fn new(id: impl Into<String>) -> Result<WorkerId, DiscoveryError> {
        let id = id.into();
        validate_segment("worker id", &id)?;
        Ok(WorkerId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for WorkerId {
    type Error = DiscoveryError;
    fn try_from(id: String) -> Result<Self, Self::Error> {
        WorkerId::new(id)
    }
}

impl From<WorkerId> for String {
    fn from(id: WorkerId) -> String {
        id.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name of one Tandem cluster; several can share an etcd.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterName(String);

impl ClusterName {
    pub fn new(name: impl Into<String>) -> Result<ClusterName, DiscoveryError> {
        let name = name.into();
        validate_segment("cluster name", &name)?;
        Ok(ClusterName(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which half of a request a worker serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Prefill,
    Decode,
    /// Prefills locally and decodes: the fallback when no prefill worker is free.
    Both,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Prefill, Role::Decode, Role::Both];

    /// The key segment (and JSON spelling) of the role.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Both => "both",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    pub fn can_prefill(self) -> bool {
        matches!(self, Role::Prefill | Role::Both)
    }

    pub fn can_decode(self) -> bool {
        matches!(self, Role::Decode | Role::Both)
    }

    /// The role as `tandem.worker.v1.WorkerRole` numbers it.
    pub fn to_pb(self) -> i32 {
        use tandem_proto::tandem::worker::v1::WorkerRole as W;
        match self {
            Role::Prefill => W::Prefill as i32,
            Role::Decode => W::Decode as i32,
            Role::Both => W::Both as i32,
        }
    }

    /// The role `tandem.worker.v1.WorkerRole` number `n` names (`None`: unspecified or
    /// unknown).
    pub fn from_pb(n: i32) -> Option<Role> {
        use tandem_proto::tandem::worker::v1::WorkerRole as W;
        match W::try_from(n).ok()? {
            W::Prefill => Some(Role::Prefill),
            W::Decode => Some(Role::Decode),
            W::Both => Some(Role::Both),
            W::Unspecified => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a decode worker receives KV blocks (the KV transport's target).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEndpoints {
    /// Always present: the cross-host path.
    pub tcp: SocketAddr,
    /// Present when the worker also listens on a Unix socket backed by shared memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalKvEndpoint>,
}

/// A same-host KV endpoint: used only by a sender whose host id equals `host_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalKvEndpoint {
    pub uds: PathBuf,
    pub host_id: String,
}

/// The model a worker serves. Workers pair only when their fingerprints match: the
/// name is for people, the fingerprint (a hash of the weights and KV layout) is the check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub fingerprint: u64,
}

/// One worker as the cluster sees it. Unknown JSON fields are ignored, so older
/// routers read newer descriptors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerDescriptor {
    pub id: WorkerId,
    pub role: Role,
    /// The worker's gRPC control address (`host:port` or an `http://` URI).
    pub grpc_addr: String,
    pub kv: KvEndpoints,
    pub model: ModelInfo,
    /// Tokens per KV block.
    pub block_size: u32,
    /// How the worker names cached blocks in its KV events (`tandem_text::prefix::SCHEME`,
    /// salt included); with `block_size`, what a router must match to read the worker's
    /// events as hits. `None`: a worker with no prefix cache (`--no-prefix-cache`), or one that
    /// does not say: routed to by load only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_scheme: Option<String>,
    /// Longest sequence (prompt + output) the worker accepts, in tokens.
    pub context_length: u32,
    /// The lease the record is held by, as discovery read it (etcd's lease id; the
    /// registration's generation in memory). Never stored in the record itself: a worker
    /// that lost its lease and registered again has a new one, and KV from its earlier
    /// incarnation is refused by the lease it carries. `None`: unknown.
    #[serde(skip)]
    pub lease: Option<LeaseId>,
}

impl WorkerDescriptor {
    pub fn to_json(&self) -> Result<Vec<u8>, DiscoveryError> {
        serde_json::to_vec(self).map_err(DiscoveryError::Encode)
    }

    /// Decodes the value stored at `key`, checking it agrees with the key's role and id.
    pub fn from_json(key: &str, value: &[u8]) -> Result<WorkerDescriptor, DiscoveryError> {
        let malformed = |reason: String| DiscoveryError::Malformed { key: key.to_string(), reason };
        let d: WorkerDescriptor = serde_json::from_slice(value).map_err(|e| malformed(e.to_string()))?;
        match parse_worker_key(key) {
            Some((role, id)) if role == d.role && id == d.id => Ok(d),
            Some((role, id)) => Err(malformed(format!("record says {}/{}, key says {role}/{id}", d.role, d.id))),
            None => Err(malformed("not a worker key".to_string())),
        }
    }
}

/// `/tandem/<cluster>/workers/`: every worker of the cluster is under it.
pub fn workers_prefix(cluster: &ClusterName) -> String {
    format!("/tandem/{cluster}/workers/")
}

/// `/tandem/<cluster>/workers/<role>/<id>`.
pub fn worker_key(cluster: &ClusterName, role: Role, id: &WorkerId) -> String {
    format!("{}{role}/{id}", workers_prefix(cluster))
}

/// The role and id of a worker key (any cluster); `None` if `key` is not one.
pub fn parse_worker_key(key: &str) -> Option<(Role, WorkerId)> {
    let rest = key.strip_prefix("/tandem/")?;
    let mut parts = rest.split('/');
    let (cluster, workers, role, id) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || workers != "workers" || ClusterName::new(cluster).is_err() {
        return None;
    }
    Some((Role::parse(role)?, WorkerId::new(id).ok()?))
}

/// A complete descriptor for tests.
#[cfg(test)]
pub(crate) fn test_descriptor(id: &str, role: Role) -> WorkerDescriptor {
    WorkerDescriptor {
        id: WorkerId::new(id).unwrap(),
        role,
        grpc_addr: "127.0.0.1:50051".to_string(),
        kv: KvEndpoints {
            tcp: "127.0.0.1:50052".parse().unwrap(),
            local: Some(LocalKvEndpoint { uds: "tandem-kv.sock".into(), host_id: "host-a".into() }),
        },
        model: ModelInfo { name: "smollm2-135m".into(), fingerprint: u64::MAX - 7 },
        block_size: 16,
        hash_scheme: Some("sha256-chain-v1".into()),
        context_length: 8192,
        lease: None,
    }
}

#[cfg(test)]
mod tests {
    use super::test_descriptor as descriptor;
    use super::*;

    #[test]
    fn names_are_key_safe() {
        for ok in ["w1", "prefill-0", "a.b_c:9", &"x".repeat(253)] {
            assert!(WorkerId::new(ok).is_ok(), "{ok}");
            assert!(ClusterName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "a b", "é", &"x".repeat(254)] {
            let e = WorkerId::new(bad).unwrap_err();
            assert_eq!(e.kind(), "invalid_argument", "{bad}");
            assert!(ClusterName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_round_trip() {
        let c = ClusterName::new("prod").unwrap();
        for role in Role::ALL {
            let id = WorkerId::new("w-1").unwrap();
            let key = worker_key(&c, role, &id);
            assert!(key.starts_with(&workers_prefix(&c)));
            assert_eq!(parse_worker_key(&key), Some((role, id)));
        }
        assert_eq!(worker_key(&c, Role::Decode, &WorkerId::new("d0").unwrap()), "/tandem/prod/workers/decode/d0");
        for bad in [
            "/tandem/prod/workers/decode",
            "/tandem/prod/workers/decode/d0/x",
            "/tandem/prod/workerz/decode/d0",
            "/tandem/prod/workers/other/d0",
            "/tandem//workers/decode/d0",
            "tandem/prod/workers/decode/d0",
        ] {
            assert_eq!(parse_worker_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn descriptor_json_round_trips_and_checks_its_key() {
        let c = ClusterName::new("prod").unwrap();
        let d = descriptor("p0", Role::Prefill);
        let json = d.to_json().unwrap();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains(r#""role":"prefill""#), "{text}");
        assert!(text.contains(r#""fingerprint":18446744073709551608"#), "{text}");
        let key = worker_key(&c, Role::Prefill, &d.id);
        assert_eq!(WorkerDescriptor::from_json(&key, &json).unwrap(), d);

        let wrong_role = worker_key(&c, Role::Decode, &d.id);
        assert_eq!(WorkerDescriptor::from_json(&wrong_role, &json).unwrap_err().kind(), "malformed");
        let wrong_id = worker_key(&c, Role::Prefill, &WorkerId::new("p1").unwrap());
        assert_eq!(WorkerDescriptor::from_json(&wrong_id, &json).unwrap_err().kind(), "malformed");
        assert_eq!(WorkerDescriptor::from_json(&key, b"{").unwrap_err().kind(), "malformed");
        let bad_id = text.replace(r#""id":"p0""#, r#""id":"p/0""#);
        assert_eq!(WorkerDescriptor::from_json(&key, bad_id.as_bytes()).unwrap_err().kind(), "malformed");
    }

    #[test]
    fn optional_and_unknown_fields() {
        let mut d = descriptor("d0", Role::Decode);
        d.kv.local = None;
        let text = String::from_utf8(d.to_json().unwrap()).unwrap();
        assert!(!text.contains("local"), "{text}");
        let newer = text.replacen('{', r#"{"added_later":[1,2],"#, 1);
        let key = worker_key(&ClusterName::new("c").unwrap(), Role::Decode, &d.id);
        assert_eq!(WorkerDescriptor::from_json(&key, newer.as_bytes()).unwrap(), d);
    }

    #[test]
    fn role_capabilities() {
        assert!(Role::Prefill.can_prefill() && !Role::Prefill.can_decode());
        assert!(!Role::Decode.can_prefill() && Role::Decode.can_decode());
        assert!(Role::Both.can_prefill() && Role::Both.can_decode());
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
    }
}
