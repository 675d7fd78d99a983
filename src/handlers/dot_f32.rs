//! `fp8xla_dot_f32`: `stablehlo.dot_general` of two float32 operands, for decode-shaped
//! products: few rows on one side, a large operand on the other that is read once, front to
//! back, by the GEMV kernels (`kernels::f32_matmul`).
//!
//! Made for attention over a KV cache in a decode step, e.g. Gemma3's scores
//! `keys[1, 640, 1, 256] . q` and weighted sum `values[1, 640, 1, 256] . p`. XLA's CPU
//! backend copies the value cache into a transposed layout for the second product and runs
//! both through a general GEMM; here neither cache is copied.
//!
//! The larger operand (by element count; the rhs on a tie) is the streamed one; the layout it
//! must have is in docs/custom-calls.md (the contract), and its rules in [`crate::layout`],
//! shared with the graph rewrite. When the lhs streams, the product's rows are transposed on
//! the way out to give `dot_general`'s result shape.
//!
//! The streamed operand may also be FP8 codes (`float8_e4m3fn` / `float8_e5m2`), read by the
//! FP8 GEMV kernels as their exact values (no scale): an FP8 KV cache, whose per-row scales
//! the graph applies on the small side or to the result ([`crate::rewrite::kv_cache`]).
use super::fp8_format;
use super::matmul::pack_lhs;
use crate::kernels::{f32_matmul, fp8_matmul, F32Weights, Fp8Weights, Lhs, WeightScale};
use crate::layout::{dot_f32_layout, DotSide as Side};
use crate::xla_ffi::{Call, DataType, FfiError};

const ATTRS: &[&str] = &[
    "lhs_batching_dims",
    "lhs_contracting_dims",
    "rhs_batching_dims",
    "rhs_contracting_dims",
];

/// The float32 decode-shaped `dot_general` custom call.
pub fn dot_f32(call: &mut Call<'_>) -> Result<(), FfiError> {
    call.expect_arity(&[2], 1)?;
    let attrs = call.attrs();
    attrs.reject_unknown(ATTRS)?;
    let side = |i: usize, name: &str| -> Result<Side, FfiError> {
        let a = call.arg(i)?;
        if !matches!(
            a.dtype(),
            DataType::F32 | DataType::F8e4m3fn | DataType::F8e5m2
        ) {
            return Err(FfiError::invalid(format!(
                "operand {i} ({name}): expected dtype float32 (or, streamed, float8_e4m3fn or \
                 float8_e5m2), got {}",
                a.dtype().name()
            )));
        }
        Ok(Side {
            dims: a.dims().to_vec(),
            contracting: attrs.i64_array(&format!("{name}_contracting_dims"))?,
            batching: attrs
                .opt_i64_array(&format!("{name}_batching_dims"))?
                .unwrap_or_default(),
        })
    };
    let (lhs, rhs) = (side(0, "lhs")?, side(1, "rhs")?);
    let dp = dot_f32_layout(&lhs, &rhs).map_err(FfiError::invalid)?;
    let out = call.take_ret(0)?;
    if out.dtype() != DataType::F32 {
        return Err(FfiError::invalid(format!(
            "result 0: expected dtype float32, got {}",
            out.dtype().name()
        )));
    }
    if out.dims() != dp.out_dims.as_slice() {
        return Err(FfiError::invalid(format!(
            "result 0: expected shape {:?} (dot_general of lhs {:?} and rhs {:?}), got {:?}",
            dp.out_dims,
            lhs.dims,
            rhs.dims,
            out.dims()
        )));
    }
    let (ri, si) = if dp.lhs_streams { (1, 0) } else { (0, 1) };
    let what = |i: usize| {
        if i == 0 {
            "operand 0 (lhs)"
        } else {
            "operand 1 (rhs)"
        }
    };
    if call.arg(ri)?.dtype() != DataType::F32 {
        return Err(FfiError::invalid(format!(
            "{}: expected dtype float32 (the operand with fewer elements; only the streamed \
             one may be FP8), got {}",
            what(ri),
            call.arg(ri)?.dtype().name()
        )));
    }
    let rows_src = call.arg(ri)?.slice::<f32>(what(ri))?;
    let streamed_arg = call.arg(si)?;
    let streamed = if streamed_arg.dtype() == DataType::F32 {
        Streamed::F32(streamed_arg.slice::<f32>(what(si))?)
    } else {
        Streamed::Fp8(
            streamed_arg.slice::<u8>(what(si))?,
            fp8_format(what(si), streamed_arg.dtype())?,
        )
    };
    let p = &dp.inner;
    let packed;
    let rows: &[f32] = if p.lhs_is_packed() {
        rows_src
    } else {
        packed = pack_lhs(p, rows_src, |x| x);
        &packed
    };
    let (batch, outer, k, inner) = (p.batch(), p.outer, p.k, p.inner);
    let product =
        |pool: &dyn crate::parallel::Parallel, rows: &[f32], m, out: &mut [f32]| match streamed {
            Streamed::F32(data) => {
                let w = F32Weights {
                    data,
                    batch,
                    outer,
                    k,
                    inner,
                };
                f32_matmul(pool, rows, m, &w, out)
            }
            Streamed::Fp8(data, format) => {
                let w = Fp8Weights {
                    data,
                    format,
                    batch,
                    outer,
                    k,
                    inner,
                };
                fp8_matmul(
                    pool,
                    Lhs::f32(rows),
                    m,
                    &w,
                    WeightScale::PerTensor(1.0),
                    out,
                )
            }
        };
    let pool = call.pool();
    let dst = out.into_slice::<f32>("result 0")?;
    if dst.is_empty() {
        return Ok(());
    }
    if dp.lhs_streams {
        // The product is [batch, m, n]; the result wants [batch, n, m].
        let (m, n) = (p.m(), p.n());
        let mut tmp = vec![0f32; dst.len()];
        product(pool, rows, m, &mut tmp);
        for (d, t) in dst.chunks_exact_mut(m * n).zip(tmp.chunks_exact(m * n)) {
            for r in 0..m {
                for c in 0..n {
                    d[c * m + r] = t[r * n + c];
                }
            }
        }
    } else {
        product(pool, rows, p.m(), dst);
    }
    Ok(())
}

/// The streamed operand: float32 values, or FP8 codes read as their exact values.
#[derive(Clone, Copy)]
enum Streamed<'a> {
    F32(&'a [f32]),
    Fp8(&'a [u8], crate::fp8::Format),
}
