//! Strings a schema's `pattern` or `format` constrains (`Schema::Pattern`): a minimal DFA over
//! the string's UTF-8 bytes (`regex-automata`) reads each character as it is written, escapes
//! decoded, and a character is let through only if the DFA can still reach a match after it,
//! so the automaton never reaches a string it cannot finish. The string may end only where it
//! matches.
//!
//! `pattern` is searched as JSON Schema says (it may match anywhere unless anchored with `^`
//! and `$`), in the `regex` crate's syntax (ECMA-262's for the usual classes, groups and
//! repetitions; look-around and backreferences are unsupported). A `format` is one of
//! `FORMATS`, each a regular expression whose every match the format's validators accept
//! (dates are real calendar dates, with February's 29th left out; a `uri` is absolute, with a
//! host).
//! `minLength` / `maxLength` beside either are held jointly with it (`lengths`).

use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::nfa::thompson;
use regex_automata::util::{primitives::StateID, start, syntax};
use regex_automata::{Anchored, MatchKind};
use regex_syntax::utf8::Utf8Sequences;

mod lengths;

/// Most bytes a pattern's NFA, its determinization and its DFA may each take.
const DFA_BYTES: usize = 4 << 20;

/// The formats enforced, with the expression each is written as.
pub const FORMATS: [(&str, &str); 10] = [
    ("date", DATE),
    ("time", TIME),
    ("date-time", DATE_TIME),
    (
        "uuid",
        "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
    ),
    (
        "ipv4",
        r"^(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}$",
    ),
    (
        "email",
        r"^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,4}$",
    ),
    // At most 3 labels of at most 63 characters: within a name's 253.
    ("hostname", HOSTNAME),
    ("ipv6", IPV6),
    ("duration", DURATION),
    ("uri", URI),
];

const HOSTNAME: &str = concat!(
    "^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?",
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?){0,2}$"
);
/// Eight groups, or fewer around one `::` (RFC 4291's text forms without an embedded IPv4).
const IPV6: &str = concat!(
    "^(?:(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}",
    "|(?:[0-9a-fA-F]{1,4}:){1,7}:",
    "|(?:[0-9a-fA-F]{1,4}:){1,6}:[0-9a-fA-F]{1,4}",
    "|(?:[0-9a-fA-F]{1,4}:){1,5}(?::[0-9a-fA-F]{1,4}){1,2}",
    "|(?:[0-9a-fA-F]{1,4}:){1,4}(?::[0-9a-fA-F]{1,4}){1,3}",
    "|(?:[0-9a-fA-F]{1,4}:){1,3}(?::[0-9a-fA-F]{1,4}){1,4}",
    "|(?:[0-9a-fA-F]{1,4}:){1,2}(?::[0-9a-fA-F]{1,4}){1,5}",
    "|[0-9a-fA-F]{1,4}:(?::[0-9a-fA-F]{1,4}){1,6}",
    "|:(?:(?::[0-9a-fA-F]{1,4}){1,7}|:))$"
);

/// RFC 3339's duration (its appendix A): `P` then years, months, days in that order (a run
/// without gaps) and a time part, or weeks alone; at most 9 digits a number.
const DURATION: &str = concat!(
    "^P(?:(?:[0-9]{1,9}D|[0-9]{1,9}M(?:[0-9]{1,9}D)?|[0-9]{1,9}Y(?:[0-9]{1,9}M(?:[0-9]{1,9}D)?)?)",
    "(?:T(?:[0-9]{1,9}H(?:[0-9]{1,9}M(?:[0-9]{1,9}S)?)?|[0-9]{1,9}M(?:[0-9]{1,9}S)?|[0-9]{1,9}S))?",
    "|T(?:[0-9]{1,9}H(?:[0-9]{1,9}M(?:[0-9]{1,9}S)?)?|[0-9]{1,9}M(?:[0-9]{1,9}S)?|[0-9]{1,9}S)",
    "|[0-9]{1,9}W)$"
);
/// An absolute URI with an authority (RFC 3986): `scheme://host[:port]` (the host as
/// `hostname` writes it), then path segments, a query and a fragment of RFC 3986's `pchar`s
/// (`%` only before two hex digits). What Pydantic's `HttpUrl` / `AnyUrl` write as `format: uri`.
const URI: &str = concat!(
    "^[A-Za-z][A-Za-z0-9+.-]{0,15}://",
    "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?",
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?){0,3}",
    "(?::[0-9]{1,5})?",
    r"(?:/(?:[A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})*)*",
    r"(?:\?(?:[A-Za-z0-9._~!$&'()*+,;=:@/?-]|%[0-9A-Fa-f]{2})*)?",
    r"(?:#(?:[A-Za-z0-9._~!$&'()*+,;=:@/?-]|%[0-9A-Fa-f]{2})*)?$"
);

const DATE: &str = r"^[1-9][0-9]{3}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))$";
const TIME: &str = r"^(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$";
const DATE_TIME: &str = r"^[1-9][0-9]{3}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$";

/// A compiled `pattern` or `format`.
pub struct Pattern {
    /// What the schema said: `pattern` or `format "NAME"`, and its text.
    pub source: String,
    dfa: dense::DFA<Vec<u32>>,
    start: StateID,
    /// `minLength` / `maxLength` beside it.
    lengths: Option<lengths::Lengths>,
}

impl std::fmt::Debug for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pattern({})", self.source)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// Where a string's DFA is (Copy, for the automaton's state).
pub type State = StateID;

impl Pattern {
    /// The strings `regex` matches somewhere (JSON Schema's `pattern`); the error says why not.
    pub fn new(regex: &str) -> Result<Pattern, String> {
        Self::build(regex, format!("pattern {regex:?}"))
    }

    /// The strings of `format` `name` (`FORMATS`), `None` for a format not enforced.
    pub fn format(name: &str) -> Option<Pattern> {
        let (_, regex) = FORMATS.iter().find(|(n, _)| *n == name)?;
        Some(Self::build(regex, format!("format {name:?}")).expect("FORMATS compile"))
    }

    fn build(regex: &str, source: String) -> Result<Pattern, String> {
        // Matched anywhere: the whole string is anything, a match, anything.
        let whole = format!(r"(?s:.)*(?:{regex})(?s:.)*");
        let dfa = dense::Builder::new()
            .configure(
                dense::Config::new()
                    .match_kind(MatchKind::All)
                    .start_kind(StartKind::Anchored)
                    .minimize(true)
                    .dfa_size_limit(Some(DFA_BYTES))
                    .determinize_size_limit(Some(DFA_BYTES)),
            )
            .syntax(syntax::Config::new().utf8(true).unicode(true))
            // Without a limit, `x{2147483648}` is compiled copy by copy (a fuzzed request).
            .thompson(thompson::Config::new().nfa_size_limit(Some(DFA_BYTES)))
            .build(&whole)
            .map_err(|e| {
                // The error and its causes ("error building NFA: ... size limit ...").
                let mut text = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    text = format!("{text}: {c}");
                    cause = c.source();
                }
                text.lines().next().unwrap_or("").to_string()
            })?;
        let start = dfa
            .start_state(&start::Config::new().anchored(Anchored::Yes))
            .map_err(|e| e.to_string())?;
        let p = Pattern {
            source,
            dfa,
            start,
            lengths: None,
        };
        if p.dfa.is_dead_state(start) {
            return Err("no string matches it".into());
        }
        Ok(p)
    }

    /// The same strings, of `min` to `max` characters (Unicode code points) only.
    pub fn with_lengths(mut self, min: u32, max: Option<u32>) -> Result<Pattern, String> {
        self.lengths = Some(lengths::Lengths::new(&self, min, max)?);
        Ok(self)
    }

    /// Before the string's first character.
    pub fn start(&self) -> State {
        self.start
    }

    /// After `bytes` (UTF-8 of whole characters or a character begun); `None` when no string
    /// that goes on so can match.
    pub fn step(&self, mut s: State, bytes: &[u8]) -> Option<State> {
        for &b in bytes {
            s = self.dfa.next_state(s, b);
            if self.dfa.is_dead_state(s) {
                return None;
            }
        }
        Some(s)
    }

    /// Whether the string may end here, with `written` characters (it matches).
    pub fn may_end(&self, s: State, written: u32) -> bool {
        self.dfa_matches(s)
            && self
                .lengths
                .as_ref()
                .is_none_or(|l| l.min <= written && l.max.is_none_or(|m| written <= m))
    }

    fn dfa_matches(&self, s: State) -> bool {
        self.dfa.is_match_state(self.dfa.next_eoi_state(s))
    }

    /// Whether a string at boundary state `s` with `written` characters can still match (its
    /// lengths included).
    fn fits(&self, s: State, written: u32) -> bool {
        self.lengths.as_ref().is_none_or(|l| l.fits(s, written))
    }

    /// Whether the character being written, `rest` continuation bytes short of whole at `s`,
    /// can be finished into a string that still matches: the `written + 1`th.
    pub fn char_fits(&self, s: State, rest: u8, written: u32) -> bool {
        self.finish_char(s, rest)
            .into_iter()
            .any(|e| self.fits(e, written + 1))
    }

    /// The states `rest` continuation bytes after `s`.
    fn finish_char(&self, s: State, rest: u8) -> Vec<State> {
        let mut states = vec![s];
        for _ in 0..rest {
            let mut next = Vec::new();
            for &st in &states {
                for b in 0x80..=0xbf {
                    match self.step(st, &[b]) {
                        Some(n) if !next.contains(&n) => next.push(n),
                        _ => {}
                    }
                }
            }
            states = next;
        }
        states
    }

    /// Where one more character leads from boundary state `s` (live states only).
    fn char_successors(&self, s: State) -> Vec<State> {
        let mut out = Vec::new();
        let leads = [
            (0x00, 0x7f, 0),
            (0xc2, 0xdf, 1),
            (0xe0, 0xef, 2),
            (0xf0, 0xf4, 3),
        ];
        for (lo, hi, rest) in leads {
            for b in lo..=hi {
                let Some(t) = self.step(s, &[b]) else {
                    continue;
                };
                for e in self.finish_char(t, rest) {
                    if !out.contains(&e) {
                        out.push(e);
                    }
                }
            }
        }
        out
    }

    /// After the character `c`, written as an escape. Only characters that JSON must escape
    /// (`"`, `\`, controls) or that lie outside ASCII are written so: a model that may spell
    /// a digit `\u0030` takes that way out of a pattern instead of its next letter.
    /// `written`: the characters before it.
    pub fn step_escaped(&self, s: State, c: char, written: u32) -> Option<State> {
        if !Self::escapable(c as u32) {
            return None;
        }
        let mut buf = [0; 4];
        self.step(s, c.encode_utf8(&mut buf).as_bytes())
            .filter(|&e| self.fits(e, written + 1))
    }

    fn escapable(c: u32) -> bool {
        !(0x20..0x7f).contains(&c) || c == u32::from(b'"') || c == u32::from(b'\\')
    }

    /// Whether an escape can begin here: `\` followed by a character `step_escaped` takes.
    pub fn backslash_feasible(&self, s: State, written: u32) -> bool {
        self.escape_feasible(s, b"", written)
    }

    /// Whether a `\u` escape whose hex digits begin with `hex` (0-4 of them) can still write a
    /// character `step_escaped` takes here (surrogates are not written as escapes in such a
    /// string).
    pub fn escape_feasible(&self, s: State, hex: &[u8], written: u32) -> bool {
        let Some(prefix) = std::str::from_utf8(hex)
            .ok()
            .and_then(|h| u32::from_str_radix(if h.is_empty() { "0" } else { h }, 16).ok())
        else {
            return false;
        };
        let free = 4 - hex.len().min(4) as u32;
        let first = prefix << (4 * free);
        let last = first + (1 << (4 * free)) - 1;
        // The range without printable ASCII, then `"` and `\\` on their own.
        let quote = b"\"\\".iter().any(|&q| {
            (first..=last).contains(&u32::from(q))
                && self
                    .step(s, &[q])
                    .is_some_and(|e| self.fits(e, written + 1))
        });
        quote
            || self.takes_one_of(s, first, last.min(0x1f), written)
            || self.takes_one_of(s, first.max(0x7f), last, written)
    }

    /// The printable ASCII bytes some string of the pattern has (JSON mode watches their
    /// one-byte tokens, so that the model can always write the next character).
    pub fn ascii(&self) -> Vec<u8> {
        let mut seen = std::collections::HashSet::from([self.start]);
        let mut todo = vec![self.start];
        let mut out = [false; 128];
        while let Some(st) = todo.pop() {
            for b in 0..=255u8 {
                if let Some(n) = self.step(st, &[b]) {
                    if (0x20..0x7f).contains(&b) {
                        out[b as usize] = true;
                    }
                    if seen.insert(n) {
                        todo.push(n);
                    }
                }
            }
        }
        (0x20..0x7f).filter(|&b| out[b as usize]).collect()
    }

    /// Whether the DFA takes some character from `first` to `last` here (surrogates left
    /// out): the range's UTF-8 encodings, as byte ranges, walked one byte position at a time
    /// over the distinct states they lead to.
    fn takes_one_of(&self, s: State, first: u32, last: u32, written: u32) -> bool {
        let surrogates = 0xd800..=0xdfff;
        let first = if surrogates.contains(&first) {
            0xe000
        } else {
            first
        };
        let last = if surrogates.contains(&last) {
            0xd7ff
        } else {
            last
        };
        let (Some(a), Some(b)) = (char::from_u32(first), char::from_u32(last)) else {
            return false;
        };
        if a > b {
            return false;
        }
        Utf8Sequences::new(a, b).any(|seq| {
            let mut states = vec![s];
            for r in seq.as_slice() {
                let mut next = Vec::new();
                for &st in &states {
                    for byte in r.start..=r.end {
                        match self.step(st, &[byte]) {
                            Some(n) if !next.contains(&n) => next.push(n),
                            _ => {}
                        }
                    }
                }
                if next.is_empty() {
                    return false;
                }
                states = next;
            }
            states.iter().any(|&e| self.fits(e, written + 1))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(p: &Pattern, s: &str) -> Option<State> {
        p.step(p.start(), s.as_bytes())
    }

    #[test]
    fn prefixes_that_cannot_match_are_refused_at_their_first_wrong_character() {
        let p = Pattern::new(r"^[A-Z]{3}-\d{2}$").unwrap();
        assert!(walk(&p, "AB").is_some() && walk(&p, "ABc").is_none());
        let s = walk(&p, "ABC-12").unwrap();
        assert!(p.may_end(s, 0) && p.step(s, b"3").is_none());
        assert!(!p.may_end(walk(&p, "ABC-1").unwrap(), 0));
        // Unanchored: a match anywhere, then anything.
        let q = Pattern::new("ab").unwrap();
        let s = walk(&q, "xxa").unwrap();
        assert!(!q.may_end(s, 0));
        assert!(q.may_end(walk(&q, "xxabé!").unwrap(), 0));
    }

    #[test]
    fn escapes_are_feasible_only_toward_a_character_the_pattern_takes() {
        let p = Pattern::new("^[α-ω]+$").unwrap();
        assert!(p.escape_feasible(p.start(), b"", 0));
        assert!(p.escape_feasible(p.start(), b"03b", 0));
        assert!(!p.escape_feasible(p.start(), b"004", 0));
        assert!(p.step_escaped(p.start(), 'β', 0).is_some());
        assert!(p.step(p.start(), "β".as_bytes()).is_some());
        assert!(p.step(p.start(), b"b").is_none());
        // Printable ASCII is written as it is, never escaped; `"`, `\\` and controls are.
        let q = Pattern::new(r#"^[a-z"\\\n]+$"#).unwrap();
        assert!(q.step_escaped(q.start(), 'a', 0).is_none() && q.step(q.start(), b"a").is_some());
        for c in ['"', '\\', '\n'] {
            assert!(q.step_escaped(q.start(), c, 0).is_some(), "{c:?}");
        }
        assert!(q.escape_feasible(q.start(), b"00", 0) && !q.escape_feasible(q.start(), b"006", 0));
        assert_eq!(Pattern::format("date").unwrap().ascii(), b"-0123456789");
    }

    /// Lengths beside a pattern: a character is refused once no string within them can match
    /// (`^a*b?$` with 2 to 3 characters: `aab`, `ab`, `aa`, `aaa`, ...).
    #[test]
    fn lengths_beside_a_pattern_refuse_what_cannot_end_within_them() {
        let p = Pattern::new("^a*b?$")
            .unwrap()
            .with_lengths(2, Some(3))
            .unwrap();
        let s = p.start();
        assert!(!p.may_end(s, 0));
        let a = p.step(s, b"a").unwrap();
        assert!(p.char_fits(a, 0, 0) && !p.may_end(a, 1));
        let b = p.step(s, b"b").unwrap();
        // `b` first: only `b` alone matches, one character: refused.
        assert!(!p.char_fits(b, 0, 0));
        let aaa = p.step(s, b"aaa").unwrap();
        assert!(p.may_end(aaa, 3) && !p.char_fits(p.step(aaa, b"a").unwrap(), 0, 3));
        // Only a minimum: `^[0-9]+$` of at least 4 digits cannot end at 3.
        let q = Pattern::new("^[0-9]+$")
            .unwrap()
            .with_lengths(4, None)
            .unwrap();
        let d = q.step(q.start(), b"123").unwrap();
        assert!(!q.may_end(d, 3) && q.char_fits(q.step(d, b"4").unwrap(), 0, 3));
        // Characters, not bytes: `é` is one.
        let r = Pattern::new("^.+$")
            .unwrap()
            .with_lengths(1, Some(1))
            .unwrap();
        let e = r.step(r.start(), &[0xc3]).unwrap();
        assert!(r.char_fits(e, 1, 0) && !r.char_fits(e, 1, 1));
        assert!(Pattern::new("^[0-9]{5}$")
            .unwrap()
            .with_lengths(0, Some(3))
            .is_err());
    }

    #[test]
    fn every_format_compiles_and_takes_a_valid_example() {
        let examples = [
            ("date", "2024-02-28", "2024-02-30"),
            ("time", "23:59:59.5Z", "24:00:00Z"),
            (
                "date-time",
                "1999-12-31T08:00:00+01:00",
                "1999-12-31 08:00:00Z",
            ),
            (
                "uuid",
                "123e4567-e89b-12d3-a456-426614174000",
                "123e4567e89b",
            ),
            ("ipv4", "192.168.0.255", "192.168.01.1"),
            ("email", "a.b+c@example.org", "a@b"),
            ("hostname", "a-b.example.org", "-a.org"),
            ("ipv6", "fe80::1:2", "1:2:3:4:5:6:7:8:9"),
            ("duration", "P1Y2M3DT4H5M6S", "P1Y3W"),
            ("duration", "PT36H", "PT"),
            (
                "uri",
                "https://example.org:8080/a/b%20c?q=1&r=a/b#top",
                "https://ex ample.org",
            ),
            ("uri", "http://localhost", "https://a.org/%zz"),
        ];
        assert!(Pattern::format("ipv6")
            .is_some_and(|p| walk(&p, "::").is_some_and(|s| p.may_end(s, 0))));
        for (name, good, bad) in examples {
            let p = Pattern::format(name).unwrap();
            assert!(
                walk(&p, good).is_some_and(|s| p.may_end(s, 0)),
                "{name} {good}"
            );
            assert!(
                walk(&p, bad).is_none_or(|s| !p.may_end(s, 0)),
                "{name} {bad}"
            );
        }
        assert!(Pattern::format("uri-reference").is_none());
    }

    #[test]
    fn unsupported_syntax_and_empty_languages_are_errors() {
        assert!(Pattern::new("(?=a)").is_err());
        assert!(Pattern::new(r"(a)\1").is_err());
        assert!(Pattern::new("^a$b").unwrap_err().contains("no string"));
    }
}
