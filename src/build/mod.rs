//! The native ensemble builder: sensitivity analysis, tree search, pruning, packaging, reports.

pub mod domains;
pub mod evaluator;
pub mod package;
pub mod pipeline;
pub mod prune;
pub mod report;
pub mod search;
