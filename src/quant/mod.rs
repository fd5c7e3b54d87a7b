//! Quantizers (RTN, GPTQ) producing the packed format of `ensemble::format`, the module
//! library on disk, and the mixed-precision models (EQMs) built from it. Native only: no
//! quantizer is compiled into the browser runtime.

pub mod rtn;

pub mod calib;
pub mod eqm;
pub mod evaluate;
pub mod gptq;
pub mod library;
pub mod linalg;
pub mod nested;
pub mod plot;
pub mod static_table;
pub mod weights;
