//! Typed errors of the GPU engine. A caller (the elastic runtime, the browser glue) must be able
//! to tell "step down to a smaller EQM" (`OutOfMemory`) from "this adapter cannot run the model"
//! (`NoAdapter`, `Limit`) from a bug or bad input.

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no wgpu adapter found ({0})")]
    NoAdapter(String),
    /// The adapter's limit is below what the model needs; `limit` is the WebGPU limit's name.
    #[error("the adapter's {limit} is {available}, the model needs {needed}")]
    Limit {
        limit: &'static str,
        needed: u64,
        available: u64,
    },
    #[error("requesting the device failed: {0}")]
    Device(String),
    /// An allocation was refused, by the device (out-of-memory error scope) or by the
    /// allocator's budget. Nothing was changed.
    #[error("out of memory allocating {requested} bytes for {what} ({in_use} bytes in use{})",
        budget.map(|b| format!(", budget {b}")).unwrap_or_default())]
    OutOfMemory {
        what: String,
        requested: u64,
        in_use: u64,
        budget: Option<u64>,
    },
    /// A module version does not fit its slot (shape, bytes or bit-width).
    #[error("module {module}: {reason}")]
    Module { module: String, reason: String },
    #[error("{0}")]
    Input(String),
    /// A validation or internal error reported by the device: a bug in the engine.
    #[error("GPU error: {0}")]
    Internal(String),
}

pub type GpuResult<T> = std::result::Result<T, GpuError>;

impl From<crate::Error> for GpuError {
    fn from(e: crate::Error) -> Self {
        GpuError::Input(e.to_string())
    }
}
