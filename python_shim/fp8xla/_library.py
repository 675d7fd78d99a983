"""Finds and loads the fp8xla shared library and registers its handlers with XLA."""
from __future__ import annotations

import ctypes
import glob
import json
import os

import jax

_lib: ctypes.CDLL | None = None
_targets: tuple[str, ...] = ()
# The elementwise targets (the rewrite's shard::ELEMENTWISE).
_ELEMENTWISE = ("fp8xla_quantize", "fp8xla_dequantize", "fp8xla_qdq")


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
    lib.fp8xla_kernel_info.restype = ctypes.c_char_p
    lib.fp8xla_kernel_info.argtypes = []


def read_targets(lib: ctypes.CDLL, path: str) -> tuple[str, ...]:
    """The custom-call targets library `lib` (loaded from `path`) exports, as it lists them:
    ``fp8xla_targets()`` returns a static string with each name followed by a newline."""
    try:
        fn = lib.fp8xla_targets
    except AttributeError:
        raise ImportError(
            f"fp8xla: the library {path} does not export fp8xla_targets(); it is older than "
            "this package: rebuild it (`pip install .` from the repository root) or point "
            "FP8XLA_LIBRARY at a current build") from None
    fn.restype = ctypes.c_char_p
    fn.argtypes = []
    names = tuple(fn().decode().splitlines())
    if not names or any(not (n.startswith("fp8xla_") and n.isidentifier()) for n in names):
        raise ImportError(
            f"fp8xla: fp8xla_targets() of {path} returned {names!r}; expected newline-"
            "terminated names starting with 'fp8xla_'")
    return names


def load() -> ctypes.CDLL:
    """Loads the library once per process and registers every target it lists for the CPU
    platform."""
    global _lib, _targets
    if _lib is None:
        path = library_path()
        lib = ctypes.CDLL(path)
        _declare(lib)
        names = read_targets(lib, path)
        for name in names:
            jax.ffi.register_ffi_target(
                name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu"
            )
            if name in _ELEMENTWISE:
                # Under sharding, XLA runs these per shard on calls that carry
                # `num_batch_dims` (the rewrite's `shard_calls` pass adds it).
                jax.ffi.register_ffi_target_as_batch_partitionable(name)
        _lib, _targets = lib, names
    return _lib


def targets() -> tuple[str, ...]:
    """The custom-call targets of the loaded library (all registered for the CPU platform)."""
    load()
    return _targets


_ISA_LEVELS = ("scalar", "avx2", "avx512", "amx")


def isa() -> str:
    """The instruction-set level the kernels run at: "scalar", "avx2", "avx512" or "amx"."""
    return _ISA_LEVELS[load().fp8xla_isa_level()]


def info() -> dict:
    """What the kernels run on this machine and why.

    Keys: ``isa`` (the level in use), ``supported`` (the best this CPU and OS offer), ``why``
    (how the level was chosen, e.g. "amx: requested by FP8XLA_ISA"), ``kernels`` (what runs
    for decode-shaped and prefill-shaped products) and ``levels`` (each level with
    ``available`` and, when it is not, the ``reason``, e.g. "OS refused tile state").
    ``FP8XLA_ISA=scalar|avx2|avx512|amx`` (read once, when the library loads) asks for a level.
    """
    requested = os.environ.get("FP8XLA_ISA")
    if requested is not None and requested not in _ISA_LEVELS:
        raise ValueError(f"fp8xla: FP8XLA_ISA={requested!r} is not one of "
                         f"{', '.join(_ISA_LEVELS)}")
    return json.loads(load().fp8xla_kernel_info().decode())


def banner() -> str:
    """One line for command-line tools: the kernels in use and why."""
    return f"kernels: {info()['why']}"
