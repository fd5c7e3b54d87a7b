//! Walking the trajectory: loading a step onto a new device, executing the controller's
//! swaps between tokens (all shards first, then one module per step), prefetching the steps
//! below, and rebuilding after a device loss. `engine.rs` decides when; this file does it.

use crate::ensemble::base::Base;
use crate::ensemble::manifest::FileRef;
use crate::gpu::session::Session;
use crate::gpu::{Gpu, GpuError, Model, ModelOptions};
use crate::model::weights::ModuleId;
use crate::quant::format::{PackedMatrix, PackedShape};
use crate::runtime::Decision;
use crate::web::engine::{get, Inner, State};
use crate::web::error::{Code, WebError, WebResult};
use crate::web::events::Progress;
use crate::web::now_ms;
use serde_json::json;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use wasm_bindgen::JsCast;

/// After a swap's files failed to download or verify, the same target is not retried for
/// this long (a corrupt shard would otherwise be fetched again before every token).
const FETCH_RETRY_MS: f64 = 10_000.0;
/// Steps below the current one whose shards are prefetched: down to this fraction of the
/// current footprint (at least one step), so a pressure swap of that size needs no network.
const PREFETCH_TO: f64 = 0.75;

impl Inner {
    /// A new device and a model at the step the controller picks (stepping further down on
    /// out-of-memory), with an empty KV cache.
    pub(super) async fn build(&self) -> WebResult<(Session, usize)> {
        let m = &self.loader.manifest;
        // The GPU model API shares the device by `Arc` (natively across threads); in the
        // browser there is one thread.
        #[allow(clippy::arc_with_non_send_sync)]
        let gpu = Arc::new(
            Gpu::new(Model::requirements(&m.config, &self.opts))
                .await
                .map_err(|e| WebError::new(Code::WebGpuUnavailable, e.to_string()))?,
        );
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        gpu.device
            .set_device_lost_callback(move |_, _| flag.store(true, Ordering::SeqCst));
        let oom = self.oom.clone();
        gpu.device.on_uncaptured_error(Arc::new(move |e| {
            if matches!(e, wgpu::Error::OutOfMemory { .. }) {
                oom.store(true, Ordering::SeqCst);
            }
            web_sys::console::warn_1(&format!("flexquant: uncaptured WebGPU error: {e}").into());
        }));
        *self.lost.borrow_mut() = lost;
        self.snap.borrow_mut().adapter = adapter_label(&gpu).await;
        let mut p = Progress::new("download", 0, 0);
        let base_bytes = self.loader.file(&m.base, &mut p).await?;
        let base = Base::from_bytes(&m.config, m.quantizer.group_size, &base_bytes, &m.base.file)?;
        drop(base_bytes);
        loop {
            let step = self.elastic.borrow_mut().decide(now_ms()).target();
            let files = self.loader.step_files(step);
            let modules = self.modules(&files, step, "download").await?;
            self.loader
                .emitter
                .emit(json!({"type": "progress", "phase": "upload",
                "step": step, "totalBytes": m.trajectory[step].footprint_bytes}));
            match upload(gpu.clone(), &m.config, &base, &modules, self.opts).await {
                Ok(mut model) => {
                    self.warm_kernels(&mut model).await?;
                    let session = Session::new(model);
                    *self.alloc.borrow_mut() = Some(session.model.allocator().clone());
                    let fp = session.model.footprint().total();
                    {
                        let mut e = self.elastic.borrow_mut();
                        e.set_overheads(fp.saturating_sub(m.trajectory[step].footprint_bytes));
                        e.swapped(step, now_ms())?;
                    }
                    self.loader.mark_complete(step, &files).await;
                    return Ok((session, step));
                }
                Err(GpuError::OutOfMemory { .. }) if step + 1 < m.trajectory.len() => {
                    self.elastic.borrow_mut().swap_failed(step, now_ms())?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Compiles the kernels of every bit-width the ensemble holds by swapping its smallest
    /// module of that width in and back out, so that no pressure swap waits for shader
    /// compilation (seconds per bit-width on SwiftShader, against milliseconds for the swap).
    pub(super) async fn warm_kernels(&self, model: &mut Model) -> WebResult<()> {
        let m = &self.loader.manifest;
        let loaded = model.eqm_bits();
        let mut widths: Vec<u32> = m.modules.iter().map(|v| v.bits).collect();
        widths.sort_unstable();
        widths.dedup();
        for b in widths.into_iter().filter(|b| !loaded.contains(b)) {
            let Some(v) = m
                .modules
                .iter()
                .filter(|v| v.bits == b)
                .min_by_key(|v| v.file.bytes)
            else {
                continue;
            };
            let id = ModuleId {
                layer: v.layer,
                kind: v.kind,
            };
            let back = m.version(id, loaded[id.index()]).expect("validated");
            let files = [v.file.clone(), back.file.clone()];
            // A shard that cannot be had only means a later swap compiles this width.
            let bytes = match self.loader.files(&files, "upload").await {
                Ok(b) => b,
                Err(e) => {
                    self.loader.emitter.error(&e);
                    continue;
                }
            };
            let g = m.quantizer.group_size;
            model.set_module_bytes(id, b, g, &bytes[0]).await?;
            model.set_module_bytes(id, back.bits, g, &bytes[1]).await?;
        }
        Ok(())
    }

    /// Module versions from their shard files (verified by the loader).
    pub(super) async fn modules(
        &self,
        files: &[FileRef],
        step: usize,
        phase: &'static str,
    ) -> WebResult<Vec<PackedMatrix>> {
        let m = &self.loader.manifest;
        let bytes = self.loader.files(files, phase).await?;
        let bits = m.bits_at(step);
        bytes
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let id = ModuleId::from_index(i);
                let (r, c) = id.kind.shape(&m.config);
                let shape = PackedShape::new(r, c, bits[i], m.quantizer.group_size)?;
                Ok(PackedMatrix::from_bytes(shape, b, &files[i].file)?)
            })
            .collect()
    }

    /// Fetches into the cache the shards of the steps below `step` down to `PREFETCH_TO` of
    /// its footprint, in the background.
    pub(super) fn prefetch_below(self: &Rc<Self>, step: usize) {
        let m = &self.loader.manifest;
        let last = m.trajectory.len() - 1;
        if step >= last || !self.loader.cached() || self.prefetching.get() {
            return;
        }
        let floor = m.trajectory[step].footprint_bytes as f64 * PREFETCH_TO;
        let mut to = step + 1;
        while to < last && m.trajectory[to + 1].footprint_bytes as f64 >= floor {
            to += 1;
        }
        let files: Vec<FileRef> = (step + 1..=to)
            .filter_map(|s| {
                let sw = m.trajectory[s].swap.as_ref()?;
                let id = ModuleId {
                    layer: sw.layer,
                    kind: sw.kind,
                };
                Some(m.version(id, sw.to_bits)?.file.clone())
            })
            .collect();
        self.prefetching.set(true);
        let me = self.clone();
        wasm_bindgen_futures::spawn_local(async move {
            if let Err(e) = me.loader.prefetch(&files).await {
                me.loader.emitter.error(&e);
            }
            me.prefetching.set(false);
        });
    }

    /// Executes a swap decision: all shards first (a network or hash error changes nothing),
    /// then one `set_module` per trajectory step (an out-of-memory error stops at the last
    /// step reached, which is a valid EQM).
    pub(super) async fn execute(
        self: &Rc<Self>,
        st: &mut State,
        d: Decision,
        token_index: Option<usize>,
    ) -> WebResult<()> {
        let (from, to) = match d {
            Decision::StepDown { from, to, .. } | Decision::StepUp { from, to, .. } => (from, to),
            _ => return Ok(()),
        };
        if from != st.step || from == to {
            return Ok(());
        }
        let now = now_ms();
        if matches!(self.fetch_failure.get(), Some((t, at)) if t == to && now - at < FETCH_RETRY_MS)
        {
            return Ok(());
        }
        let m = &self.loader.manifest;
        // (module, from_bits, to_bits, trajectory step after it) in execution order.
        let moves: Vec<(ModuleId, u32, u32, usize)> = if to > from {
            (from + 1..=to)
                .map(|s| {
                    let w = m.trajectory[s].swap.as_ref().expect("validated");
                    let id = ModuleId {
                        layer: w.layer,
                        kind: w.kind,
                    };
                    (id, w.from_bits, w.to_bits, s)
                })
                .collect()
        } else {
            (to + 1..=from)
                .rev()
                .map(|s| {
                    let w = m.trajectory[s].swap.as_ref().expect("validated");
                    let id = ModuleId {
                        layer: w.layer,
                        kind: w.kind,
                    };
                    (id, w.to_bits, w.from_bits, s - 1)
                })
                .collect()
        };
        let files: Vec<FileRef> = moves
            .iter()
            .map(|&(id, _, b, _)| m.version(id, b).expect("validated").file.clone())
            .collect();
        let t0 = now_ms();
        let bytes = match self.loader.files(&files, "swap").await {
            Ok(b) => b,
            Err(e) => {
                self.fetch_failure.set(Some((to, now_ms())));
                return Err(e);
            }
        };
        let mut done = Vec::new();
        let mut failure = None;
        for ((id, fb, tb, after), b) in moves.iter().zip(&bytes) {
            let r = st
                .session
                .model
                .set_module_bytes(*id, *tb, m.quantizer.group_size, b)
                .await;
            match r {
                Ok(()) => {
                    st.step = *after;
                    done.push(json!({"module": id.to_string(), "fromBits": fb, "toBits": tb}));
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let ms = now_ms() - t0;
        if !done.is_empty() {
            let mut e = self.elastic.borrow_mut();
            e.swapped(st.step, now_ms())?;
            drop(e);
            let mut snap = self.snap.borrow_mut();
            snap.swaps += 1;
            snap.last_swap_reason = Some(d.reason());
            // stats() agrees with the swap event at once, not after the current token.
            snap.step = st.step;
            snap.bits = st.session.model.eqm_bits();
            drop(snap);
            let first = &done[0];
            self.loader.emitter.emit(json!({
                "type": "swap", "from": from, "to": st.step,
                "module": first["module"], "bits": first["toBits"], "modules": done,
                "ms": ms, "reason": d.reason(), "footprintBytes": m.trajectory[st.step].footprint_bytes,
                "tokenIndex": token_index,
            }));
            self.prefetch_below(st.step);
        }
        if let Some(e) = failure {
            if let GpuError::OutOfMemory { .. } = e {
                self.elastic.borrow_mut().swap_failed(to, now_ms())?;
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// After a device loss: a new device, a lower step (the controller's `DeviceLost`
    /// decision), the modules from the cache, and the conversation run into the new KV cache.
    pub(super) async fn recover(self: &Rc<Self>, st: &mut State) -> WebResult<()> {
        let t0 = now_ms();
        let from = st.step;
        self.elastic.borrow_mut().device_lost(now_ms());
        self.loader
            .emitter
            .emit(json!({"type": "device-lost", "step": from,
            "message": "the GPU device was lost; rebuilding at a lower step"}));
        let (model_session, step) = self.build().await?;
        let n = st.session.replace_model(model_session.model)?;
        st.step = step;
        let mut snap = self.snap.borrow_mut();
        snap.step = step;
        snap.bits = st.session.model.eqm_bits();
        snap.context_tokens = st.session.tokens().len();
        drop(snap);
        self.lost.borrow().store(false, Ordering::SeqCst);
        self.prefetch_below(step);
        self.loader
            .emitter
            .emit(json!({"type": "recovered", "from": from, "to": step,
            "ms": now_ms() - t0, "reprefilledTokens": n}));
        Ok(())
    }
}

/// wgpu's adapter name is empty on WebGPU; the browser's `GPUAdapterInfo` says more (e.g.
/// "google swiftshader (fallback)").
async fn adapter_label(gpu: &Gpu) -> String {
    let g = js_sys::global();
    let info = async {
        let gpu_js = get(&get(&g, "navigator"), "gpu");
        let f: js_sys::Function = get(&gpu_js, "requestAdapter").dyn_into().ok()?;
        let p: js_sys::Promise = f.call0(&gpu_js).ok()?.dyn_into().ok()?;
        let adapter = wasm_bindgen_futures::JsFuture::from(p).await.ok()?;
        let info = get(&adapter, "info");
        let parts: Vec<String> = ["vendor", "architecture", "description"]
            .iter()
            .filter_map(|k| get(&info, k).as_string().filter(|s| !s.is_empty()))
            .collect();
        let fallback = get(&info, "isFallbackAdapter").is_truthy()
            || get(&adapter, "isFallbackAdapter").is_truthy();
        (!parts.is_empty()).then(|| {
            format!(
                "{}{}",
                parts.join(" "),
                if fallback { " (fallback)" } else { "" }
            )
        })
    };
    match info.await {
        Some(s) => format!("{s} ({:?})", gpu.info.backend),
        None => gpu.adapter_name(),
    }
}

/// The model on the GPU from the base shard and one packed version per module.
async fn upload(
    gpu: Arc<Gpu>,
    config: &crate::model::config::LlamaConfig,
    base: &Base,
    modules: &[PackedMatrix],
    opts: ModelOptions,
) -> Result<Model, GpuError> {
    Model::from_base(gpu, config, base, modules, opts).await
}
