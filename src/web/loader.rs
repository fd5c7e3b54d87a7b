//! The ensemble by URL: the manifest, then files addressed relative to it, each served from
//! the Cache API when a verified copy is there, else fetched (whole files, streamed with
//! progress), verified against the manifest (size, then sha256) and only then stored.

use crate::ensemble::manifest::{self, FileRef, Manifest, Pack};
use crate::model::weights::ModuleId;
use crate::web::error::{Code, WebError, WebResult};
use crate::web::events::{Emitter, Progress};
use crate::web::store::{self, Store};
use crate::web::{digest, fetch};
use futures_util::{FutureExt, StreamExt};
use js_sys::Uint8Array;
use std::cell::{Cell, RefCell};

/// Downloads at a time, by measurement (`./build.sh bench`, `downloads.by_parallel`): the demo
/// ensemble's cold download through a server adding 50 ms per response took 16.7 s one at a
/// time, 9.7 s at 2, 5.5 s at 4, 4.2 s at 6, 3.9 s at 8 and 3.2 s at 12. Chromium opens at
/// most 6 HTTP/1.1 connections per host; more requests in flight still help, since verifying
/// and storing a finished file overlaps the next ones' transfers.
pub const PARALLEL: usize = 12;
/// Retries of a download after a network error (or a 5xx / 429 answer), with backoff from
/// `RETRY_MS` doubling.
/// Cache API reads at a time: each file is handed on once read and verified (hashing runs on
/// the browser's threads meanwhile), and only these are in memory at once.
const CACHE_READS: usize = 8;
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
    store: Option<Store>,
    /// Bytes this engine may add to the Cache API (the app's cap; the browser's quota applies
    /// on top).
    quota: Option<u64>,
    stored: Cell<u64>,
    /// Downloads at a time.
    parallel: usize,
    /// How long a download may go without data before it is retried (`fetch::get`).
    stall_ms: Option<u32>,
    /// Set by `close` (the engine was unloaded): nothing more is fetched or stored.
    closed: Cell<bool>,
    /// The first load's verified files, by name, until the model takes them (`first_load`):
    /// JS arrays as downloaded or read, outside the wasm heap, which never shrinks (holding
    /// them there made every step's load peak at all its files plus the model: 164 MB of
    /// wasm heap for the demo at any step).
    handoff: RefCell<std::collections::HashMap<String, Uint8Array>>,
    /// The manifest's bytes until `store_deferred` puts them in the cache with the first
    /// load's files.
    unsaved_manifest: RefCell<Option<Vec<u8>>>,
    /// While the first load runs: verified files waiting to be stored (`store_deferred`).
    deferred: RefCell<Option<Vec<(FileRef, String, Uint8Array)>>>,
    /// Bytes from the network and from the cache since the engine was created.
    pub net_bytes: Cell<u64>,
    pub cache_bytes: Cell<u64>,
    pub emitter: Emitter,
}

/// Manifest errors split into the codes apps branch on.
fn manifest_error(url: &str, bytes: &[u8]) -> Option<WebError> {
    let head: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let v = head.get("version")?;
    let known = manifest::MIN_VERSION as u64..=manifest::VERSION as u64;
    (!v.as_u64().is_some_and(|v| known.contains(&v))).then(|| {
        WebError::new(
            Code::ManifestVersion,
            format!("{url}: {}", manifest::version_error(v)),
        )
        .url(url)
    })
}

/// Fetches and validates the manifest at `url` (absolute); the cached copy if the network
/// fails, so a cached ensemble loads offline. Returns the manifest and its bytes.
pub async fn read_manifest(
    url: &str,
    store: Option<&Store>,
    stall_ms: Option<u32>,
) -> WebResult<(Manifest, Vec<u8>)> {
    let bytes = match fetch::get(url, "manifest", stall_ms).await {
        Ok(r) => {
            let cap = manifest::MAX_MANIFEST_BYTES as u64;
            fetch::read_body(r, url, "manifest", cap, stall_ms, |_| {})
                .await?
                .to_vec()
        }
        Err(e) if e.code == Code::Network => match store {
            Some(s) => s.get(&manifest_key(url)).await.ok_or(e)?.to_vec(),
            None => return Err(e),
        },
        Err(e) => return Err(e),
    };
    // The version is looked at only when the manifest does not parse: a manifest of another
    // version gets its own code (parsing it twice cost a cold load ~5 ms before its requests).
    let manifest = Manifest::from_bytes(url, &bytes).map_err(|e| {
        manifest_error(url, &bytes)
            .unwrap_or_else(|| WebError::new(Code::ManifestInvalid, e.to_string()).url(url))
    })?;
    Ok((manifest, bytes))
}

fn manifest_key(url: &str) -> String {
    format!("{url}?flexquant-manifest")
}

/// The URL of an ensemble's file `name`: the manifest's directory and the name, which the
/// manifest's validation allows only as a plain relative path (what `new URL(name, url)`
/// gives, without a call into JS for each of ~400 files).
pub fn file_url(manifest_url: &str, name: &str) -> String {
    format!("{}{name}", ensemble_dir(manifest_url))
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
    /// the quota. The manifest is cached with the first load's files (`store_deferred`).
    pub async fn open(
        url: &str,
        cache_name: Option<&str>,
        quota: Option<u64>,
        parallel: Option<u32>,
        stall_ms: Option<u32>,
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
        let (manifest, bytes) = read_manifest(&url, store.as_ref(), stall_ms).await?;
        let loader = Loader {
            manifest_url: url,
            manifest,
            store,
            quota,
            stored: Cell::new(0),
            parallel,
            stall_ms,
            closed: Cell::new(false),
            handoff: RefCell::default(),
            unsaved_manifest: RefCell::new(Some(bytes)),
            deferred: RefCell::new(None),
            net_bytes: Cell::new(0),
            cache_bytes: Cell::new(0),
            emitter,
        };
        if let Some(s) = &loader.store {
            let held = loader.evict_stale(s).await;
            loader.stored.set(held);
        }
        Ok(loader)
    }

    /// Deletes the cached files of this ensemble that the manifest no longer lists (other
    /// versions, renamed files); returns the bytes of this version's files that are cached.
    async fn evict_stale(&self, s: &Store) -> u64 {
        let current: std::collections::BTreeMap<(String, &str), u64> = self
            .manifest
            .all_files()
            .map(|f| ((self.url_of(f), f.sha256.as_str()), f.bytes))
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

    pub fn url_of(&self, f: &FileRef) -> String {
        file_url(&self.manifest_url, &f.file)
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
    async fn verify(f: &FileRef, url: &str, bytes: &Uint8Array) -> WebResult<()> {
        let at = |code, e: crate::Error| {
            WebError::new(code, format!("{e} (from {url})"))
                .url(url)
                .file(&f.file)
        };
        Manifest::check_size(f, bytes.length() as usize).map_err(|e| at(Code::Truncated, e))?;
        let hash = digest::sha256_hex(bytes).await;
        Manifest::check_hash(f, &hash).map_err(|e| at(Code::HashMismatch, e))
    }

    /// A verified copy from the cache, if there is one (a corrupt entry is deleted).
    async fn cached_copy(&self, f: &FileRef, url: &str) -> Option<Uint8Array> {
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

    /// Stores the files the first load verified (`first_load` defers them: the Cache API's
    /// writes would slow the downloads they overlap by about a second per 90 MB in Chromium),
    /// one after another, in the background of the running engine.
    pub async fn store_deferred(&self) {
        let manifest = self.unsaved_manifest.borrow_mut().take();
        if let (Some(s), Some(bytes)) = (&self.store, manifest) {
            // Small, and re-verified on every read: a failure to store it is harmless.
            let bytes = Uint8Array::from(&bytes[..]);
            let _ = s.put(&manifest_key(&self.manifest_url), &bytes).await;
        }
        let Some(queue) = self.deferred.borrow_mut().take() else {
            return;
        };
        for (f, url, bytes) in queue {
            self.store(&f, &url, &bytes).await;
        }
    }

    /// Stores verified bytes (or queues them during the first load); a full cache is
    /// reported once as an `error` event and loading goes on uncached.
    async fn store(&self, f: &FileRef, url: &str, bytes: &Uint8Array) {
        let Some(s) = self.store.as_ref().filter(|_| !self.closed.get()) else {
            return;
        };
        if let Some(q) = self.deferred.borrow_mut().as_mut() {
            q.push((f.clone(), url.to_string(), bytes.clone()));
            return;
        }
        let e = match self.quota {
            Some(q) if self.stored.get() + bytes.length() as u64 > q => Err(WebError::new(
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
            Ok(()) => self.stored.set(self.stored.get() + bytes.length() as u64),
            Err(e) => self.emitter.error(&e),
        }
    }

    /// One file: cache first, else the network; always verified before it is returned.
    pub async fn file(&self, f: &FileRef, phase: &'static str) -> WebResult<Vec<u8>> {
        let mut out = self.files(std::slice::from_ref(f), phase).await?;
        Ok(out.pop().unwrap_or_default())
    }

    /// The first load: the tokenizer, the base and `step`'s modules fetched at once, as one
    /// progress total (one after another, each waiting on the last one's parsing, they took
    /// twice as long). Returns the tokenizer's bytes and keeps the others for the `files`
    /// calls that build the model (`end_first_load` drops what they did not take). Verified
    /// files are stored once the model runs (`store_deferred`).
    pub async fn first_load(&self, step: usize) -> WebResult<Vec<u8>> {
        let m = &self.manifest;
        let mut fs = vec![m.tokenizer.clone(), m.base.clone()];
        for f in self.step_files(step) {
            if !fs.contains(&f) {
                fs.push(f);
            }
        }
        if self.store.is_some() {
            *self.deferred.borrow_mut() = Some(Vec::new());
        }
        let mut tokenizer = Vec::new();
        let mut handoff = std::collections::HashMap::new();
        self.each_file(&fs, "download", &mut |i, b| {
            if i == 0 {
                tokenizer = b.to_vec();
            } else {
                handoff.insert(fs[i].file.clone(), b);
            }
            Ok(())
        })
        .await?;
        *self.handoff.borrow_mut() = handoff;
        Ok(tokenizer)
    }

    /// Drops the first load's files that the model did not take.
    pub fn end_first_load(&self) {
        self.handoff.borrow_mut().clear();
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

    /// The body of `url` (at most `cap` bytes); a network error (or a 5xx/429 answer) is
    /// retried with backoff. `arrived` sees the bytes so far of the current attempt (0 when
    /// an attempt ends).
    async fn fetch_retrying(
        &self,
        url: &str,
        what: &str,
        cap: u64,
        arrived: impl Fn(u64),
    ) -> WebResult<Uint8Array> {
        let mut attempt = 0;
        loop {
            let r = async {
                let r = fetch::get(url, what, self.stall_ms).await?;
                fetch::read_body(r, url, what, cap, self.stall_ms, &arrived).await
            }
            .await;
            arrived(0);
            match r {
                Ok(b) => return Ok(b),
                Err(e) if attempt < RETRIES && retryable(&e) => {
                    attempt += 1;
                    crate::web::sleep(RETRY_MS * (1 << (attempt - 1))).await;
                }
                Err(mut e) => {
                    if attempt > 0 {
                        e.message = format!("{} (tried {} times)", e.message, attempt + 1);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// One file from the network, verified, then stored; a file that arrives but does not
    /// verify is not retried.
    async fn download(
        &self,
        f: &FileRef,
        url: &str,
        p: &RefCell<Progress>,
    ) -> WebResult<Uint8Array> {
        let bytes = self
            .fetch_retrying(
                url,
                &f.file,
                f.bytes,
                in_flight(p, &self.emitter, &f.file, 1.0),
            )
            .await?;
        Self::verify(f, url, &bytes).await?;
        self.net_bytes.set(self.net_bytes.get() + f.bytes);
        self.arrived(p, &f.file, f.bytes, 1);
        self.store(f, url, &bytes).await;
        Ok(bytes)
    }

    /// A pack (`ensemble::pack`) from the network: every file in it verified and stored,
    /// the bytes of `wanted` (indices into the caller's list, with their files and URLs)
    /// returned. A wanted file that does not verify (or lies past the end of a short pack) is
    /// the error, naming that file and the pack; the pack's other files that do not verify are
    /// only not stored.
    async fn download_pack(
        &self,
        pack: &Pack,
        wanted: &[Wanted<'_>],
        p: &RefCell<Progress>,
    ) -> WebResult<Vec<(usize, Uint8Array)>> {
        let url = file_url(&self.manifest_url, &pack.file);
        let want_bytes: u64 = wanted.iter().map(|w| w.1.bytes).sum();
        // Progress counts the wanted files' bytes, in proportion as the pack arrives.
        let share = want_bytes as f64 / pack.bytes.max(1) as f64;
        let progress = in_flight(p, &self.emitter, &pack.file, share);
        let bytes = self
            .fetch_retrying(&url, &pack.file, pack.bytes, progress)
            .await
            // A pack the server does not have: the files wanted from it are what is missing.
            .map_err(|e| match &wanted.first() {
                Some(w) if e.file.as_deref() == Some(&pack.file) => e.file(&w.1.file),
                _ => e,
            })?;
        let len = bytes.length() as u64;
        self.net_bytes.set(self.net_bytes.get() + len);
        // A view of the pack (no copy); a member past its end is cut short, so it fails its
        // size check.
        let slice = |f: &FileRef| {
            let s = f.pack.as_ref()?;
            let end = s.offset.checked_add(f.bytes)?.min(len);
            (s.offset <= end).then(|| bytes.subarray(s.offset as u32, end as u32))
        };
        let empty = || Uint8Array::new_with_length(0);
        // All at once: the browser hashes them on several threads.
        let checks = wanted.iter().map(|&(_, f, member_url)| async move {
            Self::verify(f, member_url, &slice(f).unwrap_or_else(empty)).await
        });
        let checked = futures_util::future::join_all(checks).await;
        let mut out = Vec::with_capacity(wanted.len());
        let mut failed = None;
        for (&(i, f, member_url), r) in wanted.iter().zip(checked) {
            let b = slice(f).unwrap_or_else(empty);
            match r {
                Ok(()) => out.push((i, f, member_url, b)),
                Err(mut e) if failed.is_none() => {
                    e.message = format!("{} in pack {url}", e.message);
                    failed = Some(e.url(&url));
                }
                Err(_) => {}
            }
        }
        if failed.is_none() {
            self.arrived(p, &pack.file, want_bytes, wanted.len());
        }
        // Every file that verified is stored, the pack's other files too: the swaps that
        // will want them find them in the cache.
        for (_, f, member_url, b) in &out {
            self.store(f, member_url, b).await;
        }
        let others = self.manifest.all_files().filter(|f| {
            f.pack.as_ref().is_some_and(|s| s.pack == pack.file)
                && !wanted.iter().any(|w| w.1.file == f.file)
        });
        let mut seen = std::collections::HashSet::new();
        for f in others {
            if !seen.insert(&f.file) {
                continue;
            }
            let (u, Some(b)) = (self.url_of(f), slice(f)) else {
                continue;
            };
            if self.is_stored(f, &u).await || Self::verify(f, &u, &b).await.is_err() {
                continue;
            }
            self.store(f, &u, &b).await;
        }
        match failed {
            Some(e) => Err(e),
            // Views of the pack, no copies: it is freed once the caller lets go of them (a load
            // converts each as it arrives).
            None => Ok(out.into_iter().map(|(i, _, _, b)| (i, b)).collect()),
        }
    }

    /// Whether the cache holds `f` (an entry under its URL and hash).
    async fn is_stored(&self, f: &FileRef, url: &str) -> bool {
        match &self.store {
            Some(s) => s.has(&store::key(url, &f.sha256)).await,
            None => false,
        }
    }

    /// Counters for `files` verified files of `bytes` bytes that came from the network.
    fn arrived(&self, p: &RefCell<Progress>, file: &str, bytes: u64, files: usize) {
        let mut p = p.borrow_mut();
        p.net_bytes += bytes;
        p.done_bytes += bytes;
        p.files_done += files;
        p.emit(&self.emitter, file, true);
    }

    /// Several files as one progress phase. The cache is read for all of them at once; the missing ones are
    /// downloaded `PARALLEL` at a time. Every file is verified before it is returned or
    /// stored; on the first error the others are dropped (nothing partial is stored).
    pub async fn files(&self, fs: &[FileRef], phase: &'static str) -> WebResult<Vec<Vec<u8>>> {
        let mut out = vec![Vec::new(); fs.len()];
        self.each_file(fs, phase, &mut |i, b| {
            out[i] = b.to_vec();
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// `files`, each kept as the JS array it was read into (outside the wasm heap) until it
    /// is taken.
    pub async fn hold(
        &self,
        fs: &[FileRef],
        phase: &'static str,
    ) -> WebResult<Vec<Box<dyn crate::runtime::walk::Held>>> {
        let mut out = vec![None; fs.len()];
        self.each_file(fs, phase, &mut |i, b| {
            out[i] = Some(b);
            Ok(())
        })
        .await?;
        Ok(out
            .into_iter()
            .map(|b| {
                let b = b.unwrap_or_else(|| Uint8Array::new_with_length(0));
                Box::new(JsBytes(b)) as Box<dyn crate::runtime::walk::Held>
            })
            .collect())
    }

    /// `files`, handing each file's verified bytes to `each(index, bytes)` as soon as it is
    /// had, so the caller can convert them and let them go. The bytes stay JS arrays until
    /// the caller copies them in: the wasm heap never shrinks, and holding a whole step's files
    /// (or a cold load's downloads in flight) there set its high-water mark. The first error,
    /// the source's or `each`'s, ends it.
    pub async fn each_file(
        &self,
        fs: &[FileRef],
        phase: &'static str,
        each: &mut dyn FnMut(usize, Uint8Array) -> WebResult<()>,
    ) -> WebResult<()> {
        // The first load's files, verified already (`first_load`).
        let mut rest = Vec::new();
        for (i, f) in fs.iter().enumerate() {
            let handed = self.handoff.borrow_mut().remove(&f.file);
            match handed {
                Some(b) => each(i, b)?,
                None => rest.push(i),
            }
        }
        if rest.is_empty() {
            return Ok(());
        }
        let total: u64 = rest.iter().map(|&i| fs[i].bytes).sum();
        let p = RefCell::new(Progress::new(phase, total, rest.len()));
        let urls: Vec<String> = fs.iter().map(|f| self.url_of(f)).collect();
        // Nothing of this version cached (`evict_stale` counted it, nothing stored since): no
        // lookups (a cold load's Cache API reads delayed its first request by ~0.1 s).
        // A few at a time, each handed on once verified, so that only those are in memory.
        let urls_ref = &urls;
        let mut cached = futures_util::stream::iter(rest.iter().map(|&i| async move {
            let c = if self.stored.get() == 0 {
                None
            } else {
                self.cached_copy(&fs[i], &urls_ref[i]).await
            };
            (i, c)
        }))
        .buffered(CACHE_READS);
        // What the network must bring: whole files, and packs with the files wanted from each.
        let mut singles = Vec::new();
        let mut packs: Vec<(&Pack, Vec<Wanted>)> = Vec::new();
        while let Some((i, c)) = cached.next().await {
            let (f, url) = (&fs[i], urls[i].as_str());
            match (c, &f.pack) {
                (Some(b), _) => {
                    self.served_from_cache(f, &p);
                    each(i, b)?;
                }
                (None, _) if self.closed.get() => {
                    return Err(WebError::new(Code::Unloaded, "the engine was unloaded"))
                }
                (None, None) => singles.push((i, f, url)),
                (None, Some(s)) => {
                    let pack = self.manifest.pack(&s.pack).ok_or_else(|| {
                        WebError::new(Code::Internal, format!("{}: no pack {}", f.file, s.pack))
                    })?;
                    match packs.iter_mut().find(|(k, _)| k.file == pack.file) {
                        Some((_, w)) => w.push((i, f, url)),
                        None => packs.push((pack, vec![(i, f, url)])),
                    }
                }
            }
        }
        let pr = &p;
        let jobs = singles
            .into_iter()
            .map(|(i, f, url)| {
                async move { Ok::<_, WebError>(vec![(i, self.download(f, url, pr).await?)]) }
                    .boxed_local()
            })
            .chain(packs.iter().map(|(pack, wanted)| {
                async move { self.download_pack(pack, wanted, pr).await }.boxed_local()
            }));
        let mut done = futures_util::stream::iter(jobs).buffer_unordered(self.parallel);
        while let Some(files) = done.next().await {
            for (i, b) in files? {
                each(i, b)?;
            }
        }
        Ok(())
    }

    /// Puts the files that are not cached yet into the cache (nothing is kept in memory).
    /// Without a cache there is nowhere to put them, and nothing is fetched.
    pub async fn prefetch(&self, fs: &[FileRef]) -> WebResult<usize> {
        let Some(s) = &self.store else { return Ok(0) };
        let mut missing = Vec::new();
        for f in fs {
            let url = self.url_of(f);
            if !s.has(&store::key(&url, &f.sha256)).await && !missing.contains(f) {
                missing.push(f.clone());
            }
        }
        if missing.is_empty() {
            return Ok(0);
        }
        // Stored by the download; nothing is kept in memory.
        self.each_file(&missing, "prefetch", &mut |_, _| Ok(()))
            .await?;
        Ok(missing.len())
    }
}

/// Verified bytes kept outside the wasm heap until taken (`Loader::hold`).
pub struct JsBytes(Uint8Array);

impl crate::runtime::walk::Held for JsBytes {
    fn take(self: Box<Self>) -> Vec<u8> {
        self.0.to_vec()
    }
    fn copy(&self) -> Vec<u8> {
        self.0.to_vec()
    }
}

/// A file wanted from a pack: its index in the caller's list, entry and URL.
type Wanted<'a> = (usize, &'a FileRef, &'a str);

/// A download's progress callback: the bytes that arrived so far of a file (`share` of them
/// count, for a pack whose other files are not wanted), as bytes in flight.
fn in_flight<'a>(
    p: &'a RefCell<Progress>,
    emitter: &'a Emitter,
    file: &'a str,
    share: f64,
) -> impl Fn(u64) + 'a {
    let counted = Cell::new(0u64);
    move |arrived| {
        let n = (arrived as f64 * share) as u64;
        let mut p = p.borrow_mut();
        p.in_flight = p.in_flight + n - counted.replace(n);
        if n > 0 {
            p.emit(emitter, file, false);
        }
    }
}
