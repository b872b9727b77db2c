//! [`ModelText`]: the one way a process opens a model file. It parses the GGUF once, reads
//! the model's config, builds the tokenizer (once per process: clones share it) and compiles
//! the chat template. A process that runs the model loads its weights from the parsed file
//! on the way ([`ModelText::open_with`]); the router takes the text side alone
//! ([`ModelText::open`]). The file's bytes are freed before either returns.

use std::path::Path;

use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::error::TextError;
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;

/// What a model file says about text: its shape, its tokenizer and its chat template.
#[derive(Debug)]
pub struct ModelText {
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    /// `None` when the model ships without a template (base models).
    pub chat_template: Option<ChatTemplate>,
}

impl ModelText {
    /// Reads the model file at `path`: config, tokenizer and chat template.
    pub fn open(path: &Path) -> Result<ModelText, TextError> {
        Self::open_with(path, |_| Ok::<(), TextError>(())).map(|(text, ())| text)
    }

    /// Reads the model file at `path` and runs `weights` on the parsed file (the engine
    /// loads its tensors there). `weights` runs after the config is read and before the
    /// tokenizer is built, the order every loader has always checked a file in, so a
    /// file's first fault is the one reported.
    pub fn open_with<W, E: From<TextError>>(
        path: &Path,
        weights: impl FnOnce(&GgufFile) -> Result<W, E>,
    ) -> Result<(ModelText, W), E> {
        let file = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&file)?;
        let loaded = weights(&file)?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let chat_template = ChatTemplate::from_gguf(&file)?;
        Ok((ModelText { config, tokenizer, chat_template }, loaded))
    }
}
