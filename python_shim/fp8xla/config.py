"""The quantization config shared by the Keras path (``fp8xla.keras``) and the plain-JAX path
(``fp8xla.jax``). Imports neither Keras nor anything heavy, so plain-JAX users need no Keras."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

_DTYPES = {"fp8_e4m3": "e4m3fn", "fp8_e5m2": "e5m2", "e4m3fn": "e4m3fn", "e5m2": "e5m2"}


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how; the fields :class:`StaticQuantConfig` and
    :class:`DynamicQuantConfig` share (INC's names: ``"fp8_e4m3"`` is e4m3fn).

    weight_dtype: ``"fp8_e4m3"`` or ``"fp8_e5m2"``.
    activation_dtype: the same names, or None for weight-only quantization.
    granularity: ``"per_channel"`` (one weight scale per output channel along the weight's
        largest output dimension) or ``"per_tensor"``.
    quantize_embeddings: also store the token embedding in FP8 (it serves the embedding
        lookup, which gathers FP8 rows, and the tied logits matmul). With ``"per_channel"``
        the embedding has one scale per row (the lookup gathers each row's scale with it).
    float_activation_layers: matmuls on weights whose path contains one of these strings
        keep float32 activations (their weights are still FP8).
    white_list: INC's white list: which weights to quantize, as regular expressions searched
        in the weight's path (e.g. ``"attention"``, ``"decoder_block_0/"``) or Keras layer
        types (e.g. ``keras.layers.EinsumDense``, the layer that owns the weight); None
        quantizes every weight matrix. The others stay float.
    weight_scale: ``"amax"`` (INC's ``amax / max``) or ``"search"``: per scale, the one of 16
        candidates in ``[17/32, 1] * amax / max`` with the least squared rounding error of the
        weight (never worse than amax; see :mod:`fp8xla.weight_rounding`).
    rounding: ``"rtn"`` (round to nearest) or ``"gptq"``: GPTQ on the FP8 grid, which needs
        ``calib_function`` (the Gram matrix of each weight's inputs is collected while it runs;
        the tied embedding's from the final hidden states, the same codes serve the lookup).
    gptq_damp, gptq_embedding_damp: GPTQ's damping (fraction of the Gram matrix's mean
        diagonal) for the linear layers and for the embedding.
    gptq_act_order: GPTQ rounds the inputs in order of decreasing energy (GPTQ's
        "act-order", INC's ``act_order``); the codes keep the weight's layout.
    gptq_sequential: GPTQ takes each weight's Gram matrix from the inputs that the layers
        before it, already rounded, produce (one transformer block at a time, in the order
        the block uses its weights; the tied embedding last), as GPTQ's reference
        implementation does; False: every Gram matrix from the float model, in one pass.
    float_weights: paths of weights kept in float (what ``autotune`` falls back to).
    kv_cache_dtype: ``"fp8_e4m3"`` or ``"fp8_e5m2"``: the decode loop's KV cache is stored
        in FP8, one scale per position and head computed when the row is written, and the
        decode attention reads it through FP8 GEMV kernels (docs/architecture.md, "FP8 KV
        cache"); None (default): a float32 cache.
    """

    weight_dtype: str = "fp8_e4m3"
    activation_dtype: str | None = "fp8_e4m3"
    granularity: str = "per_channel"
    quantize_embeddings: bool = True
    float_activation_layers: tuple = ()
    white_list: tuple | None = None
    weight_scale: str = "amax"
    rounding: str = "rtn"
    gptq_damp: float = 0.01
    gptq_embedding_damp: float = 0.1
    gptq_act_order: bool = False
    gptq_sequential: bool = False
    float_weights: tuple = ()
    kv_cache_dtype: str | None = None

    #: Activation scales computed per row at run time (DynamicQuantConfig) or static.
    dynamic = False

    def __post_init__(self):
        kind = type(self).__name__
        for name in ("weight_dtype", "activation_dtype", "kv_cache_dtype"):
            v = getattr(self, name)
            if v is None and name != "weight_dtype":
                continue
            if not isinstance(v, str) or v not in _DTYPES:
                raise ValueError(
                    f"{kind}: unknown {name} {v!r}; expected one of "
                    f"{sorted(k for k in _DTYPES if k.startswith('fp8'))}"
                    + (" or None" if name != "weight_dtype" else ""))
        if self.granularity not in ("per_channel", "per_tensor"):
            raise ValueError(
                f"{kind}: unknown granularity {self.granularity!r}; expected "
                "'per_channel' or 'per_tensor'")
        if self.weight_scale not in ("amax", "search"):
            raise ValueError(f"{kind}: unknown weight_scale {self.weight_scale!r}; "
                             "expected 'amax' or 'search'")
        if self.rounding not in ("rtn", "gptq"):
            raise ValueError(f"{kind}: unknown rounding {self.rounding!r}; expected "
                             "'rtn' or 'gptq'")
        for name in ("gptq_damp", "gptq_embedding_damp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and 0 < v < math.inf):
                raise ValueError(f"{kind}: {name} must be a finite number > 0, got {v!r}")
        for name, what in (("gptq_act_order", "orders GPTQ's rounding"),
                           ("gptq_sequential", "changes where GPTQ's inputs come from")):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise TypeError(f"{kind}: {name} must be True or False, got {v!r}")
            if v and self.rounding != "gptq":
                raise ValueError(f"{kind}: {name}=True {what}; it needs rounding='gptq', "
                                 f"got rounding={self.rounding!r}")
        if self.white_list is not None:
            items = (self.white_list,) if isinstance(self.white_list, (str, type)) else \
                tuple(self.white_list)
            for item in items:
                if isinstance(item, str):
                    try:
                        re.compile(item)
                    except re.error as e:
                        raise ValueError(f"{kind}: white_list entry {item!r} is not a regular "
                                         f"expression ({e})") from None
                elif not isinstance(item, type):
                    raise TypeError(f"{kind}: white_list entries must be path patterns (str) "
                                    f"or layer types, got {item!r}")
            object.__setattr__(self, "white_list", items)
        if isinstance(self.float_weights, str) or not all(
                isinstance(p, str) for p in self.float_weights):
            raise TypeError(f"{kind}: float_weights must be weight paths (a sequence of str), "
                            f"got {self.float_weights!r}")
        object.__setattr__(self, "float_weights", tuple(self.float_weights))

    def describe(self) -> str:
        """The class and the fields that differ from their defaults."""
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                   if f.name != "float_weights" and getattr(self, f.name) != f.default]
        return f"{type(self).__name__}({', '.join(changed)})"

    def selects(self, path, layer=None) -> bool:
        """Whether the white list (None: everything) names the weight at ``path`` (owned by
        ``layer``)."""
        if path in self.float_weights:
            return False
        if self.white_list is None:
            return True
        return any(re.search(item, path) if isinstance(item, str)
                   else layer is not None and isinstance(layer, item)
                   for item in self.white_list)

    @property
    def w_format(self) -> str:
        return _DTYPES[self.weight_dtype]

    @property
    def a_format(self) -> str | None:
        return _DTYPES[self.activation_dtype] if self.activation_dtype else None

    @property
    def kv_format(self) -> str | None:
        return _DTYPES[self.kv_cache_dtype] if self.kv_cache_dtype else None


@dataclass(frozen=True)
class StaticQuantConfig(QuantConfig):
    """INC's static quantization: activation scales are calibrated once (``calib_function``)
    and fixed, one per tensor at each matmul. Fields: :class:`QuantConfig`."""


@dataclass(frozen=True)
class DynamicQuantConfig(QuantConfig):
    """INC's dynamic quantization: no calibration for activations; ``fp8xla_matmul``
    quantizes each activation row (one token's inputs) with its own scale, ``amax / max``
    computed at run time. Fields: :class:`QuantConfig`."""

    dynamic = True
