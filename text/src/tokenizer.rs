//! Text ⇄ token ids for GGUF models with a GPT-2 byte-level BPE vocabulary.
//!
//! Owns the vocabulary read from the GGUF metadata (`tokenizer.ggml.*`) and the
//! `tokenizers`-crate pipeline that encodes text exactly like llama.cpp does: added tokens cut
//! out first, then the pre-tokenizer named by `tokenizer.ggml.pre` (see `pretokenize`), then
//! byte-level BPE. It also keeps the byte pieces that decoding and streaming use
//! ([`IncrementalDecoder`] turns generated ids into text deltas that are always valid UTF-8).
//!
//! Added tokens come in two kinds, as in llama.cpp: control tokens (`<|im_start|>`,
//! `<|endoftext|>`) are matched in text only when special tokens are parsed and are dropped
//! when decoding skips special tokens; user-defined tokens (Qwen's `<tool_call>`) are matched
//! in any text and always printed.

use std::sync::Arc;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::AddedToken;

use crate::byte_level::byte_level_decode;
use crate::error::TextError;
use crate::gguf::GgufFile;
pub use crate::incremental::IncrementalDecoder;
use crate::pretokenize::{PreTokenizer, SUPPORTED};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

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
    pre: PreTokenizer,
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
        let Some(pre) = PreTokenizer::from_name(pre) else {
            let names: Vec<&str> = SUPPORTED.iter().map(|(name, _)| *name).collect();
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
        // As in llama.cpp: the key when the file has it, else the pre-tokenizer's default.
        let add_bos = match gguf.get("tokenizer.ggml.add_bos_token") {
            Some(crate::gguf::Value::Bool(b)) => *b,
            _ => pre.default_add_bos(),
        };

        Self::build(VocabSpec { tokens, kinds, merges, pre, bos, eos, add_bos })
    }

    fn build(spec: VocabSpec) -> Result<Self, TextError> {
        let VocabSpec { tokens, kinds, merges, pre, bos, eos, add_bos } = spec;
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
            .ignore_merges(pre.ignore_merges())
            .build()
            .map_err(|e| TextError::BadModel(format!("cannot build BPE from the GGUF vocabulary: {e}")))?;

        let mut with_special = tokenizers::Tokenizer::new(bpe);
        with_special.with_pre_tokenizer(Some(pre.pipeline()?));
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

    /// Every id that ends a generation: EOS, and the control tokens whose text marks the end
    /// of a turn or a document in the common chat formats (`<|im_end|>`, `<|endoftext|>`,
    /// `<|eot_id|>`, ...), as llama.cpp's end-of-generation set. Qwen's instruct models end a
    /// turn with `<|im_end|>` (their EOS) but may still end a raw completion with
    /// `<|endoftext|>`.
    pub fn end_of_generation_ids(&self) -> Vec<u32> {
        const TEXTS: &[&str] = &[
            "<|im_end|>",
            "<|endoftext|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|end_of_text|>",
            "<|end|>",
            "<end_of_turn>",
            "<|return|>",
            "<|call|>",
        ];
        let mut ids: Vec<u32> = self.vocab.eos.into_iter().collect();
        for (id, text) in self.vocab.tokens.iter().enumerate() {
            if self.vocab.kinds[id] == Kind::Control && TEXTS.contains(&text.as_str()) && !ids.contains(&(id as u32)) {
                ids.push(id as u32);
            }
        }
        ids
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

/// Small vocabularies for unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::byte_level::byte_alphabet;

    /// The merges of the tiny vocabulary; their results are ids 259..264.
    const MERGES: [(&str, &str); 5] = [("h", "i"), ("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e"), ("1", "2")];
    /// A vocabulary entry that no merge builds (only `ignore_merges` yields it).
    pub(crate) const UNMERGED: u32 = 264;
    /// The user-defined token `<tool_call>`.
    pub(crate) const TOOL_CALL: u32 = 265;

    /// Ids 0..3 are the control tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, 3..259
    /// the 256 bytes, then the merged tokens, `abc` and `<tool_call>`; SmolLM's pre-tokenizer.
    pub(crate) fn tiny() -> Tokenizer {
        tiny_with(PreTokenizer::Smollm)
    }

    /// [`tiny`] for a model that asks for BOS (`<|im_start|>`, id 1) before prompts.
    pub(crate) fn tiny_adding_bos() -> Tokenizer {
        build(PreTokenizer::Smollm, true)
    }

    pub(crate) fn tiny_with(pre: PreTokenizer) -> Tokenizer {
        build(pre, false)
    }

    fn build(pre: PreTokenizer, add_bos: bool) -> Tokenizer {
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
        let mut kinds = vec![Kind::Control; 3];
        tokens.extend(byte_alphabet());
        kinds.extend(std::iter::repeat_n(Kind::Normal, 256));
        for (a, b) in MERGES {
            tokens.push(format!("{a}{b}"));
            kinds.push(Kind::Normal);
        }
        tokens.extend(["abc".to_string(), "<tool_call>".to_string()]);
        kinds.extend([Kind::Normal, Kind::UserDefined]);
        Tokenizer::build(VocabSpec {
            tokens,
            kinds,
            merges: MERGES.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
            pre,
            bos: Some(1),
            eos: Some(2),
            add_bos,
        })
        .expect("tiny tokenizer builds")
    }

    pub(crate) fn byte_id(b: u8) -> u32 {
        3 + b as u32
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{byte_id, tiny, tiny_with, TOOL_CALL, UNMERGED};
    use super::*;

    #[test]
    fn encodes_merges_digits_and_specials() {
        let t = tiny();
        let hi = 259;
        let the = 262;
        assert_eq!(t.encode("hi the", true).unwrap(), vec![hi, the]);
        assert_eq!(t.encode("12", true).unwrap(), vec![byte_id(b'1'), byte_id(b'2')]);
        assert_eq!(tiny_with(PreTokenizer::Gpt2).encode("12", true).unwrap(), vec![263]);
        assert_eq!(tiny_with(PreTokenizer::Qwen2).encode("12", true).unwrap(), vec![byte_id(b'1'), byte_id(b'2')]);
        assert_eq!(tiny_with(PreTokenizer::Llama3).encode("12", true).unwrap(), vec![263]);
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

    /// User-defined tokens are cut out of any text, parsed or not, and always printed.
    #[test]
    fn user_defined_tokens_are_always_matched() {
        let t = tiny();
        let text = "hi<tool_call><|im_end|>";
        let parsed = t.encode(text, true).unwrap();
        assert_eq!(parsed, vec![259, TOOL_CALL, 2]);
        let plain = t.encode(text, false).unwrap();
        assert_eq!(plain[..2], [259, TOOL_CALL]);
        assert_eq!(plain.len(), 2 + "<|im_end|>".len());
        assert!(!t.is_special(TOOL_CALL));
        assert_eq!(t.decode(&parsed, true).unwrap(), "hi<tool_call>");
        assert_eq!(t.token_bytes(TOOL_CALL), Some(&b"<tool_call>"[..]));
        assert!(!t.has_control_text("<tool_call>"));
        assert_eq!(t.split_control(text), vec![Piece::Text("hi<tool_call>"), Piece::Control(2)]);
    }

    /// Llama 3 takes a word that is a vocabulary entry whole; the others merge it from bytes.
    #[test]
    fn ignore_merges_only_for_llama3() {
        assert_eq!(tiny_with(PreTokenizer::Llama3).encode("abc", false).unwrap(), vec![UNMERGED]);
        for pre in [PreTokenizer::Qwen2, PreTokenizer::Smollm, PreTokenizer::Gpt2] {
            assert_eq!(tiny_with(pre).encode("abc", false).unwrap(), b"abc".map(byte_id), "{pre:?}");
        }
    }

    #[test]
    fn metadata_accessors() {
        let t = tiny();
        assert_eq!(t.bos_id(), Some(1));
        assert_eq!(t.eos_id(), Some(2));
        assert!(!t.add_bos());
        assert_eq!(t.vocab_size(), 3 + 256 + 5 + 2);
    }

    use crate::gguf::testing::with_strings as gguf_with;

    #[test]
    fn refuses_other_tokenizer_models() {
        let err = Tokenizer::from_gguf(&gguf_with(&[("tokenizer.ggml.model", "llama")])).unwrap_err();
        assert!(matches!(&err, TextError::Unsupported(m) if m.contains("'llama'")), "{err:?}");
        let err = Tokenizer::from_gguf(&gguf_with(&[
            ("tokenizer.ggml.model", "gpt2"),
            ("tokenizer.ggml.pre", "deepseek-llm"),
        ]))
        .unwrap_err();
        assert!(
            matches!(&err, TextError::Unsupported(m) if m.contains("'deepseek-llm'") && m.contains("qwen2")),
            "{err:?}"
        );
        for pre in ["qwen2", "llama-bpe"] {
            let err =
                Tokenizer::from_gguf(&gguf_with(&[("tokenizer.ggml.model", "gpt2"), ("tokenizer.ggml.pre", pre)]))
                    .unwrap_err();
            assert!(matches!(&err, TextError::BadModel(m) if m.contains("tokens")), "{pre}: {err:?}");
        }
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
        for (pre, _) in SUPPORTED {
            assert!(item.contains(&format!("`{pre}`")), "README must name the `{pre}` pre-tokenizer: {item}");
        }
        for arch in crate::config::SUPPORTED_ARCHITECTURES {
            assert!(item.contains(&format!("`{arch}` architecture")), "README must name `{arch}`: {item}");
        }
        assert!(!item.contains("Llama-architecture GGUF files"), "the old, wider claim: {item}");
        // Qwen and Llama 3 vocabularies load now: they are not refused for their pre-tokenizers.
        assert!(!item.contains("other pre-tokenizers"), "the old, narrower claim: {item}");
    }

    #[test]
    fn shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<IncrementalDecoder>();
    }
}
