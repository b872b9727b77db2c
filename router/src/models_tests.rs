//! Tests of serving several models from one router: placement keeps each request among
//! its model's workers (prefill and decode pairs never cross models, even when two pools
//! serve one file under two names), the prefix index predicts hits only among those
//! workers, and the front doors (gRPC and HTTP) route by the request's `model`, refuse a
//! name not served as NOT_FOUND / 404 `model_not_found`, tokenize with the named model and
//! list every served model. Workers are fakes that answer with their own id as the text.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem_cluster::{KvEndpoints, ModelInfo, Role, WorkerDescriptor, WorkerId};
use tandem_proto::tandem::v1 as api;
use tandem_proto::tandem::v1::generate_server::Generate;
use tandem_proto::tandem::worker::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Status};

use crate::admission::Admission;
use crate::members::{Members, Route, RouteAsk};
use crate::models::testing::facts;
use crate::models::ServedModels;
use crate::policy::{CacheAware, Candidate, RoutingPolicy};
use crate::quota::{Quotas, TenantLimits};
use crate::routing::Routing;
use crate::service::GenerateService;
use crate::state::RouterState;
use crate::worker::{DecodeStream, WorkerApi};

/// A worker whose every generation is one token, its text the worker's id.
struct Tagged {
    id: String,
    prefills: AtomicUsize,
}

#[tonic::async_trait]
impl WorkerApi for Tagged {
    async fn reserve(&self, _: pb::ReserveRequest) -> Result<pb::ReserveResponse, Status> {
        Ok(pb::ReserveResponse::default())
    }

    async fn prefill(&self, _: pb::PrefillRequest) -> Result<pb::PrefillResponse, Status> {
        self.prefills.fetch_add(1, Ordering::SeqCst);
        Ok(pb::PrefillResponse::default())
    }

    async fn decode(&self, _: pb::DecodeRequest) -> Result<DecodeStream, Status> {
        let chunk = pb::DecodeResponse {
            token_ids: vec![1],
            text: self.id.clone(),
            finish_reason: api::FinishReason::Length as i32,
            ..Default::default()
        };
        Ok(Box::pin(tokio_stream::iter(vec![Ok(chunk)])))
    }

    async fn cancel(&self, _: pb::CancelRequest) -> Result<pb::CancelResponse, Status> {
        Ok(pb::CancelResponse::default())
    }
}

/// The first candidate (workers in id order): a worker of another model that leaked into
/// the candidates would be picked whenever its id sorts first.
#[derive(Debug)]
struct First;

impl RoutingPolicy for First {
    fn name(&self) -> &'static str {
        "first"
    }
    fn pick_prefill(&self, _: &[Candidate<'_>], _: usize) -> usize {
        0
    }
    fn pick_decode(&self, _: &[Candidate<'_>], _: usize) -> usize {
        0
    }
}

/// One worker: `(id, role, model name, fingerprint)`.
type Spec<'a> = (&'a str, Role, &'a str, u64);

fn members(workers: &[Spec<'_>]) -> Arc<Members> {
    let members = Members::new(None, None, Default::default());
    for &(id, role, model, fingerprint) in workers {
        let desc = WorkerDescriptor {
            id: WorkerId::new(id).unwrap(),
            role,
            grpc_addr: "127.0.0.1:1".into(),
            kv: KvEndpoints { tcp: "127.0.0.1:2".parse().unwrap(), local: None },
            model: ModelInfo { name: model.into(), fingerprint },
            block_size: 16,
            hash_scheme: Some(tandem_text::prefix::SCHEME.into()),
            context_length: 4096,
            lease: tandem_proto::ids::LeaseId::from_wire(1),
        };
        members.join_fake(desc, Arc::new(Tagged { id: id.into(), prefills: AtomicUsize::new(0) }));
    }
    members
}

/// Where a request for `model` goes: `(prefill, decode)` ids (prefill `None`: a local
/// generation), or the error's code and message.
fn route(
    m: &Members,
    policy: &dyn RoutingPolicy,
    model: &str,
    prompt: &[u32],
) -> Result<(Option<String>, String), Status> {
    let ask = RouteAsk { model, prompt, salt: None, priority: 0 };
    Ok(match m.route(policy, &remote(), &ask, &[])? {
        Route::Disaggregated { prefill, decode } => (Some(prefill.id.to_string()), decode.id.to_string()),
        Route::Local(w) => (None, w.id.to_string()),
    })
}

const PROMPT: [u32; 40] = [7; 40];

#[test]
fn each_model_is_placed_on_its_own_workers_only() {
    // Two pools of one file under two names (one fingerprint), a third model aggregated. The
    // other model's workers sort first, so a leak would be picked.
    let m = members(&[
        ("a-decode", Role::Decode, "beta", 7),
        ("a-prefill", Role::Prefill, "beta", 7),
        ("b-both", Role::Both, "gamma", 9),
        ("z-decode", Role::Decode, "alpha", 7),
        ("z-prefill", Role::Prefill, "alpha", 7),
    ]);
    /// (model asked, where it goes: `(prefill, decode)`, or the error's code)
    type Case<'a> = (&'a str, Result<(Option<&'a str>, &'a str), Code>);
    let cases: [Case<'_>; 4] = [
        ("alpha", Ok((Some("z-prefill"), "z-decode"))),
        ("beta", Ok((Some("a-prefill"), "a-decode"))),
        ("gamma", Ok((None, "b-both"))),
        // A name no worker announces: as when no worker is up.
        ("delta", Err(Code::Unavailable)),
    ];
    for (model, want) in cases {
        let got = route(&m, &First, model, &PROMPT);
        match (got, want) {
            (Ok((p, d)), Ok((wp, wd))) => assert_eq!((p.as_deref(), d.as_str()), (wp, wd), "{model}"),
            (Err(e), Err(code)) => assert_eq!(e.code(), code, "{model}: {e:?}"),
            (got, want) => panic!("{model}: got {got:?}, wanted {want:?}"),
        }
    }
}

#[test]
fn a_prefill_worker_never_pairs_with_another_models_decode_worker() {
    type Case<'a> = (&'a str, Vec<Spec<'a>>, Result<(Option<&'a str>, &'a str), &'a str>);
    let cases: Vec<Case<'_>> = vec![
        // Same file (fingerprint), other name: beta's only prefill worker is not alpha's.
        (
            "alpha has no prefill worker of its own",
            vec![("decode-alpha", Role::Decode, "alpha", 7), ("prefill-beta", Role::Prefill, "beta", 7)],
            Err("no prefill worker serves \"alpha\""),
        ),
        (
            "alpha's role-both worker computes locally rather than pair with beta's prefill",
            vec![("both-alpha", Role::Both, "alpha", 7), ("prefill-beta", Role::Prefill, "beta", 7)],
            Ok((None, "both-alpha")),
        ),
        // Same name, other weights: the fingerprint still decides.
        (
            "alpha's prefill worker with other weights",
            vec![("decode-alpha", Role::Decode, "alpha", 7), ("prefill-alpha", Role::Prefill, "alpha", 8)],
            Err("no prefill worker has the KV layout of decode worker decode-alpha"),
        ),
        (
            "name and fingerprint both match",
            vec![
                ("decode-alpha", Role::Decode, "alpha", 7),
                ("a-prefill-beta", Role::Prefill, "beta", 7),
                ("prefill-alpha", Role::Prefill, "alpha", 7),
            ],
            Ok((Some("prefill-alpha"), "decode-alpha")),
        ),
    ];
    for (what, workers, want) in cases {
        let got = route(&members(&workers), &First, "alpha", &PROMPT);
        match (got, want) {
            (Ok((p, d)), Ok((wp, wd))) => assert_eq!((p.as_deref(), d.as_str()), (wp, wd), "{what}"),
            (Err(e), Err(msg)) => {
                assert_eq!(e.code(), Code::Unavailable, "{what}");
                assert!(e.message().contains(msg), "{what}: {}", e.message());
            }
            (got, want) => panic!("{what}: got {got:?}, wanted {want:?}"),
        }
    }
}

#[test]
fn the_prefix_index_predicts_hits_among_the_models_workers_only() {
    let m = members(&[
        ("alpha-d", Role::Decode, "alpha", 7),
        ("alpha-p0", Role::Prefill, "alpha", 7),
        ("alpha-p1", Role::Prefill, "alpha", 7),
        ("beta-d", Role::Decode, "beta", 7),
        ("beta-p0", Role::Prefill, "beta", 7),
        ("beta-p1", Role::Prefill, "beta", 7),
    ]);
    let policy = CacheAware { weight: 2.0 };
    let ask = |model| RouteAsk { model, prompt: &PROMPT, salt: None, priority: 0 };
    let prefill_of = |r: Route| match r {
        Route::Disaggregated { prefill, .. } => (prefill.id.to_string(), prefill.predicted_cached),
        Route::Local(_) => panic!("disaggregated"),
    };
    // Alpha's first request marks its prompt's blocks pending on the prefill worker it took.
    let (first, cached) = prefill_of(m.route(&policy, &remote(), &ask("alpha"), &[]).unwrap());
    assert_eq!(cached, Some(0));
    assert!(first.starts_with("alpha-p"), "{first}");
    // The same tokens for beta: nothing predicted, however alpha's workers hold them.
    let (to, cached) = prefill_of(m.route(&policy, &remote(), &ask("beta"), &[]).unwrap());
    assert!(to.starts_with("beta-p"), "{to}");
    assert_eq!(cached, Some(0), "beta's workers hold none of alpha's blocks");
    // Alpha again: the worker holding its prefix, predicted to hit both full blocks.
    let (again, cached) = prefill_of(m.route(&policy, &remote(), &ask("alpha"), &[]).unwrap());
    assert_eq!((again, cached), (first, Some(32)));
}

/// A router's state serving `alpha` (disaggregated), `beta` (role both) and `gamma` (no
/// worker up), alpha the default, over tagged fake workers.
fn state() -> Arc<RouterState> {
    let m = members(&[
        ("alpha-decode", Role::Decode, "alpha", 7),
        ("alpha-prefill", Role::Prefill, "alpha", 7),
        ("beta-both", Role::Both, "beta", 7),
    ]);
    let models = ServedModels::new(vec![facts("alpha"), facts("beta"), facts("gamma")]);
    let limits = TenantLimits::resolve(None, &[], &Default::default(), 16).unwrap();
    Arc::new(RouterState::new(models, Routing::new(m, Box::new(First)), Admission::new(16, Quotas::new(limits))))
}

fn prompt(model: &str) -> api::GenerateRequest {
    api::GenerateRequest {
        model: model.into(),
        input: Some(api::generate_request::Input::Prompt("The sea is".into())),
        sampling: Some(api::SamplingParams { max_tokens: Some(1), ..Default::default() }),
        ..Default::default()
    }
}

#[tokio::test]
async fn grpc_routes_by_model_and_refuses_a_model_not_served_as_not_found() {
    let svc = GenerateService(state());
    // (model asked, the text: the id of the worker that generated it, and the model echoed)
    let cases = [("", "alpha-decode", "alpha"), ("alpha", "alpha-decode", "alpha"), ("beta", "beta-both", "beta")];
    for (model, worker, echoed) in cases {
        let r = svc.generate(Request::new(prompt(model))).await.unwrap().into_inner();
        assert_eq!((r.choices[0].text.as_str(), r.model.as_str()), (worker, echoed), "{model:?}");
    }
    let e = svc.generate(Request::new(prompt("gpt-17"))).await.expect_err("not served");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().starts_with("model: unknown model \"gpt-17\""), "{}", e.message());
    // A served model with no worker up: as a router with no worker answers.
    let e = svc.generate(Request::new(prompt("gamma"))).await.expect_err("no worker of gamma");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    // Tokenize with the named model; NOT_FOUND for a name not served.
    let tokenize = |model: &str| api::TokenizeRequest {
        model: model.into(),
        input: Some(api::tokenize_request::Input::Prompt("The sea is".into())),
        ..Default::default()
    };
    let t = svc.tokenize(Request::new(tokenize("beta"))).await.unwrap().into_inner();
    assert!(t.count > 0 && t.max_model_len > 0, "{t:?}");
    let e = svc.tokenize(Request::new(tokenize("gpt-17"))).await.expect_err("not served");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("\"gpt-17\""), "{}", e.message());

    // Every served model is listed, the default first, with or without a worker up.
    let listed = svc.list_models(Request::new(api::ListModelsRequest {})).await.unwrap().into_inner().models;
    let ids: Vec<&str> = listed.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["alpha", "beta", "gamma"]);
    // The fakes accept 4096 tokens, fewer than the model file: the shorter is listed.
    assert_eq!((listed[0].max_model_len, listed[2].max_model_len), (4096, 8192));
}

/// `POST path` with a JSON body (or `GET` with none) over HTTP/1.0; the status and the body.
async fn http(addr: std::net::SocketAddr, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = match &body {
        Some(b) => {
            let b = b.to_string();
            format!("POST {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len())
        }
        None => format!("GET {path} HTTP/1.0\r\n\r\n"),
    };
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut resp)).await.unwrap().unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("a status");
    (status, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

#[tokio::test]
async fn http_routes_by_model_and_answers_404_model_not_found() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = crate::http::HttpLimits::default();
    let app = crate::http::routes(state(), limits, Default::default());
    let stop = CancellationToken::new();
    let server = tokio::spawn(crate::http::serve(listener, app, limits, stop.clone()));

    let completion = |model: Option<&str>| {
        let mut b = serde_json::json!({"prompt": "The sea is", "max_tokens": 1});
        if let Some(m) = model {
            b["model"] = m.into();
        }
        Some(b)
    };
    for (model, worker) in [(None, "alpha-decode"), (Some("alpha"), "alpha-decode"), (Some("beta"), "beta-both")] {
        let (status, v) = http(addr, "/v1/completions", completion(model)).await;
        assert_eq!(status, 200, "{model:?}: {v}");
        assert_eq!(v["choices"][0]["text"], worker, "{model:?}: {v}");
    }
    let chat = serde_json::json!({"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]});
    for (path, body) in [("/v1/completions", completion(Some("gpt-17"))), ("/v1/chat/completions", Some(chat))] {
        let (status, v) = http(addr, path, body).await;
        assert_eq!(status, 404, "{path}: {v}");
        assert_eq!(v["error"]["code"], "model_not_found", "{path}: {v}");
        assert_eq!(v["error"]["param"], "model", "{path}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("\"gpt-17\"")), "{path}: {v}");
    }
    let (status, v) = http(addr, "/v1/completions", completion(Some("gamma"))).await;
    assert_eq!((status, &v["error"]["code"]), (503, &serde_json::json!("service_unavailable")), "{v}");

    let (status, v) = http(addr, "/v1/models", None).await;
    assert_eq!(status, 200, "{v}");
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, ["alpha", "beta", "gamma"]);
    stop.cancel();
    let _ = server.await;
}

/// Placement that never prefills on a decode worker: these tests pin the pairs.
fn remote() -> crate::placement::PlacementControl {
    use crate::placement::{Mode, PlacementConfig, PlacementControl};
    PlacementControl::new(PlacementConfig { mode: Mode::Remote, ..Default::default() })
}
