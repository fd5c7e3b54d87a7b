//! The module library on disk: every module of the model at every bit-width, the raw material
//! the ensemble builder picks from.
//!
//! ```text
//! DIR/library.json              Manifest: model sha256 + config, method, group, bits,
//!                               calibration settings, and per module version its file,
//!                               bytes and relative output error
//! DIR/modules/L{layer}.{kind}.b{bits}.bin   one PackedMatrix each (`PackedMatrix::to_bytes`)
//! ```
//!
//! Writing is atomic: everything goes to `DIR.tmp-<pid>` and is renamed to `DIR` at the end,
//! so an interrupted run leaves only a `.tmp-` directory, never a `DIR` that looks complete.
//! Reading trusts nothing: file names must be the canonical ones (no paths from the manifest
//! are followed), shapes must match the model config, and every file's size must equal its
//! packed size before any byte is used.
//!
//! Calibration (GPTQ). Two modes, both layer by layer through `forward::layer_staged`:
//! - float inputs (default): one activation stream through the float model calibrates every
//!   bit-width, so all versions of a module approximate the same function on the same inputs
//!   (what makes them interchangeable in an EQM, whose other modules are at mixed bit-widths);
//! - `sequential` (the GPTQ paper): one stream per bit-width, run through that bit-width's
//!   quantized modules, so layer l is calibrated on what the quantized layers before it produce.
//!
//! Chosen by measurement on the demo model (held-out ppl on 4096 tokens, group 64, act-order,
//! QM(3) / QM(2); float model 22.37): with the same 2048 calibration tokens sequential is
//! better (40.8 / 1.9e6 vs 46.2 / 6.1e6), but it costs a stream per bit-width, and within the
//! library's time budget (< 300 s for all six bit-widths on 2 cores) float inputs afford 4x the
//! tokens: 8192 give 38.6 (16384: 38.8, saturated); with the clipping search, float inputs with
//! 8192 tokens give 33.7 / 1399 against sequential with 2048 tokens 36.8 / 312. Default: float
//! inputs, 32 x 256 tokens. RTN needs no calibration; the float stream is still run so its
//! versions get the same error figure.

use crate::ensemble::format::{PackedMatrix, PackedShape, BITS, GROUP_SIZES};
use crate::error::{read_capped, Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::forward;
use crate::model::ops::Rope;
use crate::model::weights::{Linear, ModuleId, ModuleKind, Weights};
use crate::quant::calib::CalibSettings;
use crate::quant::gptq::{self, GptqConfig, Hessian};
use crate::quant::nested::{self, Nesting};
use crate::quant::rtn;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const MANIFEST: &str = "library.json";
pub const FORMAT: &str = "flexquant-library";
/// 3: nested levels' grids in the bit-plane files' one-byte form (`planes::level_params`); 2
/// had them in the two-byte form. Libraries of independent versions of any version are read;
/// an older nested one is rebuilt.
pub const VERSION: u32 = 3;
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Rtn,
    Gptq,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "rtn" => Ok(Method::Rtn),
            "gptq" => Ok(Method::Gptq),
            _ => Err(Error::input(format!(
                "unknown method {s:?} (choose rtn or gptq)"
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub source: String,
    pub sha256: String,
    pub config: LlamaConfig,
}

/// One source of the calibration mix, as recorded (and published with the ensemble).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibSource {
    /// The file's name (never its path), or `chat`.
    pub name: String,
    pub sha256: String,
    /// Tokens of the whole source text.
    pub tokens: usize,
    pub weight: f64,
    /// Calibration windows drawn from it.
    pub sequences: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibInfo {
    /// The calibration mix by file names (`austen-calib.txt:0.5,brown-calib.txt:0.5`; one
    /// name for one text). No directory: it is published in the manifest.
    pub text: String,
    /// The text's sha256 for one source; for a mix, of its sources' names, hashes and weights
    /// (`CalibSource::mix_sha256`).
    pub text_sha256: String,
    /// Each source (empty in libraries built before mixes: `text` is then the one source).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<CalibSource>,
    pub sequences: usize,
    pub seq_len: usize,
    pub tokens: usize,
    pub sampling: String,
    /// Each bit-width calibrated on activations of its own quantized model (GPTQ paper);
    /// false: on the float model's activations.
    pub sequential: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    pub bits: u32,
    pub file: String,
    pub bytes: usize,
    /// `‖(W - Q) X‖² / ‖W X‖²` over the calibration inputs `X` this version was made from, each
    /// row's energy capped at `gptq::ROW_ENERGY_CAP` times the median (as GPTQ fits them).
    pub rel_output_error: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleEntry {
    pub layer: usize,
    pub kind: ModuleKind,
    pub rows: usize,
    pub cols: usize,
    pub versions: Vec<Version>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub model: ModelInfo,
    pub method: Method,
    pub group: usize,
    /// High to low.
    pub bits: Vec<u32>,
    pub calibration: CalibInfo,
    pub gptq: Option<GptqConfig>,
    pub rtn_clip_search: bool,
    /// Nested versions (`quant::nested`): every lower bit-width's codes are the top bits of
    /// the highest one's. Absent: independent versions (and in libraries built before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nesting: Option<Nesting>,
    pub seconds: f64,
    /// Where the time went (seconds): Hessians, H⁻¹ factors, quantizing, the error figures
    /// and files; the rest of `seconds` is the calibration forward passes.
    pub timing: Timing,
    pub threads: usize,
    /// In `ModuleId::index()` order.
    pub modules: Vec<ModuleEntry>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    pub hessian: f64,
    pub prepare: f64,
    pub quantize: f64,
    pub error_and_write: f64,
}

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub method: Method,
    pub bits: Vec<u32>,
    pub group: usize,
    pub calib: CalibSettings,
    pub sequential: bool,
    pub gptq: GptqConfig,
    pub rtn_clip_search: bool,
    /// Nested versions (GPTQ only); `None`: each bit-width quantized independently.
    pub nesting: Option<Nesting>,
}

impl Manifest {
    /// The method as tables and manifests name it: `gptq`, `rtn`, or `gptq-nested-upscale`.
    pub fn method_label(&self) -> String {
        match self.nesting {
            Some(n) => format!("{}-nested-{}", self.method.name(), n.name()),
            None => self.method.name().into(),
        }
    }
}

impl CalibInfo {
    /// This record as an ensemble publishes it: the text by file name only (libraries built
    /// before names were recorded hold the builder's path).
    pub fn published(&self) -> CalibInfo {
        let name = std::path::Path::new(&self.text)
            .file_name()
            .map_or_else(|| self.text.clone(), |n| n.to_string_lossy().into());
        CalibInfo {
            text: name,
            ..self.clone()
        }
    }
}

impl CalibSource {
    /// The identity of a mix: a single source's own sha256 (what libraries built before mixes
    /// recorded), else the sha256 of every source's name, sha256 and weight.
    pub fn mix_sha256(sources: &[CalibSource]) -> String {
        match sources {
            [one] => one.sha256.clone(),
            _ => {
                let lines: String = sources
                    .iter()
                    .map(|s| format!("{}:{}:{}\n", s.name, s.sha256, s.weight))
                    .collect();
                crate::ensemble::manifest::sha256_hex(lines.as_bytes())
            }
        }
    }

    /// The mix as `--calib` would take it, by names.
    pub fn mix_name(sources: &[CalibSource]) -> String {
        match sources {
            [one] => one.name.clone(),
            _ => sources
                .iter()
                .map(|s| format!("{}:{}", s.name, s.weight))
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

/// What the library is built from.
pub struct BuildInput<'a> {
    pub weights: &'a Weights,
    pub model: ModelInfo,
    /// Name and sha256 of the calibration text, for the manifest.
    pub calib_text: String,
    pub calib_sha256: String,
    /// The mix's sources (empty: one text, named by `calib_text`).
    pub calib_sources: Vec<CalibSource>,
    /// Already sampled (`calib::sample`): `calib.tokens()` ids.
    pub calib_tokens: &'a [u32],
}

/// Canonical file of a module version, relative to the library directory.
pub fn version_file(id: ModuleId, bits: u32) -> String {
    format!("modules/L{}.{}.b{bits}.bin", id.layer, id.kind.name())
}

/// One activation stream of the layer-by-layer pass: which weights it continues with, and
/// which bit-widths are quantized from its activations.
struct Stream {
    follow: Option<u32>,
    makes: Vec<u32>,
    x: Vec<f32>,
}

/// Builds the library into `out` (atomically); `progress(done, total)` after each layer of
/// each stream.
pub fn build(
    input: &BuildInput,
    opts: &BuildOptions,
    out: &Path,
    force: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Manifest> {
    let start = Instant::now();
    let w = input.weights;
    let c = &w.config;
    let bits = check_bits(&opts.bits)?;
    if !GROUP_SIZES.contains(&opts.group) {
        return Err(Error::input(format!(
            "group size {} is not supported (choose from {GROUP_SIZES:?})",
            opts.group
        )));
    }
    if opts.nesting.is_some() && opts.method != Method::Gptq {
        return Err(Error::input(
            "nested versions are made by GPTQ (--method gptq)",
        ));
    }
    if input.calib_tokens.len() != opts.calib.tokens() {
        return Err(Error::input("calibration tokens do not match the settings"));
    }
    if opts.calib.seq_len > c.max_position_embeddings {
        return Err(Error::input(format!(
            "calibration sequences of {} tokens exceed the model's context of {}",
            opts.calib.seq_len, c.max_position_embeddings
        )));
    }
    if out.exists() && !force {
        return Err(Error::input(format!(
            "{} already exists (pass --force to replace it)",
            out.display()
        )));
    }
    let name = out
        .file_name()
        .ok_or_else(|| Error::input(format!("{}: not a directory name", out.display())))?;
    let tmp = out.with_file_name(format!(
        "{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let modules_dir = tmp.join("modules");
    std::fs::create_dir_all(&modules_dir).map_err(|e| Error::io(&modules_dir, e))?;
    let result = build_into(input, opts, &bits, &tmp, progress).and_then(|mut m| {
        m.seconds = start.elapsed().as_secs_f64();
        let json = serde_json::to_vec_pretty(&m).map_err(|e| Error::format(MANIFEST, e))?;
        let path = tmp.join(MANIFEST);
        std::fs::write(&path, json).map_err(|e| Error::io(&path, e))?;
        if out.exists() {
            std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
        }
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
        Ok(m)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn check_bits(bits: &[u32]) -> Result<Vec<u32>> {
    let mut b = bits.to_vec();
    b.sort_unstable_by(|a, b| b.cmp(a));
    b.dedup();
    if b.is_empty() || b.iter().any(|x| !BITS.contains(x)) {
        return Err(Error::input(format!(
            "bit-widths {bits:?}: choose one or more of {BITS:?}"
        )));
    }
    Ok(b)
}

fn build_into(
    input: &BuildInput,
    opts: &BuildOptions,
    bits: &[u32],
    dir: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Manifest> {
    let w = input.weights;
    let c = &w.config;
    let x0 = forward::embed(w, input.calib_tokens)?;
    let sequential = opts.method == Method::Gptq && opts.sequential;
    let mut streams: Vec<Stream> = if let (Some(n), true) = (opts.nesting, sequential) {
        // One set of codes serves every bit-width: one stream, through the level the others
        // are derived from.
        let anchor = match n {
            Nesting::Truncate => bits[0],
            Nesting::Upscale => bits[bits.len() - 1],
        };
        vec![Stream {
            follow: Some(anchor),
            makes: bits.to_vec(),
            x: x0,
        }]
    } else if sequential {
        bits.iter()
            .map(|&b| Stream {
                follow: Some(b),
                makes: vec![b],
                x: x0.clone(),
            })
            .collect()
    } else {
        vec![Stream {
            follow: None,
            makes: bits.to_vec(),
            x: x0,
        }]
    };
    let mut modules: Vec<ModuleEntry> = w
        .module_ids()
        .map(|id| {
            let (rows, cols) = id.kind.shape(c);
            ModuleEntry {
                layer: id.layer,
                kind: id.kind,
                rows,
                cols,
                versions: Vec::new(),
            }
        })
        .collect();
    let rope = Rope::new(c.rope_theta, c.head_dim(), 0, opts.calib.seq_len);
    let mut timing = Timing::default();
    let total = c.num_hidden_layers * streams.len();
    let mut done = 0;
    progress(done, total);
    for l in 0..c.num_hidden_layers {
        for s in streams.iter_mut() {
            let (follow, makes) = (s.follow, s.makes.clone());
            let mut stage = |kinds: &[ModuleKind], x: &[f32]| -> Result<Vec<Linear>> {
                let cols = x.len() / (input.calib_tokens.len());
                let t0 = Instant::now();
                let hess = Hessian::from_rows_capped(x, cols);
                timing.hessian += t0.elapsed().as_secs_f64();
                let t0 = Instant::now();
                let prepared = match opts.method {
                    Method::Gptq => Some(gptq::prepare(
                        &hess,
                        &opts.gptq,
                        &format!("layer {l} input of {kinds:?}"),
                    )?),
                    Method::Rtn => None,
                };
                timing.prepare += t0.elapsed().as_secs_f64();
                let mut keep = Vec::with_capacity(kinds.len());
                for &kind in kinds {
                    let id = ModuleId { layer: l, kind };
                    let float = w.module(id);
                    let (rows, cols) = (float.rows, float.cols);
                    let mut follow_lin = None;
                    let mut energy = None;
                    let what = format!("module {id}");
                    let t0 = Instant::now();
                    let made = quantize_module(
                        opts, &float.w, rows, cols, &makes, &prepared, &hess, &what,
                    )?;
                    timing.quantize += t0.elapsed().as_secs_f64();
                    for (b, packed, gptq_error) in made {
                        let t0 = Instant::now();
                        let deq = packed.dequantize_par();
                        let energy = *energy.get_or_insert_with(|| hess.output_energy(&float.w));
                        let error = match gptq_error {
                            Some(e) => e,
                            None => hess.output_energy(&diff(&float.w, &deq)),
                        };
                        let file = version_file(id, b);
                        let path = dir.join(&file);
                        std::fs::write(&path, packed.to_bytes())
                            .map_err(|e| Error::io(&path, e))?;
                        modules[id.index()].versions.push(Version {
                            bits: b,
                            file,
                            bytes: packed.shape.bytes(),
                            rel_output_error: if energy > 0.0 { error / energy } else { 0.0 },
                        });
                        timing.error_and_write += t0.elapsed().as_secs_f64();
                        if follow == Some(b) {
                            follow_lin = Some(Linear::new(rows, cols, deq));
                        }
                    }
                    keep.push(follow_lin.unwrap_or_else(|| float.clone()));
                }
                Ok(keep)
            };
            forward::layer_staged(
                w,
                l,
                &mut s.x,
                forward::Rows::Sequences {
                    seq_len: opts.calib.seq_len,
                },
                &rope,
                &mut stage,
            )?;
            done += 1;
            progress(done, total);
        }
    }
    for m in modules.iter_mut() {
        m.versions.sort_by_key(|v| std::cmp::Reverse(v.bits));
    }
    Ok(Manifest {
        format: FORMAT.into(),
        version: VERSION,
        model: input.model.clone(),
        method: opts.method,
        group: opts.group,
        bits: bits.to_vec(),
        calibration: CalibInfo {
            text: input.calib_text.clone(),
            text_sha256: input.calib_sha256.clone(),
            sources: input.calib_sources.clone(),
            sequences: opts.calib.sequences,
            seq_len: opts.calib.seq_len,
            tokens: opts.calib.tokens(),
            sampling: "evenly spaced windows over the tokenized text".into(),
            sequential: opts.method == Method::Gptq && opts.sequential,
        },
        gptq: (opts.method == Method::Gptq).then_some(opts.gptq),
        rtn_clip_search: opts.rtn_clip_search,
        nesting: opts.nesting,
        seconds: 0.0,
        timing,
        threads: rayon::current_num_threads(),
        modules,
    })
}

/// An opened, validated library.
#[derive(Debug, Clone)]
pub struct Library {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Library {
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let what = path.display().to_string();
        let bytes = read_capped(&path, MAX_MANIFEST_BYTES)?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::format(&what, e))?;
        validate(&m, &what)?;
        for e in &m.modules {
            for v in &e.versions {
                let p = dir.join(&v.file);
                let len = std::fs::metadata(&p).map_err(|e| Error::io(&p, e))?.len();
                if len != v.bytes as u64 {
                    return Err(Error::format(
                        p.display(),
                        format!("{len} bytes, expected {} (truncated or replaced?)", v.bytes),
                    ));
                }
            }
        }
        Ok(Library {
            dir: dir.to_path_buf(),
            manifest: m,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.manifest.model.config
    }

    pub fn module_count(&self) -> usize {
        self.manifest.modules.len()
    }

    pub fn version(&self, id: ModuleId, bits: u32) -> Result<&Version> {
        self.manifest
            .modules
            .get(id.index())
            .and_then(|m| m.versions.iter().find(|v| v.bits == bits))
            .ok_or_else(|| {
                Error::input(format!(
                    "the library has no {bits}-bit version of module {id} (it has {:?})",
                    self.manifest.bits
                ))
            })
    }

    /// Bytes the ensemble stores for module `id` kept at `bits` (any order): one packed file
    /// per version, or for a nested library one bit-plane file of those levels
    /// (`ensemble::planes`: the top level plus one set of scales per lower level).
    pub fn stored_bytes(&self, id: ModuleId, bits: &[u32]) -> Result<u64> {
        if self.manifest.nesting.is_none() {
            return bits
                .iter()
                .map(|&b| Ok(self.version(id, b)?.bytes as u64))
                .sum();
        }
        let mut levels = bits.to_vec();
        levels.sort_unstable();
        let e = &self.manifest.modules[id.index()];
        let shape =
            crate::ensemble::planes::PlaneShape::new(e.rows, e.cols, self.manifest.group, &levels)?;
        Ok(shape.bytes() as u64)
    }

    pub fn shape(&self, id: ModuleId, bits: u32) -> Result<PackedShape> {
        self.version(id, bits)?;
        let m = &self.manifest.modules[id.index()];
        PackedShape::new(m.rows, m.cols, bits, self.manifest.group)
    }

    /// Reads one module version.
    pub fn load(&self, id: ModuleId, bits: u32) -> Result<PackedMatrix> {
        let shape = self.shape(id, bits)?;
        let p = self.dir.join(&self.version(id, bits)?.file);
        let bytes = read_capped(&p, shape.bytes() as u64)?;
        PackedMatrix::from_bytes(shape, &bytes, &p.display().to_string())
    }
}

fn validate(m: &Manifest, what: &str) -> Result<()> {
    let bad = |r: String| Err(Error::format(what, r));
    let readable = m.version == VERSION || (m.version < VERSION && m.nesting.is_none());
    if m.format != FORMAT || !readable {
        return bad(format!(
            "format {:?} version {} (expected {FORMAT:?} version {VERSION}, or an older one without nesting)",
            m.format, m.version
        ));
    }
    let c = &m.model.config;
    c.validate(what)?;
    if !GROUP_SIZES.contains(&m.group) {
        return bad(format!("group size {} is not supported", m.group));
    }
    if check_bits(&m.bits).ok().as_deref() != Some(&m.bits[..]) {
        return bad(format!(
            "bits {:?} must be distinct values of {BITS:?}, high to low",
            m.bits
        ));
    }
    let want = c.num_hidden_layers * 7;
    if m.modules.len() != want {
        return bad(format!("{} modules, the model has {want}", m.modules.len()));
    }
    for (i, e) in m.modules.iter().enumerate() {
        let id = ModuleId::from_index(i);
        if (e.layer, e.kind) != (id.layer, id.kind) || (e.rows, e.cols) != id.kind.shape(c) {
            return bad(format!(
                "module entry {i} is L{}.{} {}x{}, expected {id} {:?}",
                e.layer,
                e.kind.name(),
                e.rows,
                e.cols,
                id.kind.shape(c)
            ));
        }
        let have: Vec<u32> = e.versions.iter().map(|v| v.bits).collect();
        if have != m.bits {
            return bad(format!(
                "module {id} has versions {have:?}, expected {:?}",
                m.bits
            ));
        }
        for v in &e.versions {
            let shape = PackedShape::new(e.rows, e.cols, v.bits, m.group)?;
            if v.file != version_file(id, v.bits) || v.bytes != shape.bytes() {
                return bad(format!(
                    "module {id} {}-bit: file {:?} of {} bytes, expected {:?} of {}",
                    v.bits,
                    v.file,
                    v.bytes,
                    version_file(id, v.bits),
                    shape.bytes()
                ));
            }
        }
    }
    Ok(())
}

/// sha256 of a model: of the file, or for a Hugging Face directory of its `*.json` and
/// `*.safetensors` files (name and content, in name order).
pub fn model_sha256(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("json" | "safetensors")
                    )
            })
            .collect();
        files.sort();
        for f in files {
            h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
            h.update(file_sha256(&f)?.as_bytes());
        }
        Ok(hex(&h.finalize()))
    } else {
        file_sha256(path)
    }
}

pub fn file_sha256(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Every version of one module the stream makes: `(bits, packed, GPTQ's output error)`.
#[allow(clippy::too_many_arguments)]
fn quantize_module(
    opts: &BuildOptions,
    w: &[f32],
    rows: usize,
    cols: usize,
    makes: &[u32],
    prepared: &Option<gptq::Prepared>,
    hess: &Hessian,
    what: &str,
) -> Result<Vec<(u32, PackedMatrix, Option<f64>)>> {
    let g = opts.group;
    match (prepared, opts.nesting) {
        (Some(p), Some(n)) => {
            let levels =
                nested::nested_gptq(w, rows, cols, p, &hess.sum, makes, g, &opts.gptq, n, what)?;
            Ok(levels
                .into_iter()
                .map(|l| (l.packed.shape.bits, l.packed, l.output_error))
                .collect())
        }
        (Some(p), None) => makes
            .iter()
            .map(|&b| {
                let what = format!("{what} at {b} bits");
                let q = gptq::quantize_gptq(w, rows, cols, p, b, g, &opts.gptq, &what)?;
                Ok((b, q.packed, Some(q.output_error)))
            })
            .collect(),
        (None, _) => makes
            .iter()
            .map(|&b| {
                let what = format!("{what} at {b} bits");
                let q = rtn::quantize_rtn(w, rows, cols, b, g, opts.rtn_clip_search, &what)?;
                Ok((b, q, None))
            })
            .collect(),
    }
}

fn diff(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
