//! Run-time decisions, free of any browser or GPU code so they are tested natively with
//! scripted signals: `elastic` turns memory signals into a target step of the EQM trajectory
//! (see its module doc for the policy); `gpu/` executes the swaps and `web/` adapts the
//! browser's signals (`performance.memory`, WebGPU error scopes, `device.lost`) to it.

pub mod decision;
pub mod elastic;
pub mod policy;

pub use decision::{Decision, Reason, Stats};
pub use elastic::Elastic;
pub use policy::Policy;
