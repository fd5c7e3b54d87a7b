//! A pattern's string held to `minLength` / `maxLength` as well (characters, as Unicode code
//! points): for every state of the DFA at a character's boundary, which numbers of further
//! characters can still end in a match. A character is let through only if the count so far
//! plus one of those numbers lands within the lengths.

use super::{Pattern, State};
use std::collections::HashMap;

/// Most (boundary states x counted lengths) the table may hold.
const CELLS: usize = 1 << 23;

#[derive(Debug)]
pub(super) struct Lengths {
    pub(super) min: u32,
    pub(super) max: Option<u32>,
    /// Per boundary state, bit k: with `max`, a match is `k` characters away; without, at
    /// least `k` characters can still be written before a match (k <= `min`).
    reach: HashMap<State, Vec<u64>>,
}

fn bit(b: &[u64], k: u32) -> bool {
    b.get(k as usize / 64)
        .is_some_and(|w| w >> (k % 64) & 1 == 1)
}

/// Whether some bit from `lo` to `hi` (both included) is set, a word at a time.
fn any_in(b: &[u64], lo: u32, hi: u32) -> bool {
    if lo > hi {
        return false;
    }
    let (first, last) = (lo as usize / 64, hi as usize / 64);
    (first..=last.min(b.len().saturating_sub(1))).any(|w| {
        let mut word = b[w];
        if w == first {
            word &= u64::MAX << (lo % 64);
        }
        if w == last && hi % 64 < 63 {
            word &= (1u64 << (hi % 64 + 1)) - 1;
        }
        word != 0
    })
}

impl Lengths {
    pub(super) fn new(p: &Pattern, min: u32, max: Option<u32>) -> Result<Lengths, String> {
        let cap = max.unwrap_or(min);
        // The states at a character's boundary and where one more character leads from each.
        let mut next: HashMap<State, Vec<State>> = HashMap::new();
        let mut todo = vec![p.start()];
        while let Some(s) = todo.pop() {
            if next.contains_key(&s) {
                continue;
            }
            let succ = p.char_successors(s);
            todo.extend(succ.iter().filter(|t| !next.contains_key(t)));
            next.insert(s, succ);
            if next.len() * (cap as usize + 1) > CELLS {
                return Err("too large with these lengths".into());
            }
        }
        // By index: the states, where each leads, and bit k of each (k = 0 first).
        let ids: Vec<State> = next.keys().copied().collect();
        let index: HashMap<State, usize> = ids.iter().enumerate().map(|(i, &s)| (s, i)).collect();
        let succ: Vec<Vec<usize>> = ids
            .iter()
            .map(|s| next[s].iter().map(|t| index[t]).collect())
            .collect();
        let words = cap as usize / 64 + 1;
        let mut bits: Vec<Vec<u64>> = ids
            .iter()
            .map(|&s| {
                let mut b = vec![0u64; words];
                // Exactly 0 more (it matches here), or at least 0 (any live state).
                b[0] = u64::from(max.is_none() || p.dfa_matches(s));
                b
            })
            .collect();
        for k in 1..=cap {
            for s in 0..ids.len() {
                if succ[s].iter().any(|&t| bit(&bits[t], k - 1)) {
                    bits[s][k as usize / 64] |= 1 << (k % 64);
                }
            }
        }
        let reach = ids.into_iter().zip(bits).collect();
        let l = Lengths { min, max, reach };
        if !l.fits(p.start(), 0) {
            return Err(format!(
                "no string of {min} to {} characters matches it",
                max.map_or("any".into(), |m| m.to_string())
            ));
        }
        Ok(l)
    }

    /// Whether, at boundary state `s` with `written` characters, a match within the lengths
    /// can still be reached.
    pub(super) fn fits(&self, s: State, written: u32) -> bool {
        let Some(b) = self.reach.get(&s) else {
            return false;
        };
        let lo = self.min.saturating_sub(written);
        match self.max {
            Some(m) if written > m => false,
            Some(m) => any_in(b, lo, m - written),
            None => bit(b, lo),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word-at-a-time range test against bit by bit, on ranges across word boundaries.
    #[test]
    fn any_in_agrees_with_bit_by_bit() {
        let b = [1u64 << 63, 0, 1 << 5];
        for lo in 0..200 {
            for hi in 0..200 {
                let slow = (lo..=hi).any(|k| bit(&b, k));
                assert_eq!(any_in(&b, lo, hi), slow, "{lo}..={hi}");
            }
        }
    }
}
