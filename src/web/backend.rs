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
use crate::runtime::backend::{Backend, Factory};
use crate::web::api::get;
use crate::web::error::{Code, WebError, WebResult};
use serde::{Deserialize, Serialize};
use std::cell::{Cell, RefCell};
use std::sync::Arc;
use wasm_bindgen::JsCast;

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
    async fn step(&mut self, tokens: &[u32]) -> WebResult<Vec<(u32, f32)>> {
        Ok(each!(self, m => Backend::step(m, tokens).await?))
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
    fn is_out_of_memory(e: &WebError) -> bool {
        e.code == Code::OutOfMemory
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

/// What `backend: 'auto'` picks in this browser, and why (also `Engine.checkSupport()`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Support {
    pub backend: Kind,
    pub reason: String,
    /// The WebGPU adapter's label, if there is one.
    pub adapter: Option<String>,
    pub emulated_gpu: bool,
    /// Whether wasm threads could be used (COOP/COEP): the CPU backend runs one thread.
    pub cross_origin_isolated: bool,
}

/// `auto`'s choice: WebGPU unless it is missing or a CPU emulation.
pub async fn auto_choice() -> Support {
    let isolated = get(&js_sys::global(), "crossOriginIsolated").is_truthy();
    let (backend, reason, adapter, emulated) = match probe_adapter().await {
        Err(why) => (Kind::Cpu, why, None, false),
        Ok(a) if a.emulated => (
            Kind::Cpu,
            format!("the WebGPU adapter ({}) emulates a GPU on the CPU", a.label),
            Some(a.label),
            true,
        ),
        Ok(a) => (
            Kind::Webgpu,
            format!("WebGPU adapter {}", a.label),
            Some(a.label),
            false,
        ),
    };
    Support {
        backend,
        reason,
        adapter,
        emulated_gpu: emulated,
        cross_origin_isolated: isolated,
    }
}

/// `Engine.checkSupport()`: which backend `auto` would pick here and why, without loading
/// anything.
#[wasm_bindgen::prelude::wasm_bindgen(js_name = checkSupport)]
pub async fn check_support() -> wasm_bindgen::JsValue {
    crate::web::events::to_js(&auto_choice().await)
}

/// What the browser's WebGPU adapter says about itself.
pub struct AdapterInfo {
    /// e.g. "google swiftshader (fallback)".
    pub label: String,
    /// A CPU emulation rather than a GPU.
    pub emulated: bool,
}

/// `navigator.gpu.requestAdapter()`'s info; `Err(reason)` when there is no WebGPU adapter.
pub async fn probe_adapter() -> Result<AdapterInfo, String> {
    let g = js_sys::global();
    let gpu_js = get(&get(&g, "navigator"), "gpu");
    if gpu_js.is_undefined() || gpu_js.is_null() {
        return Err("this browser has no WebGPU (navigator.gpu is missing)".into());
    }
    let f: js_sys::Function = get(&gpu_js, "requestAdapter")
        .dyn_into()
        .map_err(|_| "navigator.gpu.requestAdapter is not a function".to_string())?;
    let p: js_sys::Promise = f
        .call0(&gpu_js)
        .ok()
        .and_then(|p| p.dyn_into().ok())
        .ok_or("navigator.gpu.requestAdapter() failed")?;
    let adapter = wasm_bindgen_futures::JsFuture::from(p)
        .await
        .map_err(|e| format!("requestAdapter: {}", WebError::js_text(&e)))?;
    if adapter.is_null() || adapter.is_undefined() {
        return Err("no WebGPU adapter (requestAdapter() gave null)".into());
    }
    let info = get(&adapter, "info");
    let parts: Vec<String> = ["vendor", "architecture", "device", "description"]
        .iter()
        .filter_map(|k| get(&info, k).as_string().filter(|s| !s.is_empty()))
        .collect();
    let fallback = get(&info, "isFallbackAdapter").is_truthy()
        || get(&adapter, "isFallbackAdapter").is_truthy();
    let name = parts.join(" ");
    let lower = name.to_lowercase();
    let software = ["swiftshader", "llvmpipe", "lavapipe", "software"]
        .iter()
        .any(|s| lower.contains(s));
    Ok(AdapterInfo {
        label: format!(
            "{}{}",
            if name.is_empty() {
                "unnamed adapter"
            } else {
                &name
            },
            if fallback { " (fallback)" } else { "" }
        ),
        emulated: fallback || software,
    })
}
