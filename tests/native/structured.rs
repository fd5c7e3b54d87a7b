//! Structured output and tool calls against an independent validator (lengths counted in
//! code points, escapes and surrogate pairs included): texts the automaton
//! (`runtime::json_mode::JsonPrefix`) calls complete, grown at random along the bytes it
//! accepts, are validated by Python's `jsonschema` (tests/reference/json_schema_validate.py)
//! against the very schema the request sent: every one must be valid, and no walk may reach
//! a prefix the automaton accepts but cannot continue.

use crate::common::python_has;
use flexquant::fuzz::mutate::Rng;
use flexquant::runtime::json_mode::{random_text, Schema, Walk};
use flexquant::runtime::json_schema;
use flexquant::runtime::tools::Tools;
use serde_json::{json, Value};
use std::sync::Arc;

/// Up to `walks` random texts that `schema` calls complete (`json_mode::random_text`, at most
/// 400 bytes each); a walk that reaches a dead end fails the test (every prefix the automaton
/// accepts must go on).
fn complete_texts(schema: Arc<Schema>, alphabet: &[u8], walks: usize, seed: u64) -> Vec<String> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for _ in 0..walks {
        match random_text(schema.clone(), alphabet, 400, &mut rng) {
            Walk::Complete(t) => out.push(String::from_utf8(t).unwrap()),
            Walk::Cut => {}
            Walk::DeadEnd(t) => panic!("a dead end after {:?}", String::from_utf8_lossy(&t)),
        }
    }
    out
}

/// The complete texts of 3,000 walks (`complete_texts`), of which there must be 150 or more.
fn walked(name: &str, schema: Arc<Schema>, alphabet: &[u8], seed: u64) -> Vec<String> {
    let texts = complete_texts(schema, alphabet, 3000, seed);
    eprintln!(
        "{name}: {} complete texts of 3000 walks, e.g. {}",
        texts.len(),
        texts[0]
    );
    assert!(texts.len() >= 150, "{name}: {} complete", texts.len());
    texts
}

/// Every text valid against its schema for Python's `jsonschema`.
fn all_valid(cases: &[(Value, Vec<String>)]) {
    let verdicts = validate(cases);
    for ((schema, texts), v) in cases.iter().zip(&verdicts) {
        assert_eq!(texts.len(), v.len());
        for (t, e) in texts.iter().zip(v) {
            assert!(e.is_none(), "{t}\n{}\n{schema}", e.as_deref().unwrap_or(""));
        }
    }
}

/// Python's verdict on each text: `None` when valid, else its first error.
fn validate(cases: &[(Value, Vec<String>)]) -> Vec<Vec<Option<String>>> {
    let input: Vec<Value> = cases
        .iter()
        .map(|(schema, texts)| json!({"schema": schema, "texts": texts}))
        .collect();
    crate::common::python_json("json_schema_validate.py", &input)
}

/// Schemas as apps send them: Pydantic's nested models (`$defs`, `$ref`, `allOf`, `anyOf`
/// with null), a type list, `oneOf`, enums, arrays, and a function call's two functions.
fn schemas() -> Vec<(&'static str, Value, Arc<Schema>)> {
    let order = json!({"type": "object", "additionalProperties": false,
        "$defs": {
            "Item": {"type": "object", "additionalProperties": false,
                "properties": {"s": {"type": "string"}, "q": {"type": "integer"}},
                "required": ["s", "q"]},
            "Status": {"enum": ["open", "paid"], "type": "string"}
        },
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}},
            "st": {"allOf": [{"$ref": "#/$defs/Status"}]},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "id": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
            "t": {"type": ["number", "null"]}
        },
        "required": ["items", "st", "id"]});
    let person = json!({"type": "object", "additionalProperties": false,
        "properties": {"n": {"type": "string", "minLength": 1, "maxLength": 4},
            "a": {"type": ["integer", "null"]},
            "r": {"enum": ["x", "yy"]},
            "f": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 2},
            "o": {"type": "object", "properties": {"c": {"type": "boolean"}}, "required": ["c"],
                "additionalProperties": false}},
        "required": ["n", "a", "r"]});
    let tools = json!([
        {"type": "function", "function": {"name": "w", "parameters": {"type": "object",
            "properties": {"u": {"enum": ["c", "f"]}, "d": {"type": ["integer", "null"]}},
            "required": ["u"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "t", "parameters": {"type": "object",
            "properties": {"z": {"type": "array", "items": {"type": "boolean"}}},
            "additionalProperties": false}}}
    ]);
    // The call as a schema of its own: either function's name with its arguments.
    let call = json!({"oneOf": tools.as_array().unwrap().iter().map(|t| json!({
        "type": "object", "additionalProperties": false, "required": ["name", "arguments"],
        "properties": {"name": {"const": t["function"]["name"]},
            "arguments": t["function"]["parameters"]}})).collect::<Vec<_>>()});
    let call_schema = Tools::parse(Some(&tools), Some(&json!("required")))
        .unwrap()
        .unwrap()
        .call_schema();
    // Bounds reached often: short arrays of short strings.
    let lists = json!({"type": "object", "additionalProperties": false, "required": ["l", "m"],
        "properties": {
            "l": {"type": "array", "items": {"type": "integer"}, "maxItems": 2},
            "m": {"type": "array", "minItems": 2, "maxItems": 3,
                "items": {"type": "string", "minLength": 1, "maxLength": 2}}}});
    vec![
        ("lists", lists.clone(), json_schema::parse(&lists).unwrap()),
        ("order", order.clone(), json_schema::parse(&order).unwrap()),
        (
            "person",
            person.clone(),
            json_schema::parse(&person).unwrap(),
        ),
        ("tool call", call, call_schema),
    ]
}

#[test]
fn texts_the_automaton_completes_are_valid_for_python_jsonschema() {
    if !python_has("jsonschema, rfc3339_validator, fqdn, isoduration, rfc3986_validator") {
        return;
    }
    // JSON's bytes and the letters of the schemas' names; few, so that free strings end.
    let alphabet = b"{}[]:,\" -.019eacdfgilmnopqrstuwxyz\\";
    let mut cases = Vec::new();
    for (i, (name, schema, parsed)) in schemas().into_iter().enumerate() {
        let texts = walked(name, parsed, alphabet, 90 + i as u64);
        cases.push((schema, texts));
    }
    // The random calls also stream (`HeldCall`) into what `ToolCall::parse` reads.
    let calls = &cases.last().unwrap().1;
    calls
        .iter()
        .for_each(|t| flexquant::fuzz::targets::streamed_call_adds_up(t));
    all_valid(&cases);
}

/// Numbers' bounds, patterns, formats, enums of any values, sets of enum values, unions of
/// objects told apart by a tag or by their keys, and maps: the same check, over an alphabet that can write dates, addresses and identifiers.
#[test]
fn bounded_numbers_patterns_and_formats_are_valid_for_python_jsonschema() {
    if !python_has("jsonschema, rfc3339_validator, fqdn, isoduration, rfc3986_validator") {
        return;
    }
    let values = json!({"type": "object", "additionalProperties": false,
        "properties": {
            "n": {"type": "integer", "minimum": -30, "exclusiveMaximum": 1000, "multipleOf": 3},
            "x": {"type": ["number", "null"], "exclusiveMinimum": -2.5, "maximum": 0.75},
            "p": {"type": "string", "pattern": "^[A-C]{2}-[0-9]{1,3}$"},
            "q": {"type": "string", "pattern": "b[0-9]"},
            "s": {"type": "string", "pattern": "^[a-c]+$", "minLength": 2, "maxLength": 4},
            "m": {"type": "string", "format": "email", "maxLength": 12},
            "e": {"enum": [1, 2.5, true, null, "a", [1, {"k": "v"}]]},
            "l": {"type": "array", "items": {"type": "integer", "maximum": -1}, "maxItems": 3},
            "c": {"type": "array", "items": {"enum": ["ab", "ba", "c"]}, "uniqueItems": true,
                "minItems": 1}
        },
        "required": ["n", "x", "p", "e", "c"]});
    let formats = json!({"type": "object", "additionalProperties": false,
        "properties": {
            "d": {"type": "string", "format": "date"},
            "t": {"type": "string", "format": "date-time"},
            "h": {"type": "string", "format": "time"},
            "u": {"type": "string", "format": "uuid"},
            "i": {"type": "string", "format": "ipv4"},
            "m": {"type": "string", "format": "email"},
            "a": {"type": "string", "format": "hostname"},
            "v": {"type": "string", "format": "ipv6"},
            "r": {"type": "string", "format": "duration"},
            "w": {"type": "string", "format": "uri", "minLength": 1, "maxLength": 40}
        },
        "required": ["d", "t"]});
    // A discriminated union (Pydantic's shape), also as array items beside null.
    let pets = json!({"type": "object", "additionalProperties": false,
        "$defs": {
            "C": {"type": "object", "additionalProperties": false, "required": ["t", "m"],
                "properties": {"t": {"const": "cat"}, "m": {"type": "integer", "minimum": 0}}},
            "D": {"type": "object", "additionalProperties": false, "required": ["t"],
                "properties": {"t": {"enum": ["dab", "dad"]}, "n": {"type": "string", "maxLength": 2}}},
            "P": {"type": "object", "additionalProperties": false, "required": ["k", "m"],
                "properties": {"k": {"type": "string", "maxLength": 3}, "m": {"type": "integer"}}},
            "Q": {"type": "object", "additionalProperties": false, "required": ["b"],
                "properties": {"k": {"type": "string", "maxLength": 3}, "b": {"type": "boolean"},
                    "n": {"type": "null"}}}
        },
        "properties": {
            "p": {"oneOf": [{"$ref": "#/$defs/C"}, {"$ref": "#/$defs/D"}],
                "discriminator": {"propertyName": "t"}},
            "l": {"type": "array", "maxItems": 3,
                "items": {"anyOf": [{"$ref": "#/$defs/C"}, {"$ref": "#/$defs/D"}, {"type": "null"}]}},
            "x": {"type": "object", "additionalProperties": {"type": "integer", "maximum": 9}},
            "u": {"anyOf": [{"$ref": "#/$defs/P"}, {"$ref": "#/$defs/Q"}]},
            "w": {"type": "array", "maxItems": 2,
                "items": {"oneOf": [{"$ref": "#/$defs/P"}, {"$ref": "#/$defs/Q"}]}}
        },
        "required": ["p", "l", "u"]});
    let alphabet = b"{}[]:,\" -+.0123456789TZ@ABCDHMPSWYabcdefhiklmnpqrstuvwx/?#%\\";
    let mut cases = Vec::new();
    let all = [("values", values), ("formats", formats), ("pets", pets)];
    for (i, (name, schema)) in all.into_iter().enumerate() {
        let parsed = json_schema::parse(&schema).unwrap();
        let texts = walked(name, parsed, alphabet, 190 + i as u64);
        cases.push((schema, texts));
    }
    // Every format was written by some walk (a value of each key, not only the required ones).
    let formats = &cases[1].1;
    for key in ["d", "t", "h", "u", "i", "m", "a", "v", "r", "w"] {
        let values: Vec<&str> = formats
            .iter()
            .filter_map(|t| {
                serde_json::from_str::<Value>(t)
                    .ok()?
                    .get(key)?
                    .as_str()
                    .map(|_| t.as_str())
            })
            .collect();
        eprintln!(
            "formats.{key}: {} texts, e.g. {}",
            values.len(),
            values.first().unwrap_or(&"-")
        );
        assert!(values.len() >= 5, "formats.{key}: {} texts", values.len());
    }
    // Both branches of the untagged union were written.
    for key in ["m", "b"] {
        let n = cases[2]
            .1
            .iter()
            .filter(|t| serde_json::from_str::<Value>(t).is_ok_and(|v| v["u"].get(key).is_some()))
            .count();
        assert!(n >= 5, "u.{key}: {n} texts");
    }
    all_valid(&cases);
}
