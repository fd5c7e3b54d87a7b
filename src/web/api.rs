//! The shapes JS passes in and gets back (see `js/API.md` and `js/index.d.ts`): serde structs,
//! read and written through `serde-wasm-bindgen`, so each key is named once, here. Engine
//! options and stats use JS's camelCase; chat requests and chunks keep OpenAI's snake_case.

use crate::runtime::json_constraint::TokenBytes;
use crate::runtime::{Policy, Reason, TokenLogprob};
use crate::web::error::{Code, WebError, WebResult};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use wasm_bindgen::{JsCast, JsValue};

/// Reads `v` as `T`; an error names the offending key (`options.budgetBytes: invalid type ...`).
pub fn from_js<T: DeserializeOwned>(v: JsValue, what: &str) -> WebResult<T> {
    let de = serde_wasm_bindgen::Deserializer::from(v);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            what.to_string()
        } else {
            format!("{what}.{path}")
        };
        // serde-wasm-bindgen's errors are JS errors, shown as "Error: ..."; the path says what.
        let why = e.inner().to_string();
        let why = why.strip_prefix("Error: ").unwrap_or(&why);
        WebError::new(Code::Input, format!("{at}: {why}"))
    })
}

/// A byte count from JS: any finite non-negative number (rounded down; pages compute budgets
/// as `0.8 * x`), or `null` / `undefined` for none.
pub fn bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<f64>::deserialize(d)? {
        None => Ok(None),
        Some(b) if b.is_finite() && b >= 0.0 => Ok(Some(b as u64)),
        Some(b) => Err(serde::de::Error::custom(format!(
            "{b} is not a byte count (expected a finite number >= 0)"
        ))),
    }
}

/// `setMinTokensPerSecond`'s argument.
#[derive(Deserialize)]
#[serde(transparent)]
pub struct MinSpeed(pub Option<f64>);

/// `setMaxPerplexity`'s argument (`null`: no floor).
#[derive(Deserialize)]
#[serde(transparent)]
pub struct MaxPerplexity(pub Option<f64>);

/// `setMemoryBudget`'s argument.
#[derive(Deserialize)]
#[serde(transparent)]
pub struct Budget(#[serde(deserialize_with = "bytes")] pub Option<u64>);

/// `Engine.create`'s options. Keys the wasm side does not use (`heapPollMs`, `wasmUrl`: the JS
/// wrapper's) are ignored.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct EngineOptions {
    /// App-set memory budget in bytes (model + KV cache + activations).
    #[serde(deserialize_with = "bytes")]
    pub budget_bytes: Option<u64>,
    /// KV-cache positions (clamped to 16 ..= the model's maximum).
    pub context: Option<u32>,
    /// How the KV cache stores keys and values: `'f16'` (default) or `'int8'`.
    pub kv_cache: Option<crate::runtime::backend::KvChoice>,
    /// Cache API name; `useCache: false` turns the cache off.
    pub cache_name: Option<String>,
    pub use_cache: Option<bool>,
    /// Downloads at a time (1..=32; default `loader::PARALLEL`).
    pub parallel_downloads: Option<u32>,
    /// How long a download may go without data before it is retried, then given up as a
    /// `network` error (ms; default `fetch::DEFAULT_STALL_MS`, 0: no limit).
    pub stall_timeout_ms: Option<u32>,
    /// Prompt tokens read between two looks at the event loop (an abort, a `prefill` event,
    /// a swap); default: as many as take about a quarter of a second at the measured speed.
    pub prefill_chunk_tokens: Option<u32>,
    /// Bytes the cache may hold before old ensembles are evicted.
    #[serde(deserialize_with = "bytes")]
    pub cache_quota_bytes: Option<u64>,
    pub policy: Option<Policy>,
    /// The slowest decode the app accepts (tokens/s): below it the model steps down the
    /// trajectory (fewer bytes per token), back up when there is headroom.
    pub min_tokens_per_second: Option<f64>,
    /// The quality floor: the controller never steps to a step whose perplexity (the
    /// manifest's held-out figure) is above this; under a budget it cannot meet there, it
    /// emits `below-floor` and stays at the floor.
    pub max_perplexity: Option<f64>,
    /// `'auto'` (default), `'webgpu'` or `'cpu'`.
    pub backend: Option<crate::web::backend::BackendChoice>,
    /// `'auto'` (default) or a count: threads of the CPU backend in a worker engine.
    pub threads: Option<crate::web::threads::ThreadsOption>,
    /// Whether decode tokens run on the thread count measured fastest now (default) or on all
    /// `threads` always (see `cpu::width`).
    pub adapt_threads: Option<bool>,
    /// An AbortSignal: aborted while the engine loads, the load stops (its downloads too) and
    /// `create` rejects with `aborted`.
    #[serde(with = "serde_wasm_bindgen::preserve")]
    pub signal: JsValue,
    #[serde(with = "serde_wasm_bindgen::preserve")]
    pub on_event: JsValue,
    #[serde(with = "serde_wasm_bindgen::preserve")]
    pub on_progress: JsValue,
}

impl EngineOptions {
    /// `undefined` and `null` are the defaults.
    pub fn parse(v: JsValue) -> WebResult<EngineOptions> {
        if v.is_undefined() || v.is_null() {
            return Ok(EngineOptions::default());
        }
        let o: EngineOptions = from_js(v, "options")?;
        if !o.signal.is_undefined() && !o.signal.is_null() && o.abort_signal().is_none() {
            return Err(WebError::new(
                Code::Input,
                "options.signal: expected an AbortSignal",
            ));
        }
        for (name, f) in [("onEvent", &o.on_event), ("onProgress", &o.on_progress)] {
            if !f.is_undefined() && !f.is_null() && !f.is_function() {
                return Err(WebError::new(
                    Code::Input,
                    format!("options.{name}: expected a function"),
                ));
            }
        }
        Ok(o)
    }

    /// The `signal` option, when it is an AbortSignal.
    pub fn abort_signal(&self) -> Option<web_sys::AbortSignal> {
        self.signal.clone().dyn_into().ok()
    }

    /// The Cache API name to use, `None` when caching is off.
    pub fn cache(&self) -> Option<String> {
        match self.use_cache {
            Some(false) => None,
            _ => Some(
                self.cache_name
                    .clone()
                    .unwrap_or_else(|| "flexquant".into()),
            ),
        }
    }

    /// The downloads' stall limit (`stallTimeoutMs`): `None` for 0 (no limit).
    pub fn stall_ms(&self) -> Option<u32> {
        match self.stall_timeout_ms {
            None => Some(crate::web::fetch::DEFAULT_STALL_MS),
            Some(0) => None,
            Some(ms) => Some(ms),
        }
    }

    pub fn callback(f: &JsValue) -> Option<js_sys::Function> {
        f.clone().dyn_into().ok()
    }
}

pub use crate::runtime::request::{ChatRequest, Endpoint};

impl ChatRequest {
    /// Reads a request from JS with the checks of `runtime::request` (which native code and the
    /// fuzzer run on JSON): an unknown field is an `unsupported` error naming it.
    pub fn parse(v: JsValue, endpoint: Endpoint) -> WebResult<ChatRequest> {
        if let Some(o) = v.dyn_ref::<js_sys::Object>() {
            let keys: Vec<String> = js_sys::Object::keys(o)
                .iter()
                .filter_map(|k| k.as_string())
                .collect();
            ChatRequest::check_keys_for(endpoint, keys.iter().map(String::as_str))?;
        }
        let what = match endpoint {
            Endpoint::Chat => "chat request",
            Endpoint::Text => "completion request",
        };
        from_js(v, what)
    }
}

/// `stats()`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub step: usize,
    pub steps: usize,
    pub target_step: Option<usize>,
    pub footprint_bytes: Option<u64>,
    pub overhead_bytes: u64,
    pub gpu_allocated_bytes: u64,
    pub gpu_buffers: u64,
    pub budget_bytes: Option<u64>,
    pub effective_budget_bytes: Option<u64>,
    pub heap_ratio: Option<f64>,
    pub tokens_per_second: Option<f64>,
    pub prefill_tokens_per_second: Option<f64>,
    /// The minimum decode speed set, the last measured one (over recent tokens at one step),
    /// and the footprint expected to reach the minimum.
    pub min_tokens_per_second: Option<f64>,
    /// The quality floor (`maxPerplexity`) as a step: the deepest the controller may go.
    pub floor_step: Option<usize>,
    pub measured_tokens_per_second: Option<f64>,
    pub speed_cap_bytes: Option<u64>,
    pub swaps: u64,
    pub swaps_down: u64,
    pub swaps_up: u64,
    pub device_losses: u64,
    pub ooms: u64,
    pub swap_failures: u64,
    /// The WebGPU adapter, or the CPU backend's build (SIMD, threads).
    pub adapter: String,
    /// Threads the CPU backend computes with (1 on WebGPU; see the `threads` option).
    pub threads: usize,
    /// Threads the last decode token ran on (fewer than `threads` when fewer measured faster).
    pub threads_active: usize,
    pub backend: Option<crate::web::backend::Kind>,
    /// Why this backend runs (the `backend` option, or what `auto` found).
    pub backend_reason: String,
    /// Bytes the model holds (weights, KV cache), on either backend.
    pub held_bytes: u64,
    /// Bytes of the KV cache now (grows in blocks with the conversation; `resetChat` frees it).
    pub kv_cache_bytes: u64,
    /// How the KV cache stores keys and values (the `kvCache` option).
    pub kv_cache: crate::runtime::backend::KvFormat,
    /// The wasm instance's memory (the CPU backend's weights live there).
    pub wasm_memory_bytes: u64,
    pub loaded_from_cache: bool,
    pub network_bytes: u64,
    pub cache_bytes: u64,
    pub prefetching: bool,
    pub context_tokens: usize,
    pub context_length: usize,
    pub bits: Vec<u32>,
    pub last_reason: Option<Reason>,
    pub last_swap_reason: Option<Reason>,
    pub model_name: String,
    pub unloaded: bool,
}

/// One point of `trajectory()`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrajectoryPoint {
    pub step: usize,
    pub footprint_bytes: u64,
    pub calib_ppl: Option<f64>,
    pub heldout_ppl: Option<f64>,
    pub module: Option<String>,
    pub from_bits: Option<u32>,
    pub to_bits: Option<u32>,
}

/// What `startChat` resolves to.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Started {
    pub prompt_tokens: usize,
}

/// One OpenAI `chat.completion.chunk` (`Choice`) or streamed `text_completion` (`TextChoice`).
#[derive(Serialize)]
pub struct Chunk<'a, C> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: [C; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Serialize)]
pub struct Choice {
    pub index: u32,
    pub delta: Delta,
    pub finish_reason: Option<&'static str>,
    /// The chunk's token, when the request asked for `logprobs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Logprobs>,
}

/// A text completion's choice: the text of the chunk's token (OpenAI's legacy completions).
#[derive(Serialize)]
pub struct TextChoice {
    pub index: u32,
    pub text: String,
    pub finish_reason: Option<&'static str>,
    /// The chunk's token, when the request asked for `logprobs` (null otherwise).
    pub logprobs: Option<TextLogprobs>,
}

/// OpenAI's legacy `choices[].logprobs`: parallel lists, one entry per token (one token per
/// chunk; an echoed prompt's tokens in the choice's first): its text, its log-probability, the
/// most likely tokens at its position with theirs (the token itself among them: up to
/// `logprobs` + 1), and where it starts in the choice's text (characters). A prompt's first
/// token has no log-probability or alternatives (null: nothing precedes it).
#[derive(Serialize, Default)]
pub struct TextLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<serde_json::Map<String, serde_json::Value>>>,
    pub text_offset: Vec<usize>,
}

/// OpenAI's `choices[].logprobs`: one entry per token.
#[derive(Serialize)]
pub struct Logprobs {
    pub content: Vec<ContentLogprob>,
}

/// A token, its log-probability and the most likely tokens at its position.
#[derive(Serialize)]
pub struct ContentLogprob {
    #[serde(flatten)]
    pub token: TopLogprob,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Serialize)]
pub struct TopLogprob {
    /// The token's text (its bytes as UTF-8, lossy where a character is split).
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

impl TopLogprob {
    /// Token `id` with its bytes from `table` (`Tokenizer::token_bytes`; a special token: its
    /// text).
    fn of(id: u32, logprob: f32, table: &TokenBytes, special: impl Fn(u32) -> String) -> Self {
        let bytes = table
            .get(id as usize)
            .cloned()
            .flatten()
            .unwrap_or_else(|| special(id).into_bytes());
        TopLogprob {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            logprob,
            bytes,
        }
    }
}

impl TextLogprobs {
    /// Appends token `id`, starting at character `offset` of the choice's text, with its
    /// log-probability and alternatives `t` (`None`: a prompt's first token).
    pub fn push(
        &mut self,
        id: u32,
        t: Option<&TokenLogprob>,
        offset: usize,
        table: &TokenBytes,
        special: impl Fn(u32) -> String,
    ) {
        let token = TopLogprob::of(id, t.map_or(f32::NAN, |t| t.logprob), table, &special);
        let top = t.map(|t| {
            let mut top = serde_json::Map::new();
            for &(id, l) in &t.top {
                let e = TopLogprob::of(id, l, table, &special);
                top.entry(e.token).or_insert(l.into());
            }
            top.entry(token.token.clone()).or_insert(t.logprob.into());
            top
        });
        self.tokens.push(token.token);
        self.token_logprobs.push(t.map(|t| t.logprob));
        self.top_logprobs.push(top);
        self.text_offset.push(offset);
    }
}

impl Logprobs {
    /// `t` with each token's bytes (`TopLogprob::of`).
    pub fn of(t: &TokenLogprob, table: &TokenBytes, special: impl Fn(u32) -> String) -> Self {
        let entry = |id: u32, logprob: f32| TopLogprob::of(id, logprob, table, &special);
        Logprobs {
            content: vec![ContentLogprob {
                token: entry(t.id, t.logprob),
                top_logprobs: t.top.iter().map(|&(id, l)| entry(id, l)).collect(),
            }],
        }
    }
}

#[derive(Serialize, Default)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Pieces of the calls the answer makes (`finish_reason: 'tool_calls'` once whole).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// OpenAI's `delta.tool_calls[]` entry: the first of a call has its id, type and name, the
/// others more of its arguments.
#[derive(Serialize)]
pub struct ToolCallDelta {
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionCall,
}

#[derive(Serialize)]
pub struct FunctionCall {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// More of the arguments object's JSON text.
    pub arguments: String,
}

#[derive(Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// OpenAI's: the prompt tokens the KV cache already held.
    pub prompt_tokens_details: PromptTokensDetails,
    pub extra: UsageExtra,
}

#[derive(Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

#[derive(Serialize)]
pub struct UsageExtra {
    pub prefill_tokens_per_s: Option<f64>,
    pub decode_tokens_per_s: Option<f64>,
    pub step: usize,
    pub swaps: u64,
}

/// `o[k]`, `undefined` where `o` is not an object or has no such key.
pub fn get(o: &JsValue, k: &str) -> JsValue {
    js_sys::Reflect::get(o, &k.into()).unwrap_or(JsValue::UNDEFINED)
}
