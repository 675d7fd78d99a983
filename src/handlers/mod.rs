//! The bodies of the exported XLA FFI custom calls. Each takes a decoded [`Call`], checks
//! every operand, result and attribute against its contract (docs/custom-calls.md, the one
//! description of the targets), and runs a kernel. Error messages name the operand or
//! attribute, what was expected and what came; the custom-call name is prefixed by `xla_ffi`.
//! The targets are exported, and listed, by `export_handlers!` in `xla_ffi/exports.rs`.

mod act_quant;
mod argmax;
mod dot_f32;
mod elementwise;
mod matmul;
pub mod observer;
mod quantize_rows;
mod take;
mod update_slice;

pub use argmax::argmax;
pub use dot_f32::dot_f32;
pub use elementwise::{dequantize, qdq, quantize};
pub use matmul::matmul;
pub use observer::observe;
pub use quantize_rows::quantize_rows;
pub use take::take;
pub use update_slice::update_slice;

use crate::fp8::Format;
use crate::parallel::{split_range, Parallel};
use crate::xla_ffi::{Call, DataType, FfiError, Ret};
use std::sync::Mutex;

/// Elements below which a call runs on the calling thread only.
const PARALLEL_MIN: usize = 1 << 16;

/// The FP8 format of the dtype of `what` (e.g. "operand 1 (rhs)"), or an error naming it.
pub(crate) fn fp8_format(what: &str, dtype: DataType) -> Result<Format, FfiError> {
    match dtype {
        DataType::F8e4m3fn => Ok(Format::E4m3fn),
        DataType::F8e5m2 => Ok(Format::E5m2),
        other => Err(FfiError::invalid(format!(
            "{what}: expected dtype float8_e4m3fn or float8_e5m2, got {}",
            other.name()
        ))),
    }
}

/// A scale attribute must be a finite positive number.
pub(crate) fn check_scale(name: &str, scale: f32) -> Result<f32, FfiError> {
    if scale.is_finite() && scale > 0.0 {
        Ok(scale)
    } else {
        Err(FfiError::invalid(format!(
            "attribute `{name}`: expected a finite positive float, got {scale}"
        )))
    }
}

/// Fails unless two shapes are equal.
pub(crate) fn check_same_shape(
    what: &str,
    dims: &[i64],
    other: &str,
    other_dims: &[i64],
) -> Result<(), FfiError> {
    if dims == other_dims {
        Ok(())
    } else {
        Err(FfiError::invalid(format!(
            "{what}: expected shape {other_dims:?} (the shape of {other}), got {dims:?}"
        )))
    }
}

/// Takes result 0 of an x -> y call whose result must have operand 0's shape and dtype.
pub(crate) fn same_type_result<'a>(call: &mut Call<'a>) -> Result<Ret<'a>, FfiError> {
    let x = call.arg(0)?;
    let y = call.take_ret(0)?;
    check_same_shape("result 0 (y)", y.dims(), "operand 0 (x)", x.dims())?;
    if y.dtype() != x.dtype() {
        return Err(FfiError::invalid(format!(
            "result 0 (y): expected dtype {} (the dtype of operand 0), got {}",
            x.dtype().name(),
            y.dtype().name()
        )));
    }
    Ok(y)
}

/// Applies `f` to matching chunks of `src` and `dst`, in parallel for large inputs.
pub(crate) fn par_map<S: Sync, D: Send>(
    pool: &dyn Parallel,
    src: &[S],
    dst: &mut [D],
    f: impl Fn(&[S], &mut [D]) + Sync,
) {
    assert_eq!(src.len(), dst.len(), "par_map: length mismatch");
    if src.len() < PARALLEL_MIN || pool.workers() <= 1 {
        f(src, dst);
        return;
    }
    let ranges = split_range(src.len(), pool.workers() * 4, 64);
    let mut rest = dst;
    let mut chunks = Vec::with_capacity(ranges.len());
    for r in &ranges {
        let (head, tail) = rest.split_at_mut(r.len());
        chunks.push(Mutex::new(head));
        rest = tail;
    }
    pool.run(ranges.len(), &|i| {
        let mut out = chunks[i].lock().unwrap_or_else(|p| p.into_inner());
        f(&src[ranges[i].clone()], &mut out);
    });
}
