//! Golden tests of the passes on the exported modules.
//!
//! The expected outputs under `tests/data/golden/` are compared byte for byte (regenerate them
//! with `FP8XLA_BLESS=1 cargo test --test rewrite_golden` after an intended change), but the
//! properties that matter are asserted independently of them: how many custom calls, every
//! retyped weight FP8 at every use, types consistent, no float copy of the embedding table.

use std::collections::{BTreeMap, HashSet};

use fp8xla::rewrite::ir::{ElementType, Module, Op, Type};
use fp8xla::rewrite::{instrument, parse_module, print_module, quantize, verify};
use serde_json::Value;

fn data_path(name: &str) -> String {
    format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn data(name: &str) -> String {
    let path = data_path(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Compares with (or, with FP8XLA_BLESS=1, writes) `tests/data/golden/<name>`.
fn golden(name: &str, actual: &str) {
    let path = data_path(&format!("golden/{name}"));
    if std::env::var_os("FP8XLA_BLESS").is_some() {
        std::fs::create_dir_all(data_path("golden")).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e} (FP8XLA_BLESS=1 writes it)"));
    assert!(
        expected == actual,
        "{name} differs from the golden file (FP8XLA_BLESS=1 regenerates it)"
    );
}

fn all_ops(m: &Module) -> Vec<&Op> {
    let mut ops = Vec::new();
    m.top.walk(&mut |o| ops.push(o));
    ops
}

fn custom_calls(m: &Module, target: &str) -> Vec<Op> {
    all_ops(m)
        .into_iter()
        .filter(|o| {
            o.name == "stablehlo.custom_call"
                && o.prop("call_target_name") == Some(&format!("\"{target}\""))
        })
        .cloned()
        .collect()
}

fn entry_args(m: &Module) -> Vec<Type> {
    let main = m
        .functions()
        .into_iter()
        .find(|f| f.prop("sym_name") == Some("\"main\""))
        .expect("main");
    main.regions[0].blocks[0]
        .args
        .iter()
        .map(|a| a.ty.clone())
        .collect()
}

fn element(t: &Type) -> Option<ElementType> {
    t.as_tensor().map(|t| t.element.clone())
}

struct Checked {
    module: Module,
    report: Value,
}

/// Runs quantize and checks the properties every result must have.
fn quantize_checked(module_name: &str, options_name: &str) -> Checked {
    quantize_checked_with(module_name, data(options_name))
}

fn quantize_checked_with(module_name: &str, options: String) -> Checked {
    let text = data(&format!("{module_name}.mlir"));
    let (out, report) = quantize(&text, &options).unwrap_or_else(|e| panic!("{e}"));
    let module = parse_module(&out).expect("output parses");
    assert_eq!(print_module(&module), out, "output round-trips");
    verify(&module).expect("output is consistently typed");
    let report: Value = serde_json::from_str(&report).expect("report is JSON");
    let opts: Value = serde_json::from_str(&options).unwrap();
    let args = entry_args(&module);
    let skip: HashSet<u64> = opts["skip_args"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    for w in opts["weights"].as_array().unwrap() {
        let arg = w["arg"].as_u64().unwrap();
        let want = match w["format"].as_str().unwrap() {
            "e4m3fn" => ElementType::F8E4M3FN,
            _ => ElementType::F8E5M2,
        };
        let got = element(&args[arg as usize]).unwrap();
        if skip.contains(&arg) {
            assert!(got.is_quantizable_float());
        } else {
            assert_eq!(got, want, "argument {arg} retyped");
        }
    }
    // No dot_general is left on an FP8 operand, and every fp8xla_matmul has an FP8 rhs and a
    // float lhs (operand types agree with definitions, checked by verify).
    for op in all_ops(&module) {
        if op.name == "stablehlo.dot_general" {
            for t in &op.operand_types {
                assert!(
                    !element(t).unwrap().is_fp8(),
                    "dot_general on FP8 at {:?}",
                    op.pos
                );
            }
        }
    }
    for mm in custom_calls(&module, "fp8xla_matmul") {
        assert!(element(&mm.operand_types[1]).unwrap().is_fp8());
        assert!(element(&mm.operand_types[0])
            .unwrap()
            .is_quantizable_float());
        let cfg = mm.prop("backend_config").unwrap();
        for key in [
            "lhs_contracting_dims = array<i64",
            "rhs_contracting_dims = array<i64",
            "lhs_batching_dims = array<i64",
            "rhs_batching_dims = array<i64",
            "w_scale = ",
        ] {
            assert!(cfg.contains(key), "{key} in {cfg}");
        }
        assert_eq!(mm.prop("api_version"), Some("4 : i32"));
    }
    Checked { module, report }
}

fn matmul_count(c: &Checked) -> usize {
    custom_calls(&c.module, "fp8xla_matmul").len()
}

#[test]
fn dot() {
    let c = quantize_checked("dot", "dot.quantize.json");
    assert_eq!(matmul_count(&c), 1);
    assert_eq!(
        c.report["matmuls"][0]["rhs_contracting_dims"],
        serde_json::json!([0])
    );
    golden("dot.quantize.mlir", &print_module(&c.module));
    golden("dot.quantize.report.json", &c.report.to_string());
}

#[test]
fn mlp_per_tensor_and_per_channel() {
    let c = quantize_checked("mlp", "mlp.quantize.json");
    assert_eq!(matmul_count(&c), 2);
    let mms = custom_calls(&c.module, "fp8xla_matmul");
    // w1: per-tensor with a_scale; w2: per-channel scales as a third operand.
    assert_eq!(mms[0].operands.len(), 2);
    assert!(mms[0]
        .prop("backend_config")
        .unwrap()
        .contains("a_scale = 1.999999955e-2 : f32"));
    assert_eq!(mms[1].operands.len(), 3);
    assert_eq!(mms[1].operand_types[2].to_string(), "tensor<4xf32>");
    assert!(mms[1]
        .prop("backend_config")
        .unwrap()
        .contains("w_scale_dim = 1 : i64"));
    golden("mlp.quantize.mlir", &print_module(&c.module));
    golden("mlp.quantize.report.json", &c.report.to_string());
}

#[test]
fn lhs_weight_is_swapped_and_transposed_back() {
    let c = quantize_checked("lhs_weight", "lhs_weight.quantize.json");
    assert_eq!(matmul_count(&c), 1);
    let mm = &custom_calls(&c.module, "fp8xla_matmul")[0];
    // matmul(x: 16x4, w: 8x16) contracting x dim 0 with w dim 1 → 4x8, transposed to 8x4.
    assert_eq!(mm.operand_types[0].to_string(), "tensor<16x4xf32>");
    assert_eq!(mm.result_types[0].to_string(), "tensor<4x8xf32>");
    let cfg = mm.prop("backend_config").unwrap();
    assert!(
        cfg.contains("lhs_contracting_dims = array<i64: 0>"),
        "{cfg}"
    );
    assert!(
        cfg.contains("rhs_contracting_dims = array<i64: 1>"),
        "{cfg}"
    );
    let t = all_ops(&c.module)
        .into_iter()
        .find(|o| o.name == "stablehlo.transpose")
        .expect("result transposed back");
    assert_eq!(t.prop("permutation"), Some("array<i64: 1, 0>"));
    assert_eq!(t.result_types[0].to_string(), "tensor<8x4xf32>");
    assert_eq!(
        c.report["matmuls"][0]["output_transpose"],
        serde_json::json!([1, 0])
    );
    golden("lhs_weight.quantize.mlir", &print_module(&c.module));
}

#[test]
fn shared_callee_is_cloned() {
    let c = quantize_checked("shared_call", "shared_call.quantize.json");
    assert_eq!(matmul_count(&c), 1);
    let names: Vec<String> = c
        .module
        .functions()
        .iter()
        .filter_map(|f| f.prop("sym_name").map(str::to_string))
        .collect();
    assert_eq!(names, ["\"main\"", "\"layer\"", "\"layer_fp8_1\""]);
    // The original keeps its float dot for the activation call.
    let dots = all_ops(&c.module)
        .into_iter()
        .filter(|o| o.name == "stablehlo.dot_general")
        .count();
    assert_eq!(dots, 1);
    golden("shared_call.quantize.mlir", &print_module(&c.module));
}

/// Shapes of the embedding table (256x32) and its transpose in float: must not exist after.
fn assert_no_float_table(m: &Module) {
    for op in all_ops(m) {
        for t in &op.result_types {
            let s = t.to_string();
            assert!(
                s != "tensor<256x32xf32>" && s != "tensor<32x256xf32>",
                "float copy of the embedding table made by `{}` at {:?}",
                op.name,
                op.pos
            );
        }
    }
}

#[test]
fn gemma3_all_weights() {
    let c = quantize_checked("gemma3", "gemma3.quantize.json");
    // 14 kernels in the decode loop + the tied logits, and the 9 kernels the prefill needs
    // (the last block's query/output/FFN are dead in the prefill and were removed by JAX).
    assert_eq!(matmul_count(&c), 24);
    assert_eq!(c.report["matmuls"].as_array().unwrap().len(), 24);
    assert_eq!(c.report["skipped"].as_array().unwrap().len(), 0);
    assert_no_float_table(&c.module);
    // No transpose of the embedding, the tied logits use the untransposed table.
    let logits: Vec<&Value> = c.report["matmuls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["arg"] == 2)
        .collect();
    assert_eq!(logits.len(), 1);
    assert_eq!(logits[0]["rhs_contracting_dims"], serde_json::json!([1]));
    // Both embedding lookups take FP8 rows with fp8xla_take: no gather is left.
    assert!(all_ops(&c.module)
        .iter()
        .all(|o| o.name != "stablehlo.gather"));
    let takes = custom_calls(&c.module, "fp8xla_take");
    assert_eq!(takes.len(), 2);
    for t in &takes {
        assert_eq!(element(&t.operand_types[0]), Some(ElementType::F8E4M3FN));
        assert_eq!(t.operand_types[0].to_string(), "tensor<256x32xf8E4M3FN>");
        assert_eq!(element(&t.result_types[0]), Some(ElementType::F32));
    }
    // The decode loop carries the 15 weights in FP8.
    let w = all_ops(&c.module)
        .into_iter()
        .find(|o| o.name == "stablehlo.while")
        .unwrap();
    let fp8 = w
        .operand_types
        .iter()
        .filter(|t| element(t).is_some_and(|e| e.is_fp8()))
        .count();
    assert_eq!(fp8, 15);
    // What the loop carries is updated in place: the 4 KV caches (2 layers x key, value) and
    // the generated token ids; the 4 prefill updates that seed the caches outside the loop
    // stay dynamic_update_slice.
    let updates = custom_calls(&c.module, "fp8xla_update_slice");
    assert_eq!(updates.len(), 5);
    let carried: HashSet<String> = w.regions[1].blocks[0]
        .args
        .iter()
        .map(|a| a.name.clone())
        .collect();
    for u in &updates {
        assert!(carried.contains(&u.operands[0]), "{:?}", u.operands);
        assert_eq!(u.result_types[0], u.operand_types[0]);
        assert!(u
            .prop("output_operand_aliases")
            .is_some_and(|a| a.contains("operand_index = 0")));
    }
    let left = all_ops(&c.module)
        .into_iter()
        .filter(|o| o.name == "stablehlo.dynamic_update_slice")
        .count();
    assert_eq!(left, 4);
    // Nothing was dequantized as a whole.
    assert!(!c.report["handled"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["kind"] == "dequantize"));
    golden("gemma3.quantize.mlir", &print_module(&c.module));
    golden(
        "gemma3.quantize.report.json",
        &serde_json::to_string_pretty(&c.report).unwrap(),
    );
}

#[test]
fn gemma3_per_channel_skips_and_site_scales() {
    let c = quantize_checked("gemma3", "gemma3.quantize_mixed.json");
    // Site 1 is skipped: 23 matmuls; its weight is dequantized at that dot only.
    assert_eq!(matmul_count(&c), 23);
    let skipped = c.report["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0]["site"], 1);
    let deq: Vec<&Value> = c.report["handled"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["kind"] == "dequantize")
        .collect();
    assert_eq!(deq.len(), 1);
    assert_eq!(deq[0]["op"], "stablehlo.dot_general");
    let a_scales: BTreeMap<u64, f64> = c.report["matmuls"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| Some((m["site"].as_u64()?, m["a_scale"].as_f64()?)))
        .collect();
    assert_eq!(a_scales.keys().copied().collect::<Vec<_>>(), [0, 3]);
    let per_channel = custom_calls(&c.module, "fp8xla_matmul")
        .iter()
        .filter(|m| m.operands.len() == 3)
        .count();
    assert_eq!(
        per_channel, 6,
        "ffw_gating and ffw_gating_2, prefill and decode"
    );
    assert_no_float_table(&c.module);
}

#[test]
fn gemma3_per_row_embedding_takes_rows_with_their_scales() {
    // One scale per embedding row (dim 0, the free dim of the tied logits): the lookups are
    // fp8xla_take with the row scales as operand 2, and the logits matmul is per channel.
    let mut opts: Value = serde_json::from_str(&data("gemma3.quantize.json")).unwrap();
    let scales: Vec<f64> = (0..256).map(|i| 1e-3 * (1.0 + i as f64)).collect();
    for w in opts["weights"].as_array_mut().unwrap() {
        if w["arg"] == 2 {
            w["w_scale"] = serde_json::json!(scales);
            w["channel_dim"] = serde_json::json!(0);
        }
    }
    let c = quantize_checked_with("gemma3", opts.to_string());
    assert_no_float_table(&c.module);
    assert!(all_ops(&c.module)
        .iter()
        .all(|o| o.name != "stablehlo.gather"));
    let takes = custom_calls(&c.module, "fp8xla_take");
    assert_eq!(takes.len(), 2);
    let ops = all_ops(&c.module);
    for t in &takes {
        assert_eq!(t.operands.len(), 3);
        assert_eq!(t.operand_types[2].to_string(), "tensor<256xf32>");
        let def = ops
            .iter()
            .find(|o| o.results.iter().any(|r| r.name == t.operands[2]))
            .unwrap();
        assert_eq!(def.name, "stablehlo.constant");
        let value = def.prop("value").unwrap();
        assert!(
            value.starts_with("dense<[1.000000047e-3, 2.000000095e-3"),
            "{value}"
        );
        assert!(t.prop("backend_config").unwrap().contains("scale = 1"));
    }
    let logits: Vec<&Value> = c.report["matmuls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["arg"] == 2)
        .collect();
    assert_eq!(logits.len(), 1);
}

#[test]
fn gemma3_dynamic_activation_scales() {
    // `a_dynamic: true`: every matmul on the weight computes its activation scales at run time
    // (attribute a_dynamic), never with a static a_scale, even where a site scale is given.
    let mut opts: Value = serde_json::from_str(&data("gemma3.quantize.json")).unwrap();
    for w in opts["weights"].as_array_mut().unwrap() {
        w.as_object_mut().unwrap().remove("a_scale");
        w["a_dynamic"] = serde_json::json!(true);
    }
    opts["a_scales"] = serde_json::json!({"0": 0.5});
    let c = quantize_checked_with("gemma3", opts.to_string());
    let matmuls = custom_calls(&c.module, "fp8xla_matmul");
    assert!(!matmuls.is_empty());
    for m in &matmuls {
        let config = m.prop("backend_config").unwrap();
        assert!(config.contains("a_dynamic = true"), "{config}");
        assert!(!config.contains("a_scale"), "{config}");
    }
    for m in c.report["matmuls"].as_array().unwrap() {
        assert_eq!(m["a_dynamic"], true);
        assert_eq!(m["a_scale"], Value::Null);
    }
    // both at once is an error naming the argument
    let mut opts: Value = serde_json::from_str(&data("gemma3.quantize.json")).unwrap();
    opts["weights"][0]["a_scale"] = serde_json::json!(0.25);
    opts["weights"][0]["a_dynamic"] = serde_json::json!(true);
    let arg = opts["weights"][0]["arg"].clone();
    let e = quantize(&data("gemma3.mlir"), &opts.to_string())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!(
            "either `a_scale` or `a_dynamic: true` for argument {arg}"
        )),
        "{e}"
    );
}

#[test]
fn gemma3_per_channel_embedding_gathers_bytes() {
    // Per-channel scales along the embedding's row dim: no fp8xla_take (it is per tensor);
    // the gather reads the FP8 table's bytes (XLA's CPU backend would gather FP8 through a
    // whole-table f16 copy) and the rows are dequantized by the custom call, never by a
    // stablehlo.convert that XLA could move in front of the gather and out of the loop.
    let mut opts: Value = serde_json::from_str(&data("gemma3.quantize.json")).unwrap();
    for w in opts["weights"].as_array_mut().unwrap() {
        if w["arg"] == 2 {
            let scales: Vec<f64> = (0..32).map(|i| 1e-3 * (1.0 + i as f64)).collect();
            w["w_scale"] = serde_json::json!(scales);
            w["channel_dim"] = serde_json::json!(1);
        }
    }
    let c = quantize_checked_with("gemma3", opts.to_string());
    assert!(custom_calls(&c.module, "fp8xla_take").is_empty());
    let ops = all_ops(&c.module);
    let def = |name: &String| {
        *ops.iter()
            .find(|o| o.results.iter().any(|r| &r.name == name))
            .unwrap()
    };
    let only_user = |name: &String| {
        let users: Vec<&&Op> = ops.iter().filter(|o| o.operands.contains(name)).collect();
        assert_eq!(users.len(), 1, "{name}");
        *users[0]
    };
    let ui8 = ElementType::Int {
        width: 8,
        unsigned: true,
    };
    let gathers: Vec<&&Op> = ops
        .iter()
        .filter(|o| o.name == "stablehlo.gather")
        .collect();
    assert_eq!(gathers.len(), 2);
    for g in gathers {
        assert_eq!(element(&g.operand_types[0]), Some(ui8.clone()));
        assert_eq!(element(&g.result_types[0]), Some(ui8.clone()));
        let bytes = def(&g.operands[0]);
        assert_eq!(bytes.name, "stablehlo.bitcast_convert");
        assert_eq!(
            element(&bytes.operand_types[0]),
            Some(ElementType::F8E4M3FN)
        );
        let rows = only_user(&g.results[0].name);
        assert_eq!(rows.name, "stablehlo.bitcast_convert");
        assert_eq!(element(&rows.result_types[0]), Some(ElementType::F8E4M3FN));
        let deq = only_user(&rows.results[0].name);
        assert_eq!(deq.prop("call_target_name"), Some("\"fp8xla_dequantize\""));
        // scale 1 in the call, then the per-channel scales along the row dim
        assert_eq!(only_user(&deq.results[0].name).name, "stablehlo.multiply");
    }
    // (The tied logits contract the channel dim, so the logits matmul dequantizes the table
    // as a whole here: scales along a contracting dim cannot be applied to the output.)
}

#[test]
fn gemma3_instrument_matches_quantize_sites() {
    let text = data("gemma3.mlir");
    let sidecar: Value = serde_json::from_str(&data("gemma3.args.json")).unwrap();
    let options = serde_json::json!({"args": sidecar["args"]}).to_string();
    let (out, table) = instrument(&text, &options).unwrap();
    let module = parse_module(&out).unwrap();
    verify(&module).unwrap();
    let observes = custom_calls(&module, "fp8xla_observe");
    assert_eq!(observes.len(), 24);
    for (i, o) in observes.iter().enumerate() {
        assert_eq!(o.prop("has_side_effect"), Some("true"));
        assert_eq!(o.operand_types, o.result_types);
        let _ = i;
    }
    let table: Value = serde_json::from_str(&table).unwrap();
    let sites = table["sites"].as_array().unwrap();
    assert_eq!(sites.len(), 24);
    assert_eq!(sites[0]["path"], "decoder_block_0/attention/query/kernel");
    assert_eq!(sites[0]["arg_name"], "state[1][3]");
    assert_eq!(sites[0]["activation_shape"], serde_json::json!([1, 8, 32]));
    // Every observe result feeds a dot_general.
    let dot_operands: HashSet<&str> = all_ops(&module)
        .into_iter()
        .filter(|o| o.name == "stablehlo.dot_general")
        .flat_map(|o| o.operands.iter().map(String::as_str))
        .collect();
    for o in &observes {
        assert!(dot_operands.contains(o.results[0].name.as_str()));
    }
    // Same numbering as quantize with the same weights.
    let q = quantize_checked("gemma3", "gemma3.quantize.json");
    for m in q.report["matmuls"].as_array().unwrap() {
        let s = m["site"].as_u64().unwrap() as usize;
        assert_eq!(sites[s]["arg"], m["arg"], "site {s}");
    }
    golden("gemma3.instrument.mlir", &out);
    golden(
        "gemma3.instrument.sites.json",
        &serde_json::to_string_pretty(&table).unwrap(),
    );
}

#[test]
fn update_slices_in_place_can_be_turned_off() {
    let mut opts: Value = serde_json::from_str(&data("gemma3.quantize.json")).unwrap();
    opts["update_slices_in_place"] = Value::Bool(false);
    let c = quantize_checked_with("gemma3", opts.to_string());
    assert!(custom_calls(&c.module, "fp8xla_update_slice").is_empty());
    let updates = all_ops(&c.module)
        .into_iter()
        .filter(|o| o.name == "stablehlo.dynamic_update_slice")
        .count();
    assert_eq!(updates, 9);
}
