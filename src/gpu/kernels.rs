//! The WGSL kernels and their pipelines. Every kernel binds the same way: 0 = its parameters
//! (a 256-byte slot of one uniform buffer), 1 = the per-call `Step`, then its read-only storage
//! buffers, then its read-write ones; so a bind-group layout is just `(read-only, read-write)`
//! counts, declared once here and shared by every pipeline with that shape.

use crate::gpu::device::Gpu;
use crate::gpu::params::*;
use std::collections::HashMap;

pub const COMMON: &str = include_str!("../../shaders/common.wgsl");

/// Constants the shaders share with the host, written from the Rust ones (so they cannot drift)
/// and prepended with `COMMON`: f16's largest finite value (the f16 KV cache clamps to it) and
/// the int8 KV cache's largest scale.
fn shared_constants() -> String {
    use crate::runtime::backend::KV_SCALE_MAX;
    let f16_max = crate::model::math::F16_MAX;
    format!("const F16_MAX: f32 = {f16_max:?};\nconst KV_MAX: f32 = {KV_SCALE_MAX:?};\n")
}

/// Bytes of one parameter slot: the WebGPU default (and maximum) uniform offset alignment.
pub const PARAM_SLOT: u64 = 256;
/// Workgroup size of the 64-wide kernels.
pub const WG: u32 = 64;
/// Tokens per thread in `matmul` (WGSL `TT`).
pub const TT: u32 = 4;
/// Logits per top-k workgroup (WGSL `CHUNK`).
pub const TOPK_CHUNK: u32 = 4096;
/// Keys per range of the cache in attention (WGSL `p.split_keys`): two tiles, so a long cache
/// is read by many workgroups at once.
pub const ATTENTION_SPLIT_KEYS: u32 = 128;
/// The largest k the top-k kernel is asked for.
pub const MAX_TOP_K: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Decode: dequantize + matrix-vector, specialised on the bit-width.
    Matvec(u32),
    /// `Matvec` with the RMSNorm before it folded in: binds the residual stream and the
    /// norm's weights, so decode needs no dispatch for the norm (qlinear.wgsl `NORM`).
    MatvecNorm(u32),
    /// Decode's Q, K and V products in one dispatch (`qlinear_parts.wgsl`), each matrix's
    /// bit-width read at run time; `norm`: the RMSNorm before them folded in (as `MatvecNorm`).
    MatvecQkv {
        norm: bool,
    },
    /// Decode's gate and up projections in one dispatch, storing SwiGLU's product.
    MatvecGlu {
        norm: bool,
    },
    /// Prefill: dequantize + matrix-matrix.
    Matmul(u32),
    /// `Matvec` reading a module's bit planes (`ensemble::plane_level`), `k` of them.
    PlaneMatvec(u32),
    /// `Matmul` reading `k` bit planes.
    PlaneMatmul(u32),
    /// Embedding lookup from the 8-bit packed table.
    Embed,
    RmsNorm,
    Rope,
    Attention,
    /// Merges attention's partials over ranges of the cache.
    AttentionCombine,
    /// A layer's cached keys or values re-encoded in the other format (`kv_convert.wgsl`).
    KvConvert,
    /// Top-k stage 1 (over logits) and 2 (merging candidates).
    TopK {
        from_logits: bool,
    },
    Nll,
    /// The watched tokens' logits after the top-k (`gather.wgsl`).
    Gather,
    /// The read-everything yardstick (`probe::read_kernel`).
    Read {
        contiguous: bool,
    },
}

struct Spec {
    /// The shader, its `Params` (`params.rs`) prepended.
    source: String,
    entry: &'static str,
    read_only: u32,
    read_write: u32,
}

impl Kernel {
    /// The Rust name of this kernel's parameter struct (`params.rs`) and its WGSL.
    pub fn params(self) -> (&'static str, &'static str) {
        fn of<P: KernelParams>() -> (&'static str, &'static str) {
            (P::NAME, P::WGSL)
        }
        match self {
            Kernel::Matvec(_)
            | Kernel::MatvecNorm(_)
            | Kernel::Matmul(_)
            | Kernel::PlaneMatvec(_)
            | Kernel::PlaneMatmul(_) => of::<QlinearParams>(),
            Kernel::MatvecQkv { .. } | Kernel::MatvecGlu { .. } => of::<QlinearPartsParams>(),
            Kernel::Embed => of::<EmbedParams>(),
            Kernel::RmsNorm => of::<RmsNormParams>(),
            Kernel::Rope => of::<RopeParams>(),
            Kernel::Attention | Kernel::AttentionCombine => of::<AttentionParams>(),
            Kernel::KvConvert => of::<KvConvertParams>(),
            Kernel::TopK { .. } => of::<TopKParams>(),
            Kernel::Nll => of::<NllParams>(),
            Kernel::Gather => of::<GatherParams>(),
            Kernel::Read { .. } => of::<ReadParams>(),
        }
    }

    fn spec(self) -> Spec {
        self.spec_with(false)
    }

    /// The kernel's shader and bindings; `subgroups`: matvec rows reduced by subgroup shuffles.
    fn spec_with(self, subgroups: bool) -> Spec {
        let params = self.params().1;
        let s = |source: &str, entry, read_only, read_write| Spec {
            source: format!("{params}\n{source}"),
            entry,
            read_only,
            read_write,
        };
        match self {
            Kernel::Matvec(bits) => s(
                &qlinear_source(bits, false, subgroups, false),
                "matvec",
                2,
                1,
            ),
            Kernel::MatvecNorm(bits) => s(
                &qlinear_source(bits, false, subgroups, true),
                "matvec",
                3,
                1,
            ),
            Kernel::MatvecQkv { norm } => s(
                &qlinear_parts_source(3, subgroups, norm),
                "matvec_parts",
                4 + norm as u32,
                3,
            ),
            Kernel::MatvecGlu { norm } => s(
                &qlinear_parts_source(2, subgroups, norm),
                "matvec_parts",
                3 + norm as u32,
                1,
            ),
            Kernel::Matmul(bits) => s(&qlinear_source(bits, false, false, false), "matmul", 2, 1),
            Kernel::PlaneMatvec(k) => s(&qlinear_source(k, true, subgroups, false), "matvec", 2, 1),
            Kernel::PlaneMatmul(k) => s(&qlinear_source(k, true, false, false), "matmul", 2, 1),
            Kernel::Embed => s(include_str!("../../shaders/embed.wgsl"), "embed", 2, 1),
            Kernel::RmsNorm => s(include_str!("../../shaders/rmsnorm.wgsl"), "rmsnorm", 2, 1),
            Kernel::Rope => s(include_str!("../../shaders/rope.wgsl"), "rope", 3, 3),
            Kernel::Attention => s(
                include_str!("../../shaders/attention.wgsl"),
                "attention",
                3,
                2,
            ),
            Kernel::AttentionCombine => s(
                include_str!("../../shaders/attention.wgsl"),
                "combine",
                3,
                2,
            ),
            Kernel::KvConvert => s(
                include_str!("../../shaders/kv_convert.wgsl"),
                "kv_convert",
                1,
                1,
            ),
            Kernel::TopK { .. } => s(include_str!("../../shaders/topk.wgsl"), "topk", 1, 1),
            Kernel::Nll => s(include_str!("../../shaders/nll.wgsl"), "nll_rows", 2, 1),
            Kernel::Gather => s(include_str!("../../shaders/gather.wgsl"), "gather", 2, 1),
            Kernel::Read { .. } => s(include_str!("../../shaders/read.wgsl"), "read_all", 1, 1),
        }
    }

    /// (read-only, read-write) storage buffers it binds.
    pub fn buffers(self) -> (u32, u32) {
        let s = self.spec();
        (s.read_only, s.read_write)
    }
}

pub struct Kernels {
    /// Threads per weight row in `matvec` (see qlinear.wgsl).
    pub tpr: u32,
    /// Rows per thread in `matvec` when `tpr` is 1 (qlinear.wgsl's `RPT`: 1, 2 or 4).
    pub rpt: u32,
    /// `matvec` sums a row's partial sums by subgroup shuffles (`tpr` > 1 on an adapter with
    /// subgroups of at least `tpr` lanes) instead of workgroup memory and a barrier.
    pub subgroups: bool,
    layouts: HashMap<(u32, u32), wgpu::BindGroupLayout>,
    modules: HashMap<String, wgpu::ShaderModule>,
    pipelines: HashMap<Kernel, wgpu::ComputePipeline>,
}

impl Kernels {
    /// CPU adapters (lavapipe, SwiftShader) run rows per SIMD lane best, 4 rows per lane so a
    /// block of x is loaded once for 4 rows (measured on lavapipe: decode 1.3x faster at
    /// 4 bits, 2x at 3 and 2 bits, than a row per lane); GPUs share a row among 16 threads so
    /// its words are read together. `FLEXQUANT_GPU_TPR` and `FLEXQUANT_GPU_RPT` override.
    pub fn new(gpu: &Gpu) -> Self {
        let cpu = gpu.info.device_type == wgpu::DeviceType::Cpu;
        let by_type = if cpu { (1, 4) } else { (16, 1) };
        let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
        let tpr = env("FLEXQUANT_GPU_TPR").unwrap_or(by_type.0);
        let rpt = env("FLEXQUANT_GPU_RPT").unwrap_or(if tpr == 1 { by_type.1 } else { 1 });
        // FLEXQUANT_GPU_SG=1: rows summed by subgroups, where the adapter allows it.
        let sg = env("FLEXQUANT_GPU_SG") == Some(1);
        let sg_ok = gpu.subgroup_lanes().is_some_and(|l| l >= tpr);
        if sg && !sg_ok {
            eprintln!("FLEXQUANT_GPU_SG: this adapter has no subgroups of {tpr} lanes; not used");
        }
        // A variant the environment names that does not exist: the adapter's own, said aloud.
        Self::with_variant(tpr, rpt, sg && sg_ok).unwrap_or_else(|e| {
            eprintln!("FLEXQUANT_GPU_TPR/RPT/SG: no {e}; using {by_type:?}");
            Self::with_matvec(by_type.0, by_type.1).expect("a listed variant")
        })
    }

    /// Kernels whose `matvec` shares `rpt` rows (1, 2 or 4) among `tpr` threads (a power of
    /// two <= 64).
    pub fn with_matvec(tpr: u32, rpt: u32) -> Result<Self, String> {
        Self::with_variant(tpr, rpt, false)
    }

    /// `with_matvec`, the row sums by subgroup shuffles when `subgroups` (needs `tpr` > 1; the
    /// caller checks the adapter: `Gpu::subgroup_lanes`).
    pub fn with_variant(tpr: u32, rpt: u32, subgroups: bool) -> Result<Self, String> {
        if !tpr.is_power_of_two()
            || tpr > WG
            || ![1, 2, 4].contains(&rpt)
            || (subgroups && tpr == 1)
        {
            return Err(format!(
                "matvec variant of {tpr} threads per row and {rpt} rows per thread{}",
                if subgroups { " by subgroups" } else { "" }
            ));
        }
        Ok(Kernels {
            tpr,
            rpt,
            subgroups,
            layouts: HashMap::new(),
            modules: HashMap::new(),
            pipelines: HashMap::new(),
        })
    }

    /// The matvec variant in words (reports).
    pub fn variant_name(&self) -> String {
        format!(
            "matvec: {} thread(s) per group of {} row(s){}",
            self.tpr,
            self.rpt,
            if self.subgroups {
                ", rows summed by subgroup shuffles"
            } else {
                ""
            }
        )
    }

    /// Weight rows one `matvec` workgroup computes (its grid is `rows.div_ceil(this)`).
    pub fn matvec_rows_per_workgroup(&self) -> u32 {
        WG / self.tpr * self.rpt
    }

    pub fn layout(&mut self, gpu: &Gpu, read_only: u32, read_write: u32) -> &wgpu::BindGroupLayout {
        self.layouts
            .entry((read_only, read_write))
            .or_insert_with(|| {
                let uniform = |binding| wgpu::BindGroupLayoutEntry {
                    binding,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                };
                let storage = |binding, read_only| wgpu::BindGroupLayoutEntry {
                    binding,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage { read_only },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                };
                let mut entries = vec![uniform(0), uniform(1)];
                for i in 0..read_only + read_write {
                    entries.push(storage(2 + i, i < read_only));
                }
                gpu.device
                    .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                        label: Some("flexquant"),
                        entries: &entries,
                    })
            })
    }

    /// Compiles `kernel`'s pipeline if this is its first use.
    pub fn prepare(&mut self, gpu: &Gpu, kernel: Kernel) {
        if self.pipelines.contains_key(&kernel) {
            return;
        }
        let spec = kernel.spec_with(self.subgroups);
        let module = self
            .modules
            .entry(spec.source.clone())
            .or_insert_with(|| {
                gpu.device
                    .create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(spec.entry),
                        source: wgpu::ShaderSource::Wgsl(
                            format!("{COMMON}\n{}\n{}", shared_constants(), spec.source).into(),
                        ),
                    })
            })
            .clone();
        let layout = self.layout(gpu, spec.read_only, spec.read_write).clone();
        let pl = gpu
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(spec.entry),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let constants: Vec<(&str, f64)> = match kernel {
            Kernel::Matvec(_)
            | Kernel::MatvecNorm(_)
            | Kernel::PlaneMatvec(_)
            | Kernel::MatvecQkv { .. }
            | Kernel::MatvecGlu { .. } => {
                vec![("TPR", self.tpr as f64), ("RPT", self.rpt as f64)]
            }
            Kernel::TopK { from_logits } => vec![("FROM_LOGITS", from_logits as u32 as f64)],
            Kernel::Read { contiguous } => vec![("CONTIGUOUS", contiguous as u32 as f64)],
            _ => vec![],
        };
        let pipeline = gpu
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(spec.entry),
                layout: Some(&pl),
                module: &module,
                entry_point: Some(spec.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        self.pipelines.insert(kernel, pipeline);
    }

    pub fn pipeline(&self, kernel: Kernel) -> &wgpu::ComputePipeline {
        self.pipelines
            .get(&kernel)
            .unwrap_or_else(|| panic!("{kernel:?} used before prepare()"))
    }

    /// A bind group for `kernel`: parameters at `params` (a slot of a uniform buffer), the
    /// step buffer, then the storage buffers in binding order.
    pub fn bind(
        &mut self,
        gpu: &Gpu,
        kernel: Kernel,
        params: wgpu::BufferBinding<'_>,
        step: &wgpu::Buffer,
        storage: &[&wgpu::Buffer],
    ) -> wgpu::BindGroup {
        let (ro, rw) = kernel.buffers();
        assert_eq!(
            storage.len() as u32,
            ro + rw,
            "{kernel:?} binds {ro}+{rw} buffers"
        );
        let layout = self.layout(gpu, ro, rw).clone();
        let mut entries = vec![
            wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(params),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: step.as_entire_binding(),
            },
        ];
        for (i, b) in storage.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: 2 + i as u32,
                resource: b.as_entire_binding(),
            });
        }
        gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &layout,
            entries: &entries,
        })
    }
}

/// `reduce_row(acc, li)`: the sum of the TPR partial sums of a row, valid in the row's first
/// lane. Shuffles within a subgroup (`subgroups`: the adapter has them and its subgroups hold
/// at least TPR lanes), else workgroup memory and a barrier.
fn reduce_row_source(subgroups: bool) -> &'static str {
    if subgroups {
        "fn reduce_row(acc: f32, li: u32) -> f32 {
    var s = acc;
    for (var o = TPR / 2u; o > 0u; o = o / 2u) {
        s += subgroupShuffleXor(s, o);
    }
    return s;
}
"
    } else {
        "fn reduce_row(acc: f32, li: u32) -> f32 {
    partial[li] = acc;
    workgroupBarrier();
    var s = acc;
    if (li % TPR == 0u) {
        for (var k = 1u; k < TPR; k++) {
            s += partial[li + k];
        }
    }
    // Before the next call overwrites `partial`.
    workgroupBarrier();
    return s;
}
"
    }
}

/// qlinear.wgsl's x and y (`y_get`, `y_set`), and what `NORM` reads, bound from `first` on:
/// x, with `norm` the norm's weights g (x is then the residual stream), then `outputs` y's
/// (several: the matrix `part` selects writes its own).
fn qlinear_io_source(first: u32, norm: bool, outputs: u32) -> String {
    let mut f = format!(
        "@group(0) @binding({first}) var<storage, read> x: array<vec4<f32>>;\nconst NORM: bool = {norm};\n"
    );
    let mut b = first + 1;
    if norm {
        f += &format!(
            "@group(0) @binding({b}) var<storage, read> g: array<vec4<f32>>;
fn gv(i: u32) -> vec4<f32> {{
    return g[min(i, p.cols / 4u - 1u)];
}}
"
        );
        b += 1;
    } else {
        f += "fn gv(i: u32) -> vec4<f32> {\n    return vec4<f32>(1.0);\n}\n";
    }
    if outputs == 1 {
        f += &format!(
            "@group(0) @binding({b}) var<storage, read_write> y: array<f32>;
fn y_get(i: u32) -> f32 {{
    return y[i];
}}
fn y_set(i: u32, v: f32) {{
    y[i] = v;
}}
"
        );
        return f;
    }
    let (mut get, mut set) = (String::new(), String::new());
    for k in 0..outputs {
        f += &format!(
            "@group(0) @binding({}) var<storage, read_write> y{k}: array<f32>;\n",
            b + k
        );
        get += &format!("    if (part == {k}u) {{\n        return y{k}[i];\n    }}\n");
        set += &format!("    if (part == {k}u) {{\n        y{k}[i] = v;\n    }}\n");
    }
    f + &format!(
        "fn y_get(i: u32) -> f32 {{\n{get}    return 0.0;\n}}\nfn y_set(i: u32, v: f32) {{\n{set}}}\n"
    )
}

/// `fn {name}(r, b)`: the 32 codes of row `r`'s block `b` of `bits`-bit codes as floats, one
/// load per word of the storage array `w`. Packed (`planes` false): the block's `bits` words, codes cut with
/// constant shifts (code i at bit i*bits, LSB first, straddling into the next word for 3, 5
/// and 6 bits). Bit planes: one word per plane, `p.plane_words` apart, each code built from
/// bit i of every plane (plane 0 the most significant).
fn block_codes_source(name: &str, bits: u32, planes: bool, w: &str) -> String {
    let mut f = format!("fn {name}(r: u32, b: u32) -> array<vec4<f32>, 8> {{\n");
    if planes {
        f += "    let wb = r * p.words_per_row + b;\n";
        for j in 0..bits {
            f += &format!("    let w{j} = vec4<u32>({w}[wb + {j}u * p.plane_words]);\n");
        }
        f += "    return array<vec4<f32>, 8>(\n";
        for v in 0..8 {
            let lanes = format!(
                "vec4<u32>({}u, {}u, {}u, {}u)",
                4 * v,
                4 * v + 1,
                4 * v + 2,
                4 * v + 3
            );
            let terms: Vec<String> = (0..bits)
                .map(|j| {
                    let bit = format!("((w{j} >> {lanes}) & vec4<u32>(1u))");
                    match bits - 1 - j {
                        0 => bit,
                        s => format!("({bit} << vec4<u32>({s}u))"),
                    }
                })
                .collect();
            f += &format!("        vec4<f32>({}),\n", terms.join(" | "));
        }
    } else {
        let mask = (1u32 << bits) - 1;
        f += &format!("    let wb = r * p.words_per_row + b * {bits}u;\n");
        for j in 0..bits {
            f += &format!("    let w{j} = {w}[wb + {j}u];\n");
        }
        let code = |i: u32| {
            let (j, s) = (i * bits / 32, i * bits % 32);
            if s + bits > 32 {
                format!("((w{j} >> {s}u) | (w{} << {}u))", j + 1, 32 - s)
            } else if s == 0 {
                format!("w{j}")
            } else {
                format!("(w{j} >> {s}u)")
            }
        };
        f += "    return array<vec4<f32>, 8>(\n";
        for v in 0..8 {
            let c: Vec<String> = (4 * v..4 * v + 4).map(code).collect();
            f += &format!(
                "        vec4<f32>(vec4<u32>({}) & vec4<u32>({mask}u)),\n",
                c.join(", ")
            );
        }
    }
    f + "    );\n}\n"
}

const QLINEAR: &str = include_str!("../../shaders/qlinear.wgsl");

/// The qlinear shader for `bits`-bit codes, packed or as `planes`, its matvec rows reduced
/// through subgroups or not (`reduce_row_source`), the RMSNorm before it folded in or not
/// (`norm`, `qlinear_io_source`).
pub fn qlinear_source(bits: u32, planes: bool, subgroups: bool, norm: bool) -> String {
    format!(
        "@group(0) @binding(2) var<storage, read> w: array<u32>;
fn wl(i: u32) -> u32 {{
    return w[i];
}}
const GLU: bool = false;
fn use_part(k: u32) {{}}
{}
{}
{}
{QLINEAR}",
        qlinear_io_source(3, norm, 1),
        block_codes_source("block_codes", bits, planes, "w"),
        reduce_row_source(subgroups)
    )
}

/// qlinear_parts.wgsl over `parts` matrices (3: Q, K and V, each into its own output; 2: the
/// gate and up projections, into one), packed codes of any bit-width (`p.bits`).
pub fn qlinear_parts_source(parts: u32, subgroups: bool, norm: bool) -> String {
    const PARTS: &str = include_str!("../../shaders/qlinear_parts.wgsl");
    let uniform = "@group(0) @binding(0) var<uniform> p: Params;\n";
    assert!(QlinearParams::WGSL.ends_with(uniform));
    let mut f = QlinearParams::WGSL.replace(uniform, "");
    f += &format!(
        "@group(0) @binding(0) var<uniform> parts: array<Params, 3>;
var<private> p: Params;
var<private> part: u32;
const PARTS: u32 = {parts}u;
const GLU: bool = {};
fn use_part(k: u32) {{
    part = k;
    p = parts[k];
}}
",
        parts == 2
    );
    let mut wl = String::new();
    for k in 0..parts {
        f += &format!(
            "@group(0) @binding({}) var<storage, read> wm{k}: array<u32>;\n",
            2 + k
        );
        wl += &format!("    if (part == {k}u) {{\n        return wm{k}[i];\n    }}\n");
    }
    f += &format!("fn wl(i: u32) -> u32 {{\n{wl}    return 0u;\n}}\n");
    f += &qlinear_io_source(2 + parts, norm, if parts == 2 { 1 } else { parts });
    // A decoder per matrix and bit-width, each reading its matrix's array: one branch per
    // block of 32 codes (`part * 16 + bits`, the same in a whole workgroup), not per load.
    let mut switch = String::new();
    for k in 0..parts {
        for bits in crate::ensemble::format::BITS {
            let name = format!("block_codes_{k}_{bits}");
            f += &block_codes_source(&name, bits, false, &format!("wm{k}"));
            switch += &format!(
                "        case {}u: {{\n            return {name}(r, b);\n        }}\n",
                16 * k + bits
            );
        }
    }
    f += &format!(
        "fn block_codes(r: u32, b: u32) -> array<vec4<f32>, 8> {{\n    switch part * 16u + p.bits {{\n{switch}        default: {{\n            return array<vec4<f32>, 8>();\n        }}\n    }}\n}}\n"
    );
    format!("{f}\n{}\n{QLINEAR}\n{PARTS}", reduce_row_source(subgroups))
}

/// A parameter block padded to a 256-byte slot.
pub fn param_bytes<P: KernelParams>(p: &P) -> Vec<u8> {
    let words = bytemuck::bytes_of(p);
    assert!(words.len() <= PARAM_SLOT as usize);
    let mut b = vec![0u8; PARAM_SLOT as usize];
    b[..words.len()].copy_from_slice(words);
    b
}

/// `params` as `kernel`'s block; panics when `P` is not the struct `kernel` reads (a bug).
pub fn kernel_param_bytes<P: KernelParams>(kernel: Kernel, p: &P) -> Vec<u8> {
    assert_eq!(
        kernel.params().0,
        P::NAME,
        "{kernel:?} reads other parameters"
    );
    param_bytes(p)
}

/// The `Step` block of common.wgsl.
pub fn step_bytes(n_tokens: u32, pos0: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&n_tokens.to_le_bytes());
    b[4..8].copy_from_slice(&pos0.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device is asked for `MAX_STORAGE_BUFFERS`; a kernel binding more would fail only
    /// when its pipeline is first bound.
    #[test]
    fn no_kernel_binds_more_storage_buffers_than_the_device_is_asked_for() {
        use crate::gpu::device::MAX_STORAGE_BUFFERS;
        let mut all = vec![
            Kernel::Embed,
            Kernel::RmsNorm,
            Kernel::Rope,
            Kernel::Attention,
            Kernel::AttentionCombine,
            Kernel::KvConvert,
            Kernel::TopK { from_logits: true },
            Kernel::Nll,
            Kernel::Gather,
            Kernel::Read { contiguous: true },
        ];
        for norm in [false, true] {
            all.extend([Kernel::MatvecQkv { norm }, Kernel::MatvecGlu { norm }]);
        }
        for bits in crate::ensemble::format::BITS {
            all.extend([
                Kernel::Matvec(bits),
                Kernel::MatvecNorm(bits),
                Kernel::Matmul(bits),
                Kernel::PlaneMatvec(bits),
                Kernel::PlaneMatmul(bits),
            ]);
        }
        let most = all.iter().map(|k| k.buffers().0 + k.buffers().1).max();
        assert_eq!(most, Some(MAX_STORAGE_BUFFERS));
    }
}
