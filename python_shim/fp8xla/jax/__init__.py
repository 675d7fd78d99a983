"""FP8 for plain JAX: quantize any jitted function with pytree parameters.

    import fp8xla.jax
    from fp8xla.jax import StaticQuantConfig

    q = fp8xla.jax.quantize(fn, params, x, config=StaticQuantConfig(), calib_batches=[(x,)])
    y = q(q.params, x)          # runs the FP8 graph (compiled once per argument signature)
    q.print_model()             # path, kind, a_scale, w_scale of every weight
    q.save("fn_fp8")            # serialized module + safetensors FP8 parameters + manifest
    m = fp8xla.jax.load("fn_fp8")   # in another process, without fn
    y = m(m.params, x)

Which leaves are weights is decided by the graph of ``fn`` (leaves that feed a matmul or an
embedding gather), not by their names; see :func:`quantize`. Nothing here imports Keras.
"""
from ..config import StaticQuantConfig
from ._quantize import QuantizedFunction, QuantizedLeaf, load, print_model, quantize
from .artifact import ArtifactError

__all__ = ["ArtifactError", "QuantizedFunction", "QuantizedLeaf", "StaticQuantConfig", "load",
           "print_model", "quantize"]
