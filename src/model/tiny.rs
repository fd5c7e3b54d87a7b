//! A deterministic tiny random-weight Llama in Hugging Face format (config.json,
//! model.safetensors, tokenizer.json): fast unit tests of every path that takes a model.

use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::tokenizer::{byte_level_bpe_json, bytes_to_unicode};
use crate::model::weights::ModuleKind;
use crate::runtime::generate::Rng;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::Path;

pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        hidden_size: 64,
        intermediate_size: 160,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        head_dim: Some(16),
        vocab_size: 256 + SPECIALS.len(),
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 512,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        rope_scaling: None,
    }
}

/// Writes the tiny model into `dir` (created if missing). Same `seed`, same bytes.
pub fn write_tiny_model(dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let c = tiny_config();
    let mut rng = Rng::new(seed);
    let mut rand = |n: usize, scale: f32| -> Vec<u8> {
        (0..n)
            .flat_map(|_| ((rng.next_f32() * 2.0 - 1.0) * scale).to_le_bytes())
            .collect()
    };
    let h = c.hidden_size;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    tensors.push((
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, h],
        rand(c.vocab_size * h, 1.0),
    ));
    tensors.push((
        "lm_head.weight".into(),
        vec![c.vocab_size, h],
        rand(c.vocab_size * h, 0.3),
    ));
    tensors.push(("model.norm.weight".into(), vec![h], ones(h)));
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        tensors.push((format!("{p}.input_layernorm.weight"), vec![h], ones(h)));
        tensors.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            ones(h),
        ));
        for kind in ModuleKind::ALL {
            let (r, k) = kind.shape(&c);
            let scale = 1.7 / (k as f32).sqrt();
            tensors.push((
                format!("{p}.{}.weight", kind.hf_name()),
                vec![r, k],
                rand(r * k, scale),
            ));
        }
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    let st = safetensors::serialize(views, None).map_err(|e| Error::format("tiny model", e))?;
    write(dir, "model.safetensors", &st)?;
    let cfg = serde_json::to_vec_pretty(&c).unwrap();
    write(dir, "config.json", &cfg)?;
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(bytes_to_unicode().into_iter().map(String::from));
    let tok = byte_level_bpe_json(&tokens, &[], &[0, 1, 2], true);
    write(dir, "tokenizer.json", tok.to_string().as_bytes())?;
    let tc = serde_json::json!({"chat_template": TINY_CHAT_TEMPLATE});
    write(dir, "tokenizer_config.json", tc.to_string().as_bytes())
}

/// ChatML as a real template (the Jinja a Hugging Face model ships).
const TINY_CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

fn ones(n: usize) -> Vec<u8> {
    (0..n).flat_map(|_| 1f32.to_le_bytes()).collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))
}
