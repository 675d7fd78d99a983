"""FP8 artifacts of fp8xla.jax: save, load in a fresh process (with fp8xla.jax.load, and with
no import of fp8xla at all through the jax_plugins entry point), and damaged artifacts."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest

import fp8xla.jax as fj
from fp8xla.jax import StaticQuantConfig

from test_jax_api import make_params, mlp, nnx_model, tokens


@pytest.fixture
def saved(rng, tmp_path):
    """A w+a quantized tied-head MLP compiled for two signatures, saved; with its inputs and
    outputs."""
    p = make_params(rng)
    xs = [tokens(rng, 2, 5), tokens(rng, 1, 3)]
    q = fj.quantize(mlp, p, xs[0], calib_batches=[xs[0]],
                    config=StaticQuantConfig(weight_dtype="fp8_e5m2"))
    outs = [np.asarray(q(q.params, x)) for x in xs]
    d = tmp_path / "mlp_fp8"
    q.save(str(d))
    np.save(tmp_path / "x0.npy", xs[0])
    np.save(tmp_path / "x1.npy", xs[1])
    np.save(tmp_path / "y0.npy", outs[0])
    np.save(tmp_path / "y1.npy", outs[1])
    return q, d, xs, outs


def run_python(code, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"JAX_PLATFORMS": "cpu"}
    if "PYTHONPATH" in os.environ:  # a development run from the source tree
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


def test_artifact_files(saved):
    q, d, _, _ = saved
    assert sorted(os.listdir(d)) == ["manifest.json", "module-0.jaxexport",
                                     "module-1.jaxexport", "params.safetensors"]
    m = json.loads((d / "manifest.json").read_text())
    assert m["format"] == "fp8xla.jax artifact" and m["version"] == 1
    assert {e["path"] for e in m["leaves"]} == set(q.leaves)
    # the parameter file is plain safetensors: FP8 leaves one byte each, named F8_E5M2
    from safetensors import deserialize
    tensors = dict(deserialize((d / "params.safetensors").read_bytes()))
    assert tensors["embed"]["dtype"] == "F8_E5M2" and tensors["layers/0/w"]["dtype"] == "F8_E5M2"
    assert len(tensors["embed"]["data"]) == np.prod(tensors["embed"]["shape"])
    assert tensors["layers/0/b"]["dtype"] == "F32" and tensors["step"]["dtype"] == "I32"


def test_load_in_this_process_gives_identical_outputs(saved):
    q, d, xs, outs = saved
    m = fj.load(str(d))
    for x, y in zip(xs, outs):
        np.testing.assert_array_equal(np.asarray(m(m.params, x)), y)
    assert m.leaves.keys() == q.leaves.keys()
    with pytest.raises(ValueError, match=r"no module for arguments \(int32\[4, 4\]\).*saved "
                                         r"with: int32\[2, 5\]; int32\[1, 3\]"):
        m(m.params, tokens(np.random.default_rng(0), 4, 4))


def test_load_in_a_fresh_process_gives_identical_outputs(saved):
    _, d, _, _ = saved
    out = run_python("""
        import numpy as np, fp8xla.jax
        m = fp8xla.jax.load("mlp_fp8")
        for i in range(2):
            got = np.asarray(m(m.params, np.load(f"x{i}.npy")))
            assert np.array_equal(got, np.load(f"y{i}.npy")), i
        m.print_model()
        print("same")
        """, d.parent)
    assert out.strip().endswith("same") and "float8_e5m2" in out


def test_a_process_that_never_imports_fp8xla_runs_the_module(saved):
    """What this proves: the subprocess imports only jax, numpy, ml_dtypes and safetensors; it
    checks that fp8xla is not in sys.modules before its first computation, deserializes the
    module with jax.export and runs it with the parameters read by safetensors itself. That
    module calls fp8xla's custom calls, which XLA can only run once they are registered; the
    outputs equal those of the quantizing process, and afterwards fp8xla is in sys.modules:
    JAX's plugin discovery (the jax_plugins entry point of the installed package) imported it
    when it set up the CPU backend, since the test code never did."""
    _, d, _, _ = saved
    out = run_python("""
        import sys
        import jax, ml_dtypes, numpy as np
        from safetensors import deserialize

        assert "fp8xla" not in sys.modules
        exp = jax.export.deserialize(bytearray(open("mlp_fp8/module-0.jaxexport", "rb").read()))
        dtypes = {"F8_E5M2": ml_dtypes.float8_e5m2, "F32": np.float32, "I32": np.int32}
        tensors = {name: np.frombuffer(bytes(t["data"]), dtypes[t["dtype"]]).reshape(t["shape"])
                   for name, t in deserialize(open("mlp_fp8/params.safetensors", "rb").read())}
        params_tree = exp.in_tree.children()[0].children()[0]
        paths = ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(
                     params_tree.unflatten(range(params_tree.num_leaves)))[0]]
        params = params_tree.unflatten([tensors[p] for p in paths])
        assert "fp8xla" not in sys.modules  # nothing above imported it
        got = np.asarray(exp.call(params, np.load("x0.npy")))
        assert np.array_equal(got, np.load("y0.npy"))
        assert "fp8xla" in sys.modules and "fp8xla.jax_plugin" in sys.modules
        assert "fp8xla.jax" not in sys.modules and "fp8xla.keras" not in sys.modules
        print("ran")
        """, d.parent)
    assert out.strip() == "ran"


def test_flax_state_comes_back_as_a_dict_by_path(rng, tmp_path):
    fn, state = nnx_model()
    x = tokens(rng, 2, 4)
    q = fj.quantize(fn, state, x, config=StaticQuantConfig(activation_dtype=None))
    q.save(str(tmp_path / "nnx"))
    m = fj.load(str(tmp_path / "nnx"))
    assert isinstance(m.params, dict)
    assert m.params["up/kernel/value"].dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(m(m.params, x)), np.asarray(q(q.params, x)))


# ---------------------------------------------------------------------------------------------
# damaged artifacts


def _rewrite_manifest(d, change):
    path = d / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def test_corrupt_truncated_and_other_version_artifacts(saved, tmp_path):
    _, d, _, _ = saved

    def expect(match):
        with pytest.raises(fj.ArtifactError, match=match):
            fj.load(str(d))

    with pytest.raises(fj.ArtifactError, match="is not a directory"):
        fj.load(str(tmp_path / "nothing"))
    module = d / "module-0.jaxexport"
    good = module.read_bytes()
    module.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    expect("module-0.jaxexport does not match its SHA-256 in the manifest")
    module.write_bytes(good[: len(good) // 2])
    expect(f"module-0.jaxexport has {len(good) // 2} bytes, the manifest says {len(good)}")
    module.write_bytes(good)

    params = d / "params.safetensors"
    good_params = params.read_bytes()
    params.write_bytes(good_params[:-10])
    expect("params.safetensors has .* bytes, the manifest says .*truncated")
    # damaged, with the manifest updated to match: the formats' own checks catch it
    params.write_bytes(b"\xff" * 16 + good_params[16:])
    _rewrite_manifest(d, lambda m: m["params"].update(
        sha256=hashlib.sha256(params.read_bytes()).hexdigest()))
    expect("params.safetensors is not a valid safetensors file")
    params.write_bytes(good_params)
    _rewrite_manifest(d, lambda m: m["params"].update(
        sha256=hashlib.sha256(good_params).hexdigest()))
    module.write_bytes(b"not a module" * 10)
    _rewrite_manifest(d, lambda m: m["modules"][0].update(
        bytes=120, sha256=hashlib.sha256(module.read_bytes()).hexdigest()))
    expect("module-0.jaxexport is not a serialized jax.export module")

    _rewrite_manifest(d, lambda m: m.update(version=2))
    expect("format version 2 .* this fp8xla reads version 1")
    (d / "manifest.json").write_text("{not json")
    expect("manifest.json is not valid JSON")
    (d / "manifest.json").unlink()
    expect("has no manifest.json; not an fp8xla.jax artifact")


def test_a_parameter_file_that_lacks_a_tensor(saved):
    _, d, _, _ = saved
    from safetensors import deserialize
    from safetensors.numpy import save_file
    params = d / "params.safetensors"
    dtypes = {"F8_E5M2": ml_dtypes.float8_e5m2, "F32": np.float32, "I32": np.int32}
    tensors = {n: np.frombuffer(bytes(t["data"]), dtypes[t["dtype"]]).reshape(t["shape"])
               for n, t in deserialize(params.read_bytes()) if n != "gain"}
    save_file(tensors, str(params))
    _rewrite_manifest(d, lambda m: m["params"].update(
        bytes=params.stat().st_size, sha256=hashlib.sha256(params.read_bytes()).hexdigest()))
    with pytest.raises(fj.ArtifactError, match="has no tensor 'gain', which the module takes"):
        fj.load(str(d))
