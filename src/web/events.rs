//! What the app's `onProgress` and `onEvent` callbacks receive (see `js/API.md`): plain JS
//! objects built from JSON values, so the shapes are visible here in one place.

use serde::Serialize;
use serde_json::{json, Value};
use wasm_bindgen::JsValue;

/// A Rust value as a plain JS object (maps as objects, u64 as numbers).
pub fn to_js<T: Serialize + ?Sized>(v: &T) -> JsValue {
    v.serialize(&serde_wasm_bindgen::Serializer::json_compatible())
        .unwrap_or(JsValue::NULL)
}

#[derive(Clone, Default)]
pub struct Emitter {
    pub on_event: Option<js_sys::Function>,
    pub on_progress: Option<js_sys::Function>,
}

impl Emitter {
    /// Calls the callbacks; an exception in app code is logged, never propagated into the engine.
    pub fn emit(&self, event: Value) {
        let is_progress = event["type"] == "progress";
        let v = to_js(&event);
        let targets = [
            self.on_event.as_ref(),
            self.on_progress.as_ref().filter(|_| is_progress),
        ];
        for f in targets.into_iter().flatten() {
            if let Err(e) = f.call1(&JsValue::NULL, &v) {
                web_sys::console::warn_2(&"flexquant: an event callback threw".into(), &e);
            }
        }
    }

    pub fn error(&self, e: &crate::web::WebError) {
        self.emit(json!({"type": "error", "error": e.to_event_value()}));
    }

    /// `{type: 'warning', code, message}`: the engine works, but not as the app may assume.
    pub fn warning(&self, code: &str, message: &str) {
        self.emit(json!({"type": "warning", "code": code, "message": message}));
    }

    /// The `chat-template-fallback` warning when prompts are ChatML because the model has no
    /// chat template of its own.
    pub fn chat_template(&self, chat: &crate::model::chat::ChatTemplate) {
        if let Some(w) = chat.fallback_warning() {
            self.warning("chat-template-fallback", w);
        }
    }
}

/// Byte and file counts of one loading phase, with an ETA from the network rate so far.
pub struct Progress {
    pub phase: &'static str,
    pub total_bytes: u64,
    pub files_total: usize,
    pub files_done: usize,
    pub done_bytes: u64,
    /// Bytes that came from the network in this phase (the ETA's rate).
    pub net_bytes: u64,
    pub from_cache: u64,
    start_ms: f64,
    last_emit_ms: f64,
}

impl Progress {
    pub fn new(phase: &'static str, total_bytes: u64, files_total: usize) -> Self {
        let now = crate::web::now_ms();
        Progress {
            phase,
            total_bytes,
            files_total,
            files_done: 0,
            done_bytes: 0,
            net_bytes: 0,
            from_cache: 0,
            start_ms: now,
            last_emit_ms: f64::NEG_INFINITY,
        }
    }

    /// Emits unless the last emit was under 50 ms ago (`force` for file boundaries).
    pub fn emit(&mut self, em: &Emitter, file: &str, in_file: u64, force: bool) {
        let now = crate::web::now_ms();
        if !force && now - self.last_emit_ms < 50.0 {
            return;
        }
        self.last_emit_ms = now;
        let loaded = self.done_bytes + in_file;
        let secs = (now - self.start_ms) / 1000.0;
        let eta = (self.net_bytes + in_file > 0 && secs > 0.0).then(|| {
            let rate = (self.net_bytes + in_file) as f64 / secs;
            self.total_bytes.saturating_sub(loaded) as f64 / rate
        });
        em.emit(json!({
            "type": "progress", "phase": self.phase, "file": file,
            "loadedBytes": loaded, "totalBytes": self.total_bytes,
            "filesDone": self.files_done, "filesTotal": self.files_total,
            "etaSeconds": eta, "fromCache": self.from_cache,
        }));
    }
}
