//! Errors a handler returns; [`super::entry`] turns them into `XLA_FFI_Error`s.
use std::fmt;

/// An error code of XLA's FFI (`XLA_FFI_Error_Code`) and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FfiError {
    pub code: i32,
    pub message: String,
}

impl FfiError {
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const INTERNAL: i32 = 13;

    /// Bad input from the caller: wrong dtype, shape, attribute, ...
    pub fn invalid(message: impl Into<String>) -> Self {
        FfiError {
            code: Self::INVALID_ARGUMENT,
            message: message.into(),
        }
    }

    /// A fault of ours (a caught panic, an XLA API call that failed).
    pub fn internal(message: impl Into<String>) -> Self {
        FfiError {
            code: Self::INTERNAL,
            message: message.into(),
        }
    }
}

impl fmt::Display for FfiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for FfiError {}
