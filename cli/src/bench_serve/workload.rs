//! The requests of a run: generated from a seed (the same seed gives the same trace
//! on every server) or read from a JSONL file.

use anyhow::{bail, Context, Result};

use super::mooncake;
use super::text::{pick, prose, shuffle, words, Rng, NOUNS, TOPICS};

/// One request of a trace: a chat conversation (or token ids) and how many tokens to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// (role, content) pairs.
    pub messages: Vec<(String, String)>,
    /// A prompt of token ids, sent in place of `messages` where the API takes one.
    pub tokens: Option<Vec<u32>>,
    pub output_len: u32,
}

impl Item {
    /// A user message, after a system message when `system` is given.
    pub fn chat(system: Option<String>, user: String, output_len: u32) -> Item {
        let mut messages: Vec<_> = system.map(|s| ("system".to_string(), s)).into_iter().collect();
        messages.push(("user".to_string(), user));
        Item { messages, tokens: None, output_len }
    }
}

/// `shared-contexts`: a long context per group (the system message, so a group's requests
/// share a prefix) and short queries from the group's users, groups interleaved in a seeded
/// order, each (group, user) pair sending its share of the `n` requests.
fn shared_contexts(s: &SharedContexts, n: usize, seed: u64, output_len: Option<u32>) -> Result<Vec<Item>> {
    if s.groups == 0 || s.users == 0 || s.context_tokens == 0 || s.query_tokens == 0 {
        bail!("--groups, --users, --context-tokens and --query-tokens must be positive");
    }
    let mut rng = Rng::new(seed);
    let contexts: Vec<String> = (0..s.groups)
        .map(|g| format!("Notes of circle {g}. {} Answer from these notes only.", prose(&mut rng, s.context_tokens)))
        .collect();
    let pairs = s.groups * s.users;
    let mut order: Vec<(usize, usize)> = (0..n).map(|i| (i % pairs / s.users, i % s.users)).collect();
    shuffle(&mut order, &mut rng);
    let items = order
        .into_iter()
        .map(|(g, u)| {
            // About 12 tokens of question, after filler that varies it up to --query-tokens.
            let ask = format!("Reader {u} asks: what do the notes say about the {}?", pick(&mut rng, &NOUNS));
            let filler = s.query_tokens.saturating_sub(12);
            let query = if filler == 0 { ask } else { format!("{} {ask}", prose(&mut rng, filler)) };
            Item::chat(Some(contexts[g].clone()), query, output_len.unwrap_or(32))
        })
        .collect();
    Ok(items)
}

/// The shared system prompt of the `shared-prefix` workload (~600 tokens, fixed).
fn system_prompt() -> String {
    let mut rng = Rng::new(0x5eed);
    format!("You are the archivist of a harbor town. Your notes so far: {}. Answer briefly.", words(&mut rng, 560))
}

/// The workload a run sends, as the command line chose it.
#[derive(Debug, Clone)]
pub struct Spec {
    /// `chat`, `summarize`, `shared-prefix`, `shared-contexts`, `trace:FILE`, or a JSONL file.
    pub name: String,
    /// Output tokens per request, overriding the workload's.
    pub output_len: Option<u32>,
    pub shared: SharedContexts,
    pub trace: mooncake::Options,
    /// Send a trace's prompts as token ids (Tandem's gRPC API) rather than as text.
    pub token_ids: bool,
}

/// `shared-contexts`: `groups` long contexts, each shared by `users` users' short queries.
#[derive(Debug, Clone, Copy)]
pub struct SharedContexts {
    pub groups: usize,
    pub users: usize,
    /// Tokens per context (approximate: the server tokenizes).
    pub context_tokens: usize,
    /// Tokens per query (approximate).
    pub query_tokens: usize,
}

/// The requests of one run, and what a replayed trace adds to them.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub items: Vec<Item>,
    /// Send times in seconds from the run's start, when the workload brings its own (a
    /// trace without `--rate`); otherwise the run's loop decides.
    pub times: Option<Vec<f64>>,
    /// The share of prompt tokens one infinite cache seeing every request would serve.
    pub ideal_hit_rate: Option<f64>,
}

/// Requests a generated workload has when `--requests` is not given.
pub const DEFAULT_REQUESTS: usize = 64;

/// The requests of `spec` from `seed`: `n` of them (a trace: all it keeps, at most `n`).
pub fn build(spec: &Spec, n: Option<usize>, seed: u64) -> Result<Workload> {
    if let Some(path) = spec.name.strip_prefix("trace:") {
        return mooncake::load(path, &spec.trace, n, seed, spec.output_len, spec.token_ids);
    }
    let n = n.unwrap_or(DEFAULT_REQUESTS);
    let items = match spec.name.as_str() {
        "shared-contexts" => shared_contexts(&spec.shared, n, seed, spec.output_len)?,
        name => generated(name, n, seed, spec.output_len)?,
    };
    Ok(Workload { items, times: None, ideal_hit_rate: None })
}

/// `n` requests of `workload` (`chat`, `summarize`, `shared-prefix`, or a JSONL file path).
/// `output_len` overrides the workload's output length.
fn generated(workload: &str, n: usize, seed: u64, output_len: Option<u32>) -> Result<Vec<Item>> {
    let mut rng = Rng::new(seed);
    let items: Vec<Item> = match workload {
        "chat" => (0..n)
            .map(|_| {
                let ask = ["Tell me about", "Write a short poem about", "Explain", "Give three facts about"];
                let text = format!("{} {}.", ask[rng.below(ask.len())], TOPICS[rng.below(TOPICS.len())]);
                // Medium outputs: 64 to 192 tokens.
                Item::chat(None, text, output_len.unwrap_or(64 + 16 * rng.below(9) as u32))
            })
            .collect(),
        "summarize" => (0..n)
            .map(|_| {
                let text = format!("Summarize the following notes in one sentence.\n\n{}", words(&mut rng, 900));
                Item::chat(None, text, output_len.unwrap_or(32))
            })
            .collect(),
        "shared-prefix" => {
            let system = system_prompt();
            (0..n)
                .map(|_| {
                    let q = format!("What do your notes say about {}?", TOPICS[rng.below(TOPICS.len())]);
                    Item::chat(Some(system.clone()), q, output_len.unwrap_or(32))
                })
                .collect()
        }
        path => read_file(path, n, output_len)?,
    };
    Ok(items)
}

/// A JSONL file: one object per line with `prompt` (a string) or `messages`
/// (`[{"role", "content"}]`), and `output_len`. Lines are reused in order if `n` is larger.
fn read_file(path: &str, n: usize, output_len: Option<u32>) -> Result<Vec<Item>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("workload {path:?} is not chat, summarize, shared-prefix or a readable JSONL file"))?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{path}:{}: not JSON", i + 1))?;
        let messages = if let Some(p) = v["prompt"].as_str() {
            vec![("user".to_string(), p.to_string())]
        } else if let Some(ms) = v["messages"].as_array() {
            ms.iter()
                .map(|m| {
                    let role = m["role"].as_str().unwrap_or("user").to_string();
                    (role, m["content"].as_str().unwrap_or("").to_string())
                })
                .collect()
        } else {
            bail!("{path}:{}: needs `prompt` or `messages`", i + 1);
        };
        let len = output_len.or(v["output_len"].as_u64().map(|x| x as u32)).unwrap_or(64);
        items.push(Item { messages, tokens: None, output_len: len.max(1) });
    }
    if items.is_empty() {
        bail!("{path}: no requests");
    }
    Ok((0..n).map(|i| items[i % items.len()].clone()).collect())
}

/// Poisson arrivals: the send times (seconds from the start) of `n` requests at `rate` per second.
pub fn arrivals(n: usize, rate: f64, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed ^ 0xa11);
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            let at = t;
            t += -(1.0 - rng.unit()).ln() / rate;
            at
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_repeat_with_their_seed() {
        for w in ["chat", "summarize", "shared-prefix"] {
            assert_eq!(generated(w, 5, 7, None).unwrap(), generated(w, 5, 7, None).unwrap(), "{w}");
            assert_ne!(generated(w, 5, 7, None).unwrap(), generated(w, 5, 8, None).unwrap(), "{w}");
        }
        let sp = generated("shared-prefix", 3, 1, None).unwrap();
        assert_eq!(sp[0].messages[0], sp[2].messages[0], "one system prompt for all");
        assert!(generated("chat", 3, 1, Some(9)).unwrap().iter().all(|i| i.output_len == 9));
    }

    fn spec(name: &str) -> Spec {
        Spec {
            name: name.into(),
            output_len: None,
            shared: SharedContexts { groups: 3, users: 2, context_tokens: 200, query_tokens: 20 },
            trace: mooncake::Options::default(),
            token_ids: true,
        }
    }

    #[test]
    fn shared_contexts_repeat_with_their_seed() {
        let s = spec("shared-contexts");
        let w = build(&s, Some(12), 5).unwrap();
        assert_eq!(w, build(&s, Some(12), 5).unwrap());
        assert_ne!(w, build(&s, Some(12), 6).unwrap());
        assert_eq!((w.items.len(), w.times.as_ref(), w.ideal_hit_rate), (12, None, None));
        assert_eq!(build(&s, None, 5).unwrap().items.len(), DEFAULT_REQUESTS);
        assert!(build(&Spec { shared: SharedContexts { groups: 0, ..s.shared }, ..s.clone() }, None, 5).is_err());
    }

    #[test]
    fn shared_contexts_share_a_prefix_per_group() {
        let s = spec("shared-contexts");
        let items = build(&s, Some(60), 9).unwrap().items;
        let mut contexts: Vec<&str> = Vec::new();
        let mut per_context = Vec::new();
        for it in &items {
            assert_eq!(it.messages.len(), 2);
            let (role, ctx) = &it.messages[0];
            assert_eq!(role, "system", "the context comes first");
            match contexts.iter().position(|c| c == ctx) {
                Some(k) => per_context[k] += 1,
                None => {
                    contexts.push(ctx);
                    per_context.push(1);
                }
            }
            // About --context-tokens words (a word and a full stop ~ a token each).
            let n = ctx.split_whitespace().count();
            assert!((170..=220).contains(&n), "{n} words");
            let q = it.messages[1].1.split_whitespace().count();
            assert!((12..=24).contains(&q), "{q} words: {}", it.messages[1].1);
        }
        assert_eq!(per_context, [20, 20, 20], "3 groups, one context each, an equal share");
        // Groups interleave: the first 6 requests are not all of one group.
        assert!(items[..6].iter().any(|i| i.messages[0] != items[0].messages[0]));
        // Different users' queries differ even within a group.
        let queries: std::collections::HashSet<&str> = items.iter().map(|i| i.messages[1].1.as_str()).collect();
        assert!(queries.len() > 50, "{} distinct queries", queries.len());
    }

    #[test]
    fn arrivals_average_the_rate() {
        let a = arrivals(4000, 8.0, 3);
        assert!(a.windows(2).all(|w| w[1] >= w[0]));
        let mean_gap = a.last().unwrap() / 3999.0;
        assert!((mean_gap - 0.125).abs() < 0.01, "{mean_gap}");
    }

    #[test]
    fn jsonl_files() {
        let dir = std::env::temp_dir().join(format!("tandem-wl-{}", std::process::id()));
        std::fs::write(
            &dir,
            "{\"prompt\": \"hi\", \"output_len\": 5}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"yo\"}]}\n",
        )
        .unwrap();
        let t = generated(dir.to_str().unwrap(), 3, 0, None).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(t[0].output_len, 5);
        assert_eq!(t[1].messages[0].1, "yo");
        assert_eq!(t[2], t[0]);
        assert!(generated("/no/such/file.jsonl", 1, 0, None).is_err());
    }
}
