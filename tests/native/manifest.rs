//! The manifest reader rejects every kind of bad manifest with a clear error.

use flexquant::ensemble::base::base_bytes;
use flexquant::ensemble::format::PackedShape;
use flexquant::ensemble::manifest::{
    sha256_hex, ChatSpec, FileRef, Manifest, ModuleVersion, Pack, PackSlice, Quantizer, Step, Swap,
};
use flexquant::model::tiny::tiny_config;
use flexquant::model::{ModuleId, ModuleKind};
use flexquant::runtime::backend::KvChoice;

fn file(name: &str, bytes: u64) -> FileRef {
    FileRef {
        file: name.into(),
        bytes,
        sha256: sha256_hex(name.as_bytes()),
        pack: None,
    }
}

/// A valid manifest for the tiny config: every module at 4, 3 and 2 bits; the trajectory lowers
/// modules one at a time, 4 -> 3 everywhere, then 3 -> 2.
fn sample() -> Manifest {
    let config = tiny_config();
    let group = 32;
    let mut modules = Vec::new();
    for i in 0..config.num_hidden_layers * 7 {
        let id = ModuleId::from_index(i);
        let (r, c) = id.kind.shape(&config);
        for bits in [4, 3, 2] {
            let bytes = PackedShape::new(r, c, bits, group).unwrap().bytes() as u64;
            modules.push(ModuleVersion {
                layer: id.layer,
                kind: id.kind,
                bits,
                file: file(
                    &format!("modules/L{}.{}.{bits}.bin", id.layer, id.kind.name()),
                    bytes,
                ),
                levels: None,
            });
        }
    }
    let mut m = Manifest {
        format: "flexquant-ensemble".into(),
        version: 1,
        name: "tiny".into(),
        config: config.clone(),
        tokenizer: file("tokenizer.json", 1000),
        chat: ChatSpec {
            template: "chatml".into(),
            jinja: None,
            default_system: None,
            bos: Some(1),
            stop: vec![2],
        },
        base: file("base.bin", base_bytes(&config, group).unwrap() as u64),
        base_precision: "q8".into(),
        quantizer: Quantizer {
            method: "rtn".into(),
            group_size: group,
            calibration: serde_json::Value::Null,
        },
        n_up: 4,
        n_low: 2,
        modules,
        trajectory: vec![],
        packs: vec![],
        build: serde_json::Value::Null,
    };
    let n = m.n_modules();
    let mut bits = vec![4u32; n];
    let foot = |m: &Manifest, bits: &[u32]| {
        m.base.bytes
            + (0..n)
                .map(|i| {
                    m.version(ModuleId::from_index(i), bits[i])
                        .unwrap()
                        .file
                        .bytes
                })
                .sum::<u64>()
    };
    m.trajectory.push(Step {
        swap: None,
        footprint_bytes: foot(&m, &bits),
        calib_ppl: Some(10.0),
        heldout_ppl: Some(11.0),
    });
    for to in [3, 2] {
        for i in 0..n {
            let id = ModuleId::from_index(i);
            let swap = Swap {
                layer: id.layer,
                kind: id.kind,
                from_bits: bits[i],
                to_bits: to,
            };
            bits[i] = to;
            m.trajectory.push(Step {
                swap: Some(swap),
                footprint_bytes: foot(&m, &bits),
                calib_ppl: Some(10.5),
                heldout_ppl: None,
            });
        }
    }
    m
}

fn reject(m: &Manifest, needle: &str) {
    let e = Manifest::from_bytes("manifest.json", m.to_json().as_bytes())
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("manifest.json") && e.contains(needle),
        "expected {needle:?} in: {e}"
    );
}

#[test]
fn valid_manifest_round_trips() {
    let m = sample();
    let back = Manifest::from_bytes("manifest.json", m.to_json().as_bytes()).unwrap();
    assert_eq!(back, m);
    assert_eq!(m.bits_at(0), vec![4; 14]);
    assert_eq!(m.bits_at(m.trajectory.len() - 1), vec![2; 14]);
    assert_eq!(m.bits_at(15)[0], 2);
    assert_eq!(m.bits_at(15)[1], 3);
}

#[test]
fn mutated_manifests_are_rejected() {
    let mut m = sample();
    m.version = 7;
    reject(&m, "manifest version 7 is not supported");

    let mut m = sample();
    m.modules
        .retain(|v| !(v.layer == 1 && v.kind == ModuleKind::Up && v.bits == 2));
    reject(&m, "no shard for L1.up at 2 bits");

    let mut m = sample();
    m.modules[5].file.bytes += 4;
    reject(&m, "but a");

    let mut m = sample();
    m.modules[0].file.sha256 = "xyz".into();
    reject(&m, "not 64 hex digits");

    let mut m = sample();
    m.trajectory.swap(3, 4);
    reject(&m, "footprint");

    let mut m = sample();
    let last = m.trajectory.len() - 1;
    m.trajectory.truncate(last);
    reject(&m, "ends before QM(n_low = 2)");

    let mut m = sample();
    m.trajectory[2].swap.as_mut().unwrap().to_bits = 4;
    reject(&m, "");

    let mut m = sample();
    m.trajectory[1].footprint_bytes += 1;
    reject(&m, "step 1: footprint");

    let mut m = sample();
    m.base.bytes = 1 << 40;
    reject(&m, "absurd size");

    let mut m = sample();
    m.base.bytes -= 4;
    reject(&m, "but the base of this model is");

    let mut m = sample();
    m.chat.stop = vec![100_000];
    reject(&m, "exceed the vocabulary");

    let mut m = sample();
    m.chat.template = "jinja".into();
    reject(&m, "chat template \"jinja\" without a `jinja` source");

    let mut m = sample();
    m.chat.template = "jinja".into();
    m.chat.jinja = Some("{% for m in messages %}{{ m.content }}".into());
    reject(
        &m,
        "chat.jinja: the chat template does not compile: syntax error",
    );

    let mut m = sample();
    m.chat.template = "jinja".into();
    m.chat.jinja = Some("x".repeat(300 << 10));
    reject(&m, "chat.jinja is longer than");

    let mut m = sample();
    m.modules[0].file.file = "../../etc/passwd".into();
    reject(&m, "unsafe file name");

    let mut m = sample();
    m.n_low = 5;
    reject(&m, "not a valid range");

    let mut m = sample();
    m.trajectory[3].calib_ppl = Some(f64::NAN);
    let json = m.to_json(); // NaN serializes as null: accepted as "not measured"
    assert!(Manifest::from_bytes("manifest.json", json.as_bytes()).is_ok());

    let e = Manifest::from_bytes("m.json", b"{\"format\": \"something-else\"}").unwrap_err();
    assert!(e.to_string().contains("not a flexquant-ensemble manifest"));
    let e = Manifest::from_bytes("m.json", b"{ truncated").unwrap_err();
    assert!(e.to_string().starts_with("m.json"));
    let mut json = sample().to_json();
    json = json.replace("\"kind\": \"up\"", "\"kind\": \"sideways\"");
    let e = Manifest::from_bytes("m.json", json.as_bytes())
        .unwrap_err()
        .to_string();
    assert!(e.contains("sideways"), "{e}");
}

#[test]
fn verify_file_checks_size_then_hash() {
    let body = b"shard bytes".to_vec();
    let f = FileRef {
        file: "s.bin".into(),
        bytes: body.len() as u64,
        sha256: sha256_hex(&body),
        pack: None,
    };
    Manifest::verify_file(&f, &body).unwrap();
    let e = Manifest::verify_file(&f, &body[..5])
        .unwrap_err()
        .to_string();
    assert!(e.contains("s.bin") && e.contains("truncated"), "{e}");
    let mut bad = body.clone();
    bad[0] ^= 1;
    let e = Manifest::verify_file(&f, &bad).unwrap_err().to_string();
    assert!(e.contains("does not match"), "{e}");
}

/// Shapes are bounded so that no size derived from a manifest can wrap a 32-bit usize (wasm32).
#[test]
fn packed_shapes_are_bounded() {
    use flexquant::ensemble::format::{PackedShape, MAX_WEIGHTS};
    let big = PackedShape::new(1 << 20, 1 << 20, 8, 64)
        .unwrap_err()
        .to_string();
    assert!(big.contains("weights"), "{big}");
    let edge = PackedShape::new(1 << 16, 1 << 15, 8, 128).unwrap();
    assert_eq!((edge.rows * edge.cols) as u64, MAX_WEIGHTS);
    assert!(edge.bytes() as u64 <= u32::MAX as u64, "{}", edge.bytes());
    assert!(PackedShape::new(0, 64, 4, 64).is_err());
    assert!(PackedShape::new(64, 64, 7, 64).is_err());
    assert!(PackedShape::new(64, 64, 4, 48).is_err());
}

/// The fuzz mutator over a valid manifest: every mutant is read without a panic, and every
/// rejection names the file (the full-scale run is `./build.sh fuzz`).
#[test]
fn mutants_of_a_valid_manifest_never_panic() {
    use flexquant::fuzz::{mutate::Mutator, targets};
    let json = sample().to_json().into_bytes();
    let mut m = Mutator::new(1, json.len() * 2 + 4096);
    let (mut out, mut ok) = (Vec::new(), 0);
    for _ in 0..3000 {
        m.mutate(&json, &json, true, &mut out);
        match targets::manifest(&out) {
            Ok(()) => ok += 1,
            Err(e) => assert!(e.to_string().starts_with("manifest.json"), "{e}"),
        }
    }
    assert!(ok > 0 && ok < 3000, "{ok} of 3000 accepted");
}

/// The ensemble's tokenizer and the manifest's config must agree: a tokenizer with more tokens
/// than the model has embeddings is refused, naming the tokenizer file.
#[test]
fn a_tokenizer_larger_than_the_models_vocabulary_is_refused() {
    use flexquant::model::tokenizer::byte_level_bpe_json;
    let m = sample();
    let vocab = m.config.vocab_size;
    let json = |n: usize| {
        let tokens: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
        byte_level_bpe_json(&tokens, &[], &[], false).to_string()
    };
    m.tokenizer(json(vocab).as_bytes()).unwrap();
    let e = m
        .tokenizer(json(vocab + 41).as_bytes())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.starts_with("tokenizer.json") && e.contains("more than"),
        "{e}"
    );
}

/// The quality floor's perplexity per step: measured where the builder measured, linear in
/// footprint between, unknown past the last measured step; `floor_for_perplexity` takes the
/// deepest step whose run from step 0 stays within the bound. One scale: held-out figures
/// when there are any (a full-preset build also records every step's calibration ppl, on
/// another scale), the calibration ones only when there are none.
#[test]
fn step_perplexity_interpolates_and_floors_follow_it() {
    let mut m = sample();
    let n = m.trajectory.len();
    assert!(n > 4);
    for s in &mut m.trajectory {
        s.heldout_ppl = None;
        // Calibration text scores higher than held-out text (52 against 23 on the demo).
        s.calib_ppl = Some(50.0);
    }
    m.trajectory[0].heldout_ppl = Some(10.0);
    m.trajectory[2].heldout_ppl = Some(20.0);
    let calib_only = {
        let mut c = m.clone();
        c.trajectory.iter_mut().for_each(|s| s.heldout_ppl = None);
        c
    };
    assert!(calib_only
        .step_perplexity()
        .iter()
        .all(|&p| p == Some(50.0)));
    assert_eq!(calib_only.floor_for_perplexity(50.0).unwrap(), n - 1);
    let p = m.step_perplexity();
    let (f0, f1, f2) = (
        m.trajectory[0].footprint_bytes as f64,
        m.trajectory[1].footprint_bytes as f64,
        m.trajectory[2].footprint_bytes as f64,
    );
    assert_eq!(p[0], Some(10.0));
    assert!((p[1].unwrap() - (10.0 + 10.0 * (f0 - f1) / (f0 - f2))).abs() < 1e-9);
    assert_eq!(p[2], Some(20.0));
    assert!(
        p[3..].iter().all(|p| p.is_none()),
        "past the last measured step"
    );
    assert_eq!(m.floor_for_perplexity(20.0).unwrap(), 2);
    assert_eq!(
        m.floor_for_perplexity(1e9).unwrap(),
        2,
        "never past the measured"
    );
    assert_eq!(m.floor_for_perplexity(10.0).unwrap(), 0);
    for bad in [9.0, 0.0, f64::NAN] {
        assert!(m.floor_for_perplexity(bad).is_err(), "{bad}");
    }
}

/// `inspect`: totals from the manifest alone; `cache_report`: a step is complete exactly when
/// every file it runs on (its module versions, base, tokenizer) is held.
#[test]
fn inspection_and_cache_report_follow_the_trajectory() {
    use flexquant::runtime::inspect::{cache_report, inspect};
    let m = sample();
    let n = m.n_modules();
    let last = m.trajectory.len() - 1;
    let i = inspect(&m, 64, KvChoice::F16);
    let c = &m.config;
    // Keys and values in f16, every layer.
    assert_eq!(
        i.kv_bytes_per_token,
        4 * (c.num_hidden_layers * c.kv_dim()) as u64
    );
    assert_eq!(i.kv_bytes, 64 * i.kv_bytes_per_token);
    // In int8: per layer, K and V, KV head: head_dim codes and a 4-byte scale per group of 32
    // (or per head when head_dim is not a multiple of 32).
    let i8 = inspect(&m, 64, KvChoice::Int8);
    let hd = c.head_dim();
    let groups = if hd.is_multiple_of(32) { hd / 32 } else { 1 };
    let per_head = (hd + 4 * groups) as u64;
    let want = 2 * (c.num_hidden_layers * c.n_kv_heads()) as u64 * per_head;
    assert_eq!((i8.kv_cache, i8.kv_bytes_per_token), (KvChoice::Int8, want));
    assert_eq!(
        i.min_total_bytes,
        m.trajectory[last].footprint_bytes + i.kv_bytes
    );
    // `auto` (the default) starts in f16 and may go to int8: the least memory is int8's.
    let auto = inspect(&m, 64, KvChoice::Auto);
    assert_eq!(
        (auto.kv_bytes, auto.min_kv_bytes, i.min_kv_bytes),
        (i.kv_bytes, i8.kv_bytes, i.kv_bytes)
    );
    assert_eq!(
        (auto.min_total_bytes, auto.max_total_bytes),
        (
            m.trajectory[last].footprint_bytes + i8.kv_bytes,
            i.max_total_bytes
        )
    );
    assert_eq!(
        i.max_total_bytes,
        m.trajectory[0].footprint_bytes + i.kv_bytes
    );
    assert_eq!(
        (i.trajectory[0].mean_bits, i.trajectory[last].mean_bits),
        (4.0, 2.0)
    );
    assert!((i.trajectory[n].mean_bits - 3.0).abs() < 1e-12);
    assert_eq!(
        i.first_load_bytes,
        m.trajectory[0].footprint_bytes + m.tokenizer.bytes
    );
    let every: u64 = m.modules.iter().map(|v| v.file.bytes).sum::<u64>() + m.base.bytes;
    assert_eq!(i.download_bytes, every + m.tokenizer.bytes);
    assert_eq!(
        inspect(&m, 1 << 30, KvChoice::F16).context,
        c.max_position_embeddings
    );

    let all = cache_report(&m, |_| true);
    assert_eq!(all.complete_steps, (0..=last).collect::<Vec<_>>());
    assert_eq!(
        (all.cached_files, all.cached_bytes),
        (all.files, all.total_bytes)
    );
    assert!(cache_report(&m, |_| false).complete_steps.is_empty());
    let no_tokenizer = cache_report(&m, |f| f.file != m.tokenizer.file);
    assert!(no_tokenizer.complete_steps.is_empty());
    // Module 0's 3-bit version missing: the steps that run it (from its 4 -> 3 swap at step 1
    // until its 3 -> 2 swap at step n + 1) are incomplete, the others complete.
    let v3 = &m.version(ModuleId::from_index(0), 3).unwrap().file;
    let r = cache_report(&m, |f| f != v3);
    let want: Vec<usize> = [0].into_iter().chain(n + 1..=last).collect();
    assert_eq!(r.complete_steps, want);
    assert_eq!(r.cached_bytes, all.total_bytes - v3.bytes);
}

/// `sample()` with its files packed (`ensemble::pack::plan`) into packs of about `target`
/// bytes, as the builder writes them.
fn packed_sample(target: u64) -> Manifest {
    let mut m = sample();
    m.version = 2;
    for (k, members) in flexquant::ensemble::pack::plan(&m, target)
        .iter()
        .enumerate()
    {
        let name = format!("packs/{k}.bin");
        let mut at = 0;
        for &member in members {
            let f = member.file_mut(&mut m);
            f.pack = Some(PackSlice {
                pack: name.clone(),
                offset: at,
            });
            at += f.bytes;
        }
        m.packs.push(Pack {
            file: name,
            bytes: at,
        });
    }
    m
}

#[test]
fn packs_tile_exactly_and_need_version_2() {
    let m = packed_sample(12000);
    assert!(m.packs.len() > 3, "{} packs", m.packs.len());
    let back = Manifest::from_bytes("manifest.json", m.to_json().as_bytes()).unwrap();
    assert_eq!(back, m);
    // Step 0's packs hold only step 0's files: the first load fetches what it did unpacked;
    // a swap's pack brings more than its file.
    let (packed, plain) = {
        use flexquant::runtime::inspect::inspect;
        (
            inspect(&m, 64, KvChoice::F16),
            inspect(&sample(), 64, KvChoice::F16),
        )
    };
    assert_eq!(packed.first_load_bytes, plain.first_load_bytes);
    assert_eq!(packed.download_bytes, plain.download_bytes);
    let pack_of = |v: &ModuleVersion| m.pack(&v.file.pack.as_ref().unwrap().pack).unwrap();
    let v = m
        .modules
        .iter()
        .find(|v| v.bits < 4 && pack_of(v).bytes > v.file.bytes)
        .expect("a pack of several lower versions");
    assert_eq!(m.network_bytes([&v.file, &v.file]), pack_of(v).bytes);
    // Version 1 (no packs) is still read; packs in version 1 are not.
    let mut v1 = sample();
    v1.version = 1;
    Manifest::from_bytes("manifest.json", v1.to_json().as_bytes()).unwrap();
    let mut bad = m.clone();
    bad.version = 1;
    reject(&bad, "packs need manifest version 2");
    let mut v3 = m.clone();
    v3.version = 3;
    Manifest::from_bytes("manifest.json", v3.to_json().as_bytes()).unwrap();
    let mut bad = m.clone();
    bad.version = 5;
    reject(
        &bad,
        "manifest version 5 is not supported (this runtime reads versions 1 to 4)",
    );

    let slice = |m: &mut Manifest, i: usize| m.modules[i].file.pack.clone().unwrap();
    // A file past its pack's end, a gap, an overlap, an unknown pack, a pack listed twice.
    let mut bad = m.clone();
    bad.packs[0].bytes += 1;
    reject(&bad, "its files end at byte");
    let mut bad = m.clone();
    let s = slice(&mut bad, 0);
    bad.modules[0].file.pack = Some(PackSlice {
        offset: s.offset + 1,
        ..s
    });
    reject(&bad, "(a gap or overlap)");
    let mut bad = m.clone();
    bad.modules[0].file.pack = Some(PackSlice {
        pack: "packs/none.bin".into(),
        offset: 0,
    });
    reject(&bad, "pack packs/none.bin is not listed");
    let mut bad = m.clone();
    bad.packs.push(bad.packs[0].clone());
    reject(&bad, "is listed twice");
    let mut bad = m.clone();
    bad.packs[1].file = "../escape.bin".into();
    reject(&bad, "unsafe file name");
}

#[test]
fn pack_plan_puts_first_use_first() {
    let m = packed_sample(3000);
    let pack_of = |v: &ModuleVersion| {
        let p = &v.file.pack.as_ref().unwrap().pack;
        m.packs.iter().position(|x| &x.file == p).unwrap()
    };
    // A cold load's files (base, tokenizer, step 0's versions) fill the first packs; lower
    // versions follow in the order the trajectory swaps them in.
    let pack_index = |f: &flexquant::ensemble::manifest::FileRef| {
        let p = &f.pack.as_ref().unwrap().pack;
        m.packs.iter().position(|x| &x.file == p).unwrap()
    };
    let last_up = m.modules.iter().filter(|v| v.bits == 4).map(pack_of).max();
    let first_low = m.modules.iter().filter(|v| v.bits < 4).map(pack_of).min();
    assert!(last_up < first_low);
    assert_eq!(pack_index(&m.base), 0, "the base first");
    assert!(Some(pack_index(&m.tokenizer)) <= last_up);
    let order: Vec<usize> = m.trajectory[1..]
        .iter()
        .map(|s| {
            let w = s.swap.as_ref().unwrap();
            let id = ModuleId {
                layer: w.layer,
                kind: w.kind,
            };
            pack_of(m.version(id, w.to_bits).unwrap())
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "{order:?}");
    // The cold load's files in FIRST_LOAD_PACKS packs of about equal size (more when they
    // would pass the largest size); lower packs no more than half a file above their size.
    use flexquant::ensemble::pack::{plan, Member, FIRST_LOAD_PACKS};
    let first_bytes: u64 = m
        .modules
        .iter()
        .filter(|v| v.bits == 4)
        .map(|v| v.file.bytes)
        .sum::<u64>()
        + m.base.bytes
        + m.tokenizer.bytes;
    let biggest = m.all_files().map(|f| f.bytes).max().unwrap();
    let n = last_up.unwrap() + 1;
    // (Files bigger than a pack's share make fewer, not more.)
    let want = FIRST_LOAD_PACKS.max(first_bytes.div_ceil(3000));
    assert!(
        (FIRST_LOAD_PACKS.min(want)..=want).contains(&(n as u64)),
        "{n} of {want}"
    );
    for p in &m.packs[..n] {
        assert!(p.bytes <= first_bytes / want + biggest, "{p:?}");
    }
    for p in &m.packs[n..] {
        assert!(p.bytes <= 3000 + biggest / 2, "{p:?}");
    }
    let roomy = plan(&sample(), 1 << 30);
    let m0 = sample();
    let up_packs = roomy
        .iter()
        .filter(|members| {
            members.iter().all(|&f| match f {
                Member::Module(i) => m0.modules[i].bits == 4,
                Member::Base | Member::Tokenizer => true,
            })
        })
        .count();
    assert_eq!(up_packs as u64, FIRST_LOAD_PACKS);
}

/// `sample()` with nested modules: one bit-plane file per module holding levels 2, 3 and 4.
fn planes_sample() -> Manifest {
    use flexquant::ensemble::planes::PlaneShape;
    let mut m = sample();
    m.version = 4;
    let c = m.config.clone();
    for v in m.modules.iter_mut() {
        let (r, cols) = v.kind.shape(&c);
        let bytes = PlaneShape::new(r, cols, 32, &[2, 3, 4]).unwrap().bytes() as u64;
        v.file = file(
            &format!("modules/L{}.{}.planes.bin", v.layer, v.kind.name()),
            bytes,
        );
        v.levels = Some(vec![2, 3, 4]);
    }
    m
}

#[test]
fn bit_plane_versions_share_one_file_per_module_and_are_checked() {
    let m = planes_sample();
    let back = Manifest::from_bytes("manifest.json", m.to_json().as_bytes()).unwrap();
    assert_eq!(back, m);
    // Footprints are the levels' packed sizes (unchanged from `sample`), storage counts each
    // file once: the 4-bit packed bytes plus two more sets of scales per module.
    let plain = sample();
    assert_eq!(
        m.trajectory
            .iter()
            .map(|s| s.footprint_bytes)
            .collect::<Vec<_>>(),
        plain
            .trajectory
            .iter()
            .map(|s| s.footprint_bytes)
            .collect::<Vec<_>>()
    );
    let files: u64 = (0..m.n_modules())
        .map(|i| m.version(ModuleId::from_index(i), 4).unwrap().file.bytes)
        .sum();
    assert_eq!(m.storage_bytes(), m.base.bytes + m.tokenizer.bytes + files);
    assert!(m.storage_bytes() < plain.storage_bytes());
    let all: Vec<&FileRef> = m.modules.iter().map(|v| &v.file).collect();
    assert_eq!(m.network_bytes(all), files);

    let mut bad = m.clone();
    bad.version = 2;
    reject(&bad, "bit-plane files need manifest version 4, not 2");
    // Version 3's plane files (two-byte grids) are refused with what to do.
    bad.version = 3;
    reject(
        &bad,
        "version 3 stored two-byte grids, which this runtime no longer reads: rebuild",
    );
    // The versions of one module must name their file identically.
    let mut bad = m.clone();
    bad.modules[1].levels = Some(vec![3, 4]);
    reject(&bad, "is used twice");
    let mut bad = m.clone();
    bad.modules[1].file.sha256 = "0".repeat(64);
    reject(&bad, "is used twice");
    // One module's file is not another's.
    let mut bad = m.clone();
    bad.modules[3].file = bad.modules[0].file.clone();
    reject(&bad, "is used twice");
    // An ordinary version may not share a file either.
    let mut bad = m.clone();
    bad.modules[1].levels = None;
    reject(&bad, "is used twice");
    // Levels must hold the version's bits, within n_low..=n_up, ascending; sizes exact.
    let mut bad = m.clone();
    for v in bad.modules.iter_mut().take(3) {
        v.levels = Some(vec![2, 3]);
    }
    reject(&bad, "must hold 4 bits");
    let mut bad = m.clone();
    for v in bad.modules.iter_mut().take(3) {
        v.levels = Some(vec![2, 3, 4, 5]);
    }
    reject(&bad, "lie in n_low..=n_up");
    let mut bad = m.clone();
    for v in bad.modules.iter_mut().take(3) {
        v.levels = Some(vec![4, 3, 2]);
    }
    reject(&bad, "distinct and ascending");
    let mut bad = m.clone();
    for v in bad.modules.iter_mut().take(3) {
        v.file.bytes += 4;
    }
    reject(&bad, "bytes, but a");
}
