//! Regressions found by fuzzing (`./build.sh fuzz`) in the tokenizer loaders, and the
//! tokenizer files whose parts disagree: each was a panic or a file that loaded and then failed;
//! and in JSON mode's automaton and its function calls.

use flexquant::fuzz::seeds::write_gguf;
use flexquant::model::gguf::{Gguf, Value};
use flexquant::model::tokenizer::{byte_level_bpe_json, Tokenizer};

fn tiny_tokenizer_json() -> serde_json::Value {
    let tokens: Vec<String> = ["a", "b", "ab", "<|im_end|>"].map(String::from).to_vec();
    byte_level_bpe_json(&tokens, &["a b".into()], &[3], false)
}

/// Fuzzing found it: tokenizers 0.22 panics (`expect("Helper")`) on malformed JSON inside the
/// "decoder" object; the loader checks the syntax first.
#[test]
fn a_tokenizer_with_a_malformed_decoder_is_an_error_not_a_panic() {
    let good = tiny_tokenizer_json().to_string();
    Tokenizer::from_json_bytes("tokenizer.json", good.as_bytes(), None, None, None).unwrap();
    let bad = good.replace(r#""decoder":{"#, r#""decoder":{"x":tru,"#);
    assert_ne!(bad, good);
    let e = std::panic::catch_unwind(|| {
        Tokenizer::from_json_bytes("tokenizer.json", bad.as_bytes(), None, None, None)
            .err()
            .unwrap()
            .to_string()
    })
    .expect("no panic");
    assert!(
        e.starts_with("tokenizer.json") && e.contains("not JSON"),
        "{e}"
    );
}

/// Fuzzing found it: a BPE `unk_token` missing from the vocabulary loaded, then failed every
/// prompt with an unknown character; it is refused at load, naming the field.
#[test]
fn a_tokenizer_unk_token_must_be_in_the_vocabulary() {
    let mut j = tiny_tokenizer_json();
    j["model"]["unk_token"] = "<unk>".into();
    let e =
        Tokenizer::from_json_bytes("tokenizer.json", j.to_string().as_bytes(), None, None, None)
            .err()
            .unwrap()
            .to_string();
    assert!(
        e.starts_with("tokenizer.json") && e.contains("unk_token"),
        "{e}"
    );
}

#[test]
fn gguf_tokens_listed_twice_are_rejected() {
    let gguf = |tokens: &[&str]| {
        let s = |x: &str| Value::Str(x.into());
        let meta = vec![
            ("tokenizer.ggml.model".to_string(), s("gpt2")),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Array(tokens.iter().map(|t| s(t)).collect()),
            ),
            (
                "tokenizer.ggml.merges".to_string(),
                Value::Array(vec![s("a b")]),
            ),
        ];
        Gguf::from_bytes("tok.gguf", write_gguf(&meta, &[])).unwrap()
    };
    Tokenizer::from_gguf(&gguf(&["a", "b", "ab"])).unwrap();
    let e = Tokenizer::from_gguf(&gguf(&["a", "b", "ab", "b"]))
        .err()
        .unwrap()
        .to_string();
    assert!(e.starts_with("tok.gguf") && e.contains("twice"), "{e}");
}

/// Fuzzing found it (input 394 121 of the first 1M run): tokenizers 0.22 slices the BPE
/// `continuing_subword_prefix` off each merge's second part unchecked, and panics when it is
/// longer; the loader checks the merges first.
#[test]
fn a_subword_prefix_longer_than_a_merge_is_an_error_not_a_panic() {
    let mut j = tiny_tokenizer_json();
    j["model"]["continuing_subword_prefix"] = "xxxxxxxx".into();
    let e = std::panic::catch_unwind(|| {
        Tokenizer::from_json_bytes("tokenizer.json", j.to_string().as_bytes(), None, None, None)
            .err()
            .unwrap()
            .to_string()
    })
    .expect("no panic");
    assert!(
        e.starts_with("tokenizer.json") && e.contains("model.merges[0]"),
        "{e}"
    );
}

/// Fuzzing found it (seed 35, the `json_mode` target, 3 of 300 000 inputs): JSON mode called
/// `{"stream":1e+318446744073709551615, ...}` a whole object, which serde_json rejects (number
/// out of range) and `JSON.parse` reads as Infinity; numbers are now held to a double's range.
#[test]
fn json_mode_numbers_fit_a_double() {
    let text = br#"{"seed":42.0,"stream":1e+318446744073709551615,"max_tokens":64}"#;
    flexquant::fuzz::targets::json_mode(text).unwrap();
    let mut p = flexquant::runtime::json_mode::JsonPrefix::default();
    assert!(!p.feed(text));
}

/// Fuzzing found it (seed 50, the `request` target, 1 of 120,000 inputs): a schema whose
/// `pattern` repeats a class 2,147,483,648 times hung the request's parse (the regex compiler
/// had no size limit and built the copies one by one). It is now an `unsupported` error that
/// names the pattern, at once.
#[test]
fn a_pattern_too_large_to_compile_is_refused_at_once() {
    let schema = serde_json::json!({"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-C]{2147483648}-[0-9]{1,3}$"}}});
    let e = flexquant::runtime::json_schema::parse(&schema)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("schema.properties.code.pattern") && e.contains("limit"),
        "{e}"
    );
}

/// Fuzzing found it (the `tool_calls` target counted calls wrong): after a whole call the end
/// of the turn is taken, and the answer's calls are the one written, not two.
#[test]
fn a_call_then_the_end_of_the_turn_is_one_call() {
    let mut input = br#" <tool_call>{"name": "t", "arguments": {"z": []}}"#.to_vec();
    input.extend([0xff, 0xff]);
    input.extend_from_slice(b"ol_call>\n<tool_call>\n{\"name\": \"w\"");
    flexquant::fuzz::targets::tool_calls(&input).unwrap();
}
