//! `flexquant build`: library -> search -> pruning ablation -> held-out checks -> package.

use crate::build::domains::{chord_excess, ChordExcess, DomainHeldout};
use crate::build::evaluator::{spearman, CalibEvaluator, CalibScore};
use crate::build::prune::{self, intermediate_versions};
use crate::build::search::{search, Available, SearchOptions, Slope, Ties, Trajectory};
use crate::build::{package, report};
use crate::error::{Error, Result};
use crate::model::load::LoadedModel;
use crate::quant::eqm::{Eqm, EqmModel};
use crate::quant::evaluate::{PrefixEval, WindowNll};
use crate::quant::library::CalibSource;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildSettings {
    pub n_up: u32,
    pub n_low: u32,
    pub branch: usize,
    pub stem: usize,
    /// Pass through every static QM of the ladder (see `search`'s module docs).
    #[serde(default)]
    pub staged: bool,
    /// Lazy scoring in the search (`SearchOptions::lazy`).
    #[serde(default)]
    pub lazy: bool,
    /// The search's ranking line (`SearchOptions::slope`).
    #[serde(default)]
    pub slope: Slope,
    /// Calibration gains count as no damage (`SearchOptions::floor_damage`).
    #[serde(default)]
    pub floor_damage: bool,
    /// The order of equal damages in the search (`SearchOptions::ties`).
    #[serde(default)]
    pub ties: Ties,
    /// What the calibration score measures (`CalibScore`).
    #[serde(default)]
    pub calib_score: CalibScore,
    /// Branch of the ablation's other prune rates (the shipped rate uses `branch`): 1 orders
    /// their swaps by sensitivity alone, which keeps a four-rate ablation affordable.
    #[serde(default = "one")]
    pub ablation_branch: usize,
    /// Fraction of intermediate versions dropped for the shipped ensemble.
    pub prune: f64,
    /// Other prune rates searched for the report's ablation.
    pub ablation: Vec<f64>,
    pub calib_tokens: usize,
    pub seq_len: usize,
    pub heldout_tokens: usize,
    /// Held-out ppl is measured every this many steps (and at both ends).
    pub heldout_every: usize,
    /// Tokens for the measured single-swap sensitivity; 0 = output-error proxy only.
    pub sensitivity_tokens: usize,
    /// Those tokens come from calibration windows between the search's (`Inputs::sensitivity_ids`;
    /// recorded for the report), not from the search's own.
    #[serde(default)]
    pub sensitivity_between: bool,
    /// Moves sampled to measure how well each sensitivity predicts the calibration ppl change.
    pub correlation_samples: usize,
    /// Bytes per pack of the shipped files (`ensemble::pack`); 0: one file per version.
    #[serde(default)]
    pub pack_bytes: u64,
}

/// How well the cheap sensitivities rank moves (Spearman against the full calibration ppl
/// change of single swaps from QM(n_up)).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SensitivityStudy {
    pub samples: usize,
    pub measured_tokens: usize,
    pub spearman_measured: Option<f64>,
    pub spearman_output_error: f64,
}

fn one() -> usize {
    1
}

impl BuildSettings {
    fn search_options(&self, branch: usize) -> SearchOptions {
        SearchOptions {
            branch,
            stem: self.stem,
            record_every: self.heldout_every,
            staged: self.staged,
            lazy: self.lazy,
            slope: self.slope,
            floor_damage: self.floor_damage,
            ties: self.ties,
        }
    }

    pub fn validate(&self, library_bits: &[u32]) -> Result<()> {
        if self.n_low > self.n_up {
            return Err(Error::input(format!(
                "--n-low {} is above --n-up {}: the trajectory runs from n_up down to n_low",
                self.n_low, self.n_up
            )));
        }
        for b in [self.n_up, self.n_low] {
            if !library_bits.contains(&b) {
                return Err(Error::input(format!(
                    "--n-up/--n-low: {b} bits is not one of the library's bit-widths {library_bits:?}"
                )));
            }
        }
        self.search_options(self.branch).validate()?;
        self.search_options(self.ablation_branch).validate()?;
        prune::check_rate(self.prune)?;
        for &r in &self.ablation {
            prune::check_rate(r)?;
        }
        if self.seq_len < 2 || self.calib_tokens < self.seq_len || self.heldout_every == 0 {
            return Err(Error::input(format!(
                "a search on {} calibration tokens (--search-tokens) in windows of {} (and held-out every {} steps) is not usable: it needs at least one window",
                self.calib_tokens, self.seq_len, self.heldout_every
            )));
        }
        Ok(())
    }
}

/// One searched trajectory of the ablation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Variant {
    pub prune: f64,
    #[serde(default = "one")]
    pub branch: usize,
    pub intermediate_versions: usize,
    pub storage_bytes: u64,
    pub trajectory: Trajectory,
    /// Held-out ppl of the first EQM at or below each static QM's footprint (the ablation's
    /// accuracy cost of pruning), in `BuildRecord::statics` order.
    #[serde(default)]
    pub heldout_at_statics: Vec<f64>,
}

/// Everything the report is made from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildRecord {
    pub settings: BuildSettings,
    pub ladder: Vec<u32>,
    pub base_bytes: u64,
    pub tokenizer_bytes: u64,
    /// `(bits, footprint, calib ppl, held-out ppl)` of each static QM in the ladder.
    pub statics: Vec<(u32, u64, f64, f64)>,
    pub variants: Vec<Variant>,
    /// Index into `variants` of the shipped one.
    pub chosen: usize,
    /// Held-out ppl per step of the shipped trajectory (where measured).
    pub heldout: Vec<Option<f64>>,
    pub evaluations: usize,
    pub sensitivity: Option<SensitivityStudy>,
    pub forward_equivalents: f64,
    pub build_seconds: f64,
    pub search_seconds: f64,
    /// Held-out ppl on every domain the build was given (the first is the one above).
    #[serde(default)]
    pub domains: Vec<DomainHeldout>,
    /// The calibration as the manifest publishes it: the library's mix and the search's.
    #[serde(default)]
    pub calibration: serde_json::Value,
    /// How the library's versions nest (`None`: independent versions, and records before).
    #[serde(default)]
    pub nesting: Option<crate::quant::nested::Nesting>,
    /// Wall time per phase (sensitivity, search, held-out, held-out domains, package).
    #[serde(default)]
    pub phase_seconds: PhaseSeconds,
}

fn storage(t: &Trajectory, start: &Eqm, ev: &CalibEvaluator, base: u64) -> Result<u64> {
    let mut kept: Vec<Vec<u32>> = vec![Vec::new(); start.bits.len()];
    for e in t.eqms(start) {
        for (m, &b) in e.bits.iter().enumerate() {
            if !kept[m].contains(&b) {
                kept[m].push(b);
            }
        }
    }
    let lib = &ev.model.library;
    let mut total = base;
    for (m, bits) in kept.iter().enumerate() {
        total += lib.stored_bytes(crate::model::weights::ModuleId::from_index(m), bits)?;
    }
    Ok(total)
}

/// Single swaps from QM(n_up), evenly spread over the modules: their full calibration ppl
/// change against each sensitivity's prediction.
fn sensitivity_study(
    ev: &mut CalibEvaluator,
    avail: &Available,
    samples: usize,
    progress: &mut dyn FnMut(&str, usize, usize, f64),
) -> Result<SensitivityStudy> {
    use crate::build::search::{Evaluator, Move};
    let start = avail.start();
    let base = ev.ppl(&start)?;
    let n = avail.bits.len();
    let picks: Vec<usize> = (0..samples.min(n))
        .map(|i| i * n / samples.min(n))
        .collect();
    let (mut full, mut measured, mut proxy) = (vec![], vec![], vec![]);
    let measured_swaps = ev.measured.take();
    for (k, &m) in picks.iter().enumerate() {
        let Some(to) = avail.next_lower(m, start.bits[m]) else {
            continue;
        };
        let mv = Move {
            module: m,
            from: start.bits[m],
            to,
        };
        let mut e = start.clone();
        e.bits[m] = to;
        full.push(ev.ppl(&e)? - base);
        proxy.push(ev.sensitivity(&start, &[mv])?[0]);
        if let Some(ms) = &measured_swaps {
            measured.push(
                ms.deltas
                    .get(&(m, mv.from, to))
                    .copied()
                    .unwrap_or(f64::NAN),
            );
        }
        progress("sensitivity study", k + 1, picks.len(), f64::NAN);
    }
    // Per-move damage, not per byte: compare like with like.
    let saved: Vec<f64> = picks
        .iter()
        .filter_map(|&m| {
            let to = avail.next_lower(m, start.bits[m])?;
            Some((ev.bytes(m, start.bits[m]) - ev.bytes(m, to)) as f64)
        })
        .collect();
    let proxy: Vec<f64> = proxy.iter().zip(&saved).map(|(p, s)| p * s).collect();
    let study = SensitivityStudy {
        samples: full.len(),
        measured_tokens: measured_swaps.as_ref().map_or(0, |s| s.tokens()),
        spearman_measured: measured_swaps.as_ref().map(|_| spearman(&full, &measured)),
        spearman_output_error: spearman(&full, &proxy),
    };
    ev.measured = measured_swaps;
    Ok(study)
}

pub struct Inputs<'a> {
    pub model: &'a LoadedModel,
    pub eqm: &'a EqmModel,
    pub calib_ids: &'a [u32],
    /// The search's calibration sources (`Mix::sample`'s records; empty for plain tokens).
    pub calib_sources: &'a [CalibSource],
    /// Held-out texts by domain name; the first is the report's main held-out text (the
    /// static comparison, the ablation, the manifest's per-step ppl).
    pub heldout: &'a [(String, Vec<u32>)],
    /// Tokens for the measured sensitivities and their window length; `None`: the first
    /// `sensitivity_tokens` of the calibration tokens.
    pub sensitivity_ids: Option<(&'a [u32], usize)>,
    pub name: String,
}

/// Held-out ppl of `w` on the first `s.heldout_tokens` of `ids`, in windows of `s.seq_len`
/// (all at once: `eval::perplexity` with stride = ctx, one GEMM per module).
fn heldout_ppl(w: &crate::model::Weights, ids: &[u32], s: &BuildSettings) -> Result<f64> {
    Ok(heldout_windows(w, ids, s)?.ppl())
}

/// `heldout_ppl`'s windows.
fn heldout_windows(w: &crate::model::Weights, ids: &[u32], s: &BuildSettings) -> Result<WindowNll> {
    PrefixEval::new(&ids[..s.heldout_tokens], s.seq_len, 0)?.window_nlls_of(w)
}

/// Wall time of each phase of a build, in the order they ran.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PhaseSeconds(pub Vec<(String, f64)>);

impl PhaseSeconds {
    /// Runs `f`, recording its wall time under `name`.
    fn time<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let t = Instant::now();
        let out = f()?;
        self.0.push((name.into(), t.elapsed().as_secs_f64()));
        Ok(out)
    }
}

/// Static bit-widths of the trajectory, n_up first, after checking settings and inputs.
fn check_inputs(inp: &Inputs, s: &BuildSettings) -> Result<Vec<u32>> {
    let lib_bits = inp.eqm.library.manifest.bits.clone();
    s.validate(&lib_bits)?;
    if inp.calib_ids.len() < s.calib_tokens {
        return Err(Error::input(format!(
            "need {} calibration tokens, have {}",
            s.calib_tokens,
            inp.calib_ids.len(),
        )));
    }
    if inp.heldout.is_empty() {
        return Err(Error::input(
            "no held-out text: the report needs at least one",
        ));
    }
    for (name, ids) in inp.heldout {
        if ids.len() < s.heldout_tokens {
            return Err(Error::input(format!(
                "held-out text '{name}' has {} tokens; the build scores {}",
                ids.len(),
                s.heldout_tokens
            )));
        }
    }
    Ok(lib_bits
        .iter()
        .copied()
        .filter(|&b| b <= s.n_up && b >= s.n_low)
        .collect())
}

/// Phase 1: the measured single-swap sensitivities and how well each sensitivity ranks moves.
fn sensitivities(
    ev: &mut CalibEvaluator,
    avail: &Available,
    s: &BuildSettings,
    sensitivity_ids: Option<(&[u32], usize)>,
    progress: &mut dyn FnMut(&str, usize, usize, f64),
) -> Result<Option<SensitivityStudy>> {
    let mut report = |d, n| progress("sensitivity", d, n, f64::NAN);
    match (s.sensitivity_tokens, sensitivity_ids) {
        (0, _) => {}
        (_, Some((ids, seq_len))) => {
            ev.measure_single_swaps_on(avail, ids, seq_len, &mut report)?
        }
        (t, None) => ev.measure_single_swaps(avail, t, &mut report)?,
    }
    if s.correlation_samples > 1 {
        Ok(Some(sensitivity_study(
            ev,
            avail,
            s.correlation_samples,
            progress,
        )?))
    } else {
        Ok(None)
    }
}

/// Phase 2: one searched trajectory per prune rate (0 first: pruning keeps what its
/// trajectory uses most); returns them and the index of the shipped one.
fn search_variants(
    ev: &mut CalibEvaluator,
    avail: &Available,
    s: &BuildSettings,
    base: u64,
    progress: &mut dyn FnMut(&str, usize, usize, f64),
) -> Result<(Vec<Variant>, usize)> {
    let start = avail.start();
    let mut rates = vec![0.0];
    for &r in s.ablation.iter().chain([&s.prune]) {
        if !rates.contains(&r) {
            rates.push(r);
        }
    }
    let mut variants: Vec<Variant> = Vec::new();
    for &rate in &rates {
        let av = if rate == 0.0 {
            avail.clone()
        } else {
            prune::prune(avail, &variants[0].trajectory, &start, rate)?
        };
        let branch = if rate == s.prune {
            s.branch
        } else {
            s.ablation_branch
        };
        let label = format!("search P={:.0}%", rate * 100.0);
        let opts = s.search_options(branch);
        let t = search(ev, &av, base, opts, |d, total, ppl| {
            progress(&label, d, total, ppl)
        })?;
        variants.push(Variant {
            prune: rate,
            branch,
            intermediate_versions: intermediate_versions(&av),
            storage_bytes: storage(&t, &start, ev, base)?,
            trajectory: t,
            heldout_at_statics: vec![],
        });
    }
    let chosen = rates.iter().position(|&r| r == s.prune).unwrap();
    Ok((variants, chosen))
}

/// Held-out ppl per `(domain, EQM)`, each measured once (staged trajectories pass through the
/// static QMs; the ablation's variants share steps).
struct Heldout<'a> {
    inp: &'a Inputs<'a>,
    s: &'a BuildSettings,
    measured: std::collections::HashMap<(usize, Eqm), WindowNll>,
}

impl Heldout<'_> {
    fn ppl(&mut self, domain: usize, e: &Eqm) -> Result<f64> {
        Ok(self.windows(domain, e)?.ppl())
    }

    fn windows(&mut self, domain: usize, e: &Eqm) -> Result<&WindowNll> {
        let key = (domain, e.clone());
        if !self.measured.contains_key(&key) {
            let w = self.inp.eqm.weights(e)?;
            let nll = heldout_windows(&w, &self.inp.heldout[domain].1, self.s)?;
            self.measured.insert(key.clone(), nll);
        }
        Ok(&self.measured[&key])
    }

    /// Each of `eqms`' `wanted` steps against the chord of the static QMs on `domain`.
    fn chord(
        &mut self,
        domain: usize,
        ladder: &[u32],
        eqms: &[Eqm],
        wanted: &[usize],
    ) -> Result<Vec<ChordExcess>> {
        let n = eqms[0].bits.len();
        let mut statics = Vec::new();
        for &b in ladder {
            let e = Eqm::uniform(n, b);
            statics.push((
                self.inp.eqm.footprint(&e)? as u64,
                self.windows(domain, &e)?.clone(),
            ));
        }
        let statics: Vec<(u64, &WindowNll)> = statics.iter().map(|(f, w)| (*f, w)).collect();
        let mut out = Vec::new();
        for &i in wanted {
            let f = self.inp.eqm.footprint(&eqms[i])? as u64;
            let w = self.windows(domain, &eqms[i])?.clone();
            if let Some((excess, se)) = chord_excess(&statics, f, &w) {
                out.push(ChordExcess {
                    step: i,
                    excess,
                    se,
                });
            }
        }
        Ok(out)
    }
}

/// Phase 3 (main held-out text): the static QMs, each variant's first EQM at or below each
/// static footprint, and every `heldout_every`-th step of the shipped trajectory plus those
/// that first reach a static footprint. Returns the statics and the measured steps.
#[allow(clippy::type_complexity)]
fn heldout_main(
    ho: &mut Heldout,
    ev: &mut CalibEvaluator,
    ladder: &[u32],
    variants: &mut [Variant],
    chosen: usize,
    start: &Eqm,
    progress: &mut dyn FnMut(&str, usize, usize, f64),
) -> Result<(Vec<(u32, u64, f64, f64)>, Vec<usize>, Vec<Option<f64>>)> {
    let n = start.bits.len();
    let mut statics = Vec::new();
    for (i, &b) in ladder.iter().enumerate() {
        progress("static QMs", i, ladder.len(), f64::NAN);
        let e = Eqm::uniform(n, b);
        let f = ho.inp.eqm.footprint(&e)? as u64;
        let cp = ev.ppl(&e)?;
        statics.push((b, f, cp, ho.ppl(0, &e)?));
    }
    for v in variants.iter_mut() {
        let eqms = v.trajectory.eqms(start);
        for (k, &(_, f, _, _)) in statics.iter().enumerate() {
            progress("held-out (ablation)", k, statics.len(), f64::NAN);
            let i = v.trajectory.steps.iter().position(|st| st.footprint <= f);
            let p = match i {
                Some(i) => ho.ppl(0, &eqms[i])?,
                None => f64::NAN,
            };
            v.heldout_at_statics.push(p);
        }
    }
    let traj = &variants[chosen].trajectory;
    let eqms = traj.eqms(start);
    let last = traj.steps.len() - 1;
    let mut wanted: Vec<usize> = (0..=last)
        .step_by(ho.s.heldout_every)
        .chain([last])
        .collect();
    for &(_, f, _, _) in &statics {
        if let Some(i) = traj.steps.iter().position(|st| st.footprint <= f) {
            wanted.push(i);
        }
    }
    wanted.sort();
    wanted.dedup();
    let mut held = vec![None; traj.steps.len()];
    for (k, &i) in wanted.iter().enumerate() {
        progress("held-out", k, wanted.len(), f64::NAN);
        held[i] = Some(ho.ppl(0, &eqms[i])?);
    }
    Ok((statics, wanted, held))
}

/// Phase 4: every domain (the first again, from what is already measured): float, the static
/// QMs and the `wanted` steps of `eqms`.
fn heldout_domains(
    ho: &mut Heldout,
    ladder: &[u32],
    eqms: &[Eqm],
    wanted: &[usize],
    progress: &mut dyn FnMut(&str, usize, usize, f64),
) -> Result<Vec<DomainHeldout>> {
    let n = eqms[0].bits.len();
    let mut domains = Vec::new();
    for (d, (name, ids)) in ho.inp.heldout.iter().enumerate() {
        let label = format!("held-out {name}");
        let total = ladder.len() + wanted.len() + 1;
        progress(&label, 0, total, f64::NAN);
        let float_ppl = heldout_ppl(&ho.inp.model.weights, ids, ho.s)?;
        let mut statics_ppl = Vec::new();
        for &b in ladder {
            statics_ppl.push(ho.ppl(d, &Eqm::uniform(n, b))?);
            progress(&label, statics_ppl.len() + 1, total, f64::NAN);
        }
        let mut points = Vec::new();
        for &i in wanted {
            points.push((i, ho.ppl(d, &eqms[i])?));
            progress(&label, ladder.len() + points.len() + 1, total, f64::NAN);
        }
        domains.push(DomainHeldout {
            domain: name.clone(),
            tokens: ho.s.heldout_tokens,
            float_ppl,
            statics: statics_ppl,
            eqms: points,
            chord: ho.chord(d, ladder, eqms, wanted)?,
        });
    }
    Ok(domains)
}

/// Runs the whole build and writes the ensemble to `out`; `progress(phase, done, total, ppl)`.
pub fn build_ensemble(
    inp: &Inputs,
    s: &BuildSettings,
    out: &Path,
    progress: &mut dyn FnMut(&str, usize, usize, f64),
) -> Result<BuildRecord> {
    let t_start = Instant::now();
    let ladder = check_inputs(inp, s)?;
    let n = inp.eqm.modules();
    let avail = Available::uniform(n, &ladder);
    let start = avail.start();
    let base = inp.eqm.base_bytes() as u64;
    let mut ev = CalibEvaluator::new(
        inp.eqm,
        &inp.calib_ids[..s.calib_tokens],
        s.seq_len,
        // The candidates of two rounds: a lazy search re-measures last round's candidates.
        2 * s.stem * s.branch + 2,
    )
    .scored_by(s.calib_score, &inp.model.weights)?;
    let mut phases = PhaseSeconds::default();
    let sensitivity = phases.time("sensitivity", || {
        sensitivities(&mut ev, &avail, s, inp.sensitivity_ids, progress)
    })?;
    let (mut variants, chosen) = phases.time("search", || {
        search_variants(&mut ev, &avail, s, base, progress)
    })?;
    let search_seconds = phases.0.iter().map(|p| p.1).sum();
    let mut ho = Heldout {
        inp,
        s,
        measured: Default::default(),
    };
    let (statics, wanted, held) = phases.time("held-out", || {
        heldout_main(
            &mut ho,
            &mut ev,
            &ladder,
            &mut variants,
            chosen,
            &start,
            progress,
        )
    })?;
    let eqms = variants[chosen].trajectory.eqms(&start);
    let domains = phases.time("held-out domains", || {
        heldout_domains(&mut ho, &ladder, &eqms, &wanted, progress)
    })?;
    let calibration = serde_json::json!({
        "library": inp.eqm.library.manifest.calibration.published(),
        "search_tokens": s.calib_tokens,
        "search_sources": inp.calib_sources,
        "seq_len": s.seq_len,
    });

    let mut record = BuildRecord {
        settings: s.clone(),
        ladder: ladder.clone(),
        base_bytes: base,
        tokenizer_bytes: inp.model.tokenizer.to_json()?.len() as u64,
        statics,
        evaluations: variants
            .iter()
            .map(|v| v.trajectory.evaluations)
            .sum::<usize>()
            + ev.measured.as_ref().map_or(0, |x| x.evaluations)
            + sensitivity.as_ref().map_or(0, |x| x.samples),
        sensitivity,
        forward_equivalents: ev.forward_equivalents(),
        variants,
        chosen,
        heldout: held,
        build_seconds: 0.0,
        search_seconds,
        domains,
        calibration,
        nesting: ev.model.library.manifest.nesting,
        phase_seconds: PhaseSeconds::default(),
    };
    phases.time("package", || {
        package::write_ensemble(
            out,
            &package::PackageInput {
                name: inp.name.clone(),
                weights: &inp.model.weights,
                tokenizer: &inp.model.tokenizer,
                model: inp.eqm,
                trajectory: &record.variants[chosen].trajectory,
                start: &start,
                heldout: &record.heldout,
                n_up: s.n_up,
                n_low: s.n_low,
                calibration: record.calibration.clone(),
                build: serde_json::to_value(s).unwrap(),
                pack_bytes: s.pack_bytes,
            },
        )
    })?;
    record.phase_seconds = phases;
    record.build_seconds = t_start.elapsed().as_secs_f64();
    report::write(out, &record)?;
    Ok(record)
}
