//! The wire format (see `PROTOCOL.md`): a 16-byte header, then a body
//! checked by CRC32C. Pure encoding and decoding; no I/O.
//!
//! Every length is checked against a bound before anything is allocated or
//! sliced, so a hostile or corrupt peer gets a `WireError`, never a panic or
//! an allocation of its choosing.

use tandem_kernels::BlockId;
use tandem_proto::ids::{ClusterRequestId, LeaseId};

use crate::auth::{KvAuth, TAG_LEN};
use crate::layout::{KvDtypeWire, KvLayout};

pub const MAGIC: u32 = 0x564B_5454; // "TTKV" little-endian
pub const VERSION: u16 = 4;
/// Bytes of a Hello's signed fields: the layout, then the sender's lease.
pub const HELLO_FIELDS: usize = 28;
/// Bytes of a Hello body: the signed fields, then their tag (`auth`).
const HELLO_LEN: usize = HELLO_FIELDS + TAG_LEN;
pub const HEADER_LEN: usize = 16;
/// Fixed part of a Blocks body before the block ids.
pub const BLOCKS_FIXED: usize = 16;
/// Blocks flag: the payload was written in place into the receiver's shared
/// segment and is not in the frame; the CRC covers the frame body only (the
/// payload never crossed a wire).
pub const FLAG_IN_PLACE: u16 = 1;
/// Bytes of a Finish body.
const FINISH_LEN: usize = 16;
/// Longest message text carried by Abort, Ack and Error frames.
pub const MAX_MESSAGE: usize = 1024;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    HelloOk = 2,
    Blocks = 3,
    Finish = 4,
    Abort = 5,
    Ack = 6,
    Error = 7,
    ShmOffer = 8,
    Open = 9,
    Accept = 10,
    Renew = 11,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::HelloOk,
            3 => Kind::Blocks,
            4 => Kind::Finish,
            5 => Kind::Abort,
            6 => Kind::Ack,
            7 => Kind::Error,
            8 => Kind::ShmOffer,
            9 => Kind::Open,
            10 => Kind::Accept,
            11 => Kind::Renew,
            _ => return None,
        })
    }
}

/// Why a frame could not be decoded. Every variant ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {0:#x}: not a Tandem KV transfer peer")]
    BadMagic(u32),
    #[error("unsupported protocol version {0} (this side speaks {VERSION})")]
    Version(u16),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame body of {len} bytes exceeds the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("malformed {kind:?} frame: {why}")]
    Malformed { kind: Kind, why: &'static str },
    #[error("checksum mismatch: header says {expected:#010x}, body has {actual:#010x}")]
    Checksum { expected: u32, actual: u32 },
    #[error("blocks frame before the handshake")]
    NoLayout,
    #[error("reserved header flags {0:#x} are set")]
    Flags(u8),
}

impl Kind {
    /// The longest body a frame of this kind can have, and at most `max_frame` (which alone
    /// bounds the kinds whose size depends on the KV: Blocks, Accept). A header claiming
    /// more is refused before one byte of its body is read or allocated.
    pub fn max_body(self, max_frame: usize) -> usize {
        let most = match self {
            Kind::Hello => HELLO_LEN,
            Kind::HelloOk => 0,
            Kind::Blocks | Kind::Accept => max_frame,
            Kind::Finish => FINISH_LEN,
            Kind::Open => 8,
            Kind::Renew => 12,
            Kind::Abort | Kind::Ack => 8 + 4 + MAX_MESSAGE,
            Kind::Error => 4 + MAX_MESSAGE,
            Kind::ShmOffer => 10 + MAX_MESSAGE,
        };
        most.min(max_frame)
    }
}

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub body_len: usize,
    pub crc: u32,
}

/// Error and status codes carried by Abort, Ack and Error frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Code {
    Ok = 0,
    LayoutMismatch = 1,
    UnknownRequest = 2,
    BadBlock = 3,
    Checksum = 4,
    Deadline = 5,
    Aborted = 6,
    Protocol = 7,
    StaleSender = 8,
    Unauthenticated = 9,
}

impl Code {
    pub fn from_u16(v: u16) -> Code {
        match v {
            0 => Code::Ok,
            1 => Code::LayoutMismatch,
            2 => Code::UnknownRequest,
            3 => Code::BadBlock,
            4 => Code::Checksum,
            5 => Code::Deadline,
            6 => Code::Aborted,
            8 => Code::StaleSender,
            9 => Code::Unauthenticated,
            _ => Code::Protocol,
        }
    }
}

/// A decoded frame; `Blocks` borrows its ids and payload from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// The sender's layout and discovery lease (0 on the wire: none), and the tag that
    /// proves it holds the cluster's secret (zeros from a sender without one).
    Hello {
        layout: KvLayout,
        lease: Option<LeaseId>,
        tag: [u8; TAG_LEN],
    },
    HelloOk,
    Blocks(BlocksRef<'a>),
    /// All of a request's KV has been sent; `first_token` is the prefill's sampled token.
    Finish {
        request_id: ClusterRequestId,
        first_token: u32,
        num_tokens: u32,
    },
    Abort {
        request_id: ClusterRequestId,
        code: Code,
        message: String,
    },
    /// The receiver's verdict on a request (after Finish, or on an error).
    Ack {
        request_id: ClusterRequestId,
        code: Code,
        message: String,
    },
    /// A connection-level failure (e.g. layout mismatch); the sender closes.
    Error {
        code: Code,
        message: String,
    },
    /// On a same-host connection: the receiver's KV blocks live in this shared segment.
    ShmOffer {
        n_blocks: u64,
        path: String,
    },
    /// On a same-host connection, before any in-place write: may this sender write
    /// `request_id`'s blocks?
    Open {
        request_id: ClusterRequestId,
    },
    /// The receiver's yes to `Open`: the blocks reserved for the request, the only ones
    /// the sender may write (a refusal is an `Ack` with the code).
    Accept {
        request_id: ClusterRequestId,
        block_ids: Vec<BlockId>,
    },
    /// The sender is still computing `request_id` (queued or prefilling): its reservation
    /// should last `lease_ms` more (the receiver grants at most the lease it first granted).
    /// A refusal is an `Ack` with the code; a renewal granted is not answered.
    Renew {
        request_id: ClusterRequestId,
        lease_ms: u32,
    },
}

/// One layer of K and V for some blocks of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlocksRef<'a> {
    pub request_id: ClusterRequestId,
    pub layer: u16,
    /// Destination block ids on the receiver.
    pub block_ids: Vec<BlockId>,
    /// For each block in order: K bytes then V bytes of this layer.
    pub payload: &'a [u8],
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn request_at(b: &[u8], at: usize) -> ClusterRequestId {
    ClusterRequestId(le64(b, at))
}
/// The block ids of a Blocks or Accept body: `ids` holds them back to back, 4 bytes each.
pub fn block_ids(ids: &[u8]) -> Vec<BlockId> {
    ids.chunks_exact(4).map(|c| BlockId(le32(c, 0))).collect()
}

/// Parses and bounds-checks a header.
pub fn parse_header(h: &[u8; HEADER_LEN], max_body: usize) -> Result<Header, WireError> {
    let magic = le32(h, 0);
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let version = le16(h, 4);
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let kind = Kind::from_u8(h[6]).ok_or(WireError::UnknownKind(h[6]))?;
    if h[7] != 0 {
        return Err(WireError::Flags(h[7]));
    }
    let body_len = le32(h, 8) as usize;
    let max = kind.max_body(max_body);
    if body_len > max {
        return Err(WireError::TooLong { len: body_len, max });
    }
    Ok(Header { kind, body_len, crc: le32(h, 12) })
}

fn header(kind: Kind, body: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[6] = kind as u8;
    h[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
    h[12..16].copy_from_slice(&crc32c::crc32c(body).to_le_bytes());
    h
}

fn frame(kind: Kind, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&header(kind, body));
    out.extend_from_slice(body);
    out
}

fn message_body(prefix: &[u8], code: Code, message: &str) -> Vec<u8> {
    let m = &message.as_bytes()[..message.len().min(MAX_MESSAGE)];
    let mut b = prefix.to_vec();
    b.extend_from_slice(&(code as u16).to_le_bytes());
    b.extend_from_slice(&(m.len() as u16).to_le_bytes());
    b.extend_from_slice(m);
    b
}

/// `lease`: the sender's discovery lease (`None`: none), checked against reservations that
/// name the sender they expect. Unsigned: a receiver that checks Hellos refuses it.
pub fn encode_hello(layout: &KvLayout, lease: Option<LeaseId>) -> Vec<u8> {
    encode_hello_tagged(layout, lease, &[0; TAG_LEN])
}

/// A Hello signed with the cluster's key (`auth`), or unsigned without one.
pub fn encode_hello_signed(layout: &KvLayout, lease: Option<LeaseId>, auth: Option<&KvAuth>) -> Vec<u8> {
    let tag = auth.map_or([0; TAG_LEN], |a| a.tag(&hello_fields(layout, lease)));
    encode_hello_tagged(layout, lease, &tag)
}

/// A Hello carrying `tag` as it is.
pub fn encode_hello_tagged(layout: &KvLayout, lease: Option<LeaseId>, tag: &[u8; TAG_LEN]) -> Vec<u8> {
    let mut b = hello_fields(layout, lease);
    b.extend_from_slice(tag);
    frame(Kind::Hello, &b)
}

/// The bytes of a Hello that its tag covers.
pub fn hello_fields(layout: &KvLayout, lease: Option<LeaseId>) -> Vec<u8> {
    let mut b = Vec::with_capacity(HELLO_LEN);
    b.extend_from_slice(&layout.n_layers.to_le_bytes());
    b.extend_from_slice(&layout.n_kv_heads.to_le_bytes());
    b.extend_from_slice(&layout.head_dim.to_le_bytes());
    b.extend_from_slice(&layout.block_size.to_le_bytes());
    b.push(layout.dtype as u8);
    b.extend_from_slice(&[0, 0, 0]);
    b.extend_from_slice(&layout.fingerprint.to_le_bytes());
    b.extend_from_slice(&LeaseId::to_wire(lease).to_le_bytes());
    b
}

pub fn encode_hello_ok() -> Vec<u8> {
    frame(Kind::HelloOk, &[])
}

/// The header and fixed part of a Blocks frame; the payload follows separately, so a
/// sender can write it straight from KV memory. `crc` is the CRC32C of fixed part + payload.
pub fn encode_blocks_head(
    request_id: ClusterRequestId,
    layer: u16,
    block_ids: &[BlockId],
    payload: &[&[u8]],
) -> Vec<u8> {
    blocks_head(request_id, layer, block_ids, payload, false)
}

/// A whole in-place Blocks frame: the payload was already written into the receiver's segment.
pub fn encode_blocks_in_place(request_id: ClusterRequestId, layer: u16, block_ids: &[BlockId]) -> Vec<u8> {
    blocks_head(request_id, layer, block_ids, &[], true)
}

fn blocks_head(
    request_id: ClusterRequestId,
    layer: u16,
    block_ids: &[BlockId],
    payload: &[&[u8]],
    in_place: bool,
) -> Vec<u8> {
    let mut fixed = Vec::with_capacity(BLOCKS_FIXED + 4 * block_ids.len());
    fixed.extend_from_slice(&request_id.0.to_le_bytes());
    fixed.extend_from_slice(&layer.to_le_bytes());
    fixed.extend_from_slice(&(if in_place { FLAG_IN_PLACE } else { 0 }).to_le_bytes());
    fixed.extend_from_slice(&(block_ids.len() as u32).to_le_bytes());
    for id in block_ids {
        fixed.extend_from_slice(&id.0.to_le_bytes());
    }
    let mut crc = crc32c::crc32c(&fixed);
    let mut len = fixed.len();
    for p in payload {
        crc = crc32c::crc32c_append(crc, p);
        if !in_place {
            len += p.len();
        }
    }
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[6] = Kind::Blocks as u8;
    h[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(&fixed);
    out
}

/// A whole Blocks frame in one buffer.
pub fn encode_blocks(request_id: ClusterRequestId, layer: u16, block_ids: &[BlockId], payload: &[u8]) -> Vec<u8> {
    let mut out = encode_blocks_head(request_id, layer, block_ids, &[payload]);
    out.extend_from_slice(payload);
    out
}

pub fn encode_finish(request_id: ClusterRequestId, first_token: u32, num_tokens: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&request_id.0.to_le_bytes());
    b.extend_from_slice(&first_token.to_le_bytes());
    b.extend_from_slice(&num_tokens.to_le_bytes());
    frame(Kind::Finish, &b)
}

pub fn encode_abort(request_id: ClusterRequestId, code: Code, message: &str) -> Vec<u8> {
    frame(Kind::Abort, &message_body(&request_id.0.to_le_bytes(), code, message))
}

pub fn encode_ack(request_id: ClusterRequestId, code: Code, message: &str) -> Vec<u8> {
    frame(Kind::Ack, &message_body(&request_id.0.to_le_bytes(), code, message))
}

pub fn encode_error(code: Code, message: &str) -> Vec<u8> {
    frame(Kind::Error, &message_body(&[], code, message))
}

pub fn encode_shm_offer(n_blocks: u64, path: &str) -> Vec<u8> {
    let p = &path.as_bytes()[..path.len().min(MAX_MESSAGE)];
    let mut b = n_blocks.to_le_bytes().to_vec();
    b.extend_from_slice(&(p.len() as u16).to_le_bytes());
    b.extend_from_slice(p);
    frame(Kind::ShmOffer, &b)
}

pub fn encode_open(request_id: ClusterRequestId) -> Vec<u8> {
    frame(Kind::Open, &request_id.0.to_le_bytes())
}

/// The sender still works on `request_id`: keep its reservation for `lease_ms` more.
pub fn encode_renew(request_id: ClusterRequestId, lease_ms: u32) -> Vec<u8> {
    let mut b = request_id.0.to_le_bytes().to_vec();
    b.extend_from_slice(&lease_ms.to_le_bytes());
    frame(Kind::Renew, &b)
}

pub fn encode_accept(request_id: ClusterRequestId, block_ids: &[BlockId]) -> Vec<u8> {
    let mut b = Vec::with_capacity(12 + 4 * block_ids.len());
    b.extend_from_slice(&request_id.0.to_le_bytes());
    b.extend_from_slice(&(block_ids.len() as u32).to_le_bytes());
    for id in block_ids {
        b.extend_from_slice(&id.0.to_le_bytes());
    }
    frame(Kind::Accept, &b)
}

/// The fixed part of a Blocks body, checked against the body length and the per-block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlocksFixed {
    pub request_id: ClusterRequestId,
    pub layer: u16,
    pub n_blocks: usize,
    /// The payload is in the receiver's shared segment, not in the frame.
    pub in_place: bool,
}

pub fn parse_blocks_fixed(fixed: &[u8], body_len: usize, layer_block_bytes: usize) -> Result<BlocksFixed, WireError> {
    let bad = |why| WireError::Malformed { kind: Kind::Blocks, why };
    if layer_block_bytes == 0 {
        return Err(WireError::NoLayout);
    }
    if fixed.len() < BLOCKS_FIXED || body_len < BLOCKS_FIXED {
        return Err(bad("shorter than its fixed part"));
    }
    let flags = le16(fixed, 10);
    if flags & !FLAG_IN_PLACE != 0 {
        return Err(bad("unknown flags"));
    }
    let in_place = flags & FLAG_IN_PLACE != 0;
    let n = le32(fixed, 12) as usize;
    let per = 4 + if in_place { 0 } else { layer_block_bytes };
    if n == 0 || (body_len - BLOCKS_FIXED) / per != n || (body_len - BLOCKS_FIXED) % per != 0 {
        return Err(bad("block count does not match the body length"));
    }
    Ok(BlocksFixed { request_id: request_at(fixed, 0), layer: le16(fixed, 8), n_blocks: n, in_place })
}

fn parse_message(body: &[u8], at: usize, kind: Kind) -> Result<(Code, String), WireError> {
    let bad = |why| WireError::Malformed { kind, why };
    if body.len() < at + 4 {
        return Err(bad("too short"));
    }
    let code = Code::from_u16(le16(body, at));
    let len = le16(body, at + 2) as usize;
    if len > MAX_MESSAGE || body.len() != at + 4 + len {
        return Err(bad("message length does not match the body"));
    }
    Ok((code, String::from_utf8_lossy(&body[at + 4..]).into_owned()))
}

/// Decodes the first frame of `buf`. `Ok(None)`: more bytes are needed.
/// `layer_block_bytes` is the K+V size of one block of one layer (0 before the handshake).
pub fn decode(buf: &[u8], max_body: usize, layer_block_bytes: usize) -> Result<Option<(Frame<'_>, usize)>, WireError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let h = parse_header(buf[..HEADER_LEN].try_into().expect("16 bytes"), max_body)?;
    if buf.len() < HEADER_LEN + h.body_len {
        return Ok(None);
    }
    let body = &buf[HEADER_LEN..HEADER_LEN + h.body_len];
    let actual = crc32c::crc32c(body);
    if actual != h.crc {
        return Err(WireError::Checksum { expected: h.crc, actual });
    }
    let bad = |why| WireError::Malformed { kind: h.kind, why };
    let f = match h.kind {
        Kind::Hello => {
            if body.len() != HELLO_LEN {
                return Err(bad("wrong length"));
            }
            let dtype = KvDtypeWire::from_u8(body[8]).ok_or(bad("unknown dtype"))?;
            let layout = KvLayout {
                n_layers: le16(body, 0),
                n_kv_heads: le16(body, 2),
                head_dim: le16(body, 4),
                block_size: le16(body, 6),
                dtype,
                fingerprint: le64(body, 12),
            };
            let tag = body[HELLO_FIELDS..].try_into().expect("HELLO_LEN bytes");
            Frame::Hello { layout, lease: LeaseId::from_wire(le64(body, 20) as i64), tag }
        }
        Kind::HelloOk => {
            if !body.is_empty() {
                return Err(bad("wrong length"));
            }
            Frame::HelloOk
        }
        Kind::Blocks => {
            let f = parse_blocks_fixed(body, body.len(), layer_block_bytes)?;
            if f.in_place {
                return Err(bad("in-place blocks are only valid on a shared-memory connection"));
            }
            let ids_end = BLOCKS_FIXED + 4 * f.n_blocks;
            let block_ids = block_ids(&body[BLOCKS_FIXED..ids_end]);
            Frame::Blocks(BlocksRef { request_id: f.request_id, layer: f.layer, block_ids, payload: &body[ids_end..] })
        }
        Kind::Finish => {
            if body.len() != FINISH_LEN {
                return Err(bad("wrong length"));
            }
            Frame::Finish { request_id: request_at(body, 0), first_token: le32(body, 8), num_tokens: le32(body, 12) }
        }
        Kind::Abort => {
            if body.len() < 8 {
                return Err(bad("too short"));
            }
            let (code, message) = parse_message(body, 8, h.kind)?;
            Frame::Abort { request_id: request_at(body, 0), code, message }
        }
        Kind::Ack => {
            if body.len() < 8 {
                return Err(bad("too short"));
            }
            let (code, message) = parse_message(body, 8, h.kind)?;
            Frame::Ack { request_id: request_at(body, 0), code, message }
        }
        Kind::Error => {
            let (code, message) = parse_message(body, 0, h.kind)?;
            Frame::Error { code, message }
        }
        Kind::ShmOffer => {
            if body.len() < 10 {
                return Err(bad("too short"));
            }
            let len = le16(body, 8) as usize;
            if len > MAX_MESSAGE || body.len() != 10 + len {
                return Err(bad("path length does not match the body"));
            }
            Frame::ShmOffer { n_blocks: le64(body, 0), path: String::from_utf8_lossy(&body[10..]).into_owned() }
        }
        Kind::Open => {
            if body.len() != 8 {
                return Err(bad("wrong length"));
            }
            Frame::Open { request_id: request_at(body, 0) }
        }
        Kind::Renew => {
            if body.len() != 12 {
                return Err(bad("wrong length"));
            }
            Frame::Renew { request_id: request_at(body, 0), lease_ms: le32(body, 8) }
        }
        Kind::Accept => {
            if body.len() < 12 || (body.len() - 12) / 4 != le32(body, 8) as usize || body.len() % 4 != 0 {
                return Err(bad("block count does not match the body length"));
            }
            Frame::Accept { request_id: request_at(body, 0), block_ids: block_ids(&body[12..]) }
        }
    };
    Ok(Some((f, HEADER_LEN + h.body_len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout { n_layers: 2, n_kv_heads: 1, head_dim: 4, block_size: 2, dtype: KvDtypeWire::F16, fingerprint: 42 }
    }

    #[test]
    fn every_frame_round_trips() {
        let l = layout();
        let lbb = l.layer_block_bytes();
        let payload: Vec<u8> = (0..2 * lbb).map(|i| i as u8).collect();
        let frames = [
            encode_hello(&l, LeaseId::from_wire(-0x1234_5678_9abc)),
            encode_hello_ok(),
            encode_blocks(ClusterRequestId(7), 1, &[BlockId(3), BlockId(9)], &payload),
            encode_finish(ClusterRequestId(7), 123, 40),
            encode_abort(ClusterRequestId(7), Code::Deadline, "late"),
            encode_ack(ClusterRequestId(7), Code::Ok, ""),
            encode_error(Code::LayoutMismatch, "head_dim 64 vs 128"),
            encode_shm_offer(12, "/dev/shm/x"),
            encode_open(ClusterRequestId(7)),
            encode_accept(ClusterRequestId(7), &[BlockId(3), BlockId(9)]),
            encode_hello_signed(&l, LeaseId::from_wire(7), Some(&KvAuth::from_secret(b"secret"))),
            encode_renew(ClusterRequestId(7), 1500),
        ];
        let mut stream = Vec::new();
        for f in &frames {
            stream.extend_from_slice(f);
        }
        let mut at = 0;
        let mut got = Vec::new();
        while at < stream.len() {
            let (f, used) = decode(&stream[at..], 1 << 20, lbb).unwrap().unwrap();
            got.push(format!("{f:?}"));
            at += used;
        }
        assert_eq!(got.len(), frames.len());
        assert!(got[0].contains("fingerprint: 42"));
        assert!(got[2].contains("block_ids: [3, 9]"));
        assert!(got[3].contains("first_token: 123"));
        assert!(got[4].contains("Deadline") && got[4].contains("late"));
        assert!(got[6].contains("LayoutMismatch"));
        assert!(got[7].contains("n_blocks: 12") && got[7].contains("/dev/shm/x"));
        assert!(got[8].contains("Open { request_id: 7 }"));
        assert!(got[9].contains("block_ids: [3, 9]"));
        let auth = KvAuth::from_secret(b"secret");
        match decode(&frames[10], 256, 0).unwrap().unwrap().0 {
            Frame::Hello { layout, lease, tag } => {
                assert_eq!((layout, lease), (l, LeaseId::from_wire(7)));
                assert!(auth.verify(&hello_fields(&l, LeaseId::from_wire(7)), &tag), "the tag survives the wire");
                assert!(!auth.verify(&hello_fields(&l, LeaseId::from_wire(8)), &tag), "and covers the lease");
            }
            other => panic!("{other:?}"),
        }
        assert!(got[11].contains("Renew { request_id: 7, lease_ms: 1500 }"), "{}", got[11]);
    }

    #[test]
    fn partial_input_asks_for_more_and_corruption_is_an_error() {
        let lbb = layout().layer_block_bytes();
        let f = encode_blocks(ClusterRequestId(1), 0, &[BlockId(0)], &vec![5u8; lbb]);
        for cut in 0..f.len() {
            assert_eq!(decode(&f[..cut], 1 << 20, lbb), Ok(None));
        }
        // Trailing bytes, so that a corrupted length still finds a (wrong) body to check.
        let mut padded = f.clone();
        padded.extend(vec![0u8; 20_000]);
        for i in 0..f.len() {
            let mut g = padded.clone();
            g[i] ^= 0x40;
            assert!(decode(&g, 1 << 20, lbb).is_err(), "flipping byte {i} went unnoticed");
        }
    }

    #[test]
    fn lengths_are_bounded_before_anything_is_read() {
        let mut f = encode_finish(ClusterRequestId(1), 2, 3);
        f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&f, 1 << 20, 64), Err(WireError::TooLong { .. })));
        // Each kind is bounded by what it can be, whatever the frame limit: a Finish
        // claiming 64 MiB, or an Abort longer than its message can be, is refused.
        for (frame, most) in [
            (encode_finish(ClusterRequestId(1), 2, 3), 16),
            (encode_abort(ClusterRequestId(1), Code::Aborted, "x"), 8 + 4 + MAX_MESSAGE),
            (encode_error(Code::Protocol, "x"), 4 + MAX_MESSAGE),
            (encode_open(ClusterRequestId(1)), 8),
        ] {
            for claimed in [most + 1, 64 << 20] {
                let mut h: [u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().unwrap();
                h[8..12].copy_from_slice(&(claimed as u32).to_le_bytes());
                assert_eq!(parse_header(&h, 64 << 20), Err(WireError::TooLong { len: claimed, max: most }));
            }
        }
        let blocks = encode_blocks(ClusterRequestId(1), 0, &[BlockId(0)], &[0u8; 64]);
        assert_eq!(decode(&blocks, 1 << 20, 0), Err(WireError::NoLayout));
        // A block count that disagrees with the body length.
        let wrong = encode_blocks(ClusterRequestId(1), 0, &[BlockId(0), BlockId(1)], &[0u8; 64]);
        assert!(matches!(decode(&wrong, 1 << 20, 64), Err(WireError::Malformed { .. })));
    }
}
