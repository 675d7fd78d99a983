//! The sampler's argmax over a vocabulary: the two-operand `stablehlo.reduce` that
//! `jnp.argmax(x, axis=-1)` lowers to (the values and an `iota` along the reduced dim, initial
//! values -inf and 0, and JAX's (value, index) comparator) becomes the `fp8xla_argmax` custom
//! call when it reduces the last dim of a float32 or bfloat16 tensor of at least `min_size`
//! elements (option `sampler_argmax_min_size`, default [`MIN_SIZE`]).
//!
//! Why: Keras-Hub's greedy sampler takes the argmax of the next token's probabilities over the
//! whole vocabulary (262144 entries for Gemma 3) once per decode step, and XLA's CPU backend
//! runs that reduce on one thread; the custom call splits each row over all cores.
//!
//! What is matched, exactly, so that the custom call's semantics (first index of the largest
//! value, the first NaN of a row that has one, 0 for a row of -inf: `crate::kernels::argmax`)
//! are those of the reduce it replaces: the reduce has operands `(x, iota, -inf, 0)` with the
//! iota (int32 or int64) along the one reduced dim, the last; its body, whatever the order of
//! its ops and of the operands of `or`/`and`, is
//! `pick = (a > b) | (a != a)` (FLOAT compares),
//! `value = select(pick, a, b)`, `index = select(pick | (a == b & ia < ib), ia, ib)`
//! and nothing else; and its first result (the maximum itself) is not used. Everything else is
//! left alone: other comparators (argmin, a TOTALORDER compare, a last-index tie rule), other
//! dims, other initial values, dynamic shapes, small vocabularies.
//!
//! # The softmax before the argmax stays
//!
//! The sampler computes `argmax(softmax(logits / temperature))`. Dropping the softmax would
//! save its passes over the vocabulary, but `argmax(softmax(x))` is not `argmax(x)` in
//! floating point, and the difference is not confined to a case that can be stated and
//! proven:
//! - a row with a NaN or a +inf makes every probability NaN (`x - max` is NaN at an infinite
//!   maximum, and the sum then is NaN), so the graph samples token 0, where `argmax(x)` gives
//!   the NaN's or the infinity's index;
//! - `exp(x - max)` and the division by the sum round: logits a few ulps apart become equal
//!   probabilities, and the tie goes to the lower index, not to the larger logit. How far apart
//!   is not fixed: XLA's CPU `exp` is a polynomial approximation whose monotonicity is not
//!   specified, so "only exact ties of probabilities differ" cannot be proven for it.
//!
//! Greedy decoding with fp8xla must give the tokens the same graph gives without the rewrite,
//! so only the reduce is replaced and the softmax is kept. What it costs (callgrind, one
//! 262144-entry row, docs/performance-notes.md): about 7.3 M of the 10.8 M instructions of a
//! sampler step once the argmax is `fp8xla_argmax` (19.0 M before); the whole sampler was
//! about 1 ms of a ~28 ms decode step in the earlier profile.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};

use super::emit::set_props;
use super::flow::{func_name, walk_functions_mut};
use super::ir::{Block, ElementType, Module, Op, ResultGroup, TensorType, Type};
use super::loc_json;
use super::pipeline::{Context, Pass};

/// The target the argmax reduces become.
pub const TARGET: &str = "fp8xla_argmax";
/// Least size of the reduced dim by default (option `sampler_argmax_min_size`): below it the
/// reduce is short enough for one thread, and the call's fixed costs would dominate.
pub const MIN_SIZE: usize = 16 << 10;

/// The pass `sampler_argmax` ([`sampler_argmax`]), run alone or by `quantize`.
pub struct SamplerArgmax {
    /// The least size of the reduced (last) dim.
    pub min_size: usize,
}

impl<S> Pass<S> for SamplerArgmax {
    fn name(&self) -> &'static str {
        "sampler_argmax"
    }

    fn run(&self, cx: &mut Context, _: &mut S) -> Result<(), super::RewriteError> {
        let report = sampler_argmax(&mut cx.module, &cx.aliases, self.min_size);
        cx.handled.extend(report);
        Ok(())
    }
}

/// Rewrites every argmax reduce of the module the pass takes; one report entry each.
pub fn sampler_argmax(
    module: &mut Module,
    aliases: &HashMap<String, String>,
    min_size: usize,
) -> Vec<Value> {
    // Find them first (the iota and the initial values may be defined anywhere in the
    // function), then rewrite them and point the uses of their index result at the call.
    let mut chosen: HashSet<u32> = HashSet::new();
    let mut renames: HashMap<(String, String), String> = HashMap::new();
    for func in module.functions() {
        let fname = func_name(func).unwrap_or_default();
        let mut defs: HashMap<String, &Op> = HashMap::new();
        let mut used: HashSet<&str> = HashSet::new();
        func.walk_nested(&mut |op| {
            for name in op.result_names() {
                defs.insert(name, op);
            }
            used.extend(op.operands.iter().map(String::as_str));
        });
        func.walk_nested(&mut |op| {
            if !is_argmax(op, &defs, min_size) {
                return;
            }
            let group = &op.results[0].name;
            if used.contains(format!("{group}#0").as_str()) {
                return;
            }
            chosen.insert(op.id);
            renames.insert((fname.clone(), format!("{group}#1")), group.clone());
        });
    }
    let mut report = Vec::new();
    walk_functions_mut(module, &mut |fname, op| {
        for operand in &mut op.operands {
            if let Some(new) = renames.get(&(fname.to_string(), operand.clone())) {
                *operand = new.clone();
            }
        }
        if chosen.contains(&op.id) {
            let detail = format!(
                "argmax reduce over the last dim of {} → {TARGET}",
                op.operand_types[0]
            );
            to_custom_call(op);
            report.push(json!({
                "kind": "sampler_argmax", "function": fname,
                "loc": loc_json(&op.loc, aliases), "detail": detail,
            }));
        }
    });
    report
}

/// Whether `op` is an argmax reduce this pass takes (see the module documentation).
fn is_argmax(op: &Op, defs: &HashMap<String, &Op>, min_size: usize) -> bool {
    if op.name != "stablehlo.reduce"
        || op.operands.len() != 4
        || op.operand_types.len() != 4
        || op.result_types.len() != 2
        || op.results.len() != 1
        || op.results[0].count != 2
        || op.regions.len() != 1
        || op
            .attributes
            .as_ref()
            .is_some_and(|a| !a.entries.is_empty())
        || op
            .properties
            .as_ref()
            .is_none_or(|p| p.entries.iter().any(|a| a.name != "dimensions"))
    {
        return false;
    }
    let Some(x) = op.operand_types[0].as_tensor() else {
        return false;
    };
    let Some(shape) = x.static_shape() else {
        return false;
    };
    let Some((&n, lead)) = shape.split_last() else {
        return false;
    };
    let last = shape.len() as i64 - 1;
    let value_ok = matches!(x.element, ElementType::F32 | ElementType::Bf16);
    let index_el = op.operand_types[1].as_tensor().map(|t| t.element.clone());
    let index_ok = matches!(
        index_el,
        Some(ElementType::Int {
            width: 32 | 64,
            unsigned: false
        })
    );
    if !value_ok
        || !index_ok
        || n < min_size as u64
        || op.prop("dimensions").and_then(super::attr::parse_array_i64) != Some(vec![last])
    {
        return false;
    }
    let index_el = index_el.expect("checked above");
    let tensor = |dims: &[u64], element: &ElementType| TensorType {
        dims: dims.iter().map(|&d| super::ir::Dim::Static(d)).collect(),
        element: element.clone(),
        encoding: None,
    };
    let is = |t: &Type, want: TensorType| t.as_tensor() == Some(&want);
    is(&op.operand_types[1], tensor(&shape, &index_el))
        && is(&op.operand_types[2], tensor(&[], &x.element))
        && is(&op.operand_types[3], tensor(&[], &index_el))
        && is(&op.result_types[0], tensor(lead, &x.element))
        && is(&op.result_types[1], tensor(lead, &index_el))
        && defs
            .get(&op.operands[1])
            .is_some_and(|d| is_iota(d, last, &op.operand_types[1]))
        && defs
            .get(&op.operands[2])
            .is_some_and(|d| is_constant(d, &minus_infinity(&x.element)))
        && defs
            .get(&op.operands[3])
            .is_some_and(|d| is_constant(d, &["0"]))
        && op.regions[0].blocks.len() == 1
        && is_argmax_comparator(&op.regions[0].blocks[0], &x.element, &index_el)
}

/// How MLIR prints -inf of a float element type (a hex bit pattern).
fn minus_infinity(element: &ElementType) -> Vec<&'static str> {
    match element {
        ElementType::F32 => vec!["0xFF800000", "0xff800000"],
        ElementType::Bf16 => vec!["0xFF80", "0xff80"],
        _ => Vec::new(),
    }
}

/// `stablehlo.iota` along `dim` of the type `ty`.
fn is_iota(op: &Op, dim: i64, ty: &Type) -> bool {
    op.name == "stablehlo.iota"
        && op.operands.is_empty()
        && op.result_types.len() == 1
        && &op.result_types[0] == ty
        && op.prop("iota_dimension") == Some(format!("{dim} : i64").as_str())
        && op.properties.as_ref().is_some_and(|p| p.entries.len() == 1)
}

/// A scalar `stablehlo.constant` whose value is written as one of `literals`.
fn is_constant(op: &Op, literals: &[&str]) -> bool {
    let Some(value) = op.prop("value") else {
        return false;
    };
    let Some(literal) = value
        .trim()
        .strip_prefix("dense<")
        .and_then(|v| v.split_once('>'))
        .map(|(lit, _)| lit.trim())
    else {
        return false;
    };
    op.name == "stablehlo.constant"
        && op.result_types.len() == 1
        && op.result_types[0]
            .as_tensor()
            .is_some_and(|t| t.dims.is_empty())
        && literals.contains(&literal)
}

/// Whether the reduce body is JAX's argmax comparator (see the module documentation): block
/// arguments `(a, ia, b, ib)` and exactly the ops of
/// `pick = or(a > b, a != a)`, `index_pick = or(pick, and(a == b, ia < ib))`,
/// `return select(pick, a, b), select(index_pick, ia, ib)`.
fn is_argmax_comparator(block: &Block, value: &ElementType, index: &ElementType) -> bool {
    let scalar = |element: &ElementType| {
        Type::Tensor(TensorType {
            dims: Vec::new(),
            element: element.clone(),
            encoding: None,
        })
    };
    let arg_types: Vec<&Type> = block.args.iter().map(|a| &a.ty).collect();
    let (v, i) = (scalar(value), scalar(index));
    if arg_types != [&v, &i, &v, &i] {
        return false;
    }
    let [a, ia, b, ib] = [0, 1, 2, 3].map(|k| block.args[k].name.as_str());
    let Some((ret, body)) = block.ops.split_last() else {
        return false;
    };
    let defs: HashMap<&str, &Op> = body
        .iter()
        .filter(|o| o.results.len() == 1 && o.results[0].count == 1)
        .map(|o| (o.results[0].name.as_str(), o))
        .collect();
    let mut matched: HashSet<u32> = HashSet::new();
    let mut def = |name: &str, op_name: &str, operands: usize| -> Option<&Op> {
        let op = *defs.get(name)?;
        let plain = op.name == op_name
            && op.operands.len() == operands
            && op.regions.is_empty()
            && op.attributes.as_ref().is_none_or(|a| a.entries.is_empty());
        matched.insert(op.id);
        plain.then_some(op)
    };
    let compare = |op: &Op, direction: &str, lhs: &str, rhs: &str, kind: &str| {
        let props_ok = op.properties.as_ref().is_some_and(|p| {
            p.entries.iter().all(|e| match e.name.as_str() {
                "comparison_direction" => {
                    e.value.as_deref()
                        == Some(format!("#stablehlo<comparison_direction {direction}>").as_str())
                }
                "compare_type" => {
                    e.value.as_deref()
                        == Some(format!("#stablehlo<comparison_type {kind}>").as_str())
                }
                _ => false,
            }) && p.get("comparison_direction").is_some()
        });
        props_ok && op.operands == [lhs, rhs]
    };
    let mut check = || -> Option<()> {
        if ret.name != "stablehlo.return" || ret.operands.len() != 2 {
            return None;
        }
        let sel_v = def(&ret.operands[0], "stablehlo.select", 3)?;
        let sel_i = def(&ret.operands[1], "stablehlo.select", 3)?;
        (sel_v.operands[1..] == [a, b] && sel_i.operands[1..] == [ia, ib]).then_some(())?;
        let pick = sel_v.operands[0].as_str();
        // pick = or(a > b, a != a)
        let or_pick = def(pick, "stablehlo.or", 2)?;
        let gt = def(&or_pick.operands[0], "stablehlo.compare", 2)?;
        let ne = def(&or_pick.operands[1], "stablehlo.compare", 2)?;
        let (gt, ne) = if compare(gt, "GT", a, b, "FLOAT") {
            (gt, ne)
        } else {
            (ne, gt)
        };
        (compare(gt, "GT", a, b, "FLOAT") && compare(ne, "NE", a, a, "FLOAT")).then_some(())?;
        // index_pick = or(pick, and(a == b, ia < ib))
        let or_index = def(&sel_i.operands[0], "stablehlo.or", 2)?;
        let other = match (or_index.operands[0].as_str(), or_index.operands[1].as_str()) {
            (p, o) | (o, p) if p == pick => o.to_string(),
            _ => return None,
        };
        let and = def(&other, "stablehlo.and", 2)?;
        let eq = def(&and.operands[0], "stablehlo.compare", 2)?;
        let lt = def(&and.operands[1], "stablehlo.compare", 2)?;
        let (eq, lt) = if compare(eq, "EQ", a, b, "FLOAT") {
            (eq, lt)
        } else {
            (lt, eq)
        };
        (compare(eq, "EQ", a, b, "FLOAT") && compare(lt, "LT", ia, ib, "SIGNED")).then_some(())
    };
    check().is_some() && matched.len() == body.len()
}

/// The reduce as the custom call: operand `x` only, one result (the indices), which keeps
/// the reduce's name (its uses were pointed at it).
fn to_custom_call(op: &mut Op) {
    op.name = "stablehlo.custom_call".to_string();
    op.operands.truncate(1);
    op.operand_types.truncate(1);
    op.result_types.remove(0);
    op.parenthesized_result = false;
    op.regions.clear();
    op.results = vec![ResultGroup {
        name: op.results[0].name.clone(),
        count: 1,
        explicit_count: false,
    }];
    set_props(
        op,
        vec![
            ("api_version", "4 : i32".to_string()),
            ("backend_config", "{}".to_string()),
            ("call_target_name", format!("\"{TARGET}\"")),
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::{parse_module, print_module, verify};

    /// `jnp.argmax(x, axis=-1)` on `x: f32[2, 40000]` as `jax.export` writes it (in the
    /// private function `argmax` of every export; here as `main`, locations dropped).
    const ARGMAX: &str = r#""builtin.module"() <{sym_name = "m"}> ({
  "func.func"() <{function_type = (tensor<2x40000xf32>) -> tensor<2xi32>, sym_name = "main", sym_visibility = "public"}> ({
  ^bb0(%arg7: tensor<2x40000xf32>):
    %6 = "stablehlo.constant"() <{value = dense<0> : tensor<i32>}> : () -> tensor<i32>
    %7 = "stablehlo.constant"() <{value = dense<0xFF800000> : tensor<f32>}> : () -> tensor<f32>
    %8 = "stablehlo.iota"() <{iota_dimension = 1 : i64}> : () -> tensor<2x40000xi32>
    %9:2 = "stablehlo.reduce"(%arg7, %8, %7, %6) <{dimensions = array<i64: 1>}> ({
    ^bb0(%arg8: tensor<f32>, %arg9: tensor<i32>, %arg10: tensor<f32>, %arg11: tensor<i32>):
      %10 = "stablehlo.compare"(%arg8, %arg10) <{compare_type = #stablehlo<comparison_type FLOAT>, comparison_direction = #stablehlo<comparison_direction GT>}> : (tensor<f32>, tensor<f32>) -> tensor<i1>
      %11 = "stablehlo.compare"(%arg8, %arg8) <{compare_type = #stablehlo<comparison_type FLOAT>, comparison_direction = #stablehlo<comparison_direction NE>}> : (tensor<f32>, tensor<f32>) -> tensor<i1>
      %12 = "stablehlo.or"(%10, %11) : (tensor<i1>, tensor<i1>) -> tensor<i1>
      %13 = "stablehlo.compare"(%arg8, %arg10) <{compare_type = #stablehlo<comparison_type FLOAT>, comparison_direction = #stablehlo<comparison_direction EQ>}> : (tensor<f32>, tensor<f32>) -> tensor<i1>
      %14 = "stablehlo.compare"(%arg9, %arg11) <{compare_type = #stablehlo<comparison_type SIGNED>, comparison_direction = #stablehlo<comparison_direction LT>}> : (tensor<i32>, tensor<i32>) -> tensor<i1>
      %15 = "stablehlo.and"(%13, %14) : (tensor<i1>, tensor<i1>) -> tensor<i1>
      %16 = "stablehlo.or"(%12, %15) : (tensor<i1>, tensor<i1>) -> tensor<i1>
      %17 = "stablehlo.select"(%12, %arg8, %arg10) : (tensor<i1>, tensor<f32>, tensor<f32>) -> tensor<f32>
      %18 = "stablehlo.select"(%16, %arg9, %arg11) : (tensor<i1>, tensor<i32>, tensor<i32>) -> tensor<i32>
      "stablehlo.return"(%17, %18) : (tensor<f32>, tensor<i32>) -> ()
    }) : (tensor<2x40000xf32>, tensor<2x40000xi32>, tensor<f32>, tensor<i32>) -> (tensor<2xf32>, tensor<2xi32>)
    "func.return"(%9#1) : (tensor<2xi32>) -> ()
  }) : () -> ()
}) : () -> ()
"#;

    fn rewrite(text: &str, min_size: usize) -> (Module, usize) {
        let mut m = parse_module(text).expect("test module parses");
        let n = sampler_argmax(&mut m, &HashMap::new(), min_size).len();
        verify(&m).expect("result verifies");
        parse_module(&print_module(&m)).expect("result parses");
        (m, n)
    }

    fn rewritten(text: &str) -> bool {
        rewrite(text, MIN_SIZE).1 == 1
    }

    #[test]
    fn the_exported_argmax_becomes_the_call() {
        let (m, n) = rewrite(ARGMAX, MIN_SIZE);
        assert_eq!(n, 1);
        let text = print_module(&m);
        assert!(
            text.contains(
                "%9 = \"stablehlo.custom_call\"(%arg7) <{api_version = 4 : i32, backend_config = \
                 {}, call_target_name = \"fp8xla_argmax\"}> : (tensor<2x40000xf32>) -> \
                 tensor<2xi32>"
            ),
            "{text}"
        );
        assert!(
            text.contains("\"func.return\"(%9) : (tensor<2xi32>) -> ()"),
            "{text}"
        );
        assert!(!text.contains("stablehlo.reduce"));
    }

    #[test]
    fn the_size_threshold_is_an_option() {
        assert_eq!(rewrite(ARGMAX, 40_000).1, 1);
        assert_eq!(rewrite(ARGMAX, 40_001).1, 0);
    }

    #[test]
    fn the_same_comparator_in_another_order_is_matched() {
        // `or` and `and` operands swapped, the compares of each pair swapped in the block.
        let shuffled = ARGMAX
            .replace("\"stablehlo.or\"(%10, %11)", "\"stablehlo.or\"(%11, %10)")
            .replace("\"stablehlo.and\"(%13, %14)", "\"stablehlo.and\"(%14, %13)")
            .replace("\"stablehlo.or\"(%12, %15)", "\"stablehlo.or\"(%15, %12)")
            .replace(
                "<{compare_type = #stablehlo<comparison_type SIGNED>, comparison_direction",
                "<{comparison_direction",
            );
        assert!(rewritten(&shuffled));
        // int64 indices and bfloat16 values.
        let wide = ARGMAX.replace("i32>", "i64>");
        assert!(rewritten(&wide));
        let bf16 = ARGMAX
            .replace("xf32>", "xbf16>")
            .replace("tensor<f32>", "tensor<bf16>")
            .replace("tensor<2xf32>", "tensor<2xbf16>")
            .replace("0xFF800000", "0xFF80");
        assert!(rewritten(&bf16));
    }

    #[test]
    fn anything_else_is_left_alone() {
        let cases: Vec<(&str, String)> = vec![
            // argmin: LT and +inf
            (
                "argmin",
                ARGMAX
                    .replace("comparison_direction GT>", "comparison_direction LT>")
                    .replace("0xFF800000", "0x7F800000"),
            ),
            ("a >= compare", ARGMAX.replace("direction GT>", "direction GE>")),
            (
                "a TOTALORDER compare",
                ARGMAX.replacen("comparison_type FLOAT", "comparison_type TOTALORDER", 1),
            ),
            ("the last index on ties", ARGMAX.replace("direction LT>", "direction GT>")),
            (
                "no NaN rule",
                ARGMAX.replace("\"stablehlo.or\"(%10, %11)", "\"stablehlo.or\"(%10, %10)"),
            ),
            (
                "select operands swapped",
                ARGMAX.replace("(%12, %arg8, %arg10)", "(%12, %arg10, %arg8)"),
            ),
            ("another initial value", ARGMAX.replace("0xFF800000", "0xFF7FFFFF")),
            (
                "another initial index",
                ARGMAX.replace("dense<0> : tensor<i32>", "dense<1> : tensor<i32>"),
            ),
            ("an iota along dim 0", ARGMAX.replace("iota_dimension = 1", "iota_dimension = 0")),
            (
                "unsigned indices",
                ARGMAX.replace("xi32>", "xui32>").replace("tensor<i32>", "tensor<ui32>"),
            ),
            (
                "the maximum used too",
                ARGMAX.replace(
                    "\"func.return\"(%9#1) : (tensor<2xi32>) -> ()",
                    "%19 = \"stablehlo.convert\"(%9#0) : (tensor<2xf32>) -> tensor<2xi32>\n    \
                     \"func.return\"(%19) : (tensor<2xi32>) -> ()",
                ),
            ),
            (
                "an extra op in the body",
                ARGMAX.replace(
                    "      \"stablehlo.return\"(%17, %18)",
                    "      %19 = \"stablehlo.add\"(%arg8, %arg10) : (tensor<f32>, tensor<f32>) -> tensor<f32>\n      \"stablehlo.return\"(%17, %18)",
                ),
            ),
        ];
        for (what, text) in &cases {
            assert_ne!(text, ARGMAX, "{what}: the case changes nothing");
            assert!(!rewritten(text), "{what} was rewritten");
        }
    }

    #[test]
    fn a_reduce_over_another_dim_is_left_alone() {
        // The same comparator over dim 0 of x: f32[40000, 2].
        let text = ARGMAX
            .replace("2x40000x", "40000x2x")
            .replace("iota_dimension = 1", "iota_dimension = 0")
            .replace("array<i64: 1>", "array<i64: 0>");
        assert!(!rewritten(&text));
        // Over the last dim but the iota runs along the other one.
        let text = ARGMAX.replace("iota_dimension = 1", "iota_dimension = 0");
        assert!(!rewritten(&text));
    }
}
