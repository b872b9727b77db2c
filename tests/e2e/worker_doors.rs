//! A stranger on a worker's ports (issue 15, item 3). Before the cluster token, anyone who
//! reached a worker's gRPC port could drain it for good, hold its whole pool with
//! `Reserve`, generate for free through `Decode`, cancel others' requests, read every
//! block hash from `KvEvents`, and aim `Prefill` (an SSRF) at any address. Each attack is
//! performed against real processes, without the token and with a wrong one; then, with
//! the token, what even a caller holding it cannot do: send KV anywhere but a decode
//! worker discovery lists, at its registered endpoints, or hold blocks past the worker's
//! longest lease. The cluster serves the same greedy text after, and holds nothing.

mod harness;
mod hostile;

use std::time::Duration;

use harness::*;
use hostile::*;
use tandem_proto::auth::ClusterToken;
use tandem_proto::tandem::worker::v1 as pb;

/// Greedy sampling of up to `max_tokens`.
fn greedy(max_tokens: u32) -> pb::SamplingParams {
    pb::SamplingParams { temperature: 0.0, top_p: 1.0, repetition_penalty: 1.0, max_tokens, ..Default::default() }
}

/// Every rpc of the `Worker` service, called by a client holding `token`: the status codes.
async fn every_rpc(addr: &str, token: Option<&ClusterToken>) -> Vec<(&'static str, tonic::Code)> {
    let mut w = worker_client_with(addr, token).await;
    let code = |r: Result<(), tonic::Status>| r.err().map_or(tonic::Code::Ok, |s| s.code());
    let prompt: Vec<u32> = (1..40).collect();
    let greedy = greedy(64);
    let mut out = Vec::new();
    let drain = w.drain(pb::DrainRequest { deadline_ms: Some(0), migrate: false }).await.map(|_| ());
    out.push(("Drain", code(drain)));
    let reserve = pb::ReserveRequest {
        request_id: 0x5eed_0001,
        prompt_token_ids: prompt.clone(),
        lease_ms: u32::MAX,
        sampling: Some(greedy.clone()),
        ..Default::default()
    };
    out.push(("Reserve", code(w.reserve(reserve).await.map(|_| ()))));
    let decode = pb::DecodeRequest {
        request_id: 0x5eed_0002,
        prompt_token_ids: prompt.clone(),
        recompute: true,
        sampling: Some(greedy.clone()),
        ..Default::default()
    };
    let decoded = match w.decode(decode).await {
        Ok(s) => s.into_inner().message().await.map(|_| ()),
        Err(e) => Err(e),
    };
    out.push(("Decode", code(decoded)));
    let prefill = pb::PrefillRequest {
        request_id: 0x5eed_0003,
        prompt_token_ids: prompt,
        sampling: Some(greedy),
        destination: Some(pb::KvDestination { worker_id: "decode-0".into(), ..Default::default() }),
        ..Default::default()
    };
    out.push(("Prefill", code(w.prefill(prefill).await.map(|_| ()))));
    let cancel = pb::CancelRequest { request_id: 0x5eed_0002, reason: "a stranger".into() };
    out.push(("Cancel", code(w.cancel(cancel).await.map(|_| ()))));
    out.push(("Stats", code(w.stats(pb::StatsRequest {}).await.map(|_| ()))));
    let events = match w.kv_events(pb::KvEventsRequest::default()).await {
        Ok(s) => {
            let mut s = s.into_inner();
            tokio::time::timeout(Duration::from_millis(500), s.message()).await.map_or(Ok(()), |m| m.map(|_| ()))
        }
        Err(e) => Err(e),
    };
    out.push(("KvEvents", code(events)));
    out
}

#[test]
fn a_stranger_on_a_worker_port_is_refused_everything_but_health_and_reflection() {
    let _one = serial();
    let c = Cluster::start(&[("prefill", "prefill-0"), ("decode", "decode-0")]);
    let addrs: Vec<String> = c.workers.iter().map(|(_, a)| a.clone()).collect();
    let expected = generate_reference(Some(BENIGN[0]), None, 24);
    rt().block_on(async {
        let mut client = client(&c.router_addr).await;
        assert_eq!(stream(&mut client, chat(BENIGN[0], 24)).await.unwrap().text, expected);
        let wrong = ClusterToken::random();
        for addr in &addrs {
            for (who, token) in [("no token", None), ("a wrong token", Some(&wrong))] {
                for (rpc, code) in every_rpc(addr, token).await {
                    assert_eq!(code, tonic::Code::Unauthenticated, "{addr} {rpc} with {who}");
                }
            }
            // Probes and tools still find their way in: health and reflection are open.
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let st = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
            assert_eq!(st.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
            let (ok, out, err) = grpc_call(&[addr, "list"]);
            assert!(ok && out.contains("tandem.worker.v1.Worker"), "reflection on {addr}: {out} {err}");
            // Nothing the stranger asked for happened.
            let s = stats(addr).await;
            assert!(!s.draining, "{addr} was drained by a stranger");
        }
        idle_workers(&addrs).await;
        assert_eq!(stream(&mut client, chat(BENIGN[0], 24)).await.unwrap().text, expected, "after the strangers");
    });
    let mut procs = vec![&c.router];
    procs.extend(c.workers.iter().map(|(p, _)| p));
    no_panics(&procs);
}

#[test]
fn even_with_the_token_kv_goes_only_to_listed_decode_workers_and_leases_are_bounded() {
    let _one = serial();
    let etcd = Etcd::start();
    let cluster = format!("e2e{}", free_port());
    let prefill = start_worker(&etcd, &cluster, "prefill", "prefill-0", &[]);
    let decode = start_worker(&etcd, &cluster, "decode", "decode-0", &["--max-kv-lease", "4"]);
    let (router, router_addr) = start_router(&etcd, &cluster, &[]);
    for id in ["prefill-0", "decode-0"] {
        router.wait_event("worker joined", &[("worker", id)], Duration::from_secs(30));
    }
    let kv = decode.0.addr_after("tandem: worker", "kv");
    let expected = generate_reference(Some(BENIGN[0]), None, 24);
    rt().block_on(async {
        let mut client = client(&router_addr).await;
        assert_eq!(stream(&mut client, chat(BENIGN[0], 24)).await.unwrap().text, expected);
        let mut p = worker_client(&prefill.1).await;
        let mut d = worker_client(&decode.1).await;

        // A lease longer than the worker's longest is cut to it (4 s here; 60 s by default).
        let prompt: Vec<u32> = (1..40).collect();
        let greedy = greedy(8);
        let reserve = pb::ReserveRequest {
            request_id: 0x5eed_0010,
            prompt_token_ids: prompt.clone(),
            lease_ms: u32::MAX,
            sampling: Some(greedy.clone()),
            ..Default::default()
        };
        let granted = d.reserve(reserve).await.unwrap().into_inner();
        assert_eq!(granted.lease_ms, 4000, "the lease granted");

        // Prefill aimed elsewhere: an address of the caller's (the SSRF), a worker id
        // discovery does not list, the prefill worker itself. Each refused before any
        // connection is made: the caller's listener is never reached.
        let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let trap_addr = trap.local_addr().unwrap().to_string();
        let real = granted.kv_endpoints.clone().unwrap();
        let aimed = |worker: &str, tcp: &str| pb::KvDestination {
            worker_id: worker.into(),
            endpoints: Some(pb::KvEndpoints { tcp_address: tcp.into(), shm: None, nccl: false }),
            block_ids: granted.block_ids.clone(),
            cached_blocks: 0,
            layout: granted.layout,
            lease_ms: 2000,
        };
        for (what, dest) in [
            ("the caller's address under decode-0's name", aimed("decode-0", &trap_addr)),
            ("a worker discovery does not list", aimed("decode-9", &trap_addr)),
            ("the prefill worker, which does not decode", aimed("prefill-0", &real.tcp_address)),
        ] {
            let req = pb::PrefillRequest {
                request_id: 0x5eed_0011,
                prompt_token_ids: prompt.clone(),
                sampling: Some(greedy.clone()),
                destination: Some(dest),
                ..Default::default()
            };
            let st = p.prefill(req).await.expect_err(what);
            assert_eq!(st.code(), tonic::Code::FailedPrecondition, "{what}: {st:?}");
            assert!(!st.message().contains(&trap_addr), "{what}: the error names the address: {st:?}");
        }
        let reached = tokio::time::timeout(Duration::from_millis(300), trap.accept()).await;
        assert!(reached.is_err(), "the prefill worker connected to the caller's address");
        assert_eq!(real.tcp_address, kv, "the registered endpoint is the one the worker printed");

        let cancel = pb::CancelRequest { request_id: 0x5eed_0010, reason: "done".into() };
        d.cancel(cancel).await.unwrap();
        idle_workers(&[prefill.1.clone(), decode.1.clone()]).await;
        assert_eq!(stream(&mut client, chat(BENIGN[0], 24)).await.unwrap().text, expected, "after");
    });
    no_panics(&[&router, &prefill.0, &decode.0]);
}
