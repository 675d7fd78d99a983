"""Scale search and GPTQ on the FP8 grid (fp8xla.weight_rounding), checked against plain
numpy/ml_dtypes references: errors measured independently in float64, held-out inputs."""
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fp8_reference import DTYPES, MAX, quantize  # noqa: E402
from fp8xla import weight_rounding as wr  # noqa: E402

FORMATS = ["e4m3fn", "e5m2"]


def rtn_error(w, scale_full, fmt):
    """float64 squared error of round-to-nearest with the given (broadcast) scales."""
    q = quantize(w / scale_full, 1.0, fmt).astype(np.float64) * scale_full
    return np.square(w.astype(np.float64) - q)


def amax_scale(w, axis, fmt):
    amax = np.max(np.abs(w), axis=axis, keepdims=True, initial=0.0)
    return np.where(amax == 0, 1, amax / MAX[fmt]).astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape, channel_dim", [
    ((64, 33), 1), ((33, 64), 0), ((1, 1), 0), ((7, 5, 3), 2), ((17, 9), None), ((5, 0), 0)])
def test_search_never_worse_than_amax(fmt, shape, channel_dim, rng):
    w = (rng.standard_t(3, size=shape) * 0.05).astype(np.float32)
    if w.size:
        w.flat[0] = 0.0
        if shape[0] > 3:
            w[2] = 0.0  # an all-zero slice
    s = wr.search_scales(w, fmt, channel_dim)
    axis = None if channel_dim is None else tuple(d for d in range(w.ndim) if d != channel_dim)
    base = amax_scale(w, axis, fmt)
    view = base.shape
    got = np.asarray(s, np.float32).reshape(view)
    assert np.all(got > 0) and np.all(np.isfinite(got))
    err_search = rtn_error(w, got, fmt).sum(axis=axis)
    err_amax = rtn_error(w, base, fmt).sum(axis=axis)
    assert np.all(err_search <= err_amax)
    # and it is one of the candidates
    ratio = got / base
    assert np.all(np.min(np.abs(ratio[..., None] - wr.SEARCH_FACTORS), axis=-1) < 1e-6)


def test_search_helps_on_gemma_like_rows(rng):
    # heavy-tailed rows: the search finds strictly better scales for a good share of them
    w = (rng.standard_t(4, size=(200, 640)) * 0.02).astype(np.float32)
    s = wr.search_scales(w, "e4m3fn", 0)
    base = amax_scale(w, 1, "e4m3fn")
    e_search = rtn_error(w, s[:, None], "e4m3fn").sum(1)
    e_amax = rtn_error(w, base, "e4m3fn").sum(1)
    assert (e_search < e_amax).mean() > 0.1
    assert e_search.sum() < e_amax.sum()


def test_search_rejects_nonfinite():
    with pytest.raises(ValueError, match="search_scales: the weight has NaN or inf"):
        wr.search_scales(np.array([[1.0, np.nan]], np.float32), "e4m3fn", 0)


def mixing(rng, k):
    return rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k)


def correlated_inputs(rng, n, k, mix=None):
    # correlated channels, a few large ones: what makes GPTQ's feedback worth it
    mix = mixing(rng, k) if mix is None else mix
    x = rng.normal(size=(n, k)) @ mix
    x[:, : max(1, k // 16)] *= 8
    return x.astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k, n", [(96, 40), (33, 7), (130, 1)])
def test_gptq_beats_round_to_nearest_on_held_out_inputs(fmt, k, n, rng):
    w = (rng.normal(size=(k, n)) * 0.1).astype(np.float32)
    mix = mixing(rng, k)
    x_cal = correlated_inputs(rng, 4 * k, k, mix)
    x_test = correlated_inputs(np.random.default_rng(99), 2000, k, mix)  # other samples
    scale = amax_scale(w, 0, fmt)[0]
    gram = x_cal.astype(np.float64).T @ x_cal
    codes = wr.gptq(w, gram, fmt, scale, block=32)
    assert codes.dtype == DTYPES[fmt] and codes.shape == w.shape
    # every code is a finite value of the format's grid, within its range
    vals = codes.astype(np.float32)
    assert np.all(np.isfinite(vals)) and np.all(np.abs(vals) <= MAX[fmt])
    assert np.array_equal(vals.astype(DTYPES[fmt]).astype(np.float32), vals)
    rtn = quantize(w / scale, 1.0, fmt).astype(np.float64) * scale
    x64 = x_test.astype(np.float64)
    ref = x64 @ w.astype(np.float64)
    err_rtn = np.square(ref - x64 @ rtn).sum()
    err_gptq = np.square(ref - x64 @ (vals.astype(np.float64) * scale)).sum()
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_gptq_act_order_rounds_by_energy_and_keeps_the_layout(rng):
    k, n = 48, 20
    w = (rng.normal(size=(k, n)) * 0.1).astype(np.float32)
    energy = np.linspace(0.2, 3.0, k)  # distinct energies, in increasing order
    mix = mixing(rng, k)
    x_cal = correlated_inputs(rng, 6 * k, k, mix) * energy.astype(np.float32)
    x_test = correlated_inputs(np.random.default_rng(7), 2000, k, mix) * energy.astype(
        np.float32)
    gram = x_cal.astype(np.float64).T @ x_cal
    scale = amax_scale(w, 0, "e4m3fn")[0]
    codes = wr.gptq(w, gram, "e4m3fn", scale, act_order=True, block=8)
    vals = codes.astype(np.float32)
    assert np.array_equal(vals.astype(DTYPES["e4m3fn"]).astype(np.float32), vals)
    # act-order is plain GPTQ on the rows sorted by decreasing energy, unpermuted afterwards
    order = np.argsort(-np.diag(gram), kind="stable")
    assert not np.array_equal(order, np.arange(k))
    sorted_codes = wr.gptq(w[order], gram[np.ix_(order, order)], "e4m3fn", scale, block=8)
    assert np.mean(sorted_codes.astype(np.float32) == vals[order]) > 0.99
    # the permuted problem gives the permuted answer
    p = rng.permutation(k)
    permuted = wr.gptq(w[p], gram[np.ix_(p, p)], "e4m3fn", scale, act_order=True, block=8)
    assert np.mean(permuted.astype(np.float32) == vals[p]) > 0.99
    # and it still beats round to nearest on held-out inputs
    x64 = x_test.astype(np.float64)
    ref = x64 @ w.astype(np.float64)
    rtn = quantize(w / scale, 1.0, "e4m3fn").astype(np.float64) * scale
    err_act = np.square(ref - x64 @ (vals.astype(np.float64) * scale)).sum()
    assert err_act < 0.8 * np.square(ref - x64 @ rtn).sum()


def test_gptq_lazy_blocks_match_one_row_blocks(rng):
    w = (rng.normal(size=(70, 30)) * 0.1).astype(np.float32)
    x = correlated_inputs(rng, 300, 70)
    gram = x.astype(np.float64).T @ x
    scale = amax_scale(w, 0, "e4m3fn")[0]
    a = wr.gptq(w, gram, "e4m3fn", scale, block=1).astype(np.float32)
    b = wr.gptq(w, gram, "e4m3fn", scale, block=16, chunk_columns=7).astype(np.float32)
    # same algorithm, other summation order: a rare rounding tie may flip
    assert np.mean(a == b) > 0.99


def test_gptq_dead_inputs_and_all_zero_gram(rng):
    w = (rng.normal(size=(24, 10)) * 0.1).astype(np.float32)
    x = correlated_inputs(rng, 100, 24)
    x[:, [3, 17]] = 0  # inputs that never fire: singular XᵀX
    gram = x.astype(np.float64).T @ x
    scale = amax_scale(w, 0, "e4m3fn")[0]
    codes = wr.gptq(w, gram, "e4m3fn", scale).astype(np.float32)
    assert np.all(np.isfinite(codes))
    rtn = quantize(w / scale, 1.0, "e4m3fn").astype(np.float32)
    # dead rows take no feedback from earlier rows: the first dead row is round-to-nearest
    # of the updated weight; with no correlation to it, it stays round-to-nearest
    np.testing.assert_array_equal(codes[3], rtn[3])
    # no calibration signal at all: every input dead, GPTQ is round to nearest
    zero = wr.gptq(w, np.zeros((24, 24)), "e4m3fn", scale).astype(np.float32)
    np.testing.assert_array_equal(zero, rtn)


def test_gptq_bad_input(rng):
    w = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="gram must be \\[4, 4\\] for w \\(4, 3\\), got \\(3, 3\\)"):
        wr.gptq(w, np.eye(3), "e4m3fn", 1.0)
    with pytest.raises(ValueError, match="NaN or inf in the weight or the Gram matrix"):
        wr.gptq(w, np.full((4, 4), np.nan), "e4m3fn", 1.0)
    with pytest.raises(ValueError, match="damp must be finite and > 0, got 0"):
        wr.gptq(w, np.eye(4), "e4m3fn", 1.0, damp=0)
    with pytest.raises(ValueError, match="scales must be finite and > 0"):
        wr.gptq(w, np.eye(4), "e4m3fn", np.array([1, 0, 1], np.float32))
    with pytest.raises(ValueError, match="unknown FP8 format 'e4m3'"):
        wr.gptq(w, np.eye(4), "e4m3", 1.0)


def test_kernel_matrix_round_trip(rng):
    w = rng.normal(size=(4, 6, 5)).astype(np.float32)
    for contract in [(1,), (0, 2), (2, 0)]:
        m = wr.kernel_matrix(w, contract)
        assert m.shape[0] == np.prod([w.shape[a] for a in contract])
        # column j of m is the weight's slice at the j-th free index, in order
        assert np.array_equal(m[:, 0], np.transpose(w, list(contract) + [
            a for a in range(3) if a not in contract]).reshape(m.shape[0], -1)[:, 0])
        np.testing.assert_array_equal(wr.from_kernel_matrix(m, w.shape, contract), w)


def test_einsum_contractions_and_gram(rng):
    pytest.importorskip("keras_hub")
    from fp8xla.keras import _gram
    # Gemma's equations: input axes and kernel axes contracted, in the same order
    assert _gram._einsum_contraction("btd,ndh->btnh", 3) == ((2,), (1,))
    assert _gram._einsum_contraction("btnh,nhd->btd", 4) == ((2, 3), (0, 1))
    assert _gram._einsum_contraction("btf,fd->btd", 3) == ((2,), (0,))
    assert _gram._einsum_contraction("...d,df->...f", 3) is None
    # the Gram matrix of the flattened contracted axes, against a float64 einsum
    x = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
    rows = np.asarray(_gram._rows_of(x, (2, 3)))
    xm = x.reshape(6, 24).astype(np.float64)
    np.testing.assert_array_equal(rows, xm.astype(np.float32))
    # accumulated over calls of any size, flushed in blocks: the Gram matrix of all rows
    site = _gram.Site("w", (0,))
    parts = [rng.normal(size=(m, 24)).astype(np.float32) for m in (1, 1, 700, 3, 1500, 0)]
    for p in parts:
        site.add(p)
    site.flush()
    every = np.concatenate(parts).astype(np.float64)
    assert site.rows == len(every)
    want = every.T @ every
    # blocks multiplied in float32, summed in float64
    np.testing.assert_allclose(site.gram, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert site.gram.dtype == np.float64
