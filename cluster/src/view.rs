//! `ClusterView`: the current set of workers, by role, built from a `list_and_watch`
//! snapshot and its events. This is what the router queries when it picks a pair.
//!
//! Pure: no I/O, no locks, no tokio. Whoever owns the event stream feeds `apply`;
//! sharing the view between tasks is the owner's business.

use std::collections::{BTreeMap, BTreeSet};

use crate::descriptor::{Role, WorkerDescriptor, WorkerId};
use crate::discovery::DiscoveryEvent;

/// What one event did to the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewChange {
    Joined(WorkerId),
    /// The worker re-registered with a different descriptor (possibly a different role).
    Updated(WorkerId),
    Left(WorkerId),
    /// The event restated what the view already held, or removed an unknown worker.
    Unchanged,
}

/// The known workers, indexed by role. Iteration is in worker-id order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    workers: BTreeMap<WorkerId, WorkerDescriptor>,
    by_role: BTreeMap<Role, BTreeSet<WorkerId>>,
    /// Bumped by every change, so a caller can tell cheaply whether to recompute.
    version: u64,
}

impl ClusterView {
    pub fn new() -> ClusterView {
        ClusterView::default()
    }

    /// A view holding `snapshot` (a later duplicate id replaces an earlier one).
    pub fn from_snapshot(snapshot: impl IntoIterator<Item = WorkerDescriptor>) -> ClusterView {
        let mut view = ClusterView::new();
        for d in snapshot {
            view.apply(DiscoveryEvent::Added(d));
        }
        view
    }

    pub fn apply(&mut self, event: DiscoveryEvent) -> ViewChange {
        let change = match event {
            DiscoveryEvent::Added(d) => {
                let id = d.id.clone();
                match self.workers.get(&id) {
                    Some(old) if *old == d => return ViewChange::Unchanged,
                    Some(old) => {
                        let old_role = old.role;
                        self.unindex(old_role, &id);
                        self.index(d.role, &id);
                        self.workers.insert(id.clone(), d);
                        ViewChange::Updated(id)
                    }
                    None => {
                        self.index(d.role, &id);
                        self.workers.insert(id.clone(), d);
                        ViewChange::Joined(id)
                    }
                }
            }
            DiscoveryEvent::Removed(id) => match self.workers.remove(&id) {
                Some(old) => {
                    self.unindex(old.role, &id);
                    ViewChange::Left(id)
                }
                None => return ViewChange::Unchanged,
            },
        };
        self.version += 1;
        change
    }

    fn index(&mut self, role: Role, id: &WorkerId) {
        self.by_role.entry(role).or_default().insert(id.clone());
    }

    fn unindex(&mut self, role: Role, id: &WorkerId) {
        if let Some(set) = self.by_role.get_mut(&role) {
            set.remove(id);
            if set.is_empty() {
                self.by_role.remove(&role);
            }
        }
    }

    pub fn get(&self, id: &WorkerId) -> Option<&WorkerDescriptor> {
        self.workers.get(id)
    }

    pub fn contains(&self, id: &WorkerId) -> bool {
        self.workers.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Changes applied so far (starts at 0; `Unchanged` events do not count).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Every worker, in id order.
    pub fn iter(&self) -> impl Iterator<Item = &WorkerDescriptor> {
        self.workers.values()
    }

    /// The workers registered with exactly `role`, in id order.
    pub fn with_role(&self, role: Role) -> impl Iterator<Item = &WorkerDescriptor> {
        self.by_role.get(&role).into_iter().flatten().map(|id| &self.workers[id])
    }

    /// Workers that can run a prefill (`Prefill` and `Both`), in id order.
    pub fn prefill_capable(&self) -> impl Iterator<Item = &WorkerDescriptor> {
        self.iter().filter(|d| d.role.can_prefill())
    }

    /// Workers that can decode (`Decode` and `Both`), in id order.
    pub fn decode_capable(&self) -> impl Iterator<Item = &WorkerDescriptor> {
        self.iter().filter(|d| d.role.can_decode())
    }

    /// How many workers hold each role.
    pub fn count(&self, role: Role) -> usize {
        self.by_role.get(&role).map_or(0, BTreeSet::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptor::test_descriptor as descriptor;

    fn id(s: &str) -> WorkerId {
        WorkerId::new(s).unwrap()
    }

    fn ids<'a>(it: impl Iterator<Item = &'a WorkerDescriptor>) -> Vec<&'a str> {
        it.map(|d| d.id.as_str()).collect()
    }

    fn added(name: &str, role: Role) -> DiscoveryEvent {
        DiscoveryEvent::Added(descriptor(name, role))
    }

    fn removed(name: &str) -> DiscoveryEvent {
        DiscoveryEvent::Removed(id(name))
    }

    #[test]
    fn events_change_the_view() {
        use ViewChange::*;
        let moved = {
            let mut d = descriptor("p1", Role::Decode);
            d.grpc_addr = "other:1".into();
            DiscoveryEvent::Added(d)
        };
        // (event, expected change, prefill-capable, decode-capable after it)
        let table: Vec<(DiscoveryEvent, ViewChange, &[&str], &[&str])> = vec![
            (added("p1", Role::Prefill), Joined(id("p1")), &["p1"], &[]),
            (added("d1", Role::Decode), Joined(id("d1")), &["p1"], &["d1"]),
            (added("b1", Role::Both), Joined(id("b1")), &["b1", "p1"], &["b1", "d1"]),
            (added("p1", Role::Prefill), Unchanged, &["b1", "p1"], &["b1", "d1"]),
            (moved, Updated(id("p1")), &["b1"], &["b1", "d1", "p1"]),
            (removed("nobody"), Unchanged, &["b1"], &["b1", "d1", "p1"]),
            (removed("b1"), Left(id("b1")), &[], &["d1", "p1"]),
            (removed("b1"), Unchanged, &[], &["d1", "p1"]),
            (added("a0", Role::Prefill), Joined(id("a0")), &["a0"], &["d1", "p1"]),
        ];
        let mut view = ClusterView::new();
        let mut version = 0;
        for (i, (event, change, prefill, decode)) in table.into_iter().enumerate() {
            let got = view.apply(event);
            if got != Unchanged {
                version += 1;
            }
            assert_eq!(got, change, "step {i}");
            assert_eq!(ids(view.prefill_capable()), prefill, "step {i}: prefill");
            assert_eq!(ids(view.decode_capable()), decode, "step {i}: decode");
            assert_eq!(view.version(), version, "step {i}: version");
            // The role index always agrees with the descriptors.
            for role in Role::ALL {
                let expect: Vec<&str> = ids(view.iter().filter(|d| d.role == role));
                assert_eq!(ids(view.with_role(role)), expect, "step {i}: {role}");
                assert_eq!(view.count(role), expect.len(), "step {i}: count {role}");
            }
        }
        assert_eq!(view.len(), 3);
        assert_eq!(view.get(&id("p1")).unwrap().grpc_addr, "other:1");
        assert!(!view.contains(&id("b1")));
    }

    #[test]
    fn snapshot_then_events() {
        let view = ClusterView::from_snapshot([descriptor("d0", Role::Decode), descriptor("p0", Role::Prefill)]);
        assert_eq!(ids(view.iter()), ["d0", "p0"]);
        assert_eq!(ids(view.with_role(Role::Decode)), ["d0"]);
        assert_eq!(view.count(Role::Both), 0);

        let mut replayed = ClusterView::new();
        replayed.apply(added("p0", Role::Prefill));
        replayed.apply(added("d0", Role::Decode));
        assert_eq!(ids(replayed.iter()), ids(view.iter()));

        let mut emptied = view.clone();
        emptied.apply(removed("d0"));
        emptied.apply(removed("p0"));
        assert!(emptied.is_empty());
        assert_eq!(emptied.with_role(Role::Decode).count(), 0);
    }
}
