//! What a model is asked, as token ids: [`Prompt`] (text, a conversation or ids) and the
//! functions that turn it into the ids the model sees. The router and the engine's
//! `tandem generate` path both call them, so one input gives the same ids everywhere.

use crate::chat::{ChatMessage, ChatTemplate, Conversation};
use crate::error::TextError;
use crate::tokenizer::Tokenizer;

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Raw text; special tokens in it are parsed as special tokens.
    Text(String),
    /// A conversation, rendered with the model's chat template plus the generation prompt.
    Chat(Vec<ChatMessage>),
    /// Token ids as is.
    Tokens(Vec<u32>),
}

/// `prompt` as the model sees it: a chat rendered with `template` (and the generation
/// prompt appended), text tokenized with the tokenizer's BOS if the model asks for it,
/// token ids as they are. The router and `tandem generate` both call this, so the same
/// input gives the same ids on every path.
pub fn prompt_ids(tok: &Tokenizer, template: Option<&ChatTemplate>, prompt: &Prompt) -> Result<Vec<u32>, TextError> {
    match prompt {
        Prompt::Tokens(ids) => Ok(ids.clone()),
        // A raw prompt is the caller's markup: control tokens written in it are parsed.
        Prompt::Text(t) => Ok(with_bos(tok, tok.encode(t, true)?)),
        Prompt::Chat(messages) => {
            let template =
                template.ok_or_else(|| TextError::InvalidRequest("this model has no chat template".into()))?;
            Ok(chat_ids(tok, template, messages, true)?.0)
        }
    }
}

/// A conversation's prompt ids (with BOS if the model asks for it) and its rendered text.
/// Control-token text inside a message stays text (see [`ChatTemplate::render_chat`]).
pub fn chat_ids(
    tok: &Tokenizer,
    template: &ChatTemplate,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<(Vec<u32>, String), TextError> {
    conversation_ids(tok, template, Conversation::new(messages, add_generation_prompt))
}

/// [`chat_ids`] for a conversation that may offer tools and hold tool calls and results.
/// Control-token text in any of the client's strings stays text (see
/// [`ChatTemplate::render_chat_with`]).
pub fn conversation_ids(
    tok: &Tokenizer,
    template: &ChatTemplate,
    conv: Conversation<'_>,
) -> Result<(Vec<u32>, String), TextError> {
    let chat = template.render_chat_with(conv, tok)?;
    let ids = chat.ids(tok)?;
    // A template that writes `bos_token` itself (Llama 3's) already starts with BOS: one BOS
    // either way, as llama.cpp's server gives (it strips the template's and adds its own).
    let ids = if tok.bos_id().is_some() && ids.first() == tok.bos_id().as_ref() { ids } else { with_bos(tok, ids) };
    Ok((ids, chat.text(tok)))
}

fn with_bos(tok: &Tokenizer, text_ids: Vec<u32>) -> Vec<u32> {
    match tok.bos_id().filter(|_| tok.add_bos()) {
        Some(bos) => std::iter::once(bos).chain(text_ids).collect(),
        None => text_ids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::testing::{tiny, tiny_adding_bos};

    /// A template that writes `bos_token` first, as Llama 3's does, and one that does not.
    fn templates() -> (ChatTemplate, ChatTemplate) {
        let body = "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}";
        let with_bos = ChatTemplate::new(&format!("{{{{ bos_token }}}}{body}"), "<|im_start|>", "<|im_end|>").unwrap();
        (with_bos, ChatTemplate::new(body, "<|im_start|>", "<|im_end|>").unwrap())
    }

    #[test]
    fn one_bos_whoever_writes_it() {
        let (writes_bos, plain) = templates();
        let messages = [ChatMessage::new("user", "hi")];
        let (tok, no_bos) = (tiny_adding_bos(), tiny());
        let ids = |tok: &Tokenizer, t: &ChatTemplate| chat_ids(tok, t, &messages, false).unwrap().0;
        assert_eq!(ids(&tok, &writes_bos), vec![1, 259, 2], "the template's BOS, no second one");
        assert_eq!(ids(&tok, &plain), vec![1, 259, 2], "the model's BOS");
        assert_eq!(ids(&no_bos, &plain), vec![259, 2]);
        assert_eq!(ids(&no_bos, &writes_bos), vec![1, 259, 2]);
        // Raw text gets the model's BOS even when it starts with one, as llama.cpp gives.
        assert_eq!(prompt_ids(&tok, None, &Prompt::Text("<|im_start|>hi".into())).unwrap(), vec![1, 1, 259]);
    }
}
