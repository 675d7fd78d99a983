"""The quality probes' transforms (benches/smoothquant_probe.py, benches/kv_cache_quality.py):
SmoothQuant's migration keeps the float model's function and balances activation and weight
maxima as its formula says; the Hadamard key rotation is orthonormal and does what it is for."""
import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("keras_hub")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benches"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kv_cache_quality  # noqa: E402
import smoothquant_probe  # noqa: E402
from test_keras_tiny import prompts, tiny_gemma3  # noqa: E402

SITES = ("query/kernel", "ffw_gating/kernel", "ffw_linear/kernel")


def _calib(batch):
    def calib(model):
        model.generate(batch, max_length=12, stop_token_ids=None)
    return calib


def _maxima(model, calib):
    paths = [v.path for v in model.trainable_variables if v.path.endswith(SITES)]
    return smoothquant_probe.channel_maxima(model, calib, paths)


def test_smoothing_keeps_the_function_and_balances_maxima():
    model = tiny_gemma3()
    batch = prompts(np.random.default_rng(0), 4)
    calib = _calib(batch)
    inputs = {"token_ids": batch["token_ids"], "padding_mask": batch["padding_mask"]}
    before = np.asarray(model.backbone(inputs))
    x_max = _maxima(model, calib)
    smoothquant_probe.smooth(model, x_max, alpha=0.5)
    after = np.asarray(model.backbone(inputs))
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5 * np.abs(before).max())

    # alpha 0.5: afterwards each channel's activation maximum equals its weight rows' maximum
    # (both sqrt(x_max * w_max)); the activations are measured anew on the smoothed model
    x_new = _maxima(model, calib)
    for block in model.backbone.transformer_layers:
        att = block.attention
        w_rows = np.max([np.abs(np.asarray(layer.kernel.value)).max(axis=(0, 2))
                         for layer in (att.query_dense, att.key_dense, att.value_dense)],
                        axis=0)
        np.testing.assert_allclose(x_new[att.query_dense.kernel.path], w_rows, rtol=1e-4)
        w_rows = np.abs(np.asarray(block.ffw_linear.kernel.value)).max(axis=1)
        np.testing.assert_allclose(x_new[block.ffw_linear.kernel.path], w_rows, rtol=1e-4)
        # and the spread of the activation maxima shrinks (outliers moved into the weights)
        old = x_max[block.gating_ffw.kernel.path]
        new = x_new[block.gating_ffw.kernel.path]
        assert new.max() / new.min() < old.max() / old.min()


def test_channel_maxima_refuses_weights_calibration_never_reached():
    model = tiny_gemma3()
    with pytest.raises(RuntimeError, match="never reached"):
        smoothquant_probe.channel_maxima(model, lambda m: None,
                                         ["decoder_block_0/attention/query/kernel"])


def test_hadamard_is_orthonormal_and_refuses_other_sizes():
    for n in (1, 2, 16, 256):
        h = kv_cache_quality.hadamard(n)
        np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
        np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=1e-6)
    for n in (0, 3, 12):
        with pytest.raises(ValueError, match="power of two"):
            kv_cache_quality.hadamard(n)


def test_key_rotation_shrinks_the_score_error_of_aligned_outlier_channels():
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    q = rng.normal(size=(500, 64)).astype(np.float32)
    k = rng.normal(size=(500, 64)).astype(np.float32)
    q[:, :2] *= 12  # the same few large channels in queries and keys, as RoPE's slow ones
    k[:, :2] *= 12
    h = kv_cache_quality.hadamard(64)
    exact = np.einsum("nd,nd->n", q.astype(np.float64), k.astype(np.float64))
    plain = np.asarray(kv_cache_quality.qdq_rows(jnp.asarray(k), "fp8_e4m3"))
    rotated = np.asarray(kv_cache_quality.qdq_rows(jnp.asarray(k @ h), "fp8_e4m3")) @ h
    err_plain = np.sqrt(np.mean((np.einsum("nd,nd->n", q, plain) - exact) ** 2))
    err_rotated = np.sqrt(np.mean((np.einsum("nd,nd->n", q, rotated) - exact) ** 2))
    assert err_rotated < 0.5 * err_plain
    # rotating back restores the keys up to FP8 rounding (e4m3: relative step 1/8)
    assert np.max(np.abs(rotated - k)) < np.max(np.abs(k @ h)) / 8


def test_kv_spec_parsing():
    assert kv_cache_quality.parse_kv("fp8_e4m3") == ("fp8_e4m3", "kv", None)
    assert kv_cache_quality.parse_kv("fp8_e4m3:v") == ("fp8_e4m3", "v", None)
    assert kv_cache_quality.parse_kv("fp8_e5m2:k+hk") == ("fp8_e5m2", "k", "hk")
    assert kv_cache_quality.parse_kv("fp8_e4m3+mk") == ("fp8_e4m3", "kv", "mk")
    assert kv_cache_quality.parse_kv("fp8_e4m3+sk4") == ("fp8_e4m3", "kv", "sk4")
    assert kv_cache_quality.parse_kv("fp8_e4m3:k+ok") == ("fp8_e4m3", "k", "ok")
    for bad in ("fp8_e4m3:x", "int8", "fp8_e4m3+hv", "fp8_e4m3:k+", "fp8_e4m3+sk"):
        with pytest.raises(SystemExit, match="unknown --kv entry"):
            kv_cache_quality.parse_kv(bad)


def test_least_squares_key_scales_never_store_a_row_worse():
    import jax.numpy as jnp

    rng = np.random.default_rng(2)
    scales = rng.uniform(0.01, 50, size=(300, 1, 1))
    k = (rng.normal(size=(300, 1, 64)) * scales).astype(np.float32)
    k[0] = 0  # an all-zero row stays zero
    plain = np.asarray(kv_cache_quality.qdq_rows(jnp.asarray(k), "fp8_e4m3"))
    best = np.asarray(kv_cache_quality.qdq_rows_least_squares(jnp.asarray(k), "fp8_e4m3"))
    err_plain = np.sum((plain.astype(np.float64) - k) ** 2, axis=-1)
    err_best = np.sum((best.astype(np.float64) - k) ** 2, axis=-1)
    assert np.all(best[0] == 0)
    assert np.all(err_best <= err_plain * (1 + 1e-6))
    assert err_best.sum() < 0.9 * err_plain.sum()
    # a widened scale moves each row's largest value by at most one e4m3 step (1/8 relative)
    assert np.all(np.abs(np.abs(best).max(-1) - np.abs(k).max(-1)) <= np.abs(k).max(-1) / 8)
