//! The prefix-cache hash scheme: how a prompt's full blocks are named.
//!
//! Workers name cached blocks by these hashes in their `KvEvent`s and the router computes
//! a prompt's hashes to look them up in its index, so both must compute them alike. The
//! scheme lives here, beside the tokenizer, so the router can compute it without linking
//! the engine. `SCHEME` names it; a worker announces it with its block size, and a router
//! whose scheme differs never reads that worker's events as hits.

use ring::digest;

/// The name and version of the hash scheme below, announced in every worker's descriptor.
/// Change it whenever `root_key`, `chain` or the salt's encoding changes.
pub const SCHEME: &str = "sha256-chain-v1";

/// The chained hash of a full block: names the whole prefix up to and including it (in
/// `KvEvent`s and the router's index). 64 bits, so it may collide; `PrefixKey` decides a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqHash(pub u64);

/// A full block's identity: 128 bits of SHA-256 chained from the cache salt through every
/// token up to the block's end. Every cached block keeps its key (the first block's covers
/// the salt, so a chain's root carries its tenant) and every hit compares it: a block is
/// reused only after the same tokens under the same salt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PrefixKey(pub u128);

/// Domain separation: the root key's digest input starts with this label, a block's with
/// its parent's key.
const ROOT_DOMAIN: &[u8] = b"tandem prefix-cache salt v1\0";

/// The key of the empty prefix under `salt`: the salt's identity. No salt, the empty salt
/// and every other salt string each have their own.
pub fn root_key(salt: Option<&str>) -> PrefixKey {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(ROOT_DOMAIN);
    match salt {
        None => ctx.update(&[0]),
        Some(s) => {
            ctx.update(&[1]);
            ctx.update(s.as_bytes());
        }
    }
    let d = ctx.finish();
    PrefixKey(u128::from_le_bytes(d.as_ref()[..16].try_into().expect("SHA-256 has 32 bytes")))
}

/// The key and the hash of a full block of `tokens` after the prefix whose key is `parent`:
/// one SHA-256 over (parent key, token ids); the key is its first 128 bits, the hash the
/// next 64. Neither can be inverted or steered to a chosen value, unlike a reversible mix.
pub fn chain(parent: PrefixKey, tokens: &[u32]) -> (PrefixKey, SeqHash) {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(&parent.0.to_le_bytes());
    let mut buf = [0u8; 256];
    for part in tokens.chunks(buf.len() / 4) {
        for (b, t) in buf.chunks_exact_mut(4).zip(part) {
            b.copy_from_slice(&t.to_le_bytes());
        }
        ctx.update(&buf[..part.len() * 4]);
    }
    let d = ctx.finish();
    let d = d.as_ref();
    (
        PrefixKey(u128::from_le_bytes(d[..16].try_into().expect("SHA-256 has 32 bytes"))),
        SeqHash(u64::from_le_bytes(d[16..24].try_into().expect("SHA-256 has 32 bytes"))),
    )
}

/// The chained hashes of every full block of `tokens`: what a worker's `KvEvent`s name
/// them by. Prefill and decode workers compute the same ones for the same salt.
pub fn prefix_hashes(tokens: &[u32], block_size: usize, salt: Option<&str>) -> Vec<SeqHash> {
    let mut parent = root_key(salt);
    tokens
        .chunks_exact(block_size)
        .map(|blk| {
            let (key, h) = chain(parent, blk);
            parent = key;
            h
        })
        .collect()
}
