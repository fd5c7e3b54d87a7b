//! One error type for everything a user can feed in: each variant names *what* (file, field,
//! tensor, argument) and *why*, so a message is actionable without a backtrace.

use std::fmt;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file (or byte source named like one) is malformed: `what` names the file and, where it
    /// helps, the field or offset inside it.
    #[error("{what}: {reason}")]
    Format { what: String, reason: String },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A request that cannot be served as asked (empty prompt, prompt longer than the context, ...).
    #[error("{0}")]
    Input(String),
    /// A request field this engine knows but does not implement (or does not know at all),
    /// named, rather than silently doing something else.
    #[error("{0}")]
    Unsupported(String),
    /// A conversation that does not fit the KV cache (the prompt alone fills it).
    #[error(
        "the prompt has {tokens} tokens; the context holds {context} (leave room for the answer)"
    )]
    ContextLength { tokens: usize, context: usize },
    /// The model produced no finite logit for the next token (every candidate NaN or
    /// infinite): the weights or the precision step overflowed. The turn ends; the engine and
    /// the conversation stay usable.
    #[error("the model produced no finite logit after {tokens} tokens (all NaN or infinite): cannot sample the next token")]
    NonFiniteLogits { tokens: usize },
    /// An allocation refused: over the app's budget, or the allocator had no memory.
    #[error("out of memory: {what} needs {requested} bytes{}", budget.map(|b| format!(" (budget {b} bytes)")).unwrap_or_default())]
    OutOfMemory {
        what: String,
        requested: u64,
        budget: Option<u64>,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn format(what: impl fmt::Display, reason: impl fmt::Display) -> Self {
        Error::Format {
            what: what.to_string(),
            reason: reason.to_string(),
        }
    }

    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    pub fn input(msg: impl fmt::Display) -> Self {
        Error::Input(msg.to_string())
    }
}

/// Reads a whole file, refusing anything larger than `cap` bytes before allocating for it.
pub fn read_capped(path: &std::path::Path, cap: u64) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.len() > cap {
        return Err(Error::format(
            path.display(),
            format!(
                "file is {} bytes, more than the {} byte limit",
                meta.len(),
                cap
            ),
        ));
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}
