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
contract that runs the rewritten graph (compiled once per input shape) with the FP8 weights
(see :mod:`fp8xla.runtime`).

INC's module layout is mirrored where its examples import from it:
``fp8xla.keras.utils.utility.print_model`` is :func:`print_model`.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

try:
    import keras_hub
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        "fp8xla.keras needs Keras and Keras-Hub (install fp8xla with its `keras` extra, or "
        f"pip install keras-hub): {e}") from e

from .. import graph, ops, runtime, weight_rounding
from . import _gram, _sequential, distribution
from .distribution import gemma3_layout_map  # noqa: F401  (public API)
from ..tuning import TuningConfig  # noqa: F401  (public API, INC's name)
from ..runtime import (  # noqa: F401  (public API)
    DynamicQuantConfig, QuantConfig, QuantizedWeight, StaticQuantConfig, logits)
from ..saving import Fp8Gemma3CausalLM, PresetError, load, save  # noqa: F401  (public API)

try:  # registers the preprocessor class of the default model, which its presets name
    from .. import models as _models  # noqa: F401
except ImportError:  # sentencepiece missing: only the default model needs it
    pass

__all__ = [
    "DynamicQuantConfig", "Fp8Gemma3CausalLM", "PresetError", "QuantConfig", "QuantizedWeight",
    "StaticQuantConfig", "TuningConfig", "autotune", "calibrate", "float_generate_function",
    "gemma3_layout_map", "load", "logits", "print_model", "quantize_model", "save",
]


def _check_model(model):
    # The rewrite itself is model-agnostic, but only Gemma3's graph is tested end to end.
    if not isinstance(model, keras_hub.models.Gemma3CausalLM):
        raise TypeError(
            f"fp8xla.keras: expected a keras_hub.models.Gemma3CausalLM, got "
            f"{type(model).__name__}")


def float_generate_function(model):
    """Keras-Hub's float generate step behind the same wrapper fp8xla uses (inputs and outputs
    that are None dropped), for baselines and for models without a preprocessor."""
    _check_model(model)
    cache = runtime.GraphCache(model, lambda exp, arg_of: exp)
    return runtime.generate_function(
        model, cache, lambda: [v.value for v in model.trainable_variables])


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
    cache = runtime.GraphCache(model, rewrite)
    ops.reset_observer()
    model.generate_function = runtime.generate_function(
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
    # Every device of this process recorded into the same table; other processes' devices
    # saw other data (or other shards): the scale is the maximum over all of them.
    return distribution.max_over_processes(amax)


def quantize_model(model, config: QuantConfig, calib_function=None):
    """Quantizes ``model`` in place to FP8 and returns it; its ``generate()`` then runs FP8.

    ``config`` is a :class:`StaticQuantConfig` or a :class:`DynamicQuantConfig`.
    ``calib_function(model)`` must call ``model.generate`` on representative prompts; it is
    required for static activation scales (a StaticQuantConfig with ``activation_dtype``) and
    for ``rounding="gptq"`` (the Gram matrices of the weights' inputs; it then runs twice,
    once on the float model for the Gram matrices and once instrumented for the activation
    scales)."""
    return _quantize(model, config, calib_function, {})


def _quantize(model, config, calib_function, cache):
    """:func:`quantize_model`, reusing what ``cache`` holds from earlier calls on the same
    float model and calibration (Gram matrices, activation ranges, matmul dims, FP8 codes)."""
    _check_model(model)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"fp8xla.keras.quantize_model: config must be a StaticQuantConfig or "
                        f"a DynamicQuantConfig, got {type(config).__name__}")
    static_activations = bool(config.a_format) and not config.dynamic
    if static_activations and calib_function is None:
        raise ValueError("fp8xla.keras.quantize_model: activation quantization needs a "
                         "calib_function (or use activation_dtype=None for weight-only)")
    if config.rounding == "gptq" and calib_function is None:
        raise ValueError("fp8xla.keras.quantize_model: rounding='gptq' needs a calib_function "
                         "(the Gram matrices of the weights' inputs come from it)")
    if config.rounding == "gptq" and jax.process_count() > 1:
        # Each process would collect its own Gram matrices from its own share of the
        # calibration and round the weights differently from the others.
        raise ValueError(f"fp8xla.keras.quantize_model: rounding='gptq' runs in one process; "
                         f"this is process {jax.process_index()} of {jax.process_count()} "
                         "(jax.distributed): quantize in one process, save the preset and "
                         "load it in every process")
    candidates = _quantizable_variables(model, config)
    if not candidates:
        raise ValueError(_no_quantizable_layers(model))
    sequential = config.rounding == "gptq" and config.gptq_sequential
    grams = {}
    if config.rounding == "gptq" and not sequential:
        grams = _cached_grams(model, calib_function, candidates, cache)
    amax = {}
    if static_activations:
        if not set(candidates) <= cache.get("amax_of", set()):
            cache["amax"] = calibrate(model, calib_function, candidates)
            cache["amax_of"] = set(candidates)
        amax = cache["amax"]
    if not set(candidates) <= cache.get("dims_of", set()):
        cache["dims"] = _matmul_dims(model, candidates)
        cache["dims_of"] = set(candidates)
    dims = cache["dims"]
    if static_activations:
        # e.g. matmuls that run only in generate's decode loop when calib_function only
        # prefills: their activations stay float, which the user should know
        unseen = [model.trainable_variables[i].path for i in candidates
                  if i in dims and i not in amax]
        if unseen:
            _progress(f"calib_function never ran the matmuls of {len(unseen)} weight(s), so "
                      f"their activations stay float32 (no static scale): {', '.join(unseen)}"
                      " (calibration that also decodes a token reaches generate's decode "
                      "loop)")
    # codes depend on how weights are rounded, not on activations or fallbacks
    codes_key = (config.w_format, config.granularity, config.weight_scale, config.rounding,
                 config.gptq_damp, config.gptq_embedding_damp, config.gptq_act_order,
                 config.gptq_sequential)
    known = cache.setdefault(codes_key, {})
    qweights = {}
    todo = [i for i in candidates if i in dims]  # others: not used by a matmul of the step

    def host_weight(i):
        return np.asarray(distribution.host_value(model.trainable_variables[i].value),
                          np.float32)

    def channel_dim_of(i, shape):
        if config.granularity != "per_channel" or not dims[i]:
            return None
        # the embedding's free dim at the tied logits is its rows: one scale per row
        return max(dims[i], key=lambda d: (shape[d], d))

    def round_weight(i, site):
        var, w = model.trainable_variables[i], host_weight(i)
        channel_dim = channel_dim_of(i, w.shape)
        return _quantize_weight(w, config, channel_dim, site, _is_embedding(var),
                                f"{todo.index(i) + 1}/{len(todo)} {var.path}")

    def dequantize(i, codes, scale):
        return weight_rounding.dequantize(codes, scale, channel_dim_of(i, codes.shape))

    if sequential and not set(todo) <= set(known):
        known.update(_sequential.quantize(model, calib_function, todo, round_weight,
                                          dequantize, _progress))
    for i in todo:
        var = model.trainable_variables[i]
        if i not in known:
            known[i] = round_weight(i, grams.get(i))
        codes, scale = known[i]
        channel_dim = channel_dim_of(i, var.shape)
        a_scale, a_dynamic = None, False
        float_activations = any(name in var.path for name in config.float_activation_layers)
        if config.a_format and config.dynamic and not float_activations:
            a_dynamic = True
        elif config.a_format and i in amax and not float_activations:
            a_scale = ops.scale_for(amax[i], config.a_format)
        qweights[i] = QuantizedWeight(i, var.path, codes, scale, channel_dim, a_scale, a_dynamic)
    if not qweights:
        raise ValueError(_no_quantizable_layers(model))
    runtime.install(model, config, qweights)
    if not isinstance(model, Fp8Gemma3CausalLM):
        _give_fp8_methods(model)
    return model


def autotune(model, tune_config, eval_fn, eval_args=(), calib_function=None, run_fn=None,
             run_args=()):
    """INC's accuracy-aware tuning: quantizes ``model`` in place with the first config of
    ``tune_config.config_set`` whose score ``eval_fn(model, *eval_args)`` (higher is better,
    e.g. ``1 / perplexity``) is within ``tune_config.tolerable_loss`` (relative) of the float
    model's; if none is, keeps the most sensitive weights of the best config in float (1, 2, 4,
    ... of them) until the score is. Returns the model; ``model.fp8.tuning`` is the
    :class:`fp8xla.tuning.TuningResult` (trials, what was kept in float and its memory), also
    printed. Raises :class:`fp8xla.tuning.TuningError`, with the model float again, when no
    candidate within ``max_trials`` meets the tolerance.

    ``calib_function(model)`` (or INC's ``run_fn(model, *run_args)``) calibrates, as in
    :func:`quantize_model`; it runs once per autotune call for each thing it provides (Gram
    matrices, activation ranges), which the trials share, as they share FP8 codes.

    Sensitivity of a weight: the relative error its FP8 form causes in its output on the
    calibration inputs, ``tr(ΔWᵀ H ΔW) / tr(Wᵀ H W)`` with ``H = XᵀX`` (the Gram matrix GPTQ
    uses); without a calibration function, the weight's own relative error
    ``|ΔW|² / |W|²``. (Scoring each weight by ``eval_fn`` would take one evaluation per
    weight.)"""
    from .. import tuning

    _check_model(model)
    if run_fn is not None:
        if calib_function is not None:
            raise ValueError("fp8xla.keras.autotune: give calib_function or INC's run_fn, not "
                             "both")
        calib_function = lambda m: run_fn(m, *run_args)  # noqa: E731
    if not isinstance(tune_config, tuning.TuningConfig):
        raise TypeError(f"fp8xla.keras.autotune: tune_config must be a "
                        f"fp8xla.tuning.TuningConfig, got {type(tune_config).__name__}")
    for c in tune_config.config_set:
        if not isinstance(c, QuantConfig):
            raise TypeError(f"fp8xla.keras.autotune: config_set holds {c!r}; expected "
                            "StaticQuantConfig or DynamicQuantConfig")
    if getattr(model, "fp8", None) is not None:
        raise ValueError("fp8xla.keras.autotune: the model is already quantized; pass the "
                         "float model")
    cache = {}
    variables = model.trainable_variables
    by_path = {v.path: i for i, v in enumerate(variables)}

    def evaluate(config, fallback):
        _unquantize(model)
        config = dataclasses.replace(config, float_weights=config.float_weights + fallback)
        _quantize(model, config, calib_function, cache)
        return eval_fn(model, *eval_args)

    def sensitivity(config):
        _unquantize(model)
        _quantize(model, config, calib_function, cache)
        grams = (_cached_grams(model, calib_function, list(model.fp8.weights), cache)
                 if calib_function is not None else {})
        scores = {}
        for i, q in model.fp8.weights.items():
            w = np.asarray(variables[i].value, np.float32)
            dw = w - weight_rounding.dequantize(q.codes, q.w_scale, q.channel_dim)
            site = grams.get(i)
            if site is None:
                scores[q.path] = float(np.sum(dw * dw) / max(np.sum(w * w), 1e-30))
                continue
            h = site.gram.astype(np.float32)
            dm = weight_rounding.kernel_matrix(dw, site.contract)
            wm = weight_rounding.kernel_matrix(w, site.contract)
            scores[q.path] = float(np.sum((h @ dm) * dm) / max(np.sum((h @ wm) * wm), 1e-30))
        ranked = sorted(scores, key=scores.get, reverse=True)
        _progress("autotune sensitivity (relative output error on the calibration inputs), "
                  "most sensitive first: " + ", ".join(
                      f"{p} {scores[p]:.3g}" for p in ranked[:8]) + (" ..." if len(ranked) > 8
                                                                     else ""))
        return ranked

    def float_bytes(paths):
        total = 0
        for p in paths:
            v = variables[by_path[p]]
            n = int(np.prod(v.shape))
            q = cache_codes_bytes(by_path[p])
            total += n * np.dtype(v.dtype).itemsize - q
        return total

    def cache_codes_bytes(i):
        for known in (v for k, v in cache.items() if isinstance(k, tuple)):
            if i in known:
                codes, scale = known[i]
                return codes.nbytes + np.asarray(scale).nbytes
        return 0

    candidates = set()
    for c in tune_config.config_set:
        candidates |= set(_quantizable_variables(model, c))
    total = sum(int(np.prod(variables[i].shape)) * np.dtype(variables[i].dtype).itemsize
                for i in candidates)
    _unquantize(model)
    baseline = eval_fn(model, *eval_args)
    _progress(f"autotune: the float model scores {baseline:.6g}")
    try:
        result = tuning.tune(baseline, tune_config, evaluate, sensitivity, float_bytes, total,
                             log=print)
    except Exception:
        _unquantize(model)
        raise
    if result.trials[-1] is not result.best:  # the model holds the last trial: rebuild best
        evaluate(result.best.config, result.best.float_weights)
    model.fp8.tuning = result
    print(result.summary(), flush=True)
    return model


def _unquantize(model):
    """Makes a model quantized in this process run its float weights again (it keeps them)."""
    for name in ("compile", "save_to_preset", "summary"):
        if name in model.__dict__:
            object.__delattr__(model, name)
    if "fp8" in model.__dict__:
        object.__delattr__(model, "fp8")
    model.generate_function = None
    model.predict_function = None


def _note_underdetermined_grams(model, grams):
    """Says which weights' Gram matrices have fewer calibration rows than inputs: GPTQ's
    least-squares problem is then underdetermined and fits the calibration rather than the
    model (on Gemma 3 270M, 8 prompts of 32 tokens scored worse than round-to-nearest)."""
    few = [(model.trainable_variables[i].path, s.rows, s.gram.shape[0])
           for i, s in grams.items() if s.rows < s.gram.shape[0]]
    if few:
        listed = ", ".join(f"{p} ({rows} rows, {k} inputs)" for p, rows, k in few[:3])
        _progress(f"GPTQ: calib_function gave fewer input rows than inputs for {len(few)} "
                  f"weight(s): {listed}{', ...' if len(few) > 3 else ''}. GPTQ then fits the "
                  "calibration rather than the model and can do worse than rounding to "
                  "nearest: calibrate on more tokens (e.g. fp8xla.calibration."
                  "text_calibration(fp8xla.calibration.python_doc_passages()), 19k tokens)")


def _cached_grams(model, calib_function, candidates, cache):
    if not set(candidates) <= cache.get("grams_of", set()):
        _progress("collecting the Gram matrices of the weights' inputs (calib_function)")
        cache["grams"] = _gram.collect_grams(model, calib_function, candidates)
        cache["grams_of"] = set(candidates)
        _note_underdetermined_grams(model, cache["grams"])
    return cache["grams"]


def _progress(message):
    print(f"[fp8xla] {message}", flush=True)


def _quantize_weight(w, config, channel_dim, site, is_embedding, name):
    """FP8 codes and scale(s) of one weight as ``config`` asks (see
    :mod:`fp8xla.weight_rounding`); ``site`` holds the Gram matrix of its inputs for GPTQ."""
    fmt = config.w_format
    if config.weight_scale == "search":
        scale = weight_rounding.search_scales(w, fmt, channel_dim)
    else:
        scale = weight_rounding.amax_scales(w, fmt, channel_dim)
    if config.rounding != "gptq":
        return weight_rounding.round_to_nearest(w, fmt, scale, channel_dim), scale
    if site is None:
        _progress(f"GPTQ {name}: no calibration input reached it, rounded to nearest")
        return weight_rounding.round_to_nearest(w, fmt, scale, channel_dim), scale
    # W as [K, N] (contracted axes first) with one scale per column
    full_scale = np.broadcast_to(
        weight_rounding.broadcast_scale(scale, w.shape, channel_dim), w.shape)
    wm = weight_rounding.kernel_matrix(w, site.contract)
    sm = weight_rounding.kernel_matrix(full_scale, site.contract)
    if not np.all(sm == sm[:1]):
        raise ValueError(f"fp8xla.keras: GPTQ on {name}: its scales vary along the contracted "
                         "axes; use per-channel scales on an output axis")
    damp = config.gptq_embedding_damp if is_embedding else config.gptq_damp
    last = [0.0]
    start = time.perf_counter()

    def progress(done, total):
        now = time.perf_counter()
        if now - last[0] > 5 or done == total:
            last[0] = now
            _progress(f"GPTQ {name} {tuple(w.shape)}: {done}/{total} columns, "
                      f"{now - start:.0f} s")

    codes_m = weight_rounding.gptq(wm, site.gram, fmt, sm[0], damp=damp,
                                   act_order=config.gptq_act_order, progress=progress)
    return weight_rounding.from_kernel_matrix(codes_m, w.shape, site.contract), scale


def _give_fp8_methods(model):
    """Gives a stock ``Gemma3CausalLM`` quantized in this process what
    :class:`~fp8xla.saving.Fp8Gemma3CausalLM` (a loaded FP8 model) has as methods."""
    stock = type(model)
    stock_compile = stock.compile.__get__(model)
    stock_summary = stock.summary.__get__(model)

    def compile(*args, **kwargs):
        # Keras-Hub's compile() resets generate_function: keep the model in FP8 after it.
        stock_compile(*args, **kwargs)
        runtime.install(model, model.fp8.config, model.fp8.weights)

    def save_to_preset(preset_dir, max_shard_size=None):
        save(model, preset_dir)

    def summary(*args, **kwargs):
        return runtime.summary_of_stored_weights(model, stock_summary, *args, **kwargs)

    model.compile = compile
    model.save_to_preset = save_to_preset
    model.summary = summary


def _no_quantizable_layers(model):
    return (f"fp8xla.keras.quantize_model: {type(model).__name__} has no quantizable layers: "
            "no trainable float weight of rank >= 2 (selected by the config's white_list, if "
            "any) feeds a matmul of its generate step "
            "(fp8xla quantizes trainable variables; frozen ones, e.g. after enable_lora(), "
            "stay as they are)")


def _is_embedding(var):
    return "embedding" in var.path


def _owning_layers(model):
    """``{id(variable): the innermost layer that holds it}``."""
    owner = {}
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for v in layer.weights:
            owner[id(v)] = layer  # parents come first, so the innermost layer wins
    return owner


def _quantizable_variables(model, config):
    out = []
    owner = _owning_layers(model) if config.white_list is not None else {}
    for i, v in enumerate(model.trainable_variables):
        if len(v.shape) < 2 or "float" not in str(v.dtype):
            continue
        if _is_embedding(v) and not config.quantize_embeddings:
            continue
        if not config.selects(v.path, owner.get(id(v))):
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

    cache = runtime.GraphCache(model, rewrite)
    inputs = {"token_ids": np.zeros((1, 2), np.int32), "padding_mask": np.ones((1, 2), bool)}
    cache.get(inputs, None)
    return found


def print_model(model, file=None):
    """Lists the model's weight matrices (trainable variables of rank >= 2): path, kind, how
    they are stored, activation scale and weight scale (``-`` where there is none: a float
    weight, or a model not quantized by fp8xla; ``dynamic``: per-row activation scales
    computed at run time), then how many run in FP8 and which are kept in float."""
    state = getattr(model, "fp8", None)
    quantized = state.weights if state is not None else {}
    lines = [f"{'layer':58s} {'kind':8s} {'stored as':14s} {'a_scale':>12s} {'w_scale':>24s}"]
    kept = []
    for i, v in enumerate(model.trainable_variables):
        if len(v.shape) < 2:
            continue
        kind = "embed" if _is_embedding(v) else "matmul"
        q = quantized.get(i)
        if q is None:
            kept.append(v)
            lines.append(f"{v.path:58s} {kind:8s} {str(v.dtype):14s} {'-':>12s} {'-':>24s}")
            continue
        a = "dynamic" if q.a_dynamic else f"{q.a_scale:.6g}" if q.a_scale is not None else "-"
        if q.channel_dim is None:
            w = f"{float(q.w_scale):.6g}"
        else:
            s = np.asarray(q.w_scale)
            w = f"[{s.min():.3g}..{s.max():.3g}] dim {q.channel_dim}"
        lines.append(f"{q.path:58s} {kind:8s} {str(q.codes.dtype):14s} {a:>12s} {w:>24s}")
    if state is not None:
        float_bytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in kept)
        lines.append(f"{len(quantized)} weight matrices in FP8, {len(kept)} kept in float "
                     f"({float_bytes / 2**20:.1f} MiB)"
                     + (": " + ", ".join(v.path for v in kept) if kept else ""))
    print("\n".join(lines), file=file)
