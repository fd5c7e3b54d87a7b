//! The whole model on the GPU against the CPU reference forward of the same weights
//! (`quant::weights::reference_weights`: dequantized modules, 8-bit embedding and head).

use crate::gpu_util::gpu_arc;
use flexquant::ensemble::format::BITS;
use flexquant::gpu::ModelOptions;
use flexquant::model::forward::{self, KvCache};
use flexquant::model::load;
use flexquant::quant::weights::{gpu_model, reference_weights, rtn_modules};

/// Logit error measure: max |gpu - cpu| over the RMS of the CPU logits.
fn rel_err(gpu: &[f32], cpu: &[f32]) -> f32 {
    let rms = (cpu.iter().map(|v| v * v).sum::<f32>() / cpu.len() as f32).sqrt();
    gpu.iter()
        .zip(cpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
        / rms
}

/// f32 rounding through 2 layers: observed ~1e-6; a wrong kernel is off by O(1).
const TINY_TOL: f32 = 1e-4;

#[test]
fn tiny_model_prefill_and_decode_match_cpu_for_mixed_bits() {
    let Some(gpu) = gpu_arc() else { return };
    let dir = tempfile::tempdir().unwrap();
    flexquant::model::tiny::write_tiny_model(dir.path(), 7).unwrap();
    let m = load::load(dir.path()).unwrap();
    let w = &m.weights;
    // Every bit-width, cycling over the modules; group 32 (160 = 5 groups).
    let modules = rtn_modules(w, |id| BITS[id.index() % BITS.len()], 32).unwrap();
    let r = reference_weights(w, &modules).unwrap();
    let tokens: Vec<u32> = m
        .tokenizer
        .encode("It is a truth universally acknowledged")
        .unwrap();
    let mut cache = KvCache::f16(&r, 64);
    let want = forward::forward_all(&r, &tokens, &mut cache).unwrap();

    // Decode with each RMSNorm folded into the matvecs after it (the default), and without.
    for fuse_norm in [true, false] {
        let opts = ModelOptions {
            context: 64,
            max_batch: 64,
            logit_rows: 64,
            top_k: 5,
            fuse_norm: Some(fuse_norm),
        };
        decode_matches(gpu.clone(), w, &modules, opts, &tokens, &want);
    }
}

fn decode_matches(
    gpu: std::sync::Arc<flexquant::gpu::Gpu>,
    w: &flexquant::model::weights::Weights,
    modules: &[flexquant::ensemble::format::PackedMatrix],
    opts: ModelOptions,
    tokens: &[u32],
    want: &[f32],
) {
    let (t, vocab) = (tokens.len(), w.config.vocab_size);
    let mut g = pollster::block_on(gpu_model(gpu, w, modules, opts)).unwrap();
    assert_eq!(g.allocator().bytes(), g.footprint().total());
    assert_eq!(g.held_bytes(), g.footprint().total());

    // Prefill (matmul path) of all tokens at once.
    let all = pollster::block_on(g.logits_all(tokens)).unwrap();
    let e = rel_err(&all, want);
    assert!(e < TINY_TOL, "prefill logits error {e:.2e}");

    // Decode (matvec path) token by token, checking the top-k too.
    g.truncate(0);
    for (i, &tok) in tokens.iter().enumerate() {
        let lg = pollster::block_on(g.logits_last(&[tok])).unwrap();
        let row = &want[i * vocab..(i + 1) * vocab];
        let e = rel_err(&lg, row);
        assert!(
            e < TINY_TOL,
            "decode logits error {e:.2e} at token {i} (norms folded: {})",
            opts.fuse_norm.unwrap()
        );
    }
    g.truncate(t - 1);
    let top = pollster::block_on(g.step(&tokens[t - 1..])).unwrap();
    let row = &want[(t - 1) * vocab..];
    let mut order: Vec<usize> = (0..vocab).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    let ids: Vec<u32> = top.iter().map(|p| p.0).collect();
    let want_ids: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
    assert_eq!(
        ids,
        want_ids,
        "top-5 of the last token (norms folded: {})",
        opts.fuse_norm.unwrap()
    );
    // The softmax's normaliser (logprobs) from the top-k kernels, against the CPU's.
    let log_z = flexquant::model::math::log_sum_exp(row) as f32;
    assert!(
        (g.log_z() - log_z).abs() < 1e-3 * log_z.abs().max(1.0),
        "log_z {} vs {log_z}",
        g.log_z()
    );
    assert_eq!(
        g.dispatches_per_token(),
        match opts.fuse_norm.unwrap() {
            true => 1 + 9 * w.config.num_hidden_layers + 3,
            false => 1 + 11 * w.config.num_hidden_layers + 4,
        },
        "dispatches per token (embedding, layers, head, top-k)"
    );
}
