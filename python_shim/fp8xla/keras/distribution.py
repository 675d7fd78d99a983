"""Keras-Hub Gemma3 under ``keras.distribution.ModelParallel``: a layout map valid for every
Gemma3 size, and the sharding of each variable as the FP8 graphs need it.

Tensor parallel over the mesh axis ``model`` (docs/sharding.md):

- query kernels ``(heads, hidden, head_dim)`` and the attention output ``(heads, head_dim,
  hidden)`` split on heads; key/value kernels split on heads only when the KV heads divide the
  model axis (Gemma3 270M has one KV head), otherwise replicated;
- the MLP: gating kernels ``(hidden, intermediate)`` split on ``intermediate`` (column
  parallel), ``ffw_linear`` ``(intermediate, hidden)`` on ``intermediate`` (row parallel: one
  all-reduce per layer);
- the token embedding ``(vocab, hidden)`` split on the vocabulary: the lookup takes the rows
  each device holds (one all-reduce), the tied logits are split by vocabulary (none);
- norms and everything else replicated; a dimension the axis does not divide stays
  replicated, so the map is valid for any Gemma3 configuration and any axis size.

Weights are replicated along the other mesh axes (the batch axis splits data only).

The FP8 codes of a weight take its layout (they have its shape); per-channel scales are
split with the dimension they run along, replicated otherwise (the rewrite does this).
"""
from __future__ import annotations

import jax
import keras


def gemma3_layout_map(device_mesh, backbone, model_dim: str = "model"):
    """A ``keras.distribution.LayoutMap`` of a Keras-Hub ``Gemma3Backbone``'s weights for
    tensor parallelism over ``device_mesh``'s axis ``model_dim``.

    ``backbone`` is a ``Gemma3Backbone`` or its config dict (``get_config()`` or a preset's
    ``config.json`` ``config``), which gives the head counts and sizes the layout depends on.
    Use it with ``keras.distribution.ModelParallel(layout_map=..., batch_dim_name=...)``."""
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise TypeError(f"fp8xla.keras.gemma3_layout_map: expected a "
                        f"keras.distribution.DeviceMesh, got {type(device_mesh).__name__}")
    if model_dim not in device_mesh.axis_names:
        raise ValueError(f"fp8xla.keras.gemma3_layout_map: the mesh has no axis {model_dim!r} "
                         f"(axes {list(device_mesh.axis_names)})")
    config = backbone if isinstance(backbone, dict) else backbone.get_config()
    try:
        q_heads = int(config["num_query_heads"])
        kv_heads = int(config["num_key_value_heads"])
        inter = int(config["intermediate_dim"])
        vocab = int(config["vocabulary_size"])
    except KeyError as e:
        raise ValueError(f"fp8xla.keras.gemma3_layout_map: the backbone config lacks {e}; "
                         "expected a Gemma3Backbone config") from None
    n = dict(zip(device_mesh.axis_names, device_mesh.shape))[model_dim]

    def split_if(divides, spec):
        return spec if divides else tuple(None for _ in spec)

    m = model_dim
    layout = keras.distribution.LayoutMap(device_mesh)
    layout["token_embedding/embeddings"] = split_if(vocab % n == 0, (m, None))
    layout["decoder_block.*attention.*query.kernel"] = split_if(q_heads % n == 0, (m, None, None))
    for name in ("key", "value"):
        layout[f"decoder_block.*attention.*{name}.kernel"] = split_if(
            kv_heads % n == 0, (m, None, None))
    layout["decoder_block.*attention_output.kernel"] = split_if(
        q_heads % n == 0, (m, None, None))
    layout["decoder_block.*ffw_gating.kernel"] = split_if(inter % n == 0, (None, m))
    layout["decoder_block.*ffw_gating_2.kernel"] = split_if(inter % n == 0, (None, m))
    layout["decoder_block.*ffw_linear.kernel"] = split_if(inter % n == 0, (m, None))
    return layout


def variable_sharding(variable):
    """The ``jax.sharding.NamedSharding`` of a Keras variable when it is split or replicated
    over more than one device, else ``None`` (a single-device variable: no sharding to
    declare). A variable whose value is not built (an FP8 model loaded from a preset) takes
    the layout the active distribution gives it."""
    try:
        s = getattr(variable.value, "sharding", None)
    except Exception:  # noqa: BLE001 - a loaded FP8 model never builds the float value
        s = None
    if not isinstance(s, jax.sharding.NamedSharding):
        dist = keras.distribution.distribution()
        layout = dist.get_variable_layout(variable) if dist is not None else None
        s = getattr(layout, "backend_layout", None) if layout is not None else None
    if isinstance(s, jax.sharding.NamedSharding) and s.mesh.size > 1:
        return s
    return None


def kv_cache_shardings(model):
    """The sharding of each layer's KV cache of a Keras-Hub Gemma3 causal LM as its key/value
    kernels are laid out: ``[(key, value), ...]`` ``NamedSharding``s of the caches
    ``[batch, length, kv_heads, head_dim]``, or ``None`` when the model is on one device or
    its layers are not Gemma3's (then no constraint is put: XLA decides, as before).

    The KV heads take the mesh axes of the key/value kernel's heads dimension (so split on the
    model axis when the KV heads divide it, replicated otherwise: :func:`gemma3_layout_map`);
    the batch, length and head dims stay whole, as the prompt the generate step gets is
    replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    layers = getattr(getattr(model, "backbone", None), "transformer_layers", None)
    if not layers:
        return None
    out = []
    for layer in layers:
        attention = getattr(layer, "attention", None)
        pair = []
        for name in ("key_dense", "value_dense"):
            kernel = getattr(getattr(attention, name, None), "kernel", None)
            if kernel is None or len(kernel.shape) != 3:
                return None  # not Gemma3's (kv_heads, hidden, head_dim) kernel
            s = variable_sharding(kernel)
            if s is None:
                return None
            spec = tuple(s.spec) + (None,) * (3 - len(s.spec))
            pair.append(NamedSharding(s.mesh, PartitionSpec(None, None, spec[0], None)))
        out.append(tuple(pair))
    return out


def host_value(x):
    """A variable's value as one host array, also when its shards live in other processes
    (gathered over ``jax.distributed``; every process must call this)."""
    import numpy as np

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def max_over_processes(amax: dict) -> dict:
    """The per-key maximum of ``amax`` over every process of a ``jax.distributed`` run (the
    calibration maximum of all devices and processes); unchanged in a single process. Every
    process passes the same keys."""
    if jax.process_count() == 1 or not amax:
        return amax
    import numpy as np
    from jax.experimental import multihost_utils

    keys = sorted(amax)
    values = np.asarray([amax[k] for k in keys], np.float32)
    gathered = np.asarray(multihost_utils.process_allgather(values))
    return dict(zip(keys, (float(v) for v in gathered.max(axis=0))))
