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
    let mut first = true;
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
        // A choice's first chunk carries its echoed prompt's tokens, scored.
        let scored = first && req["echo"] == true;
        assert_eq!(
            ch["logprobs"].is_object(),
            asked && (token || scored),
            "{c}"
        );
        first = !token;
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
            json!({"prompt": "x", "max_tokens": 0}),
            "input",
            "max_tokens must be at least 1",
        ),
        (json!({"prompt": ""}), "input", "`prompt` is empty"),
        (json!({"max_tokens": 3}), "input", "`prompt` is missing"),
        (
            json!({"prompt": ["a", ""]}),
            "input",
            "`prompt[1]` is empty",
        ),
        (
            json!({"prompt": [1, 1 << 30]}),
            "input",
            "not in the vocabulary",
        ),
        (
            json!({"prompt": [[1], [2, "x"]]}),
            "input",
            "`prompt[1][1]`",
        ),
        (
            json!({"prompt": vec!["a"; 9], "n": 8}),
            "input",
            "72 answers, at most 64",
        ),
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

/// `echo` with `logprobs` scores the prompt (what evaluation harnesses send, `max_tokens: 0`):
/// its tokens join to the prompt, the first has no log-probability, each other's equals what
/// generating it after the tokens before it gives; with tokens generated after it, every
/// choice's first chunk carries the same scored prompt. On both backends.
#[wasm_bindgen_test]
async fn echo_with_logprobs_scores_the_prompt_as_generation_would() {
    let prompt = "Once upon a time there was a little";
    for backend in ["cpu", "webgpu"] {
        let (e, ev) = engine("/tiny/manifest.json", json!({"backend": backend}))
            .await
            .unwrap();
        let req = json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 2});
        let (text, chunks) = complete(&e, req).await;
        assert_eq!(text, prompt, "{backend}");
        assert_eq!(chunks.len(), 1, "{backend}: {chunks:?}");
        let c = &chunks[0];
        assert_eq!(c["choices"][0]["finish_reason"], "length", "{c}");
        assert_eq!(c["usage"]["completion_tokens"], 0, "{c}");
        let lp = &c["choices"][0]["logprobs"];
        let tokens: Vec<&str> = lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(tokens.concat(), prompt, "{backend}: {lp}");
        assert_eq!(c["usage"]["prompt_tokens"], tokens.len(), "{c}");
        assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
        let mut offset = 0;
        for (i, t) in tokens.iter().enumerate() {
            assert_eq!(lp["text_offset"][i], offset, "{backend} token {i}: {lp}");
            offset += t.chars().count();
            if i == 0 {
                continue;
            }
            let l = lp["token_logprobs"][i].as_f64().unwrap();
            let top = lp["top_logprobs"][i].as_object().unwrap();
            assert!(
                l <= 0.0 && (1..=3).contains(&top.len()),
                "{backend} {i}: {lp}"
            );
            assert_eq!(top[*t].as_f64(), Some(l), "{backend} {i}: {lp}");
        }
        // Each scored position against generating there: the prompt cut after token k,
        // continued by one greedy token whose alternatives are the same distribution.
        for k in [1, tokens.len() / 2, tokens.len() - 1] {
            let cut = tokens[..k].concat();
            let req = json!({"prompt": cut, "max_tokens": 1, "temperature": 0.0,
                "ignore_eos": true, "logprobs": 2});
            let (_, gen) = complete(&e, req).await;
            let top = gen[0]["choices"][0]["logprobs"]["top_logprobs"][0].clone();
            let scored = &lp["top_logprobs"][k];
            for (tok, l) in top.as_object().unwrap() {
                let Some(s) = scored.get(tok) else { continue };
                let (a, b) = (l.as_f64().unwrap(), s.as_f64().unwrap());
                assert!(
                    (a - b).abs() < 2e-3,
                    "{backend} position {k} `{tok}`: {a} vs {b}"
                );
            }
            let best = |m: &Value| {
                let m = m.as_object().unwrap();
                m.values()
                    .map(|v| v.as_f64().unwrap())
                    .fold(f64::MIN, f64::max)
            };
            assert!(
                (best(&top) - best(scored)).abs() < 2e-3,
                "{backend} {k}: {top} vs {scored}"
            );
        }
        // Tokens after it, two choices: each first chunk has the prompt's entries and its own
        // first token's; nothing of the prompt came from the cache.
        let req = json!({"prompt": prompt, "max_tokens": 3, "temperature": 0.0,
            "ignore_eos": true, "echo": true, "logprobs": 1, "n": 2});
        let (_, chunks) = complete(&e, req).await;
        let firsts: Vec<&Value> = chunks
            .iter()
            .enumerate()
            .filter(|(i, _)| *i == 0 || !chunks[i - 1]["choices"][0]["finish_reason"].is_null())
            .map(|(_, c)| &c["choices"][0]["logprobs"])
            .collect();
        assert_eq!(firsts.len(), 2, "{backend}: {chunks:?}");
        for f in &firsts {
            assert_eq!(
                f["tokens"].as_array().unwrap().len(),
                tokens.len() + 1,
                "{f}"
            );
            assert_eq!(
                f["text_offset"][tokens.len()],
                prompt.chars().count(),
                "{f}"
            );
            let n = tokens.len();
            for key in ["tokens", "text_offset"] {
                assert_eq!(
                    f[key].as_array().unwrap()[..n],
                    lp[key].as_array().unwrap()[..n]
                );
            }
            // The same values but for rounding: a long prompt is read in pieces sized by the
            // speed measured (`PrefillPace`), and on WebGPU the entry at a piece's edge comes
            // from the decode kernels, the others from the prefill's.
            let (a, b) = (&f["token_logprobs"], &lp["token_logprobs"]);
            assert!(a[0].is_null() && b[0].is_null());
            for i in 1..n {
                let (x, y) = (a[i].as_f64().unwrap(), b[i].as_f64().unwrap());
                assert!((x - y).abs() < 1e-4, "{backend} token {i}: {x} vs {y}");
            }
        }
        let last = chunks.last().unwrap();
        assert_eq!(
            last["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
            "{last}"
        );
        assert_no_errors(&ev);
        call(e.unload()).await.unwrap();
    }
}

/// A list of prompts (OpenAI's batch form) and prompts of token ids: choice `i * n + j` is
/// prompt `i`'s answer `j`, each as the same prompt alone would get it; token ids run as they
/// are; `echo` starts each choice with its own prompt; usage counts every prompt once; a
/// prompt past the context is refused before any runs.
#[wasm_bindgen_test]
async fn a_list_of_prompts_and_token_prompts_answer_as_each_alone() {
    let (e, ev) = engine(
        "/tiny/manifest.json",
        json!({"backend": "cpu", "context": 64}),
    )
    .await
    .unwrap();
    let greedy = |prompt: Value| json!({"prompt": prompt, "max_tokens": 4, "temperature": 0.0, "ignore_eos": true});
    let prompts = ["Once upon a time", "The sea", "Hello"];
    let mut alone = Vec::new();
    let mut prompt_tokens = 0;
    for p in prompts {
        let (text, chunks) = complete(&e, greedy(json!(p))).await;
        prompt_tokens += chunks.last().unwrap()["usage"]["prompt_tokens"]
            .as_u64()
            .unwrap();
        alone.push(text);
    }
    let mut req = greedy(json!(prompts));
    req["n"] = json!(2);
    req["echo"] = json!(true);
    let (_, chunks) = complete(&e, req).await;
    let mut texts = vec![String::new(); 6];
    for c in &chunks {
        let ch = &c["choices"][0];
        texts[ch["index"].as_u64().unwrap() as usize] += ch["text"].as_str().unwrap();
    }
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(
            *t,
            format!("{}{}", prompts[i / 2], alone[i / 2]),
            "choice {i}"
        );
    }
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["prompt_tokens"], prompt_tokens, "{usage}");
    assert_eq!(usage["completion_tokens"], 6 * 4, "{usage}");

    // Token ids (`tokenize`, which counts as a prompt does): they answer as their text, and
    // `detokenize` gives the text back.
    let req = json!({"prompt": prompts[0], "max_tokens": 0, "echo": true, "logprobs": 0});
    let (_, chunks) = complete(&e, req).await;
    let n = chunks[0]["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let ids: Vec<u32> = serde_json::from_value(val(e.tokenize(prompts[0]).unwrap())).unwrap();
    assert_eq!(ids.len(), n);
    assert_eq!(e.detokenize(ids.clone()).unwrap(), prompts[0]);
    let bad = error_fields(&e.detokenize(vec![1 << 30]).unwrap_err());
    assert_eq!(bad["code"], "input", "{bad}");
    let (text, chunks) = complete(&e, greedy(json!(ids))).await;
    assert_eq!(text, alone[0]);
    assert_eq!(chunks.last().unwrap()["usage"]["prompt_tokens"], n);
    let mut req = greedy(json!([ids.clone(), ids]));
    req["echo"] = json!(true);
    let (text, _) = complete(&e, req).await;
    assert_eq!(text, format!("{0}{1}{0}{1}", prompts[0], alone[0]));

    // Past the context (64 tokens): refused before any prompt runs, naming which.
    let long = "word ".repeat(200);
    let err = call(e.start_completion(js(&greedy(json!(["Hi", long])))))
        .await
        .unwrap_err();
    assert_eq!(err["code"], "context-length", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("`prompt[1]`"),
        "{err}"
    );
    assert_no_errors(&ev);
    call(e.unload()).await.unwrap();
}
