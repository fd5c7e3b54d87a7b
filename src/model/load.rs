//! Loading a model from a GGUF file or a Hugging Face directory
//! (`config.json` + `model.safetensors` [+ index] + `tokenizer.json`).

use crate::error::{read_capped, Error, Result};
use crate::model::chat::hf::HfChatConfig;
use crate::model::chat::{ChatTemplate, TemplateSource};
use crate::model::config::LlamaConfig;
use crate::model::gguf::Gguf;
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::{LayerNorms, Linear, ModuleId, ModuleKind, Weights};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Weight files larger than this are refused before reading (a 7B model in f32 is ~28 GB).
const MAX_WEIGHT_FILE: u64 = 64 << 30;
const MAX_SMALL_FILE: u64 = 64 << 20;

pub struct LoadedModel {
    pub weights: Weights,
    pub tokenizer: Tokenizer,
    /// Human-readable origin, for reports.
    pub source: String,
}

/// Loads `path`: a `.gguf` file or a Hugging Face model directory.
pub fn load(path: &Path) -> Result<LoadedModel> {
    if path.is_dir() {
        load_hf_dir(path)
    } else {
        let bytes = read_capped(path, MAX_WEIGHT_FILE)?;
        load_gguf_bytes(&path.display().to_string(), bytes)
    }
}

pub fn load_gguf_bytes(name: &str, bytes: Vec<u8>) -> Result<LoadedModel> {
    load_gguf(&Gguf::from_bytes(name, bytes)?)
}

/// The model in a parsed GGUF file: config, tokenizer, weights.
pub fn load_gguf(g: &Gguf) -> Result<LoadedModel> {
    let name = &g.name;
    let config = LlamaConfig::from_gguf(g)?;
    let tokenizer = Tokenizer::from_gguf(g)?;
    tokenizer.check_fits(config.vocab_size)?;
    let weights = weights_from_gguf(g, config)?;
    Ok(LoadedModel {
        weights,
        tokenizer,
        source: name.to_string(),
    })
}

fn gguf_tensor(g: &Gguf, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
    let t = g
        .tensor(name)
        .ok_or_else(|| Error::format(&g.name, format!("tensor {name} missing")))?;
    let want: &[usize] = if rows == 1 { &[cols] } else { &[cols, rows] };
    if t.dims != want {
        return Err(Error::format(
            &g.name,
            format!("tensor {name} has shape {:?}, expected {want:?}", t.dims),
        ));
    }
    Ok(g.dequantize(t))
}

/// llama.cpp's converter permutes the rows of Q and K so that RoPE rotates adjacent pairs;
/// undo it so every loader yields Hugging Face's half-split layout.
fn unpermute_rows(w: &[f32], n_heads: usize, cols: usize) -> Vec<f32> {
    let hd = w.len() / cols / n_heads;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * hd + 2 * i + j) * cols;
                let dst = (h * hd + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

fn weights_from_gguf(g: &Gguf, config: LlamaConfig) -> Result<Weights> {
    let h = config.hidden_size;
    let embed = gguf_tensor(g, "token_embd.weight", config.vocab_size, h)?;
    let mut norms = Vec::new();
    let mut modules = Vec::new();
    for l in 0..config.num_hidden_layers {
        norms.push(LayerNorms {
            attn_norm: gguf_tensor(g, &format!("blk.{l}.attn_norm.weight"), 1, h)?,
            ffn_norm: gguf_tensor(g, &format!("blk.{l}.ffn_norm.weight"), 1, h)?,
        });
        for kind in ModuleKind::ALL {
            let (r, c) = kind.shape(&config);
            let mut w = gguf_tensor(g, &format!("blk.{l}.{}.weight", kind.gguf_name()), r, c)?;
            match kind {
                ModuleKind::Q => w = unpermute_rows(&w, config.num_attention_heads, c),
                ModuleKind::K => w = unpermute_rows(&w, config.n_kv_heads(), c),
                _ => {}
            }
            modules.push(Linear::new(r, c, w));
        }
    }
    let final_norm = gguf_tensor(g, "output_norm.weight", 1, h)?;
    let lm_head = match g.tensor("output.weight") {
        Some(_) => Some(Linear::new(
            config.vocab_size,
            h,
            gguf_tensor(g, "output.weight", config.vocab_size, h)?,
        )),
        None => None,
    };
    let w = Weights {
        config,
        embed: embed.into(),
        norms,
        modules,
        final_norm,
        lm_head,
    };
    w.check_finite(&g.name)?;
    Ok(w)
}

/// Safetensors files of one checkpoint, by tensor name.
struct StFiles {
    /// The checkpoint (its directory), for errors that concern no one file.
    what: String,
    files: Vec<(PathBuf, Vec<u8>)>,
    by_name: BTreeMap<String, usize>,
}

impl StFiles {
    fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let j: serde_json::Value =
                serde_json::from_slice(&read_capped(&index, MAX_SMALL_FILE)?)
                    .map_err(|e| Error::format(index.display(), e))?;
            let map = j
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(index.display(), "no weight_map object"))?;
            let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            names.sort();
            names.dedup();
            for n in &names {
                if n.contains('/') || n.contains("..") {
                    return Err(Error::format(
                        index.display(),
                        format!("bad shard name {n:?}"),
                    ));
                }
            }
            names.iter().map(|n| dir.join(n)).collect()
        } else {
            return Err(Error::format(
                dir.display(),
                "no model.safetensors or model.safetensors.index.json",
            ));
        };
        let files = paths
            .into_iter()
            .map(|p| read_capped(&p, MAX_WEIGHT_FILE).map(|b| (p, b)))
            .collect::<Result<Vec<_>>>()?;
        Self::new(&dir.display().to_string(), files)
    }

    fn new(what: &str, files: Vec<(PathBuf, Vec<u8>)>) -> Result<Self> {
        let mut by_name = BTreeMap::new();
        for (i, (p, bytes)) in files.iter().enumerate() {
            let st = SafeTensors::deserialize(bytes)
                .map_err(|e| Error::format(p.display(), format!("bad safetensors: {e}")))?;
            for name in st.names() {
                by_name.insert(name.to_string(), i);
            }
        }
        Ok(StFiles {
            what: what.to_string(),
            files,
            by_name,
        })
    }

    fn get(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
        let i = *self
            .by_name
            .get(name)
            .ok_or_else(|| Error::format(&self.what, format!("tensor {name} missing")))?;
        let (path, bytes) = &self.files[i];
        let st = SafeTensors::deserialize(bytes).map_err(|e| Error::format(path.display(), e))?;
        let t = st
            .tensor(name)
            .map_err(|e| Error::format(path.display(), e))?;
        let want: Vec<usize> = if rows == 1 {
            vec![cols]
        } else {
            vec![rows, cols]
        };
        if t.shape() != want.as_slice() {
            return Err(Error::format(
                path.display(),
                format!("tensor {name} has shape {:?}, expected {want:?}", t.shape()),
            ));
        }
        let d = t.data();
        Ok(match t.dtype() {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::format(
                    path.display(),
                    format!("tensor {name} has dtype {other:?}; supported: F32, F16, BF16"),
                ))
            }
        })
    }
}

/// `tokenizer.json`, with the chat template and special tokens of `tokenizer_config.json` where
/// there is one (`config.json`'s token ids come first; `tokenizer_config.json`'s token strings
/// fill in).
fn hf_tokenizer(dir: &Path, config: &LlamaConfig) -> Result<Tokenizer> {
    let tok_path = dir.join("tokenizer.json");
    let tok_bytes = read_capped(&tok_path, MAX_SMALL_FILE)?;
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg_file = cfg_path.display().to_string();
    let chat = if cfg_path.exists() {
        HfChatConfig::from_json(&cfg_file, &read_capped(&cfg_path, MAX_SMALL_FILE)?)?
    } else {
        HfChatConfig::default()
    };
    let what = tok_path.display().to_string();
    let mut t = Tokenizer::from_json_bytes(
        &what,
        &tok_bytes,
        config.bos_token_id,
        config.eos_token_id,
        None,
    )?;
    let id = |s: &Option<String>| s.as_deref().and_then(|s| t.token_to_id(s));
    let (bos, eos) = (id(&chat.bos_token), id(&chat.eos_token));
    t.bos = t.bos.or(bos);
    if let (None, Some(eos)) = (config.eos_token_id, eos) {
        t.stop.retain(|&s| s != eos);
        t.stop.insert(0, eos);
    }
    let template = chat.chat_template.as_deref().map(|jinja| TemplateSource {
        file: &cfg_file,
        jinja,
    });
    t.chat = ChatTemplate::new(template, t.special_tokens())?;
    Ok(t)
}

pub fn load_hf_dir(dir: &Path) -> Result<LoadedModel> {
    let cfg_path = dir.join("config.json");
    let config = LlamaConfig::from_json(
        &cfg_path.display().to_string(),
        &read_capped(&cfg_path, MAX_SMALL_FILE)?,
    )?;
    let tokenizer = hf_tokenizer(dir, &config)?;
    let st = StFiles::open(dir)?;
    let weights = weights_from_st(config, &st)?;
    Ok(LoadedModel {
        weights,
        tokenizer,
        source: dir.display().to_string(),
    })
}

/// The weights of a Hugging Face checkpoint from the bytes of its `config.json` and safetensors
/// files: what `load_hf_dir` reads from disk, for callers (the fuzzer) that hold the bytes.
pub fn weights_from_hf_bytes(
    config_name: &str,
    config_json: &[u8],
    files: Vec<(PathBuf, Vec<u8>)>,
) -> Result<Weights> {
    let config = LlamaConfig::from_json(config_name, config_json)?;
    let what = files
        .first()
        .map_or(String::new(), |f| f.0.display().to_string());
    weights_from_st(config, &StFiles::new(&what, files)?)
}

fn weights_from_st(config: LlamaConfig, st: &StFiles) -> Result<Weights> {
    let h = config.hidden_size;
    let embed = st.get("model.embed_tokens.weight", config.vocab_size, h)?;
    let mut norms = Vec::new();
    let mut modules = Vec::new();
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        norms.push(LayerNorms {
            attn_norm: st.get(&format!("{p}.input_layernorm.weight"), 1, h)?,
            ffn_norm: st.get(&format!("{p}.post_attention_layernorm.weight"), 1, h)?,
        });
        for kind in ModuleKind::ALL {
            let (r, c) = kind.shape(&config);
            let w = st.get(&format!("{p}.{}.weight", kind.hf_name()), r, c)?;
            modules.push(Linear::new(r, c, w));
        }
    }
    let final_norm = st.get("model.norm.weight", 1, h)?;
    let lm_head = if config.tie_word_embeddings {
        None
    } else {
        Some(Linear::new(
            config.vocab_size,
            h,
            st.get("lm_head.weight", config.vocab_size, h)?,
        ))
    };
    debug_assert_eq!(
        modules.len(),
        ModuleId {
            layer: config.num_hidden_layers,
            kind: ModuleKind::Q
        }
        .index()
    );
    let weights = Weights {
        config,
        embed: embed.into(),
        norms,
        modules,
        final_norm,
        lm_head,
    };
    weights.check_finite(&st.what)?;
    Ok(weights)
}
