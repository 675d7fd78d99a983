"""The FP8 KV cache: `fp8xla_quantize_rows` and `fp8xla_dot_f32` on FP8 codes against
ml_dtypes / float64 NumPy references, and the pass `fp8_kv_cache` on a decode loop against a
fake-quant reference (each cache row QDQ'd with its own scale, attention in float64): every
position written and read, the first and the last, with a sliding window."""
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp8xla  # noqa: F401  (registers the targets)
from fp8xla import graph, ops
from fp8xla.config import DynamicQuantConfig, StaticQuantConfig

from fp8_reference import DTYPES, MAX, same_bits_or_nan
from test_dot_f32 import CASES
from test_matmul import dot_general_f64

FMTS = ["e4m3fn", "e5m2"]


def row_scales_ref(x, fmt):
    """amax of each row's finite values / max of the format (float32), 1 for amax 0."""
    x = np.asarray(x, np.float32)
    finite = np.where(np.isfinite(x), np.abs(x), np.float32(0))
    amax = finite.max(axis=-1, initial=np.float32(0)).astype(np.float32)
    s = (amax / np.float32(MAX[fmt])).astype(np.float32)
    return np.where(s > 0, s, np.float32(1)).astype(np.float32)


def quantize_rows_ref(x, fmt):
    s = row_scales_ref(x, fmt)
    m = np.float32(MAX[fmt])
    q = np.clip(np.asarray(x, np.float32) / s[..., None], -m, m).astype(DTYPES[fmt])
    return q, s


def qdq_rows_ref(x, fmt):
    q, s = quantize_rows_ref(x, fmt)
    return (q.astype(np.float32) * s[..., None]).astype(np.float32)


# --- fp8xla_quantize_rows -------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("shape", [(1,), (7,), (0, 5), (3, 1), (2, 5, 1, 33), (4, 0)])
def test_quantize_rows_matches_ml_dtypes(fmt, shape, rng):
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 100, shape[:-1] + (1,))).astype(np.float32)
    if x.size >= 8:
        flat = x.reshape(-1)
        flat[1], flat[3], flat[5] = np.nan, np.inf, -np.inf
    q, s = jax.jit(lambda v: ops.quantize_rows(v, fmt))(x)
    want_q, want_s = quantize_rows_ref(x, fmt)
    assert q.dtype == DTYPES[fmt] and s.dtype == np.float32 and s.shape == shape[:-1]
    np.testing.assert_array_equal(np.asarray(s), want_s)
    assert same_bits_or_nan(np.asarray(q), want_q).all()


def test_quantize_rows_zero_and_huge_rows():
    x = np.array([[0.0, -0.0, 0.0], [3e38, -3e38, 1.0], [1e-30, 0.0, -2e-30]], np.float32)
    q, s = ops.quantize_rows(x, "e4m3fn")
    want_q, want_s = quantize_rows_ref(x, "e4m3fn")
    np.testing.assert_array_equal(np.asarray(s), want_s)
    assert np.asarray(s)[0] == 1.0
    assert same_bits_or_nan(np.asarray(q), want_q).all()


def _raw_rows(x, outs):
    return jax.block_until_ready(jax.ffi.ffi_call("fp8xla_quantize_rows", outs)(x))


E4 = ml_dtypes.float8_e4m3fn
X = np.ones((3, 4), np.float32)


@pytest.mark.parametrize("case,match", [
    (lambda: _raw_rows(X.astype(np.int32), (jax.ShapeDtypeStruct((3, 4), E4),
                                           jax.ShapeDtypeStruct((3,), np.float32))),
     "operand 0 \\(x\\): expected dtype float32, got int32"),
    (lambda: _raw_rows(X, (jax.ShapeDtypeStruct((3, 4), np.float32),
                           jax.ShapeDtypeStruct((3,), np.float32))),
     "result 0 \\(q\\): expected dtype float8_e4m3fn or float8_e5m2, got float32"),
    (lambda: _raw_rows(X, (jax.ShapeDtypeStruct((3, 4), E4),
                           jax.ShapeDtypeStruct((4,), np.float32))),
     "result 1 \\(scales\\): expected shape \\[3\\]"),
    (lambda: _raw_rows(X, (jax.ShapeDtypeStruct((3, 5), E4),
                           jax.ShapeDtypeStruct((3,), np.float32))),
     "result 0 \\(q\\): expected shape \\[3, 4\\]"),
    (lambda: _raw_rows(np.float32(1), (jax.ShapeDtypeStruct((), E4),
                                       jax.ShapeDtypeStruct((), np.float32))),
     "expected rank at least 1"),
    (lambda: _raw_rows(X, (jax.ShapeDtypeStruct((3, 4), E4),)), "expected 2 result"),
])
def test_quantize_rows_bad_input_is_a_clear_error(case, match):
    with pytest.raises(jax.errors.JaxRuntimeError, match=match) as e:
        case()
    assert "fp8xla_quantize_rows" in str(e.value)


def test_quantize_rows_python_checks():
    with pytest.raises(TypeError, match="quantize_rows: `x` must be float32"):
        ops.quantize_rows(np.ones(3, np.float16))
    with pytest.raises(ValueError, match="rank >= 1"):
        ops.quantize_rows(np.float32(2))


# --- fp8xla_dot_f32 on FP8 codes ------------------------------------------------------------

def _codes(rng, shape, fmt):
    """Random finite codes of `fmt`."""
    c = rng.integers(0, 256, size=shape, dtype=np.uint8).view(DTYPES[fmt])
    return np.where(np.isfinite(c.astype(np.float32)), c, DTYPES[fmt](1.0)).astype(DTYPES[fmt])


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("ls,rs,dn", CASES)
def test_dot_on_fp8_codes_matches_float64(fmt, ls, rs, dn):
    rng = np.random.default_rng(zlib.crc32(repr((ls, rs, fmt)).encode()))
    lhs = rng.standard_normal(ls).astype(np.float32)
    rhs = rng.standard_normal(rs).astype(np.float32)
    # The larger operand (the rhs on a tie) streams: it holds the codes.
    if np.prod(ls) > np.prod(rs):
        lhs = _codes(rng, ls, fmt)
    else:
        rhs = _codes(rng, rs, fmt)
    got = np.asarray(jax.jit(lambda a, b: ops.dot_f32(a, b, dn))(lhs, rhs))
    a, b = lhs.astype(np.float32), rhs.astype(np.float32)
    want = dot_general_f64(a, b, dn)
    # float32 sums of these terms: within a few ulps of the sum of their magnitudes
    bound = 1e-5 * dot_general_f64(np.abs(a), np.abs(b), dn)
    assert got.shape == want.shape and got.dtype == np.float32
    assert (np.abs(got - want) <= bound).all(), np.abs(got - want).max()


def test_nan_code_reaches_only_its_outputs(rng):
    keys = _codes(rng, (1, 64, 1, 32), "e4m3fn")
    keys.view(np.uint8)[0, 10, 0, 5] = 0x7F  # NaN
    q = rng.standard_normal((1, 1, 1, 4, 32)).astype(np.float32)
    dn = (((3,), (4,)), ((0, 2), (0, 2)))
    got = np.asarray(ops.dot_f32(keys, q, dn))  # [1, 1, 64, 1, 4]
    assert np.isnan(got[0, 0, 10]).all()
    assert np.isfinite(np.delete(got, 10, axis=2)).all()


def test_fp8_on_the_small_side_is_a_clear_error():
    out = jax.ShapeDtypeStruct((4, 64), np.float32)
    call = jax.ffi.ffi_call("fp8xla_dot_f32", out)
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match="operand 0 \\(lhs\\): expected dtype float32 \\(the operand with "
                             "fewer elements"):
        jax.block_until_ready(call(
            np.ones((4, 16), E4), np.ones((64, 16), np.float32),
            lhs_contracting_dims=np.array([1], np.int64),
            rhs_contracting_dims=np.array([1], np.int64),
            lhs_batching_dims=np.array([], np.int64), rhs_batching_dims=np.array([], np.int64)))


# --- the pass on a decode loop --------------------------------------------------------------

def decode_loop(T, H, G, D, window):
    """A decode loop in Keras-Hub's form: from position `start` on, each step reads the old
    row of each cache, keeps it where `keep` says (Keras-Hub's masked update) or takes the new
    one, writes it, and attends over the caches (causal, sliding window). Returns the outputs
    of every step and the final caches."""

    def fn(k0, v0, ks, vs, qs, keep, start):
        out0 = jnp.zeros((T, 1, 1, H, G, D), jnp.float32)

        def body(carry):
            i, kc, vc, out = carry
            rows = []
            for cache, new in ((kc, ks), (vc, vs)):
                old = jax.lax.dynamic_slice(cache, (0, i, 0, 0), (1, 1, H, D))
                rows.append(jnp.where(keep[i], old, new[i]))
            kc = jax.lax.dynamic_update_slice(kc, rows[0], (0, i, 0, 0))
            vc = jax.lax.dynamic_update_slice(vc, rows[1], (0, i, 0, 0))
            logits = jnp.einsum("btkgh,bskh->bkgts", qs[i], kc)
            pos = jnp.arange(T)
            mask = (pos <= i) & (pos > i - window)
            logits = jnp.where(mask, logits, jnp.float32(-1e30))
            p = jax.nn.softmax(logits, axis=-1)
            o = jnp.einsum("bkgts,bskh->btkgh", p, vc)
            out = jax.lax.dynamic_update_slice(out, o[None], (i, 0, 0, 0, 0, 0))
            return i + 1, kc, vc, out

        _, kc, vc, out = jax.lax.while_loop(lambda c: c[0] < T, body, (start, k0, v0, out0))
        return out, kc, vc

    return fn


def reference(k0, v0, ks, vs, qs, keep, start, window, fmt):
    """Fake quant: the caches' rows QDQ'd when the loop takes them and when written; the
    attention in float64."""
    T = k0.shape[1]
    kc, vc = qdq_rows_ref(k0, fmt), qdq_rows_ref(v0, fmt)
    out = np.zeros((T,) + qs.shape[1:], np.float64)
    for i in range(start, T):
        for cache, new in ((kc, ks), (vc, vs)):
            row = cache[:, i:i + 1] if keep[i] else new[i]
            cache[:, i:i + 1] = qdq_rows_ref(row, fmt)
        logits = np.einsum("btkgh,bskh->bkgts", qs[i].astype(np.float64), kc.astype(np.float64))
        pos = np.arange(T)
        mask = (pos <= i) & (pos > i - window)
        logits = np.where(mask, logits, -np.inf)
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        out[i] = np.einsum("bkgts,bskh->btkgh", p, vc.astype(np.float64))
    return out, kc, vc


def rewrite(exp, fmt, passes=("update_slices_in_place", "decode_dots")):
    text, report = graph.run_pass("fp8_kv_cache", graph.module_text(exp), {"format": fmt})
    for name in passes:
        text, _ = graph.run_pass(name, text, {"min_bytes": 0} if name == "decode_dots" else {})
    return graph.with_module(exp, text), text, report["handled"]


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("T,H,G,D,window,start", [
    (12, 1, 2, 16, 5, 0),    # every position written in the loop, first to last
    (12, 1, 2, 16, 5, 4),    # a prefill of 4 positions quantized at loop entry
    (9, 1, 1, 9, 3, 1),      # odd head dim
    (10, 2, 2, 8, 4, 2),     # two KV heads: products on a dequantized copy (reported)
])
def test_fp8_cache_attention_equals_fake_quant_reference(fmt, T, H, G, D, window, start, rng):
    scale_rows = rng.uniform(0.05, 20, (T, 1, 1, H, 1))
    ks = (rng.standard_normal((T, 1, 1, H, D)) * scale_rows).astype(np.float32)
    vs = (rng.standard_normal((T, 1, 1, H, D)) * scale_rows).astype(np.float32)
    qs = rng.standard_normal((T, 1, 1, H, G, D)).astype(np.float32)
    k0 = np.zeros((1, T, H, D), np.float32)
    v0 = np.zeros((1, T, H, D), np.float32)
    k0[:, :start] = ks[:start, 0, 0][None]
    v0[:, :start] = vs[:start, 0, 0][None]
    keep = np.zeros(T, bool)
    keep[start + 1::3] = True  # some steps keep the old row (Keras-Hub's masked update)
    k0[:, keep] = (ks[keep, 0, 0] * 1.5)[None]  # which holds other values
    v0[:, keep] = (vs[keep, 0, 0] * 1.5)[None]
    args = (k0, v0, ks, vs, qs, keep, np.int32(start))
    fn = decode_loop(T, H, G, D, window)
    exp = jax.export.export(jax.jit(fn))(*args)
    qexp, text, handled = rewrite(exp, fmt)
    kinds = [h["kind"] for h in handled]
    assert kinds.count("fp8_kv_cache") == 2, handled
    assert "fp8xla_quantize_rows" in text
    fp8_dots = text.count('"fp8xla_dot_f32"')
    assert fp8_dots == (2 if H == 1 else 0), text  # scores and weighted sums
    if H > 1:
        assert kinds.count("kv_cache_dequantized_read") == 2, handled
    got, kc, vc = (np.asarray(x) for x in jax.jit(qexp.call)(*args))
    want, want_k, want_v = reference(k0.copy(), v0.copy(), ks, vs, qs, keep, start, window, fmt)
    # The caches after the loop: every row as the reference wrote it, bit for bit.
    np.testing.assert_array_equal(kc, want_k)
    np.testing.assert_array_equal(vc, want_v)
    tol = 2e-5 * np.abs(want).max()
    np.testing.assert_allclose(got[start:], want[start:], rtol=0, atol=tol)
    # The float32 cache is measurably elsewhere: the comparison can fail.
    plain = np.asarray(jax.jit(fn)(*args)[0])
    assert np.abs(plain[start:] - want[start:]).max() > 20 * tol


def test_pass_options_are_checked():
    exp = jax.export.export(jax.jit(decode_loop(4, 1, 1, 8, 4)))(
        np.zeros((1, 4, 1, 8), np.float32), np.zeros((1, 4, 1, 8), np.float32),
        np.zeros((4, 1, 1, 1, 8), np.float32), np.zeros((4, 1, 1, 1, 8), np.float32),
        np.zeros((4, 1, 1, 1, 1, 8), np.float32), np.zeros(4, bool), np.int32(0))
    with pytest.raises(graph.RewriteError, match="e4m3fn"):
        graph.run_pass("fp8_kv_cache", graph.module_text(exp), {"format": "int8"})
    with pytest.raises(graph.RewriteError, match="format"):
        graph.run_pass("fp8_kv_cache", graph.module_text(exp), {})
    with pytest.raises(graph.RewriteError, match="kv_cache"):
        graph.run_pass("quantize", graph.module_text(exp), {"weights": [], "kv_cache": "fp8"})


# --- the config option ----------------------------------------------------------------------

@pytest.mark.parametrize("cls", [StaticQuantConfig, DynamicQuantConfig])
def test_kv_cache_dtype_option(cls):
    assert cls().kv_cache_dtype is None and cls().kv_format is None
    assert cls(kv_cache_dtype="fp8_e4m3").kv_format == "e4m3fn"
    assert cls(kv_cache_dtype="fp8_e5m2").kv_format == "e5m2"
    for bad in ("fp8", "float8_e4m3fn", "int8", 8, True):
        with pytest.raises(ValueError, match=f"{cls.__name__}: unknown kv_cache_dtype"):
            cls(kv_cache_dtype=bad)
    assert "kv_cache_dtype='fp8_e4m3'" in cls(kv_cache_dtype="fp8_e4m3").describe()


def test_plain_jax_path_refuses_the_option():
    from fp8xla import jax as fj

    with pytest.raises(ValueError, match="kv_cache_dtype='fp8_e4m3' is not supported"):
        fj.quantize(lambda p, x: x @ p["w"], {"w": np.ones((16, 16), np.float32)},
                    np.ones((1, 16), np.float32),
                    config=StaticQuantConfig(activation_dtype=None, kv_cache_dtype="fp8_e4m3"))
