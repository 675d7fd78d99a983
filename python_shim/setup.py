"""Builds the Rust library (crate `fp8xla` at the repository root) into the package as a plain
C-ABI shared object; Python loads it with ctypes and hands its handlers to XLA."""
from setuptools import setup
from setuptools_rust import Binding, RustExtension

setup(
    rust_extensions=[
        RustExtension(
            "fp8xla._native",
            path="../Cargo.toml",
            binding=Binding.NoBinding,
            debug=False,
        )
    ],
    zip_safe=False,
)
