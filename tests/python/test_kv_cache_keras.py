"""`kv_cache_dtype` on a tiny random-weight Keras-Hub Gemma3: the FP8 generate step with an
FP8 KV cache gives the tokens of stock generate() on fake-quantized weights whose decode
attention reads every cache row QDQ'd with its own scale (positions from the prompt's first to
the last, past the sliding window); the option survives save and load."""
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras")
keras_hub = pytest.importorskip("keras_hub")

import jax.numpy as jnp  # noqa: E402

import fp8xla.keras as fk  # noqa: E402
from fp8xla import ops  # noqa: E402
from fp8xla.keras import StaticQuantConfig, quantize_model  # noqa: E402
from test_keras_tiny import (  # noqa: E402
    compiled_generate_hlo, fake_quantized_copy, prompts, tiny_gemma3)

LENGTH = 24  # the tiny model's sliding window is 8: decode positions 5..23 pass it


def qdq_rows(x, fmt):
    """Each row (last dim) of `x` through FP8 with the scale amax(finite |row|) / max, in
    jax.numpy (XLA's own conversion to float8; not fp8xla)."""
    dtype, m = ops.fp8_dtype(fmt), np.float32(ops.max_of(fmt))
    amax = jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0), axis=-1, keepdims=True)
    s = amax / m
    s = jnp.where(s > 0, s, jnp.float32(1))
    return jnp.clip(x / s, -m, m).astype(dtype).astype(jnp.float32) * s


def read_caches_through_fp8(ref, fmt):
    """Makes `ref`'s decode steps (one query position) attend over QDQ'd caches; the
    prefill attends over the float keys and values, as fp8xla's prefill does."""
    for block in ref.backbone.transformer_layers:
        att = block.attention
        plain = att._compute_attention

        def compute(q, k, v, attention_mask, *args, _plain=plain, **kwargs):
            if q.shape[1] == 1:
                k, v = qdq_rows(k, fmt), qdq_rows(v, fmt)
            return _plain(q, k, v, attention_mask, *args, **kwargs)

        att._compute_attention = compute


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_cache_generate_equals_fake_quant_reference(fmt, rng):
    model = tiny_gemma3()
    quantize_model(model, StaticQuantConfig(activation_dtype=None, kv_cache_dtype=fmt))
    batch = prompts(rng, 16, length=LENGTH, filled=5)
    out = model.generate(batch, max_length=LENGTH, stop_token_ids=None)
    got = np.asarray(out["token_ids"])
    assert np.asarray(out["padding_mask"]).all()  # generated up to the last position
    hlo = compiled_generate_hlo(model, batch)
    # 2 layers x (key, value): each quantized at loop entry and at each write
    assert hlo.count('custom_call_target="fp8xla_quantize_rows"') == 8
    hlo_type = {"fp8_e4m3": "f8e4m3fn", "fp8_e5m2": "f8e5m2"}[fmt]
    assert f"{hlo_type}[16,{LENGTH},1,16]" in hlo  # the caches as the loop carries them
    plain = fake_quantized_copy(model, model)
    float_cache = np.asarray(plain.generate(batch, max_length=LENGTH,
                                            stop_token_ids=None)["token_ids"])
    ref = fake_quantized_copy(model, model)  # a fresh one: generate() traces it anew
    read_caches_through_fp8(ref, fmt)
    want = np.asarray(ref.generate(batch, max_length=LENGTH, stop_token_ids=None)["token_ids"])
    np.testing.assert_array_equal(got, want)
    print(f"{fmt}: {int((float_cache != want).sum())} of {want[:, 5:].size} tokens differ "
          "from the float32 cache")


def test_the_option_is_saved_and_loaded(rng, tmp_path, monkeypatch):
    model = tiny_gemma3()
    config = StaticQuantConfig(activation_dtype=None, kv_cache_dtype="fp8_e5m2")
    quantize_model(model, config)
    batch = prompts(rng, 2, length=LENGTH, filled=5)
    want = np.asarray(model.generate(batch, max_length=LENGTH, stop_token_ids=None)["token_ids"])
    fk.save(model, str(tmp_path / "p"))
    loaded = fk.load(str(tmp_path / "p"))
    assert loaded.fp8.config.kv_cache_dtype == "fp8_e5m2"
    # the loaded model's generate step is rewritten with the FP8 cache
    from fp8xla import graph

    seen = []
    quantize_exported = graph.quantize_exported
    monkeypatch.setattr(graph, "quantize_exported",
                        lambda exp, opts: seen.append(opts) or quantize_exported(exp, opts))
    got = np.asarray(loaded.generate(batch, max_length=LENGTH, stop_token_ids=None)["token_ids"])
    np.testing.assert_array_equal(got, want)
    assert [o.get("kv_cache") for o in seen] == ["e5m2"]
