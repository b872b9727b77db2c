//! A seeded mix of chat prompts whose natural answers differ in length by kind: a yes or no,
//! one word, a sentence, a list of N items, a haiku, a short poem, an explanation, a story,
//! an essay, code. The length predictor is fitted on the model's own answers to one seed's
//! mix (`tandem predictor train`), and `tandem bench serve --workload mixed-length` sends
//! another seed's, so the benchmark's prompts are ones the predictor has not seen.

/// What to ask about.
const TOPICS: &[&str] = &[
    "the ocean",
    "volcanoes",
    "the moon",
    "honey bees",
    "ancient Rome",
    "coffee",
    "winter",
    "trains",
    "friendship",
    "the internet",
    "dinosaurs",
    "rainforests",
    "chess",
    "electric cars",
    "gardening",
    "the human heart",
    "jazz music",
    "mountains",
    "recycling",
    "photosynthesis",
    "black holes",
    "the printing press",
    "penguins",
    "deserts",
    "bicycles",
    "the olympics",
    "clouds",
    "bread baking",
    "robots",
    "libraries",
    "earthquakes",
    "whales",
    "the solar system",
    "a lighthouse",
    "autumn",
    "pirates",
    "the piano",
    "castles",
    "vaccines",
    "kites",
];
const COUNTRIES: &[&str] = &[
    "France", "Japan", "Brazil", "Canada", "Egypt", "Italy", "Kenya", "Mexico", "Norway", "Peru", "Spain", "India",
    "Germany", "Chile", "Greece", "Ireland", "Poland", "Vietnam", "Morocco", "Sweden",
];
const WORDS: &[&str] =
    &["cat", "light", "tree", "sun", "rain", "book", "star", "stone", "fire", "song", "bird", "night"];
const QUESTIONS: &[&str] = &[
    "Is water wet",
    "Is the sun a star",
    "Can penguins fly",
    "Is ice cold",
    "Do fish swim",
    "Is the earth flat",
    "Is two bigger than one",
    "Do cats bark",
    "Is snow white",
    "Can birds sing",
];
const TASKS: &[&str] = &[
    "reverses a string",
    "checks whether a number is prime",
    "sorts a list of numbers",
    "counts the vowels in a word",
    "returns the largest item of a list",
    "computes a factorial",
    "merges two dictionaries",
    "reads a file and counts its lines",
];
const HOWTOS: &[&str] = &[
    "make a cup of tea",
    "plant a tree",
    "change a bicycle tire",
    "bake bread",
    "write a letter",
    "learn to swim",
    "pack for a trip",
    "clean a kitchen",
];

/// One prompt of the mix: its user message and its kind's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MixPrompt {
    pub kind: &'static str,
    pub user: String,
}

/// A small seeded generator (SplitMix64), so a mix is the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[(self.next() % xs.len() as u64) as usize]
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// `n` prompts of the mix drawn with `seed`.
pub fn mix(n: usize, seed: u64) -> Vec<MixPrompt> {
    let mut r = Rng(seed ^ 0x5EED_0F_1E57);
    (0..n)
        .map(|_| {
            let topic = r.pick(TOPICS);
            let (kind, user) = match r.next() % 13 {
                0 => ("yes-no", format!("{}? Answer with yes or no only.", r.pick(QUESTIONS))),
                1 => ("one-word", format!("What is the capital of {}? Answer in one word.", r.pick(COUNTRIES))),
                2 => ("rhyme", format!("Give me one word that rhymes with \"{}\".", r.pick(WORDS))),
                3 => ("sentence", format!("Write one sentence about {topic}.")),
                4 => ("list", format!("List {} facts about {topic}, one per line.", r.range(3, 10))),
                5 => ("haiku", format!("Write a haiku about {topic}.")),
                6 => ("poem", format!("Write a short poem about {topic}.")),
                7 => ("explain", format!("Explain {topic} in detail.")),
                8 => ("story", format!("Write a long story about {topic}.")),
                9 => ("essay", format!("Write an essay about {topic}.")),
                10 => ("code", format!("Write a Python function that {}.", r.pick(TASKS))),
                11 => ("steps", format!("Describe step by step how to {}.", r.pick(HOWTOS))),
                _ => ("define", format!("Define {topic} in a few words.")),
            };
            MixPrompt { kind, user }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mix_is_seeded_and_varied() {
        assert_eq!(mix(50, 3), mix(50, 3));
        assert_ne!(mix(50, 3), mix(50, 4));
        let kinds: std::collections::BTreeSet<_> = mix(200, 1).into_iter().map(|p| p.kind).collect();
        assert_eq!(kinds.len(), 13, "{kinds:?}");
    }
}
