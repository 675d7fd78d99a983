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
//! must have is in docs/custom-calls.md (the contract). When the lhs streams, the product's
//! rows are transposed on the way out to give `dot_general`'s result shape.
use super::matmul::{check_axes, pack_lhs, plan, Plan};
use crate::kernels::{f32_matmul, F32Weights};
use crate::xla_ffi::{Call, DataType, FfiError};

const ATTRS: &[&str] = &[
    "lhs_batching_dims",
    "lhs_contracting_dims",
    "rhs_batching_dims",
    "rhs_contracting_dims",
];

/// Dimension numbers of one operand.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Side {
    pub dims: Vec<i64>,
    pub contracting: Vec<i64>,
    pub batching: Vec<i64>,
}

impl Side {
    /// The same operand with its size-1 dims removed (indices renumbered), given that the
    /// dims listed are in range (checked by `dot_plan` before it squeezes).
    fn squeezed(&self) -> Side {
        let keep: Vec<usize> = (0..self.dims.len())
            .filter(|&d| self.dims[d] != 1)
            .collect();
        let renumber = |axes: &[i64]| -> Vec<i64> {
            axes.iter()
                .filter_map(|&a| keep.iter().position(|&d| d as i64 == a).map(|i| i as i64))
                .collect()
        };
        Side {
            dims: keep.iter().map(|&d| self.dims[d]).collect(),
            contracting: renumber(&self.contracting),
            batching: renumber(&self.batching),
        }
    }
}

/// How the call runs: `rows` (packed) times the streamed operand, and whether the result is
/// the transpose of that product in each batch.
#[derive(Debug)]
pub(crate) struct DotPlan {
    /// Result shape of the `dot_general`.
    pub out_dims: Vec<i64>,
    /// Plan of `rows . streamed` on the squeezed operands.
    pub inner: Plan,
    /// The lhs is the streamed operand.
    pub lhs_streams: bool,
}

/// Resolves the dimension numbers; every mismatch or unsupported layout is an error.
pub(crate) fn dot_plan(lhs: &Side, rhs: &Side) -> Result<DotPlan, FfiError> {
    for (name, side) in [("lhs", lhs), ("rhs", rhs)] {
        let rank = side.dims.len();
        let c = check_axes(&format!("{name}_contracting_dims"), &side.contracting, rank)?;
        let b = check_axes(&format!("{name}_batching_dims"), &side.batching, rank)?;
        if let Some(d) = c.iter().find(|d| b.contains(d)) {
            return Err(FfiError::invalid(format!(
                "{name} dimension {d} is both contracting and batching"
            )));
        }
    }
    for (kind, l, r) in [
        ("contracting", &lhs.contracting, &rhs.contracting),
        ("batching", &lhs.batching, &rhs.batching),
    ] {
        if l.len() != r.len() {
            return Err(FfiError::invalid(format!(
                "lhs_{kind}_dims {l:?} and rhs_{kind}_dims {r:?} must have the same length"
            )));
        }
        for (&a, &b) in l.iter().zip(r) {
            let (x, y) = (lhs.dims[a as usize], rhs.dims[b as usize]);
            if x != y {
                return Err(FfiError::invalid(format!(
                    "{kind} dimension sizes differ: operand 0 (lhs) dim {a} has size {x} but \
                     operand 1 (rhs) dim {b} has size {y} (lhs shape {:?}, rhs shape {:?})",
                    lhs.dims, rhs.dims
                )));
            }
        }
    }
    let free = |s: &Side| {
        (0..s.dims.len() as i64)
            .filter(|d| !s.contracting.contains(d) && !s.batching.contains(d))
            .map(|d| s.dims[d as usize])
            .collect::<Vec<_>>()
    };
    let mut out_dims: Vec<i64> = lhs.batching.iter().map(|&d| lhs.dims[d as usize]).collect();
    out_dims.extend(free(lhs));
    out_dims.extend(free(rhs));

    let count = |s: &Side| s.dims.iter().product::<i64>();
    let lhs_streams = count(lhs) > count(rhs);
    let (rows, streamed) = if lhs_streams { (rhs, lhs) } else { (lhs, rhs) };
    let (rows_sq, streamed_sq) = (rows.squeezed(), streamed.squeezed());
    let inner = plan(
        &rows_sq.dims,
        &streamed_sq.dims,
        &rows_sq.contracting,
        &streamed_sq.contracting,
        &rows_sq.batching,
        &streamed_sq.batching,
    )
    .map_err(|e| {
        // `plan` speaks of its own rhs with squeezed dim numbers: name what the caller gave.
        let (which, name) = if lhs_streams {
            ("operand 0 (lhs)", "lhs")
        } else {
            ("operand 1 (rhs)", "rhs")
        };
        let why = if e.message.contains("must be adjacent") {
            "its contracting dims are not adjacent".to_string()
        } else if e.message.contains("must be the leading dims") {
            "its batching dims do not lead in order".to_string()
        } else {
            e.message
        };
        FfiError::invalid(format!(
            "{which}, the streamed operand (the larger one, the rhs on a tie), must be laid \
             out as [batch dims, free dims, contracting dims, free dims] once its size-1 dims \
             are dropped, but {why} (shape {:?}, {name}_contracting_dims {:?}, \
             {name}_batching_dims {:?})",
            streamed.dims, streamed.contracting, streamed.batching
        ))
    })?;
    Ok(DotPlan {
        out_dims,
        inner,
        lhs_streams,
    })
}

/// The float32 decode-shaped `dot_general` custom call.
pub fn dot_f32(call: &mut Call<'_>) -> Result<(), FfiError> {
    call.expect_arity(&[2], 1)?;
    let attrs = call.attrs();
    attrs.reject_unknown(ATTRS)?;
    let side = |i: usize, name: &str| -> Result<Side, FfiError> {
        let a = call.arg(i)?;
        if a.dtype() != DataType::F32 {
            return Err(FfiError::invalid(format!(
                "operand {i} ({name}): expected dtype float32, got {}",
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
    let dp = dot_plan(&lhs, &rhs)?;
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
    let rows_src = call.arg(ri)?.slice::<f32>(if ri == 0 {
        "operand 0 (lhs)"
    } else {
        "operand 1 (rhs)"
    })?;
    let streamed = call.arg(si)?.slice::<f32>(if si == 0 {
        "operand 0 (lhs)"
    } else {
        "operand 1 (rhs)"
    })?;
    let p = &dp.inner;
    let packed;
    let rows: &[f32] = if p.lhs_is_packed() {
        rows_src
    } else {
        packed = pack_lhs(p, rows_src, |x| x);
        &packed
    };
    let weights = F32Weights {
        data: streamed,
        batch: p.batch(),
        outer: p.outer,
        k: p.k,
        inner: p.inner,
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
        f32_matmul(pool, rows, m, &weights, &mut tmp);
        for (d, t) in dst.chunks_exact_mut(m * n).zip(tmp.chunks_exact(m * n)) {
            for r in 0..m {
                for c in 0..n {
                    d[c * m + r] = t[r * n + c];
                }
            }
        }
    } else {
        f32_matmul(pool, rows, p.m(), &weights, dst);
    }
    Ok(())
}
