//! `--gpu` for generate and eval: the model on the wgpu engine, each module quantized with RTN
//! at `--bits` (uniform) or per module from `--bits-file` (an EQM: one bit-width per module in
//! `ModuleId::index()` order, as JSON), until the module library provides GPTQ versions.

use anyhow::{Context, Result};
use clap::Args;
use flexquant::gpu::weights::rtn_modules;
use flexquant::gpu::{Gpu, Model, ModelOptions};
use flexquant::model::load::LoadedModel;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args, Clone)]
pub struct GpuArgs {
    /// Run on the GPU engine (wgpu: Vulkan/Metal/DX12; lavapipe on a machine without a GPU).
    #[arg(long)]
    pub gpu: bool,
    /// Bits of every module on the GPU path.
    #[arg(long, default_value_t = 4)]
    pub bits: u32,
    /// A JSON array with the bits of each module (an EQM); overrides --bits.
    #[arg(long)]
    pub bits_file: Option<PathBuf>,
    /// Quantization group size (columns per scale/zero pair).
    #[arg(long, default_value_t = 32)]
    pub group: usize,
}

impl GpuArgs {
    fn module_bits(&self, n: usize) -> Result<Vec<u32>> {
        let Some(path) = &self.bits_file else {
            return Ok(vec![self.bits; n]);
        };
        let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
        let bits: Vec<u32> = serde_json::from_str(&text)
            .with_context(|| format!("{}: expected a JSON array of bits", path.display()))?;
        if bits.len() != n {
            anyhow::bail!("{}: {} entries for {n} modules", path.display(), bits.len());
        }
        Ok(bits)
    }

    /// Quantizes the modules and uploads the model (printing the adapter used).
    pub fn model(&self, m: &LoadedModel, opts: ModelOptions) -> Result<Model> {
        let w = &m.weights;
        let bits = self.module_bits(w.modules.len())?;
        let modules = rtn_modules(w, |id| bits[id.index()], self.group)?;
        let gpu = Arc::new(Gpu::new_blocking(Model::requirements(&w.config, &opts))?);
        eprintln!("[gpu: {}]", gpu.adapter_name());
        Ok(pollster::block_on(Model::new(gpu, w, &modules, opts))?)
    }
}
