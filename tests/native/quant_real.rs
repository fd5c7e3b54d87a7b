//! Quantization on the real demo model and text: GPTQ against RTN per module on real
//! activations, and end-to-end perplexity. Skipped with a message when the data is missing
//! (a failure under FLEXQUANT_REQUIRE_DATA=1, as in CI).

use crate::common;

use flexquant::model::eval::perplexity;
use flexquant::model::forward;
use flexquant::model::load::{load, LoadedModel};
use flexquant::model::ops::Rope;
use flexquant::model::{Linear, ModuleId, ModuleKind, Weights};
use flexquant::quant::calib::{self, CalibSettings};
use flexquant::quant::eqm::{with_base_precision, EqmModel};
use flexquant::quant::gptq::{prepare, quantize_gptq, GptqConfig, Hessian};
use flexquant::quant::library::{self, BuildInput, BuildOptions, Library, Method, ModelInfo};
use flexquant::quant::rtn::quantize_rtn;
use flexquant::quant::static_table::DEFAULT_GROUP;
use rayon::prelude::*;

/// Tokens of the first `chars` characters of a text file in the cache.
fn text_tokens(m: &LoadedModel, rel: &str, chars: usize) -> Vec<u32> {
    let p = common::data_file(rel).unwrap();
    let t = std::fs::read_to_string(p).unwrap();
    let end = t.char_indices().nth(chars).map_or(t.len(), |(i, _)| i);
    m.tokenizer.encode(&t[..end]).unwrap()
}

/// Hessians of the four module inputs of layers `0..layers` of the float model on `tokens`
/// (whole sequences of `seq_len`), in the order q/k/v, o, gate/up, down; `capped` as the
/// library builds them (`Hessian::from_rows_capped`).
fn float_hessians(
    w: &Weights,
    tokens: &[u32],
    seq_len: usize,
    layers: usize,
    capped: bool,
) -> Vec<Vec<Hessian>> {
    let c = &w.config;
    let rope = Rope::new(c.rope_theta, c.head_dim(), 0, seq_len);
    let mut x = forward::embed(w, tokens).unwrap();
    let mut out = Vec::new();
    for l in 0..layers {
        let mut hs = Vec::new();
        forward::layer_staged(
            w,
            l,
            &mut x,
            forward::Rows::Sequences { seq_len },
            &rope,
            &mut |kinds, rows| {
                let dim = rows.len() / tokens.len();
                hs.push(if capped {
                    Hessian::from_rows_capped(rows, dim)
                } else {
                    Hessian::from_rows(rows, dim)
                });
                Ok(kinds
                    .iter()
                    .map(|&k| w.module(ModuleId { layer: l, kind: k }).clone())
                    .collect())
            },
        )
        .unwrap();
        out.push(hs);
    }
    out
}

fn input_of(kind: ModuleKind) -> usize {
    match kind {
        ModuleKind::Q | ModuleKind::K | ModuleKind::V => 0,
        ModuleKind::O => 1,
        ModuleKind::Gate | ModuleKind::Up => 2,
        ModuleKind::Down => 3,
    }
}

#[test]
fn gptq_output_error_is_below_rtn_on_real_activations() {
    let Some(path) = common::demo_model_path() else {
        return;
    };
    let m = load(&path).unwrap();
    let w = &m.weights;
    let seq_len = 256;
    let ids = text_tokens(&m, "text/austen-calib.txt", 400_000);
    // As many calibration tokens as the library uses by default (32 x 256).
    let fit_tokens = calib::sample(
        &ids,
        CalibSettings {
            sequences: 32,
            seq_len,
        },
    )
    .unwrap();
    let held = text_tokens(&m, "text/austen-heldout.txt", 40_000);
    let eval_tokens = &held[..4 * seq_len];
    let layers = 2;
    let fit = float_hessians(w, &fit_tokens, seq_len, layers, true);
    let eval = float_hessians(w, eval_tokens, seq_len, layers, false);
    let cfg = GptqConfig::default();
    let mut worst_ratio: f64 = 0.0;
    let (mut held_out_cases, mut held_out_wins) = (0, 0);
    for l in 0..layers {
        let preps: Vec<_> = fit[l]
            .iter()
            .map(|h| prepare(h, &cfg, "fit").unwrap())
            .collect();
        for kind in ModuleKind::ALL {
            let id = ModuleId { layer: l, kind };
            let lin = w.module(id);
            let i = input_of(kind);
            for bits in [3, 4] {
                let g = quantize_gptq(
                    &lin.w,
                    lin.rows,
                    lin.cols,
                    &preps[i],
                    bits,
                    DEFAULT_GROUP,
                    &cfg,
                    "g",
                )
                .unwrap()
                .packed
                .dequantize();
                let r = quantize_rtn(&lin.w, lin.rows, lin.cols, bits, DEFAULT_GROUP, true, "r")
                    .unwrap()
                    .dequantize();
                let (gf, rf) = (
                    fit[l][i].relative_error(&lin.w, &g),
                    fit[l][i].relative_error(&lin.w, &r),
                );
                let (ge, re) = (
                    eval[l][i].relative_error(&lin.w, &g),
                    eval[l][i].relative_error(&lin.w, &r),
                );
                println!("{id} {bits}-bit: calibration gptq {gf:.5} rtn {rf:.5}; held-out gptq {ge:.5} rtn {re:.5}");
                assert!(
                    gf < rf,
                    "{id} {bits}-bit on calibration activations: gptq {gf} >= rtn {rf}"
                );
                // On held-out activations GPTQ can overfit its calibration set (seen on
                // down projections, whose 1536-wide inputs need more calibration tokens than
                // 32 x 256): counted and reported, and it must win in most cases.
                held_out_cases += 1;
                if ge < re {
                    held_out_wins += 1;
                } else {
                    println!(
                        "  held-out: GPTQ overfits {id} at {bits} bits ({ge:.5} vs RTN {re:.5})"
                    );
                }
                worst_ratio = worst_ratio.max(ge / re);
            }
        }
    }
    println!(
        "held-out: GPTQ below RTN in {held_out_wins}/{held_out_cases} cases; worst gptq/rtn error ratio {worst_ratio:.3}"
    );
    assert!(
        held_out_wins * 4 >= held_out_cases * 3,
        "GPTQ beats RTN on held-out activations in only {held_out_wins}/{held_out_cases} cases"
    );
}

/// Every module at `bits` with RTN (clipping search on, as in the library), embedding at base
/// precision: QM(bits) without a library.
fn rtn_model(w: &Weights, bits: u32) -> Weights {
    let mut q = with_base_precision(w, DEFAULT_GROUP).unwrap();
    let ids: Vec<ModuleId> = w.module_ids().collect();
    let lins: Vec<Linear> = ids
        .par_iter()
        .map(|&id| {
            let m = w.module(id);
            let p = quantize_rtn(&m.w, m.rows, m.cols, bits, DEFAULT_GROUP, true, "m").unwrap();
            Linear::new(m.rows, m.cols, p.dequantize())
        })
        .collect();
    for (id, lin) in ids.into_iter().zip(lins) {
        q.set_module(id, lin).unwrap();
    }
    q
}

#[test]
fn eight_bit_is_within_one_percent_and_gptq3_beats_rtn3() {
    let Some(path) = common::demo_model_path() else {
        return;
    };
    let m = load(&path).unwrap();
    let w = &m.weights;
    let held = text_tokens(&m, "text/austen-heldout.txt", 40_000);
    let tokens = &held[..1024];
    let ppl = |w: &Weights| perplexity(w, tokens, 512, 512, |_, _| {}).unwrap().ppl;

    // GPTQ at 3 bits through the library path (default settings, a quarter of the tokens).
    let settings = CalibSettings {
        sequences: 8,
        seq_len: 256,
    };
    let ids = text_tokens(&m, "text/austen-calib.txt", 400_000);
    let calib_tokens = calib::sample(&ids, settings).unwrap();
    let sha = library::model_sha256(&path).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lib");
    let input = BuildInput {
        weights: w,
        model: ModelInfo {
            source: "demo".into(),
            sha256: sha.clone(),
            config: w.config.clone(),
        },
        calib_text: "austen-calib".into(),
        calib_sha256: "-".into(),
        calib_sources: vec![],
        calib_tokens: &calib_tokens,
    };
    let opts = BuildOptions {
        method: Method::Gptq,
        bits: vec![3],
        group: DEFAULT_GROUP,
        calib: settings,
        sequential: false,
        gptq: GptqConfig::default(),
        rtn_clip_search: true,
        nesting: None,
    };
    library::build(&input, &opts, &dir, false, &mut |_, _| {}).unwrap();
    let em = EqmModel::new(Library::open(&dir).unwrap(), w, &sha).unwrap();
    let gptq3 = ppl(&em.weights(&em.uniform(3)).unwrap());
    drop(em);

    let float = ppl(w);
    let rtn8 = ppl(&rtn_model(w, 8));
    let rtn3 = ppl(&rtn_model(w, 3));
    println!("held-out ppl on {} tokens: float {float:.4}, RTN-8 {rtn8:.4}, RTN-3 {rtn3:.3}, GPTQ-3 {gptq3:.3}", tokens.len());
    assert!(
        (rtn8 / float - 1.0).abs() < 0.01,
        "8-bit {rtn8} vs float {float}"
    );
    assert!(
        gptq3 < rtn3,
        "GPTQ-3 {gptq3} is not better than RTN-3 {rtn3}"
    );
}
