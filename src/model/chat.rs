//! Chat templates. Only ChatML (`<|im_start|>role\n...<|im_end|>\n`) is implemented, read off
//! the model's Jinja template rather than evaluating Jinja.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, PartialEq)]
pub enum ChatTemplate {
    /// ChatML; `default_system` is inserted when the conversation has no system message.
    ChatMl { default_system: Option<String> },
    /// No template known: messages are joined as plain text.
    Plain,
}

impl ChatTemplate {
    pub fn detect(jinja: Option<&str>, has_im_start: bool) -> Self {
        match jinja {
            Some(t) if t.contains("<|im_start|>") => ChatTemplate::ChatMl {
                default_system: default_system(t),
            },
            None if has_im_start => ChatTemplate::ChatMl {
                default_system: None,
            },
            _ => ChatTemplate::Plain,
        }
    }

    /// The prompt text for `messages`, ending with the assistant's turn opener.
    pub fn render(&self, messages: &[Message]) -> String {
        let mut s = String::new();
        match self {
            ChatTemplate::ChatMl { default_system } => {
                if let (Some(sys), Some(first)) = (default_system, messages.first()) {
                    if first.role != "system" {
                        s += &format!("<|im_start|>system\n{sys}<|im_end|>\n");
                    }
                }
                for m in messages {
                    s += &format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content);
                }
                s += "<|im_start|>assistant\n";
            }
            ChatTemplate::Plain => {
                for m in messages {
                    s += &format!("{}: {}\n", m.role, m.content);
                }
                s += "assistant: ";
            }
        }
        s
    }
}

/// Pulls the literal default system prompt out of a ChatML Jinja template such as SmolLM2's
/// `{{ '<|im_start|>system\nYou are ...<|im_end|>\n' }}`.
fn default_system(t: &str) -> Option<String> {
    let start = t.find("<|im_start|>system\n")? + "<|im_start|>system\n".len();
    let len = t[start..].find("<|im_end|>")?;
    let sys = &t[start..start + len];
    (!sys.contains('{') && !sys.is_empty()).then(|| sys.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_inserts_default_system_once() {
        let t = ChatTemplate::detect(
            Some("{{ '<|im_start|>system\nYou are X<|im_end|>\n' }}{{'<|im_start|>' + message['role']}}"),
            true,
        );
        let p = t.render(&[Message::new("user", "hi")]);
        assert_eq!(
            p,
            "<|im_start|>system\nYou are X<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let p = t.render(&[Message::new("system", "S"), Message::new("user", "hi")]);
        assert!(p.starts_with("<|im_start|>system\nS<|im_end|>\n<|im_start|>user"));
    }
}
