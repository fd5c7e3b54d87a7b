//! A conversation as a JS object (`Engine.exportSession` / `importSession`): its tokens and
//! its KV cache's bytes (`runtime::backend::KvLayout`, `Session::export`), so another engine
//! of the same ensemble goes on from it without running it again. The worker proxy carries
//! the conversation this way when it re-creates its worker to give memory back; an app can
//! keep one (IndexedDB) and resume it after a reload.

use crate::runtime::backend::{kv_parts, KvFormat};
use crate::web::api::get;
use crate::web::engine::{Inner, State};
use crate::web::error::{Code, WebError, WebResult};
use js_sys::{Reflect, Uint32Array, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};

/// The `format` field of an exported session, and its `version`.
const FORMAT: &str = "flexquant-session";
const VERSION: u32 = 1;

fn bad(m: impl Into<String>) -> WebError {
    WebError::new(Code::Input, format!("importSession: {}", m.into()))
}

fn set(o: &js_sys::Object, k: &str, v: &JsValue) {
    let _ = Reflect::set(o, &k.into(), v);
}

impl Inner {
    /// `{format, version, model, base, kvCache, tokens, kv}`: `tokens` (Uint32Array) are the
    /// conversation the KV cache holds, `kv` (Uint8Array, outside the wasm heap) its bytes,
    /// `base` the sha256 of the ensemble's base shard (what `import_session` checks).
    pub(super) async fn export_session(&self, st: &State) -> WebResult<JsValue> {
        let m = &self.walk.source.manifest;
        let model = &st.run.session.model;
        let Some(format) = crate::runtime::Backend::kv_format(model) else {
            let m = "exportSession: this backend keeps no byte KV cache";
            return Err(WebError::new(Code::Unsupported, m));
        };
        let (parts, bytes) = kv_parts(&m.config, format, crate::runtime::Backend::len(model));
        let total = parts as u64 * bytes;
        let Ok(total) = u32::try_from(total) else {
            let m =
                format!("exportSession: a KV cache of {total} bytes is past a JS array's 4 GiB");
            return Err(WebError::new(Code::Unsupported, m));
        };
        let kv = Uint8Array::new_with_length(total);
        let mut at = 0u32;
        let mut copy = |p: &[u8]| {
            let end = at + p.len() as u32;
            kv.subarray(at, end).copy_from(p);
            at = end;
        };
        let tokens = st.run.session.export(&mut copy).await?;
        let o = js_sys::Object::new();
        set(&o, "format", &FORMAT.into());
        set(&o, "version", &VERSION.into());
        set(&o, "model", &m.name.as_str().into());
        set(&o, "base", &m.base.sha256.as_str().into());
        set(&o, "kvCache", &format.name().into());
        set(&o, "tokens", &Uint32Array::from(tokens).into());
        set(&o, "kv", &kv.into());
        Ok(o.into())
    }

    /// Replaces the conversation by `session` (`export_session`'s object) after checking that
    /// it comes from this ensemble and that its sizes agree; refused, the conversation stays
    /// as it was.
    pub(super) async fn import_session(&self, st: &mut State, session: JsValue) -> WebResult<()> {
        let m = &self.walk.source.manifest;
        if get(&session, "format").as_string().as_deref() != Some(FORMAT) {
            return Err(bad(format!(
                "not an exported session (its `format` is not {FORMAT:?})"
            )));
        }
        let version = get(&session, "version").as_f64();
        if version != Some(VERSION as f64) {
            return Err(bad(format!(
                "session version {version:?}; this engine reads version {VERSION}"
            )));
        }
        let base = get(&session, "base").as_string().unwrap_or_default();
        if base != m.base.sha256 {
            let model = get(&session, "model").as_string().unwrap_or_default();
            return Err(bad(format!(
                "the session comes from another model ({model:?}, base shard sha256 {base:.12}); \
                 this engine runs {:?} (base {:.12})",
                m.name, m.base.sha256
            )));
        }
        let format: KvFormat = get(&session, "kvCache")
            .as_string()
            .unwrap_or_default()
            .parse()
            .map_err(|e: String| bad(format!("kvCache: {e}")))?;
        let tokens: Vec<u32> = match get(&session, "tokens").dyn_into::<Uint32Array>() {
            Ok(a) => a.to_vec(),
            Err(_) => return Err(bad("tokens: expected a Uint32Array")),
        };
        let vocab = m.config.vocab_size;
        if let Some((i, t)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab)
        {
            return Err(bad(format!(
                "tokens[{i}] = {t} is past the vocabulary ({vocab})"
            )));
        }
        let kv = match get(&session, "kv") {
            v if v.is_instance_of::<js_sys::ArrayBuffer>() => Uint8Array::new(&v),
            v => v
                .dyn_into::<Uint8Array>()
                .map_err(|_| bad("kv: expected a Uint8Array"))?,
        };
        let (parts, bytes) = kv_parts(&m.config, format, tokens.len());
        let want = parts as u64 * bytes;
        if kv.length() as u64 != want {
            return Err(bad(format!(
                "kv holds {} bytes; {} positions in {format} take {want}",
                kv.length(),
                tokens.len()
            )));
        }
        let mut at = 0u32;
        let mut fill = |p: &mut [u8]| {
            let end = at + p.len() as u32;
            kv.subarray(at, end).copy_to(p);
            at = end;
        };
        self.walk
            .import_session(&mut st.run, &tokens, format, &mut fill)
            .await
    }
}
