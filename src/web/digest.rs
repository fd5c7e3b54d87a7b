//! SHA-256 by the browser (`crypto.subtle.digest`): native speed, off the main thread, where
//! sha256 in wasm costs more than the swap it guards. Falls back to the `sha2` crate where
//! SubtleCrypto is missing (an insecure context).

use crate::ensemble::manifest;
use crate::web::api::get;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;

/// The sha256 of `data` in lowercase hex. Digests started together (`join_all`) run on the
/// browser's threads at once.
pub async fn sha256_hex(data: &js_sys::Uint8Array) -> String {
    if let Some(p) = start(data) {
        if let Ok(buf) = JsFuture::from(p).await {
            let out = js_sys::Uint8Array::new(&buf).to_vec();
            return out.iter().map(|b| format!("{b:02x}")).collect();
        }
    }
    manifest::sha256_hex(&data.to_vec())
}

/// A digest of `data` started now, or `None` without SubtleCrypto.
fn start(data: &js_sys::Uint8Array) -> Option<js_sys::Promise> {
    let subtle = get(&get(&js_sys::global(), "crypto"), "subtle");
    let digest: js_sys::Function = get(&subtle, "digest").dyn_into().ok()?;
    digest
        .call2(&subtle, &JsValue::from("SHA-256"), data)
        .ok()?
        .dyn_into()
        .ok()
}
