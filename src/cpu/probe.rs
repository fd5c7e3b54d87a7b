//! Kernel microbenchmarks shared by the native benchmark (`flexquant bench backends`) and the
//! browser page (`web::bench`): one weight matrix streamed through the integer dot product for
//! one token, with no model around it, so a backend's decode speed can be set against its own
//! kernel's ceiling, and the packed and plane-reading kernels against each other.

use crate::cpu::act::Q16;
use crate::cpu::kernel::matmul;
use crate::cpu::planes::{matmul_planes, quantize_for};
use crate::ensemble::format::{PackedMatrix, PackedShape};
use crate::ensemble::plane_level::PlaneLevel;
use crate::error::Result;

/// One matrix-vector product into `y`.
type Pass = Box<dyn FnMut(&mut [f32])>;

/// How the matrix is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The packed format (`kernel::matmul`).
    Packed,
    /// Bit planes (`planes::matmul_planes`).
    Planes,
}

/// GB/s of weight bytes (codes and scales) through one token's matrix-vector product: a
/// `bits`-bit matrix of 576 columns (the demo model's width), group 64, with enough rows for
/// `bytes`, streamed `reps` times after one warm-up pass (best pass). `now_ms`: the clock.
pub fn dot_kernel_gbs(
    bytes: f64,
    bits: u32,
    layout: Layout,
    reps: u32,
    now_ms: fn() -> f64,
) -> Result<f64> {
    let cols = 576;
    let row = PackedShape::new(1, cols, bits, 64)?.bytes();
    let rows = ((bytes / row as f64) as usize).max(1);
    let shape = PackedShape::new(rows, cols, bits, 64)?;
    let m = PackedMatrix {
        shape,
        codes: (0..shape.code_words())
            .map(|i| (i as u32).wrapping_mul(2_654_435_761))
            .collect(),
        scales: vec![0x2c00_3c00; shape.scale_words()], // (1.0, 0.0625) in f16
    };
    let x: Vec<f32> = (0..cols).map(|i| (i % 17) as f32 - 8.0).collect();
    let mut y = vec![0f32; rows];
    let mut pass: Pass = match layout {
        Layout::Packed => {
            let a = Q16::quantize(&x, 1, &shape);
            Box::new(move |y| matmul(&m, &a, y))
        }
        Layout::Planes => {
            let p = PlaneLevel::from_packed(&m);
            let a = quantize_for(&p, &x, 1);
            Box::new(move |y| matmul_planes(&p, &a, y))
        }
    };
    pass(&mut y);
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t = now_ms();
        pass(&mut y);
        best = best.min(now_ms() - t);
    }
    std::hint::black_box(&y);
    Ok(shape.bytes() as f64 / (best.max(1e-3) / 1e3) / 1e9)
}

/// Milliseconds of one layer's attention (`cpu::attention`) for `queries` query tokens after
/// `positions` cached ones, in the demo model's shape (9 query heads, 3 KV heads of 64), the
/// cache stored as `format`: best of `reps` calls after one warm-up. Long conversations are
/// where attention shows: the benchmark sets this against the matrix products' time.
pub fn attention_ms(
    positions: usize,
    queries: usize,
    format: crate::runtime::backend::KvFormat,
    reps: u32,
    now_ms: fn() -> f64,
) -> f64 {
    use crate::cpu::attention::{attention, Cached};
    use crate::runtime::backend::KvLayout;
    let c = crate::model::LlamaConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 1,
        num_attention_heads: 9,
        num_key_value_heads: Some(3),
        head_dim: Some(64),
        vocab_size: 49152,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
    };
    let layout = KvLayout::of(&c, format);
    let total = positions + queries.max(1);
    let wave = |n: usize, k: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i.wrapping_mul(k) % 977) as f32 / 977.0 - 0.5) * 4.0)
            .collect()
    };
    let heads = total * c.n_kv_heads();
    let mut k = vec![0u8; heads * layout.head_bytes()];
    let mut v = k.clone();
    crate::cpu::kv::store(&wave(heads * 64, 31), &layout, &mut k);
    crate::cpu::kv::store(&wave(heads * 64, 37), &layout, &mut v);
    let q = wave(queries.max(1) * c.q_dim(), 41);
    let mut out = vec![0f32; q.len()];
    let cache = Cached {
        k: &k,
        v: &v,
        layout: &layout,
    };
    attention(&c, &q, &cache, positions, &mut out);
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t = now_ms();
        attention(&c, &q, &cache, positions, &mut out);
        best = best.min(now_ms() - t);
    }
    std::hint::black_box(&out);
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::backend::KvFormat;

    #[test]
    fn attention_probe_times_a_call_of_either_cache_format() {
        for format in [KvFormat::F16, KvFormat::Int8] {
            let ms = attention_ms(300, 3, format, 2, crate::runtime::clock::now_ms);
            assert!(ms.is_finite() && ms >= 0.0, "{format:?}: {ms}");
        }
    }
}
