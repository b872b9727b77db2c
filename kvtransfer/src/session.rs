//! The receiver's reservations: which request may write which blocks, what
//! has arrived, and who is waiting for it. Transport-independent.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tandem_kernels::BlockId;
use tandem_proto::ids::{ClusterRequestId, LeaseId};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::TransferError;

/// What a completed transfer delivers to the decode side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrived {
    /// The token the prefill sampled from the prompt's last logits.
    pub first_token: u32,
    /// Prompt tokens whose KV arrived.
    pub num_tokens: u32,
}

struct Entry {
    blocks: HashSet<BlockId>,
    /// Blocks received per layer (each (layer, block) counted once).
    received: HashSet<(u16, BlockId)>,
    done: Option<oneshot::Sender<Result<Arrived, TransferError>>>,
    /// The connection that writes this session, once one has.
    conn: Option<u64>,
    /// The discovery lease the sender must hold (its Hello's); `None`: any sender.
    sender_lease: Option<LeaseId>,
    /// The same-host connection whose sender may write these blocks in place (it sent
    /// `Open` and was told the blocks); no other may.
    opened_by: Option<u64>,
    /// When the lease ends, unless the sender renews it (`Sessions::renew`).
    deadline: Instant,
    /// The lease first granted: a renewal extends to at most this much from now.
    lease: std::time::Duration,
}

impl Entry {
    /// Whether a sender holding `sent_by` may write this session: any sender when the
    /// reservation names no lease, else only the one holding it.
    fn accepts(&self, sent_by: Option<LeaseId>) -> bool {
        self.sender_lease.is_none() || sent_by == self.sender_lease
    }
}

/// All live reservations of one receiver.
#[derive(Clone, Default)]
pub struct Sessions {
    inner: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    by_id: HashMap<ClusterRequestId, Entry>,
    /// Which request holds each reserved block.
    owner: HashMap<BlockId, ClusterRequestId>,
    /// Payload writes in progress per request (admitted frames not yet fully read).
    writing: HashMap<ClusterRequestId, usize>,
    /// The lease each open connection's sender announced in its Hello (none: not in the map).
    conn_lease: HashMap<u64, LeaseId>,
}

impl State {
    /// `request_id`'s reservation, if it is live and connection `conn`'s sender is the
    /// one it expects.
    fn live_for(&mut self, conn: u64, request_id: ClusterRequestId) -> Result<&mut Entry, TransferError> {
        let sent_by = self.conn_lease.get(&conn).copied();
        let e = match self.by_id.get_mut(&request_id) {
            Some(e) if e.done.is_some() => e,
            _ => return Err(TransferError::UnknownRequest(request_id)),
        };
        if !e.accepts(sent_by) {
            return Err(TransferError::StaleSender(format!("request {request_id} expects another sender")));
        }
        Ok(e)
    }
}

/// A lease on blocks for one request; dropping it releases the blocks.
pub struct Reservation {
    pub request_id: ClusterRequestId,
    deadline: Instant,
    rx: Option<oneshot::Receiver<Result<Arrived, TransferError>>>,
    sessions: Sessions,
}

impl Reservation {
    /// Waits until the KV has arrived, the session fails, or the lease expires (as the
    /// sender's renewals have moved it).
    pub async fn wait(mut self) -> Result<Arrived, TransferError> {
        let mut rx = self.rx.take().expect("wait is called once");
        loop {
            let deadline = self.sessions.deadline(self.request_id).unwrap_or(self.deadline);
            match tokio::time::timeout_at(deadline, &mut rx).await {
                Ok(Ok(r)) => return r,
                Ok(Err(_)) => return Err(TransferError::PeerGone("the receiver shut down".into())),
                Err(_) if self.sessions.deadline(self.request_id).is_some_and(|d| d > deadline) => continue,
                Err(_) => {
                    return Err(TransferError::Deadline(format!(
                        "request {}: KV did not arrive in time",
                        self.request_id
                    )))
                }
            }
        }
    }

    /// When the lease now ends (later than at first if the sender renewed it).
    pub fn deadline(&self) -> Instant {
        self.sessions.deadline(self.request_id).unwrap_or(self.deadline)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.sessions.remove(self.request_id);
    }
}

/// The outcome of checking a Blocks frame against the reservations.
pub enum Admit {
    /// Write the payload; the guard counts the write as in progress until dropped.
    Ok(WriteGuard),
    Refuse(TransferError),
}

/// A Blocks frame's payload being written into a request's blocks. While one exists,
/// the blocks must not be handed to anyone else, even if the reservation is gone.
pub struct WriteGuard {
    sessions: Sessions,
    request_id: ClusterRequestId,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        let mut st = self.sessions.inner.lock().expect("sessions lock");
        if let Some(n) = st.writing.get_mut(&self.request_id) {
            *n -= 1;
            if *n == 0 {
                st.writing.remove(&self.request_id);
            }
        }
    }
}

impl Sessions {
    /// Reserves `blocks` (ids below `n_blocks`, none held by another request) for `request_id`.
    pub fn reserve(
        &self,
        request_id: ClusterRequestId,
        blocks: &[BlockId],
        n_blocks: usize,
        deadline: Instant,
    ) -> Result<Reservation, TransferError> {
        self.reserve_from(request_id, blocks, n_blocks, deadline, None)
    }

    /// As `reserve`, accepting frames only from a sender that announced discovery lease
    /// `sender_lease` (`None`: from any sender).
    pub fn reserve_from(
        &self,
        request_id: ClusterRequestId,
        blocks: &[BlockId],
        n_blocks: usize,
        deadline: Instant,
        sender_lease: Option<LeaseId>,
    ) -> Result<Reservation, TransferError> {
        let mut st = self.inner.lock().expect("sessions lock");
        if st.by_id.contains_key(&request_id) {
            return Err(TransferError::Protocol(format!("request {request_id} is already reserved")));
        }
        let set: HashSet<BlockId> = blocks.iter().copied().collect();
        if set.len() != blocks.len() || blocks.is_empty() {
            return Err(TransferError::BadBlock("a reservation needs distinct block ids".into()));
        }
        if let Some(b) = blocks.iter().find(|b| b.index() >= n_blocks) {
            return Err(TransferError::BadBlock(format!("block {b} outside a pool of {n_blocks}")));
        }
        if let Some(b) = blocks.iter().find(|b| st.owner.contains_key(b)) {
            return Err(TransferError::BadBlock(format!("block {b} is reserved by another request")));
        }
        for &b in blocks {
            st.owner.insert(b, request_id);
        }
        let (tx, rx) = oneshot::channel();
        let lease = deadline.saturating_duration_since(Instant::now());
        let entry = Entry {
            blocks: set,
            received: HashSet::new(),
            done: Some(tx),
            conn: None,
            sender_lease,
            opened_by: None,
            deadline,
            lease,
        };
        st.by_id.insert(request_id, entry);
        Ok(Reservation { request_id, deadline, rx: Some(rx), sessions: self.clone() })
    }

    /// When `request_id`'s lease ends; `None` once it is gone.
    fn deadline(&self, request_id: ClusterRequestId) -> Option<Instant> {
        self.inner.lock().expect("sessions lock").by_id.get(&request_id).map(|e| e.deadline)
    }

    /// The sender on connection `conn` still works on `request_id`: its lease is moved to
    /// `lease_ms` from now, but never further than the lease first granted. Refused (the
    /// sender stops) when the reservation is gone or done, or the connection's sender is not
    /// the one expected.
    pub fn renew(&self, conn: u64, request_id: ClusterRequestId, lease_ms: u32) -> Result<(), TransferError> {
        let mut st = self.inner.lock().expect("sessions lock");
        let e = st.live_for(conn, request_id)?;
        let wanted = std::time::Duration::from_millis(lease_ms as u64).min(e.lease);
        e.deadline = e.deadline.max(Instant::now() + wanted);
        Ok(())
    }

    fn remove(&self, request_id: ClusterRequestId) {
        let mut st = self.inner.lock().expect("sessions lock");
        if let Some(e) = st.by_id.remove(&request_id) {
            for b in e.blocks {
                st.owner.remove(&b);
            }
        }
    }

    /// A same-host sender on connection `conn` asks to write `request_id`'s blocks in
    /// place. Yes (the reserved block ids, sorted: the only ones it may write) when the
    /// reservation is live, its sender is the one expected, and no other connection has
    /// opened it. Until then no in-place frame for it is admitted, and an honest sender
    /// writes nothing.
    pub fn open(&self, conn: u64, request_id: ClusterRequestId) -> Result<Vec<BlockId>, TransferError> {
        let mut st = self.inner.lock().expect("sessions lock");
        let e = st.live_for(conn, request_id)?;
        if e.opened_by.is_some_and(|c| c != conn) {
            return Err(TransferError::Protocol(format!("request {request_id} is opened by another connection")));
        }
        e.opened_by = Some(conn);
        let mut blocks: Vec<BlockId> = e.blocks.iter().copied().collect();
        blocks.sort_unstable();
        Ok(blocks)
    }

    /// May connection `conn` write `blocks` of `layer` for `request_id`? `in_place`: the
    /// frame says the sender already wrote them into the shared segment, which only a
    /// connection that opened the session (`open`) may.
    pub fn admit(
        &self,
        conn: u64,
        request_id: ClusterRequestId,
        layer: u16,
        n_layers: u16,
        blocks: &[BlockId],
        in_place: bool,
    ) -> Admit {
        let mut st = self.inner.lock().expect("sessions lock");
        let Some(e) = st.by_id.get_mut(&request_id) else {
            return Admit::Refuse(TransferError::UnknownRequest(request_id));
        };
        if e.done.is_none() {
            return Admit::Refuse(TransferError::UnknownRequest(request_id));
        }
        if layer >= n_layers {
            return Admit::Refuse(TransferError::BadBlock(format!("layer {layer} of {n_layers}")));
        }
        let sent_by = st.conn_lease.get(&conn).copied();
        let e = st.by_id.get_mut(&request_id).expect("checked above");
        if !e.accepts(sent_by) {
            // A fenced or replaced incarnation of the sender: its KV is not the one expected.
            let err = TransferError::StaleSender(format!(
                "request {request_id} expects KV from lease {:x}, this sender holds {:x}",
                LeaseId::to_wire(e.sender_lease),
                LeaseId::to_wire(sent_by)
            ));
            if let Some(tx) = e.done.take() {
                let _ = tx.send(Err(err.clone()));
            }
            return Admit::Refuse(err);
        }
        if in_place && e.opened_by != Some(conn) {
            return Admit::Refuse(TransferError::Protocol(format!(
                "in-place blocks for request {request_id} before the receiver accepted it"
            )));
        }
        if let Some(b) = blocks.iter().find(|b| !e.blocks.contains(b)) {
            return Admit::Refuse(TransferError::BadBlock(format!(
                "block {b} is not reserved for request {request_id}"
            )));
        }
        e.conn = Some(conn);
        *st.writing.entry(request_id).or_default() += 1;
        Admit::Ok(WriteGuard { sessions: self.clone(), request_id })
    }

    /// Payload writes into `request_id`'s blocks still in progress. After its reservation
    /// is gone, the blocks may be reused once this is 0.
    pub fn writes_in_progress(&self, request_id: ClusterRequestId) -> usize {
        self.inner.lock().expect("sessions lock").writing.get(&request_id).copied().unwrap_or(0)
    }

    /// Records blocks written in full and checked.
    pub fn received(&self, request_id: ClusterRequestId, layer: u16, blocks: &[BlockId]) {
        let mut st = self.inner.lock().expect("sessions lock");
        if let Some(e) = st.by_id.get_mut(&request_id) {
            e.received.extend(blocks.iter().map(|&b| (layer, b)));
        }
    }

    /// The sender says it is done: complete the session if every block of every layer arrived.
    pub fn finish(&self, request_id: ClusterRequestId, n_layers: u16, arrived: Arrived) -> Result<(), TransferError> {
        let mut st = self.inner.lock().expect("sessions lock");
        let e = st.by_id.get_mut(&request_id).ok_or(TransferError::UnknownRequest(request_id))?;
        let want = e.blocks.len() * n_layers as usize;
        let result = if e.received.len() == want {
            Ok(arrived)
        } else {
            Err(TransferError::Protocol(format!("finish after {} of {want} block-layers arrived", e.received.len())))
        };
        if let Some(tx) = e.done.take() {
            let _ = tx.send(result.clone());
        }
        result.map(|_| ())
    }

    /// Ends a session with an error (checksum, abort, ...); the waiter sees it.
    pub fn fail(&self, request_id: ClusterRequestId, err: TransferError) {
        let mut st = self.inner.lock().expect("sessions lock");
        if let Some(tx) = st.by_id.get_mut(&request_id).and_then(|e| e.done.take()) {
            let _ = tx.send(Err(err));
        }
    }

    /// A connection's sender announced discovery lease `lease` in its Hello (`None`: none).
    pub fn connected(&self, conn: u64, lease: Option<LeaseId>) {
        let mut st = self.inner.lock().expect("sessions lock");
        match lease {
            Some(lease) => st.conn_lease.insert(conn, lease),
            None => st.conn_lease.remove(&conn),
        };
    }

    /// A connection died: every session it was writing fails.
    pub fn conn_lost(&self, conn: u64, why: &str) {
        let mut st = self.inner.lock().expect("sessions lock");
        st.conn_lease.remove(&conn);
        for e in st.by_id.values_mut().filter(|e| e.conn == Some(conn)) {
            if let Some(tx) = e.done.take() {
                let _ = tx.send(Err(TransferError::PeerGone(why.to_string())));
            }
        }
    }

    /// Live reservations (for tests and metrics).
    pub fn len(&self) -> usize {
        self.inner.lock().expect("sessions lock").by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R7: ClusterRequestId = ClusterRequestId(7);

    fn ids(blocks: &[u32]) -> Vec<BlockId> {
        blocks.iter().map(|&b| BlockId(b)).collect()
    }

    fn lease(id: i64) -> Option<LeaseId> {
        LeaseId::from_wire(id)
    }

    #[test]
    fn a_write_in_progress_outlives_its_reservation() {
        let s = Sessions::default();
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let res = s.reserve(R7, &ids(&[1, 2]), 8, deadline).unwrap();
        let Admit::Ok(w) = s.admit(1, R7, 0, 2, &ids(&[1]), false) else { panic!("admitted") };
        let Admit::Ok(w2) = s.admit(1, R7, 1, 2, &ids(&[2]), false) else { panic!("admitted") };
        assert_eq!(s.writes_in_progress(R7), 2);
        drop(res);
        assert!(
            matches!(s.admit(1, R7, 0, 2, &ids(&[1]), false), Admit::Refuse(_)),
            "no new frame after the reservation"
        );
        assert_eq!(s.writes_in_progress(R7), 2, "the admitted ones are still landing");
        drop(w);
        drop(w2);
        assert_eq!(s.writes_in_progress(R7), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_keep_a_reservation_past_its_first_lease_and_no_further_than_it_each_time() {
        use std::time::Duration;
        let s = Sessions::default();
        let t0 = Instant::now();
        let res = s.reserve_from(R7, &ids(&[1]), 8, t0 + Duration::from_secs(2), lease(42)).unwrap();
        s.connected(1, lease(42));
        s.connected(2, lease(43));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        s.renew(1, R7, 60_000).unwrap();
        assert_eq!(res.deadline(), Instant::now() + Duration::from_secs(2), "at most the first lease");
        assert!(matches!(s.renew(2, R7, 1000), Err(TransferError::StaleSender(_))), "another sender");
        assert!(
            matches!(s.renew(1, ClusterRequestId(8), 1000), Err(TransferError::UnknownRequest(ClusterRequestId(8)))),
            "nothing reserved"
        );
        s.renew(1, R7, 10).unwrap();
        assert_eq!(res.deadline(), t0 + Duration::from_millis(3500), "a shorter renewal never cuts it");
        let waited = tokio::spawn(res.wait());
        tokio::time::sleep(Duration::from_millis(1900)).await;
        s.renew(1, R7, 2000).unwrap();
        assert!(!waited.is_finished(), "renewed before its end: still waiting");
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(matches!(waited.await.unwrap(), Err(TransferError::Deadline(_))), "ends when renewals stop");
        assert!(matches!(s.renew(1, R7, 1000), Err(TransferError::UnknownRequest(R7))), "gone with its lease");
    }

    #[test]
    fn in_place_frames_need_the_session_opened_by_their_connection() {
        let s = Sessions::default();
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let _res = s.reserve(R7, &ids(&[4, 2]), 8, deadline).unwrap();
        assert!(matches!(s.admit(1, R7, 0, 2, &ids(&[2]), true), Admit::Refuse(_)), "not opened yet");
        assert!(matches!(s.open(1, ClusterRequestId(8)), Err(TransferError::UnknownRequest(ClusterRequestId(8)))));
        assert_eq!(s.open(1, R7).unwrap(), ids(&[2, 4]), "exactly the reserved blocks");
        assert!(s.open(2, R7).is_err(), "one connection per session");
        assert!(matches!(s.admit(2, R7, 0, 2, &ids(&[2]), true), Admit::Refuse(_)), "another connection");
        assert!(matches!(s.admit(1, R7, 0, 2, &ids(&[3]), true), Admit::Refuse(_)), "a block outside the reservation");
        assert!(matches!(s.admit(1, R7, 0, 2, &ids(&[2]), true), Admit::Ok(_)));
    }
}
