//! API keys and the tenants they name.
//!
//! A configured key is `KEY` (a tenant of its own, named after a hash of the key) or
//! `TENANT:KEY` (keys sharing a tenant share its prefix cache and its quota). This module
//! matches a presented key against the configured ones; the front doors (gRPC metadata,
//! HTTP headers) read the key, and `salt` and `quota` use the tenant.

use subtle::ConstantTimeEq;

/// The tenant an authenticated request belongs to; its prefix-cache entries are its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub String);

/// SplitMix64's finalizer over `x` plus its increment: spreads the FNV-1a hash of a plain
/// key into the tenant name `key-<16 hex digits>`. Operators write these names in
/// `--tenant-limit`, so the function must never change. The engine's sampler and the
/// benchmark's trace generator carry the same constants as PRNGs of their own, whose
/// outputs are pinned as well; no crate sits below all three (the router will not link
/// the engine's sampling), so each keeps its six lines.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A configured key entry's tenant and key: `TENANT:KEY`, or a plain `KEY` as a tenant of its
/// own, named after a hash of the key.
fn split_key(entry: &str) -> (String, &str) {
    match entry.split_once(':') {
        Some((t, k)) if !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') => {
            (t.to_string(), k)
        }
        _ => (
            format!(
                "key-{:016x}",
                splitmix(
                    entry.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
                )
            ),
            entry,
        ),
    }
}

/// The tenants the configured `keys` name (empty: the API is open).
pub fn tenants(keys: &[String]) -> std::collections::BTreeSet<String> {
    keys.iter().map(|k| split_key(k).0).collect()
}

/// The tenant of API key `given` among the configured `keys`, if it is one of them. A
/// configured key is `KEY` (its own tenant, named after a hash of the key) or
/// `TENANT:KEY` (keys sharing a tenant share its prefix cache).
///
/// Every configured key is compared, each in constant time (`subtle`), so neither the time
/// of one comparison nor where the search stops tells an attacker how much of a key matched.
pub fn tenant_of(keys: &[String], given: &str) -> Option<Tenant> {
    let mut found = None;
    for entry in keys {
        let (tenant, key) = split_key(entry);
        if bool::from(key.as_bytes().ct_eq(given.as_bytes())) && found.is_none() {
            found = Some(Tenant(tenant));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_tenants() {
        let keys = vec!["sk-plain".to_string(), "acme:sk-a1".to_string(), "acme:sk-a2".to_string()];
        let plain = tenant_of(&keys, "sk-plain").unwrap();
        assert!(plain.0.starts_with("key-"));
        assert_eq!(tenant_of(&keys, "sk-a1"), Some(Tenant("acme".into())));
        assert_eq!(tenant_of(&keys, "sk-a1"), tenant_of(&keys, "sk-a2"), "keys of one tenant share it");
        assert_eq!(tenant_of(&keys, "acme:sk-a1"), None, "the tenant is not part of the key");
        assert_eq!(tenant_of(&keys, "sk-nope"), None);
        // The salts that keep tenants apart: unit tables in `salt.rs`.
    }

    #[test]
    fn keys_list_their_tenants_once_each() {
        let keys: Vec<String> = ["sk-plain", "acme:sk-a1", "acme:sk-a2", "beta:sk-b"].map(String::from).into();
        let named = tenants(&keys);
        assert_eq!(named.len(), 3, "{named:?}");
        assert!(named.contains("acme") && named.contains("beta"));
        // A plain key's tenant is the one its requests are counted under.
        assert!(named.contains(&tenant_of(&keys, "sk-plain").unwrap().0));
        assert!(tenants(&[]).is_empty(), "an open API names no tenant");
    }
}
