//! The keywords that constrain a value itself: `enum` / `const` (strings, or any JSON values:
//! `Schema::Literal`), numbers' bounds (`minimum`, `maximum`, `exclusiveMinimum`,
//! `exclusiveMaximum`, `multipleOf`: `Schema::Bounded`) and strings' `pattern` / `format`
//! (`Schema::Pattern`).

use super::{bad, json_text, unsupported, Ctx};
use crate::error::Result;
use crate::runtime::json_mode::{Schema, MAX_INTEGER_DIGITS};
use crate::runtime::json_number::{Bound, Bounds};
use crate::runtime::json_pattern::{Pattern, FORMATS};
use serde_json::{Map, Value};
use std::sync::Arc;

/// An `enum` / `const`'s values as JSON texts.
pub(super) enum Values {
    /// All strings (their text between the quotes).
    Strings(Vec<Vec<u8>>),
    /// Any values (their whole compact text).
    Literals(Vec<Vec<u8>>),
}

/// Whether `v` is of JSON Schema type `ty` (`integer`: a number with no fraction).
fn of_type(v: &Value, ty: &str) -> bool {
    match ty {
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.as_f64().is_some_and(|x| x.fract() == 0.0),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => false,
    }
}

/// Whether an `enum` / `const` beside `type` `ty` (if any) has a value of that type.
pub(super) fn has_type(o: &Map<String, Value>, ty: &str) -> bool {
    match (o.get("enum"), o.get("const")) {
        (Some(Value::Array(a)), _) => a.iter().any(|v| of_type(v, ty)),
        (_, Some(c)) => of_type(c, ty),
        _ => true,
    }
}

/// `enum` or `const`: the values of type `ty` (all where `None`), `None` when neither is there.
pub(super) fn values_of(
    f: &Ctx,
    o: &Map<String, Value>,
    ty: Option<&str>,
    path: &str,
) -> Result<Option<Values>> {
    let list = match (o.get("enum"), o.get("const")) {
        (Some(Value::Array(a)), None) => a.clone(),
        (None, Some(c)) => vec![c.clone()],
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => return Err(bad(f, path, "has both `enum` and `const`")),
        (Some(_), None) => return Err(bad(f, &format!("{path}.enum"), "must be a list")),
    };
    if list.is_empty() {
        return Err(bad(f, &format!("{path}.enum"), "is empty"));
    }
    for k in NUMBER_KEYS.iter().chain(&["pattern", "format"]) {
        if o.contains_key(*k) {
            return Err(unsupported(
                f,
                path,
                &format!("`{k}` beside `enum` / `const`"),
            ));
        }
    }
    let list: Vec<&Value> = list
        .iter()
        .filter(|v| ty.is_none_or(|t| of_type(v, t)))
        .collect();
    if list.is_empty() {
        let t = ty.unwrap_or_default();
        return Err(bad(f, path, &format!("has no `enum` value of type `{t}`")));
    }
    Ok(Some(if list.iter().all(|v| v.is_string()) {
        Values::Strings(
            list.iter()
                .filter_map(|v| v.as_str())
                .map(json_text)
                .collect(),
        )
    } else {
        let mut texts: Vec<Vec<u8>> = list.iter().map(|v| v.to_string().into_bytes()).collect();
        texts.sort();
        texts.dedup();
        Values::Literals(texts)
    }))
}

const NUMBER_KEYS: [&str; 5] = [
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
];

/// A number's bounds (`Schema::Bounded`), `None` when it has none.
pub(super) fn number(
    f: &Ctx,
    o: &Map<String, Value>,
    ty: Option<&str>,
    path: &str,
) -> Result<Option<Schema>> {
    let Some(first) = NUMBER_KEYS.iter().find(|k| o.contains_key(**k)) else {
        return Ok(None);
    };
    let integer = match ty {
        Some("integer") => true,
        Some("number") => false,
        _ => return Err(unsupported(
            f,
            &format!("{path}.{first}"),
            "number keywords on a value that is not a number (`type` \"number\" or \"integer\")",
        )),
    };
    let read = |k: &str| -> Result<Option<f64>> {
        match o.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| bad(f, &format!("{path}.{k}"), "must be a number")),
        }
    };
    // The tighter of `minimum` and `exclusiveMinimum` (and of the maxima).
    let pick = |inclusive: Option<f64>, exclusive: Option<f64>, lower: bool| -> Option<Bound> {
        match (inclusive, exclusive) {
            (Some(i), Some(e)) if (lower && e >= i) || (!lower && e <= i) => Some((e, true)),
            (Some(i), _) => Some((i, false)),
            (None, e) => e.map(|e| (e, true)),
        }
    };
    let min = pick(read("minimum")?, read("exclusiveMinimum")?, true);
    let max = pick(read("maximum")?, read("exclusiveMaximum")?, false);
    let multiple = match read("multipleOf")? {
        None => None,
        Some(m) if m > 0.0 && m.fract() == 0.0 && m < 1e15 => Some(m as u64),
        Some(m) if m > 0.0 => {
            return Err(unsupported(
                f,
                &format!("{path}.multipleOf"),
                &format!("`multipleOf` {m} (only whole numbers)"),
            ))
        }
        Some(_) => return Err(bad(f, &format!("{path}.multipleOf"), "must be above 0")),
    };
    let bounds = Bounds {
        integer: integer || multiple.is_some(),
        min,
        max,
        multiple,
    };
    if !bounds.feasible(b"") {
        return Err(bad(
            f,
            path,
            &format!("allows no number (of at most {MAX_INTEGER_DIGITS} digits before the point)"),
        ));
    }
    Ok(Some(Schema::Bounded(Arc::new(bounds))))
}

/// A string's `pattern` or `format` (`Schema::Pattern`) with its `lengths` (`minLength`,
/// `maxLength`) if any, `None` when it has neither.
pub(super) fn pattern(
    f: &Ctx,
    o: &Map<String, Value>,
    ty: Option<&str>,
    path: &str,
    lengths: Option<(u32, u32)>,
) -> Result<Option<Schema>> {
    let (k, v) = match (o.get("pattern"), o.get("format")) {
        (None, None) => return Ok(None),
        (Some(p), None) => ("pattern", p),
        (None, Some(fm)) => ("format", fm),
        (Some(_), Some(_)) => {
            return Err(unsupported(f, path, "`pattern` beside `format`"));
        }
    };
    let at = format!("{path}.{k}");
    if ty != Some("string") {
        return Err(unsupported(
            f,
            &at,
            &format!("`{k}` on a value that is not a string (`type` \"string\")"),
        ));
    }
    let text = v.as_str().ok_or_else(|| bad(f, &at, "must be a string"))?;
    let p = if k == "pattern" {
        Pattern::new(text).map_err(|e| unsupported(f, &at, &format!("pattern {text:?} ({e})")))?
    } else {
        Pattern::format(text).ok_or_else(|| {
            let known: Vec<&str> = FORMATS.iter().map(|(n, _)| *n).collect();
            unsupported(
                f,
                &at,
                &format!("format {text:?} (enforced: {})", known.join(", ")),
            )
        })?
    };
    // `minLength` / `maxLength` beside it: held together with the pattern.
    let p = match lengths {
        None => p,
        Some((min, max)) => {
            let max = o.contains_key("maxLength").then_some(max);
            p.with_lengths(min, max)
                .map_err(|e| unsupported(f, path, &format!("`{k}` {text:?} ({e})")))?
        }
    };
    Ok(Some(Schema::Pattern(Arc::new(p))))
}
