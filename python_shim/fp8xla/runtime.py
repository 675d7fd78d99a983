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

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass

import jax
import keras
import numpy as np

from . import graph

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
    float_weights: paths of weights kept in float (what ``autotune`` falls back to).
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
    float_weights: tuple = ()

    #: Activation scales computed per row at run time (DynamicQuantConfig) or static.
    dynamic = False

    def __post_init__(self):
        kind = type(self).__name__
        for name in ("weight_dtype", "activation_dtype"):
            v = getattr(self, name)
            if v is None and name == "activation_dtype":
                continue
            if v not in _DTYPES:
                raise ValueError(
                    f"{kind}: unknown {name} {v!r}; expected one of "
                    f"{sorted(k for k in _DTYPES if k.startswith('fp8'))}"
                    + (" or None" if name == "activation_dtype" else ""))
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
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


def _var_specs(variables):
    # from shape and dtype only: the value of a quantized variable may not exist
    return [jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for v in variables]


def _stateless_generate(model, stop_token_ids):
    """Keras-Hub's compiled generate step with all variables as explicit state."""

    def generate(inputs, state):
        sampler_v, trainable_v, non_trainable_v = state
        mapping = itertools.chain(
            zip(model.sampler.variables, sampler_v),
            zip(model.trainable_variables, trainable_v),
            zip(model.non_trainable_variables, non_trainable_v),
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
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
    codes = {i: jax.device_put(q.codes) for i, q in qweights.items()}

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
        qexp, _ = graph.quantize_exported(exp, {"weights": weights})
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
