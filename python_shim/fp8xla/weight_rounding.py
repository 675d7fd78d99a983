"""FP8 codes and scales of a weight, past round-to-nearest with amax scales (host side, numpy).

Model-agnostic: everything here takes plain arrays, so the Keras quantizer and any other
front end share it.

- :func:`search_scales`: per channel (or per tensor), the scale among 16 candidates
  ``amax / max * f``, ``f`` in ``[17/32, 1]``, that minimises the squared reconstruction error
  ``||w - s * fp8(w / s)||²``. Multiplying a scale by 2 maps the FP8 grid onto itself (up to
  clipping and subnormals), so one binade of candidates covers every placement of the grid;
  ``f = 1`` (the amax scale) is a candidate, so the search never does worse than amax.
- :func:`gptq`: GPTQ (Frantar et al., 2022) on the FP8 grid: with the Gram matrix
  ``H = XᵀX`` of the layer's calibration inputs, rows of ``W[K, N]`` (one per input channel)
  are rounded one at a time to the nearest FP8 value and each row's error is fed back into the
  rows not yet rounded through the Cholesky factor of ``H⁻¹`` (damped), so that ``X @ W``
  rather than ``W`` is kept close. Columns (outputs) are independent, so they are processed in
  chunks that fit in cache. With ``act_order`` the rows are rounded in order of decreasing
  input energy (the Gram matrix's diagonal), as GPTQ's "act-order": the high-energy inputs
  (Gemma's outlier channels) are rounded first, while every other row can still absorb
  their error. The scales are per output column, so the order changes no scale.

Codes are returned as ml_dtypes FP8 arrays; ``codes.astype(f32) * scale`` is the weight.
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np

__all__ = ["amax_scales", "dequantize", "from_kernel_matrix", "gptq", "kernel_matrix",
           "reconstruction_error", "round_to_nearest", "search_scales"]

_DTYPES = {"e4m3fn": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}
SEARCH_FACTORS = 1.0 - np.arange(16) / 32.0  # 1, 31/32, ..., 17/32


def _dtype(fmt):
    try:
        return _DTYPES[fmt]
    except KeyError:
        raise ValueError(f"fp8xla.weight_rounding: unknown FP8 format {fmt!r}; expected one of "
                         f"{sorted(_DTYPES)}") from None


def max_of(fmt) -> float:
    return float(ml_dtypes.finfo(_dtype(fmt)).max)


def _to_codes(x, fmt):
    """Saturating round-to-nearest-even of ``x`` (already divided by its scale)."""
    m = np.float32(max_of(fmt))
    return np.clip(x, -m, m).astype(_dtype(fmt))


def _channels_first(w, channel_dim):
    """``w`` as ``[channels, rest]`` (one row per scale); ``[1, size]`` per tensor."""
    w = np.asarray(w, np.float32)
    if channel_dim is None:
        return w.reshape(1, -1)
    return np.moveaxis(w, channel_dim, 0).reshape(w.shape[channel_dim], -1)


def amax_scales(w, fmt, channel_dim=None):
    """INC's scales, ``amax / max`` (1 where amax is 0): a float, or one per channel."""
    rows = _channels_first(w, channel_dim)
    amax = np.max(np.abs(rows), axis=1, initial=0.0)
    s = np.where(amax == 0, np.float32(1), amax / np.float32(max_of(fmt))).astype(np.float32)
    return float(s[0]) if channel_dim is None else s


def broadcast_scale(scale, shape, channel_dim):
    if channel_dim is None:
        return np.float32(scale)
    view = [1] * len(shape)
    view[channel_dim] = shape[channel_dim]
    return np.asarray(scale, np.float32).reshape(view)


def round_to_nearest(w, fmt, scale, channel_dim=None):
    """FP8 codes of ``w / scale`` (saturating round-to-nearest-even)."""
    w = np.asarray(w, np.float32)
    return _to_codes(w / broadcast_scale(scale, w.shape, channel_dim), fmt)


def dequantize(codes, scale, channel_dim=None):
    return codes.astype(np.float32) * broadcast_scale(scale, codes.shape, channel_dim)


def reconstruction_error(w, fmt, scale, channel_dim=None):
    """``sum((w - dequantize(round_to_nearest(w)))²)`` per channel (float64)."""
    rows = _channels_first(w, channel_dim)
    s = np.asarray(scale, np.float32).reshape(-1, 1)
    q = _to_codes(rows / s, fmt).astype(np.float32) * s
    return np.sum(np.square(rows - q, dtype=np.float64), axis=1)


def kernel_matrix(w, contract):
    """``w`` as the matrix ``[K, N]`` of a product that contracts its axes ``contract`` (in
    that order, they make K), the other axes (in order) making N."""
    w = np.asarray(w)
    free = [a for a in range(w.ndim) if a not in contract]
    k = int(np.prod([w.shape[a] for a in contract]))
    return np.transpose(w, list(contract) + free).reshape(k, -1)


def from_kernel_matrix(m, shape, contract):
    """The inverse of :func:`kernel_matrix` for a weight of ``shape``."""
    free = [a for a in range(len(shape)) if a not in contract]
    order = list(contract) + free
    return np.transpose(m.reshape([shape[a] for a in order]), np.argsort(order))


def search_scales(w, fmt, channel_dim=None, chunk_elements=1 << 22):
    """The scale (per tensor: a float; per channel along ``channel_dim``: float32 array) among
    ``amax / max * SEARCH_FACTORS`` with the least squared reconstruction error; ties keep the
    larger scale."""
    rows = _channels_first(w, channel_dim)
    if not np.all(np.isfinite(rows)):
        raise ValueError("fp8xla.weight_rounding.search_scales: the weight has NaN or inf")
    base = np.asarray(amax_scales(w, fmt, channel_dim), np.float32).reshape(-1)
    best = base.copy()
    step = max(1, chunk_elements // max(1, rows.shape[1]))
    for lo in range(0, rows.shape[0], step):
        r = rows[lo:lo + step]
        b = base[lo:lo + step]
        best_err = np.full(len(r), np.inf)
        for f in SEARCH_FACTORS:
            s = (b * np.float32(f))[:, None]
            err = np.sum(np.square(r - _to_codes(r / s, fmt).astype(np.float32) * s,
                                   dtype=np.float64), axis=1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best[lo:lo + step] = np.where(better, s[:, 0], best[lo:lo + step])
    return float(best[0]) if channel_dim is None else best


def gptq(w, gram, fmt, scale, *, damp=0.01, act_order=False, block=128, chunk_columns=4096,
         progress=None):
    """FP8 codes of ``w`` ``[K, N]`` (K inputs, N outputs) by GPTQ with Gram matrix ``gram``
    ``[K, K]`` (``XᵀX`` of the calibration inputs) and per-column scales ``scale`` (a float,
    or ``[N]``).

    ``damp`` is added to the diagonal as a fraction of its mean, after inputs that never
    fired (zero diagonal: "dead" inputs, which make ``XᵀX`` singular) get a diagonal of 1:
    their rows are rounded to nearest and take no feedback. ``act_order`` rounds the rows in
    order of decreasing diagonal of the Gram matrix (ties keep their order); the codes come
    back in ``w``'s order. ``progress(done, total)`` is called after each chunk of columns."""
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"fp8xla.weight_rounding.gptq: w must be [K, N], got shape {w.shape}")
    k, n = w.shape
    h = np.array(gram, np.float64)
    if h.shape != (k, k):
        raise ValueError(f"fp8xla.weight_rounding.gptq: gram must be [{k}, {k}] for w "
                         f"{w.shape}, got {h.shape}")
    if not (np.all(np.isfinite(h)) and np.all(np.isfinite(w))):
        raise ValueError("fp8xla.weight_rounding.gptq: NaN or inf in the weight or the Gram "
                         "matrix")
    if not damp > 0 or not math.isfinite(damp):
        raise ValueError(f"fp8xla.weight_rounding.gptq: damp must be finite and > 0, got {damp}")
    scale = np.broadcast_to(np.asarray(scale, np.float32), (n,))
    if not np.all(np.isfinite(scale) & (scale > 0)):
        raise ValueError("fp8xla.weight_rounding.gptq: scales must be finite and > 0")
    h = (h + h.T) / 2
    dead = np.diag(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    order = np.argsort(-np.diag(h), kind="stable") if act_order else None
    if order is not None:
        h, w = h[np.ix_(order, order)], w[order]
    # U upper-triangular with UᵀU = H⁻¹; row i of U holds the feedback weights of row i.
    hinv = _cholesky_inverse_upper(h).astype(np.float32)
    codes = np.empty((k, n), _dtype(fmt))
    for c0 in range(0, n, chunk_columns):
        c1 = min(n, c0 + chunk_columns)
        codes[:, c0:c1] = _gptq_columns(w[:, c0:c1].copy(), hinv, scale[c0:c1], fmt, block)
        if progress is not None:
            progress(c1, n)
    if order is None:
        return codes
    out = np.empty_like(codes)
    out[order] = codes  # back to w's row order
    return out


def _cholesky_inverse_upper(h):
    """Upper-triangular U with ``UᵀU = inv(h)``, as GPTQ uses it (h symmetric positive
    definite after damping)."""
    try:
        lower = np.linalg.cholesky(h)
    except np.linalg.LinAlgError as e:
        raise ValueError(f"fp8xla.weight_rounding.gptq: the damped Gram matrix is not positive "
                         f"definite ({e}); use a larger damp") from e
    eye = np.eye(len(h))
    inv_lower = np.linalg.solve(lower, eye)
    hinv = inv_lower.T @ inv_lower
    return np.linalg.cholesky(hinv).T


def _gptq_columns(w, hinv, scale, fmt, block):
    k = w.shape[0]
    codes = np.empty(w.shape, _dtype(fmt))
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        w1 = w[b0:b1]
        err = np.empty_like(w1)
        for i in range(b1 - b0):
            row = w1[i]
            c = _to_codes(row / scale, fmt)
            codes[b0 + i] = c
            e = (row - c.astype(np.float32) * scale) / hinv[b0 + i, b0 + i]
            err[i] = e
            w1[i + 1:] -= np.outer(hinv[b0 + i, b0 + i + 1:b1], e)
        w[b1:] -= hinv[b0:b1, b1:].T @ err
    return codes
