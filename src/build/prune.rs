//! Pruning (FlexQuant §3.3): drop the intermediate-bit module versions the trajectory uses
//! least, then search again without them (a module may then jump several bit-widths at once).
//!
//! A version's usage is the number of trajectory steps at which its module sits at that
//! bit-width, each step weighted by `1 + progress`, where progress runs from 0 at QM(n_up) to 1
//! at QM(n_low): versions that carry the small-footprint EQMs, where accuracy is fragile, weigh
//! up to twice as much. The lowest-scoring fraction `prune_rate` of all intermediate versions is
//! dropped (ties: the higher bit-width, which costs more storage, goes first). The end points
//! n_up and n_low of every module are never dropped.

use crate::build::search::{Available, Trajectory};
use crate::error::{Error, Result};
use crate::quant::eqm::Eqm;

pub fn check_rate(prune_rate: f64) -> Result<()> {
    if !(0.0..1.0).contains(&prune_rate) {
        return Err(Error::input(format!(
            "--prune {prune_rate} must be in [0, 1)"
        )));
    }
    Ok(())
}

/// `(module, bits, usage score)` of every intermediate version in `avail`.
pub fn usage(traj: &Trajectory, start: &Eqm, avail: &Available) -> Vec<(usize, u32, f64)> {
    let eqms = traj.eqms(start);
    let f0 = traj.steps[0].footprint as f64;
    let f1 = traj.steps.last().unwrap().footprint as f64;
    let mut out = Vec::new();
    for (m, ladder) in avail.bits.iter().enumerate() {
        for &b in &ladder[1..ladder.len().saturating_sub(1)] {
            let score: f64 = eqms
                .iter()
                .zip(&traj.steps)
                .filter(|(e, _)| e.bits[m] == b)
                .map(|(_, s)| 1.0 + (f0 - s.footprint as f64) / (f0 - f1).max(1.0))
                .sum();
            out.push((m, b, score));
        }
    }
    out
}

/// `avail` without the `prune_rate` least-used intermediate versions.
pub fn prune(
    avail: &Available,
    traj: &Trajectory,
    start: &Eqm,
    prune_rate: f64,
) -> Result<Available> {
    check_rate(prune_rate)?;
    let mut u = usage(traj, start, avail);
    let drop = (prune_rate * u.len() as f64).floor() as usize;
    u.sort_by(|a, b| a.2.total_cmp(&b.2).then(b.1.cmp(&a.1)));
    let mut out = avail.clone();
    for &(m, b, _) in &u[..drop] {
        out.bits[m].retain(|&x| x != b);
    }
    Ok(out)
}

/// Intermediate versions kept, over all modules.
pub fn intermediate_versions(avail: &Available) -> usize {
    avail.bits.iter().map(|b| b.len().saturating_sub(2)).sum()
}
