//! `Members`: the worker records under one cluster's prefix, and the one descriptor per
//! worker id that watchers have been told about.
//!
//! Keys carry the role, so one id can briefly have two records (a worker that came
//! back in another role before its old lease expired). Watchers see one worker per id:
//! the newest record wins, and `Removed` is sent only when no record of the id is left.
//! Both discovery implementations keep their state here. Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::descriptor::{WorkerDescriptor, WorkerId};
use crate::discovery::DiscoveryEvent;

/// One stored record. `revision` orders records (etcd's mod revision, or the in-memory
/// generation): higher is newer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub descriptor: WorkerDescriptor,
    pub revision: i64,
}

#[derive(Debug, Default)]
pub(crate) struct Members {
    records: HashMap<String, Record>,
    /// What watchers currently believe, by id.
    current: BTreeMap<WorkerId, WorkerDescriptor>,
}

impl Members {
    /// Members holding `records`, with nothing reported yet: `current()` is the snapshot.
    pub fn from_records(records: HashMap<String, Record>) -> Members {
        let mut members = Members::default();
        members.replace(records);
        members
    }

    pub fn record(&self, key: &str) -> Option<&Record> {
        self.records.get(key)
    }

    /// The workers as watchers see them, in id order.
    pub fn current(&self) -> impl Iterator<Item = &WorkerDescriptor> {
        self.current.values()
    }

    /// Stores `record` at `key`; the event watchers must see, if any.
    pub fn put(&mut self, key: String, record: Record) -> Option<DiscoveryEvent> {
        let id = record.descriptor.id.clone();
        let old = self.records.insert(key, record);
        let old_id = old.map(|r| r.descriptor.id).filter(|old_id| *old_id != id);
        // A key's id never changes (it is in the key), but stay exact if it did.
        if let Some(old_id) = old_id {
            let _ = self.reconcile(&old_id);
        }
        self.reconcile(&id)
    }

    /// Removes the record at `key`; the event watchers must see, if any.
    pub fn delete(&mut self, key: &str) -> Option<DiscoveryEvent> {
        let record = self.records.remove(key)?;
        self.reconcile(&record.descriptor.id)
    }

    /// Replaces every record (after a re-list); the events that take watchers from
    /// what they believed to the new state, removals first, each id at most once.
    pub fn replace(&mut self, records: HashMap<String, Record>) -> Vec<DiscoveryEvent> {
        self.records = records;
        let ids: BTreeSet<WorkerId> =
            self.current.keys().cloned().chain(self.records.values().map(|r| r.descriptor.id.clone())).collect();
        let mut events: Vec<DiscoveryEvent> = ids.iter().filter_map(|id| self.reconcile(id)).collect();
        events.sort_by_key(|e| matches!(e, DiscoveryEvent::Added(_)));
        events
    }

    /// Brings `current[id]` in line with the newest record of `id`.
    fn reconcile(&mut self, id: &WorkerId) -> Option<DiscoveryEvent> {
        let newest = self.records.values().filter(|r| r.descriptor.id == *id).max_by_key(|r| r.revision);
        match (newest, self.current.get(id)) {
            (Some(r), Some(told)) if r.descriptor == *told => None,
            (Some(r), _) => {
                self.current.insert(id.clone(), r.descriptor.clone());
                Some(DiscoveryEvent::Added(r.descriptor.clone()))
            }
            (None, Some(_)) => {
                self.current.remove(id);
                Some(DiscoveryEvent::Removed(id.clone()))
            }
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptor::{test_descriptor as descriptor, Role};

    fn rec(name: &str, role: Role, revision: i64) -> Record {
        Record { descriptor: descriptor(name, role), revision }
    }

    fn added(name: &str, role: Role) -> Option<DiscoveryEvent> {
        Some(DiscoveryEvent::Added(descriptor(name, role)))
    }

    fn removed(name: &str) -> Option<DiscoveryEvent> {
        Some(DiscoveryEvent::Removed(WorkerId::new(name).unwrap()))
    }

    #[test]
    fn put_and_delete() {
        let mut m = Members::default();
        assert_eq!(m.put("k/p0".into(), rec("p0", Role::Prefill, 1)), added("p0", Role::Prefill));
        assert_eq!(m.put("k/p0".into(), rec("p0", Role::Prefill, 2)), None, "same descriptor: nothing new");
        let mut moved = rec("p0", Role::Prefill, 3);
        moved.descriptor.grpc_addr = "elsewhere:1".into();
        assert_eq!(m.put("k/p0".into(), moved.clone()), Some(DiscoveryEvent::Added(moved.descriptor)));
        assert_eq!(m.delete("k/p0"), removed("p0"));
        assert_eq!(m.delete("k/p0"), None);
        assert_eq!(m.current().count(), 0);
    }

    #[test]
    fn one_worker_per_id_across_roles() {
        let mut m = Members::default();
        assert_eq!(m.put("prefill/w".into(), rec("w", Role::Prefill, 1)), added("w", Role::Prefill));
        // Back as decode before the prefill lease expired: the newer record wins.
        assert_eq!(m.put("decode/w".into(), rec("w", Role::Decode, 5)), added("w", Role::Decode));
        // The old record going away is no news.
        assert_eq!(m.delete("prefill/w"), None);
        assert_eq!(m.current().map(|d| d.role).collect::<Vec<_>>(), [Role::Decode]);
        assert_eq!(m.delete("decode/w"), removed("w"));

        // The other order: the newest record goes first, the older one takes over.
        m.put("prefill/w".into(), rec("w", Role::Prefill, 6));
        m.put("decode/w".into(), rec("w", Role::Decode, 7));
        assert_eq!(m.delete("decode/w"), added("w", Role::Prefill));
    }

    #[test]
    fn replace_reports_the_difference() {
        let mut m = Members::from_records(HashMap::from([
            ("a".to_string(), rec("a", Role::Prefill, 1)),
            ("b".to_string(), rec("b", Role::Decode, 2)),
        ]));
        assert_eq!(m.current().count(), 2);
        let mut b2 = rec("b", Role::Decode, 9);
        b2.descriptor.block_size = 32;
        let events =
            m.replace(HashMap::from([("b".to_string(), b2.clone()), ("c".to_string(), rec("c", Role::Both, 8))]));
        assert_eq!(
            events,
            vec![removed("a").unwrap(), DiscoveryEvent::Added(b2.descriptor), added("c", Role::Both).unwrap()]
        );
        assert_eq!(m.replace(m.records.clone()), vec![], "same records: no events");
        assert_eq!(m.record("c").map(|r| r.revision), Some(8));
    }
}
