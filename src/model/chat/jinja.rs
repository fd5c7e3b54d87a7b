//! The Jinja environment chat templates run in, set up the way Hugging Face `transformers`
//! sets up its own (`apply_chat_template`): `trim_blocks` and `lstrip_blocks`, loop controls,
//! a `raise_exception(msg)` function, a `tojson` filter that writes what Python's
//! `json.dumps(x, ensure_ascii=False)` writes, and Python's string and dict methods
//! (`.strip()`, `.startswith()`, `.items()`, ...), since real templates are written for Python.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use std::fmt;

/// The one template an environment holds.
pub const TEMPLATE_NAME: &str = "chat_template";

/// What `raise_exception(msg)` raised: kept as the error's source so that a rejection by the
/// template can be told apart from a template that is broken.
#[derive(Debug)]
pub struct Raised(pub String);

impl fmt::Display for Raised {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// An environment holding `source` compiled, or the Jinja error that stopped it.
pub fn compile(source: String) -> Result<Environment<'static>, JinjaError> {
    let mut env = Environment::new();
    env.set_syntax(
        SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()?,
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_filter("tojson", tojson);
    env.add_template_owned(TEMPLATE_NAME, source)?;
    Ok(env)
}

fn raise_exception(msg: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg.clone()).with_source(Raised(msg)))
}

/// The message of a `raise_exception` anywhere in `e`'s chain of sources.
pub fn raised_message(e: &JinjaError) -> Option<&str> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Raised>() {
            return Some(&r.0);
        }
        cur = err.source();
    }
    None
}

/// `transformers`' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent)`, so
/// `", "` and `": "` between items and no HTML escaping (minijinja's own `tojson` escapes).
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    dump(value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn dump(
    v: &Value,
    indent: Option<usize>,
    level: usize,
    out: &mut String,
) -> Result<(), JinjaError> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&python_number(v)),
        ValueKind::String => quote(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            let parts = items
                .iter()
                .map(|item| {
                    let mut s = String::new();
                    dump(item, indent, level + 1, &mut s).map(|()| s)
                })
                .collect::<Result<Vec<_>, _>>()?;
            join(&parts, ('[', ']'), indent, level, out);
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            let parts = keys
                .iter()
                .map(|k| {
                    let mut s = String::new();
                    match k.as_str() {
                        Some(k) => quote(k, &mut s),
                        None => quote(&k.to_string(), &mut s),
                    }
                    s.push_str(": ");
                    dump(&v.get_item(k)?, indent, level + 1, &mut s).map(|()| s)
                })
                .collect::<Result<Vec<_>, _>>()?;
            join(&parts, ('{', '}'), indent, level, out);
        }
        kind => {
            return Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a {kind} cannot be written as JSON"),
            ))
        }
    }
    Ok(())
}

/// Python's layout: `[a, b]` on one line, or one item per line indented by `indent` spaces.
fn join(
    parts: &[String],
    (open, close): (char, char),
    indent: Option<usize>,
    level: usize,
    out: &mut String,
) {
    out.push(open);
    if !parts.is_empty() {
        match indent {
            None => out.push_str(&parts.join(", ")),
            Some(n) => {
                let inner = format!("\n{}", " ".repeat(n * (level + 1)));
                out.push_str(&inner);
                out.push_str(&parts.join(&format!(",{inner}")));
                out.push('\n');
                out.push_str(&" ".repeat(n * level));
            }
        }
    }
    out.push(close);
}

/// Integers as they are; floats as Python's `repr` writes the common ones (`1.0`, `0.5`).
fn python_number(v: &Value) -> String {
    if let Some(i) = v.as_i64().filter(|_| v.is_integer()) {
        return i.to_string();
    }
    let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else if f.fract() == 0.0 && f.abs() < 1e16 {
        format!("{f:.1}")
    } else {
        f.to_string()
    }
}

/// A JSON string with non-ASCII characters kept as they are (`ensure_ascii=False`).
fn quote(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}
