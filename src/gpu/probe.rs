//! One kernel run on host data, outside any model: the per-kernel parity tests (in the style of
//! llama.cpp's test-backend-ops) and kernel debugging use it. Buffers here are transient and
//! not counted by an allocator.

use crate::gpu::device::Gpu;
use crate::gpu::error::GpuResult;
use crate::gpu::kernels::{kernel_param_bytes, param_bytes, step_bytes, Kernel, Kernels};
use crate::gpu::params::{KernelParams, ReadParams};
use wgpu::util::DeviceExt;

/// Runs `kernel` once over `grid` workgroups with `params`, the step `(n_tokens, pos0)`, the
/// read-only `inputs` and the read-write `outputs` (initial contents), and returns the final
/// contents of the outputs.
#[allow(clippy::too_many_arguments)]
pub async fn run<P: KernelParams>(
    gpu: &Gpu,
    kernels: &mut Kernels,
    kernel: Kernel,
    params: &P,
    step: (u32, u32),
    inputs: &[&[u8]],
    outputs: &[&[u8]],
    grid: [u32; 3],
) -> GpuResult<Vec<Vec<u8>>> {
    run_repeated(gpu, kernels, kernel, params, step, inputs, outputs, grid, 1).await
}

/// `run` with the dispatch repeated `repeat` times in one pass (kernel timing).
#[allow(clippy::too_many_arguments)]
pub async fn run_repeated<P: KernelParams>(
    gpu: &Gpu,
    kernels: &mut Kernels,
    kernel: Kernel,
    params: &P,
    step: (u32, u32),
    inputs: &[&[u8]],
    outputs: &[&[u8]],
    grid: [u32; 3],
    repeat: u32,
) -> GpuResult<Vec<Vec<u8>>> {
    kernels.prepare(gpu, kernel);
    let d = &gpu.device;
    let init = |contents: &[u8], usage| {
        // Zero-sized bindings are invalid; pad to one word.
        let contents = if contents.is_empty() {
            &[0u8; 4][..]
        } else {
            contents
        };
        d.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents,
            usage,
        })
    };
    let params = init(
        &kernel_param_bytes(kernel, params),
        wgpu::BufferUsages::UNIFORM,
    );
    let step = init(&step_bytes(step.0, step.1), wgpu::BufferUsages::UNIFORM);
    let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
    let ins: Vec<_> = inputs.iter().map(|b| init(b, storage)).collect();
    let outs: Vec<_> = outputs.iter().map(|b| init(b, storage)).collect();
    let all: Vec<&wgpu::Buffer> = ins.iter().chain(&outs).collect();
    let bg = kernels.bind(gpu, kernel, params.as_entire_buffer_binding(), &step, &all);
    let mut enc = d.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(kernels.pipeline(kernel));
        pass.set_bind_group(0, &bg, &[]);
        for _ in 0..repeat {
            pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
        }
    }
    let stagings: Vec<_> = outs
        .iter()
        .map(|o| {
            let s = d.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: o.size(),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            enc.copy_buffer_to_buffer(o, 0, &s, 0, o.size());
            s
        })
        .collect();
    gpu.queue.submit([enc.finish()]);
    let mut result = Vec::new();
    for (s, o) in stagings.iter().zip(outputs) {
        let mut bytes = gpu.read(s, s.size()).await?;
        bytes.truncate(o.len());
        result.push(bytes);
    }
    Ok(result)
}

/// Seconds for one buffer-to-buffer copy of `bytes` on the device (the best of `reps`): the
/// memory-bandwidth yardstick the decode benchmark compares its weight reads with.
pub fn copy_seconds(gpu: &Gpu, bytes: u64, reps: usize) -> f64 {
    let bytes = bytes.div_ceil(4) * 4;
    let make = |usage| {
        gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("copy benchmark"),
            size: bytes,
            usage,
            mapped_at_creation: false,
        })
    };
    let src = make(wgpu::BufferUsages::COPY_SRC);
    let dst = make(wgpu::BufferUsages::COPY_DST);
    let mut best = f64::MAX;
    for _ in 0..reps + 1 {
        let t = now();
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&src, 0, &dst, 0, bytes);
        gpu.queue.submit([enc.finish()]);
        gpu.wait();
        best = best.min(now() - t);
    }
    src.destroy();
    dst.destroy();
    best
}

/// Workgroups and parameters of the read kernel (shaders/read.wgsl) over `n_vec4` 16-byte
/// words: each thread reads at least 64 of them (1 KiB), as few workgroups as that allows (at
/// most 65535).
pub fn read_dispatch(n_vec4: u32) -> ([u32; 3], ReadParams) {
    let wg = n_vec4.div_ceil(64 * 64).clamp(1, 65535);
    let threads = wg * 64;
    let run = n_vec4.div_ceil(threads);
    (
        [wg, 1, 1],
        ReadParams {
            n_vec4,
            threads,
            run,
        },
    )
}

/// The read-everything yardstick on this adapter: its best speed and which access pattern
/// gave it.
#[derive(Debug, Clone, Copy)]
pub struct ReadFigure {
    /// Bytes read per second (the best run of the better variant).
    pub bytes_per_s: f64,
    /// `"interleaved"` (neighbouring threads read neighbouring words) or `"contiguous"` (one
    /// run per thread).
    pub variant: &'static str,
}

/// Times the read kernel over a device buffer of `bytes` (rounded up to 16) in both access
/// patterns, `reps` runs each after one warm-up, each run one submission waited for.
pub async fn read_kernel(gpu: &Gpu, kernels: &mut Kernels, bytes: u64, reps: usize) -> ReadFigure {
    let n_vec4 = u32::try_from(bytes.div_ceil(16)).expect("read kernel over 64 GiB");
    let (grid, read_params) = read_dispatch(n_vec4);
    let d = &gpu.device;
    let data = d.create_buffer(&wgpu::BufferDescriptor {
        label: Some("read benchmark"),
        size: n_vec4 as u64 * 16,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let sums = d.create_buffer(&wgpu::BufferDescriptor {
        label: Some("read benchmark sums"),
        size: grid[0] as u64 * 4,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let uniform = |contents: &[u8]| {
        d.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents,
            usage: wgpu::BufferUsages::UNIFORM,
        })
    };
    let params = uniform(&param_bytes(&read_params));
    let step = uniform(&step_bytes(0, 0));
    let mut best = ReadFigure {
        bytes_per_s: 0.0,
        variant: "interleaved",
    };
    for contiguous in [false, true] {
        let kernel = Kernel::Read { contiguous };
        kernels.prepare(gpu, kernel);
        let bg = kernels.bind(
            gpu,
            kernel,
            params.as_entire_buffer_binding(),
            &step,
            &[&data, &sums],
        );
        let mut fastest = f64::MAX;
        for _ in 0..reps + 1 {
            let t = now();
            let mut enc = d.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(kernels.pipeline(kernel));
                pass.set_bind_group(0, &bg, &[]);
                pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
            }
            gpu.queue.submit([enc.finish()]);
            gpu.finished().await;
            fastest = fastest.min(now() - t);
        }
        let speed = (n_vec4 as u64 * 16) as f64 / fastest;
        if speed > best.bytes_per_s {
            best = ReadFigure {
                bytes_per_s: speed,
                variant: if contiguous {
                    "contiguous"
                } else {
                    "interleaved"
                },
            };
        }
    }
    data.destroy();
    sums.destroy();
    best
}

fn now() -> f64 {
    crate::runtime::clock::now_seconds()
}

/// Seconds per `matvec` of a `bits`-bit matrix of `rows` x 576 (the demo model's width),
/// group 64, held as packed codes and as bit planes (the best of `reps` passes of 8
/// dispatches each, after one untimed pass that compiles the pipelines): what reading a nested
/// module's planes directly costs per token on this adapter.
pub async fn plane_vs_packed_matvec(
    gpu: &Gpu,
    kernels: &mut Kernels,
    bits: u32,
    rows: usize,
    reps: usize,
) -> GpuResult<(f64, f64)> {
    use crate::ensemble::format::{PackedMatrix, PackedShape};
    use crate::ensemble::plane_level::PlaneLevel;
    use crate::gpu::params::QlinearParams;
    const REPEAT: u32 = 8;
    let shape = PackedShape::new(rows, 576, bits, 64).map_err(crate::gpu::GpuError::from)?;
    let m = PackedMatrix {
        shape,
        codes: (0..shape.code_words())
            .map(|i| (i as u32).wrapping_mul(2_654_435_761))
            .collect(),
        scales: vec![0x2c00_3c00; shape.scale_words()],
    };
    let level = PlaneLevel::from_packed(&m);
    let packed: Vec<u32> = m.codes.iter().chain(&m.scales).copied().collect();
    let planes: Vec<u32> = level.planes.iter().chain(&level.scales).copied().collect();
    let x: Vec<f32> = (0..576).map(|i| (i % 7) as f32 * 0.1).collect();
    let y = vec![0f32; rows];
    let grid = [
        (rows as u32).div_ceil(kernels.matvec_rows_per_workgroup()),
        1,
        1,
    ];
    let mut best = [f64::MAX; 2];
    for pass in 0..=reps {
        for (i, (kernel, words, params)) in [
            (Kernel::Matvec(bits), &packed, QlinearParams::dense(shape)),
            (
                Kernel::PlaneMatvec(bits),
                &planes,
                QlinearParams::planes(&level),
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let t = crate::runtime::clock::now_seconds();
            run_repeated(
                gpu,
                kernels,
                kernel,
                &params,
                (1, 0),
                &[bytemuck::cast_slice(words), bytemuck::cast_slice(&x)],
                &[bytemuck::cast_slice(&y)],
                grid,
                REPEAT,
            )
            .await?;
            if pass > 0 {
                best[i] = best[i].min((crate::runtime::clock::now_seconds() - t) / REPEAT as f64);
            }
        }
    }
    Ok((best[0], best[1]))
}
