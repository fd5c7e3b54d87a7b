//! The GPU model as a `runtime::Backend`, and a factory that makes one on a new device.

use crate::ensemble::base::Base;
use crate::ensemble::format::PackedMatrix;
use crate::gpu::device::Gpu;
use crate::gpu::error::{GpuError, GpuResult};
use crate::gpu::model::{Model, ModelOptions};
use crate::model::config::LlamaConfig;
use crate::model::weights::ModuleId;
use crate::runtime::backend::{Backend, Factory, KvFormat};
use std::cell::RefCell;
use std::sync::Arc;

impl Backend for Model {
    type Error = GpuError;

    fn context(&self) -> usize {
        self.options().context
    }
    fn len(&self) -> usize {
        Model::len(self)
    }
    fn truncate(&mut self, n: usize) {
        Model::truncate(self, n)
    }
    fn kv_format(&self) -> Option<KvFormat> {
        Some(self.options().kv_format)
    }
    async fn convert_kv(&mut self, to: KvFormat) -> GpuResult<()> {
        Model::convert_kv(self, to).await
    }
    async fn shrink_kv(&mut self, needed: usize) -> GpuResult<()> {
        Model::shrink_kv(self, needed).await
    }
    fn release_kv(&mut self) {
        Model::release_kv(self)
    }
    async fn read_kv(&self, out: &mut dyn FnMut(&[u8])) -> GpuResult<()> {
        Model::read_kv(self, out).await
    }
    async fn write_kv(
        &mut self,
        format: KvFormat,
        positions: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> GpuResult<()> {
        Model::write_kv(self, format, positions, fill).await
    }
    async fn step(&mut self, tokens: &[u32]) -> GpuResult<Vec<(u32, f32)>> {
        Model::step(self, tokens).await
    }
    async fn step_scored(
        &mut self,
        tokens: &[u32],
        n: usize,
        _watched: &[u32],
    ) -> GpuResult<crate::runtime::backend::Scored> {
        Model::step_scored(self, tokens, n).await
    }
    fn watch(&mut self, ids: &[u32]) -> GpuResult<()> {
        Model::watch(self, ids)
    }
    fn log_z(&self) -> f32 {
        Model::log_z(self)
    }
    async fn prefill(&mut self, tokens: &[u32]) -> GpuResult<()> {
        Model::prefill(self, tokens).await
    }
    async fn set_module(&mut self, id: ModuleId, m: PackedMatrix) -> GpuResult<()> {
        Model::set_module(self, id, &m).await
    }
    fn eqm_bits(&self) -> Vec<u32> {
        Model::eqm_bits(self)
    }
    fn held_bytes(&self) -> u64 {
        Model::held_bytes(self)
    }
    fn kv_cache_bytes(&self) -> u64 {
        self.kv_held_bytes()
    }
    #[cfg(not(target_arch = "wasm32"))]
    async fn perplexity(
        &mut self,
        tokens: &[u32],
        ctx: usize,
        stride: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> GpuResult<crate::model::eval::Perplexity> {
        crate::gpu::perplexity::perplexity(self, tokens, ctx, stride, progress).await
    }
    fn is_out_of_memory(e: &GpuError) -> bool {
        matches!(e, GpuError::OutOfMemory { .. })
    }
    fn warms_kernels(&self) -> bool {
        true
    }
}

/// A hook run on each new device.
pub type OnDevice = Box<dyn Fn(&Arc<Gpu>)>;

/// Makes GPU models, each on a new device (after a loss the old one is gone), with an
/// optional allocator budget (bytes the model may hold: out-of-memory beyond it).
pub struct GpuFactory {
    pub opts: ModelOptions,
    pub budget: Option<u64>,
    /// Called with each new device before the model is uploaded (the browser hooks its
    /// `lost` and uncaptured-error callbacks here).
    pub on_device: Option<OnDevice>,
    label: RefCell<String>,
}

impl GpuFactory {
    pub fn new(opts: ModelOptions) -> Self {
        GpuFactory {
            opts,
            budget: None,
            on_device: None,
            label: RefCell::default(),
        }
    }
}

impl Factory for GpuFactory {
    type Model = Model;
    async fn create(
        &self,
        config: &LlamaConfig,
        base: &Arc<Base>,
        modules: Vec<PackedMatrix>,
    ) -> GpuResult<Model> {
        // The model API shares the device by `Arc` (natively across threads); in the browser
        // there is one thread.
        #[allow(clippy::arc_with_non_send_sync)]
        let gpu = Arc::new(Gpu::new(Model::requirements(config, &self.opts)).await?);
        *self.label.borrow_mut() = gpu.adapter_name();
        if let Some(f) = &self.on_device {
            f(&gpu);
        }
        let mut model = Model::from_base(gpu, config, base, &modules, self.opts).await?;
        model.set_budget(self.budget);
        if let Some(b) = self.budget.filter(|&b| model.held_bytes() > b) {
            return Err(GpuError::OutOfMemory {
                what: "the model".into(),
                requested: model.held_bytes(),
                in_use: 0,
                budget: Some(b),
            });
        }
        Ok(model)
    }
    fn label(&self) -> String {
        self.label.borrow().clone()
    }
}
