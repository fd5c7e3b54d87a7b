//! Every GPU buffer the engine owns goes through the `Allocator`, which counts its bytes: the
//! elastic runtime decides by these counts, and the swap tests check that after any sequence of
//! swaps the count equals the model's computed footprint exactly (no leak, no double count).

use crate::gpu::error::{GpuError, GpuResult};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Default)]
struct Counter {
    bytes: AtomicU64,
    buffers: AtomicU64,
}

#[derive(Clone)]
pub struct Allocator {
    device: wgpu::Device,
    counter: Arc<Counter>,
    /// An app-set cap (the browser has no reliable way to ask for free GPU memory, so the host
    /// may impose one); allocations beyond it fail like a device out-of-memory error.
    budget: Option<u64>,
}

/// A buffer that gives its bytes back to the allocator (and its memory to the device) on drop.
pub struct GpuBuffer {
    pub buffer: wgpu::Buffer,
    bytes: u64,
    counter: Arc<Counter>,
}

impl GpuBuffer {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        self.buffer.as_entire_binding()
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        self.counter.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
        self.counter.buffers.fetch_sub(1, Ordering::Relaxed);
        // Free now rather than when the last wgpu handle goes: a swap must release the old
        // version's memory before the runtime measures again. wgpu defers the actual release
        // until submitted work that uses it has finished.
        self.buffer.destroy();
    }
}

impl Allocator {
    pub fn new(device: &wgpu::Device) -> Self {
        Allocator {
            device: device.clone(),
            counter: Arc::default(),
            budget: None,
        }
    }

    pub fn set_budget(&mut self, budget: Option<u64>) {
        self.budget = budget;
    }

    pub fn budget(&self) -> Option<u64> {
        self.budget
    }

    /// Bytes of all live buffers.
    pub fn bytes(&self) -> u64 {
        self.counter.bytes.load(Ordering::Relaxed)
    }

    pub fn buffers(&self) -> u64 {
        self.counter.buffers.load(Ordering::Relaxed)
    }

    /// Creates a buffer inside an out-of-memory error scope; on failure nothing is kept.
    pub async fn create(
        &self,
        what: &str,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> GpuResult<GpuBuffer> {
        let in_use = self.bytes();
        let oom = |budget| GpuError::OutOfMemory {
            what: what.to_string(),
            requested: size,
            in_use,
            budget,
        };
        if let Some(b) = self.budget {
            if in_use + size > b {
                return Err(oom(Some(b)));
            }
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(what),
            size,
            usage,
            mapped_at_creation: false,
        });
        if scope.pop().await.is_some() {
            buffer.destroy();
            return Err(oom(self.budget));
        }
        self.counter.bytes.fetch_add(size, Ordering::Relaxed);
        self.counter.buffers.fetch_add(1, Ordering::Relaxed);
        Ok(GpuBuffer {
            buffer,
            bytes: size,
            counter: self.counter.clone(),
        })
    }

    /// A storage buffer holding `data` (uploaded through the queue).
    pub async fn upload(
        &self,
        queue: &wgpu::Queue,
        what: &str,
        data: &[u8],
        extra: wgpu::BufferUsages,
    ) -> GpuResult<GpuBuffer> {
        let b = self
            .create(
                what,
                data.len() as u64,
                wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | extra,
            )
            .await?;
        queue.write_buffer(&b.buffer, 0, data);
        Ok(b)
    }
}
