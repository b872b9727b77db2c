//! Seeded text for generated workloads: a small portable PRNG and the vocabularies prompts are
//! drawn from, so a seed gives the same prompts on every machine and with every crate version.

pub const TOPICS: [&str; 16] = [
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

/// `n` words drawn from a small vocabulary, a token each or so.
pub fn words(rng: &mut Rng, n: usize) -> String {
    (0..n).map(|_| WORDS[rng.below(WORDS.len())]).collect::<Vec<_>>().join(" ")
}

pub const NOUNS: [&str; 32] = [
    "ferry",
    "baker",
    "orchard",
    "lighthouse",
    "farmer",
    "bell",
    "garden",
    "mill",
    "sailor",
    "bridge",
    "school",
    "market",
    "teacher",
    "wagon",
    "kettle",
    "festival",
    "painter",
    "road",
    "library",
    "fisher",
    "clock",
    "barn",
    "choir",
    "tower",
    "doctor",
    "station",
    "well",
    "forest",
    "mayor",
    "harbor",
    "lamp",
    "village",
];
const ADJECTIVES: [&str; 16] = [
    "old", "quiet", "red", "busy", "small", "green", "famous", "broken", "early", "bright", "cold", "new", "tall",
    "wooden", "hidden", "golden",
];
const VERBS: [&str; 16] = [
    "visited",
    "painted",
    "repaired",
    "found",
    "watched",
    "followed",
    "built",
    "moved",
    "opened",
    "closed",
    "sold",
    "cleaned",
    "carried",
    "named",
    "described",
    "guarded",
];
const PREPOSITIONS: [&str; 8] = ["near", "behind", "across", "beside", "under", "above", "past", "beyond"];

pub fn pick<'a>(rng: &mut Rng, from: &[&'a str]) -> &'a str {
    from[rng.below(from.len())]
}

/// Sentences of seeded random words, about `tokens` tokens long: common lowercase words and a
/// full stop take about one token each in a small model's BPE vocabulary.
pub fn prose(rng: &mut Rng, tokens: usize) -> String {
    let mut out = Vec::new();
    let mut count = 0;
    while count < tokens {
        out.push(format!(
            "The {} {} {} the {} {} the {} {}.",
            pick(rng, &ADJECTIVES),
            pick(rng, &NOUNS),
            pick(rng, &VERBS),
            pick(rng, &NOUNS),
            pick(rng, &PREPOSITIONS),
            pick(rng, &ADJECTIVES),
            pick(rng, &NOUNS),
        ));
        count += SENTENCE_TOKENS;
    }
    out.join(" ")
}

/// Tokens of one sentence of `prose` (nine words and a full stop), as the model's tokenizer
/// counts them on average.
const SENTENCE_TOKENS: usize = 11;

/// Fisher–Yates, from the workload's own PRNG.
pub fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i + 1));
    }
}
