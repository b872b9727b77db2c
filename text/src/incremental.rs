//! [`IncrementalDecoder`]: generated ids to text deltas that are always valid UTF-8.
//!
//! Owns the bytes of a character that is still incomplete; reads each id's bytes from the
//! [`Tokenizer`], which it does not hold, so one tokenizer serves every sequence's decoder.

use crate::error::TextError;
use crate::tokenizer::Tokenizer;

/// Streams generated ids as text deltas.
///
/// A character can span several tokens (an emoji is often four byte tokens),
/// so bytes are held until they form complete UTF-8; an incomplete tail is
/// never emitted as U+FFFD while more tokens may follow. Bytes that can never
/// become valid are replaced by U+FFFD exactly as [`Tokenizer::decode`] would,
/// so the concatenated deltas plus [`IncrementalDecoder::finish`] equal
/// `decode(all_ids)`.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    skip_special: bool,
    pending: Vec<u8>,
}

impl IncrementalDecoder {
    /// A decoder for one sequence; `skip_special` drops control tokens from the text.
    pub fn new(skip_special: bool) -> Self {
        IncrementalDecoder { skip_special, pending: Vec::new() }
    }

    /// Adds one generated id and returns the text it completes (often empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, TextError> {
        let piece = tokenizer.token_bytes(id).ok_or_else(|| {
            TextError::Tokenizer(format!("token id {id} is outside the vocabulary (size {})", tokenizer.vocab_size()))
        })?;
        if !(self.skip_special && tokenizer.is_special(id)) {
            self.pending.extend_from_slice(piece);
        }
        Ok(self.drain(false))
    }

    /// Emits whatever is held back; an incomplete character becomes U+FFFD.
    /// Call once the sequence has finished.
    pub fn finish(&mut self) -> String {
        self.drain(true)
    }

    /// Whether bytes of an unfinished character are being held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    fn drain(&mut self, at_end: bool) -> String {
        let mut out = String::new();
        let mut start = 0;
        while start < self.pending.len() {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Valid by construction: `valid_up_to` bytes were checked.
                    out.push_str(std::str::from_utf8(&self.pending[start..start + valid]).unwrap_or_default());
                    start += valid;
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start += n;
                        }
                        None if at_end => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start = self.pending.len();
                        }
                        None => break,
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::testing::{byte_id, tiny};

    #[test]
    fn incremental_decoder_holds_split_emoji() {
        let t = tiny();
        let text = "a🦀b€";
        let ids: Vec<u32> = text.bytes().map(byte_id).collect();
        let mut dec = IncrementalDecoder::new(true);
        let deltas: Vec<String> = ids.iter().map(|&id| dec.push(&t, id).unwrap()).collect();
        assert_eq!(deltas, vec!["a", "", "", "", "🦀", "b", "", "", "€"]);
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')));
        assert_eq!(dec.finish(), "");
    }

    #[test]
    fn incremental_decoder_matches_decode_on_bad_bytes() {
        let t = tiny();
        // A stray continuation byte, a control token between pieces, and a truncated tail.
        let ids = vec![byte_id(b'x'), byte_id(0x80), byte_id(b'y'), 1, byte_id(0xF0), byte_id(0x9F), 2, byte_id(0xE2)];
        for skip in [false, true] {
            let mut dec = IncrementalDecoder::new(skip);
            let mut text = String::new();
            for &id in &ids {
                text.push_str(&dec.push(&t, id).unwrap());
            }
            assert!(dec.has_pending());
            text.push_str(&dec.finish());
            assert_eq!(text, t.decode(&ids, skip).unwrap(), "skip_special={skip}");
        }
        let mut dec = IncrementalDecoder::new(true);
        assert!(dec.push(&t, 1).unwrap().is_empty());
        assert!(matches!(dec.push(&t, 1_000_000), Err(TextError::Tokenizer(_))));
    }
}
