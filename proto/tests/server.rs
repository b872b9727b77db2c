//! A real tonic server on 127.0.0.1:0 serving a toy `tandem.v1.Generate` (it echoes
//! the prompt) with health and reflection, spoken to by the generated client.

use std::net::SocketAddr;
use std::pin::Pin;

use prost::Message as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

use tandem_proto::tandem::v1::generate_client::GenerateClient;
use tandem_proto::tandem::v1::generate_request::Input;
use tandem_proto::tandem::v1::generate_server::{self, Generate, GenerateServer};
use tandem_proto::tandem::v1::*;
use tonic_health::pb::health_check_response::ServingStatus as HealthStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Echoes its input: the "model" generates the prompt back, one word per chunk,
/// with the bytes of the text as token ids.
struct Echo;

fn input_text(input: Option<Input>) -> Result<String, Status> {
    match input {
        Some(Input::Prompt(p)) => Ok(p),
        Some(Input::Messages(m)) => Ok(m.messages.into_iter().map(|m| m.content).collect::<Vec<_>>().join("\n")),
        Some(Input::PromptTokens(t)) => Ok(t.token_ids.iter().map(|&b| char::from(b as u8)).collect()),
        None => Err(Status::invalid_argument("input is required")),
    }
}

fn ids(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

fn usage(prompt: &str, completion: u32) -> Usage {
    let prompt_tokens = prompt.len() as u32;
    Usage { prompt_tokens, completion_tokens: completion, total_tokens: prompt_tokens + completion, cached_tokens: 0 }
}

#[tonic::async_trait]
impl Generate for Echo {
    async fn generate(&self, req: Request<GenerateRequest>) -> Result<Response<GenerateResponse>, Status> {
        let req = req.into_inner();
        let text = input_text(req.input)?;
        let n = req.sampling.and_then(|s| s.n).unwrap_or(1);
        let choices = (0..n)
            .map(|index| Choice {
                index,
                text: text.clone(),
                token_ids: ids(&text),
                finish_reason: FinishReason::Stop.into(),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(GenerateResponse {
            request_id: req.request_id.unwrap_or_else(|| "echo-1".into()),
            model: "echo".into(),
            choices,
            usage: Some(usage(&text, n * text.len() as u32)),
        }))
    }

    type GenerateStreamStream = Pin<Box<dyn Stream<Item = Result<GenerateStreamResponse, Status>> + Send>>;

    async fn generate_stream(
        &self,
        req: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let req = req.into_inner();
        let text = input_text(req.input)?;
        let request_id = req.request_id.unwrap_or_else(|| "echo-1".into());
        let words: Vec<String> = text.split_inclusive(' ').map(str::to_owned).collect();
        let last = words.len() - 1;
        let chunks: Vec<_> = words
            .into_iter()
            .enumerate()
            .map(|(i, word)| {
                let done = i == last;
                Ok(GenerateStreamResponse {
                    index: 0,
                    token_ids: ids(&word),
                    text: word,
                    finish_reason: if done { FinishReason::Stop } else { FinishReason::Unspecified }.into(),
                    usage: done.then(|| usage(&text, text.len() as u32)),
                    request_id: request_id.clone(),
                    model: "echo".into(),
                    ..Default::default()
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn tokenize(&self, req: Request<TokenizeRequest>) -> Result<Response<TokenizeResponse>, Status> {
        let input = req.into_inner().input.map(|i| match i {
            tokenize_request::Input::Prompt(p) => Input::Prompt(p),
            tokenize_request::Input::Messages(m) => Input::Messages(m),
        });
        let text = input_text(input)?;
        let token_ids = ids(&text);
        Ok(Response::new(TokenizeResponse {
            count: token_ids.len() as u32,
            token_ids,
            max_model_len: 8192,
            ..Default::default()
        }))
    }

    async fn list_models(&self, _: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        let model = Model { id: "echo".into(), owned_by: "tandem".into(), created: 1, max_model_len: 8192 };
        Ok(Response::new(ListModelsResponse { models: vec![model] }))
    }
}

/// A running server; dropping the sender stops it.
struct Running {
    addr: SocketAddr,
    health: tandem_proto::HealthReporter,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Running {
    async fn start() -> Running {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = [generate_server::SERVICE_NAME];
        let (reporter, health) = tandem_proto::health_service(&served).await;
        let (stop, stopped) = oneshot::channel::<()>();
        let server = Server::builder()
            .add_service(health)
            .add_service(tandem_proto::reflection_service(&served))
            .add_service(tandem_proto::reflection_service_v1alpha(&served))
            .add_service(GenerateServer::new(Echo))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            });
        Running { addr, health: reporter, stop: Some(stop), task: tokio::spawn(server) }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap()
    }

    async fn shutdown(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

/// Lists services through `grpc.reflection.v1`, and fetches the file defining `symbol`.
async fn reflect_v1(channel: Channel, symbol: &str) -> (Vec<String>, Vec<prost_types::FileDescriptorProto>) {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let requests = [MessageRequest::ListServices(String::new()), MessageRequest::FileContainingSymbol(symbol.into())]
        .map(|m| ServerReflectionRequest { host: String::new(), message_request: Some(m) });
    let mut client = ServerReflectionClient::new(channel);
    let mut responses = client.server_reflection_info(tokio_stream::iter(requests)).await.unwrap().into_inner();
    let (mut services, mut files) = (Vec::new(), Vec::new());
    while let Some(resp) = responses.next().await {
        match resp.unwrap().message_response.unwrap() {
            MessageResponse::ListServicesResponse(l) => services.extend(l.service.into_iter().map(|s| s.name)),
            MessageResponse::FileDescriptorResponse(f) => files.extend(
                f.file_descriptor_proto.iter().map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).unwrap()),
            ),
            other => panic!("unexpected reflection response {other:?}"),
        }
    }
    (services, files)
}

#[tokio::test]
async fn reflection_v1_lists_generate_and_health() {
    let server = Running::start().await;
    let (services, files) = reflect_v1(server.channel().await, "tandem.v1.Generate").await;
    for want in ["tandem.v1.Generate", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"] {
        assert!(services.iter().any(|s| s == want), "{want} not in {services:?}");
    }
    assert!(!services.iter().any(|s| s == "tandem.worker.v1.Worker"), "Worker is not served here: {services:?}");

    let file = files.iter().find(|f| f.package() == "tandem.v1").expect("tandem.v1 file");
    let rpcs: Vec<&str> = file.service[0].method.iter().map(|m| m.name()).collect();
    assert_eq!(rpcs, ["Generate", "GenerateStream", "Tokenize", "ListModels"]);
    let stream = &file.service[0].method[1];
    assert!(stream.server_streaming() && !stream.client_streaming());
    server.shutdown().await;
}

#[tokio::test]
async fn reflection_v1alpha_lists_generate_and_health() {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;

    let server = Running::start().await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let services: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["tandem.v1.Generate", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"] {
        assert!(services.iter().any(|s| s == want), "{want} not in {services:?}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn health_reports_serving() {
    let server = Running::start().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "tandem.v1.Generate"] {
        let resp = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(resp.status(), HealthStatus::Serving, "service {service:?}");
    }
    let unknown = health.check(HealthCheckRequest { service: "tandem.v1.Nope".into() }).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    server.shutdown().await;
}

#[tokio::test]
async fn health_reporter_changes_status() {
    let server = Running::start().await;
    let mut health = HealthClient::new(server.channel().await);
    server.health.set_service_status(generate_server::SERVICE_NAME, tandem_proto::ServingStatus::NotServing).await;
    let resp = health.check(HealthCheckRequest { service: "tandem.v1.Generate".into() }).await.unwrap().into_inner();
    assert_eq!(resp.status(), HealthStatus::NotServing);
    server.shutdown().await;
}

#[tokio::test]
async fn unary_generate_round_trips() {
    let server = Running::start().await;
    let mut client = GenerateClient::new(server.channel().await);
    let req = GenerateRequest {
        model: "echo".into(),
        input: Some(Input::Prompt("hello tandem".into())),
        sampling: Some(SamplingParams { n: Some(2), max_tokens: Some(16), ..Default::default() }),
        request_id: Some("req-7".into()),
        ..Default::default()
    };
    let resp = client.generate(req).await.unwrap().into_inner();
    assert_eq!(resp.request_id, "req-7");
    assert_eq!(resp.choices.len(), 2);
    for (i, choice) in resp.choices.iter().enumerate() {
        assert_eq!(choice.index, i as u32);
        assert_eq!(choice.text, "hello tandem");
        assert_eq!(choice.token_ids, ids("hello tandem"));
        assert_eq!(choice.finish_reason(), FinishReason::Stop);
        assert_eq!(choice.finish_reason().as_openai_str(), Some("stop"));
    }
    assert_eq!(resp.usage.unwrap().total_tokens, 12 + 24);

    let tok = client
        .tokenize(TokenizeRequest {
            input: Some(tokenize_request::Input::Messages(Messages {
                messages: vec![ChatMessage { role: "user".into(), content: "hi".into(), ..Default::default() }],
                tools: vec![],
            })),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((tok.count, tok.token_ids), (2, ids("hi")));

    let models = client.list_models(ListModelsRequest {}).await.unwrap().into_inner().models;
    assert_eq!(models[0].id, "echo");

    let bad = client.generate(GenerateRequest::default()).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    server.shutdown().await;
}

#[tokio::test]
async fn streaming_generate_round_trips() {
    let server = Running::start().await;
    let mut client = GenerateClient::new(server.channel().await);
    let messages = Messages {
        messages: vec![ChatMessage { role: "user".into(), content: "one two three".into(), ..Default::default() }],
        tools: vec![],
    };
    let req = GenerateRequest { input: Some(Input::Messages(messages)), ..Default::default() };
    let chunks: Vec<GenerateStreamResponse> =
        client.generate_stream(req).await.unwrap().into_inner().map(Result::unwrap).collect().await;

    assert_eq!(chunks.len(), 3);
    let text: String = chunks.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(text, "one two three");
    let token_ids: Vec<u32> = chunks.iter().flat_map(|c| c.token_ids.iter().copied()).collect();
    assert_eq!(token_ids, ids("one two three"));
    let (last, rest) = chunks.split_last().unwrap();
    assert!(rest.iter().all(|c| c.finish_reason() == FinishReason::Unspecified && c.usage.is_none()));
    assert_eq!(last.finish_reason(), FinishReason::Stop);
    assert_eq!(last.usage.unwrap().completion_tokens, 13);
    assert!(chunks.iter().all(|c| c.request_id == "echo-1"));
    server.shutdown().await;
}
