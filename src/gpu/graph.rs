//! The dispatch graph of one forward pass: every kernel call of a token with its parameter
//! slot (one 256-byte block of the params buffer) and its bind group, made once at load, a
//! module's again when it is swapped. `Model::run_chunk` encodes it per call, the grid sized
//! for the call's tokens, into one command buffer.

use crate::ensemble::base::BASE_BITS;
use crate::ensemble::format::{PackedMatrix, PackedShape};
use crate::gpu::alloc::GpuBuffer;
use crate::gpu::buffers::{attention_splits, topk_chunks, Activations, BaseBuffers};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{
    kernel_param_bytes, Kernel, Kernels, ATTENTION_SPLIT_KEYS, PARAM_SLOT, WG,
};
use crate::gpu::model::ModelOptions;
use crate::gpu::params::*;
use crate::model::config::LlamaConfig;
use crate::model::weights::{ModuleId, ModuleKind};
use crate::runtime::backend::{KvFormat, KvLayout};
use crate::runtime::generate::MAX_WATCHED;

/// Workgroup grid of a dispatch as a function of the tokens in the call.
#[derive(Clone, Copy)]
pub(crate) enum Grid {
    Fixed([u32; 3]),
    /// `[x, n_tokens, 1]`
    PerToken(u32),
    /// `[x, n_tokens, z]`
    PerTokenZ(u32, u32),
    /// `[x, ceil(n_tokens / TT), 1]`
    Tiled(u32),
    /// `[n_tokens, 1, 1]`: a workgroup per token row.
    Rows,
}

pub(crate) struct Op {
    pub kernel: Kernel,
    pub bind_group: wgpu::BindGroup,
    pub grid: Grid,
    /// Its parameter slot (rebinding an op keeps it).
    pub slot: u64,
}

pub(crate) enum Dispatch {
    Fixed(Op),
    /// An RMSNorm that only prefill runs: decode folds it into the matvecs that read its
    /// output (`Slot::norm_bind_group`, `ModelOptions::fuse_norm`).
    Norm(Op),
    /// A module of the EQM: its kernel and grid follow its current version (`Slot`).
    Module(usize),
    /// Modules that read the same input (`Graph::groups`): one dispatch in decode where
    /// modules are fused, else each as a `Module`.
    Group(usize),
    /// Attention's combine pass: dispatched only while attention runs over more than one
    /// range of the cache (`Graph::ranges`); over one, attention writes its output itself.
    Combine(Op),
}

/// The modules decode can run in one dispatch (`ModelOptions::fuse_modules`): a layer's Q, K
/// and V (`MatvecQkv`), and its gate and up projections (`MatvecGlu`).
pub(crate) const GROUPS: [&[ModuleKind]; 2] = [
    &[ModuleKind::Q, ModuleKind::K, ModuleKind::V],
    &[ModuleKind::Gate, ModuleKind::Up],
];

/// One layer's group of modules (`GROUPS`) and, where decode fuses them, its dispatch.
pub(crate) struct Group {
    pub layer: usize,
    /// Index in `GROUPS`.
    pub which: usize,
    /// Its parameter slot (every member's `QlinearParams`, `QlinearPartsParams`).
    pub param_slot: u64,
    /// The fused kernel's bind group over the members' current buffers (`None`: not fused).
    pub fused: Option<wgpu::BindGroup>,
}

impl Group {
    /// The members' slots (their `ModuleId::index()`), in binding order.
    pub fn members(&self) -> impl Iterator<Item = usize> + '_ {
        GROUPS[self.which].iter().map(|&kind| {
            ModuleId {
                layer: self.layer,
                kind,
            }
            .index()
        })
    }

    /// The fused kernel; `norm`: the norm before the group folded in.
    pub fn kernel(&self, norm: bool) -> Kernel {
        match self.which {
            0 => Kernel::MatvecQkv { norm },
            _ => Kernel::MatvecGlu { norm },
        }
    }

    /// The fused kernel's parameter block for the members' current versions in `slots`.
    pub fn param_bytes(&self, slots: &[Slot], c: &LlamaConfig) -> Vec<u8> {
        let mut p = QlinearPartsParams::default();
        let kinds = GROUPS[self.which].iter();
        for ((part, &kind), i) in p.parts.iter_mut().zip(kinds).zip(self.members()) {
            *part = qlinear_params(slots[i].shape, kind, c);
        }
        kernel_param_bytes(self.kernel(false), &p)
    }

    /// Workgroups of the fused dispatch, `per_wg` rows each: the members' in turn (Q, K, V),
    /// or the gate's rows, which the up projection's match.
    pub fn workgroups(&self, slots: &[Slot], per_wg: u32) -> u32 {
        let wgs = |i: usize| (slots[i].shape.rows as u32).div_ceil(per_wg);
        match self.which {
            0 => self.members().map(wgs).sum(),
            _ => self.members().next().map_or(0, wgs),
        }
    }
}

/// One module's current version on the device.
pub(crate) struct Slot {
    pub shape: PackedShape,
    pub buffer: GpuBuffer,
    pub bind_group: wgpu::BindGroup,
    /// Decode's `MatvecNorm` bind group, where the norm before this module is folded in.
    pub norm_bind_group: Option<wgpu::BindGroup>,
    pub param_slot: u64,
}

/// Every op of a forward pass, in order: the embedding, the layers, then what the head needs.
pub(crate) struct Graph {
    pub embed: Op,
    pub layers: Vec<Dispatch>,
    pub final_norm: Op,
    /// The final norm of the call's last token only, into row 0 (before `head_last`).
    pub final_norm_last: Op,
    pub head_last: Op,
    /// One token's final norm and head in one dispatch (`MatvecNorm`), where norms are folded.
    pub head_last_norm: Option<Op>,
    pub head_all: Op,
    pub topk: [Op; 2],
    pub nll: Op,
    /// The watched tokens' logits after the top-k's results (one-token steps that watch).
    pub gather: Op,
    /// Every layer's groups of modules (`GROUPS`), in order (`Dispatch::Group`).
    pub groups: Vec<Group>,
    /// `(layer, index in layers)` of every op that binds a layer's KV cache (RoPE stores into
    /// it, attention reads it): rebound when the cache grows (`Graph::rebind_kv`).
    pub kv_ops: Vec<(usize, usize)>,
    /// Ranges of the cache attention is dispatched over (`buffers::attention_ranges`).
    pub ranges: u32,
}

/// The buffers `kernel` (RoPE, attention or its combine pass) binds for one layer, in binding
/// order: the one list the graph and `Graph::rebind_kv` bind.
fn kv_op_buffers<'a>(
    kernel: Kernel,
    rope: &'a GpuBuffer,
    a: &'a Activations,
    [kc, vc]: &'a [GpuBuffer; 2],
) -> Vec<&'a GpuBuffer> {
    match kernel {
        Kernel::Rope => vec![rope, &a.k_new, &a.v_new, &a.q, kc, vc],
        _ => vec![&a.q, kc, vc, &a.att, &a.att_part],
    }
}

impl Graph {
    /// Whether attention runs over more than one range of the cache, so that its partials are
    /// merged by the combine pass (over one, attention writes its output itself).
    pub fn combines(&self) -> bool {
        self.ranges > 1
    }

    /// Points the ops that bind the KV cache at `kv` (one pair of buffers per layer), e.g. a
    /// larger cache the old one was copied into, and dispatches attention over `ranges` ranges
    /// (`buffers::attention_ranges`).
    pub fn rebind_kv(
        &mut self,
        at: &SlotBinding,
        kernels: &mut Kernels,
        rope: &GpuBuffer,
        a: &Activations,
        kv: &[[GpuBuffer; 2]],
        ranges: u32,
    ) {
        self.ranges = ranges;
        for &(l, i) in &self.kv_ops {
            if let Dispatch::Fixed(op) | Dispatch::Combine(op) = &mut self.layers[i] {
                let storage = kv_op_buffers(op.kernel, rope, a, &kv[l]);
                op.bind_group = at.bind(kernels, op.kernel, op.slot, &storage);
                if let (Kernel::Attention, Grid::PerTokenZ(heads, _)) = (op.kernel, op.grid) {
                    op.grid = Grid::PerTokenZ(heads, ranges);
                }
            }
        }
    }

    /// Rewrites the KV ops' parameters for a cache stored as `o.kv_format` and attention over
    /// `self.ranges` ranges (after the cache changed format, `Model::convert_kv`, or size).
    pub fn write_kv_params(
        &self,
        gpu: &Gpu,
        params: &GpuBuffer,
        c: &LlamaConfig,
        o: &ModelOptions,
    ) {
        let kv = KvLayout::of(c, o.kv_format);
        for &(_, i) in &self.kv_ops {
            if let Dispatch::Fixed(op) | Dispatch::Combine(op) = &self.layers[i] {
                let bytes = match op.kernel {
                    Kernel::Rope => kernel_param_bytes(op.kernel, &rope_params(c, o, &kv)),
                    _ => kernel_param_bytes(op.kernel, &attention_params(c, o, &kv, self.ranges)),
                };
                gpu.queue
                    .write_buffer(&params.buffer, op.slot * PARAM_SLOT, &bytes);
            }
        }
    }
}

/// RoPE's parameters (it stores the call's keys and values into the cache laid out as `kv`).
fn rope_params(c: &LlamaConfig, o: &ModelOptions, kv: &KvLayout) -> RopeParams {
    let hd = c.head_dim() as u32;
    RopeParams {
        q_stride: c.q_dim() as u32,
        kv_stride: c.kv_dim() as u32,
        q_heads: c.num_attention_heads as u32,
        k_heads: c.n_kv_heads() as u32,
        head_dim: hd,
        sin_base: o.context as u32 * hd / 2,
        kv_group: kv.group as u32,
        kv_int8: (kv.format == KvFormat::Int8) as u32,
    }
}

/// Attention's parameters (and its combine pass's) over a cache laid out as `kv`, dispatched
/// over `ranges` ranges: over one, `splits` is 1 and attention writes its output itself (the
/// combine pass is not dispatched).
fn attention_params(
    c: &LlamaConfig,
    o: &ModelOptions,
    kv: &KvLayout,
    ranges: u32,
) -> AttentionParams {
    let (hd, nh, nkv) = (
        c.head_dim() as u32,
        c.num_attention_heads as u32,
        c.n_kv_heads() as u32,
    );
    AttentionParams {
        group: nh / nkv,
        head_dim: hd,
        q_stride: c.q_dim() as u32,
        kv_stride: nkv * kv.head_bytes() as u32 / 4,
        scale: 1.0 / (hd as f32).sqrt(),
        n_heads: nh,
        split_keys: ATTENTION_SPLIT_KEYS,
        splits: if ranges > 1 { attention_splits(o) } else { 1 },
        kv_group: kv.group as u32,
        kv_int8: (kv.format == KvFormat::Int8) as u32,
    }
}

/// Parameter slots: 13 per layer (2 norms, 7 modules, their 2 groups, RoPE, attention), one
/// more where attention's ranges are combined, and 9 more (embedding, 2 final norms, 2 heads,
/// 2 top-k stages, nll).
pub(crate) fn param_slots(c: &LlamaConfig, o: &ModelOptions) -> u64 {
    let combine = (attention_splits(o) > 1) as u64;
    (13 + combine) * c.num_hidden_layers as u64 + 9
}

/// Whether decode runs each group of modules (`GROUPS`) in one dispatch (`ModelOptions::
/// fuse_modules`); never where the device binds fewer storage buffers than `MatvecQkv`.
pub(crate) fn fuses_modules(gpu: &Gpu, o: &ModelOptions) -> bool {
    let (ro, rw) = Kernel::MatvecQkv { norm: true }.buffers();
    o.fuse_modules.unwrap_or(gpu.fuses_modules_by_default())
        && gpu.device.limits().max_storage_buffers_per_shader_stage >= ro + rw
}

/// Whether decode folds the norms into the matvecs after them (`ModelOptions::fuse_norm`).
pub(crate) fn folds_norms(gpu: &Gpu, o: &ModelOptions) -> bool {
    o.fuse_norm.unwrap_or(gpu.folds_norms_by_default())
}

/// Which of its layer's two norms (attention's, the MLP's) a module reads the output of.
pub(crate) fn module_norm(kind: ModuleKind) -> Option<usize> {
    match kind {
        ModuleKind::Q | ModuleKind::K | ModuleKind::V => Some(0),
        ModuleKind::Gate | ModuleKind::Up => Some(1),
        ModuleKind::O | ModuleKind::Down => None,
    }
}

/// The input and output buffers of a module of one layer. K and V write the call's new rows,
/// which `rope.wgsl` stores into the f16 cache.
pub(crate) fn module_io(a: &Activations, kind: ModuleKind) -> (&GpuBuffer, &GpuBuffer) {
    match kind {
        ModuleKind::Q => (&a.xn, &a.q),
        ModuleKind::K => (&a.xn, &a.k_new),
        ModuleKind::V => (&a.xn, &a.v_new),
        ModuleKind::O => (&a.att, &a.x),
        ModuleKind::Gate => (&a.xn, &a.gate),
        // silu(gate) * up, in place (qlinear_params).
        ModuleKind::Up => (&a.xn, &a.gate),
        ModuleKind::Down => (&a.gate, &a.x),
    }
}

/// qlinear.wgsl's parameters for a module: O and down add into the residual stream, up turns
/// the gate's output into SwiGLU's; a module that reads a norm's output carries its epsilon
/// (for `MatvecNorm`).
pub(crate) fn qlinear_params(s: PackedShape, kind: ModuleKind, c: &LlamaConfig) -> QlinearParams {
    QlinearParams {
        eps: if module_norm(kind).is_some() {
            c.rms_norm_eps
        } else {
            0.0
        },
        accumulate: match kind {
            ModuleKind::O | ModuleKind::Down => 1,
            ModuleKind::Up => 2,
            _ => 0,
        },
        ..QlinearParams::dense(s)
    }
}

pub(crate) fn param_binding(params: &GpuBuffer, slot: u64) -> wgpu::BufferBinding<'_> {
    wgpu::BufferBinding {
        buffer: &params.buffer,
        offset: slot * PARAM_SLOT,
        size: wgpu::BufferSize::new(PARAM_SLOT),
    }
}

/// Where every op's bind group points for its parameters (a slot of one buffer) and step.
pub(crate) struct SlotBinding<'a> {
    pub gpu: &'a Gpu,
    pub params: &'a GpuBuffer,
    pub step: &'a GpuBuffer,
}

impl SlotBinding<'_> {
    /// `kernel`'s bind group (its pipeline prepared) with its parameters at `slot` and
    /// `storage` in binding order.
    pub fn bind(
        &self,
        kernels: &mut Kernels,
        kernel: Kernel,
        slot: u64,
        storage: &[&GpuBuffer],
    ) -> wgpu::BindGroup {
        kernels.prepare(self.gpu, kernel);
        let bufs: Vec<&wgpu::Buffer> = storage.iter().map(|b| &b.buffer).collect();
        let params = param_binding(self.params, slot);
        kernels.bind(self.gpu, kernel, params, &self.step.buffer, &bufs)
    }
}

/// What a layer's module bind groups point at besides the module's own buffer.
pub(crate) struct ModuleIo<'a> {
    pub gpu: &'a Gpu,
    pub params: &'a GpuBuffer,
    pub step: &'a GpuBuffer,
    pub act: &'a Activations,
    /// The layer's norm weights (attention's, the MLP's) when decode folds them into the
    /// matvecs (`ModelOptions::fuse_norm`).
    pub norms: Option<&'a [GpuBuffer; 2]>,
}

impl ModuleIo<'_> {
    /// A module's bind groups for `bits`-bit codes in `buffer` with its parameters at `slot`:
    /// the matvec's and matmul's, and decode's `MatvecNorm` one where the module reads a
    /// norm's output and norms are folded.
    pub fn bind_groups(
        &self,
        kernels: &mut Kernels,
        kind: ModuleKind,
        bits: u32,
        slot: u64,
        buffer: &GpuBuffer,
    ) -> (wgpu::BindGroup, Option<wgpu::BindGroup>) {
        let (x, y) = module_io(self.act, kind);
        kernels.prepare(self.gpu, Kernel::Matmul(bits));
        let at = SlotBinding {
            gpu: self.gpu,
            params: self.params,
            step: self.step,
        };
        let mut bind = |kernel, storage: &[&GpuBuffer]| at.bind(kernels, kernel, slot, storage);
        let plain = bind(Kernel::Matvec(bits), &[buffer, x, y]);
        let norm = match (self.norms, module_norm(kind)) {
            (Some(norms), Some(i)) => Some(bind(
                Kernel::MatvecNorm(bits),
                &[buffer, &self.act.x, &norms[i], y],
            )),
            _ => None,
        };
        (plain, norm)
    }

    /// Fuses `group`: its bind group over its members' current buffers in `slots`, its
    /// parameters at `group.param_slot`.
    pub fn fuse_group(&self, kernels: &mut Kernels, group: &mut Group, slots: &[Slot]) {
        let kinds = GROUPS[group.which];
        let mut storage: Vec<&GpuBuffer> = group.members().map(|i| &slots[i].buffer).collect();
        match (self.norms, module_norm(kinds[0])) {
            (Some(norms), Some(i)) => storage.extend([&self.act.x, &norms[i]]),
            _ => storage.push(module_io(self.act, kinds[0]).0),
        }
        match group.which {
            0 => storage.extend(kinds.iter().map(|&k| module_io(self.act, k).1)),
            _ => storage.push(&self.act.gate),
        }
        let at = SlotBinding {
            gpu: self.gpu,
            params: self.params,
            step: self.step,
        };
        let kernel = group.kernel(self.norms.is_some());
        group.fused = Some(at.bind(kernels, kernel, group.param_slot, &storage));
    }
}

/// What every layer's ops read besides its own cache and norms.
struct Layer<'a> {
    c: &'a LlamaConfig,
    opts: &'a ModelOptions,
    /// Decode folds the norms into the matvecs (`folds_norms`).
    fold: bool,
    /// Decode runs each group of modules in one dispatch (`fuses_modules`).
    fuse: bool,
    a: &'a Activations,
    rope: &'a GpuBuffer,
    modules: &'a [PackedMatrix],
    /// Attention's dispatched ranges for the cache as allocated (`buffers::attention_ranges`).
    ranges: u32,
}

/// The layers' dispatches in order, their modules' slots and their ops that bind the KV cache.
struct Layers {
    ops: Vec<Dispatch>,
    slots: Vec<Slot>,
    groups: Vec<Group>,
    kv_ops: Vec<(usize, usize)>,
}

/// Collects parameter blocks and makes the bind groups that point at their slots.
pub(crate) struct Builder<'a> {
    pub gpu: &'a Gpu,
    pub kernels: &'a mut Kernels,
    pub params: &'a GpuBuffer,
    pub step: &'a GpuBuffer,
    /// One 256-byte parameter slot per op, in slot order.
    pub blocks: Vec<Vec<u8>>,
}

impl Builder<'_> {
    fn bind(&mut self, kernel: Kernel, slot: u64, storage: &[&GpuBuffer]) -> wgpu::BindGroup {
        let at = SlotBinding {
            gpu: self.gpu,
            params: self.params,
            step: self.step,
        };
        at.bind(self.kernels, kernel, slot, storage)
    }

    fn op<P: KernelParams>(
        &mut self,
        kernel: Kernel,
        params: &P,
        storage: &[&GpuBuffer],
        grid: Grid,
    ) -> Op {
        let slot = self.blocks.len() as u64;
        self.blocks.push(kernel_param_bytes(kernel, params));
        Op {
            kernel,
            bind_group: self.bind(kernel, slot, storage),
            grid,
            slot,
        }
    }

    /// One decoder layer's dispatches and its modules' slots, appended to `out`; the modules'
    /// buffers are taken from `module_bufs` in `ModuleId::index()` order.
    fn layer(
        &mut self,
        x: &Layer,
        l: usize,
        layer_kv: &[GpuBuffer; 2],
        norms: &[GpuBuffer; 2],
        module_bufs: &mut impl Iterator<Item = GpuBuffer>,
        out: &mut Layers,
    ) {
        let (c, a) = (x.c, x.a);
        let (hd, nh, nkv) = (
            c.head_dim() as u32,
            c.num_attention_heads as u32,
            c.n_kv_heads() as u32,
        );
        let kv = KvLayout::of(c, x.opts.kv_format);
        let [attn_norm, ffn_norm] = norms;
        let norm = RmsNormParams {
            n: c.hidden_size as u32,
            eps: c.rms_norm_eps,
            last_only: 0,
        };
        let io = |b: &Self| ModuleIo {
            gpu: b.gpu,
            params: b.params,
            step: b.step,
            act: a,
            norms: x.fold.then_some(norms),
        };
        let mut module = |b: &mut Self, kind: ModuleKind, out: &mut Layers| {
            let id = ModuleId { layer: l, kind };
            let m = &x.modules[id.index()];
            let buffer = module_bufs.next().unwrap();
            let param_slot = b.blocks.len() as u64;
            b.blocks.push(kernel_param_bytes(
                Kernel::Matvec(m.shape.bits),
                &qlinear_params(m.shape, kind, c),
            ));
            let (bind_group, norm_bind_group) =
                io(b).bind_groups(b.kernels, kind, m.shape.bits, param_slot, &buffer);
            out.slots.push(Slot {
                shape: m.shape,
                buffer,
                bind_group,
                norm_bind_group,
                param_slot,
            });
        };
        // A group of modules already in `out.slots`, fused or not.
        let group = |b: &mut Self, which: usize, out: &mut Layers| {
            let mut g = Group {
                layer: l,
                which,
                param_slot: b.blocks.len() as u64,
                fused: None,
            };
            b.blocks.push(g.param_bytes(&out.slots, c));
            if x.fuse {
                io(b).fuse_group(b.kernels, &mut g, &out.slots);
            }
            out.ops.push(Dispatch::Group(out.groups.len()));
            out.groups.push(g);
        };
        // A norm decode folds into the matvecs after it, or one every call runs.
        let norm_op = |op| match x.fold {
            true => Dispatch::Norm(op),
            false => Dispatch::Fixed(op),
        };
        let op = self.op(
            Kernel::RmsNorm,
            &norm,
            &[attn_norm, &a.x, &a.xn],
            Grid::Rows,
        );
        out.ops.push(norm_op(op));
        for &kind in GROUPS[0] {
            module(self, kind, out);
        }
        group(self, 0, out);
        let rope = self.op(
            Kernel::Rope,
            &rope_params(c, x.opts, &kv),
            &kv_op_buffers(Kernel::Rope, x.rope, a, layer_kv),
            Grid::PerToken((nh * hd / 2 + 2 * nkv * hd / 8).div_ceil(WG)),
        );
        out.kv_ops.push((l, out.ops.len()));
        out.ops.push(Dispatch::Fixed(rope));
        let splits = attention_splits(x.opts);
        let attention = attention_params(c, x.opts, &kv, x.ranges);
        let att_buffers = kv_op_buffers(Kernel::Attention, x.rope, a, layer_kv);
        let op = self.op(
            Kernel::Attention,
            &attention,
            &att_buffers,
            Grid::PerTokenZ(nh, x.ranges),
        );
        out.kv_ops.push((l, out.ops.len()));
        out.ops.push(Dispatch::Fixed(op));
        if splits > 1 {
            let op = self.op(
                Kernel::AttentionCombine,
                &attention,
                &att_buffers,
                Grid::PerToken(nh),
            );
            out.kv_ops.push((l, out.ops.len()));
            out.ops.push(Dispatch::Combine(op));
        }
        module(self, ModuleKind::O, out);
        out.ops.push(Dispatch::Module(out.slots.len() - 1));
        let op = self.op(Kernel::RmsNorm, &norm, &[ffn_norm, &a.x, &a.xn], Grid::Rows);
        out.ops.push(norm_op(op));
        for &kind in GROUPS[1] {
            module(self, kind, out);
        }
        group(self, 1, out);
        module(self, ModuleKind::Down, out);
        out.ops.push(Dispatch::Module(out.slots.len() - 1));
    }

    /// The forward pass over these buffers: the graph and the modules' slots (taking
    /// `module_bufs`, one per module in `ModuleId::index()` order, holding `modules`), with
    /// attention dispatched over `ranges` ranges of the cache.
    #[allow(clippy::too_many_arguments)]
    pub fn graph(
        &mut self,
        c: &LlamaConfig,
        opts: &ModelOptions,
        table: PackedShape,
        base: &BaseBuffers,
        kv: &[[GpuBuffer; 2]],
        a: &Activations,
        modules: &[PackedMatrix],
        module_bufs: Vec<GpuBuffer>,
        ranges: u32,
    ) -> (Graph, Vec<Slot>) {
        let b = self;
        let (h, vocab) = (c.hidden_size as u32, c.vocab_size as u32);
        let norm = |last_only| RmsNormParams {
            n: h,
            eps: c.rms_norm_eps,
            last_only,
        };
        let fold = folds_norms(b.gpu, opts);
        let (embed, head, final_norm, rope) =
            (&base.embed, base.head(), &base.final_norm, &base.rope);

        let embed_op = b.op(
            Kernel::Embed,
            &EmbedParams {
                hidden: h,
                vocab,
                words_per_row: table.words_per_row() as u32,
                groups_per_row: table.groups_per_row() as u32,
                group: table.group as u32,
                scale_base: table.code_words() as u32,
            },
            &[embed, &a.tokens, &a.x],
            Grid::PerToken(h.div_ceil(4 * WG)),
        );
        let layer = Layer {
            c,
            opts,
            fold,
            a,
            fuse: fuses_modules(b.gpu, opts),
            rope,
            modules,
            ranges,
        };
        let mut layers = Layers {
            ops: Vec::new(),
            slots: Vec::new(),
            groups: Vec::new(),
            kv_ops: Vec::new(),
        };
        let mut module_bufs = module_bufs.into_iter();
        for (l, (layer_kv, norms)) in kv.iter().zip(&base.norms).enumerate() {
            b.layer(&layer, l, layer_kv, norms, &mut module_bufs, &mut layers);
        }
        let Layers {
            ops: layer_ops,
            slots,
            groups,
            kv_ops,
        } = layers;
        let final_norm_op = b.op(
            Kernel::RmsNorm,
            &norm(0),
            &[final_norm, &a.x, &a.xn],
            Grid::Rows,
        );
        let final_norm_last = b.op(
            Kernel::RmsNorm,
            &norm(1),
            &[final_norm, &a.x, &a.xn],
            Grid::Fixed([1, 1, 1]),
        );
        // The head: the 8-bit table as a [vocab][hidden] module writing logits rows.
        let head_params = qlinear_params(table, ModuleKind::Q, c);
        let per_wg = b.kernels.matvec_rows_per_workgroup();
        let head_grid = Grid::Fixed([vocab.div_ceil(per_wg), 1, 1]);
        let head_last = b.op(
            Kernel::Matvec(BASE_BITS),
            &head_params,
            &[head, &a.xn, &a.logits],
            head_grid,
        );
        // The same parameters (their slot) with the final norm folded in.
        let head_slot = b.blocks.len() as u64 - 1;
        let head_last_norm = fold.then(|| Op {
            kernel: Kernel::MatvecNorm(BASE_BITS),
            bind_group: b.bind(
                Kernel::MatvecNorm(BASE_BITS),
                head_slot,
                &[head, &a.x, final_norm, &a.logits],
            ),
            grid: head_grid,
            slot: head_slot,
        });
        let head_all = b.op(
            Kernel::Matmul(BASE_BITS),
            &head_params,
            &[head, &a.xn, &a.logits],
            Grid::Tiled(vocab.div_ceil(WG)),
        );
        let chunks = topk_chunks(c) as u32;
        let k = opts.top_k;
        let topk_ops = [
            b.op(
                Kernel::TopK { from_logits: true },
                &TopKParams {
                    n: vocab,
                    k,
                    base: 0,
                },
                &[&a.logits, &a.cand],
                Grid::Fixed([chunks, 1, 1]),
            ),
            b.op(
                Kernel::TopK { from_logits: false },
                &TopKParams {
                    n: chunks * k,
                    k,
                    base: 0,
                },
                &[&a.cand, &a.topk],
                Grid::Fixed([1, 1, 1]),
            ),
        ];
        let nll_op = b.op(
            Kernel::Nll,
            &NllParams { vocab },
            &[&a.logits, &a.targets, &a.nll],
            Grid::Rows,
        );
        let gather_op = b.op(
            Kernel::Gather,
            &GatherParams { base: 2 * k + 1 },
            &[&a.logits, &a.watched_ids, &a.topk],
            Grid::Fixed([(MAX_WATCHED as u32).div_ceil(WG), 1, 1]),
        );
        assert_eq!(b.blocks.len() as u64, param_slots(c, opts));
        let graph = Graph {
            embed: embed_op,
            layers: layer_ops,
            final_norm: final_norm_op,
            final_norm_last,
            head_last,
            head_last_norm,
            head_all,
            topk: topk_ops,
            nll: nll_op,
            gather: gather_op,
            groups,
            kv_ops,
            ranges,
        };
        (graph, slots)
    }
}
