//! The whole builder on the demo model (real weights, real text), at a small budget so it fits
//! CI: an RTN library at 4/3/2 bits, search + pruning + packaging, then the packaged files are
//! checked against what the search held in memory.

use crate::common;

use flexquant::build::package::{load_step_weights, read_manifest, read_verified};
use flexquant::build::pipeline::{build_ensemble, BuildSettings, Inputs};
use flexquant::ensemble::manifest::Manifest;
use flexquant::model::forward::{forward_all, KvCache};
use flexquant::model::load::load;
use flexquant::quant::calib::{self, CalibSettings};
use flexquant::quant::eqm::{Eqm, EqmModel};
use flexquant::quant::gptq::GptqConfig;
use flexquant::quant::library::{self, BuildInput, BuildOptions, Library, Method, ModelInfo};

#[test]
fn demo_model_ensemble_is_one_way_monotone_and_reloads_exactly() {
    let (Some(model), Some(calib_path), Some(heldout), Some(brown)) = (
        common::demo_model_path(),
        common::data_file("text/austen-calib.txt"),
        common::heldout_text(),
        common::data_file("text/brown-heldout.txt"),
    ) else {
        return;
    };
    let m = load(&model).unwrap();
    let calib_text = std::fs::read_to_string(&calib_path).unwrap();
    let calib_all = m.tokenizer.encode(&calib_text[..400_000]).unwrap();
    let seq_len = 128;
    let calib_ids = calib::sample(
        &calib_all,
        CalibSettings {
            sequences: 2,
            seq_len,
        },
    )
    .unwrap();
    let heldout_ids = m.tokenizer.encode(&heldout[..20_000]).unwrap();
    let brown_text = std::fs::read_to_string(&brown).unwrap();
    let brown_ids = m.tokenizer.encode(&brown_text[..20_000]).unwrap();
    let domains = [
        ("austen".to_string(), heldout_ids.clone()),
        ("brown".to_string(), brown_ids),
    ];
    let dir = tempfile::tempdir().unwrap();

    let sha = library::model_sha256(&model).unwrap();
    let input = BuildInput {
        weights: &m.weights,
        model: ModelInfo {
            source: model.display().to_string(),
            sha256: sha.clone(),
            config: m.weights.config.clone(),
        },
        calib_text: calib_path.display().to_string(),
        calib_sha256: "0".repeat(64),
        calib_sources: vec![],
        calib_tokens: &calib_ids,
    };
    let opts = BuildOptions {
        method: Method::Rtn,
        bits: vec![4, 3, 2],
        group: 64,
        calib: CalibSettings {
            sequences: 2,
            seq_len,
        },
        sequential: false,
        gptq: GptqConfig::default(),
        rtn_clip_search: false,
        nesting: None,
    };
    let lib_dir = dir.path().join("library");
    library::build(&input, &opts, &lib_dir, false, &mut |_, _| {}).unwrap();
    let em = EqmModel::new(Library::open(&lib_dir).unwrap(), &m.weights, &sha).unwrap();

    let settings = BuildSettings {
        n_up: 4,
        n_low: 2,
        branch: 1,
        stem: 1,
        staged: true,
        lazy: false,
        slope: Default::default(),
        floor_damage: false,
        ties: Default::default(),
        calib_score: Default::default(),
        ablation_branch: 1,
        prune: 0.25,
        ablation: vec![],
        calib_tokens: 2 * seq_len,
        seq_len,
        heldout_tokens: 256,
        heldout_every: 1000,
        sensitivity_tokens: 0,
        sensitivity_between: false,
        correlation_samples: 0,
        pack_bytes: flexquant::ensemble::pack::mb_to_bytes(
            flexquant::ensemble::pack::DEFAULT_PACK_MB,
        )
        .unwrap(),
    };
    let out = dir.path().join("ensemble");
    let inputs = Inputs {
        model: &m,
        eqm: &em,
        calib_ids: &calib_ids,
        calib_sources: &[],
        heldout: &domains,
        sensitivity_ids: None,
        name: "demo-test".into(),
    };
    let rec = build_ensemble(&inputs, &settings, &out, &mut |_, _, _, _| {}).unwrap();

    // The manifest on disk is valid, round-trips through its JSON, and every file's hash holds.
    let man = read_manifest(&out).unwrap();
    assert_eq!(
        Manifest::from_bytes("again", man.to_json().as_bytes()).unwrap(),
        man
    );
    for f in man.modules.iter().map(|v| &v.file).chain([&man.base]) {
        read_verified(&out, f).unwrap();
    }

    // One-way and monotone from QM(4) to QM(2), one module per step.
    let n = em.modules();
    assert_eq!(man.bits_at(0), Eqm::uniform(n, 4).bits);
    let last = man.trajectory.len() - 1;
    assert_eq!(man.bits_at(last), Eqm::uniform(n, 2).bits);
    for s in 1..=last {
        let (a, b) = (man.bits_at(s - 1), man.bits_at(s));
        let changed: Vec<usize> = (0..n).filter(|&i| a[i] != b[i]).collect();
        assert_eq!(changed.len(), 1, "step {s} changes {changed:?}");
        assert!(b[changed[0]] < a[changed[0]], "step {s} is not one-way");
        assert!(
            man.trajectory[s].footprint_bytes < man.trajectory[s - 1].footprint_bytes,
            "step {s} does not shrink the footprint"
        );
    }
    // Granularity: no step larger than 1% of the span (the paper's point).
    let span = man.trajectory[0].footprint_bytes - man.trajectory[last].footprint_bytes;
    let max_step = man
        .trajectory
        .windows(2)
        .map(|w| w[0].footprint_bytes - w[1].footprint_bytes)
        .max()
        .unwrap();
    assert!(
        max_step * 100 <= span,
        "max step {max_step} B of a {span} B span"
    );
    assert!(rec.evaluations > 0);

    // Every held-out domain: the main one's figures are the record's own; Brown is scored
    // apart (other text, other perplexities), and quantization costs on it too.
    let names: Vec<&str> = rec.domains.iter().map(|d| d.domain.as_str()).collect();
    assert_eq!(names, ["austen", "brown"]);
    let main = &rec.domains[0];
    let statics: Vec<f64> = rec.statics.iter().map(|s| s.3).collect();
    assert_eq!(main.statics, statics);
    for &(i, p) in &main.eqms {
        assert_eq!(rec.heldout[i], Some(p), "step {i}");
    }
    let brown = &rec.domains[1];
    assert_eq!(brown.statics.len(), statics.len());
    assert_eq!(
        brown.eqms.iter().map(|e| e.0).collect::<Vec<_>>(),
        main.eqms.iter().map(|e| e.0).collect::<Vec<_>>()
    );
    assert_ne!(brown.float_ppl, main.float_ppl);
    for d in &rec.domains {
        assert!(d.float_ppl.is_finite() && d.float_ppl > 1.0, "{d:?}");
        assert!(
            d.statics[0] >= d.float_ppl * 0.97,
            "{d:?}: QM(4) far below float"
        );
        assert!(
            d.statics[2] > d.statics[0],
            "{d:?}: QM(2) not worse than QM(4)"
        );
    }
    // Every measured EQM against the chord, with a standard error from the text's windows:
    // above it exactly where the report's count says, never significantly without being
    // above.
    let fig = flexquant::build::report::figures(&rec);
    for d in &rec.domains {
        let steps: Vec<usize> = d.eqms.iter().map(|e| e.0).collect();
        assert_eq!(
            d.chord.iter().map(|c| c.step).collect::<Vec<_>>(),
            steps,
            "{}",
            d.domain
        );
        for c in &d.chord {
            // Zero only at a static QM (steps 0 and last), which is its own chord.
            let on_static = c.excess == 0.0 && c.se == 0.0;
            assert!(c.se.is_finite() && (c.se > 0.0 || on_static), "{c:?}");
        }
        let above = d.chord.iter().filter(|c| c.excess > 1e-9).count();
        assert_eq!(
            fig["eqms_above_static_chord_by_domain"][&d.domain],
            serde_json::json!(above),
            "{}",
            d.domain
        );
        let significant = &fig["eqms_significantly_above_static_chord_by_domain"][&d.domain];
        assert!(
            significant.as_u64().unwrap() <= above as u64,
            "{significant}"
        );
    }
    assert_eq!(
        fig["heldout_by_domain"]["brown"].as_array().unwrap().len(),
        statics.len() + brown.eqms.len()
    );

    // An EQM reloaded from the packaged files computes exactly what the in-memory one does.
    let chosen = &rec.variants[rec.chosen];
    let eqms = chosen.trajectory.eqms(&Eqm::uniform(n, 4));
    let tokens = &heldout_ids[..24];
    for step in [0, last / 2, last] {
        assert_eq!(eqms[step].bits, man.bits_at(step));
        let packaged = load_step_weights(&out, &man, step).unwrap();
        let in_memory = em.weights(&eqms[step]).unwrap();
        let a = forward_all(&packaged, tokens, &mut KvCache::new(&packaged, 32)).unwrap();
        let b = forward_all(&in_memory, tokens, &mut KvCache::new(&in_memory, 32)).unwrap();
        assert_eq!(
            a, b,
            "step {step}: packaged EQM differs from the in-memory one"
        );
    }
}
