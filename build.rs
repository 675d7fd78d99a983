//! Generates Rust bindings for XLA's FFI C API from the header shipped inside the installed
//! jaxlib, so the ABI always matches the XLA that will load this library.
use std::{env, path::PathBuf, process::Command};

fn jaxlib_include_dir() -> PathBuf {
    if let Ok(dir) = env::var("XLA_FFI_INCLUDE") {
        return PathBuf::from(dir);
    }
    // setuptools-rust exports the interpreter running the Python build as PYO3_PYTHON; a plain
    // `cargo build` uses the project's venv (made by `./run`) if there is one.
    let venv = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join(".venv/bin/python");
    let python = env::var("PYO3_PYTHON").unwrap_or_else(|_| {
        if venv.is_file() {
            venv.to_string_lossy().into_owned()
        } else {
            "python3".to_string()
        }
    });
    let out = Command::new(&python)
        .args([
            "-c",
            "import os, jaxlib; print(os.path.join(os.path.dirname(jaxlib.__file__), 'include'))",
        ])
        .output()
        .unwrap_or_else(|e| panic!("fp8xla build: cannot run {python} to locate jaxlib: {e}"));
    if !out.status.success() {
        panic!(
            "fp8xla build: `{python} -c 'import jaxlib'` failed; install jaxlib or set \
             XLA_FFI_INCLUDE to the directory holding xla/ffi/api/c_api.h\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn main() {
    println!("cargo:rerun-if-env-changed=XLA_FFI_INCLUDE");
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    let include = jaxlib_include_dir();
    let header = include.join("xla/ffi/api/c_api.h");
    assert!(
        header.is_file(),
        "fp8xla build: {} not found (set XLA_FFI_INCLUDE)",
        header.display()
    );
    println!("cargo:rerun-if-changed={}", header.display());
    let bindings = bindgen::Builder::default()
        .header(header.to_string_lossy())
        .clang_arg(format!("-I{}", include.display()))
        .allowlist_item("XLA_FFI_.*")
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .derive_default(true)
        .layout_tests(true)
        .generate()
        .expect("fp8xla build: bindgen failed on c_api.h");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("xla_ffi_bindings.rs");
    bindings
        .write_to_file(&out)
        .expect("fp8xla build: cannot write bindings");
}
