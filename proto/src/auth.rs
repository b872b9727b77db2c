//! The cluster token: what lets a router or a worker call a worker.
//!
//! Every process of one cluster holds the same token (a secret of at least 32
//! characters). Routers and workers send it in the `x-tandem-cluster-token`
//! metadata of every call to a worker (`AttachToken`); a worker's `Worker`
//! service refuses a call without it as UNAUTHENTICATED before the handler runs
//! (`RequireToken`), comparing in constant time. Health and reflection are other
//! services on the same port and stay open for probes. The token is sent as is:
//! across machines it travels inside mutual TLS (the chart's default). The KV
//! plane proves the same secret differently (`tandem_kvtransfer::KvAuth`).

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// The metadata key that carries the token.
pub const TOKEN_METADATA: &str = "x-tandem-cluster-token";
/// Characters a token has at least.
pub const MIN_TOKEN_LEN: usize = 32;
/// Characters a token has at most.
pub const MAX_TOKEN_LEN: usize = 512;

/// The cluster's shared secret.
#[derive(Clone)]
pub struct ClusterToken(Arc<str>);

impl std::fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterToken(..)")
    }
}

impl ClusterToken {
    /// A token from its text (surrounding whitespace ignored): 32 to 512 visible ASCII
    /// characters, as gRPC metadata carries them.
    pub fn new(text: &str) -> Result<ClusterToken, String> {
        let t = text.trim();
        if t.len() < MIN_TOKEN_LEN || t.len() > MAX_TOKEN_LEN {
            return Err(format!(
                "a cluster token has {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} characters, this one {}",
                t.len()
            ));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a cluster token is visible ASCII characters only (no spaces)".into());
        }
        Ok(ClusterToken(t.into()))
    }

    /// A fresh token: 32 bytes from the operating system's random source, as hex.
    pub fn random() -> ClusterToken {
        let mut b = [0u8; 32];
        getrandom::fill(&mut b).expect("the operating system's random source");
        ClusterToken(b.iter().map(|x| format!("{x:02x}")).collect::<String>().into())
    }

    /// The secret's bytes, as keys are derived from them.
    pub fn secret(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The text of the token, to write into a file that others read.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn value(&self) -> MetadataValue<Ascii> {
        MetadataValue::try_from(&*self.0).expect("checked: visible ASCII")
    }
}

/// Client side: adds the token to every call (`None`: adds nothing).
#[derive(Clone, Debug, Default)]
pub struct AttachToken(Option<MetadataValue<Ascii>>);

impl AttachToken {
    pub fn new(token: Option<&ClusterToken>) -> AttachToken {
        AttachToken(token.map(ClusterToken::value))
    }
}

impl tonic::service::Interceptor for AttachToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(TOKEN_METADATA, v.clone());
        }
        Ok(req)
    }
}

/// A channel to a worker whose calls carry the token.
pub type WorkerChannel = InterceptedService<Channel, AttachToken>;

/// A `Worker` client over `channel` whose calls carry `token`.
pub fn worker_client(
    channel: Channel,
    token: Option<&ClusterToken>,
) -> crate::tandem::worker::v1::worker_client::WorkerClient<WorkerChannel> {
    crate::tandem::worker::v1::worker_client::WorkerClient::with_interceptor(channel, AttachToken::new(token))
}

/// Server side: refuses a call that does not carry the token (`None`: the service is
/// open, as a worker started without one is, in tests and in one-process embeddings).
#[derive(Clone, Debug, Default)]
pub struct RequireToken(Option<ClusterToken>);

impl RequireToken {
    pub fn new(token: Option<ClusterToken>) -> RequireToken {
        RequireToken(token)
    }
}

impl tonic::service::Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(want) = &self.0 else { return Ok(req) };
        let got = req.metadata().get(TOKEN_METADATA).map(|v| v.as_bytes()).unwrap_or_default();
        if bool::from(got.ct_eq(want.secret())) {
            Ok(req)
        } else {
            // The same answer without a token and with a wrong one; nothing about the worker.
            Err(Status::unauthenticated("this port serves the cluster's routers and workers only"))
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::service::Interceptor;

    use super::*;

    #[test]
    fn tokens_are_long_visible_ascii() {
        assert!(ClusterToken::new(&"x".repeat(31)).is_err());
        assert!(ClusterToken::new(&"x".repeat(513)).is_err());
        assert!(ClusterToken::new(&format!("{} y", "x".repeat(32))).is_err());
        assert!(ClusterToken::new(&format!("{}\u{e9}", "x".repeat(32))).is_err());
        assert_eq!(ClusterToken::new(&format!("  {}\n", "x".repeat(32))).unwrap().expose(), "x".repeat(32));
        let (a, b) = (ClusterToken::random(), ClusterToken::random());
        assert_eq!(a.expose().len(), 64);
        assert_ne!(a.expose(), b.expose());
        assert!(ClusterToken::new(a.expose()).is_ok());
        assert_eq!(format!("{a:?}"), "ClusterToken(..)", "Debug never shows the secret");
    }

    #[test]
    fn a_call_passes_with_the_token_only() {
        let token = ClusterToken::random();
        let mut check = RequireToken::new(Some(token.clone()));
        let mut attach = AttachToken::new(Some(&token));
        assert!(check.call(attach.call(Request::new(())).unwrap()).is_ok());
        let code = |r: Result<Request<()>, Status>| r.err().map(|s| s.code());
        assert_eq!(code(check.call(Request::new(()))), Some(tonic::Code::Unauthenticated), "no token");
        let other = AttachToken::new(Some(&ClusterToken::random())).call(Request::new(())).unwrap();
        assert_eq!(code(check.call(other)), Some(tonic::Code::Unauthenticated), "another token");
        let mut prefix = Request::new(());
        prefix.metadata_mut().insert(TOKEN_METADATA, token.expose()[..40].parse().unwrap());
        assert_eq!(code(check.call(prefix)), Some(tonic::Code::Unauthenticated), "a prefix of it");
        assert!(RequireToken::new(None).call(Request::new(())).is_ok(), "no token configured: open");
    }
}
