//! Checks a `tandem.v1` request and resolves every default, so that what reaches
//! the workers is complete and valid. Each error names the field at fault.

use crate::recovery::KvFailurePolicy;
use tandem_proto::tandem::v1 as api;
use tandem_proto::tandem::worker::v1 as pb;
use tandem_text::chat::{ChatMessage, ChatTemplate, Conversation};
use tandem_text::guide::{Guide, GuideCompiler};
use tandem_text::prompt::{chat_ids, conversation_ids, prompt_ids, Prompt};
use tandem_text::tokenizer::Tokenizer;
use tonic::Status;

/// Most choices per request.
pub const MAX_N: u32 = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_LEN: usize = 1024;
/// Most `stop_token_ids`.
pub const MAX_STOP_TOKEN_IDS: usize = 256;
/// Longest `cache_salt`, in bytes.
pub const MAX_CACHE_SALT: usize = 256;
/// Most stop strings per request.
pub const MAX_STOP: usize = 16;
/// Most alternatives per position in logprobs.
pub const MAX_LOGPROBS: u32 = 20;
/// Longest client request id, in bytes.
pub const MAX_REQUEST_ID: usize = 128;

/// What the router needs of one served model to check requests (`models::ServedModels`
/// holds one per model).
pub struct ModelFacts {
    /// The name clients use.
    pub name: String,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub max_model_len: usize,
    pub vocab_size: usize,
    /// Compiles guides for the vocabulary (constrained decoding), built at the first one.
    pub guides: GuideCompilerCell,
}

/// A model's guide compiler, built once at first use and shared (the vocabulary's trie
/// takes a moment to build).
#[derive(Default, Clone)]
pub struct GuideCompilerCell(std::sync::Arc<std::sync::OnceLock<Result<GuideCompiler, String>>>);

impl GuideCompilerCell {
    fn get(&self, tok: &Tokenizer) -> Result<&GuideCompiler, String> {
        self.0.get_or_init(|| GuideCompiler::new(tok)).as_ref().map_err(Clone::clone)
    }
}

/// A request that passed every check, with defaults resolved.
#[derive(Debug, Clone)]
pub struct Validated {
    /// The served model it goes to (its name, resolved: never empty); only that model's
    /// workers are routed to, and every chunk carries it.
    pub model: String,
    pub prompt: Vec<u32>,
    /// One choice's sampling; choice `i` adds `i` to a given seed.
    pub sampling: pb::SamplingParams,
    pub n: u32,
    pub request_id: String,
    pub cache_salt: Option<String>,
    pub priority: i32,
    /// The request's own KV failure policy; `None`: the router's default.
    pub kv_failure_policy: Option<KvFailurePolicy>,
    /// Its own TTFT objective (`slo_ttft_ms`); `None`: none given.
    pub slo_ttft: Option<std::time::Duration>,
    /// The caller's tenant (from its API key); `None`: the default tenant. Set by the
    /// front door after validation.
    pub tenant: Option<String>,
    /// Output tokens the router's length predictor expects (capped by `max_tokens`).
    pub predicted_output: Option<u32>,
}

/// The longest TTFT objective a request may give (ms).
pub const MAX_SLO_TTFT_MS: u32 = 600_000;

fn bad(field: &str, what: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {what}"))
}

/// The model named in a request against the one it is checked with: empty means that one
/// (a router resolves the name first, `models::ServedModels::resolve`); another name is
/// NOT_FOUND.
pub fn check_model(model: &str, facts: &ModelFacts) -> Result<(), Status> {
    if model.is_empty() || model == facts.name {
        Ok(())
    } else {
        Err(crate::models::not_found(model, &[&facts.name]))
    }
}

/// Refuses, before tokenizing, an input that cannot fit the context whatever its tokens,
/// so that a large input costs the router a count rather than a tokenization: a chat
/// template spends at least one token on each message, and no token covers more bytes
/// than the longest vocabulary entry, so text longer than the context times that entry is
/// more tokens than the context holds. What passes is checked exactly after tokenizing.
/// Every API (gRPC `Generate`, `GenerateStream`, `Tokenize`, and HTTP) checks this first.
pub fn check_input_size(input: Option<&api::generate_request::Input>, facts: &ModelFacts) -> Result<(), Status> {
    use api::generate_request::Input;
    let ctx = facts.max_model_len;
    let (field, bytes) = match input {
        Some(Input::Prompt(p)) => ("prompt", p.len()),
        Some(Input::Messages(m)) => {
            if m.messages.len() >= ctx {
                let n = m.messages.len();
                return Err(bad(
                    "messages",
                    format!("{n} messages; at most {} (the context holds {ctx} tokens)", ctx - 1),
                ));
            }
            ("messages", m.messages.iter().map(|m| m.content.len()).sum())
        }
        _ => return Ok(()),
    };
    // Fewer bytes than context tokens always fit: skip the vocabulary scan.
    if bytes <= ctx {
        return Ok(());
    }
    let tok = &facts.tokenizer;
    let longest = (0..tok.vocab_size() as u32).filter_map(|id| tok.token_bytes(id)).map(<[u8]>::len).max().unwrap_or(1);
    if bytes > ctx.saturating_mul(longest.max(1)) {
        return Err(bad(
            field,
            format!("{bytes} bytes of text cannot fit the context of {ctx} tokens (at most {longest} bytes a token)"),
        ));
    }
    Ok(())
}

/// Token ids of a request's input (and the rendered chat prompt). Slow for a large input:
/// callers check [`check_input_size`] first and run this off the async runtime.
pub fn input_ids(
    input: Option<&api::generate_request::Input>,
    facts: &ModelFacts,
    add_generation_prompt: bool,
) -> Result<(Vec<u32>, String), Status> {
    let prompt = match input {
        None => return Err(bad("prompt", "a prompt or messages is required")),
        Some(api::generate_request::Input::Prompt(p)) => {
            if p.is_empty() {
                return Err(bad("prompt", "is empty"));
            }
            Prompt::Text(p.clone())
        }
        Some(api::generate_request::Input::Messages(m)) => {
            if m.messages.is_empty() {
                return Err(bad("messages", "at least one message is required"));
            }
            let mut msgs = Vec::with_capacity(m.messages.len());
            for (i, msg) in m.messages.iter().enumerate() {
                if !matches!(msg.role.as_str(), "system" | "user" | "assistant" | "tool") {
                    return Err(bad(
                        &format!("messages[{i}].role"),
                        format!("{:?} is not one of system, user, assistant, tool", msg.role),
                    ));
                }
                msgs.push(chat_message(i, msg)?);
            }
            if !m.tools.is_empty() {
                return tool_chat_ids(&msgs, &m.tools, facts, add_generation_prompt);
            }
            Prompt::Chat(msgs)
        }
        Some(api::generate_request::Input::PromptTokens(t)) => {
            if t.token_ids.is_empty() {
                return Err(bad("prompt_tokens", "is empty"));
            }
            if let Some(id) = t.token_ids.iter().find(|&&id| id as usize >= facts.vocab_size) {
                return Err(bad("prompt_tokens", format!("{id} is outside the vocabulary of {}", facts.vocab_size)));
            }
            Prompt::Tokens(t.token_ids.clone())
        }
    };
    match (&prompt, facts.template.as_ref()) {
        (Prompt::Chat(msgs), Some(t)) => {
            chat_ids(&facts.tokenizer, t, msgs, add_generation_prompt).map_err(|e| bad("messages", e))
        }
        (Prompt::Chat(_), None) => Err(bad("messages", "this model has no chat template")),
        _ => Ok((prompt_ids(&facts.tokenizer, None, &prompt).map_err(|e| bad("prompt", e))?, String::new())),
    }
}

/// A `tandem.v1` chat message as the template takes it: an assistant turn's tool calls
/// (JSON text), a tool turn's call id and name. An assistant turn that only calls tools has
/// no content (`None`, as OpenAI's `null`).
fn chat_message(i: usize, m: &api::ChatMessage) -> Result<ChatMessage, Status> {
    let mut out = ChatMessage::new(m.role.clone(), m.content.clone());
    if !m.tool_calls_json.is_empty() {
        let field = format!("messages[{i}].tool_calls_json");
        if m.role != "assistant" {
            return Err(bad(&field, "only an assistant turn calls tools"));
        }
        let calls: serde_json::Value =
            serde_json::from_str(&m.tool_calls_json).map_err(|e| bad(&field, format!("is not JSON: {e}")))?;
        if !calls.is_array() {
            return Err(bad(&field, "must be a list of calls"));
        }
        if m.content.is_empty() {
            out.content = None;
        }
        out.tool_calls = Some(calls);
    }
    out.tool_call_id = m.tool_call_id.clone();
    out.name = m.name.clone();
    Ok(out)
}

/// The ids of a chat that offers `tools` (each an OpenAI tool definition in JSON text),
/// through a template that takes them.
fn tool_chat_ids(
    msgs: &[ChatMessage],
    tools: &[String],
    facts: &ModelFacts,
    add_generation_prompt: bool,
) -> Result<(Vec<u32>, String), Status> {
    let Some(t) = facts.template.as_ref() else { return Err(bad("messages", "this model has no chat template")) };
    if !t.takes_tools() {
        return Err(bad("tools", format!("the chat template of {} takes no tools", facts.name)));
    }
    let tools: Vec<serde_json::Value> = tools
        .iter()
        .enumerate()
        .map(|(i, t)| serde_json::from_str(t).map_err(|e| bad(&format!("tools[{i}]"), format!("is not JSON: {e}"))))
        .collect::<Result<_, _>>()?;
    let conv = Conversation::new(msgs, add_generation_prompt).with_tools(&tools);
    conversation_ids(&facts.tokenizer, t, conv).map_err(|e| bad("messages", e))
}

fn in_range(field: &str, v: Option<f32>, default: f32, ok: impl Fn(f32) -> bool, rule: &str) -> Result<f32, Status> {
    match v {
        None => Ok(default),
        Some(x) if x.is_finite() && ok(x) => Ok(x),
        Some(x) => Err(bad(field, format!("{x} is out of range: {rule}"))),
    }
}

/// Checks `req` against `facts`; returns it resolved.
pub fn validate(
    req: &api::GenerateRequest,
    facts: &ModelFacts,
    new_id: impl FnOnce() -> String,
) -> Result<Validated, Status> {
    check_model(&req.model, facts)?;
    check_input_size(req.input.as_ref(), facts)?;
    if let Some(id) = &req.request_id {
        if id.len() > MAX_REQUEST_ID {
            return Err(bad("request_id", format!("{} bytes; at most {MAX_REQUEST_ID}", id.len())));
        }
        // The id is logged: no line breaks or terminal escapes to forge log lines with.
        if id.chars().any(char::is_control) {
            return Err(bad("request_id", "has control characters (line breaks, escapes)"));
        }
    }
    let (prompt, _) = input_ids(req.input.as_ref(), facts, true)?;
    if prompt.is_empty() {
        // Text the tokenizer drops entirely (control characters): nothing to prefill.
        return Err(bad("prompt", "has no tokens"));
    }
    let ctx = facts.max_model_len;
    if prompt.len() >= ctx {
        return Err(bad("prompt", format!("{} tokens; the context holds {ctx} (prompt and output)", prompt.len())));
    }
    let s = req.sampling.clone().unwrap_or_default();
    let room = ctx - prompt.len();
    let max_tokens = match s.max_tokens {
        None => room as u32,
        Some(0) => return Err(bad("sampling.max_tokens", "must be at least 1")),
        Some(m) if m as usize > room => {
            return Err(bad(
                "sampling.max_tokens",
                format!("{m} with a prompt of {} tokens exceeds the context of {ctx}", prompt.len()),
            ))
        }
        Some(m) => m,
    };
    let temperature = in_range("sampling.temperature", s.temperature, 1.0, |t| t >= 0.0, "must be >= 0")?;
    let top_p = in_range("sampling.top_p", s.top_p, 1.0, |p| p > 0.0 && p <= 1.0, "must be in (0, 1]")?;
    let min_p = in_range("sampling.min_p", s.min_p, 0.0, |p| (0.0..=1.0).contains(&p), "must be in [0, 1]")?;
    let presence =
        in_range("sampling.presence_penalty", s.presence_penalty, 0.0, |p| (-2.0..=2.0).contains(&p), "in [-2, 2]")?;
    let frequency =
        in_range("sampling.frequency_penalty", s.frequency_penalty, 0.0, |p| (-2.0..=2.0).contains(&p), "in [-2, 2]")?;
    let repetition = in_range("sampling.repetition_penalty", s.repetition_penalty, 1.0, |p| p > 0.0, "must be > 0")?;
    let n = s.n.unwrap_or(1);
    if n == 0 || n > MAX_N {
        return Err(bad("sampling.n", format!("{n}; must be in 1..={MAX_N}")));
    }
    if let Some(l) = s.logprobs {
        if l > MAX_LOGPROBS {
            return Err(bad("sampling.logprobs", format!("{l}; at most {MAX_LOGPROBS}")));
        }
    }
    if let Some(l) = s.prompt_logprobs {
        if l > MAX_LOGPROBS {
            return Err(bad("sampling.prompt_logprobs", format!("{l}; at most {MAX_LOGPROBS}")));
        }
    }
    if s.stop.len() > MAX_STOP {
        return Err(bad("sampling.stop", format!("{} strings; at most {MAX_STOP}", s.stop.len())));
    }
    if s.stop.iter().any(|x| x.is_empty()) {
        return Err(bad("sampling.stop", "stop strings must not be empty"));
    }
    if let Some(long) = s.stop.iter().find(|x| x.len() > MAX_STOP_LEN) {
        return Err(bad("sampling.stop", format!("a stop string of {} bytes; at most {MAX_STOP_LEN}", long.len())));
    }
    if s.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        let n = s.stop_token_ids.len();
        return Err(bad("sampling.stop_token_ids", format!("{n} ids; at most {MAX_STOP_TOKEN_IDS}")));
    }
    if let Some(salt) = req.cache_salt.as_ref().filter(|x| x.len() > MAX_CACHE_SALT) {
        return Err(bad("cache_salt", format!("{} bytes; at most {MAX_CACHE_SALT}", salt.len())));
    }
    if let Some(t) = s.stop_token_ids.iter().find(|&&t| t as usize >= facts.vocab_size) {
        return Err(bad("sampling.stop_token_ids", format!("{t} is outside the vocabulary of {}", facts.vocab_size)));
    }
    let guide = match &s.guide {
        None => None,
        Some(g) => {
            check_guide(g, facts)?;
            if s.ignore_eos {
                return Err(bad(
                    "sampling.ignore_eos",
                    "cannot be combined with a guide: the output ends where it accepts",
                ));
            }
            Some(g.clone())
        }
    };
    let kv_failure_policy =
        match req.kv_failure_policy {
            0 => None,
            p => Some(KvFailurePolicy::from_api(p, KvFailurePolicy::Retry).ok_or_else(|| {
                bad("kv_failure_policy", format!("{p} is not a policy (1 fail, 2 recompute, 3 retry)"))
            })?),
        };
    Ok(Validated {
        model: facts.name.clone(),
        prompt,
        sampling: pb::SamplingParams {
            temperature,
            top_k: s.top_k.unwrap_or(0),
            top_p,
            min_p,
            repetition_penalty: repetition,
            presence_penalty: presence,
            frequency_penalty: frequency,
            seed: s.seed,
            max_tokens,
            stop: s.stop,
            stop_token_ids: s.stop_token_ids,
            ignore_eos: s.ignore_eos,
            logprobs: s.logprobs,
            prompt_logprobs: s.prompt_logprobs,
            guide,
        },
        n,
        request_id: req.request_id.clone().unwrap_or_else(new_id),
        cache_salt: req.cache_salt.clone(),
        priority: req.priority,
        kv_failure_policy,
        slo_ttft: match req.slo_ttft_ms {
            None => None,
            Some(ms) if (1..=MAX_SLO_TTFT_MS).contains(&ms) => Some(std::time::Duration::from_millis(ms as u64)),
            Some(ms) => return Err(bad("slo_ttft_ms", format!("{ms} is not in 1..={MAX_SLO_TTFT_MS}"))),
        },
        tenant: None,
        // The client's estimate, capped; else the router's predictor fills it in.
        predicted_output: match req.expected_output_tokens {
            None => None,
            Some(0) => return Err(bad("expected_output_tokens", "must be at least 1")),
            Some(n) => Some(n.min(max_tokens)),
        },
    })
}

/// A guide kind's name, as metrics and errors say it.
pub fn guide_kind(k: &api::guide::Kind) -> &'static str {
    use api::guide::Kind;
    match k {
        Kind::JsonSchema(_) => "json_schema",
        Kind::JsonObject(_) => "json_object",
        Kind::Regex(_) => "regex",
        Kind::Choice(_) => "choice",
        Kind::Grammar(_) => "grammar",
    }
}

/// Refuses a guide that names no kind, holds no JSON where a schema goes, or does not
/// compile for the model's vocabulary (the compiler's own words, with the field named).
/// Compiling is bounded (`tandem_text::guide`): the text's size first, then the grammar's.
pub fn check_guide(g: &api::Guide, facts: &ModelFacts) -> Result<Guide, Status> {
    use api::guide::Kind;
    let (field, guide) = match g.kind.as_ref() {
        None => return Err(bad("sampling.guide", "names no kind (json_schema, json_object, regex, choice, grammar)")),
        Some(Kind::JsonSchema(text)) => {
            if text.len() > tandem_text::guide::MAX_GUIDE_BYTES {
                let max = tandem_text::guide::MAX_GUIDE_BYTES;
                return Err(bad("sampling.guide.json_schema", format!("{} bytes; at most {max}", text.len())));
            }
            let v = serde_json::from_str(text)
                .map_err(|e| bad("sampling.guide.json_schema", format!("is not JSON: {e}")))?;
            ("sampling.guide.json_schema", Guide::JsonSchema(v))
        }
        Some(Kind::JsonObject(_)) => ("sampling.guide.json_object", Guide::JsonObject),
        Some(Kind::Regex(r)) => ("sampling.guide.regex", Guide::Regex(r.clone())),
        Some(Kind::Choice(c)) => ("sampling.guide.choice", Guide::Choice(c.choices.clone())),
        Some(Kind::Grammar(l)) => ("sampling.guide.grammar", Guide::Lark(l.clone())),
    };
    let compiler = facts.guides.get(&facts.tokenizer).map_err(|e| bad("sampling.guide", e))?;
    compiler.compile_cached(&guide).map_err(|e| bad(field, e))?;
    Ok(guide)
}

#[cfg(test)]
mod guide_tests {
    use super::*;
    use api::guide::Kind;

    fn request(guide: Option<Kind>, tools: Vec<String>) -> api::GenerateRequest {
        api::GenerateRequest {
            input: Some(api::generate_request::Input::Messages(api::Messages {
                messages: vec![api::ChatMessage { role: "user".into(), content: "hi".into(), ..Default::default() }],
                tools,
            })),
            sampling: Some(api::SamplingParams {
                guide: guide.map(|k| api::Guide { kind: Some(k) }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Bad guides are refused before any worker, naming the field; good ones pass through.
    #[test]
    fn guides_are_compiled_and_refused_by_field() {
        let facts = crate::models::testing::facts("m");
        let check = |g: Option<Kind>| validate(&request(g, vec![]), &facts, || "r".into());
        let ok = check(Some(Kind::Choice(api::Choices { choices: vec!["a".into(), "b".into()] }))).unwrap();
        assert!(ok.sampling.guide.is_some());
        let cases = [
            (Some(Kind::JsonSchema("{not json".into())), "sampling.guide.json_schema"),
            (
                Some(Kind::JsonSchema(r##"{"type": "object", "properties": {"a": {"$ref": "#/x"}}}"##.into())),
                "sampling.guide.json_schema",
            ),
            (Some(Kind::Regex("(".into())), "sampling.guide.regex"),
            (Some(Kind::Grammar("start: nowhere".into())), "sampling.guide.grammar"),
            (Some(Kind::Choice(api::Choices { choices: vec![] })), "sampling.guide.choice"),
            (Some(Kind::Regex("a".repeat(tandem_text::guide::MAX_GUIDE_BYTES + 1))), "sampling.guide.regex"),
        ];
        for (g, field) in cases {
            let e = check(g.clone()).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{g:?}");
            assert!(e.message().starts_with(&format!("{field}:")), "{g:?}: {e:?}");
        }
        let e = check(Some(api::guide::Kind::JsonObject(true)))
            .and_then(|_| {
                let mut r = request(Some(Kind::JsonObject(true)), vec![]);
                r.sampling.as_mut().unwrap().ignore_eos = true;
                validate(&r, &facts, || "r".into())
            })
            .unwrap_err();
        assert!(e.message().starts_with("sampling.ignore_eos:"), "{e:?}");
        // A guide with no kind, and a schema nested past what JSON text may nest.
        assert!(check(None).is_ok());
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let e = validate(
            &api::GenerateRequest {
                sampling: Some(api::SamplingParams { guide: Some(api::Guide { kind: None }), ..Default::default() }),
                ..request(None, vec![])
            },
            &facts,
            || "r".into(),
        )
        .unwrap_err();
        assert!(e.message().starts_with("sampling.guide:"), "{e:?}");
        let e = check(Some(Kind::JsonSchema(deep))).unwrap_err();
        assert!(e.message().starts_with("sampling.guide.json_schema: is not JSON"), "{e:?}");
    }

    /// SmolLM2's template takes no tools: offering some is refused, not silently dropped.
    #[test]
    fn tools_need_a_template_that_takes_them() {
        let facts = crate::models::testing::facts("m");
        let tool = r#"{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}"#;
        let e = validate(&request(None, vec![tool.into()]), &facts, || "r".into()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("tools:") && e.message().contains("takes no tools"), "{e:?}");
    }
}
