//! The fuzz targets: every reader of untrusted input, each as `bytes -> Result`, driven past
//! parsing into what a successful parse enables (a manifest's steps and moves, a tokenizer's
//! encode and decode, a tensor's dequantization), since that is where a lie that slipped through
//! validation would panic.
//!
//! Inputs that need more than one part (a shard with its shape, a base with its config) are
//! framed: each part but the last is a little-endian u32 length and its bytes.

use crate::ensemble::base::{base_bytes, Base};
use crate::ensemble::format::{PackedMatrix, PackedShape};
use crate::ensemble::manifest::Manifest;
use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;

/// A target's function: `Err` is a clean rejection, a panic is a bug.
pub type RunFn = Box<dyn Fn(&[u8]) -> Result<()> + Send + Sync>;

/// One target: its name (also the name its errors must carry), whether its input is JSON (so
/// the mutator edits the parsed tree), and the function.
pub struct Target {
    pub name: &'static str,
    /// File or field names: every error message of this target must contain one.
    pub names: &'static [&'static str],
    pub json: bool,
    pub run: RunFn,
}

/// Parts framed as `[len u32][part]... [last part]`.
pub fn frame(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i + 1 < parts.len() {
            out.extend((p.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(p);
    }
    out
}

/// The `n` parts of a framed input (an error naming `what` if the frame is broken).
pub fn unframe<'a>(what: &str, mut b: &'a [u8], n: usize) -> Result<Vec<&'a [u8]>> {
    let mut parts = Vec::with_capacity(n);
    for _ in 1..n {
        let len = b
            .get(..4)
            .map(|l| u32::from_le_bytes(l.try_into().unwrap()) as usize)
            .filter(|&l| l <= b.len() - 4)
            .ok_or_else(|| Error::format(what, "fuzz frame: a part's length is out of range"))?;
        parts.push(&b[4..4 + len]);
        b = &b[4 + len..];
    }
    parts.push(b);
    Ok(parts)
}

fn u32_at(b: &[u8], i: usize) -> usize {
    u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()) as usize
}

/// The manifest reader and validation, then every query the runtime makes of a valid manifest.
pub fn manifest(b: &[u8]) -> Result<()> {
    let m = Manifest::from_bytes("manifest.json", b)?;
    let last = m.trajectory.len() - 1;
    for step in [0, last / 2, last] {
        std::hint::black_box(m.step_versions(step));
    }
    std::hint::black_box((m.moves(0, last), m.moves(last, 0), m.storage_bytes()));
    Ok(())
}

/// A module shard: `[rows, cols, bits, group as u32 LE][body]`, parsed, then dequantized.
pub fn shard(b: &[u8]) -> Result<()> {
    let what = "shard.bin";
    if b.len() < 16 {
        return Err(Error::format(what, "fuzz frame: no shape header"));
    }
    let shape = PackedShape::new(
        u32_at(b, 0),
        u32_at(b, 1),
        u32_at(b, 2) as u32,
        u32_at(b, 3),
    )
    .map_err(|e| Error::format(what, e))?;
    let m = PackedMatrix::from_bytes(shape, &b[16..], what)?;
    std::hint::black_box(m.dequantize());
    Ok(())
}

/// A bit-plane file (`ensemble::planes`): `[rows, cols, group, n, level_1 .. level_n as u32
/// LE][body]`; every level decoded from the body (and from its prefix alone), then dequantized.
pub fn planes(b: &[u8]) -> Result<()> {
    use crate::ensemble::planes::{decode_level, PlaneShape};
    let what = "planes.bin";
    let n = if b.len() >= 16 { u32_at(b, 3) } else { 0 };
    if b.len() < 16 || n > 8 || b.len() < 16 + 4 * n {
        return Err(Error::format(what, "fuzz frame: no shape header"));
    }
    let levels: Vec<u32> = (0..n).map(|i| u32_at(b, 4 + i) as u32).collect();
    let shape = PlaneShape::new(u32_at(b, 0), u32_at(b, 1), u32_at(b, 2), &levels)
        .map_err(|e| Error::format(what, e))?;
    let body = &b[16 + 4 * n..];
    for &k in &levels {
        let m = decode_level(&shape, body, k, what)?;
        let prefix = shape.prefix_bytes(k)?;
        if decode_level(&shape, &body[..prefix], k, what)? != m {
            return Err(Error::format(
                what,
                "a level decodes differently from its prefix",
            ));
        }
        std::hint::black_box(m.dequantize());
    }
    Ok(())
}

/// The base shard: `[group u32][config.json][base.bin]` (framed), parsed against the config.
pub fn base(b: &[u8]) -> Result<()> {
    let what = "base.bin";
    let p = unframe(what, b, 3)?;
    let group = p[0].get(..4).map_or(0, |g| u32_at(g, 0));
    let config = LlamaConfig::from_json("base.bin: config", p[1])?;
    base_bytes(&config, group).map_err(|e| Error::format(what, e))?;
    let base = Base::from_bytes(&config, group, p[2], what)?;
    std::hint::black_box(base.to_bytes());
    Ok(())
}

#[cfg(not(target_arch = "wasm32"))]
pub use native::*;

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use super::*;
    use crate::model::gguf::Gguf;
    use crate::model::load::{load_gguf, weights_from_hf_bytes};
    use crate::model::tokenizer::{StreamDecoder, Tokenizer};
    use crate::runtime::request::ChatRequest;
    use std::path::PathBuf;

    /// Text with what tokenizers trip on: specials, multi-byte characters, digits, controls.
    const SAMPLE: &str = "<|im_start|>user\nHello, wörld! 12345 \u{1F600}\t\r\n<|im_end|>";

    fn exercise(t: &Tokenizer) -> Result<()> {
        let ids = t.encode(SAMPLE)?;
        t.decode(&ids, false)?;
        let mut d = StreamDecoder::default();
        for &id in &ids {
            d.step(t, id)?;
        }
        Ok(())
    }

    /// A GGUF file: the reader, the config, the tokenizer built from its arrays, every
    /// tensor's dequantization, and the whole model load.
    pub fn gguf(b: &[u8]) -> Result<()> {
        let g = Gguf::from_bytes("model.gguf", b.to_vec())?;
        for t in &g.tensors {
            std::hint::black_box(g.dequantize(t));
        }
        match load_gguf(&g) {
            Ok(m) => exercise(&m.tokenizer),
            Err(e) => {
                // The tokenizer on its own too: a bad config must not hide a tokenizer bug.
                if let Ok(t) = Tokenizer::from_gguf(&g) {
                    exercise(&t)?;
                }
                Err(e)
            }
        }
    }

    /// A `tokenizer.json` (what an ensemble ships), then encode, decode and stream-decode.
    pub fn tokenizer_json(b: &[u8]) -> Result<()> {
        let t = Tokenizer::from_json_bytes("tokenizer.json", b, Some(1), None, None)?;
        exercise(&t)
    }

    /// A Hugging Face checkpoint: `[config.json][model.safetensors]` (framed).
    pub fn safetensors(b: &[u8]) -> Result<()> {
        let p = unframe("model.safetensors", b, 2)?;
        let files = vec![(PathBuf::from("model.safetensors"), p[1].to_vec())];
        weights_from_hf_bytes("config.json", p[0], files).map(|_| ())
    }

    /// A chat request as the JS API receives it, then its prompt rendered with the model's chat
    /// template (and its tools) and tokenized, and its tool-call constraint made.
    pub fn request(tok: &Tokenizer, b: &[u8]) -> Result<()> {
        let (r, _, _) = ChatRequest::from_json(b)?;
        let tools = r.tools()?;
        let prompt = tools.as_ref().and_then(|t| t.prompt());
        tok.encode(&tok.chat.render_with_tools(&r.messages, prompt)?)?;
        if let Some(c) = tools.and_then(|t| t.constraint(tok.token_bytes())) {
            c.watched();
        }
        Ok(())
    }
}

/// A text the automaton accepted (`fed`) and that is not complete goes on with some byte (a
/// dead end would leave generation with no token to draw).
fn no_dead_end(fed: bool, p: &crate::runtime::json_mode::JsonPrefix) {
    if fed && !p.is_complete() {
        assert!(
            (0..=255u8).any(|x| p.after(&[x]).is_some()),
            "a prefix the automaton accepted cannot go on"
        );
    }
}

/// JSON mode's automaton (`runtime::json_mode::JsonPrefix`) on any bytes: it must never call
/// a text a whole JSON object that serde_json does not parse as one (a panic otherwise: the
/// runner records it as a crash).
pub fn json_mode(b: &[u8]) -> Result<()> {
    let mut p = crate::runtime::json_mode::JsonPrefix::default();
    let fed = p.feed(b);
    no_dead_end(fed, &p);
    if fed && p.is_complete() {
        if let Err(e) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(b) {
            panic!("JSON mode accepted what serde_json rejects ({e})");
        }
    }
    Ok(())
}

/// The schema of the `structured` target: bounded numbers, patterns, formats and an enum of
/// any values (`runtime::json_number`, `runtime::json_pattern`).
pub fn fuzz_structured_schema() -> serde_json::Value {
    serde_json::json!({"type": "object", "additionalProperties": false,
        "properties": {
            "n": {"type": "integer", "minimum": -30, "exclusiveMaximum": 1000, "multipleOf": 3},
            "x": {"type": ["number", "null"], "exclusiveMinimum": -2.5, "maximum": 0.75},
            "p": {"type": "string", "pattern": "^[A-C]{2}-[0-9]{1,3}$"},
            "d": {"type": "string", "format": "date"},
            "e": {"enum": [1, 2.5, true, null, "a", [1, {"k": "v"}]]},
            "s": {"type": "string", "pattern": "b", "minLength": 2, "maxLength": 3},
            "u": {"anyOf": [
                {"type": "object", "additionalProperties": false, "required": ["k", "m"],
                    "properties": {"k": {"type": "integer"}, "m": {"type": "boolean"}}},
                {"type": "object", "additionalProperties": false, "required": ["q"],
                    "properties": {"k": {"type": "integer"}, "q": {"type": "null"}}}]},
            "c": {"type": "array", "items": {"enum": ["x", "y", "xy"]}, "uniqueItems": true}
        },
        "required": ["n", "x", "p", "d", "e", "s"]})
}

/// Structured output's automaton under `fuzz_structured_schema` on any bytes: no dead end, and
/// a text it calls whole parses with the schema's keys, its numbers within their bounds, its
/// code and date of their shapes, `s` of 2-3 characters with a `b`, `e` one of the enum's
/// values, `u`, if written, an object of one of its union's branches and `c` distinct values.
pub fn structured(b: &[u8]) -> Result<()> {
    thread_local!(static SCHEMA: std::sync::Arc<crate::runtime::json_mode::Schema> =
        crate::runtime::json_schema::parse(&fuzz_structured_schema()).expect("it parses"));
    let mut p = crate::runtime::json_mode::JsonPrefix::new(SCHEMA.with(|s| s.clone()));
    let fed = p.feed(b);
    no_dead_end(fed, &p);
    if !(fed && p.is_complete()) {
        return Ok(());
    }
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(b)
        .unwrap_or_else(|e| panic!("structured output serde_json rejects ({e})"));
    let optional = ["u", "c"].iter().filter(|k| v.contains_key(**k)).count();
    assert_eq!(v.len(), 6 + optional, "{v:?}");
    if let Some(c) = v.get("c") {
        let c: Vec<&str> = c
            .as_array()
            .expect("c a list")
            .iter()
            .map(|x| x.as_str().expect("c of strings"))
            .collect();
        assert!(c.iter().all(|x| ["x", "y", "xy"].contains(x)), "c {c:?}");
        assert!(
            c.iter().enumerate().all(|(i, x)| !c[..i].contains(x)),
            "c {c:?}"
        );
    }
    if let Some(u) = v.get("u") {
        let u = u.as_object().expect("u an object");
        let keys = |ks: &[&str]| u.keys().all(|k| ks.contains(&k.as_str()));
        let first = keys(&["k", "m"]) && u["m"].is_boolean();
        let second = keys(&["k", "q"]) && u.get("q").is_some_and(|q| q.is_null());
        assert!(first || second, "u {u:?}");
        assert!(
            u.get("k").is_none_or(|k| k.is_i64() || k.is_u64()),
            "u {u:?}"
        );
    }
    let short = v["s"].as_str().expect("s a string");
    let chars = short.chars().count();
    assert!(
        (2..=3).contains(&chars) && short.contains('b'),
        "s {short:?}"
    );
    let n = v["n"].as_f64().expect("n a number");
    assert!(
        n.fract() == 0.0 && (-30.0..1000.0).contains(&n) && n % 3.0 == 0.0,
        "n {n}"
    );
    if let Some(x) = v["x"].as_f64() {
        assert!(x > -2.5 && x <= 0.75, "x {x}");
    } else {
        assert!(v["x"].is_null(), "x {:?}", v["x"]);
    }
    let code = v["p"].as_str().expect("p a string").as_bytes();
    let digits = code.len().saturating_sub(3);
    assert!(
        (1..=3).contains(&digits)
            && code[..2].iter().all(|c| (b'A'..=b'C').contains(c))
            && code[2] == b'-'
            && code[3..].iter().all(u8::is_ascii_digit),
        "p {code:?}"
    );
    let d: Vec<u32> = v["d"]
        .as_str()
        .expect("d a string")
        .split('-')
        .map(|x| x.parse().expect("d of numbers"))
        .collect();
    let days = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    assert!(
        d.len() == 3 && (1000..=9999).contains(&d[0]) && (1..=12).contains(&d[1]),
        "d {d:?}"
    );
    assert!((1..=days[d[1] as usize - 1]).contains(&d[2]), "d {d:?}");
    let e = serde_json::json!([1, 2.5, true, null, "a", [1, {"k": "v"}]]);
    assert!(e.as_array().unwrap().contains(&v["e"]), "e {:?}", v["e"]);
    Ok(())
}

/// The functions of the `tool_call` target.
pub fn fuzz_tools() -> crate::runtime::tools::Tools {
    let tools = serde_json::json!([
        {"type": "function", "function": {"name": "w", "parameters": {"type": "object",
            "properties": {"u": {"enum": ["c", "f"]}, "d": {"type": ["integer", "null"]}},
            "required": ["u"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "t", "parameters": {"type": "object",
            "properties": {"z": {"type": "array", "items": {"type": "boolean"}}}}}}
    ]);
    crate::runtime::tools::Tools::parse(Some(&tools), None)
        .expect("the fuzz tools parse")
        .expect("two tools")
}

/// A tool call's automaton (`Schema::ToolCall`) on any bytes: a text it calls a whole call
/// must parse, name one of the functions first and hold that function's arguments (a panic
/// otherwise).
pub fn tool_call(b: &[u8]) -> Result<()> {
    thread_local!(static SCHEMA: std::sync::Arc<crate::runtime::json_mode::Schema> =
        fuzz_tools().call_schema());
    let mut p = crate::runtime::json_mode::JsonPrefix::new(SCHEMA.with(|s| s.clone()));
    let fed = p.feed(b);
    no_dead_end(fed, &p);
    if !(fed && p.is_complete()) {
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_slice(b)
        .unwrap_or_else(|e| panic!("a tool call serde_json rejects ({e})"));
    let o = v.as_object().expect("an object");
    let keys: Vec<&str> = o.keys().map(String::as_str).collect();
    assert!(keys.len() == 2 && keys.contains(&"name"), "keys {keys:?}");
    let text = String::from_utf8_lossy(b);
    assert!(
        text.find("\"name\"") < text.find("\"arguments\""),
        "arguments first"
    );
    streamed_call_adds_up(&text);
    let args = v["arguments"].as_object().expect("arguments are an object");
    match v["name"].as_str() {
        Some("w") => {
            assert!(matches!(
                args.get("u").and_then(|u| u.as_str()),
                Some("c" | "f")
            ));
            assert!(args.keys().all(|k| k == "u" || k == "d"), "{args:?}");
            // An integer in JSON Schema's sense (serde_json reads -0 as a float).
            let whole = |d: &serde_json::Value| d.as_f64().is_some_and(|f| f.fract() == 0.0);
            assert!(
                args.get("d").is_none_or(|d| d.is_null() || whole(d)),
                "{args:?}"
            );
        }
        Some("t") => {
            let z = args
                .get("z")
                .map_or(&[][..], |z| z.as_array().expect("z a list"));
            assert!(
                z.iter().all(|x| x.is_boolean()) && args.len() <= 1,
                "{args:?}"
            );
        }
        other => panic!("called {other:?}"),
    }
    Ok(())
}

/// An answer of up to 3 calls (`JsonConstraint::calls`, `tool_choice: 'auto'`) on any
/// bytes, one token per byte and an end-of-turn token for `0xff`: the constraint takes a
/// prefix; if that is calls, `HeldCall` reads back whole calls that each parse, name one of the
/// functions and are as many as the constraint completed; what streamed adds up to them.
pub fn tool_calls(b: &[u8]) -> Result<()> {
    use crate::runtime::json_constraint::{Lead, TokenBytes};
    use crate::runtime::tools::{CallEnd, HeldCall, ToolCall};
    thread_local!(static TABLE: std::sync::Arc<TokenBytes> = std::sync::Arc::new(
        (0..=255u8).map(|b| (b != 0xff).then(|| vec![b])).collect()));
    let mut c = TABLE
        .with(|t| fuzz_tools().constraint(t.clone()))
        .expect("auto is constrained")
        .calls(3);
    let (mut h, mut whole, mut streamed) = (HeldCall::default(), 0, Vec::<String>::new());
    // ASCII only (and the end-of-turn token): `push` takes whole characters.
    for &byte in b.iter().take_while(|&&x| x.is_ascii() || x == 0xff) {
        if !c.takes(byte as u32) {
            break;
        }
        let in_call = *c.lead() == Lead::Json;
        let done = c.advance(byte as u32);
        let piece = if byte == 0xff {
            String::new()
        } else {
            (byte as char).to_string()
        };
        if h.push(Some(c.lead()), &piece).is_some() {
            return Ok(()); // text
        }
        for d in h.stream(Some(c.lead())) {
            streamed.resize(streamed.len().max(d.index + 1), String::new());
            streamed[d.index] += &d.arguments;
        }
        // A call ends where the lead leaves JSON for what may follow a call (or the end).
        if in_call && (matches!(c.lead(), Lead::Between(_)) || done) {
            whole += 1;
        }
        if done || byte == 0xff {
            break;
        }
    }
    let lead = c.lead().clone();
    match h.finish(Some(&lead)) {
        CallEnd::Calls { calls, rest, cut } => {
            assert_eq!(calls.len(), whole, "{calls:?}");
            for d in rest {
                streamed.resize(streamed.len().max(d.index + 1), String::new());
                streamed[d.index] += &d.arguments;
            }
            assert_eq!(streamed.len(), calls.len() + cut as usize);
            for (call, args) in calls.iter().zip(&streamed) {
                assert!(["w", "t"].contains(&call.name.as_str()), "{call:?}");
                assert_eq!(&call.arguments, args);
                let v: serde_json::Value = serde_json::from_str(args).expect("arguments parse");
                assert!(v.is_object());
                let text = format!(r#"{{"name":"{}","arguments":{args}}}"#, call.name);
                assert_eq!(ToolCall::parse(&text).as_ref(), Some(call));
            }
        }
        CallEnd::Text(_) => assert_eq!(whole, 0),
    }
    Ok(())
}

/// A whole call, twice in one answer (parallel calls, apart as the automaton lets them be),
/// fed to `HeldCall` in pieces (cut every few characters, as tokens would): what `stream`
/// sends and `finish` leaves add up, call by call, to the call `ToolCall::parse` reads, each
/// name first.
pub fn streamed_call_adds_up(text: &str) {
    use crate::runtime::json_constraint::Lead;
    use crate::runtime::tools::{CallEnd, HeldCall, ToolCall};
    let json = Some(&Lead::Json);
    let whole = ToolCall::parse(text).expect("a whole call parses");
    let sep = match text.trim_start().starts_with("<tool_call>") {
        true => "</tool_call>\n",
        false => "\n",
    };
    let answer = format!("{text}{sep}{text}");
    let mut h = HeldCall::default();
    let mut streamed: [(Option<String>, String); 2] = Default::default();
    let mut add = |d: crate::runtime::tools::CallDelta| {
        let (name, args) = &mut streamed[d.index];
        assert!(name.is_none() || d.name.is_none(), "the name twice");
        assert!(
            name.is_some() || d.name.is_some(),
            "arguments before the name"
        );
        *name = name.take().or(d.name);
        *args += &d.arguments;
    };
    let cuts: Vec<usize> = answer
        .char_indices()
        .map(|(i, _)| i)
        .step_by(3)
        .chain([answer.len()])
        .collect();
    for w in cuts.windows(2) {
        assert_eq!(h.push(json, &answer[w[0]..w[1]]), None);
        h.stream(json).into_iter().for_each(&mut add);
    }
    let CallEnd::Calls { calls, rest, cut } = h.finish(json) else {
        panic!("whole calls did not finish as calls")
    };
    assert!(!cut);
    rest.into_iter().for_each(&mut add);
    assert_eq!(calls, [whole.clone(), whole.clone()]);
    for (name, args) in streamed {
        assert_eq!(name.as_deref(), Some(whole.name.as_str()));
        assert_eq!(args, whole.arguments);
        assert!(serde_json::from_str::<serde_json::Value>(&args).is_ok_and(|v| v.is_object()));
    }
}

/// Every target, by name; `tokenizer` serves the request target's prompts.
#[cfg(not(target_arch = "wasm32"))]
pub fn all(tokenizer: crate::model::tokenizer::Tokenizer) -> Vec<Target> {
    let t = |name, names, json, run: RunFn| Target {
        name,
        names,
        json,
        run,
    };
    vec![
        t("manifest", &["manifest.json"], true, Box::new(manifest)),
        t("shard", &["shard.bin"], false, Box::new(shard)),
        t("planes", &["planes.bin"], false, Box::new(planes)),
        t("base", &["base.bin"], false, Box::new(base)),
        t("gguf", &["model.gguf"], false, Box::new(gguf)),
        t(
            "tokenizer",
            &["tokenizer.json"],
            true,
            Box::new(tokenizer_json),
        ),
        t(
            "safetensors",
            &["config.json", "model.safetensors"],
            false,
            Box::new(safetensors),
        ),
        t(
            "request",
            &["chat request", "tokeniz"],
            true,
            Box::new(move |b| request(&tokenizer, b)),
        ),
        t("json_mode", &[], true, Box::new(json_mode)),
        t("tool_call", &[], true, Box::new(tool_call)),
        t("tool_calls", &[], true, Box::new(tool_calls)),
        t("structured", &[], true, Box::new(structured)),
    ]
}
