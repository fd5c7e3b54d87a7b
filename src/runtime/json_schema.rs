//! `response_format: { type: "json_schema", json_schema: { schema } }`: the subset of JSON
//! Schema that JSON mode's automaton (`json_mode::JsonPrefix`) enforces while the answer is
//! written, which is what OpenAI's strict structured outputs use: `type` (one, or one with
//! `"null"`), objects' `properties` / `required` / `additionalProperties: false`, arrays'
//! `items`, strings' `enum` / `const`. Annotations (`title`, `description`, ...) are read and
//! ignored; any other keyword is `Unsupported`, named with where it is, never silently ignored.

use crate::error::{Error, Result};
use crate::runtime::json_mode::{Property, Schema, MAX_DEPTH, MAX_PROPERTIES};
use serde_json::Value;
use std::sync::Arc;

/// Keywords that describe and do not constrain.
const ANNOTATIONS: [&str; 7] = [
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

/// `parse` for the request's `field`, whose schema is at `path` (named in errors): a
/// function's parameters are `parse_at(v, "tools", "tools[0].function.parameters")`.
pub fn parse_at(v: &Value, field: &str, path: &str) -> Result<Arc<Schema>> {
    let s = node(field, v, path, 0)?;
    match *s {
        Schema::Object(_) | Schema::AnyObject => Ok(s),
        _ => Err(unsupported(field, path, "a top level other than an object")),
    }
}

fn unsupported(field: &str, path: &str, what: &str) -> Error {
    Error::Unsupported(format!(
        "chat request: {field}: {what} at `{path}` is not supported (see js/API.md)"
    ))
}

fn bad(field: &str, path: &str, what: &str) -> Error {
    Error::input(format!("chat request: {field}: `{path}` {what}"))
}

/// A string's JSON text between its quotes.
fn json_text(s: &str) -> Vec<u8> {
    let quoted = serde_json::to_string(s).expect("a string serializes");
    quoted.as_bytes()[1..quoted.len() - 1].to_vec()
}

fn node(f: &str, v: &Value, path: &str, depth: usize) -> Result<Arc<Schema>> {
    if depth > MAX_DEPTH {
        return Err(unsupported(f, path, "nesting deeper than 32"));
    }
    let o = match v {
        Value::Bool(true) => return Ok(Arc::new(Schema::Any)),
        Value::Object(o) => o,
        _ => return Err(bad(f, path, "must be a schema object")),
    };
    const OWN: [&str; 7] = [
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "enum",
        "const",
    ];
    if let Some(k) = o
        .keys()
        .find(|k| !OWN.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()))
    {
        return Err(unsupported(
            f,
            &format!("{path}.{k}"),
            &format!("keyword `{k}`"),
        ));
    }
    let (ty, nullable) = match o.get("type") {
        None => (None, false),
        Some(Value::String(t)) => (Some(t.as_str()), false),
        Some(Value::Array(ts)) => {
            let names: Vec<&str> = ts.iter().filter_map(Value::as_str).collect();
            let other: Vec<&str> = names.iter().copied().filter(|t| *t != "null").collect();
            match (names.len() == ts.len(), other.as_slice()) {
                (true, [t]) if names.len() == 2 => (Some(*t), true),
                (true, [t]) => (Some(*t), false),
                _ => {
                    return Err(unsupported(
                        f,
                        path,
                        "a `type` list other than [T, \"null\"]",
                    ))
                }
            }
        }
        Some(_) => {
            return Err(bad(
                f,
                &format!("{path}.type"),
                "must be a string or a list",
            ))
        }
    };
    let strings = strings_of(f, o, path)?;
    let s = match (ty, strings) {
        (None | Some("string"), Some(values)) => Schema::String(Some(values)),
        (Some(t), Some(_)) => {
            return Err(unsupported(
                f,
                path,
                &format!("`enum` or `const` of type `{t}`"),
            ))
        }
        (None, None) => Schema::Any,
        (Some("string"), None) => Schema::String(None),
        (Some("number"), None) => Schema::Number { integer: false },
        (Some("integer"), None) => Schema::Number { integer: true },
        (Some("boolean"), None) => Schema::Boolean,
        (Some("null"), None) => Schema::Null,
        (Some("array"), None) => Schema::Array(match o.get("items") {
            None => Arc::new(Schema::Any),
            Some(i) => node(f, i, &format!("{path}.items"), depth + 1)?,
        }),
        (Some("object"), None) => object(f, o, path, depth)?,
        (Some(t), None) => {
            return Err(bad(
                f,
                &format!("{path}.type"),
                &format!("`{t}` is not a type"),
            ))
        }
    };
    let s = Arc::new(s);
    Ok(if nullable {
        Arc::new(Schema::Nullable(s))
    } else {
        s
    })
}

/// `enum` (strings only) or `const` (a string) as JSON texts.
fn strings_of(
    f: &str,
    o: &serde_json::Map<String, Value>,
    path: &str,
) -> Result<Option<Vec<Vec<u8>>>> {
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
    list.iter()
        .map(|v| {
            v.as_str().map(json_text).ok_or_else(|| {
                unsupported(f, path, "an `enum` or `const` value other than a string")
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn object(f: &str, o: &serde_json::Map<String, Value>, path: &str, depth: usize) -> Result<Schema> {
    match o.get("additionalProperties") {
        None | Some(Value::Bool(false)) => {}
        Some(_) => {
            return Err(unsupported(
                f,
                &format!("{path}.additionalProperties"),
                "additional properties (only `false`)",
            ))
        }
    }
    let Some(props) = o.get("properties") else {
        return Ok(Schema::AnyObject);
    };
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
        Schema::Array(item) | Schema::Nullable(item) => string_bytes(item, out),
        Schema::String(Some(values)) => values.iter().for_each(|v| out.extend_from_slice(v)),
        Schema::ToolCall(fns) => {
            out.extend_from_slice(b"namearguments");
            for (name, params) in fns.iter() {
                out.extend_from_slice(name);
                string_bytes(params, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::json_mode::JsonPrefix;
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
                json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}}),
                "schema.properties.a.pattern",
            ),
            (json!({"type": "array"}), "top level"),
            (
                json!({"type": "object", "additionalProperties": true}),
                "additionalProperties",
            ),
            (json!({"anyOf": []}), "schema.anyOf"),
            (
                json!({"type": "object", "properties": {"a": {"type": ["string", "integer"]}}}),
                "`type` list",
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
            let mut p = JsonPrefix::new(schema.clone());
            let mut text = Vec::new();
            for _ in 0..200 {
                let opts: Vec<u8> = alphabet
                    .iter()
                    .copied()
                    .filter(|&b| p.after(&[b]).is_some())
                    .collect();
                if opts.is_empty() {
                    break;
                }
                let b = opts[rng.below(opts.len())];
                p.feed(&[b]);
                text.push(b);
                if p.is_complete() {
                    break;
                }
            }
            if !p.is_complete() {
                continue;
            }
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
