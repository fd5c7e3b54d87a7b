//! Llama-family model configuration, in Hugging Face `config.json` terms.

use crate::error::{Error, Result};
use crate::model::gguf::Gguf;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "default_arch")]
    pub architectures: Vec<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f32,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// RoPE scaling variants (linear, llama3, ...) are not implemented; refuse them rather than
    /// silently computing something else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
}

fn default_arch() -> Vec<String> {
    vec!["LlamaForCausalLM".into()]
}
fn default_rope_theta() -> f32 {
    10000.0
}
fn default_eps() -> f32 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

/// Sizes above these are not a model this runtime can hold; they are almost surely corruption.
const MAX_DIM: usize = 1 << 16;
const MAX_VOCAB: usize = 1 << 20;

impl LlamaConfig {
    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim()
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads() * self.head_dim()
    }

    pub fn from_json(what: &str, bytes: &[u8]) -> Result<Self> {
        let c: LlamaConfig = serde_json::from_slice(bytes).map_err(|e| Error::format(what, e))?;
        c.validate(what)?;
        Ok(c)
    }

    pub fn validate(&self, what: &str) -> Result<()> {
        let bad = |r: String| Err(Error::format(what, r));
        if !self
            .architectures
            .iter()
            .any(|a| a == "LlamaForCausalLM" || a == "llama")
        {
            return bad(format!(
                "unknown architecture {:?} (supported: LlamaForCausalLM)",
                self.architectures
            ));
        }
        for (name, v, max) in [
            ("hidden_size", self.hidden_size, MAX_DIM),
            ("intermediate_size", self.intermediate_size, MAX_DIM * 4),
            ("num_hidden_layers", self.num_hidden_layers, 1024),
            ("num_attention_heads", self.num_attention_heads, 1024),
            ("num_key_value_heads", self.n_kv_heads(), 1024),
            ("head_dim", self.head_dim(), 1024),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 20,
            ),
        ] {
            if v == 0 || v > max {
                return bad(format!("{name} = {v} is out of range 1..={max}"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.n_kv_heads()) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.n_kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad(format!(
                "rope_theta {} is not a valid base",
                self.rope_theta
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!(
                "rms_norm_eps {} must be positive",
                self.rms_norm_eps
            ));
        }
        if let Some(s) = &self.rope_scaling {
            if !s.is_null() {
                return bad(format!("rope_scaling {s} is not supported"));
            }
        }
        Ok(())
    }

    /// Reads the `llama.*` keys of a GGUF file.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let arch = g
            .meta("general.architecture")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if arch != "llama" {
            return Err(Error::format(
                &g.name,
                format!("unknown architecture {arch:?} in general.architecture (supported: llama)"),
            ));
        }
        let uint = |k: &str| -> Result<usize> {
            g.meta(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| {
                    Error::format(&g.name, format!("metadata {k} missing or not an integer"))
                })
        };
        let float = |k: &str, d: f64| g.meta(k).and_then(|v| v.as_f64()).unwrap_or(d) as f32;
        let vocab = match g.meta("llama.vocab_size").and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None => g
                .meta("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .ok_or_else(|| Error::format(&g.name, "no llama.vocab_size and no tokenizer"))?,
        };
        let heads = uint("llama.attention.head_count")?;
        let hidden = uint("llama.embedding_length")?;
        let c = LlamaConfig {
            architectures: vec!["LlamaForCausalLM".into()],
            hidden_size: hidden,
            intermediate_size: uint("llama.feed_forward_length")?,
            num_hidden_layers: uint("llama.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: Some(uint("llama.attention.head_count_kv").unwrap_or(heads)),
            head_dim: g
                .meta("llama.attention.key_length")
                .and_then(|v| v.as_u64())
                .map(|v| v as usize),
            vocab_size: vocab,
            rope_theta: float("llama.rope.freq_base", 10000.0),
            rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5),
            max_position_embeddings: uint("llama.context_length").unwrap_or(2048),
            tie_word_embeddings: g.tensor("output.weight").is_none(),
            bos_token_id: g
                .meta("tokenizer.ggml.bos_token_id")
                .and_then(|v| v.as_u64())
                .map(|v| v as u32),
            eos_token_id: g
                .meta("tokenizer.ggml.eos_token_id")
                .and_then(|v| v.as_u64())
                .map(|v| v as u32),
            rope_scaling: None,
        };
        c.validate(&g.name)?;
        Ok(c)
    }

    pub fn param_count(&self) -> usize {
        let h = self.hidden_size;
        let per_layer =
            h * self.q_dim() * 2 + h * self.kv_dim() * 2 + 3 * h * self.intermediate_size + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_hidden_layers * per_layer + h + head
    }
}
