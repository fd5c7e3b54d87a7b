//! One kernel run on host data, outside any model: the per-kernel parity tests (in the style of
//! llama.cpp's test-backend-ops) and kernel debugging use it. Buffers here are transient and
//! not counted by an allocator.

use crate::ensemble::format::{PackedMatrix, PackedShape};
use crate::ensemble::plane_level::PlaneLevel;
use crate::gpu::device::Gpu;
use crate::gpu::error::GpuResult;
use crate::gpu::kernels::{kernel_param_bytes, param_bytes, step_bytes, Kernel, Kernels};
use crate::gpu::params::QlinearParams;
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
    let r = Resident::new(gpu, kernels, kernel, params, step, inputs, outputs);
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    r.encode(&mut enc, kernels, grid, 1);
    let stagings: Vec<_> = r
        .outs
        .iter()
        .map(|o| {
            let s = gpu.device.create_buffer(&wgpu::BufferDescriptor {
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

/// One kernel's buffers and bind group kept on the device, so that timing it measures the
/// kernel and not the uploads (on a discrete GPU an upload costs more than a matvec).
pub struct Resident {
    kernel: Kernel,
    outs: Vec<wgpu::Buffer>,
    bind_group: wgpu::BindGroup,
    // Held for the bind group.
    _buffers: Vec<wgpu::Buffer>,
}

impl Resident {
    /// `kernel` with `params`, the step `(n_tokens, pos0)`, the read-only `inputs` and the
    /// read-write `outputs` (initial contents), bound with `kernels`' layouts.
    pub fn new<P: KernelParams>(
        gpu: &Gpu,
        kernels: &mut Kernels,
        kernel: Kernel,
        params: &P,
        step: (u32, u32),
        inputs: &[&[u8]],
        outputs: &[&[u8]],
    ) -> Resident {
        kernels.prepare(gpu, kernel);
        let init = |contents: &[u8], usage| {
            // Zero-sized bindings are invalid; pad to one word.
            let contents = if contents.is_empty() {
                &[0u8; 4][..]
            } else {
                contents
            };
            gpu.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
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
        let bind_group = kernels.bind(gpu, kernel, params.as_entire_buffer_binding(), &step, &all);
        let mut buffers = ins;
        buffers.extend([params, step]);
        Resident {
            kernel,
            outs,
            bind_group,
            _buffers: buffers,
        }
    }

    fn encode(&self, enc: &mut wgpu::CommandEncoder, kernels: &Kernels, grid: [u32; 3], n: u32) {
        encode(
            enc,
            kernels.pipeline(self.kernel),
            &self.bind_group,
            grid,
            n,
        )
    }

    /// Seconds per dispatch of `grid` (see [`seconds_per_op`]), `repeat` per submission.
    /// `kernels` must be those the bind group was made with, or of the same layouts.
    pub async fn seconds(
        &self,
        gpu: &Gpu,
        kernels: &Kernels,
        grid: [u32; 3],
        repeat: u32,
        passes: usize,
    ) -> f64 {
        seconds_per_op(gpu, Repeat::Fixed(repeat), passes, |enc, n| {
            self.encode(enc, kernels, grid, n)
        })
        .await
    }
}

/// `n` dispatches of `grid` in one compute pass.
fn encode(
    enc: &mut wgpu::CommandEncoder,
    pipeline: &wgpu::ComputePipeline,
    bind_group: &wgpu::BindGroup,
    grid: [u32; 3],
    n: u32,
) {
    let mut pass = enc.begin_compute_pass(&Default::default());
    pass.set_pipeline(pipeline);
    pass.set_bind_group(0, bind_group, &[]);
    for _ in 0..n {
        pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
    }
}

/// Operations per timed submission.
#[derive(Clone, Copy)]
enum Repeat {
    Fixed(u32),
    /// From how long the untimed first run (of one) took: `per_submission`.
    FromFirstRun,
}

/// Seconds per operation: `encode(encoder, n)` records `n` of them, submitted at once and
/// waited for; the best of `passes` after an untimed one (which also compiles the pipeline).
async fn seconds_per_op(
    gpu: &Gpu,
    repeat: Repeat,
    passes: usize,
    encode: impl Fn(&mut wgpu::CommandEncoder, u32),
) -> f64 {
    let mut best = f64::MAX;
    let mut n = match repeat {
        Repeat::Fixed(n) => n,
        Repeat::FromFirstRun => 1,
    };
    for pass in 0..=passes {
        let t = now();
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        encode(&mut enc, n);
        gpu.queue.submit([enc.finish()]);
        gpu.finished().await;
        let s = now() - t;
        match (pass, repeat) {
            (0, Repeat::FromFirstRun) => n = per_submission(s),
            (0, Repeat::Fixed(_)) => {}
            _ => best = best.min(s / n as f64),
        }
    }
    best
}

/// Seconds for one buffer-to-buffer copy of `bytes` on the device (the best of `reps`): the
/// memory-bandwidth yardstick the decode benchmark compares its weight reads with.
pub async fn copy_seconds(gpu: &Gpu, bytes: u64, reps: usize) -> f64 {
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
    let best = seconds_per_op(gpu, Repeat::FromFirstRun, reps, |enc, n| {
        for _ in 0..n {
            enc.copy_buffer_to_buffer(&src, 0, &dst, 0, bytes);
        }
    })
    .await;
    src.destroy();
    dst.destroy();
    best
}

/// Workgroups and parameters of the read kernel (shaders/read.wgsl) over `n_vec4` 16-byte
/// words: each thread reads at least 64 of them (1 KiB), as few workgroups as that allows (at
/// most 65535).
pub fn read_dispatch(n_vec4: u32) -> ([u32; 3], ReadParams) {
    read_dispatch_per_thread(n_vec4, 64)
}

/// `read_dispatch` with at least `per_thread` words per thread (fewer: more workgroups, more
/// loads in flight, which GPUs need).
pub fn read_dispatch_per_thread(n_vec4: u32, per_thread: u32) -> ([u32; 3], ReadParams) {
    let wg = n_vec4.div_ceil(64 * per_thread).clamp(1, 65535);
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
    /// `"interleaved"` (neighbouring threads read neighbouring words; also with 8 words per
    /// thread) or `"contiguous"` (one run per thread).
    pub variant: &'static str,
}

/// Times the read kernel over a device buffer of `bytes` (rounded up to 16) in both access
/// patterns (interleaved also with 8 words per thread), `reps` runs each after one warm-up,
/// each run one submission waited for.
pub async fn read_kernel(gpu: &Gpu, kernels: &mut Kernels, bytes: u64, reps: usize) -> ReadFigure {
    let n_vec4 = u32::try_from(bytes.div_ceil(16)).expect("read kernel over 64 GiB");
    let grid = read_dispatch_per_thread(n_vec4, 8).0;
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
    let step = uniform(&step_bytes(0, 0));
    let mut best = ReadFigure {
        bytes_per_s: 0.0,
        variant: "interleaved",
    };
    for (contiguous, per_thread, variant) in [
        (false, 64, "interleaved"),
        (false, 8, "interleaved, 8 words per thread"),
        (true, 64, "contiguous"),
    ] {
        let (grid, read_params) = read_dispatch_per_thread(n_vec4, per_thread);
        let params = uniform(&param_bytes(&read_params));
        let kernel = Kernel::Read { contiguous };
        kernels.prepare(gpu, kernel);
        let bg = kernels.bind(
            gpu,
            kernel,
            params.as_entire_buffer_binding(),
            &step,
            &[&data, &sums],
        );
        let pipeline = kernels.pipeline(kernel);
        let fastest = seconds_per_op(gpu, Repeat::FromFirstRun, reps, |enc, n| {
            encode(enc, pipeline, &bg, grid, n)
        })
        .await;
        let speed = (n_vec4 as u64 * 16) as f64 / fastest;
        if speed > best.bytes_per_s {
            best = ReadFigure {
                bytes_per_s: speed,
                variant,
            };
        }
    }
    data.destroy();
    sums.destroy();
    best
}

/// Runs of a bandwidth probe per timed submission, from how long its first run took: on a GPU
/// one run over a model's bytes takes tens of microseconds, about a submission's round trip,
/// which would halve the figure; CPU adapters take milliseconds per run, and the browser's
/// SwiftShader far longer.
fn per_submission(first_run_seconds: f64) -> u32 {
    if first_run_seconds < 0.002 {
        8
    } else {
        1
    }
}

fn now() -> f64 {
    crate::runtime::clock::now_seconds()
}

/// A `bits`-bit matrix of `rows` x `cols` in groups of `group`, codes from a hash of their
/// index, every (scale, zero) (1, 0.0625): what the speed probes run (speed does not depend on
/// the values).
fn probe_matrix(rows: usize, cols: usize, bits: u32, group: usize) -> GpuResult<PackedMatrix> {
    let shape = PackedShape::new(rows, cols, bits, group).map_err(crate::gpu::GpuError::from)?;
    Ok(PackedMatrix {
        shape,
        codes: (0..shape.code_words())
            .map(|i| (i as u32).wrapping_mul(2_654_435_761))
            .collect(),
        scales: vec![0x2c00_3c00; shape.scale_words()],
    })
}

/// How a probed matvec reads its matrix and x.
#[derive(Clone, Copy)]
pub enum MatvecForm<'a> {
    /// `Matvec` over packed codes.
    Packed,
    /// `MatvecNorm`: packed codes, the RMSNorm before the product folded in (what decode runs
    /// for 5 of a layer's 7 modules and for the head).
    Norm,
    /// `PlaneMatvec` over these bit planes.
    Planes(&'a PlaneLevel),
}

/// `m` (in `form`) against an x of ones (and norm weights of ones), kept on the device.
fn resident_matvec(
    gpu: &Gpu,
    kernels: &mut Kernels,
    m: &PackedMatrix,
    form: MatvecForm,
) -> Resident {
    let packed = || m.codes.iter().chain(&m.scales).copied().collect();
    let (kernel, words, params): (_, Vec<u32>, _) = match form {
        MatvecForm::Packed => (
            Kernel::Matvec(m.shape.bits),
            packed(),
            QlinearParams::dense(m.shape),
        ),
        MatvecForm::Norm => (
            Kernel::MatvecNorm(m.shape.bits),
            packed(),
            QlinearParams {
                eps: 1e-5,
                ..QlinearParams::dense(m.shape)
            },
        ),
        MatvecForm::Planes(l) => (
            Kernel::PlaneMatvec(m.shape.bits),
            l.planes.iter().chain(&l.scales).copied().collect(),
            QlinearParams::planes(l),
        ),
    };
    let x = vec![1f32; m.shape.cols.div_ceil(4) * 4];
    let y = vec![0f32; m.shape.rows];
    let words: &[u8] = bytemuck::cast_slice(&words);
    let x: &[u8] = bytemuck::cast_slice(&x);
    let inputs: &[&[u8]] = match form {
        MatvecForm::Norm => &[words, x, x],
        _ => &[words, x],
    };
    Resident::new(
        gpu,
        kernels,
        kernel,
        &params,
        (1, 0),
        inputs,
        &[bytemuck::cast_slice(&y)],
    )
}

fn matvec_grid(kernels: &Kernels, rows: usize) -> [u32; 3] {
    [
        (rows as u32).div_ceil(kernels.matvec_rows_per_workgroup()),
        1,
        1,
    ]
}

/// Seconds per `matvec` of a `bits`-bit matrix of `rows` x `cols` in groups of 32 (packed, or
/// with a norm folded in: `form`), buffers on the device: `repeat` dispatches per pass, the
/// best of `passes` after an untimed one.
#[allow(clippy::too_many_arguments)]
pub async fn matvec_seconds(
    gpu: &Gpu,
    kernels: &mut Kernels,
    rows: usize,
    cols: usize,
    bits: u32,
    form: MatvecForm<'_>,
    repeat: u32,
    passes: usize,
) -> GpuResult<f64> {
    let m = probe_matrix(rows, cols, bits, 32)?;
    let r = resident_matvec(gpu, kernels, &m, form);
    Ok(
        r.seconds(gpu, kernels, matvec_grid(kernels, rows), repeat, passes)
            .await,
    )
}

/// Seconds per `matvec` of a `bits`-bit matrix of `rows` x 576 (the demo model's width),
/// group 64, held as packed codes and as bit planes (the best of `reps` passes of 8
/// dispatches each, buffers on the device): what reading a nested module's planes directly
/// costs per token on this adapter.
pub async fn plane_vs_packed_matvec(
    gpu: &Gpu,
    kernels: &mut Kernels,
    bits: u32,
    rows: usize,
    reps: usize,
) -> GpuResult<(f64, f64)> {
    let m = probe_matrix(rows, 576, bits, 64)?;
    let level = PlaneLevel::from_packed(&m);
    let grid = matvec_grid(kernels, rows);
    let packed = resident_matvec(gpu, kernels, &m, MatvecForm::Packed);
    let planes = resident_matvec(gpu, kernels, &m, MatvecForm::Planes(&level));
    Ok((
        packed.seconds(gpu, kernels, grid, 8, reps).await,
        planes.seconds(gpu, kernels, grid, 8, reps).await,
    ))
}

/// The matvec kernel on a matrix far larger than a token's module (`bytes` of codes and
/// scales, 4096 columns, group 32): `(bytes, seconds per matvec)`. Against the read kernel
/// over the same bytes it says how near the kernel itself is to the adapter's limit, apart
/// from a token's dispatch overhead.
pub async fn matvec_roofline(
    gpu: &Gpu,
    kernels: &mut Kernels,
    bits: u32,
    bytes: u64,
    reps: usize,
) -> GpuResult<(u64, f64)> {
    const COLS: usize = 4096;
    let per_row = PackedShape::new(64, COLS, bits, 32)
        .map_err(crate::gpu::GpuError::from)?
        .bytes() as u64
        / 64;
    let rows = ((bytes / per_row) as usize / 64).max(1) * 64;
    let s = matvec_seconds(gpu, kernels, rows, COLS, bits, MatvecForm::Packed, 8, reps).await?;
    Ok((rows as u64 * per_row, s))
}

/// Seconds one dispatch of a one-workgroup kernel costs inside a pass, each writing what the
/// next one writes (so the adapter orders them, as it orders a token's kernels): the floor
/// of a token's time is this times its dispatches.
pub async fn dispatch_seconds(gpu: &Gpu, kernels: &mut Kernels, repeat: u32) -> f64 {
    let (grid, params) = read_dispatch(1);
    let r = Resident::new(
        gpu,
        kernels,
        Kernel::Read { contiguous: false },
        &params,
        (1, 0),
        &[&[0u8; 16]],
        &[&[0u8; 4]],
    );
    r.seconds(gpu, kernels, grid, repeat, 3).await
}
