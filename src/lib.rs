//! fp8xla: true FP8 inference for JAX/Keras models on x86 CPUs.
//!
//! Layers, bottom up: `xla_ffi` (the only place raw XLA FFI types appear), `fp8` (the two FP8
//! formats and their vectorized conversions), `kernels` (FP8 matmul), `layout` (the dot custom calls' layout
//! rules), `handlers` (the exported custom calls), `rewrite` (the StableHLO graph passes).

#[path = "../xla_ffi/mod.rs"]
pub mod xla_ffi;

pub mod cpu;
pub mod fp8;
pub mod handlers;
pub mod kernels;
pub mod layout;
pub mod parallel;
pub mod rewrite;
