"""The quantization config shared by the Keras path (``fp8xla.keras``) and the plain-JAX path
(``fp8xla.jax``). Imports neither Keras nor anything heavy, so plain-JAX users need no Keras."""
from __future__ import annotations

from dataclasses import dataclass

_DTYPES = {"fp8_e4m3": "e4m3fn", "fp8_e5m2": "e5m2", "e4m3fn": "e4m3fn", "e5m2": "e5m2"}


@dataclass(frozen=True)
class StaticQuantConfig:
    """What to quantize and how (INC's names: ``"fp8_e4m3"`` is e4m3fn).

    weight_dtype: ``"fp8_e4m3"`` or ``"fp8_e5m2"``.
    activation_dtype: the same names, or None for weight-only quantization.
    granularity: ``"per_channel"`` (one weight scale per output channel along the weight's last
        output dimension) or ``"per_tensor"``.
    quantize_embeddings: also store the token embedding in FP8 (it serves the embedding
        lookup, which gathers FP8 rows, and the tied logits matmul). Embedding scales are per
        tensor so that the lookup dequantizes only the rows it gathers.
    float_activation_layers: matmuls on weights whose path contains one of these strings
        keep float32 activations (their weights are still FP8).
    """

    weight_dtype: str = "fp8_e4m3"
    activation_dtype: str | None = "fp8_e4m3"
    granularity: str = "per_channel"
    quantize_embeddings: bool = True
    float_activation_layers: tuple = ()

    def __post_init__(self):
        for name in ("weight_dtype", "activation_dtype"):
            v = getattr(self, name)
            if v is None and name == "activation_dtype":
                continue
            if v not in _DTYPES:
                raise ValueError(
                    f"StaticQuantConfig: unknown {name} {v!r}; expected one of "
                    f"{sorted(k for k in _DTYPES if k.startswith('fp8'))}"
                    + (" or None" if name == "activation_dtype" else ""))
        if self.granularity not in ("per_channel", "per_tensor"):
            raise ValueError(
                f"StaticQuantConfig: unknown granularity {self.granularity!r}; expected "
                "'per_channel' or 'per_tensor'")

    @property
    def w_format(self) -> str:
        return _DTYPES[self.weight_dtype]

    @property
    def a_format(self) -> str | None:
        return _DTYPES[self.activation_dtype] if self.activation_dtype else None
