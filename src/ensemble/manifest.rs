//! `manifest.json`: the contract between the native builder and the browser runtime.
//!
//! An ensemble directory holds this manifest, one shard per kept module version (the packed
//! format of `ensemble::format`) or, for nested versions, one bit-plane file per module that
//! every version of it names (`ensemble::planes`, version 3), a base shard (embeddings and
//! norms) and the tokenizer. The
//! trajectory lists EQMs from QM(n_up) (step 0, every module at `n_up` bits) to QM(n_low),
//! each step lowering one module (possibly by more than one bit-width after pruning).
//!
//! Everything here is untrusted input for the browser: `Manifest::from_bytes` checks the format
//! version, every size against caps, file names, that each step's swap refers to a shard that
//! exists and is one-way, that footprints are exactly the sums they claim and monotone, and that
//! the trajectory ends at QM(n_low).

use crate::ensemble::format::{PackedMatrix, PackedShape, BITS, GROUP_SIZES};
use crate::ensemble::planes::{decode_level, PlaneShape};
use crate::error::{Error, Result};
use crate::model::chat::{ChatTemplate, SpecialTokens, TemplateSource};
use crate::model::config::LlamaConfig;
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::{ModuleId, ModuleKind};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

pub const FORMAT: &str = "flexquant-ensemble";
/// The newest version this runtime reads: 4 stores the bit-plane files' lower grids in one byte
/// per group, 3 added nested modules stored as bit-plane files (`ModuleVersion::levels`,
/// `ensemble::planes`, two bytes per group: no longer read), 2 packs (`ensemble::pack`). The
/// builder writes the oldest version that holds what it wrote: 1 for one file per version, 2
/// when packed, 4 with bit-plane files.
pub const VERSION: u32 = 4;
/// The version of the bit-plane files this runtime reads (version 3's are refused).
pub const PLANES_VERSION: u32 = 4;
/// The oldest version this runtime reads.
pub const MIN_VERSION: u32 = 1;
/// Larger manifests are refused unread.
pub const MAX_MANIFEST_BYTES: usize = 16 << 20;
/// A file bigger than this is not a shard of a model this runtime can run.
const MAX_FILE_BYTES: u64 = 4 << 30;
const MAX_STEPS: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRef {
    /// Path relative to the manifest, `/`-separated; for a file in a pack, the name it is
    /// cached and reported under (no such file is served).
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    /// Where the bytes are when the file is stored inside a pack (manifest version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack: Option<PackSlice>,
}

/// A file's place in a pack: `bytes` bytes from `offset` of the pack file `pack`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackSlice {
    pub pack: String,
    pub offset: u64,
}

/// One file holding several files back to back (`ensemble::pack`), fetched whole: a cold load
/// makes a few requests instead of one per module version, with no Range requests. Every byte
/// of a pack belongs to exactly one file, each verified by its own hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pack {
    pub file: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleVersion {
    pub layer: usize,
    pub kind: ModuleKind,
    pub bits: u32,
    #[serde(flatten)]
    pub file: FileRef,
    /// Set when `file` is the module's bit-plane file (`ensemble::planes`, version 3) holding
    /// these levels, ascending: this version is its `bits` level, and every version of the
    /// module names the same file. A step between them downloads nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub levels: Option<Vec<u32>>,
}

impl ModuleVersion {
    pub fn id(&self) -> ModuleId {
        ModuleId {
            layer: self.layer,
            kind: self.kind,
        }
    }

    /// The packed matrix in `bytes` (this version's file, already verified): the shard
    /// itself, or its level decoded from the module's bit-plane file.
    pub fn matrix(&self, c: &LlamaConfig, group: usize, bytes: &[u8]) -> Result<PackedMatrix> {
        let (rows, cols) = self.kind.shape(c);
        match &self.levels {
            Some(levels) => {
                let shape = PlaneShape::new(rows, cols, group, levels)?;
                decode_level(&shape, bytes, self.bits, &self.file.file)
            }
            None => {
                let shape = PackedShape::new(rows, cols, self.bits, group)?;
                PackedMatrix::from_bytes(shape, bytes, &self.file.file)
            }
        }
    }

    /// Bytes of the packed matrix in memory (what a step's footprint counts): the file's size,
    /// or for a bit-plane file its `bits` level's packed size.
    pub fn resident_bytes(&self, c: &LlamaConfig, group: usize) -> Result<u64> {
        let (rows, cols) = self.kind.shape(c);
        Ok(PackedShape::new(rows, cols, self.bits, group)?.bytes() as u64)
    }
}

/// One module swap between two neighbouring trajectory steps, as the runtime executes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Move<'a> {
    pub id: ModuleId,
    pub from_bits: u32,
    /// The version swapped in.
    pub to: &'a ModuleVersion,
    /// The trajectory step reached once this move is done.
    pub step_after: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quantizer {
    /// "gptq" or "rtn".
    pub method: String,
    pub group_size: usize,
    /// Free-form record of the calibration (text, token counts, seeds).
    #[serde(default)]
    pub calibration: serde_json::Value,
}

/// How to talk to the model: what the browser needs besides the tokenizer file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChatSpec {
    /// "jinja": the model's own template, in `jinja`. "chatml": the model has none, prompts are
    /// ChatML (with `default_system` when the conversation has no system message), and the
    /// runtime warns. "plain" (written by older builders for models without a template) reads
    /// as "chatml".
    pub template: String,
    /// The model's Jinja chat template (when `template` is "jinja").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jinja: Option<String>,
    pub default_system: Option<String>,
    pub bos: Option<u32>,
    /// Token ids that end an answer.
    pub stop: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Swap {
    pub layer: usize,
    pub kind: ModuleKind,
    pub from_bits: u32,
    pub to_bits: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// `None` for step 0 (QM(n_up)).
    pub swap: Option<Swap>,
    /// Base shard + every module's current version.
    pub footprint_bytes: u64,
    pub calib_ppl: Option<f64>,
    pub heldout_ppl: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub name: String,
    pub config: LlamaConfig,
    pub tokenizer: FileRef,
    pub chat: ChatSpec,
    /// Embeddings (also the tied head) and norms.
    pub base: FileRef,
    /// Storage precision of the embedding in the base shard: "q8" (packed format, 8 bits, the
    /// manifest's group size; see `ensemble::base`).
    pub base_precision: String,
    pub quantizer: Quantizer,
    pub n_up: u32,
    pub n_low: u32,
    pub modules: Vec<ModuleVersion>,
    pub trajectory: Vec<Step>,
    /// The pack files, when files are packed (version 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packs: Vec<Pack>,
    /// Builder provenance and settings (branch, stem, prune rate, timings); not validated.
    #[serde(default)]
    pub build: serde_json::Value,
}

/// A template longer than this is refused (real ones are a few KB; the longest known ~30 KB).
const MAX_CHAT_TEMPLATE_BYTES: usize = 256 << 10;

impl ChatSpec {
    /// The chat template this spec describes (compiled; `tokens` are the tokenizer's).
    pub fn template(&self, tokens: SpecialTokens) -> Result<ChatTemplate> {
        match (self.template.as_str(), &self.jinja) {
            ("jinja", Some(jinja)) => ChatTemplate::from_jinja(
                TemplateSource {
                    file: "manifest.json chat.jinja",
                    jinja,
                },
                tokens,
            ),
            ("chatml" | "plain", None) => Ok(ChatTemplate::chatml_fallback(
                self.default_system.as_deref(),
                tokens,
            )),
            (t, j) => Err(Error::format(
                "manifest.json",
                format!(
                    "chat template {t:?} {} a `jinja` source: expected \"jinja\" with one, or \"chatml\" without",
                    if j.is_some() { "with" } else { "without" }
                ),
            )),
        }
    }

    fn validate(&self, what: &str) -> Result<()> {
        if self
            .jinja
            .as_ref()
            .is_some_and(|j| j.len() > MAX_CHAT_TEMPLATE_BYTES)
        {
            return Err(Error::format(
                what,
                format!("chat.jinja is longer than {MAX_CHAT_TEMPLATE_BYTES} bytes"),
            ));
        }
        self.template(SpecialTokens::default())
            .map(drop)
            .map_err(|e| Error::format(what, e))
    }
}

/// Why a manifest's `version` is not read by this runtime.
pub fn version_error(v: &serde_json::Value) -> String {
    format!(
        "manifest version {v} is not supported (this runtime reads versions {MIN_VERSION} to {VERSION})"
    )
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A file name the runtime may fetch: relative, no `..`, plain characters.
fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('/')
        && name
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::format(what, format!("unsafe file name {name:?}")))
    }
}

fn check_file(what: &str, f: &FileRef) -> Result<()> {
    check_name(what, &f.file)?;
    if f.bytes == 0 || f.bytes > MAX_FILE_BYTES {
        return Err(Error::format(
            what,
            format!("{}: absurd size {} bytes", f.file, f.bytes),
        ));
    }
    if f.sha256.len() != 64 || !f.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::format(
            what,
            format!("{}: sha256 {:?} is not 64 hex digits", f.file, f.sha256),
        ));
    }
    Ok(())
}

impl Manifest {
    /// The quality floor for a largest acceptable perplexity: the deepest step such that it
    /// and every step above it have a perplexity of at most `max` (`step_perplexity`).
    pub fn floor_for_perplexity(&self, max: f64) -> Result<usize> {
        if !(max.is_finite() && max > 0.0) {
            return Err(Error::input(format!(
                "maxPerplexity {max}: expected a positive number"
            )));
        }
        let ppl = self.step_perplexity();
        match ppl
            .iter()
            .take_while(|p| p.is_some_and(|p| p <= max))
            .count()
        {
            0 => Err(Error::input(format!(
                "maxPerplexity {max}: even step 0 has a perplexity of {}",
                ppl[0].map_or("unknown".into(), |p| format!("{p:.2}"))
            ))),
            n => Ok(n - 1),
        }
    }

    /// The perplexity a step was measured at, on one scale for the whole trajectory: held-out
    /// text when the builder measured any step on it, else the calibration text. (Mixed, the
    /// curve zigzagged: a full-preset build records the calibration ppl of every step, 52 on
    /// the demo model, and the held-out ppl of every 30th, 23.)
    pub fn measured_perplexity(&self) -> impl Fn(&Step) -> Option<f64> {
        let heldout = self.trajectory.iter().any(|s| s.heldout_ppl.is_some());
        move |s: &Step| if heldout { s.heldout_ppl } else { s.calib_ppl }
    }

    /// Each step's perplexity: as measured (`measured_perplexity`) where the builder measured
    /// it, linear in footprint between two measured steps elsewhere, `None` past the last
    /// measured step.
    pub fn step_perplexity(&self) -> Vec<Option<f64>> {
        let t = &self.trajectory;
        let ppl = self.measured_perplexity();
        let measured: Vec<(usize, f64)> = t
            .iter()
            .enumerate()
            .filter_map(|(i, s)| ppl(s).map(|p| (i, p)))
            .collect();
        (0..t.len())
            .map(|i| {
                let after = measured.iter().position(|&(j, _)| j >= i)?;
                let (j, pj) = measured[after];
                if j == i || after == 0 {
                    return (j == i).then_some(pj);
                }
                let (h, ph) = measured[after - 1];
                let (fh, fi, fj) = (
                    t[h].footprint_bytes as f64,
                    t[i].footprint_bytes as f64,
                    t[j].footprint_bytes as f64,
                );
                let w = if fh == fj { 0.5 } else { (fh - fi) / (fh - fj) };
                Some(ph + w * (pj - ph))
            })
            .collect()
    }

    pub fn from_bytes(what: &str, bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(Error::format(
                what,
                format!("{} bytes is too large for a manifest", bytes.len()),
            ));
        }
        // The format and version first (a light pass that skips everything else), so that a
        // manifest of another version gets that error rather than a field error.
        #[derive(Deserialize)]
        struct Head {
            #[serde(default)]
            format: serde_json::Value,
            #[serde(default)]
            version: serde_json::Value,
        }
        let head: Head = serde_json::from_slice(bytes).map_err(|e| Error::format(what, e))?;
        if head.format.as_str() != Some(FORMAT) {
            return Err(Error::format(what, format!("not a {FORMAT} manifest")));
        }
        let v = head.version.as_u64();
        if !v.is_some_and(|v| (MIN_VERSION as u64..=VERSION as u64).contains(&v)) {
            return Err(Error::format(what, version_error(&head.version)));
        }
        // Then straight into the structs (no intermediate tree), the path of a bad field in
        // the message (`config.vocab_size: invalid value ...`).
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let m: Manifest = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| Error::format(what, format!("{}: {}", e.path(), e.inner())))?;
        de.end().map_err(|e| Error::format(what, e))?;
        m.validate(what)?;
        Ok(m)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("manifest serializes")
    }

    pub fn n_modules(&self) -> usize {
        self.config.num_hidden_layers * 7
    }

    /// The version of `id` at `bits`, if the ensemble keeps it.
    pub fn version(&self, id: ModuleId, bits: u32) -> Option<&ModuleVersion> {
        self.modules
            .iter()
            .find(|v| v.layer == id.layer && v.kind == id.kind && v.bits == bits)
    }

    /// Bit-width of every module (by `ModuleId::index`) at trajectory step `step`.
    pub fn bits_at(&self, step: usize) -> Vec<u32> {
        let mut bits = vec![self.n_up; self.n_modules()];
        for s in &self.trajectory[1..=step.min(self.trajectory.len() - 1)] {
            let sw = s.swap.as_ref().expect("validated");
            bits[ModuleId {
                layer: sw.layer,
                kind: sw.kind,
            }
            .index()] = sw.to_bits;
        }
        bits
    }

    /// Every module version by (module index, bits): one pass over `modules`, so queries over
    /// many modules or steps stay linear in the manifest's size.
    fn by_id(&self) -> HashMap<(usize, u32), &ModuleVersion> {
        self.modules
            .iter()
            .map(|v| ((v.id().index(), v.bits), v))
            .collect()
    }

    /// The module version of every module at trajectory step `step`, `ModuleId::index()` order.
    pub fn step_versions(&self, step: usize) -> Vec<&ModuleVersion> {
        let by_id = self.by_id();
        self.bits_at(step)
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                *by_id
                    .get(&(i, b))
                    .expect("validated: every step's versions exist")
            })
            .collect()
    }

    /// The swaps that take a model from step `from` to step `to`, one trajectory step each, in
    /// execution order (down: the trajectory's swaps; up: the same swaps undone, last first).
    /// Stopping after any prefix leaves a valid EQM, the step of the last move done.
    pub fn moves(&self, from: usize, to: usize) -> Vec<Move<'_>> {
        let swap_at = |s: usize| {
            let w = self.trajectory[s].swap.as_ref().expect("validated");
            let id = ModuleId {
                layer: w.layer,
                kind: w.kind,
            };
            (id, w)
        };
        let by_id = self.by_id();
        let version = |id: ModuleId, bits| *by_id.get(&(id.index(), bits)).expect("validated");
        if to > from {
            (from + 1..=to.min(self.trajectory.len() - 1))
                .map(|s| {
                    let (id, w) = swap_at(s);
                    Move {
                        id,
                        from_bits: w.from_bits,
                        to: version(id, w.to_bits),
                        step_after: s,
                    }
                })
                .collect()
        } else {
            (to + 1..=from.min(self.trajectory.len() - 1))
                .rev()
                .map(|s| {
                    let (id, w) = swap_at(s);
                    Move {
                        id,
                        from_bits: w.to_bits,
                        to: version(id, w.from_bits),
                        step_after: s - 1,
                    }
                })
                .collect()
        }
    }

    /// The tokenizer from the bytes of its file (verified), with the manifest's chat template,
    /// BOS and stop tokens.
    pub fn tokenizer(&self, bytes: &[u8]) -> Result<Tokenizer> {
        let c = &self.chat;
        let eos = c.stop.first().copied();
        let mut t = Tokenizer::from_json_bytes(&self.tokenizer.file, bytes, c.bos, eos, None)?;
        t.check_fits(self.config.vocab_size)?;
        t.stop = c.stop.clone();
        t.chat = c.template(t.special_tokens())?;
        Ok(t)
    }

    /// Sum of the distinct files' bytes: what the ensemble costs to store or download in full.
    pub fn storage_bytes(&self) -> u64 {
        let mut seen = std::collections::HashSet::new();
        self.all_files()
            .filter(|f| seen.insert(f.file.as_str()))
            .map(|f| f.bytes)
            .sum()
    }

    pub fn validate(&self, what: &str) -> Result<()> {
        let err = |r: String| Err(Error::format(what, r));
        self.config.validate(what)?;
        check_file(what, &self.tokenizer)?;
        check_file(what, &self.base)?;
        let vocab = self.config.vocab_size as u32;
        if self
            .chat
            .stop
            .iter()
            .chain(&self.chat.bos)
            .any(|&t| t >= vocab)
        {
            return err(format!(
                "chat token ids {:?} / {:?} exceed the vocabulary",
                self.chat.stop, self.chat.bos
            ));
        }
        self.chat.validate(what)?;
        if self.base_precision != "q8" {
            return err(format!(
                "base precision {:?} is not supported",
                self.base_precision
            ));
        }
        let q = &self.quantizer;
        if !GROUP_SIZES.contains(&q.group_size) {
            return err(format!("group size {} is not supported", q.group_size));
        }
        let want = crate::ensemble::base::base_bytes(&self.config, q.group_size)
            .map_err(|e| Error::format(what, format!("{}: {e}", self.base.file)))?
            as u64;
        if self.base.bytes != want {
            return err(format!(
                "{}: {} bytes, but the base of this model is {want}",
                self.base.file, self.base.bytes
            ));
        }
        if !BITS.contains(&self.n_up) || !BITS.contains(&self.n_low) || self.n_low > self.n_up {
            return err(format!(
                "n_up {} / n_low {} are not a valid range",
                self.n_up, self.n_low
            ));
        }
        let n = self.n_modules();
        // Bytes of each module version, by module index and bit-width: every lookup below is
        // O(1), so validation is linear in the manifest's size (a hostile 16 MiB manifest
        // validates in well under a second).
        let mut size: Vec<[Option<u64>; 9]> = vec![[None; 9]; n];
        let mut names: HashMap<&str, &ModuleVersion> = HashMap::new();
        for v in &self.modules {
            check_file(what, &v.file)?;
            if v.layer >= self.config.num_hidden_layers {
                return err(format!("{}: layer {} does not exist", v.file.file, v.layer));
            }
            if !BITS.contains(&v.bits) || v.bits > self.n_up || v.bits < self.n_low {
                return err(format!(
                    "{}: {} bits is outside n_low..=n_up",
                    v.file.file, v.bits
                ));
            }
            let slot = &mut size[v.id().index()][v.bits as usize];
            if slot.is_some() {
                return err(format!(
                    "module L{}.{} at {} bits is listed twice",
                    v.layer,
                    v.kind.name(),
                    v.bits
                ));
            }
            // A file belongs to one version, or (bit-plane files) to every version of one
            // module, each naming it identically.
            match names.entry(v.file.file.as_str()) {
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(v);
                }
                std::collections::hash_map::Entry::Occupied(e) => {
                    let first = *e.get();
                    if v.levels.is_none()
                        || first.id() != v.id()
                        || first.file != v.file
                        || first.levels != v.levels
                    {
                        return err(format!("file {} is used twice", v.file.file));
                    }
                }
            }
            let (r, c) = v.kind.shape(&self.config);
            let at = |e: Error| Error::format(what, format!("{}: {e}", v.file.file));
            let resident = v.resident_bytes(&self.config, q.group_size).map_err(at)?;
            let want = match &v.levels {
                None => resident,
                Some(levels) => {
                    if self.version < PLANES_VERSION {
                        return err(format!(
                            "{}: bit-plane files need manifest version {PLANES_VERSION}, not {} \
                             (version 3 stored two-byte grids, which this runtime no longer \
                             reads: rebuild the ensemble with this flexquant)",
                            v.file.file, self.version
                        ));
                    }
                    if !levels.contains(&v.bits)
                        || levels.iter().any(|&l| l > self.n_up || l < self.n_low)
                    {
                        return err(format!(
                            "{}: levels {levels:?} must hold {} bits and lie in n_low..=n_up",
                            v.file.file, v.bits
                        ));
                    }
                    PlaneShape::new(r, c, q.group_size, levels)
                        .map_err(at)?
                        .bytes() as u64
                }
            };
            if v.file.bytes != want {
                return err(format!(
                    "{}: {} bytes, but a {r}x{c} module at {} bits is {want}",
                    v.file.file, v.file.bytes, v.bits
                ));
            }
            *slot = Some(resident);
        }
        let t = &self.trajectory;
        if t.is_empty() || t.len() > MAX_STEPS {
            return err(format!("trajectory has {} steps", t.len()));
        }
        if t[0].swap.is_some() {
            return err("step 0 must be QM(n_up), with no swap".into());
        }
        let mut bits = vec![self.n_up; n];
        // The footprint, kept up to date swap by swap (each file is at most 4 GiB and there are
        // at most 7168 modules: no u64 sum can overflow, checked all the same).
        let mut footprint = Some(self.base.bytes);
        for s in &size {
            footprint = footprint
                .zip(s[self.n_up as usize])
                .and_then(|(f, b)| f.checked_add(b));
        }
        for (i, step) in t.iter().enumerate() {
            if let Some(sw) = &step.swap {
                if i == 0 || sw.layer >= self.config.num_hidden_layers {
                    return err(format!("step {i}: swap of layer {} is invalid", sw.layer));
                }
                let id = ModuleId {
                    layer: sw.layer,
                    kind: sw.kind,
                };
                if bits[id.index()] != sw.from_bits {
                    return err(format!(
                        "step {i}: {id} is at {} bits, not {}",
                        bits[id.index()],
                        sw.from_bits
                    ));
                }
                if sw.to_bits >= sw.from_bits {
                    return err(format!(
                        "step {i}: {id} {} -> {} bits is not one-way down",
                        sw.from_bits, sw.to_bits
                    ));
                }
                let Some(to) = size[id.index()].get(sw.to_bits as usize).copied().flatten() else {
                    return err(format!(
                        "step {i}: no shard for {id} at {} bits",
                        sw.to_bits
                    ));
                };
                // `from_bits` equals the module's current bits, whose size the previous step's
                // footprint needed (a missing one ended validation there).
                let from = size[id.index()][sw.from_bits as usize];
                footprint = footprint
                    .zip(from)
                    .and_then(|(f, b)| f.checked_sub(b)?.checked_add(to));
                bits[id.index()] = sw.to_bits;
            } else if i > 0 {
                return err(format!("step {i} has no swap"));
            }
            let Some(f) = footprint else {
                return err(format!("step {i}: a module version it uses has no shard"));
            };
            if f != step.footprint_bytes {
                return err(format!(
                    "step {i}: footprint {} bytes, but its shards add up to {f}",
                    step.footprint_bytes
                ));
            }
            if i > 0 && step.footprint_bytes >= t[i - 1].footprint_bytes {
                return err(format!("step {i}: footprint does not decrease"));
            }
            for (name, p) in [
                ("calib_ppl", step.calib_ppl),
                ("heldout_ppl", step.heldout_ppl),
            ] {
                if p.is_some_and(|p| !(p.is_finite() && p >= 1.0)) {
                    return err(format!("step {i}: {name} {p:?} is not a perplexity"));
                }
            }
        }
        if bits.iter().any(|&b| b != self.n_low) {
            return err(format!(
                "the trajectory ends before QM(n_low = {})",
                self.n_low
            ));
        }
        self.validate_packs(what)
    }

    /// Packs (version 2 only): named safely, once each, and tiled exactly by the files in
    /// them (no gap, overlap or byte past the end), so every fetched byte is verified.
    fn validate_packs(&self, what: &str) -> Result<()> {
        let err = |r: String| Err(Error::format(what, r));
        if !self.packs.is_empty() && self.version < 2 {
            return err(format!(
                "packs need manifest version 2, not {}",
                self.version
            ));
        }
        // Each pack's size and its files as (offset, bytes, name).
        type Tiles<'a> = (u64, Vec<(u64, u64, &'a str)>);
        let mut tiles: HashMap<&str, Tiles> = HashMap::new();
        for p in &self.packs {
            check_name(what, &p.file)?;
            if p.bytes == 0 || p.bytes > MAX_FILE_BYTES {
                return err(format!("{}: absurd size {} bytes", p.file, p.bytes));
            }
            if tiles.insert(&p.file, (p.bytes, Vec::new())).is_some() {
                return err(format!("pack {} is listed twice", p.file));
            }
        }
        let mut files = std::collections::HashSet::new();
        for f in self.all_files() {
            let Some(s) = &f.pack else { continue };
            if !files.insert(&f.file) {
                continue;
            }
            let Some((_, members)) = tiles.get_mut(s.pack.as_str()) else {
                return err(format!("{}: pack {} is not listed", f.file, s.pack));
            };
            members.push((s.offset, f.bytes, &f.file));
        }
        for (pack, (bytes, mut members)) in tiles {
            members.sort_unstable();
            let mut at = 0u64;
            for (offset, len, file) in members {
                if offset != at {
                    return err(format!(
                        "pack {pack}: {file} starts at {offset}, expected {at} (a gap or overlap)"
                    ));
                }
                at = offset.saturating_add(len);
            }
            if at != bytes {
                return err(format!(
                    "pack {pack}: its files end at byte {at}, but it has {bytes} bytes"
                ));
            }
        }
        Ok(())
    }

    /// Every file the manifest lists: module versions, base, tokenizer.
    pub fn all_files(&self) -> impl Iterator<Item = &FileRef> {
        self.modules
            .iter()
            .map(|v| &v.file)
            .chain([&self.base, &self.tokenizer])
    }

    /// The bytes a download of `files` fetches: each file outside a pack once (a bit-plane
    /// file serves several versions), each pack holding any of them once.
    pub fn network_bytes<'a>(&self, files: impl IntoIterator<Item = &'a FileRef>) -> u64 {
        let mut packs = std::collections::BTreeSet::new();
        let mut own = std::collections::BTreeSet::new();
        let mut bytes = 0;
        for f in files {
            match &f.pack {
                None => {
                    if own.insert(f.file.as_str()) {
                        bytes += f.bytes;
                    }
                }
                Some(s) => {
                    if packs.insert(s.pack.as_str()) {
                        bytes += self.pack(&s.pack).map_or(f.bytes, |p| p.bytes);
                    }
                }
            }
        }
        bytes
    }

    /// The pack named `name`.
    pub fn pack(&self, name: &str) -> Option<&Pack> {
        self.packs.iter().find(|p| p.file == name)
    }

    /// Checks a downloaded or read file against its entry: size first (cheap), then hash.
    pub fn verify_file(f: &FileRef, bytes: &[u8]) -> Result<()> {
        Self::check_size(f, bytes.len())?;
        Self::check_hash(f, &sha256_hex(bytes))
    }

    /// The size half of `verify_file` (before hashing anything).
    pub fn check_size(f: &FileRef, len: usize) -> Result<()> {
        if len as u64 != f.bytes {
            return Err(Error::format(
                &f.file,
                format!(
                    "{len} bytes, expected {} (truncated or wrong file)",
                    f.bytes
                ),
            ));
        }
        Ok(())
    }

    /// The hash half of `verify_file`, given the file's sha256 in lowercase hex.
    pub fn check_hash(f: &FileRef, sha256: &str) -> Result<()> {
        if sha256 != f.sha256 {
            return Err(Error::format(
                &f.file,
                format!("sha256 {sha256} does not match the manifest's {}", f.sha256),
            ));
        }
        Ok(())
    }
}
