//! The FP8 KV cache: a float32 buffer that a `stablehlo.while` carries and updates with a
//! `dynamic_update_slice` in its body (a decode loop's KV cache) is carried as FP8 codes
//! instead, with one float32 scale per row of its last dimension (per position and head of a
//! `[batch, positions, heads, head_dim]` cache), carried next to it.
//!
//! - Loop entry: `fp8xla_quantize_rows` turns the cache (as the prefill left it) into codes
//!   and row scales.
//! - Writes: the written rows are quantized the same way; the codes and the scales are each
//!   written with a `dynamic_update_slice` (which `update_slices_in_place` then makes in place).
//! - Reads of rows (`dynamic_slice`, e.g. Keras-Hub's masked update reading the old row):
//!   the codes and scales are sliced and dequantized.
//! - Attention products (`dot_general` with the cache on one side): `fp8xla_dot_f32` reads the
//!   codes (its FP8 GEMV kernels, exact code values) and the row scales are applied on the
//!   small side: to the result when the cache's last dim is contracted (scores `keys . q`),
//!   to the other operand when the cache's positions are contracted (`values . p`). A product
//!   the custom call does not take reads a dequantized copy of the cache instead (reported).
//! - Loop exit: if the loop's result is used, it is dequantized there.
//!
//! Why row scales computed at run time rather than static per-head scales: no calibration is
//! needed (a long context cannot exceed a scale calibrated on short prompts), a row is
//! quantized once when written, and the scales cost 4 bytes per row (1.6 % of a 256-value FP8
//! row). The arithmetic equals the fake-quant reference: each row's `qdq` with the scale
//! `amax(row) / max(format)`, then float32 products.
//!
//! Candidates are the carried float32 values of rank 2 or more that the body writes with a
//! `dynamic_update_slice` and an attention product reads. A candidate that has any other use (in the loop's condition, nested regions, other ops
//! reading the cache, more than one write) stays float32; the report says why.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::attr::{array_i64, parse_array_i64, DotDims};
use super::decode_dot;
use super::emit::{with_props, Names};
use super::ir::{BlockArg, ElementType, Module, Op, Pos, TensorType, Type};
use super::loc_json;
use super::pipeline::{Context, Pass};
use super::quantize::fp8_element;
use super::RewriteError;
use crate::fp8::Format;
use crate::layout::{dot_f32_layout, DotSide};

/// The target that quantizes rows.
pub const QUANTIZE_ROWS: &str = "fp8xla_quantize_rows";

/// The pass `fp8_kv_cache` ([`fp8_kv_cache`]).
pub struct Fp8KvCache {
    /// The FP8 format of the cache.
    pub format: Format,
}

impl<S> Pass<S> for Fp8KvCache {
    fn name(&self) -> &'static str {
        "fp8_kv_cache"
    }

    fn run(&self, cx: &mut Context, _: &mut S) -> Result<(), RewriteError> {
        let report = fp8_kv_cache(&mut cx.module, &cx.aliases, self.format);
        cx.handled.extend(report);
        Ok(())
    }
}

/// How a product with the cache applies the row scales.
#[derive(Clone, Debug)]
enum DotPlan {
    /// `fp8xla_dot_f32` on the codes; the scales multiply the result, broadcast along these
    /// result dims (one per cache dim but the last).
    ScaleResult(Vec<i64>),
    /// `fp8xla_dot_f32` on the codes; the scales multiply the other operand first, broadcast
    /// along these of its dims.
    ScaleOther(Vec<i64>),
    /// A float32 `dot_general` on the dequantized cache (the reason why).
    Dequantized(String),
}

/// One cache of one loop, as found.
struct Cache {
    /// Index among the loop's carried values.
    index: usize,
    ty: TensorType,
    /// Ids of the row reads of the carried value.
    slices: Vec<u32>,
    /// Id of the write.
    write: u32,
    /// Products on the carried value or the written one: id, cache operand index, plan.
    dots: Vec<(u32, usize, DotPlan)>,
}

/// Rewrites every decode-loop KV cache of the module; one report entry per cache (kind
/// `fp8_kv_cache`, or `kv_cache_float` with the reason it stays float32) and one per product
/// that reads a dequantized copy.
pub fn fp8_kv_cache(
    module: &mut Module,
    aliases: &HashMap<String, String>,
    format: Format,
) -> Vec<Value> {
    let mut loops = Vec::new();
    for f in module.functions() {
        let fname = super::flow::func_name(f).unwrap_or_default();
        f.walk(&mut |o| {
            if o.name == "stablehlo.while" {
                loops.push((fname.clone(), o.id));
            }
        });
    }
    let mut names = Names::new(module);
    let mut report = Vec::new();
    for (fname, id) in loops {
        let Some(w) = module.top.find(id) else {
            continue;
        };
        let loc = loc_json(&w.loc, aliases);
        let mut caches = Vec::new();
        for (index, found) in find_caches(w) {
            match found {
                Ok(c) => caches.push(c),
                Err(reason) => report.push(json!({
                    "kind": "kv_cache_float", "function": fname, "loc": loc,
                    "detail": format!("loop-carried value {index} stays float32: {reason}"),
                })),
            }
        }
        for c in &caches {
            report.push(json!({
                "kind": "fp8_kv_cache", "function": fname, "loc": loc,
                "detail": format!(
                    "loop-carried {} → {} codes with per-row scales",
                    c.ty,
                    fp8_element(format)
                ),
            }));
            for (_, _, plan) in &c.dots {
                if let DotPlan::Dequantized(why) = plan {
                    report.push(json!({
                        "kind": "kv_cache_dequantized_read", "function": fname, "loc": loc,
                        "detail": why,
                    }));
                }
            }
        }
        if !caches.is_empty() {
            rewrite_loop(module, &mut names, id, &caches, format);
        }
    }
    report
}

fn tensor(t: &Type) -> Option<&TensorType> {
    t.as_tensor()
}

fn static_dims(t: &TensorType) -> Option<Vec<i64>> {
    t.static_shape()
        .map(|d| d.into_iter().map(|x| x as i64).collect())
}

/// Whether `op` or an op nested in it reads `value`.
fn reads(op: &Op, value: &str) -> bool {
    let mut found = false;
    op.walk(&mut |o| found |= o.operands.iter().any(|x| x == value));
    found
}

/// The loop's carried values that are KV caches (or why a written one is not).
fn find_caches(w: &Op) -> Vec<(usize, Result<Cache, String>)> {
    let (Some(cond), Some(body)) = (
        w.regions.first().and_then(|r| r.blocks.first()),
        w.regions.get(1).and_then(|r| r.blocks.first()),
    ) else {
        return Vec::new();
    };
    let Some(ret) = body.ops.last().filter(|o| o.name == "stablehlo.return") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (index, arg) in body.args.iter().enumerate() {
        let a = &arg.name;
        let writes: Vec<&Op> = body
            .ops
            .iter()
            .filter(|o| {
                o.name == "stablehlo.dynamic_update_slice"
                    && o.operands.first().is_some_and(|x| x == a)
            })
            .collect();
        let Some(ty) = tensor(&arg.ty).filter(|t| t.element == ElementType::F32) else {
            continue;
        };
        if writes.is_empty() || ty.rank() < 2 || static_dims(ty).is_none() {
            continue;
        }
        // A KV cache is read by an attention product; other carried buffers (e.g. outputs
        // collected step by step) are not caches.
        let written = writes[0].result_names();
        let read_by_dot = body.ops.iter().any(|o| {
            o.name == "stablehlo.dot_general"
                && o.operands.iter().any(|x| x == a || written.contains(x))
        });
        if !read_by_dot {
            continue;
        }
        out.push((index, classify(index, ty, a, &writes, cond, body, ret)));
    }
    out
}

fn classify(
    index: usize,
    ty: &TensorType,
    a: &str,
    writes: &[&Op],
    cond: &super::ir::Block,
    body: &super::ir::Block,
    ret: &Op,
) -> Result<Cache, String> {
    let rank = ty.rank();
    let dims = static_dims(ty).unwrap_or_default();
    if writes.len() != 1 {
        return Err(format!(
            "{} writes in the loop body (one expected)",
            writes.len()
        ));
    }
    let write = writes[0];
    let upd = write.operand_types.get(1).and_then(tensor);
    if upd.and_then(static_dims).and_then(|d| d.last().copied()) != dims.last().copied()
        || write.operand_types.len() != 2 + rank
        || write.result_types.len() != 1
    {
        return Err("the write does not cover whole rows of the last dim".into());
    }
    if cond.ops.iter().any(|o| reads(o, &cond.args[index].name)) {
        return Err("the loop condition reads it".into());
    }
    let written = write.result_names()[0].clone();
    let mut slices = Vec::new();
    let mut dots = Vec::new();
    for o in &body.ops {
        if o.id == write.id {
            continue;
        }
        let uses_a = o.operands.iter().filter(|x| *x == a).count();
        let uses_w = o.operands.iter().filter(|x| **x == written).count();
        let mut nested = false;
        o.walk_nested(&mut |x| nested |= x.operands.iter().any(|v| v == a || *v == written));
        if nested {
            return Err(format!("{} reads it in a nested region", o.name));
        }
        if uses_a + uses_w == 0 {
            continue;
        }
        if o.id == ret.id {
            if uses_a != 0 || uses_w != 1 || ret.operands.get(index) != Some(&written) {
                return Err("the loop does not carry the written cache on".into());
            }
            continue;
        }
        match o.name.as_str() {
            "stablehlo.dynamic_slice" if uses_a == 1 && uses_w == 0 && o.operands[0] == a => {
                if o.operand_types.len() != 1 + rank {
                    return Err("a row read with unexpected operands".into());
                }
                slices.push(o.id);
            }
            "stablehlo.dot_general" if uses_a + uses_w == 1 => {
                let side = o.operands.iter().position(|x| x == a || *x == written);
                let side = side.unwrap_or(0);
                dots.push((o.id, side, plan_dot(o, side, rank)));
            }
            other => {
                return Err(format!(
                    "{other} reads it (only dynamic_slice, dot_general and the loop's \
                     return keep it FP8)"
                ))
            }
        }
    }
    if ret.operands.get(index) != Some(&written) {
        return Err("the loop does not carry the written cache on".into());
    }
    Ok(Cache {
        index,
        ty: ty.clone(),
        slices,
        write: write.id,
        dots,
    })
}

/// How a product with the cache as operand `side` applies the cache's row scales.
fn plan_dot(o: &Op, side: usize, rank: usize) -> DotPlan {
    let refuse = |why: &str| DotPlan::Dequantized(format!("{}: {why}", o.name));
    let Some(dims) = o.prop("dot_dimension_numbers").and_then(DotDims::parse) else {
        return refuse("unreadable dimension numbers");
    };
    let props_ok = o.properties.as_ref().is_some_and(|p| {
        p.entries
            .iter()
            .all(|a| a.name == "dot_dimension_numbers" || a.name == "precision_config")
    });
    let shapes: Option<Vec<Vec<i64>>> = o
        .operand_types
        .iter()
        .map(|t| {
            tensor(t)
                .filter(|t| t.element == ElementType::F32)
                .and_then(static_dims)
        })
        .collect();
    let (Some(shapes), true, true) = (
        shapes,
        props_ok,
        o.attributes.as_ref().is_none_or(|a| a.entries.is_empty()) && o.result_types.len() == 1,
    ) else {
        return refuse("operands, properties or attributes the custom call does not take");
    };
    let (cb, cc, ob, oc) = if side == 0 {
        (
            &dims.lhs_batching,
            &dims.lhs_contracting,
            &dims.rhs_batching,
            &dims.rhs_contracting,
        )
    } else {
        (
            &dims.rhs_batching,
            &dims.rhs_contracting,
            &dims.lhs_batching,
            &dims.lhs_contracting,
        )
    };
    let sides = |d: &Vec<i64>, c: &Vec<i64>, b: &Vec<i64>| DotSide {
        dims: d.clone(),
        contracting: c.clone(),
        batching: b.clone(),
    };
    let lhs = sides(&shapes[0], &dims.lhs_contracting, &dims.lhs_batching);
    let rhs = sides(&shapes[1], &dims.rhs_contracting, &dims.rhs_batching);
    match dot_f32_layout(&lhs, &rhs) {
        Err(e) => return refuse(&format!("a layout fp8xla_dot_f32 refuses ({e})")),
        Ok(l) if l.lhs_streams != (side == 0) => {
            return refuse("the cache is not the larger operand")
        }
        Ok(_) => {}
    }
    let last = rank as i64 - 1;
    let lead = 0..last;
    if cc.contains(&last) {
        // Scores: every other cache dim is batching or free, and lands in the result.
        let lhs_free: Vec<i64> = (0..shapes[0].len() as i64)
            .filter(|d| !dims.lhs_batching.contains(d) && !dims.lhs_contracting.contains(d))
            .collect();
        let rhs_free: Vec<i64> = (0..shapes[1].len() as i64)
            .filter(|d| !dims.rhs_batching.contains(d) && !dims.rhs_contracting.contains(d))
            .collect();
        let nb = cb.len() as i64;
        let mut at = Vec::new();
        for d in lead {
            if let Some(t) = cb.iter().position(|x| *x == d) {
                at.push(t as i64);
            } else if cc.contains(&d) {
                return refuse("the cache's last dim and another are contracted");
            } else if side == 0 {
                at.push(nb + lhs_free.iter().position(|x| *x == d).unwrap_or(0) as i64);
            } else {
                let f = rhs_free.iter().position(|x| *x == d).unwrap_or(0);
                at.push(nb + lhs_free.len() as i64 + f as i64);
            }
        }
        DotPlan::ScaleResult(at)
    } else {
        // Weighted sums: every other cache dim is batching or contracted, paired with a dim
        // of the other operand.
        let mut at = Vec::new();
        for d in lead {
            if let Some(t) = cb.iter().position(|x| *x == d) {
                at.push(ob[t]);
            } else if let Some(t) = cc.iter().position(|x| *x == d) {
                at.push(oc[t]);
            } else {
                return refuse("the cache's last dim and another are free");
            }
        }
        DotPlan::ScaleOther(at)
    }
}

/// Builds ops with fresh ids and names at the position of the op they stand for.
struct Build<'a> {
    module: &'a mut Module,
    names: &'a mut Names,
    pos: Pos,
    loc: Option<String>,
    ops: Vec<Op>,
}

impl Build<'_> {
    fn op(
        &mut self,
        result: Option<String>,
        name: &str,
        operands: Vec<String>,
        operand_types: Vec<Type>,
        result_ty: Type,
        props: Vec<(&str, String)>,
    ) -> String {
        let result = result.unwrap_or_else(|| self.names.fresh());
        let op = Op::simple(
            self.module.fresh_id(),
            self.pos,
            Some(&result),
            name,
            operands,
            operand_types,
            vec![result_ty],
            self.loc.clone(),
        );
        self.ops.push(if props.is_empty() {
            op
        } else {
            with_props(op, props)
        });
        result
    }

    /// `%q:2 = fp8xla_quantize_rows(x)`; returns the names of the codes and the scales.
    fn quantize_rows(&mut self, x: &str, ty: &TensorType, format: Format) -> (String, String) {
        let name = self.names.fresh();
        let mut op = Op::simple(
            self.module.fresh_id(),
            self.pos,
            Some(&name),
            "stablehlo.custom_call",
            vec![x.to_string()],
            vec![Type::Tensor(ty.clone())],
            vec![
                Type::Tensor(ty.with_element(fp8_element(format))),
                Type::Tensor(row_scales(ty)),
            ],
            self.loc.clone(),
        );
        op.results[0].count = 2;
        self.ops.push(with_props(
            op,
            vec![
                ("api_version", "4 : i32".to_string()),
                ("backend_config", "{}".to_string()),
                ("call_target_name", format!("\"{QUANTIZE_ROWS}\"")),
            ],
        ));
        (format!("{name}#0"), format!("{name}#1"))
    }

    /// `scales` (dims = the cache's but the last) broadcast to `to`, the scale of cache dim
    /// `j` along dim `at[j]` of `to` (transposed first when `at` is not increasing).
    fn broadcast_scales(
        &mut self,
        scales: &str,
        sty: &TensorType,
        at: &[i64],
        to: &TensorType,
    ) -> String {
        let mut order: Vec<usize> = (0..at.len()).collect();
        order.sort_by_key(|&j| at[j]);
        let (mut src, mut src_ty) = (scales.to_string(), sty.clone());
        if order.iter().enumerate().any(|(i, &j)| i != j) {
            let perm: Vec<i64> = order.iter().map(|&j| j as i64).collect();
            let t = TensorType {
                dims: order.iter().map(|&j| sty.dims[j]).collect(),
                element: ElementType::F32,
                encoding: None,
            };
            src = self.op(
                None,
                "stablehlo.transpose",
                vec![src],
                vec![Type::Tensor(src_ty)],
                Type::Tensor(t.clone()),
                vec![("permutation", array_i64(&perm))],
            );
            src_ty = t;
        }
        let sorted: Vec<i64> = order.iter().map(|&j| at[j]).collect();
        self.op(
            None,
            "stablehlo.broadcast_in_dim",
            vec![src],
            vec![Type::Tensor(src_ty)],
            Type::Tensor(to.clone()),
            vec![("broadcast_dimensions", array_i64(&sorted))],
        )
    }

    /// `out = f32(codes) * broadcast(scales)` for codes of shape `ty` (FP8) and row scales.
    fn dequantize(
        &mut self,
        codes: &str,
        ty: &TensorType,
        scales: &str,
        out: Option<String>,
    ) -> String {
        let f32_ty = ty.with_element(ElementType::F32);
        let x = self.op(
            None,
            "stablehlo.convert",
            vec![codes.to_string()],
            vec![Type::Tensor(ty.clone())],
            Type::Tensor(f32_ty.clone()),
            vec![],
        );
        let at: Vec<i64> = (0..ty.rank() as i64 - 1).collect();
        let s = self.broadcast_scales(scales, &row_scales(ty), &at, &f32_ty);
        self.op(
            out,
            "stablehlo.multiply",
            vec![x, s],
            vec![Type::Tensor(f32_ty.clone()), Type::Tensor(f32_ty.clone())],
            Type::Tensor(f32_ty),
            vec![],
        )
    }
}

/// The type of the row scales of a tensor: its dims but the last, float32.
fn row_scales(ty: &TensorType) -> TensorType {
    TensorType {
        dims: ty.dims[..ty.rank().saturating_sub(1)].to_vec(),
        element: ElementType::F32,
        encoding: None,
    }
}

fn retype(t: &mut Type, element: ElementType) {
    if let Type::Tensor(x) = t {
        x.element = element;
    }
}

/// Rewrites loop `id` for its `caches` (see the module documentation).
fn rewrite_loop(module: &mut Module, names: &mut Names, id: u32, caches: &[Cache], format: Format) {
    let fp8 = fp8_element(format);
    let (pos, loc, entry_values, result_names) = {
        let w = module.top.find(id).expect("the loop exists");
        (w.pos, w.loc.clone(), w.operands.clone(), w.result_names())
    };
    // Loop entry: quantize each cache as it comes in.
    let mut b = Build {
        module: &mut *module,
        names: &mut *names,
        pos,
        loc: loc.clone(),
        ops: Vec::new(),
    };
    let entries: Vec<(String, String)> = caches
        .iter()
        .map(|c| b.quantize_rows(&entry_values[c.index], &c.ty, format))
        .collect();
    let entry_ops = std::mem::take(&mut b.ops);
    let body_scale_args: Vec<String> = caches.iter().map(|_| b.names.fresh()).collect();
    let cond_scale_args: Vec<String> = caches.iter().map(|_| b.names.fresh()).collect();
    module.insert_before(id, entry_ops);
    // The loop's signature: codes instead of floats, the scales carried last.
    let carried = {
        let w = module.top.find_mut(id).expect("the loop exists");
        let carried = w.result_types.len();
        for (c, (codes, scales)) in caches.iter().zip(&entries) {
            let sty = Type::Tensor(row_scales(&c.ty));
            w.operands[c.index] = codes.clone();
            retype(&mut w.operand_types[c.index], fp8.clone());
            retype(&mut w.result_types[c.index], fp8.clone());
            w.operands.push(scales.clone());
            w.operand_types.push(sty.clone());
            w.result_types.push(sty);
        }
        let total: usize = w.result_types.len();
        if let Some(g) = w.results.first_mut() {
            g.count = total;
            g.explicit_count = true;
        }
        for (r, extra) in [(0, &cond_scale_args), (1, &body_scale_args)] {
            let block = &mut w.regions[r].blocks[0];
            for (c, name) in caches.iter().zip(extra) {
                retype(&mut block.args[c.index].ty, fp8.clone());
                block.args.push(BlockArg {
                    name: name.clone(),
                    ty: Type::Tensor(row_scales(&c.ty)),
                    loc: block.args[c.index].loc.clone(),
                });
            }
        }
        carried
    };
    // The body.
    for (c, s_arg) in caches.iter().zip(&body_scale_args) {
        rewrite_body(module, names, id, c, s_arg, format);
    }
    // Results whose name changed (a loop of one result now has a group of them).
    let now = module.top.find(id).expect("the loop exists").result_names();
    for (old, new) in result_names.iter().zip(&now) {
        if old != new {
            rename_after(module, id, old, new);
        }
    }
    // Loop exit: dequantize a result that is used after the loop.
    for (k, c) in caches.iter().enumerate() {
        let old = now[c.index].clone();
        let used = {
            let (block, i) = module
                .top
                .find_parent_mut(id)
                .expect("the loop has a parent");
            block.ops[i + 1..].iter().any(|o| reads(o, &old))
        };
        if !used {
            continue;
        }
        let (codes, scales) = (now[c.index].clone(), now[carried + k].clone());
        let fresh = names.fresh();
        let mut b = Build {
            module: &mut *module,
            names: &mut *names,
            pos,
            loc: loc.clone(),
            ops: Vec::new(),
        };
        let qty = c.ty.with_element(fp8.clone());
        b.dequantize(&codes, &qty, &scales, Some(fresh.clone()));
        let ops = std::mem::take(&mut b.ops);
        rename_after(module, id, &old, &fresh);
        let (block, i) = module
            .top
            .find_parent_mut(id)
            .expect("the loop has a parent");
        block.ops.splice(i + 1..i + 1, ops);
    }
}

/// Renames the uses of `old` by the ops after op `id` in its block (and ops nested in them).
fn rename_after(module: &mut Module, id: u32, old: &str, new: &str) {
    let (block, i) = module.top.find_parent_mut(id).expect("the op has a parent");
    for o in &mut block.ops[i + 1..] {
        o.walk_mut(&mut |x| {
            for v in &mut x.operands {
                if v == old {
                    *v = new.to_string();
                }
            }
        });
    }
}

fn rewrite_body(
    module: &mut Module,
    names: &mut Names,
    id: u32,
    c: &Cache,
    s_arg: &str,
    format: Format,
) {
    let fp8 = fp8_element(format);
    let qty = c.ty.with_element(fp8.clone());
    let sty = row_scales(&c.ty);
    let a = {
        let w = module.top.find(id).expect("the loop exists");
        w.regions[1].blocks[0].args[c.index].name.clone()
    };
    // Row reads: slice codes and scales, dequantize under the old name.
    for &sid in &c.slices {
        let o = module.top.find(sid).expect("the read exists").clone();
        let out_ty = tensor(&o.result_types[0]).expect("a tensor result").clone();
        let sizes = o
            .prop("slice_sizes")
            .and_then(parse_array_i64)
            .unwrap_or_default();
        let mut b = Build {
            module: &mut *module,
            names: &mut *names,
            pos: o.pos,
            loc: o.loc.clone(),
            ops: Vec::new(),
        };
        let rank = c.ty.rank();
        let codes_ty = out_ty.with_element(fp8.clone());
        let codes = b.op(
            None,
            "stablehlo.dynamic_slice",
            o.operands.clone(),
            std::iter::once(Type::Tensor(qty.clone()))
                .chain(o.operand_types[1..].iter().cloned())
                .collect(),
            Type::Tensor(codes_ty.clone()),
            vec![("slice_sizes", array_i64(&sizes))],
        );
        let scales = b.op(
            None,
            "stablehlo.dynamic_slice",
            std::iter::once(s_arg.to_string())
                .chain(o.operands[1..rank].iter().cloned())
                .collect(),
            std::iter::once(Type::Tensor(sty.clone()))
                .chain(o.operand_types[1..rank].iter().cloned())
                .collect(),
            Type::Tensor(row_scales(&out_ty)),
            vec![("slice_sizes", array_i64(&sizes[..rank - 1]))],
        );
        let old = o.result_names()[0].clone();
        b.dequantize(&codes, &codes_ty, &scales, Some(old));
        let ops = std::mem::take(&mut b.ops);
        module.insert_before(sid, ops);
        module.remove(sid);
    }
    // The write: quantize the rows, write codes and scales.
    let wop = module.top.find(c.write).expect("the write exists").clone();
    let upd_ty = tensor(&wop.operand_types[1])
        .expect("a tensor update")
        .clone();
    let mut b = Build {
        module: &mut *module,
        names: &mut *names,
        pos: wop.pos,
        loc: wop.loc.clone(),
        ops: Vec::new(),
    };
    let (uq, us) = b.quantize_rows(&wop.operands[1], &upd_ty, format);
    let before = std::mem::take(&mut b.ops);
    let rank = c.ty.rank();
    let written_scales = b.op(
        None,
        "stablehlo.dynamic_update_slice",
        [s_arg.to_string(), us]
            .into_iter()
            .chain(wop.operands[2..2 + rank - 1].iter().cloned())
            .collect(),
        [Type::Tensor(sty.clone()), Type::Tensor(row_scales(&upd_ty))]
            .into_iter()
            .chain(wop.operand_types[2..2 + rank - 1].iter().cloned())
            .collect(),
        Type::Tensor(sty.clone()),
        vec![],
    );
    let after = std::mem::take(&mut b.ops);
    {
        let o = module.top.find_mut(c.write).expect("the write exists");
        o.operands[1] = uq;
        o.operand_types[0] = Type::Tensor(qty.clone());
        o.operand_types[1] = Type::Tensor(upd_ty.with_element(fp8.clone()));
        o.result_types[0] = Type::Tensor(qty.clone());
    }
    module.insert_before(c.write, before);
    module.insert_after(c.write, after);
    // The return carries the written codes and scales.
    {
        let w = module.top.find_mut(id).expect("the loop exists");
        let ret = w.regions[1].blocks[0].ops.last_mut().expect("a return");
        retype(&mut ret.operand_types[c.index], fp8.clone());
        ret.operands.push(written_scales.clone());
        ret.operand_types.push(Type::Tensor(sty.clone()));
    }
    // The products.
    for (did, side, plan) in &c.dots {
        let o = module.top.find(*did).expect("the product exists").clone();
        let scales = if o.operands[*side] == a {
            s_arg.to_string()
        } else {
            written_scales.clone()
        };
        let res_ty = tensor(&o.result_types[0]).expect("a tensor result").clone();
        let other = 1 - side;
        let other_ty = tensor(&o.operand_types[other]).expect("a tensor").clone();
        let mut b = Build {
            module: &mut *module,
            names: &mut *names,
            pos: o.pos,
            loc: o.loc.clone(),
            ops: Vec::new(),
        };
        let mut new = o.clone();
        new.operand_types[*side] = Type::Tensor(qty.clone());
        let mut after = Vec::new();
        match plan {
            DotPlan::ScaleOther(at) => {
                let s = b.broadcast_scales(&scales, &sty, at, &other_ty);
                let y = b.op(
                    None,
                    "stablehlo.multiply",
                    vec![o.operands[other].clone(), s],
                    vec![
                        Type::Tensor(other_ty.clone()),
                        Type::Tensor(other_ty.clone()),
                    ],
                    Type::Tensor(other_ty.clone()),
                    vec![],
                );
                new.operands[other] = y;
                to_fp8_call(&mut new);
            }
            DotPlan::ScaleResult(at) => {
                let raw = b.names.fresh();
                let old = std::mem::replace(&mut new.results[0].name, raw.clone());
                to_fp8_call(&mut new);
                let mut tail = Build {
                    module: &mut *b.module,
                    names: &mut *b.names,
                    pos: o.pos,
                    loc: o.loc.clone(),
                    ops: Vec::new(),
                };
                let s = tail.broadcast_scales(&scales, &sty, at, &res_ty);
                tail.op(
                    Some(old),
                    "stablehlo.multiply",
                    vec![raw, s],
                    vec![Type::Tensor(res_ty.clone()), Type::Tensor(res_ty.clone())],
                    Type::Tensor(res_ty.clone()),
                    vec![],
                );
                after = tail.ops;
            }
            DotPlan::Dequantized(_) => {
                let f = b.dequantize(&o.operands[*side], &qty, &scales, None);
                new.operands[*side] = f;
                new.operand_types[*side] = Type::Tensor(c.ty.clone());
            }
        }
        let before = std::mem::take(&mut b.ops);
        *module.top.find_mut(*did).expect("the product exists") = new;
        module.insert_before(*did, before);
        module.insert_after(*did, after);
    }
}

/// A `dot_general` (its operand types already updated) as `fp8xla_dot_f32` on the codes.
fn to_fp8_call(op: &mut Op) {
    let dims = op
        .prop("dot_dimension_numbers")
        .and_then(DotDims::parse)
        .expect("planned products have dimension numbers");
    decode_dot::to_custom_call(op, &dims);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::inplace::update_slices_in_place;
    use crate::rewrite::{parse_module, print_module, verify};

    /// A decode loop carrying two caches and a counter. Cache 0 is Keras-Hub's: its old row
    /// is read, the new row written, and both attention products read the written cache.
    /// Cache 1 is also read by an `add`: it stays float32. The loop's cache 0 is returned.
    const MODULE: &str = r#""builtin.module"() <{sym_name = "m"}> ({
  "func.func"() <{function_type = (tensor<1x8x1x4xf32>, tensor<1x1x1x4xf32>, tensor<1x1x1x2x4xf32>, tensor<1x1x2x1x8xf32>) -> tensor<1x8x1x4xf32>, sym_name = "main", sym_visibility = "public"}> ({
  ^bb0(%arg0: tensor<1x8x1x4xf32>, %arg1: tensor<1x1x1x4xf32>, %arg2: tensor<1x1x1x2x4xf32>, %arg3: tensor<1x1x2x1x8xf32>):
    %0 = "stablehlo.constant"() <{value = dense<0> : tensor<i32>}> : () -> tensor<i32>
    %1:3 = "stablehlo.while"(%arg0, %arg0, %0) ({
    ^bb0(%arg4: tensor<1x8x1x4xf32>, %arg5: tensor<1x8x1x4xf32>, %arg6: tensor<i32>):
      %2 = "stablehlo.constant"() <{value = dense<8> : tensor<i32>}> : () -> tensor<i32>
      %3 = "stablehlo.compare"(%arg6, %2) <{comparison_direction = #stablehlo<comparison_direction LT>}> : (tensor<i32>, tensor<i32>) -> tensor<i1>
      "stablehlo.return"(%3) : (tensor<i1>) -> ()
    }, {
    ^bb0(%arg7: tensor<1x8x1x4xf32>, %arg8: tensor<1x8x1x4xf32>, %arg9: tensor<i32>):
      %4 = "stablehlo.dynamic_slice"(%arg7, %0, %arg9, %0, %0) <{slice_sizes = array<i64: 1, 1, 1, 4>}> : (tensor<1x8x1x4xf32>, tensor<i32>, tensor<i32>, tensor<i32>, tensor<i32>) -> tensor<1x1x1x4xf32>
      %5 = "stablehlo.add"(%4, %arg1) : (tensor<1x1x1x4xf32>, tensor<1x1x1x4xf32>) -> tensor<1x1x1x4xf32>
      %6 = "stablehlo.dynamic_update_slice"(%arg7, %5, %0, %arg9, %0, %0) : (tensor<1x8x1x4xf32>, tensor<1x1x1x4xf32>, tensor<i32>, tensor<i32>, tensor<i32>, tensor<i32>) -> tensor<1x8x1x4xf32>
      %7 = "stablehlo.dot_general"(%6, %arg2) <{dot_dimension_numbers = #stablehlo.dot<lhs_batching_dimensions = [0, 2], rhs_batching_dimensions = [0, 2], lhs_contracting_dimensions = [3], rhs_contracting_dimensions = [4]>}> : (tensor<1x8x1x4xf32>, tensor<1x1x1x2x4xf32>) -> tensor<1x1x8x1x2xf32>
      %8 = "stablehlo.dot_general"(%6, %arg3) <{dot_dimension_numbers = #stablehlo.dot<lhs_batching_dimensions = [0, 2], rhs_batching_dimensions = [0, 1], lhs_contracting_dimensions = [1], rhs_contracting_dimensions = [4]>}> : (tensor<1x8x1x4xf32>, tensor<1x1x2x1x8xf32>) -> tensor<1x1x4x2x1xf32>
      %9 = "stablehlo.dynamic_update_slice"(%arg8, %arg1, %0, %arg9, %0, %0) : (tensor<1x8x1x4xf32>, tensor<1x1x1x4xf32>, tensor<i32>, tensor<i32>, tensor<i32>, tensor<i32>) -> tensor<1x8x1x4xf32>
      %10 = "stablehlo.add"(%9, %arg8) : (tensor<1x8x1x4xf32>, tensor<1x8x1x4xf32>) -> tensor<1x8x1x4xf32>
      %13 = "stablehlo.dot_general"(%9, %arg2) <{dot_dimension_numbers = #stablehlo.dot<lhs_batching_dimensions = [0, 2], rhs_batching_dimensions = [0, 2], lhs_contracting_dimensions = [3], rhs_contracting_dimensions = [4]>}> : (tensor<1x8x1x4xf32>, tensor<1x1x1x2x4xf32>) -> tensor<1x1x8x1x2xf32>
      %11 = "stablehlo.constant"() <{value = dense<1> : tensor<i32>}> : () -> tensor<i32>
      %12 = "stablehlo.add"(%arg9, %11) : (tensor<i32>, tensor<i32>) -> tensor<i32>
      "stablehlo.return"(%6, %10, %12) : (tensor<1x8x1x4xf32>, tensor<1x8x1x4xf32>, tensor<i32>) -> ()
    }) : (tensor<1x8x1x4xf32>, tensor<1x8x1x4xf32>, tensor<i32>) -> (tensor<1x8x1x4xf32>, tensor<1x8x1x4xf32>, tensor<i32>)
    "func.return"(%1#0) : (tensor<1x8x1x4xf32>) -> ()
  }) : () -> ()
}) : () -> ()
"#;

    fn targets(m: &Module) -> Vec<String> {
        let mut t = Vec::new();
        m.top.walk(&mut |o| {
            if let Some(n) = o.prop("call_target_name") {
                t.push(n.trim_matches('"').to_string());
            }
        });
        t
    }

    #[test]
    fn the_written_cache_becomes_fp8_and_the_other_stays_float() {
        let mut m = parse_module(MODULE).expect("test module parses");
        let report = fp8_kv_cache(&mut m, &HashMap::new(), Format::E4m3fn);
        verify(&m).unwrap_or_else(|e| panic!("{e}\n{}", print_module(&m)));
        let kinds: Vec<&str> = report.iter().map(|r| r["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, vec!["kv_cache_float", "fp8_kv_cache"], "{report:#?}");
        let why = report[0]["detail"].as_str().unwrap();
        assert!(
            why.contains("value 1") && why.contains("stablehlo.add reads it"),
            "{why}"
        );
        assert_eq!(
            targets(&m),
            vec![
                QUANTIZE_ROWS, // loop entry
                QUANTIZE_ROWS, // the written row
                decode_dot::TARGET,
                decode_dot::TARGET
            ]
        );
        let text = print_module(&m);
        // Carried: codes of cache 0, float cache 1, the counter, then cache 0's row scales.
        assert!(text.contains(
            "-> (tensor<1x8x1x4xf8E4M3FN>, tensor<1x8x1x4xf32>, tensor<i32>, tensor<1x8x1xf32>)"
        ));
        // The scores are scaled after the product, the probabilities before it (through a
        // transpose: the cache's [b, t, h] scales run along p's dims [0, 4, 1]).
        assert!(text.contains("permutation = array<i64: 0, 2, 1>"), "{text}");
        assert!(
            text.contains("broadcast_dimensions = array<i64: 0, 1, 4>"),
            "{text}"
        );
        assert!(
            !text.contains("broadcast_dimensions = array<i64: 0, 2, 1>"),
            "{text}"
        );
        // The returned cache is dequantized after the loop.
        assert!(!text.contains("\"func.return\"(%1#0)"), "{text}");
        // update_slices_in_place then writes codes and scales in place.
        let inplace = update_slices_in_place(&mut m, &HashMap::new());
        assert_eq!(inplace.len(), 3, "{inplace:#?}");
        verify(&m).expect("verifies after update_slices_in_place");
        parse_module(&print_module(&m)).expect("the result parses again");
    }

    #[test]
    fn a_cache_the_condition_reads_stays_float() {
        let text = MODULE.replace(
            "%3 = \"stablehlo.compare\"(%arg6, %2)",
            "%14 = \"stablehlo.reduce_precision\"(%arg4) <{exponent_bits = 8 : i32, mantissa_bits = 23 : i32}> : (tensor<1x8x1x4xf32>) -> tensor<1x8x1x4xf32>\n      %3 = \"stablehlo.compare\"(%arg6, %2)",
        );
        let mut m = parse_module(&text).expect("test module parses");
        let before = print_module(&m);
        let report = fp8_kv_cache(&mut m, &HashMap::new(), Format::E5m2);
        assert_eq!(report.len(), 2, "{report:#?}");
        assert!(
            report.iter().all(|r| r["kind"] == "kv_cache_float"),
            "{report:#?}"
        );
        assert!(report[0]["detail"]
            .as_str()
            .unwrap()
            .contains("the loop condition reads it"));
        assert_eq!(print_module(&m), before, "nothing changed");
    }
}
