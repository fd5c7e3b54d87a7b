//! OpenAI request fields that change what a turn does, on the demo model: JSON mode
//! (`response_format: json_object`: the tokenizer's byte table against its own decoder, answers
//! held to a JSON object that serde_json parses) and `logprobs` (against the reference
//! forward pass's log-softmax).

use flexquant::model::chat::Message;
use flexquant::runtime::json_constraint::{JsonConstraint, WATCHED_BYTES};
use flexquant::runtime::json_mode::{JsonPrefix, Schema};
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
                ..TurnOptions::default()
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
        logprobs: Some(5),
        ..TurnOptions::default()
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

/// A prompt scored (`TurnOptions::prompt_logprobs`, the legacy `echo` with `logprobs`): every
/// token after the first gets its log-probability given the tokens before it, as the full
/// forward pass's log-softmax says, also where it is not among the top candidates; the cache the
/// session held before is not trusted for it, and `max_tokens: 0` ends the turn at once.
#[test]
fn prompt_logprobs_match_the_log_softmax_of_a_full_forward_pass() {
    let Some((m, _)) = crate::common::demo() else {
        return;
    };
    let t = &m.tokenizer;
    // Unlikely words: some tokens fall outside the 40 candidates and come back watched.
    let text = "The quick brown fox jumps over the lazy dog. Zebras quietly eat xylophones.";
    let prompt = t.encode(text).unwrap();
    let mut s = Session::new(Reference::new(m.weights.clone(), 512));
    // A conversation in the cache that shares the prompt's first tokens.
    let half = &prompt[..prompt.len() / 2];
    block_on(s.generate(half, &Sampling::default(), &[], |_| true)).unwrap();
    let only = Sampling {
        max_tokens: 0,
        ..Sampling::default()
    };
    let opts = TurnOptions {
        logprobs: Some(3),
        prompt_logprobs: true,
        ..TurnOptions::default()
    };
    let mut turn = block_on(s.start_with(&prompt, &only, &[], opts)).unwrap();
    assert_eq!(
        turn.stats.prefilled,
        prompt.len(),
        "every position run again"
    );
    assert_eq!(block_on(s.next(&mut turn)).unwrap(), None);
    assert_eq!(turn.stats.stopped_by, Some(StopReason::MaxTokens));
    let scored = std::mem::take(&mut turn.prompt_logprobs);
    assert_eq!(scored.len(), prompt.len());
    assert!(scored[0].is_none(), "the first token has no context");
    let w = &m.weights;
    let mut cache = flexquant::model::forward::KvCache::new(w, prompt.len());
    let logits = flexquant::model::forward::forward_all(w, &prompt, &mut cache).unwrap();
    let vocab = w.config.vocab_size;
    let mut outside = 0;
    for (i, lp) in scored.iter().enumerate().skip(1) {
        let lp = lp.as_ref().expect("scored");
        assert_eq!(lp.id, prompt[i]);
        let row = &logits[(i - 1) * vocab..][..vocab];
        let log_z = flexquant::model::math::log_sum_exp(row);
        let want = row[lp.id as usize] as f64 - log_z;
        assert!(
            (lp.logprob as f64 - want).abs() < 1e-3,
            "token {i}: {} vs {want}",
            lp.logprob
        );
        assert_eq!(lp.top.len(), 3);
        let best = (0..vocab)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        assert_eq!(lp.top[0].0 as usize, best, "token {i}");
        let above = row.iter().filter(|&&x| x > row[lp.id as usize]).count();
        outside += usize::from(above >= flexquant::runtime::generate::TOP_K);
    }
    assert!(
        outside > 0,
        "every prompt token among the candidates: the watched path untested"
    );
    // The next turn reuses the scored prompt's cache.
    let mut turn = block_on(s.start(&prompt, &Sampling::default(), &[])).unwrap();
    assert_eq!(turn.stats.prefilled, 1);
    assert!(turn.prompt_logprobs.is_empty());
    assert!(block_on(s.next(&mut turn)).unwrap().is_some());
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
            ..TurnOptions::default()
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

/// Function calling (`tools`) on the demo model through the request's own path: parsed,
/// the functions put in the prompt, the call held to the function's parameters and read back.
/// `required` and a named function give a call each time; `auto` gives a call or text, and a
/// call is valid whichever it is; after a tool result, `none` gives text.
#[test]
fn tool_calls_name_a_function_and_follow_its_parameters() {
    use flexquant::runtime::json_constraint::Lead;
    use flexquant::runtime::request::ChatRequest;
    use flexquant::runtime::tools::{CallDelta, CallEnd, HeldCall, ToolCall};
    let Some((m, _)) = crate::common::demo() else {
        return;
    };
    let t = &m.tokenizer;
    let tools = serde_json::json!([
        {"type": "function", "function": {"name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {"type": "object", "additionalProperties": false,
                "properties": {"city": {"type": "string"},
                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"]}}},
        {"type": "function", "function": {"name": "get_time",
            "description": "The time in a UTC offset",
            "parameters": {"type": "object", "properties": {"offset": {"type": "integer"}},
                "required": ["offset"]}}}
    ]);
    let mut s = Session::new(Reference::new(m.weights.clone(), 768));
    let mut run = |messages: serde_json::Value, choice: serde_json::Value| {
        let body = serde_json::json!({"messages": messages, "tools": tools,
            "tool_choice": choice, "temperature": 0, "max_tokens": 64});
        let (req, sampling, _) = ChatRequest::from_json(body.to_string().as_bytes()).unwrap();
        let tools = req.tools().unwrap().unwrap();
        let text = t
            .chat
            .render_with_tools(&req.messages, tools.prompt())
            .unwrap();
        let opts = TurnOptions {
            json: tools.constraint(t.token_bytes()),
            ..TurnOptions::default()
        };
        let prompt = t.encode(&text).unwrap();
        let mut turn = block_on(s.start_with(&prompt, &sampling, &t.stop, opts)).unwrap();
        let mut held = HeldCall::default();
        let mut shown = String::new();
        // Per call: its name and the arguments streamed.
        let mut streamed: Vec<(Option<String>, String)> = Vec::new();
        let mut add = |d: CallDelta| {
            streamed.resize(streamed.len().max(d.index + 1), Default::default());
            let (name, args) = &mut streamed[d.index];
            *name = name.take().or(d.name);
            *args += &d.arguments;
        };
        while let Some(id) = block_on(s.next(&mut turn)).unwrap() {
            let piece = t.decode(&[id], true).unwrap();
            shown += &held.push(turn.lead(), &piece).unwrap_or_default();
            held.stream(turn.lead()).into_iter().for_each(&mut add);
        }
        let answer = t.decode(&turn.out, true).unwrap();
        eprintln!("{choice}: {answer:?}");
        // What streamed, and the rest at the end, add up to the calls.
        let end = match held.finish(turn.lead()) {
            CallEnd::Calls { calls, rest, cut } => {
                assert!(!cut, "{choice}: cut at {rest:?}");
                rest.into_iter().for_each(&mut add);
                assert_eq!(streamed.len(), calls.len());
                for ((name, args), call) in streamed.iter().zip(&calls) {
                    assert_eq!(args, &call.arguments);
                    assert_eq!(name.as_ref(), Some(&call.name));
                }
                Ok(calls)
            }
            CallEnd::Text(text) => Err(text),
        };
        (end, shown, turn.lead().cloned(), answer)
    };
    let ask = serde_json::json!([{"role": "user", "content": "What is the weather in Paris?"}]);
    let check = |c: &ToolCall| {
        let args: serde_json::Value = serde_json::from_str(&c.arguments).unwrap();
        match c.name.as_str() {
            "get_weather" => {
                assert!(args["city"].is_string(), "{c:?}");
                assert!(["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()));
            }
            "get_time" => assert!(args["offset"].is_i64(), "{c:?}"),
            other => panic!("called {other}"),
        }
    };
    let (calls, shown, ..) = run(ask.clone(), serde_json::json!("required"));
    let calls = calls.expect("a required call");
    calls.iter().for_each(check);
    let call = &calls[0];
    assert_eq!(shown, "", "a call is not shown as text");
    let (named, ..) = run(
        ask.clone(),
        serde_json::json!({"type": "function", "function": {"name": "get_time"}}),
    );
    let named = named.expect("a call");
    assert!(named.iter().all(|c| c.name == "get_time"), "{named:?}");
    named.iter().for_each(check);
    let (auto, shown, lead, answer) = run(ask.clone(), serde_json::json!("auto"));
    match (auto, lead) {
        (Ok(c), Some(Lead::Json | Lead::Between(_))) => c.iter().for_each(check),
        (Err(rest), Some(Lead::Text)) => assert_eq!(shown + &rest, answer),
        other => panic!("auto: {other:?}"),
    }
    // The call and its result in the conversation; no more calls.
    let after = serde_json::json!([
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temperature\": 18, \"sky\": \"sunny\"}"}
    ]);
    let (none, shown, lead, answer) = run(after, serde_json::json!("none"));
    assert_eq!(lead, None);
    assert_eq!(none.unwrap_err(), "");
    assert_eq!(shown, answer);
    assert!(!answer.trim().is_empty());
}

/// The CLI's `generate --chat --tools FILE --tool-choice required` on the demo model: the call
/// printed and in the `--json` line, its arguments following the function's parameters.
#[test]
fn cli_generate_makes_a_tool_call() {
    let Some(model) = crate::common::demo_model_path() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let tools = d.path().join("tools.json");
    std::fs::write(
        &tools,
        r#"[{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                "required": ["city"], "additionalProperties": false}}}]"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flexquant"))
        .args(["generate", "--model", model.to_str().unwrap(), "--chat"])
        .args([
            "--prompt",
            "What is the weather in Paris?",
            "--temperature",
            "0",
        ])
        .args([
            "--tools",
            tools.to_str().unwrap(),
            "--tool-choice",
            "required",
        ])
        .args(["--max-tokens", "48", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("[tool call] get_weather {"), "{stdout}");
    let line = stdout.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let calls = v["tool_calls"].as_array().unwrap();
    assert!(!calls.is_empty(), "{line}");
    for c in calls {
        assert_eq!(c["name"], "get_weather", "{line}");
        let args: serde_json::Value =
            serde_json::from_str(c["arguments"].as_str().unwrap()).unwrap();
        assert!(args["city"].is_string(), "{line}");
    }
    eprintln!("{}", v["tool_calls"]);
}
