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

from .. import __version__
from ..config import StaticQuantConfig

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
    """Writes ``q`` (a :class:`~fp8xla.jax.QuantizedFunction`, what ``q.save`` calls) to
    ``directory`` (created if missing; files of an earlier artifact there are replaced)."""
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


def read(directory):
    """The checked contents of an artifact: ``(config, {path: leaf entry}, {name: array},
    [Exported])``; :func:`fp8xla.jax.load` builds the callable from them."""
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
    return config, leaf_entries, tensors, exports


__all__ = ["ArtifactError", "FORMAT", "VERSION", "read", "save"]
