//! What an ensemble needs before it is loaded (`Engine.inspect`): its trajectory with
//! footprints, perplexities and mean bits, the KV cache per token, the least and most memory a
//! given context needs, and what it downloads; and, given which files a cache holds, which
//! steps run offline (`Engine.cached`).

use crate::ensemble::manifest::{FileRef, Manifest};
use crate::model::weights::ModuleId;
use crate::runtime::backend::{kv_cache_bytes, KvChoice};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepInfo {
    pub step: usize,
    pub footprint_bytes: u64,
    /// Held-out perplexity (calibration when the builder measured no step on held-out text:
    /// one scale for the whole trajectory); interpolated where not measured
    /// (`Manifest::step_perplexity`).
    pub perplexity: Option<f64>,
    pub measured: bool,
    /// Mean bits per weight over the modules (parameter-weighted).
    pub mean_bits: f64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Inspection {
    pub name: String,
    pub layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub max_context: usize,
    pub n_up: u32,
    pub n_low: u32,
    pub group_size: usize,
    pub trajectory: Vec<StepInfo>,
    /// How the KV cache these totals are for stores keys and values (the engine's `kvCache`).
    pub kv_cache: KvChoice,
    /// KV cache bytes per position (keys and values, every layer: both backends'
    /// `runtime::backend::kv_cache_bytes`) in the format the cache starts in.
    pub kv_bytes_per_token: u64,
    /// The context these totals are for, and its KV cache in the format it starts in.
    pub context: usize,
    pub kv_bytes: u64,
    /// That cache in the smallest format the choice reaches (`auto`: int8 under pressure).
    pub min_kv_bytes: u64,
    /// The smallest step's footprint plus `min_kv_bytes`, and the largest step's plus
    /// `kv_bytes` (activations come on top: a few MB).
    pub min_total_bytes: u64,
    pub max_total_bytes: u64,
    /// Every file once (what a full cache holds), and what the first load fetches (step 0,
    /// base, tokenizer; whole packs where files are packed).
    pub download_bytes: u64,
    pub first_load_bytes: u64,
}

/// Step 0's module files, then each later step's change: (module index, old file, new file).
/// Linear in the manifest (no per-step copy of every module's file).
type Changes<'a> = Vec<Option<(usize, &'a FileRef)>>;

fn step_changes(m: &Manifest) -> (Vec<&FileRef>, Changes<'_>) {
    let file = |i: usize, b: u32| {
        m.version(ModuleId::from_index(i), b)
            .map(|v| &v.file)
            .expect("validated: every step's versions exist")
    };
    let first = (0..m.n_modules()).map(|i| file(i, m.n_up)).collect();
    let changes = m
        .trajectory
        .iter()
        .map(|step| {
            step.swap.as_ref().map(|sw| {
                let i = ModuleId {
                    layer: sw.layer,
                    kind: sw.kind,
                }
                .index();
                (i, file(i, sw.to_bits))
            })
        })
        .collect();
    (first, changes)
}

pub fn inspect(m: &Manifest, context: usize, kv_cache: KvChoice) -> Inspection {
    let c = &m.config;
    let context = context.clamp(1, c.max_position_embeddings);
    let kv_per_token = kv_cache_bytes(c, kv_cache.start(), 1);
    let kv = kv_cache_bytes(c, kv_cache.start(), context);
    let min_kv = kv_cache_bytes(c, kv_cache.smallest(), context);
    let ppl = m.step_perplexity();
    let measured = m.measured_perplexity();
    let params: Vec<u64> = (0..m.n_modules())
        .map(|i| {
            let (r, k) = ModuleId::from_index(i).kind.shape(c);
            (r * k) as u64
        })
        .collect();
    let total_params: u64 = params.iter().sum();
    let mut bits = vec![m.n_up; m.n_modules()];
    let trajectory = m
        .trajectory
        .iter()
        .enumerate()
        .map(|(s, step)| {
            if let Some(sw) = &step.swap {
                bits[ModuleId {
                    layer: sw.layer,
                    kind: sw.kind,
                }
                .index()] = sw.to_bits;
            }
            let weighted: u64 = bits.iter().zip(&params).map(|(&b, &p)| b as u64 * p).sum();
            StepInfo {
                step: s,
                footprint_bytes: step.footprint_bytes,
                perplexity: ppl[s],
                measured: measured(step).is_some(),
                mean_bits: weighted as f64 / total_params.max(1) as f64,
            }
        })
        .collect::<Vec<_>>();
    let all: BTreeSet<(&str, u64)> = m
        .modules
        .iter()
        .map(|v| (v.file.file.as_str(), v.file.bytes))
        .chain([&m.base, &m.tokenizer].map(|f| (f.file.as_str(), f.bytes)))
        .collect();
    let (step0, _) = step_changes(m);
    let first = m.network_bytes(step0.into_iter().chain([&m.base, &m.tokenizer]));
    Inspection {
        name: m.name.clone(),
        layers: c.num_hidden_layers,
        hidden_size: c.hidden_size,
        vocab_size: c.vocab_size,
        max_context: c.max_position_embeddings,
        n_up: m.n_up,
        n_low: m.n_low,
        group_size: m.quantizer.group_size,
        kv_cache,
        kv_bytes_per_token: kv_per_token,
        context,
        kv_bytes: kv,
        min_kv_bytes: min_kv,
        min_total_bytes: trajectory.last().map_or(0, |s| s.footprint_bytes) + min_kv,
        max_total_bytes: trajectory.first().map_or(0, |s| s.footprint_bytes) + kv,
        download_bytes: all.iter().map(|(_, b)| b).sum(),
        first_load_bytes: first,
        trajectory,
    }
}

/// What a cache holds of an ensemble (`Engine.cached`).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CacheReport {
    pub files: usize,
    pub cached_files: usize,
    pub total_bytes: u64,
    pub cached_bytes: u64,
    /// Steps whose every file (modules, base, tokenizer) is cached: they load offline.
    pub complete_steps: Vec<usize>,
}

/// The report for a cache holding the files for which `held(file)` is true.
pub fn cache_report(m: &Manifest, held: impl Fn(&FileRef) -> bool) -> CacheReport {
    let mut unique: BTreeMap<(&str, &str), &FileRef> = BTreeMap::new();
    for f in m
        .modules
        .iter()
        .map(|v| &v.file)
        .chain([&m.base, &m.tokenizer])
    {
        unique.insert((f.file.as_str(), f.sha256.as_str()), f);
    }
    let cached: BTreeSet<(&str, &str)> = unique
        .iter()
        .filter(|(_, f)| held(f))
        .map(|(k, _)| *k)
        .collect();
    let has = |f: &FileRef| cached.contains(&(f.file.as_str(), f.sha256.as_str()));
    let shared = has(&m.base) && has(&m.tokenizer);
    let (mut files, changes) = step_changes(m);
    let mut missing = files.iter().filter(|f| !has(f)).count();
    let mut complete_steps = Vec::new();
    for (s, change) in changes.into_iter().enumerate() {
        if let Some((i, new)) = change {
            missing -= usize::from(!has(files[i]));
            missing += usize::from(!has(new));
            files[i] = new;
        }
        if shared && missing == 0 {
            complete_steps.push(s);
        }
    }
    CacheReport {
        files: unique.len(),
        cached_files: cached.len(),
        total_bytes: unique.values().map(|f| f.bytes).sum(),
        cached_bytes: unique
            .iter()
            .filter(|(k, _)| cached.contains(*k))
            .map(|(_, f)| f.bytes)
            .sum(),
        complete_steps,
    }
}
