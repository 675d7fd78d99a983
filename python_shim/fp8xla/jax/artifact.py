"""FP8 artifacts of :func:`fp8xla.jax.quantize`: a directory that runs without the original
function, and without Keras.

    q.save("mlp_fp8")
    # in any process with fp8xla installed:
    m = fp8xla.jax.load("mlp_fp8")
    y = m(m.params, x)

The directory holds:

``manifest.json``
    ``{"format": "fp8xla.jax artifact", "version": 1, ...}``: the versions that wrote it (fp8xla,
    jax), the quantization config, every quantized leaf (path, kind, format, ``w_scale``,
    ``channel_dim``, ``a_scale``), the files below with their size and SHA-256.
``params.safetensors``
    Every parameter leaf by path, in the safetensors format (no pickle): the quantized ones as
    ``F8_E4M3`` / ``F8_E5M2`` (one byte per weight), the others in their own dtype.
``module-N.jaxexport``
    The rewritten module for each argument signature the function was compiled for
    (``jax.export``'s serialization; it calls fp8xla's custom calls, registered in any JAX
    process with fp8xla installed through the ``jax_plugins`` entry point).

The parameters come back in the structure the module takes them: the original pytree when it
is made of dicts, lists and tuples only (what ``jax.export`` can serialize), else a dict by leaf
path (a Flax ``State``, for instance, comes back as ``{"layers/0/kernel/value": ...}``).

A missing, truncated, corrupt or other-version file raises :class:`ArtifactError` naming the
artifact, the file and what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import ml_dtypes
import numpy as np

from .. import __version__, graph
from ..config import StaticQuantConfig
from . import _quantize

FORMAT = "fp8xla.jax artifact"
VERSION = 1
MANIFEST = "manifest.json"
PARAMS = "params.safetensors"

# numpy dtype -> safetensors dtype name (safetensors' own names; F8_E4M3 is e4m3fn)
_ST_DTYPES = {
    np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
    np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2", np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8", np.dtype(np.int16): "I16", np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64", np.dtype(np.uint32): "U32", np.dtype(np.uint64): "U64",
    np.dtype(np.bool_): "BOOL",
}
_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


class ArtifactError(ValueError):
    """An fp8xla.jax artifact is missing, truncated, corrupt or of another version."""


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_entry(directory, name):
    path = os.path.join(directory, name)
    return {"name": name, "bytes": os.path.getsize(path), "sha256": _sha256(path)}


def save(q, directory):
    """Writes ``q`` (a :class:`~fp8xla.jax.QuantizedFunction`) to ``directory`` (created if
    missing; files of an earlier artifact there are replaced)."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for path, x in zip(q._module.paths, jax.tree_util.tree_leaves(q.params)):
        a = np.require(np.asarray(x), requirements="C")  # (ascontiguousarray makes 0-d 1-d)
        if a.dtype not in _ST_DTYPES:
            raise TypeError(f"fp8xla.jax.save: leaf {path!r} has dtype {a.dtype}, which the "
                            "safetensors format has no name for")
        tensors[path] = a
    # safetensors names ml_dtypes' float8_e4m3fn / float8_e5m2 F8_E4M3 / F8_E5M2
    save_file(tensors, os.path.join(directory, PARAMS), metadata={"format": FORMAT})
    modules = []
    for n, exp in enumerate(q._exports.values()):
        name = f"module-{n}.jaxexport"
        try:
            data = exp.serialize()
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"fp8xla.jax.save: jax.export cannot serialize the module ({e}); the function's "
                "arguments and results must be arrays in dicts, lists and tuples") from e
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
        modules.append(_file_entry(directory, name))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "written_by": {"fp8xla": __version__, "jax": jax.__version__},
        "config": {k: (list(v) if isinstance(v, tuple) else v)
                   for k, v in vars(q.config).items()},
        "params_as": "pytree" if q._module.plain else "dict by path",
        "leaves": [{
            "path": l.path, "kind": l.kind, "shape": list(l.shape), "dtype": l.dtype,
            "format": l.format,
            "w_scale": (float(l.w_scale) if l.channel_dim is None
                        else [float(s) for s in np.ravel(l.w_scale)]),
            "channel_dim": l.channel_dim, "a_scale": l.a_scale,
        } for l in q.leaves.values()],
        "params": _file_entry(directory, PARAMS),
        "modules": modules,
    }
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


def _read_manifest(directory):
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise ArtifactError(f"fp8xla.jax.load: {directory!r} is not a directory")
    if not os.path.isfile(path):
        raise ArtifactError(f"fp8xla.jax.load: {directory!r} has no {MANIFEST}; not an "
                            "fp8xla.jax artifact")
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"fp8xla.jax.load: {path} is not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ArtifactError(f"fp8xla.jax.load: {path} is not an fp8xla.jax manifest "
                            f"(format {m.get('format') if isinstance(m, dict) else m!r})")
    if m.get("version") != VERSION:
        raise ArtifactError(
            f"fp8xla.jax.load: {path} has format version {m.get('version')!r} (written by "
            f"fp8xla {m.get('written_by', {}).get('fp8xla')}); this fp8xla reads version "
            f"{VERSION}")
    return m


def _checked_bytes(directory, entry, what):
    """The file an entry of the manifest names, checked against its size and SHA-256."""
    try:
        name = entry["name"]
        if os.path.basename(name) != name:
            raise ArtifactError(f"fp8xla.jax.load: {what} file name {name!r} is not a plain "
                                "file name")
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            data = f.read()
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"fp8xla.jax.load: {directory}/{MANIFEST}: bad {what} entry "
                            f"{entry!r}") from e
    except OSError as e:
        raise ArtifactError(f"fp8xla.jax.load: cannot read the {what} file ({e})") from e
    if len(data) != entry.get("bytes"):
        raise ArtifactError(
            f"fp8xla.jax.load: {path} has {len(data)} bytes, the manifest says "
            f"{entry.get('bytes')} (truncated or replaced)")
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise ArtifactError(f"fp8xla.jax.load: {path} does not match its SHA-256 in the "
                            "manifest (corrupt)")
    return data


def load(directory) -> "_quantize.QuantizedFunction":
    """Reads an artifact written by ``q.save(directory)``: returns a callable ``m`` with the
    FP8 parameters as ``m.params`` (call ``m(m.params, *args)``); it runs the argument
    signatures that were compiled before saving."""
    from safetensors import deserialize

    m = _read_manifest(directory)
    try:
        config = StaticQuantConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                                      for k, v in m["config"].items()})
        leaf_entries = {e["path"]: e for e in m["leaves"]}
        module_entries = list(m["modules"])
        params_entry = m["params"]
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"fp8xla.jax.load: {directory}/{MANIFEST} is malformed ({e})") from e
    if not module_entries:
        raise ArtifactError(f"fp8xla.jax.load: {directory}/{MANIFEST} lists no module")

    raw = _checked_bytes(directory, params_entry, "parameters")
    try:
        tensors = {}
        for name, t in deserialize(raw):
            if t["dtype"] not in _NP_DTYPES:
                raise ArtifactError(f"fp8xla.jax.load: tensor {name!r} of {PARAMS} has dtype "
                                    f"{t['dtype']}, which fp8xla does not read")
            tensors[name] = np.frombuffer(bytes(t["data"]), _NP_DTYPES[t["dtype"]]).reshape(
                t["shape"])
    except ArtifactError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError on bad headers
        raise ArtifactError(f"fp8xla.jax.load: {directory}/{PARAMS} is not a valid "
                            f"safetensors file ({e})") from e

    exports = []
    for entry in module_entries:
        data = _checked_bytes(directory, entry, "module")
        try:
            exports.append(jax.export.deserialize(bytearray(data)))
        except Exception as e:  # flatbuffers/jax raise various errors on bad input
            raise ArtifactError(f"fp8xla.jax.load: {directory}/{entry['name']} is not a "
                                f"serialized jax.export module ({e})") from e

    # The parameters in the structure the modules take them (their first argument).
    args_tree = exports[0].in_tree.children()[0]
    params_tree = args_tree.children()[0]
    n = params_tree.num_leaves
    placeholder = params_tree.unflatten(range(n))
    paths = [_quantize.path_string(p)
             for p, _ in jax.tree_util.tree_flatten_with_path(placeholder)[0]]
    avals = exports[0].in_avals[:n]
    leaves = []
    for path, aval in zip(paths, avals):
        a = tensors.get(path)
        if a is None:
            raise ArtifactError(f"fp8xla.jax.load: {PARAMS} has no tensor {path!r}, which the "
                                "module takes")
        if tuple(a.shape) != tuple(aval.shape) or a.dtype != np.dtype(aval.dtype):
            raise ArtifactError(
                f"fp8xla.jax.load: tensor {path!r} is {a.dtype}{list(a.shape)}, the module "
                f"takes {aval.dtype}{list(aval.shape)}")
        leaves.append(jax.device_put(a))
    for exp in exports[1:]:
        if exp.in_tree.children()[0].children()[0] != params_tree:
            raise ArtifactError("fp8xla.jax.load: the modules take parameters of different "
                                "structures")

    qleaves, float_dtypes, specs = {}, [], []
    for i, (path, aval) in enumerate(zip(paths, avals)):
        e = leaf_entries.get(path)
        if e is None:
            float_dtypes.append(str(aval.dtype) if np.dtype(aval.dtype)
                                in _quantize._WEIGHT_DTYPES else None)
            specs.append(jax.ShapeDtypeStruct(aval.shape, aval.dtype))
            continue
        ws = e["w_scale"]
        qleaves[path] = _quantize.QuantizedLeaf(
            path, i, e["kind"], tuple(e["shape"]), e["dtype"], e["format"],
            np.asarray(ws, np.float32) if isinstance(ws, list) else float(ws),
            e["channel_dim"], e["a_scale"])
        float_dtypes.append(e["dtype"])
        specs.append(jax.ShapeDtypeStruct(tuple(e["shape"]), e["dtype"]))
    module = _quantize._Module(None, params_tree, paths, plain=True)
    q = _quantize.QuantizedFunction(module, config, qleaves, params_tree.unflatten(leaves),
                                    specs, float_dtypes)
    for exp in exports:
        args = exp.in_tree.children()[0].unflatten(exp.in_avals)
        args_specs = [jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x) for x in args]
        q._exports[_quantize.signature(tuple(args_specs[1:]))] = exp
    return q


__all__ = ["ArtifactError", "load", "save", "FORMAT", "VERSION"]
