"""fp8xla_matmul against a float64 reference of the fake-quant computation."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp8xla  # noqa: F401
from fp8xla import ops

import fp8_reference as ref


def dot_general_f64(lhs, rhs, dn):
    """Plain float64 dot_general (numpy), output [batch, lhs free, rhs free]."""
    (lc, rc), (lb, rb) = dn
    lf = [a for a in range(lhs.ndim) if a not in lc and a not in lb]
    rf = [a for a in range(rhs.ndim) if a not in rc and a not in rb]
    L = np.transpose(lhs, list(lb) + lf + list(lc)).astype(np.float64)
    R = np.transpose(rhs, list(rb) + list(rc) + rf).astype(np.float64)
    B = [lhs.shape[a] for a in lb]
    M = [lhs.shape[a] for a in lf]
    N = [rhs.shape[a] for a in rf]
    K = int(np.prod([lhs.shape[a] for a in lc], dtype=np.int64))
    L = L.reshape(int(np.prod(B, dtype=np.int64)), -1, K) if L.size else np.zeros((int(np.prod(B)), int(np.prod(M)), K))
    R = R.reshape(L.shape[0], K, -1) if R.size else np.zeros((L.shape[0], K, int(np.prod(N))))
    return np.matmul(L, R).reshape(B + M + N)


def fake_quant_reference(x, codes, w_scale, dn, a_scale=None, fmt="e4m3fn", channel_axes=None):
    x = np.asarray(x).astype(np.float32)
    if a_scale is not None:
        x = ref.qdq(x, a_scale, fmt)
    w = codes.astype(np.float64)
    if channel_axes is None:
        w = w * np.float64(np.float32(w_scale))
    else:
        shape = [1] * codes.ndim
        for a in channel_axes:
            shape[a] = codes.shape[a]
        w = w * np.asarray(w_scale, np.float64).reshape(shape)
    return dot_general_f64(x, w, dn)


def random_codes(rng, shape, fmt):
    """Random finite FP8 codes (never all zeros, no NaN/inf)."""
    dt = ref.DTYPES[fmt]
    vals = rng.standard_normal(shape).astype(np.float32) * (ref.MAX[fmt] / 8)
    return np.clip(vals, -ref.MAX[fmt], ref.MAX[fmt]).astype(dt)


def check(got, want, tol=1e-5):
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    if want.size == 0:
        return
    scale = max(np.abs(want).max(), 1e-30)
    err = np.abs(got - want).max() / scale
    assert err <= tol, err


KEY_PATTERNS = {
    # name: (lhs shape, rhs shape, dimension numbers, output-channel axes of rhs)
    "qkv": ((2, 3, 64), (4, 64, 32), (([2], [1]), ([], [])), (0, 2)),
    "attn_out": ((2, 3, 4, 32), (4, 32, 48), (([3, 2], [1, 0]), ([], [])), (2,)),
    "ffn": ((2, 3, 64), (64, 96), (([2], [0]), ([], [])), (1,)),
    "tied_logits": ((1, 3, 64), (500, 64), (([2], [1]), ([], [])), (0,)),
    "batched": ((5, 3, 40), (5, 40, 7), (([2], [1]), ([0], [0])), (0, 2)),
    "lhs_k_first": ((40, 3), (40, 9), (([0], [0]), ([], [])), (1,)),
}


@pytest.mark.parametrize("pattern", sorted(KEY_PATTERNS))
@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("a_scale", [None, 0.05])
def test_dimension_patterns(pattern, fmt, per_channel, a_scale, rng):
    ls, rs, dn, ch = KEY_PATTERNS[pattern]
    x = rng.standard_normal(ls).astype(np.float32) * 3
    w = rng.standard_normal(rs).astype(np.float32) * 0.2
    codes, scale = ops.quantize_weight(w, fmt, ch if per_channel else None)
    got = jax.jit(lambda a, q: ops.fp8_matmul(a, q, scale, dn, a_scale=a_scale))(x, codes)
    want = fake_quant_reference(x, codes, scale, dn, a_scale, fmt, ch if per_channel else None)
    check(got, want)


@pytest.mark.parametrize("pattern", sorted(KEY_PATTERNS))
@pytest.mark.parametrize("a_scale", [None, 0.05])
def test_scales_along_one_free_dim(pattern, a_scale, rng):
    """`w_scale_dim`: one scale per index of one rhs free dim, whichever it is (a run of
    columns per scale when it is not the last free dim, repeated per batch)."""
    ls, rs, dn, _ = KEY_PATTERNS[pattern]
    (_, rc), (_, rb) = dn
    x = rng.standard_normal(ls).astype(np.float32) * 3
    w = rng.standard_normal(rs).astype(np.float32) * 0.2
    free = [d for d in range(len(rs)) if d not in rc and d not in rb]
    for d in free:
        codes, scale = ops.quantize_weight(w, "e4m3fn", d)
        assert scale.shape == (rs[d],)
        got = jax.jit(lambda a, q, s, d=d: ops.fp8_matmul(a, q, s, dn, a_scale=a_scale,
                                                           w_scale_dim=d))(x, codes, scale)
        want = fake_quant_reference(x, codes, scale, dn, a_scale, "e4m3fn", (d,))
        check(got, want)


M_SIZES = [0, 1, 3, 17, 512]
K_SIZES = [1, 15, 640, 2048]
N_SIZES = [1, 7, 256, 2048]


@pytest.mark.parametrize("m", M_SIZES)
@pytest.mark.parametrize("k", K_SIZES)
@pytest.mark.parametrize("n", N_SIZES)
def test_shapes_that_hurt(m, k, n, rng):
    if m * k * n > 512 * 640 * 2048:
        pytest.skip("largest products covered by the 640/2048 cases")
    fmt = "e4m3fn" if (m + k + n) % 2 else "e5m2"
    x = rng.standard_normal((m, k)).astype(np.float32)
    codes = random_codes(rng, (k, n), fmt)
    got = ops.fp8_matmul(x, codes, 0.01)
    check(got, fake_quant_reference(x, codes, 0.01, (([1], [0]), ([], []))))


def test_logits_shape_m1(rng):
    x = rng.standard_normal((1, 1, 640)).astype(np.float32)
    codes = random_codes(rng, (262144, 640), "e4m3fn")
    dn = (([2], [1]), ([], []))
    got = jax.jit(lambda a, q: ops.fp8_matmul(a, q, 0.003, dn))(x, codes)
    check(got, fake_quant_reference(x, codes, 0.003, dn))


def test_bf16_in_and_out(rng):
    x = rng.standard_normal((5, 64)).astype(ml_dtypes.bfloat16)
    codes = random_codes(rng, (64, 33), "e4m3fn")
    got = ops.fp8_matmul(x, codes, 0.02)
    assert got.dtype == jnp.bfloat16
    want = fake_quant_reference(x.astype(np.float32), codes, 0.02, (([1], [0]), ([], [])))
    check(got, want, tol=1e-2)
    got32 = ops.fp8_matmul(x, codes, 0.02, out_dtype=jnp.float32)
    check(got32, want)
    # With an activation scale: the bfloat16 lhs is widened, then QDQ-ed.
    got_q = ops.fp8_matmul(x, codes, 0.02, a_scale=0.05, out_dtype=jnp.float32)
    want_q = fake_quant_reference(x.astype(np.float32), codes, 0.02, (([1], [0]), ([], [])),
                                  a_scale=0.05)
    check(got_q, want_q)


def test_nan_weight_code_propagates(rng):
    x = rng.standard_normal((2, 16)).astype(np.float32)
    codes = random_codes(rng, (16, 4), "e4m3fn")
    codes.view(np.uint8)[3, 1] = 0x7F  # NaN
    got = np.asarray(ops.fp8_matmul(x, codes, 1.0))
    assert np.isnan(got[:, 1]).all() and np.isfinite(np.delete(got, 1, axis=1)).all()


def raw(out_shape, *args, **attrs):
    out = jax.ShapeDtypeStruct(out_shape, jnp.float32)
    return jax.block_until_ready(jax.ffi.ffi_call("fp8xla_matmul", out)(*args, **attrs))


def dims(lc, rc, lb=(), rb=()):
    return dict(lhs_contracting_dims=np.array(lc, np.int64), rhs_contracting_dims=np.array(rc, np.int64),
                lhs_batching_dims=np.array(lb, np.int64), rhs_batching_dims=np.array(rb, np.int64))


X = np.ones((2, 8), np.float32)
W = np.ones((8, 4), ml_dtypes.float8_e4m3fn)


@pytest.mark.parametrize("case,match", [
    (lambda: raw((2, 4), X, np.ones((9, 4), ml_dtypes.float8_e4m3fn), w_scale=np.float32(1), **dims([1], [0])),
     "contracting dimension sizes differ: operand 0 \\(lhs\\) dim 1 has size 8 but operand 1 \\(rhs\\) dim 0 has size 9"),
    (lambda: raw((2, 4), X, W.astype(np.float32), w_scale=np.float32(1), **dims([1], [0])),
     "operand 1 \\(rhs\\): expected dtype float8_e4m3fn or float8_e5m2, got float32"),
    (lambda: raw((2, 4), X.astype(np.int32), W, w_scale=np.float32(1), **dims([1], [0])),
     "operand 0 \\(lhs\\): expected dtype float32 or bfloat16, got int32"),
    (lambda: raw((2, 4), X, W, np.ones(3, np.float32), **dims([1], [0])),
     "operand 2 \\(w_scale\\): expected 4 float32 per-channel scales"),
    (lambda: raw((2, 4), X, W, np.array([1, 1, np.nan, 1], np.float32), **dims([1], [0])),
     "operand 2 \\(w_scale\\): scale 2 must be finite and > 0, got NaN"),
    (lambda: raw((2, 4), X, W, w_scale=np.float32(np.inf), **dims([1], [0])),
     "attribute `w_scale`: expected a finite positive float, got inf"),
    (lambda: raw((2, 4), X, W, w_scale=np.float32(1), a_scale=np.float32(-2), **dims([1], [0])),
     "attribute `a_scale`: expected a finite positive float, got -2"),
    (lambda: raw((2, 4), X, W, w_scale=np.float32(1), **dims([2], [0])),
     "attribute `lhs_contracting_dims`: dimension 2 is out of range for rank 2"),
    (lambda: raw((2, 4), X, W, **dims([1], [0])), "missing weight scale"),
    (lambda: raw((2, 5), X, W, w_scale=np.float32(1), **dims([1], [0])),
     "result 0: expected shape \\[2, 4\\]"),
    (lambda: raw((2, 4), X, W, w_scale=np.float32(1), lhs_contracting_dims=np.array([1], np.int64)),
     "missing attribute `rhs_contracting_dims`"),
    (lambda: raw((2, 4), X, W, w_scale=np.float32(1), bogus=np.int64(1), **dims([1], [0])),
     "unknown attribute `bogus`"),
])
def test_bad_input_is_a_clear_error(case, match):
    with pytest.raises(jax.errors.JaxRuntimeError, match=match) as e:
        case()
    assert "fp8xla_matmul" in str(e.value)


def test_python_checks():
    with pytest.raises(ValueError, match="contracting dims differ"):
        ops.fp8_matmul(np.ones((2, 8), np.float32), np.ones((9, 4), ml_dtypes.float8_e4m3fn), 1.0)
    with pytest.raises(TypeError, match="`rhs` must be float8_e4m3fn or float8_e5m2"):
        ops.fp8_matmul(np.ones((2, 8), np.float32), np.ones((8, 4), np.float32), 1.0)
    with pytest.raises(ValueError, match="per-channel `w_scale` must have 4 entries"):
        ops.fp8_matmul(np.ones((2, 8), np.float32), W, np.ones(3, np.float32))
