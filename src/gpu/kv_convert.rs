//! The KV cache re-encoded on the device (`shaders/kv_convert.wgsl`): `Model::convert_kv`
//! converts a layer's keys and values with two dispatches instead of reading them back,
//! converting on the host and writing them again.

use crate::gpu::alloc::GpuBuffer;
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{kernel_param_bytes, Kernel, Kernels, WG};
use crate::gpu::params::KvConvertParams;
use crate::model::config::LlamaConfig;
use crate::runtime::backend::{KvFormat, KvLayout};
use wgpu::util::DeviceExt;

/// Workgroups along x at most (WebGPU's default `maxComputeWorkgroupsPerDimension`).
const MAX_X: u32 = 65535;

/// The parameters that convert `positions` cached positions of a layer into `to`.
pub fn params(c: &LlamaConfig, to: KvFormat, positions: usize) -> KvConvertParams {
    let l = KvLayout::of(c, KvFormat::Int8);
    KvConvertParams {
        heads: (positions * c.n_kv_heads()) as u32,
        head_dim: l.head_dim as u32,
        kv_group: l.group as u32,
        to_int8: (to == KvFormat::Int8) as u32,
    }
}

/// The dispatch for `p`: a thread per group of a stored head, x capped at `MAX_X` workgroups.
pub fn grid(p: &KvConvertParams) -> [u32; 3] {
    let threads = p.heads * (p.head_dim / p.kv_group);
    let workgroups = threads.div_ceil(WG).max(1);
    let x = workgroups.min(MAX_X);
    [x, workgroups.div_ceil(x), 1]
}

/// Submits the conversion of `positions` cached positions of one layer's keys and values
/// (`old`, stored in the other format) into `new` (stored as `to`). `step` is any uniform
/// buffer of the `Step` layout (the kernel does not read it).
#[allow(clippy::too_many_arguments)]
pub(crate) fn submit(
    gpu: &Gpu,
    kernels: &mut Kernels,
    step: &wgpu::Buffer,
    c: &LlamaConfig,
    to: KvFormat,
    positions: usize,
    old: &[GpuBuffer; 2],
    new: &[GpuBuffer; 2],
) {
    if positions == 0 {
        return;
    }
    let p = params(c, to, positions);
    let kernel = Kernel::KvConvert;
    kernels.prepare(gpu, kernel);
    let uniform = gpu
        .device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("kv_convert params"),
            contents: &kernel_param_bytes(kernel, &p),
            usage: wgpu::BufferUsages::UNIFORM,
        });
    let groups: Vec<wgpu::BindGroup> = old
        .iter()
        .zip(new)
        .map(|(o, n)| {
            let binding = uniform.as_entire_buffer_binding();
            kernels.bind(gpu, kernel, binding, step, &[&o.buffer, &n.buffer])
        })
        .collect();
    let [x, y, z] = grid(&p);
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(kernels.pipeline(kernel));
        for g in &groups {
            pass.set_bind_group(0, g, &[]);
            pass.dispatch_workgroups(x, y, z);
        }
    }
    gpu.queue.submit([enc.finish()]);
}
