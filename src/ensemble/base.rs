//! The base shard: everything every EQM shares. Layout (little-endian):
//! the token embedding as a packed 8-bit matrix `[vocab][hidden]` (the `ensemble::format` layout
//! with the manifest's group size; tied models use it as the LM head too), then f32 norms —
//! for each layer `attn_norm[hidden]`, `ffn_norm[hidden]` — then `final_norm[hidden]`, then,
//! for untied models only, the LM head as a packed 8-bit matrix.

use crate::ensemble::format::{PackedMatrix, PackedShape};
use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::weights::{LayerNorms, Linear, Weights};

/// Bit-width of the embedding and head in the base shard (the manifest's "q8").
pub const BASE_BITS: u32 = 8;

pub struct Base {
    pub embed: PackedMatrix,
    pub norms: Vec<LayerNorms>,
    pub final_norm: Vec<f32>,
    pub lm_head: Option<PackedMatrix>,
}

fn embed_shape(c: &LlamaConfig, group: usize) -> Result<PackedShape> {
    PackedShape::new(c.vocab_size, c.hidden_size, BASE_BITS, group)
}

/// Exact size of the base shard, computed in u64 and refused where it does not fit a usize
/// (a hostile config must not wrap wasm32's 32-bit usize into a small, plausible size).
pub fn base_bytes(c: &LlamaConfig, group: usize) -> Result<usize> {
    let e = embed_shape(c, group)?.bytes() as u64;
    let head = if c.tie_word_embeddings { 0 } else { e };
    let norms = (2 * c.num_hidden_layers as u64 + 1) * c.hidden_size as u64 * 4;
    let total = e + head + norms;
    usize::try_from(total).map_err(|_| {
        Error::input(format!(
            "the base shard of this model is {total} bytes, more than this platform addresses"
        ))
    })
}

impl Base {
    /// Puts this base into `w`: the embedding and head as the f32 their codes mean, the norms.
    pub fn apply_to(&self, w: &mut Weights) {
        w.embed = dequantize(&self.embed).into();
        w.lm_head = self
            .lm_head
            .as_ref()
            .map(|h| Linear::new(h.shape.rows, h.shape.cols, dequantize(h)));
        w.norms = self.norms.clone();
        w.final_norm = self.final_norm.clone();
    }

    /// The f32 weights of the EQM made of this base and `modules` (one packed version per
    /// module, `ModuleId::index()` order), every tensor as its codes mean ("fake quant"): what
    /// the CPU reference runs, and what every backend is checked against.
    pub fn to_weights(&self, config: &LlamaConfig, modules: &[PackedMatrix]) -> Weights {
        Weights {
            config: config.clone(),
            embed: dequantize(&self.embed).into(),
            norms: self.norms.clone(),
            modules: modules.iter().map(to_linear).collect(),
            final_norm: self.final_norm.clone(),
            lm_head: self.lm_head.as_ref().map(to_linear),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = self.embed.to_bytes();
        for n in &self.norms {
            b.extend(n.attn_norm.iter().flat_map(|v| v.to_le_bytes()));
            b.extend(n.ffn_norm.iter().flat_map(|v| v.to_le_bytes()));
        }
        b.extend(self.final_norm.iter().flat_map(|v| v.to_le_bytes()));
        if let Some(h) = &self.lm_head {
            b.extend(h.to_bytes());
        }
        b
    }

    pub fn from_bytes(c: &LlamaConfig, group: usize, bytes: &[u8], what: &str) -> Result<Self> {
        let want = base_bytes(c, group).map_err(|e| Error::format(what, e))?;
        if bytes.len() != want {
            return Err(Error::format(
                what,
                format!("{} bytes, expected {want}", bytes.len()),
            ));
        }
        let shape = embed_shape(c, group).map_err(|e| Error::format(what, e))?;
        let (e, mut rest) = bytes.split_at(shape.bytes());
        let embed = PackedMatrix::from_bytes(shape, e, what)?;
        let h = c.hidden_size;
        let mut floats = |n: usize| -> Vec<f32> {
            let (a, b) = rest.split_at(n * 4);
            rest = b;
            a.chunks_exact(4)
                .map(|x| f32::from_le_bytes(x.try_into().unwrap()))
                .collect()
        };
        let norms = (0..c.num_hidden_layers)
            .map(|_| LayerNorms {
                attn_norm: floats(h),
                ffn_norm: floats(h),
            })
            .collect::<Vec<_>>();
        let final_norm = floats(h);
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(PackedMatrix::from_bytes(shape, rest, what)?)
        };
        let base = Base {
            embed,
            norms,
            final_norm,
            lm_head,
        };
        let all_finite = base
            .norms
            .iter()
            .all(|n| n.attn_norm.iter().chain(&n.ffn_norm).all(|v| v.is_finite()))
            && base.final_norm.iter().all(|v| v.is_finite());
        if !all_finite {
            return Err(Error::format(what, "a norm weight is not finite"));
        }
        Ok(base)
    }
}

/// A packed matrix as the f32 its codes mean.
pub fn to_linear(m: &PackedMatrix) -> Linear {
    Linear::new(m.shape.rows, m.shape.cols, dequantize(m))
}

fn dequantize(m: &PackedMatrix) -> Vec<f32> {
    #[cfg(not(target_arch = "wasm32"))]
    return m.dequantize_par();
    #[cfg(target_arch = "wasm32")]
    m.dequantize()
}
