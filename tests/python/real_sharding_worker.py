"""The real Gemma 3 270M under keras.distribution.ModelParallel (batch 1 x model 2) on 2 CPU
devices (JAX_NUM_CPU_DEVICES=2, set by the caller): it quantizes (e4m3 weights and
activations, calibrated), its one KV head's k/v and KV cache stay replicated, and it
generates."""
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402

from fp8xla import models  # noqa: E402
from fp8xla.keras import StaticQuantConfig, gemma3_layout_map, quantize_model  # noqa: E402
from fp8xla.keras.distribution import kv_cache_shardings  # noqa: E402

assert len(jax.devices()) == 2
preset = models.gemma3_270m_preset(progress=False)
import json  # noqa: E402

config = json.loads((preset / "config.json").read_text())["config"]
assert config["num_key_value_heads"] == 1
mesh = keras.distribution.DeviceMesh((1, 2), ("batch", "model"), keras.distribution.list_devices())
dist = keras.distribution.ModelParallel(layout_map=gemma3_layout_map(mesh, config),
                                        batch_dim_name="batch")
with dist.scope():
    model = keras.saving.get_registered_object("keras_hub>Gemma3CausalLM").from_preset(
        str(preset))
    prompts = ["The capital of France is", "Describe the city of Berlin?"]
    model = quantize_model(
        model, StaticQuantConfig(weight_dtype="fp8_e4m3", activation_dtype="fp8_e4m3"),
        calib_function=lambda m: m.generate(prompts, max_length=32))
    # The base model names Paris after "... the city of" (in float32 too; see
    # test_real_model_fp8.py).
    text = model.generate("The capital of France is the city of", max_length=30)
    # the constraint the generate export puts on each layer's (key, value) cache
    cache = kv_cache_shardings(model)
print(repr(text))
for i, q in model.fp8.weights.items():
    spec = tuple(model.fp8.codes[i].sharding.spec)
    if "/key/" in q.path or "/value/" in q.path:
        assert "model" not in spec, (q.path, spec)
    if "/query/" in q.path or "ffw" in q.path:
        assert "model" in spec, (q.path, spec)
assert len(cache) == config["num_layers"], len(cache)
for kv in cache:
    for s in kv:
        assert s.mesh.size == 2 and s.is_fully_replicated, s
assert "Paris" in text, text
print("ok real")
