//! Every way a reservation can end, against a fake engine and receiver, on paused
//! time: each ending frees the engine request exactly once, and nothing is left.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_engine::scheduler::RequestId;
use tandem_kvtransfer::{Arrived, TransferError};
use tandem_proto::ids::ClusterRequestId;
use tokio::sync::{mpsc, oneshot};

use super::*;

#[derive(Debug, Clone, PartialEq)]
enum Call {
    Ready(u32),
    Abort(Option<String>),
    Fail(String),
}

#[derive(Default)]
struct FakeEngine(Mutex<Vec<(RequestId, Call)>>);

impl RemoteEngine for FakeEngine {
    fn remote_ready(&self, id: RequestId, first_token: u32) {
        self.0.lock().unwrap().push((id, Call::Ready(first_token)));
    }
    fn abort(&self, id: RequestId, reason: Option<String>) {
        self.0.lock().unwrap().push((id, Call::Abort(reason)));
    }
    fn fail(&self, id: RequestId, reason: String) {
        self.0.lock().unwrap().push((id, Call::Fail(reason)));
    }
}

#[derive(Default)]
struct FakeLanding(AtomicUsize);

impl Landing for FakeLanding {
    fn writes_in_progress(&self, _rid: ClusterRequestId) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

const RID: ClusterRequestId = ClusterRequestId(42);
const ID: RequestId = RequestId(7);
const PROMPT: usize = 4;

struct Rig {
    r: Reservations,
    engine: Arc<FakeEngine>,
    landing: Arc<FakeLanding>,
    kv: Option<oneshot::Sender<Result<Arrived, TransferError>>>,
    /// The engine's end of the request's channel.
    _events: mpsc::UnboundedSender<Event>,
    attached: Option<Attached>,
}

impl Rig {
    fn new() -> Rig {
        let engine = Arc::new(FakeEngine::default());
        let landing = Arc::new(FakeLanding::default());
        let r = Reservations::new("w".into(), engine.clone(), landing.clone(), Timing::default());
        let (tx, events) = mpsc::unbounded_channel();
        let (kv_tx, kv_rx) = oneshot::channel();
        let new = NewReservation {
            rid: RID,
            id: ID,
            blocks: 1,
            prompt_len: PROMPT,
            kv_bytes: 0,
            events,
            lease: Duration::from_secs(30),
            cache_only: false,
        };
        let kv: KvOutcome = Box::pin(async move {
            kv_rx.await.unwrap_or_else(|_| Err(TransferError::PeerGone("the test dropped it".into())))
        });
        r.insert(new, kv);
        Rig { r, engine, landing, kv: Some(kv_tx), _events: tx, attached: None }
    }

    fn calls(&self) -> Vec<Call> {
        self.engine
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(id, c)| {
                assert_eq!(*id, ID);
                c.clone()
            })
            .collect()
    }

    fn kv(&mut self, outcome: Result<Arrived, TransferError>) {
        // A reservation that already ended has dropped its end: nothing to deliver.
        let _ = self.kv.take().expect("one outcome").send(outcome);
    }

    async fn step(&mut self, s: &Step) {
        match s {
            Step::Attach => self.attached = Some(self.r.attach(RID).unwrap().expect("reserved")),
            Step::Arrive(n) => self.kv(Ok(Arrived { first_token: 9, num_tokens: *n })),
            Step::TransferFails => self.kv(Err(TransferError::Aborted("gone".into()))),
            Step::Cancel(reason) => assert_eq!(self.r.cancel(RID, reason.map(String::from)), Some(1)),
            Step::StreamEnded => self.r.stream_ended(RID, ID),
            Step::StreamDropped => self.r.stream_dropped(RID, ID),
            Step::Wait(d) => tokio::time::sleep(*d).await,
        }
        // Let the watcher act on it.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[derive(Debug)]
enum Step {
    Attach,
    Arrive(u32),
    TransferFails,
    Cancel(Option<&'static str>),
    StreamEnded,
    StreamDropped,
    Wait(Duration),
}

fn failed() -> Call {
    Call::Fail("KV transfer failed: aborted: gone".into())
}

#[tokio::test(start_paused = true)]
async fn every_ending_frees_the_engine_request_exactly_once() {
    use Step::*;
    const REASON: &str = "cancelled: by the router";
    let cancelled = Some(REASON);
    let table: Vec<(&str, Vec<Step>, Vec<Call>)> = vec![
        ("kv arrives, the stream attaches and finishes", vec![Attach, Arrive(4), StreamEnded], vec![Call::Ready(9)]),
        ("the stream attaches after the kv", vec![Arrive(4), Attach, StreamEnded], vec![Call::Ready(9)]),
        (
            "the stream attaches, the kv comes after the attach deadline",
            vec![Attach, Wait(ATTACH_DEADLINE * 2), Arrive(4), StreamEnded],
            vec![Call::Ready(9)],
        ),
        (
            "kv arrives, nobody attaches: abandoned at the attach deadline",
            vec![Arrive(4)],
            vec![Call::Ready(9), Call::Abort(None)],
        ),
        (
            "kv arrives, the stream's client leaves",
            vec![Attach, Arrive(4), StreamDropped],
            vec![Call::Ready(9), Call::Abort(None)],
        ),
        (
            "cancelled after the kv arrived",
            vec![Attach, Arrive(4), Cancel(cancelled)],
            vec![Call::Ready(9), Call::Abort(cancelled.map(String::from))],
        ),
        (
            "cancelled while waiting: freed after the quarantine",
            vec![Attach, Cancel(cancelled)],
            vec![Call::Fail(REASON.into()), Call::Abort(None)],
        ),
        ("cancelled without a reason while waiting", vec![Cancel(None)], vec![Call::Abort(None)]),
        (
            "cancelled, then the kv arrives: the outcome is ignored",
            vec![Attach, Cancel(None), Arrive(4)],
            vec![Call::Abort(None)],
        ),
        ("the stream's client leaves while waiting", vec![Attach, StreamDropped], vec![Call::Abort(None)]),
        ("nobody attaches and no kv comes: expired", vec![], vec![Call::Abort(None)]),
        ("the transfer fails, nobody attached", vec![TransferFails], vec![failed(), Call::Abort(None)]),
        (
            "the transfer fails, the stream ends on it",
            vec![Attach, TransferFails, StreamEnded],
            vec![failed(), Call::Abort(None)],
        ),
        (
            "a cancel after the transfer failed frees nothing more",
            vec![Attach, TransferFails, Cancel(cancelled)],
            vec![failed(), Call::Abort(None)],
        ),
        (
            "kv for another prompt length",
            vec![Attach, Arrive(3), StreamEnded],
            vec![Call::Abort(Some("KV for 3 tokens arrived for a prompt of 4".into()))],
        ),
        (
            "kv for another prompt length, nobody attached",
            vec![Arrive(3)],
            vec![Call::Abort(Some("KV for 3 tokens arrived for a prompt of 4".into()))],
        ),
    ];
    for (name, steps, want) in table {
        let mut rig = Rig::new();
        for s in &steps {
            rig.step(s).await;
        }
        // Past every deadline and quarantine.
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(rig.calls(), want, "{name}");
        assert!(rig.r.ids().is_empty(), "{name}: a reservation is left");
        assert_eq!(live_tasks(&rig.r), 0, "{name}: a task is left");
    }
}

/// Tasks of the set still running.
fn live_tasks(r: &Reservations) -> usize {
    let mut tasks = r.inner.tasks.lock().unwrap();
    while tasks.try_join_next().is_some() {}
    tasks.len()
}

#[tokio::test(start_paused = true)]
async fn the_quarantine_waits_for_writes_still_landing() {
    let mut rig = Rig::new();
    rig.step(&Step::Attach).await;
    rig.landing.0.store(1, Ordering::SeqCst);
    rig.step(&Step::Cancel(None)).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(rig.calls(), vec![], "freed while a write was landing");
    rig.landing.0.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(rig.calls(), vec![Call::Abort(None)]);
}

#[tokio::test(start_paused = true)]
async fn a_stream_attaching_after_the_deadline_finds_nothing() {
    let rig = Rig::new();
    tokio::time::sleep(ATTACH_DEADLINE + Duration::from_millis(1)).await;
    assert!(rig.r.attach(RID).unwrap().is_none());
    assert!(!rig.r.contains(RID));
}

#[tokio::test(start_paused = true)]
async fn a_second_attach_is_refused() {
    let mut rig = Rig::new();
    rig.step(&Step::Attach).await;
    let again = rig.r.attach(RID).err().expect("refused");
    assert_eq!(again.code(), tonic::Code::AlreadyExists);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_stream_without_a_reservation_aborts_its_request() {
    let engine = Arc::new(FakeEngine::default());
    let r = Reservations::new("w".into(), engine.clone(), Arc::new(FakeLanding::default()), Timing::default());
    r.stream_dropped(RID, ID);
    assert_eq!(engine.0.lock().unwrap().clone(), vec![(ID, Call::Abort(None))]);
}
