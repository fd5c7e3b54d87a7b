//! OpenAI request fields that change what a turn does, on the demo model: JSON mode
//! (`response_format: json_object`: the tokenizer's byte table against its own decoder, answers
//! held to a JSON object that serde_json parses) and `logprobs` (against the reference
//! forward pass's log-softmax).

use flexquant::model::chat::Message;
use flexquant::runtime::json_mode::{JsonConstraint, JsonPrefix, Schema, WATCHED_BYTES};
use flexquant::runtime::reference::Reference;
use flexquant::runtime::{Sampling, Session, StopReason, TurnOptions};
use pollster::block_on;
use std::sync::Arc;

/// `ask` as the demo model's chat prompt.
fn chat_prompt(t: &flexquant::model::tokenizer::Tokenizer, ask: &str) -> Vec<u32> {
    t.encode(&t.chat.render(&[Message::new("user", ask)]).unwrap())
        .unwrap()
}

/// Every token's bytes (`Tokenizer::token_bytes`) decode, through the `tokenizers` crate's
/// byte-level decoder, to that token's text; special tokens have none; JSON mode's watched
/// bytes are tokens of their own.
#[test]
fn token_bytes_match_the_tokenizers_decoder() {
    let Some((m, _)) = crate::common::demo() else {
        return;
    };
    let t = &m.tokenizer;
    let table = t.token_bytes();
    assert_eq!(table.len(), t.vocab_size());
    let mut checked = 0;
    for (id, bytes) in table.iter().enumerate() {
        let Some(b) = bytes else { continue };
        if let Ok(text) = std::str::from_utf8(b) {
            assert_eq!(t.decode(&[id as u32], false).unwrap(), text, "token {id}");
            checked += 1;
        }
    }
    assert!(checked > 45_000, "{checked} tokens checked");
    for &id in &t.stop {
        assert_eq!(table[id as usize], None, "stop token {id}");
    }
    // JSON mode's watched one-byte tokens are all in this vocabulary.
    let json = JsonConstraint::new(table, Arc::new(Schema::AnyObject));
    assert_eq!(json.watched().len(), WATCHED_BYTES.len());
}

/// Answers in JSON mode, greedy and sampled at temperature 1: each is a JSON object's prefix
/// token by token, and each that ended by itself is one whole object serde_json parses.
#[test]
fn json_mode_answers_are_json_objects() {
    let Some((m, _)) = crate::common::demo() else {
        return;
    };
    let t = &m.tokenizer;
    let bytes = t.token_bytes();
    let ask = "What is the capital of France? Answer in JSON with one field, \"capital\".";
    let prompt = chat_prompt(t, ask);
    let mut s = Session::new(Reference::new(m.weights.clone(), 512));
    let mut ended = 0;
    for (temperature, seed) in [(0.0, 0), (1.0, 1), (1.0, 2), (1.0, 3)] {
        let sampling = Sampling {
            temperature,
            seed,
            max_tokens: 64,
            ..Sampling::chat()
        };
        let json = Some(JsonConstraint::new(
            bytes.clone(),
            Arc::new(Schema::AnyObject),
        ));
        let mut turn = block_on(s.start_with(
            &prompt,
            &sampling,
            &t.stop,
            TurnOptions {
                json,
                logprobs: None,
            },
        ))
        .unwrap();
        let mut state = JsonPrefix::default();
        while let Some(id) = block_on(s.next(&mut turn)).unwrap() {
            assert!(
                state.feed(bytes[id as usize].as_deref().unwrap()),
                "token {id} left the JSON"
            );
        }
        let text = t.decode(&turn.out, true).unwrap();
        eprintln!(
            "temperature {temperature} seed {seed}: {text:?} ({:?})",
            turn.stats.stopped_by
        );
        if turn.stats.stopped_by == Some(StopReason::Eos) {
            assert!(state.is_complete());
            let v: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert!(!v.is_empty() || text.trim() == "{}");
            ended += 1;
        } else {
            assert_eq!(turn.stats.stopped_by, Some(StopReason::MaxTokens));
        }
    }
    assert!(ended >= 2, "only {ended} of 4 answers closed their object");
}

/// `logprobs` with 5 alternatives on a greedy answer: each token's log-probability equals the
/// log-softmax of the reference forward pass over prompt + answer at its position (computed
/// independently, all positions at once), and is the first of its alternatives.
#[test]
fn logprobs_match_the_log_softmax_of_a_full_forward_pass() {
    let Some((m, _)) = crate::common::demo() else {
        return;
    };
    let t = &m.tokenizer;
    let prompt = chat_prompt(t, "Name a color.");
    let mut s = Session::new(Reference::new(m.weights.clone(), 512));
    let sampling = Sampling {
        max_tokens: 8,
        ..Sampling::default()
    };
    let opts = TurnOptions {
        json: None,
        logprobs: Some(5),
    };
    let mut turn = block_on(s.start_with(&prompt, &sampling, &[], opts)).unwrap();
    let mut got = Vec::new();
    while let Some(id) = block_on(s.next(&mut turn)).unwrap() {
        let lp = turn.logprob.take().expect("asked for logprobs");
        assert_eq!(lp.id, id);
        assert_eq!(lp.top.len(), 5);
        assert_eq!(lp.top[0], (id, lp.logprob), "greedy: the most likely token");
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1), "{:?}", lp.top);
        let mass: f32 = lp.top.iter().map(|c| c.1.exp()).sum();
        assert!(lp.logprob <= 0.0 && mass <= 1.0 + 1e-5, "{lp:?}");
        got.push(lp);
    }
    assert_eq!(got.len(), 8);
    let all: Vec<u32> = prompt
        .iter()
        .copied()
        .chain(got.iter().map(|l| l.id))
        .collect();
    let w = &m.weights;
    let mut cache = flexquant::model::forward::KvCache::new(w, all.len());
    let logits = flexquant::model::forward::forward_all(w, &all, &mut cache).unwrap();
    let vocab = w.config.vocab_size;
    for (i, lp) in got.iter().enumerate() {
        let row = &logits[(prompt.len() - 1 + i) * vocab..][..vocab];
        let want = row[lp.id as usize] as f64 - flexquant::model::math::log_sum_exp(row);
        assert!(
            (lp.logprob as f64 - want).abs() < 1e-3,
            "token {i}: {} vs {want}",
            lp.logprob
        );
    }
}

/// Structured output (`response_format: json_schema`) on the demo model: greedy and sampled
/// answers are objects with exactly the schema's properties, of its types.
#[test]
fn json_schema_answers_follow_the_schema() {
    let Some((m, _)) = crate::common::demo() else {
        return;
    };
    let t = &m.tokenizer;
    let schema = flexquant::runtime::json_schema::parse(&serde_json::json!({
        "type": "object", "additionalProperties": false,
        "properties": {
            "city": {"type": "string"},
            "country": {"type": "string"},
            "population": {"type": "integer"},
            "continent": {"enum": ["Europe", "Asia", "Africa", "America", "Oceania"]}
        },
        "required": ["city", "country", "population", "continent"]
    }))
    .unwrap();
    let bytes = t.token_bytes();
    let prompt = chat_prompt(t, "Describe Paris in JSON.");
    let mut s = Session::new(Reference::new(m.weights.clone(), 512));
    for (temperature, seed) in [(0.0, 0), (1.0, 1)] {
        let sampling = Sampling {
            temperature,
            seed,
            max_tokens: 96,
            ..Sampling::chat()
        };
        let opts = TurnOptions {
            json: Some(JsonConstraint::new(bytes.clone(), schema.clone())),
            logprobs: None,
        };
        let mut turn = block_on(s.start_with(&prompt, &sampling, &t.stop, opts)).unwrap();
        while block_on(s.next(&mut turn)).unwrap().is_some() {}
        let text = t.decode(&turn.out, true).unwrap();
        eprintln!("temperature {temperature}: {text}");
        assert_eq!(turn.stats.stopped_by, Some(StopReason::Eos), "{text}");
        let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
        let mut keys: Vec<&str> = v.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["city", "continent", "country", "population"],
            "{text}"
        );
        assert!(v["city"].is_string() && v["country"].is_string(), "{text}");
        assert!(
            v["population"].is_i64() || v["population"].is_u64(),
            "{text}"
        );
    }
}
