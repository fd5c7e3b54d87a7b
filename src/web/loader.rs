//! The ensemble by URL: the manifest, then files addressed relative to it, each served from
//! the Cache API when a verified copy is there, else fetched (whole files, streamed with
//! progress), verified against the manifest (size, then sha256) and only then stored.

use crate::ensemble::manifest::{self, FileRef, Manifest};
use crate::model::weights::ModuleId;
use crate::web::error::{Code, WebError, WebResult};
use crate::web::events::{Emitter, Progress};
use crate::web::store::{self, Store};
use crate::web::{digest, fetch};
use std::cell::Cell;

pub struct Loader {
    pub manifest_url: String,
    pub manifest: Manifest,
    pub manifest_sha: String,
    store: Option<Store>,
    /// Bytes this engine may add to the Cache API (the app's cap; the browser's quota applies
    /// on top).
    quota: Option<u64>,
    stored: Cell<u64>,
    /// Bytes from the network and from the cache since the engine was created.
    pub net_bytes: Cell<u64>,
    pub cache_bytes: Cell<u64>,
    pub emitter: Emitter,
}

/// Manifest errors split into the codes apps branch on.
fn manifest_error(url: &str, bytes: &[u8]) -> Option<WebError> {
    let head: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let v = head.get("version")?.as_u64()?;
    (v != manifest::VERSION as u64).then(|| {
        WebError::new(
            Code::ManifestVersion,
            format!(
                "{url}: manifest version {v} is not supported (this runtime reads version {})",
                manifest::VERSION
            ),
        )
        .url(url)
    })
}

/// Fetches and validates the manifest at `url` (absolute); the cached copy if the network
/// fails, so a cached ensemble loads offline. Returns the manifest and its bytes.
pub async fn read_manifest(url: &str, store: Option<&Store>) -> WebResult<(Manifest, Vec<u8>)> {
    let bytes = match fetch::get(url, "manifest").await {
        Ok(r) => {
            let cap = manifest::MAX_MANIFEST_BYTES as u64;
            fetch::read_body(r, url, "manifest", cap, |_| {}).await?
        }
        Err(e) if e.code == Code::Network => match store {
            Some(s) => s.get(&manifest_key(url)).await.ok_or(e)?,
            None => return Err(e),
        },
        Err(e) => return Err(e),
    };
    if let Some(e) = manifest_error(url, &bytes) {
        return Err(e);
    }
    let manifest = Manifest::from_bytes(url, &bytes)
        .map_err(|e| WebError::new(Code::ManifestInvalid, e.to_string()).url(url))?;
    Ok((manifest, bytes))
}

fn manifest_key(url: &str) -> String {
    format!("{url}?flexquant-manifest")
}

/// The directory an ensemble owns in the cache: its manifest's URL up to the last `/`.
fn ensemble_dir(url: &str) -> &str {
    let path_end = url.find(['?', '#']).unwrap_or(url.len());
    &url[..url[..path_end].rfind('/').map_or(0, |i| i + 1)]
}

/// The cache keys of the ensemble at `url` (manifest, files of any version, the completion
/// markers of earlier releases).
pub fn owned_keys<'a>(keys: &'a [String], url: &str) -> Vec<&'a String> {
    let dir = ensemble_dir(url);
    let manifest = manifest_key(url);
    let marker = format!("{url}?flexquant-complete=");
    keys.iter()
        .filter(|k| {
            **k == manifest
                || k.starts_with(&marker)
                || (k.starts_with(dir) && store::parse_key(k).is_some())
        })
        .collect()
}

impl Loader {
    /// Reads the manifest (`read_manifest`), evicts from the cache the files of other
    /// versions of this ensemble and counts the bytes of this version already cached against
    /// the quota.
    pub async fn open(
        url: &str,
        cache_name: Option<&str>,
        quota: Option<u64>,
        emitter: Emitter,
    ) -> WebResult<Loader> {
        let url = fetch::resolve(url, ".")?;
        let store = match cache_name {
            Some(n) => Store::open(n).await,
            None => None,
        };
        let (manifest, bytes) = read_manifest(&url, store.as_ref()).await?;
        let loader = Loader {
            manifest_sha: manifest::sha256_hex(&bytes),
            manifest_url: url,
            manifest,
            store,
            quota,
            stored: Cell::new(0),
            net_bytes: Cell::new(0),
            cache_bytes: Cell::new(0),
            emitter,
        };
        if let Some(s) = &loader.store {
            // Small, and re-verified on every read: a failure to store it is harmless.
            let _ = s.put(&manifest_key(&loader.manifest_url), &bytes).await;
            let held = loader.evict_stale(s).await;
            loader.stored.set(held);
        }
        Ok(loader)
    }

    /// Deletes the cached files of this ensemble that the manifest no longer lists (other
    /// versions, renamed files); returns the bytes of this version's files that are cached.
    async fn evict_stale(&self, s: &Store) -> u64 {
        let current: std::collections::BTreeMap<(String, &str), u64> = self
            .all_files()
            .filter_map(|f| Some(((self.url_of(f).ok()?, f.sha256.as_str()), f.bytes)))
            .collect();
        let keys = s.keys().await;
        let mut held = 0;
        for k in owned_keys(&keys, &self.manifest_url) {
            match store::parse_key(k) {
                Some((u, sha)) => match current.get(&(u.to_string(), sha)) {
                    Some(bytes) => held += bytes,
                    None => s.delete(k).await,
                },
                None if k.contains("?flexquant-complete=") => s.delete(k).await,
                None => {}
            }
        }
        held
    }

    /// Every file of the ensemble (a file shared by several versions appears once per use).
    pub fn all_files(&self) -> impl Iterator<Item = &FileRef> {
        let m = &self.manifest;
        m.modules
            .iter()
            .map(|v| &v.file)
            .chain([&m.base, &m.tokenizer])
    }

    pub fn url_of(&self, f: &FileRef) -> WebResult<String> {
        fetch::resolve(&f.file, &self.manifest_url)
    }

    pub fn cached(&self) -> bool {
        self.store.is_some()
    }

    /// The shard files of trajectory step `step` (every module's version there).
    pub fn step_files(&self, step: usize) -> Vec<FileRef> {
        let m = &self.manifest;
        m.bits_at(step)
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let v = m.version(ModuleId::from_index(i), b).expect("validated");
                v.file.clone()
            })
            .collect()
    }

    /// Checks bytes against the manifest: a wrong size is `Truncated`, a wrong hash
    /// `HashMismatch`; both name the file and URL. The hash is the browser's (SubtleCrypto,
    /// several times faster than sha256 in wasm; every swap verifies its shards).
    async fn verify(f: &FileRef, url: &str, bytes: &[u8]) -> WebResult<()> {
        let at = |code, e: crate::Error| {
            WebError::new(code, format!("{e} (from {url})"))
                .url(url)
                .file(&f.file)
        };
        Manifest::check_size(f, bytes.len()).map_err(|e| at(Code::Truncated, e))?;
        let hash = digest::sha256_hex(bytes).await;
        Manifest::check_hash(f, &hash).map_err(|e| at(Code::HashMismatch, e))
    }

    /// A verified copy from the cache, if there is one (a corrupt entry is deleted).
    async fn cached_copy(&self, f: &FileRef, url: &str) -> Option<Vec<u8>> {
        let s = self.store.as_ref()?;
        let key = store::key(url, &f.sha256);
        let bytes = s.get(&key).await?;
        if Self::verify(f, url, &bytes).await.is_err() {
            s.delete(&key).await;
            return None;
        }
        Some(bytes)
    }

    /// Stores verified bytes; a full cache is reported once as an `error` event and loading
    /// goes on uncached.
    async fn store(&self, f: &FileRef, url: &str, bytes: &[u8]) {
        let Some(s) = &self.store else { return };
        let e = match self.quota {
            Some(q) if self.stored.get() + bytes.len() as u64 > q => Err(WebError::new(
                Code::QuotaExceeded,
                format!(
                    "storing {} would exceed the {q}-byte cache quota ({} bytes stored)",
                    f.file,
                    self.stored.get()
                ),
            )
            .file(&f.file)),
            _ => s.put(&store::key(url, &f.sha256), bytes).await,
        };
        match e {
            Ok(()) => self.stored.set(self.stored.get() + bytes.len() as u64),
            Err(e) => self.emitter.error(&e),
        }
    }

    /// One file: cache first, else the network; always verified before it is returned.
    pub async fn file(&self, f: &FileRef, p: &mut Progress) -> WebResult<Vec<u8>> {
        let url = self.url_of(f)?;
        match self.cached_copy(f, &url).await {
            Some(bytes) => Ok(self.served_from_cache(f, p, bytes)),
            None => self.download(f, &url, p).await,
        }
    }

    /// Progress and counters for a file the cache served.
    fn served_from_cache(&self, f: &FileRef, p: &mut Progress, bytes: Vec<u8>) -> Vec<u8> {
        self.cache_bytes.set(self.cache_bytes.get() + f.bytes);
        p.from_cache += f.bytes;
        p.done_bytes += f.bytes;
        p.files_done += 1;
        p.emit(&self.emitter, &f.file, 0, true);
        bytes
    }

    /// One file from the network, verified, then stored.
    async fn download(&self, f: &FileRef, url: &str, p: &mut Progress) -> WebResult<Vec<u8>> {
        let url = url.to_string();
        let r = fetch::get(&url, &f.file).await?;
        let em = self.emitter.clone();
        let bytes = fetch::read_body(r, &url, &f.file, f.bytes, |n| {
            p.emit(&em, &f.file, n, false)
        })
        .await?;
        Self::verify(f, &url, &bytes).await?;
        self.net_bytes.set(self.net_bytes.get() + f.bytes);
        p.net_bytes += f.bytes;
        p.done_bytes += f.bytes;
        p.files_done += 1;
        p.emit(&self.emitter, &f.file, 0, true);
        self.store(f, &url, &bytes).await;
        Ok(bytes)
    }

    /// Several files as one progress phase. The cache is read for all of them at once (a
    /// swap's shards are usually all there: the Cache API's and SubtleCrypto's latencies
    /// overlap instead of adding up), then the missing ones are downloaded one by one.
    pub async fn files(&self, fs: &[FileRef], phase: &'static str) -> WebResult<Vec<Vec<u8>>> {
        let total = fs.iter().map(|f| f.bytes).sum();
        let mut p = Progress::new(phase, total, fs.len());
        let urls = fs
            .iter()
            .map(|f| self.url_of(f))
            .collect::<WebResult<Vec<_>>>()?;
        let cached = futures_util::future::join_all(
            fs.iter().zip(&urls).map(|(f, u)| self.cached_copy(f, u)),
        )
        .await;
        let mut out = Vec::with_capacity(fs.len());
        for ((f, url), c) in fs.iter().zip(&urls).zip(cached) {
            out.push(match c {
                Some(bytes) => self.served_from_cache(f, &mut p, bytes),
                None => self.download(f, url, &mut p).await?,
            });
        }
        Ok(out)
    }

    /// Puts the files that are not cached yet into the cache (nothing is kept in memory).
    /// Without a cache there is nowhere to put them, and nothing is fetched.
    pub async fn prefetch(&self, fs: &[FileRef]) -> WebResult<usize> {
        let Some(s) = &self.store else { return Ok(0) };
        let mut missing = Vec::new();
        for f in fs {
            let url = self.url_of(f)?;
            if !s.has(&store::key(&url, &f.sha256)).await && !missing.contains(f) {
                missing.push(f.clone());
            }
        }
        if missing.is_empty() {
            return Ok(0);
        }
        let total = missing.iter().map(|f| f.bytes).sum();
        let mut p = Progress::new("prefetch", total, missing.len());
        for f in &missing {
            self.file(f, &mut p).await?;
        }
        Ok(missing.len())
    }
}
