//! The OpenAI API's request and response shapes, and their translation to and
//! from `tandem.v1`. An HTTP request becomes a `GenerateRequest` and runs through
//! the same path as a gRPC one; its chunks become OpenAI chunks here.

use serde::Deserialize;
use serde_json::{json, Value};
use tandem_proto::tandem::v1 as api;
use tonic::Status;

use crate::tools::ToolPlan;
use crate::validate::{ModelFacts, MAX_CACHE_SALT, MAX_N, MAX_STOP, MAX_STOP_LEN, MAX_STOP_TOKEN_IDS};

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// Chat content: a string, or a list of parts of which the text ones count.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant turn's calls (OpenAI's `tool_calls` array).
    #[serde(default)]
    pub tool_calls: Option<Value>,
    /// A `tool` turn: the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields both endpoints take, OpenAI's and the vLLM extras.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    #[serde(default)]
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<i64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    // vLLM extras.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub cache_salt: Option<String>,
    #[serde(default)]
    pub ignore_eos: bool,
    pub stop_token_ids: Option<Vec<u32>>,
    /// vLLM's `priority`: `tandem.v1` `priority` (lower first, default 0); it orders a
    /// worker's queue only when the workers run `--scheduling-policy priority`.
    pub priority: Option<i32>,
    /// Tandem: `fail`, `recompute` or `retry` when the request's KV transfer fails.
    pub kv_failure_policy: Option<String>,
    /// Structured output: `{"type": "text"}`, `{"type": "json_object"}` or
    /// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
    pub response_format: Option<Value>,
    /// vLLM's guided decoding: a JSON Schema (object or JSON text), a regex, a list of
    /// choices, a Lark grammar; and their successor, `structured_outputs`
    /// (`{"json" | "regex" | "choice" | "grammar": ...}`).
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
    pub structured_outputs: Option<Value>,
    /// Fields Tandem does not implement and that change what an answer means: a request
    /// using them is refused (400 naming the field) rather than answered as if they were
    /// absent. Their no-op values (`null`, empty, `"none"`, `{"type": "text"}`) pass.
    #[serde(flatten)]
    pub unsupported: Unsupported,
}

/// OpenAI fields whose meaning Tandem does not implement (see [`Common::unsupported`]).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Unsupported {
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub logit_bias: Option<Value>,
}

impl Unsupported {
    /// The first field set to something Tandem would have to ignore.
    fn check(&self) -> Result<(), ApiError> {
        let empty = |v: &Value| match v {
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        };
        let no_call = |v: &Value| matches!(v.as_str(), Some("none" | "auto"));
        let fields: [(&str, &Option<Value>, &dyn Fn(&Value) -> bool, &str); 3] = [
            ("functions", &self.functions, &empty, "the legacy function calling is not supported; use tools"),
            (
                "function_call",
                &self.function_call,
                &no_call,
                "the legacy function calling is not supported; use tool_choice",
            ),
            ("logit_bias", &self.logit_bias, &empty, "is not supported"),
        ];
        for (field, value, harmless, why) in fields {
            if value.as_ref().is_some_and(|v| !harmless(v)) {
                return Err(ApiError::bad(field, why));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    /// Tools the model may call (`crate::tools`).
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    #[serde(flatten)]
    pub common: Common,
}

/// `prompt`: a string, one string in a list, token ids, or one list of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptSpec {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptSpec,
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
    #[serde(flatten)]
    pub common: Common,
}

/// An OpenAI-style error: status code, type, message, the field at fault, a code.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds a 429's `Retry-After` says (1 when `None`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            message: format!("{param}: {}", message.into()),
            param: Some(param.to_string()),
            code: None,
            retry_after: None,
        }
    }

    /// The request's deadline passed (its `x-request-timeout`, or the router's limit).
    pub fn deadline() -> ApiError {
        ApiError {
            status: 504,
            kind: "server_error",
            message: "the request's deadline passed".into(),
            param: None,
            code: Some("timeout"),
            retry_after: None,
        }
    }

    pub fn unauthorized() -> ApiError {
        ApiError {
            status: 401,
            kind: "authentication_error",
            message: "a valid API key is required (Authorization: Bearer <key>)".into(),
            param: None,
            code: Some("invalid_api_key"),
            retry_after: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }

    /// The error a gRPC status means to an OpenAI client.
    pub fn from_status(s: &Status) -> ApiError {
        let msg = s.message().to_string();
        let param = msg.split_once(':').map(|(f, _)| f.trim().to_string()).filter(|f| !f.contains(' '));
        let (status, kind, code) = match s.code() {
            // A model this router does not serve (`models::not_found`).
            tonic::Code::NotFound if msg.starts_with("model:") => {
                (404, "invalid_request_error", Some("model_not_found"))
            }
            tonic::Code::NotFound => (404, "invalid_request_error", Some("not_found")),
            tonic::Code::InvalidArgument => (400, "invalid_request_error", None),
            tonic::Code::Unauthenticated => (401, "authentication_error", Some("invalid_api_key")),
            tonic::Code::ResourceExhausted => (429, "rate_limit_error", Some("rate_limit_exceeded")),
            tonic::Code::Unavailable => (503, "server_error", Some("service_unavailable")),
            tonic::Code::DeadlineExceeded => (504, "server_error", Some("timeout")),
            // Ended by a `Cancel` on its worker, not by a fault: 499 as gRPC gateways map
            // CANCELLED, never 500.
            tonic::Code::Cancelled => (499, "server_error", Some("request_cancelled")),
            _ => (500, "server_error", Some("internal_error")),
        };
        // OpenAI's field names: `sampling.temperature` is `temperature`, `prompt_tokens` is `prompt`.
        let param = if status == 400 || status == 404 { param } else { None }.map(|p| {
            let p = p.strip_prefix("sampling.").unwrap_or(&p).to_string();
            if p == "prompt_tokens" {
                "prompt".to_string()
            } else {
                p
            }
        });
        // A refusal's own `retry-after` (seconds), for the HTTP header.
        let retry_after = s.metadata().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok());
        ApiError { status, kind, message: msg, param, code, retry_after }
    }
}

fn count(field: &str, v: Option<i64>, max: i64) -> Result<Option<u32>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if (0..=max).contains(&x) => Ok(Some(x as u32)),
        Some(x) => Err(ApiError::bad(field, format!("{x} is out of range 0..={max}"))),
    }
}

fn sampling(c: &Common, max_tokens: Option<i64>) -> Result<api::SamplingParams, ApiError> {
    c.unsupported.check()?;
    let max_tokens = match max_tokens {
        // 0 is refused by the core's check, which names the field.
        Some(m) if m < 0 => return Err(ApiError::bad("max_tokens", format!("{m} must be at least 1"))),
        Some(m) if m > u32::MAX as i64 => return Err(ApiError::bad("max_tokens", format!("{m} exceeds any context"))),
        Some(m) => Some(m as u32),
        None => None,
    };
    let n = match c.n {
        Some(n) if !(1..=MAX_N as i64).contains(&n) => {
            return Err(ApiError::bad("n", format!("{n}; must be in 1..={MAX_N}")))
        }
        n => n.map(|n| n as u32),
    };
    if let Some(seed) = c.seed.filter(|&s| s < 0) {
        return Err(ApiError::bad("seed", format!("{seed} must not be negative")));
    }
    let stop = c.stop.clone().map(Stop::into_vec).unwrap_or_default();
    if stop.len() > MAX_STOP {
        return Err(ApiError::bad("stop", format!("{} strings; at most {MAX_STOP}", stop.len())));
    }
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_LEN) {
        return Err(ApiError::bad("stop", format!("a stop string of {} bytes; at most {MAX_STOP_LEN}", long.len())));
    }
    let stop_token_ids = c.stop_token_ids.clone().unwrap_or_default();
    if stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(ApiError::bad(
            "stop_token_ids",
            format!("{} ids; at most {MAX_STOP_TOKEN_IDS}", stop_token_ids.len()),
        ));
    }
    if let Some(salt) = c.cache_salt.as_ref().filter(|s| s.len() > MAX_CACHE_SALT) {
        return Err(ApiError::bad("cache_salt", format!("{} bytes; at most {MAX_CACHE_SALT}", salt.len())));
    }
    Ok(api::SamplingParams {
        max_tokens,
        temperature: c.temperature,
        top_p: c.top_p,
        // vLLM: -1 (or 0) turns top-k off.
        top_k: c.top_k.map(|k| k.clamp(0, u32::MAX as i64) as u32),
        min_p: c.min_p,
        seed: c.seed.map(|s| s as u64),
        stop,
        stop_token_ids,
        n,
        logprobs: None,
        presence_penalty: c.presence_penalty,
        frequency_penalty: c.frequency_penalty,
        repetition_penalty: c.repetition_penalty,
        ignore_eos: c.ignore_eos,
        prompt_logprobs: None,
        guide: crate::structured::guide(c)?,
    })
}

fn base(
    c: &Common,
    input: api::generate_request::Input,
    s: api::SamplingParams,
) -> Result<api::GenerateRequest, ApiError> {
    let kv_failure_policy = match c.kv_failure_policy.as_deref() {
        None => api::KvFailurePolicy::Unspecified,
        Some("fail") => api::KvFailurePolicy::Fail,
        Some("recompute") => api::KvFailurePolicy::Recompute,
        Some("retry") => api::KvFailurePolicy::Retry,
        Some(other) => {
            return Err(ApiError::bad("kv_failure_policy", format!("{other:?} is not one of fail, recompute, retry")))
        }
    };
    Ok(api::GenerateRequest {
        model: c.model.clone().unwrap_or_default(),
        input: Some(input),
        sampling: Some(s),
        request_id: None,
        cache_salt: c.cache_salt.clone(),
        priority: c.priority.unwrap_or(0),
        kv_failure_policy: kv_failure_policy as i32,
        // The `x-slo-ttft-ms` header's, set by the HTTP front door.
        slo_ttft_ms: None,
        expected_output_tokens: None,
    })
}

/// A chat request as `tandem.v1`.
pub fn chat_request(r: &ChatRequest) -> Result<api::GenerateRequest, ApiError> {
    chat_request_with_tools(r).map(|(req, _)| req)
}

/// A chat request as `tandem.v1`, and what its tool fields ask of the answer.
pub fn chat_request_with_tools(r: &ChatRequest) -> Result<(api::GenerateRequest, ToolPlan), ApiError> {
    let plan = crate::tools::plan(r.tools.as_ref(), r.tool_choice.as_ref(), r.parallel_tool_calls)?;
    let mut messages = Vec::new();
    for (i, m) in r.messages.iter().enumerate() {
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::bad(
                            &format!("messages[{i}].content"),
                            format!("content parts of type {:?} are not supported", p.kind),
                        ));
                    }
                    text.push_str(p.text.as_deref().unwrap_or(""));
                }
                text
            }
        };
        // OpenAI's newer name for the system role.
        let role = if m.role == "developer" { "system".to_string() } else { m.role.clone() };
        let tool_calls_json = match &m.tool_calls {
            None | Some(Value::Null) => String::new(),
            Some(Value::Array(calls)) if calls.is_empty() => String::new(),
            Some(v @ Value::Array(_)) => v.to_string(),
            Some(_) => return Err(ApiError::bad(&format!("messages[{i}].tool_calls"), "must be a list")),
        };
        messages.push(api::ChatMessage {
            role,
            content,
            tool_calls_json,
            tool_call_id: m.tool_call_id.clone(),
            name: m.name.clone(),
        });
    }
    let mut s = sampling(&r.common, r.max_completion_tokens.or(r.common.max_tokens))?;
    if let Some(g) = plan.guide.clone() {
        if s.guide.is_some() {
            return Err(ApiError::bad("tool_choice", "a required tool call cannot be combined with response_format"));
        }
        s.guide = Some(g);
    }
    let top = count("top_logprobs", r.top_logprobs, 20)?;
    if r.logprobs.unwrap_or(false) {
        s.logprobs = Some(top.unwrap_or(0));
    } else if top.is_some_and(|t| t > 0) {
        return Err(ApiError::bad("top_logprobs", "needs logprobs: true"));
    }
    let input = api::generate_request::Input::Messages(api::Messages { messages, tools: plan.tools.clone() });
    Ok((base(&r.common, input, s)?, plan))
}

/// What a completions request needs besides its `tandem.v1` form.
pub struct CompletionPlan {
    pub request: api::GenerateRequest,
    /// Prepend the prompt (and its scores, with logprobs) to each choice.
    pub echo: bool,
    /// `max_tokens` 0 with `echo`: score the prompt only, drop what is generated.
    pub score_only: bool,
}

/// A completions request as `tandem.v1`.
pub fn completion_request(r: &CompletionRequest) -> Result<CompletionPlan, ApiError> {
    if r.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad("suffix", "is not supported"));
    }
    if r.best_of.is_some_and(|b| b != r.common.n.unwrap_or(1)) {
        return Err(ApiError::bad("best_of", "must equal n (ranking candidates is not supported)"));
    }
    let input = match &r.prompt {
        PromptSpec::Text(t) => api::generate_request::Input::Prompt(t.clone()),
        PromptSpec::Texts(v) if v.len() == 1 => api::generate_request::Input::Prompt(v[0].clone()),
        PromptSpec::Ids(ids) => {
            api::generate_request::Input::PromptTokens(api::PromptTokens { token_ids: ids.clone() })
        }
        PromptSpec::IdLists(v) if v.len() == 1 => {
            api::generate_request::Input::PromptTokens(api::PromptTokens { token_ids: v[0].clone() })
        }
        _ => return Err(ApiError::bad("prompt", "one prompt per request (batches are not supported)")),
    };
    // OpenAI's completions default.
    let max_tokens = r.common.max_tokens.or(Some(16));
    let score_only = r.echo && max_tokens == Some(0);
    let mut s = sampling(&r.common, if score_only { Some(1) } else { max_tokens })?;
    let lp = count("logprobs", r.logprobs, 20)?;
    s.logprobs = lp;
    if r.echo && lp.is_some() {
        s.prompt_logprobs = lp;
    }
    Ok(CompletionPlan { request: base(&r.common, input, s)?, echo: r.echo, score_only })
}

pub fn usage_json(u: &api::Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

fn lp_value(lp: f32) -> Value {
    // JSON has no -inf: clamp as vLLM does.
    json!(if lp.is_finite() { lp } else { -9999.0 })
}

/// Chat logprobs entries (`logprobs.content[]`) for tokens of one chunk.
pub fn chat_logprobs(lps: &[api::TokenLogprobs]) -> Vec<Value> {
    lps.iter()
        .map(|t| {
            let tok = t.token.clone().unwrap_or_default();
            json!({
                "token": tok.text,
                "logprob": lp_value(tok.logprob),
                "bytes": tok.bytes,
                "top_logprobs": t.top_logprobs.iter().map(|a| json!({
                    "token": a.text, "logprob": lp_value(a.logprob), "bytes": a.bytes,
                })).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// Legacy completions logprobs, built up chunk by chunk.
#[derive(Debug, Default, Clone)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Value>,
    pub top_logprobs: Vec<Value>,
    pub text_offset: Vec<usize>,
    /// Characters of text before the next token.
    pub offset: usize,
}

impl CompletionLogprobs {
    /// A token with no score (the prompt's first, when echoing).
    pub fn push_unscored(&mut self, text: &str) {
        self.tokens.push(text.to_string());
        self.token_logprobs.push(Value::Null);
        self.top_logprobs.push(Value::Null);
        self.text_offset.push(self.offset);
        self.offset += text.chars().count();
    }

    pub fn push(&mut self, t: &api::TokenLogprobs) {
        let tok = t.token.clone().unwrap_or_default();
        self.tokens.push(tok.text.clone());
        self.token_logprobs.push(lp_value(tok.logprob));
        let top: serde_json::Map<String, Value> =
            t.top_logprobs.iter().map(|a| (a.text.clone(), lp_value(a.logprob))).collect();
        self.top_logprobs.push(Value::Object(top));
        self.text_offset.push(self.offset);
        self.offset += tok.text.chars().count();
    }

    pub fn json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }

    /// The entries added since `from` (a streamed chunk's share).
    pub fn since(&self, from: usize) -> Value {
        json!({
            "tokens": self.tokens[from..],
            "token_logprobs": self.token_logprobs[from..],
            "top_logprobs": self.top_logprobs[from..],
            "text_offset": self.text_offset[from..],
        })
    }
}

/// The text and ids of a completions prompt, for `echo`.
pub fn prompt_echo(req: &api::GenerateRequest, facts: &ModelFacts) -> Result<(String, Vec<u32>), Status> {
    let (ids, _) = crate::validate::input_ids(req.input.as_ref(), facts, true)?;
    let text = match &req.input {
        Some(api::generate_request::Input::Prompt(p)) => p.clone(),
        _ => facts.tokenizer.decode(&ids, false).map_err(|e| Status::internal(e.to_string()))?,
    };
    Ok((text, ids))
}

/// A token's text as the tokenizer holds it (lossy for partial characters).
pub fn token_text(facts: &ModelFacts, id: u32) -> String {
    String::from_utf8_lossy(facts.tokenizer.token_bytes(id).unwrap_or_default()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(v: Value) -> Result<api::GenerateRequest, ApiError> {
        chat_request(&serde_json::from_value(v).unwrap())
    }

    #[test]
    fn chat_fields_map_to_tandem() {
        let r = chat(json!({
            "model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                       {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_completion_tokens": 7, "max_tokens": 9, "temperature": 0.5, "top_p": 0.9, "n": 2,
            "stop": "END", "seed": 5, "logprobs": true, "top_logprobs": 3, "top_k": -1, "min_p": 0.1,
            "repetition_penalty": 1.1, "cache_salt": "t", "user": "u", "stream": true,
            "stream_options": {"include_usage": true}, "unknown_field": 1
        }))
        .unwrap();
        let s = r.sampling.unwrap();
        assert_eq!(s.max_tokens, Some(7), "max_completion_tokens wins");
        assert_eq!((s.n, s.seed, s.logprobs, s.top_k), (Some(2), Some(5), Some(3), Some(0)));
        assert_eq!(s.stop, vec!["END".to_string()]);
        assert_eq!(r.cache_salt.as_deref(), Some("t"));
        let Some(api::generate_request::Input::Messages(m)) = r.input else { panic!() };
        assert_eq!(m.messages[0].role, "system");
        assert_eq!(m.messages[1].content, "hi");
    }

    #[test]
    fn structured_output_fields_become_one_guide() {
        use api::guide::Kind;
        let msgs = json!([{"role": "user", "content": "hi"}]);
        let guide_of = |extra: Value| {
            let mut v = json!({"messages": msgs});
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            chat(v).unwrap().sampling.unwrap().guide.and_then(|g| g.kind)
        };
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let cases = [
            (json!({"response_format": {"type": "text"}}), None),
            (json!({"response_format": {"type": "json_object"}}), Some(Kind::JsonObject(true))),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": true}}}),
                Some(Kind::JsonSchema(schema.to_string())),
            ),
            (json!({"guided_json": schema}), Some(Kind::JsonSchema(schema.to_string()))),
            (json!({"guided_json": schema.to_string()}), Some(Kind::JsonSchema(schema.to_string()))),
            (json!({"guided_regex": "[0-9]+"}), Some(Kind::Regex("[0-9]+".into()))),
            (
                json!({"guided_choice": ["yes", "no"]}),
                Some(Kind::Choice(api::Choices { choices: vec!["yes".into(), "no".into()] })),
            ),
            (json!({"guided_grammar": "start: \"a\""}), Some(Kind::Grammar("start: \"a\"".into()))),
            (json!({"structured_outputs": {"regex": "b+"}}), Some(Kind::Regex("b+".into()))),
        ];
        for (extra, want) in cases {
            assert_eq!(guide_of(extra.clone()), want, "{extra}");
        }
    }

    #[test]
    fn bad_fields_name_themselves() {
        let e = chat(json!({"messages": [], "top_logprobs": 3})).unwrap_err();
        assert_eq!((e.status, e.param.as_deref()), (400, Some("top_logprobs")));
        let e = chat(json!({"messages": [], "n": 0})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"));
        let e = chat(json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));
        let c: CompletionRequest = serde_json::from_value(json!({"prompt": ["a", "b"]})).unwrap();
        assert_eq!(completion_request(&c).err().unwrap().param.as_deref(), Some("prompt"));
    }

    #[test]
    fn unimplemented_fields_and_oversized_lists_are_refused_by_name() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        let refused = |extra: Value| {
            let mut v = json!({"messages": msgs});
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            chat(v).err().map(|e| (e.status, e.param.unwrap_or_default()))
        };
        let tool = json!([{"type": "function", "function": {"name": "f"}}]);
        let cases = [
            (json!({"tools": [{"type": "code_interpreter"}]}), "tools[0]"),
            (json!({"functions": [{"name": "f"}]}), "functions"),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (json!({"tools": tool, "tool_choice": {"type": "function", "function": {"name": "g"}}}), "tool_choice"),
            (json!({"function_call": {"name": "f"}}), "function_call"),
            (json!({"response_format": {"type": "xml"}}), "response_format"),
            (json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}), "response_format"),
            (json!({"guided_regex": "a", "guided_choice": ["b"]}), "guided_choice"),
            (json!({"structured_outputs": {"yaml": "a"}}), "structured_outputs"),
            (json!({"logit_bias": {"50256": -100}}), "logit_bias"),
            (json!({"seed": -1}), "seed"),
            (json!({"n": 1_000_000_000_000i64}), "n"),
            (json!({"n": 17}), "n"),
            (json!({"max_tokens": 1_000_000_000_000i64}), "max_tokens"),
            (json!({"stop": vec!["x"; 17]}), "stop"),
            (json!({"stop": "y".repeat(MAX_STOP_LEN + 1)}), "stop"),
            (json!({"stop_token_ids": vec![1; MAX_STOP_TOKEN_IDS + 1]}), "stop_token_ids"),
            (json!({"cache_salt": "s".repeat(MAX_CACHE_SALT + 1)}), "cache_salt"),
            (json!({"logprobs": true, "top_logprobs": 1000}), "top_logprobs"),
        ];
        for (extra, field) in cases {
            assert_eq!(refused(extra.clone()), Some((400, field.to_string())), "{extra}");
        }
        // Their no-op values, and unknown harmless fields, pass.
        let harmless = json!({
            "tools": [], "functions": null, "tool_choice": "none", "function_call": "auto",
            "response_format": {"type": "text"}, "logit_bias": {}, "parallel_tool_calls": false,
            "seed": 0, "n": 16, "stop": vec!["x"; 16], "metadata": {"a": 1},
        });
        assert_eq!(refused(harmless), None);
        let c: CompletionRequest = serde_json::from_value(json!({"prompt": "x", "logprobs": 21})).unwrap();
        assert_eq!(completion_request(&c).err().unwrap().param.as_deref(), Some("logprobs"));
        let c: CompletionRequest = serde_json::from_value(json!({"prompt": "x", "logit_bias": {"1": 5}})).unwrap();
        assert_eq!(completion_request(&c).err().unwrap().param.as_deref(), Some("logit_bias"));
    }

    #[test]
    fn completions_echo_scores_the_prompt() {
        let c: CompletionRequest =
            serde_json::from_value(json!({"prompt": [1, 2, 3], "echo": true, "logprobs": 2, "max_tokens": 0})).unwrap();
        let p = completion_request(&c).unwrap();
        assert!(p.echo && p.score_only);
        let s = p.request.sampling.unwrap();
        assert_eq!((s.prompt_logprobs, s.logprobs, s.max_tokens), (Some(2), Some(2), Some(1)));
        let c: CompletionRequest = serde_json::from_value(json!({"prompt": "x"})).unwrap();
        assert_eq!(completion_request(&c).unwrap().request.sampling.unwrap().max_tokens, Some(16));
    }

    #[test]
    fn statuses_map_to_http() {
        let cases = [
            (Status::invalid_argument("sampling.top_p: 2 is out of range"), 400, Some("top_p")),
            (Status::invalid_argument("prompt_tokens: 99999 is outside the vocabulary"), 400, Some("prompt")),
            (Status::not_found("model: unknown model \"x\"; this router serves [\"a\"]"), 404, Some("model")),
            (Status::resource_exhausted("full"), 429, None),
            (Status::unavailable("no decode worker"), 503, None),
            (Status::unauthenticated("key"), 401, None),
            (Status::cancelled("decode worker d: cancelled: by the operator"), 499, None),
            (Status::internal("bug"), 500, None),
        ];
        for (s, code, param) in cases {
            let e = ApiError::from_status(&s);
            assert_eq!((e.status, e.param.as_deref()), (code, param), "{s:?}");
            assert_eq!(e.body()["error"]["message"], s.message());
        }
    }
}
