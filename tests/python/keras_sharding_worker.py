"""A tiny Keras-Hub Gemma3 under keras.distribution.ModelParallel (batch 1, model 2) on 2 CPU
devices (JAX_NUM_CPU_DEVICES=2, set by the caller): FP8 greedy tokens identical to the
single-device FP8 model, and the decode loop's calls on the KV cache run on each device's
heads of it (2 KV heads) or on the whole cache (1 KV head: replicated).
`python keras_sharding_worker.py KV_HEADS`."""
import os
import re
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import fp8xla.keras as fp8xla_keras  # noqa: E402
from fp8xla import graph, runtime  # noqa: E402
from fp8xla.keras import StaticQuantConfig, gemma3_layout_map, quantize_model  # noqa: E402

assert len(jax.devices()) == 2
KV_HEADS = int(sys.argv[1])


def tiny_gemma3():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Gemma3Backbone(
        vocabulary_size=256, image_size=16, num_layers=2, num_query_heads=4,
        num_key_value_heads=KV_HEADS, hidden_dim=32, intermediate_dim=64, head_dim=16,
        use_post_ffw_norm=True, use_post_attention_norm=True,
        use_sliding_window_attention=True, sliding_window_size=8, vision_encoder=None)
    for v in backbone.trainable_variables:
        if len(v.shape) >= 2:
            v.assign(v.value * 4)
    model = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
    model.compile(sampler=keras_hub.samplers.GreedySampler())
    return model


def prompts():
    rng = np.random.default_rng(5)
    ids = np.zeros((1, 16), np.int32)
    mask = np.zeros((1, 16), bool)
    ids[:, :5] = rng.integers(3, 256, (1, 5))
    mask[:, :5] = True
    return {"token_ids": ids, "padding_mask": mask}


def fp8(model):
    config = StaticQuantConfig(weight_dtype="fp8_e4m3", activation_dtype="fp8_e4m3",
                               granularity="per_channel")
    return quantize_model(model, config,
                          calib_function=lambda m: m.generate(prompts(), stop_token_ids=None))


quantize_exported = graph.quantize_exported
reports = []


def recording(exp, options):
    # The tiny caches are far below the size at which the attention products become
    # fp8xla_dot_f32 by default; lowered so that the decode loop has them (both models).
    q, report = quantize_exported(exp, dict(options, decode_dots_min_bytes=1))
    reports.append(report)
    return q, report


graph.quantize_exported = recording
single = fp8(tiny_gemma3())
want = single.generate(prompts(), stop_token_ids=None)["token_ids"]
single_logits = np.asarray(single.predict_on_batch(prompts()))

mesh = keras.distribution.DeviceMesh((1, 2), ("batch", "model"), keras.distribution.list_devices())
reports.clear()
generate_runs = []
graph_cache_get = runtime.GraphCache.get


def recording_get(self, inputs, stop_token_ids=None):
    run = graph_cache_get(self, inputs, stop_token_ids)
    if self.kind != "generate":
        return run

    def call(*args):
        generate_runs.append((run, args))
        return run(*args)

    return call


layout = gemma3_layout_map(mesh, tiny_gemma3().backbone)
dist = keras.distribution.ModelParallel(layout_map=layout, batch_dim_name="batch")
with dist.scope():
    model = tiny_gemma3()
    q = model.backbone.get_layer("decoder_block_0").attention.query_dense.kernel
    assert q.value.sharding.spec[0] == "model", q.value.sharding
    model = fp8(model)
    runtime.GraphCache.get = recording_get
    got = model.generate(prompts(), stop_token_ids=None)["token_ids"]
    runtime.GraphCache.get = graph_cache_get
    run, args = generate_runs[-1]
    hlo = run.lower(*args).compile().as_text()
    logits = np.asarray(model.predict_on_batch(prompts()))

np.testing.assert_array_equal(got, want)
np.testing.assert_allclose(logits, single_logits, rtol=1e-4, atol=1e-4)
# The FP8 codes take their weights' layout: each device holds its half.
paths = {q.path: i for i, q in model.fp8.weights.items()}
for path, i in paths.items():
    codes = model.fp8.codes[i]
    spec = tuple(codes.sharding.spec)
    local = codes.addressable_shards[0].data.shape
    split = "model" in spec
    kv = "key" in path or "value" in path
    if "query" in path or "ffw" in path or "embeddings" in path or (kv and KV_HEADS % 2 == 0):
        assert split, (path, spec)
        assert np.prod(local) * 2 == np.prod(codes.shape), (path, local, codes.shape)
    if kv and KV_HEADS % 2:
        assert not split, (path, spec)
# Saved and loaded back under the distribution: the loaded codes are laid out the same.
with tempfile.TemporaryDirectory() as d:
    fp8xla_keras.save(model, d)
    with dist.scope():
        loaded = fp8xla_keras.load(d)
        again = loaded.generate(prompts(), stop_token_ids=None)["token_ids"]
    np.testing.assert_array_equal(again, want)
    for i, c in loaded.fp8.codes.items():
        assert c.sharding == model.fp8.codes[i].sharding, (i, c.sharding)
# The KV cache [batch 1, length 16, KV heads, head dim 16]: split on heads with 2 KV heads,
# whole with 1 (the key/value kernels are replicated then). Every update of the decode loop
# runs on the cache each device holds (so do its attention products where they became
# fp8xla_dot_f32: with 2 KV heads the heads dim sits between length and head dim, a layout
# fp8xla_dot_f32 does not take, and XLA partitions those products itself); no collective
# carries the whole cache. (Compiled HLO names the operands only: their shapes come from their
# defining lines.)
shape_of = dict(re.findall(r"^\s*(?:ROOT )?(%\S+) = (\S+?)(?:\{[^}]*\})? ", hlo, re.M))
whole = f"f32[1,16,{KV_HEADS},16]"
local = "f32[1,16,1,16]"
caches = {}
for target in ("fp8xla_update_slice", "fp8xla_dot_f32"):
    caches[target] = []
    for line in hlo.splitlines():
        if f'custom_call_target="{target}"' in line:
            operands = re.search(r"custom-call\(([^)]*)\)", line).group(1).split(", ")
            caches[target] += [shape_of.get(o, "") for o in operands
                               if shape_of.get(o, "").startswith("f32[1,16,")]
    assert set(caches[target]) <= {local}, (target, caches[target])
assert len(caches["fp8xla_update_slice"]) == 4, caches  # 2 layers x (key, value)
collectives = [line for line in hlo.splitlines() if whole in line and re.search(
    r"\b(all-gather|all-reduce|all-to-all|collective-permute)(-start)?\(", line)]
assert not collectives, collectives
shards = sum(h["kind"] == "shard" for r in reports for h in r["handled"])
assert shards > 0, "no fp8xla call was sharded"
print("tokens", got.tolist())
print("cache calls", {t: len(c) for t, c in caches.items()})
print("ok", KV_HEADS, "sharded calls", shards)
