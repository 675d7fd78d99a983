//! Errors: each names the stage, the place, what was expected and what came.

use fp8xla::rewrite::{instrument, parse_module, quantize, RewriteError};

fn data(name: &str) -> String {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn q_err(module: &str, options: &str) -> RewriteError {
    match quantize(module, options) {
        Ok(_) => panic!("expected an error for {options}"),
        Err(e) => e,
    }
}

#[test]
fn argument_out_of_range() {
    let e = q_err(
        &data("dot.mlir"),
        r#"{"weights": [{"arg": 2, "format": "e4m3fn", "w_scale": 1.0}]}"#,
    );
    assert_eq!(e.stage, "quantize");
    assert!(e.expected.contains("below 2"), "{e}");
    assert_eq!(e.found, "argument 2");
    assert!(e.line > 0, "points at @main: {e}");
}

#[test]
fn argument_not_float() {
    // Gemma3 argument 1 is the int32 token ids.
    let e = q_err(
        &data("gemma3.mlir"),
        r#"{"weights": [{"arg": 1, "format": "e4m3fn", "w_scale": 1.0}]}"#,
    );
    assert!(e.expected.contains("float tensor"), "{e}");
    assert!(e.found.contains("tensor<1x8xi32>"), "{e}");
}

#[test]
fn bad_options() {
    let m = data("dot.mlir");
    for (options, expected, found) in [
        ("[1]", "a JSON object", "an array"),
        ("{", "a JSON object", "EOF"),
        (
            r#"{"weights": [{"arg": 1, "format": "e4m3", "w_scale": 1.0}]}"#,
            "format",
            "\"e4m3\"",
        ),
        (
            r#"{"weights": [{"arg": 1, "format": "e5m2", "w_scale": -1.0}]}"#,
            "finite scale > 0",
            "-1",
        ),
        (
            r#"{"weights": [{"arg": 1, "format": "e5m2", "w_scale": 1e39}]}"#,
            "finite scale > 0",
            "1e+39",
        ),
        (
            r#"{"weights": [{"arg": 1, "format": "e5m2"}]}"#,
            "the key `w_scale` in `weights[0]`",
            "no such key",
        ),
        (
            r#"{"weights": [{"arg": 1, "format": "e5m2", "w_scale": [1.0, 2.0]}]}"#,
            "channel_dim",
            "none",
        ),
        (
            r#"{"weights": [{"arg": 1, "format": "e5m2", "w_scale": [1.0, 2.0], "channel_dim": 1}]}"#,
            "8 per-channel scales",
            "2",
        ),
        (
            r#"{"weights": [{"arg": -1, "format": "e5m2", "w_scale": 1}]}"#,
            "non-negative integer",
            "-1",
        ),
        (
            r#"{"weights": [], "stric": true}"#,
            "one of the keys",
            "stric",
        ),
        (
            r#"{"weights": [{"arg": 1, "format": "e5m2", "w_scale": 1}, {"arg": 1, "format": "e5m2", "w_scale": 1}]}"#,
            "at most once",
            "twice",
        ),
        (
            r#"{"weights": [], "a_scales": {"x": 1.0}}"#,
            "site numbers",
            "x",
        ),
        (r#"{}"#, "`weights`", "no such key"),
    ] {
        let e = q_err(&m, options);
        assert_eq!(e.stage, "options", "{options}: {e}");
        assert!(e.expected.contains(expected), "{options}: {e}");
        assert!(e.found.contains(found), "{options}: {e}");
    }
}

#[test]
fn malformed_module() {
    let text = data("dot.mlir");
    // Cut inside the dot_general's operand list.
    let cut = text.find("%arg1) <{dot").unwrap() + 3;
    let e = q_err(&text[..cut], r#"{"weights": []}"#);
    assert_eq!(e.stage, "parser");
    assert!(e.line >= 4, "{e}");
    assert!(!e.expected.is_empty() && !e.found.is_empty(), "{e}");
    // A pretty-form module is refused with a hint.
    let e = parse_module(&data("dot.pretty.mlir")).unwrap_err();
    assert!(e.expected.contains("generic form"), "{e}");
    assert_eq!((e.line, e.column), (3, 1), "{e}");
    // Inconsistent types are refused before any rewriting.
    let bad = text.replace(
        "%0 = \"stablehlo.dot_general\"(%arg0, %arg1) <{dot_dimension_numbers = #stablehlo.dot<lhs_contracting_dimensions = [1], rhs_contracting_dimensions = [0]>}> : (tensor<4x16xf32>, tensor<16x8xf32>)",
        "%0 = \"stablehlo.dot_general\"(%arg0, %arg1) <{dot_dimension_numbers = #stablehlo.dot<lhs_contracting_dimensions = [1], rhs_contracting_dimensions = [0]>}> : (tensor<4x16xf32>, tensor<16x9xf32>)",
    );
    assert_ne!(bad, text);
    let e = q_err(&bad, r#"{"weights": []}"#);
    assert_eq!(e.stage, "verify");
    assert!(e.found.contains("16x9"), "{e}");
    assert_eq!(e.line, 6, "{e}");
}

#[test]
fn strict_refuses_whole_weight_dequantize() {
    // MLP bias b1 (argument 2) is used by broadcast_in_dim: not an FP8-native use.
    let m = data("mlp.mlir");
    let opts = r#"{"weights": [{"arg": 2, "format": "e4m3fn", "w_scale": 0.5}], "strict": true}"#;
    let e = q_err(&m, opts);
    assert_eq!(e.stage, "quantize");
    assert!(e.expected.contains("strict"), "{e}");
    assert!(e.found.contains("stablehlo.broadcast_in_dim"), "{e}");
    assert!(e.line > 0);
    // Not strict: dequantized at that use, and reported.
    let (_, report) = quantize(&m, &opts.replace("true", "false")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(r["handled"][0]["kind"], "dequantize");
    assert_eq!(r["handled"][0]["op"], "stablehlo.broadcast_in_dim");
}

#[test]
fn strict_refuses_per_channel_on_contracted_dim() {
    // channel_dim 0 of w (16x8) is the contracting dim of the dot.
    let scales: Vec<f32> = vec![0.5; 16];
    let opts = serde_json::json!({"weights": [{"arg": 1, "format": "e4m3fn", "w_scale": scales, "channel_dim": 0}], "strict": true}).to_string();
    let e = q_err(&data("dot.mlir"), &opts);
    assert!(e.found.contains("contracted"), "{e}");
    // Not strict: the site is skipped, the weight dequantized there.
    let (_, report) = quantize(&data("dot.mlir"), &opts.replace("true", "false")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(r["matmuls"].as_array().unwrap().len(), 0);
    assert_eq!(r["skipped"][0]["site"], 0);
}

#[test]
fn instrument_errors() {
    let e = instrument(&data("dot.mlir"), r#"{"weights": [7]}"#).unwrap_err();
    assert!(e.expected.contains("below 2"), "{e}");
    let e = instrument(&data("dot.mlir"), r#"{"entry": "nope"}"#).unwrap_err();
    assert!(e.expected.contains("@nope"), "{e}");
    let e = instrument("", "{}").unwrap_err();
    assert_eq!(e.stage, "parser");
    assert_eq!(e.found, "end of input");
}
