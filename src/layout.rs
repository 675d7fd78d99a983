//! The dimension-number and operand-layout rules of the two dot custom calls, `fp8xla_matmul`
//! and `fp8xla_dot_f32`, in one place: the handlers check every call with them, and the graph
//! rewrite plans with them, so the rewrite never emits a call whose layout the handler refuses.
//!
//! Both calls read their large operand (the FP8 weights, the streamed float32 operand) in the
//! layout it has, never copied: `[batch dims (leading, in order), outer free dims, contracting
//! dims (adjacent), inner free dims]`. The other operand is gathered into a packed
//! `[batch, m, k]` panel, so any order of its dims is fine.
//!
//! Errors are messages naming the attribute or operand, what was expected and what came; the
//! handlers turn them into `FfiError`s, the rewrite into the reason a site stays float.

#![forbid(unsafe_code)]

/// The dims listed in attribute `what`, checked against `rank`: in range, none twice.
pub fn check_axes(what: &str, axes: &[i64], rank: usize) -> Result<Vec<usize>, String> {
    let mut seen = vec![false; rank];
    axes.iter()
        .map(|&a| {
            let i = usize::try_from(a)
                .ok()
                .filter(|&i| i < rank)
                .ok_or_else(|| {
                    format!("attribute `{what}`: dimension {a} is out of range for rank {rank}")
                })?;
            if std::mem::replace(&mut seen[i], true) {
                return Err(format!("attribute `{what}`: dimension {a} appears twice"));
            }
            Ok(i)
        })
        .collect()
}

/// The dimension numbers of an `fp8xla_matmul`, checked against the operand ranks.
#[derive(Debug, PartialEq)]
pub struct MatmulAxes {
    /// `lhs_contracting_dims`, `rhs_contracting_dims`, `lhs_batching_dims`,
    /// `rhs_batching_dims` as indices.
    pub lhs_contracting: Vec<usize>,
    pub rhs_contracting: Vec<usize>,
    pub lhs_batching: Vec<usize>,
    pub rhs_batching: Vec<usize>,
    /// `rhs_contracting` in increasing order (the weights' physical order).
    pub rhs_contracting_sorted: Vec<usize>,
}

/// The rules of `fp8xla_matmul`'s dimension numbers that do not depend on sizes: every dim in
/// range and listed once, as many contracting (batching) dims on each side, no dim both
/// contracting and batching, and the rhs (the weights, used in place) laid out as
/// `[batch dims (leading, in order), free dims, contracting dims (adjacent), free dims]`.
pub fn matmul_axes(
    lhs_rank: usize,
    rhs_rank: usize,
    lhs_contracting: &[i64],
    rhs_contracting: &[i64],
    lhs_batching: &[i64],
    rhs_batching: &[i64],
) -> Result<MatmulAxes, String> {
    let lc = check_axes("lhs_contracting_dims", lhs_contracting, lhs_rank)?;
    let rc = check_axes("rhs_contracting_dims", rhs_contracting, rhs_rank)?;
    let lb = check_axes("lhs_batching_dims", lhs_batching, lhs_rank)?;
    let rb = check_axes("rhs_batching_dims", rhs_batching, rhs_rank)?;
    if lc.len() != rc.len() {
        return Err(format!(
            "lhs_contracting_dims {lhs_contracting:?} and rhs_contracting_dims \
             {rhs_contracting:?} must have the same length"
        ));
    }
    if lb.len() != rb.len() {
        return Err(format!(
            "lhs_batching_dims {lhs_batching:?} and rhs_batching_dims {rhs_batching:?} must \
             have the same length"
        ));
    }
    if let Some(d) = lc.iter().find(|d| lb.contains(d)) {
        return Err(format!(
            "lhs dimension {d} is both contracting and batching"
        ));
    }
    if let Some(d) = rc.iter().find(|d| rb.contains(d)) {
        return Err(format!(
            "rhs dimension {d} is both contracting and batching"
        ));
    }
    // The weights are used in place: batch dims must lead, contracting dims be contiguous.
    if rb.iter().enumerate().any(|(i, &d)| d != i) {
        return Err(format!(
            "operand 1 (rhs): batching dims must be the leading dims in order, got \
             rhs_batching_dims {rhs_batching:?}"
        ));
    }
    let mut rc_sorted = rc.clone();
    rc_sorted.sort_unstable();
    if rc_sorted.windows(2).any(|w| w[1] != w[0] + 1) {
        return Err(format!(
            "operand 1 (rhs): contracting dims must be adjacent, got rhs_contracting_dims \
             {rhs_contracting:?}"
        ));
    }
    Ok(MatmulAxes {
        lhs_contracting: lc,
        rhs_contracting: rc,
        lhs_batching: lb,
        rhs_batching: rb,
        rhs_contracting_sorted: rc_sorted,
    })
}

/// Dimension numbers resolved against the operand shapes.
#[derive(Debug, PartialEq)]
pub struct MatmulLayout {
    /// Lhs dims, and its axes in the packed `[batch, m, k]` order: batch axes, free axes
    /// (rows), contraction axes in the weights' physical order.
    pub lhs_dims: Vec<usize>,
    pub batch_axes: Vec<usize>,
    pub row_axes: Vec<usize>,
    pub k_axes: Vec<usize>,
    /// Weight shape as `[batch, outer, k, inner]`.
    pub outer: usize,
    pub k: usize,
    pub inner: usize,
    /// Expected result shape.
    pub out_dims: Vec<i64>,
    /// The rhs free dims (output channels), in output order, with their sizes.
    pub rhs_free: Vec<(usize, usize)>,
}

impl MatmulLayout {
    fn size(&self, axes: &[usize]) -> usize {
        axes.iter().map(|&a| self.lhs_dims[a]).product()
    }
    pub fn batch(&self) -> usize {
        self.size(&self.batch_axes)
    }
    pub fn m(&self) -> usize {
        self.size(&self.row_axes)
    }
    pub fn n(&self) -> usize {
        self.outer * self.inner
    }
    /// Whether the lhs already is a contiguous `[batch, m, k]` array: its axes of size > 1
    /// come in that order. (Decided from the axes, not from per-element offsets: this runs on
    /// every call.)
    pub fn lhs_is_packed(&self) -> bool {
        let order = self
            .batch_axes
            .iter()
            .chain(&self.row_axes)
            .chain(&self.k_axes);
        let mut big = order.filter(|&&a| self.lhs_dims[a] > 1);
        let mut last = match big.next() {
            None => return true,
            Some(&a) => a,
        };
        big.all(|&a| std::mem::replace(&mut last, a) < a)
    }
}

fn dims_usize(dims: &[i64]) -> Vec<usize> {
    dims.iter().map(|&d| d as usize).collect()
}

/// Resolves `fp8xla_matmul`'s dimension numbers against the operand shapes ([`matmul_axes`],
/// then equal sizes of paired dims); every mismatch is an error naming the attribute or
/// operand.
pub fn matmul_layout(
    lhs_dims: &[i64],
    rhs_dims: &[i64],
    lhs_contracting: &[i64],
    rhs_contracting: &[i64],
    lhs_batching: &[i64],
    rhs_batching: &[i64],
) -> Result<MatmulLayout, String> {
    let (ld, rd) = (dims_usize(lhs_dims), dims_usize(rhs_dims));
    let MatmulAxes {
        lhs_contracting: lc,
        rhs_contracting: rc,
        lhs_batching: lb,
        rhs_batching: rb,
        rhs_contracting_sorted: rc_sorted,
    } = matmul_axes(
        ld.len(),
        rd.len(),
        lhs_contracting,
        rhs_contracting,
        lhs_batching,
        rhs_batching,
    )?;
    for (kind, l, r) in [("contracting", &lc, &rc), ("batching", &lb, &rb)] {
        for (&a, &b) in l.iter().zip(r.iter()) {
            if ld[a] != rd[b] {
                return Err(format!(
                    "{kind} dimension sizes differ: operand 0 (lhs) dim {a} has size {} but \
                     operand 1 (rhs) dim {b} has size {} (lhs shape {lhs_dims:?}, rhs shape \
                     {rhs_dims:?})",
                    ld[a], rd[b]
                ));
            }
        }
    }
    let nb = rb.len();
    let k_start = rc_sorted.first().copied().unwrap_or(rd.len());
    let k_end = k_start + rc_sorted.len();
    let outer: usize = rd[nb..k_start].iter().product();
    let inner: usize = rd[k_end..].iter().product();
    let k: usize = rc_sorted.iter().map(|&d| rd[d]).product();
    // Contract lhs in the weights' physical order.
    let lhs_k_axes: Vec<usize> = rc_sorted
        .iter()
        .map(|d| lc[rc.iter().position(|x| x == d).unwrap_or(0)])
        .collect();
    let lhs_free: Vec<usize> = (0..ld.len())
        .filter(|d| !lc.contains(d) && !lb.contains(d))
        .collect();
    let mut out_dims: Vec<i64> = lb.iter().map(|&d| ld[d] as i64).collect();
    out_dims.extend(lhs_free.iter().map(|&d| ld[d] as i64));
    out_dims.extend(
        (nb..rd.len())
            .filter(|d| !rc.contains(d))
            .map(|d| rd[d] as i64),
    );
    let rhs_free = (nb..rd.len())
        .filter(|d| !rc.contains(d))
        .map(|d| (d, rd[d]))
        .collect();
    Ok(MatmulLayout {
        rhs_free,
        lhs_dims: ld,
        batch_axes: lb,
        row_axes: lhs_free,
        k_axes: lhs_k_axes,
        outer,
        k,
        inner,
        out_dims,
    })
}

/// Dimension numbers of one operand of an `fp8xla_dot_f32`.
#[derive(Clone, Debug, PartialEq)]
pub struct DotSide {
    pub dims: Vec<i64>,
    pub contracting: Vec<i64>,
    pub batching: Vec<i64>,
}

impl DotSide {
    /// The same operand with its size-1 dims removed (indices renumbered), given that the
    /// dims listed are in range (checked by `dot_f32_layout` before it squeezes).
    fn squeezed(&self) -> DotSide {
        let keep: Vec<usize> = (0..self.dims.len())
            .filter(|&d| self.dims[d] != 1)
            .collect();
        let renumber = |axes: &[i64]| -> Vec<i64> {
            axes.iter()
                .filter_map(|&a| keep.iter().position(|&d| d as i64 == a).map(|i| i as i64))
                .collect()
        };
        DotSide {
            dims: keep.iter().map(|&d| self.dims[d]).collect(),
            contracting: renumber(&self.contracting),
            batching: renumber(&self.batching),
        }
    }
}

/// How an `fp8xla_dot_f32` runs: `rows` (packed) times the streamed operand, and whether the
/// result is the transpose of that product in each batch.
#[derive(Debug)]
pub struct DotF32Layout {
    /// Result shape of the `dot_general`.
    pub out_dims: Vec<i64>,
    /// Layout of `rows . streamed` on the squeezed operands.
    pub inner: MatmulLayout,
    /// The lhs is the streamed operand.
    pub lhs_streams: bool,
}

/// Resolves `fp8xla_dot_f32`'s dimension numbers: the larger operand (by element count; the
/// rhs on a tie) streams and must be laid out as [`matmul_axes`] wants the weights once its
/// size-1 dims are dropped. Every mismatch or unsupported layout is an error.
pub fn dot_f32_layout(lhs: &DotSide, rhs: &DotSide) -> Result<DotF32Layout, String> {
    for (name, side) in [("lhs", lhs), ("rhs", rhs)] {
        let rank = side.dims.len();
        let c = check_axes(&format!("{name}_contracting_dims"), &side.contracting, rank)?;
        let b = check_axes(&format!("{name}_batching_dims"), &side.batching, rank)?;
        if let Some(d) = c.iter().find(|d| b.contains(d)) {
            return Err(format!(
                "{name} dimension {d} is both contracting and batching"
            ));
        }
    }
    for (kind, l, r) in [
        ("contracting", &lhs.contracting, &rhs.contracting),
        ("batching", &lhs.batching, &rhs.batching),
    ] {
        if l.len() != r.len() {
            return Err(format!(
                "lhs_{kind}_dims {l:?} and rhs_{kind}_dims {r:?} must have the same length"
            ));
        }
        for (&a, &b) in l.iter().zip(r) {
            let (x, y) = (lhs.dims[a as usize], rhs.dims[b as usize]);
            if x != y {
                return Err(format!(
                    "{kind} dimension sizes differ: operand 0 (lhs) dim {a} has size {x} but \
                     operand 1 (rhs) dim {b} has size {y} (lhs shape {:?}, rhs shape {:?})",
                    lhs.dims, rhs.dims
                ));
            }
        }
    }
    let free = |s: &DotSide| {
        (0..s.dims.len() as i64)
            .filter(|d| !s.contracting.contains(d) && !s.batching.contains(d))
            .map(|d| s.dims[d as usize])
            .collect::<Vec<_>>()
    };
    let mut out_dims: Vec<i64> = lhs.batching.iter().map(|&d| lhs.dims[d as usize]).collect();
    out_dims.extend(free(lhs));
    out_dims.extend(free(rhs));

    let count = |s: &DotSide| s.dims.iter().product::<i64>();
    let lhs_streams = count(lhs) > count(rhs);
    let (rows, streamed) = if lhs_streams { (rhs, lhs) } else { (lhs, rhs) };
    let (rows_sq, streamed_sq) = (rows.squeezed(), streamed.squeezed());
    let inner = matmul_layout(
        &rows_sq.dims,
        &streamed_sq.dims,
        &rows_sq.contracting,
        &streamed_sq.contracting,
        &rows_sq.batching,
        &streamed_sq.batching,
    )
    .map_err(|message| {
        // `matmul_layout` speaks of its own rhs with squeezed dim numbers: name what the
        // caller gave.
        let (which, name) = if lhs_streams {
            ("operand 0 (lhs)", "lhs")
        } else {
            ("operand 1 (rhs)", "rhs")
        };
        let why = if message.contains("must be adjacent") {
            "its contracting dims are not adjacent".to_string()
        } else if message.contains("must be the leading dims") {
            "its batching dims do not lead in order".to_string()
        } else {
            message
        };
        format!(
            "{which}, the streamed operand (the larger one, the rhs on a tie), must be laid \
             out as [batch dims, free dims, contracting dims, free dims] once its size-1 dims \
             are dropped, but {why} (shape {:?}, {name}_contracting_dims {:?}, \
             {name}_batching_dims {:?})",
            streamed.dims, streamed.contracting, streamed.batching
        )
    })?;
    Ok(DotF32Layout {
        out_dims,
        inner,
        lhs_streams,
    })
}
