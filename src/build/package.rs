//! Writes an ensemble directory (atomically: a temp directory renamed into place) and reads
//! EQMs back from one.

use crate::build::search::Trajectory;
use crate::ensemble::base::Base;
use crate::ensemble::format::PackedMatrix;
use crate::ensemble::manifest::{
    sha256_hex, ChatSpec, FileRef, Manifest, ModuleVersion, Quantizer, Step, Swap, FORMAT,
    PLANES_VERSION,
};
use crate::ensemble::{pack, planes};
use crate::error::{Error, Result};
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::{ModuleId, Weights};
use crate::quant::eqm::{Eqm, EqmModel};
use crate::quant::weights::rtn_base;
pub use crate::runtime::dir::{read_manifest, read_verified};
use std::collections::BTreeSet;
use std::path::Path;

pub struct PackageInput<'a> {
    pub name: String,
    /// The float model the library was built from.
    pub weights: &'a Weights,
    pub tokenizer: &'a Tokenizer,
    pub model: &'a EqmModel,
    pub trajectory: &'a Trajectory,
    pub start: &'a Eqm,
    /// Held-out ppl per step where measured.
    pub heldout: &'a [Option<f64>],
    pub n_up: u32,
    pub n_low: u32,
    pub calibration: serde_json::Value,
    pub build: serde_json::Value,
    /// Pack the module versions into files of about this many bytes (`ensemble::pack`);
    /// 0 writes one file per version (manifest version 1).
    pub pack_bytes: u64,
}

/// The tokenizer's chat template as the manifest carries it: the model's Jinja source, or
/// "chatml" when it has none (the runtime then warns, as the native CLI does).
pub fn chat_spec(t: &Tokenizer) -> ChatSpec {
    let jinja = t.chat.source().map(str::to_string);
    ChatSpec {
        template: if jinja.is_some() { "jinja" } else { "chatml" }.into(),
        jinja,
        default_system: None,
        bos: t.bos,
        stop: t.stop.clone(),
    }
}

fn put(dir: &Path, name: &str, bytes: &[u8]) -> Result<FileRef> {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
    Ok(FileRef {
        file: name.into(),
        bytes: bytes.len() as u64,
        sha256: sha256_hex(bytes),
        pack: None,
    })
}

pub fn module_file(id: ModuleId, bits: u32) -> String {
    format!("modules/L{}.{}.{bits}.bin", id.layer, id.kind.name())
}

/// The bit-plane file of a nested module (`ensemble::planes`): all its kept levels.
pub fn planes_file(id: ModuleId) -> String {
    format!("modules/L{}.{}.planes.bin", id.layer, id.kind.name())
}

/// Writes the ensemble into `out` (replacing it only once everything is written and checked).
pub fn write_ensemble(out: &Path, p: &PackageInput) -> Result<Manifest> {
    let lib = &p.model.library;
    let group = lib.manifest.group;
    let tmp = out.with_file_name(format!(
        "{}.tmp-{}",
        out.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("ensemble"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;

    let eqms = p.trajectory.eqms(p.start);
    let used: BTreeSet<(usize, u32)> = eqms
        .iter()
        .flat_map(|e| e.bits.iter().copied().enumerate())
        .collect();
    let planes = lib.manifest.nesting.is_some();
    let mut modules = Vec::with_capacity(used.len());
    for i in 0..lib.module_count() {
        let id = ModuleId::from_index(i);
        // Ascending, as bit-plane files list their levels.
        let levels: Vec<u32> = used.range((i, 0)..(i + 1, 0)).map(|&(_, b)| b).collect();
        if planes {
            // Nested versions: one bit-plane file per module, every level a prefix of it.
            let mats = levels
                .iter()
                .map(|&b| lib.load(id, b))
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<&PackedMatrix> = mats.iter().collect();
            let (_, bytes) = planes::encode(&refs, &id.to_string())?;
            let file = put(&tmp, &planes_file(id), &bytes)?;
            modules.extend(levels.iter().map(|&bits| ModuleVersion {
                layer: id.layer,
                kind: id.kind,
                bits,
                file: file.clone(),
                levels: Some(levels.clone()),
            }));
        } else {
            for &bits in &levels {
                let m = lib.load(id, bits)?;
                modules.push(ModuleVersion {
                    layer: id.layer,
                    kind: id.kind,
                    bits,
                    file: put(&tmp, &module_file(id, bits), &m.to_bytes())?,
                    levels: None,
                });
            }
        }
    }
    let base = put(&tmp, "base.bin", &rtn_base(p.weights, group)?.to_bytes())?;
    let tokenizer = put(&tmp, "tokenizer.json", p.tokenizer.to_json()?.as_bytes())?;
    let trajectory = p
        .trajectory
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| Step {
            swap: s.swap.map(|m| {
                let id = ModuleId::from_index(m.module);
                Swap {
                    layer: id.layer,
                    kind: id.kind,
                    from_bits: m.from,
                    to_bits: m.to,
                }
            }),
            footprint_bytes: s.footprint,
            calib_ppl: Some(s.calib_ppl).filter(|v| v.is_finite()),
            heldout_ppl: p.heldout.get(i).copied().flatten(),
        })
        .collect();
    let mut manifest = Manifest {
        format: FORMAT.into(),
        version: if planes { PLANES_VERSION } else { 1 },
        name: p.name.clone(),
        config: p.weights.config.clone(),
        tokenizer,
        chat: chat_spec(p.tokenizer),
        base,
        base_precision: "q8".into(),
        quantizer: Quantizer {
            method: lib.manifest.method_label(),
            group_size: group,
            calibration: p.calibration.clone(),
        },
        n_up: p.n_up,
        n_low: p.n_low,
        modules,
        trajectory,
        packs: Vec::new(),
        build: p.build.clone(),
    };
    if p.pack_bytes > 0 {
        let unpacked = pack::pack_files(&tmp, &mut manifest, p.pack_bytes)?;
        pack::remove_replaced(&unpacked)?;
    }
    let json = manifest.to_json();
    // The reader the browser uses must accept what we wrote.
    Manifest::from_bytes("manifest.json (as written)", json.as_bytes())?;
    put(&tmp, "manifest.json", json.as_bytes())?;
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    Ok(manifest)
}

/// The f32 weights of trajectory step `step`, from the packaged files only (hashes checked).
pub fn load_step_weights(dir: &Path, m: &Manifest, step: usize) -> Result<Weights> {
    let c = &m.config;
    let g = m.quantizer.group_size;
    let base = Base::from_bytes(c, g, &read_verified(dir, &m.base)?, &m.base.file)?;
    let modules = m
        .step_versions(step)
        .iter()
        .map(|v| v.matrix(c, g, &read_verified(dir, &v.file)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(base.to_weights(c, &modules))
}
