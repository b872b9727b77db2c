#!/usr/bin/env bash
# Fit the router's output-length predictor (shortest-job-first scheduling) on the default
# model's own answers, and write it where the router compiles it in.
#
#   scripts/train-length-predictor.sh                 640 prompts, seed 1 -> router/length-predictor.json
#   scripts/train-length-predictor.sh --prompts 200   any `tandem predictor train` flag
#
# The data recipe: `cli/src/prompt_mix.rs` draws a seeded mix of 13 kinds of chat prompts
# whose natural answers differ in length (yes/no, one word, a sentence, N facts, a haiku, a
# poem, an explanation, a story, an essay, code, steps...); the model answers each greedily
# with EOS honoured and at most 512 tokens, as `tandem bench serve --workload mixed-length`
# asks. A quarter is held out; Kendall's tau on it is printed and stored in the file.
# Takes about 10 minutes on 2 cores. Nothing is downloaded but the model (fetch-model.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/fetch-model.sh >/dev/null
cargo build --release --locked -p tandem
exec target/release/tandem predictor train --prompts 640 --seed 1 --out router/length-predictor.json "$@"
