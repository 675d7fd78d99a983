"""``fp8xla.jax.quantize``: FP8 quantization of any jitted function with pytree parameters.

How: ``fn(params, *args)`` is exported with ``jax.export`` (every parameter leaf an argument of
the module); a probe run of the ``quantize`` pass reports which of those arguments feed a
``dot_general`` (a matmul) or a gather (an embedding lookup): those are the weights, whatever
their names. Weights are quantized on the host (INC's scale, ``amax / max_of_format``), the
activations of their matmuls calibrated through the ``instrument`` pass, and the ``quantize``
pass rewrites the module so that those leaves are FP8 arguments. The result
(:class:`QuantizedFunction`) holds the FP8 parameter pytree and runs the rewritten module,
exported and compiled once per argument signature.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
import sys

import jax
import numpy as np

from .. import graph, ops
from ..config import StaticQuantConfig
from . import artifact

# Leaf dtypes a weight may have (what the quantize pass takes as a float weight).
_WEIGHT_DTYPES = frozenset(np.dtype(d) for d in (np.float32, np.float16, jax.numpy.bfloat16))


@dataclasses.dataclass(frozen=True)
class QuantizedLeaf:
    """One parameter leaf stored in FP8.

    path: the leaf's pytree path (``"layers/0/kernel"``); kind: ``"matmul"``, ``"embed"``
    (feeds a gather only) or ``"embed+matmul"`` (a tied embedding); w_scale: per tensor (a
    float) or one per index of ``channel_dim``; a_scale: the static activation scale of its
    matmuls, None for float activations. The scales are compile-time constants of the module:
    new codes need the same scales."""

    path: str
    index: int  # position among the parameter leaves (their flat order)
    kind: str
    shape: tuple
    dtype: str  # the float dtype the leaf had
    format: str  # "e4m3fn" | "e5m2"
    w_scale: float | np.ndarray
    channel_dim: int | None
    a_scale: float | None

    def option(self) -> dict:
        """This weight in the ``quantize`` pass's options."""
        spec = {"arg": self.index, "format": self.format}
        if self.channel_dim is None:
            spec["w_scale"] = float(self.w_scale)
        else:
            spec["w_scale"] = [float(s) for s in np.ravel(self.w_scale)]
            spec["channel_dim"] = self.channel_dim
        if self.a_scale is not None:
            spec["a_scale"] = self.a_scale
        return spec


# ---------------------------------------------------------------------------------------------
# pytree paths


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_string(path) -> str:
    """A pytree key path as ``"a/0/b"`` (dict keys, attribute names and indices, by ``/``)."""
    return "/".join(_key_name(k) for k in path)


def leaf_paths(tree) -> tuple[list[str], list, jax.tree_util.PyTreeDef]:
    """``(paths, leaves, treedef)`` of a pytree; paths are unique."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [path_string(p) for p, _ in with_path]
    if len(set(paths)) != len(paths):
        paths = [jax.tree_util.keystr(p) for p, _ in with_path]
    return paths, [x for _, x in with_path], treedef


def _plain_treedef(treedef) -> bool:
    """True if a treedef holds only dicts, lists, tuples and None (``jax.export`` serializes
    those; a custom node such as a Flax ``State`` it cannot)."""
    leaf = jax.tree_util.tree_structure(0)
    if treedef == leaf:
        return True
    node = treedef.node_data()
    if node is None or node[0] not in (dict, list, tuple, type(None)):
        return False
    return all(_plain_treedef(c) for c in treedef.children())


def _matches(pattern, path: str) -> bool:
    """A string is a glob on the whole path (``"layers/*/attn/*"``); a compiled ``re.Pattern``
    is searched in it (``re.compile(r"attn/(q|k)")``)."""
    if isinstance(pattern, re.Pattern):
        return pattern.search(path) is not None
    return fnmatch.fnmatchcase(path, pattern)


# ---------------------------------------------------------------------------------------------
# signatures and exports


def _spec(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if not hasattr(x, "dtype"):
        x = jax.numpy.asarray(x)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


def signature(args) -> tuple:
    """What a compiled module depends on: the arguments' structure, shapes and dtypes."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    specs = [_spec(x) for x in leaves]
    return (str(treedef),) + tuple((tuple(s.shape), str(np.dtype(s.dtype))) for s in specs)


def describe_signature(sig) -> str:
    return ", ".join(f"{dt}{list(shape)}" for shape, dt in sig[1:]) or "no arguments"


class _Module:
    """``fn`` in the form that is exported: parameters as the export sees them, then ``args``."""

    def __init__(self, fn, treedef, paths, plain):
        self.fn, self.treedef, self.paths, self.plain = fn, treedef, paths, plain

    def export_params(self, leaves):
        """The parameters as the exported module takes them: the pytree itself when jax.export
        can serialize its structure, else a dict by leaf path."""
        if self.plain:
            return self.treedef.unflatten(leaves)
        return dict(zip(self.paths, leaves))

    def flat_index(self):
        """Module argument index of each parameter leaf (in leaf order)."""
        if self.plain:
            return list(range(len(self.paths)))
        order = sorted(range(len(self.paths)), key=lambda i: self.paths[i])  # dicts flatten sorted
        index = [0] * len(order)
        for pos, i in enumerate(order):
            index[i] = pos
        return index

    def export(self, param_specs, args):
        treedef, paths, plain, fn = self.treedef, self.paths, self.plain, self.fn

        def exported_fn(params, *a):
            if not plain:
                params = treedef.unflatten([params[p] for p in paths])
            return fn(params, *a)

        specs = jax.tree_util.tree_map(_spec, args)
        # keep_unused: every parameter leaf stays an argument of the module, so argument
        # indices are leaf indices even for leaves this signature does not use.
        exp = jax.export.export(jax.jit(exported_fn, keep_unused=True), platforms=["cpu"])(
            self.export_params(param_specs), *specs)
        if tuple(exp.module_kept_var_idx) != tuple(range(len(exp.in_avals))):
            raise ValueError("fp8xla.jax.quantize: the exported module dropped arguments")
        return exp


# ---------------------------------------------------------------------------------------------
# the quantized function


class QuantizedFunction:
    """``fn`` with FP8 weights: call it as ``q(q.params, *args)``.

    ``params``: the parameter pytree with FP8 codes (one byte per element) in place of the
    quantized leaves; ``leaves``: a :class:`QuantizedLeaf` per quantized leaf, by path.
    Each new argument signature (structure, shapes, dtypes) exports and rewrites ``fn`` once
    (a loaded artifact runs the signatures it was saved with)."""

    def __init__(self, module, config, leaves, params, param_specs, float_dtypes):
        self._module = module
        self.config = config
        self.leaves = leaves  # path -> QuantizedLeaf
        self.params = params
        self._param_specs = param_specs  # float specs of every leaf (for new exports)
        self._float_dtypes = float_dtypes
        self._exports = {}  # signature -> rewritten Exported
        self._compiled = {}

    # -- running
    def options(self) -> dict:
        index = self._module.flat_index()
        weights = []
        for q in self.leaves.values():
            spec = q.option()
            spec["arg"] = index[q.index]
            weights.append(spec)
        return {"weights": weights}

    def exported(self, *args) -> jax.export.Exported:
        """The rewritten module for this argument signature (exported now if it is new)."""
        sig = signature(args)
        if sig not in self._exports:
            if self._module.fn is None:
                known = "; ".join(describe_signature(s) for s in self._exports)
                raise ValueError(
                    f"fp8xla.jax: this loaded artifact has no module for arguments "
                    f"({describe_signature(sig)}); it was saved with: {known}")
            exp = self._module.export(self._param_specs, args)
            qexp, _ = graph.quantize_exported(exp, self.options())
            self._exports[sig] = qexp
        return self._exports[sig]

    def __call__(self, params, *args):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        if treedef != self._module.treedef:
            raise TypeError(
                f"fp8xla.jax: the parameters' structure differs from the quantized ones "
                f"(expected {self._module.treedef}, got {treedef}); pass q.params")
        for leaf in self.leaves.values():
            dt = getattr(leaves[leaf.index], "dtype", None)
            if dt is None or np.dtype(dt) != ops.fp8_dtype(leaf.format):
                raise TypeError(
                    f"fp8xla.jax: parameter {leaf.path!r} must be the FP8 codes "
                    f"({ops.fp8_dtype(leaf.format)}), got {dt}; pass q.params")
        sig = signature(args)
        run = self._compiled.get(sig)
        if run is None:
            run = self._compiled[sig] = jax.jit(self.exported(*args).call)
        return run(self._module.export_params(leaves), *args)

    # -- describing
    def nbytes(self) -> int:
        """Bytes the parameters take (FP8 codes one byte each, scales not counted: they are
        constants of the module)."""
        return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(self.params))

    def print_model(self, file=None):
        """Lists every float parameter leaf of rank >= 2: path, kind, how it is stored,
        activation scale and weight scale (``-`` where there is none)."""
        print_model(self, file=file)

    def save(self, directory):
        """Writes the artifact :func:`fp8xla.jax.load` reads (see :mod:`fp8xla.jax.artifact`)."""
        artifact.save(self, directory)


def print_model(q: QuantizedFunction, file=None):
    """The ``print_model`` of :class:`QuantizedFunction` (INC's name)."""
    file = sys.stdout if file is None else file
    lines = [f"{'leaf':50s} {'kind':12s} {'stored as':14s} {'a_scale':>12s} {'w_scale':>26s}"]
    for i, path in enumerate(q._module.paths):
        dt = q._float_dtypes[i]
        spec = q._param_specs[i]
        if len(spec.shape) < 2 or dt is None:
            continue
        leaf = q.leaves.get(path)
        if leaf is None:
            lines.append(f"{path:50s} {'-':12s} {dt:14s} {'-':>12s} {'-':>26s}")
            continue
        a = f"{leaf.a_scale:.6g}" if leaf.a_scale is not None else "-"
        if leaf.channel_dim is None:
            w = f"{float(leaf.w_scale):.6g}"
        else:
            s = np.asarray(leaf.w_scale)
            w = f"[{s.min():.3g}..{s.max():.3g}] dim {leaf.channel_dim}"
        stored = str(ops.fp8_dtype(leaf.format))
        lines.append(f"{path:50s} {leaf.kind:12s} {stored:14s} {a:>12s} {w:>26s}")
    lines.append(f"{len(q.leaves)} leaves in FP8; parameters take {q.nbytes():,} bytes")
    print("\n".join(lines), file=file)


# ---------------------------------------------------------------------------------------------
# quantize


def _probe(exp, candidates, index):
    """Which candidate leaves feed a matmul (with the free dims of their weight operand at
    every matmul) or a gather: the ``quantize`` pass's report on the module, every candidate
    quantized per tensor with scale 1 (the rewritten text is dropped)."""
    arg_to_leaf = {index[i]: i for i in candidates}
    options = {"weights": [{"arg": index[i], "format": "e4m3fn", "w_scale": 1.0}
                           for i in candidates]}
    _, report = graph.run_pass("quantize", graph.module_text(exp), options)
    free = {}
    for mm in report["matmuls"]:
        i = arg_to_leaf[mm["arg"]]
        rank = len(exp.in_avals[mm["arg"]].shape)
        used = set(mm["rhs_contracting_dims"]) | set(mm["rhs_batching_dims"])
        dims = {d for d in range(rank) if d not in used}
        free[i] = free[i] & dims if i in free else dims
    gathers = {arg_to_leaf[h["arg"]] for h in report["handled"] if h.get("kind") == "gather"}
    return free, gathers


class _Calibration:
    """Runs ``fn`` with its matmul activations observed and keeps max |activation| per leaf.

    Calling it has ``fn``'s signature (``run(params, *args)``, float parameters); each call
    runs the instrumented module of its signature and reads the observer right away (site
    numbers are per module)."""

    def __init__(self, module, param_specs, act_leaves, paths):
        self.module, self.param_specs, self.paths = module, param_specs, paths
        self.index = module.flat_index()
        self.act_leaves = sorted(act_leaves)
        self.by_sig = {}
        self.amax = {}
        self.calls = 0

    def __call__(self, params, *args):
        for x in jax.tree_util.tree_leaves((params, args)):
            if isinstance(x, jax.core.Tracer):
                raise TypeError(
                    "fp8xla.jax.quantize: calib_function called the function under a JAX "
                    "transformation (jit, vmap, scan...); call it on concrete arrays so that "
                    "each call runs (and is observed) at once")
        sig = signature(args)
        if sig not in self.by_sig:
            exp = self.module.export(self.param_specs, args)
            inst, sites = graph.instrument_exported(
                exp, weights=sorted(self.index[i] for i in self.act_leaves))
            leaf_of = {self.index[i]: i for i in self.act_leaves}
            table = {s["site"]: leaf_of[s["arg"]] for s in sites["sites"]}
            self.by_sig[sig] = (jax.jit(inst.call), table)
        run, table = self.by_sig[sig]
        leaves, treedef = jax.tree_util.tree_flatten(params)
        if treedef != self.module.treedef:
            raise TypeError(
                f"fp8xla.jax.quantize: calib_function passed parameters of another structure "
                f"(expected {self.module.treedef}, got {treedef})")
        ops.reset_observer()
        out = jax.block_until_ready(run(self.module.export_params(leaves), *args))
        stats = ops.observer_stats()
        ops.reset_observer()
        self.calls += 1
        for site, s in stats.items():
            leaf = table.get(site)
            if leaf is None:
                continue
            if s.nonfinite:
                raise ValueError(
                    f"fp8xla.jax.quantize: calibration saw {s.nonfinite} NaN/inf activations "
                    f"at the input of the matmuls on {self.paths[leaf]!r}")
            self.amax[leaf] = max(self.amax.get(leaf, 0.0), s.amax)
        return out


def quantize(fn, params, *example_args, config: StaticQuantConfig | None = None,
             calib_batches=None, calib_function=None, skip=()) -> QuantizedFunction:
    """Quantizes the weights of ``fn(params, *args)`` to FP8; returns a
    :class:`QuantizedFunction` ``q`` to call as ``q(q.params, *args)``.

    params: any pytree (dicts, lists, Flax ``State``, registered dataclasses). Its weights are
        the float leaves of rank >= 2 that feed a matmul (``dot_general``) or a gather in the
        graph of ``fn``: names do not matter. Other leaves stay as they are.
    example_args: arguments of ``fn`` after ``params`` (arrays or ``jax.ShapeDtypeStruct``s,
        in any pytree) for the first export.
    config: a :class:`~fp8xla.config.StaticQuantConfig` (default: e4m3 weights and
        activations, per channel); ``float_activation_layers`` entries are substrings of leaf
        paths, ``quantize_embeddings=False`` keeps leaves that feed a gather in float.
    calib_batches: for activation quantization, an iterable of argument tuples (a non-tuple
        item is one argument), each run once through ``fn`` with the float parameters.
    calib_function: instead, ``calib_function(run)`` where ``run(params, *args)`` has ``fn``'s
        signature and runs it instrumented (call it eagerly, not under ``jax.jit``).
    skip: leaves to keep in float, by path (``"layers/0/attn/q"``): strings are globs on the
        whole path, compiled ``re.Pattern``s are searched in it; each must match a leaf.
    """
    config = StaticQuantConfig() if config is None else config
    if not isinstance(config, StaticQuantConfig):
        raise TypeError(f"fp8xla.jax.quantize: config must be a StaticQuantConfig, got "
                        f"{type(config).__name__}")
    # Options of the Keras path that this one does not implement yet: refused, not ignored.
    unsupported = [f"{name}={getattr(config, name)!r}" for name, default in (
        ("rounding", "rtn"), ("weight_scale", "amax"), ("white_list", None),
        ("float_weights", ()), ("kv_cache_dtype", None)) if getattr(config, name) != default]
    if unsupported:
        raise ValueError(f"fp8xla.jax.quantize: {', '.join(unsupported)} is not supported by "
                         "fp8xla.jax yet (fp8xla.keras has it); use skip=... to keep leaves "
                         "in float")
    if not callable(fn):
        raise TypeError(f"fp8xla.jax.quantize: fn must be callable, got {type(fn).__name__}")
    if isinstance(skip, (str, re.Pattern)):
        skip = (skip,)
    paths, leaves, treedef = leaf_paths(params)
    for pattern in skip:
        if not isinstance(pattern, (str, re.Pattern)):
            raise TypeError(f"fp8xla.jax.quantize: skip patterns must be strings (globs) or "
                            f"re.Pattern, got {pattern!r}")
        if not any(_matches(pattern, p) for p in paths):
            raise ValueError(
                f"fp8xla.jax.quantize: skip pattern {getattr(pattern, 'pattern', pattern)!r} "
                f"matches no parameter leaf; leaf paths look like {paths[:3]}")

    specs, float_dtypes = [], []
    for p, x in zip(paths, leaves):
        s = _spec(x)
        specs.append(s)
        float_dtypes.append(str(s.dtype) if np.dtype(s.dtype) in _WEIGHT_DTYPES else None)
    candidates = [i for i, s in enumerate(specs)
                  if float_dtypes[i] is not None and len(s.shape) >= 2
                  and not any(_matches(pat, paths[i]) for pat in skip)]
    if not candidates:
        raise ValueError(
            f"fp8xla.jax.quantize: no quantizable leaf in params ({len(leaves)} leaves): a "
            "weight is a float32/bfloat16/float16 leaf of rank >= 2 that is not skipped")

    module = _Module(fn, treedef, paths, _plain_treedef(treedef))
    exp = module.export(specs, example_args)
    index = module.flat_index()
    free, gathers = _probe(exp, candidates, index)
    # quantize_embeddings=False keeps every leaf a gather reads in float, tied ones too (as
    # the Keras path keeps the embedding table).
    chosen = [i for i in candidates if (i in free or i in gathers)
              and (config.quantize_embeddings or i not in gathers)]
    if not chosen:
        raise ValueError(
            f"fp8xla.jax.quantize: no quantizable leaf: none of the {len(candidates)} float "
            f"leaves of rank >= 2 feeds a matmul (dot_general) or an embedding gather of fn"
            + ("" if config.quantize_embeddings else " (quantize_embeddings=False)"))

    for name in config.float_activation_layers:
        if not any(name in paths[i] for i in chosen):
            raise ValueError(
                f"fp8xla.jax.quantize: float_activation_layers entry {name!r} is in no "
                f"quantized leaf's path")
    amax = {}
    if config.a_format:
        act = [i for i in chosen if i in free
               and not any(name in paths[i] for name in config.float_activation_layers)]
        amax = (_calibrate(module, params, specs, act, paths, calib_batches, calib_function)
                if act else {})

    qleaves, codes = {}, list(leaves)
    for i in chosen:
        embed = i in gathers
        kind = "embed+matmul" if embed and i in free else "embed" if embed else "matmul"
        w = np.asarray(leaves[i], np.float32)
        channel_dim = None
        # As in the Keras path: per channel along the largest free dim of the matmul; for a
        # tied table (gathered and multiplied) that is its rows, so the lookup gathers each
        # row's scale with it. A table only gathered keeps one scale.
        if config.granularity == "per_channel" and free[i]:
            channel_dim = max(free[i], key=lambda d: (w.shape[d], d))
        c, scale = ops.quantize_weight(w, config.w_format, channel_dim)
        a_scale = ops.scale_for(amax[i], config.a_format) if i in amax else None
        qleaves[paths[i]] = QuantizedLeaf(paths[i], i, kind, tuple(w.shape), float_dtypes[i],
                                          config.w_format, scale, channel_dim, a_scale)
        codes[i] = jax.device_put(c)
    q = QuantizedFunction(module, config, qleaves, treedef.unflatten(codes), specs, float_dtypes)
    q._exports[signature(example_args)] = graph.quantize_exported(exp, q.options())[0]
    return q


def _calibrate(module, params, specs, act, paths, calib_batches, calib_function):
    if (calib_batches is None) == (calib_function is None):
        raise ValueError(
            "fp8xla.jax.quantize: activation quantization needs exactly one of calib_batches "
            "or calib_function (or use activation_dtype=None for weight-only)")
    cal = _Calibration(module, specs, act, paths)
    if calib_function is not None:
        if not callable(calib_function):
            raise TypeError("fp8xla.jax.quantize: calib_function must be callable")
        calib_function(cal)
    else:
        for batch in calib_batches:
            cal(params, *(batch if isinstance(batch, tuple) else (batch,)))
    if cal.calls == 0:
        raise RuntimeError(
            "fp8xla.jax.quantize: calibration never ran fn ("
            + ("calib_batches was empty" if calib_function is None
               else "calib_function never called the function it was given")
            + "), so no activation scale could be set")
    return cal.amax


def load(directory) -> QuantizedFunction:
    """Reads an artifact written by ``q.save(directory)``: returns a callable ``m`` with the
    FP8 parameters as ``m.params`` (call ``m(m.params, *args)``); it runs the argument
    signatures that were compiled before saving (see :mod:`fp8xla.jax.artifact`)."""
    config, leaf_entries, tensors, exports = artifact.read(directory)
    # The parameters in the structure the modules take them (their first argument).
    args_tree = exports[0].in_tree.children()[0]
    params_tree = args_tree.children()[0]
    n = params_tree.num_leaves
    placeholder = params_tree.unflatten(range(n))
    paths = [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(placeholder)[0]]
    avals = exports[0].in_avals[:n]
    leaves = []
    for path, aval in zip(paths, avals):
        a = tensors.get(path)
        if a is None:
            raise artifact.ArtifactError(
                f"fp8xla.jax.load: {artifact.PARAMS} has no tensor {path!r}, which the module "
                "takes")
        if tuple(a.shape) != tuple(aval.shape) or a.dtype != np.dtype(aval.dtype):
            raise artifact.ArtifactError(
                f"fp8xla.jax.load: tensor {path!r} is {a.dtype}{list(a.shape)}, the module "
                f"takes {aval.dtype}{list(aval.shape)}")
        leaves.append(jax.device_put(a))
    for exp in exports[1:]:
        if exp.in_tree.children()[0].children()[0] != params_tree:
            raise artifact.ArtifactError(
                "fp8xla.jax.load: the modules take parameters of different structures")

    qleaves, float_dtypes, specs = {}, [], []
    for i, (path, aval) in enumerate(zip(paths, avals)):
        e = leaf_entries.get(path)
        if e is None:
            float_dtypes.append(str(aval.dtype) if np.dtype(aval.dtype)
                                in _WEIGHT_DTYPES else None)
            specs.append(jax.ShapeDtypeStruct(aval.shape, aval.dtype))
            continue
        ws = e["w_scale"]
        qleaves[path] = QuantizedLeaf(
            path, i, e["kind"], tuple(e["shape"]), e["dtype"], e["format"],
            np.asarray(ws, np.float32) if isinstance(ws, list) else float(ws),
            e["channel_dim"], e["a_scale"])
        float_dtypes.append(e["dtype"])
        specs.append(jax.ShapeDtypeStruct(tuple(e["shape"]), e["dtype"]))
    module = _Module(None, params_tree, paths, plain=True)
    q = QuantizedFunction(module, config, qleaves, params_tree.unflatten(leaves), specs,
                          float_dtypes)
    for exp in exports:
        args = exp.in_tree.children()[0].unflatten(exp.in_avals)
        args_specs = [jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x) for x in args]
        q._exports[signature(tuple(args_specs[1:]))] = exp
    return q
