//! Adapter and device setup: ask for exactly the limits the model needs (so a device made here
//! behaves like the browser's), and name the limit when the adapter falls short.

use crate::gpu::error::{GpuError, GpuResult};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// The most invocations any kernel uses per workgroup: the browser (SwiftShader and the WebGPU
/// default) guarantees 256.
pub const MAX_INVOCATIONS: u32 = 256;
/// The most storage buffers any kernel binds (`MatvecQkv` with the norm folded in: three
/// matrices, x, the norm's weights, three outputs): the WebGPU default, which every adapter of
/// WebGPU's core gives.
pub const MAX_STORAGE_BUFFERS: u32 = 8;
/// Workgroup memory the kernels declare at most (attention's q and score tiles, top-k).
pub const MAX_WORKGROUP_STORAGE: u32 = 4096;

/// What a model needs from the device beyond the kernels' fixed needs above.
#[derive(Debug, Clone, Copy, Default)]
pub struct Requirements {
    /// The largest buffer bound to one kernel (the embedding or head, a KV layer, logits).
    pub max_binding: u64,
    /// The most workgroups one dispatch asks for along one dimension.
    pub max_workgroups: u32,
}

pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    /// The adapter's own limits (what a later, larger model could still get).
    pub adapter_limits: wgpu::Limits,
}

impl Gpu {
    /// `name (backend, device type)`, e.g. `llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan, Cpu)`.
    pub fn adapter_name(&self) -> String {
        format!(
            "{} ({:?}, {:?})",
            self.info.name, self.info.backend, self.info.device_type
        )
    }

    /// The device's limits: what kernels and buffers may use.
    pub fn limits(&self) -> wgpu::Limits {
        self.device.limits()
    }

    /// Finds an adapter and requests a device with `req` (and the kernels' fixed needs).
    pub async fn new(req: Requirements) -> GpuResult<Gpu> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                force_fallback_adapter: false,
                compatible_surface: None,
                apply_limit_buckets: false,
            })
            .await
            .map_err(|e| GpuError::NoAdapter(e.to_string()))?;
        let have = adapter.limits();
        let required_limits = required_limits(req, &have)?;
        // Subgroup operations where the adapter has them (natively: wgpu's browser backend
        // cannot ask for them, and naga does not parse `enable subgroups;`).
        let required_features = if cfg!(not(target_arch = "wasm32")) {
            adapter.features() & wgpu::Features::SUBGROUP
        } else {
            wgpu::Features::empty()
        };
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("flexquant"),
                required_features,
                required_limits,
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| GpuError::Device(e.to_string()))?;
        Ok(Gpu {
            device,
            queue,
            info: adapter.get_info(),
            adapter_limits: have,
        })
    }

    /// Lanes every subgroup of this device holds at least, if kernels may use subgroup
    /// operations.
    pub fn subgroup_lanes(&self) -> Option<u32> {
        self.device
            .features()
            .contains(wgpu::Features::SUBGROUP)
            .then_some(self.info.subgroup_min_size)
    }

    /// Native convenience: `new` driven to completion on this thread.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new_blocking(req: Requirements) -> GpuResult<Gpu> {
        pollster::block_on(Self::new(req))
    }

    /// Whether decode folds the RMSNorms into the matvecs here unless told (`ModelOptions::
    /// fuse_norm`): on GPUs, not on CPU adapters (measured on lavapipe: 10-15% slower folded).
    pub fn folds_norms_by_default(&self) -> bool {
        self.info.device_type != wgpu::DeviceType::Cpu
    }

    /// Whether decode runs a layer's Q, K and V (and its gate and up projections) in one
    /// dispatch here unless told (`ModelOptions::fuse_modules`): as `folds_norms_by_default`.
    pub fn fuses_modules_by_default(&self) -> bool {
        self.folds_norms_by_default()
    }

    /// Checks that this device (possibly made for another model) can serve `req`.
    pub fn check(&self, req: Requirements) -> GpuResult<()> {
        required_limits(req, &self.device.limits()).map(|_| ())
    }

    /// Waits until all submitted work is done (natively; a no-op in the browser, where
    /// completion is observed by awaiting a buffer mapping).
    pub fn wait(&self) {
        #[cfg(not(target_arch = "wasm32"))]
        let _ = self.device.poll(wgpu::PollType::wait_indefinitely());
    }

    /// Resolves when the work submitted so far has finished (natively, by waiting; in the
    /// browser, from the queue's completion callback): what timing a submission needs.
    pub async fn finished(&self) {
        let done = Oneshot::default();
        let tx = done.clone();
        self.queue.on_submitted_work_done(move || tx.send(()));
        self.wait();
        done.await
    }

    /// Copies `bytes` bytes from the start of a `MAP_READ` buffer to the host.
    pub async fn read(&self, staging: &wgpu::Buffer, bytes: u64) -> GpuResult<Vec<u8>> {
        let done = Oneshot::default();
        let tx = done.clone();
        staging.map_async(wgpu::MapMode::Read, 0..bytes, move |r| tx.send(r));
        self.wait();
        done.await
            .map_err(|e| GpuError::Internal(format!("mapping the readback buffer: {e}")))?;
        let out = staging
            .get_mapped_range(0..bytes)
            .map_err(|e| GpuError::Internal(format!("reading the readback buffer: {e}")))?
            .to_vec();
        staging.unmap();
        Ok(out)
    }
}

/// The WebGPU defaults raised to `req`; an error names the first limit the adapter lacks.
fn required_limits(req: Requirements, have: &wgpu::Limits) -> GpuResult<wgpu::Limits> {
    let mut l = wgpu::Limits::default();
    let checks: [(&'static str, u64, u64); 6] = [
        (
            "maxStorageBufferBindingSize",
            req.max_binding,
            have.max_storage_buffer_binding_size,
        ),
        ("maxBufferSize", req.max_binding, have.max_buffer_size),
        (
            "maxComputeInvocationsPerWorkgroup",
            MAX_INVOCATIONS as u64,
            have.max_compute_invocations_per_workgroup as u64,
        ),
        (
            "maxStorageBuffersPerShaderStage",
            MAX_STORAGE_BUFFERS as u64,
            have.max_storage_buffers_per_shader_stage as u64,
        ),
        (
            "maxComputeWorkgroupStorageSize",
            MAX_WORKGROUP_STORAGE as u64,
            have.max_compute_workgroup_storage_size as u64,
        ),
        (
            "maxComputeWorkgroupsPerDimension",
            req.max_workgroups as u64,
            have.max_compute_workgroups_per_dimension as u64,
        ),
    ];
    for (limit, needed, available) in checks {
        if needed > available {
            return Err(GpuError::Limit {
                limit,
                needed,
                available,
            });
        }
    }
    l.max_storage_buffer_binding_size = l.max_storage_buffer_binding_size.max(req.max_binding);
    l.max_buffer_size = l.max_buffer_size.max(req.max_binding);
    l.max_compute_workgroups_per_dimension = l
        .max_compute_workgroups_per_dimension
        .max(req.max_workgroups);
    // The defaults are the floor every adapter meets, but a few native drivers report less
    // for limits we do not use; never ask for more than the adapter has.
    Ok(l.or_worse_values_from(have))
}

/// A single-use channel whose receiving end is a future: map_async's callback runs on
/// whichever thread polls the device (natively) or from the JS event loop (browser).
struct Oneshot<T>(Arc<Mutex<(Option<T>, Option<Waker>)>>);

impl<T> Default for Oneshot<T> {
    fn default() -> Self {
        Oneshot(Arc::new(Mutex::new((None, None))))
    }
}

impl<T> Clone for Oneshot<T> {
    fn clone(&self) -> Self {
        Oneshot(self.0.clone())
    }
}

impl<T> Oneshot<T> {
    fn send(&self, v: T) {
        let mut s = self.0.lock().unwrap();
        s.0 = Some(v);
        if let Some(w) = s.1.take() {
            w.wake();
        }
    }
}

impl<T> Future for Oneshot<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = self.0.lock().unwrap();
        match s.0.take() {
            Some(v) => Poll::Ready(v),
            None => {
                s.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}
