//! What a Hugging Face `tokenizer_config.json` says about chat: its `chat_template` (a string,
//! or a list of named templates of which the one named "default" is the chat template) and
//! its `bos_token` / `eos_token` (a string, or an AddedToken object with a `content`).

use crate::error::{Error, Result};
use serde_json::Value;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HfChatConfig {
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl HfChatConfig {
    /// Reads the fields above from the bytes of `file`; other fields are ignored.
    pub fn from_json(file: &str, bytes: &[u8]) -> Result<Self> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::format(file, format!("not JSON: {e}")))?;
        let err = |r: &str| Error::format(file, r);
        let chat_template = match v.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(named)) => {
                let default = named
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .ok_or_else(|| {
                        err("chat_template is a list with no template named \"default\"")
                    })?;
                let t = default.get("template").and_then(Value::as_str);
                Some(
                    t.ok_or_else(|| err("chat_template \"default\" has no string `template`"))?
                        .to_string(),
                )
            }
            Some(_) => {
                return Err(err(
                    "chat_template is neither a string nor a list of named templates",
                ))
            }
        };
        let token = |key: &str| -> Result<Option<String>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(t) => match t.get("content").and_then(Value::as_str) {
                    Some(s) => Ok(Some(s.to_string())),
                    None => Err(Error::format(
                        file,
                        format!("{key} is neither a string nor a token with a `content`"),
                    )),
                },
            }
        };
        Ok(HfChatConfig {
            chat_template,
            bos_token: token("bos_token")?,
            eos_token: token("eos_token")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_string_a_named_list_and_added_tokens() {
        let c = HfChatConfig::from_json(
            "t.json",
            br#"{"chat_template": "T", "bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": false}}"#,
        )
        .unwrap();
        assert_eq!(c.chat_template.as_deref(), Some("T"));
        assert_eq!(
            (c.bos_token.as_deref(), c.eos_token.as_deref()),
            (Some("<s>"), Some("</s>"))
        );
        let c = HfChatConfig::from_json(
            "t.json",
            br#"{"chat_template": [{"name": "tool_use", "template": "X"}, {"name": "default", "template": "D"}]}"#,
        )
        .unwrap();
        assert_eq!(c.chat_template.as_deref(), Some("D"));
        assert_eq!(
            HfChatConfig::from_json("t.json", b"{}").unwrap(),
            HfChatConfig::default()
        );
    }

    #[test]
    fn malformed_fields_name_the_file() {
        for bad in [
            &br#"{"chat_template": 3}"#[..],
            br#"{"chat_template": [{"name": "rag", "template": "X"}]}"#,
            br#"{"bos_token": 1}"#,
            b"not json",
        ] {
            let e = HfChatConfig::from_json("dir/tokenizer_config.json", bad).unwrap_err();
            assert!(
                e.to_string().starts_with("dir/tokenizer_config.json: "),
                "{e}"
            );
        }
    }
}
