//! What this browser offers the engine, asked before anything loads (`Engine.checkSupport()`):
//! secure context, WebGPU and its adapter (fallback or not, f16, subgroups, the limits the
//! kernels depend on), cross-origin isolation, and which backend `backend: 'auto'` picks.

use crate::web::api::get;
use crate::web::backend::Kind;
use crate::web::error::WebError;
use serde::Serialize;
use wasm_bindgen::{JsCast, JsValue};

/// What `backend: 'auto'` picks in this browser, and why (also `Engine.checkSupport()`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Support {
    pub backend: Kind,
    pub reason: String,
    /// The WebGPU adapter's label, if there is one.
    pub adapter: Option<String>,
    pub emulated_gpu: bool,
    /// COOP/COEP are set: `SharedArrayBuffer`, hence wasm threads.
    pub cross_origin_isolated: bool,
    /// What threads a worker engine's CPU backend can have here.
    pub threads: crate::web::threads::ThreadSupport,
    /// `https://` or localhost: WebGPU, the Cache API and SubtleCrypto need it.
    pub secure_context: bool,
    /// `navigator.gpu` exists.
    pub webgpu: bool,
    /// The adapter's features and limits; `None` without an adapter.
    pub gpu: Option<GpuOffer>,
}

/// What the WebGPU adapter offers (the parts the kernels choose paths by).
#[derive(Serialize, Clone)]
#[serde(rename_all = "camelCase")]
pub struct GpuOffer {
    /// `adapter.info.isFallbackAdapter`: the browser's own CPU implementation.
    pub fallback: bool,
    /// `shader-f16`: the f16 kernels (f32 otherwise).
    pub f16: bool,
    /// `subgroups`: subgroup reductions (workgroup memory otherwise).
    pub subgroups: bool,
    pub limits: Limits,
}

/// The adapter limits the engine depends on (numbers as the browser reports them).
#[derive(Serialize, Clone)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    pub max_buffer_size: f64,
    pub max_storage_buffer_binding_size: f64,
    pub max_storage_buffers_per_shader_stage: f64,
    pub max_compute_invocations_per_workgroup: f64,
    pub max_compute_workgroup_storage_size: f64,
}

/// `auto`'s choice: WebGPU unless it is missing or a CPU emulation.
pub async fn auto_choice() -> Support {
    let g = js_sys::global();
    let isolated = get(&g, "crossOriginIsolated").is_truthy();
    let probe = probe_adapter().await;
    let gpu = probe.as_ref().ok().map(|a| a.offer.clone());
    let (backend, reason, adapter, emulated) = match probe {
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
    let webgpu = !get(&get(&g, "navigator"), "gpu").is_undefined();
    Support {
        backend,
        reason,
        adapter,
        emulated_gpu: emulated,
        cross_origin_isolated: isolated,
        threads: crate::web::threads::support(),
        secure_context: get(&g, "isSecureContext").is_truthy(),
        webgpu,
        gpu,
    }
}

/// `Engine.checkSupport()`: which backend `auto` would pick here and why, without loading
/// anything.
#[wasm_bindgen::prelude::wasm_bindgen(js_name = checkSupport)]
pub async fn check_support() -> JsValue {
    crate::web::events::to_js(&auto_choice().await)
}

/// What the browser's WebGPU adapter says about itself.
pub struct AdapterInfo {
    /// e.g. "google swiftshader (fallback)".
    pub label: String,
    /// A CPU emulation rather than a GPU.
    pub emulated: bool,
    pub offer: GpuOffer,
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
        offer: offer(&adapter, fallback),
    })
}

/// The adapter's features and limits.
fn offer(adapter: &JsValue, fallback: bool) -> GpuOffer {
    let features = get(adapter, "features");
    let has = |name: &str| -> bool {
        get(&features, "has")
            .dyn_into::<js_sys::Function>()
            .ok()
            .and_then(|f| f.call1(&features, &name.into()).ok())
            .is_some_and(|v| v.is_truthy())
    };
    let lim = get(adapter, "limits");
    let n = |k: &str| get(&lim, k).as_f64().unwrap_or(0.0);
    GpuOffer {
        fallback,
        f16: has("shader-f16"),
        subgroups: has("subgroups"),
        limits: Limits {
            max_buffer_size: n("maxBufferSize"),
            max_storage_buffer_binding_size: n("maxStorageBufferBindingSize"),
            max_storage_buffers_per_shader_stage: n("maxStorageBuffersPerShaderStage"),
            max_compute_invocations_per_workgroup: n("maxComputeInvocationsPerWorkgroup"),
            max_compute_workgroup_storage_size: n("maxComputeWorkgroupStorageSize"),
        },
    }
}
