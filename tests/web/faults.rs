//! Fault-matrix rows (tests/FAULTS.md) that need the browser: broken base and tokenizer files,
//! chat templates that are missing or refuse a conversation, stale bytes in the HTTP cache
//! after a redeploy, a device lost in the middle of a swap, and a soak of swaps with the GPU
//! buffers counted down to none after `unload`. The views are tests/web/server.py's.

use super::*;

/// The Cache API keys of the bucket `name`.
async fn cache_keys(name: &str) -> Vec<String> {
    let caches: web_sys::CacheStorage = web_sys::window().unwrap().caches().unwrap();
    let c: web_sys::Cache = JsFuture::from(caches.open(name)).await.unwrap().into();
    let keys: js_sys::Array = JsFuture::from(c.keys()).await.unwrap().into();
    keys.iter()
        .map(|k| k.unchecked_into::<web_sys::Request>().url())
        .collect()
}

#[wasm_bindgen_test]
async fn a_corrupt_base_or_tokenizer_is_a_typed_error_and_nothing_bad_is_cached() {
    for (view, file) in [("badbase", "base.bin"), ("badtok", "tokenizer.json")] {
        let cache = format!("{view}-{}", js_sys::Math::random());
        let path = format!("/{view}/tiny/manifest.json");
        let err = engine(&path, json!({"cacheName": cache}))
            .await
            .err()
            .unwrap();
        assert_eq!(err["code"], "hash-mismatch", "{view}: {err}");
        assert_eq!(err["file"], file, "{view}: {err}");
        assert!(err["message"].as_str().unwrap().contains(file), "{err}");
        let keys = cache_keys(&cache).await;
        assert!(
            keys.iter().all(|k| !k.contains(file)),
            "{view}: {file} was stored: {keys:?}"
        );
    }
    // The same ensemble served intact loads (nothing of the failed loads is in the way).
    let (e, _) = engine("/tiny/manifest.json", json!({"backend": "cpu"}))
        .await
        .unwrap();
    call(e.unload()).await.unwrap();
}

#[wasm_bindgen_test]
async fn templates_that_are_missing_or_refuse_a_conversation() {
    // No template in the manifest: ChatML, and the app is told once.
    let (e, ev) = engine("/chatml/tiny/manifest.json", json!({"backend": "cpu"}))
        .await
        .unwrap();
    let warnings = of_type(&ev, "warning");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0]["code"], "chat-template-fallback");
    start(&e, &[user("Hi")], 2).await;
    assert_eq!(finish(&e).await.1, 2);
    call(e.unload()).await.unwrap();
    let (e, ev) = engine("/tiny/manifest.json", json!({"backend": "cpu"}))
        .await
        .unwrap();
    assert!(of_type(&ev, "warning").is_empty(), "{:?}", ev.borrow());
    call(e.unload()).await.unwrap();

    // A template that raises on roles out of order: an `input` error quoting it; the next
    // request is served.
    let (e, _) = engine("/strict/tiny/manifest.json", json!({"backend": "cpu"}))
        .await
        .unwrap();
    let bad = json!({"messages": [{"role": "assistant", "content": "Hello"}, user("Hi")]});
    let err = call(e.start_chat(js(&bad))).await.unwrap_err();
    assert_eq!(err["code"], "input", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("roles must alternate"),
        "{err}"
    );
    start(&e, &[user("Hi")], 2).await;
    assert_eq!(finish(&e).await.1, 2);
    call(e.unload()).await.unwrap();
}

/// A redeploy behind the browser's HTTP cache: the old (here: corrupt) bytes were sent
/// cacheable for an hour. The next load must not take them from the HTTP cache: fetches
/// revalidate, so the fixed file verifies.
#[wasm_bindgen_test]
async fn stale_bytes_in_the_http_cache_are_not_used_after_a_redeploy() {
    let path = "/stale/tiny/manifest.json";
    server_get("/__stale?on=1").await;
    let (e, ev) = engine(path, json!({})).await.unwrap();
    until_prefetched(&e).await;
    let errors = of_type(&ev, "error");
    assert!(
        !errors.is_empty() && errors.iter().all(|e| e["error"]["code"] == "hash-mismatch"),
        "the old deployment's shard was fetched and refused: {errors:?}"
    );
    call(e.unload()).await.unwrap();

    server_get("/__stale?on=0").await;
    let (e, ev) = engine(path, json!({})).await.unwrap();
    until_prefetched(&e).await;
    start(&e, &[user("Hi")], 4).await;
    chunk(&e).await.0.unwrap();
    budget_to_step(&e, 1).await;
    finish(&e).await;
    assert_eq!(stats(&e)["step"], 1, "{:?}", ev.borrow());
    assert_no_errors(&ev);
    call(e.unload()).await.unwrap();
}

/// The device is destroyed while a swap waits for its shards (a slow server): the engine
/// notices, rebuilds at a lower step and finishes the answer with every token.
#[wasm_bindgen_test]
async fn a_device_lost_during_a_swap_is_recovered() {
    let (e, ev) = engine("/tiny/manifest.json", json!({"useCache": false}))
        .await
        .unwrap();
    start(&e, &[user("Once upon a time")], 8).await;
    chunk(&e).await.0.unwrap();
    let last = val(e.trajectory()).as_array().unwrap().len() - 1;
    budget_to_step(&e, last / 2).await;
    server_get("/__delay?ms=300").await;
    let next = JsFuture::from(e.next_chunk());
    sleep(100).await;
    e.destroy_device().unwrap();
    let first = next.await;
    server_get("/__delay?ms=0").await;
    let mut n = 1 + first.is_ok() as usize;
    let (_, rest, done) = finish(&e).await;
    n += rest;
    assert_eq!(done["usage"]["completion_tokens"], n as u64, "{done}");
    assert_eq!(n, 8, "every token of the answer: {:?}", ev.borrow());
    assert_eq!(of_type(&ev, "recovered").len(), 1, "{:?}", ev.borrow());
    let s = stats(&e);
    assert_eq!(s["deviceLosses"], 1, "{s}");
    assert!(s["step"].as_u64().unwrap() > 0, "{s}");
    check_bits(&e);
    call(e.unload()).await.unwrap();
}

/// 200 swaps up and down between random steps on the WebGPU engine: after each, the GPU
/// bytes are the step's footprint plus the same overhead; after `unload`, no buffer is left.
#[wasm_bindgen_test]
async fn soak_two_hundred_swaps_and_nothing_left_after_unload() {
    // Moves as soon as asked, up as far as the budget allows (no hysteresis band).
    let policy = json!({"up_delay_ms": 0.0, "fault_cooldown_ms": 0.0, "max_up_growth": 100.0,
        "up_margin": 0.0});
    let (e, ev) = engine("/tiny/manifest.json", json!({"policy": policy}))
        .await
        .unwrap();
    let traj = val(e.trajectory());
    let last = traj.as_array().unwrap().len() - 1;
    let overhead = |s: &Value| {
        let step = s["step"].as_u64().unwrap() as usize;
        s["gpuAllocatedBytes"].as_u64().unwrap() as i64
            - traj[step]["footprintBytes"].as_u64().unwrap() as i64
    };
    let first = overhead(&stats(&e));
    let mut seed = 0x2545_f491_u64;
    let (mut swaps, mut at) = (0, 0);
    while swaps < 200 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let to = (seed % (last as u64 + 1)) as usize;
        if to == at {
            continue;
        }
        call(e.set_memory_budget(JsValue::from(budget_for(&e, to) as f64)))
            .await
            .unwrap();
        while call(e.rebalance()).await.unwrap() == true {}
        let s = stats(&e);
        assert_eq!(s["step"], to, "swap {swaps}: {s}");
        assert_eq!(overhead(&s), first, "swap {swaps}: held bytes drifted: {s}");
        (swaps, at) = (swaps + 1, to);
    }
    assert_no_errors(&ev);
    start(&e, &[user("Hi")], 3).await;
    assert_eq!(finish(&e).await.1, 3);
    assert!(stats(&e)["gpuBuffers"].as_u64().unwrap() > 0);
    call(e.unload()).await.unwrap();
    let s = stats(&e);
    // For `./build.sh bench reliability` (the server writes it when started with --report).
    let report = json!({"swaps": swaps, "leaked_bytes": s["gpuAllocatedBytes"],
        "buffers_after_unload": s["gpuBuffers"], "adapter": s["adapter"]});
    let q = js_sys::encode_uri_component(&report.to_string());
    server_get(&format!("/__report?name=soak-browser-webgpu&json={q}")).await;
    assert_eq!(
        (s["gpuBuffers"].as_u64(), s["gpuAllocatedBytes"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
}

/// A download that stalls (half its body, then silence; or no answer at all) is aborted after
/// `stallTimeoutMs` and retried, so the load goes on; one that stalls every time is a
/// `network` error naming the file and saying it stalled, at a load and at a swap (the running
/// model keeps its step). The connections given up are freed: the same server serves the
/// next load.
#[wasm_bindgen_test]
async fn stalled_downloads_are_retried_then_typed_errors() {
    let opts = json!({"useCache": false, "stallTimeoutMs": 400, "backend": "cpu"});
    let path = "/net/tiny/manifest.json";
    for mode in ["stall", "hang"] {
        assert_eq!(
            server_get(&format!("/__fail?on=1&mode={mode}&times=1")).await,
            1
        );
        let t0 = js_sys::Date::now();
        let r = engine(path, opts.clone()).await;
        server_get("/__fail?on=0").await;
        let (e, ev) =
            r.unwrap_or_else(|err| panic!("{mode}: one stalled response failed the load: {err}"));
        let secs = (js_sys::Date::now() - t0) / 1000.0;
        assert!(
            secs < 20.0,
            "{mode}: the load took {secs} s (the stall is 60 s)"
        );
        assert_no_errors(&ev);
        call(e.unload()).await.unwrap();
    }

    // Every response of the swap stalls: an error event, the model stays where it was.
    let err = swap_whose_downloads_fail(opts.clone(), "&mode=stall").await;
    assert_eq!(err["code"], "network", "{err}");
    let msg = err["message"].as_str().unwrap();
    assert!(
        msg.contains("stalled") && msg.contains("tried 4 times"),
        "{msg}"
    );

    // A load whose module files never answer.
    assert_eq!(server_get("/__fail?on=1&mode=hang").await, 1);
    let err = engine(path, opts.clone()).await.err();
    server_get("/__fail?on=0").await;
    let err = err.expect("a load whose files never answer failed");
    assert_eq!(err["code"], "network", "{err}");
    assert!(
        err["file"].as_str().unwrap().starts_with("modules/"),
        "{err}"
    );
    let msg = err["message"].as_str().unwrap();
    assert!(
        msg.contains("no data from") && msg.contains("stalled") && msg.contains("tried 4 times"),
        "{msg}"
    );

    // Nothing of it is in the way: the same server serves a load at once.
    let (e, ev) = engine(path, opts).await.unwrap();
    assert_no_errors(&ev);
    call(e.unload()).await.unwrap();
}
