"""Runs one sharding case on 2 CPU devices (JAX_NUM_CPU_DEVICES=2, set by the caller) and
checks it: results equal the single-device ones, the compiled HLO holds half-size FP8
operands, no all-gather of an FP8 operand and the expected number of all-reduces, and the
rewritten export survives serialize/deserialize. Exits non-zero (an AssertionError) on any
failure. Used by test_sharding.py: `python sharding_worker.py CASE`."""
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fp8xla import _library, graph, ops

assert len(jax.devices()) == 2, jax.devices()
MESH = Mesh(np.array(jax.devices()), ("model",))
RNG = np.random.default_rng(7)
CHECKS = [jax.export.DisabledSafetyCheck.custom_call(t) for t in _library.targets()]


def spec(shape, dtype, pspec):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(MESH, pspec))


def export_sharded(f, args, specs):
    """Exports `f` with sharded argument specs, runs `shard_calls` on its module, round-trips
    the result through serialize/deserialize."""
    exp = jax.export.export(jax.jit(f), disabled_checks=CHECKS)(*[
        spec(a.shape, a.dtype, s) for a, s in zip(args, specs)])
    text, report = graph.run_pass("shard_calls", graph.module_text(exp), {})
    exp = graph.with_module(exp, text)
    return jax.export.deserialize(exp.serialize()), text, report


def run_sharded(exp, args, specs):
    placed = [jax.device_put(a, NamedSharding(MESH, s)) for a, s in zip(args, specs)]
    run = jax.jit(exp.call)
    hlo = run.lower(*placed).compile().as_text()
    return np.asarray(run(*placed)), hlo


def check_hlo(hlo, fp8_shapes, all_reduces):
    """Each FP8 operand at its per-device shape, never gathered; `all_reduces` all-reduces."""
    for shape in fp8_shapes:
        txt = "f8e4m3fn[" + ",".join(str(d) for d in shape) + "]"
        assert txt in hlo, f"no per-device FP8 operand {txt} in the compiled HLO"
    for line in hlo.splitlines():
        if "all-gather" in line:
            assert "f8e4m3fn" not in line.split("all-gather")[0], line
    n = len(re.findall(r"= \S+ all-reduce(?:-start)?\(", hlo))
    assert n == all_reduces, f"{n} all-reduces, expected {all_reduces}"


def case_matmul(layout):
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    w = RNG.standard_normal((64, 48)).astype(np.float32)
    codes, scales = ops.quantize_weight(w, channel_axes=1)
    pspec = {"replicated": P(), "n": P(None, "model"), "k": P("model", None)}[layout]

    def f(x, w, s):
        return ops.fp8_matmul(x, w, s)

    args = [x, codes, scales]
    specs = [P(), pspec, P()]
    exp, text, report = export_sharded(f, args, specs)
    got, hlo = run_sharded(exp, args, specs)
    want = np.asarray(jax.jit(f)(x, codes, scales))  # one device
    ref = x.astype(np.float64) @ (codes.astype(np.float64) * scales.astype(np.float64))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    if layout == "replicated":
        np.testing.assert_array_equal(got, want)
    else:
        # The kernels' blocking depends on the operand sizes, so the per-device product adds
        # in another order: equal to rounding. Each column half equals, bit for bit, the
        # single-device product on that half of the weight.
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    if layout == "n":
        for h in (slice(0, 24), slice(24, 48)):
            np.testing.assert_array_equal(
                got[:, h], np.asarray(jax.jit(f)(x, codes[:, h], scales[h])))
    assert ("sdy.manual_computation" in text) == (layout != "replicated"), text[:2000]
    local = {"replicated": (64, 48), "n": (64, 24), "k": (32, 48)}[layout]
    check_hlo(hlo, [local], 1 if layout == "k" else 0)


def case_quantize(layout):
    """The quantize pass on a float export with sharded weights: two products."""
    x = RNG.standard_normal((5, 32)).astype(np.float32)
    w1 = RNG.standard_normal((32, 64)).astype(np.float32)
    w2 = RNG.standard_normal((64, 16)).astype(np.float32)
    specs = {"replicated": [P(), P(), P()],
             "megatron": [P(), P(None, "model"), P("model", None)]}[layout]

    def f(x, w1, w2):
        return jnp.dot(jax.nn.relu(jnp.dot(x, w1)), w2)

    c1, s1 = ops.quantize_weight(w1, channel_axes=1)
    c2, s2 = ops.quantize_weight(w2)
    opts = {"weights": [
        {"arg": 1, "format": "e4m3fn", "w_scale": [float(v) for v in s1], "channel_dim": 1},
        {"arg": 2, "format": "e4m3fn", "w_scale": s2}]}
    exp = jax.export.export(jax.jit(f))(*[
        spec(a.shape, a.dtype, s) for a, s in zip((x, w1, w2), specs)])
    q, report = graph.quantize_exported(exp, opts)
    q = jax.export.deserialize(q.serialize())
    got, hlo = run_sharded(q, [x, c1, c2], specs)
    single = jax.export.export(jax.jit(f))(x, w1, w2)
    q1, _ = graph.quantize_exported(single, opts)
    want = np.asarray(jax.jit(q1.call)(x, c1, c2))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    d1 = c1.astype(np.float64) * s1.astype(np.float64)
    ref = np.maximum(x.astype(np.float64) @ d1, 0) @ (c2.astype(np.float64) * s2)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    kinds = [h["kind"] for h in report["handled"]]
    if layout == "megatron":
        assert kinds.count("shard") == 2, report["handled"]
        check_hlo(hlo, [(32, 32), (32, 16)], 1)
    else:
        assert "shard" not in kinds, report["handled"]
        check_hlo(hlo, [(32, 64), (64, 16)], 0)


def case_dot_f32(layout):
    """Attention scores over a KV cache split on heads (batching dim), on the cache length
    (free dim) or on the head dim (contracted: one all-reduce), or replicated."""
    q = RNG.standard_normal((4, 1, 16)).astype(np.float32)      # heads, rows, head dim
    k = RNG.standard_normal((4, 40, 16)).astype(np.float32)     # heads, cache length, head dim
    dn = (((2,), (2,)), ((0,), (0,)))

    def f(q, k):
        return ops.dot_f32(q, k, dn)

    pspec = {"replicated": P(), "heads": P("model"), "n": P(None, "model"),
             "k": P(None, None, "model")}[layout]
    specs = [P(), pspec]
    exp, text, _ = export_sharded(f, [q, k], specs)
    got, hlo = run_sharded(exp, [q, k], specs)
    want = np.asarray(jax.jit(f)(q, k))
    if layout == "k":
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, np.einsum("hrd,hld->hrl", q.astype(np.float64), k),
                               rtol=1e-5, atol=1e-5)
    assert ("sdy.manual_computation" in text) == (layout != "replicated")
    local = {"replicated": "f32[4,40,16]", "heads": "f32[2,40,16]", "n": "f32[4,20,16]",
             "k": "f32[4,40,8]"}[layout]
    calls = [line for line in hlo.splitlines()
             if "fp8xla_dot_f32" in line and "custom-call(" in line]
    assert calls and all(local in c for c in calls), (local, calls)
    check_hlo(hlo, [], 1 if layout == "k" else 0)


def case_update_slice_heads():
    cache = RNG.standard_normal((4, 10, 8)).astype(np.float32)
    row = RNG.standard_normal((4, 1, 8)).astype(np.float32)

    def f(cache, row, i):
        return ops.update_slice(cache, row, (jnp.int32(0), i, jnp.int32(0)))

    specs = [P("model"), P(), P()]
    i = np.int32(6)
    exp, text, _ = export_sharded(f, [cache, row, i], specs)
    got, hlo = run_sharded(exp, [cache, row, i], specs)
    want = cache.copy()
    want[:, 6:7, :] = row
    np.testing.assert_array_equal(got, want)
    assert "sdy.manual_computation" in text
    assert "f32[2,10,8]" in hlo
    check_hlo(hlo, [], 0)


def case_take(layout):
    table = RNG.standard_normal((30, 12)).astype(np.float32)
    codes, scale = ops.quantize_weight(table)
    idx = np.array([[0, 29, 14, 15, 7]], np.int32)

    def f(t, i):
        return ops.take(t, i, scale)

    pspec = {"replicated": P(), "vocab": P("model", None), "embed": P(None, "model")}[layout]
    specs = [pspec, P()]
    exp, text, _ = export_sharded(f, [codes, idx], specs)
    got, hlo = run_sharded(exp, [codes, idx], specs)
    np.testing.assert_array_equal(got, np.asarray(jax.jit(f)(codes, idx)))
    np.testing.assert_array_equal(got, codes.astype(np.float32)[idx] * np.float32(scale))
    local = {"replicated": (30, 12), "vocab": (15, 12), "embed": (30, 6)}[layout]
    check_hlo(hlo, [local], 1 if layout == "vocab" else 0)


def case_elementwise():
    """qdq on an activation split on rows: batch partitionable, each device its rows."""
    x = RNG.standard_normal((8, 6)).astype(np.float32)

    def f(x):
        return ops.qdq(x, 0.01) * 2

    specs = [P("model")]
    exp, text, report = export_sharded(f, [x], specs)
    got, hlo = run_sharded(exp, [x], specs)
    np.testing.assert_array_equal(got, np.asarray(jax.jit(f)(x)))
    calls = [line for line in hlo.splitlines() if "custom_call_target=\"fp8xla_qdq\"" in line]
    assert calls and all("f32[4,6]" in c for c in calls), calls
    assert "all-gather" not in hlo, hlo


def case_sharded_fp8_matmul():
    """ops.sharded_fp8_matmul (shard_map) on a column- and a row-split weight."""
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    w = RNG.standard_normal((64, 48)).astype(np.float32)
    codes, scales = ops.quantize_weight(w, channel_axes=1)
    ref = x.astype(np.float64) @ (codes.astype(np.float64) * scales.astype(np.float64))
    for pspec, reduces in ((P(None, "model"), 0), (P("model", None), 1)):
        wd = jax.device_put(codes, NamedSharding(MESH, pspec))
        sd = jax.device_put(scales, NamedSharding(MESH, P(pspec[1])))

        def f(x, w, s, pspec=pspec):
            return ops.sharded_fp8_matmul(x, w, s, mesh=MESH, w_spec=pspec)

        run = jax.jit(f)
        got = np.asarray(run(x, wd, sd))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got, np.asarray(jax.jit(ops.fp8_matmul)(x, codes, scales)),
                                   rtol=1e-6, atol=1e-6)
        local = (64, 24) if reduces == 0 else (32, 48)
        check_hlo(run.lower(x, wd, sd).compile().as_text(), [local], reduces)


def case_not_divisible():
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    codes, scale = ops.quantize_weight(RNG.standard_normal((8, 7)))

    def f(x, w):
        return ops.fp8_matmul(x, w, scale)

    try:
        export_sharded(f, [x, codes], [P(), P(None, "model")])
    except graph.RewriteError as e:
        msg = str(e)
        assert "dimension 1 of argument 1" in msg and "size 7" in msg and "2 parts" in msg, msg
        return
    except ValueError as e:  # jax refuses the uneven sharding itself
        assert "7" in str(e), e
        return
    raise AssertionError("no error for a dimension the mesh does not divide")


CASES = {
    "matmul_replicated": lambda: case_matmul("replicated"),
    "matmul_n": lambda: case_matmul("n"),
    "matmul_k": lambda: case_matmul("k"),
    "quantize_replicated": lambda: case_quantize("replicated"),
    "quantize_megatron": lambda: case_quantize("megatron"),
    "dot_f32_replicated": lambda: case_dot_f32("replicated"),
    "dot_f32_heads": lambda: case_dot_f32("heads"),
    "dot_f32_n": lambda: case_dot_f32("n"),
    "dot_f32_k": lambda: case_dot_f32("k"),
    "update_slice_heads": case_update_slice_heads,
    "take_replicated": lambda: case_take("replicated"),
    "take_vocab": lambda: case_take("vocab"),
    "take_embed": lambda: case_take("embed"),
    "elementwise": case_elementwise,
    "sharded_fp8_matmul": case_sharded_fp8_matmul,
    "not_divisible": case_not_divisible,
}

if __name__ == "__main__":
    CASES[sys.argv[1]]()
    print("ok", sys.argv[1])
