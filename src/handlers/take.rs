//! `fp8xla_take`: rows of an FP8 table, dequantized — the embedding lookup of a quantized
//! model. XLA's CPU backend gathers FP8 only through a float copy of the whole table (which
//! it then hoists out of the decode loop), so the lookup is a custom call of its own.
//! Contract: docs/custom-calls.md.
use super::{check_scale, fp8_format};
use crate::fp8;
use crate::xla_ffi::{Call, DataType, FfiError};
use half::bf16;

/// The `fp8xla_take` custom call (dequantized rows of an FP8 table, indices clamped), with an
/// optional operand 2: one f32 scale per table row (per-row scales, multiplied by `scale`).
pub fn take(call: &mut Call<'_>) -> Result<(), FfiError> {
    call.expect_arity(&[2, 3], 1)?;
    call.attrs().reject_unknown(&["scale"])?;
    let scale = check_scale("scale", call.attrs().f32("scale")?)?;
    let table = call.arg(0)?;
    let format = fp8_format("operand 0 (table)", table.dtype())?;
    let t_dims = table.dims();
    let Some((&rows, row_dims)) = t_dims.split_first() else {
        return Err(FfiError::invalid(
            "operand 0 (table): expected rank >= 1, got a scalar",
        ));
    };
    let row_len = row_dims.iter().product::<i64>() as usize;
    let table = table.slice::<u8>("operand 0 (table)")?;
    let idx = call.arg(1)?;
    let idx_dims = idx.dims();
    let indices: Vec<i64> = match idx.dtype() {
        DataType::S32 => idx
            .slice::<i32>("operand 1 (indices)")?
            .iter()
            .map(|&i| i as i64)
            .collect(),
        DataType::S64 => idx.slice::<i64>("operand 1 (indices)")?.to_vec(),
        other => {
            return Err(FfiError::invalid(format!(
                "operand 1 (indices): expected dtype int32 or int64, got {}",
                other.name()
            )))
        }
    };
    let row_scales = row_scales(call, rows)?;
    let out = call.take_ret(0)?;
    let batch = match idx_dims.split_last() {
        Some((1, lead)) if out.dims().len() == lead.len() + row_dims.len() => lead,
        _ => idx_dims,
    };
    let want: Vec<i64> = batch.iter().chain(row_dims).copied().collect();
    if out.dims() != want.as_slice() {
        return Err(FfiError::invalid(format!(
            "result 0 (out): expected shape {want:?} (indices {idx_dims:?} then the row \
             dims of table {t_dims:?}), got {:?}",
            out.dims()
        )));
    }
    if rows == 0 && !indices.is_empty() {
        return Err(FfiError::invalid(format!(
            "operand 0 (table): has no rows to take {} indices from",
            indices.len()
        )));
    }
    if let Some(rs) = row_scales {
        check_taken_row_scales(rs, &indices, rows)?;
    }
    let row = |i: i64| {
        let r = i.clamp(0, rows - 1) as usize;
        let s = row_scales.map_or(scale, |rs| scale * rs[r]);
        (&table[r * row_len..(r + 1) * row_len], s)
    };
    match out.dtype() {
        DataType::F32 => {
            let dst = out.into_slice::<f32>("result 0 (out)")?;
            copy_rows(&indices, row_len, dst, |i, d| {
                let (src, s) = row(i);
                fp8::dequantize(format, s, src, d)
            });
        }
        DataType::Bf16 => {
            let dst = out.into_slice::<bf16>("result 0 (out)")?;
            copy_rows(&indices, row_len, dst, |i, d| {
                let (src, s) = row(i);
                fp8::dequantize_bf16(format, s, src, d)
            });
        }
        other => {
            return Err(FfiError::invalid(format!(
                "result 0 (out): expected dtype float32 or bfloat16, got {}",
                other.name()
            )))
        }
    }
    Ok(())
}

/// Operand 2 (optional): one f32 scale per row of the table.
fn row_scales<'a>(call: &Call<'a>, rows: i64) -> Result<Option<&'a [f32]>, FfiError> {
    if call.num_args() < 3 {
        return Ok(None);
    }
    let arg = call.arg(2)?;
    if arg.dtype() != DataType::F32 || arg.dims() != [rows].as_slice() {
        return Err(FfiError::invalid(format!(
            "operand 2 (row_scales): expected float32 [{rows}] (one scale per table row), got \
             {} {:?}",
            arg.dtype().name(),
            arg.dims()
        )));
    }
    Ok(Some(arg.slice::<f32>("operand 2 (row_scales)")?))
}

/// The scales of the rows the indices take must be finite and positive. Only those are read:
/// checking the whole operand would scan one scale per table row on every call, a megabyte per
/// decode step for Gemma 3's tied embedding, to take one row.
fn check_taken_row_scales(scales: &[f32], indices: &[i64], rows: i64) -> Result<(), FfiError> {
    for &i in indices {
        let r = i.clamp(0, rows - 1) as usize;
        let s = scales[r];
        if !(s.is_finite() && s > 0.0) {
            return Err(FfiError::invalid(format!(
                "operand 2 (row_scales): expected finite positive scales, got {s} at row {r} \
                 (taken by index {i})"
            )));
        }
    }
    Ok(())
}

fn copy_rows<D>(indices: &[i64], row_len: usize, dst: &mut [D], f: impl Fn(i64, &mut [D])) {
    if row_len == 0 {
        return;
    }
    for (&i, d) in indices.iter().zip(dst.chunks_exact_mut(row_len)) {
        f(i, d);
    }
}
