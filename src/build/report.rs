//! The build report: figures (report.json), a table (report.md) and plots (SVG + PNG) of
//! perplexity against footprint and of storage. Written next to the ensemble from
//! `build-record.json`, so `flexquant report DIR` can redo it without rebuilding.

use crate::build::domains::{
    above_static_chord, significantly_above, DomainHeldout, SIGNIFICANT_SE,
};
use crate::build::pipeline::BuildRecord;
use crate::error::{Error, Result};
use crate::quant::plot::{self, Chart, Series};
use serde_json::{json, Value};
use std::path::Path;

pub const RECORD_FILE: &str = "build-record.json";

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

fn mean_finite(x: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = x.filter(|p| p.is_finite()).collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// One domain's `{bits | step, footprint_bytes, ppl}` points: the static QMs, then the EQMs.
fn domain_points(r: &BuildRecord, d: &DomainHeldout) -> Value {
    let steps = &r.variants[r.chosen].trajectory.steps;
    let statics = r
        .statics
        .iter()
        .zip(&d.statics)
        .map(|(s, p)| json!({"bits": s.0, "step": null, "footprint_bytes": s.1, "ppl": p}));
    let eqms = d.eqms.iter().map(
        |&(i, p)| json!({"bits": null, "step": i, "footprint_bytes": steps[i].footprint, "ppl": p}),
    );
    Value::Array(statics.chain(eqms).collect())
}

/// The figures named in the builder issue, from a record.
pub fn figures(r: &BuildRecord) -> Value {
    let v = &r.variants[r.chosen];
    let steps = &v.trajectory.steps;
    let max_step = steps
        .windows(2)
        .map(|w| w[0].footprint - w[1].footprint)
        .max()
        .unwrap_or(0);
    let span = steps[0].footprint - steps.last().unwrap().footprint;
    let static_steps: Vec<u64> = r.statics.windows(2).map(|w| w[0].1 - w[1].1).collect();
    let min_static = static_steps.iter().copied().min().unwrap_or(0);
    let storage = v.storage_bytes + r.tokenizer_bytes;
    let n_up_bytes = r.statics[0].1;
    let ladder_bytes: u64 = steps.iter().map(|s| s.footprint).sum();
    let static_sum: u64 = r.statics.iter().map(|s| s.1).sum();
    let eqm_vs_static: Vec<Value> = r
        .statics
        .iter()
        .map(|&(bits, f, _, ppl)| {
            let i = steps.iter().position(|s| s.footprint <= f);
            let eqm = i.and_then(|i| r.heldout[i]);
            json!({"bits": bits, "static_bytes": f, "static_heldout_ppl": ppl,
                   "eqm_step": i, "eqm_bytes": i.map(|i| steps[i].footprint),
                   "eqm_heldout_ppl": eqm, "delta": eqm.map(|e| e - ppl)})
        })
        .collect();
    // Is every measured EQM at or below the straight line between neighbouring static QMs?
    let static_points: Vec<(u64, f64)> = r.statics.iter().map(|s| (s.1, s.3)).collect();
    let measured: Vec<(u64, f64)> = steps
        .iter()
        .zip(&r.heldout)
        .filter_map(|(st, h)| h.map(|p| (st.footprint, p)))
        .collect();
    let above_chord = above_static_chord(&static_points, &measured);
    let ablation: Vec<Value> = r
        .variants
        .iter()
        .map(|v| {
            json!({"prune": v.prune, "branch": v.branch, "intermediate_versions": v.intermediate_versions,
                   "storage_bytes": v.storage_bytes + r.tokenizer_bytes,
                   "storage_vs_n_up": (v.storage_bytes + r.tokenizer_bytes) as f64 / n_up_bytes as f64,
                   "final_calib_ppl": v.trajectory.steps.last().unwrap().calib_ppl,
                   "mean_calib_ppl": mean_finite(v.trajectory.steps.iter().map(|s| s.calib_ppl)),
                   "heldout_delta_at_statics": v.heldout_at_statics.iter().zip(&r.statics)
                       .map(|(p, s)| if p.is_finite() { json!(p - s.3) } else { Value::Null }).collect::<Vec<_>>(),
                   "steps": v.trajectory.steps.len(),
                   "evaluations": v.trajectory.evaluations})
        })
        .collect();
    json!({
        "n_up": r.settings.n_up,
        "n_low": r.settings.n_low,
        "ladder": r.ladder,
        "steps": steps.len(),
        "max_step_bytes": max_step,
        "span_bytes": span,
        "max_step_vs_span": max_step as f64 / span.max(1) as f64,
        "granularity_ratio": min_static as f64 / max_step.max(1) as f64,
        "static_steps_bytes": static_steps,
        "storage_bytes": storage,
        "storage_vs_n_up": storage as f64 / n_up_bytes as f64,
        "nested": r.nesting.map(|n| n.name()),
        "storage_vs_static_ladder": ladder_bytes as f64 / storage as f64,
        "storage_vs_static_sum": static_sum as f64 / storage as f64,
        "eqm_vs_static": eqm_vs_static,
        "eqms_above_static_chord": above_chord,
        "calibration_mix": r.calibration,
        "float_by_domain": r.domains.iter().map(|d| (d.domain.clone(), json!(d.float_ppl))).collect::<serde_json::Map<_, _>>(),
        "heldout_by_domain": r.domains.iter().map(|d| (d.domain.clone(), domain_points(r, d))).collect::<serde_json::Map<_, _>>(),
        "eqms_above_static_chord_by_domain": r.domains.iter().map(|d| {
            let st: Vec<(u64, f64)> = r.statics.iter().zip(&d.statics).map(|(s, &p)| (s.1, p)).collect();
            let eq: Vec<(u64, f64)> = d.eqms.iter().map(|&(i, p)| (steps[i].footprint, p)).collect();
            (d.domain.clone(), json!(above_static_chord(&st, &eq)))
        }).collect::<serde_json::Map<_, _>>(),
        // The same, counting only EQMs above by more than SIGNIFICANT_SE standard errors of
        // the paired difference (the held-out windows are the samples): what the held-out text
        // can tell from its own noise. Null in records from before per-window NLLs.
        "significant_se": SIGNIFICANT_SE,
        "eqms_significantly_above_static_chord": r.domains.first().filter(|d| !d.chord.is_empty()).map(|d| significantly_above(&d.chord)),
        "eqms_significantly_above_static_chord_by_domain": r.domains.iter().map(|d| {
            (d.domain.clone(), match d.chord.is_empty() { true => Value::Null, false => json!(significantly_above(&d.chord)) })
        }).collect::<serde_json::Map<_, _>>(),
        // Each domain's EQMs above the chord: step, excess (ppl) and its standard error.
        "chord_excess_by_domain": r.domains.iter().map(|d| {
            let above: Vec<Value> = d.chord.iter().filter(|c| c.excess > 0.0)
                .map(|c| json!({"step": c.step, "excess": c.excess, "se": c.se, "excess_in_se": c.excess / c.se})).collect();
            (d.domain.clone(), Value::Array(above))
        }).collect::<serde_json::Map<_, _>>(),
        "prune": r.settings.prune,
        "ablation": ablation,
        "build_seconds": r.build_seconds,
        "search_seconds": r.search_seconds,
        "phase_seconds": r.phase_seconds.0.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "evaluations": r.evaluations,
        "sensitivity": r.sensitivity,
        "forward_equivalents": r.forward_equivalents,
        "base_bytes": r.base_bytes,
        "static": r.statics.iter().map(|&(b, f, c, h)| json!({"bits": b, "bytes": f, "calib_ppl": c, "heldout_ppl": h})).collect::<Vec<_>>(),
        "settings": r.settings,
        "note": "The demo model's source weights are 4-bit (GGUF Q4_1): its 'float' base is that model dequantized, so versions above 4 bits are near-lossless and the default demo ensemble spans n_up = 4 to n_low = 2.",
    })
}

fn markdown(f: &Value, r: &BuildRecord) -> String {
    let mut s = format!(
        "# FlexQuant ensemble report\n\n{}\n\nTrajectory QM({}) -> QM({}): {} steps, max step {:.3} MB of a {:.2} MB span ({:.2}%), granularity ratio {:.1}x (smallest static step / max EQM step).\n\n",
        f["note"].as_str().unwrap(),
        r.settings.n_up,
        r.settings.n_low,
        f["steps"],
        mb(f["max_step_bytes"].as_u64().unwrap()),
        mb(f["span_bytes"].as_u64().unwrap()),
        100.0 * f["max_step_vs_span"].as_f64().unwrap(),
        f["granularity_ratio"].as_f64().unwrap()
    );
    s += &format!(
        "Storage {:.2} MB = {:.2}x QM(n_up) ({}); storing every trajectory point as its own model would take {:.1}x more; all static QMs {:.2}x more.\n\n",
        mb(f["storage_bytes"].as_u64().unwrap()),
        f["storage_vs_n_up"].as_f64().unwrap(),
        match r.nesting {
            Some(n) => format!("nested versions ({}), one bit-plane file per module", n.name()),
            None => "a file per module version".into(),
        },
        f["storage_vs_static_ladder"].as_f64().unwrap(),
        f["storage_vs_static_sum"].as_f64().unwrap()
    );
    s += "| static QM | footprint MB | held-out ppl | EQM at <= footprint: MB | EQM held-out ppl | delta |\n|---|---|---|---|---|---|\n";
    for e in f["eqm_vs_static"].as_array().unwrap() {
        s += &format!(
            "| {} bit | {:.2} | {:.3} | {} | {} | {} |\n",
            e["bits"],
            mb(e["static_bytes"].as_u64().unwrap()),
            e["static_heldout_ppl"].as_f64().unwrap(),
            e["eqm_bytes"]
                .as_u64()
                .map(|b| format!("{:.2}", mb(b)))
                .unwrap_or("-".into()),
            e["eqm_heldout_ppl"]
                .as_f64()
                .map(|p| format!("{p:.3}"))
                .unwrap_or("-".into()),
            e["delta"]
                .as_f64()
                .map(|p| format!("{p:+.3}"))
                .unwrap_or("-".into()),
        );
    }
    let inner: Vec<String> = r.statics[1..r.statics.len().saturating_sub(1)]
        .iter()
        .map(|st| format!("QM({})", st.0))
        .collect();
    let ablation = f["ablation"].as_array().unwrap();
    let title = if ablation.len() > 1 {
        "Pruning ablation"
    } else {
        "Pruning (no ablation: `--ablation RATES` runs one; the full preset runs it for `--nested none`)"
    };
    s += &format!("\n## {title}\n\nHeld-out delta: the first EQM at or below each inner static QM's footprint, minus that QM ({}).\n\n| prune | branch | intermediate versions | storage MB | x QM(n_up) | mean calib ppl | final calib ppl | held-out delta |\n|---|---|---|---|---|---|---|---|\n", inner.join(", "));
    for a in ablation {
        let deltas = a["heldout_delta_at_statics"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let inner_deltas: Vec<String> = deltas
            .iter()
            .skip(1)
            .take(inner.len())
            .map(|d| d.as_f64().map_or("-".into(), |d| format!("{d:+.2}")))
            .collect();
        s += &format!(
            "| {:.0}% | {} | {} | {:.2} | {:.2} | {:.3} | {:.3} | {} |\n",
            100.0 * a["prune"].as_f64().unwrap(),
            a["branch"],
            a["intermediate_versions"],
            mb(a["storage_bytes"].as_u64().unwrap()),
            a["storage_vs_n_up"].as_f64().unwrap(),
            a["mean_calib_ppl"].as_f64().unwrap(),
            a["final_calib_ppl"].as_f64().unwrap(),
            inner_deltas.join(" / ")
        );
    }
    s += &domains_markdown(f, r);
    let phases: Vec<String> = r
        .phase_seconds
        .0
        .iter()
        .map(|(k, v)| format!("{k} {v:.0} s"))
        .collect();
    s += &format!(
        "\nBuild: {:.0} s ({:.0} s searching; {}), {} calibration-ppl evaluations ({:.0} whole-forward equivalents thanks to layer caching), branch {}, stem {}, {} scoring, {} slope, {} calibration tokens scored by {}.\n\nPlots: `trajectory.svg`/`.png`, `storage.svg`/`.png`, `domains.svg`/`.png` (with several held-out domains).\n",
        r.build_seconds,
        r.search_seconds,
        phases.join(", "),
        r.evaluations,
        r.forward_equivalents,
        r.settings.branch,
        r.settings.stem,
        if r.settings.lazy { "lazy" } else { "exact" },
        match r.settings.slope {
            crate::build::search::Slope::FromStart => "from-start",
            crate::build::search::Slope::Marginal => "marginal",
        },
        r.settings.calib_tokens,
        match r.settings.calib_score {
            crate::build::evaluator::CalibScore::Tokens => "the perplexity of their own next tokens",
            crate::build::evaluator::CalibScore::Float =>
                "the cross-entropy against the float model's next-token distributions",
        }
    );
    s
}

/// Per held-out domain: float, each static QM (and its ratio to float), EQMs above the chord.
fn domains_markdown(f: &Value, r: &BuildRecord) -> String {
    if r.domains.is_empty() {
        return String::new();
    }
    let qms: Vec<String> = r.statics.iter().map(|s| format!("QM({})", s.0)).collect();
    let mut s = format!(
        "\n## Held-out perplexity by domain\n\nFloat, each static QM (x float) and how many measured EQMs lie above the chord of the static QMs, on each held-out text ({} tokens); in brackets, how many by more than {SIGNIFICANT_SE} standard errors of the paired difference (the text's windows as samples).\n\n| domain | float | {} | EQMs above chord |\n|---|---|{}---|\n",
        r.domains[0].tokens,
        qms.join(" | "),
        "---|".repeat(qms.len())
    );
    for d in &r.domains {
        let cells: Vec<String> = d
            .statics
            .iter()
            .map(|p| format!("{p:.2} ({:.2}x)", p / d.float_ppl))
            .collect();
        s += &format!(
            "| {} | {:.2} | {} | {} of {} ({} significantly) |\n",
            d.domain,
            d.float_ppl,
            cells.join(" | "),
            f["eqms_above_static_chord_by_domain"][&d.domain],
            d.eqms.len(),
            f["eqms_significantly_above_static_chord_by_domain"][&d.domain],
        );
    }
    let above: Vec<String> = r
        .domains
        .iter()
        .flat_map(|d| {
            d.chord.iter().filter(|c| c.excess > 0.0).map(move |c| {
                format!(
                    "{} step {}: +{:.3} ppl ({:.2} standard errors)",
                    d.domain,
                    c.step,
                    c.excess,
                    c.excess / c.se
                )
            })
        })
        .collect();
    if !above.is_empty() {
        s += &format!("\nAbove the chord: {}.\n", above.join("; "));
    }
    s
}

/// Perplexity relative to float against footprint, one EQM curve and one static-QM line per
/// domain (relative, since the domains' own perplexities differ several-fold).
fn domains_chart(r: &BuildRecord, dir: &Path) -> Result<()> {
    let steps = &r.variants[r.chosen].trajectory.steps;
    let mut series = Vec::new();
    for d in &r.domains {
        series.push(Series {
            label: format!("{}: EQMs", d.domain),
            points: d
                .eqms
                .iter()
                .map(|&(i, p)| (mb(steps[i].footprint), p / d.float_ppl))
                .collect(),
        });
        series.push(Series {
            label: format!("{}: static QMs", d.domain),
            points: r
                .statics
                .iter()
                .zip(&d.statics)
                .map(|(s, p)| (mb(s.1), p / d.float_ppl))
                .collect(),
        });
    }
    plot::write(
        &Chart {
            title: "Held-out perplexity / float, per domain".into(),
            x_label: "footprint (MB)".into(),
            y_label: "perplexity / float".into(),
            series,
            marks: vec![],
        },
        &dir.join("domains.svg"),
        &dir.join("domains.png"),
    )
}

fn charts(r: &BuildRecord, f: &Value, dir: &Path) -> Result<()> {
    if !r.domains.is_empty() {
        domains_chart(r, dir)?;
    }
    let mut series = Vec::new();
    for v in &r.variants {
        series.push(Series {
            label: format!("EQM trajectory, calib ppl, prune {:.0}%", v.prune * 100.0),
            points: v
                .trajectory
                .steps
                .iter()
                .filter(|s| s.calib_ppl.is_finite())
                .map(|s| (mb(s.footprint), s.calib_ppl))
                .collect(),
        });
    }
    let chosen = &r.variants[r.chosen].trajectory.steps;
    series.push(Series {
        label: "shipped EQMs, held-out ppl".into(),
        points: chosen
            .iter()
            .zip(&r.heldout)
            .filter_map(|(s, h)| h.map(|p| (mb(s.footprint), p)))
            .collect(),
    });
    let marks = r
        .statics
        .iter()
        .map(|&(b, fp, _, h)| (format!("QM({b}) held-out"), mb(fp), h))
        .collect();
    plot::write(
        &Chart {
            title: "Perplexity vs footprint: static QMs and the EQM trajectory".into(),
            x_label: "footprint (MB)".into(),
            y_label: "perplexity".into(),
            series,
            marks,
        },
        &dir.join("trajectory.svg"),
        &dir.join("trajectory.png"),
    )?;
    // Storage bars: QM(n_up), every pruning variant (the shipped one highlighted), all static QMs.
    let n_up = r.statics[0].1;
    let bar = |label: String, bytes: u64, hi: bool| {
        let text = format!(
            "{label}: {:.1} MB ({:.2}x QM(n_up))",
            mb(bytes),
            bytes as f64 / n_up as f64
        );
        (text, mb(bytes), hi)
    };
    let mut bars = vec![bar(format!("QM({})", r.settings.n_up), n_up, false)];
    for (a, v) in f["ablation"].as_array().unwrap().iter().zip(&r.variants) {
        let shipped = v.prune == r.variants[r.chosen].prune;
        bars.push(bar(
            format!(
                "ensemble, prune {:.0}%{}",
                100.0 * v.prune,
                if shipped { " (shipped)" } else { "" }
            ),
            a["storage_bytes"].as_u64().unwrap(),
            shipped,
        ));
    }
    let bits: Vec<String> = r.statics.iter().map(|s| s.0.to_string()).collect();
    bars.push(bar(
        format!("every static QM ({} bits)", bits.join("/")),
        r.statics.iter().map(|s| s.1).sum(),
        false,
    ));
    plot::write_bars(
        &plot::Bars {
            title: "Storage: the ensemble against QM(n_up) and the static ladder".into(),
            x_label: "storage (MB)".into(),
            bars,
        },
        &dir.join("storage.svg"),
        &dir.join("storage.png"),
    )
}

/// Writes report.json, report.md and the plots into `dir` (and the record they come from).
pub fn write(dir: &Path, r: &BuildRecord) -> Result<()> {
    let put = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))
    };
    put(RECORD_FILE, serde_json::to_string(r).unwrap().as_bytes())?;
    let f = figures(r);
    put(
        "report.json",
        serde_json::to_string_pretty(&f).unwrap().as_bytes(),
    )?;
    put("report.md", markdown(&f, r).as_bytes())?;
    charts(r, &f, dir)
}

/// `flexquant report DIR`: redo the report from the record a build left in DIR.
pub fn rewrite(dir: &Path) -> Result<Value> {
    let p = dir.join(RECORD_FILE);
    let bytes = crate::error::read_capped(&p, 256 << 20)?;
    let r: BuildRecord =
        serde_json::from_slice(&bytes).map_err(|e| Error::format(p.display(), e))?;
    write(dir, &r)?;
    Ok(figures(&r))
}
