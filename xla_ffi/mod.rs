//! Safe face of the XLA FFI C API (`xla/ffi/api/c_api.h`).
//!
//! This is the only module that sees raw XLA FFI types and pointers. Handlers in
//! `crate::handlers` receive a [`Call`]: typed views of the operand and result buffers, the
//! attributes, and XLA's intra-op thread pool as a [`crate::parallel::Parallel`]. [`entry`]
//! answers the metadata handshake, checks the execution stage, catches panics and turns errors
//! into XLA errors; [`exports`] holds every exported C symbol.

mod attrs;
mod buffers;
mod entry;
mod error;
pub mod exports;
mod pool;
#[allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    unnecessary_transmutes,
    clippy::all,
    clippy::undocumented_unsafe_blocks
)]
mod raw {
    include!(concat!(env!("OUT_DIR"), "/xla_ffi_bindings.rs"));
}

pub use attrs::Attrs;
pub use buffers::{Arg, DataType, Element, InPlace, Ret, SIZED_DTYPES};
pub use entry::Call;
pub use error::FfiError;
pub use pool::XlaPool;
