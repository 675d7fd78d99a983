"""`fp8xla_argmax` (the sampler's argmax on every core) against NumPy's `argmax` and the
graph's own `jnp.argmax`: ties, NaN, ±inf and -inf rows, awkward shapes, bfloat16; every
error; and the pass `sampler_argmax` on exported JAX and Keras argmaxes."""
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import fp8xla  # noqa: F401,E402
from fp8xla import graph, ops  # noqa: E402


def awkward(rng, shape):
    """Values with many ties (a small palette), ±0, ±inf, all--inf and all-NaN rows, and NaNs
    dropped at random places, so that every rule of argmax is exercised."""
    palette = np.array([0.0, -0.0, 1.0, -1.0, 2.5, np.inf, -np.inf, np.nan], np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    if x.size == 0:
        return x
    flat = x.reshape(-1, shape[-1])
    for r in range(flat.shape[0]):
        kind = r % 6
        if kind == 1:
            flat[r] = palette[rng.integers(0, 5, shape[-1])]  # ties, ±0
        elif kind == 2:
            flat[r] = -np.inf
        elif kind == 3:
            flat[r] = palette[rng.integers(0, len(palette), shape[-1])]
        elif kind == 4:
            flat[r] = np.nan
        for _ in range(rng.integers(0, 3)):
            flat[r, rng.integers(0, shape[-1])] = np.nan if rng.integers(0, 2) else 1e30
    return flat.reshape(shape)


SHAPES = [(1,), (7,), (1, 1), (3, 1), (2, 17), (0, 5), (4, 0, 9), (2, 3, 1000), (1, 65_537),
          (3, 40_000), (1, 262_144), (12, 2_001)]


@pytest.mark.parametrize("shape", SHAPES)
def test_equals_numpy_and_jnp_argmax(rng, shape):
    x = awkward(rng, shape)
    got = np.asarray(jax.jit(ops.argmax)(x))
    assert got.dtype == np.int32 and got.shape == shape[:-1]
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    np.testing.assert_array_equal(got, np.asarray(jax.jit(lambda v: jnp.argmax(v, -1))(x)))


@pytest.mark.parametrize("shape", [(2, 17), (3, 40_000), (1, 262_144)])
def test_bfloat16(rng, shape):
    x = jnp.asarray(awkward(rng, shape), jnp.bfloat16)
    want = np.argmax(np.asarray(x, np.float32), axis=-1)
    np.testing.assert_array_equal(np.asarray(ops.argmax(x)), want)
    np.testing.assert_array_equal(np.asarray(jnp.argmax(x, -1)), want)


def test_ties_nan_and_infinities_at_the_ends_and_in_the_middle():
    n = 262_144
    rows = []
    for base in (0.0, -np.inf, -1.0):
        for marks in ([], [(n - 1, 5.0)], [(n - 1, 5.0), (7, 5.0), (150_000, 5.0)],
                      [(200_000, np.nan), (3, np.nan), (4, 9e9)],
                      [(n - 1, np.nan), (5, np.inf)], [(70_000, np.inf), (70_001, np.inf)],
                      [(12_500, -0.0), (12_499, 0.0)], [(0, np.nan)], [(n - 1, np.nan)]):
            row = np.full(n, base, np.float32)
            for i, v in marks:
                row[i] = v
            rows.append(row)
    x = np.stack(rows)
    got = np.asarray(jax.jit(ops.argmax)(x))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(x, -1)))


def test_vmap_and_a_decode_like_loop(rng):
    x = awkward(rng, (3, 2, 30_000))
    np.testing.assert_array_equal(np.asarray(jax.vmap(ops.argmax)(x)), np.argmax(x, -1))

    def run(argmax):
        def body(i, acc):
            return acc.at[i].set(argmax(jnp.asarray(x)[i % 3] * (i + 1.0))[0])
        return jax.jit(lambda: jax.lax.fori_loop(0, 6, body, jnp.zeros(6, jnp.int32)))()

    np.testing.assert_array_equal(np.asarray(run(ops.argmax)),
                                  np.asarray(run(lambda v: jnp.argmax(v, -1))))


def raw(x, out_shape, dtype=np.int32, **attrs):
    out = jax.ShapeDtypeStruct(out_shape, dtype)
    return jax.block_until_ready(jax.ffi.ffi_call("fp8xla_argmax", out)(x, **attrs))


X = np.ones((2, 8), np.float32)


@pytest.mark.parametrize("case,match", [
    (lambda: raw(np.float32(1), ()), "operand 0 \\(x\\): expected rank >= 1 .*got a scalar"),
    (lambda: raw(np.ones((2, 0), np.float32), (2,)),
     "operand 0 \\(x\\): expected a last dim of size >= 1 .*got shape \\[2, 0\\]"),
    (lambda: raw(X, (2, 1)),
     "result 0 \\(index\\): expected shape \\[2\\] \\(the shape of operand 0 \\(x\\), \\[2, 8\\], "
     "without its last dim\\), got \\[2, 1\\]"),
    (lambda: raw(X, (2,), np.float32), "result 0 \\(index\\): expected dtype int32 or int64, got float32"),
    (lambda: raw(X.astype(np.int32), (2,)),
     "operand 0 \\(x\\): expected dtype float32 or bfloat16, got int32"),
    (lambda: raw(X, (2,), axis=np.int64(0)), "unknown attribute `axis`"),
])
def test_bad_calls_are_clear_errors(case, match):
    with pytest.raises(Exception, match=f"fp8xla_argmax: {match}"):
        case()


def test_int64_indices():
    x = np.array([[1, 3, 3, 2], [np.nan, 1, np.nan, 0]], np.float32)
    np.testing.assert_array_equal(np.asarray(raw(x, (2,), np.int64)), [1, 0])


def test_the_wrapper_checks_its_argument():
    with pytest.raises(TypeError, match="fp8xla.argmax: `x` must be float32 or bfloat16"):
        ops.argmax(np.ones(3, np.int32))
    with pytest.raises(ValueError, match="fp8xla.argmax: `x` must have a last dim of size >= 1"):
        ops.argmax(np.ones((2, 0), np.float32))


# The pass, on what jax.export writes.

def export(fn, *shapes):
    specs = [jax.ShapeDtypeStruct(s, np.float32) for s in shapes]
    return jax.export.export(jax.jit(fn), platforms=["cpu"])(*specs)


def sampler(logits):
    """Keras-Hub's greedy sampler on JAX: softmax, then Keras' argmax (which first maps -0.0
    to the smallest negative normal on CPU, then calls jnp.argmax)."""
    import keras
    probs = keras.activations.softmax(logits / 1.0)
    return keras.ops.argmax(probs, axis=-1)


@pytest.mark.parametrize("fn", [lambda x: jnp.argmax(x, axis=-1), sampler])
def test_the_pass_rewrites_an_exported_argmax(rng, fn):
    exp = export(fn, (2, 40_000))
    text, report = graph.run_pass("sampler_argmax", graph.module_text(exp), {})
    assert [h["kind"] for h in report["handled"]] == ["sampler_argmax"]
    assert text.count('"fp8xla_argmax"') == 1
    rewritten = graph.with_module(exp, text)
    x = awkward(rng, (2, 40_000))
    for rows in (x, x[::-1].copy(), np.stack([x[0], np.full(40_000, np.nan, np.float32)])):
        np.testing.assert_array_equal(np.asarray(jax.jit(rewritten.call)(rows)),
                                      np.asarray(jax.jit(exp.call)(rows)))


@pytest.mark.parametrize("fn,shape", [
    (lambda x: jnp.argmin(x, axis=-1), (2, 40_000)),  # another comparator
    (lambda x: jnp.argmax(x, axis=0), (40_000, 2)),   # not the last dim
    (lambda x: jnp.argmax(x, axis=-1), (2, 1000)),    # under the threshold
    (lambda x: jnp.max(x, axis=-1), (2, 40_000)),     # a one-operand reduce
])
def test_the_pass_leaves_everything_else_alone(fn, shape):
    exp = export(fn, shape)
    text, report = graph.run_pass("sampler_argmax", graph.module_text(exp), {})
    assert report["handled"] == [] and '"fp8xla_argmax"' not in text
