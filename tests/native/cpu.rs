//! The packed CPU backend (`flexquant::cpu`) against the CPU reference's fake-quant forward:
//! the kernel for every bit-width and group size on odd shapes, then the demo model's logits
//! and forced decoding for a uniform and a mixed EQM.

use crate::common::demo;
use flexquant::cpu::act::Q16;
use flexquant::cpu::kernel::matmul;
use flexquant::cpu::CpuModel;
use flexquant::ensemble::format::{BITS, GROUP_SIZES};
use flexquant::model::forward::{self, KvCache};
use flexquant::model::{ops, ModuleId, ModuleKind};
use flexquant::quant::rtn::quantize_rtn;
use flexquant::quant::weights::{reference_weights, rtn_base, rtn_modules};
use flexquant::runtime::backend::KvFormat;

/// Deterministic values in [-1, 1).
fn noise(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn norm(v: impl Iterator<Item = f64>) -> f64 {
    v.map(|x| x * x).sum::<f64>().sqrt()
}

/// ‖y − y_ref‖ / ‖y_ref‖ of the kernel's outputs. The only approximation is the int16
/// activations (per 32 inputs, max-abs scaled, so an outlier coarsens its block): ~1e-5 per
/// block, up to ~1.5e-4 over a row with a 20x outlier; a wrong lane order, scale or zero
/// gives O(1).
const KERNEL_TOL: f64 = 5e-4;

#[test]
fn kernel_matches_fake_quant_for_every_bit_width_and_group() {
    let t = 6; // a tile of 4 and two single tokens
    for bits in BITS {
        for group in GROUP_SIZES {
            for (rows, cols) in [(37, 100), (5, 200), (64, 32), (3, 129)] {
                let w = noise(bits as u64 * 1000 + cols as u64, rows * cols);
                let m = quantize_rtn(&w, rows, cols, bits, group, false, "test").unwrap();
                let wd = m.dequantize();
                let mut x = noise(rows as u64, t * cols);
                for (k, xr) in x.chunks_exact_mut(cols).enumerate() {
                    xr[(7 * k) % cols] *= 20.0; // an outlier channel per token
                }
                let a = Q16::quantize(&x, t, &m.shape);
                let mut y = vec![0f32; t * rows];
                matmul(&m, &a, &mut y);
                let want: Vec<f64> = (0..t * rows)
                    .map(|i| {
                        let (k, r) = (i / rows, i % rows);
                        (0..cols)
                            .map(|c| wd[r * cols + c] as f64 * x[k * cols + c] as f64)
                            .sum()
                    })
                    .collect();
                let err = norm(y.iter().zip(&want).map(|(a, b)| *a as f64 - b))
                    / norm(want.iter().copied());
                let case = format!("{bits} bits, group {group}, {rows}x{cols}");
                assert!(err < KERNEL_TOL, "{case}: error {err:.2e}");
                // One token at a time computes exactly what the tile did.
                for k in 0..t {
                    let a1 = Q16::quantize(&x[k * cols..(k + 1) * cols], 1, &m.shape);
                    let mut y1 = vec![0f32; rows];
                    matmul(&m, &a1, &mut y1);
                    assert_eq!(y1[..], y[k * rows..(k + 1) * rows], "{case}: token {k}");
                }
            }
        }
    }
}

/// The packed backend's attention, reading the cache's stored bytes in both formats, against
/// the CPU reference's on the same values widened (score matrices through gemm, then a softmax
/// per row): decode and prefill, short and long contexts (past several tiles, key ranges and
/// query blocks), grouped and plain heads.
#[test]
fn attention_matches_the_reference() {
    use flexquant::runtime::backend::{KvFormat, KvLayout};
    for (nh, nkv, hd) in [(9, 3, 64), (4, 4, 16)] {
        let c: flexquant::model::LlamaConfig = serde_json::from_value(serde_json::json!({
            "hidden_size": nh * hd, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": nh, "num_key_value_heads": nkv, "vocab_size": 8,
        }))
        .unwrap();
        for (pos0, t) in [
            (0, 1),
            (5, 1),
            (700, 1),
            (1100, 1),
            (254, 4),
            (1000, 3),
            (0, 7),
            (300, 40),
            (2, 300),
        ] {
            for format in [KvFormat::F16, KvFormat::Int8] {
                let layout = KvLayout::of(&c, format);
                let keys = pos0 + t;
                let stored = |seed: u64| {
                    let x = noise(seed, keys * c.kv_dim());
                    let mut b = vec![0u8; keys * nkv * layout.head_bytes()];
                    flexquant::cpu::kv::store(&x, &layout, &mut b);
                    b
                };
                let (k, v) = (stored(keys as u64), stored(keys as u64 + 1));
                let q: Vec<f32> = noise(t as u64 + 2, t * c.q_dim())
                    .iter()
                    .map(|x| 4.0 * x)
                    .collect();
                let (kw, vw) = (
                    flexquant::cpu::kv::widened(&k, &layout),
                    flexquant::cpu::kv::widened(&v, &layout),
                );
                let want = forward::attention(&c, &q, &kw, &vw, pos0, t, hd);
                let mut got = vec![f32::NAN; t * c.q_dim()];
                let cache = flexquant::cpu::attention::Cached {
                    k: &k,
                    v: &v,
                    layout: &layout,
                };
                flexquant::cpu::attention::attention(&c, &q, &cache, pos0, &mut got);
                let err = norm(got.iter().zip(&want).map(|(a, b)| (a - b) as f64))
                    / norm(want.iter().map(|&x| x as f64));
                assert!(
                    err < 1e-5,
                    "{nh}/{nkv} heads of {hd}, {format:?}, pos0 {pos0}, {t} tokens: {err:.2e}"
                );
            }
        }
    }
}

/// The plane-reading kernel computes exactly what the packed kernel does (the same integers
/// in another lane order, the same f32 steps), and a matrix's planes pack back to it.
#[test]
fn plane_kernel_equals_the_packed_kernel_for_every_bit_width_and_group() {
    use flexquant::cpu::planes::{matmul_planes, quantize_for};
    use flexquant::ensemble::plane_level::PlaneLevel;
    let t = 6;
    for bits in BITS {
        for group in GROUP_SIZES {
            for (rows, cols) in [(37, 100), (5, 200), (64, 32), (3, 129), (65, 576)] {
                let w = noise(bits as u64 * 77 + cols as u64, rows * cols);
                let m = quantize_rtn(&w, rows, cols, bits, group, false, "test").unwrap();
                let p = PlaneLevel::from_packed(&m);
                assert_eq!(p.to_packed(), m, "{bits} bits g{group} {rows}x{cols}");
                let x = noise(cols as u64 + 5, t * cols);
                for n in [1, t] {
                    let (mut yp, mut yq) = (vec![0f32; n * rows], vec![0f32; n * rows]);
                    matmul(&m, &Q16::quantize(&x[..n * cols], n, &m.shape), &mut yq);
                    matmul_planes(&p, &quantize_for(&p, &x[..n * cols], n), &mut yp);
                    assert_eq!(yp, yq, "{bits} bits g{group} {rows}x{cols}, {n} tokens");
                }
            }
        }
    }
}

/// Every width of the format in one EQM: attention at 8/6/5/4, the MLP at 4/3 with every
/// third layer's down projection at 2.
fn mixed_bits(id: ModuleId) -> u32 {
    match id.kind {
        ModuleKind::Q => 6,
        ModuleKind::K => 8,
        ModuleKind::V => 5,
        ModuleKind::O | ModuleKind::Gate => 4,
        ModuleKind::Up => 3,
        ModuleKind::Down if id.layer.is_multiple_of(3) => 2,
        ModuleKind::Down => 4,
    }
}

/// The RMS-relative error of `got` against `want` (rows of `vocab` logits), and at how many
/// rows their argmax agrees.
fn logits_error_and_agreement(got: &[f32], want: &[f32], vocab: usize) -> (f64, usize) {
    let e = norm(got.iter().zip(want).map(|(a, b)| (a - b) as f64))
        / norm(want.iter().map(|v| *v as f64));
    let agree = got
        .chunks(vocab)
        .zip(want.chunks(vocab))
        .filter(|(g, w)| ops::argmax(g) == ops::argmax(w))
        .count();
    (e, agree)
}

#[test]
fn demo_logits_and_forced_decoding_match_the_reference() {
    let Some((m, ids)) = demo() else { return };
    let w = &m.weights;
    let n = 128;
    let tokens = &ids[..n + 1];
    let vocab = w.config.vocab_size;
    for (name, bits) in [
        ("uniform 4-bit", (|_| 4) as fn(ModuleId) -> u32),
        ("mixed 8/6/5/4/3/2", mixed_bits),
    ] {
        let modules = rtn_modules(w, bits, 64).unwrap();
        let r = reference_weights(w, &modules).unwrap();
        let mut cache = KvCache::stored_as(&r, n, KvFormat::F16);
        let want = forward::forward_all(&r, &tokens[..n], &mut cache).unwrap();
        let base = rtn_base(w, 64).unwrap();
        let mut cpu =
            CpuModel::new(&w.config, base.into(), modules, n, KvFormat::F16, None).unwrap();
        let xn = cpu.hidden(&tokens[..n]).unwrap();
        let got = cpu.logits(&xn);
        let (e, agree) = logits_error_and_agreement(&got, &want, vocab);
        eprintln!("{name}: logits error {e:.2e}, top-1 {agree}/{n} agree");
        // f32 rounding over 30 layers and the int16 activations: ~5e-4; a wrong module O(1).
        assert!(e < 2e-3, "{name}: logits error {e:.2e}");
        assert_eq!(agree, n, "{name}: forced decoding top-1");

        // The decode path (one token per call, top-k) on the first tokens.
        cpu.truncate(0);
        for (p, &t) in tokens[..8].iter().enumerate() {
            let top = cpu.step(&[t]).unwrap();
            let row = &want[p * vocab..(p + 1) * vocab];
            assert_eq!(
                top[0].0 as usize,
                ops::argmax(row),
                "{name}: decode step {p}"
            );
            // The softmax's normaliser (logprobs) of this model's own logits at p.
            let log_z = flexquant::model::math::log_sum_exp(&got[p * vocab..(p + 1) * vocab]);
            let z = cpu.log_z();
            assert!(
                (z as f64 - log_z).abs() < 1e-3,
                "{name}: log_z {z} vs {log_z}"
            );
        }
    }
}

/// With an int8 KV cache (`KvFormat::Int8`) the backend tracks a reference whose cache is
/// rounded the same way (written on its own, `KvCache::stored_as`), in 0.56x the cache bytes.
/// Looser than f16: the int16 activations move a key or value enough to round some codes
/// apart, each by 1/127 of its group's largest (measured: logits error 1.5e-2, top-1 126/128;
/// against an f32 reference cache 1.7e-2); a wrong kernel or layout gives O(1).
#[test]
fn demo_logits_with_an_int8_kv_cache_track_the_reference() {
    let Some((m, ids)) = demo() else { return };
    let w = &m.weights;
    let (n, vocab) = (128, w.config.vocab_size);
    let tokens = &ids[..n];
    let modules = rtn_modules(w, |_| 4, 64).unwrap();
    let r = reference_weights(w, &modules).unwrap();
    let mut cache = KvCache::stored_as(&r, n, KvFormat::Int8);
    let want = forward::forward_all(&r, tokens, &mut cache).unwrap();
    let base: std::sync::Arc<_> = rtn_base(w, 64).unwrap().into();
    let model = |f| CpuModel::new(&w.config, base.clone(), modules.clone(), n, f, None).unwrap();
    let mut cpu = model(KvFormat::Int8);
    let xn = cpu.hidden(tokens).unwrap();
    let got = cpu.logits(&xn);
    let (e, agree) = logits_error_and_agreement(&got, &want, vocab);
    eprintln!("int8 KV cache: logits error {e:.2e}, top-1 {agree}/{n} agree");
    assert!(e < 5e-2, "int8 KV cache: logits error {e:.2e}");
    assert!(
        agree >= n - 6,
        "int8 KV cache: forced decoding top-1 {agree}/{n}"
    );
    // Heads of 64: 64 codes and 2 scales (72 bytes) against 128 bytes of f16.
    let f16 = model(KvFormat::F16).kv_bytes();
    assert_eq!(cpu.kv_bytes() * 128, f16 * 72);
}

/// The KV cache grows with the conversation (`runtime::backend::kv_grown`): one block at load,
/// larger ones as tokens arrive, the logits bit-identical to a model whose cache was reserved
/// for the whole context up front; a short request shrinks it to a block, the cached positions
/// kept (`shrink_kv`); a growth beyond the model's budget is an out-of-memory error that leaves
/// it as it was; `release_kv` frees the cache.
/// The tiny model's mixed-bit EQM on the CPU backend: its config, and a maker of models of it
/// (`context` positions, the KV cache in `format`, at most `budget` bytes).
fn tiny_cpu() -> (
    flexquant::model::LlamaConfig,
    impl Fn(usize, KvFormat, Option<u64>) -> CpuModel,
) {
    let (m, modules) = crate::common::tiny_mixed();
    let c = m.weights.config.clone();
    let base: std::sync::Arc<_> = rtn_base(&m.weights, 32).unwrap().into();
    let config = c.clone();
    let make = move |context, format, budget| {
        CpuModel::new(
            &config,
            base.clone(),
            modules.clone(),
            context,
            format,
            budget,
        )
        .unwrap()
    };
    (c, make)
}

#[test]
fn kv_cache_grows_with_the_conversation_shrinks_for_a_short_request_and_is_freed() {
    use flexquant::runtime::backend::{kv_cache_bytes, KV_BLOCK};
    let (c, make) = tiny_cpu();
    let c = &c;
    let model = |budget| make(512, KvFormat::F16, budget);
    let tokens = crate::common::tiny_tokens(300);

    let mut reserved = model(None);
    reserved.reserve_kv(512).unwrap();
    let mut g = model(None);
    assert_eq!(g.capacity(), KV_BLOCK, "one block at load");
    let at_load = g.held_bytes();
    assert_eq!(
        reserved.held_bytes() - at_load,
        kv_cache_bytes(c, KvFormat::F16, 512 - KV_BLOCK)
    );
    let mut grown = vec![];
    for (i, t) in tokens.iter().enumerate() {
        let (a, b) = (reserved.step(&[*t]).unwrap(), g.step(&[*t]).unwrap());
        assert_eq!(a, b, "top candidates at position {i}");
        if grown.last() != Some(&g.capacity()) {
            grown.push(g.capacity());
        }
    }
    assert_eq!(
        grown,
        [128, 256, 384],
        "cache sizes as the conversation grew"
    );
    assert_eq!(
        g.held_bytes() - at_load,
        kv_cache_bytes(c, KvFormat::F16, 384 - KV_BLOCK)
    );
    // A request that needs 200 positions keeps 256 (not worth a copy); one that needs 100
    // shrinks the cache to a block, the first 100 positions kept.
    g.shrink_kv(200);
    assert_eq!(g.capacity(), 384);
    g.truncate(100);
    reserved.truncate(100);
    g.shrink_kv(100);
    assert_eq!(
        (g.len(), g.capacity(), g.held_bytes()),
        (100, KV_BLOCK, at_load)
    );
    for (i, t) in tokens[..40].iter().enumerate() {
        let (a, b) = (reserved.step(&[*t]).unwrap(), g.step(&[*t]).unwrap());
        assert_eq!(
            a,
            b,
            "top candidates at position {} after the shrink",
            100 + i
        );
    }
    assert_eq!(g.capacity(), 2 * KV_BLOCK, "grown again past a block");
    g.release_kv();
    assert_eq!((g.len(), g.capacity()), (0, 0));
    assert_eq!(
        at_load - g.held_bytes(),
        kv_cache_bytes(c, KvFormat::F16, KV_BLOCK)
    );

    // Room for one block and a little more: the second block is refused.
    let mut tight = model(Some(at_load + 1024));
    tight.hidden(&tokens[..KV_BLOCK]).unwrap();
    let e = tight.step(&tokens[KV_BLOCK..KV_BLOCK + 1]).unwrap_err();
    assert!(matches!(e, flexquant::Error::OutOfMemory { .. }), "{e}");
    assert_eq!((tight.len(), tight.capacity()), (KV_BLOCK, KV_BLOCK));
    assert_eq!(tight.held_bytes(), at_load);
}

/// A cache converted from f16 to int8 mid-conversation (`CpuModel::convert_kv`, the
/// controller's first move under pressure with `KvChoice::Auto`): the held bytes drop by
/// exactly the two formats' difference at the cache's positions, the conversation goes on
/// from the same position with candidates as a model that stored int8 from the start gives
/// (their keys and values differ by a rounding at most), and back to f16 is refused when the
/// budget cannot hold it, the model unchanged.
#[test]
fn kv_cache_converts_to_int8_mid_conversation() {
    use flexquant::runtime::backend::kv_cache_bytes;
    let (c, make) = tiny_cpu();
    let c = &c;
    let model = |format, budget| make(512, format, budget);
    let tokens = crate::common::tiny_tokens(200);
    let mut int8 = model(KvFormat::Int8, None);
    let mut g = model(KvFormat::F16, None);
    int8.hidden(&tokens[..150]).unwrap();
    g.hidden(&tokens[..150]).unwrap();
    let (held, cap) = (g.held_bytes(), g.capacity());
    g.convert_kv(KvFormat::Int8).unwrap();
    assert_eq!(
        (g.kv_format(), g.len(), g.capacity()),
        (KvFormat::Int8, 150, cap)
    );
    assert_eq!(
        held - g.held_bytes(),
        kv_cache_bytes(c, KvFormat::F16, cap) - kv_cache_bytes(c, KvFormat::Int8, cap)
    );
    assert_eq!(g.held_bytes(), int8.held_bytes());
    let mut same = 0;
    for t in &tokens[150..] {
        let (a, b) = (int8.step(&[*t]).unwrap(), g.step(&[*t]).unwrap());
        same += (a[0].0 == b[0].0) as usize;
        let (la, lb) = (
            a[0].1,
            b.iter().find(|x| x.0 == a[0].0).map_or(f32::NAN, |x| x.1),
        );
        assert!((la - lb).abs() <= 1e-2 * la.abs().max(1.0), "{la} vs {lb}");
    }
    assert!(same >= 48, "top-1 agreed at {same} of 50 positions");

    // Back to f16 needs more bytes than a budget at what it holds allows: refused, unchanged.
    let mut tight = model(KvFormat::F16, None);
    tight.hidden(&tokens[..100]).unwrap();
    tight.convert_kv(KvFormat::Int8).unwrap();
    let held = tight.held_bytes();
    tight.set_budget(Some(held));
    let e = tight.convert_kv(KvFormat::F16).unwrap_err();
    assert!(matches!(e, flexquant::Error::OutOfMemory { .. }), "{e}");
    assert_eq!(
        (tight.kv_format(), tight.len(), tight.held_bytes()),
        (KvFormat::Int8, 100, held)
    );
    tight.set_budget(None);
    tight.convert_kv(KvFormat::F16).unwrap();
    assert_eq!(tight.held_bytes(), model(KvFormat::F16, None).held_bytes());
}

/// A conversation carried to another model by its KV cache's bytes (`Session::export` /
/// `import`, what the browser's worker does when it is re-created to give its memory back):
/// the next request finds the whole conversation cached there, runs only its new tokens and
/// answers exactly as the first model does, in either format; a cache beyond the context or
/// the budget is refused and leaves the conversation empty, as a fresh one.
#[test]
fn a_conversation_moves_to_another_model_by_its_kv_bytes() {
    use flexquant::runtime::backend::kv_cache_bytes;
    use flexquant::runtime::generate::Sampling;
    use flexquant::runtime::session::Session;
    let (c, model) = tiny_cpu();
    let c = &c;
    use pollster::block_on as run;
    let greedy = Sampling {
        max_tokens: 12,
        ..Default::default()
    };
    let prompt = crate::common::tiny_tokens(150);
    for format in [KvFormat::F16, KvFormat::Int8] {
        let mut a = Session::new(model(512, format, None));
        let mut turn = run(a.start(&prompt, &greedy, &[])).unwrap();
        while run(a.next(&mut turn)).unwrap().is_some() {}
        let mut parts: Vec<Vec<u8>> = vec![];
        let tokens = run(a.export(&mut |p| parts.push(p.to_vec())))
            .unwrap()
            .to_vec();
        assert_eq!(tokens, a.tokens(), "{format}: every token is cached");
        let (n, bytes) = flexquant::runtime::backend::kv_parts(c, format, tokens.len());
        assert_eq!(parts.len(), n);
        assert!(parts.iter().all(|p| p.len() as u64 == bytes), "{format}");

        // Into a model that started in the other format: it takes the snapshot's.
        let other = [KvFormat::Int8, KvFormat::F16][format as usize];
        let mut b = Session::new(model(512, other, None));
        let mut next = parts.iter();
        run(b.import(&tokens, format, &mut |p| {
            p.copy_from_slice(next.next().unwrap())
        }))
        .unwrap();
        assert_eq!((b.tokens(), b.model.kv_format()), (&tokens[..], format));
        let room = flexquant::runtime::backend::kv_grown(0, tokens.len(), 512);
        assert_eq!(b.model.capacity(), room);
        assert_eq!(b.model.kv_bytes(), kv_cache_bytes(c, format, room));

        // The next request: the conversation and a new turn, on both.
        let mut more = tokens.clone();
        more.extend(crate::common::tiny_tokens(170).split_off(150));
        let (mut ta, mut tb) = (
            run(a.start(&more, &greedy, &[])).unwrap(),
            run(b.start(&more, &greedy, &[])).unwrap(),
        );
        assert_eq!(tb.stats.prefilled, 20, "{format}: only the new tokens ran");
        assert_eq!(ta.stats.prefilled, tb.stats.prefilled);
        let (mut oa, mut ob) = (vec![], vec![]);
        while let Some(t) = run(a.next(&mut ta)).unwrap() {
            oa.push(t);
        }
        while let Some(t) = run(b.next(&mut tb)).unwrap() {
            ob.push(t);
        }
        assert_eq!(
            oa, ob,
            "{format}: the same answer on the model the cache moved to"
        );
        assert_eq!(
            a.model.log_z().to_bits(),
            b.model.log_z().to_bits(),
            "{format}: the same last logits, to the bit"
        );

        // Refused: more positions than the context, more bytes than the budget.
        let mut short = Session::new(model(64, format, None));
        let e =
            run(short.import(&tokens, format, &mut |_| panic!("nothing is filled"))).unwrap_err();
        assert!(matches!(e, flexquant::Error::ContextLength { .. }), "{e}");
        let empty = model(512, format, None).held_bytes();
        let mut tight = Session::new(model(512, format, Some(empty)));
        let e =
            run(tight.import(&tokens, format, &mut |_| panic!("nothing is filled"))).unwrap_err();
        assert!(matches!(e, flexquant::Error::OutOfMemory { .. }), "{e}");
        for s in [&short, &tight] {
            assert_eq!((s.tokens().len(), s.model.len()), (0, 0));
        }
        // Refused onto a conversation: it stays as it was.
        let kept = (b.tokens().to_vec(), b.model.kv_bytes());
        b.model.set_budget(Some(b.model.held_bytes()));
        let longer = crate::common::tiny_tokens(400);
        let e = run(b.import(&longer, format, &mut |_| {})).unwrap_err();
        assert!(matches!(e, flexquant::Error::OutOfMemory { .. }), "{e}");
        assert_eq!((b.tokens().to_vec(), b.model.kv_bytes()), kept);
        assert_eq!(b.model.len(), b.tokens().len());
    }
}

/// A prompt scored in one pass (`CpuModel::step_scored`, the head on every position) equals it
/// scored one decode step at a time, each watching the next token (`Backend::step_scored`'s
/// default), 150 tokens past a cached conversation: every token's log-probability and best
/// alternatives, the last step's candidates and normaliser, and the cache length after.
#[test]
fn a_prompt_scored_in_one_pass_equals_it_scored_token_by_token() {
    use flexquant::runtime::TokenLogprob;
    let (_, make) = tiny_cpu();
    let tokens = crate::common::tiny_tokens(190);
    let (before, prompt) = tokens.split_at(40);
    let mut batch = make(512, KvFormat::F16, None);
    let mut steps = make(512, KvFormat::F16, None);
    for m in [&mut batch, &mut steps] {
        m.watch(&[7]).unwrap();
        m.hidden(before).unwrap();
    }
    let (cand, scored) = batch.step_scored(prompt, 3).unwrap();
    assert_eq!(scored.len(), prompt.len() - 1);
    for (i, &t) in prompt.iter().enumerate() {
        let next = prompt.get(i + 1).copied();
        steps
            .watch(&[7].into_iter().chain(next).collect::<Vec<_>>())
            .unwrap();
        let c = steps.step(&[t]).unwrap();
        let Some(next) = next else {
            assert_eq!(c.len(), cand.len());
            for (a, b) in c.iter().zip(&cand) {
                assert_eq!(a.0, b.0, "last step's candidates");
                assert!((a.1 - b.1).abs() < 2e-3, "{a:?} vs {b:?}");
            }
            assert!((steps.log_z() - batch.log_z()).abs() < 2e-3);
            break;
        };
        let want = TokenLogprob::of(next, &c, steps.log_z(), 3);
        let got = &scored[i];
        assert_eq!(got.id, next);
        assert!(
            want.logprob.is_finite(),
            "token {i}: the watched logit came back"
        );
        assert!(
            (got.logprob - want.logprob).abs() < 2e-3,
            "token {i}: {got:?} vs {want:?}"
        );
        assert_eq!(got.top.len(), 3);
        for (a, b) in got.top.iter().zip(&want.top) {
            assert!((a.1 - b.1).abs() < 2e-3, "token {i}: {got:?} vs {want:?}");
        }
    }
    assert_eq!((batch.len(), steps.len()), (tokens.len(), tokens.len()));
}

/// A prompt read in pieces (`Session::begin`, then `read` a few tokens at a time, as the
/// browser engine does to stay interruptible) answers as the prompt read whole: the same cached
/// prefix reused, the same greedy answer, and scored (`prompt_logprobs`) the same entries, the
/// ones at a piece's edge included. A prompt given up after one piece (`Prefill::abandon`)
/// ends its turn with `Caller` and leaves that piece cached for the next prompt.
#[test]
fn a_prompt_read_in_pieces_answers_as_read_whole() {
    use flexquant::runtime::{Sampling, Session, StopReason, TurnOptions};
    use pollster::block_on;
    let (_, make) = tiny_cpu();
    let tokens = crate::common::tiny_tokens(190);
    let greedy = Sampling {
        temperature: 0.0,
        max_tokens: 6,
        ..Sampling::default()
    };
    let answer = |s: &mut Session<CpuModel>, t: &mut flexquant::runtime::Turn| {
        let mut out = Vec::new();
        while let Some(id) = block_on(s.next(t)).unwrap() {
            out.push(id);
        }
        out
    };
    for scored in [false, true] {
        let opts = TurnOptions {
            logprobs: scored.then_some(3),
            prompt_logprobs: scored,
            ..TurnOptions::default()
        };
        let (mut whole, mut pieces) = (
            Session::new(make(512, KvFormat::F16, None)),
            Session::new(make(512, KvFormat::F16, None)),
        );
        let mut turns = Vec::new();
        for (s, piece) in [(&mut whole, usize::MAX), (&mut pieces, 7)] {
            // A conversation of 40 tokens in the cache, then the prompt that continues it.
            let mut t = block_on(s.start(&tokens[..40], &greedy, &[])).unwrap();
            answer(s, &mut t);
            let mut p = block_on(s.begin(&tokens, &greedy, &[], opts.clone())).unwrap();
            assert_eq!(p.reused(), if scored { 0 } else { 40 });
            let mut reads = 0;
            let mut turn = loop {
                let before = p.done();
                reads += 1;
                match block_on(s.read(&mut p, piece)).unwrap() {
                    Some(t) => break t,
                    None => assert_eq!(p.done(), before + piece, "a piece is {piece} tokens"),
                }
            };
            let run = tokens.len() - p.reused();
            assert_eq!(reads, if piece == 7 { run.div_ceil(7) } else { 1 });
            assert_eq!(turn.stats.prefilled, run);
            let out = answer(s, &mut turn);
            turns.push((out, std::mem::take(&mut turn.prompt_logprobs)));
        }
        let ((a, la), (b, lb)) = (&turns[0], &turns[1]);
        assert_eq!(a, b, "scored {scored}: the same greedy answer");
        assert_eq!(la.len(), if scored { tokens.len() } else { 0 });
        assert_eq!(la.len(), lb.len());
        for (i, (x, y)) in la.iter().zip(lb).enumerate() {
            let (Some(x), Some(y)) = (x, y) else {
                assert!(i == 0 && x.is_none() && y.is_none(), "entry {i}");
                continue;
            };
            assert_eq!((x.id, x.top.len()), (y.id, y.top.len()), "entry {i}");
            assert!(
                x.logprob.is_finite() && (x.logprob - y.logprob).abs() < 2e-3,
                "entry {i}: {x:?} vs {y:?}"
            );
            for (u, v) in x.top.iter().zip(&y.top) {
                assert!((u.1 - v.1).abs() < 2e-3, "entry {i}: {x:?} vs {y:?}");
            }
        }
    }

    // Given up after one piece: the piece stays cached and the same prompt later reads the rest.
    let mut s = Session::new(make(512, KvFormat::F16, None));
    let mut p = block_on(s.begin(&tokens, &greedy, &[], TurnOptions::default())).unwrap();
    assert!(block_on(s.read(&mut p, 50)).unwrap().is_none());
    let mut t = p.abandon(StopReason::Caller);
    assert_eq!(t.stats.stopped_by, Some(StopReason::Caller));
    assert_eq!((t.stats.prefilled, s.tokens().len()), (50, 50));
    assert_eq!(
        block_on(s.next(&mut t)).unwrap(),
        None,
        "an abandoned turn has no answer"
    );
    let t = block_on(s.start(&tokens, &greedy, &[])).unwrap();
    assert_eq!(
        t.stats.prefilled,
        tokens.len() - 50,
        "the piece read before is reused"
    );
}
