//! `fetch` with the body streamed in chunks (progress per chunk, size capped before it is
//! all in memory), from the window or a worker. Plain GETs of whole files: no Range requests.

use crate::web::error::{Code, WebError, WebResult};
use js_sys::{Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{ReadableStreamDefaultReader, Response};

fn global_call(name: &str, args: &[&JsValue]) -> Result<JsValue, JsValue> {
    let g = js_sys::global();
    let f: js_sys::Function = Reflect::get(&g, &name.into())?.dyn_into()?;
    let arr: js_sys::Array = args.iter().copied().collect();
    f.apply(&g, &arr)
}

/// `new URL(relative, base).href`; the base itself may be relative to the page.
pub fn resolve(relative: &str, base: &str) -> WebResult<String> {
    let page = Reflect::get(&js_sys::global(), &"location".into())
        .ok()
        .and_then(|l| Reflect::get(&l, &"href".into()).ok())
        .and_then(|h| h.as_string());
    let bad = |e: JsValue| {
        WebError::new(
            Code::Input,
            format!(
                "bad URL {relative:?} (base {base:?}): {}",
                WebError::js_text(&e)
            ),
        )
    };
    let base = match page {
        Some(p) => web_sys::Url::new_with_base(base, &p).map_err(bad)?.href(),
        None => base.to_string(),
    };
    Ok(web_sys::Url::new_with_base(relative, &base)
        .map_err(bad)?
        .href())
}

/// How long a download may go without data (the response's headers, then each chunk of its
/// body) before it is given up as stalled: a connection that hangs (a mobile network that
/// dropped, a server that stopped sending) would otherwise keep a load or a swap waiting for
/// good. `None`: no limit.
pub const DEFAULT_STALL_MS: u32 = 30_000;

/// Aborts its request when dropped: a download given up as stalled, or whose caller went
/// away (a load that failed on another file, an unloaded engine), stops holding a connection
/// (a dropped future alone left the request running: six hung requests then blocked every
/// later one to the host). Aborting a finished request does nothing.
struct AbortOnDrop(Option<web_sys::AbortController>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(a) = &self.0 {
            a.abort();
        }
    }
}

/// A response, and the guard that aborts its request until its body is read.
pub struct Fetched {
    pub response: Response,
    _abort: AbortOnDrop,
}

/// GETs `url` and checks the status; a 404 of the manifest gets its own code. The browser's
/// HTTP cache is revalidated (`cache: 'no-cache'`): verified files live in the Cache API, and
/// after a redeploy at the same URLs (or a retry after a hash mismatch) stale bytes must not
/// come back from the HTTP cache. No headers within `stall_ms`: a `network` error saying so.
pub async fn get(url: &str, what: &str, stall_ms: Option<u32>) -> WebResult<Fetched> {
    let init = js_sys::Object::new();
    let _ = Reflect::set(&init, &"cache".into(), &"no-cache".into());
    let abort = AbortOnDrop(web_sys::AbortController::new().ok());
    if let Some(a) = &abort.0 {
        let _ = Reflect::set(&init, &"signal".into(), &a.signal());
    }
    let p = global_call("fetch", &[&url.into(), &init]).map_err(|e| network(url, what, &e))?;
    let Some(r) = crate::web::within(JsFuture::from(js_sys::Promise::from(p)), stall_ms).await
    else {
        return Err(stalled(url, what, stall_ms));
    };
    let r: Response = r
        .map_err(|e| network(url, what, &e))?
        .dyn_into()
        .map_err(|_| WebError::new(Code::Internal, "fetch did not return a Response"))?;
    if !r.ok() {
        let status = r.status();
        let code = if status == 404 && what == "manifest" {
            Code::ManifestNotFound
        } else {
            Code::Http
        };
        let mut e = WebError::new(
            code,
            format!("{what}: HTTP {status} {} for {url}", r.status_text()),
        )
        .url(url);
        if what != "manifest" {
            e = e.file(what);
        }
        e.status = Some(status);
        return Err(e);
    }
    Ok(Fetched {
        response: r,
        _abort: abort,
    })
}

/// A download given up after `stall_ms` without data: a `network` error (retried like one).
fn stalled(url: &str, what: &str, stall_ms: Option<u32>) -> WebError {
    let s = stall_ms.unwrap_or_default() as f64 / 1000.0;
    let mut e = WebError::new(
        Code::Network,
        format!("{what}: no data from {url} for {s} s: the download stalled"),
    )
    .url(url);
    if what != "manifest" {
        e = e.file(what);
    }
    e
}

fn network(url: &str, what: &str, e: &JsValue) -> WebError {
    WebError::new(
        Code::Network,
        format!(
            "{what}: network error fetching {url}: {}",
            WebError::js_text(e)
        ),
    )
    .url(url)
}

/// Reads a response body chunk by chunk into a JS array (outside the wasm heap, which never
/// shrinks: a cold load held its downloads in flight there, 12 files or 3 packs of 32 MB at
/// once), calling `progress(bytes_so_far)` after each chunk, and stops as soon as it exceeds
/// `cap` bytes (a wrong or hostile file is never held whole), or when no chunk came for
/// `stall_ms` (the request is aborted: a `network` error saying it stalled).
pub async fn read_body(
    f: Fetched,
    url: &str,
    what: &str,
    cap: u64,
    stall_ms: Option<u32>,
    mut progress: impl FnMut(u64),
) -> WebResult<Uint8Array> {
    let Fetched {
        response: r,
        _abort: abort,
    } = f;
    let too_big = |n: u64| {
        WebError::new(
            Code::Truncated,
            format!("{what}: {url} has more than the {cap} bytes expected (got {n}): wrong file"),
        )
        .url(url)
        .file(what)
    };
    let Some(body) = r.body() else {
        return Ok(Uint8Array::new_with_length(0));
    };
    let reader: ReadableStreamDefaultReader = body
        .get_reader()
        .dyn_into()
        .map_err(|_| WebError::new(Code::Internal, "no default reader"))?;
    // The chunks as they come, joined at the end: nothing reserved from the declared size (a
    // hostile manifest would make every download reserve gigabytes before a byte came).
    let mut chunks: Vec<Uint8Array> = Vec::new();
    let mut n = 0u64;
    loop {
        let Some(chunk) = crate::web::within(JsFuture::from(reader.read()), stall_ms).await else {
            let _ = reader.cancel();
            drop(abort);
            return Err(stalled(url, what, stall_ms));
        };
        let chunk = chunk.map_err(|e| network(url, what, &e))?;
        if Reflect::get(&chunk, &"done".into())
            .map(|d| d.is_truthy())
            .unwrap_or(true)
        {
            break;
        }
        let v: Uint8Array = Reflect::get(&chunk, &"value".into())
            .map_err(|e| network(url, what, &e))?
            .unchecked_into();
        n += v.length() as u64;
        if n > cap || n > u32::MAX as u64 {
            let _ = reader.cancel();
            return Err(too_big(n));
        }
        chunks.push(v);
        progress(n);
    }
    Ok(concat(chunks, n as u32))
}

/// One array of `len` bytes holding `chunks` in order (the chunk itself when there is one).
fn concat(mut chunks: Vec<Uint8Array>, len: u32) -> Uint8Array {
    if chunks.len() == 1 {
        return chunks.pop().expect("one chunk");
    }
    let out = Uint8Array::new_with_length(len);
    let mut at = 0;
    for c in &chunks {
        out.set(c, at);
        at += c.length();
    }
    out
}
