//! Chat templates: the Jinja template a model ships (a GGUF's `tokenizer.chat_template`, or a
//! Hugging Face `tokenizer_config.json`'s `chat_template`) rendered with `minijinja`, the way
//! `transformers`' `apply_chat_template` does: variables `messages` (`role`, `content`),
//! `add_generation_prompt`, `bos_token`, `eos_token`, and the function `raise_exception`.

use anyhow::{anyhow, Result};
use serde::Serialize;

/// One chat message.
#[derive(Clone, Debug, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Render `messages` with `template`; `add_generation_prompt` appends the assistant's header.
pub fn render(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos: &str,
    eos: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| anyhow!("the model's chat template does not parse: {e}"))?;
    let t = env.get_template("chat").map_err(|e| anyhow!("{e}"))?;
    t.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos,
        eos_token => eos,
    })
    .map_err(|e| anyhow!("cannot render the chat template: {e}"))
}

/// Marks where the user's content goes when a prompt is split around it.
const MARK: &str = "\u{E000}mnemo-split\u{E000}";

/// A single-turn prompt for `tok`, split around the point where `user_content` starts:
/// `(before, after)` such that the full prompt is `before + user_content + after`. Without a
/// chat template: `("", "")`. With one: the rendered user turn plus the assistant header.
pub fn split_prompt(tok: &crate::tokenizer::Tokenizer) -> Result<(String, String)> {
    let Some(tpl) = tok.chat_template() else {
        return Ok((String::new(), String::new()));
    };
    let eos = tok.id_to_token(tok.eot()).unwrap_or_default();
    let out = render(tpl, &[Message::new("user", MARK)], true, "", &eos)?;
    let (a, b) = out
        .split_once(MARK)
        .ok_or_else(|| anyhow!("the chat template drops the user's message"))?;
    Ok((a.to_string(), b.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2's template (ChatML with a default system prompt), as stored in its GGUF.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_like_transformers() {
        let out = render(SMOLLM2, &[Message::new("user", "Hi")], true, "", "").unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let err = render(
            "{{ raise_exception('no system role') }}",
            &[],
            false,
            "",
            "",
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("no system role"));
        assert!(render("{% for %}", &[], false, "", "").is_err());
    }
}
