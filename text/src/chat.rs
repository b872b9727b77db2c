//! Chat prompts: renders a conversation with the model's own Jinja chat template.
//!
//! Owns the compiled template (`tokenizer.chat_template` from the GGUF) and the environment it
//! runs in, set up like Hugging Face transformers renders templates (`trim_blocks`,
//! `lstrip_blocks`, loop controls, `bos_token`/`eos_token`, `raise_exception`, `tojson` as
//! Python's `json.dumps`, see `tojson`), so the prompt text is byte-identical to theirs. Python
//! string and dict methods that templates call (`.strip()`, `.items()`, ...) come from `pycompat`.
//!
//! A conversation ([`Conversation`]) is its messages plus, optionally, the OpenAI-style tools
//! offered: assistant turns may carry `tool_calls`, and `tool` turns answer them. As vLLM does, a
//! tool call's `arguments` sent as a JSON string (OpenAI's form) reach the template as the value
//! they encode, which is what templates written for transformers expect (Qwen2.5's writes
//! `tool_call.arguments | tojson`).
//!
//! The client's text is never markup: [`ChatTemplate::render_chat`] (in `rendered`) keeps
//! control-token text written in a message (`<|im_end|>`) from becoming a control token.

use std::borrow::Cow;

use minijinja::{context, Environment, Error};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::error::TextError;
use crate::gguf::GgufFile;
use crate::pycompat::{python_method, raise_exception};
pub use crate::rendered::RenderedChat;

const TEMPLATE_NAME: &str = "chat";

/// One conversation turn, as the OpenAI chat API sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// The turn's text; `None` (JSON `null` or absent) for an assistant turn that only calls
    /// tools. Templates see `none`, as they see Python's `None`.
    #[serde(default)]
    pub content: Option<String>,
    /// An assistant turn's calls, OpenAI's array as sent:
    /// `[{"id": .., "type": "function", "function": {"name": .., "arguments": ..}}]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Json>,
    /// A `tool` turn: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The name of the tool a `tool` turn reports (or of the turn's author).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A turn with text and nothing else.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: Some(content.into()),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }

    /// An assistant turn that calls tools (`calls` as OpenAI's `tool_calls` array), with or
    /// without text.
    pub fn assistant_calls(content: Option<String>, calls: Json) -> Self {
        ChatMessage { role: "assistant".into(), content, tool_calls: Some(calls), tool_call_id: None, name: None }
    }

    /// A `tool` turn: what the call `tool_call_id` returned.
    pub fn tool_result(tool_call_id: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { tool_call_id: Some(tool_call_id.into()), ..ChatMessage::new("tool", content) }
    }
}

/// What a chat template renders.
#[derive(Debug, Clone, Copy)]
pub struct Conversation<'a> {
    pub messages: &'a [ChatMessage],
    /// OpenAI-style tool definitions (`{"type": "function", "function": {..}}`), in the order
    /// offered. `None` is what templates see as no tools (`tools` is `none`).
    pub tools: Option<&'a [Json]>,
    /// Append the opening of an assistant turn so the model answers next.
    pub add_generation_prompt: bool,
}

impl<'a> Conversation<'a> {
    /// `messages` without tools.
    pub fn new(messages: &'a [ChatMessage], add_generation_prompt: bool) -> Self {
        Conversation { messages, tools: None, add_generation_prompt }
    }

    /// The same conversation with `tools` offered.
    pub fn with_tools(self, tools: &'a [Json]) -> Self {
        Conversation { tools: Some(tools), ..self }
    }
}

/// A compiled chat template plus the special-token strings it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// The template reads `tools`: it can offer tools to the model.
    takes_tools: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).field("eos_token", &self.eos_token).finish()
    }
}

impl ChatTemplate {
    /// The GGUF's template, or `None` when the model ships without one (base
    /// models), in which case only raw completions make sense.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Option<Self>, TextError> {
        let Some(value) = gguf.get("tokenizer.chat_template") else {
            return Ok(None);
        };
        let source =
            value.as_str().ok_or_else(|| TextError::BadModel("tokenizer.chat_template is not a string".into()))?;
        let token_text = |key: &str| -> String {
            let id = gguf.get_u64(key);
            let tokens = gguf.get("tokenizer.ggml.tokens").and_then(|v| v.as_array());
            match (id, tokens) {
                (Some(id), Some(tokens)) => usize::try_from(id)
                    .ok()
                    .and_then(|i| tokens.get(i))
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string(),
                _ => String::new(),
            }
        };
        // BOS/EOS are control tokens, whose vocabulary text is stored verbatim.
        let bos = token_text("tokenizer.ggml.bos_token_id");
        let eos = token_text("tokenizer.ggml.eos_token_id");
        Self::new(source, &bos, &eos).map(Some)
    }

    /// Compiles a template from source; `bos_token`/`eos_token` are the texts
    /// templates see under those names.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TextError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", crate::tojson::tojson);
        env.set_unknown_method_callback(python_method);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| TextError::Template(format!("cannot compile the chat template: {e}")))?;
        // Templates that take tools name the variable (`{% if tools %}`, `tools | tojson`).
        let takes_tools = source.contains("tools");
        Ok(ChatTemplate { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string(), takes_tools })
    }

    /// Renders the conversation to prompt text, without tools. `add_generation_prompt`
    /// appends the opening of an assistant turn so the model answers next.
    /// Whether the template offers tools to the model (it reads `tools`); one that does not
    /// would drop them silently.
    pub fn takes_tools(&self) -> bool {
        self.takes_tools
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TextError> {
        self.render_with(Conversation::new(messages, add_generation_prompt))
    }

    /// Renders `conv` to prompt text, tools and tool calls included. The text is the
    /// template's own: control-token text in the client's strings is left as it is (see
    /// [`ChatTemplate::render_chat_with`] for the prompt a model should be given).
    pub fn render_with(&self, conv: Conversation<'_>) -> Result<String, TextError> {
        let messages = normalize_tool_calls(conv.messages)?;
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| TextError::Template(e.to_string()))?;
        template
            .render(context! {
                messages => &*messages,
                tools => conv.tools,
                add_generation_prompt => conv.add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| TextError::Template(render_error(&e)))
    }
}

/// `messages` with every assistant tool call's `function.arguments` given as the value it
/// encodes, as vLLM hands them to templates: a JSON string is parsed, a missing, `null` or
/// empty one becomes `{}`. Borrowed when nothing changes.
pub(crate) fn normalize_tool_calls(messages: &[ChatMessage]) -> Result<Cow<'_, [ChatMessage]>, TextError> {
    // A call whose `function` is an object with arguments that are not yet a value.
    let unparsed = |call: &Json| {
        call.get("function")
            .and_then(Json::as_object)
            .is_some_and(|f| matches!(f.get("arguments"), None | Some(Json::Null | Json::String(_))))
    };
    let needs = |m: &ChatMessage| {
        m.role == "assistant" && m.tool_calls.as_ref().and_then(Json::as_array).is_some_and(|c| c.iter().any(unparsed))
    };
    if !messages.iter().any(needs) {
        return Ok(Cow::Borrowed(messages));
    }
    let mut out = messages.to_vec();
    for (i, m) in out.iter_mut().enumerate().filter(|(_, m)| needs(m)) {
        let calls = m.tool_calls.as_mut().and_then(Json::as_array_mut).into_iter().flatten();
        for (j, call) in calls.enumerate() {
            let Some(function) = call.get_mut("function").and_then(Json::as_object_mut) else { continue };
            let parsed = match function.get("arguments") {
                None | Some(Json::Null) => Json::Object(Default::default()),
                Some(Json::String(s)) if s.is_empty() => Json::Object(Default::default()),
                Some(Json::String(s)) => serde_json::from_str(s).map_err(|e| {
                    TextError::InvalidRequest(format!(
                        "messages[{i}].tool_calls[{j}].function.arguments is not valid JSON: {e}"
                    ))
                })?,
                Some(_) => continue,
            };
            function.insert("arguments".into(), parsed);
        }
    }
    Ok(Cow::Owned(out))
}

/// The message of a render error, with its cause chain.
fn render_error(e: &Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The template SmolLM2-Instruct ships in its GGUF.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn smollm2() -> ChatTemplate {
        ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap()
    }

    #[test]
    fn adds_default_system_prompt() {
        let out = smollm2().render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn keeps_given_system_prompt_and_generation_flag() {
        let msgs = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello!"),
        ];
        let out = smollm2().render(&msgs, false).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n"
        );
    }

    #[test]
    fn trim_and_lstrip_blocks_like_jinja2() {
        let src =
            "{% for m in messages %}\n  {% if m.role == 'user' %}\nU:{{ m.content }}\n  {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let out = t.render(&[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")], false).unwrap();
        assert_eq!(out, "U:a\nU:b\n");
    }

    #[test]
    fn bos_eos_and_python_methods() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m['content'].strip() | upper }}|{{ m.content.startswith(' x') }}|{{ m.content.split() | join(',') }}{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let out = t.render(&[ChatMessage::new("user", " x y  ")], false).unwrap();
        assert_eq!(out, "<s>X Y|True|x,y</s>");
    }

    #[test]
    fn raise_exception_is_a_template_error() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(t.render(&[ChatMessage::new("user", "x")], false).unwrap(), "ok");
        match t.render(&[ChatMessage::new("assistant", "x")], false) {
            Err(TextError::Template(msg)) => assert!(msg.contains("first message must be from the user"), "{msg}"),
            other => panic!("expected a template error, got {other:?}"),
        }
    }

    #[test]
    fn bad_template_source_is_a_template_error() {
        assert!(matches!(ChatTemplate::new("{% for %}", "", ""), Err(TextError::Template(_))));
    }

    use crate::gguf::testing::with_strings as gguf_with;

    #[test]
    fn from_gguf_with_and_without_template() {
        assert!(ChatTemplate::from_gguf(&gguf_with(&[("general.architecture", "llama")])).unwrap().is_none());
        let t = ChatTemplate::from_gguf(&gguf_with(&[("tokenizer.chat_template", SMOLLM2)])).unwrap().unwrap();
        assert!(t.render(&[ChatMessage::new("user", "x")], true).unwrap().ends_with("<|im_start|>assistant\n"));
        assert!(matches!(
            ChatTemplate::from_gguf(&gguf_with(&[("tokenizer.chat_template", "{% if %}")])),
            Err(TextError::Template(_))
        ));
    }

    #[test]
    fn shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
    }

    #[test]
    fn chat_message_serde() {
        let m: ChatMessage = serde_json::from_str(r#"{"role":"user","content":"hi"}"#).unwrap();
        assert_eq!(m, ChatMessage::new("user", "hi"));
        let calls = serde_json::json!([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]);
        for text in
            [r#"{"role":"assistant","content":null,"tool_calls":CALLS}"#, r#"{"role":"assistant","tool_calls":CALLS}"#]
        {
            let m: ChatMessage = serde_json::from_str(&text.replace("CALLS", &calls.to_string())).unwrap();
            assert_eq!(m, ChatMessage::assistant_calls(None, calls.clone()));
        }
        let m: ChatMessage = serde_json::from_str(r#"{"role":"tool","tool_call_id":"c1","content":"42"}"#).unwrap();
        assert_eq!(m, ChatMessage::tool_result("c1", "42"));
        // Absent fields stay absent for the template (`is defined` is false); content is `none`.
        let v = serde_json::to_value(ChatMessage::assistant_calls(None, calls)).unwrap();
        assert_eq!(v.as_object().unwrap().keys().collect::<Vec<_>>(), ["role", "content", "tool_calls"]);
    }

    /// A template in the style of Qwen2.5's: tools through `tojson`, tool calls with their
    /// arguments, `set` inside a loop, and a look at the next message by `loop.index0`.
    const TOOLS: &str = "{% if tools %}T:{% for t in tools %}{{ t | tojson }};{% endfor %}{{ '\n' }}{% endif %}\
        {% for m in messages %}{{ m.role }}:{% if m.content %}{{ m.content }}{% endif %}\
        {% for c in m.tool_calls %}{% if c.function is defined %}{% set c = c.function %}{% endif %}\
        [{{ c.name }} {{ c.arguments | tojson }}]{% endfor %}\
        {% if not loop.last and messages[loop.index0 + 1].role == 'tool' %}>{% endif %}{{ '\n' }}{% endfor %}";

    #[test]
    fn renders_tools_and_tool_calls() {
        let t = ChatTemplate::new(TOOLS, "", "").unwrap();
        let tools = [
            serde_json::json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}),
        ];
        let calls = serde_json::json!([
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Zürich\", \"days\": 2}"}},
            {"name": "now", "arguments": {"tz": "UTC"}}
        ]);
        let messages = [
            ChatMessage::new("user", "Weather?"),
            ChatMessage::assistant_calls(None, calls),
            ChatMessage::tool_result("a", "sunny"),
        ];
        let out = t.render_with(Conversation::new(&messages, false).with_tools(&tools)).unwrap();
        assert_eq!(
            out,
            "T:{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}}}};\n\
             user:Weather?\n\
             assistant:[get_weather {\"city\": \"Zürich\", \"days\": 2}][now {\"tz\": \"UTC\"}]>\n\
             tool:sunny\n"
        );
        // No tools: `tools` is none, so the header is not written.
        assert!(t.render(&messages[..1], false).unwrap().starts_with("user:"));
        assert!(t.render_with(Conversation::new(&messages[..1], false).with_tools(&[])).unwrap().starts_with("user:"));
    }

    #[test]
    fn tool_call_arguments_become_values() {
        let call = |args: Json| serde_json::json!([{"type": "function", "function": {"name": "f", "arguments": args}}]);
        let args_of = |m: &ChatMessage| m.tool_calls.as_ref().unwrap()[0]["function"]["arguments"].clone();
        let plain =
            [ChatMessage::new("user", "x"), ChatMessage::assistant_calls(None, call(serde_json::json!({"a": 1})))];
        assert!(matches!(normalize_tool_calls(&plain).unwrap(), Cow::Borrowed(_)));
        for (given, want) in [
            (Json::String("{\"b\": [1, 2], \"a\": null}".into()), serde_json::json!({"b": [1, 2], "a": null})),
            (Json::String(String::new()), serde_json::json!({})),
            (Json::Null, serde_json::json!({})),
        ] {
            let m = [ChatMessage::assistant_calls(None, call(given))];
            let out = normalize_tool_calls(&m).unwrap();
            assert_eq!(args_of(&out[0]), want);
            assert_eq!(serde_json::to_string(&args_of(&out[0])).unwrap(), serde_json::to_string(&want).unwrap());
        }
        let bad = [ChatMessage::new("user", "x"), ChatMessage::assistant_calls(None, call(Json::String("{".into())))];
        match normalize_tool_calls(&bad) {
            Err(TextError::InvalidRequest(m)) => {
                assert!(m.contains("messages[1].tool_calls[0].function.arguments"), "{m}")
            }
            other => panic!("expected an invalid request, got {other:?}"),
        }
        // Only assistant turns are touched.
        let user = [ChatMessage { tool_calls: Some(call(Json::Null)), ..ChatMessage::new("user", "x") }];
        assert!(matches!(normalize_tool_calls(&user).unwrap(), Cow::Borrowed(_)));
    }
}
