//! `flexquant fuzz`: runs every fuzz target (`flexquant::fuzz`) over mutations of real files,
//! each input under `catch_unwind` and a clock. A panic saves the input under `--crashes`; an
//! input slower than `--max-ms` is saved and fails the run; one stuck past `--hang-s` is saved
//! and ends the process. Same `--seed`, same inputs.

use anyhow::{bail, Result};
use clap::Args;
use flexquant::fuzz::mutate::{Mutator, Rng};
use flexquant::fuzz::seeds::{self, SeedFiles};
use flexquant::fuzz::targets::{self, Target};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct FuzzArgs {
    /// A built ensemble directory (seeds: manifest, shards, base, tokenizer).
    #[arg(long)]
    ensemble: PathBuf,
    /// The demo GGUF (seeds: its metadata and a few tensors, shrunk).
    #[arg(long)]
    gguf: PathBuf,
    /// The tiny Hugging Face model directory (`flexquant tiny-model`).
    #[arg(long)]
    tiny_model: PathBuf,
    /// Chat request JSON files.
    #[arg(long, default_value = "tests/fuzz/requests")]
    requests: PathBuf,
    /// Inputs per target.
    #[arg(long, default_value_t = 1_000_000)]
    inputs: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Only these targets (comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// An input slower than this (ms) fails the run.
    #[arg(long, default_value_t = 1000.0)]
    max_ms: f64,
    /// An input running longer than this (s) is a hang: saved, and the process exits.
    #[arg(long, default_value_t = 60)]
    hang_s: u64,
    /// Targets fuzzed at once.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Where panicking and slow inputs are saved.
    #[arg(long, default_value = "target/fuzz-crashes")]
    crashes: PathBuf,
    /// The JSON report (fuzz_inputs, fuzz_panics, fuzz_slowest_ms, ...).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run these saved inputs (e.g. from --crashes) through the one target named by --targets
    /// and print each result, instead of fuzzing.
    #[arg(long, num_args = 1..)]
    replay: Vec<PathBuf>,
}

/// Mutants that parse join the corpus (a stand-in for coverage feedback: valid inputs reach
/// deepest), up to this many besides the seeds.
const CORPUS_EXTRA: usize = 64;

#[derive(Default)]
struct Report {
    inputs: u64,
    accepted: u64,
    panics: u64,
    slow: u64,
    /// Errors whose message names none of the target's files or fields.
    unnamed: u64,
    slowest_ms: f64,
    secs: f64,
}

/// What a target is running now, for the hang watchdog.
type Current = Mutex<Option<(Arc<Vec<u8>>, u64, Instant)>>;

thread_local! {
    static PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

pub fn run(a: FuzzArgs) -> Result<()> {
    let files = SeedFiles {
        ensemble: a.ensemble.clone(),
        gguf: a.gguf.clone(),
        tiny_model: a.tiny_model.clone(),
        requests: a.requests.clone(),
    };
    let seeds = seeds::load(&files)?;
    let tok = flexquant::model::load::load_hf_dir(&a.tiny_model)?.tokenizer;
    let all: Vec<Target> = targets::all(tok)
        .into_iter()
        .filter(|t| a.targets.is_empty() || a.targets.iter().any(|n| n == t.name))
        .collect();
    if let Some(n) = a.targets.iter().find(|n| !all.iter().any(|t| t.name == *n)) {
        bail!("unknown fuzz target '{n}'");
    }
    if !a.replay.is_empty() {
        let [t] = &all[..] else {
            bail!("--replay needs exactly one target in --targets");
        };
        for p in &a.replay {
            let input = std::fs::read(p)?;
            let t0 = Instant::now();
            let r = (t.run)(&input);
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            println!(
                "{}: {ms:.1} ms: {:?}",
                p.display(),
                r.map_err(|e| e.to_string())
            );
        }
        return Ok(());
    }
    std::fs::create_dir_all(&a.crashes)?;
    // Panics are recorded, not printed: the input and message go to --crashes.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        let msg = format!("{info}");
        PANIC.with(|p| *p.borrow_mut() = Some(msg));
    }));
    let current: Vec<Current> = all.iter().map(|_| Mutex::new(None)).collect();
    let done = std::sync::atomic::AtomicBool::new(false);
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{prefix:>12} [{bar:30}] {pos}/{len} {per_sec} {msg} ({elapsed}, eta {eta})",
    )?
    .progress_chars("=> ");
    let next = std::sync::atomic::AtomicUsize::new(0);
    let reports: Vec<Mutex<Report>> = all.iter().map(|_| Mutex::default()).collect();
    std::thread::scope(|s| {
        s.spawn(|| watchdog(&all, &current, &done, &a));
        let workers: Vec<_> = (0..a.jobs.max(1))
            .map(|_| {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some(t) = all.get(i) else { break };
                    let pb = bars.add(ProgressBar::new(a.inputs));
                    pb.set_style(style.clone());
                    pb.set_prefix(t.name);
                    let r = fuzz_target(t, &seeds[t.name], &a, &pb, &current[i]);
                    pb.finish_with_message(format!(
                        "{} panics, {} slow, slowest {:.1} ms",
                        r.panics, r.slow, r.slowest_ms
                    ));
                    *reports[i].lock().unwrap() = r;
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    std::panic::set_hook(hook);
    let reports: Vec<Report> = reports
        .into_iter()
        .map(|r| r.into_inner().unwrap())
        .collect();
    summarize(&all, &reports, &a)
}

fn fuzz_target(
    t: &Target,
    seeds: &[Vec<u8>],
    a: &FuzzArgs,
    pb: &ProgressBar,
    cur: &Current,
) -> Report {
    let max_len = seeds.iter().map(Vec::len).max().unwrap_or(0) * 2 + 4096;
    let h = t
        .name
        .bytes()
        .fold(a.seed, |h, b| h.rotate_left(8) ^ b as u64);
    let mut mutator = Mutator::new(h, max_len);
    let mut pick = Rng::new(h ^ 1);
    let mut corpus: Vec<Vec<u8>> = seeds.to_vec();
    let mut r = Report::default();
    let mut buf = Vec::new();
    let start = Instant::now();
    let mut last_line = start;
    for i in 0..a.inputs {
        match seeds.get(i as usize) {
            Some(s) => buf = s.clone(),
            None => {
                let x = &corpus[pick.below(corpus.len())];
                let y = &corpus[pick.below(corpus.len())];
                mutator.mutate(x, y, t.json, &mut buf);
            }
        }
        let input = Arc::new(std::mem::take(&mut buf));
        *cur.lock().unwrap() = Some((input.clone(), i, Instant::now()));
        let t0 = Instant::now();
        let out = catch_unwind(AssertUnwindSafe(|| (t.run)(&input)));
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        *cur.lock().unwrap() = None;
        r.inputs += 1;
        r.slowest_ms = r.slowest_ms.max(ms);
        match out {
            Ok(Ok(())) => {
                r.accepted += 1;
                if i as usize >= seeds.len() {
                    if corpus.len() < seeds.len() + CORPUS_EXTRA {
                        corpus.push(input.to_vec());
                    } else {
                        let k = seeds.len() + pick.below(CORPUS_EXTRA);
                        corpus[k] = input.to_vec();
                    }
                }
            }
            Ok(Err(e)) => {
                let msg = e.to_string();
                if !t.names.iter().any(|n| msg.contains(n)) {
                    if r.unnamed < 5 {
                        note(
                            pb,
                            format!("{}: input {i}: error names no file: {msg}", t.name),
                        );
                    }
                    r.unnamed += 1;
                }
            }
            Err(_) => {
                let msg = PANIC.with(|p| p.borrow_mut().take()).unwrap_or_default();
                let path = save(&a.crashes, t.name, "panic", i, &input, &msg);
                note(
                    pb,
                    format!("{}: input {i} PANICKED ({}): {msg}", t.name, path.display()),
                );
                r.panics += 1;
            }
        }
        if ms > a.max_ms {
            let path = save(
                &a.crashes,
                t.name,
                "slow",
                i,
                &input,
                &format!("{ms:.0} ms"),
            );
            note(
                pb,
                format!("{}: input {i} took {ms:.0} ms ({})", t.name, path.display()),
            );
            r.slow += 1;
        }
        buf = Arc::try_unwrap(input).unwrap_or_default();
        if i % 256 == 0 {
            pb.set_position(i);
            // Without a terminal the bars are hidden: a line every 10 s instead.
            if pb.is_hidden() && last_line.elapsed() > Duration::from_secs(10) {
                last_line = Instant::now();
                eprintln!(
                    "fuzz {}: {i}/{} inputs, {:.0}/s, {} panics",
                    t.name,
                    a.inputs,
                    i as f64 / start.elapsed().as_secs_f64(),
                    r.panics
                );
            }
        }
    }
    pb.set_position(a.inputs);
    r.secs = start.elapsed().as_secs_f64();
    r
}

/// A line above the progress bars (on stderr when they are hidden: not a terminal).
fn note(pb: &ProgressBar, msg: String) {
    if pb.is_hidden() {
        eprintln!("{msg}");
    } else {
        pb.println(msg);
    }
}

/// Saves a failing input (and why) as `DIR/TARGET-KIND-INDEX.bin` (+ `.txt`).
fn save(dir: &Path, target: &str, kind: &str, i: u64, input: &[u8], why: &str) -> PathBuf {
    let p = dir.join(format!("{target}-{kind}-{i}.bin"));
    let _ = std::fs::write(&p, input);
    let _ = std::fs::write(p.with_extension("txt"), why);
    p
}

/// Ends the process when one input runs past `--hang-s`, its input saved first (a hang
/// cannot be caught like a panic).
fn watchdog(
    all: &[Target],
    current: &[Current],
    done: &std::sync::atomic::AtomicBool,
    a: &FuzzArgs,
) {
    while !done.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
        for (t, c) in all.iter().zip(current) {
            let hung = c.lock().unwrap().as_ref().and_then(|(input, i, t0)| {
                (t0.elapsed() > Duration::from_secs(a.hang_s)).then(|| (input.clone(), *i))
            });
            if let Some((input, i)) = hung {
                let p = save(&a.crashes, t.name, "hang", i, &input, "hang");
                eprintln!(
                    "{}: input {i} HANGS (> {} s): {}",
                    t.name,
                    a.hang_s,
                    p.display()
                );
                std::process::exit(3);
            }
        }
    }
}

fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn summarize(all: &[Target], reports: &[Report], a: &FuzzArgs) -> Result<()> {
    println!(
        "{:<12} {:>9} {:>9} {:>10} {:>11} {:>7} {:>6} {:>8}",
        "target", "inputs", "accepted", "inputs/s", "slowest ms", "panics", "slow", "unnamed"
    );
    let mut json = serde_json::json!({"fuzz_inputs": {}, "fuzz_inputs_per_s": {}, "fuzz_accepted": {},
        "fuzz_slowest_ms_by_target": {}});
    for (t, r) in all.iter().zip(reports) {
        let rate = r.inputs as f64 / r.secs.max(1e-9);
        println!(
            "{:<12} {:>9} {:>8.1}% {:>10.0} {:>11.2} {:>7} {:>6} {:>8}",
            t.name,
            r.inputs,
            100.0 * r.accepted as f64 / r.inputs.max(1) as f64,
            rate,
            r.slowest_ms,
            r.panics,
            r.slow,
            r.unnamed
        );
        json["fuzz_inputs"][t.name] = r.inputs.into();
        json["fuzz_inputs_per_s"][t.name] = rate.round().into();
        json["fuzz_accepted"][t.name] = r.accepted.into();
        json["fuzz_slowest_ms_by_target"][t.name] = r.slowest_ms.into();
    }
    let sum = |f: fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
    let (panics, slow, unnamed) = (sum(|r| r.panics), sum(|r| r.slow), sum(|r| r.unnamed));
    json["fuzz_panics"] = panics.into();
    json["fuzz_slow_inputs"] = slow.into();
    json["fuzz_unnamed_errors"] = unnamed.into();
    json["fuzz_slowest_ms"] = reports
        .iter()
        .map(|r| r.slowest_ms)
        .fold(0.0, f64::max)
        .into();
    json["fuzz_max_ms"] = a.max_ms.into();
    json["fuzz_seed"] = a.seed.into();
    json["fuzz_seconds"] = reports.iter().map(|r| r.secs).sum::<f64>().into();
    json["fuzz_peak_rss_mb"] = peak_rss_mb().into();
    if let Some(out) = &a.out {
        if let Some(d) = out.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(out, serde_json::to_string_pretty(&json)?)?;
        println!("wrote {}", out.display());
    }
    if panics + slow + unnamed > 0 {
        bail!(
            "fuzzing found {panics} panics, {slow} inputs over {} ms and {unnamed} errors naming no file (inputs in {})",
            a.max_ms,
            a.crashes.display()
        );
    }
    Ok(())
}
