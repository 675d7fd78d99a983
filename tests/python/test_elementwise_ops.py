"""fp8xla_quantize / _dequantize / _qdq / _observe through jax.jit against ml_dtypes."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp8xla
from fp8xla import ops

import fp8_reference as ref

FORMATS = ["e4m3fn", "e5m2"]
SCALES = [1.0, 0.37, 3.1e-3, 1234.5]


def random_f32(rng, n):
    """Random bit patterns (every class of float32, NaN and inf included) mixed with
    values spread over the fp8 range."""
    bits = rng.integers(0, 2**32, size=n // 2, dtype=np.uint64).astype(np.uint32).view(np.float32)
    spread = (rng.standard_normal(n - n // 2) * np.exp2(rng.uniform(-30, 20, n - n // 2)))
    return np.concatenate([bits, spread.astype(np.float32)])


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_all_256_codes_equals_ml_dtypes(fmt):
    codes = np.arange(256, dtype=np.uint8).view(ref.DTYPES[fmt])
    f = jax.jit(lambda q: ops.dequantize(q, 1.0))
    got = np.asarray(f(codes))
    want = codes.astype(np.float32)
    assert ref.same_bits_or_nan(got, want).all()
    for scale in SCALES[1:]:
        got = np.asarray(jax.jit(lambda q: ops.dequantize(q, scale))(codes))
        assert ref.same_bits_or_nan(got, ref.dequantize(codes, scale)).all(), scale


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_to_bf16(fmt, rng):
    codes = rng.integers(0, 256, 5000, dtype=np.uint8).view(ref.DTYPES[fmt])
    for scale in SCALES:
        got = np.asarray(ops.dequantize(codes, scale, jnp.bfloat16))
        want = ref.dequantize(codes, scale, ml_dtypes.bfloat16)
        assert ref.same_bits_or_nan(got, want).all(), scale


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_million_values_bit_exact(fmt, rng):
    x = np.concatenate([random_f32(rng, 1_000_000), ref.edge_values(fmt)])
    assert x.size > 1_000_000
    for scale in SCALES:
        for vals in (x, ref.edge_values(fmt) * np.float32(scale)):
            got = np.asarray(jax.jit(lambda v: ops.quantize(v, scale, fmt))(vals))
            want = ref.quantize(vals, scale, fmt)
            ok = ref.same_bits_or_nan(got, want)
            assert ok.all(), (scale, vals[~ok][:5], got[~ok][:5], want[~ok][:5])


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_bf16_input_bit_exact(fmt, rng):
    bits = np.arange(2**16, dtype=np.uint16).view(ml_dtypes.bfloat16)
    for scale in SCALES:
        got = np.asarray(ops.quantize(bits, scale, fmt))
        ok = ref.same_bits_or_nan(got, ref.quantize(bits, scale, fmt))
        assert ok.all(), scale


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_qdq_equals_reference(fmt, dtype, rng):
    x = (rng.standard_normal(70_001) * 50).astype(dtype)
    for scale in SCALES:
        got = np.asarray(jax.jit(lambda v: ops.qdq(v, scale, fmt))(x))
        assert got.dtype == x.dtype
        assert ref.same_bits_or_nan(got, ref.qdq(x, scale, fmt)).all(), scale


SHAPES = [(), (0,), (1,), (7,), (3, 0, 2), (1, 1), (5, 17), (2, 3, 33), (2, 1, 3, 65)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_every_op_on_ranks_0_to_4(shape, dtype, rng):
    x = (rng.standard_normal(shape) * 100).astype(dtype)
    for fmt in FORMATS:
        scale = 0.25
        q = jax.jit(lambda v: ops.quantize(v, scale, fmt))(x)
        assert q.shape == shape and q.dtype == ref.DTYPES[fmt]
        assert ref.same_bits_or_nan(np.asarray(q), ref.quantize(x, scale, fmt)).all()
        d = jax.jit(lambda v: ops.dequantize(v, scale, dtype))(q)
        assert d.shape == shape and d.dtype == dtype
        want_d = ref.dequantize(ref.quantize(x, scale, fmt), scale, dtype)
        assert ref.same_bits_or_nan(np.asarray(d), want_d).all()
        y = jax.jit(lambda v: ops.qdq(v, scale, fmt))(x)
        assert ref.same_bits_or_nan(np.asarray(y), ref.qdq(x, scale, fmt)).all()
    o = jax.jit(lambda v: ops.observe(v, 3))(x)
    assert ref.same_bits_or_nan(np.asarray(o), x).all()


def test_large_tensor_runs_in_parallel_and_matches(rng):
    # Large enough to be split across XLA's intra-op pool.
    x = (rng.standard_normal((1024, 1031)) * 30).astype(np.float32)
    got = np.asarray(jax.jit(lambda v: ops.quantize(v, 0.1, "e4m3fn"))(x))
    assert ref.same_bits_or_nan(got, ref.quantize(x, 0.1, "e4m3fn")).all()


def test_observe_records_max_abs_per_site(rng):
    ops.reset_observer()
    a = (rng.standard_normal((4, 300)) * 7).astype(np.float32)
    b = (rng.standard_normal(200_000) * 3).astype(np.float32)
    b[17] = np.nan
    b[18] = -np.inf

    @jax.jit
    def f(a, b):
        return ops.observe(a, 11) * 2, ops.observe(b, 12)

    ya, yb = f(a, b)
    np.testing.assert_array_equal(np.asarray(ya), a * 2)
    stats = ops.observer_stats()
    assert set(stats) == {11, 12}
    assert stats[11].amax == np.abs(a).max() and stats[11].count == a.size
    finite = b[np.isfinite(b)]
    assert stats[12].amax == np.abs(finite).max()
    assert stats[12].nonfinite == 2 and stats[12].count == b.size
    jax.block_until_ready(f(a * 3, b))  # a second call keeps the running maximum
    assert ops.observer_stats()[11].amax == np.abs(a * 3).max()
    assert ops.observer_stats()[11].count == 2 * a.size
    ops.reset_observer()
    assert ops.observer_stats() == {}


def test_scale_for_follows_inc():
    assert ops.scale_for(448.0, "e4m3fn") == 1.0
    assert ops.scale_for(0.0) == 1.0
    assert ops.scale_for(57344.0 * 2, "e5m2") == 2.0
    with pytest.raises(ValueError):
        ops.scale_for(float("nan"))


def test_isa_reports_a_known_level():
    assert fp8xla.isa() in ("scalar", "avx2", "avx512")
