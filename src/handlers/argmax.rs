//! `fp8xla_argmax`: the index of the largest element along the last dimension, as
//! `jnp.argmax(x, axis=-1)` computes it (first index on ties, the first NaN of a row that has
//! one) — the greedy sampler's argmax over a vocabulary, on every core instead of one.
//! Contract: docs/custom-calls.md; the kernel and its semantics: `crate::kernels::argmax`.
use crate::kernels::argmax_last;
use crate::xla_ffi::{Call, DataType, FfiError};
use half::bf16;

/// The `fp8xla_argmax` custom call.
pub fn argmax(call: &mut Call<'_>) -> Result<(), FfiError> {
    call.expect_arity(&[1], 1)?;
    call.attrs().reject_unknown(&[])?;
    let x = call.arg(0)?;
    let dims = x.dims();
    let Some((&n, lead)) = dims.split_last() else {
        return Err(FfiError::invalid(
            "operand 0 (x): expected rank >= 1 (the argmax runs along the last dim), got a scalar",
        ));
    };
    if n == 0 {
        return Err(FfiError::invalid(format!(
            "operand 0 (x): expected a last dim of size >= 1 (an empty row has no argmax), got \
             shape {dims:?}"
        )));
    }
    let out = call.take_ret(0)?;
    if out.dims() != lead {
        return Err(FfiError::invalid(format!(
            "result 0 (index): expected shape {lead:?} (the shape of operand 0 (x), {dims:?}, \
             without its last dim), got {:?}",
            out.dims()
        )));
    }
    let out_dtype = out.dtype();
    match out_dtype {
        DataType::S32 if n - 1 > i64::from(i32::MAX) => {
            return Err(FfiError::invalid(format!(
                "result 0 (index): dtype int32 cannot hold the indices of a last dim of size {n}; \
                 expected int64"
            )))
        }
        DataType::S32 | DataType::S64 => {}
        other => {
            return Err(FfiError::invalid(format!(
                "result 0 (index): expected dtype int32 or int64, got {}",
                other.name()
            )))
        }
    }
    let n = n as usize;
    let mut index = vec![0usize; out.len()];
    let pool = call.pool();
    match x.dtype() {
        DataType::F32 => argmax_last(pool, x.slice::<f32>("operand 0 (x)")?, n, &mut index),
        DataType::Bf16 => argmax_last(pool, x.slice::<bf16>("operand 0 (x)")?, n, &mut index),
        other => {
            return Err(FfiError::invalid(format!(
                "operand 0 (x): expected dtype float32 or bfloat16, got {}",
                other.name()
            )))
        }
    }
    // Every index is below n, which the checks above fit into the result's dtype.
    if out_dtype == DataType::S32 {
        let dst = out.into_slice::<i32>("result 0 (index)")?;
        for (d, &i) in dst.iter_mut().zip(&index) {
            *d = i as i32;
        }
    } else {
        let dst = out.into_slice::<i64>("result 0 (index)")?;
        for (d, &i) in dst.iter_mut().zip(&index) {
            *d = i as i64;
        }
    }
    Ok(())
}
