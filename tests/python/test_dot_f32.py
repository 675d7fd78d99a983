"""`fp8xla_dot_f32` (float32 dot_general by the GEMV kernels) against a float64 NumPy
reference and `jax.lax.dot_general`, on decode-shaped products: the cache layouts of Gemma3's
attention, both operand orders, size-1 dims anywhere, awkward sizes, batches; every error."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp8xla  # noqa: F401
from fp8xla import ops

from test_matmul import dims, dot_general_f64


def check(lhs, rhs, dn):
    got = np.asarray(jax.jit(lambda a, b: ops.dot_f32(a, b, dn))(lhs, rhs))
    want = dot_general_f64(lhs, rhs, dn)
    assert got.shape == want.shape and got.dtype == np.float32
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale)
    lax = np.asarray(jax.lax.dot_general(lhs, rhs, dn, precision="highest"))
    np.testing.assert_allclose(got, lax, rtol=0, atol=2e-5 * scale)


# (lhs shape, rhs shape, dimension numbers): the large operand on either side.
CASES = [
    # Gemma3 decode scores: keys [b, S, kv, d] . q [b, 1, kv, heads, d] (keys stream, as lhs)
    ((1, 640, 1, 256), (1, 1, 1, 4, 256), (((3,), (4,)), ((0, 2), (0, 2)))),
    # Gemma3 decode weighted sum: values [b, S, kv, d] . p [b, kv, heads, 1, S]
    ((1, 640, 1, 256), (1, 1, 4, 1, 640), (((1,), (4,)), ((0, 2), (0, 1)))),
    # the same with the cache as rhs
    ((1, 1, 4, 256), (1, 640, 1, 256), (((3,), (3,)), ((0,), (0,)))),
    ((4, 640), (640, 256), (((1,), (0,)), ((), ()))),
    # batch 2 of caches, odd sizes (vector tails), one row
    ((2, 37, 1, 19), (2, 1, 1, 1, 19), (((3,), (4,)), ((0, 2), (0, 2)))),
    ((2, 37, 1, 19), (2, 1, 3, 1, 37), (((1,), (4,)), ((0, 2), (0, 1)))),
    # more rows than one GEMV group (5 > 4), contracting dim first on the small side
    ((33, 5), (33, 41), (((0,), (0,)), ((), ()))),
    ((7, 3), (9, 3), (((1,), (1,)), ((), ()))),
    # size 1 and size 0 everywhere
    ((1, 1), (1, 1), (((1,), (0,)), ((), ()))),
    ((1, 0), (0, 5), (((1,), (0,)), ((), ()))),
    ((2, 3), (3, 0), (((1,), (0,)), ((), ()))),
    ((0, 3), (3, 70), (((1,), (0,)), ((), ()))),
]


@pytest.mark.parametrize("ls,rs,dn", CASES)
def test_matches_reference(ls, rs, dn):
    rng = np.random.default_rng(abs(hash((ls, rs))) % (1 << 32))
    check(rng.standard_normal(ls).astype(np.float32), rng.standard_normal(rs).astype(np.float32), dn)


def test_nan_and_inf_in_the_cache_reach_only_their_outputs():
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((1, 64, 1, 32)).astype(np.float32)
    q = rng.standard_normal((1, 1, 1, 4, 32)).astype(np.float32)
    keys[0, 10, 0, 5] = np.nan
    keys[0, 20, 0, 7] = np.inf
    dn = (((3,), (4,)), ((0, 2), (0, 2)))
    got = np.asarray(ops.dot_f32(keys, q, dn))  # [1, 1, 64, 1, 4]
    assert np.isnan(got[0, 0, 10]).all() and np.isinf(got[0, 0, 20]).all()
    assert np.isfinite(np.delete(got[0, 0], [10, 20], axis=0)).all()


def test_inside_a_decode_like_loop():
    """Reads a cache that an in-place update writes every step, as in a decode loop."""
    rng = np.random.default_rng(4)
    S, D = 48, 16
    rows = jnp.asarray(rng.standard_normal((S, 1, D)).astype(np.float32))
    q = rng.standard_normal((1, 3, D)).astype(np.float32)
    dn = (((2,), (2,)), ((1,), (0,)))

    def run(dot):
        def body(i, carry):
            cache, acc = carry
            cache = jax.lax.dynamic_update_slice(cache, rows[i][None], (i, 0, 0))
            return cache, acc + dot(cache, q, dn).sum(axis=-1)
        return jax.jit(lambda: jax.lax.fori_loop(
            0, S, body, (jnp.zeros((S, 1, D), jnp.float32), jnp.zeros((1, S), jnp.float32))))()

    got, want = run(ops.dot_f32), run(lambda a, b, d: jax.lax.dot_general(a, b, d, precision="highest"))
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5, atol=1e-4)


def raw(out_shape, *args, dtype=jnp.float32, **attrs):
    out = jax.ShapeDtypeStruct(out_shape, dtype)
    return jax.block_until_ready(jax.ffi.ffi_call("fp8xla_dot_f32", out)(*args, **attrs))


X = np.ones((2, 8), np.float32)
W = np.ones((8, 40), np.float32)


@pytest.mark.parametrize("case,match", [
    (lambda: raw((2, 40), X, np.ones((9, 40), np.float32), **dims([1], [0])),
     "contracting dimension sizes differ: operand 0 \\(lhs\\) dim 1 has size 8 but operand 1 \\(rhs\\) dim 0 has size 9"),
    (lambda: raw((2, 40), X, W.astype(jnp.bfloat16), **dims([1], [0])),
     "operand 1 \\(rhs\\): expected dtype float32 \\(or, streamed, float8_e4m3fn or float8_e5m2\\), got bfloat16"),
    (lambda: raw((2, 40), X.astype(np.int32), W, **dims([1], [0])),
     "operand 0 \\(lhs\\): expected dtype float32 \\(or, streamed, float8_e4m3fn or float8_e5m2\\), got int32"),
    (lambda: raw((2, 40), X, W, dtype=jnp.bfloat16, **dims([1], [0])),
     "result 0: expected dtype float32, got bfloat16"),
    (lambda: raw((2, 41), X, W, **dims([1], [0])), "result 0: expected shape \\[2, 40\\]"),
    (lambda: raw((2, 40), X, W, **dims([2], [0])),
     "attribute `lhs_contracting_dims`: dimension 2 is out of range for rank 2"),
    (lambda: raw((2, 40), X, W, **dims([1, 1], [0, 1])), "appears twice"),
    (lambda: raw((2, 40), X, W, **dims([1], [0, 1])), "must have the same length"),
    (lambda: raw((2, 40), X, W, lhs_contracting_dims=np.array([1], np.int64)),
     "missing attribute `rhs_contracting_dims`"),
    (lambda: raw((2, 40), X, W, bogus=np.int64(1), **dims([1], [0])), "unknown attribute `bogus`"),
    # The large operand's contracting dims are not adjacent once size-1 dims are dropped.
    (lambda: raw((2,), np.ones((2, 3, 5), np.float32), np.ones((3, 7, 5), np.float32), **dims([1, 2], [0, 2])),
     "operand 1 \\(rhs\\), the streamed operand .* but its contracting dims are not adjacent "
     "\\(shape \\[3, 7, 5\\], rhs_contracting_dims \\[0, 2\\]"),
    # Its batch dim is not leading.
    (lambda: raw((5, 2, 7), np.ones((5, 2, 3), np.float32), np.ones((3, 5, 7), np.float32), **dims([2], [0], [0], [1])),
     "operand 1 \\(rhs\\), the streamed .*but its batching dims do not lead in order"),
    # The lhs streams (larger): its own dim numbers are named, not the squeezed ones.
    (lambda: raw((2,), np.ones((1, 3, 7, 5), np.float32), np.ones((2, 3, 5), np.float32), **dims([1, 3], [1, 2])),
     "operand 0 \\(lhs\\), the streamed operand .* \\(shape \\[1, 3, 7, 5\\], lhs_contracting_dims \\[1, 3\\]"),
])
def test_bad_input_is_a_clear_error(case, match):
    with pytest.raises(jax.errors.JaxRuntimeError, match=match) as e:
        case()
    assert "fp8xla_dot_f32" in str(e.value)


def test_python_checks():
    with pytest.raises(TypeError, match="`lhs` must be float32 \\(or FP8 codes, on the larger side\\), got bfloat16"):
        ops.dot_f32(X.astype(jnp.bfloat16), W)
    with pytest.raises(ValueError, match="contracting dims differ"):
        ops.dot_f32(X, np.ones((9, 40), np.float32))
    with pytest.raises(ValueError, match="bad rhs dims"):
        ops.dot_f32(X, W, (((1,), (2,)), ((), ())))
