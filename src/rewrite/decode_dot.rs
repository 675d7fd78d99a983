//! Decode-shaped float32 products: a `stablehlo.dot_general` of two float32 tensors where the
//! smaller side has at most `MAX_ROWS` rows (free elements per batch) and the larger one is
//! large becomes the `fp8xla_dot_f32` custom call, whose GEMV kernels read the large operand
//! once, front to back, in the layout it has.
//!
//! Why: in a decode step those are the products of attention with the KV cache (Gemma3:
//! `keys[1, 640, 1, 256] . q` and `values[1, 640, 1, 256] . p`, per layer and step). XLA's
//! CPU backend copies every value cache into a transposed layout for its GEMM and then runs a
//! general matrix product on a 4-column operand; the two cost about as much as reading the
//! caches several times over. The float32 arithmetic is unchanged (float32 products, float32
//! sums; only the order of the additions differs).
//!
//! Not rewritten: products with bfloat16 or other types, dynamic shapes, an `algorithm` or any
//! property other than the dimension numbers and `precision_config` (float32 sums meet every
//! precision), small large operands (under `MIN_STREAMED_BYTES`, where a custom call's
//! overhead would dominate; option
//! `decode_dots_min_bytes`), and layouts the custom call refuses.

use serde_json::{json, Value};
use std::collections::HashMap;

use super::attr::{array_i64, DotDims};
use super::emit::set_props;
use super::flow::walk_functions_mut;
use super::ir::{ElementType, Module, Op};
use super::loc_json;
use super::pipeline::{Context, Pass};
use crate::layout::{dot_f32_layout, DotSide};

/// The target the products become.
pub const TARGET: &str = "fp8xla_dot_f32";
/// Most rows (per batch) on the small side: the GEMV kernels' limit.
const MAX_ROWS: i64 = 4;
/// Least size of the large operand by default (option `decode_dots_min_bytes`).
pub const MIN_STREAMED_BYTES: usize = 64 << 10;

/// The pass `decode_dots` ([`decode_dots`]), run alone or by `quantize`.
pub struct DecodeDots {
    /// The least size of the large operand, in bytes.
    pub min_bytes: usize,
}

impl<S> Pass<S> for DecodeDots {
    fn name(&self) -> &'static str {
        "decode_dots"
    }

    fn run(&self, cx: &mut Context, _: &mut S) -> Result<(), super::RewriteError> {
        let report = decode_dots(&mut cx.module, &cx.aliases, self.min_bytes);
        cx.handled.extend(report);
        Ok(())
    }
}

/// Rewrites every decode-shaped float32 product of the module; one report entry each.
pub fn decode_dots(
    module: &mut Module,
    aliases: &HashMap<String, String>,
    min_bytes: usize,
) -> Vec<Value> {
    let mut report = Vec::new();
    walk_functions_mut(module, &mut |fname, op| {
        let Some(dims) = decode_shaped(op, min_bytes) else {
            return;
        };
        let detail = format!(
            "dot_general {} x {} → {TARGET}",
            op.operand_types[0], op.operand_types[1]
        );
        to_custom_call(op, &dims);
        report.push(json!({
            "kind": "f32_dot_gemv", "function": fname,
            "loc": loc_json(&op.loc, aliases), "detail": detail,
        }));
    });
    report
}

/// The dimension numbers of a product this pass takes.
fn decode_shaped(op: &Op, min_bytes: usize) -> Option<DotDims> {
    if op.name != "stablehlo.dot_general"
        || op.operand_types.len() != 2
        || op.result_types.len() != 1
        || !op.regions.is_empty()
        || op
            .attributes
            .as_ref()
            .is_some_and(|a| !a.entries.is_empty())
    {
        return None;
    }
    let props = op.properties.as_ref()?;
    if props
        .entries
        .iter()
        .any(|a| a.name != "dot_dimension_numbers" && a.name != "precision_config")
    {
        return None;
    }
    let dims = DotDims::parse(op.prop("dot_dimension_numbers")?)?;
    let f32_shape = |t: &super::ir::Type| {
        t.as_tensor()
            .filter(|t| t.element == ElementType::F32)
            .and_then(|t| t.static_shape())
    };
    let (lhs, rhs) = (
        f32_shape(&op.operand_types[0])?,
        f32_shape(&op.operand_types[1])?,
    );
    f32_shape(&op.result_types[0])?;
    if dims.lhs_contracting.is_empty() {
        return None;
    }
    let side = |d: Vec<u64>, contracting: &[i64], batching: &[i64]| DotSide {
        dims: d.iter().map(|&x| x as i64).collect(),
        contracting: contracting.to_vec(),
        batching: batching.to_vec(),
    };
    let l = side(lhs, &dims.lhs_contracting, &dims.lhs_batching);
    let r = side(rhs, &dims.rhs_contracting, &dims.rhs_batching);
    let plan = dot_f32_layout(&l, &r).ok()?;
    let streamed = if plan.lhs_streams { &l } else { &r };
    let bytes = streamed.dims.iter().product::<i64>() * 4;
    // A KN operand narrower than a vector would run on the kernels' scalar tails.
    let vector_wide = plan.inner.inner == 1 || plan.inner.inner >= 8;
    (plan.inner.m() as i64 <= MAX_ROWS && bytes >= min_bytes as i64 && vector_wide).then_some(dims)
}

/// The product as the custom call (same operands, result and location).
pub(crate) fn to_custom_call(op: &mut Op, dims: &DotDims) {
    op.name = "stablehlo.custom_call".to_string();
    let backend = [
        ("lhs_batching_dims", &dims.lhs_batching),
        ("lhs_contracting_dims", &dims.lhs_contracting),
        ("rhs_batching_dims", &dims.rhs_batching),
        ("rhs_contracting_dims", &dims.rhs_contracting),
    ]
    .iter()
    .map(|(k, v)| format!("{k} = {}", array_i64(v)))
    .collect::<Vec<_>>()
    .join(", ");
    set_props(
        op,
        vec![
            ("api_version", "4 : i32".to_string()),
            ("backend_config", format!("{{{backend}}}")),
            ("call_target_name", format!("\"{TARGET}\"")),
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::{parse_module, print_module, verify};

    /// Products in a loop body and outside it: Gemma3's two attention products over a
    /// `[1, 640, 1, 256]` cache (rewritten), and ones the pass must keep: a small cache, five
    /// rows, bfloat16, a layout the custom call refuses (the cache's contracting dims not
    /// adjacent), an `algorithm` property, and no contracting dim at all.
    const MODULE: &str = r#""builtin.module"() <{sym_name = "m"}> ({
  "func.func"() <{function_type = (tensor<1x640x1x256xf32>, tensor<1x1x1x4x256xf32>, tensor<1x1x4x1x640xf32>, tensor<8x256xf32>, tensor<5x256xf32>, tensor<640x256xbf16>, tensor<4x256xbf16>, tensor<64x16x64xf32>, tensor<64x64xf32>, tensor<4x256xf32>, tensor<640x256xf32>) -> tensor<1x1x640x1x4xf32>, sym_name = "main", sym_visibility = "public"}> ({
  ^bb0(%arg0: tensor<1x640x1x256xf32>, %arg1: tensor<1x1x1x4x256xf32>, %arg2: tensor<1x1x4x1x640xf32>, %arg3: tensor<8x256xf32>, %arg4: tensor<5x256xf32>, %arg5: tensor<640x256xbf16>, %arg6: tensor<4x256xbf16>, %arg7: tensor<64x16x64xf32>, %arg8: tensor<64x64xf32>, %arg9: tensor<4x256xf32>, %arg10: tensor<640x256xf32>):
    %0 = "stablehlo.dot_general"(%arg0, %arg1) <{dot_dimension_numbers = #stablehlo.dot<lhs_batching_dimensions = [0, 2], rhs_batching_dimensions = [0, 2], lhs_contracting_dimensions = [3], rhs_contracting_dimensions = [4]>}> : (tensor<1x640x1x256xf32>, tensor<1x1x1x4x256xf32>) -> tensor<1x1x640x1x4xf32>
    %1 = "stablehlo.dot_general"(%arg0, %arg2) <{dot_dimension_numbers = #stablehlo.dot<lhs_batching_dimensions = [0, 2], rhs_batching_dimensions = [0, 1], lhs_contracting_dimensions = [1], rhs_contracting_dimensions = [4]>, precision_config = [#stablehlo<precision DEFAULT>, #stablehlo<precision DEFAULT>]}> : (tensor<1x640x1x256xf32>, tensor<1x1x4x1x640xf32>) -> tensor<1x1x256x4x1xf32>
    %2 = "stablehlo.dot_general"(%arg3, %arg9) <{dot_dimension_numbers = #stablehlo.dot<lhs_contracting_dimensions = [1], rhs_contracting_dimensions = [1]>}> : (tensor<8x256xf32>, tensor<4x256xf32>) -> tensor<8x4xf32>
    %3 = "stablehlo.dot_general"(%arg4, %arg10) <{dot_dimension_numbers = #stablehlo.dot<lhs_contracting_dimensions = [1], rhs_contracting_dimensions = [1]>}> : (tensor<5x256xf32>, tensor<640x256xf32>) -> tensor<5x640xf32>
    %4 = "stablehlo.dot_general"(%arg6, %arg5) <{dot_dimension_numbers = #stablehlo.dot<lhs_contracting_dimensions = [1], rhs_contracting_dimensions = [1]>}> : (tensor<4x256xbf16>, tensor<640x256xbf16>) -> tensor<4x640xbf16>
    %5 = "stablehlo.dot_general"(%arg8, %arg7) <{dot_dimension_numbers = #stablehlo.dot<lhs_contracting_dimensions = [0, 1], rhs_contracting_dimensions = [0, 2]>}> : (tensor<64x64xf32>, tensor<64x16x64xf32>) -> tensor<16xf32>
    %6 = "stablehlo.dot_general"(%arg9, %arg10) <{algorithm = #stablehlo.dot_algorithm<lhs_precision_type = f32, rhs_precision_type = f32, accumulation_type = f32, lhs_component_count = 1, rhs_component_count = 1, num_primitive_operations = 1, allow_imprecise_accumulation = false>, dot_dimension_numbers = #stablehlo.dot<lhs_contracting_dimensions = [1], rhs_contracting_dimensions = [1]>}> : (tensor<4x256xf32>, tensor<640x256xf32>) -> tensor<4x640xf32>
    %7 = "stablehlo.dot_general"(%arg9, %arg10) <{dot_dimension_numbers = #stablehlo.dot<>}> : (tensor<4x256xf32>, tensor<640x256xf32>) -> tensor<4x256x640x256xf32>
    %8 = "stablehlo.constant"() <{value = dense<0> : tensor<i32>}> : () -> tensor<i32>
    %9:2 = "stablehlo.while"(%arg0, %8) ({
    ^bb0(%arg11: tensor<1x640x1x256xf32>, %arg12: tensor<i32>):
      %10 = "stablehlo.constant"() <{value = dense<4> : tensor<i32>}> : () -> tensor<i32>
      %11 = "stablehlo.compare"(%arg12, %10) <{comparison_direction = #stablehlo<comparison_direction LT>}> : (tensor<i32>, tensor<i32>) -> tensor<i1>
      "stablehlo.return"(%11) : (tensor<i1>) -> ()
    }, {
    ^bb0(%arg13: tensor<1x640x1x256xf32>, %arg14: tensor<i32>):
      %12 = "stablehlo.dot_general"(%arg13, %arg1) <{dot_dimension_numbers = #stablehlo.dot<lhs_batching_dimensions = [0, 2], rhs_batching_dimensions = [0, 2], lhs_contracting_dimensions = [3], rhs_contracting_dimensions = [4]>}> : (tensor<1x640x1x256xf32>, tensor<1x1x1x4x256xf32>) -> tensor<1x1x640x1x4xf32>
      "stablehlo.return"(%arg13, %arg14) : (tensor<1x640x1x256xf32>, tensor<i32>) -> ()
    }) : (tensor<1x640x1x256xf32>, tensor<i32>) -> (tensor<1x640x1x256xf32>, tensor<i32>)
    "func.return"(%0) : (tensor<1x1x640x1x4xf32>) -> ()
  }) : () -> ()
}) : () -> ()
"#;

    fn targets(m: &Module) -> (Vec<String>, usize) {
        let mut calls = Vec::new();
        let mut kept = 0;
        m.top.walk(&mut |o| {
            if o.name == "stablehlo.custom_call" {
                calls.push(o.results[0].name.clone());
            } else if o.name == "stablehlo.dot_general" {
                kept += 1;
            }
        });
        (calls, kept)
    }

    #[test]
    fn rewrites_only_decode_shaped_f32_products() {
        let mut m = parse_module(MODULE).expect("test module parses");
        let report = decode_dots(&mut m, &HashMap::new(), MIN_STREAMED_BYTES);
        assert_eq!(report.len(), 3, "{report:#?}");
        verify(&m).expect("result verifies");
        let (calls, kept) = targets(&m);
        assert_eq!(calls, vec!["%0", "%1", "%12"]);
        assert_eq!(kept, 6);
        let text = print_module(&m);
        assert!(text.contains(
            "backend_config = {lhs_batching_dims = array<i64: 0, 2>, lhs_contracting_dims = \
             array<i64: 1>, rhs_batching_dims = array<i64: 0, 1>, rhs_contracting_dims = \
             array<i64: 4>}, call_target_name = \"fp8xla_dot_f32\""
        ));
        assert!(!text.contains("precision DEFAULT"));
        parse_module(&text).expect("rewritten module parses");
    }

    #[test]
    fn narrow_kn_operands_are_kept() {
        // 320 KB operands on both sides (a tie: the rhs streams).
        let text = r#""builtin.module"() <{sym_name = "m"}> ({
  "func.func"() <{function_type = (tensor<4x20000xf32>, tensor<20000x4xf32>) -> tensor<4x4xf32>, sym_name = "main", sym_visibility = "public"}> ({
  ^bb0(%arg0: tensor<4x20000xf32>, %arg1: tensor<20000x4xf32>):
    %0 = "stablehlo.dot_general"(%arg0, %arg1) <{dot_dimension_numbers = #stablehlo.dot<lhs_contracting_dimensions = [1], rhs_contracting_dimensions = [0]>}> : (tensor<4x20000xf32>, tensor<20000x4xf32>) -> tensor<4x4xf32>
    %1 = "stablehlo.dot_general"(%arg1, %arg0) <{dot_dimension_numbers = #stablehlo.dot<lhs_contracting_dimensions = [1], rhs_contracting_dimensions = [0]>}> : (tensor<20000x4xf32>, tensor<4x20000xf32>) -> tensor<20000x20000xf32>
    %2 = "stablehlo.dot_general"(%arg1, %arg0) <{dot_dimension_numbers = #stablehlo.dot<lhs_contracting_dimensions = [0], rhs_contracting_dimensions = [1]>}> : (tensor<20000x4xf32>, tensor<4x20000xf32>) -> tensor<4x4xf32>
    "func.return"(%0) : (tensor<4x4xf32>) -> ()
  }) : () -> ()
}) : () -> ()
"#;
        let mut m = parse_module(text).expect("test module parses");
        decode_dots(&mut m, &HashMap::new(), 0);
        // %0: the rhs streams as KN with 4 columns per row, the kernels' scalar tails: kept.
        // %1: 20000 rows on the small side: kept. %2: the rhs streams as NK: rewritten.
        let (calls, kept) = targets(&m);
        assert_eq!((calls, kept), (vec!["%2".to_string()], 2));
    }

    #[test]
    fn the_size_threshold_is_an_option() {
        let mut m = parse_module(MODULE).expect("test module parses");
        // 8 x 256 floats (8 KiB) streams once the threshold allows it.
        assert_eq!(decode_dots(&mut m, &HashMap::new(), 8 << 10).len(), 4);
        let mut m = parse_module(MODULE).expect("test module parses");
        assert_eq!(decode_dots(&mut m, &HashMap::new(), 1 << 30).len(), 0);
    }
}
