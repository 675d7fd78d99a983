"""`jax.vmap` over every public op of `fp8xla.ops` equals the loop over the examples (or, for a
batched static argument, raises an error naming the op), and every `ffi_call` in the package
states its `vmap_method`."""
import ast
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp8xla
from fp8xla import ops

B = 3  # examples per batch


def per_example(f, args, in_axes):
    """The results of `f` on each example, stacked: what `jax.vmap(f, in_axes)` must return."""
    outs = [jax.jit(f)(*(a if ax is None else np.take(np.asarray(a), i, axis=ax)
                         for a, ax in zip(args, in_axes)))
            for i in range(B)]
    return np.stack([np.asarray(o) for o in outs])


def check_vmap_equals_loop(f, args, in_axes):
    got = np.asarray(jax.jit(jax.vmap(f, in_axes=in_axes))(*args))
    want = per_example(f, args, in_axes)
    assert got.dtype == want.dtype and got.shape == want.shape, (got.shape, want.shape)
    # Bit for bit: the same handler runs on the same values either way.
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def fp8_codes(rng, shape, fmt="e4m3fn"):
    return np.asarray(rng.standard_normal(shape) * 20, np.float32).astype(ops.fp8_dtype(fmt))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantize(rng, dtype):
    x = jnp.asarray(rng.standard_normal((B, 5, 7)) * 30, dtype)
    check_vmap_equals_loop(lambda v: ops.quantize(v, 0.25, "e5m2"), (x,), (0,))


def test_dequantize(rng):
    q = fp8_codes(rng, (B, 4, 9))
    check_vmap_equals_loop(lambda v: ops.dequantize(v, 0.5, jnp.bfloat16), (q,), (0,))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_qdq(rng, dtype):
    x = jnp.asarray(rng.standard_normal((B, 130)) * 3, dtype)
    check_vmap_equals_loop(lambda v: ops.qdq(v, 0.01), (x,), (0,))
    # The batch on axis 1: vmap moves it to the front before the call.
    check_vmap_equals_loop(lambda v: ops.qdq(v, 0.01), (x.T,), (1,))


def test_observe_records_what_the_loop_records(rng):
    x = np.asarray(rng.standard_normal((B, 6, 10)), np.float32)
    x[1, 2, 3] = np.nan
    x[2, 0, 0] = 7.5
    f = lambda v: ops.observe(v, 4242)  # noqa: E731
    ops.reset_observer()
    got = np.asarray(jax.jit(jax.vmap(f))(x))
    batched = ops.observer_stats()[4242]
    ops.reset_observer()
    want = per_example(f, (x,), (0,))
    looped = ops.observer_stats()[4242]
    ops.reset_observer()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, x)
    assert batched == looped
    assert (batched.amax, batched.count, batched.nonfinite) == (7.5, x.size, 1)


@pytest.mark.parametrize("in_axes", [(None, 0), (0, 0), (0, None)])
def test_take(rng, in_axes):
    tables = fp8_codes(rng, (B, 6, 4))
    indices = rng.integers(-2, 9, (B, 5)).astype(np.int32)  # some out of range: clamped
    args = (tables if in_axes[0] == 0 else tables[0],
            indices if in_axes[1] == 0 else indices[0])
    check_vmap_equals_loop(lambda t, i: ops.take(t, i, 0.5), args, in_axes)


@pytest.mark.parametrize("in_axes", [(0, 0, 0), (None, 0, 0), (0, None, None)])
def test_update_slice(rng, in_axes):
    operands = np.asarray(rng.standard_normal((B, 6, 8)), np.float32)
    updates = np.asarray(rng.standard_normal((B, 2, 8)), np.float32)
    starts = np.array([0, 3, 5], np.int32)  # the last one is clamped to 4
    args = [operands, updates, starts]
    args = [a if ax == 0 else a[0] for a, ax in zip(args, in_axes)]
    f = lambda o, u, s: ops.update_slice(o, u, (s, 0))  # noqa: E731
    check_vmap_equals_loop(f, args, in_axes)


@pytest.mark.parametrize("in_axes", [(0, None, None), (0, 0, None), (0, 0, 0)])
def test_fp8_matmul(rng, in_axes):
    lhs = np.asarray(rng.standard_normal((B, 3, 16)), np.float32)
    rhs = fp8_codes(rng, (B, 16, 8))
    w_scale = np.asarray(rng.uniform(0.01, 0.1, (B, 8)), np.float32)
    args = [a if ax == 0 else a[0] for a, ax in zip((lhs, rhs, w_scale), in_axes)]
    f = lambda x, w, s: ops.fp8_matmul(x, w, s, a_scale=0.05)  # noqa: E731
    check_vmap_equals_loop(f, args, in_axes)


def test_fp8_matmul_per_tensor_scale_with_batch_dims(rng):
    lhs = np.asarray(rng.standard_normal((B, 2, 3, 16)), np.float32)
    rhs = fp8_codes(rng, (2, 16, 8))
    dims = (((2,), (1,)), ((0,), (0,)))
    f = lambda x: ops.fp8_matmul(x, rhs, 0.03, dims, out_dtype=jnp.bfloat16)  # noqa: E731
    check_vmap_equals_loop(f, (lhs,), (0,))


@pytest.mark.parametrize("in_axes", [(0, None), (None, 0), (0, 0)])
def test_dot_f32(rng, in_axes):
    lhs = np.asarray(rng.standard_normal((B, 2, 16)), np.float32)
    rhs = np.asarray(rng.standard_normal((B, 16, 40)), np.float32)
    args = [a if ax == 0 else a[0] for a, ax in zip((lhs, rhs), in_axes)]
    check_vmap_equals_loop(ops.dot_f32, args, in_axes)


@pytest.mark.parametrize("in_axis", [0, 1])
def test_argmax(rng, in_axis):
    x = np.asarray(rng.standard_normal((B, 4, 37)), np.float32)
    x[1, 2, 5] = np.nan
    x[2, 0, [3, 9]] = 50.0  # a tie: the first index wins
    x = np.moveaxis(x, 0, in_axis)
    check_vmap_equals_loop(ops.argmax, (x,), (in_axis,))
    want = np.argmax(np.moveaxis(x, in_axis, 0), axis=-1)  # numpy: first max, first NaN
    np.testing.assert_array_equal(np.asarray(jax.vmap(ops.argmax, in_axes=in_axis)(x)), want)


def test_quantize_rows(rng):
    x = np.asarray(rng.standard_normal((B, 5, 24)) * 7, np.float32)
    x[1, 3] = 0.0  # a zero row: scale 1
    got_codes, got_scales = jax.jit(jax.vmap(ops.quantize_rows))(x)
    for i in range(B):
        codes, scales = jax.jit(ops.quantize_rows)(x[i])
        np.testing.assert_array_equal(np.asarray(got_codes[i]).view(np.uint8),
                                      np.asarray(codes).view(np.uint8))
        np.testing.assert_array_equal(np.asarray(got_scales[i]), np.asarray(scales))
    amax = np.abs(x).max(axis=-1)
    want_scales = np.where(amax > 0, amax / np.float32(448.0), np.float32(1.0))
    np.testing.assert_allclose(np.asarray(got_scales), want_scales, rtol=1e-6)


@pytest.mark.parametrize("op", ["quantize", "qdq", "dequantize", "take", "fp8_matmul"])
def test_batched_scale_is_refused_naming_the_op(rng, op):
    scales = np.array([0.5, 1.0, 2.0], np.float32)
    x = np.ones((B, 4), np.float32)
    q = fp8_codes(rng, (B, 4))
    calls = {
        "quantize": (lambda s, v: ops.quantize(v, s), (scales, x)),
        "qdq": (lambda s, v: ops.qdq(v, s), (scales, x)),
        "dequantize": (lambda s, v: ops.dequantize(v, s), (scales, q)),
        "take": (lambda s, t: ops.take(t, np.zeros(2, np.int32), s), (scales, q)),
        "fp8_matmul": (lambda s, w: ops.fp8_matmul(np.ones((1, 4), np.float32), w, 1.0,
                                                   a_scale=s), (scales, q)),
    }
    f, args = calls[op]
    with pytest.raises(TypeError, match=rf"fp8xla\.{op}: `(a_)?scale` must be a concrete"):
        jax.vmap(f)(*args)


# -- every ffi_call states its vmap_method, and every public op that makes one is tested ------

PACKAGE = os.path.dirname(fp8xla.__file__)
TESTED = {"quantize", "dequantize", "qdq", "observe", "take", "update_slice", "fp8_matmul",
          "dot_f32", "argmax", "quantize_rows"}


def ffi_calls(tree):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "ffi_call"):
            yield node


def test_every_ffi_call_in_the_package_states_its_vmap_method():
    found, missing = 0, []
    for name in sorted(os.listdir(PACKAGE)):
        if name.endswith(".py"):
            with open(os.path.join(PACKAGE, name)) as f:
                tree = ast.parse(f.read(), name)
            for call in ffi_calls(tree):
                found += 1
                if "vmap_method" not in {k.arg for k in call.keywords}:
                    missing.append(f"{name}:{call.lineno}")
    assert found >= len(TESTED)
    assert not missing, f"ffi_call without vmap_method at {missing}"


def test_every_public_op_with_a_custom_call_has_a_vmap_test():
    with open(os.path.join(PACKAGE, "ops.py")) as f:
        tree = ast.parse(f.read(), "ops.py")
    public = {fn.name for fn in tree.body
              if isinstance(fn, ast.FunctionDef) and not fn.name.startswith("_")
              and any(True for _ in ffi_calls(fn))}
    assert public == TESTED
