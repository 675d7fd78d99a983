//! Loop-carried buffers updated in place: a `stablehlo.dynamic_update_slice` in the body of a
//! `stablehlo.while` whose operand is a value the loop carries (a KV cache in a decode loop)
//! becomes the `fp8xla_update_slice` custom call, whose result aliases that operand.
//!
//! Why: XLA's CPU backend fuses such an update into each of its consumers (the loop's next
//! state and the attention that reads the cache), and every in-place fusion then needs a
//! private copy of the cache: four copies of every cache per decode step in Keras-Hub's
//! Gemma3, about a quarter of an FP8 decode step. A custom call cannot be duplicated, and its
//! declared alias lets XLA write the row where the cache lies. Updates elsewhere (e.g. seeding
//! the cache from the prompt) are left to XLA.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};

use super::flow::func_name;
use super::ir::{Attr, AttrDict, ElementType, Module, Op, Type};
use super::loc_json;

/// The target the updates become.
pub const TARGET: &str = "fp8xla_update_slice";

/// Rewrites every in-loop update of a loop-carried value; returns one report entry per update.
pub fn update_slices_in_place(
    module: &mut Module,
    aliases: &HashMap<String, String>,
) -> Vec<Value> {
    let mut report = Vec::new();
    for region in &mut module.top.regions {
        for block in &mut region.blocks {
            for func in block.ops.iter_mut().filter(|o| o.name == "func.func") {
                let fname = func_name(func).unwrap_or_default();
                func.walk_mut(&mut |op| {
                    if op.name != "stablehlo.while" {
                        return;
                    }
                    let Some(body) = op.regions.get_mut(1).and_then(|r| r.blocks.first_mut())
                    else {
                        return;
                    };
                    let carried: HashSet<String> =
                        body.args.iter().map(|a| a.name.clone()).collect();
                    for o in &mut body.ops {
                        if o.name == "stablehlo.dynamic_update_slice"
                            && o.operands.first().is_some_and(|x| carried.contains(x))
                            && supported(o)
                        {
                            to_custom_call(o);
                            report.push(json!({
                                "kind": "update_slice_in_place", "function": fname,
                                "loc": loc_json(&o.loc, aliases),
                                "detail": format!(
                                    "dynamic_update_slice of a loop-carried {} → {TARGET}",
                                    o.operand_types[0]
                                ),
                            }));
                        }
                    }
                });
            }
        }
    }
    report
}

/// Whether `fp8xla_update_slice` takes this update: static shapes, an element type it knows,
/// int32/int64 start indices, and no properties or attributes it would drop.
fn supported(op: &Op) -> bool {
    let tensor = |t: &Type| {
        t.as_tensor()
            .filter(|t| t.static_shape().is_some())
            .cloned()
    };
    let (Some(operand), Some(update)) = (
        op.operand_types.first().and_then(tensor),
        op.operand_types.get(1).and_then(tensor),
    ) else {
        return false;
    };
    let known = matches!(
        operand.element,
        ElementType::F32
            | ElementType::F64
            | ElementType::Bf16
            | ElementType::F16
            | ElementType::F8E4M3FN
            | ElementType::F8E5M2
            | ElementType::Int {
                width: 1 | 8 | 32 | 64,
                ..
            }
    );
    let index_ok = |t: &Type| {
        t.as_tensor().is_some_and(|t| {
            t.dims.is_empty()
                && matches!(
                    t.element,
                    ElementType::Int {
                        width: 32 | 64,
                        unsigned: false
                    }
                )
        })
    };
    known
        && update.element == operand.element
        && update.rank() == operand.rank()
        && op.operand_types.len() == 2 + operand.rank()
        && op.operand_types[2..].iter().all(index_ok)
        && op.result_types.len() == 1
        && op.properties.as_ref().is_none_or(|p| p.entries.is_empty())
        && op.attributes.as_ref().is_none_or(|a| a.entries.is_empty())
        && op.regions.is_empty()
}

/// The update as the custom call (same operands, types, result and location).
fn to_custom_call(op: &mut Op) {
    op.name = "stablehlo.custom_call".to_string();
    let props = [
        ("api_version", "4 : i32".to_string()),
        ("backend_config", "{}".to_string()),
        ("call_target_name", format!("\"{TARGET}\"")),
        (
            "output_operand_aliases",
            "[#stablehlo.output_operand_alias<output_tuple_indices = [], operand_index = 0, \
             operand_tuple_indices = []>]"
                .to_string(),
        ),
    ];
    op.properties = Some(AttrDict {
        entries: props
            .into_iter()
            .map(|(name, value)| Attr {
                name: name.to_string(),
                value: Some(value),
            })
            .collect(),
    });
}
