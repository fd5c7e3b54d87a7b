//! The ensemble by URL: the manifest, then files addressed relative to it, each served from
//! the Cache API when a verified copy is there, else fetched (whole files, streamed with
//! progress), verified against the manifest (size, then sha256) and only then stored.

use crate::ensemble::manifest::{self, FileRef, Manifest};
use crate::model::weights::ModuleId;
use crate::web::error::{Code, WebError, WebResult};
use crate::web::events::{Emitter, Progress};
use crate::web::store::{self, Store};
use crate::web::{digest, fetch};
use futures_util::StreamExt;
use std::cell::{Cell, RefCell};

/// Downloads at a time, by measurement (`./build.sh bench`, `downloads.by_parallel`): the demo
/// ensemble's cold download through a server adding 50 ms per response took 16.7 s one at a
/// time, 9.7 s at 2, 5.5 s at 4, 4.2 s at 6, 3.9 s at 8 and 3.2 s at 12. Chromium opens at
/// most 6 HTTP/1.1 connections per host; more requests in flight still help, since verifying
/// and storing a finished file overlaps the next ones' transfers.
pub const PARALLEL: usize = 12;
/// Retries of a download after a network error (or a 5xx / 429 answer), with backoff from
/// `RETRY_MS` doubling.
const RETRIES: u32 = 3;
const RETRY_MS: i32 = 250;

/// Whether a failed download is worth another try: the network, or a server that is busy.
fn retryable(e: &WebError) -> bool {
    e.code == Code::Network
        || (e.code == Code::Http && e.status.is_some_and(|s| s >= 500 || s == 429))
}

pub struct Loader {
    pub manifest_url: String,
    pub manifest: Manifest,
    pub manifest_sha: String,
    store: Option<Store>,
    /// Bytes this engine may add to the Cache API (the app's cap; the browser's quota applies
    /// on top).
    quota: Option<u64>,
    stored: Cell<u64>,
    /// Downloads at a time.
    parallel: usize,
    /// Set by `close` (the engine was unloaded): nothing more is fetched or stored.
    closed: Cell<bool>,
    /// The first load's progress (`expect_load`), continued across the tokenizer and model.
    load_progress: RefCell<Option<Progress>>,
    /// While the first load runs: verified files waiting to be stored (`store_deferred`).
    deferred: RefCell<Option<Vec<(FileRef, String, js_sys::Uint8Array)>>>,
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
        parallel: Option<u32>,
        emitter: Emitter,
    ) -> WebResult<Loader> {
        let parallel = match parallel {
            None => PARALLEL,
            Some(n @ 1..=32) => n as usize,
            Some(n) => {
                return Err(WebError::new(
                    Code::Input,
                    format!("options.parallelDownloads: {n} is not in 1..=32"),
                ))
            }
        };
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
            parallel,
            closed: Cell::new(false),
            load_progress: RefCell::new(None),
            deferred: RefCell::new(None),
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

    /// Stops fetching and storing (downloads in flight are dropped when they arrive; files
    /// waiting in the deferred queue are not stored).
    pub fn close(&self) {
        self.closed.set(true);
        self.deferred.borrow_mut().take();
    }

    /// Stores the files the first load verified (`expect_load` defers them: the Cache API's
    /// writes would slow the downloads they overlap by about a second per 90 MB in Chromium),
    /// one after another, in the background of the running engine.
    pub async fn store_deferred(&self) {
        let Some(queue) = self.deferred.borrow_mut().take() else {
            return;
        };
        for (f, url, bytes) in queue {
            self.store(&f, &url, &bytes.to_vec()).await;
        }
    }

    /// Stores verified bytes (or queues them during the first load); a full cache is
    /// reported once as an `error` event and loading goes on uncached.
    async fn store(&self, f: &FileRef, url: &str, bytes: &[u8]) {
        let Some(s) = self.store.as_ref().filter(|_| !self.closed.get()) else {
            return;
        };
        if let Some(q) = self.deferred.borrow_mut().as_mut() {
            // A JS copy: the wasm heap never shrinks, so it must not hold the queue.
            q.push((f.clone(), url.to_string(), js_sys::Uint8Array::from(bytes)));
            return;
        }
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
    pub async fn file(&self, f: &FileRef, phase: &'static str) -> WebResult<Vec<u8>> {
        let mut out = self.fetch_all(std::slice::from_ref(f), phase, true).await?;
        Ok(out.pop().flatten().unwrap_or_default())
    }

    /// Starts the first load's progress: the tokenizer, the base and `step`'s modules as one
    /// running total (the `download` phase of `files` continues it).
    pub fn expect_load(&self, step: usize) {
        let m = &self.manifest;
        let mut fs = self.step_files(step);
        fs.extend([m.base.clone(), m.tokenizer.clone()]);
        fs.sort_by(|a, b| a.file.cmp(&b.file));
        fs.dedup();
        let total = fs.iter().map(|f| f.bytes).sum();
        *self.load_progress.borrow_mut() = Some(Progress::new("download", total, fs.len()));
        if self.store.is_some() {
            *self.deferred.borrow_mut() = Some(Vec::new());
        }
    }

    /// Counters for a file the cache served.
    fn served_from_cache(&self, f: &FileRef, p: &RefCell<Progress>) {
        self.cache_bytes.set(self.cache_bytes.get() + f.bytes);
        let mut p = p.borrow_mut();
        p.from_cache += f.bytes;
        p.done_bytes += f.bytes;
        p.files_done += 1;
        p.emit(&self.emitter, &f.file, true);
    }

    /// One file from the network, verified, then stored; a network error (or a 5xx/429
    /// answer) is retried with backoff, a file that arrives but does not verify is not.
    async fn download(&self, f: &FileRef, url: &str, p: &RefCell<Progress>) -> WebResult<Vec<u8>> {
        let mut attempt = 0;
        let bytes = loop {
            let arrived = Cell::new(0u64);
            let r = async {
                let r = fetch::get(url, &f.file).await?;
                fetch::read_body(r, url, &f.file, f.bytes, |n| {
                    let mut p = p.borrow_mut();
                    p.in_flight += n - arrived.replace(n);
                    p.emit(&self.emitter, &f.file, false);
                })
                .await
            }
            .await;
            p.borrow_mut().in_flight -= arrived.get();
            match r {
                Ok(b) => break b,
                Err(e) if attempt < RETRIES && retryable(&e) => {
                    attempt += 1;
                    crate::web::sleep(RETRY_MS * (1 << (attempt - 1))).await;
                }
                Err(e) => return Err(e),
            }
        };
        Self::verify(f, url, &bytes).await?;
        self.net_bytes.set(self.net_bytes.get() + f.bytes);
        {
            let mut p = p.borrow_mut();
            p.net_bytes += f.bytes;
            p.done_bytes += f.bytes;
            p.files_done += 1;
            p.emit(&self.emitter, &f.file, true);
        }
        self.store(f, url, &bytes).await;
        Ok(bytes)
    }

    /// Several files as one progress phase (the first load's running total for `download`
    /// after `expect_load`). The cache is read for all of them at once; the missing ones are
    /// downloaded `PARALLEL` at a time. Every file is verified before it is returned or
    /// stored; on the first error the others are dropped (nothing partial is stored).
    pub async fn files(&self, fs: &[FileRef], phase: &'static str) -> WebResult<Vec<Vec<u8>>> {
        let out = self.fetch_all(fs, phase, true).await?;
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// `files`, keeping the bytes only when `keep` (prefetching only stores them).
    async fn fetch_all(
        &self,
        fs: &[FileRef],
        phase: &'static str,
        keep: bool,
    ) -> WebResult<Vec<Option<Vec<u8>>>> {
        let total: u64 = fs.iter().map(|f| f.bytes).sum();
        let resumed = {
            let mut lp = self.load_progress.borrow_mut();
            match lp.as_ref() {
                Some(p) if p.phase == phase => lp.take(),
                _ => None,
            }
        };
        let p = match resumed {
            Some(mut p) => {
                // The first load: the running total, extended if the files differ.
                p.files_total = p.files_total.max(p.files_done + fs.len());
                p.total_bytes = p.total_bytes.max(p.done_bytes + total);
                p
            }
            _ => Progress::new(phase, total, fs.len()),
        };
        let p = RefCell::new(p);
        let urls = fs
            .iter()
            .map(|f| self.url_of(f))
            .collect::<WebResult<Vec<_>>>()?;
        let cached = futures_util::future::join_all(
            fs.iter().zip(&urls).map(|(f, u)| self.cached_copy(f, u)),
        )
        .await;
        let jobs = fs.iter().zip(&urls).zip(cached).map(|((f, url), c)| {
            let p = &p;
            async move {
                let bytes = match c {
                    Some(b) => {
                        self.served_from_cache(f, p);
                        b
                    }
                    None if self.closed.get() => {
                        return Err(WebError::new(Code::Unloaded, "the engine was unloaded"))
                    }
                    None => self.download(f, url, p).await?,
                };
                Ok::<_, WebError>(keep.then_some(bytes))
            }
        });
        let out: Vec<WebResult<Option<Vec<u8>>>> = futures_util::stream::iter(jobs)
            .buffered(self.parallel)
            .collect()
            .await;
        let out = out.into_iter().collect::<WebResult<Vec<_>>>();
        if out.is_ok() && phase == "download" && p.borrow().files_done < p.borrow().files_total {
            // More of the first load to come (the tokenizer before the model): continue it.
            *self.load_progress.borrow_mut() = Some(p.into_inner());
        }
        out
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
        self.fetch_all(&missing, "prefetch", false).await?;
        Ok(missing.len())
    }
}
