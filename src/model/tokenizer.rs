//! Byte-level BPE tokenizer (the `tokenizers` crate), built either from a Hugging Face
//! `tokenizer.json` or from the vocabulary and merges embedded in a GGUF file.

use crate::error::{Error, Result};
use crate::model::chat::{ChatTemplate, SpecialTokens, TemplateSource};
use crate::model::gguf::Gguf;
use serde_json::{json, Value};
use std::str::FromStr;

/// GGUF token_type for control tokens (`<|im_start|>`, ...): matched literally in text.
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The file it came from, for errors.
    name: String,
    pub bos: Option<u32>,
    /// Tokens that end a generation.
    pub stop: Vec<u32>,
    pub chat: ChatTemplate,
    /// `token_bytes`, made on first use (JSON mode, logprobs).
    bytes: std::sync::OnceLock<std::sync::Arc<crate::runtime::json_constraint::TokenBytes>>,
}

/// A tokenizer.json for byte-level BPE: one builder for GGUF vocabularies and for the tiny test
/// model, so both go through the same `tokenizers` code path.
pub fn byte_level_bpe_json(
    tokens: &[String],
    merges: &[String],
    special: &[u32],
    split_digits: bool,
) -> Value {
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<Value> = special
        .iter()
        .map(|&id| {
            json!({"id": id, "content": tokens[id as usize], "single_word": false,
                   "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": true, "use_regex": true});
    let pre = if split_digits {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]})
    } else {
        byte_level.clone()
    };
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added, "normalizer": null, "pre_tokenizer": pre,
        "post_processor": null, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    })
}

/// tokenizers slices `continuing_subword_prefix` off the second part of every merge without
/// checking that it is there (`&b[prefix_len..]`): a panic on a hostile file.
fn check_merges(what: &str, model: &Value) -> Result<()> {
    let Some(prefix) = model["continuing_subword_prefix"].as_str() else {
        return Ok(());
    };
    let Some(merges) = model["merges"].as_array() else {
        return Ok(());
    };
    for (i, m) in merges.iter().enumerate() {
        let second = match m {
            Value::String(s) => s.split_once(' ').map(|(_, b)| b),
            Value::Array(a) => a.get(1).and_then(Value::as_str),
            _ => None,
        };
        if second.is_some_and(|b| !b.starts_with(prefix)) {
            // The prefix shown cut short: a hostile one may be megabytes long.
            let shown: String = prefix.chars().take(32).collect();
            return Err(Error::format(
                what,
                format!(
                    "model.merges[{i}] does not start with continuing_subword_prefix {shown:?} ({} bytes)",
                    prefix.len()
                ),
            ));
        }
    }
    Ok(())
}

impl Tokenizer {
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let err = |r: String| Error::format(&g.name, r);
        let model = g
            .meta("tokenizer.ggml.model")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer.ggml.model {model:?} is not supported (only byte-level BPE, \"gpt2\")"
            )));
        }
        let pre = g
            .meta("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let split_digits = match pre {
            "smollm" => true,
            "default" | "gpt2" => false,
            other => {
                return Err(err(format!(
                    "tokenizer.ggml.pre {other:?} is not supported"
                )))
            }
        };
        let strings = |key: &str| -> Result<Vec<String>> {
            g.meta(key)
                .and_then(|v| v.as_array())
                .ok_or_else(|| err(format!("{key} missing")))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| err(format!("{key} holds a non-string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        // A token listed twice would silently take the later id in the vocabulary map, so ids
        // and strings would disagree.
        let mut seen = std::collections::HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            if let Some(first) = seen.insert(t.as_str(), i) {
                return Err(err(format!(
                    "tokenizer.ggml.tokens lists {t:?} twice (ids {first} and {i})"
                )));
            }
        }
        let special: Vec<u32> = match g
            .meta("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
        {
            Some(types) if types.len() != tokens.len() => {
                return Err(err(format!(
                    "tokenizer.ggml.token_type has {} entries, tokenizer.ggml.tokens {}",
                    types.len(),
                    tokens.len()
                )))
            }
            Some(types) => types
                .iter()
                .enumerate()
                .filter(|(_, t)| {
                    matches!(
                        t.as_u64(),
                        Some(TOKEN_TYPE_CONTROL) | Some(TOKEN_TYPE_USER_DEFINED)
                    )
                })
                .map(|(i, _)| i as u32)
                .collect(),
            None => vec![],
        };
        let id = |k: &str| {
            g.meta(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as u32)
                .filter(|&v| (v as usize) < tokens.len())
        };
        let json = byte_level_bpe_json(&tokens, &merges, &special, split_digits);
        let file = format!("{}: tokenizer.chat_template", g.name);
        let template = g
            .meta("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(|jinja| TemplateSource { file: &file, jinja });
        Self::from_json_bytes(
            &g.name,
            json.to_string().as_bytes(),
            id("tokenizer.ggml.bos_token_id"),
            id("tokenizer.ggml.eos_token_id"),
            template,
        )
    }

    /// `chat_template`: the model's Jinja template; without one, prompts are ChatML (see
    /// `ChatTemplate::fallback_warning`).
    pub fn from_json_bytes(
        what: &str,
        bytes: &[u8],
        bos: Option<u32>,
        eos: Option<u32>,
        chat_template: Option<TemplateSource>,
    ) -> Result<Self> {
        let text = std::str::from_utf8(bytes).map_err(|_| Error::format(what, "not UTF-8"))?;
        // Checked here first, because tokenizers 0.22 panics on them instead of returning an
        // error (both found by fuzzing): the syntax (`expect("Helper")` on malformed JSON in
        // the "decoder" object) and the BPE merges against the subword prefix.
        let json: Value = serde_json::from_str(text)
            .map_err(|e| Error::format(what, format!("not JSON: {e}")))?;
        check_merges(what, &json["model"])?;
        let inner = tokenizers::Tokenizer::from_str(text)
            .map_err(|e| Error::format(what, format!("bad tokenizer: {e}")))?;
        if let tokenizers::ModelWrapper::BPE(bpe) = inner.get_model() {
            if let Some(unk) = bpe.unk_token.as_deref() {
                if inner.token_to_id(unk).is_none() {
                    return Err(Error::format(
                        what,
                        format!("model.unk_token {unk:?} is not in the vocabulary"),
                    ));
                }
            }
        }
        let mut stop: Vec<u32> = eos.into_iter().collect();
        for s in ["<|im_end|>", "<|endoftext|>", "</s>"] {
            if let Some(id) = inner.token_to_id(s) {
                if !stop.contains(&id) {
                    stop.push(id);
                }
            }
        }
        let tokens = special_tokens(&inner, bos, stop.first().copied());
        let chat = ChatTemplate::new(chat_template, tokens)?;
        Ok(Tokenizer {
            inner,
            name: what.to_string(),
            bos,
            stop,
            chat,
            bytes: Default::default(),
        })
    }

    /// The BOS token and the first stop token (the EOS) as text, for chat templates.
    pub fn special_tokens(&self) -> SpecialTokens {
        special_tokens(&self.inner, self.bos, self.stop.first().copied())
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Refuses a tokenizer with more tokens than the model has embeddings: its ids past the
    /// model's vocabulary would reach the model (the tokenizer and config disagree).
    pub fn check_fits(&self, model_vocab: usize) -> Result<()> {
        let n = self.vocab_size();
        if n > model_vocab {
            return Err(Error::format(
                &self.name,
                format!("{n} tokens, more than the model's vocabulary of {model_vocab}"),
            ));
        }
        Ok(())
    }

    /// Tokenizes text as is: no BOS, special tokens written in the text are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::format(&self.name, format!("tokenizing failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::format(&self.name, format!("detokenizing failed: {e}")))
    }

    /// The tokenizer as a Hugging Face `tokenizer.json` (what the ensemble ships).
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| Error::input(format!("serializing the tokenizer failed: {e}")))
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    /// The bytes every token stands for, by id (JSON mode reads candidates as bytes, logprobs
    /// report them): the vocabulary's byte-level characters mapped back to bytes; `None` for
    /// added and special tokens and for any string outside the byte-level alphabet. Made on
    /// the first call, shared after.
    pub fn token_bytes(&self) -> std::sync::Arc<crate::runtime::json_constraint::TokenBytes> {
        self.bytes
            .get_or_init(|| {
                let to_byte = byte_level_chars();
                let added = self.inner.get_added_tokens_decoder();
                std::sync::Arc::new(
                    (0..self.vocab_size() as u32)
                        .map(|id| {
                            if added.contains_key(&id) {
                                return None;
                            }
                            let t = self.inner.id_to_token(id)?;
                            t.chars().map(|c| to_byte.get(&c).copied()).collect()
                        })
                        .collect(),
                )
            })
            .clone()
    }
}

/// GPT-2's reversible byte -> printable character map used by byte-level BPE.
pub fn bytes_to_unicode() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut n = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            }
        })
        .collect()
}

/// `bytes_to_unicode` read backwards: a byte-level character to the byte it stands for.
fn byte_level_chars() -> std::collections::HashMap<char, u8> {
    bytes_to_unicode()
        .into_iter()
        .enumerate()
        .map(|(b, c)| (c, b as u8))
        .collect()
}

fn special_tokens(t: &tokenizers::Tokenizer, bos: Option<u32>, eos: Option<u32>) -> SpecialTokens {
    let text = |id: Option<u32>| id.and_then(|id| t.id_to_token(id)).unwrap_or_default();
    SpecialTokens {
        bos: text(bos),
        eos: text(eos),
    }
}

/// Turns a stream of ids into text pieces, holding back bytes of an unfinished UTF-8 character
/// (byte-level BPE splits multi-byte characters across tokens). Incremental (the scheme of
/// Hugging Face's text-generation-inference): each step decodes only the tokens since the last
/// piece plus the one before it, not the whole answer, so an answer costs linear time.
#[derive(Default)]
pub struct StreamDecoder {
    /// The tokens of the last emitted piece, then those not emitted yet.
    ids: Vec<u32>,
    /// `ids[..read]` were emitted.
    read: usize,
}

impl StreamDecoder {
    pub fn step(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[..self.read], true)?;
        let now = tok.decode(&self.ids, true)?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let piece = now.get(before.len()..).unwrap_or("").to_string();
        // Keep the tokens of this piece as the next step's context.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        Ok(piece)
    }
}
