//! The packed CPU model as a `runtime::Backend`, and its factory.

use crate::cpu::model::CpuModel;
use crate::ensemble::base::Base;
use crate::ensemble::format::PackedMatrix;
use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::weights::ModuleId;
use crate::runtime::backend::{Backend, Factory, KvFormat, Scored};
use std::sync::Arc;

impl Backend for CpuModel {
    type Error = Error;

    fn context(&self) -> usize {
        CpuModel::context(self)
    }
    fn len(&self) -> usize {
        CpuModel::len(self)
    }
    fn truncate(&mut self, n: usize) {
        CpuModel::truncate(self, n)
    }
    fn kv_format(&self) -> Option<KvFormat> {
        Some(CpuModel::kv_format(self))
    }
    async fn convert_kv(&mut self, to: KvFormat) -> Result<()> {
        CpuModel::convert_kv(self, to)
    }
    async fn shrink_kv(&mut self, needed: usize) -> Result<()> {
        CpuModel::shrink_kv(self, needed);
        Ok(())
    }
    fn release_kv(&mut self) {
        CpuModel::release_kv(self)
    }
    async fn read_kv(&self, out: &mut dyn FnMut(&[u8])) -> Result<()> {
        CpuModel::read_kv(self, out);
        Ok(())
    }
    async fn write_kv(
        &mut self,
        format: KvFormat,
        positions: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<()> {
        CpuModel::write_kv(self, format, positions, fill)
    }
    async fn step(&mut self, tokens: &[u32]) -> Result<Vec<(u32, f32)>> {
        if tokens.len() == 1 {
            // A decode token: the pool times it to choose its thread count.
            return crate::cpu::par::token(|| CpuModel::step(self, tokens));
        }
        crate::cpu::par::prefill(|| CpuModel::step(self, tokens))
    }
    async fn step_scored(&mut self, tokens: &[u32], n: usize, _watched: &[u32]) -> Result<Scored> {
        crate::cpu::par::prefill(|| CpuModel::step_scored(self, tokens, n))
    }
    fn watch(&mut self, ids: &[u32]) -> Result<()> {
        CpuModel::watch(self, ids)
    }
    fn log_z(&self) -> f32 {
        CpuModel::log_z(self)
    }
    async fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        crate::cpu::par::prefill(|| self.hidden(tokens).map(|_| ()))
    }
    async fn set_module(&mut self, id: ModuleId, m: PackedMatrix) -> Result<()> {
        CpuModel::set_module(self, id, m)
    }
    fn eqm_bits(&self) -> Vec<u32> {
        CpuModel::eqm_bits(self)
    }
    fn swaps_cannot_fail(&self) -> bool {
        // Versions come from a validated manifest, so only a budget can refuse one.
        !self.has_budget()
    }
    fn held_bytes(&self) -> u64 {
        CpuModel::held_bytes(self)
    }
    fn kv_cache_bytes(&self) -> u64 {
        CpuModel::kv_bytes(self)
    }
    #[cfg(not(target_arch = "wasm32"))]
    async fn perplexity(
        &mut self,
        tokens: &[u32],
        ctx: usize,
        stride: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<crate::model::eval::Perplexity> {
        let max = self.context();
        crate::model::eval::perplexity_with(tokens, ctx, stride, max, progress, |w, skip| {
            self.truncate(0);
            if skip > 1 {
                self.hidden(&w[..skip - 1])?;
            }
            self.nll(&w[skip - 1..w.len() - 1], &w[skip..])
        })
    }
    fn is_out_of_memory(e: &Error) -> bool {
        matches!(e, Error::OutOfMemory { .. })
    }
}

/// Makes packed CPU models with a KV cache of up to `context` positions, holding at most `budget`
/// bytes.
pub struct CpuFactory {
    pub context: usize,
    pub kv_format: KvFormat,
    pub budget: Option<u64>,
}

impl Factory for CpuFactory {
    type Model = CpuModel;
    async fn create(
        &self,
        config: &LlamaConfig,
        base: &Arc<Base>,
        modules: Vec<PackedMatrix>,
    ) -> Result<CpuModel> {
        let (context, kv) = (self.context, self.kv_format);
        CpuModel::new(config, base.clone(), modules, context, kv, self.budget)
    }
    fn label(&self) -> String {
        let simd = if cfg!(all(target_arch = "wasm32", target_feature = "simd128")) {
            "wasm simd128"
        } else if cfg!(target_arch = "wasm32") {
            "wasm scalar"
        } else {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return format!(
                    "cpu (packed i16 dot, avx2, {} threads)",
                    crate::cpu::par::threads()
                );
            }
            "portable"
        };
        format!(
            "cpu (packed i16 dot, {simd}, {} threads)",
            crate::cpu::par::threads()
        )
    }
}
