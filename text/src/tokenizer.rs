//! Text ⇄ token ids for GGUF models with a GPT-2 byte-level BPE vocabulary.
//!
//! Owns the vocabulary read from the GGUF metadata (`tokenizer.ggml.*`), the
//! `tokenizers`-crate pipeline that encodes text exactly like llama.cpp does
//! for the `smollm` pre-tokenizer (every digit on its own, then the GPT-2
//! regex split, then byte-level BPE; `gpt2` is the same without the digit
//! step), and the byte pieces that decoding and streaming use. [`IncrementalDecoder`] turns generated ids into text deltas
//! that are always valid UTF-8.

use std::sync::Arc;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::TextError;
use crate::gguf::GgufFile;

/// GGUF token types (llama.cpp's `llama_token_type`).
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// `tokenizer.ggml.pre` values whose llama.cpp splitting we reproduce, and
/// whether each first isolates every digit. Other values use other regexes,
/// so they are refused rather than silently tokenized differently.
const SUPPORTED_PRE: &[(&str, bool)] = &[("smollm", true), ("gpt2", false)];

/// What one vocabulary entry is, as far as encoding and decoding care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Ordinary BPE token: its text is byte-level encoded.
    Normal,
    /// Control token (`<|im_start|>`): matched in text only when special
    /// tokens are parsed, dropped from output when special tokens are skipped.
    Control,
    /// User-defined token: always matched in text, always printed.
    UserDefined,
}

/// The model's tokenizer. All methods take `&self`; a clone shares the one built vocabulary
/// (an `Arc`), so a process builds it once and hands copies to the engine and its services.
#[derive(Clone)]
pub struct Tokenizer {
    vocab: Arc<Vocabulary>,
}

/// What a built tokenizer holds.
struct Vocabulary {
    /// Control tokens are split out of the input before BPE.
    with_special: tokenizers::Tokenizer,
    /// Same vocabulary, but control tokens in the input are plain text.
    plain: tokenizers::Tokenizer,
    /// Vocabulary strings as stored in the GGUF (byte-level form, e.g. `Ġhello`).
    tokens: Vec<String>,
    /// The bytes each id stands for in output text.
    pieces: Vec<Box<[u8]>>,
    kinds: Vec<Kind>,
    /// Control-token texts with their ids, longest first (what [`Tokenizer::split_control`] matches).
    controls: Vec<(String, u32)>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
}

/// A stretch of text cut at the control tokens written in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    Control(u32),
    Text(&'a str),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab.tokens.len())
            .field("bos", &self.vocab.bos)
            .field("eos", &self.vocab.eos)
            .field("add_bos", &self.vocab.add_bos)
            .finish()
    }
}

/// Everything the tokenizer is built from, independent of where it was read.
struct VocabSpec {
    tokens: Vec<String>,
    kinds: Vec<Kind>,
    merges: Vec<(String, String)>,
    /// Isolate every digit before the GPT-2 regex split (`smollm`).
    split_digits: bool,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
}

impl Tokenizer {
    /// Builds the tokenizer from the GGUF's own vocabulary, so tokenization
    /// always matches the weights without a side-car `tokenizer.json`.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, TextError> {
        let model = gguf
            .get_str("tokenizer.ggml.model")
            .ok_or_else(|| TextError::BadModel("GGUF has no tokenizer.ggml.model".into()))?;
        if model != "gpt2" {
            return Err(TextError::Unsupported(format!(
                "tokenizer model '{model}' is not supported (only 'gpt2' byte-level BPE is)"
            )));
        }
        let pre = gguf.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let Some(&(_, split_digits)) = SUPPORTED_PRE.iter().find(|(name, _)| *name == pre) else {
            let names: Vec<&str> = SUPPORTED_PRE.iter().map(|(name, _)| *name).collect();
            return Err(TextError::Unsupported(format!(
                "pre-tokenizer '{pre}' is not supported (supported: {})",
                names.join(", ")
            )));
        };

        let tokens = string_array(gguf, "tokenizer.ggml.tokens")?
            .ok_or_else(|| TextError::BadModel("GGUF has no tokenizer.ggml.tokens".into()))?;
        let merges = string_array(gguf, "tokenizer.ggml.merges")?
            .ok_or_else(|| TextError::BadModel("GGUF has no tokenizer.ggml.merges".into()))?;
        let merges = merges
            .into_iter()
            .enumerate()
            .map(|(i, m)| match m.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_string(), b.to_string())),
                _ => Err(TextError::BadModel(format!("tokenizer merge #{i} ('{m}') is not 'a b'"))),
            })
            .collect::<Result<Vec<_>, _>>()?;

        let kinds = match gguf.get("tokenizer.ggml.token_type") {
            None => vec![Kind::Normal; tokens.len()],
            Some(v) => {
                let arr = v
                    .as_array()
                    .ok_or_else(|| TextError::BadModel("tokenizer.ggml.token_type is not an array".into()))?;
                if arr.len() != tokens.len() {
                    return Err(TextError::BadModel(format!(
                        "tokenizer.ggml.token_type has {} entries but there are {} tokens",
                        arr.len(),
                        tokens.len()
                    )));
                }
                arr.iter()
                    .map(|t| match t.as_i64() {
                        Some(TYPE_CONTROL) => Ok(Kind::Control),
                        Some(TYPE_USER_DEFINED) => Ok(Kind::UserDefined),
                        Some(_) => Ok(Kind::Normal),
                        None => Err(TextError::BadModel("tokenizer.ggml.token_type holds a non-integer".into())),
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
        };

        let id_key = |key: &str| -> Result<Option<u32>, TextError> {
            match gguf.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .filter(|&id| (id as usize) < tokens.len())
                    .map(Some)
                    .ok_or_else(|| TextError::BadModel(format!("{key} is not a token id of the vocabulary"))),
            }
        };
        let bos = id_key("tokenizer.ggml.bos_token_id")?;
        let eos = id_key("tokenizer.ggml.eos_token_id")?;
        let add_bos = match gguf.get("tokenizer.ggml.add_bos_token") {
            Some(crate::gguf::Value::Bool(b)) => *b,
            _ => false,
        };

        Self::build(VocabSpec { tokens, kinds, merges, split_digits, bos, eos, add_bos })
    }

    fn build(spec: VocabSpec) -> Result<Self, TextError> {
        let VocabSpec { tokens, kinds, merges, split_digits, bos, eos, add_bos } = spec;
        if tokens.is_empty() || tokens.len() > u32::MAX as usize {
            return Err(TextError::BadModel(format!("vocabulary size {} is not usable", tokens.len())));
        }

        // First occurrence wins for duplicated strings; ids stay those of the GGUF.
        let mut vocab = Vocab::default();
        for (id, t) in tokens.iter().enumerate() {
            vocab.entry(t.clone()).or_insert(id as u32);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TextError::BadModel(format!("cannot build BPE from the GGUF vocabulary: {e}")))?;

        let mut steps = Vec::new();
        if split_digits {
            let digits = Split::new(SplitPattern::Regex(r"\p{N}".into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| TextError::Tokenizer(format!("digit split regex: {e}")))?;
            steps.push(PreTokenizerWrapper::Split(digits));
        }
        // add_prefix_space=false, trim_offsets=false, use_regex=true (the GPT-2 split).
        steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, true)));
        let pre = Sequence::new(steps);

        let mut with_special = tokenizers::Tokenizer::new(bpe);
        with_special.with_pre_tokenizer(Some(pre));
        with_special.with_decoder(Some(ByteLevelDecoder::new(false, false, true)));
        let control: Vec<AddedToken> = kinds
            .iter()
            .zip(&tokens)
            .filter(|(k, _)| **k == Kind::Control)
            .map(|(_, t)| AddedToken::from(t.clone(), true))
            .collect();
        let user: Vec<AddedToken> = kinds
            .iter()
            .zip(&tokens)
            .filter(|(k, _)| **k == Kind::UserDefined)
            .map(|(_, t)| AddedToken::from(t.clone(), false))
            .collect();
        with_special
            .add_special_tokens(control)
            .map_err(|e| TextError::Tokenizer(format!("adding control tokens: {e}")))?;
        with_special.add_tokens(user).map_err(|e| TextError::Tokenizer(format!("adding user-defined tokens: {e}")))?;

        let mut plain = with_special.clone();
        plain.set_encode_special_tokens(true);

        let pieces = tokens
            .iter()
            .zip(&kinds)
            .map(|(t, k)| match k {
                Kind::Normal => byte_level_decode(t),
                Kind::Control | Kind::UserDefined => t.as_bytes().into(),
            })
            .collect();

        // The id a control text encodes to: the first entry of that text, as in `vocab`.
        let mut controls: Vec<(String, u32)> = Vec::new();
        for (id, (t, k)) in tokens.iter().zip(&kinds).enumerate() {
            if *k == Kind::Control && !t.is_empty() && !controls.iter().any(|(c, _)| c == t) {
                controls.push((t.clone(), vocab_id(&tokens, t).unwrap_or(id as u32)));
            }
        }
        controls.sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));

        let vocab = Vocabulary { with_special, plain, tokens, pieces, kinds, controls, bos, eos, add_bos };
        Ok(Tokenizer { vocab: Arc::new(vocab) })
    }

    /// Encodes text. With `parse_special`, control tokens written in the text
    /// (`<|im_start|>`) become their ids, which chat prompts need; without it
    /// they are tokenized as ordinary characters, which untrusted input needs.
    /// Never adds BOS: callers consult [`Tokenizer::add_bos`].
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TextError> {
        let tk = if parse_special { &self.vocab.with_special } else { &self.vocab.plain };
        let enc = tk.encode_fast(text, false).map_err(|e| TextError::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Cuts `text` at the control tokens written in it, as encoding with `parse_special`
    /// does (the leftmost match first, the longest there): encoding each `Text` piece
    /// without `parse_special` and keeping each `Control` id gives `encode(text, true)`.
    /// Chat prompts use it to parse the template's control tokens but not the messages'.
    pub fn split_control<'a>(&self, text: &'a str) -> Vec<Piece<'a>> {
        let bytes = text.as_bytes();
        let (mut out, mut start, mut i) = (Vec::new(), 0, 0);
        while i < bytes.len() {
            // A token text is valid UTF-8, so a match starts on a character boundary. Most
            // bytes start no control text: only those that do are compared.
            let starts = self.vocab.controls.iter().any(|(t, _)| t.as_bytes()[0] == bytes[i]);
            match self.vocab.controls.iter().find(|(t, _)| starts && bytes[i..].starts_with(t.as_bytes())) {
                Some((t, id)) => {
                    if start < i {
                        out.push(Piece::Text(&text[start..i]));
                    }
                    out.push(Piece::Control(*id));
                    i += t.len();
                    start = i;
                }
                None => i += 1,
            }
        }
        if start < bytes.len() {
            out.push(Piece::Text(&text[start..]));
        }
        out
    }

    /// Whether `text` holds the text of a control token.
    pub fn has_control_text(&self, text: &str) -> bool {
        self.vocab.controls.iter().any(|(t, _)| text.contains(t.as_str()))
    }

    /// The control-token texts, longest first.
    pub fn control_texts(&self) -> impl Iterator<Item = &str> {
        self.vocab.controls.iter().map(|(t, _)| t.as_str())
    }

    /// Decodes ids to text; invalid UTF-8 becomes U+FFFD. With `skip_special`,
    /// control tokens contribute nothing, as API responses want.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TextError> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab.tokens.len()) {
            return Err(TextError::Tokenizer(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.vocab.tokens.len()
            )));
        }
        self.vocab
            .with_special
            .decode(ids, skip_special)
            .map_err(|e| TextError::Tokenizer(format!("decoding failed: {e}")))
    }

    /// Whether the model wants BOS prepended to prompts (`tokenizer.ggml.add_bos_token`, default false).
    pub fn add_bos(&self) -> bool {
        self.vocab.add_bos
    }

    /// Beginning-of-sequence id, if the model declares one.
    pub fn bos_id(&self) -> Option<u32> {
        self.vocab.bos
    }

    /// End-of-sequence id, if the model declares one; generation stops on it.
    pub fn eos_id(&self) -> Option<u32> {
        self.vocab.eos
    }

    /// Number of ids; logits rows have this length.
    pub fn vocab_size(&self) -> usize {
        self.vocab.tokens.len()
    }

    /// Whether `id` is a control token (skipped when decoding with `skip_special`).
    pub fn is_special(&self, id: u32) -> bool {
        self.vocab.kinds.get(id as usize) == Some(&Kind::Control)
    }

    /// The vocabulary string of `id` as stored in the GGUF (byte-level form, e.g. `Ġthe`).
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.vocab.tokens.get(id as usize).map(String::as_str)
    }

    /// The bytes `id` contributes to output text (not necessarily valid UTF-8 alone).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.vocab.pieces.get(id as usize).map(|p| &p[..])
    }
}

/// The first id whose vocabulary text is `t` (the id BPE and added tokens resolve it to).
fn vocab_id(tokens: &[String], t: &str) -> Option<u32> {
    tokens.iter().position(|x| x == t).map(|i| i as u32)
}

/// Reads a string array from the metadata; `Ok(None)` when absent.
fn string_array(gguf: &GgufFile, key: &str) -> Result<Option<Vec<String>>, TextError> {
    let Some(v) = gguf.get(key) else { return Ok(None) };
    let arr = v.as_array().ok_or_else(|| TextError::BadModel(format!("{key} is not an array")))?;
    arr.iter()
        .map(|s| s.as_str().map(str::to_string).ok_or_else(|| TextError::BadModel(format!("{key} holds a non-string"))))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// The byte GPT-2's byte-level alphabet maps `c` to, if `c` is in it.
///
/// Printable Latin-1 bytes stand for themselves; the other 68 bytes were
/// shifted to U+0100.. in byte order.
fn byte_of_char(c: char) -> Option<u8> {
    let cp = c as u32;
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(cp) {
        return Some(cp as u8);
    }
    // The n-th non-printable byte in byte order: 0x00..=0x20, 0x7F..=0xA0, 0xAD.
    match cp.checked_sub(0x100)? {
        n @ 0..=32 => Some(n as u8),
        n @ 33..=66 => Some((0x7F + n - 33) as u8),
        67 => Some(0xAD),
        _ => None,
    }
}

/// Bytes of a byte-level token string. Like the reference decoder, a string
/// with a character outside the alphabet is taken verbatim.
fn byte_level_decode(token: &str) -> Box<[u8]> {
    token
        .chars()
        .map(byte_of_char)
        .collect::<Option<Vec<u8>>>()
        .map(Vec::into_boxed_slice)
        .unwrap_or_else(|| token.as_bytes().into())
}

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

    /// The byte-level alphabet in GPT-2 order, as token strings.
    fn byte_alphabet() -> Vec<String> {
        let mut inverse = vec![None; 0x200];
        for cp in 0u32..0x200 {
            if let Some(c) = char::from_u32(cp) {
                if let Some(b) = byte_of_char(c) {
                    inverse[cp as usize] = Some(b);
                }
            }
        }
        let mut by_byte = vec![String::new(); 256];
        for (cp, b) in inverse.iter().enumerate() {
            if let Some(b) = b {
                by_byte[*b as usize] = char::from_u32(cp as u32).map(String::from).unwrap_or_default();
            }
        }
        by_byte
    }

    /// Ids 0..3 are control tokens, 3..259 the 256 bytes, then merged tokens.
    fn tiny() -> Tokenizer {
        tiny_with(true)
    }

    fn tiny_with(split_digits: bool) -> Tokenizer {
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
        let mut kinds = vec![Kind::Control; 3];
        tokens.extend(byte_alphabet());
        kinds.extend(std::iter::repeat_n(Kind::Normal, 256));
        let merges = vec![("h", "i"), ("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e"), ("1", "2")];
        for (a, b) in &merges {
            tokens.push(format!("{a}{b}"));
            kinds.push(Kind::Normal);
        }
        Tokenizer::build(VocabSpec {
            tokens,
            kinds,
            merges: merges.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
            split_digits,
            bos: Some(1),
            eos: Some(2),
            add_bos: false,
        })
        .expect("tiny tokenizer builds")
    }

    fn byte_id(b: u8) -> u32 {
        3 + b as u32
    }

    #[test]
    fn byte_alphabet_is_a_bijection() {
        let alphabet = byte_alphabet();
        let mut seen = std::collections::HashSet::new();
        for (b, s) in alphabet.iter().enumerate() {
            assert_eq!(s.chars().count(), 1, "byte {b}");
            assert!(seen.insert(s.clone()));
            assert_eq!(byte_level_decode(s).as_ref(), &[b as u8]);
        }
        assert_eq!(alphabet[b' ' as usize], "Ġ");
        assert_eq!(alphabet[b'\n' as usize], "Ċ");
        assert_eq!(byte_of_char('a'), Some(b'a'));
        assert_eq!(byte_of_char('€'), None);
    }

    #[test]
    fn encodes_merges_digits_and_specials() {
        let t = tiny();
        let hi = 259;
        let the = 262;
        assert_eq!(t.encode("hi the", true).unwrap(), vec![hi, the]);
        assert_eq!(t.encode("12", true).unwrap(), vec![byte_id(b'1'), byte_id(b'2')]);
        assert_eq!(tiny_with(false).encode("12", true).unwrap(), vec![263]);
        assert!(t.encode("", true).unwrap().is_empty());
        assert_eq!(t.encode("hi<|im_start|>hi", true).unwrap(), vec![hi, 1, hi]);
        let plain = t.encode("<|im_end|>", false).unwrap();
        assert!(!plain.contains(&2) && plain.len() == "<|im_end|>".len());
        assert_eq!(t.decode(&plain, false).unwrap(), "<|im_end|>");
    }

    #[test]
    fn split_control_cuts_like_parse_special() {
        let t = tiny();
        for text in [
            "<|im_start|>hi the<|im_end|>",
            "hi<|im_start|>hi",
            "plain",
            "",
            "<|im_end|><|im_end|>x",
            "a🦀<|im_start|>",
        ] {
            let mut ids = Vec::new();
            for p in t.split_control(text) {
                match p {
                    Piece::Control(id) => ids.push(id),
                    Piece::Text(s) => ids.extend(t.encode(s, false).unwrap()),
                }
            }
            assert_eq!(ids, t.encode(text, true).unwrap(), "{text:?}");
        }
        assert_eq!(t.split_control("hi<|im_end|>"), vec![Piece::Text("hi"), Piece::Control(2)]);
        assert!(t.has_control_text("x<|im_start|>") && !t.has_control_text("<|im_sta"));
    }

    #[test]
    fn decode_skips_control_tokens_on_request() {
        let t = tiny();
        let ids = t.encode("<|im_start|>hi the<|im_end|>", true).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), "<|im_start|>hi the<|im_end|>");
        assert_eq!(t.decode(&ids, true).unwrap(), "hi the");
        assert!(t.is_special(1) && !t.is_special(259) && !t.is_special(999_999));
        assert_eq!(t.token_str(262), Some("Ġthe"));
        assert_eq!(t.token_str(999_999), None);
        assert!(matches!(t.decode(&[999_999], false), Err(TextError::Tokenizer(_))));
    }

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

    #[test]
    fn metadata_accessors() {
        let t = tiny();
        assert_eq!(t.bos_id(), Some(1));
        assert_eq!(t.eos_id(), Some(2));
        assert!(!t.add_bos());
        assert_eq!(t.vocab_size(), 3 + 256 + 5);
    }

    use crate::gguf::testing::with_strings as gguf_with;

    #[test]
    fn refuses_other_tokenizer_models() {
        let err = Tokenizer::from_gguf(&gguf_with(&[("tokenizer.ggml.model", "llama")])).unwrap_err();
        assert!(matches!(&err, TextError::Unsupported(m) if m.contains("'llama'")), "{err:?}");
        let err =
            Tokenizer::from_gguf(&gguf_with(&[("tokenizer.ggml.model", "gpt2"), ("tokenizer.ggml.pre", "qwen2")]))
                .unwrap_err();
        assert!(matches!(&err, TextError::Unsupported(m) if m.contains("'qwen2'")), "{err:?}");
        let err = Tokenizer::from_gguf(&gguf_with(&[("general.architecture", "llama")])).unwrap_err();
        assert!(matches!(err, TextError::BadModel(_)), "{err:?}");
        let err =
            Tokenizer::from_gguf(&gguf_with(&[("tokenizer.ggml.model", "gpt2"), ("tokenizer.ggml.pre", "smollm")]))
                .unwrap_err();
        assert!(matches!(&err, TextError::BadModel(m) if m.contains("tokens")), "{err:?}");
    }

    /// The README says which files load; it must name exactly what this module takes
    /// (and the architectures `config` takes), so a widened loader updates the claim.
    #[test]
    fn readme_names_what_loads() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let start = readme.find("- **Engine**").expect("README has an Engine item");
        let item = &readme[start..start + readme[start..].find("\n- **").unwrap_or(readme.len() - start)];
        let item = item.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(item.contains("`tokenizer.ggml.model` `gpt2`"), "README must name the vocabulary model: {item}");
        for (pre, _) in SUPPORTED_PRE {
            assert!(item.contains(&format!("`{pre}`")), "README must name the `{pre}` pre-tokenizer: {item}");
        }
        for arch in crate::config::SUPPORTED_ARCHITECTURES {
            assert!(item.contains(&format!("`{arch}` architecture")), "README must name `{arch}`: {item}");
        }
        assert!(!item.contains("Llama-architecture GGUF files"), "the old, wider claim: {item}");
    }

    #[test]
    fn shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<IncrementalDecoder>();
    }
}
