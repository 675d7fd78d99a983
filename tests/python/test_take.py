"""`fp8xla_take` (the FP8 embedding lookup) against a NumPy/ml_dtypes reference: every FP8
code, awkward shapes, index clamping, both index types and both output dtypes; bad input."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp8xla  # noqa: F401  (registers the targets)
from fp8xla import ops

FORMATS = [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]


def random_codes(rng, shape, fmt):
    # every bit pattern, NaNs included (a NaN row entry must come out as NaN)
    return rng.integers(0, 256, size=shape, dtype=np.uint8).view(fmt)


def reference(table, idx, scale, dtype):
    rows = np.clip(idx.reshape(-1).astype(np.int64), 0, max(table.shape[0] - 1, 0))
    out = table.astype(np.float32)[rows] * np.float32(scale)
    return out.reshape(idx.shape + table.shape[1:]).astype(dtype)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("table_shape, idx_shape", [
    ((256, 32), (1, 8)), ((1, 1), (3,)), ((17, 5, 3), (2, 3)), ((9,), (4,)),
    ((300, 640), (1, 1)), ((5, 7), (0,)), ((4, 0), (6,))])
@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
def test_take_equals_reference(fmt, table_shape, idx_shape, idx_dtype, rng):
    table = random_codes(rng, table_shape, fmt)
    # in range and out of range (clamped like stablehlo.gather), negative too
    idx = rng.integers(-3, table_shape[0] + 3, size=idx_shape).astype(idx_dtype)
    for dtype in (jnp.float32, jnp.bfloat16):
        got = np.asarray(jax.jit(lambda t, i: ops.take(t, i, 0.37, dtype))(table, idx))
        want = reference(table, idx, 0.37, dtype)
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))


def test_take_with_trailing_index_vector_dim(rng):
    """stablehlo.gather's form: indices [..., 1] give rows [..., row dims]."""
    table = random_codes(rng, (50, 6), FORMATS[0])
    idx = rng.integers(0, 50, size=(2, 4, 1)).astype(np.int32)
    out = jax.ShapeDtypeStruct((2, 4, 6), jnp.float32)
    got = np.asarray(jax.ffi.ffi_call("fp8xla_take", out)(table, idx, scale=np.float32(2)))
    np.testing.assert_array_equal(got, reference(table, idx[..., 0], 2.0, np.float32))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("table_shape, idx_shape", [
    ((256, 32), (1, 8)), ((1, 1), (3,)), ((17, 5, 3), (2, 3)), ((5, 7), (0,)), ((4, 0), (6,))])
def test_take_with_row_scales_equals_reference(fmt, table_shape, idx_shape, rng):
    """Operand 2: one scale per row, multiplied into that row (and by `scale`)."""
    table = random_codes(rng, table_shape, fmt)
    row_scales = rng.uniform(1e-3, 4, size=table_shape[0]).astype(np.float32)
    idx = rng.integers(-3, table_shape[0] + 3, size=idx_shape).astype(np.int32)
    for dtype in (jnp.float32, jnp.bfloat16):
        got = np.asarray(jax.jit(lambda t, i, r: ops.take(t, i, 0.5, dtype, row_scales=r))(
            table, idx, row_scales))
        rows = np.clip(idx.reshape(-1), 0, table_shape[0] - 1)
        scale = (np.float32(0.5) * row_scales[rows]).reshape(
            idx.shape + (1,) * (len(table_shape) - 1))
        want = (table.astype(np.float32)[rows].reshape(idx.shape + table_shape[1:])
                * scale).astype(dtype)
        np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))


def test_take_row_scales_errors():
    table = np.zeros((4, 3), ml_dtypes.float8_e4m3fn)
    idx = np.array([0, 1], np.int32)
    out = jax.ShapeDtypeStruct((2, 3), jnp.float32)
    for match, rs in [
            ("operand 2 \\(row_scales\\): expected float32 \\[4\\] \\(one scale per table row\\), "
             "got float32 \\[3\\]", np.ones(3, np.float32)),
            ("operand 2 \\(row_scales\\): expected float32 \\[4\\] .*, got int32", np.ones(4, np.int32)),
            ("operand 2 \\(row_scales\\): expected finite positive scales, got 0 at row 0 "
             "\\(taken by index 0\\)", np.array([0, 1, 1, 1], np.float32))]:
        with pytest.raises(jax.errors.JaxRuntimeError, match=match):
            call(out, table, idx, rs, scale=np.float32(1))
    # Indices are clamped before their row's scale is checked.
    for bad, shown in [(np.nan, "NaN"), (np.inf, "inf"), (-1.0, "-1")]:
        rs = np.array([1, 1, 1, bad], np.float32)
        with pytest.raises(jax.errors.JaxRuntimeError,
                           match=f"got {shown} at row 3 \\(taken by index 7\\)"):
            call(out, table, np.array([0, 7], np.int32), rs, scale=np.float32(1))
    # Only the rows taken are read, so only their scales are checked: a NaN scale on row 2
    # does not change rows 0 and 1.
    rs = np.array([1, 2, np.nan, 1], np.float32)
    table1 = np.ones((4, 3), ml_dtypes.float8_e4m3fn)
    got = np.asarray(call(out, table1, idx, rs, scale=np.float32(1)))
    np.testing.assert_array_equal(got, [[1, 1, 1], [2, 2, 2]])
    with pytest.raises(ValueError, match="fp8xla.take: `row_scales` must be float32 of shape"):
        ops.take(table, idx, 1.0, row_scales=np.ones(3, np.float32))


def call(out, *args, **attrs):
    return jax.block_until_ready(jax.ffi.ffi_call("fp8xla_take", out)(*args, **attrs))


def test_take_errors():
    table = np.zeros((4, 3), ml_dtypes.float8_e4m3fn)
    idx = np.array([0, 1], np.int32)
    cases = [
        ("operand 0 \\(table\\): expected dtype float8_e4m3fn or float8_e5m2, got float32",
         (2, 3), jnp.float32, table.astype(np.float32), idx, {"scale": np.float32(1)}),
        ("operand 1 \\(indices\\): expected dtype int32 or int64, got float32",
         (2, 3), jnp.float32, table, idx.astype(np.float32), {"scale": np.float32(1)}),
        ("result 0 \\(out\\): expected shape \\[2, 3\\]", (2, 4), jnp.float32, table, idx,
         {"scale": np.float32(1)}),
        ("result 0 \\(out\\): expected dtype float32 or bfloat16, got float16", (2, 3),
         jnp.float16, table, idx, {"scale": np.float32(1)}),
        ("attribute `scale`: expected a finite positive float, got NaN", (2, 3), jnp.float32,
         table, idx, {"scale": np.float32(np.nan)}),
        ("unknown attribute", (2, 3), jnp.float32, table, idx,
         {"scale": np.float32(1), "sacle": np.float32(1)}),
        ("has no rows to take 2 indices from", (2, 3), jnp.float32,
         np.zeros((0, 3), ml_dtypes.float8_e4m3fn), idx, {"scale": np.float32(1)}),
    ]
    for match, shape, dtype, t, i, attrs in cases:
        with pytest.raises(jax.errors.JaxRuntimeError, match=match) as e:
            call(jax.ShapeDtypeStruct(shape, dtype), t, i, **attrs)
        assert "fp8xla_take" in str(e.value)
    with pytest.raises(TypeError, match="fp8xla.take: `indices` must be int32 or int64"):
        ops.take(table, idx.astype(np.float32), 1.0)
