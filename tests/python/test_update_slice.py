"""`fp8xla_update_slice` (in-place `dynamic_update_slice`) against `jax.lax.dynamic_update_slice`
and NumPy: every dtype it takes, awkward shapes, clamped and negative start indices, both index
types, in a loop that carries the buffer, without the alias; bad input."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp8xla  # noqa: F401  (registers the targets)
from fp8xla import ops

DTYPES = [np.float32, np.float64, jnp.bfloat16, np.float16, ml_dtypes.float8_e4m3fn,
          ml_dtypes.float8_e5m2, np.int32, np.int64, np.int8, np.uint8, np.bool_]


def random_array(rng, shape, dtype):
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.itemsize == 1 and dtype.kind not in "iub":  # FP8: every bit pattern
        return rng.integers(0, 256, size=shape, dtype=np.uint8).view(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    return rng.standard_normal(shape).astype(dtype)


def reference(operand, update, start):
    """NumPy: start indices clamped to [0, dim - update dim], then the block overwritten."""
    out = operand.copy()
    at = tuple(slice(s, s + u) for s, u in
               ((int(np.clip(i, 0, n - u)), u) for i, n, u in zip(start, operand.shape, update.shape)))
    out[at] = update
    return out


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    np.testing.assert_array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, update_shape", [
    ((), ()), ((7,), (1,)), ((7,), (7,)), ((7,), (0,)), ((1, 9, 1, 5), (1, 1, 1, 5)),
    ((3, 4, 5), (2, 3, 1)), ((2, 0, 3), (1, 0, 2)), ((2, 3, 4, 5, 6), (1, 2, 3, 4, 5))])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_update_slice_equals_dynamic_update_slice(dtype, shape, update_shape, index_dtype, rng):
    operand = random_array(rng, shape, dtype)
    update = random_array(rng, update_shape, dtype)
    # in range, past the end and negative
    start = [index_dtype(rng.integers(-2, n + 3)) for n in shape]
    out = jax.ShapeDtypeStruct(operand.shape, operand.dtype)
    with jax.enable_x64(True):  # int64 indices and float64/int64 data stay 64-bit
        raw = jax.jit(lambda o, u, *i: jax.ffi.ffi_call(
            "fp8xla_update_slice", out, input_output_aliases={0: 0})(o, u, *i))(
                operand, update, *start)
        wrapped = jax.jit(lambda o, u, *i: ops.update_slice(o, u, i))(operand, update, *start)
        want = jax.lax.dynamic_update_slice(operand, update, start)
    # the custom call clamps like stablehlo.dynamic_update_slice (negative -> 0) ...
    same_bits(raw, reference(operand, update, start))
    # ... and the wrapper first counts negative indices from the end, as jax.lax does (XLA's
    # own update may rewrite FP8 NaN codes to another NaN code: values are compared, NaN=NaN)
    np.testing.assert_array_equal(np.asarray(wrapped).astype(np.float64),
                                  np.asarray(want).astype(np.float64))
    same_bits(wrapped, reference(operand, update,
                                 [i + n if i < 0 else i for i, n in zip(start, shape)]))


def test_loop_carried_cache_matches_dynamic_update_slice(rng):
    """A decode-like loop: each step writes one row and then reads the whole buffer, the old
    row is read before the write, and the buffer is also read after the loop."""
    steps, rows, width = 9, 11, 6
    cache0 = random_array(rng, (1, rows, 1, width), np.float32)
    x0 = random_array(rng, (width,), np.float32)

    def run(update):
        def body(i, carry):
            x, cache = carry
            old = jax.lax.dynamic_slice(cache, (0, i, 0, 0), (1, 1, 1, width))
            row = jnp.tanh(x + old)
            cache = update(cache, row, (jnp.int32(0), i, jnp.int32(0), jnp.int32(0)))
            x = jnp.einsum("d,bsnd->d", x, cache) / rows
            return x, cache
        return jax.jit(lambda x, c: jax.lax.fori_loop(0, steps, body, (x, c)))(x0, cache0)

    got = run(ops.update_slice)
    want = run(jax.lax.dynamic_update_slice)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_old_value_read_after_the_update_in_a_loop(rng):
    """The loop reads the buffer it carries after updating it: XLA must copy before the
    in-place write, so the old value stays what it was."""
    steps, rows, width = 7, 9, 5
    cache0 = random_array(rng, (rows, width), np.float32)

    def run(update):
        def body(i, carry):
            acc, cache = carry
            new = update(cache, jnp.full((1, width), i, jnp.float32) + 0.5, (i, jnp.int32(0)))
            # both the old and the new buffer are used after the update
            acc = acc + jnp.sum(cache * 3.0, axis=0) - jnp.sum(new, axis=0)
            return acc, new
        return jax.jit(lambda c: jax.lax.fori_loop(0, steps, body,
                                                   (jnp.zeros((width,), jnp.float32), c)))(cache0)

    got, want = run(ops.update_slice), run(jax.lax.dynamic_update_slice)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_operand_as_its_own_update(rng):
    """The same buffer as operand and update: XLA passes the update from a separate copy or
    reads it before the write, never a refused overlap."""
    x = random_array(rng, (3, 4), np.float32)
    got = jax.jit(lambda a: ops.update_slice(a, a, (jnp.int32(0), jnp.int32(0))))(x)
    same_bits(got, x)
    row = jax.jit(lambda a: ops.update_slice(a, a[1:2], (jnp.int32(2), jnp.int32(0))))(x)
    same_bits(row, reference(x, x[1:2], [2, 0]))


def test_operand_is_not_changed_without_donation(rng):
    """The custom call aliases its operand; XLA must copy a buffer the caller still holds."""
    operand = jnp.asarray(random_array(rng, (4, 5), np.float32))
    before = np.asarray(operand).copy()
    update = jnp.ones((1, 5), jnp.float32)
    out = jax.jit(lambda o, u: (ops.update_slice(o, u, (jnp.int32(2), jnp.int32(0))), o * 2))(
        operand, update)
    np.testing.assert_array_equal(np.asarray(operand), before)
    np.testing.assert_array_equal(np.asarray(out[1]), before * 2)
    same_bits(out[0], reference(before, np.ones((1, 5), np.float32), [2, 0]))


def test_without_the_alias_the_result_starts_as_the_operand(rng):
    """Called without `input_output_aliases` (a separate result buffer) it still computes
    `dynamic_update_slice`."""
    operand = random_array(rng, (3, 8), np.float32)
    update = random_array(rng, (2, 3), np.float32)
    out = jax.ShapeDtypeStruct(operand.shape, operand.dtype)
    got = jax.ffi.ffi_call("fp8xla_update_slice", out)(operand, update, np.int32(1), np.int32(6))
    same_bits(got, reference(operand, update, [1, 6]))


def call(out, *args, aliases=True, **attrs):
    io = {0: 0} if aliases else {}
    return jax.block_until_ready(
        jax.ffi.ffi_call("fp8xla_update_slice", out, input_output_aliases=io)(*args, **attrs))


def test_update_slice_errors():
    f32 = jax.ShapeDtypeStruct((4, 3), jnp.float32)
    op = np.zeros((4, 3), np.float32)
    i = np.int32(0)
    cases = [
        ("operand 1 \\(update\\): expected dtype float32 \\(the dtype of operand 0\\), got int32",
         f32, (op, np.zeros((1, 3), np.int32), i, i), {}),
        ("operand 1 \\(update\\): expected rank 2 and dims at most \\[4, 3\\]",
         f32, (op, np.zeros((1, 4), np.float32), i, i), {}),
        ("operand 1 \\(update\\): expected rank 2", f32, (op, np.zeros((3,), np.float32), i, i), {}),
        ("expected 4 operand\\(s\\), got 3", f32, (op, np.zeros((1, 3), np.float32), i), {}),
        ("operand 3 \\(start index 1\\): expected dtype int32 or int64, got float32",
         f32, (op, np.zeros((1, 3), np.float32), i, np.float32(0)), {}),
        ("operand 2 \\(start index 0\\): expected a scalar, got shape \\[1\\]",
         f32, (op, np.zeros((1, 3), np.float32), np.zeros((1,), np.int32), i), {}),
        ("unknown attribute", f32, (op, np.zeros((1, 3), np.float32), i, i), {"scale": np.float32(1)}),
        ("expected dtype bool, int8, uint8, int32, int64, float16, bfloat16, float32, float64, "
         "float8_e4m3fn or float8_e5m2, got XLA data type",
         jax.ShapeDtypeStruct((4, 3), jnp.uint32),
         (np.zeros((4, 3), np.uint32), np.zeros((1, 3), np.uint32), i, i), {}),
        ("expected the result to have the operand's type float32\\[4, 3\\], got float32\\[4, 2\\]",
         jax.ShapeDtypeStruct((4, 2), jnp.float32), (op, np.zeros((1, 2), np.float32), i, i), {}),
    ]
    for message, out, args, attrs in cases:
        with pytest.raises(Exception, match="fp8xla_update_slice: .*" + message):
            call(out, *args, aliases=(out.shape == op.shape), **attrs)


def test_other_targets_refuse_an_input_output_alias():
    """Only fp8xla_update_slice updates in place; an alias declared on another target is an
    error, not a silent read of memory that is being written."""
    x = np.ones((4, 8), np.float32)
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    with pytest.raises(Exception, match="fp8xla_qdq: result 0: expected memory of its own, "
                       "got memory shared with operand 0"):
        jax.block_until_ready(jax.ffi.ffi_call("fp8xla_qdq", out, input_output_aliases={0: 0})(
            x, scale=np.float32(1), format="e4m3fn"))


def test_python_wrapper_checks():
    op = jnp.zeros((4, 3), jnp.float32)
    with pytest.raises(TypeError, match="must have the operand's dtype"):
        ops.update_slice(op, jnp.zeros((1, 3), jnp.int32), (0, 0))
    with pytest.raises(ValueError, match="dims at most"):
        ops.update_slice(op, jnp.zeros((5, 3), jnp.float32), (0, 0))
    with pytest.raises(ValueError, match="expected 2 start indices"):
        ops.update_slice(op, jnp.zeros((1, 3), jnp.float32), (0,))
    with pytest.raises(TypeError, match="`operand` must be one of .* got uint32"):
        ops.update_slice(jnp.zeros((4, 3), jnp.uint32), jnp.zeros((1, 3), jnp.uint32), (0, 0))
    with pytest.raises(TypeError, match="int32 or int64 scalars"):
        ops.update_slice(op, jnp.zeros((1, 3), jnp.float32), (0, jnp.zeros((2,), jnp.int32)))
