//! SHA-256 by the browser (`crypto.subtle.digest`): native speed, where sha256 in wasm costs
//! more than the swap it guards. Falls back to the `sha2` crate where SubtleCrypto is missing
//! (an insecure context).

use crate::ensemble::manifest;
use crate::web::api::get;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;

/// The sha256 of `bytes` in lowercase hex.
pub async fn sha256_hex(bytes: &[u8]) -> String {
    match subtle(bytes).await {
        Some(h) => h,
        None => manifest::sha256_hex(bytes),
    }
}

async fn subtle(bytes: &[u8]) -> Option<String> {
    let subtle = get(&get(&js_sys::global(), "crypto"), "subtle");
    let digest: js_sys::Function = get(&subtle, "digest").dyn_into().ok()?;
    // A copy out of wasm memory: the digest runs asynchronously and wasm memory may grow (and
    // its buffer detach) meanwhile.
    let data = js_sys::Uint8Array::from(bytes);
    let p: js_sys::Promise = digest
        .call2(&subtle, &"SHA-256".into(), &data)
        .ok()?
        .dyn_into()
        .ok()?;
    let buf = JsFuture::from(p).await.ok()?;
    let out = js_sys::Uint8Array::new(&buf).to_vec();
    Some(out.iter().map(|b| format!("{b:02x}")).collect())
}
