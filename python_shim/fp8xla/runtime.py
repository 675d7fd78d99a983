"""What a model quantized by fp8xla is and how it runs; shared by quantization
(``fp8xla.keras``) and loading (``fp8xla.saving``), which both build on it and never on each
other.

A quantized Keras-Hub causal LM carries ``model.fp8`` (:class:`Fp8State`): the
:class:`QuantConfig`, a :class:`QuantizedWeight` per FP8 variable and the FP8 codes on
the device. :func:`install` makes ``generate()`` and ``predict()`` run the model's step
exported with ``jax.export`` and rewritten by fp8xla's passes (:class:`GraphCache`, compiled
once per input signature), with the FP8 codes in place of the float weights.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import jax
import keras
import numpy as np

from . import graph
from .config import (  # noqa: F401  (re-exported: fp8xla.keras imports them here)
    DynamicQuantConfig, QuantConfig, StaticQuantConfig)


@dataclass
class QuantizedWeight:
    """One FP8 variable: its index in ``model.trainable_variables``, codes and scale."""

    index: int
    path: str
    codes: np.ndarray
    w_scale: float | np.ndarray  # per tensor, or per channel along `channel_dim`
    channel_dim: int | None
    a_scale: float | None
    a_dynamic: bool = False  # activation scales per row at run time (DynamicQuantConfig)


@dataclass
class Fp8State:
    """What fp8xla attaches to a quantized model as ``model.fp8``."""

    config: QuantConfig
    weights: dict  # trainable variable index -> QuantizedWeight
    forward: "GraphCache"
    codes: dict  # trainable variable index -> device array of FP8 codes


# ---------------------------------------------------------------------------------------------
# the model's steps as graphs


def _spec(x):
    s = getattr(x, "sharding", None)
    if not (isinstance(s, jax.sharding.NamedSharding) and s.mesh.size > 1):
        s = None
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)


def _var_specs(variables):
    # from shape, dtype and layout only: the value of a quantized variable may not exist.
    # A sharded variable (keras.distribution.ModelParallel) declares its sharding, which the
    # rewrite's shard_calls pass reads (docs/sharding.md).
    from .keras.distribution import variable_sharding

    return [jax.ShapeDtypeStruct(tuple(v.shape), v.dtype, sharding=variable_sharding(v))
            for v in variables]


@contextlib.contextmanager
def _kv_cache_constrained(model, shardings):
    """While tracing the generate step: the KV cache Keras-Hub's ``_build_cache`` returns (seeded
    by the prompt, before the decode loop carries it) gets ``with_sharding_constraint`` to its
    layer's key/value layout (:func:`fp8xla.keras.distribution.kv_cache_shardings`).

    Why: Keras-Hub creates the cache inside the step, so the exported module has no sharding
    for it and the rewrite's ``shard_calls`` pass would leave the decode loop's calls on it
    (``fp8xla_update_slice``, ``fp8xla_dot_f32``) to XLA, which gathers the cache on every
    device. The constraint sits on the loop's initial value, not inside the loop, so the
    loop-carried cache is still updated in place; the pass follows it into the loop. Only
    this one model instance's method is wrapped, only for the trace; single-device models
    and other architectures (``shardings`` None) are untouched."""
    build = getattr(model, "_build_cache", None)
    if shardings is None or build is None:
        yield
        return

    def build_cache(*args, **kwargs):
        hidden_states, cache = build(*args, **kwargs)
        if len(cache) != len(shardings) or any(len(kv) != 2 for kv in cache):
            raise ValueError(
                f"fp8xla: expected Keras-Hub's KV cache as one (key, value) pair per layer "
                f"({len(shardings)} layers), got {len(cache)} entries")
        cache = tuple(tuple(jax.lax.with_sharding_constraint(c, s) for c, s in zip(kv, ss))
                      for kv, ss in zip(cache, shardings))
        return hidden_states, cache

    # An instance attribute shadows the method; set past Keras' attribute tracking.
    object.__setattr__(model, "_build_cache", build_cache)
    try:
        yield
    finally:
        object.__delattr__(model, "_build_cache")


def _stateless_generate(model, stop_token_ids):
    """Keras-Hub's compiled generate step with all variables as explicit state; a sharded
    model's KV cache takes its key/value layout (:func:`_kv_cache_constrained`)."""
    from .keras.distribution import kv_cache_shardings

    # read from the variables' layouts here, outside the trace (where values are tracers)
    cache_shardings = kv_cache_shardings(model)

    def generate(inputs, state):
        sampler_v, trainable_v, non_trainable_v = state
        mapping = itertools.chain(
            zip(model.sampler.variables, sampler_v),
            zip(model.trainable_variables, trainable_v),
            zip(model.non_trainable_variables, non_trainable_v),
        )
        with keras.StatelessScope(state_mapping=mapping) as scope, \
                _kv_cache_constrained(model, cache_shardings):
            outputs = model.generate_step(inputs, stop_token_ids)
        # Keras-Hub 0.32 returns "images": None without a preprocessor; generate() fails on it.
        outputs = {k: v for k, v in outputs.items() if v is not None}
        new_sampler = []
        for v in model.sampler.variables:
            new_v = scope.get_current_value(v)
            new_sampler.append(new_v if new_v is not None else v.value)
        return outputs, new_sampler

    return generate


def _stateless_forward(model):
    """The model's forward pass (logits) with the variables as explicit state."""

    def forward(inputs, trainable, non_trainable):
        logits, _ = model.stateless_call(trainable, non_trainable, inputs)
        return logits

    return forward


def _trainable_arg_indices(exp, prefix):
    """Flat argument index of each trainable variable of an exported step; `prefix` is the
    pytree path of the trainable list among the positional arguments."""
    tree = jax.tree_util.tree_unflatten(exp.in_tree, list(range(len(exp.in_avals))))
    out = {}
    for path, flat in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [getattr(p, "idx", getattr(p, "key", None)) for p in path]
        # exported functions take ((*args), {}): keys[0] == 0 selects the positional args
        if keys[0] == 0 and tuple(keys[1:-1]) == prefix:
            out[keys[-1]] = flat
    return out


class GraphCache:
    """Exports, rewrites and compiles a step once per input signature.

    kind "generate": Keras-Hub's generate step ``(inputs, state) -> (outputs, sampler vars)``;
    kind "forward": the logits ``(inputs, trainable, non_trainable) -> logits``."""

    def __init__(self, model, rewrite, kind="generate"):
        self.model = model
        self.rewrite = rewrite  # (exported, arg index of each trainable) -> Exported
        self.kind = kind
        self.compiled = {}

    def get(self, inputs, stop_token_ids=None):
        key = (tuple(sorted((k, np.shape(v), str(v.dtype)) for k, v in inputs.items())),
               stop_token_ids)
        if key not in self.compiled:
            m = self.model
            in_specs = jax.tree_util.tree_map(_spec, inputs)
            if self.kind == "generate":
                fn = _stateless_generate(m, stop_token_ids)
                specs = (in_specs, (_var_specs(m.sampler.variables),
                                    _var_specs(m.trainable_variables),
                                    _var_specs(m.non_trainable_variables)))
                prefix = (1, 1)
            else:
                fn = _stateless_forward(m)
                specs = (in_specs, _var_specs(m.trainable_variables),
                         _var_specs(m.non_trainable_variables))
                prefix = (1,)
            exp = jax.export.export(jax.jit(fn), platforms=["cpu"])(*specs)
            self.compiled[key] = jax.jit(self.rewrite(exp, _trainable_arg_indices(exp, prefix)).call)
        return self.compiled[key]


def generate_function(model, cache, trainable_values):
    """A replacement for ``model.generate_function`` with Keras-Hub's contract."""
    from keras import tree

    def generate_function(inputs, stop_token_ids=None):
        if isinstance(stop_token_ids, list):
            stop_token_ids = tuple(stop_token_ids)
        # Keras-Hub 0.32 passes "images": None for text-only Gemma3; None leaves are dropped.
        inputs = {k: v for k, v in inputs.items() if v is not None}
        inputs = tree.map_structure(keras.ops.convert_to_tensor, inputs)
        run = cache.get(inputs, stop_token_ids)
        state = (
            [v.value for v in model.sampler.variables],
            trainable_values(),
            [v.value for v in model.non_trainable_variables],
        )
        outputs, sampler_vars = run(inputs, state)
        for v, new_v in zip(model.sampler.variables, sampler_vars):
            v.assign(new_v)
        return outputs

    return generate_function


# ---------------------------------------------------------------------------------------------
# a quantized model


def install(model, config, qweights):
    """Makes ``model.generate()``, ``model.predict()`` and :func:`logits` run the FP8 graph
    (sets ``model.fp8``, ``model.generate_function`` and ``model.predict_function``)."""
    from .keras.distribution import variable_sharding

    # The codes take their weight's layout (sharded under ModelParallel).
    codes = {i: jax.device_put(q.codes, variable_sharding(model.trainable_variables[i]))
             for i, q in qweights.items()}

    def rewrite(exp, arg_of):
        weights = []
        for i, q in qweights.items():
            spec = {"arg": arg_of[i], "format": config.w_format}
            if q.channel_dim is None:
                spec["w_scale"] = float(q.w_scale)
            else:
                spec["w_scale"] = [float(s) for s in np.ravel(q.w_scale)]
                spec["channel_dim"] = q.channel_dim
            if q.a_scale is not None:
                spec["a_scale"] = q.a_scale
            if q.a_dynamic:
                spec["a_dynamic"] = True
            weights.append(spec)
        options = {"weights": weights}
        if config.kv_format:
            options["kv_cache"] = config.kv_format
        qexp, _ = graph.quantize_exported(exp, options)
        return qexp

    def with_codes(trainable):
        return [codes[i] if i in codes else v for i, v in enumerate(trainable)]

    forward = GraphCache(model, rewrite, kind="forward")
    model.fp8 = Fp8State(config=config, weights=qweights, forward=forward, codes=codes)
    model.generate_function = generate_function(
        model, GraphCache(model, rewrite),
        lambda: [codes[i] if i in codes else v.value
                 for i, v in enumerate(model.trainable_variables)])
    model.predict_function = _predict_function(forward, with_codes)


def _predict_function(forward, with_codes):
    """Keras' JAX ``predict_function(state, iterator)`` contract, running the FP8 forward.
    Keras purges the variables' values during predict, so the state it passes is used."""
    from keras.src.trainers.data_adapters import data_adapter_utils

    def predict_function(state, iterator):
        trainable, non_trainable = state
        outputs = None
        for data in iterator:
            x, _, _ = data_adapter_utils.unpack_x_y_sample_weight(data)
            x = {k: v for k, v in x.items() if v is not None}
            out = forward.get(x)(x, with_codes(trainable), non_trainable)
            outputs = out if outputs is None else jax.numpy.concatenate([outputs, out])
            break  # one batch per call (steps_per_execution = 1)
        return outputs, state

    return predict_function


def logits(model, inputs):
    """Next-token logits ``[batch, length, vocab]`` of ``inputs`` ({"token_ids",
    "padding_mask"}); through the FP8 graph if the model is quantized by fp8xla."""
    inputs = {k: np.asarray(v) for k, v in inputs.items() if v is not None}
    state = getattr(model, "fp8", None)
    codes = state.codes if state is not None else {}
    trainable = [codes[i] if i in codes else v.value
                 for i, v in enumerate(model.trainable_variables)]
    non_trainable = [v.value for v in model.non_trainable_variables]
    if state is None:
        cache = getattr(model, "_fp8xla_float_forward", None)
        if cache is None:
            cache = model._fp8xla_float_forward = GraphCache(
                model, lambda exp, arg_of: exp, kind="forward")
        return cache.get(inputs)(inputs, trainable, non_trainable)
    return state.forward.get(inputs)(inputs, trainable, non_trainable)


# ---------------------------------------------------------------------------------------------
# what a quantized model holds, as Keras' summary() counts it


@dataclass(frozen=True)
class StoredArray:
    """An array a quantized model holds, described as Keras' ``summary()`` reads a weight
    (``shape`` and ``dtype``; it sums ``prod(shape) * size(dtype)``)."""

    path: str
    shape: tuple
    dtype: str


def stored_trainable_weights(model):
    """``model.trainable_weights`` as the quantized model holds them: each FP8 weight as its
    one-byte codes and its scales, every other weight as it is."""
    state = model.fp8
    index = {id(v): i for i, v in enumerate(model.trainable_variables)}
    out = []
    for v in model.trainable_weights:
        q = state.weights.get(index.get(id(v)))
        if q is None:
            out.append(v)
            continue
        # Keras' summary has no size for float8 dtypes; the codes are one byte each (uint8 in
        # the weights file).
        out.append(StoredArray(q.path, tuple(np.shape(q.codes)), "uint8"))
        out.append(StoredArray(q.path + "/w_scale", tuple(np.shape(q.w_scale)), "float32"))
        if q.a_scale is not None:
            out.append(StoredArray(q.path + "/a_scale", (), "float32"))
    return out


def summary_of_stored_weights(model, summary, *args, **kwargs):
    """Runs Keras' ``summary`` of the quantized ``model`` so that its parameter counts and
    sizes are those of the arrays the model holds (:func:`stored_trainable_weights`).

    Keras' ``print_summary`` sizes the trainable weights from
    ``model._collected_trainable_weights`` when the model has that attribute, else from
    ``model.trainable_weights`` (which the FP8 graph needs as the float variables). The
    attribute is set for this call only, past Keras' attribute tracking."""
    object.__setattr__(model, "_collected_trainable_weights", stored_trainable_weights(model))
    try:
        return summary(*args, **kwargs)
    finally:
        object.__delattr__(model, "_collected_trainable_weights")
