//! Metrics end to end, with Debian's Prometheus (scripts/setup-prometheus.sh installs it).
//! A real `tandem up` (router and workers in one process, one `/metrics`) and a separate
//! `tandem prefill --metrics-listen` process joined to it through a real etcd serve
//! traffic from `tandem bench serve`. Then:
//! * `promtool check metrics` has nothing to say about either `/metrics`;
//! * `promtool check rules` and `promtool check config` pass on deploy/prometheus/;
//! * every PromQL expression in deploy/grafana/*.json, deploy/prometheus/rules.yml and
//!   docs/metrics.md (its `promql` blocks), run with `promtool query instant` against a
//!   scratch Prometheus that scraped both processes every second under that traffic,
//!   parses and returns at least one series with a value (not NaN).
//!
//! How the expressions are made runnable:
//! * Grafana's `$__rate_interval`, `$__interval` and `$__range` become `1m`; a dashboard
//!   variable becomes its current value (custom, constant, textbox) or `.*` (a query
//!   variable, which the dashboards use as `=~"$var"`); any other `$` is an error. A
//!   query variable's `label_values(metric, label)` is checked as `count by (label) (metric)`.
//! * Rules are read back from the scratch Prometheus, which loaded rules.yml
//!   (`/api/v1/rules`: each `expr` in one canonical line, with its evaluation health);
//!   their number must equal the `expr:` lines of the file.
//! * An alert is true only when something is wrong, so its condition is stripped:
//!   rules.yml writes every alert `<query> <comparison> <number>` (one comparison at the
//!   top level), and `<query>` must return series in a healthy cluster. That is why the
//!   ratio alerts count "no failure yet" as 0 (`or ... * 0`) instead of as no data.
//! * Counters appear on their first increment and `rate` needs two samples of a series,
//!   so a warm-up creates every series (including an error's) before the measured traffic.

mod harness;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::*;
use serde_json::Value;

/// What a Grafana interval variable becomes: the traffic is all within the last minute.
const WINDOW: &str = "1m";

/// Runs `cmd`; (success, stdout, stderr).
fn run(mut cmd: Command) -> (bool, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

fn promtool(args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new("promtool");
    cmd.args(args);
    run(cmd)
}

/// `promtool check metrics` on `body`: its complaints (none when it passes silently).
fn check_metrics(body: &str) -> Option<String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (!out.status.success() || !said.trim().is_empty()).then(|| format!("exit {:?}: {}", out.status.code(), said.trim()))
}

/// `tandem bench serve` against the gRPC address or (`openai`) the HTTP one.
fn bench(api: &str, target: &str, requests: u32, concurrency: u32, max_tokens: u32) {
    let mut cmd = Command::new(tandem_bin());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("TANDEM_")) {
        cmd.env_remove(k);
    }
    let (n, c, m) = (requests.to_string(), concurrency.to_string(), max_tokens.to_string());
    cmd.args(["bench", "serve", "--api", api, "--target", target, "--json"]);
    cmd.args(["--requests", &n, "--concurrency", &c, "--max-tokens", &m]);
    let (ok, out, err) = run(cmd);
    assert!(ok, "bench serve --api {api}: {err}");
    let v: Value = serde_json::from_str(out.lines().last().unwrap_or("")).expect("bench prints JSON");
    assert_eq!(v["requests"], requests, "bench serve --api {api}: {out}");
}

/// A scratch Prometheus on a loopback port: scrapes `targets` (job, address) every
/// second and evaluates deploy/prometheus/rules.yml every second; killed on drop.
struct Prometheus {
    url: String,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[(&str, &str)]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let rules = root().join("deploy/prometheus/rules.yml");
        let mut cfg = String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n");
        cfg += &format!("rule_files:\n  - {:?}\nscrape_configs:\n", rules.display().to_string());
        for (job, addr) in targets {
            cfg += &format!("  - job_name: {job}\n    static_configs:\n      - targets: [{addr:?}]\n");
        }
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, cfg).unwrap();
        // A port found free may be taken before Prometheus binds it: then try another.
        for attempt in 0..5 {
            let listen = format!("127.0.0.1:{}", free_port());
            let mut cmd = Command::new("prometheus");
            cmd.arg(format!("--config.file={}", file.display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join(format!("data{attempt}")).display()))
                .arg(format!("--web.listen-address={listen}"));
            let mut proc = Proc::spawn("prometheus", cmd);
            let end = Instant::now() + Duration::from_secs(30);
            loop {
                if proc.output().iter().any(|l| l.contains("Server is ready to receive web requests")) {
                    return Prometheus { url: format!("http://{listen}"), _proc: proc, _dir: dir };
                }
                if !proc.alive() {
                    std::thread::sleep(Duration::from_millis(100));
                    let out = proc.output().join("\n");
                    assert!(out.contains("address already in use"), "prometheus exited at start:\n{out}");
                    break;
                }
                assert!(Instant::now() < end, "prometheus not ready within 30 s:\n{}", proc.output().join("\n"));
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("prometheus found its port taken 5 times in a row");
    }

    /// `promtool query instant`: the resulting series (labels, value).
    fn query(&self, expr: &str) -> Result<Vec<(String, f64)>, String> {
        let (ok, out, err) = promtool(&["query", "instant", "-o", "json", &self.url, expr]);
        if !ok {
            return Err(err.trim().to_string());
        }
        let v: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        let series = v.as_array().ok_or_else(|| format!("not an instant vector: {out}"))?;
        Ok(series
            .iter()
            .map(|s| {
                let value = s["value"][1].as_str().and_then(|x| x.parse().ok()).unwrap_or(f64::NAN);
                (s["metric"].to_string(), value)
            })
            .collect())
    }

    /// Waits until `expr` has a series whose value satisfies `ok`.
    fn wait(&self, expr: &str, ok: impl Fn(f64) -> bool) {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.query(expr);
            if got.as_ref().is_ok_and(|s| s.iter().any(|(_, v)| ok(*v))) {
                return;
            }
            assert!(Instant::now() < end, "prometheus: {expr} never held; last: {got:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every rule rules.yml defines, as Prometheus loaded it: (name, alert?, query);
    /// with the problems of any rule whose evaluation failed.
    fn rules(&self, problems: &mut Vec<String>) -> Vec<(String, bool, String)> {
        let addr = self.url.trim_start_matches("http://");
        let v: Value = serde_json::from_str(&http_get(addr, "/api/v1/rules")).unwrap();
        let mut rules = Vec::new();
        for r in v["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()) {
            let name = r["name"].as_str().unwrap().to_string();
            if r["health"] != "ok" {
                problems.push(format!("rule {name}: health {} {}", r["health"], r["lastError"]));
            }
            rules.push((name, r["type"] == "alerting", r["query"].as_str().unwrap().to_string()));
        }
        rules
    }
}

/// `$name` and `${name}` replaced from `vars`; an unknown variable is an error.
fn substitute(expr: &str, vars: &HashMap<String, String>) -> Result<String, String> {
    let (mut out, mut rest) = (String::new(), expr);
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(inner) => {
                let end = inner.find('}').ok_or_else(|| format!("unclosed ${{ in {expr}"))?;
                (&inner[..end], end + 2)
            }
            None => {
                let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        out.push_str(vars.get(name).ok_or_else(|| format!("unknown variable ${name} in {expr}"))?);
        rest = &after[len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `<query> <op> <number>` → `<query>`: an alert without its condition. The comparison
/// must be the only one outside brackets and strings, and its right side a number.
fn strip_condition(q: &str) -> Result<String, String> {
    let b = q.as_bytes();
    let (mut depth, mut quote, mut found) = (0i32, None, Vec::new());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match quote {
            Some(_) if c == b'\\' => i += 1,
            Some(open) if c == open => quote = None,
            Some(_) => {}
            None => match c {
                b'"' | b'\'' | b'`' => quote = Some(c),
                b'(' | b'{' | b'[' => depth += 1,
                b')' | b'}' | b']' => depth -= 1,
                b'=' | b'!' | b'<' | b'>' if depth == 0 => {
                    let len = if b.get(i + 1) == Some(&b'=') { 2 } else { 1 };
                    if len == 1 && matches!(c, b'=' | b'!') {
                        return Err(format!("unexpected {:?} in {q}", c as char));
                    }
                    found.push((i, len));
                    i += len;
                    continue;
                }
                _ => {}
            },
        }
        i += 1;
    }
    let [(at, len)] = found[..] else {
        return Err(format!("{} comparisons at the top level, want 1: {q}", found.len()));
    };
    let rhs = q[at + len..].trim();
    rhs.parse::<f64>().map_err(|_| format!("the condition's right side is not a number: {rhs:?} in {q}"))?;
    Ok(q[..at].trim().to_string())
}

/// Every `expr` of `v`, wherever it is (panels, rows' panels, library panels).
fn exprs_in(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => exprs_in(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| exprs_in(x, out)),
        _ => {}
    }
}

/// Every dashboard's queries, runnable: (where, PromQL). Checks the `${datasource}`
/// variable on the way (problems go to `problems`).
fn dashboard_queries(problems: &mut Vec<String>) -> Vec<(String, String)> {
    let dir = root().join("deploy/grafana");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "dashboards in deploy/grafana: {files:?}");
    let mut queries = Vec::new();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).expect("dashboard JSON");
        let mut vars: HashMap<String, String> =
            ["__rate_interval", "__interval", "__range"].iter().map(|k| (k.to_string(), WINDOW.to_string())).collect();
        for var in d["templating"]["list"].as_array().into_iter().flatten() {
            let vname = var["name"].as_str().unwrap_or_default().to_string();
            let value = match var["type"].as_str().unwrap_or_default() {
                "datasource" => {
                    if var["query"] != "prometheus" {
                        problems.push(format!("{name}: variable {vname} is not a Prometheus datasource"));
                    }
                    "${datasource}".to_string()
                }
                "query" => {
                    let q = var["query"]["query"].as_str().or(var["query"].as_str()).unwrap_or_default();
                    if let Some(args) = q.strip_prefix("label_values(").and_then(|s| s.strip_suffix(')')) {
                        let (metric, label) = args.rsplit_once(',').expect("label_values(metric, label)");
                        queries.push((format!("{name} ${vname}"), format!("count by ({}) ({metric})", label.trim())));
                    }
                    ".*".to_string()
                }
                _ => match &var["current"]["value"] {
                    Value::String(s) => s.clone(),
                    Value::Array(a) => a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join("|"),
                    other => panic!("{name}: variable {vname}: current value {other}"),
                },
            };
            vars.insert(vname, value);
        }
        if vars.get("datasource").map(String::as_str) != Some("${datasource}") {
            problems.push(format!("{name}: no `datasource` variable of type datasource"));
        }
        for p in d["panels"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| std::iter::once(p).chain(p["panels"].as_array().into_iter().flatten()))
        {
            let title = p["title"].as_str().unwrap_or_default();
            if p["type"] != "row" && p["datasource"]["uid"] != "${datasource}" {
                problems.push(format!("{name}: panel {title:?} does not use ${{datasource}}"));
            }
            for t in p["targets"].as_array().into_iter().flatten() {
                if t["datasource"]["uid"] != "${datasource}" {
                    problems.push(format!("{name}: a query of panel {title:?} does not use ${{datasource}}"));
                }
            }
        }
        let mut exprs = Vec::new();
        exprs_in(&d, &mut exprs);
        for e in exprs {
            match substitute(&e, &vars) {
                Ok(q) => queries.push((name.clone(), q)),
                Err(err) => problems.push(format!("{name}: {err}")),
            }
        }
    }
    queries
}

/// The queries of docs/metrics.md: its `promql` blocks, split at blank lines.
fn docs_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("docs/metrics.md")).unwrap();
    let (mut queries, mut block, mut inside) = (Vec::new(), Vec::new(), false);
    for line in text.lines() {
        if !inside {
            inside = line.trim() == "```promql";
        } else if line.trim().is_empty() || line.trim() == "```" {
            if !block.is_empty() {
                queries.push(("docs/metrics.md".to_string(), block.join("\n")));
                block.clear();
            }
            inside = line.trim() != "```";
        } else {
            block.push(line);
        }
    }
    assert!(queries.len() >= 10, "docs/metrics.md has its example queries: {queries:?}");
    queries
}

fn count_expr_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).unwrap().lines().filter(|l| l.trim_start().starts_with("expr:")).count()
}

#[test]
fn strip_condition_and_substitute_read_promql() {
    let ok = [
        ("up{job=~\".*tandem.*\"} == 0", "up{job=~\".*tandem.*\"}"),
        ("(a or b * 0) / c > 0.05", "(a or b * 0) / c"),
        ("x{l=\">\"} < 1", "x{l=\">\"}"),
        ("max by (i) (m) >= 460", "max by (i) (m)"),
    ];
    for (q, want) in ok {
        assert_eq!(strip_condition(q).as_deref(), Ok(want), "{q}");
    }
    for q in ["a > 1 and b > 2", "absent(x)", "a > b", "a > bool 1"] {
        assert!(strip_condition(q).is_err(), "{q}");
    }
    let vars: HashMap<String, String> =
        [("__rate_interval", "1m"), ("worker", ".*")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert_eq!(substitute("rate(x{w=~\"$worker\"}[$__rate_interval])", &vars).unwrap(), "rate(x{w=~\".*\"}[1m])");
    assert_eq!(substitute("rate(x[${__rate_interval}])", &vars).unwrap(), "rate(x[1m])");
    assert!(substitute("x{a=\"$nope\"}", &vars).is_err());
}

#[test]
fn metrics_pass_promtool_and_every_dashboard_and_rule_query_returns_series() {
    let _one = serial();
    let started = Instant::now();
    let (ok, out, err) = run(Command::new(root().join("scripts/setup-prometheus.sh")));
    assert!(ok, "scripts/setup-prometheus.sh failed:\n{out}{err}");

    let mut problems = Vec::new();
    let rules_file = root().join("deploy/prometheus/rules.yml");
    let config_file = root().join("deploy/prometheus/prometheus.yml");
    for args in [["check", "rules"], ["check", "config"]] {
        let file = if args[1] == "rules" { &rules_file } else { &config_file };
        let (ok, out, err) = promtool(&[args[0], args[1], file.to_str().unwrap()]);
        eprintln!("promtool {} {}:\n{}{}", args[0], args[1], out.trim_end(), err.trim_end());
        if !ok {
            problems.push(format!("promtool {} {}: {out}{err}", args[0], args[1]));
        }
    }

    // A `tandem up` and a separate prefill worker that joins it through etcd.
    let etcd = Etcd::start();
    let cluster = format!("metrics{}", free_port());
    let (worker, _) = start_worker(&etcd, &cluster, "prefill", "prefill-m", &["--metrics-listen", "127.0.0.1:0"]);
    let worker_url = worker.addr_after("tandem: metrics", "metrics");
    let worker_http = worker_url.trim_start_matches("http://").trim_end_matches("/metrics").to_string();
    let up_args = ["up", "--etcd", &etcd.url, "--cluster", &cluster, "--grpc-port", "0", "--http-port", "0"];
    let up = Proc::spawn("tandem up", tandem(&up_args));
    let grpc = up.addr_after("tandem: router", "grpc");
    let http = up.addr_after("tandem: router", "http");
    up.wait_line("tandem: ready", Duration::from_secs(60));
    up.wait_event("worker joined", &[("worker", "prefill-m")], Duration::from_secs(30));

    let prom = Prometheus::start(&[("tandem-router", &http), ("tandem-workers", &worker_http)]);
    prom.wait(r#"sum(up{job=~"tandem-router|tandem-workers"})"#, |v| v == 2.0);

    // Warm-up: every series the dashboards read exists before the measured traffic,
    // including a failed request's (an empty prompt: INVALID_ARGUMENT).
    bench("grpc", &grpc, 2, 2, 4);
    bench("openai", &format!("http://{http}"), 2, 2, 4);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let refused = rt.block_on(async { stream(&mut client(&grpc).await, raw("", 4)).await });
    assert_eq!(refused.expect_err("an empty prompt is refused").code(), tonic::Code::InvalidArgument);
    prom.wait("sum(tandem_requests_total)", |v| v >= 5.0);
    // The traffic the rates see, then a scrape after it and a rule evaluation since.
    bench("grpc", &grpc, 20, 4, 16);
    prom.wait("sum(tandem_requests_total)", |v| v >= 25.0);
    prom.wait("tandem:time_to_first_token_seconds:p99_5m", f64::is_finite);

    for (what, addr) in
        [("tandem up's router /metrics", &http), ("the worker's --metrics-listen /metrics", &worker_http)]
    {
        let body = http_get(addr, "/metrics");
        assert!(body.contains("tandem_kv_blocks_used{"), "{what} has worker metrics:\n{body}");
        if let Some(said) = check_metrics(&body) {
            problems.push(format!("promtool check metrics on {what}: {said}"));
        }
    }

    let mut queries = dashboard_queries(&mut problems);
    queries.extend(docs_queries());
    let rules = prom.rules(&mut problems);
    if rules.len() != count_expr_lines(&rules_file) {
        problems.push(format!(
            "Prometheus loaded {} rules, rules.yml has {} `expr:`",
            rules.len(),
            count_expr_lines(&rules_file)
        ));
    }
    for (name, alert, q) in rules {
        match if alert { strip_condition(&q) } else { Ok(q) } {
            Ok(q) => queries.push((format!("rule {name}"), q)),
            Err(e) => problems.push(format!("alert {name}: {e}")),
        }
    }
    for (at, q) in &queries {
        match prom.query(q) {
            Ok(s) if s.iter().any(|(_, v)| !v.is_nan()) => {}
            Ok(s) if s.is_empty() => problems.push(format!("{at}: no series: {q}")),
            Ok(s) => problems.push(format!("{at}: only NaN: {q} -> {s:?}")),
            Err(e) => problems.push(format!("{at}: {e}: {q}")),
        }
    }
    eprintln!("metrics: {} queries checked in {:.1?} in all", queries.len(), started.elapsed());
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
    drop((prom, up, worker, etcd));
}
