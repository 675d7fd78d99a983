"""fp8xla: true FP8 inference for JAX/Keras models on x86 CPUs.

Importing the package loads the native library and registers its XLA custom calls
(`fp8xla_quantize`, `fp8xla_dequantize`, `fp8xla_qdq`, `fp8xla_observe`, ...) for the CPU
platform, so jitted functions and deserialized exports that use them run in this process.
"""
from . import _library
from ._library import info, isa, library_path

_library.load()

from . import ops  # noqa: E402  (needs the targets registered)

__all__ = ["ops", "info", "isa", "library_path"]
__version__ = "0.1.0"
