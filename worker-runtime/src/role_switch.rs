//! Changing an elastic worker's role while it runs (`SetRole`): the worker stops
//! taking new work, lets what it holds finish (prefills with their KV exports,
//! reservations, decodes), leaves discovery, takes the new role and registers
//! again under it with a new lease. Work that outlasts the deadline keeps running and
//! the role stays as it was: a change never ends a request.
//!
//! A worker not started `--elastic` was built without the other role's parts (no KV
//! receiver on a prefill worker, no sender on a decode worker) and refuses the change.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_cluster::Role;
use tandem_proto::tandem::worker::v1 as pb;
use tonic::Status;

use crate::registration::{register_forever, Registering, RegistrationTask};
use crate::service::WorkerService;
use crate::state::WorkerState;
use tandem_kvtransfer::KvSender;

/// How long in-flight work may take to finish when `SetRole` names no deadline.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);
/// How often a change looks at what is still in flight.
const POLL: Duration = Duration::from_millis(20);
/// Longest wait for discovery to drop the old record.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for discovery to list the worker under its new role before answering.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// The worker's registration and what a new one is made from; one change at a time.
pub struct RoleSwitch {
    /// The registration held now; `None` without discovery, or once the worker drains.
    registration: tokio::sync::Mutex<Option<RegistrationTask>>,
    /// Where and as what the worker registered (its role changes with each switch); set
    /// once, when the worker first registers.
    registering: std::sync::OnceLock<Registering>,
    /// Held while a change is under way: a second one is refused, not queued.
    busy: tokio::sync::Mutex<()>,
}

impl RoleSwitch {
    /// A worker not registered yet (`register`), or never (no discovery).
    pub(crate) fn new() -> RoleSwitch {
        RoleSwitch { registration: Default::default(), registering: Default::default(), busy: Default::default() }
    }

    /// Registers the worker as `r` says (retrying until discovery answers).
    pub(crate) fn register(&self, r: Registering, state: Arc<WorkerState>, sender: Option<Arc<KvSender>>) {
        let task = register_forever(r.clone(), state, sender);
        let _ = self.registering.set(r);
        *self.registration.try_lock().expect("registered once, before any change") = Some(task);
    }

    /// The registration, taken for good (the worker drains).
    pub(crate) async fn take_registration(&self) -> Option<RegistrationTask> {
        self.registration.lock().await.take()
    }

    /// Serves `SetRole` for `svc`'s worker.
    pub(crate) async fn set_role(
        &self,
        svc: &WorkerService,
        req: pb::SetRoleRequest,
    ) -> Result<pb::SetRoleResponse, Status> {
        let s = &svc.state;
        let to = Role::from_pb(req.role).ok_or_else(|| Status::invalid_argument("SetRole needs a role"))?;
        if !s.elastic {
            return Err(Status::failed_precondition(format!(
                "worker {} was not started with --elastic; its role is fixed",
                s.id
            )));
        }
        let Ok(_busy) = self.busy.try_lock() else {
            return Err(Status::aborted(format!("worker {} is already changing its role", s.id)));
        };
        if s.draining.load(Ordering::SeqCst) {
            return Err(Status::failed_precondition(format!("worker {} is draining", s.id)));
        }
        let from = s.role();
        if from == to {
            return Ok(pb::SetRoleResponse {
                previous: from.to_pb(),
                role: to.to_pb(),
                changed: false,
                drained_ms: 0.0,
            });
        }
        let deadline = req.deadline_ms.map_or(DEFAULT_DEADLINE, |ms| Duration::from_millis(ms as u64));
        let started = Instant::now();
        tracing::info!(worker = %s.id, from = %from, to = %to, "changing role: draining in-flight work");
        s.changing_role.store(true, Ordering::SeqCst);
        // Cleared however this ends: a refused change takes work again in its old role.
        let _reopen = Reopen(svc.state.clone());
        loop {
            let left = svc.outstanding() + s.inflight.load(Ordering::SeqCst);
            if left == 0 {
                break;
            }
            // Decodes move to other decode workers (live; recomputed where their KV cannot
            // move) rather than holding the change until they finish.
            svc.ask_moves(true).await;
            if started.elapsed() >= deadline {
                tracing::warn!(worker = %s.id, from = %from, to = %to, left, "role change given up: work outlasted its deadline");
                return Err(Status::deadline_exceeded(format!(
                    "worker {}: {left} requests still in flight after {} ms; the role stays {from}",
                    s.id,
                    deadline.as_millis()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
        let drained = started.elapsed();
        self.reregister(svc, to).await;
        tracing::info!(worker = %s.id, from = %from, to = %to, drained_ms = drained.as_millis() as u64, "role changed");
        crate::metrics::role_changed(&s.id, from.as_str(), to.as_str());
        Ok(pb::SetRoleResponse {
            previous: from.to_pb(),
            role: to.to_pb(),
            changed: true,
            drained_ms: drained.as_secs_f64() * 1e3,
        })
    }

    /// Leaves discovery, takes `role`, and registers again under it (a new lease).
    async fn reregister(&self, svc: &WorkerService, role: Role) {
        let s = &svc.state;
        let mut held = self.registration.lock().await;
        if let Some(r) = held.take() {
            r.stop.cancel();
            if let Ok(Ok(Some(reg))) = tokio::time::timeout(DEREGISTER_TIMEOUT, r.task).await {
                if let Err(e) = reg.deregister().await {
                    tracing::warn!(worker = %s.id, error = %e, "leaving discovery for a role change failed; the old record ends with its lease");
                }
            }
        }
        s.set_role(role);
        // It takes its new role's work from here: a router that finds the new record polls
        // at once and must not read the change as still under way.
        s.changing_role.store(false, Ordering::SeqCst);
        if let Some(r) = self.registering.get() {
            let mut again = r.clone();
            again.descriptor.role = role;
            let task = register_forever(again, s.clone(), svc.sender.clone());
            let mut registered = task.registered.clone();
            *held = Some(task);
            // Answer once discovery lists the worker under its new role (or say it is late:
            // the registration keeps retrying).
            let listed = tokio::time::timeout(REGISTER_TIMEOUT, registered.wait_for(|r| *r)).await;
            if !matches!(listed, Ok(Ok(_))) {
                tracing::warn!(worker = %s.id, role = %role, "not registered under the new role yet; still trying");
            }
        }
    }
}

/// Takes new work again when dropped (a change that ended, however it ended).
struct Reopen(Arc<WorkerState>);

impl Drop for Reopen {
    fn drop(&mut self) {
        self.0.changing_role.store(false, Ordering::SeqCst);
    }
}
