//! The browser's side of the trajectory walk (`runtime::walk` does the walking): the
//! `ByteSource` over fetch + Cache API, the WebGPU factory's device hooks (`device.lost`,
//! uncaptured out-of-memory), the walk's events as JS events and stats, prefetching in the
//! background, and the adapter's label.

use crate::cpu::CpuFactory;
use crate::ensemble::manifest::{FileRef, Manifest};
use crate::gpu::{Gpu, GpuFactory, ModelOptions};
use crate::runtime::walk::{ByteSource, Event, Running};
use crate::runtime::{Elastic, Factory, Walk};
use crate::web::backend::{BackendChoice, WebFactory, WebModel};
use crate::web::engine::{Inner, Snapshot};
use crate::web::error::Code;
use crate::web::error::{WebError, WebResult};
use crate::web::events::Emitter;
use crate::web::loader::Loader;
use crate::web::support::probe_adapter;
use serde_json::json;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub type WebWalk = Walk<Loader, WebFactory>;

/// Device losses in a row (no token in between) before giving up on the GPU.
const MAX_LOSSES_IN_A_ROW: u32 = 3;

impl ByteSource for Loader {
    type Error = WebError;

    fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    async fn files(&self, files: &[FileRef], phase: &'static str) -> WebResult<Vec<Vec<u8>>> {
        Loader::files(self, files, phase).await
    }
    async fn hold(
        &self,
        files: &[FileRef],
        phase: &'static str,
    ) -> WebResult<Vec<Box<dyn crate::runtime::walk::Held>>> {
        Loader::hold(self, files, phase).await
    }
    async fn each_file(
        &self,
        files: &[FileRef],
        phase: &'static str,
        each: &mut dyn FnMut(usize, Vec<u8>) -> WebResult<()>,
    ) -> WebResult<()> {
        Loader::each_file(self, files, phase, &mut |i, b| each(i, b.to_vec())).await
    }
    fn prefetches(&self) -> bool {
        self.cached()
    }
    /// A file that failed verification, or that the server does not have (404, 410): a load
    /// falls back to a step without it, a swap stops before it.
    fn unverified_file(e: &WebError) -> Option<String> {
        match e.code {
            Code::HashMismatch | Code::Truncated => e.file.clone(),
            Code::Http if matches!(e.status, Some(404 | 410)) => e.file.clone(),
            _ => None,
        }
    }
}

/// Flags the engine reads between tokens, set by the current device's callbacks.
#[derive(Clone)]
pub struct DeviceFlags {
    /// Set by the current device's `lost` callback (or `simulateDeviceLoss`).
    pub lost: Rc<RefCell<Arc<AtomicBool>>>,
    /// Set by an uncaptured WebGPU out-of-memory error.
    pub oom: Arc<AtomicBool>,
}

/// The walk over `loader` with a factory for both backends (the CPU one when `use_cpu`), whose
/// WebGPU devices report to `flags`, and whose events go to the app (`emitter`) and to the
/// stats (`snap`).
pub fn web_walk(
    loader: Loader,
    opts: ModelOptions,
    use_cpu: bool,
    elastic: Elastic,
    flags: DeviceFlags,
    snap: Rc<RefCell<Snapshot>>,
) -> WebWalk {
    let emitter = loader.emitter.clone();
    let mut gpu = GpuFactory::new(opts);
    gpu.on_device = Some(Box::new(move |gpu: &Arc<Gpu>| {
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        gpu.device
            .set_device_lost_callback(move |_, _| flag.store(true, Ordering::SeqCst));
        let oom = flags.oom.clone();
        gpu.device.on_uncaptured_error(Arc::new(move |e| {
            if matches!(e, wgpu::Error::OutOfMemory { .. }) {
                oom.store(true, Ordering::SeqCst);
            }
            web_sys::console::warn_1(&format!("flexquant: uncaptured WebGPU error: {e}").into());
        }));
        *flags.lost.borrow_mut() = lost;
    }));
    let factory = WebFactory {
        gpu,
        cpu: CpuFactory {
            context: opts.context,
            kv_format: opts.kv_format,
            budget: None,
        },
        use_cpu: std::cell::Cell::new(use_cpu),
        reason: RefCell::default(),
    };
    Walk::new(
        loader,
        factory,
        elastic,
        Box::new(move |e| on_walk_event(&emitter, &snap, e)),
    )
}

/// A walk event as the app's event (see `js/API.md`) and in the stats.
fn on_walk_event(em: &Emitter, snap: &RefCell<Snapshot>, e: Event<'_, WebError>) {
    match e {
        Event::Upload { step, total_bytes } => em.emit(json!({"type": "progress",
            "phase": "upload", "step": step, "totalBytes": total_bytes})),
        Event::Swap {
            from,
            to,
            modules,
            ms,
            reason,
            footprint_bytes,
            token_index,
            bits,
        } => {
            {
                let mut s = snap.borrow_mut();
                s.swaps += 1;
                s.last_swap_reason = Some(reason);
                // stats() agrees with the swap event at once, not after the current token.
                s.step = to;
                s.bits = bits;
            }
            let done: Vec<_> = modules
                .iter()
                .map(|m| {
                    json!({"module": m.module.to_string(),
                    "fromBits": m.from_bits, "toBits": m.to_bits})
                })
                .collect();
            let first = &done[0];
            em.emit(json!({
                "type": "swap", "from": from, "to": to,
                "module": first["module"], "bits": first["toBits"], "modules": done,
                "ms": ms, "reason": reason, "footprintBytes": footprint_bytes,
                "tokenIndex": token_index,
            }));
        }
        Event::DeviceLost { step } => em.emit(json!({"type": "device-lost", "step": step,
            "message": "the GPU device was lost; rebuilding at a lower step"})),
        Event::Recovered {
            from,
            to,
            ms,
            reprefilled_tokens,
            bits,
        } => {
            {
                let mut s = snap.borrow_mut();
                s.step = to;
                s.bits = bits;
                s.context_tokens = reprefilled_tokens;
            }
            em.emit(json!({"type": "recovered", "from": from, "to": to,
                "ms": ms, "reprefilledTokens": reprefilled_tokens}));
        }
        Event::KvConverted {
            from,
            to,
            bytes_before,
            bytes_after,
            token_index,
        } => {
            {
                let mut s = snap.borrow_mut();
                s.kv_format = Some(to);
                s.kv_cache_bytes = bytes_after;
            }
            em.emit(json!({"type": "kv-cache", "from": from, "to": to,
                "bytesBefore": bytes_before, "bytesAfter": bytes_after,
                "tokenIndex": token_index}));
        }
        Event::Warning(e) => em.error(e),
    }
}

impl Inner {
    /// A model at the controller's step on the chosen backend (a new device on WebGPU), with
    /// the backend's label in the stats.
    pub(super) async fn build(&self) -> WebResult<Running<WebModel>> {
        let run = self.walk.load().await?;
        self.after_build(&run.session.model).await;
        Ok(run)
    }

    async fn after_build(&self, model: &WebModel) {
        let label = match model.gpu() {
            Some(gpu) => adapter_label(gpu).await,
            None => self.walk.factory.label(),
        };
        self.snap.borrow_mut().adapter = label;
        *self.device.borrow_mut() = model.gpu().map(|g| g.device.clone());
        *self.alloc.borrow_mut() = match model {
            WebModel::Gpu(m) => Some(m.allocator().clone()),
            WebModel::Cpu(_) => None,
        };
    }

    /// After the first load: stores what it downloaded (deferred until the model ran), then
    /// prefetches below `step`, in the background (`prefetching` in the stats meanwhile).
    pub(super) fn store_then_prefetch(self: &Rc<Self>, step: usize) {
        self.prefetching.set(true);
        let me = self.clone();
        wasm_bindgen_futures::spawn_local(async move {
            me.walk.source.store_deferred().await;
            me.prefetching.set(false);
            me.prefetch_below(step);
        });
    }

    /// Fetches into the cache the shards of the steps below `step` (see `walk::PREFETCH_TO`),
    /// in the background.
    pub(super) fn prefetch_below(self: &Rc<Self>, step: usize) {
        let files = self.walk.prefetch_files(step);
        if files.is_empty() || self.prefetching.get() {
            return;
        }
        self.prefetching.set(true);
        let me = self.clone();
        wasm_bindgen_futures::spawn_local(async move {
            match me.walk.source.prefetch(&files).await {
                Err(e) if !me.unloaded.get() => me.walk.source.emitter.error(&e),
                _ => {}
            }
            me.prefetching.set(false);
        });
    }

    /// Executes the controller's decision (`Walk::execute`), then prefetches below the step
    /// reached.
    pub(super) async fn execute(
        self: &Rc<Self>,
        run: &mut Running<WebModel>,
        d: crate::runtime::Decision,
        token_index: Option<usize>,
    ) -> WebResult<()> {
        let before = run.step;
        let r = self.walk.execute(run, d, token_index).await;
        if run.step != before {
            self.prefetch_below(run.step);
        }
        r
    }

    /// After a device loss: `Walk::recover` (a new device, a lower step, the conversation
    /// re-prefilled), then the new device's label and prefetching.
    pub(super) async fn recover(self: &Rc<Self>, run: &mut Running<WebModel>) -> WebResult<()> {
        // Losses in a row (no token in between) are capped: with `backend: 'auto'` the model
        // moves to the CPU backend, else the loss is a `device-lost` error instead of a loop.
        let n = self.losses_in_a_row.get() + 1;
        self.losses_in_a_row.set(n);
        if n > MAX_LOSSES_IN_A_ROW && run.session.model.gpu().is_some() {
            if self.choice != BackendChoice::Auto {
                self.flags.lost.borrow().store(false, Ordering::SeqCst);
                return Err(WebError::new(
                    Code::DeviceLost,
                    format!(
                        "the GPU device was lost {n} times in a row; giving up (reload, or \
                         use backend 'cpu' or 'auto')"
                    ),
                ));
            }
            let f = &self.walk.factory;
            f.use_cpu.set(true);
            *f.reason.borrow_mut() = format!("the WebGPU device was lost {n} times in a row");
        }
        let kind = run.session.model.kind();
        self.walk.recover(run).await?;
        if run.session.model.kind() != kind {
            self.backend_event(run.session.model.kind());
        }
        self.after_build(&run.session.model).await;
        self.flags.lost.borrow().store(false, Ordering::SeqCst);
        self.prefetch_below(run.step);
        Ok(())
    }
}

/// wgpu's adapter name is empty on WebGPU; the browser's `GPUAdapterInfo` says more (e.g.
/// "google swiftshader (fallback)").
async fn adapter_label(gpu: &Gpu) -> String {
    match probe_adapter().await {
        Ok(a) => format!("{} ({:?})", a.label, gpu.info.backend),
        Err(_) => gpu.adapter_name(),
    }
}
