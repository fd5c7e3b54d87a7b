//! Walking the trajectory over any byte source and any backend: loading a step onto a new
//! device, executing the controller's decisions between tokens (all shards first, then one
//! module per step), naming what to prefetch, and rebuilding after a device loss at the
//! controller's lower step with the conversation re-prefilled. The host (`web::engine`, the
//! native CLI) decides when; this file does it.

use crate::ensemble::base::Base;
use crate::ensemble::format::PackedMatrix;
use crate::ensemble::manifest::{FileRef, Manifest};
use crate::model::weights::ModuleId;
use crate::runtime::backend::{Backend, Factory, KvChoice, KvFormat};
use crate::runtime::clock::now_ms;
use crate::runtime::session::Session;
use crate::runtime::speed::SpeedMeter;
use crate::runtime::{Decision, Elastic, Reason};
use std::cell::{Cell, RefCell};

/// After a swap's files failed to download or verify, the same target is not retried for
/// this long (a corrupt shard would otherwise be fetched again before every token).
pub const FETCH_RETRY_MS: f64 = 10_000.0;
/// Steps below the current one whose shards are prefetched: down to this fraction of the
/// current footprint (at least one step), so a pressure swap of that size needs no network.
pub const PREFETCH_TO: f64 = 0.75;

/// Where the ensemble's bytes come from: a directory natively; fetch + sha256 + the Cache API
/// in the browser. Every byte returned has been verified against the manifest.
#[allow(async_fn_in_trait)]
pub trait ByteSource {
    /// The platform's error, which backend and input errors convert into.
    type Error: From<crate::Error>;
    fn manifest(&self) -> &Manifest;
    /// The verified bytes of `files`, as one progress phase named `phase`.
    async fn files(
        &self,
        files: &[FileRef],
        phase: &'static str,
    ) -> Result<Vec<Vec<u8>>, Self::Error>;
    /// `files`, each file's bytes handed to `each(index, bytes)` as soon as it is had (a
    /// source may hand them on in any order), so the caller can convert them and let them go
    /// rather than hold every file at once (in wasm that peak stays the heap's size). The
    /// first error, the source's or `each`'s, ends it.
    async fn each_file(
        &self,
        files: &[FileRef],
        phase: &'static str,
        each: &mut dyn FnMut(usize, Vec<u8>) -> Result<(), Self::Error>,
    ) -> Result<(), Self::Error> {
        for (i, b) in self.files(files, phase).await?.into_iter().enumerate() {
            each(i, b)?;
        }
        Ok(())
    }
    /// `files`, verified now and kept where they cost the caller least until each is taken
    /// (the browser keeps them outside the wasm heap): a swap checks every file before it
    /// changes anything, then converts them one by one.
    async fn hold(
        &self,
        files: &[FileRef],
        phase: &'static str,
    ) -> Result<Vec<Box<dyn Held>>, Self::Error> {
        let bytes = self.files(files, phase).await?;
        Ok(bytes
            .into_iter()
            .map(|b| Box::new(b) as Box<dyn Held>)
            .collect())
    }
    /// Whether prefetching into a local cache is worth it (false where every file is local).
    fn prefetches(&self) -> bool {
        false
    }
    /// The manifest name of the file whose bytes `e` says could not be had or failed
    /// verification (missing, truncated, wrong hash), if it names one: loads and swaps then
    /// fall back to the deepest step that does not need that file.
    fn unverified_file(_e: &Self::Error) -> Option<String> {
        None
    }
}

/// Bytes a `ByteSource` verified and keeps until the caller takes them.
pub trait Held {
    fn take(self: Box<Self>) -> Vec<u8>;
    /// A copy, the bytes kept (for a file more than one move uses).
    fn copy(&self) -> Vec<u8>;
}

impl Held for Vec<u8> {
    fn take(self: Box<Self>) -> Vec<u8> {
        *self
    }
    fn copy(&self) -> Vec<u8> {
        self.clone()
    }
}

/// One module swapped.
#[derive(Debug, Clone, PartialEq)]
pub struct Moved {
    pub module: ModuleId,
    pub from_bits: u32,
    pub to_bits: u32,
}

/// What happened, for the host's events and stats.
pub enum Event<'a, E> {
    /// The modules of `step` are being uploaded to a new model.
    Upload {
        step: usize,
        total_bytes: u64,
    },
    /// A swap executed (possibly stopping short of its target: `to` is where it ended).
    Swap {
        from: usize,
        to: usize,
        modules: Vec<Moved>,
        ms: f64,
        reason: Reason,
        footprint_bytes: u64,
        token_index: Option<usize>,
        bits: Vec<u32>,
    },
    DeviceLost {
        step: usize,
    },
    Recovered {
        from: usize,
        to: usize,
        ms: f64,
        reprefilled_tokens: usize,
        bits: Vec<u32>,
    },
    /// The KV cache changed format (`KvChoice::Auto` under memory pressure), its positions kept.
    KvConverted {
        from: KvFormat,
        to: KvFormat,
        bytes_before: u64,
        bytes_after: u64,
        token_index: Option<usize>,
    },
    /// Something that went wrong without stopping the walk.
    Warning(&'a E),
}

/// A model at a trajectory step with its conversation.
pub struct Running<B: Backend> {
    pub session: Session<B>,
    pub step: usize,
}

type Sink<E> = Box<dyn Fn(Event<'_, E>)>;

pub struct Walk<S: ByteSource, F: Factory> {
    pub source: S,
    pub factory: F,
    pub elastic: RefCell<Elastic>,
    fetch_failure: Cell<Option<(usize, f64)>>,
    /// Decode speed of the running answer, fed to the controller between tokens.
    pub meter: RefCell<SpeedMeter>,
    on_event: Sink<S::Error>,
    /// `KvChoice::Auto`: an f16 cache goes to int8 before the weights step down for memory.
    kv_auto: Cell<bool>,
}

impl<S, F> Walk<S, F>
where
    S: ByteSource,
    F: Factory,
    S::Error: From<<F::Model as Backend>::Error>,
{
    pub fn new(source: S, factory: F, elastic: Elastic, on_event: Sink<S::Error>) -> Self {
        Walk {
            source,
            factory,
            elastic: RefCell::new(elastic),
            fetch_failure: Cell::new(None),
            kv_auto: Cell::new(false),
            meter: RefCell::default(),
            on_event,
        }
    }

    pub fn manifest(&self) -> &Manifest {
        self.source.manifest()
    }

    /// Follows the app's KV cache choice (`KvChoice::Auto`: int8 under memory pressure).
    pub fn set_kv_choice(&self, choice: KvChoice) {
        self.kv_auto.set(choice == KvChoice::Auto);
    }

    /// Forgets the conversation and frees its KV cache (`Session::reset`); with
    /// `KvChoice::Auto` the next cache starts in f16 again.
    pub async fn reset(&self, run: &mut Running<F::Model>) -> Result<(), S::Error> {
        run.session.reset();
        if self.kv_auto.get() && run.session.model.kv_format() == Some(KvFormat::Int8) {
            run.session.model.convert_kv(KvFormat::F16).await?;
        }
        Ok(())
    }

    /// Replaces the conversation by one exported from a model of the same weights
    /// (`Session::import`). A cache in a format the app's KV choice does not allow (f16 into
    /// an engine pinned to int8, or the reverse) is converted to the one the model ran in.
    /// A cache refused (context, budget) leaves the conversation as it was; a conversion
    /// refused after the import leaves it empty.
    pub async fn import_session(
        &self,
        run: &mut Running<F::Model>,
        tokens: &[u32],
        format: KvFormat,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), S::Error> {
        let pinned = run
            .session
            .model
            .kv_format()
            .filter(|_| !self.kv_auto.get());
        run.session.import(tokens, format, fill).await?;
        match pinned.filter(|&f| f != format) {
            Some(f) => {
                if let Err(e) = run.session.model.convert_kv(f).await {
                    run.session.reset();
                    return Err(e.into());
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// With `KvChoice::Auto`, a decision that the model must shrink for memory is met first by
    /// converting an f16 KV cache to int8 (0.56x its bytes for +0.07% perplexity on the demo
    /// model, cheaper than any weight step); the controller then decides again with the
    /// smaller overheads. Returns the decision to execute and whether the cache changed. A
    /// conversion the device refuses is a warning, and `d` stands.
    pub async fn kv_first(
        &self,
        run: &mut Running<F::Model>,
        d: Decision,
        token_index: Option<usize>,
    ) -> Result<(Decision, bool), S::Error> {
        let for_memory = |r| {
            matches!(
                r,
                Reason::Budget | Reason::HeapPressure | Reason::OutOfMemory | Reason::BelowFloor
            )
        };
        let short = match d {
            Decision::StepDown { reason, .. } | Decision::Hold { reason, .. } => for_memory(reason),
            _ => false,
        };
        let model = &mut run.session.model;
        let f16 = model.kv_format() == Some(KvFormat::F16);
        if !(short && self.kv_auto.get() && f16 && model.kv_cache_bytes() > 0) {
            return Ok((d, false));
        }
        let bytes_before = model.kv_cache_bytes();
        if let Err(e) = model.convert_kv(KvFormat::Int8).await {
            if !F::Model::is_out_of_memory(&e) {
                return Err(e.into());
            }
            self.emit(Event::Warning(&e.into()));
            return Ok((d, false));
        }
        self.emit(Event::KvConverted {
            from: KvFormat::F16,
            to: KvFormat::Int8,
            bytes_before,
            bytes_after: model.kv_cache_bytes(),
            token_index,
        });
        self.note_overheads(run);
        Ok((self.elastic.borrow_mut().decide(now_ms()), true))
    }

    fn emit(&self, e: Event<'_, S::Error>) {
        (self.on_event)(e)
    }

    /// A new model at the step the controller picks (stepping further down on out-of-memory),
    /// with an empty conversation.
    pub async fn load(&self) -> Result<Running<F::Model>, S::Error> {
        self.load_at(None).await
    }

    /// `load`, at `step` if given (out-of-memory there is an error).
    pub async fn load_at(&self, step: Option<usize>) -> Result<Running<F::Model>, S::Error> {
        let m = self.manifest();
        let g = m.quantizer.group_size;
        let base_bytes = self
            .source
            .files(std::slice::from_ref(&m.base), "download")
            .await?;
        let base = std::sync::Arc::new(Base::from_bytes(
            &m.config,
            g,
            &base_bytes[0],
            &m.base.file,
        )?);
        drop(base_bytes);
        // Steps above this need a file that failed verification (set on the first failure).
        let mut below = 0;
        loop {
            let at = match step {
                Some(s) => s,
                None => self
                    .elastic
                    .borrow_mut()
                    .decide(now_ms())
                    .target()
                    .max(below),
            };
            let files: Vec<FileRef> = m.step_versions(at).iter().map(|v| v.file.clone()).collect();
            let modules = match self.modules(&files, at, "download").await {
                Ok(modules) => modules,
                Err(e) => match S::unverified_file(&e).and_then(|f| self.deeper_without(at, &f)) {
                    Some(deeper) if step.is_none() => {
                        self.emit(Event::Warning(&e));
                        below = deeper;
                        continue;
                    }
                    _ => return Err(e),
                },
            };
            let total_bytes = m.trajectory[at].footprint_bytes;
            self.emit(Event::Upload {
                step: at,
                total_bytes,
            });
            match self.factory.create(&m.config, &base, modules).await {
                Ok(mut model) => {
                    if model.warms_kernels() {
                        self.warm_kernels(&mut model).await?;
                    }
                    {
                        let mut e = self.elastic.borrow_mut();
                        e.set_overheads(model.held_bytes().saturating_sub(total_bytes));
                        e.swapped(at, now_ms())?;
                    }
                    let session = Session::new(model);
                    return Ok(Running { session, step: at });
                }
                Err(e)
                    if step.is_none()
                        && F::Model::is_out_of_memory(&e)
                        && at + 1 < m.trajectory.len() =>
                {
                    self.elastic.borrow_mut().swap_failed(at, now_ms())?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Compiles the kernels of every bit-width the ensemble holds by swapping its smallest
    /// module of that width in and back out, so that no pressure swap waits for shader
    /// compilation (seconds per bit-width on SwiftShader, against milliseconds for the swap).
    async fn warm_kernels(&self, model: &mut F::Model) -> Result<(), S::Error> {
        let m = self.manifest();
        let loaded = model.eqm_bits();
        let mut widths: Vec<u32> = m.modules.iter().map(|v| v.bits).collect();
        widths.sort_unstable();
        widths.dedup();
        for b in widths.into_iter().filter(|b| !loaded.contains(b)) {
            let Some(v) = m
                .modules
                .iter()
                .filter(|v| v.bits == b)
                .min_by_key(|v| v.file.bytes)
            else {
                continue;
            };
            let id = v.id();
            let back = m.version(id, loaded[id.index()]).expect("validated");
            let files = [v.file.clone(), back.file.clone()];
            // A shard that cannot be had only means a later swap compiles this width.
            let bytes = match self.source.files(&files, "upload").await {
                Ok(b) => b,
                Err(e) => {
                    self.emit(Event::Warning(&e));
                    continue;
                }
            };
            let g = m.quantizer.group_size;
            // Warming is best-effort: a width that does not fit now is compiled by the swap
            // that first needs it (`set_module` leaves the model as it was on error).
            if let Err(e) = model
                .set_module(id, v.matrix(&m.config, g, &bytes[0])?)
                .await
            {
                self.emit(Event::Warning(&e.into()));
                break;
            }
            model
                .set_module(id, back.matrix(&m.config, g, &bytes[1])?)
                .await?;
        }
        Ok(())
    }

    /// The first step deeper than `step` whose versions do not include `file` (the deepest
    /// step that can still be loaded when `file` cannot be had), if any.
    fn deeper_without(&self, step: usize, file: &str) -> Option<usize> {
        let m = self.manifest();
        (step + 1..m.trajectory.len())
            .find(|&s| m.step_versions(s).iter().all(|v| v.file.file != file))
    }

    /// The packed module versions of `step` from their files (verified by the source).
    async fn modules(
        &self,
        files: &[FileRef],
        step: usize,
        phase: &'static str,
    ) -> Result<Vec<PackedMatrix>, S::Error> {
        let m = self.manifest();
        let g = m.quantizer.group_size;
        let versions = m.step_versions(step);
        let mut out: Vec<Option<PackedMatrix>> = (0..files.len()).map(|_| None).collect();
        // Each file is parsed as it arrives and its bytes freed, so the peak is the model and
        // the files in flight, not the model and every file (wasm memory never shrinks: its
        // high-water mark is what a page pays).
        self.source
            .each_file(files, phase, &mut |i, b| {
                out[i] = Some(versions[i].matrix(&m.config, g, &b)?);
                Ok(())
            })
            .await?;
        out.into_iter()
            .zip(files)
            .map(|(pm, f)| {
                pm.ok_or_else(|| {
                    crate::Error::Format {
                        what: f.file.clone(),
                        reason: "the source never handed this file's bytes over".into(),
                    }
                    .into()
                })
            })
            .collect()
    }

    /// The shards of the steps below `step` down to `PREFETCH_TO` of its footprint: what the
    /// host fetches into its cache in the background (nothing where the source is local).
    pub fn prefetch_files(&self, step: usize) -> Vec<FileRef> {
        let m = self.manifest();
        let last = m.trajectory.len() - 1;
        if step >= last || !self.source.prefetches() {
            return Vec::new();
        }
        let floor = m.trajectory[step].footprint_bytes as f64 * PREFETCH_TO;
        let mut to = step + 1;
        while to < last && m.trajectory[to + 1].footprint_bytes as f64 >= floor {
            to += 1;
        }
        m.moves(step, to)
            .iter()
            .map(|mv| mv.to.file.clone())
            .collect()
    }

    /// Executes a swap decision: all shards first (a network or hash error changes nothing),
    /// then one module per trajectory step (an out-of-memory error stops at the last step
    /// reached, which is a valid EQM). Anything but a step down or up is ignored.
    pub async fn execute(
        &self,
        run: &mut Running<F::Model>,
        d: Decision,
        token_index: Option<usize>,
    ) -> Result<(), S::Error> {
        let (from, to) = match d {
            Decision::StepDown { from, to, .. } | Decision::StepUp { from, to, .. } => (from, to),
            _ => return Ok(()),
        };
        if from != run.step || from == to {
            return Ok(());
        }
        let now = now_ms();
        if matches!(self.fetch_failure.get(), Some((t, at)) if t == to && now - at < FETCH_RETRY_MS)
        {
            return Ok(());
        }
        let m = self.manifest();
        // Where no swap can fail, a module moved several times in the jump is decoded and set
        // once, straight to its last version (`once_per_module`): the steps in between are
        // never left at, so they need not be EQMs. A file that does not verify goes back to
        // every move (below), so the model stops at a step.
        let mut once = run.session.model.swaps_cannot_fail();
        let mut moves = match once {
            true => once_per_module(m.moves(from, to)),
            false => m.moves(from, to),
        };
        let t0 = now_ms();
        // A file that fails verification: the moves before it still go ahead (their files
        // verified), so the model gets as close to `to` as it can; the error is a warning then.
        // A nested module's bit-plane file serves each of its levels: a jump that moves a
        // module several times reads and verifies its file once (`slot`: each move's file in
        // `files`), and the bytes are copied out of it per move, taken at its last.
        let (slot, mut held) = loop {
            let (files, slot) = distinct_files(&moves);
            match self.source.hold(&files, "swap").await {
                Ok(b) => break (slot, b.into_iter().map(Some).collect::<Vec<_>>()),
                Err(e) => {
                    let unverified = S::unverified_file(&e);
                    if once && unverified.is_some() {
                        // Every move again, so that the ones before the file can go ahead.
                        once = false;
                        moves = m.moves(from, to);
                        continue;
                    }
                    self.fetch_failure.set(Some((to, now_ms())));
                    let bad =
                        unverified.and_then(|f| moves.iter().position(|mv| mv.to.file.file == f));
                    match bad {
                        Some(i) if i > 0 => {
                            self.emit(Event::Warning(&e));
                            moves.truncate(i);
                        }
                        _ => return Err(e),
                    }
                }
            }
        };
        let g = m.quantizer.group_size;
        let mut done = Vec::new();
        let mut failure: Option<S::Error> = None;
        for (i, mv) in moves.iter().enumerate() {
            let last = !slot[i + 1..].contains(&slot[i]);
            let b = match (last, &held[slot[i]]) {
                (true, _) => held[slot[i]].take().map(|h| h.take()),
                (false, h) => h.as_ref().map(|h| h.copy()),
            }
            .unwrap_or_default();
            let r = match mv.to.matrix(&m.config, g, &b) {
                Ok(pm) => run.session.model.set_module(mv.id, pm).await,
                Err(e) => Err(e.into()),
            };
            match r {
                Ok(()) => {
                    run.step = mv.step_after;
                    done.push(Moved {
                        module: mv.id,
                        from_bits: mv.from_bits,
                        to_bits: mv.to.bits,
                    });
                }
                Err(e) if once && !done.is_empty() => {
                    // A swap the model said cannot fail did (a bug): the modules moved so far
                    // make no trajectory step, so the model is loaded again where it was.
                    let fresh = self.load_at(Some(from)).await?;
                    run.session.replace_model(fresh.session.model).await?;
                    run.step = fresh.step;
                    return Err(e.into());
                }
                Err(e) => {
                    if F::Model::is_out_of_memory(&e) {
                        self.elastic.borrow_mut().swap_failed(to, now_ms())?;
                    }
                    failure = Some(e.into());
                    break;
                }
            }
        }
        if !done.is_empty() {
            self.elastic.borrow_mut().swapped(run.step, now_ms())?;
            self.emit(Event::Swap {
                from,
                to: run.step,
                modules: done,
                ms: now_ms() - t0,
                reason: d.reason(),
                footprint_bytes: m.trajectory[run.step].footprint_bytes,
                token_index,
                bits: run.session.model.eqm_bits(),
            });
        }
        failure.map_or(Ok(()), Err)
    }

    /// After a device loss: a new device, a lower step (the controller's `DeviceLost`
    /// decision), the modules from the source, and the conversation run into the new KV
    /// cache.
    pub async fn recover(&self, run: &mut Running<F::Model>) -> Result<(), S::Error> {
        let t0 = now_ms();
        let from = run.step;
        self.elastic.borrow_mut().device_lost(now_ms());
        self.emit(Event::DeviceLost { step: from });
        let fresh = self.load().await?;
        let n = run.session.replace_model(fresh.session.model).await?;
        run.step = fresh.step;
        self.emit(Event::Recovered {
            from,
            to: run.step,
            ms: now_ms() - t0,
            reprefilled_tokens: n,
            bits: run.session.model.eqm_bits(),
        });
        Ok(())
    }

    /// Times the token that just finished at `step` (`token_index`: tokens of the running
    /// answer before it; `None` outside an answer restarts the clock) and feeds the decode
    /// speed to the controller. Hosts that decide themselves call it between tokens.
    pub fn clock_token(&self, step: usize, token_index: Option<usize>) {
        let now = now_ms();
        match token_index {
            Some(i) => {
                if let Some(r) = self.meter.borrow_mut().token(step, i, now) {
                    self.elastic.borrow_mut().speed(r, now);
                }
            }
            None => self.meter.borrow_mut().restart(),
        }
    }

    /// Tells the controller what the model holds besides its step's weights (the KV cache
    /// grows with the conversation and is freed with it, so a long answer can make a step
    /// down needed and a new conversation a step up possible).
    pub fn note_overheads(&self, run: &Running<F::Model>) {
        let weights = self.manifest().trajectory[run.step].footprint_bytes;
        let held = run.session.model.held_bytes();
        self.elastic
            .borrow_mut()
            .set_overheads(held.saturating_sub(weights));
    }

    /// After an out-of-memory error from the model outside a swap (its KV cache could not
    /// grow): the controller learns of it and its decision is executed. Returns whether the
    /// model stepped down, in which case the caller runs the failed call again (the model and
    /// its cache are as before the call); repeated, this ends at the last step.
    pub async fn after_out_of_memory(&self, run: &mut Running<F::Model>) -> Result<bool, S::Error> {
        self.elastic.borrow_mut().oom(now_ms());
        self.note_overheads(run);
        let before = run.step;
        let d = self.elastic.borrow_mut().decide(now_ms());
        let (d, converted) = self.kv_first(run, d, None).await?;
        self.execute(run, d, None).await?;
        Ok(run.step > before || converted)
    }

    /// Asks the controller and executes its decision (the host calls this between tokens:
    /// `token_index` is the number of tokens of the running answer so far, `None` outside an
    /// answer). The time since the previous call is a token's: it feeds the speed signal.
    pub async fn between_tokens(
        &self,
        run: &mut Running<F::Model>,
        token_index: Option<usize>,
    ) -> Result<Decision, S::Error> {
        self.clock_token(run.step, token_index);
        self.note_overheads(run);
        let d = self.elastic.borrow_mut().decide(now_ms());
        let (d, _) = self.kv_first(run, d, token_index).await?;
        self.execute(run, d, token_index).await?;
        Ok(d)
    }
}

/// A jump's moves with each module moved once, at its last move's place, from its bits
/// before the jump straight to its last version in it.
fn once_per_module(
    moves: Vec<crate::ensemble::manifest::Move>,
) -> Vec<crate::ensemble::manifest::Move> {
    let mut before = std::collections::HashMap::new();
    let mut last = std::collections::HashMap::new();
    for (i, mv) in moves.iter().enumerate() {
        before.entry(mv.id).or_insert(mv.from_bits);
        last.insert(mv.id, i);
    }
    moves
        .into_iter()
        .enumerate()
        .filter(|(i, mv)| last[&mv.id] == *i)
        .map(|(_, mut mv)| {
            mv.from_bits = before[&mv.id];
            mv
        })
        .collect()
}

/// The distinct files of `moves` in first-use order, and each move's index among them.
fn distinct_files(moves: &[crate::ensemble::manifest::Move]) -> (Vec<FileRef>, Vec<usize>) {
    let mut files: Vec<FileRef> = Vec::new();
    let slot = moves
        .iter()
        .map(|mv| {
            files
                .iter()
                .position(|f| f.file == mv.to.file.file)
                .unwrap_or_else(|| {
                    files.push(mv.to.file.clone());
                    files.len() - 1
                })
        })
        .collect();
    (files, slot)
}
