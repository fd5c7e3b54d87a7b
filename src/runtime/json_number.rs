//! Numbers a schema bounds (`Schema::Bounded`): `minimum`, `maximum`, `exclusiveMinimum`,
//! `exclusiveMaximum` and an integer `multipleOf`, enforced while the number is written. A
//! digit is let through only if some number that starts with the text so far is within the
//! bounds (`Bounds::feasible`), so the automaton never reaches a number it cannot finish; the
//! number may end only where it is within them (`Bounds::contains`).
//!
//! A bounded number is written without an exponent, with at most `MAX_INTEGER_DIGITS` digits
//! before its point and `MAX_DIGITS.1` after it; values are compared as doubles, as
//! validators do (`0.1` is the double nearest 0.1, for the text and for the bound alike).

use crate::runtime::json_mode::{MAX_DIGITS, MAX_INTEGER_DIGITS};

/// A bound: its value and whether it is exclusive.
pub type Bound = (f64, bool);

#[derive(Debug, Clone, PartialEq)]
pub struct Bounds {
    /// No fraction: the schema's `integer`, or a `number` with a `multipleOf` (an integer).
    pub integer: bool,
    pub min: Option<Bound>,
    pub max: Option<Bound>,
    /// `multipleOf`: a positive integer below 10^15.
    pub multiple: Option<u64>,
}

/// Values from `lo` to `hi`, each end included or not.
#[derive(Debug, Clone, Copy)]
struct Interval {
    lo: f64,
    lo_in: bool,
    hi: f64,
    hi_in: bool,
}

impl Interval {
    fn closed(lo: f64, hi: f64) -> Self {
        Interval {
            lo,
            lo_in: true,
            hi,
            hi_in: true,
        }
    }

    fn negated(self) -> Self {
        Interval {
            lo: -self.hi,
            lo_in: self.hi_in,
            hi: -self.lo,
            hi_in: self.lo_in,
        }
    }
}

/// 10^k, exact for k <= 22.
fn pow10(k: usize) -> f64 {
    10f64.powi(k as i32)
}

impl Bounds {
    /// The bounds as an interval (unbounded ends infinite).
    fn range(&self) -> Interval {
        let (lo, lo_ex) = self.min.unwrap_or((f64::NEG_INFINITY, false));
        let (hi, hi_ex) = self.max.unwrap_or((f64::INFINITY, false));
        Interval {
            lo,
            lo_in: !lo_ex,
            hi,
            hi_in: !hi_ex,
        }
    }

    /// Whether `text`, a whole number (JSON's grammar, no exponent), is within the bounds.
    pub fn contains(&self, text: &[u8]) -> bool {
        let Some(v) = std::str::from_utf8(text)
            .ok()
            .and_then(|t| t.parse::<f64>().ok())
        else {
            return false;
        };
        let r = self.range();
        let above = if r.lo_in { v >= r.lo } else { v > r.lo };
        let below = if r.hi_in { v <= r.hi } else { v < r.hi };
        let multiple = self
            .multiple
            .is_none_or(|m| v.fract() == 0.0 && (v.abs() as u64).is_multiple_of(m));
        above && below && multiple
    }

    /// Whether some number this schema allows starts with `text` (`-?digits(.digits)?`, maybe
    /// empty or ending in `-` or `.`).
    pub fn feasible(&self, text: &[u8]) -> bool {
        if text.is_empty() {
            // Either sign: `-`, or any magnitude as it is.
            let any = self.lengths(0.0, 1, MAX_INTEGER_DIGITS as usize);
            return self.feasible(b"-") || any.into_iter().any(|m| self.meets(m));
        }
        let (negative, rest) = match text.split_first() {
            Some((b'-', rest)) => (true, rest),
            _ => (false, text),
        };
        let (int, frac) = match rest.iter().position(|&b| b == b'.') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        if int.len() > MAX_INTEGER_DIGITS as usize || (self.integer && frac.is_some()) {
            return false;
        }
        let signed = |i: Interval| if negative { i.negated() } else { i };
        // The magnitudes that numbers starting with the text may have, as intervals.
        let magnitudes: Vec<Interval> = match frac {
            Some(f) => vec![self.after_point(int, f)],
            None if int.is_empty() => self.lengths(0.0, 1, MAX_INTEGER_DIGITS as usize),
            None if int == b"0" => vec![self.widen(0.0, 1.0)],
            None => {
                let i: f64 = std::str::from_utf8(int)
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0.0);
                self.lengths(i, 0, MAX_INTEGER_DIGITS as usize - int.len())
            }
        };
        magnitudes.into_iter().any(|m| self.meets(signed(m)))
    }

    /// Magnitudes whose integer part is `i` followed by `from..=to` more digits (`i` = 0 and
    /// `from` = 1: any integer part of up to `to` digits, 0 included).
    fn lengths(&self, i: f64, from: usize, to: usize) -> Vec<Interval> {
        if from == 1 && i == 0.0 {
            return vec![self.widen(0.0, pow10(to))];
        }
        (from..=to)
            .map(|k| self.widen(i * pow10(k), (i + 1.0) * pow10(k)))
            .collect()
    }

    /// The numbers from `lo` up to `hi`: integers `lo..hi` when there is no fraction, else the
    /// interval `[lo, hi)`.
    fn widen(&self, lo: f64, hi: f64) -> Interval {
        if self.integer {
            Interval::closed(lo, hi - 1.0)
        } else {
            Interval {
                hi_in: false,
                ..Interval::closed(lo, hi)
            }
        }
    }

    /// Magnitudes of `int.frac...`: from the text's own value up to (not reaching) the next
    /// decimal at its last digit; only its value once the fraction has all its digits.
    fn after_point(&self, int: &[u8], frac: &[u8]) -> Interval {
        let value = |digits: &[u8]| -> f64 {
            let mut s = String::from_utf8_lossy(int).into_owned();
            s.push('.');
            s.push_str(&String::from_utf8_lossy(digits));
            s.push('0');
            s.parse().unwrap_or(0.0)
        };
        let lo = value(frac);
        if frac.len() >= MAX_DIGITS.1 as usize {
            return Interval::closed(lo, lo);
        }
        // The next decimal with as many digits, carried: `0.19` -> `0.20`, `9.9` -> `10.0`.
        let mut digits: Vec<u8> = int.iter().chain(frac).copied().collect();
        let mut at = digits.len();
        let carry = loop {
            if at == 0 {
                break true;
            }
            at -= 1;
            if digits[at] == b'9' {
                digits[at] = b'0';
            } else {
                digits[at] += 1;
                break false;
            }
        };
        if carry {
            digits.insert(0, b'1');
        }
        let (i, f) = digits.split_at(digits.len() - frac.len());
        let hi: f64 = format!(
            "{}.{}0",
            String::from_utf8_lossy(i),
            String::from_utf8_lossy(f)
        )
        .parse()
        .unwrap_or(f64::INFINITY);
        Interval {
            lo,
            lo_in: true,
            hi,
            hi_in: false,
        }
    }

    /// Whether the values `v` (integers where `self.integer`) hold one within the bounds (and
    /// a multiple of `multipleOf`); `-0` is zero.
    fn meets(&self, v: Interval) -> bool {
        let r = self.range();
        let cmp = |a: f64, b: f64| a.partial_cmp(&b).unwrap_or(std::cmp::Ordering::Equal);
        let (lo, lo_in) = match cmp(v.lo, r.lo) {
            std::cmp::Ordering::Greater => (v.lo, v.lo_in),
            std::cmp::Ordering::Less => (r.lo, r.lo_in),
            std::cmp::Ordering::Equal => (v.lo, v.lo_in && r.lo_in),
        };
        let (hi, hi_in) = match cmp(v.hi, r.hi) {
            std::cmp::Ordering::Less => (v.hi, v.hi_in),
            std::cmp::Ordering::Greater => (r.hi, r.hi_in),
            std::cmp::Ordering::Equal => (v.hi, v.hi_in && r.hi_in),
        };
        if !self.integer {
            return lo < hi || (lo == hi && lo_in && hi_in);
        }
        // The integers in [lo, hi] (ends excluded where open), then a multiple among them.
        let first = if lo_in { lo.ceil() } else { lo.floor() + 1.0 };
        let last = if hi_in { hi.floor() } else { hi.ceil() - 1.0 };
        if first > last {
            return false;
        }
        let Some(m) = self.multiple else {
            return true;
        };
        let m = m as f64;
        (first / m).ceil() * m <= last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(integer: bool, min: Option<Bound>, max: Option<Bound>, m: Option<u64>) -> Bounds {
        Bounds {
            integer,
            min,
            max,
            multiple: m,
        }
    }

    /// Every number text of up to `len` characters over `-0123456789.` that the grammar allows.
    fn texts(len: usize) -> Vec<String> {
        let mut all = vec![String::new()];
        let mut frontier = vec![String::new()];
        for _ in 0..len {
            let mut next = Vec::new();
            for t in &frontier {
                for c in "-0123456789.".chars() {
                    let s = format!("{t}{c}");
                    let ok = regex_like_prefix(&s);
                    if ok {
                        next.push(s);
                    }
                }
            }
            all.extend(next.iter().cloned());
            frontier = next;
        }
        all
    }

    /// Whether `s` is a prefix of `-?(0|[1-9][0-9]*)(\.[0-9]+)?`.
    fn regex_like_prefix(s: &str) -> bool {
        let s = s.strip_prefix('-').unwrap_or(s);
        let (int, frac) = match s.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (s, None),
        };
        let int_ok = int.is_empty() && frac.is_none()
            || int == "0"
            || (int.starts_with(|c: char| c != '0') && int.chars().all(|c| c.is_ascii_digit()));
        int_ok
            && !(int.is_empty() && frac.is_some())
            && frac.is_none_or(|f| f.chars().all(|c| c.is_ascii_digit()))
    }

    fn whole(s: &str) -> bool {
        regex_like_prefix(s) && !s.is_empty() && !s.ends_with(['-', '.'])
    }

    /// Checked by brute force over short texts: a prefix is feasible when some whole text of
    /// at most 6 characters that starts with it is within the bounds, and a prefix of at most 3
    /// characters that none completes is not (bounds chosen so that short numbers reach them).
    #[test]
    fn feasible_prefixes_are_those_some_short_number_completes() {
        let cases = [
            bounds(true, Some((-12.0, false)), Some((37.0, true)), None),
            bounds(true, Some((3.0, false)), Some((40.0, false)), Some(7)),
            bounds(false, Some((0.25, true)), Some((0.5, false)), None),
            bounds(false, Some((-1.5, false)), Some((-1.25, false)), None),
            bounds(true, None, Some((-100.0, false)), Some(3)),
            bounds(false, Some((99.5, false)), None, None),
            bounds(true, Some((0.0, false)), Some((0.0, false)), None),
        ];
        let all = texts(6);
        for b in &cases {
            let texts: Vec<&String> = all
                .iter()
                .filter(|t| !(b.integer && t.contains('.')))
                .collect();
            let mut completing = std::collections::HashSet::new();
            for w in texts
                .iter()
                .filter(|w| whole(w) && b.contains(w.as_bytes()))
            {
                for i in 0..=w.len() {
                    completing.insert(&w[..i]);
                }
            }
            assert!(completing.len() > 3, "{b:?}");
            for t in &texts {
                if completing.contains(t.as_str()) {
                    assert!(b.feasible(t.as_bytes()), "{b:?}: {t} completes");
                } else if t.len() <= 3 {
                    assert!(!b.feasible(t.as_bytes()), "{b:?}: {t} cannot complete");
                }
            }
        }
    }

    #[test]
    fn contains_compares_as_doubles_and_checks_the_multiple() {
        let b = bounds(false, Some((0.1, true)), Some((0.3, false)), None);
        assert!(!b.contains(b"0.1") && b.contains(b"0.10000001") && b.contains(b"0.3"));
        assert!(!b.contains(b"0.30000001"));
        let m = bounds(true, None, None, Some(5));
        assert!(m.contains(b"-15") && m.contains(b"0") && !m.contains(b"7"));
        assert!(!bounds(true, Some((1.0, false)), None, None).feasible(b"-"));
        assert!(bounds(true, Some((1e14, false)), None, None).feasible(b"1"));
        assert!(!bounds(true, Some((1e16, false)), None, None).feasible(b""));
    }
}
