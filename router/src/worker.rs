//! What the router asks of a worker on a request's path, as a trait: reserve a prompt's
//! blocks, prefill, decode (a stream), cancel; and the planner's role changes. [`GrpcWorker`] is the real one, over the
//! tonic client (with the cluster token every call carries, as `tandem_proto::auth`
//! builds it); the choice tests put a fake in its place. [`CancelOnDrop`] cancels an
//! attempt on its workers unless it finished.
//!
//! Load polls and KV events stay on the tonic client in `members`: they are the
//! membership's, not a request's.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tandem_proto::auth::WorkerChannel;
use tandem_proto::ids::ClusterRequestId;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_proto::tandem::worker::v1::worker_client::WorkerClient;
use tokio_stream::Stream;
use tonic::Status;

/// A decode worker's chunks of one request, as they come; an error ends it.
pub type DecodeStream = Pin<Box<dyn Stream<Item = Result<pb::DecodeResponse, Status>> + Send>>;

/// One worker, as a request's choice talks to it. Errors are the worker's (or its
/// transport's) statuses, untouched: `choice` decides whose fault they are.
#[tonic::async_trait]
pub trait WorkerApi: Send + Sync {
    /// Holds the prompt's KV blocks on a decode worker for a prefill worker to fill.
    async fn reserve(&self, req: pb::ReserveRequest) -> Result<pb::ReserveResponse, Status>;
    /// Computes the prompt on a prefill worker and ships its KV to the reservation.
    async fn prefill(&self, req: pb::PrefillRequest) -> Result<pb::PrefillResponse, Status>;
    /// Opens the stream of generated tokens on a decode worker.
    async fn decode(&self, req: pb::DecodeRequest) -> Result<DecodeStream, Status>;
    /// Ends a request on the worker and frees what it holds.
    async fn cancel(&self, req: pb::CancelRequest) -> Result<pb::CancelResponse, Status>;
    /// Changes an elastic worker's role (the planner's call; it drains first).
    async fn set_role(&self, _req: pb::SetRoleRequest) -> Result<pb::SetRoleResponse, Status> {
        Err(Status::unimplemented("this worker stand-in does not change roles"))
    }
    /// One step of a live migration of a request decoding on the worker.
    async fn migrate(&self, _req: pb::MigrateRequest) -> Result<pb::MigrateResponse, Status> {
        Err(Status::unimplemented("this worker stand-in does not move requests"))
    }
}

/// A worker reached over gRPC.
#[derive(Clone)]
pub struct GrpcWorker(pub WorkerClient<WorkerChannel>);

#[tonic::async_trait]
impl WorkerApi for GrpcWorker {
    async fn reserve(&self, req: pb::ReserveRequest) -> Result<pb::ReserveResponse, Status> {
        Ok(self.0.clone().reserve(req).await?.into_inner())
    }

    async fn prefill(&self, req: pb::PrefillRequest) -> Result<pb::PrefillResponse, Status> {
        Ok(self.0.clone().prefill(req).await?.into_inner())
    }

    async fn decode(&self, req: pb::DecodeRequest) -> Result<DecodeStream, Status> {
        Ok(Box::pin(self.0.clone().decode(req).await?.into_inner()))
    }

    async fn cancel(&self, req: pb::CancelRequest) -> Result<pb::CancelResponse, Status> {
        Ok(self.0.clone().cancel(req).await?.into_inner())
    }

    async fn set_role(&self, req: pb::SetRoleRequest) -> Result<pb::SetRoleResponse, Status> {
        Ok(self.0.clone().set_role(req).await?.into_inner())
    }

    async fn migrate(&self, req: pb::MigrateRequest) -> Result<pb::MigrateResponse, Status> {
        Ok(self.0.clone().migrate(req).await?.into_inner())
    }
}

/// Sends Cancel to the workers of a choice that did not finish (client gone, error).
pub(crate) struct CancelOnDrop {
    pub(crate) rid: ClusterRequestId,
    pub(crate) workers: Vec<Arc<dyn WorkerApi>>,
    /// Set once the request finished on its workers: nothing to cancel.
    pub(crate) done: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.done || self.workers.is_empty() {
            return;
        }
        let (rid, workers) = (self.rid, std::mem::take(&mut self.workers));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            // Detached on purpose: a drop cannot await. The task is bounded (one `Cancel` per
            // worker, 1 s each) and a worker ends an unclaimed reservation on its own anyway.
            rt.spawn(async move {
                for w in workers {
                    let req = pb::CancelRequest { request_id: rid.0, reason: "the client went away".into() };
                    let _ = tokio::time::timeout(Duration::from_secs(1), w.cancel(req)).await;
                }
            });
        }
    }
}
