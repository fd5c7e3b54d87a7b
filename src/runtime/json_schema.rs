//! `response_format: { type: "json_schema", json_schema: { schema } }`: the subset of JSON
//! Schema that JSON mode's automaton (`json_mode::JsonPrefix`) enforces while the answer is
//! written, which covers what OpenAI's strict structured outputs use: `type` (one or a list),
//! objects' `properties` / `required` / `additionalProperties: false` (or a schema, for a map
//! without `properties`), arrays' `items`,
//! `enum` / `const` of any values, strings' `minLength` / `maxLength`, arrays' `minItems` /
//! `maxItems` (`Schema::Length`), numbers' bounds and `multipleOf` (`json_number`), strings'
//! `pattern` / `format` (`json_pattern`), `anyOf` / `oneOf` whose branches start with
//! different bytes (`Schema::Union`) or are objects told apart by a tag (`json_tagged`) or
//! by their keys (`json_untagged`),
//! `allOf` of one, and `$ref` into the root's `$defs` /
//! `definitions` (read in place; not recursive). Annotations (`title`, `description`, ...) are
//! read and ignored; any other keyword is `Unsupported`, named with where it is, never
//! silently ignored. The keywords of values themselves are read in `values`.

use crate::error::{Error, Result};
use crate::runtime::json_mode::{Property, Schema, MAX_DEPTH, MAX_PROPERTIES};
use crate::runtime::json_tagged::Tagged;
use crate::runtime::json_untagged::Untagged;
use serde_json::Value;
use std::cell::RefCell;
use std::sync::Arc;
use values::{number, pattern, values_of, Values};

mod values;

/// Keywords that describe and do not constrain.
/// (`discriminator`: OpenAPI's, beside a union of objects, whose tag `json_tagged` finds.)
const ANNOTATIONS: [&str; 8] = [
    "discriminator",
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
];

/// The schema of `response_format`'s `v` (a JSON Schema object); its top level must be an
/// object.
pub fn parse(v: &Value) -> Result<Arc<Schema>> {
    parse_at(v, "response_format json_schema", "schema")
}

/// A schema that is not `strict` (OpenAI's default, where the schema guides and is not a
/// guarantee): what the automaton cannot enforce is left out (`relax`) and each such place is
/// said in the list (the `unsupported` error a strict schema would get). A keyword that only
/// narrows its place is dropped there; a place that cannot be held to at all is any value
/// (`{}`; a top level that is then any value, any object). Errors remain for what is not a
/// schema at all (`input`) and for a top level that cannot be an object.
pub fn parse_loose(v: &Value, field: &str, path: &str) -> Result<(Arc<Schema>, Vec<String>)> {
    let ctx = Ctx {
        field,
        root: v,
        refs: RefCell::new(Vec::new()),
        relaxed: Some(RefCell::new(Vec::new())),
    };
    let s = node(&ctx, v, path, 0)?;
    let s = match *s {
        Schema::Any => Arc::new(Schema::AnyObject),
        _ => top_level(&ctx, s, path)?,
    };
    Ok((s, ctx.relaxed.map(RefCell::into_inner).unwrap_or_default()))
}

/// `parse` for the request's `field`, whose schema is at `path` (named in errors): a
/// function's parameters are `parse_at(v, "tools", "tools[0].function.parameters")`.
pub fn parse_at(v: &Value, field: &str, path: &str) -> Result<Arc<Schema>> {
    let ctx = Ctx {
        field,
        root: v,
        refs: RefCell::new(Vec::new()),
        relaxed: None,
    };
    let s = node(&ctx, v, path, 0)?;
    top_level(&ctx, s, path)
}

/// `s` if it can be the top level: an object.
fn top_level(ctx: &Ctx, s: Arc<Schema>, path: &str) -> Result<Arc<Schema>> {
    match *s {
        Schema::Object(_)
        | Schema::AnyObject
        | Schema::Map(_)
        | Schema::Tagged(_)
        | Schema::Untagged(_) => Ok(s),
        _ => Err(unsupported(ctx, path, "a top level other than an object")),
    }
}

/// What a schema is read against: the request field it is in (for errors), its root (where
/// `$ref`s point) and the references being read (to refuse a recursive one).
struct Ctx<'a> {
    field: &'a str,
    root: &'a Value,
    refs: RefCell<Vec<String>>,
    /// Not strict (`parse_loose`): what was left free, and why.
    relaxed: Option<RefCell<Vec<String>>>,
}

fn unsupported(c: &Ctx, path: &str, what: &str) -> Error {
    Error::Unsupported(format!(
        "chat request: {}: {what} at `{path}` is not supported (see js/API.md)",
        c.field
    ))
}

fn bad(c: &Ctx, path: &str, what: &str) -> Error {
    Error::input(format!("chat request: {}: `{path}` {what}", c.field))
}

/// A string's JSON text between its quotes.
fn json_text(s: &str) -> Vec<u8> {
    let quoted = serde_json::to_string(s).expect("a string serializes");
    quoted.as_bytes()[1..quoted.len() - 1].to_vec()
}

/// `r`, or, when it is `unsupported` and the schema is not strict, `fallback()` (what holds
/// without the part that cannot be enforced), said in `Ctx::relaxed`.
fn relax<T>(f: &Ctx, r: Result<T>, fallback: impl FnOnce() -> T) -> Result<T> {
    match (r, &f.relaxed) {
        (Err(Error::Unsupported(why)), Some(relaxed)) => {
            relaxed.borrow_mut().push(why);
            Ok(fallback())
        }
        (r, _) => r,
    }
}

/// The schema at `path`: `enforced`'s, or, when it cannot be enforced and the schema is not
/// strict, any value there (said in `Ctx::relaxed`).
fn node(f: &Ctx, v: &Value, path: &str, depth: usize) -> Result<Arc<Schema>> {
    relax(f, enforced(f, v, path, depth), || Arc::new(Schema::Any))
}

fn enforced(f: &Ctx, v: &Value, path: &str, depth: usize) -> Result<Arc<Schema>> {
    if depth > MAX_DEPTH {
        return Err(unsupported(f, path, "nesting deeper than 32"));
    }
    let o = match v {
        Value::Bool(true) => return Ok(Arc::new(Schema::Any)),
        Value::Object(o) => o,
        _ => return Err(bad(f, path, "must be a schema object")),
    };
    const OWN: [&str; 26] = [
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "pattern",
        "format",
        "minItems",
        "maxItems",
        "uniqueItems",
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "enum",
        "const",
        "$ref",
        "anyOf",
        "oneOf",
        "allOf",
        // Definitions `$ref` points into, read from the root when a reference is resolved.
        "$defs",
        "definitions",
        "$schema",
    ];
    for k in o
        .keys()
        .filter(|k| !OWN.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()))
    {
        // Not strict: the keyword only narrows what the rest allows, so it is left out.
        let e = unsupported(f, &format!("{path}.{k}"), &format!("keyword `{k}`"));
        relax(f, Err(e), || ())?;
    }
    // Keywords that say what the value is, besides a reference or a union.
    let shape = ["type", "properties", "items", "enum", "const"];
    let alone = |k: &str| -> Result<()> {
        match shape.iter().find(|s| o.contains_key(**s)) {
            Some(s) => Err(unsupported(f, path, &format!("`{k}` beside `{s}`"))),
            None => Ok(()),
        }
    };
    if let Some(r) = o.get("$ref") {
        alone("$ref")?;
        return reference(f, r, &format!("{path}.$ref"), depth);
    }
    for k in ["anyOf", "oneOf"] {
        if let Some(list) = o.get(k) {
            alone(k)?;
            let at = format!("{path}.{k}");
            let branches = match list.as_array() {
                Some(l) if !l.is_empty() => l,
                _ => return Err(bad(f, &at, "must be a non-empty list")),
            };
            let parsed = branches
                .iter()
                .enumerate()
                .map(|(i, b)| node(f, b, &format!("{at}[{i}]"), depth + 1))
                .collect::<Result<Vec<_>>>()?;
            return union(f, &at, parsed, k == "oneOf");
        }
    }
    if let Some(list) = o.get("allOf") {
        alone("allOf")?;
        return match list.as_array().map(Vec::as_slice) {
            Some([one]) => node(f, one, &format!("{path}.allOf[0]"), depth + 1),
            _ => Err(unsupported(
                f,
                &format!("{path}.allOf"),
                "`allOf` of other than one schema",
            )),
        };
    }
    match o.get("type") {
        None => Ok(Arc::new(typed(f, o, None, path, depth)?)),
        Some(Value::String(t)) => Ok(Arc::new(typed(f, o, Some(t), path, depth)?)),
        Some(Value::Array(ts)) => {
            let names = ts
                .iter()
                .map(|t| {
                    t.as_str()
                        .ok_or_else(|| bad(f, &format!("{path}.type"), "must list strings"))
                })
                .collect::<Result<Vec<&str>>>()?;
            if names.is_empty() {
                return Err(bad(f, &format!("{path}.type"), "is an empty list"));
            }
            // A number may be an integer: "number" covers "integer".
            let number = names.contains(&"number");
            let parsed: Vec<Arc<Schema>> = names
                .iter()
                .filter(|t| !(number && **t == "integer"))
                // Beside an `enum`, the types of its values only.
                .filter(|t| values::has_type(o, t))
                .map(|t| match *t {
                    // The other types' keywords (lengths, bounds) say nothing of null.
                    "null" if !o.contains_key("enum") && !o.contains_key("const") => {
                        Ok(Arc::new(Schema::Null))
                    }
                    t => typed(f, o, Some(t), path, depth).map(Arc::new),
                })
                .collect::<Result<_>>()?;
            if parsed.is_empty() {
                return Err(bad(f, path, "has no `enum` value of its `type`"));
            }
            union(f, path, parsed, false)
        }
        Some(_) => Err(bad(
            f,
            &format!("{path}.type"),
            "must be a string or a list",
        )),
    }
}

/// `$ref` to `#/$defs/NAME` or `#/definitions/NAME` of the root schema, read in its place (a
/// reference to itself, directly or not, is unsupported: the automaton has a fixed depth).
fn reference(f: &Ctx, r: &Value, path: &str, depth: usize) -> Result<Arc<Schema>> {
    let r = r.as_str().ok_or_else(|| bad(f, path, "must be a string"))?;
    let target = ["#/$defs/", "#/definitions/"]
        .iter()
        .find_map(|p| r.strip_prefix(p).map(|name| (&p[2..p.len() - 1], name)))
        .and_then(|(defs, name)| f.root.get(defs)?.get(name))
        .ok_or_else(|| {
            unsupported(
                f,
                path,
                &format!("`$ref` \"{r}\" (only #/$defs/NAME or #/definitions/NAME of this schema)"),
            )
        })?;
    if f.refs.borrow().iter().any(|x| x == r) {
        return Err(unsupported(f, path, &format!("a recursive `$ref` \"{r}\"")));
    }
    f.refs.borrow_mut().push(r.to_string());
    let s = node(f, target, path, depth + 1);
    f.refs.borrow_mut().pop();
    s
}

/// Which first bytes a value of `s` may start with: the automaton picks a union's branch by
/// its value's first byte, so branches must not share one.
fn opens(s: &Schema) -> u8 {
    const OBJECT: u8 = 1;
    const ARRAY: u8 = 2;
    const STRING: u8 = 4;
    const NUMBER: u8 = 8;
    const BOOLEAN: u8 = 16;
    const NULL: u8 = 32;
    match s {
        Schema::Any => 63,
        Schema::Object(_)
        | Schema::AnyObject
        | Schema::Map(_)
        | Schema::ToolCall(_)
        | Schema::Tagged(_)
        | Schema::Untagged(_) => OBJECT,
        Schema::Array(_) | Schema::Set(_) => ARRAY,
        Schema::String(_) | Schema::Pattern(_) => STRING,
        Schema::Number { .. } | Schema::Bounded(_) => NUMBER,
        Schema::Literal(values) => values.iter().fold(0, |m, v| {
            m | match v.first() {
                Some(b'{') => OBJECT,
                Some(b'[') => ARRAY,
                Some(b'"') => STRING,
                Some(b't' | b'f') => BOOLEAN,
                Some(b'n') => NULL,
                _ => NUMBER,
            }
        }),
        Schema::Boolean => BOOLEAN,
        Schema::Null => NULL,
        Schema::Nullable(x) => opens(x) | NULL,
        Schema::Length { inner, .. } => opens(inner),
        Schema::Union(bs) => bs.iter().fold(0, |m, b| m | opens(b)),
    }
}

/// `anyOf` / `oneOf` (`one_of`) / a `type` list: `Nullable` for one schema and null, else a
/// `Union` whose branches start with different bytes, several objects standing as one `Tagged`
/// (told apart by a tag) or else one `Untagged` (told apart by their keys).
fn union(f: &Ctx, path: &str, parsed: Vec<Arc<Schema>>, one_of: bool) -> Result<Arc<Schema>> {
    let mut flat: Vec<Arc<Schema>> = Vec::new();
    for s in parsed {
        match &*s {
            Schema::Union(bs) => flat.extend(bs.iter().cloned()),
            Schema::Nullable(x) => flat.extend([x.clone(), Arc::new(Schema::Null)]),
            _ => flat.push(s),
        }
    }
    flat.dedup_by(|a, b| a == b);
    // Several objects become one: tagged when a tag tells them apart, else untagged.
    let objects: Vec<Arc<Schema>> = flat
        .iter()
        .filter(|s| matches!(***s, Schema::Object(_)))
        .cloned()
        .collect();
    if objects.len() > 1 {
        let one = match Tagged::discriminate(&objects) {
            Some(t) => Schema::Tagged(Arc::new(t)),
            None => Schema::Untagged(Arc::new(
                Untagged::merge(&objects, one_of).map_err(|why| unsupported(f, path, &why))?,
            )),
        };
        flat.retain(|s| !matches!(**s, Schema::Object(_)));
        flat.push(Arc::new(one));
    }
    let mut seen = 0u8;
    for s in &flat {
        if opens(s) & seen != 0 {
            return Err(unsupported(
                f,
                path,
                "a union whose branches can start alike (two objects, two strings, ...)",
            ));
        }
        seen |= opens(s);
    }
    let nulls = flat.iter().filter(|s| ***s == Schema::Null).count();
    Ok(match flat.as_slice() {
        [one] => one.clone(),
        [a, b] if nulls == 1 => {
            let other = if **a == Schema::Null { b } else { a };
            Arc::new(Schema::Nullable(other.clone()))
        }
        _ => Arc::new(Schema::Union(flat)),
    })
}

/// Most characters or items a `maxLength` / `maxItems` may ask for.
pub const MAX_LENGTH: u64 = 1 << 20;

/// An array of `item`s: with `uniqueItems: true` a `Set`, which holds only for a string enum
/// (Pydantic's `set[Color]` of an `Enum`; `items`: its `minItems` / `maxItems`, the first at
/// most the number of values).
fn unique(
    f: &Ctx,
    o: &serde_json::Map<String, Value>,
    path: &str,
    item: Arc<Schema>,
    items: Option<(u32, u32)>,
) -> Result<Schema> {
    let at = format!("{path}.uniqueItems");
    match o.get("uniqueItems") {
        None | Some(Value::Bool(false)) => Ok(Schema::Array(item)),
        Some(Value::Bool(true)) => match &*item {
            Schema::String(Some(values)) => {
                if items.is_some_and(|(min, _)| min as usize > values.len()) {
                    return Err(bad(
                        f,
                        &at,
                        &format!(
                            "asks for more distinct items than the {} values",
                            values.len()
                        ),
                    ));
                }
                Ok(Schema::Set(item))
            }
            _ => relax(
                f,
                Err(unsupported(
                    f,
                    &at,
                    "`uniqueItems` on items other than a string `enum`",
                )),
                || Schema::Array(item.clone()),
            ),
        },
        Some(_) => Err(bad(f, &at, "must be a boolean")),
    }
}

/// `min_key` / `max_key` (`minLength` / `maxLength`, `minItems` / `maxItems`) as bounds, `None`
/// when neither is there.
fn bounds(
    f: &Ctx,
    o: &serde_json::Map<String, Value>,
    path: &str,
    [min_key, max_key]: [&str; 2],
) -> Result<Option<(u32, u32)>> {
    let read = |k: &str, default: u64| match o.get(k) {
        None => Ok(default),
        Some(v) => v.as_u64().filter(|n| *n <= MAX_LENGTH).ok_or_else(|| {
            bad(
                f,
                &format!("{path}.{k}"),
                "must be an integer in 0..=1048576",
            )
        }),
    };
    if !o.contains_key(min_key) && !o.contains_key(max_key) {
        return Ok(None);
    }
    let (min, max) = (read(min_key, 0)?, read(max_key, MAX_LENGTH)?);
    if min > max {
        return Err(bad(
            f,
            path,
            &format!("has {min_key} {min} above {max_key} {max}"),
        ));
    }
    Ok(Some((min as u32, max as u32)))
}

/// A schema of one `type` (`None`: no `type` keyword) from the keywords beside it, with its
/// length bounds (`Schema::Length`) where it is a string or an array.
fn typed(
    f: &Ctx,
    o: &serde_json::Map<String, Value>,
    ty: Option<&str>,
    path: &str,
    depth: usize,
) -> Result<Schema> {
    let mut text = bounds(f, o, path, ["minLength", "maxLength"])?;
    let items = bounds(f, o, path, ["minItems", "maxItems"])?;
    // What its `enum` / `const`, its number or string keywords or else its `type` make; then
    // its length keywords.
    let s = if let Some(values) = values_of(f, o, ty, path)? {
        match values {
            Values::Strings(v) => Schema::String(Some(v)),
            Values::Literals(v) => Schema::Literal(v),
        }
    } else if let Some(n) = number(f, o, ty, path)? {
        n
    } else if let Some(p) = relax(f, pattern(f, o, ty, path, text), || None)? {
        text = None; // the pattern holds them
        p
    } else {
        match ty {
            None => Schema::Any,
            Some("string") => Schema::String(None),
            Some("number") => Schema::Number { integer: false },
            Some("integer") => Schema::Number { integer: true },
            Some("boolean") => Schema::Boolean,
            Some("null") => Schema::Null,
            Some("array") => {
                let item = match o.get("items") {
                    None => Arc::new(Schema::Any),
                    Some(i) => node(f, i, &format!("{path}.items"), depth + 1)?,
                };
                unique(f, o, path, item, items)?
            }
            Some("object") => object(f, o, path, depth)?,
            Some(t) => {
                return Err(bad(
                    f,
                    &format!("{path}.type"),
                    &format!("`{t}` is not a type"),
                ))
            }
        }
    };
    let wrap = |(min, max): (u32, u32), s: Schema| Schema::Length {
        inner: Arc::new(s),
        min,
        max,
    };
    Ok(match (&s, text, items) {
        (Schema::String(_), Some(b), None) => wrap(b, s),
        (Schema::Array(_) | Schema::Set(_), None, Some(b)) => wrap(b, s),
        (_, None, None) => s,
        _ => {
            return Err(unsupported(
                f,
                path,
                "length keywords on a value that is not a string (minLength, maxLength) or an array (minItems, maxItems)",
            ))
        }
    })
}

fn object(f: &Ctx, o: &serde_json::Map<String, Value>, path: &str, depth: usize) -> Result<Schema> {
    let extra = o.get("additionalProperties");
    let Some(props) = o.get("properties") else {
        if o.get("required")
            .and_then(Value::as_array)
            .is_some_and(|r| !r.is_empty())
        {
            return Err(unsupported(
                f,
                &format!("{path}.required"),
                "`required` without `properties`",
            ));
        }
        // Any keys: with any values, or with values of one schema (a map: Pydantic's
        // `dict[str, T]`).
        return Ok(match extra {
            None | Some(Value::Bool(true)) => Schema::AnyObject,
            Some(Value::Bool(false)) => Schema::Object(Vec::new()),
            Some(v) => Schema::Map(node(
                f,
                v,
                &format!("{path}.additionalProperties"),
                depth + 1,
            )?),
        });
    };
    // Other keys are never written, which `false`, `true` and `{}` (Pydantic's
    // `extra='allow'`) all allow; a schema for them would ask for keys the model cannot write.
    match extra {
        None | Some(Value::Bool(_)) => {}
        Some(Value::Object(m)) if m.is_empty() => {}
        Some(_) => relax(
            f,
            Err(unsupported(
                f,
                &format!("{path}.additionalProperties"),
                "a schema for additional properties beside `properties` (only `false`, `true` or `{}`: no other keys are written)",
            )),
            || (),
        )?,
    }
    let props = props
        .as_object()
        .ok_or_else(|| bad(f, &format!("{path}.properties"), "must be an object"))?;
    if props.len() > MAX_PROPERTIES {
        return Err(unsupported(f, path, "more than 64 properties"));
    }
    let required: Vec<&str> = match o.get("required") {
        None => Vec::new(),
        Some(Value::Array(r)) => r
            .iter()
            .map(|n| {
                n.as_str()
                    .ok_or_else(|| bad(f, &format!("{path}.required"), "must list strings"))
            })
            .collect::<Result<_>>()?,
        Some(_) => return Err(bad(f, &format!("{path}.required"), "must be a list")),
    };
    if let Some(n) = required.iter().find(|n| !props.contains_key(**n)) {
        return Err(bad(
            f,
            &format!("{path}.required"),
            &format!("names `{n}`, which is not in `properties`"),
        ));
    }
    let props = props
        .iter()
        .map(|(name, v)| {
            Ok(Property {
                name: json_text(name),
                schema: node(f, v, &format!("{path}.properties.{name}"), depth + 1)?,
                required: required.contains(&name.as_str()),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Schema::Object(props))
}

/// Every byte the schema's names and enum values are written with (`JsonConstraint` watches
/// their one-byte tokens).
pub fn string_bytes(s: &Schema, out: &mut Vec<u8>) {
    match s {
        Schema::Object(props) => {
            for p in props {
                out.extend_from_slice(&p.name);
                string_bytes(&p.schema, out);
            }
        }
        Schema::Array(item) | Schema::Set(item) | Schema::Nullable(item) | Schema::Map(item) => {
            string_bytes(item, out)
        }
        Schema::Union(bs) => bs.iter().for_each(|b| string_bytes(b, out)),
        Schema::Length { inner, .. } => string_bytes(inner, out),
        Schema::String(Some(values)) | Schema::Literal(values) => {
            values.iter().for_each(|v| out.extend_from_slice(v))
        }
        // The pattern's ASCII characters (unless it takes most of them: then the top
        // candidates hold some), and the escapes that write any other character.
        Schema::Pattern(p) => {
            let ascii = p.ascii();
            if ascii.len() <= 48 {
                out.extend_from_slice(&ascii);
            }
            out.extend_from_slice(b"\\u0123456789abcdef");
        }
        Schema::Untagged(u) => string_bytes(&u.props, out),
        Schema::Tagged(t) | Schema::ToolCall(t) => {
            out.extend_from_slice(&t.key);
            for (value, branch) in &t.branches {
                out.extend_from_slice(value);
                string_bytes(branch, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::json_mode::{random_text, JsonPrefix, Walk};
    use serde_json::json;

    fn accepts(schema: &Value, text: &str) -> bool {
        let mut p = JsonPrefix::new(parse(schema).unwrap());
        p.feed(text.as_bytes()) && p.is_complete()
    }

    fn person() -> Value {
        json!({"type": "object", "title": "A person", "additionalProperties": false,
            "properties": {
                "name": {"type": "string", "description": "Full name"},
                "age": {"type": "integer"},
                "height": {"type": ["number", "null"]},
                "role": {"enum": ["admin", "user"]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "address": {"type": "object", "properties": {"city": {"type": "string"}},
                    "required": ["city"]},
                "ok": {"type": "boolean"}
            },
            "required": ["name", "age", "role"]})
    }

    #[test]
    fn texts_that_follow_the_schema_are_accepted() {
        let s = person();
        for text in [
            r#"{"name": "Ada", "age": 36, "role": "admin"}"#,
            r#"{"role":"user","age":-1,"name":"\u00c9mile","height":null}"#,
            r#"{"name":"B","age":0,"role":"user","height":1.85,"tags":["x","y"],"ok":true,
                "address":{"city":"Paris"}}"#,
            r#"{"name":"B","age":0,"role":"user","tags":[],"address":{"city":""}}"#,
        ] {
            assert!(accepts(&s, text), "{text}");
        }
    }

    #[test]
    fn texts_that_break_the_schema_are_refused() {
        let s = person();
        for text in [
            r#"{"name": "Ada", "age": 36}"#,                    // role missing
            r#"{"name": "Ada", "age": 36.5, "role": "admin"}"#, // not an integer
            r#"{"name": "Ada", "age": 36, "role": "root"}"#,    // not in the enum
            r#"{"name": "Ada", "age": 36, "role": "admin", "x": 1}"#, // no such property
            r#"{"name": "Ada", "name": "B", "age": 36, "role": "user"}"#, // twice
            r#"{"name": 7, "age": 36, "role": "user"}"#,        // not a string
            r#"{"name":"A","age":1,"role":"user","tags":[1]}"#, // items are strings
            r#"{"name":"A","age":1,"role":"user","address":{}}"#, // city required
            r#"{"name":"A","age":1,"role":"user","ok":null}"#,  // not nullable
        ] {
            assert!(!accepts(&s, text), "{text}");
        }
        // Prefixes of names and enum values stay open; a wrong letter does not.
        let mut p = JsonPrefix::new(parse(&s).unwrap());
        assert!(p.feed(br#"{"na"#));
        assert!(p.after(b"x").is_none());
        assert!(p.feed(br#"me": "A", "role": "ad"#));
        assert!(p.after(b"x").is_none() && p.after(b"m").is_some());
    }

    #[test]
    fn unsupported_keywords_and_bad_schemas_are_named() {
        for (schema, want) in [
            (
                json!({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": true}}}),
                "schema.properties.a.uniqueItems",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)"}}}),
                "schema.properties.a.pattern",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "string", "format": "iri"}}}),
                "format \"iri\" (enforced: date, time",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "number", "multipleOf": 0.5}}}),
                "schema.properties.a.multipleOf",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "string", "minimum": 1}}}),
                "schema.properties.a.minimum",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "^[0-9]{5}$", "maxLength": 3}}}),
                "no string of 0 to 3 characters matches it",
            ),
            (
                json!({"type": "object", "properties": {"a": {"enum": [1, 2], "minimum": 1}}}),
                "`minimum` beside `enum`",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0.2, "maximum": 0.8}}}),
                "`schema.properties.a` allows no number",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "integer", "enum": ["x"]}}}),
                "no `enum` value of type `integer`",
            ),
            (json!({"type": "array"}), "top level"),
            (
                json!({"type": "object", "properties": {}, "additionalProperties": {"type": "integer"}}),
                "schema.additionalProperties",
            ),
            (
                json!({"type": "object", "required": ["a"]}),
                "`required` without `properties`",
            ),
            (json!({"anyOf": []}), "schema.anyOf"),
            (
                json!({"type": "object", "properties": {"a": {"anyOf": [
                    {"type": "object"}, {"type": "object", "properties": {}}]}}}),
                "schema.properties.a.anyOf",
            ),
            (
                json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/N"}},
                    "$defs": {"N": {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}}}}),
                "recursive `$ref`",
            ),
            (
                json!({"type": "object", "properties": {"a": {"$ref": "https://x/s.json"}}}),
                "schema.properties.a.$ref",
            ),
            (
                json!({"type": "object", "properties": {"a": {"allOf": [{"type": "string"}, {}]}}}),
                "schema.properties.a.allOf",
            ),
            (
                json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/A", "type": "string"}},
                    "$defs": {"A": {"type": "string"}}}),
                "`$ref` beside `type`",
            ),
            (
                json!({"type": "object", "properties": {}, "required": ["b"]}),
                "`b`",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "strin"}}}),
                "`strin`",
            ),
        ] {
            let e = parse(&schema).unwrap_err().to_string();
            assert!(e.contains(want), "{schema}: {e}");
        }
    }

    #[test]
    fn bounds_patterns_formats_and_literal_enums_are_enforced() {
        let s = json!({"type": "object", "additionalProperties": false,
        "properties": {
            "n": {"type": "integer", "minimum": -5, "exclusiveMaximum": 120, "multipleOf": 5},
            "x": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
            "c": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]+$"},
            "d": {"type": "string", "format": "date"},
            "e": {"enum": [1, 2.5, true, null, "a", [1, {"k": "v"}]]},
            "t": {"type": ["integer", "null"], "enum": [3, null, "z"]}
        }});
        for ok in [
            r#"{"n": -5, "x": 1, "c": "AB-12", "d": "2024-02-28", "e": 2.5, "t": 3}"#,
            r#"{"n": 115, "x": 0.0001, "e": [1,{"k":"v"}], "t": null}"#,
            r#"{"x": null, "c": "AB-0", "e": null}"#,
            r#"{"e": "a", "n": 0}"#,
        ] {
            assert!(accepts(&s, ok), "{ok}");
        }
        for bad in [
            r#"{"n": 120}"#, // exclusive maximum
            r#"{"n": -10}"#, // below the minimum
            r#"{"n": 7}"#,   // not a multiple of 5
            r#"{"n": 1e1}"#, // no exponent
            r#"{"x": 0}"#,   // exclusive minimum
            r#"{"x": 1.5}"#, // above the maximum
            r#"{"c": "ab-1"}"#,
            r#"{"c": "AB-"}"#,
            r#"{"d": "2024-02-30"}"#,
            r#"{"e": 1.0}"#,             // written otherwise than the enum writes it
            r#"{"e": [1, {"k": "v"}]}"#, // not compact
            r#"{"e": false}"#,
            r#"{"c": "\u0041B-1"}"#, // an escape for a plain letter
            r#"{"t": "z"}"#,         // not of its type
        ] {
            assert!(!accepts(&s, bad), "{bad}");
        }
        // Refused at the first byte that cannot lead anywhere.
        let mut p = JsonPrefix::new(parse(&s).unwrap());
        assert!(p.feed(br#"{"n": 1"#));
        assert!(p.after(b"2").is_none() && p.after(b"1").is_some() && p.after(b"0").is_some());
        assert!(p.after(b",").is_none());
        assert!(p.feed(br#"0, "c": "A"#));
        assert!(p.after(b"b").is_none() && p.after(b"B").is_some());
        // No escape writes what may be written as it is.
        assert!(p.after(b"\\").is_none());
    }

    /// A map (Pydantic's `dict[str, int]`): any keys, values of one schema; nested in a list.
    #[test]
    fn maps_take_any_keys_with_values_of_their_schema() {
        let s = json!({"type": "object", "additionalProperties": false, "required": ["m"],
        "properties": {
            "m": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
            "l": {"type": "array", "items": {"type": "object",
                "additionalProperties": {"enum": ["x", "y"]}}},
            "e": {"type": "object", "additionalProperties": false}
        }});
        for ok in [
            r#"{"m": {}}"#,
            r#"{"m": {"a": 1, "b c": 20}, "l": [{"k": "x"}, {}], "e": {}}"#,
        ] {
            assert!(accepts(&s, ok), "{ok}");
        }
        for bad in [
            r#"{"m": {"a": -1}}"#,
            r#"{"m": {"a": "1"}}"#,
            r#"{"m": {}, "l": [{"k": "z"}]}"#,
            r#"{"m": {}, "e": {"a": 1}}"#,
        ] {
            assert!(!accepts(&s, bad), "{bad}");
        }
        let top = json!({"type": "object", "additionalProperties": {"type": "boolean"}});
        assert!(accepts(&top, r#"{"on": true, "off": false}"#));
        assert!(!accepts(&top, r#"{"on": 1}"#));
        // Pydantic's `extra='allow'`: other keys allowed, none written.
        for extra in [json!(true), json!({})] {
            let s = json!({"type": "object", "additionalProperties": extra,
                "properties": {"a": {"type": "integer"}}, "required": ["a"]});
            assert!(accepts(&s, r#"{"a": 1}"#));
            assert!(!accepts(&s, r#"{"a": 1, "b": 2}"#));
        }
    }

    /// Pydantic's discriminated union (`oneOf` of `$ref`s with a `discriminator`), and an
    /// `anyOf` of objects and null in an array: the tag comes first and picks the branch.
    #[test]
    fn unions_of_objects_are_told_apart_by_their_tag() {
        let s = json!({"type": "object", "additionalProperties": false,
            "$defs": {
                "Cat": {"type": "object", "additionalProperties": false,
                    "properties": {"pet_type": {"const": "cat", "type": "string"},
                        "meows": {"type": "integer"}},
                    "required": ["pet_type", "meows"]},
                "Dog": {"type": "object", "additionalProperties": false,
                    "properties": {"pet_type": {"enum": ["dog", "puppy"]},
                        "barks": {"type": "number"}},
                    "required": ["pet_type", "barks"]}
            },
            "properties": {
                "pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
                    "discriminator": {"propertyName": "pet_type",
                        "mapping": {"cat": "#/$defs/Cat", "dog": "#/$defs/Dog"}}},
                "pets": {"type": "array", "items": {"anyOf": [
                    {"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}, {"type": "null"}]}}
            },
            "required": ["pet"]});
        for ok in [
            r#"{"pet": {"pet_type": "cat", "meows": 3}}"#,
            r#"{"pet": {"pet_type": "puppy", "barks": 1.5}, "pets": [null, {"pet_type": "cat", "meows": 1}]}"#,
            r#"{"pets": [], "pet": {"pet_type": "dog", "barks": 0}}"#,
        ] {
            assert!(accepts(&s, ok), "{ok}");
        }
        for bad in [
            r#"{"pet": {"meows": 3, "pet_type": "cat"}}"#, // the tag first
            r#"{"pet": {"pet_type": "cat", "barks": 1}}"#, // a dog's property
            r#"{"pet": {"pet_type": "cat"}}"#,             // meows required
            r#"{"pet": {"pet_type": "cow", "meows": 1}}"#,
            r#"{"pet": null}"#,
        ] {
            assert!(!accepts(&s, bad), "{bad}");
        }
        // No property tells these apart, and `k` differs between them.
        let same = json!({"type": "object", "properties": {"a": {"anyOf": [
            {"type": "object", "properties": {"k": {"const": "x"}}, "required": ["k"]},
            {"type": "object", "properties": {"k": {"enum": ["x", "y"]}}, "required": ["k"]}]}}});
        let e = parse(&same).unwrap_err().to_string();
        assert!(
            e.contains("schema.properties.a.anyOf") && e.contains("`k` differs"),
            "{e}"
        );
    }

    /// Not strict: a keyword that only narrows is left out (the rest of its place still holds),
    /// a place that cannot be held to at all is any value, and each is said with its path.
    #[test]
    fn a_schema_that_is_not_strict_leaves_out_what_cannot_be_enforced() {
        let s = json!({"type": "object", "minProperties": 1, "additionalProperties": {"type": "integer"},
            "$defs": {"Node": {"type": "object", "properties": {
                "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}}},
            "properties": {
                "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": true},
                "code": {"type": "string", "pattern": "(?=x)", "maxLength": 3},
                "tree": {"$ref": "#/$defs/Node"}},
            "required": ["tags", "code"]});
        assert!(matches!(parse(&s), Err(Error::Unsupported(_))));
        let (schema, relaxed) = parse_loose(&s, "response_format json_schema", "schema").unwrap();
        for at in [
            "schema.minProperties",
            "schema.additionalProperties",
            "schema.properties.tags.uniqueItems",
            "schema.properties.code.pattern",
            "schema.properties.tree.$ref.properties.kids.items.$ref",
        ] {
            assert!(
                relaxed.iter().any(|r| r.contains(&format!("`{at}`"))),
                "{at}: {relaxed:?}"
            );
        }
        assert_eq!(relaxed.len(), 5, "{relaxed:?}");
        let ok = |t: &str| {
            let mut p = JsonPrefix::new(schema.clone());
            p.feed(t.as_bytes()) && p.is_complete()
        };
        assert!(ok(r#"{"tags": ["a", "a"], "code": "abc"}"#));
        assert!(ok(
            r#"{"code": "", "tags": [], "tree": {"v": 1, "kids": [{"kids": [7]}]}}"#
        ));
        for bad in [
            r#"{"tags": [1], "code": "a"}"#,
            r#"{"tags": [], "code": "abcd"}"#,
            r#"{"tags": [], "code": "a", "x": 1}"#,
            r#"{"tags": []}"#,
        ] {
            assert!(!ok(bad), "{bad}");
        }
    }

    /// Pydantic's `set[Color]` of an `Enum`: `uniqueItems` over a string enum; a value once
    /// written is not offered again, and the array goes on only while one is left.
    #[test]
    fn unique_items_of_a_string_enum_are_distinct() {
        let s = json!({"type": "object", "properties": {"c": {"type": "array",
            "items": {"enum": ["red", "green", "blue"]}, "uniqueItems": true, "minItems": 1}}});
        for ok in [
            r#"{"c": ["red"]}"#,
            r#"{"c": ["blue", "red", "green"]}"#,
            r#"{"c": [ "green" , "red" ]}"#,
        ] {
            assert!(accepts(&s, ok), "{ok}");
        }
        for bad in [
            r#"{"c": ["red", "red"]}"#,
            r#"{"c": ["red", "green", "blue", "red"]}"#,
            r#"{"c": []}"#,
        ] {
            assert!(!accepts(&s, bad), "{bad}");
        }
        // After all three, only the close: never a `,` with nothing left to write.
        let mut p = JsonPrefix::new(parse(&s).unwrap());
        assert!(p.feed(br#"{"c": ["red", "green", "blue""#));
        assert!(p.after(b",").is_none() && p.after(b"]").is_some());
        let more = json!({"type": "object", "properties": {"c": {"type": "array",
            "items": {"enum": ["a", "b"]}, "uniqueItems": true, "minItems": 3}}});
        let e = parse(&more).unwrap_err().to_string();
        assert!(
            e.contains("properties.c.uniqueItems") && e.contains("2 values"),
            "{e}"
        );
        let any = json!({"type": "object", "properties": {"c": {"type": "array",
            "items": {"type": "integer"}, "uniqueItems": true}}});
        assert!(matches!(parse(&any), Err(Error::Unsupported(_))));
        let no = json!({"type": "object", "properties": {"c": {"type": "array",
            "items": {"type": "integer"}, "uniqueItems": false}}});
        assert!(accepts(&no, r#"{"c": [1, 1]}"#));
    }

    /// Pydantic's `Union[Cat, Dog]` without a discriminator (`anyOf` of `$ref`s): each key
    /// written keeps the branches that have it, and the object closes only as one of them.
    /// Under `oneOf` each branch must require a key the others lack.
    #[test]
    fn unions_of_objects_without_a_tag_are_told_apart_by_their_keys() {
        let defs = json!({
            "Cat": {"type": "object", "additionalProperties": false,
                "properties": {"name": {"type": "string"}, "meows": {"type": "integer"},
                    "indoor": {"type": "boolean"}},
                "required": ["name", "meows"]},
            "Dog": {"type": "object", "additionalProperties": false,
                "properties": {"name": {"type": "string"}, "barks": {"type": "number"}},
                "required": ["name", "barks"]},
            "Fish": {"type": "object", "additionalProperties": false,
                "properties": {"fins": {"type": "integer"}}}
        });
        let s = json!({"type": "object", "additionalProperties": false, "$defs": defs,
            "properties": {"pet": {"anyOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"},
                {"$ref": "#/$defs/Fish"}, {"type": "null"}]}},
            "required": ["pet"]});
        for ok in [
            r#"{"pet": {"name": "Tom", "meows": 3}}"#,
            r#"{"pet": {"barks": 1.5, "name": "Rex"}}"#,
            r#"{"pet": {"meows": 1, "indoor": true, "name": "Kit"}}"#,
            r#"{"pet": {}}"#,
            r#"{"pet": {"fins": 2}}"#,
            r#"{"pet": null}"#,
        ] {
            assert!(accepts(&s, ok), "{ok}");
        }
        for bad in [
            r#"{"pet": {"name": "Tom", "meows": 3, "barks": 1}}"#, // a cat's and a dog's keys
            r#"{"pet": {"name": "Tom"}}"#,                         // meows or barks required
            r#"{"pet": {"indoor": true, "barks": 1}}"#,
            r#"{"pet": {"name": "Tom", "fins": 1}}"#,
            r#"{"pet": {"name": 1, "meows": 3}}"#,
            r#"{"pet": {"paws": 4}}"#,
        ] {
            assert!(!accepts(&s, bad), "{bad}");
        }
        // oneOf: Cat and Dog each require a key the other lacks; Fish requires none, so a
        // Cat object could also be a Fish (were Fish to allow other keys): refused.
        let one = |branches: Value| {
            parse(&json!({"type": "object", "$defs": defs,
                "properties": {"pet": {"oneOf": branches}}}))
        };
        assert!(one(json!([{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}])).is_ok());
        let e = one(json!([{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Fish"}]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("schema.properties.pet.oneOf") && e.contains("`oneOf`"),
            "{e}"
        );
        // A union at the top level, and in an array.
        let top =
            json!({"anyOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}], "$defs": defs});
        assert!(accepts(&top, r#"{"name": "Rex", "barks": 2}"#));
        let arr = json!({"type": "object", "$defs": defs, "properties": {"l": {"type": "array",
            "items": {"anyOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}]}}}});
        assert!(accepts(
            &arr,
            r#"{"l": [{"name": "a", "meows": 1}, {"barks": 2, "name": "b"}]}"#
        ));
        assert!(!accepts(
            &arr,
            r#"{"l": [{"name": "a", "meows": 1, "barks": 2}]}"#
        ));
    }

    /// What Pydantic and zod-to-json-schema write: nested models as `$defs` behind `$ref`,
    /// optional fields as `anyOf` with null, `allOf` around one reference, type lists.
    fn order() -> Value {
        json!({"title": "Order", "type": "object", "additionalProperties": false,
            "$defs": {
                "Item": {"title": "Item", "type": "object", "additionalProperties": false,
                    "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                    "required": ["sku", "qty"]},
                "Status": {"enum": ["open", "paid"], "type": "string"}
            },
            "properties": {
                "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}},
                "status": {"allOf": [{"$ref": "#/$defs/Status"}], "description": "state"},
                "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": null},
                "id": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
                "total": {"type": ["number", "integer", "null"]}
            },
            "required": ["items", "status", "id"]})
    }

    #[test]
    fn references_and_unions_are_read_and_enforced() {
        let s = order();
        for ok in [
            r#"{"items": [{"sku": "a", "qty": 2}], "status": "paid", "id": 7}"#,
            r#"{"items": [], "status": "open", "id": "x-1", "note": null, "total": 2.5}"#,
            r#"{"id": 1, "status": "open", "items": [], "note": "hi", "total": null}"#,
        ] {
            assert!(accepts(&s, ok), "{ok}");
        }
        for bad in [
            r#"{"items": [{"sku": "a"}], "status": "paid", "id": 7}"#, // Item.qty missing
            r#"{"items": [], "status": "due", "id": 7}"#,              // not a Status
            r#"{"items": [], "status": "open", "id": true}"#,          // neither branch
            r#"{"items": [], "status": "open", "id": 1, "note": 3}"#,  // string or null
            r#"{"items": [], "status": "open", "id": 1.5}"#,           // an integer
            r#"{"items": [], "status": "open", "id": 1, "total": "1"}"#,
        ] {
            assert!(!accepts(&s, bad), "{bad}");
        }
        let p = parse(&s).unwrap();
        let Schema::Object(props) = &*p else {
            panic!("{p:?}")
        };
        let get = |n: &str| {
            &props
                .iter()
                .find(|q| q.name == n.as_bytes())
                .unwrap()
                .schema
        };
        assert!(matches!(&**get("note"), Schema::Nullable(x) if **x == Schema::String(None)));
        assert!(matches!(&**get("id"), Schema::Union(b) if b.len() == 2));
    }

    #[test]
    fn lengths_count_characters_and_items() {
        let s = json!({"type": "object", "required": ["s", "a"], "properties": {
            "s": {"type": ["string", "null"], "minLength": 2, "maxLength": 3},
            "a": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}}});
        for ok in [
            r#"{"s": "ab", "a": [1]}"#,
            // é as UTF-8, é escaped, x: three characters.
            r#"{"s": "é\u00e9x", "a": [1, 2]}"#,
            // A surrogate pair is one character.
            r#"{"s": "\ud83d\ude00a", "a": [0]}"#,
            r#"{"s": null, "a": [0]}"#,
        ] {
            assert!(accepts(&s, ok), "{ok}");
        }
        for bad in [
            r#"{"s": "a", "a": [1]}"#,
            r#"{"s": "abcd", "a": [1]}"#,
            r#"{"s": "ab", "a": []}"#,
            r#"{"s": "ab", "a": [1, 2, 3]}"#,
        ] {
            assert!(!accepts(&s, bad), "{bad}");
        }
        // No dead ends: at the limit only the end is left.
        let mut p = JsonPrefix::new(parse(&s).unwrap());
        assert!(p.feed(br#"{"s": "abc"#));
        assert!(p.after(b"d").is_none() && p.after(b"\"").is_some());
        assert!(p.feed(br#"", "a": [1, 2"#));
        assert!(p.after(b",").is_none() && p.after(b"]").is_some());
        for (schema, want) in [
            (
                json!({"type": "integer", "maxLength": 2}),
                "length keywords",
            ),
            (
                json!({"type": "string", "minLength": 3, "maxLength": 2}),
                "minLength 3 above maxLength 2",
            ),
            (json!({"type": "array", "maxItems": -1}), "maxItems"),
        ] {
            let whole = json!({"type": "object", "properties": {"x": schema}});
            let e = parse(&whole).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("schema.properties.x"), "{e}");
        }
    }

    /// Random texts grown along the automaton's accepted paths under a schema: every one it
    /// calls complete parses (serde_json) and follows the schema (checked here directly).
    #[test]
    fn complete_texts_follow_the_schema_on_random_walks() {
        let s = person();
        let schema = parse(&s).unwrap();
        let alphabet: Vec<u8> = b"{}[]:,\" -.0123456789eEtrufalsn\\u"
            .iter()
            .copied()
            .chain(b"nameagheightroldmiusrtgscyPx".iter().copied())
            .collect();
        let mut rng = crate::fuzz::mutate::Rng::new(11);
        let mut complete = 0;
        for _ in 0..5_000 {
            let Walk::Complete(text) = random_text(schema.clone(), &alphabet, 200, &mut rng) else {
                continue;
            };
            complete += 1;
            let v: serde_json::Map<String, Value> = serde_json::from_slice(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(&text)));
            for k in ["name", "age", "role"] {
                assert!(v.contains_key(k), "{v:?}");
            }
            // An integer (JSON Schema's: no fraction; serde_json reads -0 as a float).
            let age = v["age"].as_f64().unwrap();
            assert!(age.fract() == 0.0 && age.abs() < 1e15, "{v:?}");
            assert!(
                ["admin", "user"].contains(&v["role"].as_str().unwrap()),
                "{v:?}"
            );
            assert!(v.keys().all(|k| s["properties"].get(k).is_some()), "{v:?}");
        }
        eprintln!("{complete} of 5000 walks complete");
        assert!(complete > 500, "{complete} complete");
    }
}
