#!/usr/bin/env python3
"""Write llama.cpp's reference fixtures (llama-cpp-python) for a model.

Run with the reference venv made by scripts/setup-reference.sh:

    .venv-ref/bin/python scripts/make-fixtures.py          # SmolLM2: tests/fixtures/llama_cpp/reference.json
    .venv-ref/bin/python scripts/make-fixtures.py qwen     # Qwen2.5-Coder: .../qwen2.5-coder-0.5b.json

The fixture holds
  * tokenizer cases: text -> ids (add_bos=False, special=True),
  * generation cases: the prompt (chat template rendered with jinja2, or raw),
    its token ids, up to 64 greedy tokens (argmax of the raw logits, stopping
    only on the model's end-of-generation ids, which are not recorded), the top-5 logits after every
    consumed position, and the top1-top2 log-probability gap at every
    generated step.

The prompt is evaluated in one llama_decode call, then one token at a time.
Flash attention is off.
"""
import json
import os
import sys
from pathlib import Path

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

import llama_cpp
from llama_cpp import Llama

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    # key: (file, fixture, vocabulary size, ids that end a generation)
    "smollm2": ("SmolLM2-135M-Instruct.Q4_1.gguf", "reference.json", 49152, {2}),
    # <|im_end|> ends a chat turn, <|endoftext|> a document.
    "qwen": ("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "qwen2.5-coder-0.5b.json", 151936, {151645, 151643}),
}
KEY = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
if KEY not in MODELS:
    sys.exit(f"usage: make-fixtures.py [{' | '.join(MODELS)}]")
MODEL_NAME, OUT_NAME, N_VOCAB, STOP_IDS = MODELS[KEY]
MODEL_PATH = ROOT / "models" / MODEL_NAME
OUT_PATH = ROOT / "tests" / "fixtures" / "llama_cpp" / OUT_NAME

N_CTX = 2048
N_THREADS = 2
N_BATCH = 512
MAX_NEW = 64
TOPK = 5

# --------------------------------------------------------------------------
# Tokenizer cases
# --------------------------------------------------------------------------
TOKENIZER_TEXTS = [
    "Hello, world!",
    "Café naïve résumé façade Ångström crème brûlée",
    "I love 🦀 and 🚀!",
    "Family: 👨‍👩‍👧‍👦 and a rainbow flag 🏳️‍🌈, thumbs 👍🏽",
    "日本語のテキストと中文文本，还有한국어.",
    "Καλημέρα κόσμε, αβγδε ΑΒΓΔΕ",
    "مرحبا بالعالم، كيف حالك؟",
    "col1\tcol2\t\tcol3\n",
    "line one\nline two\n\nline four\n",
    "a  b   c       d",
    "  leading and trailing spaces  ",
    "def f(x):\n    if x > 0:\n        return x * 2\n    return -x\n",
    "1234567 and 3.14159 and 0.001 and 1,000,000 and -42",
    "don't I'll they're IT'S we've she'd you're WON'T",
    "hello<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>",
    "text before<|endoftext|>text after",
    "Visit https://example.com/path?q=1&x=%20y#frag or http://test.org.",
    "Mail me at john.doe+tag@example.co.uk, please.",
    "Mixed: English, Русский, Ελληνικά, 日本語, עברית, हिन्दी!",
    " ",
    "first line\r\nsecond line\r\n",
    "\n\n\n",
    "CamelCaseIdentifier snake_case_identifier SCREAMING_CASE",
    "x=[1,2,3];y={'a':None}",
    "    indented with four spaces",
    "The quick brown fox jumps over the lazy dog.",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
]

# --------------------------------------------------------------------------
# Generation cases
# --------------------------------------------------------------------------
LONG_INSTRUCTION = (
    "You are helping me plan a small community garden in a city neighborhood. "
    "The plot is about ten meters by six meters, gets full sun in the morning and "
    "partial shade in the afternoon, and the soil is somewhat clay-heavy. About "
    "fifteen volunteers will help, most of them beginners, and we have a modest "
    "budget for seeds, compost, and a few basic tools. We would like to grow "
    "vegetables that are easy to care for, and we also want a small area with "
    "flowers to attract bees and butterflies. Please write a short plan that covers "
    "how to prepare the soil, which five vegetables to start with and why, how to "
    "organize the volunteers into a weekly watering schedule, and one or two "
    "common mistakes that beginners should avoid. Keep the answer practical and "
    "friendly."
)

LONG_RAW = (
    "The history of the printing press is closely tied to the spread of ideas in "
    "early modern Europe. Before movable type, books were copied by hand, usually "
    "by scribes working in monasteries, and a single volume could take months or "
    "even years to complete. As a result, books were rare and expensive, and only "
    "wealthy institutions and individuals could afford to own more than a few. "
    "Around the middle of the fifteenth century, Johannes Gutenberg, a goldsmith "
    "from the city of Mainz, developed a system of metal type that could be "
    "arranged, inked, and pressed onto paper again and again. His press was adapted "
    "from the screw presses used to make wine and olive oil, and his ink was based "
    "on oil rather than water, so that it would stick to the metal letters. The "
    "most famous product of his workshop was a large Bible, printed in two columns "
    "with a clear and elegant typeface. Within a few decades, printing shops had "
    "appeared in dozens of cities across the continent, from Venice and Paris to "
    "London and Krakow. The number of books in circulation grew enormously, and "
    "prices fell to the point where merchants, teachers, and students could buy "
    "them. Printed pamphlets carried news, arguments, and advertisements, and they "
    "played a central role in the religious debates of the sixteenth century. "
    "Scholars could now compare identical copies of a text, which made it easier to "
    "correct errors and to build on the work of others. Some historians argue that "
    "the scientific revolution would have been impossible without this steady flow "
    "of printed knowledge, because it allowed observations, tables, and diagrams to "
    "be shared widely and accurately. Over the following centuries,"
)

CASES = [
    ("capital-france", "chat", "What is the capital of France?"),
    ("garden-plan", "chat", LONG_INSTRUCTION),
    ("python-is-prime", "chat",
     "Write a Python function that checks whether a number is prime. "
     "Include a short docstring."),
    ("german-weather", "chat",
     "Wie ist das Wetter normalerweise im Sommer in Berlin? Antworte bitte auf Deutsch."),
    ("list-fruits", "chat", "List five fruits that are rich in vitamin C."),
    ("french-greeting", "chat", "Bonjour ! Peux-tu m'expliquer ce qu'est la photosynthèse ?"),
    ("arithmetic", "raw", "Question: What is 17 + 25?\nAnswer: 17 + 25 = 42.\n"
     "Question: What is 123 * 4?\nAnswer: 123 * 4 ="),
    ("raw-chatml", "raw",
     "The following is a transcript.\n<|im_start|>user\nName three primary colors."
     "<|im_end|>\n<|im_start|>assistant\n"),
    ("story", "raw", "Once upon a time, in a small village at the edge of a dark forest, "
     "there lived a young girl named Mira who"),
    ("printing-press-long", "raw", LONG_RAW),
    ("counting", "raw", "1, 2, 3, 4, 5, 6,"),
]

# Qwen2.5-Coder is a code model: half its cases are code, chat and raw.
QWEN_CASES = [
    ("capital-france", "chat", "What is the capital of France?"),
    ("python-is-prime", "chat",
     "Write a Python function that checks whether a number is prime. "
     "Include a short docstring."),
    ("rust-fizzbuzz", "chat", "Write FizzBuzz in Rust, printing 1 to 15."),
    ("explain-sql", "chat",
     "Explain what this SQL does: SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 3;"),
    ("german-weather", "chat",
     "Wie ist das Wetter normalerweise im Sommer in Berlin? Antworte bitte auf Deutsch."),
    ("garden-plan", "chat", LONG_INSTRUCTION),
    ("raw-python-def", "raw",
     "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
    ("raw-js-class", "raw",
     "// A small stack in JavaScript\nclass Stack {\n  constructor() {\n    this.items = [];\n  }\n\n  push(x) {"),
    ("arithmetic", "raw", "Question: What is 17 + 25?\nAnswer: 17 + 25 = 42.\n"
     "Question: What is 123 * 4?\nAnswer: 123 * 4 ="),
    ("story", "raw", "Once upon a time, in a small village at the edge of a dark forest, "
     "there lived a young girl named Mira who"),
    ("printing-press-long", "raw", LONG_RAW),
    ("counting", "raw", "1, 2, 3, 4, 5, 6,"),
]
if KEY == "qwen":
    CASES = QWEN_CASES


def make_env():
    # Same settings as llama-cpp-python's Jinja2ChatFormatter (and HF transformers).
    return ImmutableSandboxedEnvironment(
        loader=jinja2.BaseLoader(),
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols],
    )


def clear_memory(llm):
    llm.reset()
    try:
        mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
        llama_cpp.llama_memory_clear(mem, True)
    except AttributeError:  # older versions
        llama_cpp.llama_kv_cache_clear(llm._ctx.ctx)


def top5(row):
    idx = np.argpartition(-row, TOPK)[:TOPK]
    # sort by logit desc, ties by id asc
    idx = sorted(idx.tolist(), key=lambda i: (-float(row[i]), i))
    return [[int(i), round(float(row[i]), 4)] for i in idx]


def top2_gap(row):
    x = row.astype(np.float64)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    lp = x - lse
    a, b = np.sort(lp)[-2:][::-1]
    return round(float(a - b), 6)


def run_case(llm, prompt_ids):
    clear_memory(llm)
    llm.eval(prompt_ids)
    n = len(prompt_ids)
    rows = [llm.scores[i].copy() for i in range(n)]
    generated, gaps = [], []
    finish = "length"
    while len(generated) < MAX_NEW:
        last = rows[-1]
        tok = int(np.argmax(last))
        if tok in STOP_IDS:
            finish = "stop"
            break
        gaps.append(top2_gap(last))
        generated.append(tok)
        llm.eval([tok])
        rows.append(llm.scores[llm.n_tokens - 1].copy())
    assert len(rows) == n + len(generated)
    return generated, finish, [top5(r) for r in rows], gaps


def main():
    llm = Llama(
        model_path=str(MODEL_PATH),
        n_ctx=N_CTX,
        n_threads=N_THREADS,
        n_threads_batch=N_THREADS,
        n_batch=N_BATCH,
        logits_all=True,
        flash_attn=False,
        verbose=False,
        seed=0,
    )
    fa = llm.context_params.flash_attn_type
    if fa != llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED:
        sys.exit(f"flash attention is not disabled (flash_attn_type={fa})")
    assert llm.n_vocab() == N_VOCAB
    assert llm.token_eos() in STOP_IDS

    def tok(s):
        return llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)

    bos_tok = llm.detokenize([llm.token_bos()], special=True).decode("utf-8")
    eos_tok = llm.detokenize([llm.token_eos()], special=True).decode("utf-8")
    template = make_env().from_string(llm.metadata["tokenizer.chat_template"])

    tokenizer = [{"text": t, "ids": tok(t)} for t in TOKENIZER_TEXTS]

    cases = []
    for name, kind, text in CASES:
        if kind == "chat":
            prompt = template.render(
                messages=[{"role": "user", "content": text}],
                add_generation_prompt=True,
                bos_token=bos_tok,
                eos_token=eos_tok,
            )
        else:
            prompt = text
        ids = tok(prompt)
        assert 0 < len(ids) <= N_BATCH
        gen, finish, tops, gaps = run_case(llm, ids)
        print(f"{name:22s} {kind:4s} prompt={len(ids):4d} gen={len(gen):3d} "
              f"{finish:6s} min_gap={min(gaps) if gaps else float('nan'):.4f} "
              f"| {llm.detokenize(gen).decode('utf-8', 'replace')[:60]!r}",
              file=sys.stderr)
        cases.append({
            "name": name,
            "kind": kind,
            "input": text,
            "prompt": prompt,
            "prompt_token_ids": ids,
            "generated_token_ids": gen,
            "finish_reason": finish,
            "top5": tops,
            "top2_logprob_gap": gaps,
        })

    doc = {
        "model": MODEL_NAME,
        "generator": {
            "llama_cpp_python": llama_cpp.__version__,
            "flash_attn": False,
            "n_threads": N_THREADS,
            "n_ctx": N_CTX,
        },
        "tokenizer": tokenizer,
        "cases": cases,
    }

    # Compact but diffable: one JSON value per line for the large arrays.
    OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
    c = lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    lines = ["{"]
    lines.append(f'"model":{c(doc["model"])},')
    lines.append(f'"generator":{c(doc["generator"])},')
    lines.append('"tokenizer":[')
    lines.append(",\n".join(c(t) for t in tokenizer))
    lines.append("],")
    lines.append('"cases":[')
    case_strs = []
    for case in cases:
        parts = [f"{c(k)}:{c(v)}" for k, v in case.items()]
        case_strs.append("{" + ",\n".join(parts) + "}")
    lines.append(",\n".join(case_strs))
    lines.append("]}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == json.loads(json.dumps(doc))
    OUT_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {OUT_PATH.relative_to(ROOT)} ({len(text)} bytes, "
          f"{len(tokenizer)} tokenizer cases, {len(cases)} generation cases)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
