//! The ensemble on disk and over the network: the only thing builder and runtime share.

pub mod base;
pub mod manifest;

pub use manifest::{FileRef, Manifest, ModuleVersion, Quantizer, Step, Swap};
