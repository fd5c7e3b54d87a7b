//! Hostile-input bounds (issue 14, item 5): manifest validation linear in its size, sizes
//! exact (u64, never wrapped on wasm32), errors that name the file.

use flexquant::ensemble::base::{base_bytes, Base};
use flexquant::ensemble::format::PackedShape;
use flexquant::ensemble::manifest::{
    sha256_hex, ChatSpec, FileRef, Manifest, ModuleVersion, Quantizer, Step, Swap,
    MAX_MANIFEST_BYTES,
};
use flexquant::model::tiny::tiny_config;
use flexquant::model::{LlamaConfig, ModuleId};
use std::time::Instant;

fn file(name: String, bytes: u64) -> FileRef {
    FileRef {
        sha256: sha256_hex(name.as_bytes()),
        file: name,
        bytes,
        pack: None,
    }
}

/// The largest valid manifest the limits allow: 1024 layers, every module at six bit-widths,
/// a trajectory of every swap (35 840 steps), padded to just under `MAX_MANIFEST_BYTES`.
fn huge_manifest() -> Vec<u8> {
    let config = LlamaConfig {
        num_hidden_layers: 1024,
        hidden_size: 64,
        intermediate_size: 64,
        ..tiny_config()
    };
    let (group, bits) = (64, [8, 6, 5, 4, 3, 2]);
    let n = config.num_hidden_layers * 7;
    let size = |i: usize, b: u32| {
        let (r, c) = ModuleId::from_index(i).kind.shape(&config);
        PackedShape::new(r, c, b, group).unwrap().bytes() as u64
    };
    let mut modules = Vec::new();
    for i in 0..n {
        let id = ModuleId::from_index(i);
        for b in bits {
            modules.push(ModuleVersion {
                layer: id.layer,
                kind: id.kind,
                bits: b,
                file: file(
                    format!("m/L{}.{}.{b}.bin", id.layer, id.kind.name()),
                    size(i, b),
                ),
                levels: None,
            });
        }
    }
    let base = base_bytes(&config, group).unwrap() as u64;
    let mut footprint = base + (0..n).map(|i| size(i, 8)).sum::<u64>();
    let mut trajectory = vec![Step {
        swap: None,
        footprint_bytes: footprint,
        calib_ppl: Some(10.0),
        heldout_ppl: Some(11.0),
    }];
    for w in bits.windows(2) {
        for i in 0..n {
            let id = ModuleId::from_index(i);
            footprint = footprint - size(i, w[0]) + size(i, w[1]);
            trajectory.push(Step {
                swap: Some(Swap {
                    layer: id.layer,
                    kind: id.kind,
                    from_bits: w[0],
                    to_bits: w[1],
                }),
                footprint_bytes: footprint,
                calib_ppl: Some(10.5),
                heldout_ppl: Some(11.5),
            });
        }
    }
    let mut m = Manifest {
        format: "flexquant-ensemble".into(),
        version: 1,
        name: "huge".into(),
        config,
        tokenizer: file("tokenizer.json".into(), 1000),
        chat: ChatSpec {
            template: "chatml".into(),
            jinja: None,
            default_system: None,
            bos: Some(1),
            stop: vec![2],
        },
        base: file("base.bin".into(), base),
        base_precision: "q8".into(),
        quantizer: Quantizer {
            method: "rtn".into(),
            group_size: group,
            calibration: serde_json::Value::Null,
        },
        n_up: 8,
        n_low: 2,
        modules,
        trajectory,
        packs: vec![],
        build: serde_json::Value::Null,
    };
    let len = m.to_json().len();
    assert!(len < MAX_MANIFEST_BYTES, "{len}");
    m.build = serde_json::json!({ "pad": "x".repeat(MAX_MANIFEST_BYTES - len - 64) });
    m.to_json().into_bytes()
}

#[test]
fn a_16_mib_manifest_validates_in_under_a_second() {
    let json = huge_manifest();
    assert!(json.len() > MAX_MANIFEST_BYTES - 1024 && json.len() <= MAX_MANIFEST_BYTES);
    let t = Instant::now();
    let m = Manifest::from_bytes("manifest.json", &json).unwrap();
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "{} byte manifest ({} versions, {} steps) validated in {secs:.3} s",
        json.len(),
        m.modules.len(),
        m.trajectory.len()
    );
    assert!(secs < 1.0, "{secs} s");
    // The queries the runtime makes stay linear too.
    let t = Instant::now();
    let last = m.trajectory.len() - 1;
    assert_eq!(m.step_versions(last).len(), 7168);
    assert_eq!(m.moves(0, last).len(), last);
    assert!(t.elapsed().as_secs_f64() < 1.0);
    // One byte more is refused unread, naming the file.
    let mut big = json;
    big.resize(MAX_MANIFEST_BYTES + 1, b' ');
    let e = Manifest::from_bytes("manifest.json", &big).unwrap_err();
    assert!(e.to_string().starts_with("manifest.json"), "{e}");
}

#[test]
fn base_sizes_are_exact_and_errors_name_the_file() {
    let mut c = tiny_config();
    c.num_hidden_layers = 1024;
    c.hidden_size = 1 << 16;
    c.vocab_size = 1 << 15;
    // 2^31 weights per matrix, two matrices (untied): computed in u64, exact natively (on
    // wasm32 it is an error, not a wrapped small size).
    let e = PackedShape::new(1 << 15, 1 << 16, 8, 64).unwrap().bytes() as u64;
    let want = 2 * e + (2 * 1024 + 1) * (1 << 16) * 4;
    assert_eq!(base_bytes(&c, 64).unwrap() as u64, want);
    assert!(want > u32::MAX as u64);
    let e = Base::from_bytes(&tiny_config(), 48, &[0; 16], "base.bin")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.starts_with("base.bin") && e.contains("group size 48"),
        "{e}"
    );
}
