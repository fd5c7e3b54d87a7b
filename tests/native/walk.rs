//! The trajectory walk (`runtime::walk`) natively, on a built ensemble (the tiny model's, built
//! once per test process with the CLI): scripted budgets move the model down and up in the
//! middle of an answer on the CPU reference and on the GPU engine (lavapipe in CI); the
//! allocator budget injects out-of-memory; a device loss rebuilds with the conversation
//! re-prefilled; a shard that fails verification changes nothing; and `eval --ensemble` gives
//! the held-out perplexity the builder recorded.

use crate::gpu_util::gpu;
use flexquant::cpu::CpuFactory;
use flexquant::gpu::{GpuFactory, ModelOptions};
use flexquant::runtime::backend::KvFormat;
use flexquant::runtime::dir::DirSource;
use flexquant::runtime::reference::ReferenceFactory;
use flexquant::runtime::walk::Running;
use flexquant::runtime::{
    Backend, ByteSource, Decision, Elastic, Factory, Policy, Reason, Sampling, Walk,
};
use pollster::block_on;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const BIN: &str = env!("CARGO_BIN_EXE_flexquant");

/// Flips byte `at` of `f` where the ensemble keeps it: its own file, or its slice of a pack
/// (the CLI packs by default).
fn flip(dir: &Path, f: &flexquant::ensemble::FileRef, at: usize) {
    let (path, offset) = match &f.pack {
        Some(s) => (dir.join(&s.pack), s.offset as usize),
        None => (dir.join(&f.file), 0),
    };
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[offset + at] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();
}

/// The tiny model's fast-preset ensemble of independent versions (a file per version: the
/// fallback tests corrupt one level alone), built once into a temporary directory.
fn ensemble() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, dir) = DIR.get_or_init(|| build_tiny(&["austen-calib.txt"], &["--nested", "none"]));
    dir
}

/// The same with nested versions (the builder's default, `--nested truncate`): one bit-plane
/// file per module.
fn nested_ensemble() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, dir) = DIR.get_or_init(|| build_tiny(&["austen-calib.txt"], &["--nested", "truncate"]));
    dir
}

/// The tiny model's fast-preset ensemble calibrated on `calib` (text files of the text cache,
/// each `NAME` or `NAME:WEIGHT`), in packs of a few module versions each (the walk reads files
/// out of packs).
fn build_tiny(calib: &[&str], extra: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let text = crate::common::cache_dir().join("text");
    assert!(
        text.join("austen-calib.txt").exists(),
        "{} missing: run ./build.sh setup",
        text.display()
    );
    let model = tmp.path().join("tiny-model");
    let out = tmp.path().join("tiny");
    let run = |args: &[&str]| {
        let o = Command::new(BIN).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(&["tiny-model", "--out", model.to_str().unwrap()]);
    let calib: String = calib
        .iter()
        .map(|c| text.join(c).display().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let heldout = text.join("austen-heldout.txt");
    let mut args = vec![
        "build",
        "--model",
        model.to_str().unwrap(),
        "--calib",
        &calib,
        "--heldout",
        heldout.to_str().unwrap(),
        "--preset",
        "fast",
        "--pack-mb",
        "0.02",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args);
    (tmp, out)
}

/// Moves as soon as asked: the test's clock does not wait for settling.
fn eager() -> Policy {
    Policy {
        up_delay_ms: 0.0,
        fault_cooldown_ms: 0.0,
        ..Policy::default()
    }
}

fn walk<F: Factory>(dir: &Path, factory: F) -> Walk<DirSource, F>
where
    <F::Model as Backend>::Error: Send + Sync + 'static,
{
    let source = DirSource::open(dir).unwrap();
    let footprints = source
        .manifest()
        .trajectory
        .iter()
        .map(|s| s.footprint_bytes)
        .collect();
    let elastic = Elastic::new(footprints, 0, eager()).unwrap();
    Walk::new(source, factory, elastic, Box::new(|_| {}))
}

/// The budget under which the controller's target is `step` (its footprint plus the model's
/// overheads, over the policy's headroom).
fn budget_for<F: Factory>(w: &Walk<DirSource, F>, step: usize) -> u64
where
    <F::Model as Backend>::Error: Send + Sync + 'static,
{
    let e = w.elastic.borrow();
    (e.cost(step) as f64 / (1.0 - e.policy().headroom)) as u64 + 1
}

fn greedy(max_tokens: usize) -> Sampling {
    Sampling {
        max_tokens,
        ..Sampling::default()
    }
}

/// Generates `n` tokens of the running turn, asserting none ends it.
fn tokens<B: Backend>(run: &mut Running<B>, turn: &mut flexquant::runtime::Turn, n: usize)
where
    B::Error: std::fmt::Debug,
{
    for _ in 0..n {
        assert!(block_on(run.session.next(turn)).unwrap().is_some());
    }
}

/// Down under a budget and back up when it is lifted, in the middle of an answer; after each
/// move the model is exactly the step's EQM, and the answer goes on from the same KV cache.
fn down_and_up<F: Factory>(w: &Walk<DirSource, F>)
where
    <F::Model as Backend>::Error: std::fmt::Debug + Send + Sync + 'static,
{
    let m = w.manifest();
    let last = m.trajectory.len() - 1;
    let mut run = block_on(w.load()).unwrap();
    assert_eq!(run.step, 0, "no budget: the largest step");
    assert_eq!(run.session.model.eqm_bits(), m.bits_at(0));
    let prompt: Vec<u32> = (1..20).collect();
    let mut turn = block_on(run.session.start(&prompt, &greedy(40), &[])).unwrap();
    tokens(&mut run, &mut turn, 3);

    let target = last / 2;
    let b = budget_for(w, target);
    w.elastic.borrow_mut().set_budget(b);
    let d = block_on(w.between_tokens(&mut run, Some(3))).unwrap();
    assert!(matches!(d, Decision::StepDown { from: 0, .. }), "{d:?}");
    assert!(run.step >= target && run.step > 0, "step {}", run.step);
    assert_eq!(run.session.model.eqm_bits(), m.bits_at(run.step));
    tokens(&mut run, &mut turn, 3);
    assert_eq!(
        run.session.model.len(),
        prompt.len() + 5,
        "the KV cache was kept"
    );

    w.elastic.borrow_mut().clear_budget();
    let mut moves = 0;
    while run.step > 0 && moves < 50 {
        block_on(w.between_tokens(&mut run, None)).unwrap();
        moves += 1;
    }
    assert_eq!(run.step, 0, "back up to the largest step in {moves} moves");
    assert_eq!(run.session.model.eqm_bits(), m.bits_at(0));
    tokens(&mut run, &mut turn, 3);
    let s = w.elastic.borrow().stats();
    assert!(s.swaps_down >= 1 && s.swaps_up >= 1, "{s:?}");
}

#[test]
fn reference_walks_down_and_up_mid_answer() {
    let dir = ensemble();
    let w = walk(dir, ReferenceFactory { context: 128 });
    down_and_up(&w);

    // A model walked to a step computes exactly what one loaded at that step does.
    let mut walked = block_on(w.load_at(Some(0))).unwrap();
    let k = w.manifest().trajectory.len() - 2;
    let d = Decision::StepDown {
        from: 0,
        to: k,
        reason: Reason::Budget,
    };
    block_on(w.execute(&mut walked, d, None)).unwrap();
    assert_eq!(walked.step, k);
    let mut fresh = block_on(w.load_at(Some(k))).unwrap();
    let (a, b) = (&walked.session.model.weights, &fresh.session.model.weights);
    for (x, y) in a.modules.iter().zip(&b.modules) {
        assert_eq!(x.w[..], y.w[..]);
    }
    let t = [5u32, 6, 7];
    assert_eq!(
        block_on(walked.session.model.step(&t)).unwrap(),
        block_on(fresh.session.model.step(&t)).unwrap()
    );
}

/// The packed CPU backend walks like the others; after every swap it holds exactly the step's
/// footprint plus its KV cache; a model walked to a step computes what one loaded there does;
/// its budget (the allocator's, in wasm) stops a step up at the last good step.
#[test]
fn a_nested_ensemble_stores_one_plane_file_per_module_and_walks_exactly() {
    let dir = nested_ensemble();
    let m = DirSource::open(dir).unwrap().manifest().clone();
    let plain = DirSource::open(ensemble()).unwrap().manifest().clone();
    assert_eq!(m.version, 4);
    assert!(m.modules.iter().all(|v| v.levels.is_some()));
    let files: std::collections::BTreeSet<&str> =
        m.modules.iter().map(|v| v.file.file.as_str()).collect();
    assert_eq!(files.len(), m.n_modules(), "one bit-plane file per module");
    // Every step's files are step 0's: walking anywhere after the first load reads no new file.
    let step0: std::collections::BTreeSet<&str> = m
        .step_versions(0)
        .iter()
        .map(|v| v.file.file.as_str())
        .collect();
    for s in 0..m.trajectory.len() {
        assert!(m
            .step_versions(s)
            .iter()
            .all(|v| step0.contains(v.file.file.as_str())));
    }
    // Storage: QM(n_up) plus one set of scales per lower level, against a copy per level.
    let ratio = |m: &flexquant::ensemble::Manifest| {
        (m.storage_bytes() - m.tokenizer.bytes) as f64 / m.trajectory[0].footprint_bytes as f64
    };
    println!(
        "tiny model storage / QM(n_up): nested {:.3}, independent {:.3}",
        ratio(&m),
        ratio(&plain)
    );
    assert!(ratio(&m) < 1.25 && ratio(&plain) > 1.5);
    // The builder's report counts what the packager stored.
    for (d, man, nested) in [(dir, &m, "truncate"), (ensemble(), &plain, "")] {
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join("report.json")).unwrap()).unwrap();
        assert_eq!(
            r["storage_bytes"].as_u64(),
            Some(man.storage_bytes()),
            "{d:?}"
        );
        assert_eq!(r["nested"].as_str().unwrap_or(""), nested);
    }

    // The walk decodes each level from the plane file: held bytes are the step's packed
    // footprint, and after any walk the logits equal a fresh load of that step.
    let cpu = CpuFactory {
        context: 128,
        kv_format: KvFormat::F16,
        budget: None,
    };
    let w = walk(dir, cpu);
    down_and_up(&w);
    let c = &m.config;
    let kv = (2 * 2 * c.num_hidden_layers * 128 * c.kv_dim()) as u64; // keys and values in f16
    let last = m.trajectory.len() - 1;
    let mut walked = block_on(w.load_at(Some(0))).unwrap();
    for (from, to) in [(0, last), (last, last / 2), (last / 2, 1)] {
        // A module's plane file serves all its levels: a jump reads each file once, however
        // many of the jump's moves are that module's.
        let moves = m.moves(from, to);
        let files: std::collections::BTreeMap<&str, u64> = moves
            .iter()
            .map(|mv| (mv.to.file.file.as_str(), mv.to.file.bytes))
            .collect();
        assert!(
            from != 0 || files.len() < moves.len(),
            "a module moves twice"
        );
        let read = w.source.bytes_read.get();
        block_on(w.execute(&mut walked, Decision::move_to(from, to), None)).unwrap();
        assert_eq!(
            w.source.bytes_read.get() - read,
            files.values().sum::<u64>(),
            "{from} -> {to}: bytes read"
        );
        assert_eq!(
            walked.session.model.held_bytes(),
            m.trajectory[to].footprint_bytes + kv,
            "step {to}"
        );
        assert_same_as_a_fresh_load(&w, &mut walked, "nested");
    }
}

#[test]
fn cpu_walks_down_and_up_and_accounts_exactly() {
    let dir = ensemble();
    let cpu = |budget| CpuFactory {
        context: 128,
        kv_format: KvFormat::F16,
        budget,
    };
    let w = walk(dir, cpu(None));
    down_and_up(&w);

    let m = w.manifest().clone();
    let c = &m.config;
    let kv = (2 * 2 * c.num_hidden_layers * 128 * c.kv_dim()) as u64; // keys and values in f16
    let last = m.trajectory.len() - 1;
    let mut walked = block_on(w.load_at(Some(0))).unwrap();
    for (from, to) in [(0, last - 1), (last - 1, last), (last, 1)] {
        block_on(w.execute(&mut walked, Decision::move_to(from, to), None)).unwrap();
        assert_eq!(walked.step, to);
        assert_eq!(
            walked.session.model.held_bytes(),
            m.trajectory[to].footprint_bytes + kv,
            "step {to}"
        );
    }
    assert_same_as_a_fresh_load(&w, &mut walked, "cpu");

    let held = m.trajectory[last].footprint_bytes + kv;
    let w = walk(dir, cpu(Some(held)));
    let mut run = block_on(w.load()).unwrap();
    assert_eq!(
        run.step, last,
        "out-of-memory at load steps down to what fits"
    );
    let d = Decision::StepUp {
        from: last,
        to: 0,
        reason: Reason::MemoryFree,
    };
    let e = block_on(w.execute(&mut run, d, None)).unwrap_err();
    assert!(e.to_string().contains("out of memory"), "{e}");
    assert_eq!(run.step, last);
    assert_eq!(run.session.model.eqm_bits(), m.bits_at(last));
    let mut turn = block_on(run.session.start(&[1, 2, 3], &greedy(3), &[])).unwrap();
    tokens(&mut run, &mut turn, 3);
}

/// A KV cache that cannot grow (the CPU model may hold step 0 with one block of cache and 20 KB
/// more; the prompt needs a second block, 32 KB): the call fails with out-of-memory, the
/// walk steps the model down (`Walk::after_out_of_memory`) and the call runs again, until a
/// step leaves room for the cache; the answer then goes on, and a model that cannot step
/// further says so.
#[test]
fn a_cache_that_cannot_grow_steps_the_model_down_and_the_call_runs_again() {
    use flexquant::runtime::backend::{kv_cache_bytes, KV_BLOCK};
    let dir = ensemble();
    let m = DirSource::open(dir).unwrap().manifest().clone();
    let c = &m.config;
    let fp0 = m.trajectory[0].footprint_bytes;
    let room = fp0 + kv_cache_bytes(c, KvFormat::F16, KV_BLOCK) + 20_000;
    let w = walk(
        dir,
        CpuFactory {
            context: 512,
            kv_format: KvFormat::F16,
            budget: Some(room),
        },
    );
    let mut run = block_on(w.load()).unwrap();
    assert_eq!(run.step, 0);
    let prompt: Vec<u32> = (0..200).map(|i| (i * 7 % 250) as u32 + 3).collect();
    let mut tries = 0;
    let mut turn = loop {
        match block_on(run.session.start(&prompt, &greedy(4), &[])) {
            Ok(turn) => break turn,
            Err(e) => {
                assert!(matches!(e, flexquant::Error::OutOfMemory { .. }), "{e}");
                assert_eq!(run.session.model.len(), 0, "nothing of the prompt was kept");
                assert!(
                    block_on(w.after_out_of_memory(&mut run)).unwrap(),
                    "stepped down"
                );
                tries += 1;
            }
        }
    };
    assert!(tries >= 1, "step 0 had no room for the grown cache");
    let held = run.session.model.held_bytes();
    assert_eq!(
        held,
        m.trajectory[run.step].footprint_bytes + kv_cache_bytes(c, KvFormat::F16, 2 * KV_BLOCK)
    );
    assert!(held <= room, "{held} > {room}");
    assert!(
        m.trajectory[run.step - 1].footprint_bytes + kv_cache_bytes(c, KvFormat::F16, 2 * KV_BLOCK)
            > room,
        "the step above had no room: the walk went no deeper than needed"
    );
    tokens(&mut run, &mut turn, 3);

    // At the last step with no room left: no step down, the error stands.
    let last = m.trajectory.len() - 1;
    let tight = m.trajectory[last].footprint_bytes + kv_cache_bytes(c, KvFormat::F16, KV_BLOCK);
    let w = walk(
        dir,
        CpuFactory {
            context: 512,
            kv_format: KvFormat::F16,
            budget: Some(tight),
        },
    );
    let mut run = block_on(w.load()).unwrap();
    assert_eq!(run.step, last);
    assert!(block_on(run.session.start(&prompt, &greedy(4), &[])).is_err());
    assert!(!block_on(w.after_out_of_memory(&mut run)).unwrap());
    assert_eq!(run.step, last);
    let mut turn = block_on(run.session.start(&prompt[..20], &greedy(2), &[])).unwrap();
    tokens(&mut run, &mut turn, 1);
}

#[test]
fn gpu_walks_down_and_up_mid_answer_and_recovers() {
    let Some(_) = gpu() else { return };
    let dir = ensemble();
    let opts = ModelOptions {
        context: 128,
        ..Default::default()
    };
    let w = walk(dir, GpuFactory::new(opts));
    down_and_up(&w);

    // A device loss: a new device at the controller's lower step, the conversation re-run.
    let mut run = block_on(w.load()).unwrap();
    let prompt: Vec<u32> = (1..12).collect();
    let mut turn = block_on(run.session.start(&prompt, &greedy(20), &[])).unwrap();
    tokens(&mut run, &mut turn, 4);
    let before = run.session.tokens().to_vec();
    run.session.model.gpu().device.destroy();
    block_on(w.recover(&mut run)).unwrap();
    assert!(run.step > 0, "recovery steps down");
    assert_eq!(run.session.model.eqm_bits(), w.manifest().bits_at(run.step));
    assert_eq!(run.session.tokens(), &before[..]);
    assert_eq!(run.session.model.len(), before.len());
    tokens(&mut run, &mut turn, 3);
    assert_eq!(w.elastic.borrow().stats().device_losses, 1);
}

#[test]
fn gpu_out_of_memory_stops_at_the_last_good_step() {
    let Some(_) = gpu() else { return };
    let dir = ensemble();
    let opts = ModelOptions {
        context: 128,
        ..Default::default()
    };
    let last = DirSource::open(dir).unwrap().manifest().trajectory.len() - 1;
    // The smallest step, on an allocator that holds barely more than it.
    let probe = walk(dir, GpuFactory::new(opts));
    let held = block_on(probe.load_at(Some(last)))
        .unwrap()
        .session
        .model
        .held_bytes();
    let mut f = GpuFactory::new(opts);
    f.budget = Some(held);
    let w = walk(dir, f);
    let mut run = block_on(w.load_at(Some(last))).unwrap();
    let d = Decision::StepUp {
        from: last,
        to: 0,
        reason: Reason::MemoryFree,
    };
    let e = block_on(w.execute(&mut run, d, None)).unwrap_err();
    assert!(e.to_string().contains("out of memory"), "{e}");
    assert_eq!(run.step, last, "the first module up did not fit");
    assert_eq!(run.session.model.eqm_bits(), w.manifest().bits_at(last));
    let s = w.elastic.borrow().stats();
    assert!(
        s.swap_failures >= 1 && s.oom_ceiling_bytes.is_some(),
        "{s:?}"
    );
    // The model still answers.
    let mut turn = block_on(run.session.start(&[1, 2, 3], &greedy(3), &[])).unwrap();
    tokens(&mut run, &mut turn, 3);

    // Loading under a budget too small for the largest step lands lower.
    let mut f = GpuFactory::new(opts);
    f.budget = Some(held);
    let w = walk(dir, f);
    let run = block_on(w.load()).unwrap();
    assert_eq!(
        run.step, last,
        "out-of-memory at load steps down to what fits"
    );
}

#[test]
fn a_shard_that_fails_verification_changes_nothing() {
    let src = ensemble();
    let tmp = tempfile::tempdir().unwrap();
    let copy = Command::new("cp")
        .arg("-r")
        .arg(src)
        .arg(tmp.path().join("e"))
        .status()
        .unwrap();
    assert!(copy.success());
    let dir = tmp.path().join("e");
    let w = walk(&dir, ReferenceFactory { context: 64 });
    let mv = &w.manifest().moves(0, 1)[0];
    flip(&dir, &mv.to.file, 7);

    let mut run = block_on(w.load()).unwrap();
    let d = Decision::StepDown {
        from: 0,
        to: 1,
        reason: Reason::Budget,
    };
    let e = block_on(w.execute(&mut run, d, None)).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains(&mv.to.file.file) && msg.contains("sha256"),
        "{msg}"
    );
    assert_eq!(run.step, 0);
    assert_eq!(run.session.model.eqm_bits(), w.manifest().bits_at(0));
    // The same target is not retried at once (no fetch before every token).
    block_on(w.execute(&mut run, d, None)).unwrap();
    assert_eq!(run.step, 0);
}

/// A shard that fails verification on the way down: a load (or a device-loss rebuild, which
/// loads) falls back to the first step deeper than the controller's target that does not use
/// the shard, and a swap does the moves before it; both report the bad file as a warning.
#[test]
fn loads_and_swaps_fall_back_past_a_shard_that_fails_verification() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = Command::new("cp")
        .arg("-r")
        .arg(ensemble())
        .arg(tmp.path().join("e"))
        .status()
        .unwrap();
    assert!(copy.success());
    let dir = tmp.path().join("e");
    let m = DirSource::open(&dir).unwrap().manifest().clone();
    let uses = |s: usize, f: &str| m.step_versions(s).iter().any(|v| v.file.file == f);
    let last = m.trajectory.len() - 1;
    // A module version swapped in at step k >= 2 and replaced again further down.
    let (k, bad) = (2..last)
        .map(|k| (k, m.moves(k - 1, k)[0].to.file.file.clone()))
        .find(|(k, f)| (k + 1..=last).any(|s| !uses(s, f)))
        .expect("some module is lowered twice");
    let clear = (k + 1..=last).find(|&s| !uses(s, &bad)).unwrap();
    let bad_ref = m
        .modules
        .iter()
        .find(|v| v.file.file == bad)
        .unwrap()
        .file
        .clone();
    flip(&dir, &bad_ref, 3);

    let warnings = std::rc::Rc::new(std::cell::RefCell::new(Vec::<String>::new()));
    let sink = warnings.clone();
    let source = DirSource::open(&dir).unwrap();
    let footprints = m.trajectory.iter().map(|s| s.footprint_bytes).collect();
    let w = Walk::new(
        source,
        ReferenceFactory { context: 64 },
        Elastic::new(footprints, 0, eager()).unwrap(),
        Box::new(move |e| {
            if let flexquant::runtime::walk::Event::Warning(e) = e {
                sink.borrow_mut().push(format!("{e:#}"));
            }
        }),
    );

    // A swap from step 0 towards k: the moves before the bad shard are done.
    let mut run = block_on(w.load()).unwrap();
    assert_eq!(run.step, 0);
    let d = Decision::StepDown {
        from: 0,
        to: k,
        reason: Reason::Budget,
    };
    block_on(w.execute(&mut run, d, None)).unwrap();
    assert_eq!(run.step, k - 1, "every move before the bad shard's");
    assert_eq!(run.session.model.eqm_bits(), m.bits_at(k - 1));
    assert_eq!(warnings.borrow().len(), 1);
    assert!(
        warnings.borrow()[0].contains(&bad),
        "{:?}",
        warnings.borrow()
    );

    // A load (and so a rebuild) whose target needs the bad shard: the first step without it.
    let b = budget_for(&w, k);
    w.elastic.borrow_mut().set_budget(b);
    let run = block_on(w.load()).unwrap();
    assert_eq!(run.step, clear, "k {k}: the first step past {bad}");
    assert_eq!(run.session.model.eqm_bits(), m.bits_at(clear));
    assert_eq!(warnings.borrow().len(), 2);
    // A step that needs the shard, asked for explicitly, is an error naming it.
    let e = block_on(w.load_at(Some(k))).err().unwrap();
    assert!(format!("{e:#}").contains(&bad), "{e:#}");
}

/// `generate --max-perplexity P` (the browser's `maxPerplexity`): under a budget nothing fits,
/// the model loads at the deepest step whose held-out perplexity is at most P, not below; a
/// value no step meets is an error naming the flag.
#[test]
fn cli_quality_floor_holds_under_a_budget_nothing_meets() {
    let dir = ensemble();
    let m = DirSource::open(dir).unwrap().manifest().clone();
    // A bound some step in the middle meets and a deeper one does not.
    let last = m.trajectory.len() - 1;
    let (max, want) = m
        .step_perplexity()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p, m.floor_for_perplexity(p).ok()?)))
        .find(|&(_, f)| f > 0 && f < last)
        .expect("a perplexity bound with a floor inside the trajectory");
    let run = |max: f64| {
        Command::new(BIN)
            .args([
                "generate",
                "--ensemble",
                dir.to_str().unwrap(),
                "--budget",
                "0.001",
            ])
            .args([
                "--max-perplexity",
                &max.to_string(),
                "--prompt",
                "Hi",
                "--max-tokens",
                "2",
            ])
            .output()
            .unwrap()
    };
    let o = run(max);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!("quality floor: step {want} ")),
        "{err}"
    );
    assert!(err.contains(&format!("[loading step {want}:")), "{err}");
    let o = run(0.5);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--max-perplexity 0.5"),
        "{err}"
    );
}

/// `eval --ensemble DIR --step N` on held-out text: the builder's windows by default, and the
/// perplexity it recorded for that step in the manifest.
#[test]
fn eval_ensemble_gives_the_builders_heldout_figures() {
    let dir = ensemble();
    let m = DirSource::open(dir).unwrap().manifest().clone();
    let text = crate::common::cache_dir().join("text/austen-heldout.txt");
    let measured: Vec<(usize, f64)> = m
        .trajectory
        .iter()
        .enumerate()
        .filter_map(|(i, s)| Some((i, s.heldout_ppl?)))
        .collect();
    assert!(measured.len() >= 2, "{measured:?}");
    for &(step, want) in &[measured[0], *measured.last().unwrap()] {
        for backend in ["reference", "gpu", "cpu"] {
            if backend == "gpu" && gpu().is_none() {
                continue;
            }
            let o = Command::new(BIN)
                .args(["eval", "--ensemble", dir.to_str().unwrap(), "--step"])
                .arg(step.to_string())
                .args(["--backend", backend, "--json", "--text"])
                .arg(&text)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let got = v["ppl"].as_f64().unwrap();
            assert_eq!(v["step"], step);
            // The GPU: f32 rounding; the CPU backend: also its int16 activations.
            let tol = match backend {
                "reference" => 1e-6,
                "gpu" => 1e-3,
                _ => 3e-3,
            };
            assert!(
                ((got - want) / want).abs() < tol,
                "step {step} on {backend}: {got} vs the builder's {want}"
            );
        }
    }
}

/// The soak (issue 14): `n` random moves up and down the trajectory (seeded), `check` after
/// every one; then the walked model's candidates after three tokens equal, bit for bit, those
/// of a model loaded fresh at the step it ended on.
fn soak<F: Factory>(
    w: &Walk<DirSource, F>,
    n: usize,
    check: impl Fn(&F::Model, usize),
) -> Running<F::Model>
where
    <F::Model as Backend>::Error: std::fmt::Debug + Send + Sync + 'static,
{
    let m = w.manifest().clone();
    let steps = m.trajectory.len();
    let mut rng = flexquant::runtime::generate::Rng::new(2026);
    let mut run = block_on(w.load_at(Some(0))).unwrap();
    let mut moves = 0;
    while moves < n {
        let to = ((rng.next_f32() * steps as f32) as usize).min(steps - 1);
        if to == run.step {
            continue;
        }
        let d = Decision::move_to(run.step, to);
        block_on(w.execute(&mut run, d, None)).unwrap();
        assert_eq!(run.step, to);
        assert_eq!(run.session.model.eqm_bits(), m.bits_at(to), "move {moves}");
        check(&run.session.model, to);
        moves += 1;
    }
    assert_same_as_a_fresh_load(w, &mut run, &format!("after {n} moves"));
    run
}

/// `run`'s model gives the logits a fresh load of its step gives (after any walk, the same
/// model); the probe's positions are forgotten after.
fn assert_same_as_a_fresh_load<F: Factory>(
    w: &Walk<DirSource, F>,
    run: &mut Running<F::Model>,
    what: &str,
) where
    <F::Model as Backend>::Error: std::fmt::Debug + Send + Sync + 'static,
{
    let mut fresh = block_on(w.load_at(Some(run.step))).unwrap();
    let t = [5u32, 6, 7];
    assert_eq!(
        block_on(run.session.model.step(&t)).unwrap(),
        block_on(fresh.session.model.step(&t)).unwrap(),
        "{what}: step {}",
        run.step
    );
    run.session.model.truncate(0);
}

/// With `FLEXQUANT_SOAK_REPORT=DIR` (`./build.sh bench reliability`): the soak's figures as
/// `DIR/soak-BACKEND.json`.
fn soak_report(backend: &str, swaps: usize, leaked_bytes: u64) {
    if let Some(dir) = std::env::var_os("FLEXQUANT_SOAK_REPORT") {
        let r = serde_json::json!({"swaps": swaps, "leaked_bytes": leaked_bytes});
        let p = Path::new(&dir).join(format!("soak-{backend}.json"));
        std::fs::write(&p, r.to_string()).unwrap();
    }
}

/// 1,000 random moves on the packed CPU backend: after each the model holds exactly the
/// step's footprint plus its KV cache.
#[test]
fn soak_cpu_thousand_random_moves() {
    let dir = ensemble();
    let w = walk(
        dir,
        CpuFactory {
            context: 64,
            kv_format: KvFormat::F16,
            budget: None,
        },
    );
    let m = w.manifest().clone();
    let kv = (2 * 2 * m.config.num_hidden_layers * 64 * m.config.kv_dim()) as u64; // f16
    let run = soak(&w, 1000, |model, step| {
        assert_eq!(model.held_bytes(), m.trajectory[step].footprint_bytes + kv);
    });
    // What the model holds beyond its step's footprint and KV cache at the end (0: the
    // accounting is exact; the memory itself is freed by ownership on drop).
    let extra = run.session.model.held_bytes() - m.trajectory[run.step].footprint_bytes - kv;
    soak_report("native-cpu", 1000, extra);
}

/// 1,000 random moves on the WebGPU engine (lavapipe here): after each the allocator's live
/// bytes equal the model's footprint computed from shapes (no leak, no double count).
#[test]
fn soak_gpu_thousand_random_moves() {
    let Some(_) = gpu() else { return };
    let dir = ensemble();
    let opts = ModelOptions {
        context: 64,
        ..Default::default()
    };
    let w = walk(dir, GpuFactory::new(opts));
    let run = soak(&w, 1000, |model, step| {
        let held = model.allocator().bytes();
        assert_eq!(held, model.footprint().total(), "step {step}");
    });
    // Every buffer freed once the model is dropped.
    let alloc = run.session.model.allocator().clone();
    drop(run);
    assert_eq!(
        (alloc.bytes(), alloc.buffers()),
        (0, 0),
        "GPU memory left after drop"
    );
    soak_report("native-gpu", 1000, alloc.bytes());
}

/// The shipped manifest names no file of the build machine: no string in it is an absolute
/// path, and the calibration text is recorded by name and sha256 (issue 17).
#[test]
fn the_manifest_carries_no_build_machine_path() {
    fn strings<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
        match v {
            serde_json::Value::String(s) => out.push(s),
            serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
            serde_json::Value::Object(o) => o.values().for_each(|x| strings(x, out)),
            _ => {}
        }
    }
    // Built on a calibration mix (`--calib SOURCE:WEIGHT,...`): the manifest records each
    // source by name.
    let (_tmp, dir) = build_tiny(
        &["austen-calib.txt:3", "brown-calib.txt:1"],
        &["--nested", "none"],
    );
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    let cache = crate::common::cache_dir();
    assert!(
        !text.contains(cache.to_str().unwrap()),
        "{}",
        cache.display()
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut all = Vec::new();
    strings(&v, &mut all);
    let absolute: Vec<&&str> = all.iter().filter(|s| Path::new(s).is_absolute()).collect();
    assert!(absolute.is_empty(), "{absolute:?}");
    let calib = &v["quantizer"]["calibration"]["library"];
    assert_eq!(
        calib["text"], "austen-calib.txt:3,brown-calib.txt:1",
        "{calib}"
    );
    assert_eq!(
        calib["text_sha256"].as_str().map(str::len),
        Some(64),
        "{calib}"
    );
    // Each source by name, hash, token count, weight and its share of the windows.
    let sources = calib["sources"].as_array().unwrap();
    let names: Vec<&str> = sources
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["austen-calib.txt", "brown-calib.txt"]);
    let windows: Vec<u64> = sources
        .iter()
        .map(|s| s["sequences"].as_u64().unwrap())
        .collect();
    assert_eq!(
        windows.iter().sum::<u64>(),
        calib["sequences"].as_u64().unwrap()
    );
    assert_eq!(windows[0], 3 * windows[1], "{windows:?}");
    for s in sources {
        assert_eq!(s["sha256"].as_str().map(str::len), Some(64), "{s}");
        assert!(s["tokens"].as_u64().unwrap() > 100_000, "{s}");
    }
}

/// `KvChoice::Auto` (CPU backend): a conversation whose f16 cache no longer fits the budget at
/// step 0 has its cache converted to int8 first (`Walk::kv_first`: a `KvConverted` event, the
/// overheads down by the formats' difference) and the model stays at step 0, where with an f16
/// cache kept the same budget steps it down; `Walk::reset` starts the next cache in f16.
#[test]
fn auto_kv_cache_goes_to_int8_before_the_weights_step_down() {
    use flexquant::runtime::backend::{kv_cache_bytes, KvChoice};
    use std::cell::RefCell;
    use std::rc::Rc;
    let dir = ensemble();
    let source = DirSource::open(dir).unwrap();
    let m = source.manifest().clone();
    let c = &m.config;
    let footprints: Vec<u64> = m.trajectory.iter().map(|s| s.footprint_bytes).collect();
    let prompt: Vec<u32> = (0..200).map(|i| (i * 7 % 250) as u32 + 3).collect();
    // What step 0 holds with the prompt's cache (256 positions) in f16, and what int8 saves.
    let saved = kv_cache_bytes(c, KvFormat::F16, 256) - kv_cache_bytes(c, KvFormat::Int8, 256);
    let run_with = |choice: KvChoice| {
        let seen = Rc::new(RefCell::new(Vec::new()));
        let log = seen.clone();
        let elastic = Elastic::new(footprints.clone(), 0, eager()).unwrap();
        let f = CpuFactory {
            context: 512,
            kv_format: choice.start(),
            budget: None,
        };
        let w = Walk::new(
            DirSource::open(dir).unwrap(),
            f,
            elastic,
            Box::new(move |e| {
                if let flexquant::runtime::walk::Event::KvConverted {
                    from,
                    to,
                    bytes_before,
                    bytes_after,
                    ..
                } = e
                {
                    log.borrow_mut()
                        .push((from, to, bytes_before - bytes_after));
                }
            }),
        );
        w.set_kv_choice(choice);
        let mut run = block_on(w.load()).unwrap();
        assert_eq!(run.step, 0);
        let mut turn = block_on(run.session.start(&prompt, &greedy(4), &[])).unwrap();
        w.note_overheads(&run);
        let held = run.session.model.held_bytes();
        // Room for step 0 with the cache in int8 and half the difference, not in f16.
        let keep = 1.0 - eager().headroom;
        let budget = ((held - saved / 2) as f64 / keep) as u64;
        w.elastic.borrow_mut().set_budget(budget);
        block_on(w.between_tokens(&mut run, Some(0))).unwrap();
        tokens(&mut run, &mut turn, 2);
        (w, run, seen, held)
    };

    let (_, run, seen, _) = run_with(KvChoice::F16);
    assert!(run.step > 0, "an f16 cache kept: the weights stepped down");
    assert!(seen.borrow().is_empty());

    let (w, mut run, seen, held) = run_with(KvChoice::Auto);
    assert_eq!(run.step, 0, "the cache went to int8 instead");
    assert_eq!(
        *seen.borrow(),
        [(KvFormat::F16, KvFormat::Int8, saved)],
        "one conversion, by the formats' difference at 256 positions"
    );
    let model = &run.session.model;
    assert_eq!(model.kv_format(), KvFormat::Int8);
    assert_eq!(held - model.held_bytes(), saved);
    block_on(w.reset(&mut run)).unwrap();
    assert_eq!(run.session.model.kv_format(), KvFormat::F16);
    let mut turn = block_on(run.session.start(&prompt[..20], &greedy(2), &[])).unwrap();
    tokens(&mut run, &mut turn, 1);
}

/// Where no swap can fail (the CPU backend without a budget), a jump moves each module once,
/// straight to its last version: the swap event names each module once (its bits before and
/// after the jump), only the last versions' files are read, and the model equals a fresh load
/// of the target. With a budget (a swap may be refused) every move runs, so a refusal stops
/// at a trajectory step.
#[test]
fn a_jump_moves_each_module_once_where_swaps_cannot_fail() {
    use flexquant::runtime::walk::Event;
    use std::cell::RefCell;
    use std::rc::Rc;
    let dir = ensemble();
    let m = DirSource::open(dir).unwrap().manifest().clone();
    let last = m.trajectory.len() - 1;
    let c = &m.config;
    let kv = (2 * 2 * c.num_hidden_layers * 64 * c.kv_dim()) as u64; // f16
    for budget in [None, Some(u64::MAX)] {
        // (from, to, [(module, bits before, bits after)]) of each swap event.
        type Logged = Vec<(usize, usize, Vec<(String, u32, u32)>)>;
        let swaps: Rc<RefCell<Logged>> = Rc::default();
        let log = swaps.clone();
        let mut w = walk(
            dir,
            CpuFactory {
                context: 64,
                kv_format: KvFormat::F16,
                budget,
            },
        );
        w = Walk::new(
            w.source,
            w.factory,
            w.elastic.into_inner(),
            Box::new(move |e| {
                if let Event::Swap {
                    from, to, modules, ..
                } = e
                {
                    let ms = modules.iter();
                    let ms = ms.map(|x| (x.module.to_string(), x.from_bits, x.to_bits));
                    log.borrow_mut().push((from, to, ms.collect()));
                }
            }),
        );
        let mut run = block_on(w.load_at(Some(0))).unwrap();
        for (from, to) in [(0, last), (last, 1)] {
            let moves = m.moves(from, to);
            let mut changed: std::collections::BTreeMap<String, (u32, u32, &str, u64)> =
                Default::default();
            for mv in &moves {
                let e = changed
                    .entry(mv.id.to_string())
                    .or_insert((mv.from_bits, 0, "", 0));
                (e.1, e.2, e.3) = (mv.to.bits, &mv.to.file.file, mv.to.file.bytes);
            }
            assert!(
                changed.len() < moves.len(),
                "{from} -> {to}: a module moves twice"
            );
            let read = w.source.bytes_read.get();
            block_on(w.execute(&mut run, Decision::move_to(from, to), None)).unwrap();
            assert_eq!(run.step, to);
            assert_eq!(run.session.model.eqm_bits(), m.bits_at(to));
            assert_eq!(
                run.session.model.held_bytes(),
                m.trajectory[to].footprint_bytes + kv
            );
            let (f, t, logged) = swaps.borrow_mut().pop().unwrap();
            assert_eq!((f, t), (from, to));
            if budget.is_none() {
                let want: Vec<_> = changed.iter().map(|(k, v)| (k.clone(), v.0, v.1)).collect();
                let mut got = logged.clone();
                got.sort();
                assert_eq!(got, want, "{from} -> {to}: each module once");
                let files: std::collections::BTreeMap<&str, u64> =
                    changed.values().map(|v| (v.2, v.3)).collect();
                assert_eq!(
                    w.source.bytes_read.get() - read,
                    files.values().sum::<u64>()
                );
            } else {
                assert_eq!(logged.len(), moves.len(), "{from} -> {to}: every move");
            }
            assert_same_as_a_fresh_load(&w, &mut run, &format!("{from} -> {to}"));
        }
    }
}
