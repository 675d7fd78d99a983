"""`a_dynamic`: fp8xla_matmul quantizes each activation row (one token's inputs) with its own
run-time scale amax / max, against a numpy/ml_dtypes float64 reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp8_reference as ref
from fp8xla import graph, ops


def export(f, *shapes):
    specs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return jax.export.export(jax.jit(f), platforms=["cpu"])(*specs)


def per_row_qdq(x, fmt):
    """Reference: rows over the last axis, scale amax(finite) / max (1 if 0)."""
    x = np.asarray(x, np.float32)
    finite = np.where(np.isfinite(x), np.abs(x), 0)
    amax = finite.max(axis=-1, keepdims=True, initial=0.0)
    scale = np.where(amax > 0, amax / np.float32(ref.MAX[fmt]), 1).astype(np.float32)
    return ref.quantize(x / scale, 1.0, fmt).astype(np.float32) * scale


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("x_shape, k, n", [((3, 5, 33), 33, 7), ((1, 1, 16), 16, 1),
                                          ((2, 9), 9, 300)])
def test_dynamic_rows_equal_reference(fmt, x_shape, k, n, rng):
    x = (rng.standard_normal(x_shape) * rng.uniform(0.01, 100, x_shape[:-1] + (1,))).astype(
        np.float32)
    rows = x.reshape(-1, k)
    if len(rows) > 1:
        rows[0] = 0  # a row of zeros: scale 1
    w = (rng.standard_normal((k, n)) * 0.2).astype(np.float32)
    exp = export(lambda x, w: x @ w, x.shape, w.shape)
    codes, s = ops.quantize_weight(w, fmt, channel_axes=1)
    qexp, report = graph.quantize_exported(exp, {"weights": [
        {"arg": 1, "format": fmt, "w_scale": s.tolist(), "channel_dim": 1, "a_dynamic": True}]})
    assert report["matmuls"][0]["a_dynamic"] is True
    got = np.asarray(jax.jit(qexp.call)(x, codes))
    wq = codes.astype(np.float64) * s.astype(np.float64)
    want = per_row_qdq(x, fmt).astype(np.float64) @ wq
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5 * np.abs(want).max())
    if len(rows) < 3:
        return
    # and it is not the static per-tensor QDQ (rows of very different magnitude)
    static = ops.scale_for(float(np.abs(x).max()), fmt)
    want_static = ref.qdq(x, static, fmt).astype(np.float64) @ wq
    assert not np.allclose(got, want_static, rtol=2e-5, atol=1e-5 * np.abs(want).max())


def test_dynamic_with_static_scale_is_an_error(rng):
    exp = export(lambda x, w: x @ w, (2, 4), (4, 3))
    with pytest.raises(graph.RewriteError, match="either `a_scale` or `a_dynamic: true`"):
        graph.quantize_exported(exp, {"weights": [
            {"arg": 1, "format": "e4m3fn", "w_scale": 1.0, "a_scale": 0.5, "a_dynamic": True}]})
