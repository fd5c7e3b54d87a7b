//! Everything that decides, free of any browser code so it is tested natively with scripted
//! signals on any backend:
//!
//! - `elastic` (+ `policy`, `decision`): memory signals -> a target step of the EQM trajectory.
//! - `walk`: executing those decisions over a `ByteSource` (a directory, or fetch + Cache API)
//!   and a `Backend` (the WebGPU engine, the CPU reference): load a step, swap between tokens,
//!   prefetch, rebuild after a device loss.
//! - `backend`: what a backend implements; `reference` (native): the CPU reference as one.
//! - `generate` (sampling, RNG, stop reasons, stats) and `session` (a conversation with prefix
//!   reuse, one token per call): generation on every backend.
//! - `request`: a chat request and its validation (the browser's, run natively too).
//! - `stop_text`: stop sequences over the decoded answer.
//! - `json_mode`: `response_format: json_object`, candidates kept to a JSON object's prefixes;
//!   `json_schema`: the JSON Schema subset it also enforces (`json_number`: bounded numbers;
//!   `json_pattern`: patterns and formats; `json_tagged`: discriminated unions, tool calls).
//! - `inspect`: what an ensemble needs before it is loaded, and which steps a cache holds.
//! - `speed`: decode speed between tokens, the controller's second signal.
//! - `dir` (native): an ensemble directory as a byte source.

pub mod backend;
pub mod clock;
pub mod decision;
#[cfg(not(target_arch = "wasm32"))]
pub mod dir;
pub mod elastic;
pub mod generate;
pub mod inspect;
pub mod json_constraint;
pub mod json_mode;
pub mod json_number;
pub mod json_pattern;
pub mod json_schema;
pub mod json_tagged;
pub mod json_untagged;
pub mod policy;
#[cfg(not(target_arch = "wasm32"))]
pub mod reference;
pub mod request;
pub mod session;
pub mod speed;
pub mod stop_text;
pub mod tools;
pub mod walk;

pub use backend::{Backend, Factory, DEFAULT_CONTEXT};
pub use decision::{Decision, Reason, Stats};
pub use elastic::Elastic;
pub use generate::{GenStats, Sampling, StopReason};
pub use policy::Policy;
pub use session::{Prefill, PrefillPace, Session, TokenLogprob, Turn, TurnOptions};
pub use stop_text::StopText;
pub use walk::{ByteSource, Running, Walk};
