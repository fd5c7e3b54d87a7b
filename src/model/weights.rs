//! Model weights in f32, with every linear projection addressed as a FlexQuant *module*
//! `(layer, kind)`: the unit the ensemble swaps between bit-widths.

use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The seven linear projections of a Llama block, in the order used everywhere (indices,
/// manifests, GPU buffers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl ModuleKind {
    pub const ALL: [ModuleKind; 7] = [
        ModuleKind::Q,
        ModuleKind::K,
        ModuleKind::V,
        ModuleKind::O,
        ModuleKind::Gate,
        ModuleKind::Up,
        ModuleKind::Down,
    ];
    pub fn name(self) -> &'static str {
        match self {
            ModuleKind::Q => "q",
            ModuleKind::K => "k",
            ModuleKind::V => "v",
            ModuleKind::O => "o",
            ModuleKind::Gate => "gate",
            ModuleKind::Up => "up",
            ModuleKind::Down => "down",
        }
    }
    /// (rows = output features, cols = input features)
    pub fn shape(self, c: &LlamaConfig) -> (usize, usize) {
        let h = c.hidden_size;
        match self {
            ModuleKind::Q => (c.q_dim(), h),
            ModuleKind::K | ModuleKind::V => (c.kv_dim(), h),
            ModuleKind::O => (h, c.q_dim()),
            ModuleKind::Gate | ModuleKind::Up => (c.intermediate_size, h),
            ModuleKind::Down => (h, c.intermediate_size),
        }
    }
    /// Tensor name suffix in Hugging Face checkpoints.
    pub fn hf_name(self) -> &'static str {
        match self {
            ModuleKind::Q => "self_attn.q_proj",
            ModuleKind::K => "self_attn.k_proj",
            ModuleKind::V => "self_attn.v_proj",
            ModuleKind::O => "self_attn.o_proj",
            ModuleKind::Gate => "mlp.gate_proj",
            ModuleKind::Up => "mlp.up_proj",
            ModuleKind::Down => "mlp.down_proj",
        }
    }
    /// Tensor name suffix in GGUF files.
    pub fn gguf_name(self) -> &'static str {
        match self {
            ModuleKind::Q => "attn_q",
            ModuleKind::K => "attn_k",
            ModuleKind::V => "attn_v",
            ModuleKind::O => "attn_output",
            ModuleKind::Gate => "ffn_gate",
            ModuleKind::Up => "ffn_up",
            ModuleKind::Down => "ffn_down",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModuleId {
    pub layer: usize,
    pub kind: ModuleKind,
}

impl ModuleId {
    pub fn index(self) -> usize {
        self.layer * 7 + self.kind as usize
    }
    pub fn from_index(i: usize) -> Self {
        ModuleId {
            layer: i / 7,
            kind: ModuleKind::ALL[i % 7],
        }
    }
}

impl std::fmt::Display for ModuleId {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "L{}.{}", self.layer, self.kind.name())
    }
}

/// A dense f32 matrix `[rows][cols]`; `y = x W^T`. Shared so that many EQMs can point at the
/// same module version without copying it.
#[derive(Debug, Clone)]
pub struct Linear {
    pub rows: usize,
    pub cols: usize,
    /// `layout` says where element (r, c) lies.
    pub w: Arc<[f32]>,
    pub layout: Layout,
}

/// Where a `Linear`'s element (r, c) lies in `w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `w[r * cols + c]`: what model files and the quantizers hold, and what row-parallel
    /// decoding reads.
    Rows,
    /// `w[c * rows + r]`: what the `gemm` crate multiplies fastest when many tokens go through
    /// at once (the builder's evaluator: 10-50% faster per module on the demo model's shapes).
    Columns,
}

impl Linear {
    pub fn new(rows: usize, cols: usize, w: Vec<f32>) -> Self {
        assert_eq!(w.len(), rows * cols);
        Linear {
            rows,
            cols,
            w: w.into(),
            layout: Layout::Rows,
        }
    }

    /// The same matrix laid out in `layout` (shared, not copied, when it already is).
    pub fn in_layout(&self, layout: Layout) -> Linear {
        if self.layout == layout {
            return self.clone();
        }
        // Columns of one layout are rows of the other: (r, c) <-> (c, r).
        let (n, m) = match self.layout {
            Layout::Rows => (self.rows, self.cols),
            Layout::Columns => (self.cols, self.rows),
        };
        Linear {
            rows: self.rows,
            cols: self.cols,
            w: transpose(&self.w, n, m).into(),
            layout,
        }
    }
}

/// `a` (`[n][m]`, row-major) transposed to `[m][n]`, 32 output rows at a time so that each
/// input row's run of 32 floats is read once.
fn transpose(a: &[f32], n: usize, m: usize) -> Vec<f32> {
    const TILE: usize = 32;
    assert_eq!(
        a.len(),
        n * m,
        "transpose: {} floats for {n} x {m}",
        a.len()
    );
    let mut out = vec![0f32; n * m];
    if n == 0 {
        return out;
    }
    for (t, block) in out.chunks_mut(TILE * n).enumerate() {
        let j0 = t * TILE;
        let cols = block.len() / n;
        for i in 0..n {
            let run = &a[i * m + j0..i * m + j0 + cols];
            for (dj, &v) in run.iter().enumerate() {
                block[dj * n + i] = v;
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
pub struct LayerNorms {
    pub attn_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
}

/// Everything the forward pass needs. `modules[ModuleId::index()]` holds the 7 projections of
/// each layer; replace an entry to run a mixed-precision model.
#[derive(Debug, Clone)]
pub struct Weights {
    pub config: LlamaConfig,
    /// `[vocab][hidden]`
    pub embed: Arc<[f32]>,
    pub norms: Vec<LayerNorms>,
    pub modules: Vec<Linear>,
    pub final_norm: Vec<f32>,
    /// `None` when the head is tied to the embedding.
    pub lm_head: Option<Linear>,
}

impl Weights {
    pub fn module(&self, id: ModuleId) -> &Linear {
        &self.modules[id.index()]
    }

    pub fn module_ids(&self) -> impl Iterator<Item = ModuleId> {
        (0..self.config.num_hidden_layers * 7).map(ModuleId::from_index)
    }

    /// Replaces one module's weights (e.g. with a dequantized lower-bit version).
    pub fn set_module(&mut self, id: ModuleId, lin: Linear) -> Result<()> {
        let (r, c) = id.kind.shape(&self.config);
        if (lin.rows, lin.cols) != (r, c) {
            return Err(Error::input(format!(
                "module {id}: shape {}x{} does not match the model's {r}x{c}",
                lin.rows, lin.cols
            )));
        }
        self.modules[id.index()] = lin;
        Ok(())
    }

    /// Checks that all weights are finite; a NaN in a checkpoint would otherwise surface as a
    /// mysterious NaN perplexity much later.
    pub fn check_finite(&self, what: &str) -> Result<()> {
        let bad = |name: String, v: &[f32]| -> Result<()> {
            match v.iter().position(|x| !x.is_finite()) {
                Some(i) => Err(Error::format(
                    what,
                    format!("tensor {name} has a non-finite value at element {i}"),
                )),
                None => Ok(()),
            }
        };
        bad("embedding".into(), &self.embed)?;
        for (l, n) in self.norms.iter().enumerate() {
            bad(format!("layer {l} attn_norm"), &n.attn_norm)?;
            bad(format!("layer {l} ffn_norm"), &n.ffn_norm)?;
        }
        for id in self.module_ids() {
            bad(format!("module {id}"), &self.module(id).w)?;
        }
        bad("final_norm".into(), &self.final_norm)?;
        if let Some(h) = &self.lm_head {
            bad("lm_head".into(), &h.w)?;
        }
        Ok(())
    }
}
