//! Chat prompts: renders a conversation with the model's own Jinja chat template.
//!
//! Owns the compiled template (`tokenizer.chat_template` from the GGUF) and
//! the environment it runs in, set up like Hugging Face transformers and
//! llama-cpp-python render templates (`trim_blocks`, `lstrip_blocks`, loop
//! controls, `bos_token`/`eos_token`, `raise_exception`), so the prompt text
//! is byte-identical to theirs. A few Python string and dict methods that
//! templates call (`.strip()`, `.items()`, ...) are provided as well.
//!
//! Message content is the user's text, never markup: [`ChatTemplate::render_chat`] keeps
//! control-token text written in a message (`<|im_end|>`) from becoming a control token,
//! as vLLM and llama.cpp's server tokenize user text, while the template's own control
//! tokens stay special.

use minijinja::value::{from_args, Value, ValueKind};
use minijinja::{context, Environment, Error, ErrorKind, State};
use serde::{Deserialize, Serialize};

use crate::error::TextError;
use crate::gguf::GgufFile;
use crate::tokenizer::{Piece, Tokenizer};

const TEMPLATE_NAME: &str = "chat";

/// Escapes control-token text in message content while the template runs: `ESC n ;` stands
/// for the `n`th of [`Tokenizer::control_texts`], `ESC ;` for `ESC` itself. A private-use
/// character, which no template writes and filters such as `trim` or `upper` leave alone.
const ESC: char = '\u{10FFFD}';

/// One conversation turn, as the OpenAI chat API sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    /// Convenience constructor for tests and callers building conversations.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template plus the special-token strings it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
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
        env.set_unknown_method_callback(python_method);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| TextError::Template(format!("cannot compile the chat template: {e}")))?;
        Ok(ChatTemplate { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// Renders the conversation to prompt text. `add_generation_prompt` appends
    /// the opening of an assistant turn so the model answers next.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TextError> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| TextError::Template(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| TextError::Template(render_error(&e)))
    }
}

/// A conversation rendered by its template, in which message content cannot act as
/// control tokens (see [`ChatTemplate::render_chat`]).
#[derive(Debug, Clone)]
pub struct RenderedChat {
    /// The rendering, with control text inside message content escaped (see `ESC`).
    escaped: String,
    /// Whether any content was escaped; if not, `escaped` is exactly what `render` gives.
    any: bool,
}

impl ChatTemplate {
    /// Renders `messages` for `tok` so that control-token text in message content stays
    /// text: content holding any is escaped before the template runs (so the escapes go
    /// wherever the template puts the content, through its filters), and only what the
    /// template wrote is parsed for control tokens. Conversations without such text
    /// render and tokenize exactly as `render` then `encode(_, true)`.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tok: &Tokenizer,
    ) -> Result<RenderedChat, TextError> {
        let needs_escape = |c: &str| c.contains(ESC) || tok.has_control_text(c);
        if !messages.iter().any(|m| needs_escape(&m.content)) {
            return Ok(RenderedChat { escaped: self.render(messages, add_generation_prompt)?, any: false });
        }
        let controls: Vec<&str> = tok.control_texts().collect();
        let escaped: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage { role: m.role.clone(), content: escape(&m.content, &controls) })
            .collect();
        Ok(RenderedChat { escaped: self.render(&escaped, add_generation_prompt)?, any: true })
    }
}

impl RenderedChat {
    /// The prompt text as the model reads it.
    pub fn text(&self, tok: &Tokenizer) -> String {
        if !self.any {
            return self.escaped.clone();
        }
        unescape(&self.escaped, &tok.control_texts().collect::<Vec<_>>())
    }

    /// The prompt's token ids (no BOS): control tokens where the template wrote them, and
    /// message content as ordinary text.
    pub fn ids(&self, tok: &Tokenizer) -> Result<Vec<u32>, TextError> {
        if !self.any {
            return tok.encode(&self.escaped, true);
        }
        let controls: Vec<&str> = tok.control_texts().collect();
        let mut ids = Vec::new();
        for piece in tok.split_control(&self.escaped) {
            match piece {
                Piece::Control(id) => ids.push(id),
                Piece::Text(t) => ids.extend(tok.encode(&unescape(t, &controls), false)?),
            }
        }
        Ok(ids)
    }
}

/// `content` with every control text (`controls`, longest first) and every `ESC` escaped.
fn escape(content: &str, controls: &[&str]) -> String {
    let mut out = String::with_capacity(content.len());
    let mut rest = content;
    while let Some(c) = rest.chars().next() {
        if c == ESC {
            out.push(ESC);
            out.push(';');
            rest = &rest[c.len_utf8()..];
        } else if let Some((i, t)) =
            controls.iter().enumerate().find(|(_, t)| t.starts_with(c) && rest.starts_with(**t))
        {
            out.push(ESC);
            out.push_str(&i.to_string());
            out.push(';');
            rest = &rest[t.len()..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// Undoes `escape`; an escape a template mangled stays as it is.
fn unescape(text: &str, controls: &[&str]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(ESC) {
        out.push_str(&rest[..at]);
        let after = &rest[at + ESC.len_utf8()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        let code = after[..digits].parse::<usize>().ok();
        match (after[digits..].starts_with(';'), code) {
            (true, None) if digits == 0 => out.push(ESC),
            (true, Some(i)) if i < controls.len() => out.push_str(controls[i]),
            _ => {
                out.push(ESC);
                rest = after;
                continue;
            }
        }
        rest = &after[digits + 1..];
    }
    out.push_str(rest);
    out
}

/// Templates call `raise_exception('...')` to reject conversations they cannot format.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
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

/// Python `str` and `dict` methods that chat templates written for Jinja2 use.
fn python_method(state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        return string_method(state, s, method, args);
    }
    if value.kind() == ValueKind::Map {
        match method {
            "items" => {
                let () = from_args(args)?;
                return state.apply_filter("items", std::slice::from_ref(value));
            }
            "keys" => {
                let () = from_args(args)?;
                return Ok(Value::from(value.try_iter()?.collect::<Vec<_>>()));
            }
            "values" => {
                let () = from_args(args)?;
                let values = value.try_iter()?.map(|k| value.get_item(&k)).collect::<Result<Vec<_>, _>>()?;
                return Ok(Value::from(values));
            }
            "get" => {
                let (key, default): (Value, Option<Value>) = from_args(args)?;
                let v = value.get_item(&key)?;
                return Ok(if v.is_undefined() { default.unwrap_or(Value::from(())) } else { v });
            }
            _ => {}
        }
    }
    Err(Error::from(ErrorKind::UnknownMethod))
}

fn string_method(state: &State, s: &str, method: &str, args: &[Value]) -> Result<Value, Error> {
    let strip_set = |chars: Option<&str>| -> Box<dyn Fn(char) -> bool> {
        match chars {
            Some(set) => {
                let set: Vec<char> = set.chars().collect();
                Box::new(move |c| set.contains(&c))
            }
            None => Box::new(char::is_whitespace),
        }
    };
    Ok(match method {
        "strip" | "lstrip" | "rstrip" => {
            let (chars,): (Option<&str>,) = from_args(args)?;
            let pred = strip_set(chars);
            Value::from(match method {
                "strip" => s.trim_matches(&*pred),
                "lstrip" => s.trim_start_matches(&*pred),
                _ => s.trim_end_matches(&*pred),
            })
        }
        "startswith" => {
            let (prefix,): (&str,) = from_args(args)?;
            Value::from(s.starts_with(prefix))
        }
        "endswith" => {
            let (suffix,): (&str,) = from_args(args)?;
            Value::from(s.ends_with(suffix))
        }
        "upper" | "lower" | "title" | "capitalize" => {
            let () = from_args(args)?;
            state.apply_filter(method, &[Value::from(s)])?
        }
        "replace" => {
            let (old, new, count): (&str, &str, Option<usize>) = from_args(args)?;
            Value::from(match count {
                Some(n) => s.replacen(old, new, n),
                None => s.replace(old, new),
            })
        }
        "split" => {
            let (sep, maxsplit): (Option<&str>, Option<i64>) = from_args(args)?;
            let limit = maxsplit.filter(|&n| n >= 0).map(|n| n as usize + 1).unwrap_or(usize::MAX);
            let parts: Vec<Value> = match sep {
                Some("") => return Err(Error::new(ErrorKind::InvalidOperation, "empty separator")),
                Some(sep) => s.splitn(limit, sep).map(Value::from).collect(),
                None => split_whitespace_n(s, limit).into_iter().map(Value::from).collect(),
            };
            Value::from(parts)
        }
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    })
}

/// Python's `str.split()` without a separator: runs of whitespace separate,
/// at most `limit` parts, the last keeping the rest (left-trimmed).
fn split_whitespace_n(s: &str, limit: usize) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        if parts.len() + 1 == limit {
            parts.push(rest);
            break;
        }
        match rest.find(char::is_whitespace) {
            Some(end) => {
                parts.push(&rest[..end]);
                rest = rest[end..].trim_start();
            }
            None => {
                parts.push(rest);
                break;
            }
        }
    }
    parts
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
        assert_eq!(split_whitespace_n("  a b  c ", 2), vec!["a", "b  c "]);
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
    }
}
