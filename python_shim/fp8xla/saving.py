"""Saving and loading FP8-quantized Keras-Hub models as Keras-Hub presets.

    model = fp8xla.keras.quantize_model(model, config, calib_function)
    model.save_to_preset("gemma3_fp8")              # or fp8xla.keras.save(model, path)
    # later, in any process that imported fp8xla.keras:
    model = keras_hub.models.Gemma3CausalLM.from_preset("gemma3_fp8")  # FP8 again
    model = fp8xla.keras.load("gemma3_fp8")                            # the same

The preset is a regular Keras-Hub preset directory (``config.json``, ``metadata.json``,
``task.json``, ``preprocessor.json``, ``tokenizer.json``, ``assets/``) whose task class is
``fp8xla>Fp8Gemma3CausalLM`` (a registered subclass of ``Gemma3CausalLM``) and whose weights
are an fp8xla weights file instead of ``model.weights.h5``:

``model.weights.json``
    Keras' sharded-weights index naming the weights file (Keras-Hub's loader follows it);
    ``metadata`` says the format and version.
``model.weights.fp8xla``
    ``MAGIC`` (8 bytes), format version (u32 LE), reserved (u32), header length (u64 LE),
    header CRC-32 (u32 LE), the header (UTF-8 JSON), zero padding to a multiple of 64, then
    the data. The header holds the quantization config, the quantized weights (FP8 codes as
    uint8, one byte per weight; weight scale per tensor or per channel; activation scale) and
    every other variable (float32 as saved); each array is ``{offset, nbytes, dtype, shape,
    crc32}`` into the data, offsets relative to its start and 64-byte aligned.

Loading never materializes float32 copies of the quantized weights: the task is built in a
``keras.StatelessScope`` so its variables stay uninitialized, only the non-quantized ones get
values, and the FP8 codes go straight to fp8xla's FP8 graph. Reading the float value of a
quantized variable of a loaded model raises (it does not exist).

Every preset file fp8xla reads is checked before use (``config.json``, ``task.json``,
``model.weights.json``, ``model.weights.fp8xla``): a missing, malformed or other-version file
raises :class:`PresetError` naming the preset, the file and what is wrong.

This module imports Keras-Hub (the model class subclasses ``Gemma3CausalLM``); ``import fp8xla``
does not import it.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import weakref
import zlib

import keras
import keras_hub
import numpy as np
from keras_hub.src.utils.preset_utils import KerasPresetSaver, get_preset_loader

from . import ops, runtime

MAGIC = b"FP8XLAW\n"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.weights.fp8xla"
INDEX_FILE = "model.weights.json"  # Keras-Hub's SHARDED_MODEL_WEIGHTS_CONFIG_FILE
TASK_FILE = "task.json"
CONFIG_FILE = "config.json"
FORMAT_NAME = "fp8xla weights"  # "format" of the weights file's header and of the index
_PREAMBLE = struct.Struct("<8sIIQI")  # magic, version, reserved, header length, header crc
_ALIGN = 64


class PresetError(ValueError):
    """An fp8xla preset or weights file is missing, truncated, corrupt or of another version."""


# ---------------------------------------------------------------------------------------------
# the weights file


def _pad(n):
    return (-n) % _ALIGN


def _array_entry(arr, offset):
    arr = np.ascontiguousarray(arr)
    data = arr.tobytes()
    return ({"offset": offset, "nbytes": len(data), "dtype": arr.dtype.str,
             "shape": list(arr.shape), "crc32": zlib.crc32(data)}, data)


def write_weights_file(path, model):
    """Writes ``model``'s fp8xla weights file (see the module docstring)."""
    state = model.fp8
    trainable = model.trainable_variables
    quantized = state.weights
    blobs = []
    offset = 0

    def add(arr):
        nonlocal offset
        entry, data = _array_entry(arr, offset)
        blobs.append(data)
        pad = _pad(len(data))
        if pad:
            blobs.append(b"\0" * pad)
        offset += len(data) + pad
        return entry

    qentries = []
    for i in sorted(quantized):
        q = quantized[i]
        codes = np.asarray(q.codes)
        if codes.dtype.itemsize != 1:
            raise ValueError(f"fp8xla.save: codes of {q.path} are {codes.dtype}, not FP8")
        per_channel = q.channel_dim is not None
        qentries.append({
            "index": int(i),
            "path": q.path,
            "fp8_dtype": str(codes.dtype),
            "codes": add(codes.view(np.uint8)),
            "w_scale": (add(np.asarray(q.w_scale, np.float32)) if per_channel
                        else float(q.w_scale)),
            "channel_dim": q.channel_dim,
            "a_scale": None if q.a_scale is None else float(q.a_scale),
            **({"a_dynamic": True} if q.a_dynamic else {}),
        })
    variables = []
    for collection, vs in (("trainable", trainable),
                           ("non_trainable", model.non_trainable_variables)):
        for i, v in enumerate(vs):
            if collection == "trainable" and i in quantized:
                continue
            variables.append({"collection": collection, "index": i, "path": v.path,
                              **add(np.asarray(v.value))})
    cfg = state.config
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": {"weight_dtype": cfg.weight_dtype, "activation_dtype": cfg.activation_dtype,
                   "granularity": cfg.granularity,
                   "quantize_embeddings": cfg.quantize_embeddings,
                   **({"kv_cache_dtype": cfg.kv_cache_dtype} if cfg.kv_cache_dtype else {}),
                   **({"dynamic": True} if cfg.dynamic else {})},
        "num_trainable": len(trainable),
        "num_non_trainable": len(model.non_trainable_variables),
        "quantized": qentries,
        "variables": variables,
        "data_size": offset,
    }
    head = json.dumps(header).encode("utf-8")
    pre = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0, len(head), zlib.crc32(head))
    with open(path, "wb") as f:
        f.write(pre)
        f.write(head)
        f.write(b"\0" * _pad(len(pre) + len(head)))
        for b in blobs:
            f.write(b)
        f.flush()
        os.fsync(f.fileno())


class WeightsReader:
    """Reads and validates an fp8xla weights file; arrays are read one at a time."""

    def __init__(self, path):
        self.path = path
        if not os.path.isfile(path):
            raise PresetError(f"fp8xla: weights file {path} does not exist")
        size = os.path.getsize(path)
        self._f = open(path, "rb")
        try:
            self.header, self._data = self._read_header(size)
        except BaseException:
            self.close()
            raise

    def _read_header(self, size):
        path = self.path
        pre = self._f.read(_PREAMBLE.size)
        if len(pre) < _PREAMBLE.size:
            raise PresetError(f"fp8xla: weights file {path} is truncated ({size} bytes, "
                              "shorter than its fixed header)")
        magic, version, _, head_len, head_crc = _PREAMBLE.unpack(pre)
        if magic != MAGIC:
            raise PresetError(f"fp8xla: {path} is not an fp8xla weights file (bad magic "
                              f"{magic!r})")
        if version != FORMAT_VERSION:
            raise PresetError(
                f"fp8xla: weights file {path} has format version {version}; this fp8xla "
                f"reads version {FORMAT_VERSION}")
        head = self._f.read(head_len)
        if len(head) < head_len:
            raise PresetError(f"fp8xla: weights file {path} is truncated inside its header")
        if zlib.crc32(head) != head_crc:
            raise PresetError(f"fp8xla: weights file {path} is corrupt (header checksum "
                              "mismatch)")
        try:
            header = json.loads(head.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PresetError(f"fp8xla: weights file {path}: its header is not valid UTF-8 "
                              f"JSON ({e})") from None
        _check_header(path, header)
        start = _PREAMBLE.size + head_len
        data = start + _pad(start)
        want = data + header["data_size"]
        if size < want:
            raise PresetError(f"fp8xla: weights file {path} is truncated: {size} bytes, "
                              f"the header describes {want}")
        if size > want:
            raise PresetError(f"fp8xla: weights file {path} is corrupt: {size} bytes, the "
                              f"header describes {want}")
        return header, data

    def read(self, entry, what):
        self._f.seek(self._data + entry["offset"])
        arr = np.empty(entry["shape"], np.dtype(entry["dtype"]))
        buf = memoryview(arr.reshape(-1).view(np.uint8))
        if self._f.readinto(buf) != entry["nbytes"] or arr.nbytes != entry["nbytes"]:
            raise PresetError(f"fp8xla: weights file {self.path} is truncated in {what}")
        if zlib.crc32(buf) != entry["crc32"]:
            raise PresetError(f"fp8xla: weights file {self.path} is corrupt: checksum "
                              f"mismatch in {what}")
        return arr

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _expect(path, where, value, kind, what=None):
    """Checks one field of a preset file: `value` is of type `kind` (and `what` holds)."""
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, (int,)))
    if not ok or (what is not None and not what[0](value)):
        expected = what[1] if what is not None else (
            kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind))
        raise PresetError(f"fp8xla: {path}: {where} is {value!r}; expected {expected}")
    return value


_NON_NEGATIVE = (lambda n: n >= 0, "an integer >= 0")


def _check_array_entry(path, where, e, data_size):
    _expect(path, where, e, dict)
    for key, kind in (("offset", int), ("nbytes", int), ("crc32", int), ("dtype", str),
                      ("shape", list)):
        _expect(path, f"{where}.{key}", e.get(key), kind,
                _NON_NEGATIVE if kind is int else None)
    for d in e["shape"]:
        _expect(path, f"{where}.shape", d, int, _NON_NEGATIVE)
    try:
        itemsize = np.dtype(e["dtype"]).itemsize
    except TypeError:
        raise PresetError(f"fp8xla: {path}: {where}.dtype is {e['dtype']!r}, not a NumPy "
                          "dtype") from None
    if itemsize * int(np.prod(e["shape"])) != e["nbytes"] or e["offset"] + e["nbytes"] > data_size:
        raise PresetError(f"fp8xla: {path}: {where} describes {e['nbytes']} bytes at offset "
                          f"{e['offset']}, which its shape and dtype or the data "
                          f"({data_size} bytes) do not match")


def _check_header(path, h):
    """The structure of a weights file's header (values are checked against the model when
    it loads)."""
    _expect(path, "the header", h, dict)
    _expect(path, "the header's format", h.get("format"), str,
            (lambda f: f == FORMAT_NAME, repr(FORMAT_NAME)))
    _expect(path, "the header's format_version", h.get("format_version"), int,
            (lambda v: v == FORMAT_VERSION, f"{FORMAT_VERSION} (this fp8xla's version)"))
    size = _expect(path, "the header's data_size", h.get("data_size"), int, _NON_NEGATIVE)
    _expect(path, "the header's config", h.get("config"), dict)
    for key in ("num_trainable", "num_non_trainable"):
        _expect(path, f"the header's {key}", h.get(key), int, _NON_NEGATIVE)
    for i, e in enumerate(_expect(path, "the header's variables", h.get("variables"), list)):
        where = f"variables[{i}]"
        _expect(path, where, e, dict)
        n = h["num_trainable"] if e.get("collection") == "trainable" else h["num_non_trainable"]
        _expect(path, f"{where}.collection", e.get("collection"), str,
                (lambda c: c in ("trainable", "non_trainable"),
                 "'trainable' or 'non_trainable'"))
        _expect(path, f"{where}.index", e.get("index"), int, (lambda k: 0 <= k < n, f"< {n}"))
        _expect(path, f"{where}.path", e.get("path"), str)
        _check_array_entry(path, where, e, size)
    fp8_names = sorted(str(ops.fp8_dtype(f)) for f in ("e4m3fn", "e5m2"))
    for i, e in enumerate(_expect(path, "the header's quantized", h.get("quantized"), list)):
        where = f"quantized[{i}]"
        _expect(path, where, e, dict)
        n = h["num_trainable"]
        _expect(path, f"{where}.index", e.get("index"), int, (lambda k: 0 <= k < n, f"< {n}"))
        _expect(path, f"{where}.path", e.get("path"), str)
        _expect(path, f"{where}.fp8_dtype", e.get("fp8_dtype"), str,
                (lambda d: d in fp8_names, f"one of {fp8_names}"))
        _check_array_entry(path, f"{where}.codes", e.get("codes"), size)
        if e["codes"]["dtype"] != "|u1":
            raise PresetError(f"fp8xla: {path}: {where}.codes.dtype is "
                              f"{e['codes']['dtype']!r}; expected '|u1' (one byte a weight)")
        w_scale = _expect(path, f"{where}.w_scale", e.get("w_scale"), (int, float, dict))
        if isinstance(w_scale, dict):
            _check_array_entry(path, f"{where}.w_scale", w_scale, size)
            _expect(path, f"{where}.channel_dim", e.get("channel_dim"), int, _NON_NEGATIVE)
        elif e.get("channel_dim") is not None:
            raise PresetError(f"fp8xla: {path}: {where} has one weight scale but channel_dim "
                              f"{e['channel_dim']!r}; expected null")
        if e.get("a_scale") is not None:
            _expect(path, f"{where}.a_scale", e["a_scale"], (int, float))


# ---------------------------------------------------------------------------------------------
# the other preset files


def _read_json(preset_dir, name, who):
    """A preset's JSON file as a dict, or PresetError naming the preset, file and problem."""
    path = os.path.join(preset_dir, name)
    if not os.path.isfile(path):
        what = ("the weights index" if name == INDEX_FILE else name)
        raise PresetError(f"{who}: {path} is missing ({what}); {preset_dir} is not a "
                          "complete fp8xla preset")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PresetError(f"{who}: {name} of the preset {preset_dir} is not valid JSON "
                          f"({e})") from None
    if not isinstance(value, dict):
        raise PresetError(f"{who}: {name} of the preset {preset_dir} holds a JSON "
                          f"{type(value).__name__}; expected an object")
    return value


def _check_index(preset_dir, index, who):
    """``model.weights.json``: the index fp8xla writes, naming this version's weights file."""
    path = os.path.join(preset_dir, INDEX_FILE)
    meta = _expect(path, "metadata", index.get("metadata"), dict)
    _expect(path, "metadata.format", meta.get("format"), str,
            (lambda f: f == FORMAT_NAME, f"{FORMAT_NAME!r} (an fp8xla preset)"))
    _expect(path, "metadata.format_version", meta.get("format_version"), int,
            (lambda v: v == FORMAT_VERSION, f"{FORMAT_VERSION} (the version this fp8xla "
                                            "reads)"))
    _expect(path, "weight_map", index.get("weight_map"), dict,
            (lambda m: m == {"*": WEIGHTS_FILE}, repr({"*": WEIGHTS_FILE})))


def _check_preset_files(preset_dir, who="fp8xla.load"):
    """Checks the JSON files of an FP8 preset and that its weights file exists."""
    if not os.path.isdir(preset_dir):
        raise PresetError(f"{who}: preset directory {preset_dir} does not exist")
    config = _read_json(preset_dir, CONFIG_FILE, who)
    path = os.path.join(preset_dir, CONFIG_FILE)
    _expect(path, "registered_name", config.get("registered_name"), str)
    _expect(path, "config", config.get("config"), dict)
    task = _read_json(preset_dir, TASK_FILE, who)
    path = os.path.join(preset_dir, TASK_FILE)
    name = task.get("registered_name")
    if name != _REGISTERED_NAME:
        raise PresetError(f"{who}: {path} names {name!r}, not an fp8xla FP8 model "
                          f"({_REGISTERED_NAME!r})")
    _expect(path, "config", task.get("config"), dict)
    _check_index(preset_dir, _read_json(preset_dir, INDEX_FILE, who), who)
    weights = os.path.join(preset_dir, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise PresetError(f"{who}: {weights} is missing (the fp8xla weights file); "
                          f"{preset_dir} is not a complete fp8xla preset")


# ---------------------------------------------------------------------------------------------
# the model class of FP8 presets


def _model_inputs(model, x):
    """``{"token_ids", "padding_mask"}`` arrays of ``x``: as given, or preprocessed (strings)."""
    if not isinstance(x, dict):
        if model.preprocessor is None:
            raise TypeError(
                "fp8xla: predict on a model without a preprocessor takes "
                "{'token_ids': ..., 'padding_mask': ...}, got " + type(x).__name__)
        x = keras.utils.unpack_x_y_sample_weight(model.preprocessor(x))[0]
    return {k: np.asarray(v) for k, v in x.items() if v is not None}


class Fp8Gemma3CausalLM(keras_hub.models.Gemma3CausalLM):
    """A ``Gemma3CausalLM`` whose matmul weights are FP8 (fp8xla). ``from_preset`` of an FP8
    preset returns one; ``save_to_preset`` writes one."""

    # Not Gemma3Backbone: Keras-Hub picks the task class of a plain Gemma3 preset among the
    # subclasses of Gemma3CausalLM whose backbone_cls matches; this one must never be picked.
    backbone_cls = None

    @classmethod
    def from_config(cls, config):
        if isinstance(config.get("backbone"), dict):
            config = {**config,
                      "backbone": _build_deferred(lambda: keras.layers.deserialize(
                          config["backbone"]))}
        model = super().from_config(config)
        _bind_weight_loading(model)
        return model

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        return load(preset, **kwargs)

    def save_to_preset(self, preset_dir, max_shard_size=None):
        save(self, preset_dir)

    # Keras' own predict paths read every trainable variable's float value first, and a
    # loaded FP8 model has none for its quantized weights: score through the FP8 graph.
    def predict_on_batch(self, x):
        return np.asarray(runtime.logits(self, _model_inputs(self, x)))

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
        x = _model_inputs(self, x)
        n = len(next(iter(x.values())))
        size = batch_size or 32
        parts = [np.asarray(runtime.logits(self, {k: v[i:i + size] for k, v in x.items()}))
                 for i in range(0, n, size)]
        return np.concatenate(parts) if parts else np.zeros((0,), np.float32)

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        state = getattr(self, "fp8", None)
        if state is not None:  # compile() drops the generate function: keep it FP8
            runtime.install(self, state.config, state.weights)

    def summary(self, *args, **kwargs):
        if getattr(self, "fp8", None) is None:
            return super().summary(*args, **kwargs)
        return runtime.summary_of_stored_weights(self, super().summary, *args, **kwargs)


# The one registration of the class, under the name FP8 presets' task.json gives.
keras.saving.register_keras_serializable(package="fp8xla")(Fp8Gemma3CausalLM)
_REGISTERED_NAME = keras.saving.get_registered_name(Fp8Gemma3CausalLM)


def _build_deferred(build):
    """Builds a backbone with its variables uninitialized (no float32 values allocated)."""
    from keras.src.backend.common import global_state, variables as kvars

    key = "uninitialized_variables"
    with keras.StatelessScope(initialize_variables=False):
        backbone = build()
    ours = {id(v) for v in backbone.variables}
    pending = global_state.get_global_attribute(key) or []
    global_state.set_global_attribute(key, [v for v in pending if id(v) not in ours])
    kvars.initialize_all_variables()  # anything else created meanwhile
    return backbone


def _bind_weight_loading(model):
    """Makes the backbone's ``load_weights`` (which Keras-Hub's preset loader calls with the
    weights index of the preset) load the fp8xla weights file into ``model``."""
    ref = weakref.ref(model)

    def load_weights(filepath, *args, **kwargs):
        _load_weights_into(ref(), os.path.dirname(os.path.abspath(filepath)))

    model.backbone.load_weights = load_weights


def _raise_on_value(path):
    def initializer(shape, dtype=None):
        raise RuntimeError(
            f"fp8xla: the variable {path} of this model holds FP8 codes (it was loaded from "
            "an FP8 preset); its float32 value does not exist. Use model.generate(), "
            "fp8xla.keras.logits() or model.fp8.weights")

    return initializer


def _load_weights_into(model, preset_dir):
    # Keras-Hub's from_preset reaches here without fp8xla.load's checks: the index is the
    # file that names the weights file and its version.
    _check_index(preset_dir, _read_json(preset_dir, INDEX_FILE, "fp8xla"), "fp8xla")
    path = os.path.join(preset_dir, WEIGHTS_FILE)
    trainable = model.trainable_variables
    non_trainable = model.non_trainable_variables
    with WeightsReader(path) as r:
        h = r.header
        if (h["num_trainable"], h["num_non_trainable"]) != (len(trainable), len(non_trainable)):
            raise PresetError(
                f"fp8xla: weights file {path} holds {h['num_trainable']} trainable and "
                f"{h['num_non_trainable']} non-trainable variables; the model of "
                f"{os.path.join(preset_dir, TASK_FILE)} has {len(trainable)} and "
                f"{len(non_trainable)}")
        try:
            fields = dict(h["config"])
            kind = (runtime.DynamicQuantConfig if fields.pop("dynamic", False)
                    else runtime.StaticQuantConfig)
            config = kind(**fields)
        except (TypeError, ValueError) as e:
            raise PresetError(f"fp8xla: weights file {path}: the header's config is not a "
                              f"valid StaticQuantConfig ({e})") from None
        want_dtype = str(ops.fp8_dtype(config.w_format))
        lists = {"trainable": trainable, "non_trainable": non_trainable}
        seen = set()
        for e in h["variables"]:
            v = lists[e["collection"]][e["index"]]
            _check_shape(path, v, e["shape"], e["path"])
            value = r.read(e, e["path"])
            v._initializer = None
            v.assign(value)
            del value
            seen.add(id(v))
        qweights = {}
        for e in h["quantized"]:
            i = e["index"]
            v = trainable[i]
            _check_shape(path, v, e["codes"]["shape"], e["path"])
            if e["fp8_dtype"] != want_dtype:
                raise PresetError(f"fp8xla: weights file {path}: {e['path']} holds "
                                  f"{e['fp8_dtype']} codes; its config's weight_dtype "
                                  f"{config.weight_dtype!r} is {want_dtype}")
            codes = r.read(e["codes"], e["path"]).view(np.dtype(e["fp8_dtype"]))
            w_scale = e["w_scale"]
            if isinstance(w_scale, dict):
                w_scale = r.read(w_scale, e["path"] + " (weight scale)")
            qweights[i] = runtime.QuantizedWeight(i, v.path, codes, w_scale, e["channel_dim"],
                                                  e["a_scale"], bool(e.get("a_dynamic")))
            v._initializer = _raise_on_value(v.path)
            seen.add(id(v))
    missing = [v.path for v in model.variables if id(v) not in seen and v._value is None]
    if missing:
        raise PresetError(f"fp8xla: weights file {path} has no value for {missing[:5]}")
    runtime.install(model, config, qweights)
    # keep one copy of the codes: the host view of the device buffers fp8xla runs on
    for i, q in model.fp8.weights.items():
        q.codes = np.asarray(model.fp8.codes[i])
    return model


def _check_shape(path, v, shape, saved_path):
    if tuple(shape) != tuple(v.shape):
        raise PresetError(f"fp8xla: weights file {path}: {saved_path} has shape "
                          f"{tuple(shape)}, the model's {v.path} has {tuple(v.shape)}")


# ---------------------------------------------------------------------------------------------
# public API


def save(model, preset_dir):
    """Writes the fp8xla-quantized ``model`` as a Keras-Hub preset directory (replacing
    ``preset_dir`` if it exists). Written into a temporary directory next to it and renamed
    into place, so a failed save leaves no partial preset."""
    if getattr(model, "fp8", None) is None:
        raise ValueError("fp8xla.save: the model is not quantized by fp8xla "
                         "(use fp8xla.keras.quantize_model first)")
    if not isinstance(model, keras_hub.models.Gemma3CausalLM):
        raise NotImplementedError(f"fp8xla.save: saving {type(model).__name__} is not "
                                  "supported (Gemma3CausalLM only)")
    cls = Fp8Gemma3CausalLM
    preset_dir = os.path.abspath(os.fspath(preset_dir))
    _check_replaceable(preset_dir)
    parent = os.path.dirname(preset_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(preset_dir)}.", dir=parent)
    try:
        saver = KerasPresetSaver(tmp)
        saver._save_serialized_object(model.backbone, CONFIG_FILE)
        saver._save_metadata(model.backbone)
        task = keras.saving.serialize_keras_object(model)
        for k in ("compile_config", "build_config"):
            saver._recursive_pop(task, k)
        task.update(module=cls.__module__, class_name=cls.__name__,
                    registered_name=_REGISTERED_NAME)
        with open(os.path.join(tmp, TASK_FILE), "w") as f:
            json.dump(task, f, indent=4)
        if model.preprocessor is not None:
            model.preprocessor.save_to_preset(tmp)
        write_weights_file(os.path.join(tmp, WEIGHTS_FILE), model)
        index = {"metadata": {"format": FORMAT_NAME, "format_version": FORMAT_VERSION},
                 "weight_map": {"*": WEIGHTS_FILE}}
        with open(os.path.join(tmp, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=4)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a preset is a plain dir
        old = None
        if os.path.lexists(preset_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(preset_dir)}.old.", dir=parent)
            os.rename(preset_dir, os.path.join(old, "preset"))
        try:
            os.rename(tmp, preset_dir)
        except BaseException:
            if old is not None:
                os.rename(os.path.join(old, "preset"), preset_dir)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_replaceable(preset_dir):
    """An existing ``preset_dir`` is replaced only if it holds nothing but preset files."""
    if not os.path.lexists(preset_dir):
        return
    if os.path.islink(preset_dir) or not os.path.isdir(preset_dir):
        raise FileExistsError(f"fp8xla.save: {preset_dir} exists and is not a directory")
    other = [n for n in os.listdir(preset_dir)
             if not (n.endswith((".json", ".h5", ".fp8xla")) or n in ("assets", "README.md"))]
    if other:
        raise FileExistsError(
            f"fp8xla.save: {preset_dir} exists and holds files that are not part of a "
            f"Keras-Hub preset ({', '.join(sorted(other)[:5])}); not replacing it")


def load(preset_dir, **kwargs):
    """Loads an FP8 preset written by :func:`save` (also what
    ``keras_hub.models.Gemma3CausalLM.from_preset`` does once ``fp8xla.keras`` is imported).
    ``kwargs`` go to Keras-Hub's ``from_preset`` (e.g. ``preprocessor=None``)."""
    preset_dir = os.fspath(preset_dir)
    _check_preset_files(preset_dir)
    loader = get_preset_loader(preset_dir)
    model = loader.load_task(Fp8Gemma3CausalLM, load_weights=True, load_task_weights=True,
                             **kwargs)
    if getattr(model, "fp8", None) is None:
        raise PresetError(f"fp8xla.load: {preset_dir} did not load as an FP8 model")
    return model


def is_fp8_preset(preset_dir) -> bool:
    """Whether ``preset_dir`` holds an fp8xla weights file (an FP8 preset)."""
    return os.path.isfile(os.path.join(os.fspath(preset_dir), WEIGHTS_FILE))
