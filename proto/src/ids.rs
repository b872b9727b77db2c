//! The numbers that cross process boundaries, as types: `ClusterRequestId`, the
//! router's per-attempt id of a request that workers and the KV transport key on, and
//! `LeaseId`, a worker's discovery lease (etcd's lease id), which fences KV from a
//! replaced worker. The protos and kvtransfer's frames carry them as plain integers;
//! they are converted where a message is read or built, and nowhere else.
//!
//! Not here: the engine's own `RequestId` (one engine's sequence numbering, which never
//! leaves the process) and `BlockId` (`tandem_kernels::block`, shared with the engine).

use std::fmt;
use std::num::NonZeroI64;

/// `Debug` and `Display` of an id are its bare number, as logs and frames have always
/// printed it (a frame's `Debug` reads `Open { request_id: 7 }`).
macro_rules! prints_as_its_number {
    ($id:ty) => {
        impl fmt::Debug for $id {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl fmt::Display for $id {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

/// The cluster-wide id of one attempt at a request: chosen by the router, carried in
/// `tandem.worker.v1`'s `request_id` fields and in every kvtransfer frame and session.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterRequestId(pub u64);

prints_as_its_number!(ClusterRequestId);

/// Hex, as logs of random ids print them.
impl fmt::LowerHex for ClusterRequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

/// A discovery lease: the etcd lease a worker's record is held by (a registration's
/// generation in memory). Never zero; "no lease" (a sender that announces none, a
/// reservation that takes KV from any sender) is `Option::None`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(NonZeroI64);

impl LeaseId {
    /// The lease of a wire field (a proto's `int64`, a Hello's lease), where 0 means none.
    pub fn from_wire(id: i64) -> Option<LeaseId> {
        NonZeroI64::new(id).map(LeaseId)
    }

    /// The wire field for `lease`: its id, or 0 for none.
    pub fn to_wire(lease: Option<LeaseId>) -> i64 {
        lease.map_or(0, |l| l.0.get())
    }

    /// The id, for logs.
    pub fn get(self) -> i64 {
        self.0.get()
    }
}

prints_as_its_number!(LeaseId);

/// Hex, as etcd's tools print lease ids.
impl fmt::LowerHex for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0.get(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_on_the_wire_is_no_lease_and_every_other_id_round_trips() {
        assert_eq!(LeaseId::from_wire(0), None);
        assert_eq!(LeaseId::to_wire(None), 0);
        for id in [1, -1, i64::MIN, i64::MAX, -0x1234_5678_9abc] {
            let lease = LeaseId::from_wire(id);
            assert_eq!(lease.map(LeaseId::get), Some(id));
            assert_eq!(LeaseId::to_wire(lease), id);
        }
        assert_eq!(format!("{:x}", LeaseId::from_wire(255).unwrap()), "ff");
    }

    #[test]
    fn a_request_id_prints_as_its_number() {
        assert_eq!(format!("{:?} {}", ClusterRequestId(7), ClusterRequestId(8)), "7 8");
    }
}
