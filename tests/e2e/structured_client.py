"""Structured output and tool calling through the official `openai` Python client, against
a running `tandem up` that serves Qwen2.5 (its template takes tools) and SmolLM2 (its does
not). Every reply that must be JSON is parsed and validated with the `jsonschema` package.

Usage: structured_client.py HTTP_ADDR QWEN_MODEL SMOL_MODEL

Prints one line per check and "all ok" at the end; raises on the first failure.
"""

import json
import re
import sys

import jsonschema
import openai
from openai import OpenAI

addr, qwen, smol = sys.argv[1:4]
client = OpenAI(base_url=f"http://{addr}/v1", api_key="unused", max_retries=0, timeout=300)


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok {name}", flush=True)


def ask(content, **kw):
    kw.setdefault("max_tokens", 120)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=qwen, messages=[{"role": "user", "content": content}], **kw)


# 1. json_schema (strict) on ten schemas: objects, arrays, enums, nesting, bounded numbers.
SCHEMAS = [
    ("person", "Describe a fictional person.", {
        "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False}),
    ("colors", "List a few colors.", {
        "type": "object", "properties": {"colors": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 5}},
        "required": ["colors"], "additionalProperties": False}),
    ("weather", "What is the weather like in Paris?", {
        "type": "object", "properties": {"city": {"type": "string"}, "sky": {"type": "string", "enum": ["sunny", "cloudy", "rainy"]},
                                         "celsius": {"type": "number", "minimum": -40, "maximum": 50}},
        "required": ["city", "sky", "celsius"], "additionalProperties": False}),
    ("book", "Recommend a book.", {
        "type": "object", "properties": {"title": {"type": "string"}, "author": {"type": "object", "properties": {
            "first": {"type": "string"}, "last": {"type": "string"}}, "required": ["first", "last"], "additionalProperties": False},
            "year": {"type": "integer", "minimum": 1450, "maximum": 2030}},
        "required": ["title", "author", "year"], "additionalProperties": False}),
    ("primes", "Give me some prime numbers.", {
        "type": "object", "properties": {"primes": {"type": "array", "items": {"type": "integer", "minimum": 2, "maximum": 1000},
                                                    "minItems": 3, "maxItems": 6}},
        "required": ["primes"], "additionalProperties": False}),
    ("yesno", "Is water wet? Answer with a reason.", {
        "type": "object", "properties": {"answer": {"type": "boolean"}, "reason": {"type": "string", "maxLength": 80}},
        "required": ["answer", "reason"], "additionalProperties": False}),
    ("todo", "Make a short todo list for a picnic.", {
        "type": "object", "properties": {"items": {"type": "array", "maxItems": 4, "items": {
            "type": "object", "properties": {"task": {"type": "string", "maxLength": 40}, "done": {"type": "boolean"}},
            "required": ["task", "done"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False}),
    ("point", "Give a point in 3D space.", {
        "type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}, "z": {"type": "number"}},
        "required": ["x", "y", "z"], "additionalProperties": False}),
    ("rating", "Rate the movie Up from 1 to 5.", {
        "type": "object", "properties": {"stars": {"type": "integer", "enum": [1, 2, 3, 4, 5]}, "title": {"type": "string", "const": "Up"}},
        "required": ["stars", "title"], "additionalProperties": False}),
    ("tags", "Tag this sentence: the cat sat on the mat.", {
        "type": "array", "items": {"type": "string", "enum": ["animal", "furniture", "action", "place"]}, "minItems": 1, "maxItems": 4}),
]
for name, prompt, schema in SCHEMAS:
    r = ask(prompt, response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}})
    text = r.choices[0].message.content
    value = json.loads(text)
    jsonschema.validate(value, schema)
    check(f"json_schema {name}", r.choices[0].finish_reason == "stop", r.choices[0].finish_reason)

# Streaming gives the same JSON.
stream_text = "".join(
    c.choices[0].delta.content or ""
    for c in ask(SCHEMAS[0][1], stream=True,
                 response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS[0][2], "strict": True}})
    if c.choices
)
jsonschema.validate(json.loads(stream_text), SCHEMAS[0][2])
check("json_schema streamed", True)

# 2. json_object.
r = ask("Describe a cat as JSON.", response_format={"type": "json_object"})
check("json_object", isinstance(json.loads(r.choices[0].message.content), dict), r.choices[0].message.content)

# 3. The vLLM extras: a regex and a choice list (sampled, several choices).
r = ask("Give me a US phone number.", extra_body={"guided_regex": r"\(\d{3}\) \d{3}-\d{4}"})
check("guided_regex", re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", r.choices[0].message.content), r.choices[0].message.content)
r = ask("Pick a primary color.", n=3, temperature=1.0, seed=4, extra_body={"guided_choice": ["red", "yellow", "blue"]})
got = [c.message.content for c in r.choices]
check("guided_choice", len(got) == 3 and all(g in ("red", "yellow", "blue") for g in got), got)
r = ask("Answer yes or no: is the sky blue?", extra_body={"guided_grammar": 'start: ("yes" | "no") "."'})
check("guided_grammar", r.choices[0].message.content in ("yes.", "no."), r.choices[0].message.content)

# 4. Tools.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a timezone.",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
Q = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def valid_calls(calls):
    assert calls, "no tool calls"
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_"), c
        jsonschema.validate(json.loads(c.function.arguments), SCHEMA_OF[c.function.name])
    return True


for choice in ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}]:
    r = client.chat.completions.create(model=qwen, messages=Q, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=120)
    m = r.choices[0].message
    check(f"tools {json.dumps(choice)}", valid_calls(m.tool_calls) and r.choices[0].finish_reason == "tool_calls",
          (m, r.choices[0].finish_reason))
    if isinstance(choice, dict):
        check("named tool", all(c.function.name == "get_weather" for c in m.tool_calls), m.tool_calls)

# Streaming: delta.tool_calls assembled by index, the same calls as the whole answer.
def streamed_calls(choice):
    calls, finish = {}, None
    for chunk in client.chat.completions.create(model=qwen, messages=Q, tools=TOOLS, tool_choice=choice,
                                                temperature=0, max_tokens=120, stream=True):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        for tc in d.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
            c["name"] += tc.function.name or ""
            c["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())], finish


for choice in ["required", "auto"]:
    whole = client.chat.completions.create(model=qwen, messages=Q, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=120)
    want = [(c.function.name, json.loads(c.function.arguments)) for c in whole.choices[0].message.tool_calls]
    streamed, finish = streamed_calls(choice)
    check(f"tools {choice} streamed", streamed == want and finish == "tool_calls", (streamed, want, finish))
whole = client.chat.completions.create(model=qwen, messages=Q, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=120)

# A tool's result sent back gets a final answer in words.
call = whole.choices[0].message.tool_calls[0]
follow = Q + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"city": "Paris", "sky": "sunny", "celsius": 21})},
]
r = client.chat.completions.create(model=qwen, messages=follow, tools=TOOLS, temperature=0, max_tokens=60)
answer = r.choices[0].message
check("tool result answered", answer.content and not answer.tool_calls and r.choices[0].finish_reason in ("stop", "length"),
      answer)

# 5. Refusals: bad schemas and grammars name their field; SmolLM2 refuses tools.
def refused(param, **kw):
    try:
        client.chat.completions.create(model=kw.pop("model", qwen), messages=Q, max_tokens=8, **kw)
    except openai.BadRequestError as e:
        body = e.response.json()["error"]
        return e.status_code == 400 and param in (body.get("param") or ""), body
    return False, "accepted"


for param, kw in [
    ("response_format", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}}),
    ("guided_regex", {"extra_body": {"guided_regex": "(unclosed"}}),
    ("guided_grammar", {"extra_body": {"guided_grammar": "start: nothing_here"}}),
    ("guided_choice", {"extra_body": {"guided_choice": []}}),
    ("tool_choice", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
    ("tools", {"model": smol, "tools": TOOLS}),
]:
    ok, detail = refused(param, **kw)
    check(f"400 names {param}", ok, detail)

print("all ok")
