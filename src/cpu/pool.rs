//! A fork-join pool for the CPU backend's many small parallel regions (natively and with wasm
//! threads).
//!
//! A decode token runs ~240 matrix products of 0.05-0.1 ms each. Handing each to rayon over
//! Web Workers cost more than it saved (2 threads decoded at 0.83x one thread in Chromium):
//! an idle rayon worker sleeps in `Atomics.wait`, and waking it takes about as long as the
//! product (natively rayon's futex wake-ups took ~30% of a one-thread decode's samples). Here
//! the workers spin on one atomic word between regions (parking only after
//! `SPINS` idle polls, so between answers they sleep), the calling thread takes chunks too, and
//! chunks are handed out by an atomic counter, so a region costs a few atomic operations. A
//! worker that wakes late finds the region closed and skips it: the caller never waits for a
//! worker that has not started.
//!
//! Not every worker need take part: [`Pool::set_active`] parks the others (a parked worker
//! takes no CPU), and [`Pool::token`] lets `cpu::width` choose that number per decode token by
//! measurement (more threads were slower when other work shared the cores).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::Arc;

/// Idle polls of the state word before a worker parks (about a millisecond).
const SPINS: u32 = 1 << 18;
/// The state word: the region's epoch in the high 32 bits, then a `CLOSED` bit (no worker may
/// join any more), then the number of workers inside the region.
const CLOSED: u64 = 1 << 31;
const ACTIVE: u64 = CLOSED - 1;
/// A region's workers taking longer than this are taken to have died (a region is a few
/// 64-row chunks of one matrix product: milliseconds at most).
const STUCK_MS: f64 = 30_000.0;

/// One parallel region: `n` chunks, taken one at a time by whoever is free.
struct Region<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
}

impl Region<'_> {
    fn run(&self) {
        loop {
            let i = self.next.fetch_add(1, Relaxed);
            if i >= self.n {
                return;
            }
            (self.f)(i);
        }
    }
}

/// Closes a region and waits for the workers inside it to leave, on return and on unwinding
/// alike (the region lives on the caller's stack).
struct Leave<'a> {
    s: &'a Shared,
    region: &'a Region<'a>,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let s = self.s;
        // After a panic on the caller, chunks not yet taken are not started.
        self.region.next.fetch_max(self.region.n, Relaxed);
        // No worker may join once every chunk is taken; wait for those inside.
        let mut st = s.state.fetch_or(CLOSED, SeqCst) | CLOSED;
        // The clock (a JS call in wasm) is read only once a wait got long, not per region.
        let (mut polls, mut since) = (0u32, None);
        while st & ACTIVE != 0 {
            std::hint::spin_loop();
            st = s.state.load(Acquire);
            polls = polls.wrapping_add(1);
            // A worker that died inside the region (a panic aborts a wasm thread) would leave
            // the caller waiting for good: fail loudly instead (the engine's panic handling
            // makes it an `internal` error). Natively a panic is caught in the worker, so a
            // worker inside is alive, and the region must outlive it: wait.
            if cfg!(target_arch = "wasm32") && polls % (1 << 20) == 0 {
                let now = crate::runtime::clock::now_ms();
                if now - *since.get_or_insert(now) > STUCK_MS {
                    panic!("a CPU thread pool worker did not finish its part of a matrix product within {STUCK_MS} ms (it stopped)");
                }
            }
        }
        s.busy.store(false, Release);
    }
}

struct Shared {
    state: AtomicU64,
    /// The current region (`*const Region`, lifetime erased); valid while its epoch is the
    /// state's and the state counts a worker in it, or before `CLOSED`.
    region: AtomicUsize,
    sleeping: Vec<AtomicBool>,
    threads: std::sync::Mutex<Vec<Option<std::thread::Thread>>>,
    stop: AtomicBool,
    /// Workers that may join regions (those from index `active` on park).
    active: AtomicUsize,
    /// A region is running (a second caller runs its region alone).
    busy: AtomicBool,
    /// The first panic of a worker inside the current region, for the caller to raise.
    panic: std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

/// The pool: `workers` threads beside the caller.
pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    /// How many threads decode tokens use, when measured (`None`: all, always).
    width: std::sync::Mutex<Option<crate::cpu::width::Width>>,
}

impl Pool {
    /// A pool of `workers` threads, each started by `spawn` running the closure it is given
    /// (std threads natively, rayon's Web Workers in wasm; one never started is never waited
    /// for).
    pub fn new(workers: usize, spawn: impl Fn(Box<dyn FnOnce() + Send>)) -> Pool {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            region: AtomicUsize::new(0),
            sleeping: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            threads: std::sync::Mutex::new(vec![None; workers]),
            stop: AtomicBool::new(false),
            active: AtomicUsize::new(workers),
            busy: AtomicBool::new(false),
            panic: std::sync::Mutex::new(None),
        });
        for w in 0..workers {
            let s = shared.clone();
            spawn(Box::new(move || s.work(w)));
        }
        Pool {
            shared,
            workers,
            width: std::sync::Mutex::new(Some(crate::cpu::width::Width::new(workers + 1))),
        }
    }

    /// Threads computing a region at most: the workers and the caller.
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Threads computing regions now (the caller and the active workers).
    pub fn active_threads(&self) -> usize {
        self.shared.active.load(Relaxed) + 1
    }

    /// Lets `threads - 1` workers (at least none, at most all) join regions from the next one;
    /// the others park.
    pub fn set_active(&self, threads: usize) {
        let k = threads.clamp(1, self.workers + 1) - 1;
        // SeqCst with the workers' sleeping flags, as a region's start (see `run`).
        self.shared.active.store(k, SeqCst);
    }

    /// Whether decode tokens choose their thread count by measurement (`cpu::width`; on by
    /// default), or use every thread.
    pub fn set_adaptive(&self, on: bool) {
        let mut w = self.width.lock().unwrap_or_else(|e| e.into_inner());
        match (on, w.is_some()) {
            (true, false) => *w = Some(crate::cpu::width::Width::new(self.workers + 1)),
            (false, _) => {
                *w = None;
                self.set_active(self.workers + 1);
            }
            _ => {}
        }
    }

    /// Runs a prefill `step` on the thread count the decode tokens chose last (all before any
    /// decode token, and when not adaptive): what slows the decode down slows it too.
    pub fn prefill<R>(&self, step: impl FnOnce() -> R) -> R {
        let chosen = match self.width.try_lock() {
            Ok(w) => w.as_ref().map(|w| w.chosen()),
            Err(std::sync::TryLockError::Poisoned(e)) => {
                e.into_inner().as_ref().map(|w| w.chosen())
            }
            // Another caller's token is running: leave its count alone.
            Err(std::sync::TryLockError::WouldBlock) => return step(),
        };
        self.set_active(chosen.unwrap_or(self.workers + 1));
        step()
    }

    /// Runs one decode token's `step` on the thread count `cpu::width` chooses, and tells it
    /// how long the token took.
    /// Another caller's token meanwhile runs as it is (its regions alone, see `run`).
    pub fn token<R>(&self, step: impl FnOnce() -> R) -> R {
        let mut w = match self.width.try_lock() {
            Ok(w) => w,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return step(),
        };
        let Some(w) = w.as_mut() else {
            return step();
        };
        self.set_active(w.threads());
        let t0 = crate::runtime::clock::now_ms();
        let r = step();
        w.record(crate::runtime::clock::now_ms() - t0);
        r
    }

    /// Calls `f(i)` for every `i < n`, on the workers and the calling thread; returns when all
    /// calls returned. A region started while another runs (another caller, or `f` itself
    /// starting one) runs on its caller alone. A panic in `f` on any thread reaches the caller
    /// once no worker is inside the region any more.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let s = &self.shared;
        let region = Region {
            f,
            n,
            next: AtomicUsize::new(0),
        };
        if self.workers == 0 || n <= 1 || s.busy.swap(true, Acquire) {
            region.run();
            return;
        }
        s.region.store(&region as *const Region as usize, Relaxed);
        let epoch = (s.state.load(Relaxed) >> 32) + 1;
        // Whatever happens below, the region is closed and its workers are out before it goes.
        let leave = Leave { s, region: &region };
        // SeqCst with the sleepers' flag (Dekker): a worker that saw no new region before it
        // set its flag is seen here as sleeping, and unparked.
        s.state.store((epoch & 0xffff_ffff) << 32, SeqCst);
        self.wake();
        region.run();
        drop(leave);
        if let Some(p) = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
            std::panic::resume_unwind(p);
        }
    }

    /// Unparks the active workers that sleep.
    fn wake(&self) {
        let s = &self.shared;
        let active = &s.sleeping[..s.active.load(SeqCst)];
        if active.iter().any(|f| f.load(SeqCst)) {
            let threads = s.threads.lock().unwrap_or_else(|e| e.into_inner());
            for (t, f) in threads.iter().zip(active) {
                if let (Some(t), true) = (t, f.load(SeqCst)) {
                    t.unpark();
                }
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        self.shared.state.fetch_add(1 << 32, SeqCst);
        let threads = self
            .shared
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        threads.iter().flatten().for_each(|t| t.unpark());
    }
}

impl Shared {
    /// A worker's loop: wait for a region with a new epoch, join it unless closed, take chunks.
    fn work(&self, w: usize) {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())[w] = Some(std::thread::current());
        let mut seen = self.state.load(SeqCst) >> 32;
        let mut idle = 0u32;
        while !self.stop.load(Relaxed) {
            if w >= self.active.load(Relaxed) {
                // Left out: park until a region starts while this worker is active again.
                self.sleeping[w].store(true, SeqCst);
                if w >= self.active.load(SeqCst) && !self.stop.load(SeqCst) {
                    std::thread::park();
                }
                self.sleeping[w].store(false, SeqCst);
                idle = 0;
                continue;
            }
            let st = self.state.load(Acquire);
            if st >> 32 == seen {
                idle += 1;
                if idle < SPINS {
                    std::hint::spin_loop();
                } else {
                    self.sleeping[w].store(true, SeqCst);
                    if self.state.load(SeqCst) >> 32 == seen && !self.stop.load(SeqCst) {
                        std::thread::park();
                    }
                    self.sleeping[w].store(false, SeqCst);
                    idle = 0;
                }
                continue;
            }
            seen = st >> 32;
            idle = 0;
            if st & CLOSED == 0
                && self
                    .state
                    .compare_exchange(st, st + 1, Acquire, Relaxed)
                    .is_ok()
            {
                // Joined before the region closed: it stays alive until this worker leaves.
                let region = unsafe { &*(self.region.load(Relaxed) as *const Region) };
                // A panic in `f` is the caller's to raise (natively; in wasm it aborts).
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| region.run()));
                if let Err(p) = r {
                    region.next.fetch_max(region.n, Relaxed);
                    self.panic
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(p);
                }
                self.state.fetch_sub(1, Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn std_pool(workers: usize) -> Pool {
        Pool::new(workers, |f| {
            std::thread::spawn(f);
        })
    }

    #[test]
    fn every_chunk_runs_once_whatever_the_workers() {
        for workers in [0, 1, 3] {
            let pool = std_pool(workers);
            for n in [0, 1, 7, 1000] {
                for _ in 0..200 {
                    let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    pool.run(n, &|i| {
                        hits[i].fetch_add(1, Relaxed);
                    });
                    assert!(
                        hits.iter().all(|h| h.load(Relaxed) == 1),
                        "{workers} workers, {n} chunks"
                    );
                }
            }
            assert_eq!(pool.threads(), workers + 1);
        }
    }

    #[test]
    fn workers_that_parked_wake_for_the_next_region() {
        let pool = std_pool(2);
        let ran = AtomicUsize::new(0);
        pool.run(4, &|_| {
            ran.fetch_add(1, Relaxed);
        });
        // Long enough for the workers to exhaust their spins and park.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let on: std::sync::Mutex<std::collections::HashSet<std::thread::ThreadId>> =
            Default::default();
        pool.run(64, &|_| {
            on.lock().unwrap().insert(std::thread::current().id());
            std::thread::sleep(std::time::Duration::from_millis(2));
            ran.fetch_add(1, Relaxed);
        });
        assert_eq!(ran.load(Relaxed), 68);
        assert!(
            on.lock().unwrap().len() >= 2,
            "the parked workers did not join"
        );
    }

    fn threads_in(pool: &Pool, n: usize) -> usize {
        let on: std::sync::Mutex<std::collections::HashSet<std::thread::ThreadId>> =
            Default::default();
        pool.run(n, &|_| {
            on.lock().unwrap().insert(std::thread::current().id());
            std::thread::sleep(std::time::Duration::from_millis(1));
        });
        let n = on.lock().unwrap().len();
        n
    }

    #[test]
    fn workers_left_out_park_and_come_back() {
        let pool = std_pool(3);
        pool.set_active(1);
        assert_eq!(pool.active_threads(), 1);
        for _ in 0..3 {
            assert_eq!(threads_in(&pool, 32), 1, "a left-out worker joined");
        }
        pool.set_active(2);
        let n = threads_in(&pool, 32);
        assert!((1..=2).contains(&n), "{n} threads with one worker active");
        pool.set_active(4);
        assert_eq!(pool.active_threads(), 4);
        assert!(
            threads_in(&pool, 64) >= 2,
            "the active workers did not join"
        );
        pool.set_active(99);
        assert_eq!(pool.active_threads(), 4);
    }

    #[test]
    fn tokens_run_on_the_chosen_threads_and_are_measured() {
        let pool = std_pool(1);
        // Tokens that are slower on 2 threads (as when another process keeps a core busy):
        // the pool moves to one thread after its first probe.
        for _ in 0..8 {
            pool.token(|| {
                let ms = if pool.active_threads() == 2 { 6 } else { 2 };
                std::thread::sleep(std::time::Duration::from_millis(ms));
            });
        }
        assert_eq!(pool.active_threads(), 1);
        assert_eq!(threads_in(&pool, 16), 1);
        // Prefill runs on the decode's choice.
        pool.set_active(2);
        assert_eq!(pool.prefill(|| pool.active_threads()), 1);
        // Pinned: every thread.
        pool.set_adaptive(false);
        assert_eq!(pool.active_threads(), 2);
        assert_eq!(pool.token(|| 7), 7);
        assert_eq!(pool.active_threads(), 2);
        pool.set_active(1);
        assert_eq!(pool.prefill(|| pool.active_threads()), 2);
    }

    #[test]
    fn a_panic_on_any_thread_reaches_the_caller_after_the_workers_left() {
        let pool = std_pool(2);
        for on_worker in [false, true] {
            let caller = std::thread::current().id();
            let started = AtomicUsize::new(0);
            let worker_ran = AtomicBool::new(false);
            let panicked = AtomicBool::new(false);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.run(64, &|i| {
                    started.fetch_add(1, Relaxed);
                    std::thread::sleep(std::time::Duration::from_micros(200));
                    let here = std::thread::current().id() == caller;
                    // For a worker's panic, the caller waits until a worker has joined.
                    let t0 = std::time::Instant::now();
                    worker_ran.fetch_or(!here, Relaxed);
                    while on_worker && here && !worker_ran.load(Relaxed) {
                        assert!(t0.elapsed().as_secs() < 20, "no worker joined");
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    if i >= 8 && here != on_worker {
                        panicked.store(true, Relaxed);
                        panic!("chunk {i}");
                    }
                    // The other thread waits for the panic past chunk 8 (on a loaded machine
                    // the panicking thread could otherwise be descheduled while this one ran
                    // every chunk: CI saw that), then gives the unwinding time to close the
                    // region.
                    if i >= 8 {
                        while !panicked.load(Relaxed) {
                            assert!(t0.elapsed().as_secs() < 20, "no panic came");
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                })
            }));
            // Raised, whichever thread it was on, and the pool still works.
            let msg = r.expect_err("no panic reached the caller");
            assert!(msg
                .downcast_ref::<String>()
                .is_some_and(|m| m.starts_with("chunk")));
            assert!(started.load(Relaxed) < 64, "chunks went on after the panic");
            let hits = AtomicUsize::new(0);
            pool.run(100, &|_| {
                hits.fetch_add(1, Relaxed);
            });
            assert_eq!(hits.load(Relaxed), 100);
        }
    }

    #[test]
    fn nested_and_concurrent_regions_run_on_their_caller() {
        let pool = Arc::new(std_pool(2));
        // A region started inside a region's chunk runs on that chunk's thread.
        let inner = AtomicUsize::new(0);
        pool.run(8, &|_| {
            let me = std::thread::current().id();
            pool.run(4, &|_| {
                assert_eq!(std::thread::current().id(), me);
                inner.fetch_add(1, Relaxed);
            });
        });
        assert_eq!(inner.load(Relaxed), 32);
        // Callers on several threads at once: every chunk of each runs once.
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    for n in [1, 5, 300] {
                        for _ in 0..50 {
                            let hits: Vec<AtomicUsize> =
                                (0..n).map(|_| AtomicUsize::new(0)).collect();
                            pool.run(n, &|i| {
                                hits[i].fetch_add(1, Relaxed);
                            });
                            assert!(hits.iter().all(|h| h.load(Relaxed) == 1));
                        }
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap();
        }
    }
}
