#!/usr/bin/env python3
"""Write the text crate's Qwen2 and Llama 3 fixtures from llama.cpp (llama-cpp-python) and jinja2.

Run with the reference venv made by scripts/setup-reference.sh, after
scripts/fetch-model.sh all and scripts/setup-vocab-fixtures.sh:

    .venv-ref/bin/python scripts/make-text-fixtures.py

It writes
  * tests/fixtures/llama_cpp/qwen2_text.json:
      - tokenizer cases for models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf: text -> llama.cpp's
        ids (Llama(vocab_only=True), tokenize(add_bos=False, special=True)), and the vocabulary's
        size, BOS, EOS and add_bos as llama.cpp reads them;
      - chat cases: a conversation (OpenAI's form: tool-call arguments as JSON strings or
        objects), the prompt the model's GGUF template renders for it with jinja2 set up like
        Hugging Face transformers (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks,
        loopcontrols, tojson = json.dumps(x, ensure_ascii=False), arguments strings parsed as
        vLLM does), and llama.cpp's ids for that prompt. Qwen2.5's template and SmolLM2's.
  * tests/fixtures/llama_cpp/llama_bpe_text.json: tokenizer cases for llama.cpp's own Llama 3
    vocabulary (.vocab/ggml-vocab-llama-bpe.gguf), which ships no chat template: chat cases with
    Meta Llama 3 Instruct's template (it writes `bos_token` itself), and a raw prompt tokenized
    with add_bos=True.

The tokenizer texts are make-fixtures.py's tricky strings, llama.cpp's own tokenizer test inputs
for the vocabulary (from the same sdist), and the cases below.
"""
import copy
import importlib.util
import json
import sys
import tarfile
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

import llama_cpp
from llama_cpp import Llama

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "llama_cpp"
QWEN = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
SMOLLM = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_BPE = "ggml-vocab-llama-bpe.gguf"
SDIST = ROOT / ".ref" / "sdist" / f"llama_cpp_python-{llama_cpp.__version__}.tar.gz"


def tricky_strings():
    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "scripts" / "make-fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return list(mod.TOKENIZER_TEXTS)


# Strings that tell the Qwen2 and Llama 3 splits from GPT-2's and from each other.
COMMON_TEXTS = [
    "12345678",
    "x = 1234567890 + 3.14159e-10; y=007",
    "I'M HERE. DON'T STOP! WE'LL, THEY'RE, YOU'VE, HE'D, IT'S",
    "I'm here. Don't stop! We'Ll, they'Re, 'tis, 'twas, o'clock",
    "'s 'S 't 'T 're 'RE 've 'VE 'm 'M 'll 'LL 'd 'D 'x",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{v:?}\");\n}\n",
    "def f(a, b):\n\treturn a ** b  # power\n\n\nclass C:\n    pass\n",
    "if (a && b || !c) { return -1; } else { x += 2; }",
    "   \n\n\n   \t\t  \r\n  end   ",
    "a\n\nb\n\n\nc\n \n d",
    "trailing newlines\n\n",
    "word\u00a0nbsp\u3000ideographic\u2003em space",
    "你好，世界！这是一个测试。",
    "こんにちは世界、カタカナとひらがな。",
    "한국어 텍스트입니다",
    "emoji 😀😃😄 flags 🇯🇵🇺🇸 skin 👋🏿 zwj 🧑‍💻 keycap 1️⃣",
    "math ∑∫√∞ ≤ ≥ ≠ ±, arrows → ← ↔, box ┌─┐",
    "__init__ __name__ == '__main__' snake_case camelCase PascalCase",
    "https://example.com/a/b?c=d&e=f#g user@example.org",
    "tabs\tand\tmore\t\ttabs",
    "...!!!???,,,;;;:::",
    "<html><body class=\"x\">Text &amp; more</body></html>",
    "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}",
]

QWEN_SPECIAL_TEXTS = [
    "call<tool_call>\n{\"name\": \"f\"}\n</tool_call>done",
    "<tool_call></tool_call><tool_call>",
    "a<|im_start|>user\nhi<|im_end|>\n<|endoftext|>b",
    "<|fim_prefix|>def f():\n    <|fim_suffix|>\n    return 1<|fim_middle|>",
    "<|repo_name|>tandem\n<|file_sep|>src/main.rs\nfn main() {}",
    "<|im_start|><|im_end|><|im_start|>",
    "<|im_start <|im_end| |im_end|> <tool_call",
]

LLAMA_BPE_SPECIAL_TEXTS = [
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "text<|eot_id|>more<|end_of_text|>",
    "<|reserved_special_token_0|> <|reserved_special_token_250|>",
    "<|start_header_id <|eot_id| |begin_of_text|>",
]

# --------------------------------------------------------------------------------------------
# Chat cases: (name, model, messages, tools, add_generation_prompt)
# --------------------------------------------------------------------------------------------
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city. Say \"unknown\" when unsure; temperatures in °C.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. Zürich"},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                    "units": {"type": "string", "enum": ["metric", "imperial"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web.\nReturns the top results.",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}, "limit": {"type": "number", "default": 2.5}}},
        },
    },
]

CALLS = [
    {"id": "call_1", "type": "function",
     "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 2}"}},
    {"id": "call_2", "type": "function",
     "function": {"name": "search", "arguments": "{\"q\": \"Paris events\", \"limit\": 3}"}},
]

NON_ASCII_CALLS = [
    {"id": "call_a", "type": "function",
     "function": {"name": "get_weather",
                  "arguments": {"city": "北京", "note": "naïve \"quoted\"\nline 🦀", "days": 1.5, "ok": True, "x": None}}},
    {"id": "call_b", "type": "function",
     "function": {"name": "search", "arguments": "{\"q\": \"Zürich Café — ☕\", \"limit\": 1e3}"}},
]

CHATS = [
    ("qwen-system-user", QWEN, [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2+2?"},
    ], None, True),
    ("qwen-user-only", QWEN, [
        {"role": "user", "content": "Write a haiku about Rust."},
    ], None, True),
    ("qwen-multi-turn", QWEN, [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another, bigger than 100?"},
    ], None, True),
    ("qwen-multi-turn-no-generation-prompt", QWEN, [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ], None, False),
    ("qwen-tools-user", QWEN, [
        {"role": "user", "content": "What's the weather in Paris?"},
    ], TOOLS, True),
    ("qwen-tools-system-user", QWEN, [
        {"role": "system", "content": "You may call tools."},
        {"role": "user", "content": "Search for Rust news."},
    ], TOOLS, True),
    ("qwen-tool-calls-and-results", QWEN, [
        {"role": "user", "content": "Weather and events in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": CALLS},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21, \"sky\": \"clear\"}"},
        {"role": "tool", "tool_call_id": "call_2", "content": "Jazz festival on Saturday."},
        {"role": "assistant", "content": "It is 21 °C and clear; there is a jazz festival on Saturday."},
        {"role": "user", "content": "Thanks!"},
    ], TOOLS, True),
    ("qwen-assistant-text-and-call", QWEN, [
        {"role": "user", "content": "Look it up."},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [CALLS[1]]},
        {"role": "tool", "tool_call_id": "call_2", "content": "nothing found"},
    ], TOOLS, True),
    ("qwen-non-ascii-arguments", QWEN, [
        {"role": "user", "content": "北京的天气怎么样？"},
        {"role": "assistant", "tool_calls": NON_ASCII_CALLS},
        {"role": "tool", "tool_call_id": "call_a", "content": "晴，25°C ☀️"},
        {"role": "tool", "tool_call_id": "call_b", "content": "[]"},
    ], TOOLS, True),
    ("qwen-call-without-function-wrapper", QWEN, [
        {"role": "user", "content": "Go."},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "search", "arguments": {"q": "x"}}]},
    ], TOOLS, True),
    ("smollm2-system-user", SMOLLM, [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2+2?"},
    ], None, True),
    ("smollm2-user-only", SMOLLM, [
        {"role": "user", "content": "Write a haiku about Rust."},
    ], None, True),
    ("smollm2-multi-turn", SMOLLM, [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another, bigger than 100?"},
    ], None, True),
]


# Meta Llama 3 Instruct's chat template (tokenizer_config.json of Meta-Llama-3-8B-Instruct).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

LLAMA3_CHATS = [
    ("llama3-system-user", LLAMA_BPE, [
        {"role": "system", "content": "  You are a terse assistant.\n"},
        {"role": "user", "content": "What is 2+2?"},
    ], None, True),
    ("llama3-multi-turn", LLAMA_BPE, [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another, bigger than 100? 日本語 🦀"},
    ], None, True),
]

RAW_WITH_BOS = "Hello world, 1234567!"


def hf_tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # What transformers gives chat templates in place of Jinja2's HTML-safe filter.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def make_env():
    env = ImmutableSandboxedEnvironment(
        loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = hf_tojson
    env.globals["raise_exception"] = raise_exception
    return env


def vllm_messages(messages):
    """Tool-call arguments as values, as vLLM hands them to templates."""
    out = copy.deepcopy(messages)
    for m in out:
        if m["role"] == "assistant" and isinstance(m.get("tool_calls"), list):
            for call in m["tool_calls"]:
                fn = call.get("function")
                if not isinstance(fn, dict):
                    continue
                args = fn.get("arguments")
                if not args:
                    fn["arguments"] = {}
                elif isinstance(args, str):
                    fn["arguments"] = json.loads(args)
    return out


def load(path):
    if not path.is_file():
        sys.exit(f"missing {path.relative_to(ROOT)}: run scripts/fetch-model.sh all and scripts/setup-vocab-fixtures.sh")
    return Llama(model_path=str(path), vocab_only=True, verbose=False)


def vocab_facts(llm):
    vocab = llm._model.vocab
    return {
        "size": llm.n_vocab(),
        "bos": llm.token_bos(),
        "eos": llm.token_eos(),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
    }


def tokenize(llm, text):
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def vocab_test_inputs(name):
    """llama.cpp's own tokenizer test inputs for a vocabulary (models/<name>.inp in its tree)."""
    with tarfile.open(SDIST) as tar:
        member = f"llama_cpp_python-{llama_cpp.__version__}/vendor/llama.cpp/models/{name}.inp"
        text = tar.extractfile(member).read().decode("utf-8")
    parts = text.split("\n__ggml_vocab_test__\n")
    assert parts[-1] == "", "the inputs end with a separator"
    return parts[:-1]


def unique(texts):
    seen, out = set(), []
    for t in texts:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def tokenizer_cases(llm, texts):
    return [{"text": t, "ids": tokenize(llm, t)} for t in unique(texts)]


def chat_cases(chats, models, template_source=None):
    env = make_env()
    cases = []
    for name, model, messages, tools, agp in chats:
        llm = models[model]
        template = env.from_string(template_source or llm.metadata["tokenizer.chat_template"])
        prompt = template.render(
            messages=vllm_messages(messages),
            tools=tools,
            add_generation_prompt=agp,
            bos_token=llm.detokenize([llm.token_bos()], special=True).decode("utf-8"),
            eos_token=llm.detokenize([llm.token_eos()], special=True).decode("utf-8"),
        )
        cases.append({
            "name": name,
            "model": model,
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": agp,
            "prompt": prompt,
            "prompt_token_ids": tokenize(llm, prompt),
        })
        print(f"{name:40s} {len(prompt):5d} chars {len(cases[-1]['prompt_token_ids']):4d} ids", file=sys.stderr)
    return cases


def write(path, doc, arrays):
    """One JSON value per line for the large arrays, so diffs stay readable."""
    c = lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    lines = ["{"]
    scalars = [k for k in doc if k not in arrays]
    lines += [f"{c(k)}:{c(doc[k])}," for k in scalars]
    for i, k in enumerate(arrays):
        lines.append(f"{c(k)}:[")
        lines.append(",\n".join(c(v) for v in doc[k]))
        lines.append("]" + ("," if i + 1 < len(arrays) else ""))
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == doc
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)} ({len(text)} bytes)", file=sys.stderr)


def main():
    generator = {"llama_cpp_python": llama_cpp.__version__, "jinja2": jinja2.__version__}
    base = tricky_strings() + COMMON_TEXTS

    models = {QWEN: load(ROOT / "models" / QWEN), SMOLLM: load(ROOT / "models" / SMOLLM)}
    qwen_texts = base + QWEN_SPECIAL_TEXTS + vocab_test_inputs("ggml-vocab-qwen2.gguf")
    write(FIXTURES / "qwen2_text.json", {
        "model": QWEN,
        "generator": generator,
        "vocab": vocab_facts(models[QWEN]),
        "tokenizer": tokenizer_cases(models[QWEN], qwen_texts),
        "chat": chat_cases(CHATS, models),
    }, ["tokenizer", "chat"])

    llama = load(ROOT / ".vocab" / LLAMA_BPE)
    llama_texts = base + LLAMA_BPE_SPECIAL_TEXTS + vocab_test_inputs(LLAMA_BPE)
    write(FIXTURES / "llama_bpe_text.json", {
        "vocab_file": LLAMA_BPE,
        "generator": generator,
        "vocab": vocab_facts(llama),
        "raw_with_bos": {"text": RAW_WITH_BOS, "ids": llama.tokenize(RAW_WITH_BOS.encode("utf-8"), add_bos=True, special=True)},
        "chat_template": LLAMA3_TEMPLATE,
        "tokenizer": tokenizer_cases(llama, llama_texts),
        "chat": chat_cases(LLAMA3_CHATS, {LLAMA_BPE: llama}, LLAMA3_TEMPLATE),
    }, ["tokenizer", "chat"])


if __name__ == "__main__":
    main()
