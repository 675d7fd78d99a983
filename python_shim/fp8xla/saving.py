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
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import weakref
import zlib

import numpy as np

MAGIC = b"FP8XLAW\n"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.weights.fp8xla"
INDEX_FILE = "model.weights.json"  # Keras-Hub's SHARDED_MODEL_WEIGHTS_CONFIG_FILE
TASK_FILE = "task.json"
CONFIG_FILE = "config.json"
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
        "format": "fp8xla weights",
        "format_version": FORMAT_VERSION,
        "config": {"weight_dtype": cfg.weight_dtype, "activation_dtype": cfg.activation_dtype,
                   "granularity": cfg.granularity,
                   "quantize_embeddings": cfg.quantize_embeddings},
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
        pre = self._f.read(_PREAMBLE.size)
        if len(pre) < _PREAMBLE.size:
            self.close()
            raise PresetError(f"fp8xla: weights file {path} is truncated ({size} bytes, "
                              "shorter than its fixed header)")
        magic, version, _, head_len, head_crc = _PREAMBLE.unpack(pre)
        if magic != MAGIC:
            self.close()
            raise PresetError(f"fp8xla: {path} is not an fp8xla weights file (bad magic "
                              f"{magic!r})")
        if version != FORMAT_VERSION:
            self.close()
            raise PresetError(
                f"fp8xla: weights file {path} has format version {version}; this fp8xla "
                f"reads version {FORMAT_VERSION}")
        head = self._f.read(head_len)
        if len(head) < head_len:
            self.close()
            raise PresetError(f"fp8xla: weights file {path} is truncated inside its header")
        if zlib.crc32(head) != head_crc:
            self.close()
            raise PresetError(f"fp8xla: weights file {path} is corrupt (header checksum "
                              "mismatch)")
        self.header = json.loads(head.decode("utf-8"))
        start = _PREAMBLE.size + head_len
        self._data = start + _pad(start)
        want = self._data + self.header["data_size"]
        if size < want:
            self.close()
            raise PresetError(f"fp8xla: weights file {path} is truncated: {size} bytes, "
                              f"the header describes {want}")
        if size > want:
            self.close()
            raise PresetError(f"fp8xla: weights file {path} is corrupt: {size} bytes, the "
                              f"header describes {want}")

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


# ---------------------------------------------------------------------------------------------
# the model class of FP8 presets


def _model_inputs(model, x):
    """``{"token_ids", "padding_mask"}`` arrays of ``x``: as given, or preprocessed (strings)."""
    import keras

    if not isinstance(x, dict):
        if model.preprocessor is None:
            raise TypeError(
                "fp8xla: predict on a model without a preprocessor takes "
                "{'token_ids': ..., 'padding_mask': ...}, got " + type(x).__name__)
        x = keras.utils.unpack_x_y_sample_weight(model.preprocessor(x))[0]
    return {k: np.asarray(v) for k, v in x.items() if v is not None}


def _class():
    """Defines and registers ``Fp8Gemma3CausalLM`` (Keras-Hub is imported lazily)."""
    global Fp8Gemma3CausalLM
    if "Fp8Gemma3CausalLM" in globals():
        return Fp8Gemma3CausalLM
    import keras
    import keras_hub

    @keras.saving.register_keras_serializable(package="fp8xla")
    class Fp8Gemma3CausalLM(keras_hub.models.Gemma3CausalLM):
        """A ``Gemma3CausalLM`` whose matmul weights are FP8 (fp8xla). ``from_preset`` of an
        FP8 preset returns one; ``save_to_preset`` writes one."""

        # Not Gemma3Backbone: Keras-Hub picks the task class of a plain Gemma3 preset among
        # the registered subclasses whose backbone_cls matches; this one must never be picked.
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
            from . import keras as fk
            return np.asarray(fk.logits(self, _model_inputs(self, x)))

        def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
            from . import keras as fk
            x = _model_inputs(self, x)
            n = len(next(iter(x.values())))
            size = batch_size or 32
            parts = [np.asarray(fk.logits(self, {k: v[i:i + size] for k, v in x.items()}))
                     for i in range(0, n, size)]
            return np.concatenate(parts) if parts else np.zeros((0,), np.float32)

        def compile(self, *args, **kwargs):
            super().compile(*args, **kwargs)
            state = getattr(self, "fp8", None)
            if state is not None:  # compile() drops the generate function: keep it FP8
                from . import keras as fk
                fk._install(self, state.config, state.weights)

    globals()["Fp8Gemma3CausalLM"] = Fp8Gemma3CausalLM
    return Fp8Gemma3CausalLM


def _build_deferred(build):
    """Builds a backbone with its variables uninitialized (no float32 values allocated)."""
    import keras
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
    from . import keras as fk

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
        config = fk.StaticQuantConfig(**h["config"])
        qweights = {}
        for e in h["quantized"]:
            i = e["index"]
            v = trainable[i]
            _check_shape(path, v, e["codes"]["shape"], e["path"])
            codes = r.read(e["codes"], e["path"]).view(np.dtype(e["fp8_dtype"]))
            w_scale = e["w_scale"]
            if isinstance(w_scale, dict):
                w_scale = r.read(w_scale, e["path"] + " (weight scale)")
            qweights[i] = fk.QuantizedWeight(i, v.path, codes, w_scale, e["channel_dim"],
                                             e["a_scale"])
            v._initializer = _raise_on_value(v.path)
            seen.add(id(v))
    missing = [v.path for v in model.variables if id(v) not in seen and v._value is None]
    if missing:
        raise PresetError(f"fp8xla: weights file {path} has no value for {missing[:5]}")
    fk._install(model, config, qweights)
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
    import keras
    import keras_hub
    from keras_hub.src.utils.preset_utils import KerasPresetSaver

    if getattr(model, "fp8", None) is None:
        raise ValueError("fp8xla.save: the model is not quantized by fp8xla "
                         "(use fp8xla.keras.quantize_model first)")
    if not isinstance(model, keras_hub.models.Gemma3CausalLM):
        raise NotImplementedError(f"fp8xla.save: saving {type(model).__name__} is not "
                                  "supported (Gemma3CausalLM only)")
    cls = _class()
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
                    registered_name=keras.saving.get_registered_name(cls))
        with open(os.path.join(tmp, TASK_FILE), "w") as f:
            json.dump(task, f, indent=4)
        if model.preprocessor is not None:
            model.preprocessor.save_to_preset(tmp)
        write_weights_file(os.path.join(tmp, WEIGHTS_FILE), model)
        index = {"metadata": {"format": "fp8xla weights", "format_version": FORMAT_VERSION},
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
    import keras_hub
    from keras_hub.src.utils.preset_utils import get_preset_loader

    preset_dir = os.fspath(preset_dir)
    if not os.path.isdir(preset_dir):
        raise PresetError(f"fp8xla.load: preset directory {preset_dir} does not exist")
    for name in (CONFIG_FILE, TASK_FILE, INDEX_FILE, WEIGHTS_FILE):
        p = os.path.join(preset_dir, name)
        if not os.path.isfile(p):
            what = ("the fp8xla weights file" if name == WEIGHTS_FILE else
                    "the weights index" if name == INDEX_FILE else name)
            raise PresetError(f"fp8xla.load: {p} is missing ({what}); {preset_dir} is not "
                              "a complete fp8xla preset")
    cls = _class()
    with open(os.path.join(preset_dir, TASK_FILE)) as f:
        name = json.load(f).get("registered_name")
    if name != "fp8xla>" + cls.__name__:
        raise PresetError(f"fp8xla.load: {os.path.join(preset_dir, TASK_FILE)} names "
                          f"{name!r}, not an fp8xla FP8 model")
    loader = get_preset_loader(preset_dir)
    model = loader.load_task(cls, load_weights=True, load_task_weights=True, **kwargs)
    if getattr(model, "fp8", None) is None:
        raise PresetError(f"fp8xla.load: {preset_dir} did not load as an FP8 model")
    return model


def is_fp8_preset(preset_dir) -> bool:
    """Whether ``preset_dir`` holds an fp8xla weights file (an FP8 preset)."""
    return os.path.isfile(os.path.join(os.fspath(preset_dir), WEIGHTS_FILE))


def install_save_hook(model):
    """Makes ``model.save_to_preset`` of a model quantized in this process write an FP8
    preset (called by ``fp8xla.keras`` when it quantizes a model)."""
    import keras_hub

    if isinstance(model, keras_hub.models.Gemma3CausalLM) and not isinstance(
            model, _class()):
        def save_to_preset(preset_dir, max_shard_size=None):
            save(model, preset_dir)

        model.save_to_preset = save_to_preset


def register():
    """Registers ``fp8xla>Fp8Gemma3CausalLM`` with Keras if Keras-Hub is installed."""
    try:
        import keras_hub  # noqa: F401
    except ImportError:
        return
    _class()
