//! parse → print is the identity (byte for byte) on every committed module.

use fp8xla::rewrite::{parse_module, print_module};

fn data(name: &str) -> String {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn roundtrip_is_identity() {
    for name in ["dot.mlir", "mlp.mlir", "gemma3.mlir"] {
        let text = data(name);
        let module = parse_module(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let printed = print_module(&module);
        if printed != text {
            let line = printed
                .lines()
                .zip(text.lines())
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!(
                "{name}: first difference at line {}:\n  printed: {}\n  source:  {}",
                line + 1,
                printed.lines().nth(line).unwrap_or(""),
                text.lines().nth(line).unwrap_or("")
            );
        }
        let again = parse_module(&printed).unwrap();
        assert_eq!(print_module(&again), text);
    }
}
