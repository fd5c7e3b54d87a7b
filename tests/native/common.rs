//! Shared test fixtures: where the installed demo model and text live, and the tiny model.

use std::path::PathBuf;

pub fn cache_dir() -> PathBuf {
    std::env::var_os("FLEXQUANT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache"))
}

/// A file installed by `./build.sh setup`. Missing: a failure when FLEXQUANT_REQUIRE_DATA=1
/// (as `./build.sh test` and CI set it), else a printed skip.
pub fn data_file(rel: &str) -> Option<PathBuf> {
    let p = cache_dir().join(rel);
    if p.exists() {
        return Some(p);
    }
    if std::env::var("FLEXQUANT_REQUIRE_DATA").as_deref() == Ok("1") {
        panic!("{} is missing: run ./build.sh setup", p.display());
    }
    eprintln!("SKIP: {} missing (run ./build.sh setup)", p.display());
    None
}

/// Whether python3 can import `module` (installed by `./build.sh setup`). Missing: a failure
/// when FLEXQUANT_REQUIRE_DATA=1, else a printed skip.
pub fn python_has(module: &str) -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("FLEXQUANT_REQUIRE_DATA").as_deref() == Ok("1") {
            panic!("python3 cannot import {module}: run ./build.sh setup");
        }
        eprintln!("SKIP: python3 cannot import {module} (run ./build.sh setup)");
    }
    ok
}

pub fn demo_model_path() -> Option<PathBuf> {
    data_file("model/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn heldout_text() -> Option<String> {
    data_file("text/austen-heldout.txt").map(|p| std::fs::read_to_string(p).unwrap())
}

pub fn tiny_model_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    flexquant::model::tiny::write_tiny_model(d.path(), 7).unwrap();
    d
}

/// The tiny model (seed 11) and its modules in RTN at mixed bit-widths (groups of 32): what
/// the KV cache tests of both backends run.
pub fn tiny_mixed() -> (
    flexquant::model::load::LoadedModel,
    Vec<flexquant::ensemble::format::PackedMatrix>,
) {
    use flexquant::ensemble::format::BITS;
    let dir = tempfile::tempdir().unwrap();
    flexquant::model::tiny::write_tiny_model(dir.path(), 11).unwrap();
    let m = flexquant::model::load::load(dir.path()).unwrap();
    let modules =
        flexquant::quant::weights::rtn_modules(&m.weights, |id| BITS[id.index() % BITS.len()], 32)
            .unwrap();
    (m, modules)
}

/// `n` token ids of the tiny model's vocabulary, spread over it (the KV cache tests' input).
pub fn tiny_tokens(n: usize) -> Vec<u32> {
    (0..n).map(|i| (i * 37 % 250) as u32 + 3).collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The demo model (SmolLM2-135M) and the first 20 000 characters of held-out text, tokenized;
/// loaded once per test process.
pub fn demo() -> Option<&'static (flexquant::model::load::LoadedModel, Vec<u32>)> {
    use std::sync::OnceLock;
    static DEMO: OnceLock<Option<(flexquant::model::load::LoadedModel, Vec<u32>)>> =
        OnceLock::new();
    DEMO.get_or_init(|| {
        let path = demo_model_path()?;
        let text = heldout_text()?;
        let m = flexquant::model::load::load(&path).unwrap();
        let ids = m.tokenizer.encode(&text[..20_000]).unwrap();
        Some((m, ids))
    })
    .as_ref()
}

/// Runs `tests/reference/SCRIPT` with `input` as JSON on stdin and reads its JSON stdout (the
/// independent Python references: jinja2 templates, jsonschema validation).
pub fn python_json<T: serde::Serialize + ?Sized, R: serde::de::DeserializeOwned>(
    script: &str,
    input: &T,
) -> R {
    use std::io::Write;
    let path = format!("{}/tests/reference/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut child = std::process::Command::new("python3")
        .arg(&path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 must be installed (./build.sh setup installs the references' packages)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(input).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{script} failed: {}", out.status);
    serde_json::from_slice(&out.stdout).unwrap()
}
