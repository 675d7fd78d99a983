//! Safe face of the XLA FFI C API.
