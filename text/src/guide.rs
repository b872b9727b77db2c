//! Constrained decoding: what a request's output must match ([`Guide`]: a JSON Schema, any
//! JSON object, a regular expression, a list of choices or a Lark grammar), compiled for
//! the model's vocabulary by the `llguidance` crate into a [`Constraint`] that masks each
//! step's tokens.
//!
//! The router compiles a guide once to refuse a bad one before any worker sees it
//! ([`GuideCompiler::check`]); the worker that samples compiles it again and brings the
//! matcher up to date with every token the request already has, wherever those came from
//! (a prefill worker's first token, an earlier attempt's tokens after a migration): the
//! constraint's state is a function of the guide and the tokens, so it never travels.
//!
//! Compilation is bounded: the guide's text by [`MAX_GUIDE_BYTES`], the grammar's size and
//! the lexer's work by `llguidance`'s limits, so a hostile schema costs milliseconds.

use std::sync::Arc;

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{self, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Tokenizer;

/// The largest guide accepted, in bytes of its text (a schema's JSON, a regex, a grammar,
/// the choices together).
pub const MAX_GUIDE_BYTES: usize = 64 * 1024;

/// The most choices a choice list may hold.
pub const MAX_CHOICES: usize = 1024;

/// What the output must match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Guide {
    /// A JSON value valid against this JSON Schema.
    JsonSchema(Value),
    /// Any JSON object.
    JsonObject,
    /// A string matching this regular expression (Rust `regex` syntax), whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A string of this Lark grammar (llguidance's dialect).
    Lark(String),
}

impl Guide {
    /// The kind's name, as metrics and errors say it.
    pub fn kind(&self) -> &'static str {
        match self {
            Guide::JsonSchema(_) => "json_schema",
            Guide::JsonObject => "json_object",
            Guide::Regex(_) => "regex",
            Guide::Choice(_) => "choice",
            Guide::Lark(_) => "grammar",
        }
    }

    /// The guide as `llguidance` takes it, or why it cannot be one.
    fn grammar(&self) -> Result<TopLevelGrammar, String> {
        let size = match self {
            Guide::JsonSchema(v) => serde_json::to_string(v).map_err(|e| e.to_string())?.len(),
            Guide::JsonObject => 0,
            Guide::Regex(s) | Guide::Lark(s) => s.len(),
            Guide::Choice(c) => c.iter().map(String::len).sum(),
        };
        if size > MAX_GUIDE_BYTES {
            return Err(format!("the {} is {size} bytes; at most {MAX_GUIDE_BYTES} are accepted", self.kind()));
        }
        Ok(match self {
            Guide::JsonSchema(v) => {
                if !v.is_object() && !v.is_boolean() {
                    return Err("a JSON Schema is an object".into());
                }
                TopLevelGrammar::from_json_schema(compact(v.clone()))
            }
            Guide::JsonObject => TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"}))),
            Guide::Regex(r) => {
                if r.is_empty() {
                    return Err("the regex is empty".into());
                }
                TopLevelGrammar::from_regex(r)
            }
            Guide::Choice(c) => {
                if c.is_empty() || c.len() > MAX_CHOICES {
                    return Err(format!("a choice list holds 1 to {MAX_CHOICES} strings, got {}", c.len()));
                }
                if c.iter().any(String::is_empty) {
                    return Err("a choice is empty".into());
                }
                // Lark string literals take JSON's escapes.
                let alts: Vec<String> = c.iter().map(|s| serde_json::to_string(s).expect("a string")).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
            Guide::Lark(g) => {
                if g.trim().is_empty() {
                    return Err("the grammar is empty".into());
                }
                TopLevelGrammar::from_lark(g.clone())
            }
        })
    }
}

/// How JSON is written under a schema unless the schema says (`x-guidance`): one line,
/// `", "` between items and `": "` after keys, as Python's `json.dumps` writes it. With free
/// whitespace allowed, a small model can spend its whole budget on blank lines inside an
/// object the schema has not closed yet.
pub fn json_layout() -> Value {
    serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

fn compact(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert_with(json_layout);
    }
    schema
}

/// Compiles guides for one vocabulary. Building it walks the whole vocabulary once (tens of
/// milliseconds); clones share it.
#[derive(Clone)]
pub struct GuideCompiler {
    factory: Arc<ParserFactory>,
    eos: u32,
    /// Guides compiled lately, fresh (`compile_cached`): a repeated schema costs a copy.
    cache: Arc<std::sync::Mutex<Cache>>,
}

/// The most compiled guides a compiler keeps.
pub const CACHED_GUIDES: usize = 64;

/// Compiled guides by their JSON, oldest first out.
#[derive(Default)]
struct Cache {
    entries: std::collections::HashMap<String, Constraint>,
    order: std::collections::VecDeque<String>,
}

impl GuideCompiler {
    /// The compiler for `tok`'s vocabulary; `None` if the model declares no EOS (a guide
    /// must be able to end the output).
    pub fn new(tok: &Tokenizer) -> Result<GuideCompiler, String> {
        let eos = tok.eos_id().ok_or("the model declares no end-of-sequence token")?;
        let words: Vec<Vec<u8>> = (0..tok.vocab_size() as u32)
            .map(|id| {
                if tok.is_special(id) {
                    // llguidance's mark for a special token: never produced by text.
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(tok.token_str(id).unwrap_or_default().as_bytes());
                    w
                } else {
                    tok.token_bytes(id).unwrap_or_default().to_vec()
                }
            })
            .collect();
        let info = TokRxInfo::new(words.len() as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Vocab { trie, tok: tok.clone() });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        *factory.limits_mut() = limits();
        Ok(GuideCompiler { factory: Arc::new(factory), eos, cache: Arc::default() })
    }

    /// `compile`, through a cache of the last [`CACHED_GUIDES`] guides: a guide seen lately
    /// is a copy of its compiled start (`true`: it was), not a second compilation.
    pub fn compile_cached(&self, guide: &Guide) -> Result<(Constraint, bool), String> {
        let key = serde_json::to_string(guide).map_err(|e| e.to_string())?;
        if let Some(c) = self.cache.lock().expect("guide cache").entries.get(&key) {
            return Ok((c.fork(), true));
        }
        let c = self.compile(guide)?;
        let mut cache = self.cache.lock().expect("guide cache");
        if !cache.entries.contains_key(&key) {
            if cache.order.len() >= CACHED_GUIDES {
                if let Some(old) = cache.order.pop_front() {
                    cache.entries.remove(&old);
                }
            }
            cache.order.push_back(key.clone());
            cache.entries.insert(key, c.fork());
        }
        Ok((c, false))
    }

    /// Whether `guide` compiles; its error names what is wrong.
    pub fn check(&self, guide: &Guide) -> Result<(), String> {
        self.compile(guide).map(drop)
    }

    /// A fresh constraint for `guide`, at the start of the output.
    pub fn compile(&self, guide: &Guide) -> Result<Constraint, String> {
        let grammar = guide.grammar()?;
        let parser = self.factory.create_parser(grammar).map_err(|e| clean(&e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(clean(&e));
        }
        Ok(Constraint { matcher, consumed: 0, eos: self.eos, vocab: self.factory.tok_env().tok_trie().vocab_size() })
    }
}

/// The grammar limits: a guide's compilation and each step's mask cost milliseconds at most.
fn limits() -> ParserLimits {
    ParserLimits {
        max_grammar_size: 200_000,
        initial_lexer_fuel: 1_000_000,
        step_lexer_fuel: 200_000,
        step_max_items: 50_000,
        max_lexer_states: 100_000,
        ..ParserLimits::default()
    }
}

/// llguidance's errors carry a multi-line context; the first line says what is wrong.
fn clean(e: &str) -> String {
    let first = e.lines().find(|l| !l.trim().is_empty()).unwrap_or(e).trim();
    first.chars().take(400).collect()
}

/// The vocabulary as llguidance reads it: the trie of every token's bytes, and the model's
/// own tokenizer for the text a grammar forces.
struct Vocab {
    trie: TokTrie,
    tok: Tokenizer,
}

impl TokenizerEnv for Vocab {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<toktrie::TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self.tok.encode(text, false).unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            // Not text: the trie's own greedy split.
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// One sequence's constraint: the matcher, and how many of the sequence's tokens it has
/// taken.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    consumed: usize,
    eos: u32,
    vocab: usize,
}

/// Which ids a step may sample.
pub struct TokenMask {
    allowed: toktrie::SimpleVob,
}

impl TokenMask {
    /// Whether `id` may be sampled.
    pub fn allows(&self, id: u32) -> bool {
        (id as usize) < self.allowed.len() && self.allowed.is_allowed(id)
    }
}

impl Constraint {
    /// Brings the matcher up to `output` (every token the sequence generated, earlier
    /// attempts' included), then the ids its next token may take. The end-of-sequence id
    /// is among them only where the grammar accepts; past the grammar's end it is the only
    /// one. A sequence that left the grammar (it cannot, under its masks) may only end.
    pub fn mask(&mut self, output: &[u32]) -> TokenMask {
        if output.len() > self.consumed {
            let _ = self.matcher.consume_tokens(&output[self.consumed..]);
            self.consumed = output.len();
        }
        let allowed = match self.matcher.compute_mask_or_eos() {
            Ok(m) => m,
            Err(_) => {
                let mut only = toktrie::SimpleVob::alloc(self.vocab);
                only.allow_token(self.eos);
                only
            }
        };
        TokenMask { allowed }
    }

    /// A copy for a parallel sample, with its own state from here on.
    pub fn fork(&self) -> Constraint {
        Constraint { matcher: self.matcher.deep_clone(), ..self.clone() }
    }
}
