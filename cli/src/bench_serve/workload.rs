//! The requests of a run: generated from a seed (the same seed gives the same trace
//! on every server) or read from a JSONL file. A phased workload labels each request with
//! its phase, and the report splits its figures by phase.

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
    /// The phase of a phased workload the request belongs to (`phased`: 0 for the first
    /// half, 1 for the second; a JSONL file: its lines' `phase`).
    pub phase: Option<u32>,
    /// Generate to the model's own end (EOS honoured, `output_len` a cap), not exactly
    /// `output_len` tokens (`mixed-length`).
    pub natural: bool,
    /// Which tenant sends it (an index into `--tenant`; 0 without tenants).
    pub tenant: usize,
    /// The TTFT objective sent with it (`--request-slo-ttft-ms`).
    pub slo_ttft_ms: Option<u32>,
    /// Its output length as the client expects it (`--expected-lengths`: an oracle).
    pub expected_output: Option<u32>,
}

impl Item {
    /// A user message, after a system message when `system` is given.
    pub fn chat(system: Option<String>, user: String, output_len: u32) -> Item {
        let mut messages: Vec<_> = system.map(|s| ("system".to_string(), s)).into_iter().collect();
        messages.push(("user".to_string(), user));
        Item {
            messages,
            tokens: None,
            output_len,
            phase: None,
            natural: false,
            tenant: 0,
            slo_ttft_ms: None,
            expected_output: None,
        }
    }

    /// The same request, labelled with `phase`.
    fn in_phase(self, phase: u32) -> Item {
        Item { phase: Some(phase), ..self }
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
    let items = match spec.name.as_str() {
        "shared-contexts" => shared_contexts(&spec.shared, n.unwrap_or(DEFAULT_REQUESTS), seed, spec.output_len)?,
        name => match generated(name, n.unwrap_or(DEFAULT_REQUESTS), seed, spec.output_len) {
            Some(items) => items,
            None => read_file(name, n, spec.output_len)?,
        },
    };
    Ok(Workload { items, times: None, ideal_hit_rate: None })
}

/// `n` requests of `workload` (`chat`, `summarize`, `shared-prefix` or `phased`; `None` for
/// another name). `output_len` overrides the workload's output lengths.
fn generated(workload: &str, n: usize, seed: u64, output_len: Option<u32>) -> Option<Vec<Item>> {
    let mut rng = Rng::new(seed);
    let items: Vec<Item> = match workload {
        // Medium outputs: 64 to 192 tokens.
        "chat" => (0..n).map(|_| chat(&mut rng, 64, output_len)).collect(),
        "summarize" => (0..n).map(|_| summarize(&mut rng, output_len)).collect(),
        "shared-prefix" => {
            let system = system_prompt();
            (0..n)
                .map(|_| {
                    let q = format!("What do your notes say about {}?", TOPICS[rng.below(TOPICS.len())]);
                    Item::chat(Some(system.clone()), q, output_len.unwrap_or(32))
                })
                .collect()
        }
        "phased" => phased(&mut rng, n, output_len),
        // The length predictor's prompt kinds (another seed than its training's), answered to
        // their natural end, at most 512 tokens.
        "mixed-length" => crate::prompt_mix::mix(n, 1000 + seed)
            .into_iter()
            .map(|p| Item { natural: true, ..Item::chat(None, p.user, output_len.unwrap_or(512)) })
            .collect(),
        _ => return None,
    };
    Some(items)
}

/// A `chat` request: a short question (~35 tokens with the chat template) and an output of
/// `min_output` to `min_output + 128` tokens.
fn chat(rng: &mut Rng, min_output: u32, output_len: Option<u32>) -> Item {
    let ask = ["Tell me about", "Write a short poem about", "Explain", "Give three facts about"];
    let text = format!("{} {}.", ask[rng.below(ask.len())], TOPICS[rng.below(TOPICS.len())]);
    Item::chat(None, text, output_len.unwrap_or(min_output + 16 * rng.below(9) as u32))
}

/// A `summarize` request: ~940 prompt tokens, 32 output tokens.
fn summarize(rng: &mut Rng, output_len: Option<u32>) -> Item {
    let text = format!("Summarize the following notes in one sentence.\n\n{}", words(rng, 900));
    Item::chat(None, text, output_len.unwrap_or(32))
}

/// `phased`: the load shifts halfway. The first half (phase 0, rounded up) are `summarize`
/// requests, long prompts and short outputs, which want prefill capacity; the second half
/// (phase 1) are chat questions with long outputs (128 to 256 tokens), which want decode
/// capacity. A split of the workers that suits one half does not suit the other.
fn phased(rng: &mut Rng, n: usize, output_len: Option<u32>) -> Vec<Item> {
    let first = n.div_ceil(2);
    let long_prompts = (0..first).map(|_| summarize(rng, output_len).in_phase(0)).collect::<Vec<_>>();
    let long_outputs = (first..n).map(|_| chat(rng, 128, output_len).in_phase(1));
    long_prompts.into_iter().chain(long_outputs).collect()
}

/// A JSONL file: one object per line with `prompt` (a string) or `messages`
/// (`[{"role", "content"}]`), `output_len` (default 64) and optionally `phase` (an integer).
/// Every line once, in order, or `n` requests, lines reused in order if `n` is larger.
fn read_file(path: &str, n: Option<usize>, output_len: Option<u32>) -> Result<Vec<Item>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!("workload {path:?} is not chat, summarize, shared-prefix, phased or a readable JSONL file")
    })?;
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
        let phase = match &v["phase"] {
            serde_json::Value::Null => None,
            p => Some(
                p.as_u64()
                    .and_then(|p| u32::try_from(p).ok())
                    .with_context(|| format!("{path}:{}: `phase` is {p}, not a non-negative integer", i + 1))?,
            ),
        };
        let item = Item {
            messages,
            tokens: None,
            output_len: len.max(1),
            phase,
            natural: false,
            tenant: 0,
            slo_ttft_ms: None,
            expected_output: None,
        };
        items.push(item);
    }
    if items.is_empty() {
        bail!("{path}: no requests");
    }
    Ok((0..n.unwrap_or(items.len())).map(|i| items[i % items.len()].clone()).collect())
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
        for w in ["chat", "summarize", "shared-prefix", "phased"] {
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
    fn phased_shifts_from_long_prompts_to_long_outputs_halfway() {
        let items = generated("phased", 9, 4, None).unwrap();
        assert_eq!(items, generated("phased", 9, 4, None).unwrap(), "the same seed, the same trace");
        assert_ne!(items, generated("phased", 9, 5, None).unwrap());
        let words = |i: &Item| i.messages.iter().map(|(_, c)| c.split_whitespace().count()).sum::<usize>();
        // Rounded up: the first 5 of 9 are the long-prompt phase.
        for it in &items[..5] {
            assert_eq!((it.phase, it.output_len), (Some(0), 32));
            assert!(words(it) >= 900, "{} words", words(it));
        }
        for it in &items[5..] {
            assert_eq!(it.phase, Some(1));
            assert!((128..=256).contains(&it.output_len), "{}", it.output_len);
            assert!(words(it) <= 8, "{} words", words(it));
        }
        // Long outputs vary, as chat's do.
        let lens: std::collections::HashSet<u32> =
            generated("phased", 40, 4, None).unwrap()[20..].iter().map(|i| i.output_len).collect();
        assert!(lens.len() > 3, "{lens:?}");
        let short = generated("phased", 4, 4, Some(7)).unwrap();
        assert!(short.iter().all(|i| i.output_len == 7), "--max-tokens overrides both phases");
        assert_eq!(short.iter().map(|i| i.phase).collect::<Vec<_>>(), [Some(0), Some(0), Some(1), Some(1)]);
        // Only `phased` labels phases.
        assert!(generated("summarize", 3, 4, None).unwrap().iter().all(|i| i.phase.is_none()));
    }

    #[test]
    fn a_phased_trace_written_as_jsonl_reads_back_the_same() {
        let items = generated("phased", 6, 2, None).unwrap();
        let lines: Vec<String> = items
            .iter()
            .map(|i| serde_json::json!({"prompt": i.messages[0].1, "output_len": i.output_len, "phase": i.phase}))
            .map(|v| v.to_string())
            .collect();
        let path = std::env::temp_dir().join(format!("tandem-phased-{}.jsonl", std::process::id()));
        std::fs::write(&path, lines.join("\n")).unwrap();
        let w = build(&spec(path.to_str().unwrap()), None, 9);
        std::fs::write(&path, "{\"prompt\": \"hi\", \"phase\": \"late\"}\n").unwrap();
        let bad = build(&spec(path.to_str().unwrap()), None, 9);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(w.unwrap().items, items, "every line once, in order, phases kept");
        assert!(format!("{:#}", bad.unwrap_err()).contains("`phase`"));
    }

    #[test]
    fn jsonl_files() {
        let dir = std::env::temp_dir().join(format!("tandem-wl-{}", std::process::id()));
        std::fs::write(
            &dir,
            "{\"prompt\": \"hi\", \"output_len\": 5}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"yo\"}]}\n",
        )
        .unwrap();
        let t = read_file(dir.to_str().unwrap(), Some(3), None).unwrap();
        let all = read_file(dir.to_str().unwrap(), None, None).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(t[0].output_len, 5);
        assert_eq!(t[1].messages[0].1, "yo");
        assert_eq!((t[1].output_len, t[1].phase), (64, None));
        assert_eq!(t[2], t[0]);
        assert_eq!(all, t[..2], "without --requests, every line once");
        assert!(read_file("/no/such/file.jsonl", Some(1), None).is_err());
        assert!(generated("/no/such/file.jsonl", 1, 0, None).is_none());
    }
}
