//! SHA-256 by the browser (`crypto.subtle.digest`): native speed, off the main thread, where
//! sha256 in wasm costs more than the swap it guards. Falls back to the `sha2` crate where
//! SubtleCrypto is missing (an insecure context).

use crate::ensemble::manifest;
use crate::web::api::get;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;

/// The sha256 of `bytes` in lowercase hex. Digests started together (`join_all`) run on the
/// browser's threads at once.
pub async fn sha256_hex(bytes: &[u8]) -> String {
    let started = start(bytes);
    if let Some(p) = started {
        if let Ok(buf) = JsFuture::from(p).await {
            let out = js_sys::Uint8Array::new(&buf).to_vec();
            return out.iter().map(|b| format!("{b:02x}")).collect();
        }
    }
    manifest::sha256_hex(bytes)
}

/// A digest of `bytes` started now, or `None` without SubtleCrypto.
fn start(bytes: &[u8]) -> Option<js_sys::Promise> {
    let subtle = get(&get(&js_sys::global(), "crypto"), "subtle");
    let digest: js_sys::Function = get(&subtle, "digest").dyn_into().ok()?;
    let algorithm = JsValue::from("SHA-256");
    // A view of wasm memory, valid until the next allocation: `digest` copies the bytes
    // before it returns (WebCrypto: "get a copy of the bytes held by data"), and nothing
    // allocates in between. A `Uint8Array::from` copy first cost a second copy of every byte.
    let data = unsafe { js_sys::Uint8Array::view(bytes) };
    digest
        .call2(&subtle, &algorithm, &data)
        .ok()?
        .dyn_into()
        .ok()
}
