//! The exported XLA FFI custom calls.
