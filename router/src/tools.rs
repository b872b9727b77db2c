//! Tool calling for the OpenAI chat API: the tools a request offers, checked and passed to
//! the chat template; `tool_choice` as a guide (`required` or a named function constrain
//! the output to calls whose arguments match the function's JSON Schema); and the model's
//! calls parsed out of its text into `tool_calls`, whole or as a stream.
//!
//! The call syntax is the Hermes style Qwen2.5's template teaches:
//! `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call.

use serde_json::{json, Value};
use tandem_proto::tandem::v1 as api;

use crate::openai::ApiError;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// The most tools a request may offer.
pub const MAX_TOOLS: usize = 128;

/// What the request's tool fields ask of the answer.
#[derive(Debug, Clone, Default)]
pub struct ToolPlan {
    /// The tools as the chat template takes them (JSON text each).
    pub tools: Vec<String>,
    /// Parse the model's calls out of its text (`tool_choice` other than `none`).
    pub parse: bool,
    /// The constraint `required` or a named function puts on the output.
    pub guide: Option<api::Guide>,
    /// The offered functions' names: a bare call (see [`parse`]) must name one.
    pub names: Vec<String>,
}

/// Checks `tools`, `tool_choice` and `parallel_tool_calls`; the plan they make.
pub fn plan(tools: Option<&Value>, choice: Option<&Value>, parallel: Option<bool>) -> Result<ToolPlan, ApiError> {
    let list = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(ApiError::bad("tools", "must be a list")),
    };
    if list.len() > MAX_TOOLS {
        return Err(ApiError::bad("tools", format!("{} tools; at most {MAX_TOOLS}", list.len())));
    }
    let mut functions: Vec<(String, Value)> = Vec::new();
    for (i, t) in list.iter().enumerate() {
        let field = format!("tools[{i}]");
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::bad(&field, "type must be \"function\""));
        }
        let f = t.get("function").ok_or_else(|| ApiError::bad(&field, "function is missing"))?;
        let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
        if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
            return Err(ApiError::bad(&format!("{field}.function.name"), "must be 1 to 64 of a-z, A-Z, 0-9, _ - ."));
        }
        let params = f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"}));
        if !params.is_object() {
            return Err(ApiError::bad(&format!("{field}.function.parameters"), "must be a JSON Schema object"));
        }
        functions.push((name.to_string(), params));
    }
    let choice = match choice {
        None | Some(Value::Null) => "auto".to_string(),
        Some(Value::String(s)) if matches!(s.as_str(), "none" | "auto" | "required") => s.clone(),
        Some(v) => match v.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
            Some(name) if v.get("type").and_then(Value::as_str) == Some("function") => format!("fn:{name}"),
            _ => {
                return Err(ApiError::bad(
                    "tool_choice",
                    "must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                ))
            }
        },
    };
    if functions.is_empty() {
        if choice == "none" || choice == "auto" {
            return Ok(ToolPlan::default());
        }
        return Err(ApiError::bad("tool_choice", "needs tools"));
    }
    let many = parallel.unwrap_or(true);
    let guide = match choice.as_str() {
        "none" | "auto" => None,
        "required" => Some(calls_guide(&functions, many)),
        named => {
            let name = &named[3..];
            let f: Vec<(String, Value)> = functions.iter().filter(|(n, _)| n == name).cloned().collect();
            if f.is_empty() {
                return Err(ApiError::bad("tool_choice", format!("names {name:?}, which is not among the tools")));
            }
            Some(calls_guide(&f, false))
        }
    };
    Ok(ToolPlan {
        tools: list.iter().map(Value::to_string).collect(),
        parse: choice != "none",
        guide,
        names: functions.into_iter().map(|(n, _)| n).collect(),
    })
}

/// A Lark grammar whose strings are one call (or, with `many`, one or more) of
/// `functions`, each with arguments valid against its parameters' schema, in the model's
/// call syntax.
fn calls_guide(functions: &[(String, Value)], many: bool) -> api::Guide {
    let calls: Vec<Value> = functions
        .iter()
        .map(|(name, params)| {
            json!({
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let mut schema = if calls.len() == 1 { calls[0].clone() } else { json!({"anyOf": calls}) };
    schema["x-guidance"] = tandem_text::guide::json_layout();
    let repeat = if many { "(\"\\n\" call)*" } else { "" };
    let grammar = format!(
        "start: call {repeat}\ncall: {open} \"\\n\" body \"\\n\" {close}\nbody: %json {schema}\n",
        open = serde_json::to_string(OPEN).expect("a string"),
        close = serde_json::to_string(CLOSE).expect("a string"),
    );
    api::Guide { kind: Some(api::guide::Kind::Grammar(grammar)) }
}

/// One parsed call, as OpenAI's `tool_calls[]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text (OpenAI's form).
    pub arguments: String,
}

impl ToolCall {
    pub fn json(&self, index: usize) -> Value {
        json!({
            "index": index,
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        })
    }
}

/// A call block's body (`{"name", "arguments"}`) as a call; `None` if it is not one.
fn call_of(body: &str) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get("arguments") {
        None | Some(Value::Null) => "{}".to_string(),
        // Some models write the arguments as JSON text already.
        Some(Value::String(s)) => s.clone(),
        Some(a) => a.to_string(),
    };
    Some(ToolCall { id: call_id(), name, arguments })
}

/// A call id that says nothing about the request or the cluster.
fn call_id() -> String {
    format!("call_{}", crate::ids::random_hex(12))
}

/// A whole answer that is nothing but a call's body, or a list of them, without the
/// blocks around it (small Qwen2.5 models often answer so): its calls, when each names
/// an offered function.
fn bare_calls(text: &str, names: &[String]) -> Option<Vec<ToolCall>> {
    let v: Value = serde_json::from_str(text.trim()).ok()?;
    let items = match v {
        Value::Array(a) => a,
        o @ Value::Object(_) => vec![o],
        _ => return None,
    };
    let calls: Vec<ToolCall> = items.iter().map(|i| call_of(&i.to_string())).collect::<Option<_>>()?;
    let named = !calls.is_empty() && calls.iter().all(|c| names.contains(&c.name));
    named.then_some(calls)
}

/// Splits a whole answer into its text and its calls. Text around the call blocks is the
/// message's content (trimmed; `None` when empty). A block that does not parse stays text.
/// An answer that is only a bare call (no blocks) naming one of `names` is that call.
pub fn parse(text: &str, names: &[String]) -> (Option<String>, Vec<ToolCall>) {
    let mut p = StreamParser::new(names);
    let (mut content, mut calls) = p.push(text);
    let (rest, more) = p.finish();
    content.push_str(&rest);
    calls.extend(more);
    let content = content.trim();
    ((!content.is_empty()).then(|| content.to_string()), calls)
}

/// Parses calls out of text that arrives in pieces: text outside call blocks passes
/// through (less any tail that may open a block), each block becomes a call when it closes.
/// An answer that starts with `{` or `[` is held whole until the end, when it is a bare
/// call (see [`parse`]) or text.
#[derive(Debug, Default)]
pub struct StreamParser {
    /// Text not yet given out: a possible block opening, or an open block.
    held: String,
    in_block: bool,
    names: Vec<String>,
    /// Whether the answer's first visible character came, and whether it may be a bare call.
    started: bool,
    bare: bool,
}

impl StreamParser {
    pub fn new(names: &[String]) -> StreamParser {
        StreamParser { names: names.to_vec(), ..StreamParser::default() }
    }

    /// The content to send now and the calls completed by `piece`.
    pub fn push(&mut self, piece: &str) -> (String, Vec<ToolCall>) {
        self.held.push_str(piece);
        if !self.started {
            match self.held.trim_start().chars().next() {
                None => return (String::new(), Vec::new()),
                Some(c) => {
                    self.started = true;
                    self.bare = (c == '{' || c == '[') && !self.names.is_empty();
                }
            }
        }
        if self.bare {
            return (String::new(), Vec::new());
        }
        let (mut content, mut calls) = (String::new(), Vec::new());
        loop {
            if self.in_block {
                let Some(end) = self.held.find(CLOSE) else { break };
                let body: String = self.held[..end].to_string();
                self.held.drain(..end + CLOSE.len());
                self.in_block = false;
                match call_of(&body) {
                    Some(c) => calls.push(c),
                    // Not a call: what the model wrote stays text.
                    None => content.push_str(&format!("{OPEN}{body}{CLOSE}")),
                }
                // The newline between blocks belongs to neither.
                if self.held.starts_with('\n') {
                    self.held.remove(0);
                }
            } else if let Some(start) = self.held.find(OPEN) {
                content.push_str(&self.held[..start]);
                self.held.drain(..start + OPEN.len());
                self.in_block = true;
            } else {
                // Give out all but a tail that could be the start of an opening.
                let keep = (1..OPEN.len()).rev().find(|&k| self.held.ends_with(&OPEN[..k])).unwrap_or(0);
                let cut = self.held.len() - keep;
                content.push_str(&self.held[..cut]);
                self.held.drain(..cut);
                break;
            }
        }
        (content, calls)
    }

    /// At the end: what is still held, as text (an unclosed block is text), or the bare
    /// call it is.
    pub fn finish(&mut self) -> (String, Vec<ToolCall>) {
        if std::mem::take(&mut self.bare) {
            let held = std::mem::take(&mut self.held);
            if let Some(calls) = bare_calls(&held, &self.names) {
                return (String::new(), calls);
            }
            // Not a call: the text as written, blocks and all.
            let (mut text, calls) = self.push(&held);
            text.push_str(&self.finish().0);
            return (text, calls);
        }
        let held = std::mem::take(&mut self.held);
        let text = if self.in_block { format!("{OPEN}{held}") } else { held };
        self.in_block = false;
        (text, Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    }

    #[test]
    fn calls_are_parsed_whole_and_in_pieces_alike() {
        let text = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>";
        let names = vec!["get_weather".to_string()];
        let (content, calls) = parse(text, &names);
        assert_eq!(content.as_deref(), Some("Let me look."));
        let args: Vec<&str> = calls.iter().map(|c| c.arguments.as_str()).collect();
        assert_eq!(args, [r#"{"city":"Paris"}"#, r#"{"city":"Rome"}"#]);
        assert!(calls.iter().all(|c| c.name == "get_weather" && c.id.starts_with("call_")));
        assert_ne!(calls[0].id, calls[1].id);
        // Any split of the text gives the same content and calls.
        for step in [1, 2, 3, 7] {
            let mut p = StreamParser::new(&names);
            let (mut content, mut got) = (String::new(), Vec::new());
            let chars: Vec<char> = text.chars().collect();
            for piece in chars.chunks(step) {
                let (c, calls) = p.push(&piece.iter().collect::<String>());
                assert!(!c.contains('<'), "no part of a block leaks as text: {c:?}");
                content.push_str(&c);
                got.extend(calls);
            }
            content.push_str(&p.finish().0);
            assert_eq!(content.trim(), "Let me look.");
            assert_eq!(got.iter().map(|c| c.arguments.clone()).collect::<Vec<_>>(), args);
        }
    }

    #[test]
    fn text_without_calls_or_with_a_broken_block_stays_text() {
        let names = vec!["f".to_string()];
        let parse = |t: &str| parse(t, &names);
        // JSON that is not a call of an offered function stays text.
        assert_eq!(parse("{\"name\": \"g\", \"arguments\": {}}").1, vec![]);
        assert_eq!(parse("{\"a\": 1}").0.as_deref(), Some("{\"a\": 1}"));
        assert_eq!(parse("Just words < and > here"), (Some("Just words < and > here".into()), vec![]));
        let broken = "<tool_call>\nnot json\n</tool_call>";
        assert_eq!(parse(broken).0.as_deref(), Some(broken));
        assert!(parse(broken).1.is_empty());
        assert_eq!(parse("<tool_call>{\"name\": \"f\"").0.as_deref(), Some("<tool_call>{\"name\": \"f\""));
    }

    #[test]
    fn tool_choice_makes_the_plan() {
        let tools = weather();
        let auto = plan(Some(&tools), None, None).unwrap();
        assert!(auto.parse && auto.guide.is_none() && auto.tools.len() == 1);
        let none = plan(Some(&tools), Some(&json!("none")), None).unwrap();
        assert!(!none.parse && none.guide.is_none());
        for choice in [json!("required"), json!({"type": "function", "function": {"name": "get_weather"}})] {
            let p = plan(Some(&tools), Some(&choice), Some(false)).unwrap();
            let Some(api::guide::Kind::Grammar(g)) = p.guide.and_then(|g| g.kind) else { panic!("{choice}") };
            assert!(g.contains("%json") && g.contains("get_weather"), "{g}");
        }
        let refused = |t: Value, c: Value| plan(Some(&t), Some(&c), None).unwrap_err().param.unwrap_or_default();
        assert_eq!(refused(tools.clone(), json!({"type": "function", "function": {"name": "nope"}})), "tool_choice");
        assert_eq!(refused(json!([]), json!("required")), "tool_choice");
        assert_eq!(refused(json!([{"type": "retrieval"}]), json!("auto")), "tools[0]");
        assert_eq!(
            refused(json!([{"type": "function", "function": {"name": "a b"}}]), json!("auto")),
            "tools[0].function.name"
        );
    }

    /// A bare call (the body alone, as small Qwen2.5 models answer), whole or streamed.
    #[test]
    fn a_bare_call_naming_an_offered_function_is_a_call() {
        let names = vec!["get_weather".to_string()];
        let text = " {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}";
        let (content, calls) = parse(text, &names);
        assert_eq!((content, calls.len()), (None, 1));
        assert_eq!((calls[0].name.as_str(), calls[0].arguments.as_str()), ("get_weather", r#"{"city":"Paris"}"#));
        let mut p = StreamParser::new(&names);
        let mut got = Vec::new();
        for piece in [" ", "{\"name\": \"get_", "weather\", \"arguments\": {\"city\": ", "\"Paris\"}}"] {
            let (c, calls) = p.push(piece);
            assert!(c.is_empty(), "held until the end: {c:?}");
            got.extend(calls);
        }
        let (rest, calls) = p.finish();
        got.extend(calls);
        assert_eq!((rest.as_str(), got.len()), ("", 1));
        // Without tools offered, JSON is just text.
        assert_eq!(parse(text, &[]).1, vec![]);
    }
}
