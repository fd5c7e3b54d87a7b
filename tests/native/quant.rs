//! The packed format, RTN and GPTQ on synthetic matrices, the staged calibration layer, and the
//! module library + EQM round trip on the tiny model. All fast; the real-model checks are in
//! tests/quant_real.rs.

use crate::common;

use flexquant::ensemble::format::{
    unpack_scale_zero, PackedMatrix, PackedShape, BITS, GROUP_SIZES,
};
use flexquant::model::forward::{self, KvCache};
use flexquant::model::load::load;
use flexquant::model::ops::Rope;
use flexquant::model::weights::Layout;
use flexquant::model::{Linear, ModuleId, ModuleKind};
use flexquant::quant::calib::{self, CalibSettings};
use flexquant::quant::eqm::{base_bytes, Eqm, EqmModel};
use flexquant::quant::gptq::{prepare, quantize_gptq, GptqConfig, Hessian};
use flexquant::quant::library::{self, BuildInput, BuildOptions, Library, Method, ModelInfo};
use flexquant::quant::rtn::quantize_rtn;
use flexquant::runtime::generate::Rng;
use std::path::Path;

pub fn uniform(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.next_f32() * 2.0 - 1.0) * scale)
        .collect()
}

/// Rows with correlated columns (a random mix of a few latent factors), like activations.
pub fn correlated_rows(rng: &mut Rng, t: usize, d: usize) -> Vec<f32> {
    let k = 8;
    let mix = uniform(rng, k * d, 1.0);
    let mut x = vec![0f32; t * d];
    for r in 0..t {
        let z = uniform(rng, k, 1.0);
        let noise = uniform(rng, d, 0.1);
        for c in 0..d {
            x[r * d + c] = (0..k).map(|j| z[j] * mix[j * d + c]).sum::<f32>() + noise[c];
        }
    }
    x
}

const ODD_SHAPES: [(usize, usize); 5] = [(1, 1), (3, 45), (5, 100), (2, 129), (4, 200)];

#[test]
fn pack_unpack_round_trips_every_bit_width_and_odd_shape() {
    let mut rng = Rng::new(1);
    for bits in BITS {
        for group in GROUP_SIZES {
            for (rows, cols) in ODD_SHAPES {
                let shape = PackedShape::new(rows, cols, bits, group).unwrap();
                let codes: Vec<u8> = (0..rows * cols)
                    .map(|_| (rng.next_f32() * (shape.max_code() + 1) as f32) as u8)
                    .map(|c| c.min(shape.max_code() as u8))
                    .collect();
                let params: Vec<(f32, f32)> = (0..shape.scale_words())
                    .map(|_| (rng.next_f32() * 0.1, rng.next_f32() - 0.5))
                    .collect();
                let p = PackedMatrix::from_codes(shape, &codes, &params);
                assert_eq!(p.codes.len() * 4 + p.scales.len() * 4, shape.bytes());
                assert_eq!(
                    shape.words_per_row() * 32,
                    shape.groups_per_row() * group * bits as usize
                );
                let deq = p.dequantize();
                assert_eq!(deq, p.dequantize_par());
                for r in 0..rows {
                    for c in 0..cols {
                        assert_eq!(
                            p.code(r, c),
                            codes[r * cols + c] as u32,
                            "{bits}b g{group} {rows}x{cols}"
                        );
                        let (s, z) =
                            unpack_scale_zero(p.scales[r * shape.groups_per_row() + c / group]);
                        assert_eq!(deq[r * cols + c], s * codes[r * cols + c] as f32 + z);
                    }
                }
                let back = PackedMatrix::from_bytes(shape, &p.to_bytes(), "test").unwrap();
                assert_eq!(back, p);
                let short = &p.to_bytes()[..shape.bytes() - 4];
                let e = PackedMatrix::from_bytes(shape, short, "short.bin").unwrap_err();
                assert!(e.to_string().contains("short.bin"), "{e}");
            }
        }
    }
}

#[test]
fn rtn_handles_extreme_values_and_equal_groups() {
    let cols = 96;
    for bits in BITS {
        // Row 0: all equal (zero range); row 1: all zero; row 2: extremes of f16; row 3: tiny.
        let mut w = vec![0f32; 4 * cols];
        w[..cols].fill(-7.3);
        for (i, v) in w[2 * cols..3 * cols].iter_mut().enumerate() {
            *v = if i % 2 == 0 { 65504.0 } else { -65504.0 };
        }
        for (i, v) in w[3 * cols..].iter_mut().enumerate() {
            *v = 1e-6 * i as f32;
        }
        let p = quantize_rtn(&w, 4, cols, bits, 32, true, "extreme").unwrap();
        let d = p.dequantize();
        assert!(d.iter().all(|v| v.is_finite()));
        for c in 0..cols {
            assert!(
                (d[c] + 7.3).abs() <= 7.3 * 1e-3,
                "equal group {bits}b: {}",
                d[c]
            );
            assert_eq!(d[cols + c], 0.0);
            assert!(
                (d[2 * cols + c] - w[2 * cols + c]).abs() <= 65504.0 * 1e-3,
                "extreme {bits}b"
            );
            assert!(
                (d[3 * cols + c] - w[3 * cols + c]).abs() <= 1e-6 * 32.0,
                "tiny {bits}b"
            );
        }
    }
}

#[test]
fn non_finite_or_out_of_range_weights_are_a_clear_error() {
    let mut rng = Rng::new(2);
    let x = correlated_rows(&mut rng, 64, 32);
    let h = Hessian::from_rows(&x, 32);
    let prep = prepare(&h, &GptqConfig::default(), "h").unwrap();
    for (bad, word) in [
        (f32::NAN, "non-finite"),
        (f32::INFINITY, "non-finite"),
        (f32::NEG_INFINITY, "non-finite"),
        (1e6, "f16 range"),
    ] {
        let mut w = uniform(&mut rng, 4 * 32, 1.0);
        w[37] = bad;
        let e = quantize_rtn(&w, 4, 32, 4, 32, false, "L0.q")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("L0.q") && e.contains(word) && e.contains("37"),
            "{e}"
        );
        let cfg = GptqConfig::default();
        let e = quantize_gptq(&w, 4, 32, &prep, 4, 32, &cfg, "L0.q")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("L0.q") && e.contains(word), "{e}");
    }
    let mut hn = h.clone();
    hn.sum[5] = f32::NAN;
    assert!(prepare(&hn, &GptqConfig::default(), "L3 input")
        .err()
        .unwrap()
        .to_string()
        .contains("L3 input"));
}

#[test]
fn quantization_error_falls_as_bits_rise() {
    let mut rng = Rng::new(3);
    let (rows, cols) = (48, 200);
    let w = uniform(&mut rng, rows * cols, 0.05);
    let x = correlated_rows(&mut rng, 512, cols);
    let h = Hessian::from_rows(&x, cols);
    for act_order in [false, true] {
        let cfg = GptqConfig {
            act_order,
            ..Default::default()
        };
        let prep = prepare(&h, &cfg, "h").unwrap();
        let (mut last_rtn, mut last_gptq) = (f64::MAX, f64::MAX);
        for bits in [2, 3, 4, 5, 6, 8] {
            let r = quantize_rtn(&w, rows, cols, bits, 64, false, "w").unwrap();
            let g = quantize_gptq(&w, rows, cols, &prep, bits, 64, &cfg, "w").unwrap();
            let er = h.relative_error(&w, &r.dequantize());
            let eg = h.relative_error(&w, &g.packed.dequantize());
            assert!(
                er < last_rtn && eg < last_gptq,
                "{bits} bits: rtn {er} gptq {eg}"
            );
            assert!(
                eg < er,
                "{bits} bits (act_order {act_order}): gptq {eg} >= rtn {er}"
            );
            // GPTQ's own error bookkeeping equals the error computed from scratch.
            let explicit = h.output_energy(&diff(&w, &g.packed.dequantize()));
            assert!(
                (g.output_error - explicit).abs() <= 1e-3 * explicit + 1e-9,
                "{bits}: {} vs {explicit}",
                g.output_error
            );
            (last_rtn, last_gptq) = (er, eg);
        }
    }
}

fn diff(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

#[test]
fn gptq_with_uncorrelated_inputs_is_rtn() {
    // A diagonal Hessian leaves nothing to compensate: GPTQ must pick RTN's codes exactly,
    // in any column order, which checks that its group parameters and codes are consistent.
    let mut rng = Rng::new(4);
    let (rows, cols) = (16, 100);
    let w = uniform(&mut rng, rows * cols, 1.0);
    let mut h = Hessian::new(cols);
    for c in 0..cols {
        let mut x = vec![0f32; cols];
        x[c] = 1.0 + (c % 7) as f32;
        h.add(&x);
    }
    for (act_order, clip_search) in [(false, false), (true, false), (true, true)] {
        let cfg = GptqConfig {
            act_order,
            clip_search,
            ..Default::default()
        };
        let prep = prepare(&h, &cfg, "diag").unwrap();
        for bits in BITS {
            for group in GROUP_SIZES {
                let g = quantize_gptq(&w, rows, cols, &prep, bits, group, &cfg, "w").unwrap();
                let r = quantize_rtn(&w, rows, cols, bits, group, clip_search, "w").unwrap();
                assert_eq!(
                    g.packed, r,
                    "{bits}b g{group} act_order {act_order} clip {clip_search}"
                );
            }
        }
    }
}

#[test]
fn gptq_zeroes_dead_inputs() {
    let mut rng = Rng::new(5);
    let (rows, cols) = (8, 64);
    let mut x = correlated_rows(&mut rng, 128, cols);
    for r in 0..128 {
        x[r * cols + 10] = 0.0;
    }
    let h = Hessian::from_rows(&x, cols);
    let prep = prepare(&h, &GptqConfig::default(), "h").unwrap();
    assert_eq!(prep.dead_columns, 1);
    let w = uniform(&mut rng, rows * cols, 1.0);
    let q = quantize_gptq(&w, rows, cols, &prep, 4, 32, &GptqConfig::default(), "w").unwrap();
    let d = q.packed.dequantize();
    for r in 0..rows {
        assert!(
            d[r * cols + 10].abs() < 0.2,
            "dead column kept {}",
            d[r * cols + 10]
        );
    }
}

#[test]
fn calibration_windows_are_evenly_spaced_and_checked() {
    let ids: Vec<u32> = (0..1000).collect();
    let s = calib::sample(
        &ids,
        CalibSettings {
            sequences: 3,
            seq_len: 100,
        },
    )
    .unwrap();
    assert_eq!(&s[..2], &[0, 1]);
    assert_eq!(s[100], 450);
    assert_eq!(*s.last().unwrap(), 999);
    let e = calib::sample(
        &ids,
        CalibSettings {
            sequences: 20,
            seq_len: 100,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("1000 tokens"), "{e}");
    // Windows between those (one fewer) share no token with them, one window sits mid-text,
    // and a mix's sample between keeps each source's share.
    for (sequences, seq_len) in [(3, 100), (1, 100), (5, 40)] {
        let cs = CalibSettings { sequences, seq_len };
        let a = calib::sample(&ids, cs).unwrap();
        let b = calib::sample_between(&ids, cs).unwrap();
        assert_eq!(b.len(), sequences.max(2).saturating_sub(1) * seq_len);
        assert!(b.iter().all(|t| !a.contains(t)), "{sequences} x {seq_len}");
    }
    let one = CalibSettings {
        sequences: 1,
        seq_len: 100,
    };
    assert_eq!(calib::sample_between(&ids, one).unwrap()[0], 450);
    let other: Vec<u32> = (5000..5600).collect();
    let cs = CalibSettings {
        sequences: 2,
        seq_len: 50,
    };
    let mix = calib::sample_mix_between(&[(&ids, 0.5), (&other, 0.5)], cs).unwrap();
    assert_eq!(
        mix[..50],
        calib::sample_between(&ids, one_of(50)).unwrap()[..]
    );
    assert_eq!(
        mix[50..],
        calib::sample_between(&other, one_of(50)).unwrap()[..]
    );
}

fn one_of(seq_len: usize) -> CalibSettings {
    CalibSettings {
        sequences: 1,
        seq_len,
    }
}

#[test]
fn staged_layer_with_float_modules_equals_the_forward() {
    let dir = common::tiny_model_dir();
    let w = load(dir.path()).unwrap().weights;
    let c = &w.config;
    let (seq_len, seqs) = (24, 3);
    let tokens: Vec<u32> = (0..seq_len * seqs).map(|i| (i * 37 % 250) as u32).collect();
    let mut staged = forward::embed(&w, &tokens).unwrap();
    let rope = Rope::new(c.rope_theta, c.head_dim(), 0, seq_len);
    let mut seen = Vec::new();
    for l in 0..c.num_hidden_layers {
        forward::layer_staged(
            &w,
            l,
            &mut staged,
            forward::Rows::Sequences { seq_len },
            &rope,
            &mut |kinds, x| {
                seen.push((kinds.to_vec(), x.len()));
                Ok(kinds
                    .iter()
                    .map(|&k| w.module(ModuleId { layer: l, kind: k }).clone())
                    .collect())
            },
        )
        .unwrap();
    }
    assert_eq!(seen.len(), 4 * c.num_hidden_layers);
    assert_eq!(seen[3].0, vec![ModuleKind::Down]);
    assert_eq!(seen[3].1, seq_len * seqs * c.intermediate_size);
    for s in 0..seqs {
        let toks = &tokens[s * seq_len..(s + 1) * seq_len];
        let mut x = forward::embed(&w, toks).unwrap();
        let mut cache = KvCache::new(&w, seq_len);
        for l in 0..c.num_hidden_layers {
            forward::layer(&w, l, &mut x, 0, &mut cache, &rope);
        }
        let got = &staged[s * seq_len * c.hidden_size..(s + 1) * seq_len * c.hidden_size];
        let d = common::max_abs_diff(&x, got);
        assert!(d < 1e-4, "sequence {s}: {d}");
    }
}

/// Builds a library of the tiny model into `out`.
pub fn build_tiny(
    model_dir: &Path,
    method: Method,
    group: usize,
    out: &Path,
) -> flexquant::Result<library::Manifest> {
    build_tiny_nested(model_dir, method, group, None, out)
}

pub fn build_tiny_nested(
    model_dir: &Path,
    method: Method,
    group: usize,
    nesting: Option<flexquant::quant::nested::Nesting>,
    out: &Path,
) -> flexquant::Result<library::Manifest> {
    let m = load(model_dir)?;
    let settings = CalibSettings {
        sequences: 3,
        seq_len: 32,
    };
    let ids: Vec<u32> = (0..400).map(|i| (i * 7919 % 256) as u32).collect();
    let tokens = calib::sample(&ids, settings)?;
    let input = BuildInput {
        weights: &m.weights,
        model: ModelInfo {
            source: "tiny".into(),
            sha256: library::model_sha256(model_dir)?,
            config: m.weights.config.clone(),
        },
        calib_text: "synthetic".into(),
        calib_sha256: "-".into(),
        calib_sources: vec![],
        calib_tokens: &tokens,
    };
    let opts = BuildOptions {
        method,
        bits: BITS.to_vec(),
        group,
        calib: settings,
        sequential: true,
        gptq: GptqConfig::default(),
        rtn_clip_search: false,
        nesting,
    };
    library::build(&input, &opts, out, false, &mut |_, _| {})
}

#[test]
fn library_round_trip_and_eqms_on_the_tiny_model() {
    let model = common::tiny_model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let w = load(model.path()).unwrap().weights;
    let sha = library::model_sha256(model.path()).unwrap();
    for (method, group) in [(Method::Rtn, 32), (Method::Gptq, 64)] {
        let out = tmp.path().join(format!("lib-{}", method.name()));
        let m = build_tiny(model.path(), method, group, &out).unwrap();
        assert_eq!(m.modules.len(), 14);
        assert_eq!(m.calibration.sequential, method == Method::Gptq);
        // Nothing but the finished directory is left behind.
        let names: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
        let lib = Library::open(&out).unwrap();
        // (f64 error figures may differ in the last digit after the JSON round trip.)
        let files = |m: &library::Manifest| -> Vec<(String, usize)> {
            m.modules
                .iter()
                .flat_map(|e| e.versions.iter().map(|v| (v.file.clone(), v.bytes)))
                .collect()
        };
        assert_eq!(
            (lib.manifest.method, lib.manifest.group),
            (m.method, m.group)
        );
        assert_eq!(files(&lib.manifest), files(&m));
        for e in &m.modules {
            let errs: Vec<f64> = e.versions.iter().map(|v| v.rel_output_error).collect();
            assert!(
                errs.windows(2).all(|p| p[0] < p[1]),
                "{}.{:?}: {errs:?}",
                e.layer,
                e.kind
            );
        }
        // A mixed EQM: every module pulled from its version, base at 8 bits.
        let model_q = EqmModel::new(lib.clone(), &w, &sha).unwrap();
        let mut eqm = Eqm::uniform(14, 8);
        for i in 0..14 {
            eqm.bits[i] = BITS[i % BITS.len()];
        }
        let wq = model_q.weights(&eqm).unwrap();
        let mut want_bytes = base_bytes(&w.config, group);
        for id in eqm.module_ids() {
            let p = lib.load(id, eqm.get(id)).unwrap();
            let got = wq.module(id).in_layout(Layout::Rows);
            assert!(*got.w == p.dequantize()[..], "{id}");
            want_bytes += p.shape.bytes();
        }
        assert_eq!(model_q.footprint(&eqm).unwrap(), want_bytes);
        assert!(common::max_abs_diff(&wq.embed, &w.embed) < 0.01);
        // The same EQM again comes from the cache, identical.
        let again = model_q.weights(&eqm).unwrap();
        assert!(std::sync::Arc::ptr_eq(
            &again.module(ModuleId::from_index(3)).w,
            &wq.module(ModuleId::from_index(3)).w
        ));
        // The forward runs on it.
        let mut cache = KvCache::new(&wq, 16);
        let lg = forward::forward_last(&wq, &[5, 6, 7], &mut cache).unwrap();
        assert!(lg.iter().all(|v| v.is_finite()));
        // Building again needs --force.
        let e = build_tiny(model.path(), method, group, &out).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
    }
}

#[test]
fn library_readers_reject_damage_with_clear_errors() {
    let model = common::tiny_model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lib");
    build_tiny(model.path(), Method::Rtn, 32, &out).unwrap();
    let w = load(model.path()).unwrap().weights;

    // Wrong model.
    let e = EqmModel::new(Library::open(&out).unwrap(), &w, "0000")
        .err()
        .unwrap();
    assert!(e.to_string().contains("not this model"), "{e}");

    // A truncated module file.
    let f = out.join("modules/L1.up.b3.bin");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 1]).unwrap();
    let e = Library::open(&out).unwrap_err().to_string();
    assert!(e.contains("L1.up.b3.bin") && e.contains("expected"), "{e}");
    std::fs::write(&f, &bytes).unwrap();

    // A manifest pointing outside the library, or missing a version.
    let json = std::fs::read_to_string(out.join("library.json")).unwrap();
    for (from, to) in [
        ("modules/L0.q.b8.bin", "../../etc/passwd"),
        ("\"bits\": 2,", "\"bits\": 7,"),
    ] {
        std::fs::write(out.join("library.json"), json.replacen(from, to, 1)).unwrap();
        let e = Library::open(&out).unwrap_err().to_string();
        assert!(e.contains("library.json"), "{e}");
    }
    std::fs::write(out.join("library.json"), "{").unwrap();
    assert!(Library::open(&out)
        .unwrap_err()
        .to_string()
        .contains("library.json"));
    std::fs::remove_file(out.join("library.json")).unwrap();
    assert!(Library::open(&out)
        .unwrap_err()
        .to_string()
        .contains("library.json"));
}

#[test]
fn a_failed_build_leaves_no_library_behind() {
    let model = common::tiny_model_dir();
    // Poison a module of the last layer: the build fails after writing many files.
    let mut m = load(model.path()).unwrap();
    let id = ModuleId {
        layer: 1,
        kind: ModuleKind::Down,
    };
    let lin = m.weights.module(id).clone();
    let mut v = lin.w.to_vec();
    v[3] = f32::NAN;
    m.weights
        .set_module(id, Linear::new(lin.rows, lin.cols, v))
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lib");
    let settings = CalibSettings {
        sequences: 2,
        seq_len: 16,
    };
    let tokens: Vec<u32> = (0..32).collect();
    let input = BuildInput {
        weights: &m.weights,
        model: ModelInfo {
            source: "tiny".into(),
            sha256: "x".into(),
            config: m.weights.config.clone(),
        },
        calib_text: "-".into(),
        calib_sha256: "-".into(),
        calib_sources: vec![],
        calib_tokens: &tokens,
    };
    let opts = BuildOptions {
        method: Method::Gptq,
        bits: vec![4],
        group: 32,
        calib: settings,
        sequential: true,
        gptq: GptqConfig::default(),
        rtn_clip_search: false,
        nesting: None,
    };
    let e = library::build(&input, &opts, &out, false, &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("L1.down"), "{e}");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "left files behind"
    );
}

#[test]
fn static_report_writes_json_markdown_svg_and_png() {
    use flexquant::quant::static_table::{
        markdown, write_report, StaticReport, StaticRow, TextInfo,
    };
    let row =
        |bits: Option<u32>, method: &str, group: Option<usize>, mb: f64, ppl: f64| StaticRow {
            bits,
            method: method.into(),
            group,
            bytes: (mb * 1e6) as usize,
            heldout_ppl: ppl,
            // A second domain that loses twice as much.
            heldout_by_domain: [("austen", ppl), ("brown", 2.0 * ppl * ppl / 22.4)]
                .into_iter()
                .map(|(d, p)| (d.to_string(), p))
                .collect(),
            calib_ppl: ppl * 1.1,
            top1_agreement: 22.0 / ppl,
            eval_seconds: 1.0,
        };
    let r = StaticReport {
        model: "demo".into(),
        ctx: 512,
        heldout: TextInfo {
            name: "austen-heldout.txt".into(),
            tokens: 4096,
        },
        domains: ["austen-heldout.txt", "brown-heldout.txt"]
            .iter()
            .map(|n| TextInfo {
                name: n.to_string(),
                tokens: 4096,
            })
            .collect(),
        calib: TextInfo {
            name: "calib.txt".into(),
            tokens: 512,
        },
        base: "8-bit embedding".into(),
        rows: vec![
            row(None, "float", None, 269.0, 22.4),
            row(Some(4), "rtn", Some(64), 89.9, 28.6),
            row(Some(3), "rtn", Some(64), 76.7, 136.8),
            row(Some(2), "rtn", Some(64), 63.4, 178771.0),
            row(Some(4), "gptq", Some(64), 89.9, 24.0),
            row(Some(3), "gptq", Some(64), 76.7, 40.0),
            row(Some(2), "gptq", Some(64), 63.4, 900.0),
            row(Some(4), "gptq-nested-truncate", Some(64), 89.9, 24.0),
            row(Some(3), "gptq-nested-truncate", Some(64), 76.7, 44.0),
        ],
        single_swap: None,
    };
    let dir = match std::env::var_os("FLEXQUANT_TEST_OUT") {
        Some(d) => std::path::PathBuf::from(d),
        None => tempfile::tempdir().unwrap().keep(),
    };
    let files = write_report(&r, &dir).unwrap();
    assert_eq!(files.len(), 6, "{files:?}");
    let domains = std::fs::read_to_string(dir.join("static-domains.svg")).unwrap();
    assert!(
        domains.contains("GPTQ brown") && domains.contains("RTN austen"),
        "legend missing"
    );
    let png = std::fs::read(dir.join("static.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let svg = std::fs::read_to_string(dir.join("static.svg")).unwrap();
    assert!(
        svg.contains("GPTQ g64") && svg.contains("float"),
        "legend missing"
    );
    let md = markdown(&r);
    assert!(
        md.contains("| 3 | gptq | 64 | 76.70 | 40.000 | 44.000 |"),
        "{md}"
    );
    // Per domain, with the loss against the float model: 40 / 22.4 = +78.6% on austen,
    // 2 * 40 * 40 / 22.4 / 44.8 = +218.9% on brown.
    assert!(
        md.contains("| 3 | gptq | 40.000 (+78.6%) | 142.857 (+218.9%) |"),
        "{md}"
    );
    // Nested beside independent, per bit-width, with the agreement: 22 / 44 = 50%.
    assert!(
        md.contains("| 3 | 40.000 (55.0%) | 44.000 (50.0%) |")
            && md.contains("| 2 | 900.000 (2.4%) | - |"),
        "{md}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("static.json")).unwrap()).unwrap();
    assert_eq!(json["rows"][0]["bits"], serde_json::Value::Null);
    if std::env::var_os("FLEXQUANT_TEST_OUT").is_none() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn capped_hessian_tames_outlier_rows() {
    let mut rng = Rng::new(6);
    let d = 16;
    let mut x = uniform(&mut rng, 64 * d, 1.0);
    let plain = Hessian::from_rows(&x, d);
    assert_eq!(
        Hessian::from_rows_capped(&x, d).sum,
        plain.sum,
        "no outliers: unchanged"
    );
    // One attention-sink-like row, 1000x the others: capped, it counts as ROW_ENERGY_CAP
    // median rows at most instead of dominating the Hessian.
    for v in &mut x[5 * d..6 * d] {
        *v *= 1000.0;
    }
    let capped = Hessian::from_rows_capped(&x, d);
    let energy = |x: &[f32]| x.iter().map(|v| v * v).sum::<f32>();
    let mut med: Vec<f32> = x.chunks(d).map(energy).collect();
    med.sort_by(f32::total_cmp);
    let trace: f32 = (0..d).map(|i| capped.sum[i * d + i]).sum();
    let rest: f32 = x
        .chunks(d)
        .enumerate()
        .filter(|(i, _)| *i != 5)
        .map(|(_, r)| energy(r))
        .sum();
    let cap = flexquant::quant::gptq::ROW_ENERGY_CAP * med[32];
    assert!(
        (trace - (rest + cap)).abs() < 1e-3 * trace,
        "{trace} vs {}",
        rest + cap
    );
}

#[test]
fn scores_and_prefix_cached_perplexity_equal_the_plain_evaluation() {
    use flexquant::model::eval::perplexity;
    use flexquant::quant::evaluate::{score, single_swap, PrefixEval};
    let model = common::tiny_model_dir();
    let w = load(model.path()).unwrap().weights;
    let tokens: Vec<u32> = (0..50).map(|i| (i * 31 % 250) as u32).collect();
    let ctx = 16;
    let want = perplexity(&w, &tokens, ctx, ctx, |_, _| {}).unwrap().ppl;
    let s = score(&w, &tokens, ctx).unwrap();
    assert!(
        (s.ppl() - want).abs() < 1e-9 * want,
        "{} vs {want}",
        s.ppl()
    );
    assert_eq!(s.agreement(&s), 1.0);
    // Every window at once, the float model.
    let mut prefix = PrefixEval::new(&tokens, ctx, 0).unwrap();
    let got = prefix.ppl_of(&w).unwrap();
    assert!((got - want).abs() < 1e-6 * want, "{got} vs {want}");
    // Windows longer than the model's context are an input error naming the window.
    let long: Vec<u32> = (0..600).map(|i| (i * 31 % 250) as u32).collect();
    let e = PrefixEval::new(&long, 600, 0)
        .unwrap()
        .ppl_of(&w)
        .unwrap_err();
    assert!(e.to_string().contains("--ctx 600"), "{e}");

    // The single-swap check over a tiny library: one entry per module, deltas vs QM(8).
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lib");
    build_tiny(model.path(), Method::Gptq, 32, &out).unwrap();
    let sha = library::model_sha256(model.path()).unwrap();
    let em = EqmModel::new(Library::open(&out).unwrap(), &w, &sha).unwrap();
    let sw = single_swap(&em, 8, 3, &tokens, ctx, &mut |_, _| {}).unwrap();
    assert_eq!(sw.entries.len(), 14);
    let base = perplexity(
        &em.weights(&em.uniform(8)).unwrap(),
        &tokens,
        ctx,
        ctx,
        |_, _| {},
    )
    .unwrap()
    .ppl;
    assert!((sw.base_ppl - base).abs() < 1e-6 * base);
    let mut e = em.uniform(8);
    e.set(ModuleId::from_index(9), 3);
    let p9 = perplexity(&em.weights(&e).unwrap(), &tokens, ctx, ctx, |_, _| {})
        .unwrap()
        .ppl;
    assert!(
        (sw.entries[9].ppl - p9).abs() < 1e-4 * p9,
        "{} vs {p9}",
        sw.entries[9].ppl
    );
    assert!(sw.delta_min <= sw.delta_median && sw.delta_median <= sw.delta_max);

    // Prefix caching: a model changed in layer 1 only, run from layer 1 on, equals the plain
    // evaluation (50 tokens in windows of 16: the last window is 2 tokens long).
    let mut prefix = PrefixEval::new(&tokens, ctx, 2).unwrap();
    let base8 = prefix.ppl(&em, &em.uniform(8)).unwrap();
    assert!((base8 - base).abs() < 1e-6 * base);
    let mut e = em.uniform(8);
    e.set(ModuleId::from_index(7 + 5), 2);
    let want2 = perplexity(&em.weights(&e).unwrap(), &tokens, ctx, ctx, |_, _| {})
        .unwrap()
        .ppl;
    let got2 = prefix.ppl(&em, &e).unwrap();
    assert!((got2 - want2).abs() < 1e-6 * want2, "{got2} vs {want2}");
    assert!((want2 - base).abs() > 1e-3, "the change should matter");
    let layers = 2.0;
    assert!(
        (prefix.forward_equivalents - (1.0 + 1.0 / layers)).abs() < 1e-9,
        "layer 0 was not reused: {} forwards",
        prefix.forward_equivalents
    );
}

/// Scores against the float model (`CalibScore::Float`): each position's cross-entropy
/// against the float model's next-token distribution, checked against a plain f64 softmax of
/// both models' logits, window by window; the float model scores its own entropy and every
/// quantized EQM at least that (KL >= 0); prefix caching gives the same scores.
#[test]
fn scores_against_the_float_model_are_cross_entropies() {
    use flexquant::quant::evaluate::PrefixEval;
    let model = common::tiny_model_dir();
    let w = load(model.path()).unwrap().weights;
    let tokens: Vec<u32> = (0..50).map(|i| (i * 37 % 250) as u32).collect();
    let ctx = 16;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lib");
    build_tiny(model.path(), Method::Gptq, 32, &out).unwrap();
    let sha = library::model_sha256(model.path()).unwrap();
    let em = EqmModel::new(Library::open(&out).unwrap(), &w, &sha).unwrap();
    let mut eqm = em.uniform(4);
    eqm.set(ModuleId::from_index(9), 2);
    let wq = em.weights(&eqm).unwrap();

    // Independently: both models' logits window by window, softmax in f64.
    let vocab = w.config.vocab_size;
    let logits = |w: &flexquant::model::Weights, win: &[u32]| {
        let mut cache = KvCache::new(w, ctx);
        let x = forward::hidden(w, win, &mut cache).unwrap();
        forward::logits(w, &x)
    };
    let log_softmax = |row: &[f32]| {
        let m = row.iter().fold(f64::MIN, |a, &b| a.max(b as f64));
        let lse = m + row.iter().map(|&z| (z as f64 - m).exp()).sum::<f64>().ln();
        row.iter().map(|&z| z as f64 - lse).collect::<Vec<f64>>()
    };
    let (mut ce_float, mut ce_q, mut n) = (0.0, 0.0, 0);
    for win in tokens.chunks(ctx) {
        let (lf, lq) = (logits(&w, win), logits(&wq, win));
        for r in 0..win.len() - 1 {
            let pf = log_softmax(&lf[r * vocab..(r + 1) * vocab]);
            let pq = log_softmax(&lq[r * vocab..(r + 1) * vocab]);
            ce_float -= pf.iter().map(|&l| l.exp() * l).sum::<f64>();
            ce_q -= pf
                .iter()
                .zip(&pq)
                .map(|(&l, &lq)| l.exp() * lq)
                .sum::<f64>();
            n += 1;
        }
    }
    let (want_float, want_q) = ((ce_float / n as f64).exp(), (ce_q / n as f64).exp());
    assert!(want_q > want_float, "KL >= 0: {want_q} vs {want_float}");

    let mut prefix = PrefixEval::new(&tokens, ctx, 4).unwrap();
    prefix.score_against(&w).unwrap();
    let got_float = prefix.ppl_of(&w).unwrap();
    assert!(
        (got_float - want_float).abs() < 1e-5 * want_float,
        "{got_float} vs {want_float}"
    );
    let top = prefix.ppl(&em, &em.uniform(4)).unwrap();
    let got_q = prefix.ppl(&em, &eqm).unwrap();
    assert!(
        (got_q - want_q).abs() < 1e-5 * want_q,
        "{got_q} vs {want_q}"
    );
    assert!(
        top >= got_float && got_q >= got_float,
        "{top} {got_q} {got_float}"
    );
    // Not the text's perplexity.
    let text = PrefixEval::new(&tokens, ctx, 0)
        .unwrap()
        .ppl_of(&wq)
        .unwrap();
    assert!((text - got_q).abs() > 1e-3 * text, "{text} vs {got_q}");
}

/// `--calib SOURCE[:WEIGHT],...`: parsing, windows shared by weight, sources sampled in order.
#[test]
fn calibration_mixes_share_windows_by_weight() {
    use flexquant::quant::calib::{allot, parse_mix, sample_mix, CalibSettings, MixEntry};
    let m = parse_mix("a.txt:0.4, /x/b:c.txt:0.4,chat:0.2").unwrap();
    let want = |s: &str, w| MixEntry {
        source: s.into(),
        weight: w,
    };
    assert_eq!(
        m,
        [
            want("a.txt", 0.4),
            want("/x/b:c.txt", 0.4),
            want("chat", 0.2)
        ]
    );
    // A colon not followed by a number belongs to the path; no weight means 1.
    assert_eq!(parse_mix("d:/t.txt").unwrap(), [want("d:/t.txt", 1.0)]);
    for (bad, msg) in [
        ("a.txt:0", "weights must be positive"),
        ("a.txt:-1", "weights must be positive"),
        ("a.txt:inf", "weights must be positive"),
        ("a.txt,a.txt", "listed twice"),
        ("a.txt,", "an empty source"),
    ] {
        let e = parse_mix(bad).unwrap_err().to_string();
        assert!(e.contains(msg), "{bad}: {e}");
    }
    assert_eq!(allot(&[0.4, 0.4, 0.2], 32).unwrap(), [13, 13, 6]);
    assert_eq!(allot(&[1.0], 32).unwrap(), [32]);
    assert_eq!(allot(&[1.0, 1.0, 1.0], 4).unwrap(), [2, 1, 1]);
    // Every source at least one window, the total kept.
    assert_eq!(allot(&[100.0, 1.0], 8).unwrap(), [7, 1]);
    assert!(allot(&[1.0, 1.0], 1).is_err());
    let a: Vec<u32> = (0..1000).collect();
    let b: Vec<u32> = (5000..5400).collect();
    let s = CalibSettings {
        sequences: 4,
        seq_len: 10,
    };
    let t = sample_mix(&[(&a, 3.0), (&b, 1.0)], s).unwrap();
    assert_eq!(t.len(), 40);
    // Three windows spread over `a`, then one from `b`.
    assert_eq!(&t[..10], &a[..10]);
    assert_eq!((t[10], t[20]), (495, 990));
    assert_eq!(&t[30..], &b[..10]);
    // A source too short for its windows names itself by its token count.
    let e = sample_mix(&[(&a[..15], 1.0), (&b, 1.0)], s)
        .unwrap_err()
        .to_string();
    assert!(e.contains("has 15 tokens"), "{e}");
}
