"""Bad input gives a clear error naming the custom call and the problem, never a crash.

The native checks are exercised with raw `jax.ffi.ffi_call`s (the Python wrappers would stop
most of these mistakes before lowering); the wrapper checks are tested separately."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp8xla  # noqa: F401  (registers the targets)
from fp8xla import ops

X = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
F8 = jnp.float8_e4m3fn


def call(target, out, *args, **attrs):
    return jax.block_until_ready(jax.ffi.ffi_call(target, out)(*args, **attrs))


def raises(match, target, out, *args, **attrs):
    with pytest.raises(jax.errors.JaxRuntimeError, match=match) as e:
        call(target, out, *args, **attrs)
    assert target in str(e.value)
    return str(e.value)


def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def test_wrong_operand_dtype():
    msg = raises("operand 0 \\(x\\): expected dtype float32 or bfloat16, got int32",
                 "fp8xla_quantize", sds((3, 4), F8), X.astype(np.int32), scale=np.float32(1))
    assert "int32" in msg
    raises("operand 0 \\(q\\): expected dtype float8_e4m3fn or float8_e5m2, got float32",
           "fp8xla_dequantize", sds((3, 4), jnp.float32), X, scale=np.float32(1))
    raises("expected dtype float32 or bfloat16, got float16", "fp8xla_qdq",
           sds((3, 4), jnp.float16), X.astype(np.float16), scale=np.float32(1), format="e4m3fn")
    raises("expected dtype float32 or bfloat16, got int32", "fp8xla_observe",
           sds((3, 4), jnp.int32), X.astype(np.int32), site=np.int64(0))


def test_wrong_result_dtype():
    raises("result 0 \\(q\\): expected dtype float8_e4m3fn or float8_e5m2, got bfloat16",
           "fp8xla_quantize", sds((3, 4), jnp.bfloat16), X, scale=np.float32(1))
    raises("result 0 \\(y\\): expected dtype float32 \\(the dtype of operand 0\\), got bfloat16",
           "fp8xla_qdq", sds((3, 4), jnp.bfloat16), X, scale=np.float32(1), format="e5m2")


@pytest.mark.parametrize("bad", [np.nan, 0.0, -1.0, np.inf])
@pytest.mark.parametrize("target", ["fp8xla_quantize", "fp8xla_dequantize", "fp8xla_qdq"])
def test_bad_scale(bad, target):
    extra = {"format": "e4m3fn"} if target == "fp8xla_qdq" else {}
    x = X.astype(F8) if target == "fp8xla_dequantize" else X
    out = sds((3, 4), F8 if target == "fp8xla_quantize" else jnp.float32)
    raises("attribute `scale`: expected a finite positive float, got", target, out, x,
           scale=np.float32(bad), **extra)


def test_missing_and_mistyped_attributes():
    raises("missing attribute `scale`", "fp8xla_quantize", sds((3, 4), F8), X)
    raises("attribute `scale`: expected a float32/float64 scalar, got a string",
           "fp8xla_quantize", sds((3, 4), F8), X, scale="1.0")
    # (3, not 1: JAX's eager cache would treat int32(1) like an earlier float32(1))
    raises("attribute `scale`: expected a float32/float64 scalar, got a scalar of type int32",
           "fp8xla_quantize", sds((3, 4), F8), X, scale=np.int32(3))
    raises("missing attribute `format`", "fp8xla_qdq", sds((3, 4), jnp.float32), X,
           scale=np.float32(1))
    raises("missing attribute `site`", "fp8xla_observe", sds((3, 4), jnp.float32), X)
    raises("attribute `site`: expected an int32/int64 scalar", "fp8xla_observe",
           sds((3, 4), jnp.float32), X, site=np.float32(1))


def test_unknown_attribute():
    raises("unknown attribute `scal` \\(accepted: scale\\)", "fp8xla_quantize",
           sds((3, 4), F8), X, scale=np.float32(1), scal=np.float32(2))


def test_unknown_format():
    raises('attribute `format`: expected "e4m3fn" or "e5m2".*got "e4m3"', "fp8xla_qdq",
           sds((3, 4), jnp.float32), X, scale=np.float32(1), format="e4m3")


def test_mismatched_shapes():
    raises("result 0 \\(q\\): expected shape \\[3, 4\\] \\(the shape of operand 0 \\(x\\)\\), got \\[4, 3\\]",
           "fp8xla_quantize", sds((4, 3), F8), X, scale=np.float32(1))
    raises("expected shape \\[3, 4\\]", "fp8xla_dequantize", sds((12,), jnp.float32),
           X.astype(F8), scale=np.float32(1))
    raises("expected shape", "fp8xla_observe", sds((3, 5), jnp.float32), X, site=np.int64(1))


def test_wrong_arity():
    raises("expected 1 operand\\(s\\), got 2", "fp8xla_quantize", sds((3, 4), F8), X, X,
           scale=np.float32(1))


def test_process_survives_errors():
    # After every error above, the backend still computes correctly.
    y = np.asarray(ops.qdq(X, 1.0))
    assert y.shape == X.shape


def test_python_wrappers_reject_before_lowering():
    with pytest.raises(TypeError, match="fp8xla.quantize: `x` must be float32 or bfloat16, got int32"):
        ops.quantize(X.astype(np.int32), 1.0)
    with pytest.raises(ValueError, match="fp8xla.qdq: `scale` must be finite and > 0, got nan"):
        ops.qdq(X, float("nan"))
    with pytest.raises(ValueError, match="unknown FP8 format 'e4m3'"):
        ops.qdq(X, 1.0, "e4m3")
    with pytest.raises(ValueError, match="ml_dtypes.float8_e4m3, without 'fn'"):
        ops.quantize(X, 1.0, jnp.float8_e4m3)
    with pytest.raises(TypeError, match="must be a concrete number"):
        jax.jit(lambda x, s: ops.qdq(x, s))(X, 1.0)
    with pytest.raises(TypeError, match="`site` must be an int"):
        ops.observe(X, 1.5)
