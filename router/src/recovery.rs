//! What a choice does after one of its attempts failed: move to other workers
//! (a worker died under it), recover its KV as its policy says (the transfer
//! from the prefill worker failed or stayed incomplete), or give up. Also whose fault a
//! failure was, read from the worker's status ([`failed`]).
//!
//! Pure decisions, so every case is a table test; `choice.rs` carries them out.

use tandem_cluster::WorkerId;
use tandem_proto::tandem::v1 as api;
use tonic::Status;

/// What happens to a request whose KV transfer fails (`--kv-failure-policy`, or the
/// request's `kv_failure_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvFailurePolicy {
    /// End the request with UNAVAILABLE naming the failure.
    Fail,
    /// The decode worker prefills the prompt (and the tokens already sent) itself.
    Recompute,
    /// Prefill again on another prefill worker; recompute when none is healthy.
    Retry,
}

impl KvFailurePolicy {
    pub const ALL: [KvFailurePolicy; 3] = [KvFailurePolicy::Fail, KvFailurePolicy::Recompute, KvFailurePolicy::Retry];

    pub fn as_str(self) -> &'static str {
        match self {
            KvFailurePolicy::Fail => "fail",
            KvFailurePolicy::Recompute => "recompute",
            KvFailurePolicy::Retry => "retry",
        }
    }

    pub fn parse(s: &str) -> Option<KvFailurePolicy> {
        KvFailurePolicy::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// A request's choice (`tandem.v1.KvFailurePolicy`), or `default` when it made none.
    /// `None` for a value outside the enum.
    pub fn from_api(value: i32, default: KvFailurePolicy) -> Option<KvFailurePolicy> {
        match api::KvFailurePolicy::try_from(value).ok()? {
            api::KvFailurePolicy::Unspecified => Some(default),
            api::KvFailurePolicy::Fail => Some(KvFailurePolicy::Fail),
            api::KvFailurePolicy::Recompute => Some(KvFailurePolicy::Recompute),
            api::KvFailurePolicy::Retry => Some(KvFailurePolicy::Retry),
        }
    }
}

impl std::fmt::Display for KvFailurePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whose fault a failed attempt was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The request's or the client's (invalid, refused for load, past its deadline):
    /// another worker would answer the same.
    Request,
    /// A worker failed under the choice: it died, broke its stream, or left the cluster.
    Worker(WorkerId),
    /// A decode worker had no KV blocks free for the prompt: another may have.
    Full(WorkerId),
    /// The prompt's KV did not arrive whole from `prefill` at `decode`: the prefill
    /// worker died or failed (`prefill_failed`), or the transfer itself broke (cut,
    /// corrupted, refused) while both workers live.
    Kv { prefill: WorkerId, decode: WorkerId, prefill_failed: bool },
}

/// How the next attempt of a choice runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Routed afresh, avoiding the workers that failed the choice.
    Route,
    /// On decode worker `on`, which prefills the prompt itself (`recompute`).
    Recompute { on: WorkerId },
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// End the choice with the attempt's error.
    GiveUp,
    /// Try again as `plan`, never again on `exclude`.
    Again { plan: Plan, exclude: Option<WorkerId>, kind: Recovery },
    /// Every decode worker with room for the prompt is full: wait until requests finish
    /// (or a moment passes), then route again over every decode worker.
    WaitForRoom,
}

/// Which budget a recovery spends, and how it is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// A worker died under the choice (`--migration-limit`).
    Migration,
    /// A failed KV transfer, recovered per policy (at most `MAX_KV_RECOVERIES`).
    Kv(KvFailurePolicy),
    /// A full decode worker passed over for another (at most `MAX_OVERFLOWS`).
    Overflow,
}

/// KV recoveries a choice may make, whatever the policy.
pub const MAX_KV_RECOVERIES: usize = 3;
/// Full decode workers a choice may pass over before it is refused (RESOURCE_EXHAUSTED).
pub const MAX_OVERFLOWS: usize = 2;

/// Budgets a choice has left, and what the cluster offers now.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub migrations_left: usize,
    pub kv_recoveries_left: usize,
    pub overflows_left: usize,
    /// A healthy prefill worker other than the failed one (for `retry`).
    pub other_prefill: bool,
    /// A healthy decode worker other than the full one (for `Full`).
    pub other_decode: bool,
    /// The choice may still wait for KV room: waiting is on and its time is not spent.
    pub may_wait: bool,
}

/// The next step after an attempt failed with `fault`, under `policy`.
pub fn next(fault: &Fault, policy: KvFailurePolicy, budget: Budget) -> Next {
    match fault {
        Fault::Request => Next::GiveUp,
        Fault::Worker(w) if budget.migrations_left > 0 => {
            Next::Again { plan: Plan::Route, exclude: Some(w.clone()), kind: Recovery::Migration }
        }
        Fault::Worker(_) => Next::GiveUp,
        Fault::Full(w) if budget.overflows_left > 0 && budget.other_decode => {
            Next::Again { plan: Plan::Route, exclude: Some(w.clone()), kind: Recovery::Overflow }
        }
        Fault::Full(_) if budget.may_wait => Next::WaitForRoom,
        Fault::Full(_) => Next::GiveUp,
        Fault::Kv { .. } if budget.kv_recoveries_left == 0 => Next::GiveUp,
        Fault::Kv { prefill, decode, prefill_failed } => {
            let recompute = |p| Next::Again {
                plan: Plan::Recompute { on: decode.clone() },
                // A prefill worker that failed is not tried again by later attempts.
                exclude: prefill_failed.then(|| prefill.clone()),
                kind: Recovery::Kv(p),
            };
            match policy {
                KvFailurePolicy::Fail => Next::GiveUp,
                KvFailurePolicy::Recompute => recompute(KvFailurePolicy::Recompute),
                KvFailurePolicy::Retry if budget.other_prefill => Next::Again {
                    plan: Plan::Route,
                    exclude: Some(prefill.clone()),
                    kind: Recovery::Kv(KvFailurePolicy::Retry),
                },
                KvFailurePolicy::Retry => recompute(KvFailurePolicy::Recompute),
            }
        }
    }
}

/// A worker's error as the client should see it: the worker named, client errors
/// kept, everything else UNAVAILABLE (the cluster could not serve it).
/// A CANCELLED is the worker's only when the worker sent it: a stream its transport cut
/// (the worker died, the connection reset) reads as CANCELLED too, with the transport's
/// error behind it, and is the worker's failure like any other.
pub(crate) fn worker_error(role: &str, id: &WorkerId, s: Status) -> Status {
    let msg = format!("{role} worker {id}: {}", s.message());
    let transport = std::error::Error::source(&s).is_some();
    match s.code() {
        tonic::Code::InvalidArgument => Status::invalid_argument(msg),
        tonic::Code::ResourceExhausted => Status::resource_exhausted(msg),
        tonic::Code::DeadlineExceeded => Status::deadline_exceeded(msg),
        tonic::Code::Cancelled if !transport => Status::cancelled(msg),
        _ => Status::unavailable(msg),
    }
}

/// Why an attempt failed, and whose fault it was.
#[derive(Debug)]
pub(crate) struct AttemptError {
    pub(crate) status: Status,
    pub(crate) fault: Fault,
}

impl From<Status> for AttemptError {
    fn from(status: Status) -> Self {
        AttemptError { status, fault: Fault::Request }
    }
}

/// Whether a worker marked `s` as caused by a failed KV transfer (`FAULT_METADATA`).
pub(crate) fn kv_fault(s: &Status) -> bool {
    s.metadata().get(tandem_proto::FAULT_METADATA).is_some_and(|v| v == "kv")
}

/// A worker's error as an attempt's failure: the worker's fault (the choice may move)
/// unless it is the request's (invalid, refused for load, deadline).
pub(crate) fn failed(role: &str, id: &WorkerId, e: Status) -> AttemptError {
    let status = worker_error(role, id, e);
    let fault = if status.code() == tonic::Code::Unavailable { Fault::Worker(id.clone()) } else { Fault::Request };
    AttemptError { status, fault }
}

/// A worker that left the cluster's view while the choice waited on it.
pub(crate) fn left(role: &str, id: &WorkerId) -> AttemptError {
    let status = Status::unavailable(format!("{role} worker {id} left the cluster (its lease ended)"));
    AttemptError { status, fault: Fault::Worker(id.clone()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_the_worker_sent_is_the_requests_and_a_cut_stream_is_the_workers() {
        let id = WorkerId::new("decode-0").unwrap();
        let sent = failed("decode", &id, Status::cancelled("cancelled: by the operator"));
        assert_eq!(sent.status.code(), tonic::Code::Cancelled);
        assert!(matches!(sent.fault, Fault::Request), "the worker's own CANCELLED is not retried elsewhere");
        // What tonic makes of a connection the dying worker dropped: CANCELLED, caused by hyper.
        let mut cut = Status::cancelled("operation was canceled");
        cut.set_source(std::sync::Arc::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)));
        let cut = failed("decode", &id, cut);
        assert_eq!(cut.status.code(), tonic::Code::Unavailable, "{:?}", cut.status);
        assert!(matches!(cut.fault, Fault::Worker(ref w) if *w == id), "the choice moves to another worker");
    }

    fn w(s: &str) -> WorkerId {
        WorkerId::new(s).unwrap()
    }

    fn kv(prefill_failed: bool) -> Fault {
        Fault::Kv { prefill: w("p1"), decode: w("d1"), prefill_failed }
    }

    const FULL: Budget = Budget {
        migrations_left: 3,
        kv_recoveries_left: 3,
        overflows_left: 2,
        other_prefill: true,
        other_decode: true,
        may_wait: true,
    };

    #[test]
    fn policies_parse_and_map_from_the_api() {
        for p in KvFailurePolicy::ALL {
            assert_eq!(KvFailurePolicy::parse(p.as_str()), Some(p));
        }
        assert_eq!(KvFailurePolicy::parse("retry-forever"), None);
        let d = KvFailurePolicy::Retry;
        assert_eq!(KvFailurePolicy::from_api(0, d), Some(d));
        assert_eq!(KvFailurePolicy::from_api(1, d), Some(KvFailurePolicy::Fail));
        assert_eq!(KvFailurePolicy::from_api(2, d), Some(KvFailurePolicy::Recompute));
        assert_eq!(KvFailurePolicy::from_api(3, d), Some(KvFailurePolicy::Retry));
        assert_eq!(KvFailurePolicy::from_api(4, d), None);
        assert_eq!(KvFailurePolicy::from_api(-1, d), None);
    }

    #[test]
    fn decisions() {
        use KvFailurePolicy::*;
        let recompute = |exclude: Option<&str>, p| Next::Again {
            plan: Plan::Recompute { on: w("d1") },
            exclude: exclude.map(w),
            kind: Recovery::Kv(p),
        };
        let retry = Next::Again { plan: Plan::Route, exclude: Some(w("p1")), kind: Recovery::Kv(Retry) };
        let no_other = Budget { other_prefill: false, ..FULL };
        let spent_kv = Budget { kv_recoveries_left: 0, ..FULL };
        let spent_moves = Budget { migrations_left: 0, ..FULL };
        let table: Vec<(Fault, KvFailurePolicy, Budget, Next)> = vec![
            (Fault::Request, Retry, FULL, Next::GiveUp),
            (
                Fault::Worker(w("d1")),
                Fail,
                FULL,
                Next::Again { plan: Plan::Route, exclude: Some(w("d1")), kind: Recovery::Migration },
            ),
            (Fault::Worker(w("d1")), Retry, spent_moves, Next::GiveUp),
            (kv(true), Fail, FULL, Next::GiveUp),
            (kv(false), Fail, FULL, Next::GiveUp),
            (kv(true), Recompute, FULL, recompute(Some("p1"), Recompute)),
            (kv(false), Recompute, FULL, recompute(None, Recompute)),
            (kv(true), Retry, FULL, retry.clone()),
            (kv(false), Retry, FULL, retry),
            (kv(true), Retry, no_other, recompute(Some("p1"), Recompute)),
            (kv(true), Recompute, spent_kv, Next::GiveUp),
            // KV recoveries do not spend the migration budget.
            (kv(false), Recompute, spent_moves, recompute(None, Recompute)),
            // A full decode worker is passed over while another exists; when none has room the
            // choice waits for room while it may, and is refused after.
            (
                Fault::Full(w("d1")),
                Fail,
                FULL,
                Next::Again { plan: Plan::Route, exclude: Some(w("d1")), kind: Recovery::Overflow },
            ),
            (Fault::Full(w("d1")), Retry, Budget { other_decode: false, ..FULL }, Next::WaitForRoom),
            (Fault::Full(w("d1")), Retry, Budget { overflows_left: 0, ..FULL }, Next::WaitForRoom),
            (Fault::Full(w("d1")), Retry, Budget { other_decode: false, may_wait: false, ..FULL }, Next::GiveUp),
            (Fault::Full(w("d1")), Retry, Budget { overflows_left: 0, may_wait: false, ..FULL }, Next::GiveUp),
            // Waiting is for full pools only.
            (Fault::Worker(w("d1")), Retry, Budget { migrations_left: 0, ..FULL }, Next::GiveUp),
            (Fault::Request, Retry, FULL, Next::GiveUp),
        ];
        for (fault, policy, budget, want) in table {
            assert_eq!(next(&fault, policy, budget), want, "{fault:?} under {policy} with {budget:?}");
        }
    }
}
