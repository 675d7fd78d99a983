//! The rewritten modules parse in jaxlib's MLIR (stablehlo dialects loaded) and serialize as
//! portable artifacts. Needs a Python with jax: `FP8XLA_PYTHON` (default `python3`); skipped
//! with a message when jax cannot be imported.

use std::path::PathBuf;
use std::process::Command;

use fp8xla::rewrite::{instrument, quantize};

fn data(name: &str) -> String {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn python() -> String {
    std::env::var("FP8XLA_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[test]
fn rewritten_modules_parse_in_jaxlib() {
    let py = python();
    let has_jax = Command::new(&py)
        .args(["-c", "import jax, jaxlib.mlir.dialects.stablehlo"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_jax {
        eprintln!("skipped: `{py}` cannot import jax (set FP8XLA_PYTHON)");
        return;
    }
    let dir: PathBuf = std::env::temp_dir().join(format!("fp8xla-rewrite-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for (module, options) in [
        ("dot", "dot.quantize.json"),
        ("mlp", "mlp.quantize.json"),
        ("lhs_weight", "lhs_weight.quantize.json"),
        ("shared_call", "shared_call.quantize.json"),
        ("gemma3", "gemma3.quantize.json"),
        ("gemma3", "gemma3.quantize_mixed.json"),
    ] {
        let text = data(&format!("{module}.mlir"));
        let (q, _) = quantize(&text, &data(options)).unwrap();
        let path = dir.join(options.replace(".json", ".mlir"));
        std::fs::write(&path, q).unwrap();
        files.push(path);
        let (i, _) = instrument(&text, "{}").unwrap();
        let path = dir.join(format!("{module}.instrument.mlir"));
        std::fs::write(&path, i).unwrap();
        files.push(path);
    }
    let script = format!(
        "{}/tests/data/export_modules.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = Command::new(&py)
        .arg(script)
        .arg("--check-files")
        .args(&files)
        .env("JAX_PLATFORMS", "cpu")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "jaxlib refused a rewritten module:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
