"""The official `openai` Python client against a running `tandem up`.

Usage: openai_client.py HTTP_ADDR API_KEY MODEL EXPECTED_GREEDY_TEXT

Each check raises on failure; the script prints one line per check and exits 0
only if all pass. Run by tests/e2e/openai.rs, which passes the greedy text the
gRPC API produced for the same chat request.
"""

import sys

import openai
from openai import OpenAI

addr, key, model, expected = sys.argv[1:5]
base = f"http://{addr}/v1"
client = OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)
PROMPT = [{"role": "user", "content": "Name three primary colors."}]


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok {name}")


models = client.models.list()
check("models.list", [m.id for m in models.data] == [model], models)

r = client.chat.completions.create(model=model, messages=PROMPT, temperature=0, max_tokens=40)
check("chat greedy equals gRPC", r.choices[0].message.content == expected, repr(r.choices[0].message.content))
check("chat object", r.object == "chat.completion" and r.choices[0].message.role == "assistant", r)
check("chat usage", r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage)

text, usage, finish, roles = "", None, None, 0
for chunk in client.chat.completions.create(
    model=model, messages=PROMPT, temperature=0, max_tokens=40, stream=True, stream_options={"include_usage": True}
):
    if chunk.usage is not None:
        usage = chunk.usage
        check("usage chunk has no choices", chunk.choices == [], chunk)
        continue
    for c in chunk.choices:
        text += c.delta.content or ""
        roles += c.delta.role == "assistant"
        finish = c.finish_reason or finish
check("chat stream equals gRPC", text == expected, repr(text))
check("stream usage", usage is not None and usage.completion_tokens > 0, usage)
check("stream role once, finish reason", roles == 1 and finish in ("stop", "length"), (roles, finish))

r = client.chat.completions.create(model=model, messages=PROMPT, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
lps = r.choices[0].logprobs.content
check("chat logprobs", len(lps) == r.usage.completion_tokens and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in lps), lps)
check("chat logprobs tokens spell the text", "".join(t.token for t in lps) == r.choices[0].message.content, lps)

r = client.chat.completions.create(model=model, messages=PROMPT, temperature=0, max_tokens=40, stop=["\n"])
check("stop string", "\n" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop" and expected.startswith(r.choices[0].message.content), repr(r.choices[0].message.content))

r = client.chat.completions.create(model=model, messages=PROMPT, temperature=0.8, seed=3, max_tokens=12, n=2)
check("n=2", sorted(c.index for c in r.choices) == [0, 1], r.choices)
r2 = client.chat.completions.create(model=model, messages=PROMPT, temperature=0.8, seed=3, max_tokens=12, n=2)
check("seeded n=2 repeats", [c.message.content for c in r.choices] == [c.message.content for c in r2.choices], (r, r2))

prompt = "The capital of France is"
r = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0, logprobs=2, echo=True)
c = r.choices[0]
lp = c.logprobs
check("completions echo text", c.text.startswith(prompt) and len(c.text) > len(prompt), repr(c.text))
check("completions echo logprobs", lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens, lp)
check("completions logprobs spell the text", "".join(lp.tokens) == c.text, lp.tokens)
check("completions offsets", lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0, lp.text_offset)
check("completions top logprobs", all(len(t) == 2 for t in lp.top_logprobs[1:]), lp.top_logprobs)

r = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
check("prompt scoring only", r.choices[0].text == prompt and r.usage.completion_tokens == 0, r)

r = client.completions.create(model=model, prompt=[504, 3003, 4683], max_tokens=4, temperature=0)
check("token-id prompt", r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 4, r)

text = "".join(ch.choices[0].text for ch in client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, stream=True) if ch.choices)
r = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
check("completions stream equals whole", text == r.choices[0].text, (text, r.choices[0].text))

try:
    client.chat.completions.create(model=model, messages=PROMPT, temperature=-1)
    check("invalid temperature refused", False)
except openai.BadRequestError as e:
    check("invalid request: 400 naming the field", e.status_code == 400 and e.body["param"] == "temperature", e.body)

try:
    client.chat.completions.create(model="no-such-model", messages=PROMPT)
    check("unknown model refused", False)
except openai.NotFoundError as e:
    check("unknown model: 404", e.status_code == 404 and e.body["code"] == "model_not_found", e.body)

try:
    OpenAI(base_url=base, api_key="wrong-key", max_retries=0).chat.completions.create(model=model, messages=PROMPT)
    check("wrong key refused", False)
except openai.AuthenticationError as e:
    check("wrong key: 401", e.status_code == 401, e)

# A client that leaves mid-stream: the caller checks that the workers freed the blocks.
stream = client.chat.completions.create(
    model=model, messages=PROMPT, temperature=0, max_tokens=400, stream=True, extra_body={"ignore_eos": True}
)
got = 0
for chunk in stream:
    got += 1
    if got == 3:
        break
stream.close()
check("stream closed early", got == 3)
print("all ok")
