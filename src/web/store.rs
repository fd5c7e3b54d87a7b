//! The Cache API as a verified-file store. Keys are the file's URL plus its sha256 (so a
//! changed file under the same name is a different entry and a stale one is never served).
//! Only bytes that passed verification are put, so a step whose files are all there loads
//! offline (`runtime::inspect::cache_report` tells which).

use crate::web::error::{Code, WebError, WebResult};
use js_sys::{Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{Cache, CacheStorage, Response};

pub struct Store {
    cache: Cache,
}

/// The key of a file with hash `sha256` at `url`.
pub fn key(url: &str, sha256: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}flexquant-sha256={sha256}")
}

impl Store {
    /// Opens the named cache; `None` where the Cache API is missing (e.g. an insecure origin).
    pub async fn open(name: &str) -> Option<Store> {
        let caches = Reflect::get(&js_sys::global(), &"caches".into()).ok()?;
        let caches: CacheStorage = caches.dyn_into().ok()?;
        let cache = JsFuture::from(caches.open(name)).await.ok()?;
        Some(Store {
            cache: cache.dyn_into().ok()?,
        })
    }

    /// Deletes the named cache (all ensembles in it).
    pub async fn clear(name: &str) -> bool {
        let Some(caches) = Reflect::get(&js_sys::global(), &"caches".into())
            .ok()
            .and_then(|c| c.dyn_into::<CacheStorage>().ok())
        else {
            return false;
        };
        JsFuture::from(caches.delete(name))
            .await
            .is_ok_and(|v| v.is_truthy())
    }

    /// The bytes stored under `key`, as a JS array (outside the wasm heap).
    pub async fn get(&self, key: &str) -> Option<Uint8Array> {
        let r = JsFuture::from(self.cache.match_with_str(key)).await.ok()?;
        let r: Response = r.dyn_into().ok()?;
        let buf = JsFuture::from(r.array_buffer().ok()?).await.ok()?;
        Some(Uint8Array::new(&buf))
    }

    pub async fn has(&self, key: &str) -> bool {
        JsFuture::from(self.cache.match_with_str(key))
            .await
            .is_ok_and(|r| r.is_instance_of::<Response>())
    }

    /// Stores `bytes`; a full quota is `QuotaExceeded`, which callers treat as "run uncached".
    pub async fn put(&self, key: &str, bytes: &Uint8Array) -> WebResult<()> {
        let r = Response::new_with_opt_buffer_source(Some(bytes))
            .map_err(|e| WebError::new(Code::Internal, WebError::js_text(&e)))?;
        JsFuture::from(self.cache.put_with_str(key, &r))
            .await
            .map(|_| ())
            .map_err(|e| quota_or_internal(key, &e))
    }

    pub async fn delete(&self, key: &str) {
        let _ = JsFuture::from(self.cache.delete_with_str(key)).await;
    }

    /// Every key (request URL) in the cache.
    pub async fn keys(&self) -> Vec<String> {
        let Ok(list) = JsFuture::from(self.cache.keys()).await else {
            return Vec::new();
        };
        js_sys::Array::from(&list)
            .iter()
            .filter_map(|r| r.dyn_into::<web_sys::Request>().ok())
            .map(|r| r.url())
            .collect()
    }
}

/// A cached file's key split into its URL and sha256 (`None` for other keys).
pub fn parse_key(key: &str) -> Option<(&str, &str)> {
    let at = key.rfind("flexquant-sha256=")?;
    let url = &key[..at.checked_sub(1)?];
    Some((url, &key[at + "flexquant-sha256=".len()..]))
}

fn quota_or_internal(key: &str, e: &JsValue) -> WebError {
    let code = if WebError::js_name(e) == "QuotaExceededError" {
        Code::QuotaExceeded
    } else {
        Code::Internal
    };
    WebError::new(
        code,
        format!(
            "storing {key} in the Cache API failed: {}",
            WebError::js_text(e)
        ),
    )
    .url(key)
}
