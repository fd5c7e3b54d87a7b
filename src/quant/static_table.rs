//! The static-model table: the float model and every uniform-bit-width model QM(n) of each
//! library, with footprint, held-out and calibration perplexity and top-1 next-token
//! agreement with the float model (on the held-out tokens). Written as JSON, Markdown and a
//! perplexity-vs-footprint plot.
//!
//! Footprints: quantized rows are exact bytes of the packed modules plus the base (see
//! `eqm`: embedding/head at 8 bits, norms f32); the float row is the model at f16 (2 bytes
//! per parameter), the unquantized form a browser would load, although it is evaluated in f32.
//!
//! Default group size: 64, by measurement on the demo model (held-out ppl, 4096 tokens; float
//! 22.37; footprints include the 8-bit base):
//! - 128 is dominated: the 576-wide rows are not a multiple of 128, so codes are padded to 640
//!   columns, and g128 is *larger* than g64 at every bit-width (4-bit 93.7 vs 89.9 MB) and
//!   worse (RTN 4/3-bit: 33.2/284 vs 28.6/137).
//! - 32 costs 0.5 bit per weight more than 64 (+8.4 MB at every bit-width) for a lower ppl at
//!   equal bits (GPTQ 3-bit 29.5 at 85.1 MB vs 33.7 at 76.7 MB); its 4-bit point is lossless
//!   (22.37) only because the source weights are Q4_1 blocks of 32, an artifact of this model.
//!   With one bit-width per module, g64's ladder reaches 85 MB by mixing 3 and 4 bits, which is
//!   where FlexQuant's EQMs live; the static points alone do not separate 32 and 64.
//!
//! So 64: the smallest group overhead that is not dominated.

use crate::error::{Error, Result};
use crate::model::weights::Weights;
use crate::quant::eqm::{f16_bytes, EqmModel, BASE_BITS};
use crate::quant::evaluate::{score, SingleSwap};
use crate::quant::plot::{self, Chart, Series};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const DEFAULT_GROUP: usize = 64;

/// Tokens to evaluate on, and where they came from.
pub struct EvalText {
    pub name: String,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TextInfo {
    pub name: String,
    pub tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct StaticRow {
    /// `None` for the float model.
    pub bits: Option<u32>,
    /// "float", "rtn" or "gptq".
    pub method: String,
    pub group: Option<usize>,
    pub bytes: usize,
    pub heldout_ppl: f64,
    /// Held-out ppl on every held-out text (domain name -> ppl; the first is `heldout_ppl`).
    pub heldout_by_domain: std::collections::BTreeMap<String, f64>,
    pub calib_ppl: f64,
    /// Fraction of held-out positions where the model's top-1 token equals the float model's.
    pub top1_agreement: f64,
    pub eval_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StaticReport {
    pub model: String,
    pub ctx: usize,
    pub heldout: TextInfo,
    /// Every held-out text (domain), the first being `heldout`.
    pub domains: Vec<TextInfo>,
    pub calib: TextInfo,
    pub base: String,
    pub rows: Vec<StaticRow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub single_swap: Option<SingleSwap>,
}

/// A domain's name from its held-out file: `brown-heldout.txt` -> `brown`.
pub fn domain_name(file: &str) -> String {
    let stem = Path::new(file)
        .file_stem()
        .map_or_else(|| file.to_string(), |s| s.to_string_lossy().into_owned());
    stem.strip_suffix("-heldout").unwrap_or(&stem).to_string()
}

/// Held-out ppl of `w` on every domain but the first (which the caller scores itself).
fn other_domains(
    w: &Weights,
    domains: &[EvalText],
    first: f64,
    ctx: usize,
) -> Result<std::collections::BTreeMap<String, f64>> {
    let mut out = std::collections::BTreeMap::new();
    out.insert(domain_name(&domains[0].name), first);
    for d in &domains[1..] {
        out.insert(domain_name(&d.name), score(w, &d.tokens, ctx)?.ppl());
    }
    Ok(out)
}

/// Evaluates the float model and QM(n) of every library for every n it holds, on every
/// held-out text (`domains`, the first being the one of `heldout_ppl` and the agreement).
pub fn evaluate(
    model_source: &str,
    float: &Weights,
    libraries: &[&EqmModel],
    domains: &[EvalText],
    calib: &EvalText,
    ctx: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<StaticReport> {
    let Some(heldout) = domains.first() else {
        return Err(Error::input(
            "the static table needs at least one held-out text",
        ));
    };
    progress("float");
    let t0 = Instant::now();
    let ref_held = score(float, &heldout.tokens, ctx)?;
    let ref_calib = score(float, &calib.tokens, ctx)?;
    let mut rows = vec![StaticRow {
        bits: None,
        method: "float".into(),
        group: None,
        bytes: f16_bytes(&float.config),
        heldout_ppl: ref_held.ppl(),
        heldout_by_domain: other_domains(float, domains, ref_held.ppl(), ctx)?,
        calib_ppl: ref_calib.ppl(),
        top1_agreement: 1.0,
        eval_seconds: t0.elapsed().as_secs_f64(),
    }];
    for lib in libraries {
        let m = &lib.library.manifest;
        for &bits in &m.bits {
            progress(&format!("{} g{} {bits}-bit", m.method_label(), m.group));
            let t0 = Instant::now();
            let eqm = lib.uniform(bits);
            let w = lib.weights(&eqm)?;
            let held = score(&w, &heldout.tokens, ctx)?;
            let cal = score(&w, &calib.tokens, ctx)?;
            rows.push(StaticRow {
                bits: Some(bits),
                method: m.method_label(),
                group: Some(m.group),
                bytes: lib.footprint(&eqm)?,
                heldout_ppl: held.ppl(),
                heldout_by_domain: other_domains(&w, domains, held.ppl(), ctx)?,
                calib_ppl: cal.ppl(),
                top1_agreement: held.agreement(&ref_held),
                eval_seconds: t0.elapsed().as_secs_f64(),
            });
            // Each uniform model is evaluated once; keep memory at one bit-width's modules.
            lib.clear_cache();
        }
    }
    Ok(StaticReport {
        model: model_source.into(),
        ctx,
        heldout: TextInfo {
            name: heldout.name.clone(),
            tokens: heldout.tokens.len(),
        },
        domains: domains
            .iter()
            .map(|d| TextInfo {
                name: d.name.clone(),
                tokens: d.tokens.len(),
            })
            .collect(),
        calib: TextInfo {
            name: calib.name.clone(),
            tokens: calib.tokens.len(),
        },
        base: format!(
            "embedding (tied head) at {BASE_BITS} bits in the packed format with the library's \
             group, norms f32; float row: all weights at f16"
        ),
        rows,
        single_swap: None,
    })
}

/// Writes `static.json`, `static.md`, `static.svg` and `static.png` into `dir`.
pub fn write_report(r: &StaticReport, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json = dir.join("static.json");
    let md = dir.join("static.md");
    let (svg, png) = (dir.join("static.svg"), dir.join("static.png"));
    let text = serde_json::to_string_pretty(r).map_err(|e| Error::format(json.display(), e))?;
    std::fs::write(&json, text).map_err(|e| Error::io(&json, e))?;
    std::fs::write(&md, markdown(r)).map_err(|e| Error::io(&md, e))?;
    plot::write(&chart(r), &svg, &png)?;
    let mut files = vec![json, md, svg, png];
    if r.domains.len() > 1 {
        let (svg, png) = (
            dir.join("static-domains.svg"),
            dir.join("static-domains.png"),
        );
        plot::write(&domains_chart(r), &svg, &png)?;
        files.extend([svg, png]);
    }
    Ok(files)
}

/// Held-out ppl relative to the float model's, one curve per domain and method: how much
/// each bit-width loses on each kind of text.
fn domains_chart(r: &StaticReport) -> Chart {
    let float = r.rows.iter().find(|row| row.group.is_none());
    let mut series: Vec<Series> = Vec::new();
    for row in r.rows.iter().filter(|row| row.group.is_some()) {
        for (domain, ppl) in &row.heldout_by_domain {
            let Some(f) = float.and_then(|f| f.heldout_by_domain.get(domain)) else {
                continue;
            };
            let label = format!("{} {domain}", row.method.to_uppercase());
            let point = (row.bytes as f64 / 1e6, ppl / f);
            match series.iter_mut().find(|s| s.label == label) {
                Some(s) => s.points.push(point),
                None => series.push(Series {
                    label,
                    points: vec![point],
                }),
            }
        }
    }
    Chart {
        title: "Static models: held-out perplexity / float's, per domain".into(),
        x_label: "footprint (MB, modules + base)".into(),
        y_label: "held-out ppl / float ppl (log)".into(),
        series,
        marks: Vec::new(),
    }
}

fn chart(r: &StaticReport) -> Chart {
    let mut series: Vec<Series> = Vec::new();
    let mut float = None;
    for row in &r.rows {
        let mb = row.bytes as f64 / 1e6;
        match row.group {
            None => float = Some((mb, row.heldout_ppl)),
            Some(g) => {
                let label = format!("{} g{g}", row.method.to_uppercase());
                let i = match series.iter().position(|s| s.label == label) {
                    Some(i) => i,
                    None => {
                        series.push(Series {
                            label,
                            points: Vec::new(),
                        });
                        series.len() - 1
                    }
                };
                series[i].points.push((mb, row.heldout_ppl));
            }
        }
    }
    // The float model (far to the right at f16) as a horizontal reference line instead.
    if let Some((mb, ppl)) = float {
        let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
        let (lo, hi) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
        if lo <= hi {
            series.push(Series {
                label: format!("float ({mb:.0} MB at f16): {ppl:.2}"),
                points: vec![(lo, ppl), (hi, ppl)],
            });
        }
    }
    Chart {
        title: format!(
            "Static models: held-out perplexity vs footprint ({} tokens)",
            r.heldout.tokens
        ),
        x_label: "footprint (MB, modules + base)".into(),
        y_label: "held-out perplexity (log)".into(),
        series,
        marks: Vec::new(),
    }
}

pub fn markdown(r: &StaticReport) -> String {
    let mut s = markdown_main(r);
    if r.domains.len() > 1 {
        s += &markdown_domains(r);
    }
    s += &markdown_nested(r);
    s
}

/// Nested libraries against independent GPTQ at every bit-width both have: held-out ppl and
/// top-1 agreement side by side (empty when no nested library was tabulated).
fn markdown_nested(r: &StaticReport) -> String {
    let nested: Vec<&str> = r
        .rows
        .iter()
        .map(|row| row.method.as_str())
        .filter(|m| m.contains("-nested-"))
        .fold(Vec::new(), |mut v, m| {
            if !v.contains(&m) {
                v.push(m);
            }
            v
        });
    let find = |bits: u32, method: &str| {
        r.rows
            .iter()
            .find(|row| row.bits == Some(bits) && row.method == method)
    };
    let cell = |row: Option<&StaticRow>| {
        row.map_or("-".into(), |x| {
            format!("{:.3} ({:.1}%)", x.heldout_ppl, 100.0 * x.top1_agreement)
        })
    };
    let mut bits: Vec<u32> = r.rows.iter().filter_map(|row| row.bits).collect();
    bits.sort_unstable_by(|a, b| b.cmp(a));
    bits.dedup();
    if nested.is_empty() {
        return String::new();
    }
    let mut s = format!(
        "\n## Nested vs independent versions\n\nHeld-out ppl (top-1 agreement with float).\n\n\
         | bits | gptq (independent) | {} |\n|---:|---:|{}\n",
        nested.join(" | "),
        "---:|".repeat(nested.len())
    );
    for b in bits {
        let cells: Vec<String> = nested.iter().map(|m| cell(find(b, m))).collect();
        s += &format!(
            "| {b} | {} | {} |\n",
            cell(find(b, "gptq")),
            cells.join(" | ")
        );
    }
    s
}

/// Held-out ppl on every domain, and relative to the float model's.
fn markdown_domains(r: &StaticReport) -> String {
    let names: Vec<String> = r.domains.iter().map(|d| domain_name(&d.name)).collect();
    let mut s = format!(
        "\n## Held-out perplexity per domain\n\n{}\n\n| bits | method | {} |\n|---:|:---|{}\n",
        r.domains
            .iter()
            .map(|d| format!("`{}`: {} tokens", d.name, d.tokens))
            .collect::<Vec<_>>()
            .join("; "),
        names
            .iter()
            .map(|n| format!("{n} ppl (vs float)"))
            .collect::<Vec<_>>()
            .join(" | "),
        "---:|".repeat(names.len())
    );
    let float = r.rows.iter().find(|row| row.group.is_none());
    for row in &r.rows {
        let cells: Vec<String> = names
            .iter()
            .map(|n| {
                let p = row.heldout_by_domain.get(n).copied().unwrap_or(f64::NAN);
                let f = float.and_then(|f| f.heldout_by_domain.get(n)).copied();
                match f {
                    Some(f) if row.group.is_some() => {
                        format!("{p:.3} ({:+.1}%)", 100.0 * (p / f - 1.0))
                    }
                    _ => format!("{p:.3}"),
                }
            })
            .collect();
        s += &format!(
            "| {} | {} | {} |\n",
            row.bits.map_or("float".into(), |b| b.to_string()),
            row.method,
            cells.join(" | ")
        );
    }
    s
}

fn markdown_main(r: &StaticReport) -> String {
    let mut s = format!(
        "# Static models\n\nModel: `{}`. Held-out: {} tokens of `{}`; calibration ppl: {} tokens \
         of `{}`; windows of {} tokens. Base: {}.\n\n\
         | bits | method | group | footprint (MB) | held-out ppl | calib ppl | top-1 agreement |\n\
         |---:|:---|---:|---:|---:|---:|---:|\n",
        r.model, r.heldout.tokens, r.heldout.name, r.calib.tokens, r.calib.name, r.ctx, r.base
    );
    for row in &r.rows {
        s += &format!(
            "| {} | {} | {} | {:.2} | {:.3} | {:.3} | {:.2}% |\n",
            row.bits.map_or("float".into(), |b| b.to_string()),
            row.method,
            row.group.map_or("-".into(), |g| g.to_string()),
            row.bytes as f64 / 1e6,
            row.heldout_ppl,
            row.calib_ppl,
            100.0 * row.top1_agreement
        );
    }
    if let Some(sw) = &r.single_swap {
        s += &format!(
            "\n## Single swaps\n\nIn QM({}) (held-out ppl {:.4} on its first {} tokens), each of \
             the {} modules replaced alone by its {}-bit version: ppl change min {:+.4}, median \
             {:+.4}, 90th percentile {:+.4}, max {:+.4}.\n",
            sw.from_bits,
            sw.base_ppl,
            sw.tokens,
            sw.entries.len(),
            sw.to_bits,
            sw.delta_min,
            sw.delta_median,
            sw.delta_p90,
            sw.delta_max
        );
        let mut worst: Vec<_> = sw.entries.iter().collect();
        worst.sort_by(|a, b| b.delta.total_cmp(&a.delta));
        s += "\nLargest changes: ";
        s += &worst
            .iter()
            .take(8)
            .map(|e| format!("{} {:+.4}", e.module, e.delta))
            .collect::<Vec<_>>()
            .join(", ");
        s += "\n";
    }
    s
}
