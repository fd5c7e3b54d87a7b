//! A deterministic, structure-aware mutator (stable Rust, no instrumentation): byte flips,
//! insert / delete / duplicate / splice, integer fields overwritten with boundary values, and for
//! JSON inputs edits of the parsed tree (a value replaced by a hostile one, a key or element
//! dropped, an array element repeated many times, a number nudged off by one). The same seed
//! always gives the same sequence of inputs.

use serde_json::Value;

/// SplitMix64: tiny, fast, and good enough to drive mutations.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// Values that sit on the boundaries parsers get wrong: zero, one, signed and unsigned
/// extremes at each width, powers of two around 2^31 and 2^32 (wasm32's usize).
const INTERESTING: [u64; 16] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x4000_0000,
    u64::MAX,
    i64::MAX as u64,
    u64::MAX - 1,
];

/// JSON values that stress a schema: wrong types, extremes, unsafe names, big containers.
fn hostile_json(rng: &mut Rng) -> Value {
    match rng.below(14) {
        0 => Value::Null,
        1 => Value::Bool(rng.chance(2)),
        2 => Value::from(-1),
        3 => Value::from(0),
        4 => Value::from(u64::MAX),
        5 => Value::from(INTERESTING[rng.below(INTERESTING.len())]),
        6 => Value::from(1e308),
        7 => Value::from(-0.5),
        8 => Value::from(""),
        9 => Value::from("../../etc/passwd"),
        10 => Value::from("x".repeat(1 + rng.below(300))),
        11 => Value::Array(vec![]),
        12 => Value::Object(Default::default()),
        _ => Value::from(f64::from_bits(rng.next_u64()).to_string()),
    }
}

pub struct Mutator {
    pub rng: Rng,
    /// Inputs grow no larger than this.
    pub max_len: usize,
}

impl Mutator {
    pub fn new(seed: u64, max_len: usize) -> Self {
        Mutator {
            rng: Rng::new(seed),
            max_len,
        }
    }

    /// A mutant of `input` (1 to 4 stacked byte-level edits; with `json`, half of the time an
    /// edit of the parsed tree instead). `other` is a second input to splice from.
    pub fn mutate(&mut self, input: &[u8], other: &[u8], json: bool, out: &mut Vec<u8>) {
        out.clear();
        if json && self.rng.chance(2) {
            if let Ok(mut v) = serde_json::from_slice::<Value>(input) {
                for _ in 0..1 + self.rng.below(3) {
                    self.mutate_json(&mut v, other);
                }
                // Compact or pretty: both forms reach the reader.
                let r = if self.rng.chance(2) {
                    serde_json::to_writer(&mut *out, &v)
                } else {
                    serde_json::to_writer_pretty(&mut *out, &v)
                };
                if r.is_ok() && out.len() <= self.max_len {
                    return;
                }
                out.clear();
            }
        }
        out.extend_from_slice(input);
        for _ in 0..1 + self.rng.below(4) {
            self.mutate_bytes(out, other);
        }
        out.truncate(self.max_len);
    }

    fn mutate_bytes(&mut self, b: &mut Vec<u8>, other: &[u8]) {
        let rng = &mut self.rng;
        let len = b.len();
        match rng.below(11) {
            0 if len > 0 => {
                let i = rng.below(len);
                b[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                b[i] = rng.next_u64() as u8;
            }
            2 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                b.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                b.drain(at..at + n);
            }
            4 if len > 0 => {
                // Duplicate a chunk somewhere else (repeated records, doubled headers).
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(256));
                let chunk = b[at..at + n].to_vec();
                let to = rng.below(len + 1);
                let times = if rng.chance(8) { 1 + rng.below(32) } else { 1 };
                for _ in 0..times {
                    if b.len() + n > self.max_len {
                        break;
                    }
                    b.splice(to..to, chunk.iter().copied());
                }
            }
            5 if !other.is_empty() => {
                // Splice: a prefix of this input, then the rest of the other.
                let at = rng.below(len + 1);
                let from = rng.below(other.len());
                b.truncate(at);
                b.extend_from_slice(&other[from..]);
            }
            6 | 7 if len > 0 => {
                // An integer field overwritten with a boundary value, at a random width.
                let width = [1, 2, 4, 8][rng.below(4)];
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let v = if rng.chance(4) { v >> rng.below(64) } else { v };
                let at = rng.below(len);
                let bytes = v.to_le_bytes();
                let n = width.min(len - at);
                b[at..at + n].copy_from_slice(&bytes[..n]);
            }
            8 if len >= 4 => {
                // A small arithmetic nudge of a little-endian u32 (an off-by-one count).
                let at = rng.below(len - 3);
                let w = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
                let d = 1 + rng.below(16) as u32;
                let w = if rng.chance(2) {
                    w.wrapping_add(d)
                } else {
                    w.wrapping_sub(d)
                };
                b[at..at + 4].copy_from_slice(&w.to_le_bytes());
            }
            9 if len > 0 => {
                let at = rng.below(len + 1);
                b.truncate(at);
            }
            _ if len > 0 => {
                // A decimal number in text replaced (JSON, or numbers inside strings).
                if let Some(at) = (0..8)
                    .map(|_| rng.below(len))
                    .find(|&i| b[i].is_ascii_digit())
                {
                    let end = (at..len).find(|&i| !b[i].is_ascii_digit()).unwrap_or(len);
                    let v = INTERESTING[rng.below(INTERESTING.len())];
                    let s = match rng.below(4) {
                        0 => format!("-{v}"),
                        1 => format!("{v}.5"),
                        2 => format!("{}", v.wrapping_add(1)),
                        _ => v.to_string(),
                    };
                    b.splice(at..end, s.into_bytes());
                }
            }
            _ => b.push(rng.next_u64() as u8),
        }
    }

    fn mutate_json(&mut self, v: &mut Value, other: &[u8]) {
        // Pick a node by walking down from the root, stopping at random.
        let mut node = v;
        loop {
            let children = match node {
                Value::Array(a) => a.len(),
                Value::Object(o) => o.len(),
                _ => 0,
            };
            if children == 0 || self.rng.chance(4) {
                break;
            }
            let i = self.rng.below(children);
            node = match node {
                Value::Array(a) => &mut a[i],
                Value::Object(o) => o.values_mut().nth(i).unwrap(),
                _ => unreachable!(),
            };
        }
        let rng = &mut self.rng;
        match node {
            Value::Array(a) if !a.is_empty() && rng.chance(2) => match rng.below(4) {
                0 => {
                    a.remove(rng.below(a.len()));
                }
                1 => {
                    // Repeat an element: duplicate modules, steps, messages.
                    let e = a[rng.below(a.len())].clone();
                    let most = if rng.chance(8) { 2000 } else { 4 };
                    for _ in 0..1 + rng.below(most) {
                        a.insert(rng.below(a.len() + 1), e.clone());
                    }
                }
                2 => {
                    let (i, j) = (rng.below(a.len()), rng.below(a.len()));
                    a.swap(i, j);
                }
                _ => a.truncate(rng.below(a.len())),
            },
            Value::Object(o) if !o.is_empty() && rng.chance(2) => {
                let k = o.keys().nth(rng.below(o.len())).unwrap().clone();
                if rng.chance(2) {
                    o.remove(&k);
                } else {
                    o.insert(format!("{k}_"), hostile_json(rng));
                }
            }
            Value::Number(n) if rng.chance(2) => {
                let x = n.as_f64().unwrap_or(0.0);
                *node = match rng.below(4) {
                    0 => Value::from(x + 1.0),
                    1 => Value::from(x - 1.0),
                    2 => n
                        .as_u64()
                        .map_or(Value::from(x * 2.0), |u| Value::from(u.wrapping_mul(2))),
                    _ => Value::from(-x),
                };
            }
            Value::String(s) if rng.chance(2) => match rng.below(3) {
                0 if !s.is_empty() => {
                    let mut cut = rng.below(s.len());
                    while !s.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    s.truncate(cut);
                }
                1 => s.push_str(["\u{0}", "/..", "\u{fffd}", "<|im_start|>", "é"][rng.below(5)]),
                _ => {
                    // A piece of the other input (a real token, a real file name).
                    let at = rng.below(other.len());
                    let end = (at + 1 + rng.below(16)).min(other.len());
                    *s = String::from_utf8_lossy(&other[at..end]).into_owned();
                }
            },
            _ => *node = hostile_json(rng),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_mutants_and_bounded_length() {
        let seed = br#"{"a":[1,2,{"b":"c"}],"d":3.5}"#;
        let run = |s| {
            let mut m = Mutator::new(s, 256);
            let mut out = Vec::new();
            (0..500)
                .map(|_| {
                    m.mutate(seed, b"other", true, &mut out);
                    assert!(out.len() <= 256);
                    out.clone()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }
}
