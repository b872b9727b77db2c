//! Structured output and tool calling on `tandem up` (one prefill and one decode worker per
//! model: every constrained request crosses the prefill-to-decode hop), checked with the
//! official `openai` Python client and the `jsonschema` package
//! (tests/e2e/structured_client.py): JSON Schemas, JSON objects, regexes, choices and
//! grammars; tools with `auto`, `required` and a named function, whole and streamed, and a
//! tool's result answered; bad guides refused by field; a template without tools refusing
//! them. The disaggregated path under a decode worker's death is in cluster.rs.

mod harness;

use std::process::Command;
use std::time::Duration;

use harness::*;

#[test]
fn the_openai_client_gets_structured_output_and_tool_calls_from_tandem_up() {
    let _one = serial();
    let qwen = format!("qwen={}", model_file("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf").display());
    let smol = format!("smol={}", model().display());
    let args = ["up", "--grpc-port", "0", "--http-port", "0", "--threads-per-worker", "1"];
    let p = Proc::spawn("tandem up", tandem_serving(&args, &[&qwen, &smol]));
    p.wait_line("tandem: router", Duration::from_secs(180));
    p.wait_line("tandem: ready", Duration::from_secs(120));
    let http = p.addr_after("tandem: router", "http");
    let python = root().join(".venv-clients/bin/python");
    assert!(python.exists(), "run scripts/setup-python-clients.sh (openai, jsonschema)");
    let out = Command::new(&python)
        .arg(root().join("tests/e2e/structured_client.py"))
        .args([&http, "qwen", "smol"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("all ok"),
        "structured-output checks failed:\n{stdout}\n{}\nrouter and workers:\n{}",
        String::from_utf8_lossy(&out.stderr),
        p.stderr().join("\n")
    );
    // The router counted the constrained requests, by kind.
    let body = http_get(&http, "/metrics");
    for kind in ["json_schema", "json_object", "regex", "choice", "grammar"] {
        assert!(body.contains(&format!("tandem_constrained_requests_total{{kind=\"{kind}\"}}")), "{kind} in:\n{body}");
    }
}
