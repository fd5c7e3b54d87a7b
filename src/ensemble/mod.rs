//! The ensemble on disk and over the network: the only thing builder and runtime share (the
//! manifest, the packed module format, the base shard). Imports nothing from `quant` or
//! `build`.

pub mod base;
pub mod files;
pub mod format;
pub mod manifest;
pub mod pack;
pub mod plane_level;
pub mod planes;

pub use manifest::{FileRef, Manifest, ModuleVersion, Quantizer, Step, Swap};
