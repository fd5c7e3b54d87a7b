//! Errors as JS sees them: an `Error` named `FlexQuantError` with a stable `code` (the JS
//! wrapper and `js/API.md` list them), a message naming the file or URL, and the fields that
//! locate it.

use crate::gpu::GpuError;
use wasm_bindgen::JsValue;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    ManifestNotFound,
    Http,
    Network,
    ManifestInvalid,
    ManifestVersion,
    HashMismatch,
    Truncated,
    QuotaExceeded,
    WebGpuUnavailable,
    OutOfMemory,
    DeviceLost,
    Unloaded,
    Busy,
    Aborted,
    Unsupported,
    ContextLength,
    NonFiniteLogits,
    Input,
    Internal,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::ManifestNotFound => "manifest-not-found",
            Code::Http => "http",
            Code::Network => "network",
            Code::ManifestInvalid => "manifest-invalid",
            Code::ManifestVersion => "manifest-version",
            Code::HashMismatch => "hash-mismatch",
            Code::Truncated => "truncated",
            Code::QuotaExceeded => "quota-exceeded",
            Code::WebGpuUnavailable => "webgpu-unavailable",
            Code::OutOfMemory => "out-of-memory",
            Code::DeviceLost => "device-lost",
            Code::Unloaded => "unloaded",
            Code::Busy => "busy",
            Code::Aborted => "aborted",
            Code::Unsupported => "unsupported",
            Code::ContextLength => "context-length",
            Code::NonFiniteLogits => "non-finite-logits",
            Code::Input => "input",
            Code::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone)]
pub struct WebError {
    pub code: Code,
    pub message: String,
    pub url: Option<String>,
    pub file: Option<String>,
    pub status: Option<u16>,
    /// `context-length`: the prompt's tokens and the context's (`promptTokens`,
    /// `contextTokens`), so an app can tell how much to leave out without reading the message.
    pub tokens: Option<(usize, usize)>,
}

pub type WebResult<T> = Result<T, WebError>;

impl WebError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        WebError {
            code,
            message: message.into(),
            url: None,
            file: None,
            status: None,
            tokens: None,
        }
    }
    pub fn url(mut self, url: &str) -> Self {
        self.url = Some(url.to_string());
        self
    }
    pub fn file(mut self, file: &str) -> Self {
        self.file = Some(file.to_string());
        self
    }

    /// A JS `Error` carrying the fields, so `catch (e) { e.code }` works without the wrapper.
    pub fn to_js(&self) -> JsValue {
        let e = js_sys::Error::new(&self.message);
        e.set_name("FlexQuantError");
        let set = |k: &str, v: JsValue| {
            let _ = js_sys::Reflect::set(&e, &k.into(), &v);
        };
        set("code", self.code.as_str().into());
        if let Some(u) = &self.url {
            set("url", u.into());
        }
        if let Some(f) = &self.file {
            set("file", f.into());
        }
        if let Some(s) = self.status {
            set("status", s.into());
        }
        if let Some((prompt, context)) = self.tokens {
            set("promptTokens", (prompt as f64).into());
            set("contextTokens", (context as f64).into());
        }
        e.into()
    }

    /// `{code, message, file?}` for an `error` event.
    pub fn to_event_value(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code.as_str(), "message": self.message,
            "file": self.file, "url": self.url})
    }

    /// The text of a JS exception (a `TypeError` from fetch, a `DOMException`, ...).
    pub fn js_text(v: &JsValue) -> String {
        if let Some(e) = wasm_bindgen::JsCast::dyn_ref::<js_sys::Error>(v) {
            return format!("{}: {}", String::from(e.name()), String::from(e.message()));
        }
        v.as_string().unwrap_or_else(|| format!("{v:?}"))
    }

    /// The DOMException name of a JS exception (e.g. "QuotaExceededError").
    pub fn js_name(v: &JsValue) -> String {
        js_sys::Reflect::get(v, &"name".into())
            .ok()
            .and_then(|n| n.as_string())
            .unwrap_or_default()
    }
}

impl std::error::Error for WebError {}

impl std::fmt::Display for WebError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code.as_str())
    }
}

impl From<GpuError> for WebError {
    fn from(e: GpuError) -> Self {
        let code = match &e {
            GpuError::OutOfMemory { .. } => Code::OutOfMemory,
            GpuError::NoAdapter(_) | GpuError::Limit { .. } | GpuError::Device(_) => {
                Code::WebGpuUnavailable
            }
            GpuError::Module { .. } | GpuError::Input(_) => Code::Input,
            GpuError::Internal(_) => Code::Internal,
        };
        WebError::new(code, e.to_string())
    }
}

impl From<crate::Error> for WebError {
    fn from(e: crate::Error) -> Self {
        let code = match &e {
            crate::Error::OutOfMemory { .. } => Code::OutOfMemory,
            crate::Error::ContextLength { .. } => Code::ContextLength,
            crate::Error::Unsupported(_) => Code::Unsupported,
            crate::Error::NonFiniteLogits { .. } => Code::NonFiniteLogits,
            _ => Code::Input,
        };
        let tokens = match e {
            crate::Error::ContextLength { tokens, context } => Some((tokens, context)),
            _ => None,
        };
        WebError {
            tokens,
            ..WebError::new(code, e.to_string())
        }
    }
}

impl From<WebError> for JsValue {
    fn from(e: WebError) -> Self {
        e.to_js()
    }
}
