//! `fp8xla_quantize`, `fp8xla_dequantize` and `fp8xla_qdq`: contracts and numerics in
//! docs/custom-calls.md; the conversions themselves are in `crate::fp8`.
use super::{check_same_shape, check_scale, fp8_format, par_map, same_type_result};
use crate::fp8::{self, Format};
use crate::xla_ffi::{Call, DataType, FfiError};
use half::bf16;

fn scale_attr(call: &Call<'_>) -> Result<f32, FfiError> {
    check_scale("scale", call.attrs().f32("scale")?)
}

/// The `fp8xla_quantize` custom call (FP8 codes of `x / scale`).
pub fn quantize(call: &mut Call<'_>) -> Result<(), FfiError> {
    call.expect_arity(&[1], 1)?;
    call.attrs().reject_unknown(&["scale"])?;
    let scale = scale_attr(call)?;
    let x = call.arg(0)?;
    let (x_dims, x_dtype) = (x.dims(), x.dtype());
    let q = call.take_ret(0)?;
    let format = fp8_format("result 0 (q)", q.dtype())?;
    check_same_shape("result 0 (q)", q.dims(), "operand 0 (x)", x_dims)?;
    let pool = call.pool();
    match x_dtype {
        DataType::F32 => {
            let src = call.arg(0)?.slice::<f32>("operand 0 (x)")?;
            let dst = q.into_slice::<u8>("result 0 (q)")?;
            par_map(pool, src, dst, |s, d| fp8::quantize(format, scale, s, d));
        }
        DataType::Bf16 => {
            let src = call.arg(0)?.slice::<bf16>("operand 0 (x)")?;
            let dst = q.into_slice::<u8>("result 0 (q)")?;
            par_map(pool, src, dst, |s, d| {
                fp8::quantize_bf16(format, scale, s, d)
            });
        }
        other => {
            return Err(FfiError::invalid(format!(
                "operand 0 (x): expected dtype float32 or bfloat16, got {}",
                other.name()
            )))
        }
    }
    Ok(())
}

/// The `fp8xla_dequantize` custom call (`f32(q) * scale`).
pub fn dequantize(call: &mut Call<'_>) -> Result<(), FfiError> {
    call.expect_arity(&[1], 1)?;
    call.attrs().reject_unknown(&["scale"])?;
    let scale = scale_attr(call)?;
    let q = call.arg(0)?;
    let format = fp8_format("operand 0 (q)", q.dtype())?;
    let src = q.slice::<u8>("operand 0 (q)")?;
    let q_dims = q.dims();
    let x = call.take_ret(0)?;
    check_same_shape("result 0 (x)", x.dims(), "operand 0 (q)", q_dims)?;
    let pool = call.pool();
    match x.dtype() {
        DataType::F32 => {
            let dst = x.into_slice::<f32>("result 0 (x)")?;
            par_map(pool, src, dst, |s, d| fp8::dequantize(format, scale, s, d));
        }
        DataType::Bf16 => {
            let dst = x.into_slice::<bf16>("result 0 (x)")?;
            par_map(pool, src, dst, |s, d| {
                fp8::dequantize_bf16(format, scale, s, d)
            });
        }
        other => {
            return Err(FfiError::invalid(format!(
                "result 0 (x): expected dtype float32 or bfloat16, got {}",
                other.name()
            )))
        }
    }
    Ok(())
}

/// The `fp8xla_qdq` custom call (fake quantization: quantize and dequantize in one pass).
pub fn qdq(call: &mut Call<'_>) -> Result<(), FfiError> {
    call.expect_arity(&[1], 1)?;
    call.attrs().reject_unknown(&["format", "scale"])?;
    let scale = scale_attr(call)?;
    let name = call.attrs().str("format")?;
    let format = Format::parse(name).ok_or_else(|| {
        FfiError::invalid(format!(
            "attribute `format`: expected \"e4m3fn\" or \"e5m2\" (or INC's \"fp8_e4m3\" / \
             \"fp8_e5m2\"), got {name:?}"
        ))
    })?;
    let x_dtype = call.arg(0)?.dtype();
    let y = same_type_result(call)?;
    let pool = call.pool();
    match x_dtype {
        DataType::F32 => {
            let src = call.arg(0)?.slice::<f32>("operand 0 (x)")?;
            let dst = y.into_slice::<f32>("result 0 (y)")?;
            par_map(pool, src, dst, |s, d| fp8::qdq(format, scale, s, d));
        }
        DataType::Bf16 => {
            let src = call.arg(0)?.slice::<bf16>("operand 0 (x)")?;
            let dst = y.into_slice::<bf16>("result 0 (y)")?;
            par_map(pool, src, dst, |s, d| fp8::qdq_bf16(format, scale, s, d));
        }
        other => {
            return Err(FfiError::invalid(format!(
                "operand 0 (x): expected dtype float32 or bfloat16, got {}",
                other.name()
            )))
        }
    }
    Ok(())
}
