//! The builder's calibration evaluator on the tiny model: cached-prefix evaluation gives exactly
//! the perplexity a full forward gives, and the search over a real library is well-formed.

use flexquant::build::evaluator::{spearman, CalibEvaluator};
use flexquant::build::search::{search, Available, Evaluator, SearchOptions};
use flexquant::model::eval::perplexity;
use flexquant::model::load::load;
use flexquant::quant::calib::CalibSettings;
use flexquant::quant::eqm::{Eqm, EqmModel};
use flexquant::quant::gptq::GptqConfig;
use flexquant::quant::library::{self, BuildInput, BuildOptions, Library, Method, ModelInfo};

fn tiny_library(dir: &std::path::Path) -> (flexquant::model::load::LoadedModel, Library) {
    let mdir = dir.join("model");
    flexquant::model::tiny::write_tiny_model(&mdir, 7).unwrap();
    let m = load(&mdir).unwrap();
    let tokens: Vec<u32> = (0..512u32).map(|i| (i * 31 + 7) % 250 + 3).collect();
    let input = BuildInput {
        weights: &m.weights,
        model: ModelInfo {
            source: "tiny".into(),
            sha256: "0".repeat(64),
            config: m.weights.config.clone(),
        },
        calib_text: "synthetic".into(),
        calib_sha256: "0".repeat(64),
        calib_sources: vec![],
        calib_tokens: &tokens,
    };
    let opts = BuildOptions {
        method: Method::Rtn,
        bits: vec![4, 3, 2],
        group: 32,
        calib: CalibSettings {
            sequences: 4,
            seq_len: 128,
        },
        sequential: false,
        gptq: GptqConfig::default(),
        rtn_clip_search: false,
        nesting: None,
    };
    let lib_dir = dir.join("lib");
    library::build(&input, &opts, &lib_dir, false, &mut |_, _| {}).unwrap();
    (m, Library::open(&lib_dir).unwrap())
}

#[test]
fn cached_evaluation_equals_full_forward() {
    let dir = tempfile::tempdir().unwrap();
    let (m, lib) = tiny_library(dir.path());
    let em = EqmModel::new(lib, &m.weights, &"0".repeat(64)).unwrap();
    let tokens: Vec<u32> = m
        .tokenizer
        .encode(&"It is a truth universally acknowledged. ".repeat(20))
        .unwrap();
    let seq = 64;
    let tokens = &tokens[..3 * seq];
    let mut ev = CalibEvaluator::new(&em, tokens, seq, 4);
    let mut e = em.uniform(4);
    let mut fulls = Vec::new();
    let mut fasts = Vec::new();
    for step in 0..6 {
        // Lower a module in a later layer each time so the cache prefix is reused.
        e.bits[(step * 3 + 5) % 14] = 3;
        let fast = ev.ppl(&e).unwrap();
        let w = em.weights(&e).unwrap();
        let full = perplexity(&w, tokens, seq, seq, |_, _| {}).unwrap().ppl;
        assert!(
            (fast - full).abs() < 1e-9 * full.max(1.0) + 1e-6,
            "step {step}: {fast} vs {full}"
        );
        fulls.push(full);
        fasts.push(fast);
    }
    assert!(
        ev.forward_equivalents() < 6.0,
        "the layer cache was not used"
    );
    assert!((spearman(&fulls, &fasts) - 1.0).abs() < 1e-9);
}

/// The tiny model, an EQM model over its library, and 256 calibration tokens.
fn tiny_eqm_model(
    dir: &std::path::Path,
) -> (flexquant::model::load::LoadedModel, EqmModel, Vec<u32>) {
    let (m, lib) = tiny_library(dir);
    let em = EqmModel::new(lib, &m.weights, &"0".repeat(64)).unwrap();
    let tokens: Vec<u32> = (0..256u32).map(|i| (i * 17 + 3) % 250 + 3).collect();
    (m, em, tokens)
}

#[test]
fn search_over_a_real_library() {
    let dir = tempfile::tempdir().unwrap();
    let (_, em, tokens) = tiny_eqm_model(dir.path());
    let mut ev = CalibEvaluator::new(&em, &tokens, 128, 8);
    let avail = Available::uniform(em.modules(), &[4, 3, 2]);
    let base = em.base_bytes() as u64;
    let t = search(
        &mut ev,
        &avail,
        base,
        SearchOptions {
            branch: 3,
            stem: 2,
            record_every: 1,
            staged: false,
            lazy: false,
            slope: Default::default(),
            floor_damage: false,
            ties: Default::default(),
        },
        |_, _, _| {},
    )
    .unwrap();
    assert_eq!(t.steps.len(), 14 * 2 + 1);
    let eqms = t.eqms(&avail.start());
    for (s, e) in t.steps.iter().zip(&eqms) {
        assert_eq!(s.footprint, em.footprint(e).unwrap() as u64);
        assert_eq!(
            s.footprint,
            flexquant::build::search::footprint(&ev, e, base)
        );
    }
    assert_eq!(eqms.last().unwrap(), &Eqm::uniform(14, 2));
    assert!(t.steps.windows(2).all(|w| w[1].footprint < w[0].footprint));
    let _ = ev.bytes(0, 4);
}

/// The measured sensitivity of a staged search: the first level's moves from QM(4) up front, the
/// second level's from QM(3), where the search stands when it first ranks them.
#[test]
fn measured_sensitivities_start_from_each_stage() {
    let dir = tempfile::tempdir().unwrap();
    let (_, em, tokens) = tiny_eqm_model(dir.path());
    let mut ev = CalibEvaluator::new(&em, &tokens, 128, 8);
    let avail = Available::uniform(em.modules(), &[4, 3, 2]);
    ev.measure_single_swaps(&avail, 64, &mut |_, _| {}).unwrap();
    let ms = ev.measured.as_ref().unwrap();
    assert_eq!(ms.deltas.len(), 14, "only the 4 -> 3 moves up front");
    assert!(ms.deltas.keys().all(|&(_, from, to)| (from, to) == (4, 3)));
    let opts = SearchOptions {
        branch: 2,
        stem: 1,
        record_every: 1,
        staged: true,
        lazy: false,
        slope: Default::default(),
        floor_damage: false,
        ties: Default::default(),
    };
    search(&mut ev, &avail, em.base_bytes() as u64, opts, |_, _, _| {}).unwrap();
    let ms = ev.measured.as_ref().unwrap();
    assert_eq!(ms.deltas.len(), 28, "every move measured once");
    assert_eq!(ms.evaluations, 14 + 1 + 14 + 1);
    // A 3 -> 2 move's damage, measured from QM(3) on the 64 sensitivity tokens.
    let ppl = |e: &Eqm| {
        perplexity(&em.weights(e).unwrap(), &tokens[..64], 64, 64, |_, _| {})
            .unwrap()
            .ppl
    };
    let qm3 = Eqm::uniform(14, 3);
    let mut e = qm3.clone();
    e.bits[9] = 2;
    let want = ppl(&e) - ppl(&qm3);
    let got = ms.deltas[&(9, 3, 2)];
    assert!(
        (got - want).abs() < 1e-6 * want.abs().max(1.0),
        "{got} vs {want}"
    );
}

#[test]
fn packaged_ensemble_round_trips() {
    use flexquant::build::package::{
        load_step_weights, read_manifest, read_verified, write_ensemble, PackageInput,
    };
    use flexquant::model::chat::Message;
    use flexquant::model::forward::{forward_all, KvCache};
    let dir = tempfile::tempdir().unwrap();
    let (m, em, tokens) = tiny_eqm_model(dir.path());
    let mut ev = CalibEvaluator::new(&em, &tokens, 128, 8);
    let avail = Available::uniform(em.modules(), &[4, 3, 2]);
    let base = em.base_bytes() as u64;
    let t = search(
        &mut ev,
        &avail,
        base,
        SearchOptions {
            branch: 2,
            stem: 1,
            record_every: 1,
            staged: false,
            lazy: false,
            slope: Default::default(),
            floor_damage: false,
            ties: Default::default(),
        },
        |_, _, _| {},
    )
    .unwrap();
    let heldout: Vec<Option<f64>> = (0..t.steps.len())
        .map(|i| (i % 5 == 0).then_some(12.0))
        .collect();
    let out = dir.path().join("ensemble");
    let start = avail.start();
    let input = PackageInput {
        name: "tiny".into(),
        weights: &m.weights,
        tokenizer: &m.tokenizer,
        model: &em,
        trajectory: &t,
        start: &start,
        heldout: &heldout,
        n_up: 4,
        n_low: 2,
        calibration: serde_json::json!({"tokens": 256}),
        build: serde_json::json!({"branch": 2}),
        pack_bytes: 0,
    };
    let written = write_ensemble(&out, &input).unwrap();
    let man = read_manifest(&out).unwrap();
    assert_eq!(man, written);
    assert_eq!(man.trajectory.len(), t.steps.len());
    assert!(!out
        .with_file_name(format!("ensemble.tmp-{}", std::process::id()))
        .exists());
    for v in &man.modules {
        read_verified(&out, &v.file).unwrap();
    }
    // The model's chat template travels in the manifest and renders as the model's does.
    assert_eq!(man.chat.template, "jinja");
    let shipped = man
        .tokenizer(&read_verified(&out, &man.tokenizer).unwrap())
        .unwrap();
    let chat = [Message::new("system", "S"), Message::new("user", "hi")];
    assert_eq!(shipped.chat.fallback_warning(), None);
    assert_eq!(
        shipped.chat.render(&chat).unwrap(),
        m.tokenizer.chat.render(&chat).unwrap()
    );
    let eqms = t.eqms(&start);
    for step in [0, 7, t.steps.len() - 1] {
        let packaged = load_step_weights(&out, &man, step).unwrap();
        let in_memory = em.weights(&eqms[step]).unwrap();
        let a = forward_all(&packaged, &tokens[..40], &mut KvCache::new(&packaged, 64)).unwrap();
        let b = forward_all(&in_memory, &tokens[..40], &mut KvCache::new(&in_memory, 64)).unwrap();
        assert_eq!(
            a, b,
            "step {step}: packaged EQM differs from the in-memory one"
        );
    }
    // Packed (`ensemble::pack`): the same EQMs from a few files that tile exactly.
    let packed_dir = dir.path().join("packed");
    let packed = write_ensemble(
        &packed_dir,
        &PackageInput {
            pack_bytes: 64 << 10,
            ..input
        },
    )
    .unwrap();
    assert_eq!(packed, read_manifest(&packed_dir).unwrap());
    assert_eq!(packed.version, 2);
    assert!(packed.packs.len() > 2, "{} packs", packed.packs.len());
    assert!(!packed_dir.join("modules").exists());
    // The base and the tokenizer are packed too: the directory holds packs and the manifest.
    assert!(packed.all_files().all(|f| f.pack.is_some()));
    assert!(!packed_dir.join(&man.base.file).exists());
    for p in &packed.packs {
        let len = std::fs::metadata(packed_dir.join(&p.file)).unwrap().len();
        assert_eq!(len, p.bytes, "{}", p.file);
    }
    assert_eq!(
        packed.packs.iter().map(|p| p.bytes).sum::<u64>(),
        man.all_files().map(|f| f.bytes).sum::<u64>()
    );
    // Step 0's versions come first, in packs of their own.
    let pack_index = |v: &flexquant::ensemble::ModuleVersion| {
        let name = &v.file.pack.as_ref().unwrap().pack;
        packed.packs.iter().position(|p| &p.file == name).unwrap()
    };
    let first_low = packed
        .modules
        .iter()
        .filter(|v| v.bits < 4)
        .map(pack_index)
        .min();
    let last_up = packed
        .modules
        .iter()
        .filter(|v| v.bits == 4)
        .map(pack_index)
        .max();
    assert!(last_up < first_low, "{last_up:?} {first_low:?}");
    for (a, b) in packed.modules.iter().zip(&man.modules) {
        assert_eq!(
            read_verified(&packed_dir, &a.file).unwrap(),
            read_verified(&out, &b.file).unwrap(),
            "{}",
            a.file.file
        );
    }
    load_step_weights(&packed_dir, &packed, t.steps.len() - 1).unwrap();
    // Repacked at another size (`flexquant pack`): new packs, the same files, the old packs
    // replaced.
    let mut repacked = packed.clone();
    let replaced =
        flexquant::ensemble::pack::pack_files(&packed_dir, &mut repacked, 16 << 10).unwrap();
    assert!(repacked.packs.len() > packed.packs.len());
    assert!(!replaced.is_empty() && replaced.len() <= packed.packs.len());
    for r in &replaced {
        assert!(!repacked
            .packs
            .iter()
            .any(|p| packed_dir.join(&p.file) == *r));
    }
    for (a, b) in repacked.modules.iter().zip(&packed.modules) {
        assert_eq!(
            read_verified(&packed_dir, &a.file).unwrap(),
            read_verified(&packed_dir, &b.file).unwrap()
        );
    }
    flexquant::ensemble::pack::remove_replaced(&replaced).unwrap();
    let packed = repacked;

    // A corrupt byte in a pack names the file it belongs to and the pack.
    let victim = packed.modules[5].file.clone();
    let slice = victim.pack.clone().unwrap();
    let p = packed_dir.join(&slice.pack);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[slice.offset as usize + 3] ^= 0x55;
    std::fs::write(&p, &bytes).unwrap();
    let e = read_verified(&packed_dir, &victim).unwrap_err().to_string();
    assert!(
        e.contains(&victim.file) && e.contains(&slice.pack) && e.contains("sha256"),
        "{e}"
    );
    // Its neighbours in the pack still read.
    for v in packed
        .modules
        .iter()
        .filter(|v| v.file.pack.as_ref().unwrap().pack == slice.pack)
    {
        if v.file != victim {
            read_verified(&packed_dir, &v.file).unwrap();
        }
    }

    // A corrupted shard is caught by its hash, naming the file.
    let victim = &man.modules[3].file;
    let p = out.join(&victim.file);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[10] ^= 0x55;
    std::fs::write(&p, &bytes).unwrap();
    let e = read_verified(&out, victim).unwrap_err().to_string();
    assert!(e.contains(&victim.file) && e.contains("sha256"), "{e}");
}
