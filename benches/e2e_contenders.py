"""The contenders of the end-to-end benchmark (benches/e2e.py) and how each is built and loaded.

Every contender is measured as it would be deployed: a preparation process builds it from the
float32 model and saves it as a Keras-Hub preset, and the measuring process loads that preset
fresh, so its peak RSS holds only the deployed model, never the float32 model it was made from.
For float32 Keras, preparing only loads the model once (converting and caching it if needed).
The llama.cpp contenders (benches/e2e_llama.py) are prepared and measured their own way: a
GGUF instead of a preset, and a measuring process that holds llama.cpp only.

Heavy imports (JAX, Keras) happen inside the functions: the driver imports this module only
for the names and the availability checks, the workers (benches/e2e_worker.py) for the rest.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

#: What installs the optional Intel Neural Compressor contender.
INC_INSTALL_HINT = "pip install -r python_shim/requirements-inc.txt, or pip install 'fp8xla[inc]'"
#: What installs the optional llama.cpp contenders (e2e_llama.INSTALL_HINT says the same; this
#: module is imported without e2e_llama's numpy).
LLAMA_INSTALL_HINT = ("CMAKE_ARGS=\"-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF\" pip install -r "
                      "python_shim/requirements-llama.txt (builds llama.cpp from source)")
#: The one model the llama.cpp contenders can run: they quantize the GGUF it comes from.
LLAMA_MODEL = "gemma3_270m"


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    kind: str  # "float32" | "fp8xla" | "keras-int8" | "inc" | "llama-cpp"
    config: dict = field(default_factory=dict)  # quantization settings of the kind
    requires: str | None = None  # a module that must be importable, else the contender is skipped
    install_hint: str = ""
    in_default_run: bool = True  # run without --contenders (else only when named)

    @property
    def has_preset(self) -> bool:
        """Whether the preparation process saves a preset that the measuring process loads
        (float32's preparation only makes sure the model is converted and cached, so that
        its measured loading never includes a first-time conversion)."""
        return self.kind != "float32"

    def missing_requirement(self, model: str | None = None) -> str | None:
        """Why this contender cannot run in this Python environment (or on ``model``, the
        benchmark's model), or None."""
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return f"{self.requires} is not installed ({self.install_hint})"
        if self.kind == "llama-cpp" and model is not None and model != LLAMA_MODEL:
            return f"llama.cpp runs the GGUF of the default model {LLAMA_MODEL} only, not {model}"
        return None


CONTENDERS = [
    Contender("float32", "float32 Keras (XLA)", "float32"),
    Contender("fp8xla-e4m3", "fp8xla e4m3 w+a", "fp8xla",
              {"weight_dtype": "fp8_e4m3", "activation_dtype": "fp8_e4m3"}),
    Contender("fp8xla-e4m3-wonly", "fp8xla e4m3 weight-only", "fp8xla",
              {"weight_dtype": "fp8_e4m3", "activation_dtype": None}),
    # The FP8 KV cache: for long contexts (--prompt-tokens 4096). Its perplexity here is the
    # forward pass's, which has no cache (the cache's own effect: docs/quality.md).
    Contender("fp8xla-e4m3-kv8", "fp8xla e4m3 w+a, FP8 KV cache", "fp8xla",
              {"weight_dtype": "fp8_e4m3", "activation_dtype": "fp8_e4m3",
               "kv_cache_dtype": "fp8_e4m3"}, in_default_run=False),
    Contender("fp8xla-e5m2", "fp8xla e5m2 w+a", "fp8xla",
              {"weight_dtype": "fp8_e5m2", "activation_dtype": "fp8_e5m2"}),
    # GPTQ rounding (docs/quality.md), calibrated like the others on the CLI's prompts
    Contender("fp8xla-e4m3-gptq-wonly", "fp8xla e4m3 GPTQ weight-only", "fp8xla",
              {"weight_dtype": "fp8_e4m3", "activation_dtype": None, "rounding": "gptq"}),
    Contender("fp8xla-e4m3-gptq", "fp8xla e4m3 GPTQ w+a", "fp8xla",
              {"weight_dtype": "fp8_e4m3", "activation_dtype": "fp8_e4m3", "rounding": "gptq"}),
    Contender("fp8xla-e4m3-gptq-dynamic", "fp8xla e4m3 GPTQ w+a dynamic", "fp8xla",
              {"weight_dtype": "fp8_e4m3", "activation_dtype": "fp8_e4m3", "rounding": "gptq",
               "dynamic": True}),
    # INC's JAX StaticQuantConfig defaults: e4m3fn weights (per tensor) and activations.
    Contender("inc-fp8", "INC FP8 e4m3 w+a", "inc",
              {"weight_dtype": "fp8_e4m3", "activation_dtype": "fp8_e4m3"},
              requires="neural_compressor", install_hint=INC_INSTALL_HINT),
    Contender("keras-int8", "Keras int8 (model.quantize)", "keras-int8"),
    # llama.cpp on the GGUF the default model comes from (benches/e2e_llama.py)
    Contender("llama-cpp-q8_0", "llama.cpp Q8_0", "llama-cpp", {"ftype": "q8_0"},
              requires="llama_cpp", install_hint=LLAMA_INSTALL_HINT),
    Contender("llama-cpp-f32", "llama.cpp F32", "llama-cpp", {"ftype": "f32"},
              requires="llama_cpp", install_hint=LLAMA_INSTALL_HINT),
]

BY_KEY = {c.key: c for c in CONTENDERS}


# ---------------------------------------------------------------------------------------------
# Preparation (in the preparation process)


def prepare(contender: Contender, model, preset_dir: str, calib_max_length: int,
            gptq_calib_passages: int = 75) -> dict:
    """Quantizes the float32 ``model`` as ``contender`` says and saves it to ``preset_dir``.
    Returns notes for the results (what was done, how long quantizing took).

    GPTQ contenders calibrate as ``fp8xla quantize --rounding gptq`` does: on
    ``gptq_calib_passages`` 256-token passages of Python's documentation
    (:func:`fp8xla.calibration.python_doc_passages`)."""
    import time

    from fp8xla.calibration import calibration_for, prompt_calibration

    t0 = time.perf_counter()
    if contender.kind == "fp8xla":
        from fp8xla.keras import DynamicQuantConfig, StaticQuantConfig, quantize_model

        settings = dict(contender.config)
        kind = DynamicQuantConfig if settings.pop("dynamic", False) else StaticQuantConfig
        config = kind(**settings)
        model = quantize_model(model, config, calibration_for(config, calib_max_length,
                                                              gptq_calib_passages))
    elif contender.kind == "keras-int8":
        model.quantize("int8")
    elif contender.kind == "inc":
        from neural_compressor.jax import StaticQuantConfig, quantize_model

        model = quantize_model(model, StaticQuantConfig(**contender.config),
                               prompt_calibration(max_length=calib_max_length))
    else:
        raise ValueError(f"contender {contender.key} has nothing to prepare")
    quantize_seconds = time.perf_counter() - t0
    model.save_to_preset(preset_dir)
    return {"quantize_seconds": quantize_seconds, "preset_bytes": _dir_bytes(preset_dir)}


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# ---------------------------------------------------------------------------------------------
# Loading (in the measuring process)


def load(contender: Contender, model_name: str, preset_dir: str | None):
    """The deployed contender: the float32 model, or the preset its preparation saved."""
    from fp8xla import models

    if contender.kind == "float32":
        return models.load_model(model_name, progress=False)
    if contender.kind == "fp8xla":
        from fp8xla import keras as fk

        return fk.load(preset_dir)
    if contender.kind == "keras-int8":
        # Keras-Hub rebuilds the layers with the int8 dtype policy saved in the preset and
        # loads the int8 kernels into them: no float32 copy of the quantized weights.
        return models.Gemma3CausalLM.from_preset(preset_dir)
    if contender.kind == "inc":
        import neural_compressor.jax  # noqa: F401  (registers INC's Keras classes)

        return models.Gemma3CausalLM.from_preset(preset_dir)
    raise ValueError(f"unknown contender kind {contender.kind!r}")
