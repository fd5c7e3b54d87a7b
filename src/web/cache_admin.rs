//! `Engine.inspect`, `Engine.cached` and `Engine.deleteCached`: what an ensemble needs before
//! it is loaded, and what of it the Cache API holds, with no GPU and no engine.

use crate::ensemble::manifest::FileRef;
use crate::runtime::backend::KvChoice;
use crate::runtime::inspect::{cache_report, inspect, CacheReport, Inspection};
use crate::web::api::{from_js, get, EngineOptions};
use crate::web::error::WebResult;
use crate::web::events::to_js;
use crate::web::fetch;
use crate::web::loader::{file_url, owned_keys, read_manifest};
use crate::web::store::{self, Store};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;

/// `inspect`'s options.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct InspectOptions {
    /// The context the totals are for (default: the engine's default context).
    context: Option<u32>,
    /// The KV cache choice they are for (default `auto`, as the engine's `kvCache`).
    kv_cache: Option<KvChoice>,
}

/// `Engine.inspect(manifestUrl, { context, kvCache })`.
#[wasm_bindgen(js_name = inspectEnsemble)]
pub async fn inspect_ensemble(url: String, options: JsValue) -> Result<JsValue, JsValue> {
    async {
        let o: InspectOptions = if options.is_undefined() || options.is_null() {
            InspectOptions::default()
        } else {
            from_js(options, "options")?
        };
        let url = fetch::resolve(&url, ".")?;
        let (m, _) = read_manifest(&url, None, Some(fetch::DEFAULT_STALL_MS)).await?;
        let context = o
            .context
            .map_or(crate::runtime::DEFAULT_CONTEXT, |c| c as usize);
        let i: Inspection = inspect(&m, context, o.kv_cache.unwrap_or_default());
        Ok(to_js(&i))
    }
    .await
    .map_err(|e: crate::web::error::WebError| e.to_js())
}

/// `Engine.cached`'s answer.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Cached {
    url: String,
    cache_name: Option<String>,
    /// The manifest is cached (a load can start offline).
    manifest_cached: bool,
    #[serde(flatten)]
    report: CacheReport,
    /// What the browser lets this origin store.
    storage: Storage,
}

/// `navigator.storage`: how much this origin may store and whether its data is kept under
/// storage pressure; `None` where the browser does not say.
#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct Storage {
    /// `estimate().quota`: the bytes the origin may use in all (Cache API, IndexedDB, ...).
    quota_bytes: Option<f64>,
    /// `estimate().usage`: the bytes it uses now.
    usage_bytes: Option<f64>,
    /// `persisted()`: true when the browser keeps this origin's data under storage pressure;
    /// false when it may evict it (least recently used origins first), cached models included.
    persisted: Option<bool>,
}

/// Calls `navigator.storage[method]()` and awaits it; `None` if there is no such thing.
async fn storage_call(method: &str) -> Option<JsValue> {
    let storage = get(&get(&js_sys::global(), "navigator"), "storage");
    let f: js_sys::Function = get(&storage, method).dyn_into().ok()?;
    let p: js_sys::Promise = f.call0(&storage).ok()?.dyn_into().ok()?;
    wasm_bindgen_futures::JsFuture::from(p).await.ok()
}

async fn storage() -> Storage {
    let estimate = storage_call("estimate").await;
    let num = |k: &str| estimate.as_ref().and_then(|e| get(e, k).as_f64());
    Storage {
        quota_bytes: num("quota"),
        usage_bytes: num("usage"),
        persisted: storage_call("persisted").await.and_then(|v| v.as_bool()),
    }
}

/// The cache `options` name (`cacheName`, `useCache` as for `Engine.create`).
async fn open_store(options: JsValue) -> WebResult<(Option<String>, Option<Store>)> {
    let o = EngineOptions::parse(options)?;
    let name = o.cache();
    let store = match &name {
        Some(n) => Store::open(n).await,
        None => None,
    };
    Ok((name, store))
}

/// `Engine.cached(manifestUrl, { cacheName })`: which steps would load offline and how many
/// bytes are cached. The manifest comes from the network, else from the cache.
#[wasm_bindgen(js_name = cachedEnsemble)]
pub async fn cached_ensemble(url: String, options: JsValue) -> Result<JsValue, JsValue> {
    async {
        let url = fetch::resolve(&url, ".")?;
        let (cache_name, store) = open_store(options).await?;
        let (m, _) = read_manifest(&url, store.as_ref(), Some(fetch::DEFAULT_STALL_MS)).await?;
        let keys: BTreeSet<String> = match &store {
            Some(s) => s.keys().await.into_iter().collect(),
            None => BTreeSet::new(),
        };
        let held = |f: &FileRef| keys.contains(&store::key(&file_url(&url, &f.file), &f.sha256));
        Ok(to_js(&Cached {
            manifest_cached: keys.contains(&format!("{url}?flexquant-manifest")),
            report: cache_report(&m, held),
            url,
            cache_name,
            storage: storage().await,
        }))
    }
    .await
    .map_err(|e: crate::web::error::WebError| e.to_js())
}

/// `Engine.deleteCached(manifestUrl, { cacheName })`: deletes the ensemble's manifest and
/// every version of its files from the cache (other ensembles stay); resolves to the number
/// of entries deleted.
#[wasm_bindgen(js_name = deleteCachedEnsemble)]
pub async fn delete_cached_ensemble(url: String, options: JsValue) -> Result<JsValue, JsValue> {
    async {
        let url = fetch::resolve(&url, ".")?;
        let (_, store) = open_store(options).await?;
        let Some(s) = store else {
            return Ok(JsValue::from(0));
        };
        let keys = s.keys().await;
        let owned = owned_keys(&keys, &url);
        for k in &owned {
            s.delete(k).await;
        }
        Ok(JsValue::from(owned.len() as u32))
    }
    .await
    .map_err(|e: crate::web::error::WebError| e.to_js())
}
