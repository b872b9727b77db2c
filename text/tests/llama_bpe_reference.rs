//! The `llama-bpe` (Llama 3) tokenizer against llama.cpp.
//!
//! No Llama 3 model is fetched: llama.cpp's own vocabulary-only GGUF for its tokenizer tests
//! (`models/ggml-vocab-llama-bpe.gguf` in its tree) is, by `scripts/setup-vocab-fixtures.sh`,
//! extracted into `.vocab/` from the llama-cpp-python sdist. `tests/fixtures/llama_cpp/
//! llama_bpe_text.json` (written by `scripts/make-text-fixtures.py`) holds llama.cpp's ids for a
//! set of strings on it, and Llama 3 Instruct conversations rendered with jinja2. Without the
//! file these tests print `skipped: <why>` on stderr and pass, unless `TANDEM_REQUIRE_TOOLS=1`
//! (`scripts/test.sh` sets it after running the set-up), when they fail.

mod fixture;

use std::sync::OnceLock;

use fixture::{ChatCase, TokenizerCase, VocabFacts};
use serde::Deserialize;
use tandem_text::chat::ChatTemplate;
use tandem_text::prompt::{prompt_ids, Prompt};
use tandem_text::tokenizer::Tokenizer;

const VOCAB: &str = ".vocab/ggml-vocab-llama-bpe.gguf";
const FIXTURE: &str = "tests/fixtures/llama_cpp/llama_bpe_text.json";

#[derive(Deserialize)]
struct Reference {
    vocab: VocabFacts,
    raw_with_bos: TokenizerCase,
    chat_template: String,
    tokenizer: Vec<TokenizerCase>,
    chat: Vec<ChatCase>,
}

fn reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| fixture::load(FIXTURE))
}

/// The vocabulary's tokenizer, or `None` (after saying why) when the file is not set up.
fn tokenizer() -> Option<&'static Tokenizer> {
    static TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = fixture::root().join(VOCAB);
        if !path.is_file() {
            let why = format!("{VOCAB} is missing: run scripts/setup-vocab-fixtures.sh");
            assert!(std::env::var("TANDEM_REQUIRE_TOOLS").as_deref() != Ok("1"), "{why}");
            eprintln!("skipped: llama_bpe_reference: {why}");
            return None;
        }
        let (tokenizer, template) = fixture::open(&path);
        assert!(template.is_none(), "the vocabulary-only file ships no chat template");
        Some(tokenizer)
    })
    .as_ref()
}

#[test]
fn tokenizer_strings_match_llama_cpp() {
    let Some(tk) = tokenizer() else { return };
    fixture::check_tokenizer_cases(tk, &reference().tokenizer);
}

#[test]
fn decode_inverts_encode() {
    let Some(tk) = tokenizer() else { return };
    fixture::check_decode_inverts_encode(tk, &reference().tokenizer);
}

/// The file has no `add_bos_token`: BOS is llama.cpp's default for `llama-bpe`, prepended to
/// raw prompts.
#[test]
fn vocabulary_and_bos_like_llama_cpp() {
    let Some(tk) = tokenizer() else { return };
    let v = &reference().vocab;
    assert_eq!(
        (tk.vocab_size(), tk.bos_id(), tk.eos_id(), tk.add_bos()),
        (v.size, Some(v.bos), Some(v.eos), v.add_bos)
    );
    assert!(v.add_bos);
    let raw = &reference().raw_with_bos;
    assert_eq!(prompt_ids(tk, None, &Prompt::Text(raw.text.clone())).unwrap(), raw.ids);
    assert_eq!(raw.ids[0], v.bos);
}

/// Llama 3 Instruct's template writes `bos_token` itself: the prompt holds one BOS, as
/// llama.cpp's ids of the rendered text do.
#[test]
fn llama3_chat_cases_render_like_jinja2_with_one_bos() {
    let Some(tk) = tokenizer() else { return };
    let r = reference();
    let bos_text = tk.token_str(r.vocab.bos).unwrap();
    let eos_text = tk.token_str(r.vocab.eos).unwrap();
    let template = ChatTemplate::new(&r.chat_template, bos_text, eos_text).unwrap();
    fixture::check_chat_cases(&r.chat, |_| (tk, &template));
    for c in &r.chat {
        assert_eq!(c.prompt_token_ids.iter().filter(|&&id| id == r.vocab.bos).count(), 1, "{}", c.name);
    }
}
