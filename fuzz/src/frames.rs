//! What the `frame_decoder` fuzz targets check, shared by the libFuzzer target
//! (`fuzz_targets/frame_decoder.rs`) and the stable-Rust mutation loop
//! (`src/bin/frame_decoder_stable.rs`), plus the seeds and the mutator of the latter.
//!
//! [`check`] feeds arbitrary bytes to `tandem_kvtransfer::wire::decode` under several
//! `max_body` and `layer_block_bytes` values and asserts, besides "no panic":
//! - a decoded frame used between `HEADER_LEN` and `buf.len()` bytes, its body within
//!   `max_body`; every shorter prefix of it asks for more bytes (`Ok(None)`), and the
//!   exact prefix decodes to the same frame;
//! - re-encoding the frame with the matching encoder and decoding that gives the
//!   same frame back (message texts that were not valid UTF-8 are only checked not to
//!   panic: the decoder replaces them lossily);
//! - a Blocks frame's payload is exactly `n_blocks * layer_block_bytes`;
//! - a receiver reading the bytes as a stream (layout learnt from a Hello) stops
//!   at the first error or incomplete frame and never reads past the buffer.

use crate::stable::Rng;
use tandem_kernels::BlockId;
use tandem_kvtransfer::wire::{self, Code, Frame, HEADER_LEN, MAX_MESSAGE};
use tandem_kvtransfer::{KvDtypeWire, KvLayout};
use tandem_proto::ids::{ClusterRequestId, LeaseId};

/// `max_body` values decoded with: none, tiny, a receiver's usual, the u32 limit, unbounded.
pub const MAX_BODIES: [usize; 5] = [0, 64, 1 << 20, u32::MAX as usize, usize::MAX];

/// Layouts whose `layer_block_bytes` the decoder is tried with (besides 0, before the handshake).
pub fn layouts() -> Vec<KvLayout> {
    let l = |n_layers, n_kv_heads, head_dim, block_size, dtype| KvLayout {
        n_layers,
        n_kv_heads,
        head_dim,
        block_size,
        dtype,
        fingerprint: 0x7a6e_6465_6d00_0001,
    };
    vec![
        l(2, 1, 4, 2, KvDtypeWire::F16),     // 32 bytes per block and layer
        l(2, 1, 2, 1, KvDtypeWire::F32),     // 16
        l(1, 1, 1, 1, KvDtypeWire::F16),     // 4: smallest
        l(32, 8, 128, 16, KvDtypeWire::F16), // 64 KiB: a real model
        l(u16::MAX, u16::MAX, u16::MAX, u16::MAX, KvDtypeWire::F32), // largest a Hello can declare
    ]
}

/// `layer_block_bytes` values decoded with: 0 (no handshake yet), then each layout's.
pub fn layer_block_bytes_set() -> Vec<usize> {
    let mut v = vec![0];
    v.extend(layouts().iter().map(|l| l.layer_block_bytes()));
    v
}

/// The whole check for one input. Panics (an assertion) on a violated property.
pub fn check(data: &[u8]) {
    // `max_body` only matters to the header and `layer_block_bytes` only to Blocks
    // bodies: every value of each against a usual value of the other.
    for lbb in layer_block_bytes_set() {
        check_one(data, 1 << 20, lbb);
    }
    for &max_body in &MAX_BODIES {
        check_one(data, max_body, layouts()[0].layer_block_bytes());
    }
    // A layer size taken from the input itself, within what a valid layout can reach.
    if data.len() >= 4 {
        let lbb = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize % (1 << 20) + 1;
        check_one(data, 1 << 20, lbb);
    }
    check_stream(data);
    check_header_and_fixed(data);
}

fn check_one(data: &[u8], max_body: usize, lbb: usize) {
    match wire::decode(data, max_body, lbb) {
        Ok(None) => {
            if data.len() >= HEADER_LEN {
                let h = wire::parse_header(data[..HEADER_LEN].try_into().unwrap(), max_body)
                    .expect("Ok(None) with a complete header means the header is valid");
                assert!(data.len() < HEADER_LEN + h.body_len, "Ok(None) although the whole frame is there");
            }
        }
        Ok(Some((frame, used))) => {
            assert!((HEADER_LEN..=data.len()).contains(&used), "used {used} of {}", data.len());
            assert!(used - HEADER_LEN <= max_body, "body of {} bytes over max_body {max_body}", used - HEADER_LEN);
            check_frame(&frame, &data[..used], max_body, lbb);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// Properties of a frame decoded from exactly `bytes`.
fn check_frame(frame: &Frame<'_>, bytes: &[u8], max_body: usize, lbb: usize) {
    let used = bytes.len();
    // Every strict prefix asks for more; the exact frame decodes the same.
    for cut in [0, HEADER_LEN - 1, HEADER_LEN, (HEADER_LEN + used) / 2, used - 1] {
        if cut < used {
            assert_eq!(wire::decode(&bytes[..cut], max_body, lbb), Ok(None), "prefix of {cut} of {used} bytes");
        }
    }
    let again = wire::decode(bytes, max_body, lbb).expect("the same bytes decode again");
    assert_eq!(again.as_ref().map(|(f, n)| (f, *n)), Some((frame, used)));

    let exact_text = |m: &str| m.len() <= MAX_MESSAGE && !m.contains('\u{FFFD}');
    let (re, comparable) = match frame {
        Frame::Hello { layout, lease, tag } => {
            let _ = layout.validate();
            assert_eq!(layout.mismatch(layout), None);
            let _ = layout.mismatch(&layouts()[3]);
            let _ = layout.layer_block_bytes();
            (wire::encode_hello_tagged(layout, *lease, tag), true)
        }
        Frame::HelloOk => (wire::encode_hello_ok(), true),
        Frame::Blocks(b) => {
            assert!(lbb > 0, "Blocks decoded before the handshake");
            assert!(!b.block_ids.is_empty());
            assert_eq!(b.payload.len(), b.block_ids.len() * lbb, "payload is not n_blocks * layer_block_bytes");
            let in_place = wire::encode_blocks_in_place(b.request_id, b.layer, &b.block_ids);
            let f = wire::parse_blocks_fixed(&in_place[HEADER_LEN..], in_place.len() - HEADER_LEN, lbb)
                .expect("an in-place head parses");
            assert!(
                f.in_place && f.n_blocks == b.block_ids.len() && f.layer == b.layer && f.request_id == b.request_id
            );
            (wire::encode_blocks(b.request_id, b.layer, &b.block_ids, b.payload), true)
        }
        Frame::Finish { request_id, first_token, num_tokens } => {
            (wire::encode_finish(*request_id, *first_token, *num_tokens), true)
        }
        Frame::Abort { request_id, code, message } => {
            (wire::encode_abort(*request_id, *code, message), exact_text(message))
        }
        Frame::Ack { request_id, code, message } => {
            (wire::encode_ack(*request_id, *code, message), exact_text(message))
        }
        Frame::Error { code, message } => (wire::encode_error(*code, message), exact_text(message)),
        Frame::ShmOffer { n_blocks, path } => (wire::encode_shm_offer(*n_blocks, path), exact_text(path)),
        Frame::Open { request_id } => (wire::encode_open(*request_id), true),
        Frame::Accept { request_id, block_ids } => (wire::encode_accept(*request_id, block_ids), true),
        Frame::Renew { request_id, lease_ms } => (wire::encode_renew(*request_id, *lease_ms), true),
    };
    // Decode the re-encoding with a bound it fits in.
    let back = wire::decode(&re, usize::MAX, lbb);
    match back {
        Ok(Some((f, n))) => {
            assert_eq!(n, re.len());
            if comparable {
                assert_eq!(&f, frame, "re-encoded frame decodes differently");
            }
        }
        other => {
            // Only a lossily decoded text may re-encode into something undecodable
            // (a cut in the middle of a replacement character is still valid: lossy again).
            assert!(!comparable, "re-encoding of {frame:?} does not decode: {other:?}");
        }
    }
}

/// A receiver's view: frames back to back, the layout learnt from a Hello.
fn check_stream(data: &[u8]) {
    let mut lbb = 0;
    let mut at = 0;
    for _ in 0..64 {
        match wire::decode(&data[at..], 1 << 20, lbb) {
            Ok(Some((frame, used))) => {
                if let Frame::Hello { layout, .. } = &frame {
                    if layout.validate().is_ok() {
                        lbb = layout.layer_block_bytes();
                    }
                }
                at += used;
                assert!(at <= data.len());
            }
            Ok(None) | Err(_) => return,
        }
    }
}

/// The two lower-level parsers on raw bytes.
fn check_header_and_fixed(data: &[u8]) {
    if data.len() >= HEADER_LEN {
        let h: &[u8; HEADER_LEN] = data[..HEADER_LEN].try_into().unwrap();
        for &max_body in &MAX_BODIES {
            if let Ok(hd) = wire::parse_header(h, max_body) {
                assert!(hd.body_len <= max_body);
            }
        }
    }
    let body_lens = [data.len(), data.len().saturating_sub(3), u32::MAX as usize, usize::MAX];
    for lbb in layer_block_bytes_set() {
        for &body_len in &body_lens {
            if let Ok(f) = wire::parse_blocks_fixed(data, body_len, lbb) {
                assert!(f.n_blocks > 0);
                let per = 4 + if f.in_place { 0 } else { lbb };
                assert_eq!(f.n_blocks.checked_mul(per).and_then(|x| x.checked_add(16)), Some(body_len));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Seeds and mutations for the stable loop (the libFuzzer target brings its own).

/// Valid frames of every kind, singly and as streams.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (i, l) in layouts().into_iter().enumerate() {
        out.push(wire::encode_hello(
            &l,
            if i % 2 == 0 { None } else { LeaseId::from_wire(0x7f3a_0000_0000_0001 + i as i64) },
        ));
    }
    out.push(wire::encode_hello_ok());
    for lbb in [4usize, 16, 32, 64] {
        for n in [1usize, 2, 5] {
            let ids: Vec<BlockId> = (0..n as u32).map(|i| BlockId(i * 3 + 1)).collect();
            let payload: Vec<u8> = (0..n * lbb).map(|i| (i * 31 % 251) as u8).collect();
            out.push(wire::encode_blocks(ClusterRequestId(7), 1, &ids, &payload));
            out.push(wire::encode_blocks_in_place(ClusterRequestId(7), 1, &ids));
        }
    }
    out.push(wire::encode_finish(ClusterRequestId(7), 123, 40));
    out.push(wire::encode_abort(ClusterRequestId(7), Code::Deadline, "late"));
    out.push(wire::encode_ack(ClusterRequestId(7), Code::Ok, ""));
    out.push(wire::encode_ack(ClusterRequestId(u64::MAX), Code::BadBlock, &"x".repeat(MAX_MESSAGE)));
    out.push(wire::encode_error(Code::LayoutMismatch, "head_dim 64 vs 128"));
    out.push(wire::encode_shm_offer(1024, "/dev/shm/tandem-kv-1"));
    out.push(wire::encode_open(ClusterRequestId(7)));
    out.push(wire::encode_accept(ClusterRequestId(7), &[BlockId(3), BlockId(4), BlockId(9)]));
    out.push(wire::encode_renew(ClusterRequestId(7), 30_000));
    // A handshake followed by blocks of that layout, as a receiver sees it.
    let l = layouts()[0];
    let mut s = wire::encode_hello(&l, None);
    s.extend(wire::encode_blocks(
        ClusterRequestId(1),
        0,
        &[BlockId(0), BlockId(9)],
        &vec![0xAB; 2 * l.layer_block_bytes()],
    ));
    s.extend(wire::encode_finish(ClusterRequestId(1), 5, 3));
    out.push(s);
    out
}

const INTERESTING_32: [u32; 10] = [0, 1, 2, 3, 4, 16, 0x7fff_ffff, 0x8000_0000, 0xffff_fffe, 0xffff_ffff];

/// Applies 1 to 4 random mutations to `buf`; `pool` supplies material for splices.
pub fn mutate(rng: &mut Rng, buf: &mut Vec<u8>, pool: &[Vec<u8>]) {
    for _ in 0..1 + rng.below(4) {
        mutate_once(rng, buf, pool);
    }
    // Most mutations would die at the checksum: usually make the header agree with the
    // body again, so the mutation reaches the kind-specific parsers.
    if buf.len() >= HEADER_LEN && !rng.chance(4) {
        fix_header(rng, buf);
    }
}

fn mutate_once(rng: &mut Rng, buf: &mut Vec<u8>, pool: &[Vec<u8>]) {
    let len = buf.len();
    match rng.below(11) {
        0 if len > 0 => {
            let i = rng.below(len);
            buf[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            buf[i] = [0u8, 1, 0x7f, 0x80, 0xff, rng.next_u64() as u8][rng.below(6)];
        }
        2 if len >= 4 => {
            // An interesting 32-bit value at a 4-aligned offset (lengths, counts, ids).
            let i = rng.below(len / 4) * 4;
            let v = INTERESTING_32[rng.below(INTERESTING_32.len())];
            buf[i..i + 4].copy_from_slice(&v.to_le_bytes());
        }
        3 if len >= 2 => {
            let i = rng.below(len - 1);
            let v = [0u16, 1, 2, 7, 8, 0xffff][rng.below(6)];
            buf[i..i + 2].copy_from_slice(&v.to_le_bytes());
        }
        4 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            buf.splice(at..at, bytes);
        }
        5 if len > 0 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(16));
            buf.drain(at..at + n);
        }
        6 if len > 0 => buf.truncate(rng.below(len)),
        7 if !pool.is_empty() => {
            // Append another seed: a stream of frames.
            let other = &pool[rng.below(pool.len())];
            buf.extend_from_slice(other);
        }
        8 if !pool.is_empty() && len > 0 => {
            // Splice part of another seed over ours.
            let other = &pool[rng.below(pool.len())];
            if !other.is_empty() {
                let from = rng.below(other.len());
                let n = 1 + rng.below(other.len() - from);
                let at = rng.below(len);
                let end = (at + n).min(len);
                buf.splice(at..end, other[from..from + n].iter().copied());
            }
        }
        9 if len >= HEADER_LEN => {
            // Change the kind byte (including unknown kinds) or the flags byte.
            let i = 6 + rng.below(2);
            buf[i] = if rng.chance(2) { 1 + rng.below(8) as u8 } else { rng.next_u64() as u8 };
        }
        _ if len > 0 => {
            // Duplicate a chunk in place (grows repeated structures such as block ids).
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(32));
            let chunk = buf[at..at + n].to_vec();
            buf.splice(at..at, chunk);
        }
        _ => buf.push(rng.next_u64() as u8),
    }
}

/// Rewrites the first frame's header so that its length and checksum match the bytes
/// that follow (magic and version too, most of the time).
fn fix_header(rng: &mut Rng, buf: &mut [u8]) {
    let keep_magic = rng.chance(8);
    let keep_declared = !rng.chance(4);
    repair_header(buf, keep_magic, keep_declared);
}

/// Makes the first frame's header agree with the bytes after it: magic and version
/// (unless `keep_magic`), the body length (the declared one when it fits and
/// `keep_declared`, else all the bytes there are) and the CRC32C of that body.
pub fn repair_header(buf: &mut [u8], keep_magic: bool, keep_declared: bool) {
    if buf.len() < HEADER_LEN {
        return;
    }
    if !keep_magic {
        buf[0..4].copy_from_slice(&wire::MAGIC.to_le_bytes());
        buf[4..6].copy_from_slice(&wire::VERSION.to_le_bytes());
    }
    let declared = u32::from_le_bytes(buf[8..12].try_into().unwrap()) as usize;
    let available = buf.len() - HEADER_LEN;
    // Keep the declared length when it fits (the frame is followed by others), else
    // claim everything that is there.
    let body_len = if keep_declared && declared <= available { declared } else { available };
    buf[8..12].copy_from_slice(&(body_len as u32).to_le_bytes());
    let crc = crc32c(&buf[HEADER_LEN..HEADER_LEN + body_len]);
    buf[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// The libFuzzer entry: [`check`] on the input as it is, and on a copy whose header was
/// repaired, so that coverage guidance reaches the per-kind parsers behind the CRC.
pub fn check_raw_and_repaired(data: &[u8]) {
    check(data);
    if data.len() >= HEADER_LEN {
        let mut d = data.to_vec();
        repair_header(&mut d, false, true);
        check(&d);
    }
}

/// CRC32C (Castagnoli), bitwise: the fuzz crate computes its own rather than trust
/// the codec's dependency to fix up headers.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0x82F6_3B78 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_pass_and_fixed_headers_verify() {
        for s in seeds() {
            check(&s);
        }
        // Our CRC agrees with the codec's: a fixed-up valid frame still decodes.
        let f = wire::encode_finish(ClusterRequestId(1), 2, 3);
        let mut g = f.clone();
        fix_header(&mut Rng::new(1), &mut g);
        assert!(wire::decode(&g, 1 << 20, 0).unwrap().is_some());
    }

    #[test]
    fn a_short_mutation_run_passes() {
        let pool = seeds();
        let mut rng = Rng::new(42);
        for i in 0..20_000 {
            let mut buf = pool[i % pool.len()].clone();
            mutate(&mut rng, &mut buf, &pool);
            check(&buf);
        }
    }
}
