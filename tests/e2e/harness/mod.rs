//! Real processes for the end-to-end tests: Debian's etcd on a loopback port
//! with a temporary data dir, `tandem` processes (the binary cargo built for
//! this test), their addresses read from what they print, and gRPC clients.
//! Every process is killed when its handle drops, so a failing test leaves
//! nothing running.

#![allow(dead_code)]

mod proxy;
// Not every test uses the proxy.
#[allow(unused_imports)]
pub use proxy::{Proxy, WireFault};

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_proto::auth::{ClusterToken, WorkerChannel};
use tandem_proto::tandem::v1 as api;
use tandem_proto::tandem::v1::generate_client::GenerateClient;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_proto::tandem::worker::v1::worker_client::WorkerClient;
use tonic::transport::Channel;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `scripts/grpc-call.py` with the project's client virtualenv.
pub fn grpc_call(args: &[&str]) -> (bool, String, String) {
    let python = root().join(".venv-clients/bin/python");
    assert!(python.exists(), "the gRPC client virtualenv is missing: run scripts/setup-python-clients.sh");
    let out = std::process::Command::new(python).arg(root().join("scripts/grpc-call.py")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn model() -> PathBuf {
    model_file("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// `models/<name>`, which must be there.
pub fn model_file(name: &str) -> PathBuf {
    let m = root().join("models").join(name);
    assert!(m.exists(), "model {name} missing: run scripts/fetch-model.sh all first");
    m
}

pub fn tandem_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tandem")
}

/// The end-to-end tests start many processes on two cores: one test at a time.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process whose output lines are collected; killed on drop.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    lines: Arc<Mutex<Vec<Line>>>,
}

/// A line a process wrote, when it was read, and whether on stderr (its logs) or stdout.
struct Line {
    at: Instant,
    stderr: bool,
    text: String,
}

/// Whether `line`, in the text log format (`TIME LEVEL target: message key=value ...`), is
/// the event `message` with each of `fields` (`key=value` as a whole word).
pub fn is_event(line: &str, message: &str, fields: &[(&str, &str)]) -> bool {
    line.contains(message)
        && fields.iter().all(|&(k, v)| {
            line.split_whitespace().any(|w| w.strip_prefix(k).and_then(|r| r.strip_prefix('=')) == Some(v))
        })
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        for (out, stderr) in [
            (child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>), false),
            (child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>), true),
        ] {
            let Some(out) = out else { continue };
            let lines = lines.clone();
            std::thread::spawn(move || {
                for text in BufReader::new(out).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(Line { at: Instant::now(), stderr, text });
                }
            });
        }
        Proc { name: name.to_string(), child: Some(child), lines }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Its lines so far, stdout's and stderr's as they were read.
    pub fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap().iter().map(|l| l.text.clone()).collect()
    }

    /// Its stderr lines so far: its logs.
    pub fn stderr(&self) -> Vec<String> {
        self.lines.lock().unwrap().iter().filter(|l| l.stderr).map(|l| l.text.clone()).collect()
    }

    /// When the first line containing `needle` was read (waiting for it up to `within`).
    pub fn line_time(&self, needle: &str, within: Duration) -> Instant {
        self.wait_for(&format!("line with {needle:?}"), within, |l| l.text.contains(needle)).0
    }

    /// Waits until a line containing `needle` appears; returns it.
    pub fn wait_line(&self, needle: &str, within: Duration) -> String {
        self.wait_for(&format!("line with {needle:?}"), within, |l| l.text.contains(needle)).1
    }

    /// Waits until a line containing `needle` appears on stderr; returns it.
    pub fn wait_stderr_line(&self, needle: &str, within: Duration) -> String {
        self.wait_for(&format!("stderr line with {needle:?}"), within, |l| l.stderr && l.text.contains(needle)).1
    }

    /// When the first log line of the event `message` with `fields` (`is_event`) was read.
    pub fn event_time(&self, message: &str, fields: &[(&str, &str)], within: Duration) -> Instant {
        self.first_event(message, fields, within).0
    }

    /// Waits until the process logs the event `message` with `fields` (`is_event`); the line.
    pub fn wait_event(&self, message: &str, fields: &[(&str, &str)], within: Duration) -> String {
        self.first_event(message, fields, within).1
    }

    fn first_event(&self, message: &str, fields: &[(&str, &str)], within: Duration) -> (Instant, String) {
        let what = format!("event {message:?} with {fields:?}");
        self.wait_for(&what, within, |l| l.stderr && is_event(&l.text, message, fields))
    }

    /// The first line that `matches`, and when it was read; panics, naming `what`, when
    /// there is none within `within`.
    fn wait_for(&self, what: &str, within: Duration, matches: impl Fn(&Line) -> bool) -> (Instant, String) {
        let end = Instant::now() + within;
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| matches(l)) {
                return (l.at, l.text.clone());
            }
            if Instant::now() > end {
                panic!("{}: no {what} within {within:?}; output:\n{}", self.name, self.output().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address printed after `word` on the line containing `needle`.
    pub fn addr_after(&self, needle: &str, word: &str) -> String {
        let line = self.wait_line(needle, Duration::from_secs(60));
        let mut it = line.split_whitespace();
        while let Some(w) = it.next() {
            if w == word {
                return it.next().expect("an address after the word").to_string();
            }
        }
        panic!("{}: no {word:?} in {line:?}", self.name);
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Its resident set size in KiB (`VmRSS` in /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_else(|e| panic!("{}: reading its /proc status: {e}", self.name));
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{}: no VmRSS in its /proc status", self.name))
    }

    pub fn signal(&self, sig: &str) {
        let ok = send_signal(sig, self.pid());
        assert!(ok, "kill -{sig} {}", self.name);
    }

    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit; its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let end = Instant::now() + within;
        let c = self.child.as_mut().expect("running");
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() > end {
                panic!("{} did not exit within {within:?}; output:\n{}", self.name, self.output().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `kill -SIG PID` through the shell's builtin (a bare machine may lack procps' `kill`).
fn send_signal(sig: &str, pid: u32) -> bool {
    Command::new("sh").arg("-c").arg(format!("kill -{sig} {pid}")).status().is_ok_and(|s| s.success())
}

impl Drop for Proc {
    /// SIGTERM (a clean exit removes the worker's shared-memory files), SIGKILL after 5 s.
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if c.try_wait().ok().flatten().is_none() {
                send_signal("TERM", c.id());
                let end = Instant::now() + Duration::from_secs(5);
                while c.try_wait().ok().flatten().is_none() && Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        self.kill();
    }
}

/// Debian's etcd on loopback ports with a temporary data dir.
pub struct Etcd {
    pub url: String,
    peer_url: String,
    proc: Option<Proc>,
    dir: tempfile::TempDir,
}

impl Etcd {
    pub fn start() -> Etcd {
        match Command::new("etcd").arg("--version").output() {
            Ok(o) if o.status.success() => {}
            _ => panic!("cannot run `etcd`: run scripts/setup-etcd.sh (installs Debian's etcd-server)"),
        }
        // A port found free may be taken before etcd binds it (by a worker's ephemeral
        // port, say): then start over on fresh ports.
        for _ in 0..5 {
            let (client, peer) = (free_port(), free_port());
            let mut etcd = Etcd {
                url: format!("http://127.0.0.1:{client}"),
                peer_url: format!("http://127.0.0.1:{peer}"),
                proc: None,
                dir: tempfile::tempdir().unwrap(),
            };
            match etcd.try_run() {
                Ok(()) => return etcd,
                Err(out) if out.contains("address already in use") => continue,
                Err(out) => panic!("etcd exited during start-up; output:\n{out}"),
            }
        }
        panic!("etcd found its ports taken 5 times in a row");
    }

    fn run(&mut self) {
        if let Err(out) = self.try_run() {
            panic!("etcd exited during start-up; output:\n{out}");
        }
    }

    /// Starts etcd and waits until it serves; its output if it exits first.
    fn try_run(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("etcd");
        cmd.arg("--name=tandem-e2e")
            .arg(format!("--data-dir={}", self.dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={}", self.url))
            .arg(format!("--advertise-client-urls={}", self.url))
            .arg(format!("--listen-peer-urls={}", self.peer_url))
            .arg(format!("--initial-advertise-peer-urls={}", self.peer_url))
            .arg(format!("--initial-cluster=tandem-e2e={}", self.peer_url));
        let mut proc = Proc::spawn("etcd", cmd);
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if proc.output().iter().any(|l| l.contains("ready to serve client requests")) {
                self.proc = Some(proc);
                return Ok(());
            }
            if !proc.alive() {
                // Let the reader threads take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return Err(proc.output().join("\n"));
            }
            assert!(Instant::now() < end, "etcd not ready within 30 s; output:\n{}", proc.output().join("\n"));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills etcd (SIGKILL: an outage, not a shutdown).
    pub fn stop(&mut self) {
        self.proc.take();
    }

    /// Kills etcd with SIGKILL at once: no graceful close of its clients' connections.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts etcd again on the same ports and data.
    pub fn restart(&mut self) {
        assert!(self.proc.is_none(), "etcd is running");
        self.run();
    }

    /// The keys under `prefix` with their lease ids (0: none), read from etcd itself
    /// through its JSON gateway (`POST /v3/kv/range`), not through Tandem's client.
    pub fn keys(&self, prefix: &str) -> Vec<(String, i64)> {
        use std::io::{Read, Write};
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().expect("a non-empty prefix") += 1;
        let body = serde_json::json!({"key": base64(prefix.as_bytes()), "range_end": base64(&end)}).to_string();
        let addr = self.url.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to etcd at {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let head = format!("POST /v3/kv/range HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n");
        write!(s, "{head}Content-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let (status, json) = resp.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(
            status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200"),
            "etcd range {prefix}: {resp}"
        );
        let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("etcd range: {e}: {json}"));
        let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
        kvs.iter()
            .map(|kv| {
                let key = unbase64(kv["key"].as_str().expect("a key"));
                // int64 fields are strings in the gateway's JSON; absent when zero.
                let lease = kv["lease"].as_str().map_or(0, |l| l.parse().expect("a lease id"));
                (String::from_utf8(key).expect("a UTF-8 key"), lease)
            })
            .collect()
    }
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (etcd's gateway carries keys so).
fn base64(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | ((b as u32) << (16 - 8 * i)));
        for i in 0..4 {
            out.push(if i <= chunk.len() { BASE64[((n >> (18 - 6 * i)) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

fn unbase64(text: &str) -> Vec<u8> {
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for c in text.bytes().take_while(|&c| c != b'=') {
        let v = BASE64.iter().position(|&b| b == c).unwrap_or_else(|| panic!("not base64: {text:?}"));
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// `tandem <args>` with the test's model and the test process's cluster token, with
/// `TANDEM_*` variables and `RUST_LOG` of the caller's environment cleared so they cannot
/// change what is tested (the tests read the processes' logs at the default level and
/// format).
pub fn tandem(args: &[&str]) -> Command {
    let model = model();
    tandem_serving(args, &[model.to_str().expect("a UTF-8 path")])
}

/// As `tandem`, with `--model` once for each of `models` (`PATH` or `NAME=PATH`) in place of
/// the test's model.
pub fn tandem_serving(args: &[&str], models: &[&str]) -> Command {
    let mut cmd = Command::new(tandem_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("TANDEM_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.env("TANDEM_CLUSTER_TOKEN_FILE", &token_file().path);
    cmd.args(args);
    for m in models {
        cmd.arg("--model").arg(m);
    }
    cmd
}

/// The cluster token every process this test process starts shares (a `--cluster-token-file`
/// flag of a test's own wins), and the file that holds it. Not the user's default token.
struct TokenFile {
    token: ClusterToken,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

fn token_file() -> &'static TokenFile {
    static FILE: std::sync::OnceLock<TokenFile> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.token");
        let token = ClusterToken::random();
        std::fs::write(&path, token.expose()).unwrap();
        TokenFile { token, path, _dir: dir }
    })
}

/// The cluster token of the processes this test starts: what a router or a worker holds.
pub fn cluster_token() -> &'static ClusterToken {
    &token_file().token
}

/// A separate-process cluster: router, prefill and decode workers against etcd.
pub struct Cluster {
    pub etcd: Etcd,
    pub router: Proc,
    pub router_addr: String,
    pub workers: Vec<(Proc, String)>,
    pub cluster: String,
}

pub fn start_worker(etcd: &Etcd, cluster: &str, role: &str, id: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec![role, "--etcd", &etcd.url, "--cluster", cluster, "--id", id, "--lease-ttl", "2"];
    args.extend_from_slice(extra);
    let p = Proc::spawn(id, tandem(&args));
    let addr = p.addr_after("tandem: worker", "grpc");
    (p, addr)
}

/// `tandem router` on free loopback ports; returns it and its gRPC address.
pub fn start_router(etcd: &Etcd, cluster: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["router", "--etcd", &etcd.url, "--cluster", cluster];
    args.extend_from_slice(&["--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"]);
    args.extend_from_slice(extra);
    let router = Proc::spawn("router", tandem(&args));
    let addr = router.addr_after("tandem: router", "grpc");
    (router, addr)
}

impl Cluster {
    /// `workers`: (role, id) pairs; role `prefill`, `decode` or `both` (a decode worker of role both).
    pub fn start(workers: &[(&str, &str)]) -> Cluster {
        Cluster::start_with(workers, &[])
    }

    /// As `start`, with extra flags for the router.
    pub fn start_with(workers: &[(&str, &str)], router_flags: &[&str]) -> Cluster {
        let etcd = Etcd::start();
        let cluster = format!("e2e{}", free_port());
        let mut ws = Vec::new();
        for (role, id) in workers {
            let w = match *role {
                "both" => start_worker(&etcd, &cluster, "decode", id, &["--role", "both"]),
                r => start_worker(&etcd, &cluster, r, id, &[]),
            };
            ws.push(w);
        }
        let (router, router_addr) = start_router(&etcd, &cluster, router_flags);
        for (_, id) in workers {
            router.wait_event("worker joined", &[("worker", id)], Duration::from_secs(30));
        }
        Cluster { etcd, router, router_addr, workers: ws, cluster }
    }
}

pub async fn client(addr: &str) -> GenerateClient<Channel> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        match GenerateClient::connect(format!("http://{addr}")).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > end => panic!("connecting to {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A client of a worker's control port that holds the cluster token, as a router does.
pub async fn worker_client(addr: &str) -> WorkerClient<WorkerChannel> {
    worker_client_with(addr, Some(cluster_token())).await
}

/// A client of a worker's control port that sends `token` (`None`: a stranger's, none).
pub async fn worker_client_with(addr: &str, token: Option<&ClusterToken>) -> WorkerClient<WorkerChannel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    tandem_proto::auth::worker_client(channel, token)
}

pub async fn stats(addr: &str) -> pb::StatsResponse {
    worker_client(addr).await.stats(pb::StatsRequest {}).await.unwrap().into_inner()
}

pub fn chat(text: &str, max_tokens: u32) -> api::GenerateRequest {
    api::GenerateRequest {
        input: Some(api::generate_request::Input::Messages(api::Messages {
            messages: vec![api::ChatMessage { role: "user".into(), content: text.into(), ..Default::default() }],
            tools: vec![],
        })),
        sampling: Some(api::SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(max_tokens),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn raw(text: &str, max_tokens: u32) -> api::GenerateRequest {
    api::GenerateRequest {
        input: Some(api::generate_request::Input::Prompt(text.into())),
        sampling: Some(api::SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(max_tokens),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One streamed choice, assembled.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Streamed {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish: i32,
    pub chunks: usize,
    pub usage: Option<api::Usage>,
}

/// Streams `req` to the end; the assembled choice 0, or the stream's error.
pub async fn stream(c: &mut GenerateClient<Channel>, req: api::GenerateRequest) -> Result<Streamed, tonic::Status> {
    let mut s = c.generate_stream(req).await?.into_inner();
    let mut out = Streamed::default();
    while let Some(m) = s.message().await? {
        out.text.push_str(&m.text);
        out.token_ids.extend(m.token_ids);
        out.chunks += 1;
        if m.finish_reason != 0 {
            out.finish = m.finish_reason;
        }
        if m.usage.is_some() {
            out.usage = m.usage;
        }
    }
    Ok(out)
}

/// `tandem generate` for the same greedy request, in its own process: the reference.
pub fn generate_reference(chat_text: Option<&str>, prompt: Option<&str>, max_tokens: u32) -> String {
    generate_reference_on(&model(), chat_text, prompt, max_tokens)
}

/// `generate_reference` with the model file `model`.
pub fn generate_reference_on(
    model: &std::path::Path,
    chat_text: Option<&str>,
    prompt: Option<&str>,
    max_tokens: u32,
) -> String {
    let mut args = vec![
        "generate".to_string(),
        "--temperature".into(),
        "0".into(),
        "--max-tokens".into(),
        max_tokens.to_string(),
        "--json".into(),
        "--threads".into(),
        "1".into(),
    ];
    if let Some(c) = chat_text {
        args.extend(["--chat".to_string(), c.to_string()]);
    }
    if let Some(p) = prompt {
        args.extend(["--prompt".to_string(), p.to_string()]);
    }
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = tandem_serving(&refs, &[model.to_str().expect("a UTF-8 path")]).output().unwrap();
    assert!(out.status.success(), "tandem generate failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("generate --json prints JSON");
    v["choices"][0]["text"].as_str().or_else(|| v["text"].as_str()).expect("a text field").to_string()
}

/// A plain HTTP/1.0 GET (the server closes the connection, no chunking); the body of a 200.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"), "GET {addr}{path}: {head}");
    body.to_string()
}

/// A multi-threaded runtime of 2 workers for a test's async part.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Raw protobuf bytes in, raw bytes out: gRPC calls whose messages do not decode.
pub mod raw_grpc {
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::codegen::Bytes;

    #[derive(Default)]
    pub struct Raw;
    pub struct RawEnc;
    pub struct RawDec;

    impl Encoder for RawEnc {
        type Item = Bytes;
        type Error = tonic::Status;
        fn encode(&mut self, item: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            use bytes::BufMut;
            buf.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawDec {
        type Item = Bytes;
        type Error = tonic::Status;
        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
            use bytes::Buf;
            Ok(Some(buf.copy_to_bytes(buf.remaining())))
        }
    }

    impl Codec for Raw {
        type Encode = Bytes;
        type Decode = Bytes;
        type Encoder = RawEnc;
        type Decoder = RawDec;
        fn encoder(&mut self) -> RawEnc {
            RawEnc
        }
        fn decoder(&mut self) -> RawDec {
            RawDec
        }
    }

    /// Calls `method` (`/package.Service/Method`) with `body` as a stranger (no cluster
    /// token); unary or server-streaming, the status it ends with (OK if it answered).
    pub async fn call(addr: &str, method: &'static str, body: Vec<u8>, streaming: bool) -> tonic::Status {
        call_as(addr, method, body, streaming, None).await
    }

    /// As `call`, sending `token` as routers and workers do.
    pub async fn call_as(
        addr: &str,
        method: &'static str,
        body: Vec<u8>,
        streaming: bool,
        token: Option<&tandem_proto::auth::ClusterToken>,
    ) -> tonic::Status {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
        let mut req = tonic::Request::new(Bytes::from(body));
        if let Some(t) = token {
            req.metadata_mut().insert(tandem_proto::auth::TOKEN_METADATA, t.expose().parse().unwrap());
        }
        let result = if streaming {
            match grpc.server_streaming(req, path, Raw).await {
                Ok(resp) => {
                    let mut s = resp.into_inner();
                    loop {
                        match s.message().await {
                            Ok(Some(_)) => continue,
                            Ok(None) => break Ok(()),
                            Err(e) => break Err(e),
                        }
                    }
                }
                Err(e) => Err(e),
            }
        } else {
            grpc.unary(req, path, Raw).await.map(|_| ())
        };
        result.err().unwrap_or_else(|| tonic::Status::ok(""))
    }
}

/// Short chat prompts the cluster tests send.
pub const PROMPTS: [&str; 8] = [
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Give me a tip for learning to cook.",
    "Explain what a volcano is in one sentence.",
    "List three animals that live in the ocean.",
    "Why is the sky blue?",
    "Say hello in French.",
];

/// The sum of the series of `name` in a `/metrics` scrape that carry every label of
/// `labels` (0 when there is none).
pub fn metric(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in scrape.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (m, rest) = series.split_once('{').unwrap_or((series, "}"));
        let tags: Vec<&str> = rest.trim_end_matches('}').split(',').collect();
        if m == name && labels.iter().all(|(k, v)| tags.contains(&format!("{k}=\"{v}\"").as_str())) {
            sum += value.parse::<f64>().unwrap_or_else(|e| panic!("{line:?}: {e}"));
        }
    }
    sum
}

/// Every worker holds nothing: no request running, waiting or waiting for KV, no block used.
pub async fn wait_idle(addrs: &[String]) -> Vec<tandem_proto::tandem::worker::v1::StatsResponse> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let mut all = Vec::new();
        for a in addrs {
            all.push(stats(a).await);
        }
        let idle = all.iter().all(|s| s.running + s.waiting + s.waiting_for_kv + s.kv_blocks_used == 0);
        if idle || Instant::now() > end {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn assert_idle(all: &[tandem_proto::tandem::worker::v1::StatsResponse]) {
    for s in all {
        assert_eq!(
            (s.running, s.waiting, s.waiting_for_kv, s.kv_blocks_used),
            (0, 0, 0, 0),
            "a worker still holds a request or blocks: {all:?}"
        );
    }
}
