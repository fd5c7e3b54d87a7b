//! A chat request (OpenAI's `chat.completions.create` body) and its validation, shared by the
//! browser (`web::api` reads it from a JS object) and native code (`from_json`: the same
//! checks, so they are unit-tested and fuzzed without a browser).
//!
//! The OpenAI fields this engine implements, and those it accepts and ignores with reason
//! (`model`, `user`: one model per engine; `stream_options`: the final chunk always carries
//! `usage`). Any other field is
//! rejected as unsupported rather than silently ignored (see `KNOWN`).

use crate::error::{Error, Result};
use crate::model::chat::Message;
use crate::runtime::generate::Sampling;
use crate::runtime::json_mode::Schema;
use crate::runtime::json_schema;
use crate::runtime::session::MAX_TOP_LOGPROBS;
use crate::runtime::stop_text::StopText;
use crate::runtime::tools::Tools;
use serde::Deserialize;
use std::sync::Arc;

/// Most answers one request may ask for (`n`): they are generated one after the other.
pub const MAX_CHOICES: u32 = 8;

/// Most alternatives a text completion's `logprobs` may ask for (OpenAI's legacy limit).
pub const MAX_TEXT_LOGPROBS: u64 = 5;

/// Most prompts one text completion may list (each answered `n` times, one after the other).
pub const MAX_PROMPTS: usize = 64;

/// Most answers one text completion may ask for in all (prompts x `n`).
pub const MAX_ANSWERS: usize = 64;

/// One prompt of a text completion: text to tokenize, or token ids of this model's vocabulary
/// (as evaluation harnesses send them, tokenized by the same tokenizer).
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt<'a> {
    Text(&'a str),
    Tokens(Vec<u32>),
}

/// Which endpoint a request came to: `chat.completions` (`messages`, rendered by the model's
/// chat template) or `completions` (a `prompt` continued as it is, OpenAI's legacy text
/// completions). Both share the sampling, length, stop and `n` fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Text,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// Required for chat (an empty list is an error); absent from a text completion.
    #[serde(default)]
    pub messages: Vec<Message>,
    /// What a text completion continues (`Endpoint::Text` only): a string, a list of strings,
    /// token ids, or a list of token-id lists (`ChatRequest::text_prompts`).
    pub prompt: Option<serde_json::Value>,
    pub max_tokens: Option<usize>,
    /// OpenAI's newer name for `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub seed: Option<f64>,
    pub model: Option<serde_json::Value>,
    pub user: Option<serde_json::Value>,
    pub stream_options: Option<serde_json::Value>,
    /// A string or a list of strings (`stop_text`).
    pub stop: Option<serde_json::Value>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    /// `{token id: bias}` (`logit_bias`).
    pub logit_bias: Option<serde_json::Value>,
    /// How many answers (`choices`).
    pub n: Option<u32>,
    /// Chat: `true` for log-probabilities (`top_logprobs` alternatives); a text completion:
    /// how many alternatives, 0..=`MAX_TEXT_LOGPROBS` (`ChatRequest::logprobs_for`).
    pub logprobs: Option<serde_json::Value>,
    /// A text completion's text starts with its prompt (OpenAI's legacy `echo`).
    pub echo: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub response_format: Option<serde_json::Value>,
    /// Functions the model may call (`ChatRequest::tools`).
    pub tools: Option<serde_json::Value>,
    pub tool_choice: Option<serde_json::Value>,
    /// `false`: an answer makes one call at most (by default up to `tools::MAX_CALLS`).
    pub parallel_tool_calls: Option<bool>,
    /// Generate `max_tokens` even past the end-of-turn token (benchmarks; vLLM's name).
    pub ignore_eos: Option<bool>,
}

impl ChatRequest {
    /// Every field `ChatRequest` has, and `stream` (the JS wrapper's). (serde-wasm-bindgen reads
    /// a struct's fields by name, so `deny_unknown_fields` never sees the others: `check_keys`.)
    pub const KNOWN: [&'static str; 23] = [
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "model",
        "user",
        "stream_options",
        "n",
        "stop",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "ignore_eos",
        "stream",
    ];

    /// The fields a text completion (`Endpoint::Text`) takes: `prompt`, `echo`, `logprobs` (a
    /// count, as OpenAI's legacy endpoint has it), and the chat fields about sampling, length,
    /// stopping and `n` (no tools or JSON mode).
    pub const KNOWN_TEXT: [&'static str; 18] = [
        "prompt",
        "echo",
        "logprobs",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "model",
        "user",
        "stream_options",
        "n",
        "stop",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "ignore_eos",
        "stream",
    ];

    /// An unknown key of a chat request object is `Unsupported`, naming it.
    pub fn check_keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<()> {
        Self::check_keys_for(Endpoint::Chat, keys)
    }

    /// An unknown key of a request to `endpoint` is `Unsupported`, naming it.
    pub fn check_keys_for<'a>(
        endpoint: Endpoint,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Result<()> {
        let (known, what): (&[&str], _) = match endpoint {
            Endpoint::Chat => (&Self::KNOWN, "chat request"),
            Endpoint::Text => (&Self::KNOWN_TEXT, "completion request"),
        };
        match keys.into_iter().find(|k| !known.contains(k)) {
            Some(k) => Err(Error::Unsupported(format!(
                "{what}: unknown field `{k}` (see js/API.md for the fields)"
            ))),
            None => Ok(()),
        }
    }

    /// A text completion's prompts, in OpenAI's four forms: a string, a list of strings, a list
    /// of token ids (one prompt), or a list of such lists; none empty, at most `MAX_PROMPTS`.
    /// Token ids are checked against the vocabulary where the tokenizer is (`Engine`).
    pub fn text_prompts(&self) -> Result<Vec<Prompt<'_>>> {
        use serde_json::Value;
        let bad = |m: String| Error::input(format!("completion request: `prompt{m}"));
        let tokens = |v: &[Value], at: &str| -> Result<Vec<u32>> {
            v.iter()
                .enumerate()
                .map(|(i, t)| {
                    t.as_u64()
                        .and_then(|t| u32::try_from(t).ok())
                        .ok_or_else(|| bad(format!("{at}[{i}]` must be a token id (got {t})")))
                })
                .collect()
        };
        let prompts = match &self.prompt {
            None | Some(Value::Null) => {
                return Err(Error::input(
                    "completion request: `prompt` is missing (a string to continue)",
                ))
            }
            Some(Value::String(s)) => vec![Prompt::Text(s)],
            Some(Value::Array(a)) if a.first().is_some_and(Value::is_number) => {
                vec![Prompt::Tokens(tokens(a, "")?)]
            }
            Some(Value::Array(a)) => {
                if a.len() > MAX_PROMPTS {
                    return Err(bad(format!(
                        "` lists {} prompts, at most {MAX_PROMPTS}",
                        a.len()
                    )));
                }
                a.iter()
                    .enumerate()
                    .map(|(i, p)| match p {
                        Value::String(s) => Ok(Prompt::Text(s)),
                        Value::Array(t) => Ok(Prompt::Tokens(tokens(t, &format!("[{i}]"))?)),
                        _ => Err(bad(format!(
                            "[{i}]` must be a string or a list of token ids"
                        ))),
                    })
                    .collect::<Result<_>>()?
            }
            Some(v) => {
                return Err(bad(format!(
                    "` must be a string, a list of strings or token ids (got {v})"
                )))
            }
        };
        if prompts.is_empty() {
            return Err(bad("` is an empty list".into()));
        }
        let many = prompts.len() > 1;
        for (i, p) in prompts.iter().enumerate() {
            let empty = match p {
                Prompt::Text(s) => s.is_empty(),
                Prompt::Tokens(t) => t.is_empty(),
            };
            if empty {
                let at = if many {
                    format!("[{i}]")
                } else {
                    String::new()
                };
                return Err(bad(format!("{at}` is empty")));
            }
        }
        Ok(prompts)
    }

    /// Whether a text completion's choices start with their prompt (`echo: true`). With
    /// `logprobs` the prompt's tokens come scored too (`TurnOptions::prompt_logprobs`), as in
    /// OpenAI's legacy endpoint; `max_tokens: 0` then scores the prompt alone.
    pub fn echo_for(&self, endpoint: Endpoint) -> bool {
        endpoint == Endpoint::Text && self.echo == Some(true)
    }

    /// `tools` and `tool_choice` (`runtime::tools`); `None` without tools. Beside a
    /// `response_format` JSON, an answer is calls or that JSON (`tools::turn_constraint`).
    pub fn tools(&self) -> Result<Option<Tools>> {
        Ok(
            Tools::parse(self.tools.as_ref(), self.tool_choice.as_ref())?
                .map(|t| t.parallel(self.parallel_tool_calls)),
        )
    }

    /// The schema the answer is held to (`json_mode`): `{type: "json_object"}` any object,
    /// `{type: "json_schema", json_schema: {schema}}` one that follows `schema`
    /// (`json_schema::parse`); `{type: "text"}` or none is free text (`None`). Anything else is
    /// an error naming the field.
    pub fn json_mode(&self) -> Result<Option<Arc<Schema>>> {
        Ok(self.response_schema()?.map(|(s, _)| s))
    }

    /// `json_mode`, and what of a schema that is not `strict` is left free (and why:
    /// `json_schema::parse_loose`); `strict: true`: all enforced, or an `unsupported` error.
    pub fn response_schema(&self) -> Result<Option<(Arc<Schema>, Vec<String>)>> {
        let Some(f) = self.response_format.as_ref().filter(|f| !f.is_null()) else {
            return Ok(None);
        };
        match f.get("type").and_then(|t| t.as_str()) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some((Arc::new(Schema::AnyObject), Vec::new()))),
            Some("json_schema") => {
                let j = f.get("json_schema");
                let strict = match j.and_then(|j| j.get("strict")) {
                    None | Some(serde_json::Value::Null) => false,
                    Some(serde_json::Value::Bool(b)) => *b,
                    Some(_) => {
                        return Err(Error::input(
                            "chat request: response_format.json_schema.strict must be a boolean",
                        ))
                    }
                };
                match j.and_then(|j| j.get("schema")) {
                    Some(s) if strict => Ok(Some((json_schema::parse(s)?, Vec::new()))),
                    Some(s) => {
                        json_schema::parse_loose(s, "response_format json_schema", "schema")
                            .map(Some)
                    }
                    None => Err(Error::input(
                        "chat request: response_format json_schema: expected {json_schema: {name, schema}}",
                    )),
                }
            }
            _ => Err(Error::input(
                "chat request: response_format: expected {type: \"text\"}, {type: \"json_object\"} or {type: \"json_schema\"}",
            )),
        }
    }

    /// OpenAI's `n`: how many answers (1 when absent), at most `MAX_CHOICES`.
    pub fn choices(&self) -> Result<u32> {
        match self.n.unwrap_or(1) {
            n @ 1..=MAX_CHOICES => Ok(n),
            n => Err(Error::input(format!(
                "chat request: n {n} must be in 1..={MAX_CHOICES}"
            ))),
        }
    }

    /// `n` answers for each of `prompts` prompts: at most `MAX_ANSWERS` in all.
    pub fn answers(&self, prompts: usize) -> Result<u32> {
        let n = self.choices()?;
        let all = prompts * n as usize;
        if all > MAX_ANSWERS {
            return Err(Error::input(format!(
                "completion request: {prompts} prompts x n {n} = {all} answers, at most {MAX_ANSWERS}"
            )));
        }
        Ok(n)
    }

    /// OpenAI's `logprobs` / `top_logprobs`: `Some(alternatives)` when log-probabilities are
    /// asked for (`TurnOptions::logprobs`). `top_logprobs` without `logprobs: true`, or above
    /// `MAX_TOP_LOGPROBS`, is an input error naming it.
    pub fn logprobs(&self) -> Result<Option<usize>> {
        self.logprobs_for(Endpoint::Chat)
    }

    /// `logprobs` as `endpoint` takes it: chat's boolean (with `top_logprobs`), or a text
    /// completion's count of alternatives (0..=`MAX_TEXT_LOGPROBS`: each token's log-probability
    /// comes with that many alternatives). The other kind is an input error naming the field.
    pub fn logprobs_for(&self, endpoint: Endpoint) -> Result<Option<usize>> {
        use serde_json::Value;
        let asked = self.logprobs.as_ref().filter(|v| !v.is_null());
        if endpoint == Endpoint::Text {
            return match asked {
                None => Ok(None),
                Some(Value::Number(n)) => match n.as_u64() {
                    Some(k) if k <= MAX_TEXT_LOGPROBS => Ok(Some(k as usize)),
                    _ => Err(Error::input(format!(
                        "completion request: logprobs {n} must be a whole number in 0..={MAX_TEXT_LOGPROBS}"
                    ))),
                },
                Some(v) => Err(Error::input(format!(
                    "completion request: logprobs must be how many alternatives to return, 0..={MAX_TEXT_LOGPROBS} (got {v})"
                ))),
            };
        }
        let top = self.top_logprobs.unwrap_or(0) as usize;
        if top > MAX_TOP_LOGPROBS {
            return Err(Error::input(format!(
                "chat request: top_logprobs {top} is more than {MAX_TOP_LOGPROBS}"
            )));
        }
        match asked {
            Some(Value::Bool(true)) => Ok(Some(top)),
            Some(Value::Bool(false)) | None if top > 0 => Err(Error::input(
                "chat request: top_logprobs needs logprobs: true",
            )),
            Some(Value::Bool(false)) | None => Ok(None),
            Some(v) => Err(Error::input(format!(
                "chat request: logprobs must be true or false (top_logprobs: how many alternatives; got {v})"
            ))),
        }
    }

    /// The sampling settings asked for (`Sampling::chat` where a field is absent; `seed`
    /// when the request has none), validated.
    pub fn sampling(&self, seed: u64) -> Result<Sampling> {
        if self.messages.is_empty() && self.prompt.is_none() {
            return Err(Error::input("chat request: no messages"));
        }
        let d = Sampling::chat();
        let s = Sampling {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_p: self.top_p.unwrap_or(d.top_p),
            top_k: self.top_k.unwrap_or(d.top_k),
            max_tokens: self
                .max_tokens
                .or(self.max_completion_tokens)
                .unwrap_or(d.max_tokens),
            seed: self.seed.map_or(seed, |s| s as u64),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            logit_bias: self.logit_bias()?,
        };
        s.validate()
            .map_err(|e| Error::input(format!("chat request: {e}")))?;
        if s.max_tokens == 0 && !(self.prompt.is_some() && self.echo == Some(true)) {
            return Err(Error::input(
                "chat request: max_tokens must be at least 1 (0 only for a completion with `echo`: the prompt alone, scored with `logprobs`)",
            ));
        }
        Ok(s)
    }

    /// `logit_bias`: an object from token ids (decimal strings, as JSON keys are) to a bias.
    fn logit_bias(&self) -> Result<Vec<(u32, f32)>> {
        let bad = |m: String| Error::input(format!("chat request: logit_bias{m}"));
        let Some(v) = self.logit_bias.as_ref().filter(|v| !v.is_null()) else {
            return Ok(Vec::new());
        };
        let o = v
            .as_object()
            .ok_or_else(|| bad(": expected an object {token id: bias}".into()))?;
        o.iter()
            .map(|(k, b)| {
                let id = k
                    .parse::<u32>()
                    .map_err(|_| bad(format!(": key `{k}` is not a token id")))?;
                let b = b
                    .as_f64()
                    .ok_or_else(|| bad(format!("[{k}]: expected a number")))?;
                Ok((id, b as f32))
            })
            .collect()
    }

    /// `stop`: a string or a list of strings (checked by `StopText::new`).
    pub fn stop_text(&self) -> Result<StopText> {
        let bad = |m: &str| Error::input(format!("chat request: stop{m}"));
        let stops = match self.stop.as_ref() {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|s| s.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad(": expected strings"))?,
            Some(_) => return Err(bad(": expected a string or a list of strings")),
        };
        StopText::new(stops).map_err(|e| Error::input(format!("chat request: {e}")))
    }

    /// A request from JSON bytes with every check the browser makes: keys, types, unsupported
    /// fields, sampling (the seed defaults to 0 here) and stop strings.
    pub fn from_json(bytes: &[u8]) -> Result<(ChatRequest, Sampling, StopText)> {
        let v: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::input(format!("chat request: {e}")))?;
        if let Some(o) = v.as_object() {
            Self::check_keys(o.keys().map(String::as_str))?;
        }
        let r: ChatRequest =
            serde_json::from_value(v).map_err(|e| Error::input(format!("chat request: {e}")))?;
        r.json_mode()?;
        r.tools()?;
        r.logprobs()?;
        r.choices()?;
        let s = r.sampling(0)?;
        let stop = r.stop_text()?;
        Ok((r, s, stop))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<(ChatRequest, Sampling, StopText)> {
        ChatRequest::from_json(s.as_bytes())
    }

    #[test]
    fn a_plain_request_gets_the_defaults() {
        let (r, s, _) =
            parse(r#"{"messages":[{"role":"user","content":"Hi"}],"stream":true}"#).unwrap();
        assert_eq!(r.messages.len(), 1);
        let d = Sampling::chat();
        assert_eq!(
            (s.temperature, s.top_p, s.max_tokens),
            (d.temperature, d.top_p, d.max_tokens)
        );
    }

    #[test]
    fn json_object_and_json_schema_are_json_mode_and_text_is_not() {
        let with = |f: &str| {
            let (r, _, _) = parse(&format!(
                r#"{{"messages":[{{"role":"user","content":"x"}}],"response_format":{f}}}"#
            ))
            .unwrap();
            r.json_mode().unwrap()
        };
        assert_eq!(
            with(r#"{"type":"json_object"}"#).as_deref(),
            Some(&Schema::AnyObject)
        );
        let s = with(
            r#"{"type":"json_schema","json_schema":{"name":"x","strict":true,"schema":{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"],"additionalProperties":false}}}"#,
        );
        assert!(matches!(s.as_deref(), Some(Schema::Object(p)) if p.len() == 1 && p[0].required));
        assert_eq!(with(r#"{"type":"text"}"#), None);
        assert_eq!(with("null"), None);
        // Not strict: what the automaton cannot hold to is left out, and said.
        let loose = |strict: &str| {
            parse(&format!(
                r#"{{"messages":[{{"role":"user","content":"x"}}],"response_format":{{"type":"json_schema","json_schema":{{{strict}"schema":{{"type":"object","properties":{{"a":{{"type":"string","format":"iri"}},"b":{{"type":"integer"}}}},"required":["b"]}}}}}}}}"#
            ))
            .and_then(|(r, _, _)| r.response_schema())
        };
        for strict in ["", r#""strict":false,"#, r#""strict":null,"#] {
            let (s, relaxed) = loose(strict).unwrap().unwrap();
            // The format left out: `a` any string.
            assert!(
                matches!(&*s, Schema::Object(p) if *p[0].schema == Schema::String(None)
                && *p[1].schema == Schema::Number { integer: true })
            );
            assert_eq!(relaxed.len(), 1);
            assert!(
                relaxed[0].contains("schema.properties.a.format"),
                "{relaxed:?}"
            );
        }
        let e = loose(r#""strict":true,"#).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
        assert!(loose(r#""strict":1,"#)
            .unwrap_err()
            .to_string()
            .contains("strict"));
    }

    #[test]
    fn text_completions_take_a_prompt_and_the_sampling_fields_only() {
        let keys = |k: &[&str]| ChatRequest::check_keys_for(Endpoint::Text, k.iter().copied());
        keys(&[
            "prompt",
            "max_tokens",
            "stop",
            "n",
            "stream",
            "seed",
            "echo",
            "logprobs",
        ])
        .unwrap();
        for k in [
            "messages",
            "tools",
            "response_format",
            "top_logprobs",
            "suffix",
        ] {
            let e = keys(&["prompt", k]).unwrap_err().to_string();
            assert!(
                e.contains(&format!("completion request: unknown field `{k}`")),
                "{e}"
            );
        }
        let chat = ChatRequest::check_keys(["messages", "prompt"]).unwrap_err();
        assert!(chat.to_string().contains("`prompt`"), "{chat}");
        let r = |j: &str| serde_json::from_str::<ChatRequest>(j).unwrap();
        let prompts = |j: &str| r(j).text_prompts().map(|p| format!("{p:?}"));
        assert_eq!(
            prompts(r#"{"prompt":"Once"}"#).unwrap(),
            r#"[Text("Once")]"#
        );
        assert_eq!(
            prompts(r#"{"prompt":["a","b"]}"#).unwrap(),
            r#"[Text("a"), Text("b")]"#
        );
        assert_eq!(prompts(r#"{"prompt":[5,6]}"#).unwrap(), "[Tokens([5, 6])]");
        assert_eq!(
            prompts(r#"{"prompt":[[5],"b"]}"#).unwrap(),
            r#"[Tokens([5]), Text("b")]"#
        );
        for (bad, why) in [
            (r#"{"prompt":""}"#, "`prompt` is empty"),
            (r#"{"max_tokens":3}"#, "`prompt` is missing"),
            (r#"{"prompt":null}"#, "`prompt` is missing"),
            (r#"{"prompt":[]}"#, "`prompt` is an empty list"),
            (r#"{"prompt":["a",""]}"#, "`prompt[1]` is empty"),
            (r#"{"prompt":[[1],[]]}"#, "`prompt[1]` is empty"),
            (r#"{"prompt":[1,-2]}"#, "`prompt[1]` must be a token id"),
            (r#"{"prompt":[1,"a"]}"#, "`prompt[1]` must be a token id"),
            (
                r#"{"prompt":[[1,2.5]]}"#,
                "`prompt[0][1]` must be a token id",
            ),
            (r#"{"prompt":["a",{}]}"#, "`prompt[1]` must be a string or"),
            (r#"{"prompt":3}"#, "`prompt` must be a string"),
        ] {
            let e = prompts(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let r8 = r(r#"{"prompt":"a","n":8}"#);
        assert_eq!(r8.answers(MAX_ANSWERS / 8).unwrap(), 8);
        let e = r8.answers(MAX_ANSWERS / 8 + 1).unwrap_err().to_string();
        assert!(e.contains("answers, at most"), "{e}");
        let many = format!(r#"{{"prompt":{:?}}}"#, vec!["a"; MAX_PROMPTS + 1]);
        let e = prompts(&many).unwrap_err().to_string();
        assert!(e.contains("prompts, at most"), "{e}");
        assert!(r(r#"{"prompt":"Once"}"#).sampling(0).is_ok());
    }

    #[test]
    fn logprobs_is_a_flag_in_chat_and_a_count_in_a_text_completion() {
        let r = |j: &str| serde_json::from_str::<ChatRequest>(j).unwrap();
        let text = |j: &str| r(j).logprobs_for(Endpoint::Text);
        assert_eq!(text(r#"{"prompt":"a"}"#).unwrap(), None);
        assert_eq!(text(r#"{"prompt":"a","logprobs":null}"#).unwrap(), None);
        assert_eq!(text(r#"{"prompt":"a","logprobs":0}"#).unwrap(), Some(0));
        assert_eq!(text(r#"{"prompt":"a","logprobs":5}"#).unwrap(), Some(5));
        for bad in ["6", "2.5", "-1", "true", "\"3\""] {
            let e = text(&format!(r#"{{"prompt":"a","logprobs":{bad}}}"#))
                .unwrap_err()
                .to_string();
            assert!(e.contains("completion request: logprobs"), "{bad}: {e}");
        }
        let chat = |j: &str| r(j).logprobs_for(Endpoint::Chat);
        assert_eq!(
            chat(r#"{"logprobs":true,"top_logprobs":3}"#).unwrap(),
            Some(3)
        );
        assert_eq!(chat(r#"{"logprobs":false}"#).unwrap(), None);
        let e = chat(r#"{"logprobs":2}"#).unwrap_err().to_string();
        assert!(e.contains("logprobs must be true or false"), "{e}");
        let echo = |j: &str| r(j).echo_for(Endpoint::Text);
        assert!(echo(r#"{"prompt":"a","echo":true}"#));
        assert!(!echo(r#"{"prompt":"a","echo":false}"#));
        assert!(!r(r#"{"prompt":"a","echo":true}"#).echo_for(Endpoint::Chat));
        // max_tokens 0: the prompt alone, only for an echoed completion.
        let zero = |j: &str| r(j).sampling(0).map(|s| s.max_tokens);
        assert_eq!(
            zero(r#"{"prompt":"a","echo":true,"logprobs":0,"max_tokens":0}"#).unwrap(),
            0
        );
        for bad in [
            r#"{"prompt":"a","max_tokens":0}"#,
            r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
        ] {
            let e = zero(bad).unwrap_err().to_string();
            assert!(e.contains("max_tokens must be at least 1"), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_requests_name_the_field() {
        let cases = [
            (r#"{"messages":[],"foo":1}"#, "`foo`"),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"n":9}"#,
                "n 9",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}"#,
                "tools[0].function",
            ),
            (r#"{"messages":[]}"#, "no messages"),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"top_p":0}"#,
                "top_p",
            ),
            (r#"{"messages":"x"}"#, "invalid type"),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"a":1}}"#,
                "logit_bias",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"stop":3}"#,
                "stop",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema"}}"#,
                "json_schema",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"strict":true,"schema":{"type":"object","properties":{"a":{"type":"string","format":"iri"}}}}}}"#,
                "schema.properties.a.format",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"xml"}}"#,
                "response_format",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"top_logprobs":2}"#,
                "needs logprobs",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":21}"#,
                "top_logprobs 21",
            ),
        ];
        for (json, want) in cases {
            let e = parse(json).err().unwrap().to_string();
            assert!(e.contains(want), "{json}: {e}");
        }
    }
}
