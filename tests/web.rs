//! Browser tests of the runtime (headless Chromium, WebGPU on SwiftShader): the tiny ensemble
//! served by tests/web/server.py, whose URL is baked in at compile time
//! (`FLEXQUANT_TEST_SERVER`; `./build.sh test` starts the server and sets it). Run with
//! `./build.sh test_browser` or see README's "Browser tests".
#![cfg(target_arch = "wasm32")]

use flexquant::web::Engine;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::rc::Rc;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

// `option_env!`, not `env!`: the tests must compile (clippy, `--no-run`) without a server, and
// fail with this message when run without one.
#[allow(clippy::option_env_unwrap)]
fn server() -> &'static str {
    option_env!("FLEXQUANT_TEST_SERVER").expect(
        "FLEXQUANT_TEST_SERVER was not set when the tests were compiled: run them through \
         `./build.sh test` (it starts tests/web/server.py and passes its URL)",
    )
}

fn url(path: &str) -> String {
    format!("{}{path}", server())
}

fn js(v: &Value) -> JsValue {
    flexquant::web::events::to_js(v)
}

fn val(v: JsValue) -> Value {
    serde_wasm_bindgen::from_value(v).unwrap_or(Value::Null)
}

type Events = Rc<RefCell<Vec<Value>>>;

/// An engine with `opts` and an event log; every test uses its own Cache API bucket.
async fn engine(path: &str, mut opts: Value) -> Result<(Engine, Events), Value> {
    let events: Events = Rc::default();
    let log = events.clone();
    let cb = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| log.borrow_mut().push(val(e)));
    if opts.get("cacheName").is_none() {
        opts["cacheName"] = json!(format!("test-{}", js_sys::Math::random()));
    }
    // The WebGPU path unless a test asks otherwise (`auto` picks the CPU on SwiftShader).
    if opts.get("backend").is_none() {
        opts["backend"] = json!("webgpu");
    }
    // The KV cache in f16 throughout unless a test asks otherwise (`null`: the default,
    // 'auto'): the tests of the weight walk squeeze budgets by a few hundred bytes, which the
    // default would meet by converting the cache to int8 instead
    // (`an_auto_kv_cache_goes_to_int8_before_the_model_steps_down` tests that).
    if opts.get("kvCache").is_none() {
        opts["kvCache"] = json!("f16");
    }
    let o = js(&opts);
    js_sys::Reflect::set(&o, &"onEvent".into(), cb.as_ref()).unwrap();
    cb.forget();
    match Engine::create(url(path), o).await {
        Ok(e) => Ok((e, events)),
        Err(e) => Err(error_fields(&e)),
    }
}

fn error_fields(e: &JsValue) -> Value {
    let get = |k: &str| {
        js_sys::Reflect::get(e, &k.into())
            .ok()
            .and_then(|v| v.as_string())
    };
    let num = |k: &str| {
        js_sys::Reflect::get(e, &k.into())
            .ok()
            .and_then(|v| v.as_f64())
    };
    json!({"code": get("code"), "message": get("message"), "name": get("name"), "file": get("file"),
        "promptTokens": num("promptTokens"), "contextTokens": num("contextTokens")})
}

async fn call(p: js_sys::Promise) -> Result<Value, Value> {
    JsFuture::from(p)
        .await
        .map(val)
        .map_err(|e| error_fields(&e))
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

async fn start(e: &Engine, messages: &[Value], max_tokens: usize) {
    let req = json!({"messages": messages, "max_tokens": max_tokens, "temperature": 0.0});
    call(e.start_chat(js(&req))).await.expect("startChat");
}

/// The next chunk's text, or `None` with the final chunk.
async fn chunk(e: &Engine) -> (Option<String>, Value) {
    let c = call(e.next_chunk()).await.expect("nextChunk");
    assert_eq!(c["object"], "chat.completion.chunk", "{c}");
    let ch = &c["choices"][0];
    if ch["finish_reason"].is_null() {
        (
            Some(ch["delta"]["content"].as_str().unwrap().to_string()),
            c,
        )
    } else {
        (None, c)
    }
}

/// Runs the answer to the end: (text, tokens, final chunk).
async fn finish(e: &Engine) -> (String, usize, Value) {
    let (mut text, mut n) = (String::new(), 0);
    loop {
        match chunk(e).await {
            (Some(t), _) => {
                text += &t;
                n += 1;
            }
            (None, last) => {
                // Text held back for a stop sequence that never came ends the answer.
                text += last["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or("");
                assert!(call(e.next_chunk()).await.unwrap().is_null());
                return (text, n, last);
            }
        }
    }
}

fn stats(e: &Engine) -> Value {
    val(e.stats())
}

async fn sleep(ms: i32) {
    let p = js_sys::Promise::new(&mut |r, _| {
        web_sys::window()
            .unwrap()
            .set_timeout_with_callback_and_timeout_and_arguments_0(&r, ms)
            .unwrap();
    });
    JsFuture::from(p).await.unwrap();
}

async fn until_prefetched(e: &Engine) {
    for _ in 0..200 {
        if stats(e)["prefetching"] == false {
            return;
        }
        sleep(25).await;
    }
    panic!("prefetch did not finish: {}", stats(e));
}

async fn server_get(path: &str) -> Value {
    let r: web_sys::Response =
        JsFuture::from(web_sys::window().unwrap().fetch_with_str(&url(path)))
            .await
            .unwrap()
            .into();
    val(JsFuture::from(r.json().unwrap()).await.unwrap())
}

fn of_type(ev: &Events, t: &str) -> Vec<Value> {
    ev.borrow()
        .iter()
        .filter(|e| e["type"] == t)
        .cloned()
        .collect()
}

/// The budget under which `step` is the largest that fits (default policy headroom 10%).
fn budget_for(e: &Engine, step: usize) -> u64 {
    budget_keeping(e, step, 0.9)
}

/// The budget under which `step` is the first a load picks: a load keeps the up-margin free
/// too (`Policy::headroom` 0.10 + `up_margin` 0.05), so `budget_for` would load a deeper step.
fn load_budget_for(e: &Engine, step: usize) -> u64 {
    budget_keeping(e, step, 0.85)
}

/// The smallest budget whose `keep` fraction holds `step` and the engine's overheads.
fn budget_keeping(e: &Engine, step: usize, keep: f64) -> u64 {
    let traj = val(e.trajectory());
    let s = stats(e);
    let cost =
        traj[step]["footprintBytes"].as_u64().unwrap() + s["overheadBytes"].as_u64().unwrap();
    (cost as f64 / keep).ceil() as u64 + 1
}

/// Sets the budget under which `step` is the largest that fits (`budget_for`).
async fn budget_to_step(e: &Engine, step: usize) {
    call(e.set_memory_budget(JsValue::from(budget_for(e, step) as f64)))
        .await
        .unwrap();
}

/// No `error` event so far.
fn assert_no_errors(ev: &Events) {
    let errors = of_type(ev, "error");
    assert!(errors.is_empty(), "{errors:?}");
}

/// `n_up - bits` summed over modules equals the bits the trajectory took off up to `step`.
fn check_bits(e: &Engine) {
    let s = stats(e);
    let step = s["step"].as_u64().unwrap() as usize;
    let traj = val(e.trajectory());
    let removed: u64 = (1..=step)
        .map(|i| traj[i]["fromBits"].as_u64().unwrap() - traj[i]["toBits"].as_u64().unwrap())
        .sum();
    let n_up = traj[1]["fromBits"].as_u64().unwrap().max(4);
    let have: u64 = s["bits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| n_up - b.as_u64().unwrap())
        .sum();
    assert_eq!(have, removed, "bits {} at step {step}", s["bits"]);
}

#[wasm_bindgen_test]
async fn loads_generates_reloads_from_cache_and_unloads() {
    let cache = format!("reload-{}", js_sys::Math::random());
    let (e, ev) = engine("/tiny/manifest.json", json!({"cacheName": cache}))
        .await
        .unwrap();
    let s = stats(&e);
    assert_eq!(s["step"], 0, "no budget: the largest step");
    assert_eq!(s["loadedFromCache"], false);
    assert!(s["adapter"].as_str().unwrap().len() > 2, "{s}");
    let gpu = s["gpuAllocatedBytes"].as_u64().unwrap();
    let model = s["footprintBytes"].as_u64().unwrap() + s["overheadBytes"].as_u64().unwrap();
    assert_eq!(gpu, model, "allocator bytes vs footprint + overheads: {s}");
    let progress = of_type(&ev, "progress");
    assert!(progress.iter().any(|p| p["phase"] == "download"));
    assert_eq!(progress.last().unwrap()["phase"], "ready");

    let conv = [user("Tell me about Elizabeth.")];
    start(&e, &conv, 8).await;
    let (text, n, last) = finish(&e).await;
    let usage = &last["usage"];
    assert_eq!(usage["completion_tokens"], n as u64, "{last}");
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap() + n as u64)
    );
    let reason = last["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(
        (reason == "length" && n == 8) || (reason == "stop" && n < 8),
        "{reason} after {n}"
    );
    // Greedy decoding is deterministic, and a second run reuses the cached prefix.
    start(&e, &conv, 8).await;
    assert_eq!(finish(&e).await.0, text);
    until_prefetched(&e).await;

    // A reload: everything from the Cache API, the same answer.
    let (e2, _) = engine("/tiny/manifest.json", json!({"cacheName": cache}))
        .await
        .unwrap();
    let s2 = stats(&e2);
    assert_eq!(s2["loadedFromCache"], true, "{s2}");
    assert_eq!(s2["networkBytes"], 0, "{s2}");
    start(&e2, &conv, 8).await;
    assert_eq!(finish(&e2).await.0, text);

    call(e.unload()).await.unwrap();
    let s = stats(&e);
    assert_eq!(s["gpuAllocatedBytes"], 0, "{s}");
    assert_eq!(s["gpuBuffers"], 0, "{s}");
    let err = call(e.next_chunk()).await.unwrap_err();
    assert_eq!(err["code"], "unloaded");
    call(e2.unload()).await.unwrap();
}

#[wasm_bindgen_test]
async fn swaps_down_and_up_mid_generation_without_network() {
    let policy = json!({"up_delay_ms": 0.0, "fault_cooldown_ms": 0.0, "max_up_growth": 10.0});
    let (e, ev) = engine("/tiny/manifest.json", json!({"policy": policy}))
        .await
        .unwrap();
    let conv = [user("Once upon a time")];
    start(&e, &conv, 24).await;
    let baseline = finish(&e).await.0;
    until_prefetched(&e).await;
    let steps = stats(&e)["steps"].as_u64().unwrap() as usize;
    let target = steps / 2;
    let budget = budget_for(&e, target);
    call(e.reset_chat()).await.unwrap();

    server_get("/__reset").await;
    start(&e, &conv, 24).await;
    let mut text = String::new();
    for _ in 0..4 {
        text += &chunk(&e).await.0.unwrap();
    }
    assert!(baseline.starts_with(&text), "{baseline:?} vs {text:?}");
    call(e.set_memory_budget(JsValue::from(budget as f64)))
        .await
        .unwrap();
    assert_eq!(stats(&e)["step"], 0, "the swap waits for the next token");
    text += &chunk(&e).await.0.unwrap();
    let s = stats(&e);
    assert_eq!(s["step"], target as u64, "{s}");
    let used = s["footprintBytes"].as_u64().unwrap() + s["overheadBytes"].as_u64().unwrap();
    assert!(
        used as f64 <= budget as f64 * 0.9,
        "{used} over budget {budget}"
    );
    assert_eq!(s["gpuAllocatedBytes"].as_u64(), Some(used), "{s}");
    check_bits(&e);
    let swaps = of_type(&ev, "swap");
    assert_eq!(swaps.len(), 1, "{swaps:?}");
    let sw = &swaps[0];
    assert_eq!(
        (sw["from"].as_u64(), sw["to"].as_u64()),
        (Some(0), Some(target as u64))
    );
    assert_eq!(sw["reason"], "budget");
    assert_eq!(sw["tokenIndex"], 4, "swapped between tokens 4 and 5");
    assert_eq!(sw["modules"].as_array().unwrap().len(), target);
    assert!(sw["module"].as_str().unwrap().starts_with('L'));
    // The shards the swap used came from the prefetched cache (the prefetch of the steps
    // below `target` may be fetching others by now).
    let manifest = server_get("/tiny/manifest.json").await;
    for m in sw["modules"].as_array().unwrap() {
        let v = manifest["modules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| {
                format!("L{}.{}", v["layer"], v["kind"].as_str().unwrap()) == m["module"]
                    && v["bits"] == m["toBits"]
            })
            .unwrap();
        let path = format!("/__count?prefix=/tiny/{}", v["file"].as_str().unwrap());
        assert_eq!(server_get(&path).await, 0, "{m} came from the network");
    }

    for _ in 0..3 {
        text += &chunk(&e).await.0.unwrap();
    }
    call(e.set_memory_budget(JsValue::NULL)).await.unwrap();
    text += &chunk(&e).await.0.unwrap();
    let s = stats(&e);
    assert_eq!(s["step"], 0, "memory free again: back at the top: {s}");
    check_bits(&e);
    let swaps = of_type(&ev, "swap");
    assert_eq!(swaps.len(), 2);
    assert_eq!(swaps[1]["reason"], "memory_free");
    assert_eq!(swaps[1]["tokenIndex"], 8);
    let (rest, n, last) = finish(&e).await;
    text += &rest;
    assert_eq!(last["usage"]["completion_tokens"], (9 + n) as u64);
    assert_eq!(last["usage"]["extra"]["swaps"], 2);
    assert_no_errors(&ev);
    call(e.unload()).await.unwrap();
}

#[wasm_bindgen_test]
async fn device_loss_recovers_with_the_conversation() {
    let (e, ev) = engine("/tiny/manifest.json", json!({})).await.unwrap();
    let mut conv = vec![user("Hello")];
    start(&e, &conv, 6).await;
    let (a1, _, _) = finish(&e).await;
    conv.push(json!({"role": "assistant", "content": a1}));
    conv.push(user("And then?"));
    start(&e, &conv, 12).await;
    for _ in 0..3 {
        chunk(&e).await.0.unwrap();
    }
    let before = stats(&e);
    let cached = before["contextTokens"].as_u64().unwrap();
    call(e.simulate_device_loss()).await.unwrap();
    let lost = of_type(&ev, "device-lost");
    let rec = of_type(&ev, "recovered");
    assert_eq!((lost.len(), rec.len()), (1, 1), "{:?}", ev.borrow());
    assert_eq!(
        rec[0]["reprefilledTokens"], cached,
        "the whole conversation re-prefilled"
    );
    let s = stats(&e);
    assert!(
        s["step"].as_u64() > Some(0),
        "recovered at a lower step: {s}"
    );
    assert_eq!(s["deviceLosses"], 1);
    assert_eq!(s["contextTokens"], cached);
    check_bits(&e);
    // The answer goes on where it was.
    let (_, n, last) = finish(&e).await;
    assert_eq!(last["usage"]["completion_tokens"], (3 + n) as u64, "{last}");
    // And the conversation goes on with prefix reuse on the new device.
    conv.push(json!({"role": "assistant", "content": "..."}));
    conv.push(user("Thanks"));
    start(&e, &conv, 4).await;
    finish(&e).await;
    assert_no_errors(&ev);
    call(e.unload()).await.unwrap();
}

/// A shard that fails verification (flipped byte, or cut short) is rejected with a typed
/// error, never stored, and the engine goes on at its current step.
#[wasm_bindgen_test]
async fn bad_shards_are_rejected_and_the_engine_stays_usable() {
    // The same version bad as a file of its own, cut short, longer than declared (refused
    // as the bytes past the declared size arrive), or inside a pack (a pack's other files
    // verify and are used).
    for (view, code, ensemble) in [
        ("corrupt", "hash-mismatch", "tiny"),
        ("truncated", "truncated", "tiny"),
        ("long", "truncated", "tiny"),
        ("corrupt", "hash-mismatch", "packed"),
    ] {
        let cache = format!("{view}-{}", js_sys::Math::random());
        let path = format!("/{view}/{ensemble}/manifest.json");
        let (e, ev) = engine(&path, json!({"cacheName": cache})).await.unwrap();
        until_prefetched(&e).await;
        // The prefetch (or the kernel warm-up) met the bad shard.
        let errors = of_type(&ev, "error");
        let seen = errors.len();
        assert!(seen >= 1, "{errors:?}");
        assert!(
            errors.iter().all(|e| e["error"]["code"] == code),
            "{errors:?}"
        );
        let file = errors[0]["error"]["file"].as_str().unwrap().to_string();
        let message = errors[0]["error"]["message"].as_str().unwrap();
        assert!(message.contains(&file), "{message}");
        if ensemble == "packed" {
            assert!(
                message.contains("in pack ") && file.starts_with("modules/"),
                "{message}"
            );
        }
        if view == "long" {
            assert!(message.contains("bytes expected"), "{message}");
        }

        start(&e, &[user("Hi")], 6).await;
        chunk(&e).await.0.unwrap();
        let context = stats(&e)["contextTokens"].clone();
        call(e.set_memory_budget(JsValue::from(budget_for(&e, 1) as f64)))
            .await
            .unwrap();
        chunk(&e).await.0.unwrap();
        let s = stats(&e);
        assert_eq!(s["step"], 0, "the swap to step 1 needs the bad shard: {s}");
        let errors = of_type(&ev, "error");
        assert_eq!(errors.len(), seen + 1, "{errors:?}");
        assert_eq!(errors[seen]["error"]["code"], code);
        assert_eq!(errors[seen]["error"]["file"], file.as_str());
        assert_eq!(
            s["contextTokens"].as_u64(),
            Some(context.as_u64().unwrap() + 1)
        );
        let (_, _, last) = finish(&e).await;
        assert_eq!(last["usage"]["completion_tokens"], 6);

        // Not in the cache: a bad download is never stored.
        let traj = val(e.trajectory());
        let caches: web_sys::CacheStorage = web_sys::window().unwrap().caches().unwrap();
        let c: web_sys::Cache = JsFuture::from(caches.open(&cache)).await.unwrap().into();
        let (keys, mut bad) = (JsFuture::from(c.keys()).await.unwrap(), 0);
        let keys: js_sys::Array = keys.into();
        for k in keys.iter() {
            let k: web_sys::Request = k.into();
            bad += k.url().contains(&file) as usize;
        }
        assert_eq!(bad, 0, "{file} was stored; step 1 is {}", traj[1]);
        assert!(keys.length() > 3, "the good files were stored");
        call(e.unload()).await.unwrap();
    }
}

/// A shard the server does not have (404) is handled like one that fails verification: a
/// load under a budget whose step needs it falls back to a deeper step without it, with a
/// warning naming it, and the model answers.
#[wasm_bindgen_test]
async fn a_missing_shard_makes_a_load_fall_back_like_a_corrupt_one() {
    let (probe, _) = engine("/tiny/manifest.json", json!({"backend": "cpu"}))
        .await
        .unwrap();
    let budget = load_budget_for(&probe, 1);
    call(probe.unload()).await.unwrap();
    let (e, ev) = engine(
        "/missing/tiny/manifest.json",
        json!({"backend": "cpu", "budgetBytes": budget}),
    )
    .await
    .expect("a deeper step loads");
    let s = stats(&e);
    assert!(s["step"].as_u64().unwrap() > 1, "{s}");
    let missing: Vec<Value> = of_type(&ev, "error")
        .into_iter()
        .filter(|x| {
            x["error"]["code"] == "http"
                && x["error"]["message"].as_str().unwrap().contains("HTTP 404")
        })
        .collect();
    assert!(!missing.is_empty(), "{:?}", of_type(&ev, "error"));
    let file = missing[0]["error"]["file"].as_str().unwrap();
    assert!(file.starts_with("modules/"), "{file}");
    start(&e, &[user("Hi")], 3).await;
    let (_, n, _) = finish(&e).await;
    assert!(n >= 1);
    call(e.unload()).await.unwrap();
}

/// Requests so far whose path starts with `prefix` (tests/web/server.py's `/__count`).
async fn requests(prefix: &str) -> u64 {
    server_get(&format!("/__count?prefix={prefix}"))
        .await
        .as_u64()
        .unwrap()
}

/// A nested ensemble (one bit-plane file per module, manifest version 4): once step 0 is
/// loaded and its files stored, a walk to the last step, back and half-way makes no request; each step
/// holds exactly its packed footprint (the dropped planes' memory is freed), and step 0
/// answers as before.
#[wasm_bindgen_test]
async fn nested_ensembles_walk_every_step_without_another_download() {
    let manifest = server_get("/nested/manifest.json").await;
    assert_eq!(manifest["version"], 4);
    let conv = [user("Tell me about Elizabeth.")];
    let cache = format!("nested-{}", js_sys::Math::random());
    let policy = json!({"up_delay_ms": 0.0, "fault_cooldown_ms": 0.0, "max_up_growth": 100.0});
    let opts = json!({"backend": "cpu", "cacheName": cache, "policy": policy});
    let (e, ev) = engine("/nested/manifest.json", opts).await.unwrap();
    start(&e, &conv, 8).await;
    let want = finish(&e).await.0;
    until_prefetched(&e).await;
    let (requests_before, net_before) = (
        requests("/nested/").await,
        stats(&e)["networkBytes"].as_u64().unwrap(),
    );
    let traj = val(e.trajectory());
    let last = traj.as_array().unwrap().len() - 1;
    // Down to the last step, back up (a step up under a budget needs the policy's up margin
    // above its cost: here the budget is lifted), then down half-way.
    for step in [last, 0, last / 2] {
        if step == 0 {
            call(e.set_memory_budget(JsValue::NULL)).await.unwrap();
        } else {
            budget_to_step(&e, step).await;
        }
        start(&e, &[user("Hi")], 2).await;
        finish(&e).await;
        let s = stats(&e);
        assert_eq!(s["step"], step as u64, "{s}");
        assert_eq!(s["footprintBytes"], traj[step]["footprintBytes"], "{s}");
        check_bits(&e);
    }
    assert_eq!(
        requests("/nested/").await,
        requests_before,
        "a step of a nested ensemble was fetched again"
    );
    assert_eq!(stats(&e)["networkBytes"].as_u64().unwrap(), net_before);
    call(e.set_memory_budget(JsValue::NULL)).await.unwrap();
    start(&e, &[user("Hi")], 2).await;
    finish(&e).await;
    assert_eq!(stats(&e)["step"], 0);
    start(&e, &conv, 8).await;
    assert_eq!(finish(&e).await.0, want, "step 0 again answers as before");
    assert_no_errors(&ev);
    call(e.unload()).await.unwrap();
}

/// A packed ensemble (`ensemble::pack`): the loader fetches packs, never the files in them,
/// each pack at most once over a load, the prefetch and a walk to the last step and back; the
/// answer is the unpacked ensemble's.
#[wasm_bindgen_test]
async fn packed_ensembles_fetch_each_pack_once_and_answer_as_unpacked() {
    let conv = [user("Tell me about Elizabeth.")];
    let (plain, _) = engine("/tiny/manifest.json", json!({"backend": "cpu"}))
        .await
        .unwrap();
    start(&plain, &conv, 8).await;
    let want = finish(&plain).await.0;
    call(plain.unload()).await.unwrap();

    let manifest = server_get("/packed/manifest.json").await;
    let packs = manifest["packs"].as_array().unwrap().clone();
    assert!(packs.len() > 3, "{} packs", packs.len());
    server_get("/__reset").await;
    let cache = format!("packed-{}", js_sys::Math::random());
    let opts = json!({"backend": "cpu", "cacheName": cache});
    let (e, ev) = engine("/packed/manifest.json", opts.clone()).await.unwrap();
    let at_ready = requests("/packed/packs/").await;
    assert!(
        at_ready >= 1 && at_ready < packs.len() as u64,
        "{at_ready} of {} packs for step 0",
        packs.len()
    );
    start(&e, &conv, 8).await;
    assert_eq!(finish(&e).await.0, want);
    until_prefetched(&e).await;
    // Down to the last step (each version from a pack or the cache) and back.
    let last = val(e.trajectory()).as_array().unwrap().len() - 1;
    budget_to_step(&e, last).await;
    start(&e, &conv, 2).await;
    finish(&e).await;
    assert_eq!(stats(&e)["step"], last as u64);
    call(e.set_memory_budget(JsValue::NULL)).await.unwrap();
    start(&e, &[user("Hi")], 2).await;
    finish(&e).await;
    assert_eq!(
        requests("/packed/modules/").await,
        0,
        "no file of a pack is fetched alone"
    );
    for p in &packs {
        let n = requests(&format!("/packed/{}", p["file"].as_str().unwrap())).await;
        assert!(n <= 1, "{p} fetched {n} times");
    }
    // The base and the tokenizer are in packs too: the network brought packs only, nothing
    // twice.
    for k in ["base", "tokenizer"] {
        assert!(manifest[k]["pack"].is_object(), "{k}: {}", manifest[k]);
        let alone = format!("/packed/{}", manifest[k]["file"].as_str().unwrap());
        assert_eq!(requests(&alone).await, 0, "{alone} fetched alone");
    }
    let stored: u64 = packs.iter().map(|p| p["bytes"].as_u64().unwrap()).sum();
    let net = stats(&e)["networkBytes"].as_u64().unwrap();
    assert!(
        net <= stored,
        "{net} bytes from the network, {stored} stored"
    );
    assert_no_errors(&ev);
    call(e.unload()).await.unwrap();

    // The files of the packs were cached one by one: a reload fetches nothing and answers
    // the same.
    let (e, ev) = engine("/packed/manifest.json", opts).await.unwrap();
    let s = stats(&e);
    assert_eq!(s["networkBytes"], 0, "{s}");
    start(&e, &conv, 8).await;
    assert_eq!(finish(&e).await.0, want);
    assert_no_errors(&ev);
    call(e.unload()).await.unwrap();
}

/// Starts an answer on `/net/tiny` with `opts`, turns the server's failure `fail` on (a
/// `/__fail` query) and cuts the budget to step 3, so the swap's downloads fail; the answer
/// ends at step 0 with all its tokens. Returns the one `error` event's error.
async fn swap_whose_downloads_fail(opts: Value, fail: &str) -> Value {
    let (e, ev) = engine("/net/tiny/manifest.json", opts).await.unwrap();
    start(&e, &[user("Hi")], 5).await;
    chunk(&e).await.0.unwrap();
    assert_eq!(server_get(&format!("/__fail?on=1{fail}")).await, 1);
    let budget = budget_for(&e, 3);
    call(e.set_memory_budget(JsValue::from(budget as f64)))
        .await
        .unwrap();
    chunk(&e).await.0.unwrap();
    server_get("/__fail?on=0").await;
    let errors = of_type(&ev, "error");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(stats(&e)["step"], 0);
    let (_, _, last) = finish(&e).await;
    assert_eq!(last["usage"]["completion_tokens"], 5);
    call(e.unload()).await.unwrap();
    errors[0]["error"].clone()
}

#[wasm_bindgen_test]
async fn network_error_mid_swap_keeps_the_current_step() {
    let err = swap_whose_downloads_fail(json!({"useCache": false}), "").await;
    assert_eq!(err["code"], "network", "{err}");
}

#[wasm_bindgen_test]
async fn bad_manifests_and_urls_are_typed_errors() {
    let cases = [
        ("/missing/manifest.json".to_string(), "manifest-not-found"),
        ("/v99/tiny/manifest.json".to_string(), "manifest-version"),
        (
            "/garbage/tiny/manifest.json".to_string(),
            "manifest-invalid",
        ),
    ];
    for (path, code) in cases {
        let err = engine(&path, json!({})).await.err().expect(&path);
        assert_eq!(err["code"], code, "{path}: {err}");
        assert_eq!(err["name"], "FlexQuantError");
        assert!(
            err["message"].as_str().unwrap().contains("manifest"),
            "{err}"
        );
    }
    let o = js(&json!({"useCache": false}));
    let err = Engine::create("http://127.0.0.1:9/manifest.json".into(), o)
        .await
        .err()
        .unwrap();
    assert_eq!(error_fields(&err)["code"], "network");
    // Bad options fail before any fetch, naming the key.
    let bad = [
        (json!({"budgetBytes": -5}), "options.budgetBytes"),
        (json!({"context": "long"}), "options.context"),
        (
            json!({"policy": {"headroom": "x"}}),
            "options.policy.headroom",
        ),
        (json!({"onEvent": 3}), "options.onEvent"),
    ];
    for (opts, key) in bad {
        let err = Engine::create(url("/tiny/manifest.json"), js(&opts))
            .await
            .err()
            .expect(key);
        let err = error_fields(&err);
        assert_eq!(err["code"], "input", "{opts}: {err}");
        assert!(err["message"].as_str().unwrap().contains(key), "{err}");
    }
}

/// The manifest reader where it runs for real, in wasm32 (32-bit usize): the tiny ensemble's
/// real manifest, hand-made bad ones, and 2000 mutants from the fuzzer's seeded mutator are
/// read without a panic, and every rejection names the file.
#[wasm_bindgen_test]
async fn manifest_reader_survives_real_and_mutated_manifests() {
    use flexquant::fuzz::{mutate::Mutator, targets};
    let real = server_get("/tiny/manifest.json").await;
    let bytes = serde_json::to_vec_pretty(&real).unwrap();
    targets::manifest(&bytes).unwrap();
    targets::manifest(&serde_json::to_vec(&real).unwrap()).unwrap();
    let bad = |edit: &dyn Fn(&mut Value), needle: &str| {
        let mut m = real.clone();
        edit(&mut m);
        let e = targets::manifest(&serde_json::to_vec(&m).unwrap())
            .expect_err(needle)
            .to_string();
        assert!(
            e.starts_with("manifest.json") && e.contains(needle),
            "{needle}: {e}"
        );
    };
    bad(&|m| m["version"] = json!(99), "version");
    bad(
        &|m| m["modules"][0]["bytes"] = json!(u64::MAX),
        "absurd size",
    );
    bad(&|m| m["modules"][0]["bytes"] = json!(4), "bytes, but a");
    bad(
        &|m| m["trajectory"][1]["footprint_bytes"] = json!(1),
        "footprint",
    );
    bad(
        &|m| m["config"]["vocab_size"] = json!(1u64 << 40),
        "vocab_size",
    );
    bad(&|m| m["config"]["num_hidden_layers"] = json!(1024), "");
    bad(
        &|m| m["base"]["file"] = json!("../base.bin"),
        "unsafe file name",
    );
    let huge = vec![b' '; flexquant::ensemble::manifest::MAX_MANIFEST_BYTES + 1];
    assert!(targets::manifest(&huge).is_err());
    let mut mutator = Mutator::new(14, bytes.len() * 2 + 4096);
    let (mut out, mut accepted) = (Vec::new(), 0);
    for _ in 0..2000 {
        mutator.mutate(&bytes, &bytes, true, &mut out);
        match targets::manifest(&out) {
            Ok(()) => accepted += 1,
            Err(e) => assert!(e.to_string().starts_with("manifest.json"), "{e}"),
        }
    }
    assert!(accepted < 2000, "{accepted}");
}

#[wasm_bindgen_test]
async fn a_full_cache_is_reported_and_loading_goes_on() {
    let (e, ev) = engine("/tiny/manifest.json", json!({"cacheQuotaBytes": 4000}))
        .await
        .unwrap();
    // The first load's files are stored once the model runs (then the prefetch).
    until_prefetched(&e).await;
    let errors = of_type(&ev, "error");
    assert!(!errors.is_empty());
    assert!(
        errors
            .iter()
            .all(|x| x["error"]["code"] == "quota-exceeded"),
        "{errors:?}"
    );
    start(&e, &[user("Hi")], 3).await;
    let (_, _, last) = finish(&e).await;
    assert!(last["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
    call(e.unload()).await.unwrap();
}

#[wasm_bindgen_test]
async fn js_heap_pressure_steps_down() {
    let (e, ev) = engine("/tiny/manifest.json", json!({})).await.unwrap();
    let s = stats(&e);
    let cost = s["footprintBytes"].as_u64().unwrap() + s["overheadBytes"].as_u64().unwrap();
    // A heap reading that leaves room for the middle step only (default policy: the heap
    // may grow to 90% of its limit; 10% headroom).
    let steps = s["steps"].as_u64().unwrap() as usize;
    let mid = steps / 2;
    let traj = val(e.trajectory());
    let overhead = s["overheadBytes"].as_u64().unwrap() as f64;
    let mid_cost = traj[mid]["footprintBytes"].as_u64().unwrap() as f64 + overhead;
    let cap = mid_cost / 0.9 + 1.0;
    let limit = 20.0 * cost as f64;
    let used = 0.9 * limit - (cap - cost as f64);
    e.report_heap(used, limit);
    assert_eq!(call(e.rebalance()).await.unwrap(), true);
    let s = stats(&e);
    assert_eq!(s["step"], mid as u64, "{s}");
    assert!(
        (s["heapRatio"].as_f64().unwrap() - used / limit).abs() < 1e-6,
        "{s}"
    );
    let swaps = of_type(&ev, "swap");
    assert_eq!(swaps[0]["reason"], "heap_pressure", "{swaps:?}");
    check_bits(&e);
    start(&e, &[user("Hi")], 3).await;
    assert!(finish(&e).await.1 >= 1);
    call(e.unload()).await.unwrap();
}

/// A device lost behind the engine's back (no `simulateDeviceLoss`): the `device.lost`
/// callback or the failing token tells it, and the answer goes on after a rebuild.
#[wasm_bindgen_test]
async fn a_device_lost_behind_the_engines_back_is_noticed_and_recovered() {
    let (e, ev) = engine("/tiny/manifest.json", json!({})).await.unwrap();
    start(&e, &[user("Once upon a time")], 10).await;
    for _ in 0..3 {
        chunk(&e).await.0.unwrap();
    }
    let cached = stats(&e)["contextTokens"].as_u64().unwrap();
    e.destroy_device().unwrap();
    let (_, n, last) = finish(&e).await;
    assert_eq!(last["usage"]["completion_tokens"], (3 + n) as u64, "{last}");
    let rec = of_type(&ev, "recovered");
    assert_eq!(
        (of_type(&ev, "device-lost").len(), rec.len()),
        (1, 1),
        "{:?}",
        ev.borrow()
    );
    assert_eq!(rec[0]["reprefilledTokens"], cached);
    let s = stats(&e);
    assert_eq!(s["deviceLosses"], 1);
    assert!(s["step"].as_u64() > Some(0), "{s}");
    assert_no_errors(&ev);
    call(e.unload()).await.unwrap();
}

/// A packed matrix with codes from a hash of their index and varied (scale, zero) per group.
fn test_matrix(
    rows: usize,
    cols: usize,
    bits: u32,
    group: usize,
) -> flexquant::ensemble::format::PackedMatrix {
    use flexquant::ensemble::format::{PackedMatrix, PackedShape};
    let shape = PackedShape::new(rows, cols, bits, group).unwrap();
    let codes: Vec<u8> = (0..rows * cols)
        .map(|i| ((i.wrapping_mul(2654435761) >> 7) % (1 << bits)) as u8)
        .collect();
    let sz: Vec<(f32, f32)> = (0..shape.scale_words())
        .map(|g| (0.01 + (g % 7) as f32 * 0.003, -0.05 + (g % 5) as f32 * 0.02))
        .collect();
    PackedMatrix::from_codes(shape, &codes, &sz)
}

/// The packed CPU backend's kernel in wasm (simd128) against the weights its codes mean, for
/// every bit-width and group size on an odd shape, and the plane-reading kernel against it.
#[wasm_bindgen_test]
fn cpu_kernel_matches_fake_quant_in_wasm() {
    use flexquant::cpu::act::Q16;
    use flexquant::cpu::kernel::matmul;
    use flexquant::cpu::planes::{matmul_planes, quantize_for};
    use flexquant::ensemble::format::{BITS, GROUP_SIZES};
    use flexquant::ensemble::plane_level::PlaneLevel;
    let (rows, cols, t) = (13, 150, 5);
    for bits in BITS {
        for group in GROUP_SIZES {
            let m = test_matrix(rows, cols, bits, group);
            let wd = m.dequantize();
            let x: Vec<f32> = (0..t * cols)
                .map(|i| ((i * 7919 % 201) as f32 - 100.0) / 50.0)
                .collect();
            let a = Q16::quantize(&x, t, &m.shape);
            let mut y = vec![0f32; t * rows];
            matmul(&m, &a, &mut y);
            // The plane-reading kernel (simd128 too) computes the same integer dot products;
            // its f32 lanes hold other columns than the packed kernel's (another lane order),
            // so the sums agree to f32 rounding, exactly where the orders are the same.
            let p = PlaneLevel::from_packed(&m);
            assert_eq!(
                p.to_packed(),
                m,
                "{bits} bits, group {group}: planes repacked"
            );
            let mut yp = vec![0f32; t * rows];
            matmul_planes(&p, &quantize_for(&p, &x, t), &mut yp);
            let diff = yp
                .iter()
                .zip(&y)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                diff <= 1e-5 * scale,
                "{bits} bits, group {group}: plane kernel off by {diff}"
            );
            if [5, 8].contains(&bits) {
                assert_eq!(
                    yp, y,
                    "{bits} bits, group {group}: same lane order, same outputs"
                );
            }
            let (mut err, mut norm) = (0f64, 0f64);
            for k in 0..t {
                for r in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|c| wd[r * cols + c] as f64 * x[k * cols + c] as f64)
                        .sum();
                    err += (y[k * rows + r] as f64 - want).powi(2);
                    norm += want * want;
                }
            }
            let rel = (err / norm).sqrt();
            assert!(rel < 1e-4, "{bits} bits, group {group}: error {rel:.2e}");
        }
    }
}

/// The KV cache widened in wasm (simd128, a vector at a time, then element by element)
/// against the scalar widening: every f16 bit pattern, bit for bit; int8 codes times their
/// group's scale, heads whose length is not a multiple of the vector.
#[wasm_bindgen_test]
fn kv_widening_in_wasm_equals_the_scalar_widening() {
    use flexquant::cpu::kv::{widen_f16, widen_head};
    use flexquant::runtime::backend::{KvFormat, KvLayout};
    let all: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    for hd in [65536, 61, 64, 8, 3] {
        let layout = KvLayout {
            format: KvFormat::F16,
            head_dim: hd,
            group: hd,
        };
        for head in all.chunks_exact(2 * hd).take(4) {
            let mut out = vec![f32::NAN; hd];
            widen_head(head, &layout, &mut out);
            for (i, (o, h)) in out.iter().zip(head.chunks_exact(2)).enumerate() {
                let want = widen_f16(u16::from_le_bytes([h[0], h[1]]));
                assert_eq!(o.to_bits(), want.to_bits(), "f16 head of {hd}, element {i}");
            }
        }
    }
    for (hd, group) in [(64, 32), (40, 40), (96, 32), (7, 7)] {
        let layout = KvLayout {
            format: KvFormat::Int8,
            head_dim: hd,
            group,
        };
        let mut head: Vec<u8> = (0..hd).map(|i| (i * 37 + 11) as u8).collect();
        let scales: Vec<f32> = (0..hd / group).map(|g| 0.5 + g as f32 * 1.25).collect();
        scales
            .iter()
            .for_each(|s| head.extend_from_slice(&s.to_le_bytes()));
        let mut out = vec![f32::NAN; hd];
        widen_head(&head, &layout, &mut out);
        for (i, o) in out.iter().enumerate() {
            let want = (head[i] as i8) as f32 * (scales[i / group] / 127.0);
            assert_eq!(
                o.to_bits(),
                want.to_bits(),
                "int8 head of {hd}, element {i}"
            );
        }
    }
}

/// The CPU backend's attention in wasm (simd128: tiles of keys and values widened from the
/// stored f16 or int8 bytes) against a plain f64 softmax attention over the same stored cache
/// widened, decode past several key ranges and a prefill block, grouped heads; head sizes that
/// take every vector loop whole (64), partly (40: keys 8 lanes at a time, values 16 with 8 left)
/// and not at all (20: keys scalar).
#[wasm_bindgen_test]
fn cpu_attention_matches_the_widened_cache_in_wasm() {
    for (nh, nkv, hd) in [(9, 3, 64), (4, 2, 40), (2, 1, 20)] {
        attention_matches_the_widened_cache(nh, nkv, hd);
    }
}

fn attention_matches_the_widened_cache(nh: usize, nkv: usize, hd: usize) {
    use flexquant::cpu::attention::{attention, Cached};
    use flexquant::cpu::kv::{store, widened};
    use flexquant::runtime::backend::{KvFormat, KvLayout};
    let c: flexquant::model::LlamaConfig = serde_json::from_value(json!({
        "hidden_size": nh * hd, "intermediate_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": nh, "num_key_value_heads": nkv, "vocab_size": 8,
    }))
    .unwrap();
    let noise = |seed: usize, n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104729) % 2001) as f32 - 1000.0) / 400.0)
            .collect()
    };
    for (pos0, t) in [(600, 1), (70, 5)] {
        for format in [KvFormat::F16, KvFormat::Int8] {
            let layout = KvLayout::of(&c, format);
            let keys = pos0 + t;
            let stored = |seed| {
                let mut b = vec![0u8; keys * nkv * layout.head_bytes()];
                store(&noise(seed, keys * nkv * hd), &layout, &mut b);
                b
            };
            let (k, v) = (stored(1), stored(2));
            let (kw, vw) = (widened(&k, &layout), widened(&v, &layout));
            let q = noise(3, t * nh * hd);
            let mut got = vec![f32::NAN; t * nh * hd];
            let cache = Cached {
                k: &k,
                v: &v,
                layout: &layout,
            };
            attention(&c, &q, &cache, pos0, &mut got);
            let (mut err, mut norm) = (0f64, 0f64);
            for tok in 0..t {
                for h in 0..nh {
                    let kvh = h / (nh / nkv);
                    let qh = &q[(tok * nh + h) * hd..][..hd];
                    let seen = pos0 + tok + 1;
                    let s: Vec<f64> = (0..seen)
                        .map(|j| {
                            let kj = &kw[(j * nkv + kvh) * hd..][..hd];
                            qh.iter()
                                .zip(kj)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let l: f64 = w.iter().sum();
                    for d in 0..hd {
                        let want: f64 = (0..seen)
                            .map(|j| w[j] * vw[(j * nkv + kvh) * hd + d] as f64)
                            .sum::<f64>()
                            / l;
                        err += (got[(tok * nh + h) * hd + d] as f64 - want).powi(2);
                        norm += want * want;
                    }
                }
            }
            let rel = (err / norm).sqrt();
            assert!(
                rel < 1e-5,
                "head {hd}, {format:?}, pos0 {pos0}, {t} tokens: {rel:.2e}"
            );
        }
    }
}

/// A residual stream x of `cols` values, RMSNorm weights g around 1 and 1 / rms(x) in f64:
/// the input of the matvecs with the norm folded in.
fn norm_input(cols: usize, eps: f32) -> (Vec<f32>, Vec<f32>, f64) {
    let x: Vec<f32> = (0..cols)
        .map(|i| ((i * 7919 % 201) as f32 - 100.0) / 25.0)
        .collect();
    let g: Vec<f32> = (0..cols).map(|i| 0.5 + (i % 11) as f32 / 10.0).collect();
    let inv = 1.0
        / (x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / cols as f64 + eps as f64).sqrt();
    (x, g, inv)
}

/// The WGSL matvec with the RMSNorm before it folded in (what decode runs on GPUs) compiled by
/// Chromium's WebGPU, not naga: against the dequantized matrix times RMSNorm(x) * g in f64,
/// for a row per thread (CPU adapters) and a row shared by 32 threads (GPUs), on an odd shape.
#[wasm_bindgen_test]
async fn the_matvec_with_the_norm_folded_in_matches_the_cpu_in_webgpu() {
    use flexquant::gpu::kernels::{Kernel, Kernels};
    use flexquant::gpu::params::QlinearParams;
    use flexquant::gpu::{probe, Gpu, Requirements};
    let gpu = Gpu::new(Requirements::default())
        .await
        .expect("a WebGPU adapter");
    let (rows, cols, eps) = (67usize, 100usize, 1e-5f32);
    let (x, g, inv) = norm_input(cols, eps);
    for bits in [3, 4, 8] {
        let m = test_matrix(rows, cols, bits, 32);
        let shape = m.shape;
        let wd = m.dequantize();
        let (want, scale): (Vec<f64>, Vec<f64>) = (0..rows)
            .map(|r| {
                let terms =
                    (0..cols).map(|c| wd[r * cols + c] as f64 * x[c] as f64 * inv * g[c] as f64);
                (
                    terms.clone().sum::<f64>(),
                    terms.map(f64::abs).sum::<f64>() + 1e-9,
                )
            })
            .unzip();
        let words: Vec<u32> = m.codes.iter().chain(&m.scales).copied().collect();
        let params = QlinearParams {
            eps,
            ..QlinearParams::dense(shape)
        };
        for (tpr, rpt) in [(1, 4), (32, 1)] {
            let mut k = Kernels::with_matvec(tpr, rpt).unwrap();
            let grid = [(rows as u32).div_ceil(k.matvec_rows_per_workgroup()), 1, 1];
            let out = probe::run(
                &gpu,
                &mut k,
                Kernel::MatvecNorm(bits),
                &params,
                (1, 0),
                &[
                    bytemuck::cast_slice(&words),
                    bytemuck::cast_slice(&x),
                    bytemuck::cast_slice(&g),
                ],
                &[bytemuck::cast_slice(&vec![0f32; rows])],
                grid,
            )
            .await
            .unwrap();
            let got: Vec<f32> = out[0]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let err = got
                .iter()
                .zip(want.iter().zip(&scale))
                .map(|(a, (w, s))| (*a as f64 - w).abs() / s)
                .fold(0.0, f64::max);
            assert!(
                err < 1e-5,
                "{bits} bits, {tpr} threads x {rpt} rows: normalized error {err:.2e}"
            );
        }
    }
}

/// The kernels of several matrices in one dispatch (decode's Q, K and V; its gate and up
/// projections, storing SwiGLU's product), each matrix decoded at its own bit-width at run
/// time, compiled by Chromium's WebGPU (whose uniformity analysis is stricter than naga's):
/// against the dequantized matrices times RMSNorm(x) * g in f64, a row per thread and a row
/// shared by 32 threads (its workgroup-memory sums behind barriers).
#[wasm_bindgen_test]
async fn the_fused_qkv_and_gate_up_matvecs_match_the_cpu_in_webgpu() {
    use flexquant::gpu::kernels::{Kernel, Kernels};
    use flexquant::gpu::params::{QlinearParams, QlinearPartsParams};
    use flexquant::gpu::{probe, Gpu, Requirements};
    let gpu = Gpu::new(Requirements::default())
        .await
        .expect("a WebGPU adapter");
    let (cols, eps) = (100usize, 1e-5f32);
    let (x, g, inv) = norm_input(cols, eps);
    let xn: Vec<f64> = (0..cols).map(|c| x[c] as f64 * inv * g[c] as f64).collect();
    // (rows, bits) of each matrix; the gate and up share their rows.
    for (glu, members) in [
        (false, vec![(67usize, 3u32), (19, 8), (35, 4)]),
        (true, vec![(67, 4), (67, 2)]),
    ] {
        let mut params = QlinearPartsParams::default();
        let mut words: Vec<Vec<u32>> = Vec::new();
        let mut sums: Vec<Vec<(f64, f64)>> = Vec::new();
        for (i, &(rows, bits)) in members.iter().enumerate() {
            let m = test_matrix(rows, cols, bits, 32);
            let wd = m.dequantize();
            sums.push(
                (0..rows)
                    .map(|r| {
                        let t = (0..cols).map(|c| wd[r * cols + c] as f64 * xn[c]);
                        (t.clone().sum::<f64>(), t.map(f64::abs).sum::<f64>() + 1e-9)
                    })
                    .collect(),
            );
            params.parts[i] = QlinearParams {
                eps,
                ..QlinearParams::dense(m.shape)
            };
            words.push(m.codes.iter().chain(&m.scales).copied().collect());
        }
        let want = kernel_ref::fused_want(glu, sums);
        let mut inputs: Vec<&[u8]> = words.iter().map(|w| bytemuck::cast_slice(w)).collect();
        inputs.extend([bytemuck::cast_slice(&x), bytemuck::cast_slice(&g)]);
        let zeros: Vec<Vec<f32>> = want.iter().map(|w| vec![0f32; w.len()]).collect();
        let outputs: Vec<&[u8]> = zeros.iter().map(|z| bytemuck::cast_slice(z)).collect();
        let kernel = match glu {
            true => Kernel::MatvecGlu { norm: true },
            false => Kernel::MatvecQkv { norm: true },
        };
        for (tpr, rpt) in [(1, 4), (32, 1)] {
            let mut k = Kernels::with_matvec(tpr, rpt).unwrap();
            let per_wg = k.matvec_rows_per_workgroup();
            let wgs: u32 = match glu {
                true => (members[0].0 as u32).div_ceil(per_wg),
                false => members.iter().map(|m| (m.0 as u32).div_ceil(per_wg)).sum(),
            };
            let out = probe::run(
                &gpu,
                &mut k,
                kernel,
                &params,
                (1, 0),
                &inputs,
                &outputs,
                [wgs, 1, 1],
            )
            .await
            .unwrap();
            for (i, (got, want)) in out.iter().zip(&want).enumerate() {
                let err = got
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .zip(want)
                    .map(|(a, (w, s))| (a - w).abs() / s)
                    .fold(0.0, f64::max);
                assert!(
                    err < 1e-5,
                    "{kernel:?} output {i}, {tpr} threads x {rpt} rows: normalized error {err:.2e}"
                );
            }
        }
    }
}

/// The CPU backend in the browser: it answers deterministically, swaps down and up between
/// tokens under a budget, and holds exactly the trajectory's footprint plus the KV cache.
#[wasm_bindgen_test]
async fn cpu_backend_answers_swaps_and_accounts_exactly() {
    let policy = json!({"up_delay_ms": 0.0, "fault_cooldown_ms": 0.0, "max_up_growth": 10.0});
    let (e, ev) = engine(
        "/tiny/manifest.json",
        json!({"backend": "cpu", "policy": policy}),
    )
    .await
    .unwrap();
    let s = stats(&e);
    assert_eq!(s["backend"], "cpu", "{s}");
    assert!(
        s["backendReason"].as_str().unwrap().contains("asked"),
        "{s}"
    );
    assert_eq!(s["gpuAllocatedBytes"], 0, "{s}");
    let held = |s: &Value| s["heldBytes"].as_u64().unwrap();
    let want =
        |s: &Value| s["footprintBytes"].as_u64().unwrap() + s["overheadBytes"].as_u64().unwrap();
    assert_eq!(held(&s), want(&s), "{s}");
    assert!(s["wasmMemoryBytes"].as_u64().unwrap() >= held(&s), "{s}");
    let backend = of_type(&ev, "backend");
    assert_eq!(backend.len(), 1, "{backend:?}");
    assert_eq!(backend[0]["backend"], "cpu");

    let conv = [user("Once upon a time")];
    start(&e, &conv, 12).await;
    let baseline = finish(&e).await.0;
    start(&e, &conv, 12).await;
    assert_eq!(
        finish(&e).await.0,
        baseline,
        "greedy decoding is deterministic"
    );

    until_prefetched(&e).await;
    let steps = stats(&e)["steps"].as_u64().unwrap() as usize;
    let target = steps / 2;
    let budget = budget_for(&e, target);
    start(&e, &conv, 12).await;
    for _ in 0..3 {
        chunk(&e).await;
    }
    call(e.set_memory_budget(JsValue::from(budget as f64)))
        .await
        .unwrap();
    chunk(&e).await;
    let s = stats(&e);
    assert_eq!(s["step"], target as u64, "{s}");
    assert_eq!(held(&s), want(&s), "after the swap down: {s}");
    check_bits(&e);
    call(e.set_memory_budget(JsValue::NULL)).await.unwrap();
    chunk(&e).await;
    let s = stats(&e);
    assert_eq!(s["step"], 0, "{s}");
    assert_eq!(held(&s), want(&s), "after the swap up: {s}");
    check_bits(&e);
    let (_, n, last) = finish(&e).await;
    assert_eq!(last["usage"]["completion_tokens"], (5 + n) as u64, "{last}");
    assert_eq!(of_type(&ev, "swap").len(), 2);
    assert_no_errors(&ev);

    // A rebuild (the device-loss path; on the CPU: a new model) keeps the conversation.
    start(&e, &conv, 4).await;
    chunk(&e).await;
    call(e.simulate_device_loss()).await.unwrap();
    let (_, n, last) = finish(&e).await;
    assert_eq!(last["usage"]["completion_tokens"], (1 + n) as u64, "{last}");
    assert_eq!(stats(&e)["backend"], "cpu");
    call(e.unload()).await.unwrap();
}

/// `backend: 'auto'` on Chromium's SwiftShader adapter (a CPU emulation of a GPU) runs on the
/// CPU backend and says why; `checkSupport` says the same before anything loads.
#[wasm_bindgen_test]
async fn auto_prefers_the_cpu_over_an_emulated_gpu() {
    let support = val(flexquant::web::support::check_support().await);
    assert_eq!(support["backend"], "cpu", "{support}");
    assert_eq!(support["emulatedGpu"], true, "{support}");
    assert!(
        support["adapter"].as_str().unwrap().contains("swiftshader"),
        "{support}"
    );
    // What the browser offers: SwiftShader is Chromium's fallback adapter, with subgroups and
    // the 256-invocation workgroups the kernels need (DESIGN.md), here on localhost.
    assert_eq!(support["secureContext"], true, "{support}");
    assert_eq!(support["webgpu"], true, "{support}");
    assert_eq!(support["gpu"]["fallback"], true, "{support}");
    assert_eq!(support["gpu"]["subgroups"], true, "{support}");
    let lim = &support["gpu"]["limits"];
    assert!(
        lim["maxComputeInvocationsPerWorkgroup"].as_f64().unwrap() >= 256.0,
        "{support}"
    );
    assert!(
        lim["maxStorageBufferBindingSize"].as_f64().unwrap() > 0.0,
        "{support}"
    );
    let (e, ev) = engine("/tiny/manifest.json", json!({"backend": "auto"}))
        .await
        .unwrap();
    let s = stats(&e);
    assert_eq!(s["backend"], "cpu", "{s}");
    let why = s["backendReason"].as_str().unwrap();
    assert!(why.contains("emulates") || why.contains("WebGPU"), "{why}");
    assert_eq!(of_type(&ev, "backend")[0]["reason"], why);
    start(&e, &[user("Hello")], 4).await;
    let (_, n, _) = finish(&e).await;
    assert!(n >= 1);
    call(e.unload()).await.unwrap();
}

/// The tiny ensemble on the CPU backend with a policy that moves as soon as asked (no
/// settling delay, no cooldown, any growth per step up).
async fn eager_cpu_engine() -> (Engine, Events) {
    let policy = json!({"up_delay_ms": 0.0, "fault_cooldown_ms": 0.0, "max_up_growth": 100.0});
    engine(
        "/tiny/manifest.json",
        json!({"backend": "cpu", "policy": policy}),
    )
    .await
    .unwrap()
}

/// Speed as a second elastic resource: a minimum above what the model decodes at step 0 moves
/// it down between tokens (reason `too_slow`), and clearing the minimum brings it back up.
#[wasm_bindgen_test]
async fn a_minimum_speed_steps_down_and_clearing_it_steps_back_up() {
    let (e, ev) = eager_cpu_engine().await;
    let conv = [user("Once upon a time")];
    start(&e, &conv, 20).await;
    for _ in 0..12 {
        chunk(&e).await;
    }
    let s = stats(&e);
    let measured = s["measuredTokensPerSecond"]
        .as_f64()
        .expect("a speed after 12 tokens");
    assert_eq!(s["step"], 0);
    call(e.set_min_tokens_per_second(JsValue::from(measured * 1.25)))
        .await
        .unwrap();
    chunk(&e).await;
    let s = stats(&e);
    assert!(s["step"].as_u64().unwrap() > 0, "{s}");
    assert!(s["speedCapBytes"].as_u64().is_some(), "{s}");
    let swaps = of_type(&ev, "swap");
    assert_eq!(swaps[0]["reason"], "too_slow", "{swaps:?}");
    finish(&e).await;
    call(e.set_min_tokens_per_second(JsValue::NULL))
        .await
        .unwrap();
    assert_eq!(
        stats(&e)["step"],
        0,
        "back at the top once the minimum is cleared"
    );
    let err = call(e.set_min_tokens_per_second(JsValue::from(-3.0)))
        .await
        .unwrap_err();
    assert_eq!(err["code"], "input", "{err}");
    // Budgets that mean nothing are errors, not "unlimited".
    for bad in [-1.0, f64::NAN, f64::INFINITY] {
        let err = call(e.set_memory_budget(JsValue::from(bad)))
            .await
            .unwrap_err();
        assert_eq!(err["code"], "input", "{bad}: {err}");
    }
    assert_eq!(stats(&e)["budgetBytes"], Value::Null);
    call(e.unload()).await.unwrap();
}

/// Requests that cannot be served are `input` errors, and the engine answers the next one.
/// `signal` (an AbortSignal option) stops a load: aborted at its first download progress,
/// `create` rejects with `aborted` and no progress follows (the load was dropped, its downloads
/// aborted); a signal aborted before rejects at once; something else is an input error; the
/// next load on the same cache loads and answers.
#[wasm_bindgen_test]
async fn an_aborted_signal_stops_a_load_and_the_next_load_goes_on() {
    let cache = format!("abort-{}", js_sys::Math::random());
    let create = |signal: JsValue, abort_at_first_download: bool| {
        let events: Events = Rc::default();
        let log = events.clone();
        let ctl = web_sys::AbortController::new().unwrap();
        let c = ctl.clone();
        let cb = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
            let v = val(e);
            if abort_at_first_download && v["phase"] == "download" {
                c.abort();
            }
            log.borrow_mut().push(v);
        });
        let o = js(&json!({"cacheName": cache, "backend": "cpu"}));
        js_sys::Reflect::set(&o, &"onProgress".into(), cb.as_ref()).unwrap();
        cb.forget();
        let signal = if signal.is_undefined() {
            ctl.signal().into()
        } else {
            signal
        };
        js_sys::Reflect::set(&o, &"signal".into(), &signal).unwrap();
        (Engine::create(url("/tiny/manifest.json"), o), events)
    };
    let (load, events) = create(JsValue::UNDEFINED, true);
    let err = error_fields(&load.await.err().expect("the aborted load rejects"));
    assert_eq!(err["code"], "aborted", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("/tiny/manifest.json"),
        "{err}"
    );
    let seen = events.borrow().len();
    assert!(seen >= 1, "aborted at a download event");
    sleep(500).await;
    assert_eq!(
        events.borrow().len(),
        seen,
        "progress after the abort: {:?}",
        events.borrow()
    );

    let gone = web_sys::AbortController::new().unwrap();
    gone.abort();
    let (load, events) = create(gone.signal().into(), false);
    let err = error_fields(&load.await.err().expect("an aborted signal rejects"));
    assert_eq!(err["code"], "aborted", "{err}");
    assert!(events.borrow().is_empty(), "{:?}", events.borrow());
    let (load, _) = create(JsValue::from("stop"), false);
    let err = error_fields(&load.await.err().expect("not a signal"));
    assert_eq!(err["code"], "input", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("options.signal"),
        "{err}"
    );

    let (e, _) = engine(
        "/tiny/manifest.json",
        json!({"cacheName": cache, "backend": "cpu"}),
    )
    .await
    .unwrap();
    start(&e, &[user("Once upon a time")], 4).await;
    let (_, n, last) = finish(&e).await;
    assert!(
        n <= 4 && last["choices"][0]["finish_reason"].is_string(),
        "{last}"
    );
    call(e.unload()).await.unwrap();
}

/// A long prompt is read in pieces (`prefillChunkTokens`), on both backends: the answer is the
/// one the prompt read whole gives; a `prefill` event after each piece says how far it got; a
/// stop (`interrupt`) after the second piece ends the answer with `abort` and no text, and the
/// next request reuses what was read; a budget set during the prompt steps the model down
/// before its first token.
#[wasm_bindgen_test]
async fn a_long_prompt_is_read_in_pieces_that_a_stop_and_a_budget_reach() {
    let text = "Once upon a time a little fox lived at the edge of the woods. ".repeat(3);
    let req = json!({"messages": [user(&text)], "max_tokens": 6, "temperature": 0.0,
        "ignore_eos": true});
    let policy = json!({"up_delay_ms": 0.0, "fault_cooldown_ms": 0.0, "max_up_growth": 10.0});
    for backend in ["cpu", "webgpu"] {
        let whole = json!({"backend": backend, "prefillChunkTokens": 100000});
        let (w, wev) = engine("/tiny/manifest.json", whole).await.unwrap();
        call(w.start_chat(js(&req))).await.unwrap();
        let (want, _, last) = finish(&w).await;
        let total = last["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(total > 100, "{last}");
        assert!(of_type(&wev, "prefill").is_empty(), "read in one piece");
        call(w.unload()).await.unwrap();

        let opts = json!({"backend": backend, "prefillChunkTokens": 16, "policy": policy});
        let (e, ev) = engine("/tiny/manifest.json", opts).await.unwrap();
        call(e.start_chat(js(&req))).await.unwrap();
        let (got, _, _) = finish(&e).await;
        assert_eq!(got, want, "{backend}: the answer read in pieces");
        let pre = of_type(&ev, "prefill");
        assert_eq!(
            pre.len() as u64,
            total.div_ceil(16) - 1,
            "{backend}: {pre:?}"
        );
        for (i, p) in pre.iter().enumerate() {
            let want = json!({"type": "prefill", "doneTokens": 16 * (i + 1), "totalTokens": total,
                "reusedTokens": 0});
            assert_eq!(*p, want, "{backend}");
        }

        // Stopped after the second piece.
        call(e.reset_chat()).await.unwrap();
        ev.borrow_mut().clear();
        let started = JsFuture::from(e.start_chat(js(&req)));
        while of_type(&ev, "prefill").len() < 2 {
            sleep(0).await;
        }
        e.interrupt();
        started.await.unwrap();
        let (text, n, last) = finish(&e).await;
        assert_eq!((text.as_str(), n), ("", 0), "{backend}: {last}");
        assert_eq!(last["choices"][0]["finish_reason"], "abort", "{last}");
        let read = of_type(&ev, "prefill").last().unwrap()["doneTokens"]
            .as_u64()
            .unwrap();
        assert!(
            read < total,
            "{backend}: stopped before the end ({read} of {total})"
        );
        call(e.start_chat(js(&req))).await.unwrap();
        let (again, _, last) = finish(&e).await;
        assert_eq!(again, want, "{backend}");
        let cached = &last["usage"]["prompt_tokens_details"]["cached_tokens"];
        assert_eq!(
            *cached, read,
            "{backend}: what was read before the stop is reused"
        );

        // A budget set while the prompt is read: the step changes before the first token.
        until_prefetched(&e).await;
        call(e.reset_chat()).await.unwrap();
        ev.borrow_mut().clear();
        let target = stats(&e)["steps"].as_u64().unwrap() as usize / 2;
        let budget = budget_for(&e, target);
        let started = JsFuture::from(e.start_chat(js(&req)));
        while of_type(&ev, "prefill").is_empty() {
            sleep(0).await;
        }
        call(e.set_memory_budget(JsValue::from(budget as f64)))
            .await
            .unwrap();
        started.await.unwrap();
        let log = ev.borrow().clone();
        let swap = log.iter().position(|x| x["type"] == "swap");
        let last_piece = log.iter().rposition(|x| x["type"] == "prefill");
        assert!(
            swap.is_some() && swap < last_piece,
            "{backend}: a swap during the prompt: {log:?}"
        );
        assert!(log[swap.unwrap()]["tokenIndex"].is_null(), "{log:?}");
        assert_eq!(stats(&e)["step"], target as u64, "{backend}");
        let (_, n, _) = finish(&e).await;
        assert_eq!(n, 6, "{backend}");
        assert_no_errors(&ev);

        // WebGPU: the device lost while the prompt is read. The engine recovers (a new device,
        // one step lower, the pieces read so far run again) and reads on.
        if backend == "webgpu" {
            call(e.set_memory_budget(JsValue::NULL)).await.unwrap();
            call(e.reset_chat()).await.unwrap();
            ev.borrow_mut().clear();
            let started = JsFuture::from(e.start_chat(js(&req)));
            while of_type(&ev, "prefill").len() < 2 {
                sleep(0).await;
            }
            e.destroy_device().unwrap();
            started.await.unwrap();
            let (_, n, last) = finish(&e).await;
            assert_eq!(
                (n as u64, &last["usage"]["prompt_tokens"]),
                (6, &json!(total)),
                "{last}"
            );
            let rec = of_type(&ev, "recovered");
            assert_eq!(
                (of_type(&ev, "device-lost").len(), rec.len()),
                (1, 1),
                "{:?}",
                ev.borrow()
            );
            let again = rec[0]["reprefilledTokens"].as_u64().unwrap();
            assert!(
                (32..total).contains(&again),
                "the pieces read before the loss: {again}"
            );
            assert_no_errors(&ev);
        }
        call(e.unload()).await.unwrap();
    }
}

#[wasm_bindgen_test]
async fn empty_and_overlong_conversations_are_input_errors() {
    let (e, _) = engine(
        "/tiny/manifest.json",
        json!({"backend": "cpu", "context": 64}),
    )
    .await
    .unwrap();
    let err = call(e.start_chat(js(&json!({"messages": []}))))
        .await
        .unwrap_err();
    assert_eq!(err["code"], "input", "{err}");
    let long = "the sea and the sky ".repeat(40);
    let err = call(e.start_chat(js(&json!({"messages": [user(&long)]}))))
        .await
        .unwrap_err();
    assert_eq!(err["code"], "context-length", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("context holds 64"),
        "{err}"
    );
    // Both counts as fields, so an app need not read the message.
    assert_eq!(err["contextTokens"], 64.0, "{err}");
    assert!(err["promptTokens"].as_f64().unwrap() > 64.0, "{err}");
    // OpenAI fields: what is not implemented is refused by name, never silently ignored.
    for (field, value) in [
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "x", "strict": true, "schema": {}}}),
        ),
        ("tools", json!([{"type": "code_interpreter"}])),
        ("no_such_field", json!(1)),
    ] {
        let mut req = json!({"messages": [user("Hi")]});
        req[field] = value;
        let err = match call(e.start_chat(js(&req))).await {
            Err(err) => err,
            Ok(_) => panic!("`{field}` was accepted"),
        };
        assert_eq!(err["code"], "unsupported", "{field}: {err}");
        assert!(err["message"].as_str().unwrap().contains(field), "{err}");
    }
    // Accepted: n 1, a text response_format, model/user, top_k within the candidates.
    let req = json!({"messages": [user("Hi")], "n": 1, "model": "x", "user": "u",
        "response_format": {"type": "text"}, "top_k": 1, "temperature": 1.0, "max_tokens": 2});
    call(e.start_chat(js(&req))).await.unwrap();
    finish(&e).await;
    for (field, value) in [
        ("top_k", json!(1000)),
        ("stop", json!([""])),
        ("stop", json!(7)),
        ("frequency_penalty", json!(3)),
        ("logit_bias", json!({"x": 1})),
        ("logit_bias", json!({"5": 500})),
        ("logit_bias", json!({"99999999": 1})),
        ("top_logprobs", json!(2)),
        ("n", json!(9)),
    ] {
        let mut req = json!({"messages": [user("Hi")]});
        req[field] = value;
        let err = call(e.start_chat(js(&req))).await.unwrap_err();
        assert_eq!(err["code"], "input", "{field}: {err}");
        assert!(err["message"].as_str().unwrap().contains(field), "{err}");
    }
    start(&e, &[user("Hi")], 3).await;
    let (_, n, _) = finish(&e).await;
    assert!(n >= 1);
    call(e.unload()).await.unwrap();
}

/// A GPU that keeps getting lost is not retried forever: after three losses with no token in
/// between, the fourth is a `device-lost` error (with `backend: 'auto'` the engine would move
/// to the CPU instead); a token in between resets the count.
#[wasm_bindgen_test]
async fn repeated_device_losses_are_capped() {
    let (e, _) = engine("/tiny/manifest.json", json!({})).await.unwrap();
    for _ in 0..3 {
        call(e.simulate_device_loss()).await.unwrap();
    }
    let err = call(e.simulate_device_loss()).await.unwrap_err();
    assert_eq!(err["code"], "device-lost", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("4 times"),
        "{err}"
    );
    call(e.unload()).await.unwrap();

    let (e, _) = engine("/tiny/manifest.json", json!({})).await.unwrap();
    for _ in 0..5 {
        call(e.simulate_device_loss()).await.unwrap();
        start(&e, &[user("Hi")], 2).await;
        finish(&e).await;
    }
    call(e.unload()).await.unwrap();
}

/// Greedy answer pieces of `req` (temperature 0 unless the request says).
async fn pieces(e: &Engine, mut req: Value) -> (Vec<String>, Value) {
    req["messages"] = json!([user("Once upon a time")]);
    if req.get("temperature").is_none() {
        req["temperature"] = json!(0.0);
    }
    req["ignore_eos"] = json!(true);
    call(e.start_chat(js(&req))).await.expect("startChat");
    let mut out = Vec::new();
    loop {
        match chunk(e).await {
            (Some(t), _) => out.push(t),
            (None, last) => {
                assert!(call(e.next_chunk()).await.unwrap().is_null());
                if let Some(t) = last["choices"][0]["delta"]["content"].as_str() {
                    out.push(t.to_string());
                }
                return (out, last);
            }
        }
    }
}

/// JSON mode (`response_format: {type: 'json_object'}`) on both backends: every sampled
/// answer is a JSON object's prefix (the runtime's automaton reads the streamed text), those
/// that end are objects serde_json parses, with `finish_reason: 'stop'`; biasing `{` and `}`
/// (the tiny vocabulary is the 256 bytes after 3 special tokens) gives exactly `{}`; with a
/// `json_schema`, sampled answers are objects of the schema's keys, enum, types, bounds and
/// format.
#[wasm_bindgen_test]
async fn json_mode_holds_answers_to_a_json_object() {
    use flexquant::runtime::json_mode::JsonPrefix;
    let token = |b: u8| (3 + b as u32).to_string();
    for backend in ["cpu", "webgpu"] {
        let (e, _) = engine("/tiny/manifest.json", json!({"backend": backend}))
            .await
            .unwrap();
        for seed in 0..3 {
            let req = json!({"max_tokens": 48, "temperature": 1.0, "seed": seed,
                "response_format": {"type": "json_object"}});
            let (got, last) = pieces(&e, req).await;
            let text = got.concat();
            let mut p = JsonPrefix::default();
            assert!(p.feed(text.as_bytes()), "{backend} seed {seed}: {text:?}");
            let finish = &last["choices"][0]["finish_reason"];
            if p.is_complete() {
                assert_eq!(finish, "stop", "{text:?}");
                serde_json::from_str::<serde_json::Map<String, Value>>(&text)
                    .unwrap_or_else(|err| panic!("{text:?}: {err}"));
            } else {
                assert_eq!(finish, "length", "{text:?}");
            }
        }
        let mut bias = serde_json::Map::new();
        for b in [b'{', b'}'] {
            bias.insert(token(b), json!(100));
        }
        let req = json!({"max_tokens": 8, "logit_bias": bias,
            "response_format": {"type": "json_object"}});
        let (got, last) = pieces(&e, req).await;
        assert_eq!(got.concat(), "{}", "{backend}");
        assert_eq!(
            last["choices"][0]["finish_reason"], "stop",
            "{backend}: {last}"
        );
        // A schema (structured output): its keys, its enum, its types, a number's bounds and
        // a string's format.
        let schema = json!({"type": "object", "additionalProperties": false,
            "properties": {"a": {"enum": ["x", "yy"]},
                "n": {"type": "integer", "minimum": -9, "maximum": 99},
                "d": {"type": "string", "format": "date"}},
            "required": ["a", "n", "d"]});
        for seed in 0..2 {
            let req = json!({"max_tokens": 200, "temperature": 1.0, "seed": seed,
                "response_format": {"type": "json_schema",
                    "json_schema": {"name": "t", "strict": true, "schema": schema}}});
            let (got, last) = pieces(&e, req).await;
            let text = got.concat();
            assert_eq!(
                last["choices"][0]["finish_reason"], "stop",
                "{backend}: {text:?}"
            );
            let v: serde_json::Map<String, Value> =
                serde_json::from_str(&text).unwrap_or_else(|err| panic!("{text:?}: {err}"));
            assert_eq!(v.len(), 3, "{text}");
            assert!(["x", "yy"].contains(&v["a"].as_str().unwrap()), "{text}");
            let n = v["n"].as_f64().unwrap();
            assert!(n.fract() == 0.0 && (-9.0..=99.0).contains(&n), "{text}");
            let d: Vec<&str> = v["d"].as_str().unwrap().split('-').collect();
            let parts: Vec<u32> = d.iter().map(|p| p.parse().unwrap()).collect();
            assert!(
                d.len() == 3
                    && [4, 2, 2] == [d[0].len(), d[1].len(), d[2].len()]
                    && (1..=12).contains(&parts[1])
                    && (1..=31).contains(&parts[2]),
                "{text}"
            );
        }
        call(e.unload()).await.unwrap();
    }
}

/// Every chunk of an answer (the final one last), read to the end.
async fn raw_chunks(e: &Engine, req: &Value) -> Vec<Value> {
    if let Err(err) = call(e.start_chat(js(req))).await {
        panic!("startChat {req}: {err}");
    }
    let mut out = Vec::new();
    loop {
        let c = call(e.next_chunk()).await.expect("nextChunk");
        if c.is_null() {
            return out;
        }
        out.push(c);
    }
}

/// The text the chunks stream (`delta.content`, concatenated).
fn content_of(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// Function calling (`tools`) on the tiny model: with `required` or a named function, sampled
/// answers stream no text but the call's deltas (`delta.tool_calls`: the first with its id,
/// type and name, then its arguments' text, which add up to arguments that follow the
/// function's parameters) and end with `finish_reason: 'tool_calls'`; `auto`
/// gives a call when `{` is favoured and streamed text when it is ruled out; `{` favoured after
/// a call gives parallel calls, up to 8, or one with `parallel_tool_calls: false`; a conversation
/// with a call and its result is accepted; a loose schema warns, a strict one is refused.
#[wasm_bindgen_test]
async fn tool_calls_stream_their_name_then_their_arguments() {
    let (e, events) = engine("/tiny/manifest.json", json!({"backend": "cpu"}))
        .await
        .unwrap();
    let token = |b: u8| (3 + b as u32).to_string();
    // Short names: the tiny model's tokens are bytes and its context 512 of them.
    let tools = json!([
        {"type": "function", "function": {"name": "w", "parameters": {"type": "object",
            "properties": {"u": {"enum": ["c", "f"]}}, "required": ["u"]}}},
        {"type": "function", "function": {"name": "t", "parameters": {"type": "object",
            "properties": {"z": {"type": "boolean"}}, "required": ["z"]}}}
    ]);
    let ask = json!([user("Weather?")]);
    // Whitespace biased away: the random model may otherwise pad every gap of a call with it.
    let no_space: serde_json::Map<String, Value> = [b'\t', b'\n', b'\r', b' ']
        .iter()
        .map(|&b| (token(b), json!(-100)))
        .collect();
    let base = |choice: Value, seed: u32| {
        json!({"messages": ask, "tools": tools, "tool_choice": choice, "temperature": 1.0,
            "seed": seed, "max_tokens": 300, "ignore_eos": true, "logit_bias": no_space})
    };
    let cases = [
        (json!("required"), None),
        (
            json!({"type": "function", "function": {"name": "t"}}),
            Some("t"),
        ),
    ];
    for (choice, want) in cases {
        for seed in 0..2 {
            let chunks = raw_chunks(&e, &base(choice.clone(), seed)).await;
            let (last, rest) = chunks.split_last().unwrap();
            for c in rest {
                assert!(c["choices"][0]["delta"].get("content").is_none(), "{c}");
            }
            assert_eq!(
                last["choices"][0]["finish_reason"], "tool_calls",
                "{choice} {seed}: {last}"
            );
            // The first delta has the id, type and name; the arguments stream after it.
            let deltas: Vec<&Value> = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["delta"].get("tool_calls"))
                .map(|t| &t[0])
                .collect();
            assert!(deltas.len() >= 2, "the arguments streamed: {deltas:?}");
            let head = deltas[0];
            assert_eq!(
                (&head["index"], &head["type"]),
                (&json!(0), &json!("function"))
            );
            assert!(head["id"].as_str().unwrap().starts_with("call_"), "{head}");
            assert!(deltas[1..]
                .iter()
                .all(|d| d.get("id").is_none() && d["function"].get("name").is_none()));
            let name = head["function"]["name"].as_str().unwrap();
            let text: String = deltas
                .iter()
                .map(|d| d["function"]["arguments"].as_str().unwrap())
                .collect();
            let args: Value = serde_json::from_str(&text).unwrap();
            match name {
                "w" => assert!(["c", "f"].contains(&args["u"].as_str().unwrap())),
                "t" => assert!(args["z"].is_boolean(), "{args}"),
                other => panic!("{other}"),
            }
            assert!(want.is_none_or(|w| w == name), "{choice}: {name}");
        }
    }
    // Parallel calls: with `{` favoured, each whole call is followed by another (up to 8; here
    // until the tiny model's 512-token context is full), each with its own index, id, name
    // and arguments; `parallel_tool_calls: false`: one.
    let mut req = base(json!("required"), 0);
    req["logit_bias"][token(b'{')] = json!(100);
    for (parallel, want) in [(Value::Null, 3..=8), (json!(false), 1..=1)] {
        req["parallel_tool_calls"] = parallel;
        let chunks = raw_chunks(&e, &req).await;
        let last = &chunks.last().unwrap()["choices"][0];
        assert_eq!(last["finish_reason"], "tool_calls", "{last}");
        let mut calls: Vec<(String, String, String)> = Vec::new();
        for d in chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
            .flatten()
        {
            let i = d["index"].as_u64().unwrap() as usize;
            if let Some(id) = d["id"].as_str() {
                assert_eq!(i, calls.len(), "calls come in order: {d}");
                let name = d["function"]["name"].as_str().unwrap();
                calls.push((id.into(), name.into(), String::new()));
            }
            assert!(d["id"].is_string() || d["function"].get("name").is_none());
            calls[i].2 += d["function"]["arguments"].as_str().unwrap();
        }
        assert!(want.contains(&calls.len()), "{calls:?}");
        for (id, name, args) in &calls {
            assert_eq!(calls.iter().filter(|c| &c.0 == id).count(), 1, "{id} twice");
            let args: Value = serde_json::from_str(args).unwrap();
            match name.as_str() {
                "w" => assert!(["c", "f"].contains(&args["u"].as_str().unwrap())),
                "t" => assert!(args["z"].is_boolean(), "{args}"),
                other => panic!("{other}"),
            }
        }
    }
    // auto: JSON that is not a call (`{` favoured: `{{...`) is text, and so is an answer with
    // `{` and `<` ruled out. (A call in auto opens `{"name"` or `<tool_call>`, which a bias on
    // one byte cannot force: runtime::json_mode's unit tests show it.)
    let mut req = base(json!("auto"), 0);
    req["logit_bias"][token(b'{')] = json!(100);
    req["max_tokens"] = json!(6);
    let chunks = raw_chunks(&e, &req).await;
    let last = &chunks.last().unwrap()["choices"][0];
    assert_eq!(last["finish_reason"], "length", "{last}");
    let text = content_of(&chunks);
    assert!(text.starts_with("{{"), "{text:?}");
    req["logit_bias"] = json!({ token(b'{'): -100, token(b'<'): -100 });
    req["max_tokens"] = json!(6);
    let chunks = raw_chunks(&e, &req).await;
    let last = &chunks.last().unwrap()["choices"][0];
    assert_eq!(last["finish_reason"], "length");
    assert!(last["delta"].get("tool_calls").is_none());
    let text = content_of(&chunks);
    assert!(
        !text.is_empty() && !text.trim_start().starts_with('{'),
        "{text:?}"
    );
    // The call and its result in the conversation; tool_choice none: text.
    let conv = json!([user("Weather?"),
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "w", "arguments": "{\"u\":\"c\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18"}]);
    let req = json!({"messages": conv, "tools": tools, "tool_choice": "none", "max_tokens": 4,
        "ignore_eos": true, "parallel_tool_calls": false});
    let chunks = raw_chunks(&e, &req).await;
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert!(chunks.len() >= 4);
    // Parameters outside the enforced subset: a warning when not strict, refused when strict.
    let loose = json!([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "array", "uniqueItems": true}}}}}]);
    let req = json!({"messages": ask, "tools": loose, "tool_choice": "required",
        "max_tokens": 300, "ignore_eos": true});
    raw_chunks(&e, &req).await;
    let warned = events.borrow().iter().any(|v| {
        v["code"] == "tool-schema-loose" && v["message"].as_str().unwrap().contains("uniqueItems")
    });
    assert!(warned, "{:?}", events.borrow());
    // Tools beside a response_format schema, auto: each answer is a call or that JSON.
    let summary = json!({"type": "object", "properties": {"s": {"enum": ["a", "b"]}},
        "required": ["s"], "additionalProperties": false});
    for seed in 0..4 {
        let req = json!({"messages": ask, "tools": tools, "max_tokens": 200, "temperature": 1.0,
            "seed": seed, "ignore_eos": true, "logit_bias": no_space,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "strict": true,
                "schema": summary}}});
        let chunks = raw_chunks(&e, &req).await;
        let last = &chunks.last().unwrap()["choices"][0];
        let text = content_of(&chunks);
        match last["finish_reason"].as_str() {
            Some("tool_calls") => assert!(text.is_empty(), "{text:?}"),
            _ => {
                let v: Value =
                    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
                assert!(["a", "b"].contains(&v["s"].as_str().unwrap()), "{text}");
            }
        }
    }
    // The same for a response_format schema that is not strict: free there, and said.
    let schema = json!({"type": "object", "properties": {"n": {"type": "array", "uniqueItems": true},
        "m": {"type": "boolean"}}, "required": ["m"]});
    let req = json!({"messages": ask, "max_tokens": 300, "ignore_eos": true, "logit_bias": no_space,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}});
    let text = content_of(&raw_chunks(&e, &req).await);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["m"].is_boolean(), "{text}");
    let warned = events.borrow().iter().any(|v| {
        v["code"] == "schema-loose"
            && v["message"]
                .as_str()
                .unwrap()
                .contains("schema.properties.n.uniqueItems")
    });
    assert!(warned, "{:?}", events.borrow());
    let mut strict = loose.clone();
    strict[0]["function"]["strict"] = json!(true);
    let req = json!({"messages": ask, "tools": strict});
    let err = call(e.start_chat(js(&req))).await.unwrap_err();
    assert_eq!(err["code"], "unsupported", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("properties.n.uniqueItems"),
        "{err}"
    );
    call(e.unload()).await.unwrap();
}

/// `n`: the answers stream one after the other, chunks indexed 0, 1, 2, each answer's first
/// chunk with the role and its last with its finish reason, `usage` once at the end counting
/// them all; greedy, they are the same answer; with JSON mode each is an object of its own.
#[wasm_bindgen_test]
async fn n_answers_come_one_after_the_other() {
    let (e, _) = engine("/tiny/manifest.json", json!({"backend": "cpu"}))
        .await
        .unwrap();
    for (extra, greedy) in [
        (json!({"temperature": 0.0}), true),
        (json!({"temperature": 1.0, "seed": 3}), false),
        (
            json!({"temperature": 1.0, "response_format": {"type": "json_object"},
            "logit_bias": {"128": 3}}),
            false,
        ),
    ] {
        let mut req = json!({"messages": [user("Once upon a time")], "max_tokens": 5,
            "ignore_eos": true, "n": 3});
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        call(e.start_chat(js(&req))).await.unwrap();
        let mut texts = vec![String::new(); 3];
        let (mut roles, mut finishes, mut usage) = (vec![], vec![], None);
        loop {
            let c = call(e.next_chunk()).await.unwrap();
            if c.is_null() {
                break;
            }
            assert!(usage.is_none(), "usage only on the last chunk: {c}");
            let ch = &c["choices"][0];
            let i = ch["index"].as_u64().unwrap() as usize;
            assert!(finishes.len() == i, "answers in order: {c}");
            if ch["delta"]["role"] == "assistant" {
                roles.push(i);
            }
            texts[i] += ch["delta"]["content"].as_str().unwrap_or("");
            if !ch["finish_reason"].is_null() {
                finishes.push(ch["finish_reason"].clone());
            }
            if !c["usage"].is_null() {
                usage = Some(c["usage"].clone());
            }
        }
        assert_eq!(roles, [0, 1, 2], "{req}");
        assert_eq!(finishes.len(), 3, "{req}: {finishes:?}");
        let usage = usage.expect("usage");
        let tokens = usage["completion_tokens"].as_u64().unwrap();
        if req.get("response_format").is_some() {
            for t in &texts {
                let mut p = flexquant::runtime::json_mode::JsonPrefix::default();
                assert!(p.feed(t.as_bytes()), "{t:?}");
            }
            assert!((3..=15).contains(&tokens), "{usage}");
        } else {
            assert_eq!(tokens, 15, "{usage}");
            assert!(finishes.iter().all(|f| f == "length"), "{finishes:?}");
        }
        if greedy {
            assert!(texts.iter().all(|t| *t == texts[0]), "{texts:?}");
        }
    }
    call(e.unload()).await.unwrap();
}

/// `logprobs` on both backends: one entry per token chunk, none on the final chunk; the
/// greedy token is the first of its `top_logprobs`, which come best first and hold at most
/// the whole probability; the CPU and WebGPU engines agree (the same tiny model).
#[wasm_bindgen_test]
async fn logprobs_come_with_each_token_on_both_backends() {
    let mut by_backend = Vec::new();
    for backend in ["cpu", "webgpu"] {
        let (e, _) = engine("/tiny/manifest.json", json!({"backend": backend}))
            .await
            .unwrap();
        let req = json!({"messages": [user("Once upon a time")], "max_tokens": 6,
            "temperature": 0.0, "ignore_eos": true, "logprobs": true, "top_logprobs": 4});
        call(e.start_chat(js(&req))).await.unwrap();
        let mut entries = Vec::new();
        loop {
            let (text, c) = chunk(&e).await;
            let lp = &c["choices"][0]["logprobs"];
            if text.is_none() {
                assert!(lp.is_null(), "{backend}: the final chunk has no token: {c}");
                break;
            }
            let content = lp["content"].as_array().unwrap_or_else(|| panic!("{c}"));
            assert_eq!(content.len(), 1, "{c}");
            entries.push(content[0].clone());
        }
        assert_eq!(entries.len(), 6, "{backend}");
        for en in &entries {
            let top = en["top_logprobs"].as_array().unwrap();
            assert_eq!(top.len(), 4, "{en}");
            let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
            assert!(lps.windows(2).all(|w| w[0] >= w[1]), "{en}");
            assert!(
                lps.iter().map(|l| l.exp()).sum::<f64>() <= 1.0 + 1e-4,
                "{en}"
            );
            assert_eq!(
                en["bytes"], top[0]["bytes"],
                "{backend}: greedy is the first: {en}"
            );
            assert_eq!(en["logprob"], top[0]["logprob"], "{en}");
        }
        by_backend.push(entries);
        call(e.unload()).await.unwrap();
    }
    let (cpu, gpu) = (&by_backend[0], &by_backend[1]);
    assert_eq!(cpu[0]["bytes"], gpu[0]["bytes"]);
    let (a, b) = (
        cpu[0]["logprob"].as_f64().unwrap(),
        gpu[0]["logprob"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 0.02, "first token: cpu {a} vs webgpu {b}");
}

/// `stop`, `logit_bias` and the penalties do what OpenAI's do: a stop sequence that spans two
/// tokens ends the answer before it (not shown, `finish_reason: 'stop'`); a +100 bias makes
/// every token the biased one; penalties keep a greedy answer from repeating its tokens.
#[wasm_bindgen_test]
async fn stop_sequences_logit_bias_and_penalties() {
    let (e, _) = engine("/tiny/manifest.json", json!({"backend": "cpu"}))
        .await
        .unwrap();
    let (base, last) = pieces(&e, json!({"max_tokens": 16})).await;
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    let full = base.concat();
    let i = (0..base.len() - 1)
        .find(|&i| !base[i].is_empty() && !base[i + 1].is_empty())
        .expect("two consecutive non-empty pieces");
    let stop = format!(
        "{}{}",
        base[i].chars().last().unwrap(),
        base[i + 1].chars().next().unwrap()
    );
    let want = &full[..full.find(&stop).unwrap()];
    let (got, last) = pieces(
        &e,
        json!({"max_tokens": 16, "stop": [stop.clone(), "\u{1}"]}),
    )
    .await;
    assert_eq!(got.concat(), want, "stop {stop:?} in {full:?}");
    assert_eq!(last["choices"][0]["finish_reason"], "stop", "{last}");
    // A stop that never appears changes nothing.
    let (got, _) = pieces(&e, json!({"max_tokens": 16, "stop": "\u{1}\u{2}"})).await;
    assert_eq!(got.concat(), full);

    let (biased, _) = pieces(&e, json!({"max_tokens": 6, "logit_bias": {"100": 100}})).await;
    assert!(!biased[0].is_empty(), "{biased:?}");
    assert!(biased.iter().all(|p| *p == biased[0]), "{biased:?}");

    // A +5 bias makes token 100 win every step of this tiny model; penalties of 2 + 2 per
    // repeat take that back after a couple of times.
    let count = |p: &[String]| p.iter().filter(|t| **t == biased[0]).count();
    let (mild, _) = pieces(&e, json!({"max_tokens": 16, "logit_bias": {"100": 5}})).await;
    let (penalized, _) = pieces(
        &e,
        json!({"max_tokens": 16, "logit_bias": {"100": 5}, "frequency_penalty": 2,
            "presence_penalty": 2}),
    )
    .await;
    assert!(count(&mild) >= 12, "{mild:?}");
    assert!(
        (1..=4).contains(&count(&penalized)),
        "{penalized:?} vs {mild:?}"
    );
    call(e.unload()).await.unwrap();
}

/// The quality floor (`maxPerplexity`): a budget below the floor step's cost stops the walk at
/// the floor with one `below-floor` event; clearing the floor lets it go deeper; a floor above
/// the model brings it back up; a floor no step meets is an `input` error.
#[wasm_bindgen_test]
async fn a_quality_floor_holds_and_says_below_floor() {
    let (e, ev) = eager_cpu_engine().await;
    let traj = val(e.trajectory());
    let measured: Vec<(usize, f64)> = traj
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t["heldoutPpl"].as_f64().map(|p| (i, p)))
        .collect();
    let last = traj.as_array().unwrap().len() - 1;
    let p0 = measured[0].1;
    // The floor is the last step of the leading run whose perplexity is at most the bound
    // (unmeasured steps interpolated in footprint). Halfway between the worst perplexity up to
    // a measured step and the first measured one above it puts the floor between the two,
    // whatever the trajectory's shape (a search may make early steps better than step 0).
    let mut worst = p0;
    let mut pick = None;
    for w in measured.windows(2) {
        let ((ka, _), (kb, pb)) = (w[0], w[1]);
        if pb > worst {
            pick = Some((ka, kb, (worst + pb) / 2.0));
            break;
        }
        worst = worst.max(pb);
    }
    let (ka, kb, max) =
        pick.unwrap_or_else(|| panic!("no measured step is worse than those before it: {traj}"));
    call(e.set_max_perplexity(JsValue::from(max)))
        .await
        .unwrap();
    let floor = stats(&e)["floorStep"].as_u64().unwrap() as usize;
    assert!(
        ka <= floor && floor < kb && 0 < floor,
        "{floor} not in {ka}..{kb} {traj}"
    );
    call(e.set_memory_budget(JsValue::from(budget_for(&e, last) as f64 * 0.99)))
        .await
        .unwrap();
    start(&e, &[user("Hi")], 4).await;
    finish(&e).await;
    let s = stats(&e);
    assert_eq!(s["step"], floor, "{s}");
    assert_eq!(s["lastReason"], "below_floor", "{s}");
    let below = of_type(&ev, "below-floor");
    assert_eq!(below.len(), 1, "{below:?}");
    assert_eq!(below[0]["step"], floor);

    call(e.set_max_perplexity(JsValue::NULL)).await.unwrap();
    assert_eq!(stats(&e)["step"], last);
    call(e.set_memory_budget(JsValue::NULL)).await.unwrap();
    call(e.set_max_perplexity(JsValue::from(p0))).await.unwrap();
    let s = stats(&e);
    assert_eq!(s["step"], s["floorStep"], "up to the new floor: {s}");
    assert!(s["step"].as_u64().unwrap() <= floor as u64, "{s}");
    let err = call(e.set_max_perplexity(JsValue::from(p0 * 0.5)))
        .await
        .unwrap_err();
    assert_eq!(err["code"], "input", "{err}");
    assert!(err["message"].as_str().unwrap().contains("step 0"), "{err}");
    call(e.unload()).await.unwrap();
}

/// The first load downloads in parallel under one running total (tokenizer, base and modules:
/// `loadedBytes` never goes back, `totalBytes` never changes, it ends at the total), a body
/// cut by the network is fetched again (the load succeeds; nothing partial is cached), and
/// `parallelDownloads` out of range is an `input` error.
#[wasm_bindgen_test]
async fn parallel_downloads_retry_and_report_one_total() {
    server_get("/__delay?ms=20").await;
    // Three module bodies cut mid-way, then the server behaves.
    assert_eq!(server_get("/__fail?on=1&times=3").await, 1);
    let cache = format!("par-{}", js_sys::Math::random());
    let r = engine(
        "/net/tiny/manifest.json",
        json!({"backend": "cpu", "cacheName": cache, "parallelDownloads": 4}),
    )
    .await;
    server_get("/__fail?on=0").await;
    server_get("/__delay?ms=0").await;
    let (e, ev) = r.expect("the retries get every file");
    let dl: Vec<Value> = of_type(&ev, "progress")
        .into_iter()
        .filter(|p| p["phase"] == "download")
        .collect();
    let total = dl[0]["totalBytes"].as_u64().unwrap();
    assert!(dl.iter().all(|p| p["totalBytes"] == total), "one total");
    assert!(
        dl.windows(2)
            .all(|w| w[0]["loadedBytes"].as_u64() <= w[1]["loadedBytes"].as_u64()),
        "monotone"
    );
    assert_eq!(dl.last().unwrap()["loadedBytes"], total);
    assert_eq!(
        dl.last().unwrap()["filesDone"],
        dl.last().unwrap()["filesTotal"]
    );
    assert_no_errors(&ev);
    let s = stats(&e);
    // The download phase fetched every byte of the total (the prefetch may have added more).
    assert!(s["networkBytes"].as_u64().unwrap() >= total, "{s}");
    start(&e, &[user("Hi")], 2).await;
    finish(&e).await;
    call(e.unload()).await.unwrap();

    let err = engine(
        "/tiny/manifest.json",
        json!({"backend": "cpu", "parallelDownloads": 0}),
    )
    .await
    .err()
    .expect("0 is refused");
    assert_eq!(err["code"], "input", "{err}");
}

#[path = "shared/kernel_ref.rs"]
mod kernel_ref;

#[path = "web/completions.rs"]
mod completions;
#[path = "web/faults.rs"]
mod faults;

/// `kvCache: 'int8'` on both backends: the stats and `Engine.inspect` say so, the cache holds
/// the int8 layout's bytes (the tiny model's heads of 16: 16 codes and one f32 scale, 20 bytes
/// against 32 in f16), the accounting holds while it grows, and the engine answers; an unknown
/// format is an `input` error naming it.
#[wasm_bindgen_test]
async fn an_int8_kv_cache_holds_fewer_bytes_on_both_backends() {
    use flexquant::runtime::backend::KV_BLOCK;
    let per_token = |kv: &'static str| async move {
        let o = js(&json!({ "kvCache": kv }));
        let i = val(
            flexquant::web::cache_admin::inspect_ensemble(url("/tiny/manifest.json"), o)
                .await
                .unwrap(),
        );
        assert_eq!(i["kvCache"], kv, "{i}");
        i["kvBytesPerToken"].as_u64().unwrap()
    };
    let (f16, int8) = (per_token("f16").await, per_token("int8").await);
    assert_eq!(
        int8 * 32,
        f16 * 20,
        "int8 {int8} against f16 {f16} bytes per token"
    );
    for backend in ["webgpu", "cpu"] {
        let opts = json!({"backend": backend, "kvCache": "int8"});
        let (e, ev) = engine("/tiny/manifest.json", opts).await.unwrap();
        let s = stats(&e);
        assert_eq!(s["kvCache"], "int8", "{backend}: {s}");
        assert_eq!(
            s["kvCacheBytes"].as_u64().unwrap(),
            KV_BLOCK as u64 * int8,
            "{backend}: {s}"
        );
        let long = "Elizabeth walked to Netherfield. ".repeat(KV_BLOCK / 16);
        start(&e, &[user(&long)], 4).await;
        let (_, n, _) = finish(&e).await;
        assert!(n >= 1, "{backend}: answers");
        let s = stats(&e);
        let kv = s["kvCacheBytes"].as_u64().unwrap();
        assert!(
            kv > KV_BLOCK as u64 * int8 && kv.is_multiple_of(int8),
            "{backend}: grew: {s}"
        );
        let want = s["footprintBytes"].as_u64().unwrap() + s["overheadBytes"].as_u64().unwrap();
        assert_eq!(s["heldBytes"].as_u64().unwrap(), want, "{backend}: {s}");
        assert_no_errors(&ev);
        call(e.unload()).await.unwrap();
    }
    let err = engine("/tiny/manifest.json", json!({"kvCache": "q4"}))
        .await
        .err()
        .expect("an unknown KV cache format is refused");
    assert_eq!(err["code"], "input", "{err}");
    assert!(err["message"].as_str().unwrap().contains("q4"), "{err}");
}

/// `kvCache: 'auto'` (the default: asked for on the CPU backend, left out on WebGPU) on both
/// backends: a long prompt's f16 cache outgrows a budget that holds step 0 with the cache in int8; between tokens the engine converts the cache (a `kv-cache`
/// event; `kvCache` 'int8', its bytes 0.625x on the tiny model's heads of 16) and stays at
/// step 0 rather than stepping the weights down; `resetChat` starts the next cache in f16.
#[wasm_bindgen_test]
async fn an_auto_kv_cache_goes_to_int8_before_the_model_steps_down() {
    use flexquant::runtime::backend::KV_BLOCK;
    let policy = json!({"up_delay_ms": 0.0, "fault_cooldown_ms": 0.0});
    for (backend, kv) in [("webgpu", json!(null)), ("cpu", json!("auto"))] {
        let opts = json!({"backend": backend, "policy": policy, "kvCache": kv});
        let (e, ev) = engine("/tiny/manifest.json", opts).await.unwrap();
        assert_eq!(stats(&e)["kvCache"], "f16", "{backend}");
        let long = "Elizabeth walked to Netherfield. ".repeat(KV_BLOCK / 16);
        start(&e, &[user(&long)], 4).await;
        let s = stats(&e);
        let (held, kv) = (
            s["heldBytes"].as_u64().unwrap(),
            s["kvCacheBytes"].as_u64().unwrap(),
        );
        assert_eq!(s["step"], 0, "{backend}: {s}");
        let saved = kv * 3 / 8;
        // Step 0 with the cache in int8 and half the saving to spare; not with it in f16.
        let budget = ((held - saved / 2) as f64 / 0.9) as u64;
        call(e.set_memory_budget(JsValue::from(budget as f64)))
            .await
            .unwrap();
        chunk(&e).await;
        let s = stats(&e);
        assert_eq!(s["kvCache"], "int8", "{backend}: {s}");
        assert_eq!(s["step"], 0, "{backend}: the weights stayed: {s}");
        assert_eq!(
            s["kvCacheBytes"].as_u64().unwrap(),
            kv - saved,
            "{backend}: {s}"
        );
        assert_eq!(
            s["heldBytes"].as_u64().unwrap(),
            s["footprintBytes"].as_u64().unwrap() + s["overheadBytes"].as_u64().unwrap(),
            "{backend}: {s}"
        );
        let conv = of_type(&ev, "kv-cache");
        assert_eq!(conv.len(), 1, "{backend}: {conv:?}");
        assert_eq!(
            (
                &conv[0]["from"],
                &conv[0]["to"],
                conv[0]["bytesBefore"].as_u64(),
                conv[0]["bytesAfter"].as_u64()
            ),
            (&json!("f16"), &json!("int8"), Some(kv), Some(kv - saved)),
            "{backend}: {conv:?}"
        );
        assert!(of_type(&ev, "swap").is_empty(), "{backend}: no swap");
        finish(&e).await;
        call(e.reset_chat()).await.unwrap();
        assert_eq!(
            stats(&e)["kvCache"],
            "f16",
            "{backend}: a new chat starts in f16"
        );
        start(&e, &[user("Hi")], 2).await;
        let (_, n, _) = finish(&e).await;
        assert!(n >= 1, "{backend}: answers after the reset");
        assert_no_errors(&ev);
        call(e.unload()).await.unwrap();
    }
}

/// The KV cache grows with the conversation and the controller follows it, on both backends:
/// a model loads holding one block of the cache; under a budget that held that, a long prompt
/// grows the cache and the model steps down between tokens (the held bytes always equal the
/// step's footprint plus the overheads the controller counts); a short unrelated request
/// shrinks the cache back to a block and the model climbs back up; `resetChat` frees the
/// cache and the model steps back up.
#[wasm_bindgen_test]
async fn the_kv_cache_grows_with_the_conversation_and_the_controller_follows() {
    use flexquant::runtime::backend::KV_BLOCK;
    let ins = val(flexquant::web::cache_admin::inspect_ensemble(
        url("/tiny/manifest.json"),
        JsValue::NULL,
    )
    .await
    .unwrap());
    let block = KV_BLOCK as u64 * ins["kvBytesPerToken"].as_u64().unwrap();
    let policy = json!({"up_delay_ms": 0.0, "fault_cooldown_ms": 0.0, "max_up_growth": 100.0});
    for backend in ["webgpu", "cpu"] {
        let opts = json!({"backend": backend, "policy": policy});
        let (e, ev) = engine("/tiny/manifest.json", opts).await.unwrap();
        let held = |s: &Value| s["heldBytes"].as_u64().unwrap();
        let want = |s: &Value| {
            s["footprintBytes"].as_u64().unwrap() + s["overheadBytes"].as_u64().unwrap()
        };
        let s = stats(&e);
        assert_eq!(held(&s), want(&s), "{backend} at load: {s}");
        let at_load = s["overheadBytes"].as_u64().unwrap();
        let kv = |s: &Value| s["kvCacheBytes"].as_u64().unwrap();
        assert_eq!(kv(&s), block, "{backend}: one block at load: {s}");
        call(e.set_memory_budget(JsValue::from(budget_for(&e, 0) as f64)))
            .await
            .unwrap();
        assert_eq!(stats(&e)["step"], 0, "{backend}: the loaded step fits");

        // Past two blocks of positions (the tiny model's tokens are bytes).
        let long = "Elizabeth walked to Netherfield. ".repeat(KV_BLOCK / 16);
        start(&e, &[user(&long)], 4).await;
        let s = stats(&e);
        assert!(
            s["overheadBytes"].as_u64().unwrap() >= at_load + 2 * block,
            "{backend}: the cache grew by two blocks at least: {s}"
        );
        assert_eq!(held(&s), want(&s), "{backend} after the prompt: {s}");
        assert_eq!(
            s["overheadBytes"].as_u64().unwrap() - at_load,
            kv(&s) - block,
            "{backend}: the overheads grew by the cache's growth: {s}"
        );
        chunk(&e).await;
        let s = stats(&e);
        let last = s["steps"].as_u64().unwrap() - 1;
        assert_eq!(
            s["step"], last,
            "{backend}: stepped down for the cache: {s}"
        );
        assert_eq!(held(&s), want(&s), "{backend} after the step down: {s}");
        finish(&e).await;

        // A short request unrelated to the long one (no reset): the cache shrinks back to a
        // block (`Backend::shrink_kv`) and the model climbs back up.
        start(&e, &[user("Hi")], 2).await;
        let s = stats(&e);
        assert_eq!(kv(&s), block, "{backend}: shrunk for a short request: {s}");
        assert_eq!(
            s["overheadBytes"].as_u64().unwrap(),
            at_load,
            "{backend}: {s}"
        );
        assert_eq!(held(&s), want(&s), "{backend} after the shrink: {s}");
        finish(&e).await;
        while call(e.rebalance()).await.unwrap() == true {}
        let s = stats(&e);
        // Not necessarily to step 0: the budget was pinned to step 0 at load, and a climb's
        // swaps hold two versions of a module for a moment.
        let up = s["step"].as_u64().unwrap();
        assert!(
            up < last,
            "{backend}: climbed back up after the shrink: {s}"
        );
        assert_eq!(held(&s), want(&s), "{backend} back up: {s}");

        call(e.reset_chat()).await.unwrap();
        let s = stats(&e);
        assert!(
            s["overheadBytes"].as_u64().unwrap() < at_load,
            "{backend}: the cache was freed: {s}"
        );
        assert_eq!(kv(&s), 0, "{backend}: {s}");
        while call(e.rebalance()).await.unwrap() == true {}
        let s = stats(&e);
        assert_eq!(s["step"], 0, "{backend}: back up after the reset: {s}");
        assert_eq!(held(&s), want(&s), "{backend} after the reset: {s}");
        start(&e, &[user("Hi")], 2).await;
        let (_, n, _) = finish(&e).await;
        assert!(n >= 1, "{backend}: answers after the reset");
        assert_no_errors(&ev);
        call(e.unload()).await.unwrap();
    }
}

/// A conversation moved by its KV cache's bytes (`exportSession` / `importSession`) from a
/// WebGPU engine (read back from the device) to another WebGPU engine and to a CPU one: the
/// follow-up there runs only its new tokens, the WebGPU one answers as the first engine does
/// and the allocator still counts exactly the footprint and overheads; a session changed on
/// the way is refused, the conversation kept.
#[wasm_bindgen_test]
async fn a_session_moves_between_engines_and_backends() {
    let open = |backend: &str| engine("/tiny/manifest.json", json!({"backend": backend}));
    let (a, _) = open("webgpu").await.unwrap();
    let first = [user("Tell me about Elizabeth.")];
    start(&a, &first, 6).await;
    let (text, _, first_last) = finish(&a).await;
    let first_prompt = first_last["usage"]["prompt_tokens"].as_u64().unwrap();
    let session = JsFuture::from(a.export_session())
        .await
        .expect("exportSession");
    let tokens: js_sys::Uint32Array = js_sys::Reflect::get(&session, &"tokens".into())
        .unwrap()
        .into();
    let kv: js_sys::Uint8Array = js_sys::Reflect::get(&session, &"kv".into()).unwrap().into();
    assert_eq!(
        tokens.length() as u64,
        stats(&a)["contextTokens"].as_u64().unwrap()
    );
    assert!(kv.length() > 0);
    let follow = [
        user("Tell me about Elizabeth."),
        json!({"role": "assistant", "content": text}),
        user("And Darcy?"),
    ];
    start(&a, &follow, 6).await;
    let (want, _, last) = finish(&a).await;
    let cached = last["usage"]["prompt_tokens_details"]["cached_tokens"].clone();
    // The tiny model's answers are random bytes, whose text may not encode back to the same
    // tokens: at least the first prompt is found cached.
    assert!(cached.as_u64().unwrap() >= first_prompt, "{last}");

    for backend in ["webgpu", "cpu"] {
        let (b, _) = open(backend).await.unwrap();
        call(b.import_session(session.clone()))
            .await
            .expect("importSession");
        let s = stats(&b);
        assert_eq!(
            s["contextTokens"].as_u64(),
            Some(tokens.length() as u64),
            "{s}"
        );
        if backend == "webgpu" {
            let held = s["footprintBytes"].as_u64().unwrap() + s["overheadBytes"].as_u64().unwrap();
            assert_eq!(s["gpuAllocatedBytes"].as_u64(), Some(held), "{s}");
        }
        start(&b, &follow, 6).await;
        let (got, _, last) = finish(&b).await;
        assert_eq!(
            last["usage"]["prompt_tokens_details"]["cached_tokens"], cached,
            "{backend}: {last}"
        );
        if backend == "webgpu" {
            assert_eq!(
                got, want,
                "the same follow-up on the engine the session moved to"
            );
        }
        // Changed on the way: refused, naming it; the conversation stays.
        let held = stats(&b)["contextTokens"].clone();
        let cut = js_sys::Object::assign(&js_sys::Object::new(), &session.clone().into());
        js_sys::Reflect::set(&cut, &"kv".into(), &kv.subarray(0, kv.length() - 1)).unwrap();
        let err = call(b.import_session(cut.into())).await.unwrap_err();
        assert_eq!(err["code"], "input", "{err}");
        assert!(
            err["message"].as_str().unwrap().contains("kv holds"),
            "{err}"
        );
        assert_eq!(stats(&b)["contextTokens"], held);
        call(b.unload()).await.unwrap();
    }
    call(a.unload()).await.unwrap();
}
