"""FP8 quantization of Keras(-Hub) causal LMs with Intel Neural Compressor's API.

    from fp8xla.keras import StaticQuantConfig, quantize_model
    config = StaticQuantConfig(weight_dtype="fp8_e4m3", activation_dtype="fp8_e4m3")
    model = quantize_model(model, config, calib_function)   # calib_function(model) generates
    model.generate("The capital of France is", max_length=30)  # runs in FP8

How: the model's generate step (Keras-Hub's ``compiled_generate_function`` contract) is
exported with ``jax.export`` — the variables are arguments — and rewritten by fp8xla's passes:
``instrument`` for calibration (``calib_function`` runs on that graph), then ``quantize``: every
matmul on a weight becomes ``fp8xla_matmul`` on one-byte weights, activations QDQ'd with the
calibrated static scales. ``model.generate_function`` is replaced by a function with Keras-Hub's
contract that runs the rewritten graph (compiled once per input shape) with the FP8 weights.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import jax
import numpy as np

from . import graph, ops, saving
from .saving import load, save  # noqa: F401  (fp8xla.keras.load / save)

try:  # registers the preprocessor class of the default model, which its presets name
    from . import models as _models  # noqa: F401
except ImportError:  # keras_hub/sentencepiece missing: only the default model needs them
    pass

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


@dataclass
class QuantizedWeight:
    """One FP8 variable: its index in ``model.trainable_variables``, codes and scale."""

    index: int
    path: str
    codes: np.ndarray
    w_scale: float | np.ndarray  # per tensor, or per channel along `channel_dim`
    channel_dim: int | None
    a_scale: float | None


def _check_model(model):
    import keras_hub

    # The rewrite itself is model-agnostic, but only Gemma3's graph is tested end to end.
    if not isinstance(model, keras_hub.models.Gemma3CausalLM):
        raise TypeError(
            f"fp8xla.keras: expected a keras_hub.models.Gemma3CausalLM, got "
            f"{type(model).__name__}")


def _spec(x):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


def _var_specs(variables):
    # from shape and dtype only: the value of a quantized variable may not exist
    return [jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for v in variables]


def _stateless_generate(model, stop_token_ids):
    """Keras-Hub's compiled generate step with all variables as explicit state."""
    import keras

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


class _GraphCache:
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


def _generate_function(model, cache, trainable_values):
    """A replacement for ``model.generate_function`` with Keras-Hub's contract."""
    import keras
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


def float_generate_function(model):
    """Keras-Hub's float generate step behind the same wrapper fp8xla uses (inputs and outputs
    that are None dropped), for baselines and for models without a preprocessor."""
    _check_model(model)
    cache = _GraphCache(model, lambda exp, arg_of: exp)
    return _generate_function(model, cache, lambda: [v.value for v in model.trainable_variables])


def calibrate(model, calib_function, weight_indices=None):
    """Runs ``calib_function(model)`` with the model's generate step instrumented.

    Returns ``{trainable variable index: max |activation| over every matmul it feeds}``."""
    _check_model(model)
    sites_by_sig = []

    def rewrite(exp, arg_of):
        var_of = {a: i for i, a in arg_of.items()}
        weights = [arg_of[i] for i in (weight_indices or arg_of)]
        inst, sites = graph.instrument_exported(exp, weights=sorted(weights))
        sites_by_sig.append({s["site"]: var_of[s["arg"]] for s in sites["sites"]})
        return inst

    saved = model.generate_function
    cache = _GraphCache(model, rewrite)
    ops.reset_observer()
    model.generate_function = _generate_function(
        model, cache, lambda: [v.value for v in model.trainable_variables])
    try:
        calib_function(model)
    finally:
        model.generate_function = saved
    stats = ops.observer_stats()
    if not stats:
        raise RuntimeError(
            "fp8xla.keras.quantize_model: calib_function never ran the model's generate step, "
            "so no activation was observed; it must call model.generate(...) at least once")
    amax = {}
    for table in sites_by_sig:
        for site, var in table.items():
            if site in stats:
                s = stats[site]
                if s.nonfinite:
                    raise ValueError(
                        f"fp8xla.keras: calibration saw {s.nonfinite} NaN/inf activations at "
                        f"the input of {model.trainable_variables[var].path}")
                amax[var] = max(amax.get(var, 0.0), s.amax)
    return amax


def quantize_model(model, config: StaticQuantConfig, calib_function=None):
    """Quantizes ``model`` in place to FP8 and returns it; its ``generate()`` then runs FP8.

    ``calib_function(model)`` must call ``model.generate`` on representative prompts; it is
    required when ``config.activation_dtype`` is set (static activation scales)."""
    _check_model(model)
    if not isinstance(config, StaticQuantConfig):
        raise TypeError(f"fp8xla.keras.quantize_model: config must be a StaticQuantConfig, "
                        f"got {type(config).__name__}")
    if config.a_format and calib_function is None:
        raise ValueError("fp8xla.keras.quantize_model: activation quantization needs a "
                         "calib_function (or use activation_dtype=None for weight-only)")
    candidates = _quantizable_variables(model, config)
    if not candidates:
        raise ValueError(_no_quantizable_layers(model))
    amax = calibrate(model, calib_function, candidates) if config.a_format else {}
    dims = _matmul_dims(model, candidates)
    qweights = {}
    for i in candidates:
        var = model.trainable_variables[i]
        if i not in dims:
            continue  # not used by a matmul in the generate step
        w = np.asarray(var.value, np.float32)
        channel_dim = None
        if config.granularity == "per_channel" and not _is_embedding(var):
            free = dims[i]
            channel_dim = max(free, key=lambda d: (w.shape[d], d)) if free else None
        codes, scale = ops.quantize_weight(w, config.w_format, channel_dim)
        a_scale = None
        if config.a_format and i in amax and not any(
                name in var.path for name in config.float_activation_layers):
            a_scale = ops.scale_for(amax[i], config.a_format)
        qweights[i] = QuantizedWeight(i, var.path, codes, scale, channel_dim, a_scale)
    if not qweights:
        raise ValueError(_no_quantizable_layers(model))
    _install(model, config, qweights)
    return model


def _no_quantizable_layers(model):
    return (f"fp8xla.keras.quantize_model: {type(model).__name__} has no quantizable layers: "
            "no trainable float weight of rank >= 2 feeds a matmul of its generate step "
            "(fp8xla quantizes trainable variables; frozen ones, e.g. after enable_lora(), "
            "stay as they are)")


def _is_embedding(var):
    return "embedding" in var.path


def _quantizable_variables(model, config):
    out = []
    for i, v in enumerate(model.trainable_variables):
        if len(v.shape) < 2 or "float" not in str(v.dtype):
            continue
        if _is_embedding(v) and not config.quantize_embeddings:
            continue
        out.append(i)
    return out


def _matmul_dims(model, candidates):
    """Free (output-channel) dims of each candidate weight at its matmuls, from the quantize
    pass's report on the generate step of a one-token prompt."""
    found = {}

    def rewrite(exp, arg_of):
        var_of = {a: i for i, a in arg_of.items()}
        options = {"weights": [{"arg": arg_of[i], "format": "e4m3fn", "w_scale": 1.0}
                               for i in candidates]}
        _, report = graph.run_pass("quantize", graph.module_text(exp), options)
        for mm in report["matmuls"]:
            i = var_of[mm["arg"]]
            rank = len(model.trainable_variables[i].shape)
            used = set(mm["rhs_contracting_dims"]) | set(mm["rhs_batching_dims"])
            free = [d for d in range(rank) if d not in used]
            found[i] = sorted(set(found.get(i, free)) & set(free))
        return exp

    cache = _GraphCache(model, rewrite)
    inputs = {"token_ids": np.zeros((1, 2), np.int32), "padding_mask": np.ones((1, 2), bool)}
    cache.get(inputs, None)
    return found


def _install(model, config, qweights):
    """Makes ``model.generate()``, ``model.predict()`` and ``logits()`` run the FP8 graph."""
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
            weights.append(spec)
        qexp, _ = graph.quantize_exported(exp, {"weights": weights})
        return qexp

    def with_codes(trainable):
        return [codes[i] if i in codes else v for i, v in enumerate(trainable)]

    forward = _GraphCache(model, rewrite, kind="forward")
    model.fp8 = _Fp8State(config=config, weights=qweights, forward=forward, codes=codes)
    model.generate_function = _generate_function(
        model, _GraphCache(model, rewrite),
        lambda: [codes[i] if i in codes else v.value
                 for i, v in enumerate(model.trainable_variables)])
    model.predict_function = _predict_function(forward, with_codes)
    saving.install_save_hook(model)
    if not isinstance(model, saving._class()):
        # Keras-Hub's compile() resets generate_function: keep the model in FP8 after it.
        def compile(*args, **kwargs):
            type(model).compile(model, *args, **kwargs)
            _install(model, config, qweights)

        model.compile = compile


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
            cache = model._fp8xla_float_forward = _GraphCache(
                model, lambda exp, arg_of: exp, kind="forward")
        return cache.get(inputs)(inputs, trainable, non_trainable)
    return state.forward.get(inputs)(inputs, trainable, non_trainable)


@dataclass
class _Fp8State:
    """What fp8xla attaches to a quantized model as ``model.fp8``."""

    config: StaticQuantConfig
    weights: dict  # trainable variable index -> QuantizedWeight
    forward: _GraphCache
    codes: dict  # trainable variable index -> device array of FP8 codes


def print_model(model, file=None):
    """Lists each quantized weight: path, kind, activation scale and weight scale."""
    state = getattr(model, "fp8", None)
    if state is None:
        raise ValueError("fp8xla.keras.print_model: the model is not quantized by fp8xla")
    lines = [f"{'layer':58s} {'kind':8s} {'a_scale':>12s} {'w_scale':>24s}"]
    for q in state.weights.values():
        kind = "embed" if "embedding" in q.path else "matmul"
        a = f"{q.a_scale:.6g}" if q.a_scale is not None else "-"
        if q.channel_dim is None:
            w = f"{float(q.w_scale):.6g}"
        else:
            s = np.asarray(q.w_scale)
            w = f"[{s.min():.3g}..{s.max():.3g}] dim {q.channel_dim}"
        lines.append(f"{q.path:58s} {kind:8s} {a:>12s} {w:>24s}")
    print("\n".join(lines), file=file)


saving.register()  # FP8 presets load with Keras-Hub's from_preset once fp8xla.keras is imported
