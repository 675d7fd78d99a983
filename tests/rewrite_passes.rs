//! The passes by name (`run_pass`): each runs alone, and bad names and options are refused
//! with errors that say what is known.

use fp8xla::rewrite::ir::{Module, Op};
use fp8xla::rewrite::{parse_module, quantize, run_pass, verify, PASSES};
use serde_json::Value;

fn data(name: &str) -> String {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn ops_named<'m>(m: &'m Module, name: &str) -> Vec<&'m Op> {
    let mut out = Vec::new();
    m.top.walk(&mut |o| {
        if o.name == name {
            out.push(o)
        }
    });
    out
}

fn calls_to(m: &Module, target: &str) -> usize {
    let quoted = format!("\"{target}\"");
    ops_named(m, "stablehlo.custom_call")
        .iter()
        .filter(|o| o.prop("call_target_name") == Some(quoted.as_str()))
        .count()
}

/// Runs a pass; checks the result parses and verifies; returns it and the report.
fn run(name: &str, module: &str, options: &str) -> (Module, Value) {
    let (text, report) = run_pass(name, module, options).unwrap_or_else(|e| panic!("{e}"));
    let m = parse_module(&text).expect("result parses");
    verify(&m).expect("result verifies");
    (m, serde_json::from_str(&report).expect("report is JSON"))
}

#[test]
fn update_slices_in_place_runs_alone() {
    // The blessed quantize output has as many in-place updates as the pass finds alone.
    let golden = parse_module(&data("golden/gemma3.quantize.mlir")).unwrap();
    let expected = calls_to(&golden, "fp8xla_update_slice");
    assert!(expected > 0);
    let input = parse_module(&data("gemma3.mlir")).unwrap();
    let (m, report) = run("update_slices_in_place", &data("gemma3.mlir"), "{}");
    assert_eq!(calls_to(&m, "fp8xla_update_slice"), expected);
    assert_eq!(
        ops_named(&m, "stablehlo.dynamic_update_slice").len(),
        ops_named(&input, "stablehlo.dynamic_update_slice").len() - expected
    );
    assert_eq!(report["pass"], "update_slices_in_place");
    let handled = report["handled"].as_array().unwrap();
    assert_eq!(handled.len(), expected);
    assert!(handled.iter().all(|h| h["kind"] == "update_slice_in_place"));
    // Nothing else changed: no weight was touched.
    assert_eq!(calls_to(&m, "fp8xla_matmul"), 0);
}

#[test]
fn decode_dots_runs_alone_with_its_threshold() {
    let text = data("gemma3.mlir");
    let input = parse_module(&text).unwrap();
    let dots = ops_named(&input, "stablehlo.dot_general").len();
    // The tiny model's operands are all under the default 64 KiB: nothing to rewrite.
    let (m, report) = run("decode_dots", &text, "{}");
    assert_eq!(calls_to(&m, "fp8xla_dot_f32"), 0);
    assert_eq!(report["handled"].as_array().unwrap().len(), 0);
    // With no threshold, the decode-shaped float32 products are rewritten, and only they.
    let (m, report) = run("decode_dots", &text, r#"{"min_bytes": 0}"#);
    let rewritten = calls_to(&m, "fp8xla_dot_f32");
    assert!(rewritten > 0 && rewritten < dots, "{rewritten} of {dots}");
    assert_eq!(
        ops_named(&m, "stablehlo.dot_general").len(),
        dots - rewritten
    );
    let handled = report["handled"].as_array().unwrap();
    assert_eq!(handled.len(), rewritten);
    assert!(handled.iter().all(|h| h["kind"] == "f32_dot_gemv"));
}

#[test]
fn sampler_argmax_runs_alone_with_its_threshold() {
    let text = data("gemma3.mlir");
    let input = parse_module(&text).unwrap();
    let reduces = ops_named(&input, "stablehlo.reduce").len();
    // The tiny model's vocabulary (256) is under the default threshold: nothing to rewrite.
    let (m, report) = run("sampler_argmax", &text, "{}");
    assert_eq!(calls_to(&m, "fp8xla_argmax"), 0);
    assert_eq!(report["handled"].as_array().unwrap().len(), 0);
    // With the threshold at the vocabulary, the sampler's argmax (JAX's private `argmax`
    // function, called in the decode loop) becomes the call, and no other reduce does.
    let (m, report) = run("sampler_argmax", &text, r#"{"min_size": 256}"#);
    assert_eq!(calls_to(&m, "fp8xla_argmax"), 1);
    assert_eq!(ops_named(&m, "stablehlo.reduce").len(), reduces - 1);
    let handled = report["handled"].as_array().unwrap();
    assert_eq!(handled.len(), 1);
    assert_eq!(handled[0]["kind"], "sampler_argmax");
    assert_eq!(handled[0]["function"], "argmax");
    let call = ops_named(&m, "stablehlo.custom_call")[0];
    assert_eq!(call.operand_types.len(), 1);
    assert_eq!(call.operand_types[0].to_string(), "tensor<1x256xf32>");
    assert_eq!(call.result_types.len(), 1);
    assert_eq!(call.result_types[0].to_string(), "tensor<1xi32>");
    let (m, _) = run("sampler_argmax", &text, r#"{"min_size": 257}"#);
    assert_eq!(calls_to(&m, "fp8xla_argmax"), 0);
    // quantize runs it with its option, and not when turned off.
    let mut opts: Value = serde_json::from_str(&data("gemma3.quantize.json")).unwrap();
    opts["sampler_argmax_min_size"] = 256.into();
    let (q, _) = quantize(&text, &opts.to_string()).unwrap();
    assert_eq!(calls_to(&parse_module(&q).unwrap(), "fp8xla_argmax"), 1);
    opts["sampler_argmax"] = false.into();
    let (q, _) = quantize(&text, &opts.to_string()).unwrap();
    assert_eq!(calls_to(&parse_module(&q).unwrap(), "fp8xla_argmax"), 0);
}

#[test]
fn quantize_by_name_is_quantize() {
    let (module, options) = (data("gemma3.mlir"), data("gemma3.quantize.json"));
    assert_eq!(
        run_pass("quantize", &module, &options).unwrap(),
        quantize(&module, &options).unwrap()
    );
}

#[test]
fn an_unknown_pass_name_lists_the_known_ones() {
    let e = run_pass("decode_dot", &data("dot.mlir"), "{}").unwrap_err();
    assert_eq!(e.stage, "pass");
    assert_eq!(e.found, "the unknown pass \"decode_dot\"");
    for name in PASSES {
        assert!(e.expected.contains(name), "{e}");
    }
    assert!(e.to_string().contains("decode_dots"), "{e}");
}

#[test]
fn options_of_the_passes_run_alone_are_checked() {
    let m = data("dot.mlir");
    let e = run_pass("update_slices_in_place", &m, r#"{"in_place": true}"#).unwrap_err();
    assert_eq!(e.stage, "options");
    assert_eq!(e.found, "the key `in_place`");
    assert!(e.expected.contains("update_slices_in_place options"), "{e}");
    let e = run_pass("decode_dots", &m, r#"{"min_bytes": "64k"}"#).unwrap_err();
    assert_eq!(e.stage, "options");
    assert!(e.expected.contains("`min_bytes`"), "{e}");
    assert!(e.found.contains("64k"), "{e}");
    let e = run_pass("decode_dots", &m, r#"{"decode_dots_min_bytes": 1}"#).unwrap_err();
    assert!(e.expected.contains("`min_bytes`"), "{e}");
    let e = run_pass("sampler_argmax", &m, r#"{"min_size": -1}"#).unwrap_err();
    assert_eq!(e.stage, "options");
    assert_eq!(e.expected, "a non-negative integer for `min_size`");
    let e = run_pass("sampler_argmax", &m, r#"{"min_bytes": 1}"#).unwrap_err();
    assert!(
        e.expected
            .contains("`min_size` in the sampler_argmax options"),
        "{e}"
    );
}
