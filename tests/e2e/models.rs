//! Several models in one cluster: one router serving SmolLM2-135M and Qwen2.5-Coder-0.5B
//! at once, each model with its own prefill and decode worker, all separate processes
//! against a real etcd. Each model's greedy text through the cluster, over gRPC and the
//! OpenAI HTTP API, equals `tandem generate` on that model; a request that names no model
//! gets the first; a model the router does not serve is NOT_FOUND / 404 `model_not_found`;
//! `ListModels` and `/v1/models` list both; Tokenize uses the named model's tokenizer.
//! And `tandem up` with one file under two names runs a pool per name.
//!
//! `TANDEM_E2E_SECOND_MODEL` (a file under `models/`) replaces Qwen2.5-Coder as the second
//! model, e.g. with SmolLM2's own file: the same checks with one file served under two names,
//! less those that need two different models.

mod harness;

use std::time::Duration;

use harness::*;
use tandem_proto::tandem::v1 as api;
use tonic::Code;

const SMOL: &str = "smollm2";
const QWEN: &str = "qwen2.5-coder";

/// The two models: (name, file).
fn models() -> [(&'static str, std::path::PathBuf); 2] {
    let second =
        std::env::var("TANDEM_E2E_SECOND_MODEL").unwrap_or_else(|_| "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf".into());
    [(SMOL, model_file("SmolLM2-135M-Instruct.Q4_1.gguf")), (QWEN, model_file(&second))]
}

/// `POST path` with a JSON body over HTTP/1.0: the status and the JSON that came back.
fn http_post(addr: &str, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, json) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("a status code");
    (status, serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}")))
}

fn for_model(mut req: api::GenerateRequest, model: &str) -> api::GenerateRequest {
    req.model = model.into();
    req
}

#[test]
fn one_router_serves_two_models_each_on_its_own_workers() {
    let _one = serial();
    let etcd = Etcd::start();
    let cluster = format!("e2e{}", free_port());
    let mut workers = Vec::new();
    for (name, path) in models() {
        let path = path.to_str().unwrap().to_string();
        for role in ["prefill", "decode"] {
            let id = format!("{name}-{role}");
            let args = [
                role,
                "--etcd",
                &etcd.url,
                "--cluster",
                &cluster,
                "--id",
                &id,
                "--lease-ttl",
                "2",
                "--model-name",
                name,
                "--kv-blocks",
                "256",
            ];
            let p = Proc::spawn(&id, tandem_serving(&args, &[&path]));
            p.wait_line("tandem: ready", Duration::from_secs(120));
            workers.push(p);
        }
    }
    let served: Vec<String> = models().iter().map(|(n, p)| format!("{n}={}", p.display())).collect();
    let served: Vec<&str> = served.iter().map(String::as_str).collect();
    let args = ["router", "--etcd", &etcd.url, "--cluster", &cluster, "--grpc-listen", "127.0.0.1:0"];
    let router =
        Proc::spawn("router", tandem_serving(&[&args[..], &["--http-listen", "127.0.0.1:0"]].concat(), &served));
    let (grpc, http) = (router.addr_after("tandem: router", "grpc"), router.addr_after("tandem: router", "http"));
    assert!(router.wait_line("tandem: router", Duration::from_secs(1)).contains("models smollm2,qwen2.5-coder"));
    for (name, _) in models() {
        for role in ["prefill", "decode"] {
            router.wait_event("worker joined", &[("worker", &format!("{name}-{role}"))], Duration::from_secs(30));
        }
    }

    let chat_text = "Write a function that adds two numbers.";
    let raw_text = "The three laws of motion are";
    let references: Vec<(&str, String, String)> = models()
        .iter()
        .map(|(name, path)| {
            let chat = generate_reference_on(path, Some(chat_text), None, 24);
            (*name, chat, generate_reference_on(path, None, Some(raw_text), 16))
        })
        .collect();
    // Two files, or one under two names (TANDEM_E2E_SECOND_MODEL).
    let two_files = models()[0].1 != models()[1].1;
    if two_files {
        assert_ne!(references[0].1, references[1].1, "the two models answer differently");
    }

    rt().block_on(async {
        let mut c = client(&grpc).await;
        for (name, chat_ref, raw_ref) in &references {
            let got = stream(&mut c, for_model(chat(chat_text, 24), name)).await.unwrap();
            assert_eq!(&got.text, chat_ref, "{name}: chat over gRPC");
            let got = c.generate(for_model(raw(raw_text, 16), name)).await.unwrap().into_inner();
            assert_eq!(&got.choices[0].text, raw_ref, "{name}: raw prompt over gRPC");
            assert_eq!(&got.model, name);
        }
        // No model named: the first.
        let got = stream(&mut c, chat(chat_text, 24)).await.unwrap();
        assert_eq!(got.text, references[0].1, "the default model");

        let e = c.generate(for_model(chat("Hi", 4), "gpt-17")).await.expect_err("a model not served");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().contains("\"gpt-17\""), "names the model: {}", e.message());
        let e = stream(&mut c, for_model(chat("Hi", 4), "gpt-17")).await.expect_err("a model not served");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");

        let listed = c.list_models(api::ListModelsRequest {}).await.unwrap().into_inner().models;
        let ids: Vec<&str> = listed.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, [SMOL, QWEN]);

        // Tokenize with each model's own tokenizer.
        let tokenize = |model: &str| api::TokenizeRequest {
            model: model.into(),
            input: Some(api::tokenize_request::Input::Prompt(raw_text.into())),
            ..Default::default()
        };
        let smol = c.tokenize(tokenize(SMOL)).await.unwrap().into_inner();
        let qwen = c.tokenize(tokenize(QWEN)).await.unwrap().into_inner();
        assert!(smol.count > 0 && qwen.count > 0);
        if two_files {
            assert_ne!(smol.token_ids, qwen.token_ids, "two vocabularies");
            assert_eq!((smol.max_model_len, qwen.max_model_len), (8192, 32768));
            // Each chat template, each vocabulary: ChatML's `<|im_start|>` is 1 in SmolLM2's and
            // 151644 in Qwen's.
            let chat_of = |model: &str| api::TokenizeRequest {
                model: model.into(),
                input: Some(api::tokenize_request::Input::Messages(api::Messages {
                    messages: vec![api::ChatMessage {
                        role: "user".into(),
                        content: chat_text.into(),
                        ..Default::default()
                    }],
                    tools: vec![],
                })),
                ..Default::default()
            };
            let smol = c.tokenize(chat_of(SMOL)).await.unwrap().into_inner();
            let qwen = c.tokenize(chat_of(QWEN)).await.unwrap().into_inner();
            assert!(smol.token_ids.contains(&1) && smol.token_ids.iter().all(|&t| t < 49_152), "{smol:?}");
            assert!(qwen.token_ids.contains(&151_644), "{qwen:?}");
        }
        let e = c.tokenize(tokenize("gpt-17")).await.expect_err("a model not served");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
    });

    // The OpenAI HTTP API: the same texts, 404 for a model not served, both listed.
    for (name, chat_ref, raw_ref) in &references {
        let body = serde_json::json!({
            "model": name, "messages": [{"role": "user", "content": chat_text}], "max_tokens": 24, "temperature": 0,
        });
        let (status, v) = http_post(&http, "/v1/chat/completions", &body);
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["message"]["content"].as_str(), Some(chat_ref.as_str()), "{name}: chat over HTTP");
        assert_eq!(v["model"], *name);
        let body = serde_json::json!({"model": name, "prompt": raw_text, "max_tokens": 16, "temperature": 0});
        let (status, v) = http_post(&http, "/v1/completions", &body);
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["text"].as_str(), Some(raw_ref.as_str()), "{name}: completion over HTTP");
    }
    let body = serde_json::json!({"model": "gpt-17", "messages": [{"role": "user", "content": "Hi"}]});
    let (status, v) = http_post(&http, "/v1/chat/completions", &body);
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"]["code"], "model_not_found", "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("\"gpt-17\"")), "{v}");
    let listed: serde_json::Value = serde_json::from_str(&http_get(&http, "/v1/models")).unwrap();
    let ids: Vec<&str> = listed["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, [SMOL, QWEN]);
    drop(router);
    drop(workers);
}

/// `tandem up` with one file under two names: a pool per name (same weights, so the same
/// fingerprint: only the name keeps the pools apart), each answering as the file does.
#[test]
fn up_runs_a_pool_per_model() {
    let _one = serial();
    let file = model();
    let (a, b) = (format!("a={}", file.display()), format!("b={}", file.display()));
    let args = ["up", "--grpc-port", "0", "--http-port", "0", "--threads-per-worker", "1"];
    let p = Proc::spawn("tandem up", tandem_serving(&args, &[&a, &b]));
    let line = p.wait_line("tandem: router", Duration::from_secs(120));
    assert!(line.contains("1 prefill, 1 decode per model") && line.contains("models a,b"), "{line}");
    p.wait_line("tandem: ready", Duration::from_secs(60));
    let grpc = p.addr_after("tandem: router", "grpc");
    let ids: Vec<String> = p.output().iter().filter(|l| l.starts_with("tandem: worker")).cloned().collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
    for id in ["a-prefill-0", "a-decode-0", "b-prefill-0", "b-decode-0"] {
        assert!(ids.iter().any(|l| l.contains(&format!("worker {id} "))), "{id} in {ids:?}");
    }
    let prompt = "Say hello in French.";
    let reference = generate_reference(Some(prompt), None, 16);
    rt().block_on(async {
        let mut c = client(&grpc).await;
        for name in ["a", "b", ""] {
            let got = stream(&mut c, for_model(chat(prompt, 16), name)).await.unwrap();
            assert_eq!(got.text, reference, "model {name:?}");
        }
        let e = c.generate(for_model(chat(prompt, 4), "c")).await.expect_err("not served");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        // Each name's request was computed by its own pool's prefill worker.
        for id in ["a-prefill-0", "b-prefill-0"] {
            let line = ids.iter().find(|l| l.contains(&format!("worker {id} "))).unwrap();
            let addr = line.split_whitespace().skip_while(|w| *w != "grpc").nth(1).expect("an address");
            assert!(stats(addr).await.prefix_cache_queried_tokens > 0, "{id} computed no prompt");
        }
    });
}
