//! Which backend the page runs on: WebGPU (`gpu::Model`) or the packed CPU backend
//! (`cpu::CpuModel`, wasm simd128), as one `runtime::Backend` so the walk, the session and the
//! engine are written once. `backend: 'auto'` picks WebGPU unless it is missing, its adapter is
//! a CPU emulation (SwiftShader, llvmpipe, lavapipe, or `isFallbackAdapter`), or creating the
//! model on it fails for lack of a feature or limit; the reason is kept for `stats()` and the
//! `backend` event.

use crate::cpu::{CpuFactory, CpuModel};
use crate::ensemble::base::Base;
use crate::ensemble::format::PackedMatrix;
use crate::gpu::{Gpu, GpuFactory, Model};
use crate::model::config::LlamaConfig;
use crate::model::weights::ModuleId;
use crate::runtime::backend::{Backend, Factory, KvFormat, Scored};
use crate::web::error::{Code, WebError, WebResult};
use serde::{Deserialize, Serialize};
use std::cell::{Cell, RefCell};
use std::sync::Arc;

/// The `backend` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    #[default]
    Auto,
    Webgpu,
    Cpu,
}

/// The backend that runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Webgpu,
    Cpu,
}

// One lives per engine; boxing the GPU model would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum WebModel {
    Gpu(Model),
    Cpu(CpuModel),
}

impl WebModel {
    pub fn kind(&self) -> Kind {
        match self {
            WebModel::Gpu(_) => Kind::Webgpu,
            WebModel::Cpu(_) => Kind::Cpu,
        }
    }
    /// The WebGPU device, on that backend.
    pub fn gpu(&self) -> Option<&Arc<Gpu>> {
        match self {
            WebModel::Gpu(m) => Some(m.gpu()),
            WebModel::Cpu(_) => None,
        }
    }
}

macro_rules! each {
    ($self:expr, $m:ident => $e:expr) => {
        match $self {
            WebModel::Gpu($m) => $e,
            WebModel::Cpu($m) => $e,
        }
    };
}

impl Backend for WebModel {
    type Error = WebError;

    fn context(&self) -> usize {
        each!(self, m => m.context())
    }
    fn len(&self) -> usize {
        each!(self, m => Backend::len(m))
    }
    fn truncate(&mut self, n: usize) {
        each!(self, m => Backend::truncate(m, n))
    }
    fn release_kv(&mut self) {
        each!(self, m => Backend::release_kv(m))
    }
    fn kv_format(&self) -> Option<KvFormat> {
        each!(self, m => Backend::kv_format(m))
    }
    async fn read_kv(&self, out: &mut dyn FnMut(&[u8])) -> WebResult<()> {
        each!(self, m => Backend::read_kv(m, out).await?);
        Ok(())
    }
    async fn write_kv(
        &mut self,
        format: KvFormat,
        positions: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> WebResult<()> {
        each!(self, m => Backend::write_kv(m, format, positions, fill).await?);
        Ok(())
    }
    async fn convert_kv(&mut self, to: KvFormat) -> WebResult<()> {
        each!(self, m => Backend::convert_kv(m, to).await?);
        Ok(())
    }
    async fn shrink_kv(&mut self, needed: usize) -> WebResult<()> {
        each!(self, m => Backend::shrink_kv(m, needed).await?);
        Ok(())
    }
    async fn step(&mut self, tokens: &[u32]) -> WebResult<Vec<(u32, f32)>> {
        Ok(each!(self, m => Backend::step(m, tokens).await?))
    }
    async fn step_scored(
        &mut self,
        tokens: &[u32],
        n: usize,
        watched: &[u32],
    ) -> WebResult<Scored> {
        Ok(each!(self, m => Backend::step_scored(m, tokens, n, watched).await?))
    }
    fn log_z(&self) -> f32 {
        each!(self, m => Backend::log_z(m))
    }
    fn watch(&mut self, ids: &[u32]) -> WebResult<()> {
        each!(self, m => Backend::watch(m, ids)?);
        Ok(())
    }
    async fn prefill(&mut self, tokens: &[u32]) -> WebResult<()> {
        each!(self, m => Backend::prefill(m, tokens).await?);
        Ok(())
    }
    async fn set_module(&mut self, id: ModuleId, v: PackedMatrix) -> WebResult<()> {
        each!(self, m => Backend::set_module(m, id, v).await?);
        Ok(())
    }
    fn eqm_bits(&self) -> Vec<u32> {
        each!(self, m => Backend::eqm_bits(m))
    }
    fn held_bytes(&self) -> u64 {
        each!(self, m => Backend::held_bytes(m))
    }
    fn kv_cache_bytes(&self) -> u64 {
        each!(self, m => Backend::kv_cache_bytes(m))
    }
    fn is_out_of_memory(e: &WebError) -> bool {
        e.code == Code::OutOfMemory
    }
    fn swaps_cannot_fail(&self) -> bool {
        each!(self, m => Backend::swaps_cannot_fail(m))
    }
    fn warms_kernels(&self) -> bool {
        matches!(self, WebModel::Gpu(_))
    }
}

/// Makes models on the backend chosen so far (`use_cpu`), so a fallback to the CPU (at load,
/// or after the GPU keeps failing) is one flag, not a new walk.
pub struct WebFactory {
    pub gpu: GpuFactory,
    pub cpu: CpuFactory,
    pub use_cpu: Cell<bool>,
    /// Why this backend runs, for `stats().backendReason` and the `backend` event.
    pub reason: RefCell<String>,
}

impl Factory for WebFactory {
    type Model = WebModel;
    async fn create(
        &self,
        config: &LlamaConfig,
        base: &std::sync::Arc<Base>,
        modules: Vec<PackedMatrix>,
    ) -> WebResult<WebModel> {
        if self.use_cpu.get() {
            Ok(WebModel::Cpu(self.cpu.create(config, base, modules).await?))
        } else {
            Ok(WebModel::Gpu(self.gpu.create(config, base, modules).await?))
        }
    }
    fn label(&self) -> String {
        if self.use_cpu.get() {
            self.cpu.label()
        } else {
            self.gpu.label()
        }
    }
}
