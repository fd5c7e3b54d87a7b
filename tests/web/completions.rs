//! Text completions (`startCompletion`, OpenAI's legacy `completions`): a prompt continued as
//! it is. The tiny ensemble's chat template is plain ChatML, so a chat request and a text
//! completion of the same conversation rendered by hand must run the same tokens.

use super::*;

/// Runs a text completion to its end: (text, the chunks).
async fn complete(e: &Engine, req: Value) -> (String, Vec<Value>) {
    call(e.start_completion(js(&req)))
        .await
        .expect("startCompletion");
    let (mut text, mut chunks) = (String::new(), Vec::new());
    loop {
        let c = call(e.next_chunk()).await.expect("nextChunk");
        if c.is_null() {
            return (text, chunks);
        }
        assert_eq!(c["object"], "text_completion", "{c}");
        assert!(c["id"].as_str().unwrap().starts_with("cmpl-"), "{c}");
        let ch = &c["choices"][0];
        let asked = !req["logprobs"].is_null();
        let token = ch["finish_reason"].is_null();
        assert_eq!(ch["logprobs"].is_object(), asked && token, "{c}");
        assert!(ch.get("delta").is_none(), "{c}");
        text += ch["text"].as_str().unwrap();
        chunks.push(c);
    }
}

#[wasm_bindgen_test]
async fn a_text_completion_continues_its_prompt_as_the_chat_template_would() {
    let (e, ev) = engine("/tiny/manifest.json", json!({"backend": "cpu"}))
        .await
        .unwrap();
    start(&e, &[user("Hi")], 12).await;
    let (chat, _, last) = finish(&e).await;
    let chat_prompt = last["usage"]["prompt_tokens"].as_u64().unwrap();
    call(e.reset_chat()).await.unwrap();

    let prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
    let req = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0.0});
    let (text, chunks) = complete(&e, req.clone()).await;
    assert_eq!(
        text, chat,
        "the completion of the rendered prompt differs from the chat answer"
    );
    let last = chunks.last().unwrap();
    assert_eq!(last["usage"]["prompt_tokens"], chat_prompt, "{last}");
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    // Its KV cache is the chat's: the same prompt again finds all but its last token cached.
    let (again, chunks) = complete(&e, req).await;
    assert_eq!(again, text);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"],
        chat_prompt - 1,
        "{usage}"
    );

    // Stop strings and n work as in chat: two choices, each cut before its first "a".
    let req = json!({"prompt": "Once upon", "max_tokens": 16, "temperature": 1.0, "seed": 7,
        "n": 2, "stop": ["a"]});
    let (_, chunks) = complete(&e, req).await;
    let mut texts = [String::new(), String::new()];
    for c in &chunks {
        let ch = &c["choices"][0];
        texts[ch["index"].as_u64().unwrap() as usize] += ch["text"].as_str().unwrap();
    }
    assert!(texts.iter().all(|t| !t.contains('a')), "{texts:?}");
    let finals: Vec<_> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finals.len(), 2, "{chunks:?}");

    // What a text completion does not take is an error naming the field; the engine goes on.
    for (req, code, what) in [
        (
            json!({"prompt": "x", "messages": []}),
            "unsupported",
            "`messages`",
        ),
        (
            json!({"prompt": "x", "top_logprobs": 2}),
            "unsupported",
            "`top_logprobs`",
        ),
        (
            json!({"prompt": "x", "logprobs": true}),
            "input",
            "logprobs",
        ),
        (json!({"prompt": "x", "logprobs": 6}), "input", "logprobs 6"),
        (
            json!({"prompt": "x", "echo": true, "logprobs": 1}),
            "unsupported",
            "`echo` with `logprobs`",
        ),
        (json!({"prompt": ""}), "input", "`prompt` is empty"),
        (json!({"max_tokens": 3}), "input", "`prompt` is missing"),
        (json!({"prompt": ["a", "b"]}), "input", "prompt"),
    ] {
        let err = call(e.start_completion(js(&req))).await.unwrap_err();
        assert_eq!(err["code"], code, "{req}: {err}");
        assert!(
            err["message"].as_str().unwrap().contains(what),
            "{req}: {err}"
        );
    }
    let err = call(e.start_chat(js(&json!({"messages": [user("x")], "prompt": "x"}))))
        .await
        .unwrap_err();
    assert_eq!(err["code"], "unsupported", "{err}");
    start(&e, &[user("Hi")], 4).await;
    assert!(!finish(&e).await.0.is_empty());
    assert_no_errors(&ev);
    call(e.unload()).await.unwrap();
}

/// OpenAI's legacy `logprobs` (a count) and `echo`: each token's chunk has its text, its
/// log-probability (the largest of its alternatives when greedy), up to N + 1 alternatives and
/// its offset in characters; with `echo` the text starts with the prompt and goes on as without.
#[wasm_bindgen_test]
async fn text_completion_logprobs_and_echo_follow_the_legacy_shape() {
    let (e, ev) = engine("/tiny/manifest.json", json!({"backend": "cpu"}))
        .await
        .unwrap();
    let prompt = "Once upon a time";
    let req = json!({"prompt": prompt, "max_tokens": 6, "temperature": 0.0, "ignore_eos": true,
        "logprobs": 3});
    let (text, chunks) = complete(&e, req).await;
    let (mut before, mut entries) = (String::new(), 0);
    for c in &chunks {
        let lp = &c["choices"][0]["logprobs"];
        let offset = before.chars().count() as u64;
        before += c["choices"][0]["text"].as_str().unwrap();
        if lp.is_null() {
            continue;
        }
        entries += 1;
        let token = lp["tokens"][0].as_str().unwrap();
        let logprob = lp["token_logprobs"][0].as_f64().unwrap();
        let top = lp["top_logprobs"][0].as_object().unwrap();
        assert!(logprob <= 0.0 && (1..=4).contains(&top.len()), "{c}");
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!(logprob, best, "greedy: the token is the likeliest: {c}");
        assert_eq!(top[token].as_f64(), Some(logprob), "{c}");
        assert_eq!(lp["text_offset"][0].as_u64(), Some(offset), "{c}");
    }
    assert_eq!(entries, 6, "{chunks:?}");

    let req = json!({"prompt": prompt, "max_tokens": 6, "temperature": 0.0, "ignore_eos": true,
        "echo": true, "n": 2});
    let (echoed, chunks) = complete(&e, req).await;
    assert_eq!(
        echoed,
        format!("{prompt}{text}{prompt}{text}"),
        "{chunks:?}"
    );
    assert_no_errors(&ev);
    call(e.unload()).await.unwrap();
}
