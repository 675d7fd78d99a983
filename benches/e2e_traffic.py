"""How many bytes one decode step of a contender reads from memory, and how close its decode
comes to the memory limit that the bandwidth probe (e2e_bandwidth.py) measures.

How the bytes are counted (per generated token, batch 1):

* **Weights**: every weight the deployed model holds, once, in the format it holds it (float32:
  4 bytes an element; fp8xla: its FP8 codes and scales, plus the weights it keeps in float;
  Keras int8: int8 kernels and their scales; llama.cpp: the GGUF's tensors as stored, e.g.
  Q8_0 at 34 bytes per 32 elements). A decode step of Gemma 3 reads each of them once: the
  blocks' matmuls, the norms, and the tied embedding table, which the logits projection reads
  whole (the embedding lookup of the one new token reads a single row of it, not counted again).
* **KV cache**: ``layers x 2 (key, value) x kv_heads x head_dim x bytes per element`` per
  position, at the mean context of the measured steps: a decode of N tokens after a P-token
  prompt attends P + N / 2 positions on average. Bytes per element are those of the
  contender's cache (Keras-Hub: the model's compute dtype, float32 here; llama.cpp: f16).
  Sliding-window layers are counted at the full context (Gemma 3 270M: a 512-token window in
  5 of 6 layers), an overcount of about 1 % of a step's bytes at the benchmark's 512 + 128
  tokens. What an implementation reads beyond this (Keras-Hub attends over its whole
  preallocated cache, masked; activations; the sampler's pass over the logits) is not
  counted: the count is what a step needs, so the share says how close a contender comes to
  the machine, not how much it reads.

Share of the memory limit = decode tokens/s x bytes per token / probe bandwidth; 1.0 would be
a decode that streams exactly these bytes at the probe's read bandwidth.
"""
from __future__ import annotations

import math

import numpy as np


def _nbytes(shape, dtype) -> int:
    return int(math.prod(int(d) for d in shape)) * np.dtype(dtype).itemsize


def _dtype_of(variable) -> str:
    dtype = variable.dtype
    return getattr(dtype, "name", None) or str(dtype)


def keras_weight_bytes(model) -> int:
    """Bytes of every weight a Keras-Hub model holds, as it holds it. For a model quantized by
    fp8xla (``model.fp8``), each quantized variable counts as its FP8 codes and scale instead
    of the float variable it replaces."""
    state = getattr(model, "fp8", None)
    quantized = {}
    if state is not None:
        trainable = model.trainable_variables
        quantized = {id(trainable[i]): q for i, q in state.weights.items()}
    total = 0
    for v in model.weights:
        q = quantized.get(id(v))
        if q is None:
            total += _nbytes(v.shape, _dtype_of(v))
        else:
            total += int(np.asarray(q.codes).nbytes) + int(np.asarray(q.w_scale).nbytes)
    return total


def kv_bytes_per_position(layers: int, kv_heads: int, head_dim: int, bytes_per_element: int,
                          value_dim: int | None = None) -> int:
    """Bytes of one position's keys and values over all layers."""
    value_dim = head_dim if value_dim is None else value_dim
    return int(layers) * int(kv_heads) * (int(head_dim) + int(value_dim)) * int(bytes_per_element)


def keras_kv_bytes_per_position(model) -> int:
    """Keras-Hub Gemma 3's cache: per layer a key and a value tensor of [batch, length,
    kv_heads, head_dim] in the model's compute dtype, or with ``kv_cache_dtype`` FP8 codes
    and one float32 scale per row (position and head)."""
    b = model.backbone
    state = getattr(model, "fp8", None)
    if state is not None and getattr(state.config, "kv_cache_dtype", None):
        return kv_bytes_per_position(b.num_layers, b.num_key_value_heads, b.head_dim + 4, 1)
    return kv_bytes_per_position(b.num_layers, b.num_key_value_heads, b.head_dim,
                                 np.dtype(model.compute_dtype).itemsize)


def gguf_weight_bytes(reader) -> int:
    """Bytes of every tensor of a GGUF file (a ``gguf.GGUFReader``) as stored."""
    return int(sum(int(t.n_bytes) for t in reader.tensors))


def gguf_kv_bytes_per_position(reader, bytes_per_element: int) -> int:
    """llama.cpp's cache for a GGUF model, from its metadata (``ARCH.block_count``,
    ``ARCH.attention.head_count_kv``, ``.key_length``, ``.value_length``)."""
    arch = _gguf_value(reader, "general.architecture")

    def get(name):
        return int(_gguf_value(reader, f"{arch}.{name}"))

    return kv_bytes_per_position(get("block_count"), get("attention.head_count_kv"),
                                 get("attention.key_length"), bytes_per_element,
                                 get("attention.value_length"))


def _gguf_value(reader, key):
    field = reader.fields.get(key)
    if field is None:
        raise KeyError(f"e2e_traffic: the GGUF has no metadata key {key!r}")
    value = field.contents()
    return value


def decode_bytes_per_token(weight_bytes: int, kv_per_position: int, prompt_tokens: int,
                           new_tokens: int) -> dict:
    """The bytes one decode step reads (see the module doc), with its parts."""
    context = prompt_tokens + new_tokens / 2
    kv = kv_per_position * context
    return {"weights": int(weight_bytes), "kv_cache_per_position": int(kv_per_position),
            "mean_context": context, "kv_cache": kv, "total": weight_bytes + kv}


def memory_limit_share(tokens_per_s, bytes_per_token, bandwidth):
    """Decode's share of the memory limit, or None where a number is missing."""
    if tokens_per_s is None or bytes_per_token is None or not bandwidth:
        return None
    return tokens_per_s * bytes_per_token / bandwidth
