//! `RouterState`: what the router's handlers share. The served models' facts (to check and
//! tokenize requests, `models::ServedModels`), the workers and how a request's choices run across them
//! (`routing::Routing`), the door (`admission::Admission`), the API keys, the salt key and
//! the per-request bounds (first token, stalled streams).

use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use crate::admission::Admission;
use crate::models::ServedModels;
use crate::routing::Routing;
use crate::salt::SaltKey;
use crate::stall::STREAM_STALL_TIMEOUT;

/// How long a request may go without its first token, by default: past it, it is refused
/// as overloaded rather than left waiting in queues.
pub const FIRST_TOKEN_TIMEOUT: Duration = Duration::from_secs(300);

/// State shared by the router's handlers.
pub struct RouterState {
    /// The models served, each request's by its `model` field (the first when empty).
    pub models: ServedModels,
    /// The workers, the routing policy, and how a choice recovers and waits for room.
    pub routing: Arc<Routing>,
    /// The in-flight limit, the tenants' quotas, draining.
    pub admission: Arc<Admission>,
    /// When the models were loaded (OpenAI `created`).
    pub created: i64,
    /// Accepted API keys; empty: the API is open.
    pub api_keys: Vec<String>,
    /// How long a request may go without its first token (waiting for room, queued on a
    /// prefill worker, computing) before it is refused as overloaded and cancelled on its
    /// workers (see `FIRST_TOKEN_TIMEOUT`). The request's own deadline, if sooner, wins.
    pub first_token_timeout: Duration,
    /// How long a stream may wait for its client to take the next chunk before the request
    /// is cancelled (see `stall`).
    pub stream_stall: Duration,
    /// Tokenizations and chat renders running at once, at most (see `RouterState::tokenize`).
    tokenizers: Arc<tokio::sync::Semaphore>,
    /// Keys the cache salts sent to workers (`salt::effective_salt`); random unless set.
    pub salt_key: SaltKey,
}

impl RouterState {
    pub fn new(models: ServedModels, routing: Routing, admission: Admission) -> Self {
        RouterState {
            models,
            routing: Arc::new(routing),
            admission: Arc::new(admission),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
            api_keys: Vec::new(),
            first_token_timeout: FIRST_TOKEN_TIMEOUT,
            stream_stall: STREAM_STALL_TIMEOUT,
            tokenizers: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
            salt_key: SaltKey::random(),
        }
    }

    /// Runs `f` (tokenizing, rendering a chat template) on the blocking pool, as many at
    /// once as there are cores, never on the runtime's threads: a large input delays other
    /// inputs' tokenization, not `/health` or the streams in flight. A caller that goes
    /// away leaves `f` to finish, still counted.
    pub async fn tokenize<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
        let permit = self.tokenizers.clone().acquire_owned().await.map_err(|_| Status::unavailable("shutting down"))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f()
        })
        .await
        .map_err(|e| Status::internal(format!("tokenizing failed: {e}")))
    }
}
