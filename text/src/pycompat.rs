//! Python's `str` and `dict` methods for chat templates, which are written for Jinja2 and call
//! them (`message.content.strip()`, `tool.items()`), and `raise_exception`, the function
//! Hugging Face gives templates to reject a conversation. minijinja calls [`python_method`] for
//! methods it does not know; nothing here renders.

use minijinja::value::{from_args, Value, ValueKind};
use minijinja::{Error, ErrorKind, State};

/// Templates call `raise_exception('...')` to reject conversations they cannot format.
pub(crate) fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Python `str` and `dict` methods that chat templates written for Jinja2 use.
pub(crate) fn python_method(state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
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

    #[test]
    fn split_without_separator_keeps_the_rest() {
        assert_eq!(split_whitespace_n("  a b  c ", 2), vec!["a", "b  c "]);
        assert_eq!(split_whitespace_n(" a b ", usize::MAX), vec!["a", "b"]);
        assert!(split_whitespace_n("   ", 3).is_empty());
    }
}
