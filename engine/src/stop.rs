//! Stop strings over streamed text.
//!
//! Owns the held-back tail of a stream: text is released as soon as it can no
//! longer be the beginning of a stop string, so a client never receives part
//! of a stop string, even one that arrives split across many deltas (or in
//! the middle of a multi-byte character's tokens, since deltas are whole `str`s).

/// What a [`StopMatcher::push`] releases.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutcome {
    /// Text that is safe to send now. When a stop string matched, this is
    /// everything before it; the stop string and anything after are dropped.
    pub text: String,
    /// The stop string that matched in this push, if any (reported once).
    pub matched: Option<String>,
}

impl StopOutcome {
    /// Whether generation should end because a stop string matched.
    pub fn is_stop(&self) -> bool {
        self.matched.is_some()
    }
}

/// Watches one sequence's output for any of a set of stop strings.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Longest stop string in bytes; at most this minus one byte is held back.
    max_len: usize,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops`; empty strings are ignored (they would match everywhere).
    pub fn new(stops: &[String]) -> Self {
        let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        let max_len = stops.iter().map(String::len).max().unwrap_or(0);
        StopMatcher { stops, max_len, held: String::new(), stopped: false }
    }

    /// Feeds the next piece of generated text. After a match every further
    /// push releases nothing.
    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome::default();
        }
        if self.stops.is_empty() {
            return StopOutcome { text: delta.to_string(), matched: None };
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.push_str(delta);

        // Earliest match wins; at the same position, the longest stop string.
        let found = self
            .stops
            .iter()
            .filter_map(|s| buf.find(s.as_str()).map(|pos| (pos, s)))
            .min_by(|a, b| a.0.cmp(&b.0).then(b.1.len().cmp(&a.1.len())));
        if let Some((pos, stop)) = found {
            let matched = Some(stop.clone());
            buf.truncate(pos);
            self.stopped = true;
            return StopOutcome { text: buf, matched };
        }

        // Hold back the longest tail that some stop string starts with.
        let earliest = buf.len().saturating_sub(self.max_len - 1);
        let hold_from = (earliest..buf.len())
            .filter(|&i| buf.is_char_boundary(i))
            .find(|&i| {
                let tail = &buf.as_bytes()[i..];
                self.stops.iter().any(|s| s.as_bytes().starts_with(tail))
            })
            .unwrap_or(buf.len());
        self.held = buf.split_off(hold_from);
        StopOutcome { text: buf, matched: None }
    }

    /// Releases the held-back tail once the stream has ended without it
    /// completing a stop string. Empty after a match.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Whether a stop string has matched.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes every delta, returning (released pieces, stop matched, finish).
    fn run(stops: &[&str], deltas: &[&str]) -> (Vec<String>, Option<String>, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = Vec::new();
        let mut matched = None;
        for d in deltas {
            let o = m.push(d);
            if o.matched.is_some() {
                assert!(matched.is_none(), "stop reported twice");
                matched = o.matched.clone();
            }
            out.push(o.text);
        }
        let tail = m.finish();
        (out, matched, tail)
    }

    #[test]
    fn table() {
        struct Case {
            stops: &'static [&'static str],
            deltas: &'static [&'static str],
            released: &'static [&'static str],
            matched: Option<&'static str>,
            tail: &'static str,
        }
        let cases = [
            // No stop strings: everything passes through.
            Case { stops: &[], deltas: &["a", "b"], released: &["a", "b"], matched: None, tail: "" },
            // Match inside one delta; text after it is dropped.
            Case { stops: &["END"], deltas: &["abcENDxyz"], released: &["abc"], matched: Some("END"), tail: "" },
            // Stop split over three deltas; the partial prefix is held back.
            Case {
                stops: &["END"],
                deltas: &["abE", "N", "Dzz"],
                released: &["ab", "", ""],
                matched: Some("END"),
                tail: "",
            },
            // A false start is released once it can no longer match.
            Case { stops: &["END"], deltas: &["xE", "Nq", "r"], released: &["x", "ENq", "r"], matched: None, tail: "" },
            // The held tail is flushed by finish.
            Case { stops: &["END"], deltas: &["okEN"], released: &["ok"], matched: None, tail: "EN" },
            // Pushes after the match release nothing.
            Case {
                stops: &["\n\n"],
                deltas: &["a\n", "\nb", "c"],
                released: &["a", "", ""],
                matched: Some("\n\n"),
                tail: "",
            },
            // Earliest match wins over an earlier-listed stop string.
            Case { stops: &["cd", "b"], deltas: &["abcd"], released: &["a"], matched: Some("b"), tail: "" },
            // Same start: the longer stop string is reported.
            Case { stops: &["ab", "abc"], deltas: &["xabc"], released: &["x"], matched: Some("abc"), tail: "" },
            // Overlapping prefix: "aab" inside "aaab".
            Case {
                stops: &["aab"],
                deltas: &["a", "a", "a", "b"],
                released: &["", "", "a", ""],
                matched: Some("aab"),
                tail: "",
            },
            // Multi-byte stop string split across deltas at character boundaries.
            Case {
                stops: &["🦀!"],
                deltas: &["hi ", "🦀", "!", "x"],
                released: &["hi ", "", "", ""],
                matched: Some("🦀!"),
                tail: "",
            },
            // A multi-byte character sharing a leading byte with the stop is not held.
            Case { stops: &["é"], deltas: &["ê", "aé"], released: &["ê", "a"], matched: Some("é"), tail: "" },
            // Stop string at the very start.
            Case {
                stops: &["<|im_end|>"],
                deltas: &["<|im_", "end|>more"],
                released: &["", ""],
                matched: Some("<|im_end|>"),
                tail: "",
            },
            // Empty stop strings are ignored.
            Case { stops: &[""], deltas: &["abc"], released: &["abc"], matched: None, tail: "" },
        ];
        for (n, c) in cases.iter().enumerate() {
            let (released, matched, tail) = run(c.stops, c.deltas);
            assert_eq!(released, c.released, "case {n}: released");
            assert_eq!(matched.as_deref(), c.matched, "case {n}: matched");
            assert_eq!(tail, c.tail, "case {n}: tail");
        }
    }

    #[test]
    fn releases_everything_but_the_stop_for_any_split() {
        let text = "Once upon a time ⟨STOP⟩ never shown";
        let stops = vec!["⟨STOP⟩".to_string(), "zzz".to_string()];
        let want = "Once upon a time ";
        let chars: Vec<char> = text.chars().collect();
        for chunk in 1..=chars.len() {
            let mut m = StopMatcher::new(&stops);
            let mut got = String::new();
            let mut stopped = false;
            for piece in chars.chunks(chunk) {
                let o = m.push(&piece.iter().collect::<String>());
                got.push_str(&o.text);
                stopped |= o.is_stop();
            }
            got.push_str(&m.finish());
            assert!(stopped && m.is_stopped(), "chunk {chunk}");
            assert_eq!(got, want, "chunk {chunk}");
        }
    }
}
