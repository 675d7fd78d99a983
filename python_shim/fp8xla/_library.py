"""Finds and loads the fp8xla shared library and registers its handlers with XLA."""
from __future__ import annotations

import ctypes
import glob
import os

import jax

# Custom-call target names; each is also the exported C symbol of its handler.
TARGETS = (
    "fp8xla_quantize",
    "fp8xla_dequantize",
    "fp8xla_qdq",
    "fp8xla_observe",
    "fp8xla_matmul",
    "fp8xla_dot_f32",
    "fp8xla_take",
    "fp8xla_update_slice",
)

_lib: ctypes.CDLL | None = None


def library_path() -> str:
    """The shared library to load: $FP8XLA_LIBRARY if set, else the one built into the package."""
    override = os.environ.get("FP8XLA_LIBRARY")
    if override:
        if not os.path.isfile(override):
            raise FileNotFoundError(f"fp8xla: FP8XLA_LIBRARY={override!r} is not a file")
        return override
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_native*.so")))
    if not found:
        raise ImportError(
            f"fp8xla: the native library is missing from {here}; install the package with "
            "`pip install .` from the repository root (it builds the Rust library) or set "
            "FP8XLA_LIBRARY"
        )
    return found[0]


def _declare(lib: ctypes.CDLL) -> None:
    i64p = ctypes.POINTER(ctypes.c_int64)
    f32p = ctypes.POINTER(ctypes.c_float)
    lib.fp8xla_observer_num_sites.restype = ctypes.c_int64
    lib.fp8xla_observer_num_sites.argtypes = []
    lib.fp8xla_observer_read.restype = ctypes.c_int64
    lib.fp8xla_observer_read.argtypes = [i64p, f32p, i64p, i64p, ctypes.c_int64]
    lib.fp8xla_observer_reset.restype = None
    lib.fp8xla_observer_reset.argtypes = []
    lib.fp8xla_rewrite.restype = ctypes.c_int32
    lib.fp8xla_rewrite.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                   ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p)]
    lib.fp8xla_free_string.restype = None
    lib.fp8xla_free_string.argtypes = [ctypes.c_void_p]
    lib.fp8xla_isa_level.restype = ctypes.c_int32
    lib.fp8xla_isa_level.argtypes = []


def load() -> ctypes.CDLL:
    """Loads the library once per process and registers every target for the CPU platform."""
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(library_path())
        _declare(lib)
        for name in TARGETS:
            jax.ffi.register_ffi_target(
                name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu"
            )
        _lib = lib
    return _lib


def isa() -> str:
    """The instruction set the kernels dispatch to on this CPU."""
    return ("scalar", "avx2", "avx512")[load().fp8xla_isa_level()]
