//! Quantizers (RTN, GPTQ) and the packed format they produce.

pub mod format;
pub mod rtn;
