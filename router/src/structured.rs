//! Structured output on the OpenAI API: the fields that ask for a guide
//! (`response_format`, vLLM's `guided_*` and `structured_outputs`) become one `tandem.v1`
//! `Guide`, and a refusal of that guide names the field the client set.

use serde_json::Value;
use tandem_proto::tandem::v1 as api;

use crate::openai::{ApiError, Common};

/// The field the request's guide came from, as the client named it (`response_format`,
/// `guided_json`, ...); `None` without one.
pub fn guide_field(c: &Common) -> Option<&'static str> {
    let rf = c.response_format.as_ref().and_then(|v| v.get("type")).and_then(Value::as_str);
    if rf.is_some_and(|t| t != "text") {
        return Some("response_format");
    }
    [
        ("guided_json", c.guided_json.is_some()),
        ("guided_regex", c.guided_regex.is_some()),
        ("guided_choice", c.guided_choice.is_some()),
        ("guided_grammar", c.guided_grammar.is_some()),
        ("structured_outputs", c.structured_outputs.as_ref().is_some_and(|v| !v.is_null())),
    ]
    .into_iter()
    .find_map(|(f, set)| set.then_some(f))
}

impl ApiError {
    /// A refusal of the request's guide (`sampling.guide...`) names the field the client
    /// set instead (`response_format`, `guided_regex`, `tool_choice`, ...).
    pub fn naming_guide(mut self, field: Option<&str>) -> ApiError {
        if let (Some(f), Some(p)) = (field, self.param.as_deref()) {
            if p.starts_with("guide") {
                self.param = Some(f.to_string());
                self.message = format!("{f}: {}", self.message);
            }
        }
        self
    }
}

/// The guide the request's structured-output fields ask for: at most one of
/// `response_format` (other than text), `guided_*` and `structured_outputs`. Whether it
/// compiles is the core's check (`validate::check_guide`).
pub fn guide(c: &Common) -> Result<Option<api::Guide>, ApiError> {
    use api::guide::Kind;
    let mut found: Vec<(&str, Kind)> = Vec::new();
    if let Some(rf) = &c.response_format {
        match rf.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => found.push(("response_format", Kind::JsonObject(true))),
            Some("json_schema") => {
                let schema = rf
                    .get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .ok_or_else(|| ApiError::bad("response_format", "json_schema.schema is missing"))?;
                found.push(("response_format", Kind::JsonSchema(schema.to_string())));
            }
            _ => return Err(ApiError::bad("response_format", "type must be text, json_object or json_schema")),
        }
    }
    let schema_text = |field: &str, v: &Value| match v {
        // A schema given as JSON text, as some clients send it.
        Value::String(text) => Ok(text.clone()),
        Value::Object(_) | Value::Bool(_) => Ok(v.to_string()),
        _ => Err(ApiError::bad(field, "must be a JSON Schema object")),
    };
    if let Some(v) = &c.guided_json {
        found.push(("guided_json", Kind::JsonSchema(schema_text("guided_json", v)?)));
    }
    if let Some(r) = &c.guided_regex {
        found.push(("guided_regex", Kind::Regex(r.clone())));
    }
    if let Some(choices) = &c.guided_choice {
        found.push(("guided_choice", Kind::Choice(api::Choices { choices: choices.clone() })));
    }
    if let Some(g) = &c.guided_grammar {
        found.push(("guided_grammar", Kind::Grammar(g.clone())));
    }
    if let Some(so) = c.structured_outputs.as_ref().filter(|v| !v.is_null()) {
        let field = "structured_outputs";
        let o = so.as_object().ok_or_else(|| ApiError::bad(field, "must be an object"))?;
        for (k, v) in o {
            let kind = match (k.as_str(), v) {
                (_, Value::Null) => continue,
                ("json", v) => Kind::JsonSchema(schema_text("structured_outputs.json", v)?),
                ("regex", Value::String(r)) => Kind::Regex(r.clone()),
                ("choice", Value::Array(a)) => Kind::Choice(api::Choices {
                    choices: a
                        .iter()
                        .map(|x| x.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| ApiError::bad("structured_outputs.choice", "must be a list of strings"))?,
                }),
                ("grammar", Value::String(g)) => Kind::Grammar(g.clone()),
                ("json_object", Value::Bool(true)) => Kind::JsonObject(true),
                (other, _) => {
                    return Err(ApiError::bad(field, format!("{other:?} is not one of json, regex, choice, grammar")))
                }
            };
            found.push((field, kind));
        }
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop().map(|(_, kind)| api::Guide { kind: Some(kind) })),
        _ => {
            let names: Vec<&str> = found.iter().map(|(f, _)| *f).collect();
            Err(ApiError::bad(
                found[1].0,
                format!("one structured-output constraint at a time; got {}", names.join(", ")),
            ))
        }
    }
}
