"""fp8xla.jax.quantize on plain JAX functions: results against a float64 fake-quant reference
computed here with numpy and ml_dtypes only (weight scales, channel choice and activation
scales all recomputed independently), the parameter pytree it returns, and bad input."""
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp8xla.jax as fj
from fp8xla.jax import StaticQuantConfig

import fp8_reference as ref

V, D, H = 61, 24, 40  # vocabulary, model width, hidden width (odd sizes on purpose)
FMT = {"fp8_e4m3": "e4m3fn", "fp8_e5m2": "e5m2"}


def make_params(rng):
    """A token MLP whose logits reuse the embedding table (a tied head), with a bias, a gain
    vector, an integer leaf and a leaf the function never reads."""
    return {
        "embed": rng.standard_normal((V, D)).astype(np.float32),
        "layers": [
            {"w": (rng.standard_normal((D, H)) * 0.3).astype(np.float32),
             "b": rng.standard_normal(H).astype(np.float32) * 0.1},
            {"w": (rng.standard_normal((H, D)) * 0.3).astype(np.float32),
             "b": rng.standard_normal(D).astype(np.float32) * 0.1},
        ],
        "gain": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32),
        "step": np.int32(3),
        "unused": rng.standard_normal((5, 7)).astype(np.float32),
    }


def mlp(p, tokens):
    h = p["embed"][tokens]
    for layer in p["layers"]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    h = h * p["gain"]
    return h @ p["embed"].T  # tied head


def tokens(rng, b=2, t=5):
    return rng.integers(0, V, (b, t)).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# the float64 reference


def fake_quant_weight(w, fmt, channel_axis):
    """Codes and back in float64: scale = amax / max per tensor or per index of channel_axis."""
    w = np.asarray(w, np.float64)
    if channel_axis is None:
        amax = np.abs(w).max()
    else:
        amax = np.abs(w).max(axis=tuple(a for a in range(w.ndim) if a != channel_axis),
                             keepdims=True)
    scale = np.where(amax == 0, 1.0, amax / ref.MAX[fmt]).astype(np.float32)
    codes = np.clip(w / scale, -ref.MAX[fmt], ref.MAX[fmt]).astype(ref.DTYPES[fmt])
    return codes.astype(np.float64) * scale


def qdq64(x, amax, fmt):
    """Activation QDQ with the static scale amax / max (in float32, as the kernels do)."""
    if amax is None:
        return x
    s = np.float32(amax / ref.MAX[fmt])
    return ref.qdq(np.asarray(x, np.float32), s, fmt).astype(np.float64)


def mlp64(p, toks, act=None, fmt="e4m3fn", observe=None):
    """mlp in float64; `act`: amax per matmul input ('layers/0', 'layers/1', 'head') to QDQ
    with; `observe`: a dict that collects max |input| per matmul."""
    act = act or {}
    h = np.asarray(p["embed"], np.float64)[toks]
    for i, layer in enumerate(p["layers"]):
        name = f"layers/{i}"
        if observe is not None:
            observe[name] = max(observe.get(name, 0.0), float(np.abs(h).max()))
        h = np.maximum(qdq64(h, act.get(name), fmt) @ np.asarray(layer["w"], np.float64)
                       + layer["b"], 0)
    h = h * np.asarray(p["gain"], np.float64)
    if observe is not None:
        observe["head"] = max(observe.get("head", 0.0), float(np.abs(h).max()))
    return qdq64(h, act.get("head"), fmt) @ np.asarray(p["embed"], np.float64).T


def reference_params(p, fmt, per_channel, skip=()):
    """The weights as FP8 stores them: layer weights per output channel (their last dim) or
    per tensor; the tied embedding per row (its output channel at the tied head) or per
    tensor."""
    out = jax.tree_util.tree_map(np.asarray, p)
    if "embed" not in skip:
        out["embed"] = fake_quant_weight(p["embed"], fmt, 0 if per_channel else None)
    for i, layer in enumerate(out["layers"]):
        if f"layers/{i}/w" not in skip:
            layer["w"] = fake_quant_weight(layer["w"], fmt, 1 if per_channel else None)
    return out


def rel_err(got, want):
    return np.abs(np.asarray(got, np.float64) - want) / np.abs(want).max()


# ---------------------------------------------------------------------------------------------
# results


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_weight_only_equals_float64_fake_quant(dtype, granularity, rng):
    p, x = make_params(rng), tokens(rng)
    q = fj.quantize(mlp, p, x, config=StaticQuantConfig(
        weight_dtype=dtype, activation_dtype=None, granularity=granularity))
    assert sorted(q.leaves) == ["embed", "layers/0/w", "layers/1/w"]
    want = mlp64(reference_params(p, FMT[dtype], granularity == "per_channel"), x)
    assert rel_err(q(q.params, x), want).max() <= 1e-3
    # a new argument shape (odd sizes, a single token) is exported and rewritten on the fly
    for b, t in ((1, 1), (3, 7)):
        x2 = tokens(rng, b, t)
        want2 = mlp64(reference_params(p, FMT[dtype], granularity == "per_channel"), x2)
        assert rel_err(q(q.params, x2), want2).max() <= 1e-3


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_weights_and_activations_equal_float64_fake_quant(dtype, rng):
    p = make_params(rng)
    calib = [tokens(rng, 2, 6), tokens(rng, 3, 4)]  # two signatures
    q = fj.quantize(mlp, p, calib[0], config=StaticQuantConfig(weight_dtype=dtype,
                                                               activation_dtype=dtype),
                    calib_batches=[(c,) for c in calib])
    fmt = FMT[dtype]
    amax = {}
    for c in calib:
        mlp64(p, c, observe=amax)
    # the tied table's activation is the head's input; the calibrated scales are amax / max
    want_scales = {"layers/0/w": amax["layers/0"], "layers/1/w": amax["layers/1"],
                   "embed": amax["head"]}
    for path, a in want_scales.items():
        assert q.leaves[path].a_scale == pytest.approx(a / ref.MAX[fmt], rel=1e-5), path
    x = tokens(rng, 4, 9)
    act = {"layers/0": amax["layers/0"], "layers/1": amax["layers/1"], "head": amax["head"]}
    want = mlp64(reference_params(p, fmt, True), x, act, fmt)
    err = rel_err(q(q.params, x), want)
    # The Keras path's criteria: activation QDQ is a step function, so an accumulation-order
    # difference can move a value to the neighbouring FP8 code; most rows agree to 1e-4.
    rows = err.max(axis=-1).ravel()
    assert np.mean(rows <= 1e-4) >= 0.8, np.round(rows, 5)
    assert err.max() <= 5e-2


def test_calib_function_drives_the_calibration(rng):
    p = make_params(rng)
    calib = [tokens(rng, 2, 6), tokens(rng, 1, 3)]
    seen = []

    def calib_function(run):
        for c in calib:
            out = run(p, c)  # fn's signature
            seen.append(np.asarray(out))

    q = fj.quantize(mlp, p, calib[0], calib_function=calib_function)
    # the instrumented function computes what fn computes (observing does not change it)
    np.testing.assert_allclose(seen[0], mlp64(p, calib[0]), rtol=1e-5,
                               atol=1e-5 * np.abs(seen[0]).max())
    amax = {}
    for c in calib:
        mlp64(p, c, observe=amax)
    assert q.leaves["layers/1/w"].a_scale == pytest.approx(amax["layers/1"] / 448, rel=1e-5)


def test_float_activation_layers_keep_float_activations(rng):
    p, x = make_params(rng), tokens(rng)
    q = fj.quantize(mlp, p, x, calib_batches=[x],
                    config=StaticQuantConfig(float_activation_layers=("embed",)))
    assert q.leaves["embed"].a_scale is None
    assert q.leaves["layers/0/w"].a_scale is not None


def test_parameter_pytree_holds_one_byte_per_quantized_weight(rng, capsys):
    p, x = make_params(rng), tokens(rng)
    q = fj.quantize(mlp, p, x, config=StaticQuantConfig(activation_dtype=None))
    assert jax.tree_util.tree_structure(q.params) == jax.tree_util.tree_structure(p)
    assert q.params["embed"].dtype == jnp.float8_e4m3fn
    assert q.params["layers"][0]["w"].dtype == jnp.float8_e4m3fn
    # leaves that are not weights stay exactly as they were
    for path in (("layers", 0, "b"), ("gain",), ("unused",), ("step",)):
        got, want = q.params, p
        for k in path:
            got, want = got[k], want[k]
        assert np.asarray(got).dtype == np.asarray(want).dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert q.leaves["embed"].kind == "embed+matmul" and q.leaves["layers/0/w"].kind == "matmul"
    assert q.leaves["embed"].channel_dim == 0  # one scale per row, gathered with the row
    assert q.leaves["layers/0/w"].channel_dim == 1 and q.leaves["layers/1/w"].channel_dim == 1
    weights = V * D + D * H + H * D
    floats = H + D + D + 5 * 7
    assert q.nbytes() == weights + 4 * floats + 4
    q.print_model()
    out = capsys.readouterr().out
    for path in ("embed", "layers/0/w", "layers/1/w"):
        assert re.search(rf"^{re.escape(path)}\s+\S+\s+float8_e4m3fn", out, re.M), out
    assert re.search(r"^unused\s+-\s+float32", out, re.M), out  # listed, left float


def test_skip_by_glob_and_by_regex(rng):
    p, x = make_params(rng), tokens(rng)
    cfg = StaticQuantConfig(activation_dtype=None)
    for skip in ("layers/0/*", re.compile(r"^layers/0/")):
        q = fj.quantize(mlp, p, x, config=cfg, skip=skip)
        assert "layers/0/w" not in q.leaves and q.params["layers"][0]["w"].dtype == np.float32
        want = mlp64(reference_params(p, "e4m3fn", True, skip=("layers/0/w",)), x)
        assert rel_err(q(q.params, x), want).max() <= 1e-3


def test_quantize_embeddings_false_keeps_gathered_leaves_float(rng):
    p, x = make_params(rng), tokens(rng)
    q = fj.quantize(mlp, p, x, config=StaticQuantConfig(activation_dtype=None,
                                                        quantize_embeddings=False))
    assert sorted(q.leaves) == ["layers/0/w", "layers/1/w"]


def test_weights_are_found_by_the_graph_not_by_name(rng):
    """A rank-2 leaf that only scales elementwise is no weight; one named oddly is."""
    p = {"zz": (rng.standard_normal((7, 5)) * 0.3).astype(np.float32),
         "kernel": rng.standard_normal((3, 5)).astype(np.float32)}

    def f(p, x):
        return (x @ p["zz"]) * p["kernel"]

    x = rng.standard_normal((3, 7)).astype(np.float32)
    q = fj.quantize(f, p, x, config=StaticQuantConfig(activation_dtype=None))
    assert sorted(q.leaves) == ["zz"]
    want = (x.astype(np.float64) @ fake_quant_weight(p["zz"], "e4m3fn", 1)) * p["kernel"]
    assert rel_err(q(q.params, x), want).max() <= 1e-3


def test_bfloat16_weights(rng):
    p = {"w": jnp.asarray(rng.standard_normal((16, 9)), jnp.bfloat16)}
    x = jnp.asarray(rng.standard_normal((4, 16)), jnp.bfloat16)
    q = fj.quantize(lambda p, x: x @ p["w"], p, x, config=StaticQuantConfig(activation_dtype=None))
    got = np.asarray(q(q.params, x), np.float64)
    want = np.asarray(x, np.float64) @ fake_quant_weight(np.asarray(p["w"], np.float32),
                                                         "e4m3fn", 1)
    assert got.shape == want.shape
    assert rel_err(got, want).max() <= 1e-2  # bfloat16 output


# ---------------------------------------------------------------------------------------------
# bad input


def test_no_quantizable_leaf(rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="no quantizable leaf in params"):
        fj.quantize(lambda p, x: x + p["b"], {"b": np.zeros(4, np.float32)}, x)
    with pytest.raises(ValueError, match="none of the 1 float leaves of rank >= 2 feeds a matmul"):
        fj.quantize(lambda p, x: x * p["m"], {"m": np.ones((3, 4), np.float32)}, x)
    with pytest.raises(ValueError, match="no quantizable leaf in params"):
        fj.quantize(lambda p, x: x @ p["w"], {"w": np.ones((4, 2), np.float32)}, x, skip="w")


def test_calibration_that_never_runs_fn(rng):
    p, x = make_params(rng), tokens(rng)
    with pytest.raises(RuntimeError, match="calibration never ran fn.*calib_batches was empty"):
        fj.quantize(mlp, p, x, calib_batches=[])
    with pytest.raises(RuntimeError, match="calib_function never called the function"):
        fj.quantize(mlp, p, x, calib_function=lambda run: None)
    with pytest.raises(ValueError, match="exactly one of calib_batches or calib_function"):
        fj.quantize(mlp, p, x)
    with pytest.raises(TypeError, match="under a JAX transformation"):
        fj.quantize(mlp, p, x, calib_function=lambda run: jax.jit(lambda t: run(p, t))(x))


def test_unknown_dtype_and_config():
    with pytest.raises(ValueError, match="unknown weight_dtype 'fp8_e4m3fnuz'"):
        StaticQuantConfig(weight_dtype="fp8_e4m3fnuz")
    with pytest.raises(ValueError, match="unknown activation_dtype 'int8'"):
        StaticQuantConfig(activation_dtype="int8")
    with pytest.raises(TypeError, match="config must be a StaticQuantConfig"):
        fj.quantize(mlp, {}, config={"weight_dtype": "fp8_e4m3"})
    # Options only the Keras path implements are refused, not silently ignored.
    with pytest.raises(ValueError, match="rounding='gptq' is not supported by fp8xla.jax yet"):
        fj.quantize(mlp, {}, config=StaticQuantConfig(rounding="gptq"))
    with pytest.raises(ValueError, match="white_list=\\('attn',\\) is not supported"):
        fj.quantize(mlp, {}, config=StaticQuantConfig(white_list=["attn"]))


def test_skip_pattern_that_matches_nothing(rng):
    p, x = make_params(rng), tokens(rng)
    with pytest.raises(ValueError, match="skip pattern 'layer/\\*' matches no parameter leaf"):
        fj.quantize(mlp, p, x, skip=["layer/*"])
    with pytest.raises(ValueError, match="skip pattern 'attn' matches no parameter leaf"):
        fj.quantize(mlp, p, x, skip=re.compile("attn"))
    with pytest.raises(ValueError, match="float_activation_layers entry 'attn'"):
        fj.quantize(mlp, p, x, calib_batches=[x],
                    config=StaticQuantConfig(float_activation_layers=("attn",)))


def test_nonfinite_calibration_and_wrong_parameters(rng):
    p, x = make_params(rng), tokens(rng)
    bad = jax.tree_util.tree_map(np.copy, p)
    bad["layers"][0]["w"][0, 0] = np.nan

    def calib_function(run):
        run(bad, x)

    with pytest.raises(ValueError, match="NaN/inf activations at the input of the matmuls on "
                                         "'layers/1/w'"):
        fj.quantize(mlp, p, x, calib_function=calib_function)
    q = fj.quantize(mlp, p, x, config=StaticQuantConfig(activation_dtype=None))
    with pytest.raises(TypeError, match="structure differs"):
        q({"embed": q.params["embed"]}, x)
    with pytest.raises(TypeError, match="parameter 'embed' must be the FP8 codes "
                                        r"\(float8_e4m3fn\), got float32; pass q.params"):
        q(p, x)  # the float parameters


# ---------------------------------------------------------------------------------------------
# Flax NNX


def nnx_model(rng_seed=0):
    """A Flax NNX token model with a tied head (``Embed.attend``) and a LayerNorm; returns
    ``(fn, state)`` with ``fn(state, tokens)`` the model's call."""
    nnx = pytest.importorskip("flax.nnx")

    class TiedMLP(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(V, D, rngs=rngs)
            self.up = nnx.Linear(D, H, rngs=rngs)
            self.down = nnx.Linear(H, D, rngs=rngs)
            self.norm = nnx.LayerNorm(D, rngs=rngs)

        def __call__(self, t):
            h = self.embed(t)
            h = self.down(jax.nn.gelu(self.up(h)))
            return self.embed.attend(self.norm(h))

    graphdef, state = nnx.split(TiedMLP(nnx.Rngs(rng_seed)))

    def fn(state, t):
        return nnx.merge(graphdef, state)(t)

    return fn, state


def nnx64(s, toks, act=None, fmt="e4m3fn", observe=None):
    """TiedMLP in float64 from the state's arrays (`s`: path -> array)."""
    act = act or {}

    def obs(name, x):
        if observe is not None:
            observe[name] = max(observe.get(name, 0.0), float(np.abs(x).max()))
        return qdq64(x, act.get(name), fmt)

    f = {k: np.asarray(v, np.float64) for k, v in s.items()}
    h = f["embed/embedding/value"][toks]
    h = obs("up", h) @ f["up/kernel/value"] + f["up/bias/value"]
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))  # gelu (tanh)
    h = obs("down", h) @ f["down/kernel/value"] + f["down/bias/value"]
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mu) / np.sqrt(var + 1e-6) * f["norm/scale/value"] + f["norm/bias/value"]
    return obs("head", h) @ f["embed/embedding/value"].T


@pytest.mark.parametrize("act", [None, "fp8_e4m3"])
def test_flax_nnx_model_equals_float64_fake_quant(act, rng):
    fn, state = nnx_model()
    paths, leaves, _ = fj._quantize.leaf_paths(state)
    s = dict(zip(paths, (np.asarray(x) for x in leaves)))
    x, calib = tokens(rng, 3, 5), [tokens(rng, 2, 8)]
    np.testing.assert_allclose(np.asarray(fn(state, x)), nnx64(s, x), rtol=1e-4, atol=1e-4)
    q = fj.quantize(fn, state, x, config=StaticQuantConfig(activation_dtype=act),
                    calib_batches=calib if act else None)
    assert sorted(q.leaves) == ["down/kernel/value", "embed/embedding/value", "up/kernel/value"]
    assert q.leaves["embed/embedding/value"].kind == "embed+matmul"
    fq = dict(s)
    fq["embed/embedding/value"] = fake_quant_weight(s["embed/embedding/value"], "e4m3fn", 0)  # per row
    fq["up/kernel/value"] = fake_quant_weight(s["up/kernel/value"], "e4m3fn", 1)
    fq["down/kernel/value"] = fake_quant_weight(s["down/kernel/value"], "e4m3fn", 1)
    got = q(q.params, x)
    if act is None:
        assert rel_err(got, nnx64(fq, x)).max() <= 1e-3
    else:
        amax = {}
        for c in calib:
            nnx64(s, c, observe=amax)
        err = rel_err(got, nnx64(fq, x, act=amax))
        rows = err.max(axis=-1).ravel()
        assert np.mean(rows <= 1e-4) >= 0.8, np.round(rows, 5)
        assert err.max() <= 5e-2
