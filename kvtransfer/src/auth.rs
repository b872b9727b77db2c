//! Who may open a KV session: the cluster's workers, which share a secret.
//!
//! A sender proves it holds the cluster's secret by the tag of its Hello: an
//! HMAC-SHA256, under a key derived from the secret, over the Hello's fields
//! (layout and lease). A receiver with a key refuses a Hello whose tag does not
//! verify before it says anything about itself or reads another byte. The tag
//! does not bind the connection, so someone who can read a plaintext stream can
//! replay it; across machines the KV plane also runs mutual TLS (the chart's
//! default), which an eavesdropper cannot read.

use ring::hmac;

/// Bytes of a Hello's tag.
pub const TAG_LEN: usize = 32;

/// The key that signs and checks Hellos.
#[derive(Clone)]
pub struct KvAuth {
    key: hmac::Key,
}

impl std::fmt::Debug for KvAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KvAuth(..)")
    }
}

/// What the key of the KV plane is derived for: the same secret keys other things.
const DOMAIN: &[u8] = b"tandem kv hello key v1";

impl KvAuth {
    /// The key of the cluster whose shared secret is `secret`.
    pub fn from_secret(secret: &[u8]) -> KvAuth {
        let derived = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), DOMAIN);
        KvAuth { key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()) }
    }

    /// The tag of a Hello whose signed fields are `fields`.
    pub fn tag(&self, fields: &[u8]) -> [u8; TAG_LEN] {
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(hmac::sign(&self.key, fields).as_ref());
        out
    }

    /// Whether `tag` is the tag of `fields`, compared in constant time.
    pub fn verify(&self, fields: &[u8], tag: &[u8; TAG_LEN]) -> bool {
        hmac::verify(&self.key, fields, tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_verifies_under_its_secret_only() {
        let (a, b) = (KvAuth::from_secret(b"one cluster's secret"), KvAuth::from_secret(b"another cluster's"));
        let t = a.tag(b"fields");
        assert!(a.verify(b"fields", &t));
        assert!(!b.verify(b"fields", &t), "another secret");
        assert!(!a.verify(b"fieldz", &t), "other fields");
        assert!(!a.verify(b"fields", &[0; TAG_LEN]), "no tag");
        assert_eq!(t, KvAuth::from_secret(b"one cluster's secret").tag(b"fields"), "deterministic");
    }
}
