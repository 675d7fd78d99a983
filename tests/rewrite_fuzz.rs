//! The parser (and the passes behind it) never panic: truncations at many offsets, and
//! random byte flips, line deletions and duplications of the real modules.

use fp8xla::rewrite::{instrument, parse_module, print_module, quantize};
use proptest::prelude::*;

fn data(name: &str) -> String {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Parses; if that works, printing is a fixpoint and the passes return (Ok or Err).
fn exercise(text: &str, quantize_options: &str) {
    if let Ok(m) = parse_module(text) {
        let printed = print_module(&m);
        let again = parse_module(&printed).expect("printed text parses");
        assert_eq!(print_module(&again), printed);
    }
    let _ = quantize(text, quantize_options);
    let _ = instrument(text, "{}");
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn truncations() {
    for (name, step, opts) in [
        ("dot.mlir", 1, "dot.quantize.json"),
        ("mlp.mlir", 3, "mlp.quantize.json"),
        ("shared_call.mlir", 5, "shared_call.quantize.json"),
        ("gemma3.mlir", 4999, "gemma3.quantize.json"),
    ] {
        let text = data(name);
        let opts = data(opts);
        let bytes = text.as_bytes();
        for cut in (0..bytes.len()).step_by(step) {
            let t = lossy(&bytes[..cut]);
            if parse_module(&t).is_ok() {
                // Only cuts in the trailing alias lines can still parse.
                assert!(
                    cut > text.find("\n#loc").unwrap_or(0),
                    "{name} cut at {cut}"
                );
            }
            exercise(&t, &opts);
        }
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let deep = format!(
        "\"a.b\"() {{x = {}1{}}} : () -> ()",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert!(parse_module(&deep).is_err());
    let mut regions = String::new();
    for _ in 0..5000 {
        regions.push_str("\"a.b\"() ({\n");
    }
    assert!(parse_module(&regions).is_err());
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    DeleteLine(usize),
    DuplicateLine(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let byte = prop::sample::select(b"(){}[]<>\"%#:,=^-> \nx0123456789abcdefloc@!\\\xff".to_vec());
    prop_oneof![
        (any::<usize>(), byte).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::DeleteLine),
        any::<usize>().prop_map(Mutation::DuplicateLine),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(text: &str, muts: &[Mutation]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for m in muts {
        if bytes.is_empty() {
            break;
        }
        match *m {
            Mutation::Flip(i, b) => {
                let i = i % bytes.len();
                bytes[i] = b;
            }
            Mutation::Truncate(i) => bytes.truncate(i % bytes.len()),
            Mutation::DeleteLine(i) | Mutation::DuplicateLine(i) => {
                let s = lossy(&bytes);
                let mut lines: Vec<&str> = s.split('\n').collect();
                let k = i % lines.len();
                if matches!(m, Mutation::DeleteLine(_)) {
                    lines.remove(k);
                } else {
                    let l = lines[k];
                    lines.insert(k, l);
                }
                bytes = lines.join("\n").into_bytes();
            }
        }
    }
    lossy(&bytes)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn mutated_small_modules(which in 0usize..4, muts in prop::collection::vec(mutation(), 1..6)) {
        let (name, opts) = [
            ("dot.mlir", "dot.quantize.json"),
            ("mlp.mlir", "mlp.quantize.json"),
            ("lhs_weight.mlir", "lhs_weight.quantize.json"),
            ("shared_call.mlir", "shared_call.quantize.json"),
        ][which];
        exercise(&apply(&data(name), &muts), &data(opts));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn mutated_gemma3(muts in prop::collection::vec(mutation(), 1..4)) {
        exercise(&apply(&data("gemma3.mlir"), &muts), &data("gemma3.quantize.json"));
    }
}
