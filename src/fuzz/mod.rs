//! Fuzzing on the stable toolchain: a deterministic structure-aware mutator (`mutate`), the
//! targets, one per reader of untrusted input (`targets`), and seeds from real files (`seeds`).
//! The runner (`flexquant fuzz`, `./build.sh fuzz`) lives in the CLI; the manifest target and
//! the mutator also run in the browser tests (wasm32), where the manifest reader runs for real.

pub mod mutate;
#[cfg(not(target_arch = "wasm32"))]
pub mod seeds;
pub mod targets;
