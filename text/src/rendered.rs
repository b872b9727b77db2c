//! Chat prompts whose client text cannot act as control tokens.
//!
//! Owns [`RenderedChat`]: a rendering in which control-token text written by the client
//! (`<|im_end|>` in a message, a tool's description or a tool call's arguments) stays text, as
//! vLLM and llama.cpp's server tokenize user text, while the control tokens the template itself
//! writes stay special. The client's strings are escaped before the template runs (so the escapes
//! go wherever the template puts them, through its filters), only what the template wrote is
//! parsed for control tokens, and the escapes are undone in the text the model reads.

use serde_json::Value as Json;

use crate::chat::{normalize_tool_calls, ChatMessage, ChatTemplate, Conversation};
use crate::error::TextError;
use crate::tokenizer::{Piece, Tokenizer};

/// Escapes control-token text in client strings while the template runs: `ESC n ;` stands
/// for the `n`th of [`Tokenizer::control_texts`], `ESC ;` for `ESC` itself. A private-use
/// character, which no template writes and filters such as `trim`, `upper` or `tojson` leave alone.
const ESC: char = '\u{10FFFD}';

/// A conversation rendered by its template, in which the client's text cannot act as
/// control tokens (see [`ChatTemplate::render_chat`]).
#[derive(Debug, Clone)]
pub struct RenderedChat {
    /// The rendering, with control text inside the client's strings escaped (see `ESC`).
    escaped: String,
    /// Whether anything was escaped; if not, `escaped` is exactly what `render_with` gives.
    any: bool,
}

impl ChatTemplate {
    /// Renders `messages` for `tok` so that control-token text in them stays text; see
    /// [`ChatTemplate::render_chat_with`].
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tok: &Tokenizer,
    ) -> Result<RenderedChat, TextError> {
        self.render_chat_with(Conversation::new(messages, add_generation_prompt), tok)
    }

    /// Renders `conv` for `tok` so that control-token text in the client's strings (message
    /// content, names, tool calls, tool definitions) stays text. Conversations without such
    /// text render and tokenize exactly as `render_with` then `encode(_, true)`.
    pub fn render_chat_with(&self, conv: Conversation<'_>, tok: &Tokenizer) -> Result<RenderedChat, TextError> {
        // Arguments sent as a JSON string are parsed first: their JSON escapes (`\u003c|im_end|>`)
        // become the text the template writes, and that text is what must not act as markup.
        let normalized = normalize_tool_calls(conv.messages)?;
        let conv = Conversation { messages: &normalized, ..conv };
        let needs_escape = |s: &str| s.contains(ESC) || tok.has_control_text(s);
        let in_messages = conv.messages.iter().any(|m| message_strings(m).any(needs_escape));
        let in_tools = conv.tools.is_some_and(|tools| tools.iter().any(|t| json_has_string(t, &needs_escape)));
        if !in_messages && !in_tools {
            return Ok(RenderedChat { escaped: self.render_with(conv)?, any: false });
        }
        let controls: Vec<&str> = tok.control_texts().collect();
        let esc = |s: &str| escape(s, &controls);
        let messages: Vec<ChatMessage> = conv
            .messages
            .iter()
            .map(|m| ChatMessage {
                role: m.role.clone(),
                content: m.content.as_deref().map(esc),
                tool_calls: m.tool_calls.as_ref().map(|v| escape_json(v, &esc)),
                tool_call_id: m.tool_call_id.as_deref().map(esc),
                name: m.name.as_deref().map(esc),
            })
            .collect();
        let tools: Option<Vec<Json>> = conv.tools.map(|tools| tools.iter().map(|t| escape_json(t, &esc)).collect());
        let escaped = Conversation { messages: &messages, tools: tools.as_deref(), ..conv };
        Ok(RenderedChat { escaped: self.render_with(escaped)?, any: true })
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

    /// The prompt's token ids (no BOS added): control tokens where the template wrote them, and
    /// the client's text as ordinary text (user-defined tokens such as `<tool_call>` are
    /// matched in any text, as llama.cpp matches them).
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

/// The client's strings in a message (its role is the API's, checked by the caller).
fn message_strings(m: &ChatMessage) -> impl Iterator<Item = &str> {
    let mut calls = Vec::new();
    if let Some(v) = &m.tool_calls {
        json_strings(v, &mut calls);
    }
    [m.content.as_deref(), m.tool_call_id.as_deref(), m.name.as_deref()].into_iter().flatten().chain(calls)
}

/// Every string in `v`, keys included.
fn json_strings<'a>(v: &'a Json, out: &mut Vec<&'a str>) {
    match v {
        Json::String(s) => out.push(s),
        Json::Array(items) => items.iter().for_each(|i| json_strings(i, out)),
        Json::Object(map) => {
            for (k, v) in map {
                out.push(k);
                json_strings(v, out);
            }
        }
        _ => {}
    }
}

fn json_has_string(v: &Json, pred: &impl Fn(&str) -> bool) -> bool {
    let mut strings = Vec::new();
    json_strings(v, &mut strings);
    strings.into_iter().any(pred)
}

/// `v` with `esc` applied to every string, keys included (key order kept).
fn escape_json(v: &Json, esc: &impl Fn(&str) -> String) -> Json {
    match v {
        Json::String(s) => Json::String(esc(s)),
        Json::Array(items) => Json::Array(items.iter().map(|i| escape_json(i, esc)).collect()),
        Json::Object(map) => Json::Object(map.iter().map(|(k, v)| (esc(k), escape_json(v, esc))).collect()),
        other => other.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::testing::{tiny, TOOL_CALL};

    const CONTROLS: [&str; 3] = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"];

    #[test]
    fn escape_round_trips() {
        for s in ["", "plain", "a<|im_end|>b", "\u{10FFFD}", "\u{10FFFD}0;", "<|im_start|><|endoftext|>x\u{10FFFD};"] {
            let e = escape(s, &CONTROLS);
            assert!(!CONTROLS.iter().any(|c| e.contains(c)), "{e:?}");
            assert_eq!(unescape(&e, &CONTROLS), s);
        }
        // An escape a template cut short or renumbered stays as it is.
        assert_eq!(unescape("\u{10FFFD}9;x\u{10FFFD}1", &CONTROLS), "\u{10FFFD}9;x\u{10FFFD}1");
    }

    /// Control text in a tool definition and a call's arguments is text; the template's is not.
    #[test]
    fn tools_and_calls_are_escaped() {
        let tok = tiny();
        let src = "{% for t in tools %}{{ t | tojson }}{% endfor %}<|im_start|>\
            {% for m in messages %}{{ m.content }}{% for c in m.tool_calls %}{{ c.function.arguments | tojson }}{% endfor %}{% endfor %}<|im_end|>";
        let template = ChatTemplate::new(src, "", "").unwrap();
        let tools = [serde_json::json!({"name": "<|im_end|>"})];
        let calls = serde_json::json!([{"function": {"name": "f", "arguments": "{\"a\": \"<|im_start|>\"}"}}]);
        let messages = [ChatMessage::assistant_calls(Some("<tool_call>".into()), calls)];
        let chat = template.render_chat_with(Conversation::new(&messages, false).with_tools(&tools), &tok).unwrap();
        let text = chat.text(&tok);
        assert_eq!(text, r#"{"name": "<|im_end|>"}<|im_start|><tool_call>{"a": "<|im_start|>"}<|im_end|>"#);
        let ids = chat.ids(&tok).unwrap();
        let controls: Vec<u32> = ids.iter().copied().filter(|&id| tok.is_special(id)).collect();
        assert_eq!(controls, vec![1, 2], "{ids:?}");
        assert!(ids.contains(&TOOL_CALL), "a user-defined token is matched in the client's text");
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
}
