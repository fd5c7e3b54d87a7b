//! The CPU forward on the tiny random model: checked against a naive independent forward
//! written here with plain loops, and for KV-cache consistency.

use crate::common;

use common::{max_abs_diff, tiny_model_dir};
use flexquant::model::forward::{self, KvCache};
use flexquant::model::load::load;
use flexquant::model::ops;
use flexquant::model::weights::{Layout, Linear};
use flexquant::model::{ModuleId, ModuleKind, Weights};

/// Plain-loop Llama forward over the whole sequence, f64 accumulation, no cache, RoPE applied
/// as a rotation of (i, i + d/2) pairs written out longhand.
fn naive_forward(w: &Weights, tokens: &[u32]) -> Vec<Vec<f64>> {
    let c = &w.config;
    let (h, hd, nh, nkv) = (
        c.hidden_size,
        c.head_dim(),
        c.num_attention_heads,
        c.n_kv_heads(),
    );
    let mm = |x: &[f64], id: ModuleId| -> Vec<f64> {
        let m = w.module(id);
        (0..m.rows)
            .map(|r| (0..m.cols).map(|k| x[k] * m.w[r * m.cols + k] as f64).sum())
            .collect()
    };
    let norm = |x: &[f64], g: &[f32]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / (ms + c.rms_norm_eps as f64).sqrt();
        x.iter().zip(g).map(|(v, g)| v * inv * *g as f64).collect()
    };
    let rope = |v: &mut [f64], pos: usize| {
        for head in v.chunks_mut(hd) {
            for i in 0..hd / 2 {
                let th = pos as f64 / (c.rope_theta as f64).powf(2.0 * i as f64 / hd as f64);
                let (a, b) = (head[i], head[i + hd / 2]);
                head[i] = a * th.cos() - b * th.sin();
                head[i + hd / 2] = b * th.cos() + a * th.sin();
            }
        }
    };
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| {
            w.embed[t as usize * h..(t as usize + 1) * h]
                .iter()
                .map(|&v| v as f64)
                .collect()
        })
        .collect();
    for l in 0..c.num_hidden_layers {
        let id = |kind| ModuleId { layer: l, kind };
        let mut ks = vec![];
        let mut vs = vec![];
        let mut qs = vec![];
        for (p, x) in xs.iter().enumerate() {
            let xn = norm(x, &w.norms[l].attn_norm);
            let mut q = mm(&xn, id(ModuleKind::Q));
            let mut k = mm(&xn, id(ModuleKind::K));
            rope(&mut q, p);
            rope(&mut k, p);
            qs.push(q);
            ks.push(k);
            vs.push(mm(&xn, id(ModuleKind::V)));
        }
        for (p, x) in xs.iter_mut().enumerate() {
            let mut att = vec![0f64; nh * hd];
            for head in 0..nh {
                let g = head / (nh / nkv);
                let q = &qs[p][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=p)
                    .map(|j| {
                        let k = &ks[j][g * hd..(g + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for d in 0..hd {
                        att[head * hd + d] += ej / sum * vs[j][g * hd + d];
                    }
                }
            }
            let o = mm(&att, id(ModuleKind::O));
            for (a, b) in x.iter_mut().zip(&o) {
                *a += b;
            }
            let xn = norm(x, &w.norms[l].ffn_norm);
            let gate = mm(&xn, id(ModuleKind::Gate));
            let up = mm(&xn, id(ModuleKind::Up));
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = mm(&act, id(ModuleKind::Down));
            for (a, b) in x.iter_mut().zip(&d) {
                *a += b;
            }
        }
    }
    let head = w.lm_head.as_ref().unwrap();
    xs.iter()
        .map(|x| {
            let xn = norm(x, &w.final_norm);
            (0..head.rows)
                .map(|r| (0..h).map(|k| xn[k] * head.w[r * h + k] as f64).sum())
                .collect()
        })
        .collect()
}

#[test]
fn tiny_model_matches_naive_forward() {
    let dir = tiny_model_dir();
    let m = load(dir.path()).unwrap();
    let w = &m.weights;
    assert!(!w.config.tie_word_embeddings && w.lm_head.is_some());
    let tokens = m
        .tokenizer
        .encode("Hello, tiny world! 0123 <|im_start|>x")
        .unwrap();
    assert!(tokens.len() > 20);
    let mut cache = KvCache::new(w, 128);
    let fast = forward::forward_all(w, &tokens, &mut cache).unwrap();
    let naive: Vec<f32> = naive_forward(w, &tokens)
        .concat()
        .iter()
        .map(|&v| v as f32)
        .collect();
    let scale = naive.iter().fold(0f32, |a, v| a.max(v.abs()));
    let diff = max_abs_diff(&fast, &naive);
    eprintln!("tiny model: max |logit diff| {diff:.2e}, max |logit| {scale:.2}");
    assert!(
        diff <= 1e-4 * scale.max(1.0),
        "diff {diff} vs scale {scale}"
    );
    // The same model with every matrix stored by columns (the builder's evaluator's layout).
    let mut cols = w.clone();
    for m in cols.modules.iter_mut() {
        *m = m.in_layout(Layout::Columns);
    }
    cols.lm_head = w.lm_head.as_ref().map(|h| h.in_layout(Layout::Columns));
    let mut cache = KvCache::new(&cols, 128);
    let by_cols = forward::forward_all(&cols, &tokens, &mut cache).unwrap();
    let diff = max_abs_diff(&by_cols, &naive);
    assert!(
        diff <= 1e-4 * scale.max(1.0),
        "by columns: diff {diff} vs scale {scale}"
    );
}

/// `ops::linear` in both layouts against an f64 product written here, on odd shapes and on
/// the row counts of decoding (the mat-vec path) and of prefill (GEMM); the layouts convert
/// back and forth exactly.
#[test]
fn linear_in_either_layout_equals_a_plain_product() {
    for &(rows, cols) in &[(1, 1), (13, 9), (70, 33), (5, 130)] {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        let by_rows = Linear::new(rows, cols, w.clone());
        let by_cols = by_rows.in_layout(Layout::Columns);
        assert_eq!(by_cols.layout, Layout::Columns);
        assert_eq!(&*by_cols.in_layout(Layout::Rows).w, &w[..], "round trip");
        for m in [1, 2, 4, 5, 37] {
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 32.0)
                .collect();
            let want: Vec<f64> = (0..m)
                .flat_map(|i| {
                    let (x, w) = (&x, &w);
                    (0..rows).map(move |r| {
                        (0..cols)
                            .map(|c| x[i * cols + c] as f64 * w[r * cols + c] as f64)
                            .sum::<f64>()
                    })
                })
                .collect();
            for lin in [&by_rows, &by_cols] {
                let mut out = vec![f32::NAN; m * rows];
                ops::linear(&x, m, lin, &mut out);
                let err = out
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (*a as f64 - b).abs())
                    .fold(0.0, f64::max);
                assert!(
                    err <= 1e-4 * (cols as f64),
                    "{:?} {rows}x{cols}, {m} rows: error {err}",
                    lin.layout
                );
            }
        }
    }
}

#[test]
fn kv_cache_decode_equals_prefill() {
    let dir = tiny_model_dir();
    let m = load(dir.path()).unwrap();
    let w = &m.weights;
    let tokens: Vec<u32> = (0..150).map(|i| (i * 37 % 250 + 3) as u32).collect();
    let vocab = w.config.vocab_size;
    let mut cache = KvCache::new(w, 256);
    let all = forward::forward_all(w, &tokens, &mut cache).unwrap();
    // Prefill a prefix (spanning several attention query blocks), then decode one by one.
    let mut cache = KvCache::new(w, 256);
    let split = 70;
    let pre = forward::forward_all(w, &tokens[..split], &mut cache).unwrap();
    assert!(max_abs_diff(&pre, &all[..split * vocab]) < 1e-4);
    for (i, &t) in tokens.iter().enumerate().skip(split) {
        let lg = forward::forward_last(w, &[t], &mut cache).unwrap();
        let d = max_abs_diff(&lg, &all[i * vocab..(i + 1) * vocab]);
        assert!(d < 1e-4, "position {i}: decode differs from prefill by {d}");
    }
    assert_eq!(cache.len(), tokens.len());
    // Rewinding the cache and re-running gives the same logits again.
    cache.truncate(100);
    let lg = forward::forward_last(w, &tokens[100..101], &mut cache).unwrap();
    assert!(max_abs_diff(&lg, &all[100 * vocab..101 * vocab]) < 1e-4);
}

#[test]
fn context_overflow_and_bad_tokens_are_errors() {
    let dir = tiny_model_dir();
    let m = load(dir.path()).unwrap();
    let w = &m.weights;
    let mut cache = KvCache::new(w, 16);
    let e = forward::forward_last(w, &[5; 17], &mut cache)
        .unwrap_err()
        .to_string();
    assert!(e.contains("exceed the context of 16"), "{e}");
    assert!(
        cache.is_empty(),
        "a refused request must not touch the cache"
    );
    let e = forward::forward_last(w, &[100_000], &mut cache)
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
    let e = forward::forward_last(w, &[], &mut cache)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no tokens"), "{e}");
}

#[test]
fn tiny_tokenizer_round_trips_bytes() {
    let dir = tiny_model_dir();
    let m = load(dir.path()).unwrap();
    for s in [
        "plain ascii",
        "ünïcödé — ✓ 日本語 🙂",
        "<|im_start|>user\nhi<|im_end|>\n",
        "a\n\n\tb  c",
    ] {
        let ids = m.tokenizer.encode(s).unwrap();
        assert_eq!(m.tokenizer.decode(&ids, false).unwrap(), s);
    }
    assert_eq!(m.tokenizer.encode("<|im_start|>").unwrap(), vec![1]);
}

#[test]
fn set_module_checks_shape() {
    let dir = tiny_model_dir();
    let mut w = load(dir.path()).unwrap().weights;
    let id = ModuleId {
        layer: 1,
        kind: ModuleKind::Down,
    };
    let bad = flexquant::model::Linear::new(3, 3, vec![0.0; 9]);
    let e = w.set_module(id, bad).unwrap_err().to_string();
    assert!(e.contains("L1.down") && e.contains("3x3"), "{e}");
    let (r, c) = ModuleKind::Down.shape(&w.config);
    w.set_module(id, flexquant::model::Linear::new(r, c, vec![0.0; r * c]))
        .unwrap();
    assert!(w.module(id).w.iter().all(|&v| v == 0.0));
}
