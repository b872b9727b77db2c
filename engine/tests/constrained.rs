//! Constrained decoding with the real model (SmolLM2-135M): every kind of guide gives
//! output that matches it, in every sampling mode and for parallel samples, and a request
//! resumed after a migration (its earlier tokens replayed into a fresh matcher) continues
//! exactly as the undisturbed run.

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::{json, Value};
use tandem_engine::llm_engine::{EngineRequest, LlmEngine, LlmEngineConfig};
use tandem_engine::model::{Model, ModelOptions};
use tandem_engine::sampling::SamplingParams;
use tandem_engine::scheduler::RequestId;
use tandem_engine::FinishReason;
use tandem_text::chat::{ChatMessage, ChatTemplate};
use tandem_text::gguf::GgufFile;
use tandem_text::guide::{Guide, GuideCompiler};
use tandem_text::prompt::chat_ids;
use tandem_text::tokenizer::Tokenizer;

fn file() -> GgufFile {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "model missing: run scripts/fetch-model.sh first");
    GgufFile::open(&path).unwrap()
}

fn engine(f: &GgufFile) -> LlmEngine {
    let model = Model::from_gguf(f, &ModelOptions::default()).unwrap();
    LlmEngine::new(model, Tokenizer::from_gguf(f).unwrap(), LlmEngineConfig { kv_blocks: 512, ..Default::default() })
        .unwrap()
}

fn chat(f: &GgufFile, text: &str) -> Vec<u32> {
    let tpl = ChatTemplate::from_gguf(f).unwrap().unwrap();
    chat_ids(&Tokenizer::from_gguf(f).unwrap(), &tpl, &[ChatMessage::new("user", text)], true).unwrap().0
}

/// Runs `req` to the end: each choice's text, tokens and finish, by index.
fn run(e: &mut LlmEngine, req: EngineRequest) -> Vec<(String, Vec<u32>, FinishReason)> {
    let id = e.add_request(req).unwrap();
    let mut acc: HashMap<RequestId, (usize, String, Vec<u32>, Option<FinishReason>)> = HashMap::new();
    let mut steps = 0;
    while e.has_unfinished() {
        steps += 1;
        assert!(steps < 10_000, "the engine does not drain");
        for o in e.step().unwrap() {
            assert_eq!(o.group, id);
            let a = acc.entry(o.id).or_default();
            a.0 = o.index;
            a.1.push_str(&o.text);
            a.2.extend(o.token_ids);
            a.3 = o.finish.or(a.3);
        }
    }
    let mut out: Vec<_> = acc.into_values().collect();
    out.sort_by_key(|a| a.0);
    out.into_iter().map(|(_, t, ids, f)| (t, ids, f.expect("finished"))).collect()
}

fn params(guide: Guide, f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams { temperature: 0.0, max_tokens: 160, guide: Some(guide), ..Default::default() };
    f(&mut p);
    p
}

/// A few checks of a JSON value against the subset of JSON Schema the schemas below use
/// (types, required, properties, enum, items, minimum/maximum): enough to fail on output that
/// ignored its schema. The end-to-end tests check with the `jsonschema` package.
fn conforms(v: &Value, s: &Value) -> bool {
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        return e.contains(v);
    }
    let ok_type = match s.get("type").and_then(Value::as_str) {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        _ => true,
    };
    if !ok_type {
        return false;
    }
    if let (Some(n), Some(min)) = (v.as_f64(), s.get("minimum").and_then(Value::as_f64)) {
        if n < min {
            return false;
        }
    }
    if let (Some(n), Some(max)) = (v.as_f64(), s.get("maximum").and_then(Value::as_f64)) {
        if n > max {
            return false;
        }
    }
    if let Some(o) = v.as_object() {
        for r in s.get("required").and_then(Value::as_array).into_iter().flatten() {
            if !o.contains_key(r.as_str().unwrap()) {
                return false;
            }
        }
        for (k, sub) in s.get("properties").and_then(Value::as_object).into_iter().flatten() {
            if let Some(x) = o.get(k) {
                if !conforms(x, sub) {
                    return false;
                }
            }
        }
    }
    if let (Some(a), Some(items)) = (v.as_array(), s.get("items")) {
        return a.iter().all(|x| conforms(x, items));
    }
    true
}

/// A sampling mode's name and how it sets the parameters.
type Mode = (&'static str, fn(&mut SamplingParams));

#[test]
fn json_schemas_hold_in_every_sampling_mode_and_for_every_parallel_sample() {
    let f = file();
    let mut e = engine(&f);
    let schemas = [
        json!({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"], "additionalProperties": false}),
        json!({"type": "object", "properties": {"colors": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3}}, "required": ["colors"], "additionalProperties": false}),
        json!({"type": "object", "properties": {"city": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "population": {"type": "integer", "minimum": 0, "maximum": 50000000}}, "required": ["name", "population"], "additionalProperties": false}, "capital": {"type": "boolean"}}, "required": ["city", "capital"], "additionalProperties": false}),
    ];
    let prompt = chat(&f, "Describe a person, a palette and a city as JSON.");
    let modes: [Mode; 4] = [
        ("greedy", |_| {}),
        ("temperature", |p| {
            p.temperature = 0.9;
            p.seed = Some(7);
        }),
        ("top-k/top-p/min-p with penalties", |p| {
            p.temperature = 0.7;
            p.top_k = 20;
            p.top_p = 0.9;
            p.min_p = 0.05;
            p.repetition_penalty = 1.2;
            p.frequency_penalty = 0.5;
            p.seed = Some(3);
        }),
        ("n = 3", |p| {
            p.temperature = 1.0;
            p.seed = Some(11);
        }),
    ];
    for schema in &schemas {
        for (mode, set) in &modes {
            let n = if *mode == "n = 3" { 3 } else { 1 };
            let req = EngineRequest {
                n,
                ..EngineRequest::new(prompt.clone(), params(Guide::JsonSchema(schema.clone()), set))
            };
            let outs = run(&mut e, req);
            assert_eq!(outs.len(), n);
            for (text, _, finish) in outs {
                assert_eq!(finish, FinishReason::Stop, "{mode}: ended where the schema accepts: {text:?}");
                let v: Value = serde_json::from_str(&text).unwrap_or_else(|err| panic!("{mode}: {err}: {text:?}"));
                assert!(conforms(&v, schema), "{mode}: {v} against {schema}");
            }
        }
    }
}

#[test]
fn regexes_choices_grammars_and_json_objects_hold() {
    let f = file();
    let mut e = engine(&f);
    let prompt = chat(&f, "Give me a phone number, a colour and a short answer.");
    let phone = Guide::Regex("[0-9]{3}-[0-9]{4}".into());
    let (text, _, _) = run(&mut e, EngineRequest::new(prompt.clone(), params(phone, |_| {}))).remove(0);
    assert!(
        text.len() == 8 && text.as_bytes()[3] == b'-' && text.chars().filter(char::is_ascii_digit).count() == 7,
        "{text:?}"
    );
    let colours = vec!["crimson".to_string(), "teal".into(), "ochre".into()];
    for seed in 0..4 {
        let p = params(Guide::Choice(colours.clone()), |p| {
            p.temperature = 1.0;
            p.seed = Some(seed);
        });
        let (text, _, finish) = run(&mut e, EngineRequest::new(prompt.clone(), p)).remove(0);
        assert!(colours.contains(&text) && finish == FinishReason::Stop, "{text:?}");
    }
    let grammar = Guide::Lark("start: \"answer: \" (\"yes\" | \"no\") \".\"".into());
    let (text, _, _) = run(&mut e, EngineRequest::new(prompt.clone(), params(grammar, |_| {}))).remove(0);
    assert!(text == "answer: yes." || text == "answer: no.", "{text:?}");
    let (text, _, _) = run(&mut e, EngineRequest::new(prompt, params(Guide::JsonObject, |_| {}))).remove(0);
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|err| panic!("{err}: {text:?}"));
    assert!(v.is_object(), "{v}");
}

/// A migrated request arrives with its earlier tokens at the end of its prompt
/// (`resumed`): the worker's fresh matcher takes them before its first draw, so the
/// continuation is the undisturbed run's, and it still matches.
#[test]
fn a_resumed_constrained_request_continues_as_the_undisturbed_run() {
    let f = file();
    let mut e = engine(&f);
    let schema = json!({"type": "object", "properties": {"items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "maxItems": 6}}, "required": ["items"]});
    let prompt = chat(&f, "List some numbers as JSON.");
    for (temperature, seed) in [(0.0, None), (0.8, Some(5u64))] {
        let p = params(Guide::JsonSchema(schema.clone()), |p| {
            p.temperature = temperature;
            p.seed = seed;
        });
        let (whole, ids, _) = run(&mut e, EngineRequest::new(prompt.clone(), p.clone())).remove(0);
        assert!(ids.len() > 4, "{whole:?}");
        for k in [1, ids.len() / 2, ids.len() - 1] {
            let resumed_prompt: Vec<u32> = prompt.iter().chain(&ids[..k]).copied().collect();
            // The router asks a resumed attempt for what is left of `max_tokens`.
            let left = SamplingParams { max_tokens: p.max_tokens - k, ..p.clone() };
            let req = EngineRequest { resumed: k, ..EngineRequest::new(resumed_prompt, left) };
            let (_, rest, _) = run(&mut e, req).remove(0);
            let first_difference = rest.iter().zip(&ids[k..]).position(|(a, b)| a != b);
            assert!(
                rest == ids[k..],
                "resumed after {k} tokens at temperature {temperature}: {} vs {} tokens, first difference at {first_difference:?}",
                rest.len(),
                ids.len() - k
            );
        }
    }
}

#[test]
fn a_guide_that_does_not_compile_is_the_request_s_error_and_ignore_eos_is_refused() {
    let f = file();
    let mut e = engine(&f);
    let prompt = chat(&f, "Hi");
    let bad = [
        Guide::Regex("(unclosed".into()),
        Guide::Lark("start: missing_rule".into()),
        Guide::JsonSchema(json!({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})),
        Guide::Choice(vec![]),
    ];
    for g in bad {
        let err = e.add_request(EngineRequest::new(prompt.clone(), params(g.clone(), |_| {}))).unwrap_err();
        assert!(err.to_string().contains(g.kind()), "{g:?}: {err}");
    }
    let err =
        e.add_request(EngineRequest::new(prompt, params(Guide::JsonObject, |p| p.ignore_eos = true))).unwrap_err();
    assert!(err.to_string().contains("ignore_eos"), "{err}");
    assert!(!e.has_unfinished(), "nothing was admitted");
}

#[test]
fn a_hostile_guide_is_refused_within_its_bounds() {
    let f = file();
    let c = GuideCompiler::new(&Tokenizer::from_gguf(&f).unwrap()).unwrap();
    let huge = Guide::Regex("a".repeat(tandem_text::guide::MAX_GUIDE_BYTES + 1));
    assert!(c.check(&huge).unwrap_err().contains("bytes"));
    // As deep as JSON text can nest (serde_json refuses deeper: the router parses the
    // schema first), on a thread with a tokio worker's stack: compiled or refused, no crash.
    let text =
        format!("{}{{\"type\": \"integer\"}}{}", "{\"type\": \"array\", \"items\": ".repeat(120), "}".repeat(120));
    let nested: Value = serde_json::from_str(&text).unwrap();
    let c2 = c.clone();
    let deep = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || c2.check(&Guide::JsonSchema(nested)))
        .unwrap()
        .join()
        .expect("no stack overflow");
    eprintln!("a schema nested 120 deep: {deep:?}");
    // An exponential regex compiles lazily; generating under it ends (the lexer's fuel
    // bounds each step's mask), it does not stall the engine.
    let blowup = Guide::Regex("(a|aa)*(b|bb){1000}(c{1,1000}){1000}".into());
    if c.check(&blowup).is_ok() {
        let mut e = engine(&f);
        let req = EngineRequest::new(chat(&f, "Say a"), params(blowup, |p| p.max_tokens = 8));
        let (text, _, finish) = run(&mut e, req).remove(0);
        assert!(text.chars().all(|ch| "abc".contains(ch)), "{text:?} ({finish:?})");
    }
}
