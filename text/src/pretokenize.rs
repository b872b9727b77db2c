//! The pre-tokenizers: how text is cut into words before byte-level BPE merges each word.
//!
//! Owns the mapping from a GGUF's `tokenizer.ggml.pre` name to llama.cpp's splitting for that
//! name, and the two settings llama.cpp ties to the name as well: whether a word already in the
//! vocabulary skips the merges, and whether BOS is prepended when the file does not say.
//! It does not hold a vocabulary; `tokenizer` builds the pipeline these steps belong to.
//!
//! The families, as llama.cpp splits them (`'s` stands for the English contractions `'s 't 're
//! 've 'm 'll 'd`):
//! - `gpt2`: GPT-2's split, `'s`, ` ?letters`, ` ?digits`, ` ?other symbols`, spaces.
//! - `smollm`: every digit alone first, then `gpt2`'s split.
//! - `qwen2` and `llama-bpe` (Llama 3): contractions in either case (`'S`, `'Ll`); letters
//!   glued to one leading non-letter, non-digit character that is not a line break (` hello`,
//!   `_hello`, `"hello`); digits alone (`qwen2`) or in runs of at most three from the left
//!   (`llama-bpe`, `12345` is `123 45`); symbols with an optional leading space and any line
//!   breaks that follow; whitespace up to its last line break; other whitespace, less the space
//!   before a word.

use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

use crate::error::TextError;

/// The Qwen2 split. llama.cpp's own spelling of the Hugging Face pattern: the case-insensitive
/// contraction group is written out letter by letter, so that only ASCII letters match there
/// (a Unicode case-insensitive `(?i:'s)` would also take `'ſ`).
const QWEN2_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Llama 3 split: Qwen2's with digits in runs of up to three.
const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A `tokenizer.ggml.pre` family whose llama.cpp splitting is reproduced here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PreTokenizer {
    Gpt2,
    Smollm,
    Qwen2,
    Llama3,
}

/// The `tokenizer.ggml.pre` names taken, with their family. Other names split differently in
/// llama.cpp, so they are refused rather than silently tokenized another way.
pub(crate) const SUPPORTED: &[(&str, PreTokenizer)] = &[
    ("smollm", PreTokenizer::Smollm),
    ("gpt2", PreTokenizer::Gpt2),
    ("qwen2", PreTokenizer::Qwen2),
    ("llama-bpe", PreTokenizer::Llama3),
];

impl PreTokenizer {
    /// The family of a `tokenizer.ggml.pre` name, if it is one of [`SUPPORTED`].
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        SUPPORTED.iter().find(|(n, _)| *n == name).map(|&(_, pre)| pre)
    }

    /// Whether a word that is itself a vocabulary entry becomes that token without merging
    /// (llama.cpp's `ignore_merges`, set for Llama 3: its merges do not always rebuild such words).
    pub(crate) fn ignore_merges(self) -> bool {
        self == PreTokenizer::Llama3
    }

    /// Whether BOS is prepended when the GGUF has no `tokenizer.ggml.add_bos_token` (llama.cpp's
    /// default for the name; the key, when present, decides).
    pub(crate) fn default_add_bos(self) -> bool {
        self == PreTokenizer::Llama3
    }

    /// The `tokenizers` pre-tokenizer: the family's splits, then the byte-level mapping.
    pub(crate) fn pipeline(self) -> Result<Sequence, TextError> {
        let mut steps = self.splits()?;
        // add_prefix_space=false, trim_offsets=false; `use_regex` runs GPT-2's split here.
        let gpt2_split = matches!(self, PreTokenizer::Gpt2 | PreTokenizer::Smollm);
        steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, gpt2_split)));
        Ok(Sequence::new(steps))
    }

    /// The regex splits that come before the byte-level step (GPT-2's own split is part of that
    /// step, so `gpt2` has none here).
    fn splits(self) -> Result<Vec<PreTokenizerWrapper>, TextError> {
        let pattern = match self {
            PreTokenizer::Gpt2 => return Ok(Vec::new()),
            PreTokenizer::Smollm => r"\p{N}",
            PreTokenizer::Qwen2 => QWEN2_SPLIT,
            PreTokenizer::Llama3 => LLAMA3_SPLIT,
        };
        let split = Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| TextError::Tokenizer(format!("pre-tokenizer regex for {self:?}: {e}")))?;
        Ok(vec![PreTokenizerWrapper::Split(split)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer as _};

    /// The words `pre` cuts `text` into, before the byte-level mapping.
    fn words(pre: PreTokenizer, text: &str) -> Vec<String> {
        let mut s = PreTokenizedString::from(text);
        let steps = Sequence::new(pre.splits().unwrap());
        steps.pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte).into_iter().map(|(w, _, _)| w.to_string()).collect()
    }

    /// Cases checked by hand against llama.cpp's splitting rules (`unicode.cpp`, the custom
    /// Qwen2 and Llama 3 splitters): where the two families agree, one row serves both.
    #[test]
    fn qwen2_and_llama3_split_like_llama_cpp() {
        let both: &[(&str, &[&str])] = &[
            ("Hello world", &["Hello", " world"]),
            ("don't I'M DON'T we'Ll", &["don", "'t", " I", "'M", " DON", "'T", " we", "'Ll"]),
            // An apostrophe that starts no contraction is a symbol: it leads the letters right after it,
            // and a space before it makes it a symbol run of its own.
            ("'hello 'x", &["'hello", " '", "x"]),
            ("_snake_case", &["_snake", "_case"]),
            ("a  b", &["a", " ", " b"]),
            ("a \n\n  b", &["a", " \n\n", " ", " b"]),
            ("x\r\ny", &["x", "\r\n", "y"]),
            ("end  ", &["end", "  "]),
            ("f(x):\n    return", &["f", "(x", "):\n", "   ", " return"]),
            (" ==> 🦀!", &[" ==>", " 🦀!"]),
            ("日本語 テキスト", &["日本語", " テキスト"]),
            ("\t\tindent", &["\t", "\tindent"]),
            ("Ångström", &["Ångström"]),
        ];
        for pre in [PreTokenizer::Qwen2, PreTokenizer::Llama3] {
            for (text, want) in both {
                assert_eq!(words(pre, text), *want, "{pre:?} {text:?}");
            }
        }
        assert_eq!(words(PreTokenizer::Qwen2, "x=12345"), ["x", "=", "1", "2", "3", "4", "5"]);
        assert_eq!(words(PreTokenizer::Llama3, "x=12345"), ["x", "=", "123", "45"]);
        assert_eq!(words(PreTokenizer::Llama3, "1234567 3.14"), ["123", "456", "7", " ", "3", ".", "14"]);
        // A digit never takes a leading space or letter with it.
        assert_eq!(words(PreTokenizer::Qwen2, "a1 2"), ["a", "1", " ", "2"]);
    }

    #[test]
    fn smollm_isolates_digits_and_gpt2_does_not() {
        assert_eq!(words(PreTokenizer::Smollm, "ab123"), ["ab", "1", "2", "3"]);
        assert!(words(PreTokenizer::Gpt2, "ab 123").len() == 1, "gpt2 splits in the byte-level step");
    }

    #[test]
    fn names_and_settings() {
        assert_eq!(PreTokenizer::from_name("qwen2"), Some(PreTokenizer::Qwen2));
        assert_eq!(PreTokenizer::from_name("llama-bpe"), Some(PreTokenizer::Llama3));
        assert_eq!(PreTokenizer::from_name("deepseek-llm"), None);
        assert!(PreTokenizer::Llama3.ignore_merges() && PreTokenizer::Llama3.default_add_bos());
        for pre in [PreTokenizer::Gpt2, PreTokenizer::Smollm, PreTokenizer::Qwen2] {
            assert!(!pre.ignore_merges() && !pre.default_add_bos(), "{pre:?}");
            pre.pipeline().unwrap();
        }
    }
}
