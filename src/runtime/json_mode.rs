//! JSON mode (OpenAI's `response_format: { type: "json_object" }`): the answer is one JSON
//! object; with `json_schema` (`runtime::json_schema`), one that follows a schema. Each
//! candidate token is kept only if its bytes extend the answer so far to a prefix of such an
//! object (`JsonPrefix`, a pushdown automaton over bytes); sampling then draws among the kept
//! ones, and the answer ends the moment the object closes.
//!
//! Backends return the top candidates only (`generate::TOP_K`), so a valid continuation could
//! be missing among them. The one-byte tokens of JSON's punctuation, digits and literals, and
//! of the schema's names and enum values, are therefore watched (`Backend::watch`: their
//! logits always come back): in every state of the automaton one of them continues the text
//! (`"` ends any free string, a digit any number, `}` or `]` any finished value, the next
//! letter a key or enum value), so generation never gets stuck, at the price of drawing only
//! among the top candidates and those watched tokens.

use crate::runtime::json_number::Bounds;
use crate::runtime::json_pattern::{Pattern, State};
use crate::runtime::json_tagged::Tagged;
use crate::runtime::json_untagged::Untagged;
use std::sync::Arc;

/// Deepest nesting of objects and arrays allowed.
pub const MAX_DEPTH: usize = 32;
/// Most whitespace bytes in a row outside strings (a model caught emitting newlines forever
/// must write something else).
pub const MAX_WHITESPACE: u8 = 24;
/// Most whitespace bytes before the answer's object opens: a model may start with a newline,
/// but one that pads the start (a weak model did, for all of a 24-token answer) must open it.
pub const MAX_LEADING_WHITESPACE: u8 = 4;
/// Most digits of a number's integer part, fraction and exponent: every number fits a double
/// (JSON allows any, but `1e400` is out of range for serde_json and `Infinity` to
/// `JSON.parse`), and a model cannot write digits forever.
pub const MAX_DIGITS: (u8, u8, u8) = (20, 40, 2);
/// Most digits of a schema's `integer`: below 2^53, exact as a double.
pub const MAX_INTEGER_DIGITS: u8 = 15;

/// Where the automaton is inside the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the top-level object.
    Start,
    /// A value is expected (after `:` or `,` in an array).
    Value,
    /// After `[`: a value or `]`.
    ValueOrEnd,
    /// After `{`: a key or `}`.
    KeyOrEnd,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value: `,` or the container's end.
    AfterValue,
    /// Inside a string; `key` when it is an object's key.
    Str {
        key: bool,
        esc: Esc,
    },
    Num(Num),
    /// Inside `true`, `false` or `null`: `at` bytes of `word` read.
    Lit {
        word: &'static [u8],
        at: u8,
    },
    /// Inside one of a `Schema::Literal`'s values (read so far in `text`).
    Literal,
    /// The top-level object is closed.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Esc {
    None,
    /// After `\`.
    Backslash,
    /// Hex digits still due after `\u` (`left`); `low`: the second half of a surrogate pair;
    /// `d`: the first digit was D; `high`: a high surrogate (D800-DBFF). Surrogates come in
    /// pairs only (serde_json refuses a lone one): anything but a low one is refused as a
    /// pair's second half and a low one alone, at the digit that shows it, so no prefix is a
    /// dead end.
    Hex {
        left: u8,
        low: bool,
        d: bool,
        high: bool,
    },
    /// After a high surrogate: its low half's `\` (false) or `u` (true) is due.
    Pair(bool),
    /// UTF-8 continuation bytes still due.
    Utf8(u8),
}

/// RFC 8259's number grammar, one state per position; the digit states count their digits
/// (`MAX_DIGITS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int(u8),
    Dot,
    Frac(u8),
    Exp,
    ExpSign,
    ExpDigits(u8),
}

impl Num {
    /// Whether the number may end here.
    fn complete(self) -> bool {
        matches!(
            self,
            Num::Zero | Num::Int(_) | Num::Frac(_) | Num::ExpDigits(_)
        )
    }
    /// The state after `b`, or `None` when `b` is not part of the number.
    fn next(self, b: u8) -> Option<Num> {
        let digit = b.is_ascii_digit();
        let (int, frac, exp) = MAX_DIGITS;
        Some(match (self, b) {
            (Num::Minus, b'0') => Num::Zero,
            (Num::Minus, _) if digit => Num::Int(1),
            (Num::Int(n), _) if digit && n < int => Num::Int(n + 1),
            (Num::Zero | Num::Int(_), b'.') => Num::Dot,
            (Num::Zero | Num::Int(_) | Num::Frac(_), b'e' | b'E') => Num::Exp,
            (Num::Dot, _) if digit => Num::Frac(1),
            (Num::Frac(n), _) if digit && n < frac => Num::Frac(n + 1),
            (Num::Exp, b'+' | b'-') => Num::ExpSign,
            (Num::Exp | Num::ExpSign, _) if digit => Num::ExpDigits(1),
            (Num::ExpDigits(n), _) if digit && n < exp => Num::ExpDigits(n + 1),
            _ => return None,
        })
    }
}

/// What a value must be (`json_schema`'s subset; `Any` for JSON mode without a schema).
/// Strings are compared as they appear in the JSON text, escapes included.
#[derive(Debug, Clone, PartialEq)]
pub enum Schema {
    /// Any JSON value.
    Any,
    /// An object with these properties and no others (OpenAI's `additionalProperties: false`).
    Object(Vec<Property>),
    /// Any object: JSON mode's top level.
    AnyObject,
    /// An object of any keys whose values follow this schema (`additionalProperties: {...}`
    /// without `properties`: a map).
    Map(Arc<Schema>),
    Array(Arc<Schema>),
    /// An array of distinct items of a string enum (`uniqueItems` over `String(Some(..))`).
    Set(Arc<Schema>),
    /// A string; with `Some`, one of these (their JSON text between the quotes).
    String(Option<Vec<Vec<u8>>>),
    Number {
        integer: bool,
    },
    /// A number within bounds (`minimum`, `maximum`, ..., `multipleOf`: `json_number`).
    Bounded(Arc<Bounds>),
    /// A string that matches a `pattern` or `format` (`json_pattern`).
    Pattern(Arc<Pattern>),
    /// One of these JSON texts, written exactly so (an `enum` or `const` with values other
    /// than strings; objects and arrays in their compact form).
    Literal(Vec<Vec<u8>>),
    Boolean,
    Null,
    /// `null` or the schema (`type: [T, "null"]`).
    Nullable(Arc<Schema>),
    /// A string of `min..=max` characters (Unicode code points: `minLength` / `maxLength`) or an
    /// array of `min..=max` items (`minItems` / `maxItems`), as `inner` says which.
    Length {
        inner: Arc<Schema>,
        min: u32,
        max: u32,
    },
    /// One of these, told apart by the value's first byte (`anyOf`, `oneOf`, a `type` list:
    /// `json_schema` checks that no two branches start alike).
    Union(Vec<Arc<Schema>>),
    /// A function call (`runtime::tools`): `{"name": N, "arguments": A}`, in that order, N one
    /// of the functions' names and A what that function's parameters schema allows
    /// (`Tagged::call`; a `Tagged` that errors call a tool call).
    ToolCall(Arc<Tagged>),
    /// Objects told apart by their first property's value (`json_tagged`).
    Tagged(Arc<Tagged>),
    /// Objects of a union told apart by their keys (`json_untagged`).
    Untagged(Arc<Untagged>),
}

/// A tool call's functions: each one's name (JSON text between the quotes) and parameters.
pub type Functions = Arc<[(Vec<u8>, Arc<Schema>)]>;

#[derive(Debug, Clone, PartialEq)]
pub struct Property {
    /// The key's JSON text between the quotes.
    pub name: Vec<u8>,
    pub schema: Arc<Schema>,
    pub required: bool,
}

/// Most properties an object schema may have (`Frame::Object::seen` is a bit set).
pub const MAX_PROPERTIES: usize = 64;

/// How many values a string enum has (0 for any other schema).
fn enum_len(s: &Schema) -> usize {
    match s {
        Schema::String(Some(values)) => values.len(),
        _ => 0,
    }
}

/// An open container.
#[derive(Debug, Clone, PartialEq)]
enum Frame {
    /// `props`: `None` for any keys with any values.
    Object {
        props: Option<Arc<Schema>>,
        /// The properties written so far (bit i: `props[i]`).
        seen: u64,
        /// The property whose value comes next.
        current: Option<usize>,
        /// A tagged object whose tag is not written yet (`props` is the tag alone).
        tagged: Option<Arc<Tagged>>,
        /// An object of an untagged union (`props` is all its branches' properties) and the
        /// branches it may still be (bit b: branch b).
        untagged: Option<(Arc<Untagged>, u64)>,
    },
    Array {
        item: Arc<Schema>,
        /// Items begun so far, and how many there must be (`Schema::Length`).
        count: u32,
        min: u32,
        max: u32,
        /// A `Schema::Set`'s items written so far (their JSON text between the quotes).
        used: Option<Vec<Vec<u8>>>,
    },
}

/// The text so far is a prefix of a JSON object (RFC 8259, top level an object, nesting at
/// most `MAX_DEPTH`, at most `MAX_WHITESPACE` whitespace bytes in a row outside strings and
/// `MAX_LEADING_WHITESPACE` before the object,
/// numbers within `MAX_DIGITS`) that follows a schema (`Schema`; JSON mode alone: `AnyObject`).
#[derive(Debug, Clone, PartialEq)]
pub struct JsonPrefix {
    mode: Mode,
    /// Open containers, innermost last.
    stack: Vec<Frame>,
    /// What the value being read (or the next one) must be.
    expect: Arc<Schema>,
    /// The key or constrained string being read, as written so far.
    text: Vec<u8>,
    whitespace: u8,
    /// The string being read: its characters so far and how many there must be
    /// (`Schema::Length`).
    chars: Option<(u32, u32, u32)>,
    /// The pattern of the string being read, where its DFA is and its characters so far.
    pattern: Option<(Arc<Pattern>, State, u32)>,
}

impl Default for JsonPrefix {
    fn default() -> Self {
        Self::new(Arc::new(Schema::AnyObject))
    }
}

impl JsonPrefix {
    /// The automaton of objects that follow `root` (an object schema).
    pub fn new(root: Arc<Schema>) -> Self {
        JsonPrefix {
            mode: Mode::Start,
            stack: Vec::new(),
            expect: root,
            text: Vec::new(),
            whitespace: 0,
            chars: None,
            pattern: None,
        }
    }

    /// Whether the text is a whole JSON object.
    pub fn is_complete(&self) -> bool {
        self.mode == Mode::Done
    }

    /// Reads `bytes`; `false` (and the state unspecified) when they leave the language.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.byte(b))
    }

    /// The state after `bytes`, if they keep the text a prefix.
    pub fn after(&self, bytes: &[u8]) -> Option<JsonPrefix> {
        let mut s = self.clone();
        s.feed(bytes).then_some(s)
    }

    fn byte(&mut self, b: u8) -> bool {
        match self.mode {
            Mode::Str { key, esc } => return self.string(key, esc, b),
            Mode::Num(n) => {
                let bounds = match &*self.expect {
                    Schema::Bounded(b) => Some(b.clone()),
                    _ => None,
                };
                let integer = matches!(*self.expect, Schema::Number { integer: true })
                    || bounds.as_ref().is_some_and(|b| b.integer);
                match n.next(b) {
                    Some(Num::Dot | Num::Exp) if integer => return false,
                    Some(Num::Exp) if bounds.is_some() => return false,
                    // A schema's integers stay exact in a double (and in JavaScript).
                    Some(Num::Int(n))
                        if (integer || bounds.is_some()) && n > MAX_INTEGER_DIGITS =>
                    {
                        return false
                    }
                    Some(n) => {
                        if let Some(bounds) = bounds {
                            self.text.push(b);
                            if !bounds.feasible(&self.text) {
                                return false;
                            }
                        }
                        self.mode = Mode::Num(n);
                        return true;
                    }
                    // The number ends here; `b` is read after it.
                    None if n.complete() => {
                        if bounds.is_some_and(|bounds| !bounds.contains(&self.text)) {
                            return false;
                        }
                        self.mode = Mode::AfterValue
                    }
                    None => return false,
                }
            }
            Mode::Literal => {
                let Schema::Literal(values) = &*self.expect else {
                    return false;
                };
                self.text.push(b);
                if values.iter().any(|v| v.starts_with(&self.text)) {
                    return true;
                }
                // The value ends here; `b` is read after it.
                self.text.pop();
                if !values.contains(&self.text) {
                    return false;
                }
                self.mode = Mode::AfterValue;
            }
            Mode::Lit { word, at } => {
                if word[at as usize] != b {
                    return false;
                }
                let at = at + 1;
                self.mode = if at as usize == word.len() {
                    Mode::AfterValue
                } else {
                    Mode::Lit { word, at }
                };
                return true;
            }
            Mode::Done => return false,
            _ => {}
        }
        if matches!(b, b' ' | b'\n' | b'\t' | b'\r') {
            self.whitespace += 1;
            let most = match self.mode {
                Mode::Start => MAX_LEADING_WHITESPACE,
                _ => MAX_WHITESPACE,
            };
            return self.whitespace <= most;
        }
        self.whitespace = 0;
        match (self.mode, b) {
            (Mode::Start, b'{') => self.value(b),
            (Mode::Value | Mode::ValueOrEnd, _) if b != b']' => self.value(b),
            (Mode::ValueOrEnd, b']') => self.close(b),
            (Mode::KeyOrEnd, b'}') => self.close(b),
            (Mode::KeyOrEnd | Mode::Key, b'"') if self.keys_left() => {
                self.text.clear();
                self.mode = Mode::Str {
                    key: true,
                    esc: Esc::None,
                };
                true
            }
            (Mode::Colon, b':') => {
                self.expect = match (self.schema_object(), self.stack.last()) {
                    (Some((props, _, Some(i))), _) => props[i].schema.clone(),
                    (_, Some(Frame::Object { props: Some(m), .. })) => match &**m {
                        Schema::Map(values) => values.clone(),
                        _ => Arc::new(Schema::Any),
                    },
                    _ => Arc::new(Schema::Any),
                };
                self.mode = Mode::Value;
                true
            }
            (Mode::AfterValue, b',') => match self.stack.last() {
                Some(Frame::Array {
                    item,
                    count,
                    max,
                    used,
                    ..
                }) if count < max && used.as_ref().is_none_or(|u| u.len() < enum_len(item)) => {
                    self.expect = item.clone();
                    self.mode = Mode::Value;
                    true
                }
                // A full array (`maxItems`) only closes.
                Some(Frame::Array { .. }) => false,
                _ if self.keys_left() => {
                    self.mode = Mode::Key;
                    true
                }
                _ => false,
            },
            (Mode::AfterValue, b'}' | b']') => self.close(b),
            _ => false,
        }
    }

    /// The innermost open object's schema properties, which of them are written (bit i) and
    /// whose value comes next; `None` in an array or an object of any keys.
    fn schema_object(&self) -> Option<(&[Property], u64, Option<usize>)> {
        match self.stack.last()? {
            Frame::Object {
                props: Some(p),
                seen,
                current,
                ..
            } => match &**p {
                Schema::Object(props) => Some((props, *seen, *current)),
                _ => None,
            },
            Frame::Object { .. } | Frame::Array { .. } => None,
        }
    }

    /// The object being read has a property left to write (any key where it has no schema).
    fn keys_left(&self) -> bool {
        let open = self.open_keys();
        self.schema_object()
            .is_none_or(|(props, seen, _)| (0..props.len()).any(|i| open & !seen & (1 << i) != 0))
    }

    /// The innermost object's properties that may be written (bit i): those of the branches
    /// it may still be, for an untagged union's object; else all.
    fn open_keys(&self) -> u64 {
        match self.stack.last() {
            Some(Frame::Object {
                untagged: Some((u, live)),
                ..
            }) => u.keys(*live),
            _ => u64::MAX,
        }
    }

    /// The first byte of a value of `self.expect`.
    fn value(&mut self, b: u8) -> bool {
        if let Schema::Union(branches) = &*self.expect {
            match branches.iter().find(|s| Self::opens_with(s, b)) {
                Some(s) => self.expect = s.clone(),
                None => return false,
            }
        }
        if let Schema::Nullable(inner) = &*self.expect {
            if b == b'n' {
                self.expect = Arc::new(Schema::Null);
            } else {
                self.expect = inner.clone();
            }
        }
        let mut bounds = None;
        if let Schema::Length { inner, min, max } = &*self.expect {
            bounds = Some((*min, *max));
            self.expect = inner.clone();
        }
        if !Self::opens_with(&self.expect, b) {
            return false;
        }
        if let Some(Frame::Array { count, max, .. }) = self.stack.last_mut() {
            if *count >= *max {
                return false;
            }
            *count += 1;
        }
        self.pattern = None;
        match &*self.expect {
            Schema::Literal(_) => {
                self.text = vec![b];
                self.mode = Mode::Literal;
                return true;
            }
            Schema::Bounded(bounds) => {
                self.text = vec![b];
                if !bounds.feasible(&self.text) {
                    return false;
                }
            }
            Schema::Pattern(p) => self.pattern = Some((p.clone(), p.start(), 0)),
            _ => {}
        }
        self.mode = match b {
            b'{' | b'[' => return self.open(b, bounds),
            b'"' => {
                self.text.clear();
                self.chars = bounds.map(|(min, max)| (0, min, max));
                Mode::Str {
                    key: false,
                    esc: Esc::None,
                }
            }
            b'-' => Mode::Num(Num::Minus),
            b'0' => Mode::Num(Num::Zero),
            b'1'..=b'9' => Mode::Num(Num::Int(1)),
            b't' => Mode::Lit {
                word: b"true",
                at: 1,
            },
            b'f' => Mode::Lit {
                word: b"false",
                at: 1,
            },
            b'n' => Mode::Lit {
                word: b"null",
                at: 1,
            },
            _ => return false,
        };
        true
    }

    /// Whether a value of `s` may start with `b`.
    fn opens_with(s: &Schema, b: u8) -> bool {
        match s {
            Schema::Nullable(inner) => b == b'n' || Self::opens_with(inner, b),
            Schema::Length { inner, .. } => Self::opens_with(inner, b),
            Schema::Union(bs) => bs.iter().any(|s| Self::opens_with(s, b)),
            Schema::Literal(values) => values.iter().any(|v| v.first() == Some(&b)),
            _ => matches!(
                (s, b),
                (Schema::Any, _)
                    | (
                        Schema::Object(_)
                            | Schema::AnyObject
                            | Schema::Map(_)
                            | Schema::ToolCall(_)
                            | Schema::Tagged(_)
                            | Schema::Untagged(_),
                        b'{'
                    )
                    | (Schema::Array(_) | Schema::Set(_), b'[')
                    | (Schema::String(_) | Schema::Pattern(_), b'"')
                    | (
                        Schema::Number { .. } | Schema::Bounded(_),
                        b'-' | b'0'..=b'9'
                    )
                    | (Schema::Boolean, b't' | b'f')
                    | (Schema::Null, b'n')
            ),
        }
    }

    /// Opens an object or an array (`bounds`: its items, `Schema::Length`).
    fn open(&mut self, b: u8, bounds: Option<(u32, u32)>) -> bool {
        if self.stack.len() >= MAX_DEPTH {
            return false;
        }
        if b == b'{' {
            // A tagged object opens with its tag alone; the rest joins once its value says
            // which branch it is (`tag_written`).
            let tagged = match &*self.expect {
                Schema::Tagged(t) | Schema::ToolCall(t) => Some(t.clone()),
                _ => None,
            };
            let untagged = match &*self.expect {
                Schema::Untagged(u) => Some((u.clone(), u.all())),
                _ => None,
            };
            let props = match (&*self.expect, &tagged, &untagged) {
                (_, Some(t), _) => Some(t.opening()),
                (_, _, Some((u, _))) => Some(u.props.clone()),
                (Schema::Object(_) | Schema::Map(_), None, None) => Some(self.expect.clone()),
                _ => None,
            };
            self.stack.push(Frame::Object {
                props,
                seen: 0,
                current: None,
                tagged,
                untagged,
            });
            self.mode = Mode::KeyOrEnd;
        } else {
            let (item, used) = match &*self.expect {
                Schema::Array(item) => (item.clone(), None),
                Schema::Set(item) => (item.clone(), Some(Vec::new())),
                _ => (Arc::new(Schema::Any), None),
            };
            self.expect = item.clone();
            let (min, max) = bounds.unwrap_or((0, u32::MAX));
            self.stack.push(Frame::Array {
                item,
                count: 0,
                min,
                max,
                used,
            });
            self.mode = Mode::ValueOrEnd;
        }
        true
    }

    fn close(&mut self, b: u8) -> bool {
        match (self.stack.last(), b) {
            (
                Some(Frame::Object {
                    untagged: Some((u, live)),
                    seen,
                    ..
                }),
                b'}',
            ) => {
                // The keys written are one of the branches'.
                if !u.may_close(*live, *seen) {
                    return false;
                }
            }
            (Some(Frame::Object { .. }), b'}') => {
                // Every required property written.
                if let Some((props, seen, _)) = self.schema_object() {
                    if props
                        .iter()
                        .enumerate()
                        .any(|(i, prop)| prop.required && seen & (1 << i) == 0)
                    {
                        return false;
                    }
                }
            }
            (Some(Frame::Array { count, min, .. }), b']') if count >= min => {}
            _ => return false,
        }
        self.stack.pop();
        self.mode = if self.stack.is_empty() {
            Mode::Done
        } else {
            Mode::AfterValue
        };
        true
    }

    /// The strings a schema constrains at this point: the unwritten property names while a
    /// key is read, the enum's values while a string of one is.
    fn allowed_strings(&self, key: bool) -> Option<Vec<&[u8]>> {
        if key {
            let (props, seen, _) = self.schema_object()?;
            let open = self.open_keys() & !seen;
            return Some(
                props
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| open & (1 << i) != 0)
                    .map(|(_, p)| p.name.as_slice())
                    .collect(),
            );
        }
        let used: &[Vec<u8>] = match self.stack.last() {
            Some(Frame::Array { used: Some(u), .. }) => u,
            _ => &[],
        };
        match &*self.expect {
            Schema::String(Some(values)) => Some(
                values
                    .iter()
                    .filter(|v| !used.contains(v))
                    .map(Vec::as_slice)
                    .collect(),
            ),
            _ => None,
        }
    }

    /// A value was written in the innermost object: if that is a tagged object's tag, the
    /// object is now the branch its value names (the tag written).
    fn tag_written(&mut self) {
        let Some(Frame::Object {
            props,
            seen,
            current,
            tagged,
            ..
        }) = self.stack.last_mut()
        else {
            return;
        };
        let Some((object, i)) = tagged.as_ref().and_then(|t| t.branch(&self.text)) else {
            return;
        };
        *props = Some(object);
        *seen = 1 << i;
        *current = Some(i);
        *tagged = None;
    }

    fn string(&mut self, key: bool, esc: Esc, b: u8) -> bool {
        if !key && self.pattern.is_some() && !self.pattern_byte(esc, b) {
            return false;
        }
        let constrained = self.allowed_strings(key).is_some();
        // `Schema::Length`: every byte read in `Esc::None` but the closing quote starts a
        // character (an ASCII one, a UTF-8 lead byte, or an escape; a surrogate pair's second
        // half is read in `Esc::Pair`).
        if let (false, Esc::None, Some((n, min, max))) = (key, esc, self.chars) {
            match b {
                b'"' if n < min => return false,
                b'"' => self.chars = None,
                _ if n >= max => return false,
                _ => self.chars = Some((n + 1, min, max)),
            }
        }
        if esc == Esc::None && b == b'"' {
            if let Some(allowed) = self.allowed_strings(key) {
                if !allowed.contains(&self.text.as_slice()) {
                    return false;
                }
            }
            // A schema's key: that property is written, its value comes next (and an untagged
            // union's object may only be the branches that have it).
            let open = self.open_keys();
            let named = self
                .schema_object()
                .filter(|_| key)
                .and_then(|(props, seen, _)| {
                    (0..props.len())
                        .find(|&i| open & !seen & (1 << i) != 0 && props[i].name == self.text)
                });
            if let (
                Some(i),
                Some(Frame::Object {
                    seen,
                    current,
                    untagged,
                    ..
                }),
            ) = (named, self.stack.last_mut())
            {
                *seen |= 1 << i;
                *current = Some(i);
                if let Some((u, live)) = untagged {
                    *live = u.with_key(*live, i);
                }
            }
            if !key {
                self.tag_written();
                if let Some(Frame::Array { used: Some(u), .. }) = self.stack.last_mut() {
                    u.push(self.text.clone());
                }
            }
            self.mode = if key { Mode::Colon } else { Mode::AfterValue };
            return true;
        }
        if constrained {
            self.text.push(b);
            let allowed = self.allowed_strings(key).unwrap_or_default();
            if !allowed.iter().any(|s| s.starts_with(&self.text)) {
                return false;
            }
        }
        let esc = match (esc, b) {
            (Esc::None, b'\\') => Esc::Backslash,
            (Esc::None, 0x00..=0x1f) => return false,
            (Esc::None, 0x20..=0x7f) => Esc::None,
            (Esc::None, 0xc2..=0xdf) => Esc::Utf8(1),
            (Esc::None, 0xe0..=0xef) => Esc::Utf8(2),
            (Esc::None, 0xf0..=0xf4) => Esc::Utf8(3),
            (Esc::None, _) => return false,
            (Esc::Utf8(n), 0x80..=0xbf) => {
                if n == 1 {
                    Esc::None
                } else {
                    Esc::Utf8(n - 1)
                }
            }
            (Esc::Backslash, c) if unescape(c).is_some() => Esc::None,
            (Esc::Backslash, b'u') => Esc::Hex {
                left: 4,
                low: false,
                d: false,
                high: false,
            },
            (Esc::Pair(false), b'\\') => Esc::Pair(true),
            (Esc::Pair(true), b'u') => Esc::Hex {
                left: 4,
                low: true,
                d: false,
                high: false,
            },
            (Esc::Hex { left, low, d, high }, _) if b.is_ascii_hexdigit() => {
                let digit = (b as char).to_digit(16).unwrap_or(0);
                let (mut d, mut high) = (d, high);
                match left {
                    4 if low && digit != 0xd => return false,
                    4 => d = digit == 0xd,
                    // D8-DB: a high surrogate; DC-DF: a low one, only after a high one.
                    3 if low && digit < 0xc => return false,
                    3 if !low && d && digit >= 0xc => return false,
                    3 => high = !low && d && digit >= 8,
                    _ => {}
                }
                match left {
                    1 if high => Esc::Pair(false),
                    1 => Esc::None,
                    n => Esc::Hex {
                        left: n - 1,
                        low,
                        d,
                        high,
                    },
                }
            }
            _ => return false,
        };
        self.mode = Mode::Str { key, esc };
        true
    }
}

impl JsonPrefix {
    /// A byte of a string with a pattern (`Schema::Pattern`), as the string's grammar reads it
    /// in `esc` (which `string` checks after): its DFA steps on each character, escapes
    /// decoded, and refuses one after which nothing can match; the closing quote only where it
    /// matches. A `\u` escape's hex digits are kept in `text`.
    fn pattern_byte(&mut self, esc: Esc, b: u8) -> bool {
        let Some((p, s, n)) = self.pattern.take() else {
            return true;
        };
        // The state after `b`, and whether it ends a character.
        let (next, whole) = match (esc, b) {
            (Esc::None, b'"') => return p.may_end(s, n),
            (Esc::None, b'\\') => (p.backslash_feasible(s, n).then_some(s), false),
            (Esc::None | Esc::Utf8(_), _) => {
                // Continuation bytes still due after `b`.
                let rest = match (esc, b) {
                    (Esc::Utf8(k), _) => k - 1,
                    (_, 0xc0..=0xdf) => 1,
                    (_, 0xe0..=0xef) => 2,
                    (_, 0xf0..=0xff) => 3,
                    _ => 0,
                };
                let e = p.step(s, &[b]).filter(|&e| p.char_fits(e, rest, n));
                (e, rest == 0)
            }
            (Esc::Backslash, b'u') => {
                self.text.clear();
                (Some(s), false)
            }
            (Esc::Backslash, _) => (unescape(b).and_then(|c| p.step_escaped(s, c, n)), true),
            (Esc::Hex { left, .. }, _) if b.is_ascii_hexdigit() => {
                self.text.push(b);
                match left {
                    1 => {
                        let e = std::str::from_utf8(&self.text)
                            .ok()
                            .and_then(|h| u32::from_str_radix(h, 16).ok())
                            .and_then(char::from_u32)
                            .and_then(|c| p.step_escaped(s, c, n));
                        (e, true)
                    }
                    _ => (p.escape_feasible(s, &self.text, n).then_some(s), false),
                }
            }
            _ => (None, false),
        };
        match next {
            Some(e) => {
                self.pattern = Some((p, e, n + u32::from(whole)));
                true
            }
            None => false,
        }
    }
}

/// The character a short escape writes (`\n`: `n` -> newline), `None` for no such escape.
fn unescape(c: u8) -> Option<char> {
    Some(match c {
        b'"' | b'\\' | b'/' => c as char,
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        _ => return None,
    })
}

/// Where a random walk along the automaton ended (`random_text`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Walk {
    /// The JSON is complete: this text.
    Complete(Vec<u8>),
    /// `max_len` bytes and not complete.
    Cut,
    /// No byte of the alphabet goes on after this text: a dead end (a bug, when the alphabet
    /// has the bytes the schema's names need).
    DeadEnd(Vec<u8>),
}

/// A text grown at random, one byte of `alphabet` at a time among those the automaton of
/// `schema` accepts, until it completes or reaches `max_len` bytes or a dead end: the texts the
/// automaton lets through, for tests to hand to an independent parser or validator.
pub fn random_text(
    schema: Arc<Schema>,
    alphabet: &[u8],
    max_len: usize,
    rng: &mut crate::fuzz::mutate::Rng,
) -> Walk {
    let mut p = JsonPrefix::new(schema);
    let mut text = Vec::new();
    while !p.is_complete() {
        if text.len() >= max_len {
            return Walk::Cut;
        }
        let opts: Vec<u8> = alphabet
            .iter()
            .copied()
            .filter(|&b| p.after(&[b]).is_some())
            .collect();
        let Some(&b) = opts.get(rng.below(opts.len().max(1))) else {
            return Walk::DeadEnd(text);
        };
        p.feed(&[b]);
        text.push(b);
    }
    Walk::Complete(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::mutate::Rng;

    fn call(fns: &[(Vec<u8>, Arc<Schema>)]) -> Arc<Tagged> {
        Arc::new(Tagged::call(&fns.iter().cloned().collect()))
    }

    fn is_prefix(s: &[u8]) -> bool {
        JsonPrefix::default().feed(s)
    }

    fn complete(s: &[u8]) -> bool {
        let mut p = JsonPrefix::default();
        p.feed(s) && p.is_complete()
    }

    #[test]
    fn every_prefix_of_json_objects_is_accepted_and_only_the_whole_is_complete() {
        let docs = [
            r#"{}"#,
            r#"{"a":1}"#,
            r#" { "a" : [ 1 , -2.5e+3 , 0.0 , 0 , 1E9 , true , false , null , "x\"y\\u00e9" ] } "#
                .trim_end(),
            r#"{"k":{"n":{"m":[[],[{}]]}},"s":"\u00e9\n\t\/","z":-0}"#,
            "{\"caf\u{e9}\": \"\u{1f600}\"}",
        ];
        for d in docs {
            let b = d.as_bytes();
            serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(b).unwrap();
            for i in 0..b.len() {
                assert!(is_prefix(&b[..i]), "{d:?} cut at {i}");
                assert!(!complete(&b[..i]), "{d:?} complete at {i}");
            }
            assert!(complete(b), "{d:?}");
        }
    }

    #[test]
    fn invalid_text_is_refused_where_it_goes_wrong() {
        for bad in [
            "[1]",
            "1",
            "\"a\"",
            "{a",
            "{\"a\" 1",
            "{\"a\":}",
            "{\"a\":1,}",
            "{\"a\":01",
            "{\"a\":1.}",
            "{\"a\":-}",
            "{\"a\":tru}",
            "{\"a\":\"\\x\"",
            "{\"a\":[1,]",
            "{\"a\":[}",
            "{}}",
            "{} ",
            "{\"a\":\"\n\"}",
            "{\"a\":1e}",
            "{\"a\":\"\\u12g4\"}",
        ] {
            assert!(!complete(bad.as_bytes()), "{bad:?}");
        }
        let deep = "{\"a\":".to_string() + &"[".repeat(MAX_DEPTH);
        assert!(!is_prefix(deep.as_bytes()));
        assert!(is_prefix(&deep.as_bytes()[..deep.len() - 1]));
        // Numbers that would not fit a double (found by `flexquant fuzz`: serde_json rejects
        // 1e+318446744073709551615 as out of range).
        for big in ["{\"a\":1e+318}", "{\"a\":123456789012345678901}"] {
            assert!(!complete(big.as_bytes()), "{big}");
        }
        assert!(complete(b"{\"a\":-12345678901234567890.5e-99}"));
        let spaces = "{".to_string() + &" ".repeat(MAX_WHITESPACE as usize + 1);
        assert!(!is_prefix(spaces.as_bytes()));
        assert!(is_prefix(&spaces.as_bytes()[..spaces.len() - 1]));
    }

    /// Against serde_json on random texts built from JSON's own bytes, mostly along the
    /// automaton's accepted paths: it calls a text a complete object exactly when serde_json
    /// parses it as one with nothing after the closing brace.
    #[test]
    fn the_automaton_agrees_with_serde_json_on_random_texts() {
        let alphabet = b"{}[]:,\"\\-+.0123456789eEtrufalsnx u\n";
        let mut rng = Rng::new(7);
        let (mut completes, mut parsed) = (0, 0);
        for _ in 0..200_000 {
            let mut p = JsonPrefix::default();
            let mut text = Vec::new();
            // Grow a text byte by byte while it stays a prefix, then test the whole.
            for _ in 0..rng.below(40) {
                let b = alphabet[rng.below(alphabet.len())];
                if let Some(n) = p.after(&[b]) {
                    p = n;
                    text.push(b);
                } else if rng.below(8) == 0 {
                    text.push(b);
                    break;
                }
            }
            let ours = complete(&text);
            let theirs =
                serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&text).is_ok()
                    && text.last() == Some(&b'}');
            assert_eq!(ours, theirs, "{:?}", String::from_utf8_lossy(&text));
            completes += ours as usize;
            parsed += theirs as usize;
        }
        assert!(completes > 1000, "only {completes} complete objects drawn");
        assert_eq!(completes, parsed);
    }

    #[test]
    fn random_tool_calls_parse_and_follow_the_function_they_name() {
        let int = Arc::new(Schema::Number { integer: true });
        let city = Arc::new(Schema::Object(vec![Property {
            name: b"city".to_vec(),
            schema: Arc::new(Schema::String(None)),
            required: true,
        }]));
        let zone = Arc::new(Schema::Object(vec![Property {
            name: b"zone".to_vec(),
            schema: int,
            required: true,
        }]));
        let fns = [(b"weather".to_vec(), city), (b"time".to_vec(), zone)];
        let schema = Arc::new(Schema::ToolCall(call(&fns)));
        let alphabet = b"{}[]:,\" -0123456789.eabcdeghimnorstuwyz";
        let mut rng = Rng::new(5);
        let mut complete = [0; 2];
        for _ in 0..4_000 {
            let Walk::Complete(text) = random_text(schema.clone(), alphabet, 120, &mut rng) else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_slice(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(&text)));
            let args = v["arguments"].as_object().unwrap();
            match v["name"].as_str().unwrap() {
                "weather" => {
                    assert!(args["city"].is_string() && args.len() == 1, "{v}");
                    complete[0] += 1;
                }
                "time" => {
                    assert!(args["zone"].as_f64().unwrap().fract() == 0.0 && args.len() == 1);
                    complete[1] += 1;
                }
                other => panic!("{other}"),
            }
            let t = String::from_utf8(text).unwrap();
            assert!(t.find("\"name\"") < t.find("\"arguments\""), "{t}");
        }
        eprintln!("complete walks: {complete:?}");
        assert!(complete[0] > 100 && complete[1] > 100, "{complete:?}");
    }

    #[test]
    fn the_object_opens_after_a_few_whitespace_bytes_at_most() {
        let lead = " ".repeat(MAX_LEADING_WHITESPACE as usize);
        let mut p = JsonPrefix::default();
        assert!(p.feed(lead.as_bytes()));
        assert!(p.after(b" ").is_none() && p.after(b"\n").is_none());
        assert!(p.feed(b"{}") && p.is_complete());
    }
}
