//! `EtcdDiscovery` against a real etcd: each test starts its own `etcd` on free loopback
//! ports with a temporary data directory, and kills it when done.
//!
//! Needs the `etcd` binary on PATH (`scripts/setup-etcd.sh` installs it). Without it
//! these tests fail; they never skip. Timing assertions are only "within TTL + margin".

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tandem_cluster::etcd::EtcdClient;
use tandem_cluster::{
    ClusterName, ClusterView, Discovery, DiscoveryEvent, DiscoveryEvents, EtcdConfig, EtcdDiscovery, KvEndpoints,
    LeaseState, ModelInfo, Registration, Role, WorkerDescriptor, WorkerId,
};
use tandem_proto::ids::LeaseId;
use tokio::time::{timeout, Instant};

const TTL: Duration = Duration::from_secs(2);
/// Slack on top of a TTL for etcd's lease checks and our retries.
const MARGIN: Duration = Duration::from_secs(4);
/// How long any single step may take before the test calls it stuck.
const STEP: Duration = Duration::from_secs(15);

/// A throwaway etcd: its own data directory and ports; killed on drop.
struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Etcd {
    async fn start() -> Etcd {
        // The discovery tasks' logs, captured with the test's output (shown if it fails).
        let _ = tracing_subscriber::fmt().with_test_writer().with_ansi(false).try_init();
        match Command::new("etcd").arg("--version").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!("`etcd --version` failed ({}): run scripts/setup-etcd.sh", out.status),
            Err(e) => panic!(
                "cannot run `etcd` ({e}): the etcd tests need it on PATH; \
                 run scripts/setup-etcd.sh (installs Debian's etcd-server)"
            ),
        }
        // A port found free may be taken before etcd binds it (tests run in parallel, and
        // other processes bind ephemeral ports): then start over on fresh ports.
        for _ in 0..5 {
            let mut etcd = Etcd {
                child: None,
                dir: tempfile::tempdir().unwrap(),
                client_port: free_port(),
                peer_port: free_port(),
            };
            match etcd.try_spawn().await {
                Ok(()) => return etcd,
                Err(log) if log.contains("address already in use") => continue,
                Err(log) => panic!("etcd exited during start-up; log:\n{log}"),
            }
        }
        panic!("etcd found its ports taken 5 times in a row");
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    async fn spawn(&mut self) {
        if let Err(log) = self.try_spawn().await {
            panic!("etcd exited during start-up; log:\n{log}");
        }
    }

    /// Starts etcd and waits until it serves; its log if it exits first.
    async fn try_spawn(&mut self) -> Result<(), String> {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let child = Command::new("etcd")
            .arg("--name=tandem-test")
            .arg(format!("--data-dir={}", self.dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={}", self.url()))
            .arg(format!("--advertise-client-urls={}", self.url()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=tandem-test={peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
        self.wait_ready().await
    }

    /// Waits until etcd answers a read; its log if it exits first.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                self.child = None;
                return Err(format!("(exit {status})\n{}", self.log()));
            }
            let url = self.url();
            let probe = async move {
                let config = EtcdConfig { endpoints: vec![url], ..EtcdConfig::default() };
                EtcdClient::new(&config)?.get("probe").await
            };
            if let Ok(Ok(_)) = timeout(Duration::from_millis(500), probe).await {
                return Ok(());
            }
            assert!(Instant::now() < deadline, "etcd not ready after {STEP:?}; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILL, as a crash: no goodbye to clients.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same ports and data.
    async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// A plain client, to look at what discovery stored.
    async fn client(&self) -> EtcdClient {
        EtcdClient::new(&EtcdConfig { endpoints: vec![self.url()], ..EtcdConfig::default() }).unwrap()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn config(etcd: &Etcd) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![etcd.url()],
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        ping_interval: Duration::from_secs(1),
        ping_timeout: Duration::from_secs(1),
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_millis(500),
    }
}

async fn discovery(etcd: &Etcd) -> EtcdDiscovery {
    EtcdDiscovery::connect(config(etcd)).await.unwrap()
}

fn cluster(name: &str) -> ClusterName {
    ClusterName::new(name).unwrap()
}

fn id(name: &str) -> WorkerId {
    WorkerId::new(name).unwrap()
}

/// `d` as watchers see it: with the lease `reg` holds.
fn held(d: WorkerDescriptor, reg: &Registration) -> WorkerDescriptor {
    match *reg.lease().borrow() {
        LeaseState::Held(lease) => WorkerDescriptor { lease: Some(lease), ..d },
        LeaseState::Lost => panic!("{} lost its lease", d.id),
    }
}

fn worker(name: &str, role: Role) -> WorkerDescriptor {
    WorkerDescriptor {
        id: id(name),
        role,
        grpc_addr: "127.0.0.1:7001".into(),
        kv: KvEndpoints { tcp: "127.0.0.1:7002".parse().unwrap(), local: None },
        model: ModelInfo { name: "smollm2-135m".into(), fingerprint: 0xfeed_beef_dead_f00d },
        block_size: 16,
        hash_scheme: Some("sha256-chain-v1".into()),
        context_length: 8192,
        lease: None,
    }
}

async fn next_event(events: &mut DiscoveryEvents, within: Duration) -> DiscoveryEvent {
    match timeout(within, events.recv()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("event stream ended"),
        Err(_) => panic!("no discovery event within {within:?}"),
    }
}

async fn assert_quiet(events: &mut DiscoveryEvents, for_: Duration) {
    if let Ok(event) = timeout(for_, events.recv()).await {
        panic!("expected no event for {for_:?}, got {event:?}");
    }
}

/// The worker keys etcd holds under `cluster`, with their lease ids.
async fn stored(etcd: &Etcd, cluster: &str) -> Vec<(String, i64)> {
    let prefix = format!("/tandem/{cluster}/workers/");
    let response = etcd.client().await.get_prefix(&prefix).await.unwrap();
    response.kvs.iter().map(|kv| (String::from_utf8(kv.key.clone()).unwrap(), kv.lease)).collect()
}

async fn shutdown(d: &EtcdDiscovery) {
    timeout(STEP, d.shutdown()).await.expect("shutdown waits for its tasks, within a deadline");
}

#[tokio::test]
async fn two_registered_workers_are_listed() {
    let etcd = Etcd::start().await;
    let d = discovery(&etcd).await;
    let c = cluster("two");
    let p = d.register(&c, worker("p0", Role::Prefill), TTL).await.unwrap();
    let w = d.register(&c, worker("d0", Role::Decode), TTL).await.unwrap();

    let (snapshot, events) = d.list_and_watch(&c).await.unwrap();
    assert_eq!(snapshot, vec![held(worker("d0", Role::Decode), &w), held(worker("p0", Role::Prefill), &p)]);
    let stored_leases: Vec<Option<LeaseId>> =
        stored(&etcd, "two").await.into_iter().map(|(_, l)| LeaseId::from_wire(l)).collect();
    assert_eq!(stored_leases, [snapshot[0].lease, snapshot[1].lease], "descriptors carry etcd's lease ids");
    let keys: Vec<String> = stored(&etcd, "two").await.into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["/tandem/two/workers/decode/d0", "/tandem/two/workers/prefill/p0"]);
    assert!(d.list_and_watch(&cluster("other")).await.unwrap().0.is_empty());

    p.deregister().await.unwrap();
    w.deregister().await.unwrap();
    events.close(STEP).await;
    shutdown(&d).await;
}

#[tokio::test]
async fn watch_sees_added_then_removed_on_deregister() {
    let etcd = Etcd::start().await;
    let d = discovery(&etcd).await;
    let c = cluster("watch");
    let (snapshot, mut events) = d.list_and_watch(&c).await.unwrap();
    assert!(snapshot.is_empty());

    let reg = d.register(&c, worker("b0", Role::Both), TTL).await.unwrap();
    assert_eq!(next_event(&mut events, STEP).await, DiscoveryEvent::Added(held(worker("b0", Role::Both), &reg)));
    reg.deregister().await.unwrap();
    assert_eq!(next_event(&mut events, STEP).await, DiscoveryEvent::Removed(id("b0")));
    assert!(stored(&etcd, "watch").await.is_empty(), "deregistration deletes the key");
    shutdown(&d).await;
    assert_eq!(events.recv().await, None, "shutdown ends the stream");
}

#[tokio::test]
async fn a_registration_whose_keep_alives_stop_expires_within_its_ttl() {
    let etcd = Etcd::start().await;
    let d = discovery(&etcd).await;
    let c = cluster("expiry");
    let stays = d.register(&c, worker("p0", Role::Prefill), TTL).await.unwrap();
    let goes = d.register(&c, worker("p1", Role::Prefill), TTL).await.unwrap();
    let (snapshot, mut events) = d.list_and_watch(&c).await.unwrap();
    assert_eq!(snapshot.len(), 2);

    // Keep-alives hold both well past their TTL.
    assert_quiet(&mut events, TTL * 2).await;

    let dropped_at = Instant::now();
    drop(goes);
    assert_eq!(next_event(&mut events, TTL + MARGIN).await, DiscoveryEvent::Removed(id("p1")));
    eprintln!("dropped registration removed after {:?} (TTL {TTL:?})", dropped_at.elapsed());
    assert_eq!(stored(&etcd, "expiry").await.len(), 1);
    assert!(stays.is_active());

    stays.deregister().await.unwrap();
    shutdown(&d).await;
}

#[tokio::test]
async fn the_watcher_keeps_its_view_while_etcd_is_down_and_resyncs_after() {
    let mut etcd = Etcd::start().await;
    let d = discovery(&etcd).await;
    let c = cluster("outage");
    let w1 = d.register(&c, worker("w1", Role::Prefill), TTL).await.unwrap();
    let _w2 = d.register(&c, worker("w2", Role::Decode), TTL).await.unwrap();
    let (snapshot, mut events) = d.list_and_watch(&c).await.unwrap();
    let mut view = ClusterView::from_snapshot(snapshot);
    assert_eq!(view.len(), 2);

    etcd.kill();
    // Down for longer than a TTL: the watcher reports nothing, so the view stands.
    assert_quiet(&mut events, TTL + Duration::from_secs(1)).await;
    assert_eq!(view.len(), 2);

    etcd.restart().await;
    // A worker that joins right after the restart is found, by the resync's list or the watch.
    let deadline = Instant::now() + STEP;
    let _w3 = loop {
        match d.register(&c, worker("w3", Role::Both), TTL).await {
            Ok(reg) => break reg,
            Err(e) if Instant::now() < deadline => {
                eprintln!("register after restart: {e}; retrying")
            }
            Err(e) => panic!("cannot register after the restart: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    view.apply(next_event(&mut events, STEP).await);
    assert!(view.contains(&id("w3")), "{view:?}");
    assert_eq!(view.len(), 3);

    // The registrations made before the outage renewed their leases on the restarted etcd.
    assert_quiet(&mut events, TTL * 2).await;
    assert_eq!(stored(&etcd, "outage").await.len(), 3);

    // And the watch is live again.
    w1.deregister().await.unwrap();
    view.apply(next_event(&mut events, STEP).await);
    let ids: Vec<&str> = view.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids, ["w2", "w3"]);
    assert_eq!(view.with_role(Role::Decode).count(), 1);
    shutdown(&d).await;
}

#[tokio::test]
async fn a_worker_registers_again_after_its_lease_is_lost() {
    let etcd = Etcd::start().await;
    let d = discovery(&etcd).await;
    let c = cluster("relet");
    let reg: Registration = d.register(&c, worker("p0", Role::Prefill), TTL).await.unwrap();
    let (_, mut events) = d.list_and_watch(&c).await.unwrap();
    let [(_, old_lease)] = stored(&etcd, "relet").await[..] else { panic!("one key expected") };
    let mut lease = reg.lease();
    assert_eq!(*lease.borrow_and_update(), LeaseState::Held(LeaseId::from_wire(old_lease).unwrap()));

    // The lease ends behind the worker's back (as when it expires while the worker is cut off).
    etcd.client().await.lease_revoke(old_lease).await.unwrap();
    assert_eq!(next_event(&mut events, STEP).await, DiscoveryEvent::Removed(id("p0")));
    // The next keep-alive finds the lease gone: the worker hears it (and fences itself),
    // then puts its key again on a new lease.
    timeout(TTL + MARGIN, lease.changed()).await.expect("the loss is reported").unwrap();
    let seen = *lease.borrow_and_update();
    let added = next_event(&mut events, TTL + MARGIN).await;
    let [(_, new_lease)] = stored(&etcd, "relet").await[..] else { panic!("one key expected") };
    assert_ne!(new_lease, old_lease);
    assert_eq!(
        added,
        DiscoveryEvent::Added(WorkerDescriptor { lease: LeaseId::from_wire(new_lease), ..worker("p0", Role::Prefill) })
    );
    if seen == LeaseState::Lost {
        timeout(STEP, lease.changed()).await.expect("the new lease is reported").unwrap();
    }
    assert_eq!(*lease.borrow(), LeaseState::Held(LeaseId::from_wire(new_lease).unwrap()));

    reg.deregister().await.unwrap();
    assert_eq!(next_event(&mut events, STEP).await, DiscoveryEvent::Removed(id("p0")));
    shutdown(&d).await;
}

#[tokio::test]
async fn an_unreachable_etcd_fails_calls_within_their_deadline() {
    // Nothing listens on this port.
    let config = EtcdConfig { endpoints: vec![format!("http://127.0.0.1:{}", free_port())], ..config_for_nothing() };
    let d = EtcdDiscovery::connect(config).await.expect("connecting is lazy");
    let c = cluster("nowhere");

    let err = timeout(STEP, d.list_and_watch(&c)).await.expect("list has a deadline").unwrap_err();
    assert!(matches!(err.kind(), "unavailable" | "timeout"), "{err}");
    let err = timeout(STEP, d.register(&c, worker("p0", Role::Prefill), TTL)).await.expect("register has a deadline");
    let err = err.unwrap_err();
    assert!(matches!(err.kind(), "unavailable" | "timeout"), "{err}");
    shutdown(&d).await;
    assert_eq!(d.list_and_watch(&c).await.unwrap_err().kind(), "shutdown");
}

fn config_for_nothing() -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![],
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(1),
        ping_interval: Duration::from_secs(1),
        ping_timeout: Duration::from_secs(1),
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_millis(500),
    }
}
