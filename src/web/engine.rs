//! The wasm-bindgen `Engine`: options, the chat (one token per `nextChunk` call), and between
//! tokens the signals (device loss, out-of-memory, budget, heap) and `runtime::Elastic`'s
//! decision, which `trajectory.rs` executes (swaps keep the KV cache; a device loss rebuilds
//! at a lower step and runs the conversation again into the new cache). The JS wrapper
//! (`js/index.js`) serializes calls and turns chunks into an async iterator.

use crate::gpu::{Allocator, ModelOptions};
use crate::model::chat::ChatTemplate;
use crate::model::tokenizer::{StreamDecoder, Tokenizer};
use crate::model::weights::ModuleId;
use crate::runtime::json_constraint::TokenBytes;
use crate::runtime::request::Prompt;
use crate::runtime::tools::{turn_constraint, CallDelta, CallEnd, HeldCall, ToolChoice};
use crate::runtime::walk::Running;
use crate::runtime::TokenLogprob;
use crate::runtime::{Backend, Factory};
use crate::runtime::{Elastic, Reason};
use crate::runtime::{
    PrefillPace, Sampling, StopReason, StopText, Turn, TurnOptions, DEFAULT_CONTEXT,
};
use crate::web::api::{
    from_js, Budget, ChatRequest, Choice, Chunk, Delta, Endpoint, EngineOptions, FunctionCall,
    Logprobs, MaxPerplexity, MinSpeed, PromptTokensDetails, Started, Stats, TextChoice,
    TextLogprobs, ToolCallDelta, TrajectoryPoint, Usage, UsageExtra,
};
use crate::web::backend::{BackendChoice, Kind, WebModel};
use crate::web::error::{Code, WebError, WebResult};
use crate::web::events::{to_js, Emitter};
use crate::web::loader::Loader;
use crate::web::support::auto_choice;
use crate::web::threads::{self, ThreadsOption};
use crate::web::trajectory::{web_walk, DeviceFlags, WebWalk};
use crate::web::{now_ms, sleep};
use serde_json::json;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

#[wasm_bindgen]
pub struct Engine {
    inner: Rc<Inner>,
}

pub(super) struct Inner {
    /// The byte source (`walk.source`, the loader), the controller (`walk.elastic`) and the
    /// WebGPU factory.
    pub(super) walk: WebWalk,
    pub(super) tokenizer: Tokenizer,
    pub(super) chat: ChatTemplate,
    pub(super) stop: Vec<u32>,
    pub(super) opts: ModelOptions,
    /// `None` while an operation holds it (calls are serialized by the JS wrapper) or after
    /// `unload`.
    pub(super) state: RefCell<Option<State>>,
    pub(super) unloaded: Cell<bool>,
    pub(super) interrupt: Cell<bool>,
    pub(super) flags: DeviceFlags,
    /// Counters that survive the model (so `stats` after `unload` shows 0 bytes).
    pub(super) alloc: RefCell<Option<Allocator>>,
    /// The current model's WebGPU device (`destroyDevice` reaches it while a call runs).
    pub(super) device: RefCell<Option<wgpu::Device>>,
    pub(super) snap: Rc<RefCell<Snapshot>>,
    pub(super) prefetching: Cell<bool>,
    pub(super) completions: Cell<u64>,
    /// The `backend` option (`auto` may fall back to the CPU after repeated device losses).
    pub(super) choice: BackendChoice,
    /// Device losses since the last token (capped: see `Inner::recover`).
    pub(super) losses_in_a_row: Cell<u32>,
    /// A `below-floor` event was emitted and the controller still holds there.
    pub(super) below_floor: Cell<bool>,
    /// How many prompt tokens a prefill reads between two looks at the event loop.
    pub(super) pace: RefCell<PrefillPace>,
}

pub(super) struct State {
    pub(super) run: Running<WebModel>,
    turn: Option<Answer>,
}

/// One answer in progress.
struct Answer {
    turn: Turn,
    /// A chat answer (`chat.completion.chunk`s) or a text completion (`text_completion`s).
    endpoint: Endpoint,
    /// Which of the request's `n` answers this is, and what starts the next.
    choices: Choices,
    decoder: StreamDecoder,
    stop_text: StopText,
    id: String,
    created: u64,
    sent_role: bool,
    ended: bool,
    /// The text of an answer that may be a function call, held until it is known.
    call: Option<HeldCall>,
    /// Characters of this choice's text so far (an echoed prompt's, then each token's):
    /// where the next token starts (`TextLogprobs::text_offset`).
    offset: usize,
}

impl Answer {
    /// Ends an answer in `delta`: the text still held, or the rest of the calls it made; its
    /// `finish_reason` (`tool_calls` when its calls are whole).
    fn end(&mut self, delta: &mut Delta) -> Option<&'static str> {
        let (calls, unheld, whole) = match self.call.as_mut().map(|h| h.finish(self.turn.lead())) {
            Some(CallEnd::Calls { rest, cut, .. }) => (rest, String::new(), !cut),
            Some(CallEnd::Text(text)) => (Vec::new(), text, false),
            None => (Vec::new(), String::new(), false),
        };
        let held = self.stop_text.finish() + &unheld;
        delta.content = (!held.is_empty()).then_some(held);
        delta.tool_calls = self.call_deltas(calls);
        match self.turn.stats.stopped_by {
            Some(_) if whole => Some("tool_calls"),
            why => why.map(StopReason::finish_reason),
        }
    }

    /// OpenAI's `delta.tool_calls` for pieces of the calls: a call's first (with the name)
    /// carries its id and type, the others only more of its arguments; `None` for none.
    fn call_deltas(&self, pieces: Vec<CallDelta>) -> Option<Vec<ToolCallDelta>> {
        let out: Vec<ToolCallDelta> = pieces
            .into_iter()
            .filter(|d| d.name.is_some() || !d.arguments.is_empty())
            .map(|d| {
                let first = d.name.is_some();
                ToolCallDelta {
                    index: d.index as u32,
                    id: first.then(|| {
                        let (t, id, choice) = (self.created, &self.id, self.choices.index);
                        format!("call_{t}_{id}_{choice}_{}", d.index)
                    }),
                    kind: first.then_some("function"),
                    function: FunctionCall {
                        name: d.name,
                        arguments: d.arguments,
                    },
                }
            })
            .collect();
        (!out.is_empty()).then_some(out)
    }
}

/// What starts each of a request's answers: `n` per prompt (OpenAI's `n`: here one after the
/// other, from the same prompt, so only its last token runs again), and a text completion may
/// list several prompts (choice `index` answers prompt `index / n`).
struct Choices {
    /// Each prompt's tokens (a chat request has one).
    prompts: Vec<Vec<u32>>,
    sampling: Sampling,
    ignore_eos: bool,
    /// Each answer starts from these (fresh JSON-mode and stop-sequence state).
    opts: TurnOptions,
    stop_text: StopText,
    index: u32,
    n: u32,
    /// Completion tokens of the answers before this one.
    tokens_before: usize,
    /// Prompt tokens the first answer of each prompt found in the KV cache (a common prefix
    /// with what ran before: `usage.prompt_tokens_details.cached_tokens`).
    cached_tokens: usize,
    /// Whether an answer may be a function call (tools offered, `tool_choice` not `'none'`).
    calls: bool,
    /// A text completion's prompts as text, when each choice's text starts with its prompt
    /// (`echo`; a prompt of token ids as the tokenizer decodes it).
    echo: Option<Vec<String>>,
    /// With `echo` and `logprobs` (`opts.prompt_logprobs`): the current prompt's tokens, scored
    /// by its first answer's turn, shown at the start of each of its answers.
    prompt_logprobs: Vec<Option<TokenLogprob>>,
}

impl Choices {
    /// The prompt the current answer continues.
    fn ids(&self) -> &[u32] {
        &self.prompts[(self.index / self.n) as usize]
    }

    fn echo(&self) -> Option<&str> {
        Some(self.echo.as_ref()?[(self.index / self.n) as usize].as_str())
    }

    /// Whether the current answer is its prompt's first (which scores it, when asked).
    fn first_of_prompt(&self) -> bool {
        self.index.is_multiple_of(self.n)
    }

    /// Tokens of every prompt, each counted once (`usage.prompt_tokens`).
    fn prompt_tokens(&self) -> usize {
        self.prompts.iter().map(Vec::len).sum()
    }

    /// Answers in all, `n` per prompt.
    fn total(&self) -> u32 {
        self.n * self.prompts.len() as u32
    }
}

#[derive(Default, Clone)]
pub(super) struct Snapshot {
    pub(super) step: usize,
    pub(super) adapter: String,
    pub(super) bits: Vec<u32>,
    pub(super) tokens_per_s: Option<f64>,
    pub(super) prefill_tokens_per_s: Option<f64>,
    pub(super) swaps: u64,
    pub(super) loaded_from_cache: bool,
    pub(super) context_tokens: usize,
    pub(super) last_swap_reason: Option<Reason>,
    pub(super) backend: Option<crate::web::backend::Kind>,
    pub(super) held_bytes: u64,
    pub(super) kv_cache_bytes: u64,
    /// The KV cache's format now (`kvCache: 'auto'` changes it under pressure).
    pub(super) kv_format: Option<crate::runtime::backend::KvFormat>,
}

/// Bytes of this wasm instance's linear memory (it grows, never shrinks).
fn wasm_memory_bytes() -> u64 {
    let m: js_sys::WebAssembly::Memory = wasm_bindgen::memory().unchecked_into();
    let b: js_sys::ArrayBuffer = m.buffer().unchecked_into();
    b.byte_length() as u64
}

fn promise<F>(f: F) -> js_sys::Promise
where
    F: std::future::Future<Output = WebResult<JsValue>> + 'static,
{
    future_to_promise(async move { f.await.map_err(|e| e.to_js()) })
}

#[wasm_bindgen]
impl Engine {
    /// Loads the ensemble at `manifest_url` (see `js/API.md` for the options).
    pub async fn create(manifest_url: String, options: JsValue) -> Result<Engine, JsValue> {
        crate::web::set_panic_hook();
        let load = async {
            let o = EngineOptions::parse(options)?;
            let Some(signal) = o.abort_signal() else {
                return Self::load(&manifest_url, o).await;
            };
            crate::web::until_aborted(Self::load(&manifest_url, o), &signal)
                .await
                .unwrap_or_else(|| {
                    Err(WebError::new(
                        Code::Aborted,
                        format!(
                            "loading {manifest_url} was aborted (options.signal): its downloads \
                             stopped; files already verified stay cached for the next load"
                        ),
                    ))
                })
        };
        load.await.map_err(|e| e.to_js())
    }

    /// Starts an answer to `request` (`{messages, max_tokens, temperature, top_p, seed}`):
    /// prefills the conversation. Chunks then come from `nextChunk`.
    #[wasm_bindgen(js_name = startChat)]
    pub fn start_chat(&self, request: JsValue) -> js_sys::Promise {
        self.start(request, Endpoint::Chat)
    }

    /// Starts a text completion of `request.prompt` (OpenAI's legacy `completions`: the text
    /// continued as it is, no chat template): prefills it. Chunks (`text_completion`) then
    /// come from `nextChunk`.
    #[wasm_bindgen(js_name = startCompletion)]
    pub fn start_completion(&self, request: JsValue) -> js_sys::Promise {
        self.start(request, Endpoint::Text)
    }

    fn start(&self, request: JsValue, endpoint: Endpoint) -> js_sys::Promise {
        let i = self.inner.clone();
        promise(async move {
            let req = ChatRequest::parse(request, endpoint)?;
            let mut st = i.take()?;
            let r = i.start_chat(&mut st, req, endpoint).await;
            i.put(st);
            r
        })
    }

    /// The next OpenAI-style chunk of the answer, or `null` after the final one.
    #[wasm_bindgen(js_name = nextChunk)]
    pub fn next_chunk(&self) -> js_sys::Promise {
        let i = self.inner.clone();
        promise(async move {
            let mut st = i.take()?;
            let r = i.next_chunk(&mut st).await;
            i.put(st);
            r
        })
    }

    /// Ends the running answer after the current token (`finish_reason: 'abort'`); during a
    /// long prompt, after the piece being read (the answer then ends with no text).
    pub fn interrupt(&self) {
        self.inner.interrupt.set(true);
    }

    #[wasm_bindgen(js_name = resetChat)]
    pub fn reset_chat(&self) -> js_sys::Promise {
        let i = self.inner.clone();
        promise(async move {
            let mut st = i.take()?;
            st.turn = None;
            let r = i.walk.reset(&mut st.run).await;
            i.put(st);
            r?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// The conversation and its KV cache's bytes (`web::session_io`): `importSession` on an
    /// engine of the same ensemble goes on from it without running it again.
    #[wasm_bindgen(js_name = exportSession)]
    pub fn export_session(&self) -> js_sys::Promise {
        let i = self.inner.clone();
        promise(async move {
            let st = i.take()?;
            let r = i.export_session(&st).await;
            i.put(st);
            r
        })
    }

    /// Replaces the conversation by an exported one (a running answer ends); checked against
    /// this ensemble first. On error the conversation is as it was.
    #[wasm_bindgen(js_name = importSession)]
    pub fn import_session(&self, session: JsValue) -> js_sys::Promise {
        let i = self.inner.clone();
        promise(async move {
            let mut st = i.take()?;
            st.turn = None;
            let r = i.import_session(&mut st, session).await;
            i.put(st);
            r?;
            // The cache it brought counts against the budget from now on.
            i.rebalance_if_idle().await?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// Sets (or with `null` clears) the app's memory budget; when no answer is running the
    /// resulting swap happens before this resolves, else before the next token.
    #[wasm_bindgen(js_name = setMemoryBudget)]
    pub fn set_memory_budget(&self, bytes: JsValue) -> js_sys::Promise {
        let i = self.inner.clone();
        promise(async move {
            let Budget(bytes) = from_js(bytes, "setMemoryBudget(bytes)")?;
            match bytes {
                Some(b) => i.walk.elastic.borrow_mut().set_budget(b),
                None => i.walk.elastic.borrow_mut().clear_budget(),
            }
            i.rebalance_if_idle().await
        })
    }

    /// Sets (or with `null` clears) the slowest decode speed the app accepts, in tokens/s;
    /// like a budget, a needed step down happens before the next token (at once when idle).
    #[wasm_bindgen(js_name = setMinTokensPerSecond)]
    pub fn set_min_tokens_per_second(&self, tok_s: JsValue) -> js_sys::Promise {
        let i = self.inner.clone();
        promise(async move {
            let MinSpeed(v) = from_js(tok_s, "setMinTokensPerSecond(tokensPerSecond)")?;
            i.walk
                .elastic
                .borrow_mut()
                .set_min_speed(v, now_ms())
                .map_err(|e| WebError::new(Code::Input, e.to_string()))?;
            i.rebalance_if_idle().await
        })
    }

    /// Sets (or with `null` clears) the quality floor: the largest held-out perplexity the app
    /// accepts; the controller never steps below the deepest step within it (a model already
    /// below steps back up before the next token, at once when idle).
    #[wasm_bindgen(js_name = setMaxPerplexity)]
    pub fn set_max_perplexity(&self, max: JsValue) -> js_sys::Promise {
        let i = self.inner.clone();
        promise(async move {
            let MaxPerplexity(v) = from_js(max, "setMaxPerplexity(maxPerplexity)")?;
            let floor = match v {
                Some(max) => Some(
                    i.walk
                        .source
                        .manifest
                        .floor_for_perplexity(max)
                        .map_err(|e| WebError::new(Code::Input, e.to_string()))?,
                ),
                None => None,
            };
            i.walk.elastic.borrow_mut().set_floor(floor)?;
            i.rebalance_if_idle().await
        })
    }

    /// A JS-heap reading (`performance.memory.usedJSHeapSize`, `jsHeapSizeLimit`).
    #[wasm_bindgen(js_name = reportHeap)]
    pub fn report_heap(&self, used: f64, limit: f64) {
        self.inner
            .walk
            .elastic
            .borrow_mut()
            .heap(used as u64, limit as u64, now_ms());
    }

    /// Re-decides now (e.g. after heap readings) when no answer is running.
    pub fn rebalance(&self) -> js_sys::Promise {
        let i = self.inner.clone();
        promise(async move { i.rebalance_if_idle().await })
    }

    pub fn stats(&self) -> JsValue {
        to_js(&self.inner.stats())
    }

    /// `text` as this model's token ids (what a text completion's `prompt` takes as ids; a
    /// text's length in tokens): the same tokenizer as a prompt's, special tokens' text
    /// included as those tokens.
    pub fn tokenize(&self, text: &str) -> Result<JsValue, JsValue> {
        let ids = self.inner.tokenizer.encode(text);
        ids.map(|ids| to_js(&ids))
            .map_err(|e| WebError::from(e).to_js())
    }

    /// Token ids back to text (special tokens as their text); an id outside the vocabulary is
    /// an `input` error naming it.
    pub fn detokenize(&self, tokens: Vec<u32>) -> Result<String, JsValue> {
        let t = &self.inner.tokenizer;
        let vocab = t.vocab_size();
        if let Some(bad) = tokens.iter().find(|&&id| id as usize >= vocab) {
            let m = format!("detokenize: token id {bad} is not in the vocabulary of {vocab}");
            return Err(WebError::from(crate::Error::input(m)).to_js());
        }
        t.decode(&tokens, false)
            .map_err(|e| WebError::from(e).to_js())
    }

    pub fn trajectory(&self) -> JsValue {
        let m = &self.inner.walk.source.manifest;
        let points: Vec<_> = m
            .trajectory
            .iter()
            .enumerate()
            .map(|(step, p)| {
                let sw = p.swap.as_ref();
                TrajectoryPoint {
                    step,
                    footprint_bytes: p.footprint_bytes,
                    calib_ppl: p.calib_ppl,
                    heldout_ppl: p.heldout_ppl,
                    module: sw.map(|w| {
                        ModuleId {
                            layer: w.layer,
                            kind: w.kind,
                        }
                        .to_string()
                    }),
                    from_bits: sw.map(|w| w.from_bits),
                    to_bits: sw.map(|w| w.to_bits),
                }
            })
            .collect();
        to_js(&points)
    }

    /// Panics inside wasm, as a bug would (tests of the JS wrapper's crash handling).
    #[wasm_bindgen(js_name = simulatePanic)]
    pub fn simulate_panic(&self) {
        panic!("simulated panic (Engine.simulatePanic)");
    }

    /// Panics inside an async call, after an await (the call runs on wasm-bindgen's task
    /// queue, where a panic cannot reject the call's promise: the JS wrapper must).
    #[wasm_bindgen(js_name = simulatePanicAsync)]
    pub fn simulate_panic_async(&self) -> js_sys::Promise {
        promise(async {
            sleep(1).await;
            panic!("simulated panic in an async call (Engine.simulatePanic)");
        })
    }

    /// Destroys the GPU device as a real loss would, then recovers (a new device, a lower
    /// step, the conversation re-prefilled); resolves when recovered.
    #[wasm_bindgen(js_name = simulateDeviceLoss)]
    pub fn simulate_device_loss(&self) -> js_sys::Promise {
        let i = self.inner.clone();
        promise(async move {
            let mut st = i.take()?;
            i.flags.lost.borrow().store(true, Ordering::SeqCst);
            if let Some(gpu) = st.run.session.model.gpu() {
                gpu.device.destroy();
            }
            // On the CPU backend: the same rebuild (a new model, the conversation re-run).
            let r = i.recover(&mut st.run).await;
            i.put(st);
            r.map(|_| JsValue::UNDEFINED)
        })
    }

    /// Destroys the GPU device without telling the engine, as a driver reset would: the
    /// engine learns of it from `device.lost` (or the failing call) and recovers before the
    /// next token. For tests of that path; apps use `simulateDeviceLoss`.
    #[wasm_bindgen(js_name = destroyDevice)]
    pub fn destroy_device(&self) -> Result<(), JsValue> {
        // Also while a call runs (e.g. in the middle of a swap): the device is held apart.
        match self.inner.device.borrow().as_ref() {
            Some(device) => {
                device.destroy();
                Ok(())
            }
            None => {
                Err(WebError::new(Code::Input, "no GPU device (CPU backend or unloaded)").to_js())
            }
        }
    }

    /// Frees every GPU buffer and the device; the engine is unusable afterwards.
    pub fn unload(&self) -> js_sys::Promise {
        let i = self.inner.clone();
        promise(async move {
            let st = i.take()?;
            i.walk.source.close();
            let gpu = st.run.session.model.gpu().cloned();
            drop(st);
            i.device.borrow_mut().take();
            i.unloaded.set(true);
            if let Some(gpu) = gpu {
                gpu.device.destroy();
            }
            Ok(JsValue::UNDEFINED)
        })
    }
}

impl Engine {
    async fn load(url: &str, o: EngineOptions) -> WebResult<Engine> {
        let emitter = Emitter {
            on_event: EngineOptions::callback(&o.on_event),
            on_progress: EngineOptions::callback(&o.on_progress),
        };
        let cache = o.cache();
        let loader = Loader::open(
            url,
            cache.as_deref(),
            o.cache_quota_bytes,
            o.parallel_downloads,
            o.stall_ms(),
            emitter,
        )
        .await?;
        let m = &loader.manifest;
        let opts = ModelOptions {
            context: o
                .context
                .map_or(DEFAULT_CONTEXT, |c| c as usize)
                .clamp(16, m.config.max_position_embeddings),
            kv_format: o.kv_cache.unwrap_or_default().start(),
            // A scored prompt (`echo` + `logprobs`) runs 8 positions per pass on WebGPU
            // (`gpu::scoring`) for 4 x 8 x vocabulary bytes of logits (1.6 MB on the demo).
            logit_rows: 8,
            ..Default::default()
        };
        let footprints = m.trajectory.iter().map(|s| s.footprint_bytes).collect();
        let choice = o.backend.unwrap_or_default();
        let (use_cpu, reason) = match choice {
            BackendChoice::Cpu => (true, "asked for (backend: 'cpu')".to_string()),
            BackendChoice::Webgpu => (false, "asked for (backend: 'webgpu')".to_string()),
            BackendChoice::Auto => {
                let s = auto_choice().await;
                (s.backend == Kind::Cpu, s.reason)
            }
        };
        let policy = o.policy.unwrap_or_default();
        let mut elastic = Elastic::new(
            footprints,
            crate::runtime::backend::kv_cache_bytes_at_load(
                &m.config,
                opts.kv_format,
                opts.context,
            ),
            policy,
        )?;
        if let Some(b) = o.budget_bytes {
            elastic.set_budget(b);
        }
        elastic
            .set_min_speed(o.min_tokens_per_second, now_ms())
            .map_err(|e| WebError::new(Code::Input, format!("options.minTokensPerSecond: {e}")))?;
        if let Some(max) = o.max_perplexity {
            let floor = m
                .floor_for_perplexity(max)
                .map_err(|e| WebError::new(Code::Input, format!("options.{e}")))?;
            elastic.set_floor(Some(floor))?;
        }
        // Tokenizer, base and the step it starts at, downloaded at once. A module file that
        // fails verification is left to the walk, which loads a deeper step without it.
        let tk = match loader
            .first_load(elastic.clone().decide(now_ms()).target())
            .await
        {
            Ok(tk) => tk,
            Err(e) if module_file(m, &e) => loader.file(&m.tokenizer, "download").await?,
            Err(e) => return Err(e),
        };
        let tokenizer = m.tokenizer(&tk)?;
        loader.emitter.chat_template(&tokenizer.chat);
        let (chat, stop) = (tokenizer.chat.clone(), tokenizer.stop.clone());
        let flags = DeviceFlags {
            lost: Rc::new(RefCell::new(Arc::new(AtomicBool::new(false)))),
            oom: Arc::new(AtomicBool::new(false)),
        };
        let snap = Rc::new(RefCell::new(Snapshot::default()));
        let walk = web_walk(loader, opts, use_cpu, elastic, flags.clone(), snap.clone());
        walk.set_kv_choice(o.kv_cache.unwrap_or_default());
        *walk.factory.reason.borrow_mut() = reason;
        let inner = Rc::new(Inner {
            stop,
            walk,
            tokenizer,
            chat,
            opts,
            state: RefCell::new(None),
            unloaded: Cell::new(false),
            interrupt: Cell::new(false),
            flags,
            alloc: RefCell::new(None),
            device: RefCell::new(None),
            snap,
            prefetching: Cell::new(false),
            completions: Cell::new(0),
            choice,
            losses_in_a_row: Cell::new(0),
            below_floor: Cell::new(false),
            pace: RefCell::new(PrefillPace::new(o.prefill_chunk_tokens.map(|n| n as usize))),
        });
        // The pool starts before the model is built: its label counts the threads.
        let threads = o.threads.unwrap_or_default();
        let adapt = o.adapt_threads.unwrap_or(true);
        if use_cpu {
            inner.start_threads(threads, adapt).await;
        }
        let run = inner.build().await;
        inner.walk.source.end_first_load();
        let run = match run {
            // `auto`: a WebGPU that cannot run the model falls back to the CPU backend.
            Err(e) if e.code == Code::WebGpuUnavailable && choice == BackendChoice::Auto => {
                let f = &inner.walk.factory;
                f.use_cpu.set(true);
                *f.reason.borrow_mut() = format!("WebGPU cannot run this model: {}", e.message);
                inner.start_threads(threads, adapt).await;
                inner.build().await?
            }
            r => r?,
        };
        let step = run.step;
        let kind = run.session.model.kind();
        inner.backend_event(kind);
        inner.note_floor();
        let src = &inner.walk.source;
        inner.snap.borrow_mut().loaded_from_cache = src.net_bytes.get() == 0;
        inner.put(State { run, turn: None });
        src.emitter
            .emit(json!({"type": "progress", "phase": "ready",
            "loadedBytes": src.net_bytes.get() + src.cache_bytes.get(),
            "fromCache": src.cache_bytes.get(), "step": step}));
        inner.store_then_prefetch(step);
        Ok(Engine { inner })
    }
}

/// Whether `e` is about a module file the walk's fallback handles (one that fails
/// verification or is missing on the server).
fn module_file(m: &crate::ensemble::manifest::Manifest, e: &WebError) -> bool {
    <Loader as crate::runtime::ByteSource>::unverified_file(e)
        .is_some_and(|f| m.modules.iter().any(|v| v.file.file == f))
}

/// How long the thread pool's workers may take to start before the CPU backend runs on one.
const POOL_START_MS: i32 = 10_000;

impl Inner {
    /// Starts the CPU backend's threads (the `threads` option); fewer than asked for is a
    /// `threads` warning, and one thread always works. `adapt`: the `adaptThreads` option.
    async fn start_threads(&self, option: ThreadsOption, adapt: bool) {
        let em = &self.walk.source.emitter;
        let (n, why_fewer) = threads::plan(option);
        if let Some(w) = why_fewer {
            em.warning("threads", &w);
        }
        if n > 1 {
            if let Err(why) = threads::start_pool(n, POOL_START_MS).await {
                em.warning("threads", &format!("running one thread: {why}"));
            }
            crate::cpu::par::set_adaptive(adapt);
        }
    }

    /// The `backend` event: which backend runs and why.
    pub(super) fn backend_event(&self, kind: crate::web::backend::Kind) {
        let f = &self.walk.factory;
        self.walk
            .source
            .emitter
            .emit(json!({"type": "backend", "backend": kind,
            "reason": *f.reason.borrow(), "label": f.label()}));
    }

    fn take(&self) -> WebResult<State> {
        if self.unloaded.get() {
            return Err(WebError::new(Code::Unloaded, "the engine was unloaded"));
        }
        self.state.borrow_mut().take().ok_or_else(|| {
            WebError::new(
                Code::Busy,
                "another engine call is running (await it first)",
            )
        })
    }

    pub(super) fn put(&self, st: State) {
        let mut s = self.snap.borrow_mut();
        s.step = st.run.step;
        s.bits = st.run.session.model.eqm_bits();
        s.backend = Some(st.run.session.model.kind());
        s.held_bytes = st.run.session.model.held_bytes();
        s.kv_cache_bytes = st.run.session.model.kv_cache_bytes();
        s.kv_format = st.run.session.model.kv_format();
        s.context_tokens = st.run.session.tokens().len();
        drop(s);
        // The KV cache grows with the conversation and is freed with it.
        self.walk.note_overheads(&st.run);
        *self.state.borrow_mut() = Some(st);
    }

    fn stats(&self) -> Stats {
        let e = self.walk.elastic.borrow().stats();
        let s = self.snap.borrow().clone();
        let alloc = self.alloc.borrow();
        let src = &self.walk.source;
        Stats {
            step: s.step,
            steps: e.steps,
            target_step: e.target_step,
            footprint_bytes: e.footprint_bytes,
            overhead_bytes: e.overhead_bytes,
            gpu_allocated_bytes: alloc.as_ref().map_or(0, |a| a.bytes()),
            gpu_buffers: alloc.as_ref().map_or(0, |a| a.buffers()),
            budget_bytes: e.budget_bytes,
            effective_budget_bytes: e.effective_budget_bytes,
            heap_ratio: e.heap_ratio,
            tokens_per_second: s.tokens_per_s,
            prefill_tokens_per_second: s.prefill_tokens_per_s,
            min_tokens_per_second: e.min_tok_s,
            floor_step: e.floor_step,
            measured_tokens_per_second: e.speed_tok_s,
            speed_cap_bytes: e.speed_cap_bytes,
            swaps: s.swaps,
            swaps_down: e.swaps_down,
            swaps_up: e.swaps_up,
            device_losses: e.device_losses,
            ooms: e.ooms,
            swap_failures: e.swap_failures,
            adapter: s.adapter,
            threads: match s.backend {
                Some(Kind::Cpu) => crate::cpu::par::threads(),
                _ => 1,
            },
            threads_active: match s.backend {
                Some(Kind::Cpu) => crate::cpu::par::active_threads(),
                _ => 1,
            },
            backend: s.backend,
            backend_reason: self.walk.factory.reason.borrow().clone(),
            held_bytes: s.held_bytes,
            kv_cache_bytes: s.kv_cache_bytes,
            kv_cache: s.kv_format.unwrap_or(self.opts.kv_format),
            wasm_memory_bytes: wasm_memory_bytes(),
            loaded_from_cache: s.loaded_from_cache,
            network_bytes: src.net_bytes.get(),
            cache_bytes: src.cache_bytes.get(),
            prefetching: self.prefetching.get(),
            context_tokens: s.context_tokens,
            context_length: self.opts.context,
            bits: s.bits,
            last_reason: e.last_reason,
            last_swap_reason: s.last_swap_reason,
            model_name: src.manifest.name.clone(),
            unloaded: self.unloaded.get(),
        }
    }

    // ---- chat ----

    async fn start_chat(
        self: &Rc<Self>,
        st: &mut State,
        req: ChatRequest,
        endpoint: Endpoint,
    ) -> WebResult<JsValue> {
        let prompts = match endpoint {
            // Its own error first (`sampling` asks for messages otherwise).
            Endpoint::Text => Some(req.text_prompts()?),
            Endpoint::Chat => None,
        };
        let n = req.answers(prompts.as_ref().map_or(1, Vec::len))?;
        let random = (js_sys::Math::random() * 2f64.powi(53)) as u64;
        let s = req.sampling(random)?;
        let stop_text = req.stop_text()?;
        let tools = req.tools()?;
        let emitter = &self.walk.source.emitter;
        for f in tools.iter().flat_map(|t| &t.functions) {
            if let Some(why) = &f.loose {
                let m = format!("`{}`'s arguments are free where: {why}", f.name);
                emitter.warning("tool-schema-loose", &m);
            }
        }
        let answer = req.response_schema()?.map(|(schema, relaxed)| {
            if !relaxed.is_empty() {
                let m = format!("the answer is free where: {}", relaxed.join("; "));
                emitter.warning("schema-loose", &m);
            }
            schema
        });
        let json = turn_constraint(tools.as_ref(), answer, self.tokenizer.token_bytes());
        let echo = req.echo_for(endpoint);
        let logprobs = req.logprobs_for(endpoint)?;
        let opts = TurnOptions {
            json,
            logprobs,
            prompt_logprobs: echo && logprobs.is_some(),
        };
        let ids = match &prompts {
            None => {
                let prompt = tools.as_ref().and_then(|t| t.prompt());
                let text = self.chat.render_with_tools(&req.messages, prompt)?;
                vec![self.tokenizer.encode(&text)?]
            }
            Some(p) => self.text_prompt_ids(p, st.run.session.model.context())?,
        };
        let echo = echo.then(|| {
            let text = |ids: &[u32]| self.tokenizer.decode(ids, false).unwrap_or_default();
            prompts
                .iter()
                .flatten()
                .zip(&ids)
                .map(|(p, ids)| match p {
                    Prompt::Text(t) => t.to_string(),
                    Prompt::Tokens(_) => text(ids),
                })
                .collect()
        });
        let choices = Choices {
            prompts: ids,
            sampling: s,
            ignore_eos: req.ignore_eos == Some(true),
            opts,
            stop_text,
            index: 0,
            n,
            tokens_before: 0,
            cached_tokens: 0,
            calls: tools.is_some_and(|t| t.choice != ToolChoice::None),
            echo,
            prompt_logprobs: Vec::new(),
        };

        st.turn = None;
        self.interrupt.set(false);
        self.between_tokens(st, None).await;
        let mut choices = choices;
        let turn = self.start_turn(st, &mut choices).await?;
        let n = self.completions.get() + 1;
        self.completions.set(n);
        let prompt_tokens = choices.prompt_tokens();
        let calls = choices.calls;
        let id = match endpoint {
            Endpoint::Chat => format!("chatcmpl-{n}"),
            Endpoint::Text => format!("cmpl-{n}"),
        };
        st.turn = Some(Answer {
            turn,
            endpoint,
            decoder: StreamDecoder::default(),
            stop_text: choices.stop_text.clone(),
            choices,
            id,
            created: (js_sys::Date::now() / 1000.0) as u64,
            sent_role: false,
            ended: false,
            call: calls.then(HeldCall::default),
            offset: 0,
        });
        Ok(to_js(&Started { prompt_tokens }))
    }

    /// Answer `c.index` of a request: its turn, prefilled (after a device loss, on the new
    /// device). Each answer draws with its own seed (the request's plus its index). A prompt's
    /// first answer scores it when asked (`Choices::prompt_logprobs`) and counts what of it the
    /// KV cache held; the others reuse its cache.
    async fn start_turn(self: &Rc<Self>, st: &mut State, c: &mut Choices) -> WebResult<Turn> {
        let stop: &[u32] = if c.ignore_eos { &[] } else { &self.stop };
        let s = Sampling {
            seed: c.sampling.seed.wrapping_add(c.index as u64),
            ..c.sampling.clone()
        };
        let first = c.first_of_prompt();
        let opts = TurnOptions {
            prompt_logprobs: c.opts.prompt_logprobs && first,
            ..c.opts.clone()
        };
        let mut turn = loop {
            match self.read_prompt(st, c.ids(), &s, stop, &opts).await {
                Ok(t) => break t,
                Err(e) => self.after_error(st, e).await?,
            }
        };
        if first {
            c.cached_tokens += turn.stats.prompt_tokens - turn.stats.prefilled;
            c.prompt_logprobs = std::mem::take(&mut turn.prompt_logprobs);
        }
        Ok(turn)
    }

    /// A turn's prompt read into the KV cache in pieces of about `PrefillPace::TARGET_S`
    /// each. Between them the JS event loop runs (an AbortSignal or the Stop button reaches
    /// `interrupt`, which gives the prompt up: the turn ends with `abort` and what was read
    /// stays cached), a `prefill` event says how far it got, and the controller may step
    /// (memory pressure during a long prompt).
    async fn read_prompt(
        self: &Rc<Self>,
        st: &mut State,
        prompt: &[u32],
        s: &Sampling,
        stop: &[u32],
        opts: &TurnOptions,
    ) -> WebResult<Turn> {
        let mut p = st.run.session.begin(prompt, s, stop, opts.clone()).await?;
        loop {
            let max = self.pace.borrow().next();
            let (done, t0) = (p.done(), now_ms());
            if let Some(turn) = st.run.session.read(&mut p, max).await? {
                return Ok(turn);
            }
            let read = p.done() - done;
            self.pace
                .borrow_mut()
                .record(read, (now_ms() - t0) / 1000.0);
            self.walk.source.emitter.emit(json!({"type": "prefill",
                "doneTokens": p.done(), "totalTokens": p.total(), "reusedTokens": p.reused()}));
            sleep(0).await;
            if self.interrupt.replace(false) {
                return Ok(p.abandon(StopReason::Caller));
            }
            self.between_tokens(st, None).await;
        }
    }

    /// A text completion's prompts as token ids, each checked against the vocabulary and the
    /// context before any runs (an error names the prompt).
    fn text_prompt_ids(&self, prompts: &[Prompt<'_>], context: usize) -> WebResult<Vec<Vec<u32>>> {
        let vocab = self.tokenizer.vocab_size();
        let many = prompts.len() > 1;
        let mut out = Vec::with_capacity(prompts.len());
        for (i, p) in prompts.iter().enumerate() {
            let at = if many {
                format!("prompt[{i}]")
            } else {
                "prompt".into()
            };
            let ids = match p {
                Prompt::Text(t) => self.tokenizer.encode(t)?,
                Prompt::Tokens(ids) => {
                    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                        let m = format!("completion request: `{at}` has token id {bad}, not in the vocabulary of {vocab}");
                        return Err(crate::Error::input(m).into());
                    }
                    ids.clone()
                }
            };
            if ids.len() >= context {
                let e = crate::Error::ContextLength {
                    tokens: ids.len(),
                    context,
                };
                let mut e = WebError::from(e);
                e.message = format!("completion request: `{at}`: {}", e.message);
                return Err(e);
            }
            out.push(ids);
        }
        Ok(out)
    }

    async fn next_chunk(self: &Rc<Self>, st: &mut State) -> WebResult<JsValue> {
        let Some(a) = st.turn.as_ref() else {
            return Ok(JsValue::NULL);
        };
        if a.ended {
            st.turn = None;
            return Ok(JsValue::NULL);
        }
        let index = a.turn.out.len();
        self.between_tokens(st, Some(index)).await;
        let mut a = st.turn.take().expect("checked above");
        if self.interrupt.replace(false) {
            a.turn.stop(StopReason::Caller);
        }
        let next = loop {
            match st.run.session.next(&mut a.turn).await {
                Ok(n) => {
                    self.losses_in_a_row.set(0);
                    break n;
                }
                Err(e) => {
                    if let Err(e) = self.after_error(st, e).await {
                        st.turn = Some(a);
                        return Err(e);
                    }
                }
            }
        };
        let token_logprob = a.turn.logprob.take().filter(|_| next.is_some());
        let special = |id| self.tokenizer.decode(&[id], false).unwrap_or_default();
        let mut calls = Vec::new();
        let mut piece_chars = 0;
        let content = match next {
            Some(id) => {
                let piece = a.decoder.step(&self.tokenizer, id)?;
                piece_chars = piece.chars().count();
                let piece = match a.call.as_mut() {
                    Some(c) => c.push(a.turn.lead(), &piece),
                    None => Some(piece),
                };
                let shown = piece.map(|p| a.stop_text.push(&p));
                if a.stop_text.stopped() {
                    a.turn.stop(StopReason::Eos);
                }
                // A call streams its name, then its arguments as they come.
                let lead = a.turn.lead();
                calls = a.call.as_mut().map(|c| c.stream(lead)).unwrap_or_default();
                Some(shown)
            }
            None => None,
        };
        // A choice's first chunk (`echo`: its text starts with the prompt).
        let first = !a.sent_role;
        let mut delta = Delta {
            role: first.then_some("assistant"),
            ..Delta::default()
        };
        a.sent_role = true;
        let choice = a.choices.index;
        let (finish_reason, usage) = match content {
            Some(c) => {
                delta.content = c;
                delta.tool_calls = a.call_deltas(calls);
                (None, None)
            }
            None if a.choices.index + 1 < a.choices.total()
                && a.turn.stats.stopped_by != Some(StopReason::Caller) =>
            {
                // This answer ends; the next of the request's `n` starts now.
                let finish = a.end(&mut delta);
                a.choices.tokens_before += a.turn.stats.generated;
                a.choices.index += 1;
                match self.start_turn(st, &mut a.choices).await {
                    Ok(t) => a.turn = t,
                    Err(e) => {
                        st.turn = None;
                        return Err(e);
                    }
                }
                (a.decoder, a.stop_text) = (StreamDecoder::default(), a.choices.stop_text.clone());
                a.call = a.choices.calls.then(HeldCall::default);
                a.sent_role = false;
                (finish, None)
            }
            None => {
                a.ended = true;
                let finish = a.end(&mut delta);
                let g = &a.turn.stats;
                let (decode, prefill) = (g.decode_tokens_per_s(), g.prefill_tokens_per_s());
                let mut snap = self.snap.borrow_mut();
                snap.tokens_per_s = decode.or(snap.tokens_per_s);
                snap.prefill_tokens_per_s = prefill.or(snap.prefill_tokens_per_s);
                let completion = a.choices.tokens_before + g.generated;
                let prompt_tokens = a.choices.prompt_tokens();
                let usage = Usage {
                    prompt_tokens,
                    completion_tokens: completion,
                    total_tokens: prompt_tokens + completion,
                    prompt_tokens_details: PromptTokensDetails {
                        cached_tokens: a.choices.cached_tokens,
                    },
                    extra: UsageExtra {
                        prefill_tokens_per_s: prefill,
                        decode_tokens_per_s: decode,
                        step: st.run.step,
                        swaps: snap.swaps,
                    },
                };
                (finish, Some(usage))
            }
        };
        let model = &self.walk.source.manifest.name;
        let table = || self.tokenizer.token_bytes(); // built on first use: only with logprobs
        let chunk = match a.endpoint {
            Endpoint::Chat => to_js(&Chunk {
                id: &a.id,
                object: "chat.completion.chunk",
                created: a.created,
                model,
                choices: [Choice {
                    index: choice,
                    delta,
                    finish_reason,
                    logprobs: token_logprob.map(|t| Logprobs::of(&t, &table(), special)),
                }],
                usage,
            }),
            Endpoint::Text => {
                let echo = a.choices.echo().filter(|_| first).unwrap_or("");
                if first {
                    a.offset = echo.chars().count();
                }
                let scored = &a.choices.prompt_logprobs;
                let mut logprobs = (first && !scored.is_empty())
                    .then(|| self.prompt_logprobs(a.choices.ids(), scored, &table(), special))
                    .transpose()?;
                if let Some(t) = token_logprob {
                    let l = logprobs.get_or_insert_with(TextLogprobs::default);
                    l.push(t.id, Some(&t), a.offset, &table(), special);
                }
                a.offset += piece_chars;
                to_js(&Chunk {
                    id: &a.id,
                    object: "text_completion",
                    created: a.created,
                    model,
                    choices: [TextChoice {
                        index: choice,
                        text: echo.to_string() + &delta.content.unwrap_or_default(),
                        finish_reason,
                        logprobs,
                    }],
                    usage,
                })
            }
        };
        st.turn = Some(a);
        Ok(chunk)
    }

    /// An echoed prompt's tokens (`ids`) with their log-probabilities (`scored`, one per
    /// token), each at its character offset in the prompt as the tokenizer decodes it.
    fn prompt_logprobs(
        &self,
        ids: &[u32],
        scored: &[Option<TokenLogprob>],
        table: &TokenBytes,
        special: impl Fn(u32) -> String,
    ) -> WebResult<TextLogprobs> {
        let mut out = TextLogprobs::default();
        let (mut decoder, mut offset) = (StreamDecoder::default(), 0);
        for (&id, t) in ids.iter().zip(scored) {
            out.push(id, t.as_ref(), offset, table, &special);
            offset += decoder.step(&self.tokenizer, id)?.chars().count();
        }
        Ok(out)
    }

    /// A failed call: if the device was lost, recover (the caller retries); out of memory (e.g.
    /// the KV cache growing with the conversation), a step down if the controller finds one
    /// (the caller retries); else the error stands.
    async fn after_error(self: &Rc<Self>, st: &mut State, e: WebError) -> WebResult<()> {
        let on_gpu = st.run.session.model.gpu().is_some();
        if on_gpu && !self.flags.lost.borrow().load(Ordering::SeqCst) {
            // The `lost` promise settles a little after the failing call.
            sleep(20).await;
        }
        if self.flags.lost.borrow().load(Ordering::SeqCst) {
            return self.recover(&mut st.run).await;
        }
        if e.code == Code::OutOfMemory && self.walk.after_out_of_memory(&mut st.run).await? {
            self.prefetch_below(st.run.step);
            return Ok(());
        }
        Err(e)
    }

    // ---- between tokens: device loss, then the controller's decision ----

    async fn between_tokens(self: &Rc<Self>, st: &mut State, token_index: Option<usize>) {
        if self.flags.lost.borrow().load(Ordering::SeqCst) {
            if let Err(e) = self.recover(&mut st.run).await {
                self.walk.source.emitter.error(&e);
            }
            return;
        }
        if self.flags.oom.swap(false, Ordering::SeqCst) {
            self.walk.elastic.borrow_mut().oom(now_ms());
        }
        self.walk.clock_token(st.run.step, token_index);
        let d = self.walk.elastic.borrow_mut().decide(now_ms());
        let d = match self.walk.kv_first(&mut st.run, d, token_index).await {
            Ok((d, _)) => d,
            Err(e) => {
                self.walk.source.emitter.error(&e);
                d
            }
        };
        self.note_floor();
        if let Err(e) = self.execute(&mut st.run, d, token_index).await {
            self.walk.source.emitter.error(&e);
        }
    }

    /// A `below-floor` event when the controller starts holding at the deepest step allowed
    /// because even it does not fit (once per episode, not per token).
    pub(super) fn note_floor(&self) {
        let e = self.walk.elastic.borrow().stats();
        let below = e.last_reason == Some(Reason::BelowFloor);
        if below && !self.below_floor.replace(true) {
            self.walk
                .source
                .emitter
                .emit(json!({"type": "below-floor", "step": e.target_step,
                "floorStep": e.floor_step, "budgetBytes": e.effective_budget_bytes,
                "costBytes": e.footprint_bytes.map(|f| f + e.overhead_bytes)}));
        } else if !below {
            self.below_floor.set(false);
        }
    }

    async fn rebalance_if_idle(self: &Rc<Self>) -> WebResult<JsValue> {
        let idle =
            matches!(&*self.state.borrow(), Some(s) if s.turn.as_ref().is_none_or(|a| a.ended));
        if !idle {
            return Ok(JsValue::FALSE);
        }
        let mut st = self.take()?;
        let before = st.run.step;
        self.between_tokens(&mut st, None).await;
        let moved = st.run.step != before;
        self.put(st);
        Ok(moved.into())
    }
}
