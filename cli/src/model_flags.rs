//! `--model [NAME=]PATH` (repeatable) and `--model-name`: which model files a serving
//! process serves and under which names. A router or `tandem up` serves every model given,
//! the first being the default for requests that name none; a worker serves exactly one.
//!
//! A model's name is, in order: the `NAME=` before its path, `--model-name` (with one
//! model only), or the file name without `.gguf`. A value that is an existing file is a
//! path even if it holds `=`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use tandem_router::models::check_specs;
use tandem_router::ModelSpec;
use tandem_worker_runtime::model_name_of;

/// One `--model` value: a GGUF file and, if given, the name clients use for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelArg {
    pub name: Option<String>,
    pub path: PathBuf,
}

/// Parses `PATH` or `NAME=PATH` (clap's value parser for `--model`).
pub fn model_arg(s: &str) -> Result<ModelArg, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("an empty model: give PATH or NAME=PATH".into());
    }
    if !std::path::Path::new(s).is_file() {
        if let Some((name, path)) = s.split_once('=') {
            if !name.contains('/') {
                if name.is_empty() || path.is_empty() {
                    return Err(format!("{s:?} is not NAME=PATH"));
                }
                return Ok(ModelArg { name: Some(name.to_string()), path: PathBuf::from(path) });
            }
        }
    }
    Ok(ModelArg { name: None, path: PathBuf::from(s) })
}

/// The models to serve, named (see the module's rule), each file present, names unique.
pub fn served(models: &[ModelArg], model_name: Option<&str>) -> Result<Vec<ModelSpec>> {
    if model_name.is_some() && models.len() > 1 {
        bail!("--model-name names the only --model; with several models give each as --model NAME=PATH");
    }
    let mut specs = Vec::new();
    for m in models {
        let name = match (&m.name, model_name) {
            (Some(a), Some(b)) if a != b => {
                bail!("model {} is named both {a:?} (NAME=PATH) and {b:?} (--model-name)", m.path.display())
            }
            (Some(n), _) => n.clone(),
            (None, Some(n)) => n.to_string(),
            (None, None) => model_name_of(&m.path),
        };
        if !m.path.exists() {
            bail!(
                "model file {} does not exist (run scripts/fetch-model.sh to fetch the default model)",
                m.path.display()
            );
        }
        specs.push(ModelSpec { name, path: m.path.clone() });
    }
    check_specs(&specs)?;
    Ok(specs)
}

/// The one model a worker serves.
pub fn single(models: &[ModelArg], model_name: Option<&str>) -> Result<ModelSpec> {
    if models.len() != 1 {
        bail!("a worker serves one model; {} were given (--model)", models.len());
    }
    Ok(served(models, model_name)?.remove(0))
}

/// `name` as a worker id segment: the characters an id may not hold become `-`.
pub fn id_part(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':') { c } else { '-' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_values_parse_as_path_or_name_and_path() {
        let named = |n: &str, p: &str| Ok(ModelArg { name: Some(n.into()), path: p.into() });
        let bare = |p: &str| Ok(ModelArg { name: None, path: p.into() });
        let cases = [
            ("models/a.gguf", bare("models/a.gguf")),
            ("smol=models/a.gguf", named("smol", "models/a.gguf")),
            (" coder=/m/q.gguf ", named("coder", "/m/q.gguf")),
            // A `=` inside a directory is part of the path.
            ("dir/x=y.gguf", bare("dir/x=y.gguf")),
            ("=models/a.gguf", Err(())),
            ("smol=", Err(())),
            ("", Err(())),
        ];
        for (given, want) in cases {
            assert_eq!(model_arg(given).map_err(|_| ()), want, "{given:?}");
        }
    }

    #[test]
    fn names_come_from_the_value_the_flag_or_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = |n: &str| {
            let p = dir.path().join(n);
            std::fs::write(&p, b"").unwrap();
            p
        };
        let (a, b) = (file("a.gguf"), file("b.gguf"));
        let arg = |name: Option<&str>, path: &PathBuf| ModelArg { name: name.map(Into::into), path: path.clone() };
        let names = |models: &[ModelArg], flag: Option<&str>| {
            served(models, flag).map(|s| s.into_iter().map(|m| m.name).collect::<Vec<_>>()).map_err(|e| e.to_string())
        };
        assert_eq!(names(&[arg(None, &a)], None), Ok(vec!["a".to_string()]));
        assert_eq!(names(&[arg(None, &a)], Some("smol")), Ok(vec!["smol".to_string()]));
        assert_eq!(names(&[arg(Some("x"), &a), arg(None, &b)], None), Ok(vec!["x".to_string(), "b".to_string()]));
        // One file under two names: two pools.
        assert_eq!(names(&[arg(Some("x"), &a), arg(Some("y"), &a)], None), Ok(vec!["x".into(), "y".into()]));
        let refused = [
            (vec![arg(None, &a), arg(None, &b)], Some("smol"), "with several models"),
            (vec![arg(Some("x"), &a)], Some("y"), "named both"),
            (vec![arg(None, &a), arg(None, &a)], None, "given twice"),
            (vec![arg(None, &dir.path().join("missing.gguf"))], None, "does not exist"),
        ];
        for (models, flag, why) in refused {
            let e = names(&models, flag).expect_err(why);
            assert!(e.contains(why), "{e}");
        }
        assert!(single(&[arg(None, &a), arg(None, &b)], None).unwrap_err().to_string().contains("one model"));
        assert_eq!(single(&[arg(None, &b)], None).unwrap().name, "b");
        assert_eq!(id_part("qwen2.5 coder/0.5b"), "qwen2.5-coder-0.5b");
    }
}
