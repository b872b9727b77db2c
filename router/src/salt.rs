//! The prefix-cache salt a request carries to the workers.
//!
//! Workers reuse a cached prompt only for requests with the same salt, so the salt is what
//! keeps tenants out of each other's cache (and off each other's timing). The router makes
//! it: a keyed digest (HMAC-SHA256 under a `SaltKey`) of the full tenant identity and the
//! client's own salt, each field length-prefixed. Nobody without the key can compute
//! another tenant's salt, choose a client salt that equals it, or tell a tenant or a client
//! salt from the digest the workers see.
//!
//! It owns the key and the encoding; it does not decide who the tenant is (`keys`).

use ring::hmac;

use crate::keys::Tenant;

/// Domain separation: the salt key is the cluster secret's HMAC of this label, so it is no
/// other key derived from the same secret under another label.
const DERIVE_LABEL: &[u8] = b"tandem tenant salt v1";

/// The router's key for cache salts.
///
/// Routers that should share workers' prefix caches (replicas behind one address) must hold
/// the same key: derive it from the cluster's secret with `SaltKey::derive`. A router with
/// `SaltKey::random()` keeps its tenants apart just as well, but its salts match no other
/// router's, and none of its own after a restart: salted prompts cached through one router
/// are misses through another.
#[derive(Clone)]
pub struct SaltKey(hmac::Key);

impl SaltKey {
    /// The key every router of a cluster derives from the cluster's shared secret: 32 bytes
    /// of HMAC-SHA256(secret, "tandem tenant salt v1").
    pub fn derive(cluster_secret: &[u8]) -> SaltKey {
        let derived = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, cluster_secret), DERIVE_LABEL);
        SaltKey(hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()))
    }

    /// 32 bytes from the operating system's random source: for a router with no cluster
    /// secret (see the type's note on sharing).
    pub fn random() -> SaltKey {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).expect("the operating system's random source");
        SaltKey(hmac::Key::new(hmac::HMAC_SHA256, &k))
    }
}

impl std::fmt::Debug for SaltKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SaltKey(..)")
    }
}

/// The prefix-cache salt a request runs with, from its tenant (set by the server from the
/// API key) and the salt the client sent (`cache_salt`, bounded by validation):
/// - no tenant (an open API) and no client salt: none; everyone shares the unsalted cache;
/// - no tenant, a client salt: a digest of that salt; clients that send the same salt share;
/// - a tenant: a digest of the tenant and the client's salt, if any, which then only
///   subdivides its own tenant's cache. No client salt, sent by anyone, gives another
///   tenant's salt, nor a tenant's the unsalted cache.
///
/// The salt is 64 hex digits of HMAC-SHA256 under `key`.
pub fn effective_salt(key: &SaltKey, tenant: Option<&Tenant>, client: Option<&str>) -> Option<String> {
    let mut ctx = hmac::Context::with_key(&key.0);
    match tenant {
        None => {
            ctx.update(b"open");
            ctx.update(&field(client?.as_bytes()));
        }
        Some(Tenant(name)) => {
            ctx.update(b"tenant");
            ctx.update(&field(name.as_bytes()));
            match client {
                None => ctx.update(&[0]),
                Some(c) => {
                    ctx.update(&[1]);
                    ctx.update(&field(c.as_bytes()));
                }
            }
        }
    }
    Some(ctx.sign().as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// `bytes` with its length in front (8 bytes, big-endian), so that no two different lists
/// of fields encode alike ("a|b" + "c" is not "a" + "b|c").
fn field(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + bytes.len());
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn t(name: &str) -> Tenant {
        Tenant(name.into())
    }

    #[test]
    fn no_tenant_and_no_client_salt_share_the_unsalted_cache() {
        let k = SaltKey::derive(b"cluster secret");
        assert_eq!(effective_salt(&k, None, None), None);
        assert!(effective_salt(&k, None, Some("")).is_some(), "an empty salt is still a salt");
        assert!(effective_salt(&k, Some(&t("acme")), None).is_some(), "a tenant never shares the open cache");
    }

    #[test]
    fn every_identity_gets_its_own_salt() {
        let k = SaltKey::derive(b"cluster secret");
        let (acme, plain) = (t("acme"), t("key-0123456789abcdef"));
        // (tenant, client salt): every row must give a salt no other row gives.
        let rows: &[(Option<&Tenant>, Option<&str>)] = &[
            (None, Some("x")),
            (None, Some("")),
            (None, Some("tenant:acme|x")),
            (None, Some("acme")),
            (Some(&acme), None),
            (Some(&acme), Some("")),
            (Some(&acme), Some("x")),
            (Some(&plain), None),
            (Some(&plain), Some("x")),
            (Some(&plain), Some("tenant:acme|x")),
            // The same bytes cut in other places.
            (Some(&t("a|b")), Some("c")),
            (Some(&t("a")), Some("b|c")),
            (Some(&t("ab")), Some("c")),
            (Some(&t("a")), Some("bc")),
            (Some(&t("")), Some("acme")),
            // A client salt shaped like the encoding of a tenant.
            (None, Some("tenant\0\0\0\0\0\0\0\x04acme\0")),
        ];
        let mut seen = HashSet::new();
        for &(tenant, client) in rows {
            let s = effective_salt(&k, tenant, client).expect("salted");
            assert!(seen.insert(s.clone()), "{tenant:?} {client:?} gives a salt another row gives: {s}");
        }
    }

    #[test]
    fn the_salt_depends_on_the_key_and_only_on_it_and_the_inputs() {
        let (a, b) = (SaltKey::derive(b"secret one"), SaltKey::derive(b"secret two"));
        let acme = t("acme");
        for (tenant, client) in [(None, Some("x")), (Some(&acme), None), (Some(&acme), Some("x"))] {
            let sa = effective_salt(&a, tenant, client);
            assert_eq!(sa, effective_salt(&a, tenant, client), "deterministic");
            assert_eq!(sa, effective_salt(&SaltKey::derive(b"secret one"), tenant, client), "one secret, one key");
            assert_ne!(sa, effective_salt(&b, tenant, client), "another secret, other salts");
            assert_ne!(sa, effective_salt(&SaltKey::random(), tenant, client), "a random key, other salts");
        }
        assert_ne!(
            effective_salt(&SaltKey::random(), Some(&acme), None),
            effective_salt(&SaltKey::random(), Some(&acme), None),
            "two random keys differ"
        );
    }

    #[test]
    fn the_salt_reveals_neither_the_tenant_nor_the_client_salt() {
        let k = SaltKey::derive(b"cluster secret");
        let bits = |a: &str, b: &str| -> u32 {
            let (a, b) = (u128::from_str_radix(&a[..32], 16).unwrap(), u128::from_str_radix(&b[..32], 16).unwrap());
            (a ^ b).count_ones()
        };
        let base = effective_salt(&k, Some(&t("acme")), Some("x")).unwrap();
        // (tenant, client salt): the salt is 64 hex digits whatever the inputs' lengths, and
        // one byte changed anywhere changes about half its bits.
        let long = "s".repeat(256);
        let rows: &[(&str, Option<&str>)] =
            &[("acme", Some("y")), ("acmf", Some("x")), ("", Some("x")), ("acme", Some(&long)), ("acme", None)];
        for &(tenant, client) in rows {
            let s = effective_salt(&k, Some(&t(tenant)), client).unwrap();
            assert_eq!(s.len(), 64, "{s}");
            assert!(s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')), "{s}");
            let flipped = bits(&base, &s);
            assert!((32..=96).contains(&flipped), "{tenant:?} {client:?}: {flipped} of 128 bits differ");
        }
        assert_eq!(format!("{k:?}"), "SaltKey(..)", "the key's Debug shows nothing of it");
    }
}
