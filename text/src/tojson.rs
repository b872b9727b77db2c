//! The `tojson` filter as Hugging Face transformers gives it to chat templates.
//!
//! Transformers replaces Jinja2's HTML-safe `tojson` with Python's `json.dumps(value,
//! ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, and vLLM and SGLang render
//! through it: `", "` and `": "` between items, keys in the order given, non-ASCII text as is, and
//! only `"`, `\` and control characters escaped. Tool definitions and tool-call arguments reach the
//! prompt through this filter, so its bytes are the prompt's bytes. minijinja's own `tojson` is
//! compact and escapes `<`, `>`, `&` and `'`; this module is what the chat environment uses instead.
//! It only formats: it never parses JSON.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Rest, Value, ValueKind};
use minijinja::{Error, ErrorKind};

/// How `json.dumps` was asked to format.
struct Style {
    ensure_ascii: bool,
    /// `None`: one line. `Some(unit)`: one item per line, indented by `unit` per level.
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// `value | tojson(ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, the
/// arguments positional in that order (transformers' signature) or by name.
pub(crate) fn tojson(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > NAMES.len() {
        return Err(Error::new(ErrorKind::TooManyArguments, "tojson takes at most four arguments"));
    }
    let mut given: [Option<Value>; 4] = Default::default();
    for (slot, v) in given.iter_mut().zip(args.0) {
        *slot = Some(v);
    }
    for (slot, name) in given.iter_mut().zip(NAMES) {
        if let Some(v) = kwargs.get::<Option<Value>>(name)? {
            *slot = Some(v);
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = given.map(|v| v.filter(|v| !v.is_none()));

    let indent = match indent {
        None => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
        Some(v) => {
            let n = i64::try_from(v).map_err(|_| Error::new(ErrorKind::InvalidOperation, "indent must be a number"))?;
            Some(" ".repeat(n.max(0) as usize))
        }
    };
    let (item_sep, key_sep) = match separators {
        Some(v) => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| Error::new(ErrorKind::InvalidOperation, "separators must be two strings"))?;
            match <[String; 2]>::try_from(parts) {
                Ok([item, key]) => (item, key),
                Err(_) => return Err(Error::new(ErrorKind::InvalidOperation, "separators must be two strings")),
            }
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let style = Style {
        ensure_ascii: ensure_ascii.is_some_and(|v| v.is_true()),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.is_some_and(|v| v.is_true()),
    };
    let mut out = String::new();
    write_value(&mut out, value, &style, 0)?;
    Ok(Value::from(out))
}

fn write_value(out: &mut String, value: &Value, style: &Style, level: usize) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => write!(out, "{value}").unwrap_or_default(),
        ValueKind::Number => out.push_str(&python_float(f64::try_from(value.clone())?)),
        ValueKind::String => write_str(out, value.as_str().unwrap_or_default(), style.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, ('[', ']'), items.len(), style, level, |out, i| {
                write_value(out, &items[i], style, level + 1)
            })?;
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> =
                value.try_iter()?.map(|k| Ok((key_text(&k)?, value.get_item(&k)?))).collect::<Result<_, Error>>()?;
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, ('{', '}'), entries.len(), style, level, |out, i| {
                write_str(out, &entries[i].0, style.ensure_ascii);
                out.push_str(&style.key_sep);
                write_value(out, &entries[i].1, style, level + 1)
            })?;
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("a value of kind {kind} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

/// `open`, the `n` items `item` writes separated as `json.dumps` separates them, `close`.
fn write_container(
    out: &mut String,
    (open, close): (char, char),
    n: usize,
    style: &Style,
    level: usize,
    mut item: impl FnMut(&mut String, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if n == 0 {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, depth: usize| {
        if let Some(unit) = &style.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(unit);
            }
        }
    };
    for i in 0..n {
        if i > 0 {
            out.push_str(&style.item_sep);
        }
        newline(out, level + 1);
        item(out, i)?;
    }
    newline(out, level);
    out.push(close);
    Ok(())
}

/// A dict key as `json.dumps` writes it: strings as they are, numbers, booleans and `None` as
/// their JSON text.
fn key_text(key: &Value) -> Result<String, Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".to_string(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
        ValueKind::Number if key.is_integer() => key.to_string(),
        ValueKind::Number => python_float(f64::try_from(key.clone())?),
        kind => return Err(Error::new(ErrorKind::InvalidOperation, format!("keys must be str, not {kind}"))),
    })
}

/// A JSON string as Python writes it: `"`, `\` and U+0000..U+001F escaped (`\n`-style where JSON
/// has a short form, else `\u00XX`); with `ensure_ascii`, everything outside `' '..='~'` as
/// `\uXXXX` (surrogate pairs above U+FFFF).
fn write_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write!(out, "\\u{unit:04x}").unwrap_or_default();
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest digits that read back as `x`, positional for exponents
/// -4..16 (with `.0` when whole), else `d.ddde+XX`; `NaN`, `Infinity` as `json.dumps` writes them.
fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // `{:e}` gives the shortest round-trip digits: `-1.2345e-7`.
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if !(-4..16).contains(&exp) {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{first}{frac}e{esign}{:02}", exp.abs());
    }
    if exp < 0 {
        return format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize));
    }
    let point = exp as usize + 1;
    if digits.len() <= point {
        format!("{sign}{digits}{}.0", "0".repeat(point - digits.len()))
    } else {
        format!("{sign}{}.{}", &digits[..point], &digits[point..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::Environment;

    fn render(src: &str, ctx: serde_json::Value) -> String {
        let mut env = Environment::new();
        env.add_filter("tojson", tojson);
        env.render_str(src, ctx).unwrap()
    }

    /// Expected strings are what CPython 3's `json.dumps` prints for the same values.
    #[test]
    fn formats_like_python_json_dumps() {
        let v = serde_json::json!({
            "name": "get_weather", "b": [1, 2.5, true, null], "a": {}, "e": [], "html": "<a href='x'>&</a>",
            "ü": "naïve 日本 🦀", "esc": "q\"b\\n\n\t\u{1}\u{7f}"
        });
        assert_eq!(
            render("{{ v | tojson }}", serde_json::json!({ "v": v })),
            r#"{"name": "get_weather", "b": [1, 2.5, true, null], "a": {}, "e": [], "html": "<a href='x'>&</a>", "ü": "naïve 日本 🦀", "esc": "q\"b\\n\n\t\u0001"#
                .to_string()
                + "\u{7f}\"}"
        );
        assert_eq!(
            render("{{ v | tojson(indent=2) }}", serde_json::json!({ "v": {"a": [1, {}], "b": "x"} })),
            "{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": \"x\"\n}"
        );
        assert_eq!(
            render(
                "{{ v | tojson(sort_keys=true, separators=[',', ':']) }}",
                serde_json::json!({ "v": {"b": 1, "a": 2} })
            ),
            r#"{"a":2,"b":1}"#
        );
        assert_eq!(
            render("{{ v | tojson(true) }}", serde_json::json!({ "v": "é🦀\u{7f}" })),
            r#""\u00e9\ud83e\udd80\u007f""#
        );
        assert_eq!(render("{{ 'x' | tojson }}{{ none | tojson }}", serde_json::json!({})), r#""x"null"#);
    }

    #[test]
    fn floats_print_as_python_repr() {
        let cases = [
            (1.0, "1.0"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (2.5e-5, "2.5e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1.5e300, "1.5e+300"),
            (123456789012345.6, "123456789012345.6"),
            (1e15, "1000000000000000.0"),
            (-3.25, "-3.25"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float(x), want, "{x:e}");
        }
    }

    #[test]
    fn unserializable_values_are_errors() {
        let mut env = Environment::new();
        env.add_filter("tojson", tojson);
        assert!(env.render_str("{{ nothing | tojson }}", ()).is_err());
        assert!(env.render_str("{{ 1 | tojson(false, none, none, false, 1) }}", ()).is_err());
    }
}
