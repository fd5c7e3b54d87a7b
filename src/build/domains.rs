//! Held-out perplexity per text domain (issue 17): the build measures float, every static QM
//! and the shipped trajectory's measured EQMs on each held-out text it is given, so the report
//! shows what quantization costs on text unlike the calibration set, not on Austen alone.

use serde::{Deserialize, Serialize};

/// One held-out domain's figures in a build record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainHeldout {
    /// From the held-out file's name (`static_table::domain_name`: `brown-heldout.txt` is
    /// `brown`).
    pub domain: String,
    /// Held-out tokens scored.
    pub tokens: usize,
    pub float_ppl: f64,
    /// Each static QM's ppl, in `BuildRecord::statics` order.
    pub statics: Vec<f64>,
    /// `(step, ppl)` of the shipped trajectory's measured EQMs, in step order.
    pub eqms: Vec<(usize, f64)>,
}

/// How many of `eqms` (`(footprint, ppl)`) lie above the straight line between the
/// neighbouring static QMs (`(footprint, ppl)`, largest first) whose footprints bracket them.
pub fn above_static_chord(statics: &[(u64, f64)], eqms: &[(u64, f64)]) -> usize {
    let mut above = 0;
    for &(f, p) in eqms {
        for w in statics.windows(2) {
            let ((f_hi, p_hi), (f_lo, p_lo)) = (w[0], w[1]);
            if f <= f_hi && f >= f_lo && f_hi > f_lo {
                let t = (f_hi - f) as f64 / (f_hi - f_lo) as f64;
                if p > p_hi + t * (p_lo - p_hi) + 1e-9 {
                    above += 1;
                }
            }
        }
    }
    above
}
