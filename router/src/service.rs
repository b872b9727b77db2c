//! The public `tandem.v1.Generate` service over gRPC: its handlers, the `grpc-timeout`
//! header, and the API key in the `authorization` metadata. A generation starts through
//! `relay::start_request`, as every front door's does.

use std::sync::Arc;
use std::time::Duration;

use tandem_proto::tandem::v1 as api;
use tandem_proto::tandem::v1::generate_server::Generate;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::keys::{tenant_of, Tenant};
use crate::relay::{start_request, Chunks};
use crate::state::RouterState;
use crate::validate::{check_input_size, input_ids};

/// The `grpc-timeout` header as a duration (`100m`, `5S`, ...).
pub fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[derive(Clone)]
pub struct GenerateService(pub Arc<RouterState>);

/// Every model the router serves, in the order configured (the default first), whether or
/// not a worker of it is up now, with its context length: the model file's, or the
/// shortest its healthy workers accept if shorter. What `ListModels` and `/v1/models` list.
pub fn served_models(state: &RouterState) -> Vec<(String, u32)> {
    let live = state.routing.members.models();
    state
        .models
        .iter()
        .map(|m| {
            let file = u32::try_from(m.max_model_len).unwrap_or(u32::MAX);
            let workers = live.iter().find(|(n, _)| *n == m.name).map_or(file, |&(_, ctx)| ctx);
            (m.name.clone(), file.min(workers))
        })
        .collect()
}

/// gRPC's `authorization: Bearer <key>` metadata against the configured keys; the caller's
/// tenant goes into the request's extensions.
pub fn check_api_key(keys: &[String], req: &mut tonic::Request<()>) -> Result<(), Status> {
    if keys.is_empty() {
        return Ok(());
    }
    let given = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given.and_then(|k| tenant_of(keys, k)) {
        Some(t) => {
            req.extensions_mut().insert(t);
            Ok(())
        }
        None => Err(Status::unauthenticated("a valid API key is required (authorization: Bearer <key>)")),
    }
}

impl GenerateService {
    async fn start(&self, req: Request<api::GenerateRequest>) -> Result<Chunks, Status> {
        // tonic's transport answers CANCELLED when the client's deadline passes; end the
        // request a little earlier so the client hears DEADLINE_EXCEEDED from us instead.
        let deadline = grpc_timeout(req.metadata()).map(|d| d.saturating_sub(d / 20 + Duration::from_millis(5)));
        let tenant = req.extensions().get::<Tenant>().cloned();
        start_request(&self.0, req.into_inner(), deadline, "grpc", tenant.as_ref()).await
    }
}

#[tonic::async_trait]
impl Generate for GenerateService {
    async fn generate(&self, req: Request<api::GenerateRequest>) -> Result<Response<api::GenerateResponse>, Status> {
        let mut rx = self.start(req).await?;
        let mut resp = api::GenerateResponse::default();
        let mut choices: Vec<api::Choice> = Vec::new();
        while let Some(msg) = rx.recv().await {
            let m = msg?;
            let finished = m.finish_reason() != api::FinishReason::Unspecified;
            resp.request_id = m.request_id;
            resp.model = m.model;
            if let Some(u) = m.usage {
                resp.usage = Some(u);
            }
            let c = match choices.iter_mut().find(|c| c.index == m.index) {
                Some(c) => c,
                None => {
                    choices.push(api::Choice { index: m.index, ..Default::default() });
                    choices.last_mut().expect("just pushed")
                }
            };
            c.text.push_str(&m.text);
            c.token_ids.extend(m.token_ids);
            c.logprobs.extend(m.logprobs);
            c.prompt_logprobs.extend(m.prompt_logprobs);
            if finished {
                c.finish_reason = m.finish_reason;
                c.timing = m.timing;
            }
        }
        if choices.iter().any(|c| c.finish_reason() == api::FinishReason::Unspecified) || resp.usage.is_none() {
            return Err(Status::internal("the generation ended before every choice finished"));
        }
        choices.sort_by_key(|c| c.index);
        resp.choices = choices;
        Ok(Response::new(resp))
    }

    type GenerateStreamStream = ReceiverStream<Result<api::GenerateStreamResponse, Status>>;

    async fn generate_stream(
        &self,
        req: Request<api::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        Ok(Response::new(ReceiverStream::new(self.start(req).await?)))
    }

    async fn tokenize(&self, req: Request<api::TokenizeRequest>) -> Result<Response<api::TokenizeResponse>, Status> {
        let r = req.into_inner();
        // The named model's tokenizer and template (the default's when none is named).
        let f = self.0.models.resolve(&r.model)?.clone();
        let input = r.input.map(|i| match i {
            api::tokenize_request::Input::Prompt(p) => api::generate_request::Input::Prompt(p),
            api::tokenize_request::Input::Messages(m) => api::generate_request::Input::Messages(m),
        });
        check_input_size(input.as_ref(), &f)?;
        let add_generation_prompt = r.add_generation_prompt.unwrap_or(true);
        let facts = f.clone();
        let (mut ids, rendered) =
            self.0.tokenize(move || input_ids(input.as_ref(), &facts, add_generation_prompt)).await??;
        if !r.add_special_tokens.unwrap_or(true)
            && f.tokenizer.add_bos()
            && ids.first() == f.tokenizer.bos_id().as_ref()
        {
            ids.remove(0);
        }
        let token_strs = if r.return_token_strs {
            ids.iter().map(|&t| f.tokenizer.token_str(t).unwrap_or_default().to_string()).collect()
        } else {
            Vec::new()
        };
        Ok(Response::new(api::TokenizeResponse {
            count: ids.len() as u32,
            token_ids: ids,
            max_model_len: f.max_model_len as u32,
            token_strs,
            rendered_prompt: rendered,
        }))
    }

    async fn list_models(
        &self,
        _req: Request<api::ListModelsRequest>,
    ) -> Result<Response<api::ListModelsResponse>, Status> {
        let models = served_models(&self.0)
            .into_iter()
            .map(|(id, ctx)| api::Model { id, owned_by: "tandem".into(), created: self.0.created, max_model_len: ctx })
            .collect();
        Ok(Response::new(api::ListModelsResponse { models }))
    }
}
