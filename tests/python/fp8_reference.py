"""Reference FP8 numerics computed with ml_dtypes/numpy only (never with fp8xla)."""
import ml_dtypes
import numpy as np

DTYPES = {"e4m3fn": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}
MAX = {"e4m3fn": 448.0, "e5m2": 57344.0}


def quantize(x, scale, fmt):
    """np.clip(x / scale, -max, max).astype(fmt), with x promoted to float32 first."""
    x = np.asarray(x).astype(np.float32)
    m = np.float32(MAX[fmt])
    return np.clip(x / np.float32(scale), -m, m).astype(DTYPES[fmt])


def dequantize(q, scale, out_dtype=np.float32):
    y = q.astype(np.float32) * np.float32(scale)
    return y.astype(out_dtype)


def qdq(x, scale, fmt):
    return dequantize(quantize(x, scale, fmt), scale, np.asarray(x).dtype)


def same_bits_or_nan(a, b):
    """Element-wise: equal bit patterns, or both NaN."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    nan = np.isnan(a.astype(np.float32)) & np.isnan(b.astype(np.float32))
    ia = a.view(f"u{a.dtype.itemsize}")
    ib = b.view(f"u{b.dtype.itemsize}")
    return (ia == ib) | nan


def edge_values(fmt):
    """±0, f32 and fp8 subnormals, every fp8 value and the exact midpoints between
    neighbours (with their float32 neighbours), ±max, beyond max, ±inf, NaN."""
    dt = DTYPES[fmt]
    codes = np.arange(256, dtype=np.uint8).view(dt).astype(np.float32)
    finite = np.unique(codes[np.isfinite(codes)])
    mids = (finite[:-1].astype(np.float64) + finite[1:]) / 2
    mids = mids.astype(np.float32)
    around = np.concatenate(
        [mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))]
    )
    tiny = np.array([1e-45, 1e-40, 1.1754942e-38, 1.17549435e-38], np.float32)
    m = np.float32(MAX[fmt])
    special = np.array(
        [0.0, -0.0, m, -m, m * 1.0001, -m * 1.5, m * 4, 3.4e38, np.inf, -np.inf, np.nan],
        np.float32,
    )
    vals = np.concatenate([finite, around, tiny, -tiny, special])
    return vals.astype(np.float32)
