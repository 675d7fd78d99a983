//! `fp8xla_matmul`: `dot_general` with FP8 weights `rhs` and float32 accumulation; contract,
//! numerics and the weight layout it accepts in docs/custom-calls.md.
//!
//! The activations are gathered into a packed `[batch, m, k]` float32 panel (converting bf16
//! and applying the activation QDQ on the way); the weights are never copied, which is why
//! their layout must already fit the kernels (`[batch, outer, k, inner]`; the rules are in
//! [`crate::layout`], shared with the graph rewrite).
use super::{check_scale, fp8_format};
use crate::fp8::{self, Format};
use crate::kernels::{fp8_matmul, Fp8Weights, Lhs, WeightScale};
use crate::layout::{matmul_layout, MatmulLayout as Plan};
use crate::xla_ffi::{Call, DataType, FfiError};
use half::bf16;
use std::borrow::Cow;

const ATTRS: &[&str] = &[
    "a_dynamic",
    "a_format",
    "a_scale",
    "lhs_batching_dims",
    "lhs_contracting_dims",
    "precision",
    "rhs_batching_dims",
    "rhs_contracting_dims",
    "w_scale",
    "w_scale_dim",
];

fn row_major_strides(dims: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    strides
}

/// Offsets of every index of the sub-array spanned by `axes` (row-major over `axes` order).
fn offsets(axes: &[usize], dims: &[usize], strides: &[usize]) -> Vec<usize> {
    let mut out = vec![0usize];
    for &a in axes {
        out = out
            .iter()
            .flat_map(|&base| (0..dims[a]).map(move |i| base + i * strides[a]))
            .collect();
    }
    out
}

/// One scale per output column (`[batch, n]`) from the per-channel operand: either already one
/// per output channel, or one per index of rhs dimension `dim` (a free dim), times `factor`.
///
/// Runs on every call, so the common case (one batch, the scales already one per column, a
/// factor of 1) borrows the operand instead of building a copy, and the copy is built by
/// repeating runs rather than dividing per column.
fn per_channel_scales<'s>(
    plan: &Plan,
    given: &'s [f32],
    dim: Option<i64>,
    factor: f32,
) -> Result<Cow<'s, [f32]>, FfiError> {
    let (batch, n) = (plan.batch(), plan.n());
    let Some(dim) = dim else {
        if given.len() != batch * n {
            return Err(FfiError::invalid(format!(
                "operand 2 (w_scale): expected {} float32 per-channel scales (rhs batch x \
                 output channels), got {}",
                batch * n,
                given.len()
            )));
        }
        return Ok(if factor == 1.0 {
            Cow::Borrowed(given)
        } else {
            Cow::Owned(given.iter().map(|s| s * factor).collect())
        });
    };
    let pos = plan
        .rhs_free
        .iter()
        .position(|&(d, _)| d as i64 == dim)
        .ok_or_else(|| {
            FfiError::invalid(format!(
                "attribute `w_scale_dim`: {dim} is not an output (free) dimension of operand 1 \
                 (rhs); free dims are {:?}",
                plan.rhs_free.iter().map(|p| p.0).collect::<Vec<_>>()
            ))
        })?;
    let size = plan.rhs_free[pos].1;
    if given.len() != size {
        return Err(FfiError::invalid(format!(
            "operand 2 (w_scale): expected {size} scales (the size of rhs dim {dim}), got {}",
            given.len()
        )));
    }
    if batch == 1 && size == n && factor == 1.0 {
        return Ok(Cow::Borrowed(given));
    }
    // Column c has scale given[(c / stride) % size]: each scale covers a run of `stride`
    // columns, and the runs of all `size` scales repeat until the row is full.
    let stride: usize = plan.rhs_free[pos + 1..].iter().map(|p| p.1).product();
    let mut row = Vec::with_capacity(batch * n);
    for _ in 0..batch * n / (size * stride).max(1) {
        for s in given {
            row.extend(std::iter::repeat_n(s * factor, stride));
        }
    }
    Ok(Cow::Owned(row))
}

/// Gathers the lhs into a packed float32 `[batch, m, k]` panel.
pub(crate) fn pack_lhs<T: Copy>(plan: &Plan, lhs: &[T], to_f32: impl Fn(T) -> f32) -> Vec<f32> {
    let strides = row_major_strides(&plan.lhs_dims);
    let at = |axes: &[usize]| offsets(axes, &plan.lhs_dims, &strides);
    let (batch, rows, ks) = (at(&plan.batch_axes), at(&plan.row_axes), at(&plan.k_axes));
    let mut out = Vec::with_capacity(batch.len() * rows.len() * ks.len());
    for &b in &batch {
        for &r in &rows {
            let base = b + r;
            out.extend(ks.iter().map(|&c| to_f32(lhs[base + c])));
        }
    }
    out
}

/// The FP8 weight matmul custom call.
pub fn matmul(call: &mut Call<'_>) -> Result<(), FfiError> {
    call.expect_arity(&[2, 3], 1)?;
    let attrs = call.attrs();
    attrs.reject_unknown(ATTRS)?;
    let lhs = call.arg(0)?;
    let rhs = call.arg(1)?;
    let format = fp8_format("operand 1 (rhs)", rhs.dtype())?;
    if !matches!(lhs.dtype(), DataType::F32 | DataType::Bf16) {
        return Err(FfiError::invalid(format!(
            "operand 0 (lhs): expected dtype float32 or bfloat16, got {}",
            lhs.dtype().name()
        )));
    }
    let plan = matmul_layout(
        lhs.dims(),
        rhs.dims(),
        &attrs.i64_array("lhs_contracting_dims")?,
        &attrs.i64_array("rhs_contracting_dims")?,
        &attrs
            .opt_i64_array("lhs_batching_dims")?
            .unwrap_or_default(),
        &attrs
            .opt_i64_array("rhs_batching_dims")?
            .unwrap_or_default(),
    )
    .map_err(FfiError::invalid)?;
    let a_scale = attrs
        .opt_f32("a_scale")?
        .map(|s| check_scale("a_scale", s))
        .transpose()?;
    let a_format = match attrs.opt_str("a_format")? {
        None => format,
        Some(name) => Format::parse(name).ok_or_else(|| {
            FfiError::invalid(format!(
                "attribute `a_format`: expected \"e4m3fn\" or \"e5m2\", got {name:?}"
            ))
        })?,
    };
    // Dynamic activation scales (one per row of the packed lhs, at run time): act_quant.rs.
    let a_dynamic = attrs.opt_bool("a_dynamic")?.unwrap_or(false);
    if a_dynamic && a_scale.is_some() {
        return Err(FfiError::invalid(
            "attributes `a_dynamic` and `a_scale`: expected at most one (dynamic per-row or \
             static activation scales), got both",
        ));
    }
    let scale_vec;
    let w_scale = match call.num_args() {
        2 => {
            if attrs.opt_i64("w_scale_dim")?.is_some() {
                return Err(FfiError::invalid(
                    "attribute `w_scale_dim` needs the per-channel scales as operand 2",
                ));
            }
            let s = attrs.opt_f32("w_scale")?.ok_or_else(|| {
                FfiError::invalid(
                    "missing weight scale: attribute `w_scale` (per tensor) or operand 2 \
                     (per channel)",
                )
            })?;
            WeightScale::PerTensor(check_scale("w_scale", s)?)
        }
        _ => {
            let factor = match attrs.opt_f32("w_scale")? {
                Some(s) => check_scale("w_scale", s)?,
                None => 1.0,
            };
            let v = call.arg(2)?;
            if v.dtype() != DataType::F32 {
                return Err(FfiError::invalid(format!(
                    "operand 2 (w_scale): expected dtype float32, got {}",
                    v.dtype().name()
                )));
            }
            let given = v.slice::<f32>("operand 2 (w_scale)")?;
            // A branch-free pass first (it runs on every call); the search only on failure.
            let valid = |s: &f32| s.is_finite() & (*s > 0.0);
            if !given.iter().fold(true, |ok, s| ok & valid(s)) {
                let (i, s) = given
                    .iter()
                    .enumerate()
                    .find(|(_, s)| !valid(s))
                    .unwrap_or((0, &f32::NAN));
                return Err(FfiError::invalid(format!(
                    "operand 2 (w_scale): scale {i} must be finite and > 0, got {s}"
                )));
            }
            scale_vec = per_channel_scales(&plan, given, attrs.opt_i64("w_scale_dim")?, factor)?;
            WeightScale::PerChannel(&scale_vec[..])
        }
    };
    let out = call.take_ret(0)?;
    if out.dims() != plan.out_dims.as_slice() {
        return Err(FfiError::invalid(format!(
            "result 0: expected shape {:?} (dot_general of lhs {:?} and rhs {:?}), got {:?}",
            plan.out_dims,
            lhs.dims(),
            rhs.dims(),
            out.dims()
        )));
    }
    let weights = Fp8Weights {
        data: rhs.slice::<u8>("operand 1 (rhs)")?,
        format,
        batch: plan.batch(),
        outer: plan.outer,
        k: plan.k,
        inner: plan.inner,
    };
    // The activations go to the kernels packed `[batch, m, k]`. A float32 lhs that is already
    // packed (the usual decode case) is read straight from XLA's buffer. With `a_scale` they
    // are quantized to FP8 codes (the kernels decode them exactly: the QDQ of the fake-quant
    // reference), so products of two FP8 values stay exact on every path.
    let precision = match attrs.opt_str("precision")? {
        None | Some("f32") => false,
        Some("bf16") => true,
        Some(other) => {
            return Err(FfiError::invalid(format!(
                "attribute `precision`: expected \"f32\" or \"bf16\", got {other:?}"
            )))
        }
    };
    let packed: Option<Vec<f32>> = match lhs.dtype() {
        DataType::F32 => {
            let src = lhs.slice::<f32>("operand 0 (lhs)")?;
            (!plan.lhs_is_packed()).then(|| pack_lhs(&plan, src, |x| x))
        }
        _ => Some(pack_lhs(
            &plan,
            lhs.slice::<bf16>("operand 0 (lhs)")?,
            bf16::to_f32,
        )),
    };
    let values: &[f32] = match &packed {
        Some(p) => p,
        None => lhs.slice::<f32>("operand 0 (lhs)")?,
    };
    let codes;
    let dynamic;
    let lhs_in = match a_scale {
        // Dynamic activation scales (one per row, computed here): the QDQ-ed values go to the
        // kernels as float32 (on AMX, split into two bf16: near-exact).
        None if a_dynamic => {
            let mut q = vec![0f32; values.len()];
            super::act_quant::qdq_rows(a_format, plan.k, values, &mut q);
            dynamic = q;
            Lhs::F32 {
                values: &dynamic,
                bf16_ok: precision,
            }
        }
        Some(scale) => {
            let mut q = vec![0u8; values.len()];
            fp8::quantize(a_format, scale, values, &mut q);
            codes = q;
            Lhs::Fp8 {
                codes: &codes,
                format: a_format,
                scale,
            }
        }
        // bf16 activations are bf16 values already: nothing is lost by rounding to bf16.
        None => Lhs::F32 {
            values,
            bf16_ok: precision || lhs.dtype() == DataType::Bf16,
        },
    };
    let pool = call.pool();
    match out.dtype() {
        DataType::F32 => {
            let dst = out.into_slice::<f32>("result 0")?;
            fp8_matmul(pool, lhs_in, plan.m(), &weights, w_scale, dst);
        }
        DataType::Bf16 => {
            let mut tmp = vec![0f32; out.len()];
            fp8_matmul(pool, lhs_in, plan.m(), &weights, w_scale, &mut tmp);
            let dst = out.into_slice::<bf16>("result 0")?;
            for (d, s) in dst.iter_mut().zip(&tmp) {
                *d = bf16::from_f32(*s);
            }
        }
        other => {
            return Err(FfiError::invalid(format!(
                "result 0: expected dtype float32 or bfloat16, got {}",
                other.name()
            )))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::matmul_layout as plan;

    #[test]
    fn gemma_patterns_use_weights_in_place() {
        // q/k/v: x[B,T,640] . w[4,640,256], contracting [2] x [1]
        let p = plan(&[2, 3, 640], &[4, 640, 256], &[2], &[1], &[], &[]).unwrap();
        assert_eq!((p.outer, p.k, p.inner), (4, 640, 256));
        assert_eq!(p.out_dims, vec![2, 3, 4, 256]);
        assert!(p.lhs_is_packed());
        // attention output: x[B,T,4,256] . w[4,256,640], contracting [3, 2] x [1, 0]
        let p = plan(&[2, 3, 4, 256], &[4, 256, 640], &[3, 2], &[1, 0], &[], &[]).unwrap();
        assert_eq!((p.outer, p.k, p.inner), (1, 1024, 640));
        assert_eq!(p.out_dims, vec![2, 3, 640]);
        assert!(
            p.lhs_is_packed(),
            "pairs sorted by rhs order give lhs dims 2, 3"
        );
        // tied logits: x[B,T,640] . emb[262144,640], contracting [2] x [1]
        let p = plan(&[1, 1, 640], &[262144, 640], &[2], &[1], &[], &[]).unwrap();
        assert_eq!((p.outer, p.k, p.inner), (262144, 640, 1));
        // batched: x[5,3,8] . w[5,8,7], batch [0] x [0], contracting [2] x [1]
        let p = plan(&[5, 3, 8], &[5, 8, 7], &[2], &[1], &[0], &[0]).unwrap();
        assert_eq!((p.batch(), p.m(), p.outer, p.k, p.inner), (5, 3, 1, 8, 7));
        assert_eq!(p.out_dims, vec![5, 3, 7]);
    }

    #[test]
    fn lhs_contracting_first_is_gathered() {
        // lhs [K=3, M=2] contracting dim 0 against w[3, 4].
        let p = plan(&[3, 2], &[3, 4], &[0], &[0], &[], &[]).unwrap();
        assert!(!p.lhs_is_packed());
        let lhs: Vec<f32> = (0..6).map(|x| x as f32).collect(); // lhs[k][m] = 2k + m
        assert_eq!(pack_lhs(&p, &lhs, |x| x), vec![0., 2., 4., 1., 3., 5.]);
    }

    #[test]
    fn size_one_dims_do_not_need_gathering() {
        // lhs [K=3, M=1]: the one row is contiguous whatever the axis order.
        let p = plan(&[3, 1], &[3, 4], &[0], &[0], &[], &[]).unwrap();
        assert!(p.lhs_is_packed());
        // lhs [B=1, K=3, M=2] batched against w[1, 3, 4]: rows are strided, so gathered.
        let p = plan(&[1, 3, 2], &[1, 3, 4], &[1], &[1], &[0], &[0]).unwrap();
        assert!(!p.lhs_is_packed());
        // Batch 2 after the rows: [M=2, B=2, K=3] . w[2, 3, 4] is gathered per batch.
        let p = plan(&[2, 2, 3], &[2, 3, 4], &[2], &[1], &[1], &[0]).unwrap();
        assert!(!p.lhs_is_packed());
        let lhs: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let want = [0., 1., 2., 6., 7., 8., 3., 4., 5., 9., 10., 11.];
        assert_eq!(pack_lhs(&p, &lhs, |x| x), want);
        // Empty lhs: nothing to gather.
        assert!(plan(&[0, 3], &[3, 4], &[1], &[0], &[], &[])
            .unwrap()
            .lhs_is_packed());
    }

    #[test]
    fn bad_dimension_numbers_are_named() {
        let e = plan(&[2, 8], &[9, 4], &[1], &[0], &[], &[]).unwrap_err();
        assert!(e.contains("contracting dimension sizes differ"), "{e}");
        let e = plan(&[2, 8], &[8, 4], &[2], &[0], &[], &[]).unwrap_err();
        assert!(e.contains("`lhs_contracting_dims`: dimension 2 is out of range"));
        let e = plan(&[2, 8], &[8, 4], &[1, 1], &[0, 1], &[], &[]).unwrap_err();
        assert!(e.contains("appears twice"));
        let e = plan(&[2, 8, 3], &[8, 4, 3], &[1, 2], &[0, 2], &[], &[]).unwrap_err();
        assert!(e.contains("contracting dims must be adjacent"), "{e}");
        let e = plan(&[5, 3, 8], &[8, 5, 7], &[2], &[0], &[0], &[1]).unwrap_err();
        assert!(e.contains("batching dims must be the leading dims"));
    }

    #[test]
    fn scales_along_one_dim_expand_to_every_output_channel() {
        // w[4, 8, 3] contracting dim 1: output channels (h, j) for h < 4, j < 3.
        let p = plan(&[2, 8], &[4, 8, 3], &[1], &[1], &[], &[]).unwrap();
        let along_h = per_channel_scales(&p, &[1., 2., 3., 4.], Some(0), 0.5).unwrap();
        let want_h: Vec<f32> = (0..12).map(|c| (c / 3 + 1) as f32 * 0.5).collect();
        assert_eq!(along_h, want_h);
        let along_j = per_channel_scales(&p, &[1., 2., 3.], Some(2), 1.0).unwrap();
        let want_j: Vec<f32> = (0..12).map(|c| (c % 3 + 1) as f32).collect();
        assert_eq!(along_j, want_j);
        let e = per_channel_scales(&p, &[1.; 8], Some(1), 1.0).unwrap_err();
        assert!(
            e.message.contains("not an output (free) dimension"),
            "{}",
            e.message
        );
        let e = per_channel_scales(&p, &[1.; 5], Some(0), 1.0).unwrap_err();
        assert!(e.message.contains("expected 4 scales"), "{}", e.message);
    }
}
