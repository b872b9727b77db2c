//! # tandem-proto
//!
//! Tandem's gRPC contracts and the code `build.rs` generates from them. The
//! `.proto` files are the source of truth: every rpc and field is documented
//! there, and those comments are the rustdoc of the generated items.
//!
//! # Layout
//!
//! - `tandem/v1/generate.proto` → [`tandem::v1`]: the public API the router serves
//!   (`Generate`, `GenerateStream`, `Tokenize`, `ListModels`).
//! - `tandem/worker/v1/worker.proto` → [`tandem::worker::v1`]: router ↔ worker control
//!   (`Reserve`, `Prefill`, `Decode`, `Cancel`, `Stats`, `KvEvents`, `Drain`) and the
//!   `WorkerDescriptor` that discovery publishes.
//! - [`ids`]: `ClusterRequestId` and `LeaseId`, the numbers those messages and the KV
//!   plane's frames carry, as types (converted where a message is read or built).
//! - [`tls`]: `MutualTls`, the cluster's certificates (PEM files) checked at start, for both
//!   internal planes: the gRPC channels and servers, and the KV plane's rustls configurations.
//! - [`FILE_DESCRIPTOR_SET`]: both files, encoded, for server reflection.
//! - [`reflection_service`], [`reflection_service_v1alpha`], [`health_service`]: the
//!   standard services every Tandem server adds, one call each.
//!
//! Each package has a `*_client` module (tonic client) and a `*_server` module (the
//! trait to implement and its tower service). Conversions to domain types live at the
//! edges, in the crates that own those types; the engine never sees these structs.
//!
//! ```no_run
//! # async fn serve(svc: impl tandem_proto::tandem::v1::generate_server::Generate) {
//! use tandem_proto::tandem::v1::generate_server::{GenerateServer, SERVICE_NAME};
//! let (_health, health_svc) = tandem_proto::health_service(&[SERVICE_NAME]).await;
//! tonic::transport::Server::builder()
//!     .add_service(health_svc)
//!     .add_service(tandem_proto::reflection_service(&[SERVICE_NAME]))
//!     .add_service(GenerateServer::new(svc))
//!     .serve("127.0.0.1:50051".parse().unwrap())
//!     .await
//!     .unwrap();
//! # }
//! ```

pub mod auth;
pub mod codec;
pub mod ids;
pub mod incoming;
pub mod tls;

use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthService;
use tonic_reflection::server::{v1, v1alpha};

pub use tonic_health::server::HealthReporter;
pub use tonic_health::ServingStatus;

/// Generated code, one module per proto package.
pub mod tandem {
    /// The public API (`tandem.v1`), served by the router.
    pub mod v1 {
        tonic::include_proto!("tandem.v1");
    }
    /// Router ↔ worker messages and services.
    pub mod worker {
        /// The internal worker API (`tandem.worker.v1`).
        pub mod v1 {
            tonic::include_proto!("tandem.worker.v1");
        }
    }
}

/// The gRPC metadata key a worker sets (to `kv`) on a status whose cause is a failed KV
/// transfer rather than a failed worker; the router's KV failure policy then decides.
pub const FAULT_METADATA: &str = "tandem-fault";

/// The encoded `google.protobuf.FileDescriptorSet` of `tandem.v1` and
/// `tandem.worker.v1` (with source comments), as server reflection serves it.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tandem_descriptor");

/// `grpc.reflection.v1` advertising the services in `served` (fully qualified names,
/// e.g. `generate_server::SERVICE_NAME`), the health service and reflection itself,
/// so `grpcurl list` and `grpcurl describe` work against any Tandem server.
/// Descriptors of every Tandem type can be fetched whether advertised or not.
///
/// # Panics
/// Only if the embedded descriptor sets do not decode, which the build and this
/// crate's tests rule out.
pub fn reflection_service(served: &[&str]) -> v1::ServerReflectionServer<impl v1::ServerReflection> {
    reflection_builder(served, tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME)
        .build_v1()
        .expect("embedded descriptor sets decode")
}

/// The same as [`reflection_service`] on the older `grpc.reflection.v1alpha`
/// package, which some clients (older grpcurl, some GUIs) still ask for first.
///
/// # Panics
/// As [`reflection_service`].
pub fn reflection_service_v1alpha(served: &[&str]) -> v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection> {
    reflection_builder(served, tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME)
        .build_v1alpha()
        .expect("embedded descriptor sets decode")
}

fn reflection_builder(served: &[&str], reflection_name: &str) -> tonic_reflection::server::Builder<'static> {
    let builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(tonic_health::pb::health_server::SERVICE_NAME)
        .with_service_name(reflection_name);
    served.iter().fold(builder, |b, name| b.with_service_name(*name))
}

/// `grpc.health.v1.Health` with the whole server (`""`) and each of `serving`
/// (fully qualified names, e.g. `generate_server::SERVICE_NAME`) reported `SERVING`.
///
/// Keep the reporter to change a status later, e.g. `NOT_SERVING` while draining.
pub async fn health_service(serving: &[&str]) -> (HealthReporter, HealthServer<HealthService>) {
    let reporter = HealthReporter::new();
    for name in serving {
        reporter.set_service_status(*name, ServingStatus::Serving).await;
    }
    let service = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
    (reporter, service)
}

impl tandem::v1::FinishReason {
    /// The OpenAI API's name for this reason (`"stop"`, `"length"`, `"abort"`);
    /// `None` while a choice has not finished.
    pub fn as_openai_str(self) -> Option<&'static str> {
        use tandem::v1::FinishReason;
        match self {
            FinishReason::Unspecified => None,
            FinishReason::Stop => Some("stop"),
            FinishReason::Length => Some("length"),
            FinishReason::Abort => Some("abort"),
        }
    }
}
