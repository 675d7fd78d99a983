"""fp8xla.graph: instrument, calibrate and quantize exported JAX functions, then run them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp8xla import graph, ops

import fp8_reference as ref


def export(f, *shapes):
    specs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return jax.export.export(jax.jit(f), platforms=["cpu"])(*specs)


def mlp(x, w1, b1, w2):
    return jax.nn.relu(x @ w1 + b1) @ w2


@pytest.fixture
def mlp_case(rng):
    x = rng.standard_normal((3, 5, 16)).astype(np.float32)
    w1 = (rng.standard_normal((16, 32)) * 0.3).astype(np.float32)
    b1 = rng.standard_normal(32).astype(np.float32)
    w2 = (rng.standard_normal((32, 8)) * 0.3).astype(np.float32)
    exp = export(mlp, x.shape, w1.shape, b1.shape, w2.shape)
    return exp, (x, w1, b1, w2)


def test_calibrate_records_each_matmul_activation(mlp_case, rng):
    exp, (x, w1, b1, w2) = mlp_case
    x2 = x * 3
    stats, sites = graph.calibrate(exp, [(x, w1, b1, w2), (x2, w1, b1, w2)], weights=[1, 3])
    by_arg = {s["arg"]: s["site"] for s in sites["sites"]}
    assert set(by_arg) == {1, 3}
    assert stats[by_arg[1]].amax == pytest.approx(np.abs(x2).max(), rel=1e-6)
    h = np.maximum(np.concatenate([x, x2]) @ w1 + b1, 0)
    assert stats[by_arg[3]].amax == pytest.approx(np.abs(h).max(), rel=1e-5)


def test_calibrate_without_running_is_an_error(mlp_case):
    exp, _ = mlp_case
    with pytest.raises(RuntimeError, match="no calibration site was reached"):
        graph.calibrate(exp, [], weights=[1, 3])


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("act", [False, True])
def test_quantized_mlp_equals_fake_quant(mlp_case, fmt, act):
    exp, (x, w1, b1, w2) = mlp_case
    q1, s1 = ops.quantize_weight(w1, fmt)
    q2, s2 = ops.quantize_weight(w2, fmt)
    a1 = float(np.abs(x).max()) / ref.MAX[fmt] if act else None
    h = np.maximum(x @ w1 + b1, 0)
    a2 = float(np.abs(h).max()) / ref.MAX[fmt] if act else None
    weights = [{"arg": 1, "format": fmt, "w_scale": s1}, {"arg": 3, "format": fmt, "w_scale": s2}]
    if act:
        weights[0]["a_scale"], weights[1]["a_scale"] = a1, a2
    qexp, report = graph.quantize_exported(exp, {"weights": weights})
    assert len(report["matmuls"]) == 2
    assert qexp.in_avals[1].dtype == ref.DTYPES[fmt] and qexp.in_avals[3].dtype == ref.DTYPES[fmt]
    got = np.asarray(jax.jit(qexp.call)(x, q1, b1, q2))

    def fq(v, s):
        return ref.qdq(v, s, fmt) if s else v

    hw = np.maximum(fq(x, a1) @ (q1.astype(np.float32) * np.float32(s1)) + b1, 0)
    want = fq(hw, a2) @ (q2.astype(np.float32) * np.float32(s2))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_per_channel_scales(mlp_case):
    exp, (x, w1, b1, w2) = mlp_case
    q1, s1 = ops.quantize_weight(w1, "e4m3fn", channel_axes=1)
    q2, s2 = ops.quantize_weight(w2, "e4m3fn", channel_axes=1)
    qexp, _ = graph.quantize_exported(exp, {"weights": [
        {"arg": 1, "format": "e4m3fn", "w_scale": s1.tolist(), "channel_dim": 1},
        {"arg": 3, "format": "e4m3fn", "w_scale": s2.tolist(), "channel_dim": 1},
    ]})
    got = np.asarray(jax.jit(qexp.call)(x, q1, b1, q2))
    hw = np.maximum(x @ (q1.astype(np.float32) * s1) + b1, 0)
    want = hw @ (q2.astype(np.float32) * s2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_quantized_export_serializes_and_runs_after_round_trip(mlp_case):
    exp, (x, w1, b1, w2) = mlp_case
    q1, s1 = ops.quantize_weight(w1)
    q2, s2 = ops.quantize_weight(w2)
    qexp, _ = graph.quantize_exported(exp, {"weights": [
        {"arg": 1, "format": "e4m3fn", "w_scale": s1}, {"arg": 3, "format": "e4m3fn", "w_scale": s2}]})
    back = jax.export.deserialize(qexp.serialize())
    np.testing.assert_array_equal(np.asarray(back.call(x, q1, b1, q2)),
                                  np.asarray(qexp.call(x, q1, b1, q2)))


def test_bad_options_are_clear_errors(mlp_case):
    exp, _ = mlp_case
    with pytest.raises(graph.RewriteError, match="quantize"):
        graph.quantize_exported(exp, {"weights": [{"arg": 17, "format": "e4m3fn", "w_scale": 1.0}]})
    with pytest.raises(graph.RewriteError):
        graph.quantize_exported(exp, {"weights": [{"arg": 1, "format": "e4m3", "w_scale": 1.0}]})
    with pytest.raises(graph.RewriteError, match="parser"):
        graph.run_pass("quantize", "module {", {"weights": []})
    with pytest.raises(graph.RewriteError, match="unknown pass"):
        graph.run_pass("nope", graph.module_text(exp), {})
