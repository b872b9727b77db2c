//! The requests of a run: generated from a seed (the same seed gives the same trace
//! on every server) or read from a JSONL file.

use anyhow::{bail, Context, Result};

/// One request of a trace: a chat conversation and how many tokens to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// (role, content) pairs.
    pub messages: Vec<(String, String)>,
    pub output_len: u32,
}

const TOPICS: [&str; 16] = [
    "rivers",
    "bread",
    "the moon",
    "chess",
    "volcanoes",
    "bees",
    "trains",
    "jazz",
    "glaciers",
    "paper",
    "owls",
    "bridges",
    "tea",
    "comets",
    "maps",
    "violins",
];
const WORDS: [&str; 24] = [
    "market", "river", "engine", "winter", "signal", "harvest", "orbit", "ledger", "canvas", "thunder", "copper",
    "meadow", "lantern", "harbor", "circuit", "granite", "pepper", "velvet", "summit", "archive", "falcon", "quartz",
    "tunnel", "willow",
];

/// SplitMix64: a small, portable PRNG, so traces do not depend on a crate's version.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

fn words(rng: &mut Rng, n: usize) -> String {
    (0..n).map(|_| WORDS[rng.below(WORDS.len())]).collect::<Vec<_>>().join(" ")
}

/// The shared system prompt of the `shared-prefix` workload (~600 tokens, fixed).
fn system_prompt() -> String {
    let mut rng = Rng::new(0x5eed);
    format!("You are the archivist of a harbor town. Your notes so far: {}. Answer briefly.", words(&mut rng, 560))
}

/// `n` requests of `workload` (`chat`, `summarize`, `shared-prefix`, or a JSONL file path).
/// `output_len` overrides the workload's output length.
pub fn trace(workload: &str, n: usize, seed: u64, output_len: Option<u32>) -> Result<Vec<Item>> {
    let mut rng = Rng::new(seed);
    let user = |text: String| vec![("user".to_string(), text)];
    let items: Vec<Item> = match workload {
        "chat" => (0..n)
            .map(|_| {
                let ask = ["Tell me about", "Write a short poem about", "Explain", "Give three facts about"];
                let text = format!("{} {}.", ask[rng.below(ask.len())], TOPICS[rng.below(TOPICS.len())]);
                // Medium outputs: 64 to 192 tokens.
                Item { messages: user(text), output_len: output_len.unwrap_or(64 + 16 * rng.below(9) as u32) }
            })
            .collect(),
        "summarize" => (0..n)
            .map(|_| {
                let text = format!("Summarize the following notes in one sentence.\n\n{}", words(&mut rng, 900));
                Item { messages: user(text), output_len: output_len.unwrap_or(32) }
            })
            .collect(),
        "shared-prefix" => {
            let system = system_prompt();
            (0..n)
                .map(|_| {
                    let q = format!("What do your notes say about {}?", TOPICS[rng.below(TOPICS.len())]);
                    Item {
                        messages: vec![("system".to_string(), system.clone()), ("user".to_string(), q)],
                        output_len: output_len.unwrap_or(32),
                    }
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
        items.push(Item { messages, output_len: len.max(1) });
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
            assert_eq!(trace(w, 5, 7, None).unwrap(), trace(w, 5, 7, None).unwrap(), "{w}");
            assert_ne!(trace(w, 5, 7, None).unwrap(), trace(w, 5, 8, None).unwrap(), "{w}");
        }
        let sp = trace("shared-prefix", 3, 1, None).unwrap();
        assert_eq!(sp[0].messages[0], sp[2].messages[0], "one system prompt for all");
        assert!(trace("chat", 3, 1, Some(9)).unwrap().iter().all(|i| i.output_len == 9));
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
        let t = trace(dir.to_str().unwrap(), 3, 0, None).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(t[0].output_len, 5);
        assert_eq!(t[1].messages[0].1, "yo");
        assert_eq!(t[2], t[0]);
        assert!(trace("/no/such/file.jsonl", 1, 0, None).is_err());
    }
}
