//! Held-out perplexity per text domain (issue 17): the build measures float, every static QM
//! and the shipped trajectory's measured EQMs on each held-out text it is given, so the report
//! shows what quantization costs on text unlike the calibration set, not on Austen alone.

use crate::quant::evaluate::WindowNll;
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
    /// Each measured EQM against the chord of the static QMs, in `eqms` order (empty in
    /// records from before it).
    #[serde(default)]
    pub chord: Vec<ChordExcess>,
}

/// An EQM's held-out ppl minus the chord's at its footprint (positive: above it), and the
/// standard error of that difference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChordExcess {
    pub step: usize,
    pub excess: f64,
    pub se: f64,
}

/// Standard errors of the chord excess that count as significant (`significantly_above`).
pub const SIGNIFICANT_SE: f64 = 2.0;

impl ChordExcess {
    pub fn significant(&self) -> bool {
        self.excess > SIGNIFICANT_SE * self.se
    }
}

/// How many of `chord` lie above the chord by more than `SIGNIFICANT_SE` standard errors.
pub fn significantly_above(chord: &[ChordExcess]) -> usize {
    chord.iter().filter(|c| c.significant()).count()
}

/// The held-out ppl of an EQM at footprint `f` minus the chord's between the neighbouring
/// static QMs (`statics`: `(footprint, window NLLs)`, largest first), and its standard error
/// (`None` where no two statics bracket `f`).
///
/// The three perplexities are measured on the same windows, so their noise is shared: the
/// error is that of the difference, window by window (paired). Linearised, the excess is
/// `Σ_w a_w` with `a_w = (p_e·n_e,w − (1−t)·p_hi·n_hi,w − t·p_lo·n_lo,w) / N` (`n_·,w` a
/// window's summed NLL, `N` the scored tokens, `t` the EQM's place between the two statics),
/// and its variance is estimated from the spread of the `a_w` over the windows.
pub fn chord_excess(statics: &[(u64, &WindowNll)], f: u64, eqm: &WindowNll) -> Option<(f64, f64)> {
    let footprints: Vec<u64> = statics.iter().map(|s| s.0).collect();
    let (i, t) = bracket(&footprints, f)?;
    let (hi, lo) = (statics[i].1, statics[i + 1].1);
    let (p_e, p_hi, p_lo) = (eqm.ppl(), hi.ppl(), lo.ppl());
    let excess = p_e - (p_hi + t * (p_lo - p_hi));
    let n: usize = eqm.counts.iter().sum();
    let windows = eqm.sums.len();
    if windows < 2 || hi.sums.len() != windows || lo.sums.len() != windows {
        return Some((excess, f64::NAN));
    }
    let a: Vec<f64> = (0..windows)
        .map(|k| {
            (p_e * eqm.sums[k] - (1.0 - t) * p_hi * hi.sums[k] - t * p_lo * lo.sums[k]) / n as f64
        })
        .collect();
    let mean = a.iter().sum::<f64>() / windows as f64;
    let var = a.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (windows - 1) as f64;
    Some((excess, (windows as f64 * var).sqrt()))
}

/// The neighbouring statics (`footprints`, largest first) whose footprints bracket `f`: the
/// index of the larger and `f`'s place between the two (0 at the larger, 1 at the smaller).
/// A footprint equal to a static's is bracketed by the first pair that holds it (the chord's
/// value there is the static's either way).
fn bracket(footprints: &[u64], f: u64) -> Option<(usize, f64)> {
    footprints.windows(2).enumerate().find_map(|(i, w)| {
        let (hi, lo) = (w[0], w[1]);
        (f <= hi && f >= lo && hi > lo).then(|| (i, (hi - f) as f64 / (hi - lo) as f64))
    })
}

/// How many of `eqms` (`(footprint, ppl)`) lie above the straight line between the
/// neighbouring static QMs (`(footprint, ppl)`, largest first) whose footprints bracket them.
pub fn above_static_chord(statics: &[(u64, f64)], eqms: &[(u64, f64)]) -> usize {
    let footprints: Vec<u64> = statics.iter().map(|s| s.0).collect();
    eqms.iter()
        .filter(|&&(f, p)| {
            bracket(&footprints, f).is_some_and(|(i, t)| {
                let (p_hi, p_lo) = (statics[i].1, statics[i + 1].1);
                p > p_hi + t * (p_lo - p_hi) + 1e-9
            })
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::mutate::Rng;

    /// Normal samples (Box-Muller) from the library's SplitMix64.
    struct Normal(Rng);
    impl Normal {
        fn uniform(&mut self) -> f64 {
            ((self.0.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
        fn sample(&mut self) -> f64 {
            let (u, v) = (self.uniform(), self.uniform());
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        }
    }

    /// Three models scored on the same windows: a window's difficulty is shared (most of the
    /// spread), each model adds its own small noise and a mean NLL per token.
    fn windows(rng: &mut Normal, difficulty: &[f64], mean: [f64; 3]) -> [WindowNll; 3] {
        let tokens = 255;
        mean.map(|m| WindowNll {
            sums: difficulty
                .iter()
                .map(|d| (m + d + 0.02 * rng.sample()) * tokens as f64)
                .collect(),
            counts: vec![tokens; difficulty.len()],
        })
    }

    #[test]
    fn the_paired_standard_error_matches_the_spread_of_repeated_measurements() {
        let mut rng = Normal(Rng::new(7));
        // QM(hi), QM(lo) and an EQM a third of the way down whose mean NLL is 0.01 above the
        // chord's (in NLL; the excess in ppl is about ppl x that).
        let (f_hi, f_lo, f) = (3000, 1500, 2500);
        let means = [3.0, 3.06, 3.0 + 0.06 / 3.0 + 0.01];
        let (mut excesses, mut ses) = (Vec::new(), Vec::new());
        for _ in 0..400 {
            let difficulty: Vec<f64> = (0..64).map(|_| 0.5 * rng.sample()).collect();
            let [hi, lo, e] = windows(&mut rng, &difficulty, means);
            let (x, se) = chord_excess(&[(f_hi, &hi), (f_lo, &lo)], f, &e).unwrap();
            excesses.push(x);
            ses.push(se);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let m = mean(&excesses);
        let spread = (excesses.iter().map(|x| (x - m) * (x - m)).sum::<f64>()
            / (excesses.len() - 1) as f64)
            .sqrt();
        let se = mean(&ses);
        assert!(
            (se / spread - 1.0).abs() < 0.2,
            "estimated standard error {se} against the measured spread {spread}"
        );
        // The shared difficulty cancels: unpaired, the error would be ~25x larger.
        assert!(se < 0.1 * 0.5 * 20.0 / 64f64.sqrt(), "{se}");
        // About 0.01 NLL above the chord, at ppl ~20: ~0.2 ppl, many standard errors.
        assert!(m > 0.15 && m < 0.3, "{m}");
        let c = ChordExcess {
            step: 1,
            excess: m,
            se,
        };
        assert!(c.significant());
        assert_eq!(
            significantly_above(&[c, ChordExcess { excess: -m, ..c }]),
            1
        );
    }

    #[test]
    fn an_eqm_at_a_static_footprint_is_counted_once() {
        let statics = [(30, 10.0), (20, 12.0), (10, 20.0)];
        // At QM(20)'s footprint, above it; between, below and above the chord.
        assert_eq!(above_static_chord(&statics, &[(20, 12.5)]), 1);
        assert_eq!(above_static_chord(&statics, &[(25, 10.9), (15, 16.5)]), 1);
        assert_eq!(above_static_chord(&statics, &[(30, 10.0), (10, 20.0)]), 0);
    }

    #[test]
    fn outside_the_statics_there_is_no_chord_and_one_window_has_no_error() {
        let w = WindowNll {
            sums: vec![300.0],
            counts: vec![100],
        };
        assert_eq!(chord_excess(&[(10, &w), (5, &w)], 11, &w), None);
        let (x, se) = chord_excess(&[(10, &w), (5, &w)], 7, &w).unwrap();
        assert!(x.abs() < 1e-9 && se.is_nan());
    }
}
