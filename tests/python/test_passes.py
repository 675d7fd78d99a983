"""The rewrite passes by name through `fp8xla.graph.run_pass`: `update_slices_in_place` and
`decode_dots` run alone on an exported JAX function, and the result computes what the
original does; unknown names and options are refused with errors that say what is known."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp8xla import graph

S, D = 32, 16  # cache rows, row width


def decode_like(cache, rows, q):
    """Writes one row of a loop-carried cache per step, then reads it with two query rows."""
    def body(carry):
        i, c = carry
        return i + 1, jax.lax.dynamic_update_slice(c, rows[i][None], (i, 0))

    _, cache = jax.lax.while_loop(lambda carry: carry[0] < S, body, (0, cache))
    scores = jax.lax.dot_general(q, cache, (((1,), (1,)), ((), ())))  # [2, S]
    return cache, scores


@pytest.fixture
def case(rng):
    args = (np.zeros((S, D), np.float32),
            rng.standard_normal((S, D)).astype(np.float32),
            rng.standard_normal((2, D)).astype(np.float32))
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    exp = jax.export.export(jax.jit(decode_like), platforms=["cpu"])(*specs)
    return exp, args


def run_alone(exp, name, options):
    text, report = graph.run_pass(name, graph.module_text(exp), options)
    assert report["pass"] == name
    return graph.with_module(exp, text), text, report


def test_update_slices_in_place_alone(case):
    exp, args = case
    rewritten, text, report = run_alone(exp, "update_slices_in_place", {})
    assert [h["kind"] for h in report["handled"]] == ["update_slice_in_place"]
    assert '"fp8xla_update_slice"' in text and '"fp8xla_dot_f32"' not in text
    want = jax.jit(exp.call)(*args)
    got = jax.jit(rewritten.call)(*args)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_decode_dots_alone(case):
    exp, args = case
    # The 2 KiB cache is under the default threshold: nothing to do.
    _, text, report = run_alone(exp, "decode_dots", {})
    assert report["handled"] == [] and '"fp8xla_dot_f32"' not in text
    rewritten, text, report = run_alone(exp, "decode_dots", {"min_bytes": 0})
    assert [h["kind"] for h in report["handled"]] == ["f32_dot_gemv"]
    assert '"fp8xla_dot_f32"' in text and '"fp8xla_update_slice"' not in text
    want = jax.jit(exp.call)(*args)
    got = jax.jit(rewritten.call)(*args)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    # Float32 products and sums, in another order.
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5, atol=1e-5)


def test_unknown_pass_names_the_known_ones(case):
    exp, _ = case
    with pytest.raises(graph.RewriteError,
                       match="expected one of the passes quantize, instrument, "
                             "update_slices_in_place, decode_dots, sampler_argmax, shard_calls, "
                             "fp8_kv_cache but found the "
                             "unknown pass "
                             "\"decode_dot\""):
        graph.run_pass("decode_dot", graph.module_text(exp), {})


def test_options_of_a_pass_run_alone_are_checked(case):
    exp, _ = case
    with pytest.raises(graph.RewriteError,
                       match="fp8xla decode_dots pass: options: .*expected one of the keys "
                             "`min_bytes` in the decode_dots options but found the key "
                             "`min_byte`"):
        graph.run_pass("decode_dots", graph.module_text(exp), {"min_byte": 0})
    with pytest.raises(graph.RewriteError, match="in the update_slices_in_place options"):
        graph.run_pass("update_slices_in_place", graph.module_text(exp), {"min_bytes": 0})
