//! Chat templates: the model's own Jinja template (GGUF `tokenizer.chat_template`, Hugging
//! Face `tokenizer_config.json`, or an ensemble manifest's `chat.jinja`), rendered with
//! `minijinja` the way `transformers`' `apply_chat_template` renders it. A model without one
//! gets ChatML, and says so (`fallback_warning`): a silent guess would hide a wrong prompt.

pub mod hf;
mod jinja;
#[cfg(test)]
mod tests;
mod tools;

use crate::error::{Error, Result};
use minijinja::{context, Environment};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// One message of a conversation, as OpenAI's API sends it: an assistant's message may carry
/// `tool_calls` (its `content` then `null`, read as empty), a `tool` message the result of the
/// call `tool_call_id` names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

/// The functions a request offers, as the prompt shows them (`runtime::tools::Tools::prompt`):
/// the `tools` list for a template that renders it, the system text for one that does not.
#[derive(Debug, Clone, Copy)]
pub struct ToolPrompt<'a> {
    pub list: &'a serde_json::Value,
    pub instructions: &'a str,
}

/// A Jinja chat template and the file it came from (named when it does not compile).
#[derive(Debug, Clone, Copy)]
pub struct TemplateSource<'a> {
    pub file: &'a str,
    pub jinja: &'a str,
}

/// The tokenizer's `bos_token` and `eos_token` as text, which templates write themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: String,
    pub eos: String,
}

/// ChatML, for models that carry no template; `default_system` (only older ensemble manifests
/// have one) opens a conversation that has no system message.
const CHATML: &str = r"{%- if default_system and messages and messages[0]['role'] != 'system' -%}
{{ '<|im_start|>system\n' + default_system + '<|im_end|>\n' }}
{%- endif -%}
{%- for message in messages -%}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<|im_start|>assistant\n' }}
{%- endif -%}";

pub const FALLBACK_WARNING: &str = "the model has no chat template (none in the GGUF's \
tokenizer.chat_template, tokenizer_config.json's chat_template or the manifest's chat.jinja): \
prompts use ChatML, which may not be the format the model was trained on";

/// A compiled chat template: compiled once, rendered for every request.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    /// The model's Jinja source; `None` for the ChatML fallback.
    source: Option<Arc<str>>,
    default_system: Option<String>,
    tokens: SpecialTokens,
    /// Whether the template renders `tools` (it wrote a probe function's name).
    knows_tools: bool,
}

impl ChatTemplate {
    /// The model's template, or a `Format` error naming its file and the Jinja error.
    pub fn from_jinja(t: TemplateSource, tokens: SpecialTokens) -> Result<Self> {
        let env = jinja::compile(t.jinja.to_string()).map_err(|e| {
            Error::format(t.file, format!("the chat template does not compile: {e}"))
        })?;
        let mut t = ChatTemplate {
            env: Arc::new(env),
            source: Some(t.jinja.into()),
            default_system: None,
            tokens,
            knows_tools: false,
        };
        t.knows_tools = tools::knows_tools(&t);
        Ok(t)
    }

    /// ChatML, for a model without a template (see `fallback_warning`).
    pub fn chatml_fallback(default_system: Option<&str>, tokens: SpecialTokens) -> Self {
        let env =
            jinja::compile(CHATML.to_string()).expect("the built-in ChatML template compiles");
        ChatTemplate {
            env: Arc::new(env),
            source: None,
            default_system: default_system.map(str::to_string),
            tokens,
            knows_tools: false,
        }
    }

    /// The model's template when there is one, else the ChatML fallback.
    pub fn new(t: Option<TemplateSource>, tokens: SpecialTokens) -> Result<Self> {
        match t {
            Some(t) => Self::from_jinja(t, tokens),
            None => Ok(Self::chatml_fallback(None, tokens)),
        }
    }

    /// The model's own Jinja source (`None` when this is the ChatML fallback).
    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    /// What to tell the user when prompts are ChatML because the model has no template.
    pub fn fallback_warning(&self) -> Option<&'static str> {
        self.source.is_none().then_some(FALLBACK_WARNING)
    }

    /// Whether the template renders the `tools` it is given (Qwen 2.5, Llama 3.1, Hermes, ...).
    pub fn knows_tools(&self) -> bool {
        self.knows_tools
    }

    /// The prompt text for `messages`, ending with the assistant's turn opener
    /// (`add_generation_prompt`). A template's `raise_exception(msg)` (roles out of order, a
    /// role it does not know) is an `Input` error quoting `msg`.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        self.render_with_tools(messages, None)
    }

    /// `render` with the functions a request offers. A template that knows tools gets them
    /// and the conversation's calls as they are (arguments as objects, as `transformers`
    /// passes them); for one that does not, the functions are described in the system
    /// message, calls written as the JSON the model is asked for and results as user messages
    /// (`tools::for_plain_template`).
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: Option<ToolPrompt>,
    ) -> Result<String> {
        let has_calls = messages
            .iter()
            .any(|m| m.tool_calls.is_some() || m.role == "tool");
        if self.knows_tools {
            let messages = tools::arguments_as_objects(messages);
            return self.render_raw(&messages, tools.map(|t| t.list));
        }
        if tools.is_none() && !has_calls {
            return self.render_raw(messages, None);
        }
        let messages = tools::for_plain_template(messages, tools.map(|t| t.instructions));
        self.render_raw(&messages, None)
    }

    fn render_raw(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(jinja::TEMPLATE_NAME)
            .expect("compiled with this name");
        let ctx = context! {
            messages => minijinja::value::Serde(messages),
            add_generation_prompt => true,
            bos_token => &self.tokens.bos,
            eos_token => &self.tokens.eos,
            // As transformers passes them: defined, and none without tools.
            tools => tools.map(minijinja::value::Serde),
            documents => (),
            default_system => self.default_system.as_deref(),
        };
        template
            .render(ctx)
            .map_err(|e| match jinja::raised_message(&e) {
                Some(msg) => Error::input(format!(
                    "the chat template rejected the conversation: {msg}"
                )),
                None => Error::input(format!("the chat template failed: {e}")),
            })
    }
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match &self.source {
            Some(s) => write!(f, "the model's Jinja template ({} bytes)", s.len()),
            None => write!(f, "ChatML (fallback: the model has no template)"),
        }
    }
}
