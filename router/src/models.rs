//! The models a router serves ([`ServedModels`]): each one's name, as clients give it in a
//! request's `model` field, and its facts (tokenizer, chat template, context length) to
//! check and tokenize requests with. The first is the default: a request that names no
//! model goes to it. A request naming a model the router does not serve is refused as
//! NOT_FOUND, naming the model (HTTP 404 `model_not_found`).
//!
//! This module resolves names only; which workers serve a model is the membership's
//! (`members`), which routes each request to workers announcing the same name.

use std::path::PathBuf;
use std::sync::Arc;

use tonic::Status;

use crate::validate::ModelFacts;

/// One model a router is configured to serve: the name clients use and its GGUF file
/// (the router reads its tokenizer, chat template and context length, never its weights).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// The name clients use; the model's workers announce the same.
    pub name: String,
    pub path: PathBuf,
}

/// Why a list of models cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelsError {
    #[error("no model to serve: give at least one model file")]
    Empty,
    #[error("model name {0:?} is given twice: each served model needs its own name")]
    Duplicate(String),
    #[error("model name {0:?} is empty or has whitespace or control characters")]
    BadName(String),
}

/// Checks that `specs` can be served side by side: at least one, names usable and unique.
pub fn check_specs(specs: &[ModelSpec]) -> Result<(), ModelsError> {
    if specs.is_empty() {
        return Err(ModelsError::Empty);
    }
    for (i, s) in specs.iter().enumerate() {
        if s.name.is_empty() || s.name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ModelsError::BadName(s.name.clone()));
        }
        if specs[..i].iter().any(|o| o.name == s.name) {
            return Err(ModelsError::Duplicate(s.name.clone()));
        }
    }
    Ok(())
}

/// The models a router serves, in the order configured; the first is the default.
pub struct ServedModels {
    models: Vec<Arc<ModelFacts>>,
}

impl ServedModels {
    /// `models` must be non-empty with unique names (see [`check_specs`]).
    pub fn new(models: Vec<ModelFacts>) -> ServedModels {
        assert!(!models.is_empty(), "a router serves at least one model");
        ServedModels { models: models.into_iter().map(Arc::new).collect() }
    }

    /// The model a request's `model` field names: empty is the default (the first).
    pub fn resolve(&self, name: &str) -> Result<&Arc<ModelFacts>, Status> {
        if name.is_empty() {
            return Ok(&self.models[0]);
        }
        self.models.iter().find(|m| m.name == name).ok_or_else(|| not_found(name, &self.names()))
    }

    /// The default model: the one a request naming none gets.
    pub fn default_model(&self) -> &Arc<ModelFacts> {
        &self.models[0]
    }

    /// Every served model, in the order configured.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<ModelFacts>> {
        self.models.iter()
    }

    pub fn names(&self) -> Vec<&str> {
        self.models.iter().map(|m| m.name.as_str()).collect()
    }
}

/// NOT_FOUND for a model no one serves here. The message starts with the field, as every
/// request error does, and names the model (HTTP maps it to 404 `model_not_found`).
pub fn not_found(name: &str, served: &[&str]) -> Status {
    Status::not_found(format!("model: unknown model {name:?}; this router serves {served:?}"))
}

/// The repository's small model under any name: the facts of the tests' models.
#[cfg(test)]
pub(crate) mod testing {
    use tandem_text::ModelText;

    use crate::validate::ModelFacts;

    /// SmolLM2's facts named `name` (the file is read at each call: a chat template is not
    /// `Clone`).
    pub(crate) fn facts(name: &str) -> ModelFacts {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let text = ModelText::open(std::path::Path::new(path))
            .unwrap_or_else(|e| panic!("{path}: {e} (scripts/fetch-model.sh fetches it)"));
        ModelFacts {
            name: name.into(),
            tokenizer: text.tokenizer,
            template: text.chat_template,
            max_model_len: text.config.context_length,
            vocab_size: text.config.vocab_size,
            guides: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::facts;
    use super::*;

    #[test]
    fn names_resolve_to_their_model_and_empty_to_the_first() {
        let served = ServedModels::new(vec![facts("smol"), facts("coder")]);
        let cases: [(&str, Result<&str, ()>); 5] =
            [("", Ok("smol")), ("smol", Ok("smol")), ("coder", Ok("coder")), ("Coder", Err(())), ("gpt-17", Err(()))];
        for (asked, want) in cases {
            match (served.resolve(asked), want) {
                (Ok(m), Ok(w)) => assert_eq!(m.name, w, "{asked:?}"),
                (Err(s), Err(())) => {
                    assert_eq!(s.code(), tonic::Code::NotFound, "{asked:?}");
                    assert!(s.message().starts_with("model: "), "{}", s.message());
                    assert!(s.message().contains(&format!("{asked:?}")), "names the model: {}", s.message());
                    assert!(s.message().contains("\"smol\", \"coder\""), "names the served: {}", s.message());
                }
                (got, w) => panic!("{asked:?}: got {:?}, wanted {w:?}", got.map(|m| m.name.clone())),
            }
        }
        assert_eq!(served.default_model().name, "smol");
        assert_eq!(served.names(), ["smol", "coder"]);
    }

    #[test]
    fn specs_need_one_model_and_unique_usable_names() {
        let spec = |n: &str| ModelSpec { name: n.into(), path: PathBuf::from("m.gguf") };
        assert_eq!(check_specs(&[]), Err(ModelsError::Empty));
        assert_eq!(check_specs(&[spec("a"), spec("b")]), Ok(()));
        assert_eq!(check_specs(&[spec("a"), spec("b"), spec("a")]), Err(ModelsError::Duplicate("a".into())));
        for bad in ["", "two words", "tab\tbed", "line\n"] {
            assert_eq!(check_specs(&[spec(bad)]), Err(ModelsError::BadName(bad.into())), "{bad:?}");
        }
    }
}
