//! Each kernel's parameters: one `#[repr(C)]` struct per kernel, written once here. The engine
//! (`model`), the probes and the parity tests fill these structs, and the WGSL `Params` struct
//! each shader reads (`p`, binding 0) is generated from the same definition and prepended to
//! the shader (`kernels`), so the layout cannot drift between host and shader.

/// A kernel's parameter block: plain 32-bit words (`u32`, `f32`), as WGSL declares them.
pub trait KernelParams: bytemuck::Pod {
    /// The Rust name, matched against `Kernel::params` when a block is bound.
    const NAME: &'static str;
    /// `struct Params {...}` and its uniform binding, for the shader's source.
    const WGSL: &'static str;
}

macro_rules! kernel_params {
    ($($(#[doc = $doc:literal])* $name:ident { $($(#[doc = $fdoc:literal])* $field:ident: $ty:ident,)* })*) => {$(
        $(#[doc = $doc])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
        pub struct $name {
            $($(#[doc = $fdoc])* pub $field: $ty,)*
        }

        impl KernelParams for $name {
            const NAME: &'static str = stringify!($name);
            const WGSL: &'static str = concat!(
                "struct Params {\n",
                $("    ", stringify!($field), ": ", stringify!($ty), ",\n",)*
                "}\n@group(0) @binding(0) var<uniform> p: Params;\n"
            );
        }
    )*};
}

kernel_params! {
    /// `qlinear.wgsl` (`matvec`, `matmul`): `y[t][r] (+)= sum_c (scale * code + zero) * x[t][c]`.
    QlinearParams {
        rows: u32,
        /// A multiple of 4.
        cols: u32,
        words_per_row: u32,
        groups_per_row: u32,
        /// group / 32
        group_blocks: u32,
        /// Word index of the first scale: codes come first, then scales.
        scale_base: u32,
        /// x row stride in floats (a multiple of 4).
        x_stride: u32,
        /// y row stride in floats.
        y_stride: u32,
        y_base: u32,
        /// 0: y = W x; 1: y += W x (the residual connection of o and down); 2: y =
        /// silu(y) * W x (up writing into the gate: SwiGLU without a dispatch of its own).
        accumulate: u32,
        /// Words between one bit plane and the next (the plane-reading kernels; 0 for
        /// packed codes).
        plane_words: u32,
        /// RMSNorm's epsilon (`MatvecNorm`, where the norm before the product is folded in).
        eps: f32,
        /// The codes' bit-width: read by the kernels of several matrices (`MatvecQkv`,
        /// `MatvecGlu`), which decode each matrix's codes at run time; the others are
        /// specialised to it.
        bits: u32,
        /// Padding to 64 bytes: WGSL's stride of a uniform array of Params (`MatvecQkv`).
        pad0: u32,
        pad1: u32,
        pad2: u32,
    }
    /// `embed.wgsl`: rows of the 8-bit packed table, dequantized.
    EmbedParams {
        /// A multiple of 4.
        hidden: u32,
        vocab: u32,
        words_per_row: u32,
        groups_per_row: u32,
        /// A multiple of 4.
        group: u32,
        /// Word index of the first (scale, zero).
        scale_base: u32,
    }
    /// `rmsnorm.wgsl`.
    RmsNormParams {
        n: u32,
        eps: f32,
        /// 1: only the call's last token, into row 0.
        last_only: u32,
    }
    /// `rope.wgsl`: RoPE of the queries and keys, and the new keys and values into the cache.
    RopeParams {
        /// Floats per query row (one row per token of the call).
        q_stride: u32,
        /// Floats per row of the new keys and values (one row per token of the call; the
        /// cache rows they are stored into hold `k_heads` heads, `runtime::backend::KvLayout`).
        kv_stride: u32,
        q_heads: u32,
        k_heads: u32,
        head_dim: u32,
        /// The table holds cos[ctx][head_dim/2] then sin[ctx][head_dim/2].
        sin_base: u32,
        /// Elements per scale of the cache (`runtime::backend::KvLayout`).
        kv_group: u32,
        /// 1: the cache holds int8 codes and scales; 0: f16.
        kv_int8: u32,
    }
    /// `attention.wgsl`.
    AttentionParams {
        /// Query heads per KV head.
        group: u32,
        /// At most 256.
        head_dim: u32,
        /// Floats per token row of q and out.
        q_stride: u32,
        /// Words per position of the cache (`runtime::backend::KvLayout`).
        kv_stride: u32,
        /// 1 / sqrt(head_dim).
        scale: f32,
        /// Query heads (rows of `part` per token).
        n_heads: u32,
        /// Keys per range of the cache (a multiple of 64), and ranges: the dispatch's z.
        split_keys: u32,
        splits: u32,
        /// Elements per scale of the cache (`runtime::backend::KvLayout`).
        kv_group: u32,
        /// 1: the cache holds int8 codes and scales; 0: f16.
        kv_int8: u32,
    }
    /// `kv_convert.wgsl`: a layer's cached keys or values re-encoded in the other format.
    KvConvertParams {
        /// Stored heads to convert (cached positions x KV heads).
        heads: u32,
        head_dim: u32,
        /// Elements per scale of the int8 format (`runtime::backend::KvLayout`).
        kv_group: u32,
        /// 1: f16 -> int8; 0: int8 -> f16.
        to_int8: u32,
    }
    /// `topk.wgsl`.
    TopKParams {
        /// Items in the source.
        n: u32,
        k: u32,
        /// First logit (row offset) when FROM_LOGITS.
        base: u32,
    }
    /// `gather.wgsl`: the watched tokens' logits after the top-k.
    GatherParams {
        /// Word of the destination where the first watched logit goes.
        base: u32,
    }
    /// `nll.wgsl`.
    NllParams {
        vocab: u32,
    }
    /// `read.wgsl`: the read-everything yardstick.
    ReadParams {
        /// vec4<u32> words to read.
        n_vec4: u32,
        /// Threads dispatched (workgroups * 64).
        threads: u32,
        /// Words per thread when CONTIGUOUS (ceil(n_vec4 / threads)).
        run: u32,
    }
}

/// `qlinear_parts.wgsl` (`MatvecQkv`, `MatvecGlu`): each matrix's parameters, in the order of
/// their bindings (the gate and up kernel leaves the third unused). Its WGSL is declared with
/// the kernel's source (`kernels::qlinear_parts_source`): an array of `QlinearParams`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct QlinearPartsParams {
    pub parts: [QlinearParams; 3],
}

impl KernelParams for QlinearPartsParams {
    const NAME: &'static str = "QlinearPartsParams";
    const WGSL: &'static str = "";
}

impl QlinearParams {
    /// `s`'s matrix over tokens of `cols` features into rows of `rows` floats, overwriting
    /// (what the head and the parity tests use; modules set the cache and residual fields).
    pub fn dense(s: crate::ensemble::format::PackedShape) -> QlinearParams {
        QlinearParams {
            rows: s.rows as u32,
            cols: s.cols as u32,
            words_per_row: s.words_per_row() as u32,
            groups_per_row: s.groups_per_row() as u32,
            group_blocks: (s.group / 32) as u32,
            scale_base: s.code_words() as u32,
            x_stride: s.cols as u32,
            y_stride: s.rows as u32,
            y_base: 0,
            accumulate: 0,
            plane_words: 0,
            eps: 0.0,
            bits: s.bits,
            ..Default::default()
        }
    }

    /// A plane-reading kernel's parameters for `level` held as one buffer: its planes, then
    /// its grid.
    pub fn planes(level: &crate::ensemble::plane_level::PlaneLevel) -> QlinearParams {
        let s = level.shape;
        QlinearParams {
            words_per_row: crate::ensemble::plane_level::plane_row_words(&s) as u32,
            scale_base: level.planes.len() as u32,
            plane_words: level.plane_words() as u32,
            ..QlinearParams::dense(s)
        }
    }
}
