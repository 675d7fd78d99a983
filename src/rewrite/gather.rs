//! Embedding gathers on an FP8 weight (for the `quantize_gathers` pass): `fp8xla_take` for a
//! per-tensor row lookup, else a gather of the FP8 bytes followed by a dequantize of only the
//! rows gathered.

use super::attr::{fmt_f32, parse_array_i64, GatherDims};
use super::emit::{with_props, Convert, Emitter, Scale};
use super::ir::{Dim, ElementType, Op, TensorType, Type};
use super::options::WeightSpec;
use super::quantize::fp8_element;

/// Whether a gather takes whole rows of dim 0 (an embedding lookup: `table[indices]`, the
/// indices being operand 1, of type s32|s64).
fn is_row_take(op: &Op, w: &TensorType) -> bool {
    row_take(op, w).is_some()
}

fn row_take(op: &Op, w: &TensorType) -> Option<()> {
    let g = op.prop("dimension_numbers").and_then(GatherDims::parse)?;
    let sizes = op.prop("slice_sizes").and_then(parse_array_i64)?;
    let idx = op.operand_types.get(1)?.as_tensor()?;
    if !matches!(
        idx.element,
        ElementType::Int {
            width: 32 | 64,
            unsigned: false
        }
    ) {
        return None;
    }
    let idx_rank = idx.rank() as i64;
    let batch_rank = match g.index_vector_dim {
        Some(d) if d == idx_rank => idx_rank,
        Some(d) if d == idx_rank - 1 && matches!(idx.dims.last(), Some(Dim::Static(1))) => d,
        _ => return None,
    };
    let full_rows = w.dims.iter().enumerate().all(|(d, n)| match (d, n) {
        (0, _) => sizes.first() == Some(&1),
        (d, Dim::Static(n)) => sizes.get(d) == Some(&(*n as i64)),
        (_, Dim::Dynamic) => false,
    });
    let trailing: Vec<i64> = (batch_rank..batch_rank + w.rank() as i64 - 1).collect();
    let plain = g.collapsed_slice_dims == [0]
        && g.start_index_map == [0]
        && g.operand_batching_dims.is_empty()
        && g.start_indices_batching_dims.is_empty()
        && g.offset_dims == trailing
        && sizes.len() == w.rank();
    (plain && full_rows).then_some(())
}

/// Replaces a row gather on an FP8 table with `fp8xla_take`: per tensor (`row_scales` None),
/// or per row (one scale per row of dim 0, a constant operand the call gathers with the rows).
fn take_rows(
    em: &mut Emitter,
    op: &Op,
    out: &TensorType,
    e8: &ElementType,
    scale: f32,
    row_scales: Option<&[f32]>,
) -> String {
    let take_element = match out.element {
        ElementType::F32 | ElementType::Bf16 => out.element.clone(),
        _ => ElementType::F32,
    };
    let take_ty = out.with_element(take_element.clone());
    let orig_name = op.results[0].name.clone();
    let taken = if take_element == out.element {
        orig_name.clone()
    } else {
        em.names.fresh()
    };
    let mut table_ty = op.operand_types[0].clone();
    if let Type::Tensor(t) = &mut table_ty {
        t.element = e8.clone();
    }
    let mut operands = vec![op.operands[0].clone(), op.operands[1].clone()];
    let mut operand_types = vec![table_ty, op.operand_types[1].clone()];
    let mut ops = vec![];
    if let Some(scales) = row_scales {
        let name = em.names.fresh();
        let (constant, ty) = em.constant(&name, scales, false, op.pos, &op.loc);
        ops.push(constant);
        operands.push(name);
        operand_types.push(Type::Tensor(ty));
    }
    let call = Op::simple(
        em.id(),
        op.pos,
        Some(&taken),
        "stablehlo.custom_call",
        operands,
        operand_types,
        vec![Type::Tensor(take_ty.clone())],
        op.loc.clone(),
    );
    ops.push(with_props(
        call,
        vec![
            ("api_version", "4 : i32".into()),
            (
                "backend_config",
                format!("{{scale = {} : f32}}", fmt_f32(scale)),
            ),
            ("call_target_name", "\"fp8xla_take\"".into()),
        ],
    ));
    if taken != orig_name {
        ops.push(Op::simple(
            em.id(),
            op.pos,
            Some(&orig_name),
            "stablehlo.convert",
            vec![taken],
            vec![Type::Tensor(take_ty)],
            vec![Type::Tensor(out.clone())],
            op.loc.clone(),
        ));
    }
    em.module.insert_before(op.id, ops);
    em.module.remove(op.id);
    let granularity = if row_scales.is_some() {
        "per-row"
    } else {
        "per-tensor"
    };
    format!("fp8xla_take: dequantizes only the {e8} rows it takes ({granularity})")
}

/// Gathers FP8 rows, then dequantizes only those rows.
pub(crate) fn rewrite_gather(
    em: &mut Emitter,
    id: u32,
    spec: &WeightSpec,
    w: &TensorType,
) -> Result<String, String> {
    let op = em.module.top.find(id).ok_or("gather vanished")?.clone();
    let out = op
        .result_types
        .first()
        .and_then(Type::as_tensor)
        .filter(|_| op.results.len() == 1 && op.results[0].count == 1)
        .ok_or("gather result is not one ranked tensor")?
        .clone();
    let e8 = fp8_element(spec.format);
    if let (Scale::PerChannel { dim: 0, scales }, true) = (&spec.scale, is_row_take(&op, w)) {
        return Ok(take_rows(em, &op, &out, &e8, 1.0, Some(scales)));
    }
    let channel = match &spec.scale {
        Scale::PerTensor(_) => None,
        Scale::PerChannel { dim, .. } => {
            let g = op
                .prop("dimension_numbers")
                .and_then(GatherDims::parse)
                .ok_or("gather without readable dimension numbers")?;
            let sizes = op
                .prop("slice_sizes")
                .and_then(parse_array_i64)
                .ok_or("gather without slice_sizes")?;
            let d = *dim as i64;
            if g.collapsed_slice_dims.contains(&d) || g.operand_batching_dims.contains(&d) {
                return Err(format!("per-channel dim {dim} is collapsed by the gather"));
            }
            if sizes.get(*dim).copied()
                != w.dims.get(*dim).map(|x| match x {
                    Dim::Static(n) => *n as i64,
                    Dim::Dynamic => -1,
                })
            {
                return Err(format!("the gather slices per-channel dim {dim}"));
            }
            let kept: Vec<i64> = (0..w.rank() as i64)
                .filter(|x| {
                    !g.collapsed_slice_dims.contains(x) && !g.operand_batching_dims.contains(x)
                })
                .collect();
            let rank = kept
                .iter()
                .position(|&x| x == d)
                .ok_or("channel dim not kept")?;
            let mut offs = g.offset_dims.clone();
            offs.sort_unstable();
            Some(*offs.get(rank).ok_or("offset_dims too short")? as usize)
        }
    };
    if let (Scale::PerTensor(scale), true) = (&spec.scale, is_row_take(&op, w)) {
        return Ok(take_rows(em, &op, &out, &e8, *scale, None));
    }
    // XLA's CPU backend has no FP8 gather: it converts the whole table to f16 (and hoists
    // that out of the decode loop). This gather runs on the bytes instead, bitcast to ui8
    // and back; XLA still copies the table for the bitcast, once per call of the module.
    let u8 = ElementType::Int {
        width: 8,
        unsigned: true,
    };
    let table = op
        .operands
        .first()
        .ok_or("gather without operands")?
        .clone();
    let table_ty = op
        .operand_types
        .first()
        .and_then(Type::as_tensor)
        .ok_or("gather operand is not a ranked tensor")?
        .with_element(e8.clone());
    let table_u8 = em.names.fresh();
    let to_bytes = Op::simple(
        em.id(),
        op.pos,
        Some(&table_u8),
        "stablehlo.bitcast_convert",
        vec![table],
        vec![Type::Tensor(table_ty.clone())],
        vec![Type::Tensor(table_ty.with_element(u8.clone()))],
        op.loc.clone(),
    );
    let rows_u8 = em.names.fresh();
    let rows = em.names.fresh();
    let orig_name = op.results[0].name.clone();
    let rows_ty = out.with_element(e8.clone());
    let mut ops = vec![Op::simple(
        em.id(),
        op.pos,
        Some(&rows),
        "stablehlo.bitcast_convert",
        vec![rows_u8.clone()],
        vec![Type::Tensor(rows_ty.with_element(u8.clone()))],
        vec![Type::Tensor(rows_ty.clone())],
        op.loc.clone(),
    )];
    ops.extend(em.dequantize(
        &rows,
        &rows_ty,
        &out.element,
        &spec.scale,
        channel,
        &orig_name,
        op.pos,
        &op.loc,
        Convert::Opaque,
    ));
    let g = em.module.top.find_mut(id).ok_or("gather vanished")?;
    g.results[0].name = rows_u8;
    g.operands[0] = table_u8;
    g.operand_types[0] = Type::Tensor(table_ty.with_element(u8.clone()));
    g.result_types[0] = Type::Tensor(rows_ty.with_element(u8));
    em.module.insert_after(id, ops);
    em.module.insert_before(id, vec![to_bytes]);
    Ok(format!(
        "gathers {e8} rows (as bytes), dequantizes only the gathered rows ({})",
        if channel.is_some() {
            "per-channel"
        } else {
            "per-tensor"
        }
    ))
}
