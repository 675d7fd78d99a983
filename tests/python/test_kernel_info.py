"""fp8xla.info(): which kernels run and why; FP8XLA_ISA; the `precision` option."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp8xla
from fp8xla import ops

LEVELS = ["scalar", "avx2", "avx512", "amx"]


def info_in_subprocess(isa):
    env = dict(os.environ)
    env.pop("FP8XLA_ISA", None)
    if isa is not None:
        env["FP8XLA_ISA"] = isa
    code = "import json, fp8xla; print(json.dumps(fp8xla.info()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    return out


def test_info_names_the_level_in_use_and_why_each_other_is_unavailable():
    i = fp8xla.info()
    assert i["isa"] == fp8xla.isa()
    assert [lv["isa"] for lv in i["levels"]] == LEVELS
    for lv in i["levels"]:
        assert lv["available"] == (LEVELS.index(lv["isa"]) <= LEVELS.index(i["supported"]))
        assert bool(lv["reason"]) != lv["available"], lv
    assert LEVELS.index(i["isa"]) <= LEVELS.index(i["supported"])
    assert i["why"].startswith(i["isa"])
    assert "GEMV" in i["kernels"] and "GEMM" in i["kernels"]
    print("kernel levels here:", json.dumps(i["levels"]))


@pytest.mark.parametrize("asked", LEVELS)
def test_fp8xla_isa_asks_for_a_level_within_what_the_machine_runs(asked):
    out = info_in_subprocess(asked)
    assert out.returncode == 0, out.stderr
    i = json.loads(out.stdout)
    if LEVELS.index(asked) <= LEVELS.index(i["supported"]):
        assert i["isa"] == asked
        assert "requested by FP8XLA_ISA" in i["why"]
    else:
        assert i["isa"] == i["supported"]
        assert f"asked for {asked}, which this machine cannot run" in i["why"]


def test_unknown_fp8xla_isa_is_a_clear_error():
    out = info_in_subprocess("avx-512")
    assert out.returncode != 0
    assert "FP8XLA_ISA='avx-512' is not one of scalar, avx2, avx512, amx" in out.stderr


def test_precision_bf16_stays_within_bf16_rounding_and_bad_values_are_refused():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 96)).astype(np.float32)
    w = (rng.standard_normal((96, 48)) * 2).astype(ml_dtypes.float8_e4m3fn)
    want = x.astype(np.float64) @ w.astype(np.float64)
    for precision, tol in (("f32", 1e-5), ("bf16", 2e-2)):
        got = np.asarray(ops.fp8_matmul(jnp.asarray(x), jnp.asarray(w), 1.0,
                                        precision=precision), np.float64)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= tol, (precision, err)
    with pytest.raises(ValueError, match="`precision` must be 'f32' or 'bf16', got 'fp16'"):
        ops.fp8_matmul(jnp.asarray(x), jnp.asarray(w), 1.0, precision="fp16")


BEST_LEVEL_CHECK = r"""
import json, sys
import jax.numpy as jnp, ml_dtypes, numpy as np
import fp8xla
from fp8xla import ops

rng = np.random.default_rng(11)
errs = {}
for m in (1, 17, 40):
    x = rng.standard_normal((m, 70)).astype(np.float32)
    w = (rng.standard_normal((70, 50)) * 2).astype(ml_dtypes.float8_e4m3fn)
    s = rng.uniform(0.5, 2.0, 50).astype(np.float32)
    wf = w.astype(np.float64) * s
    # weight-only, float32 and bfloat16 activations
    got = np.asarray(ops.fp8_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(s)), np.float64)
    ref = x.astype(np.float64) @ wf
    errs[f"f32 m={m}"] = float(np.abs(got - ref).max() / np.abs(ref).max())
    xb = x.astype(ml_dtypes.bfloat16)
    got = np.asarray(ops.fp8_matmul(jnp.asarray(xb), jnp.asarray(w), jnp.asarray(s),
                                    out_dtype=np.float32), np.float64)
    ref = xb.astype(np.float64) @ wf
    errs[f"bf16 m={m}"] = float(np.abs(got - ref).max() / np.abs(ref).max())
    # w+a: activations quantized with a_scale (the fake-quant reference QDQs them)
    a_scale = float(np.abs(x).max() / 448.0)
    got = np.asarray(ops.fp8_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(s),
                                    a_scale=a_scale), np.float64)
    xq = (x / np.float32(a_scale)).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * a_scale
    ref = xq @ wf
    errs[f"w+a m={m}"] = float(np.abs(got - ref).max() / np.abs(ref).max())
print(json.dumps({"isa": fp8xla.isa(), "errs": errs}))
"""


def test_the_best_level_of_this_machine_through_the_custom_call():
    """The custom call on the best level this machine supports (the AMX tiles or AVX-512
    GEMVs where present, which the default does not use yet), against float64 references."""
    best = fp8xla.info()["supported"]
    env = dict(os.environ, FP8XLA_ISA=best)
    out = subprocess.run([sys.executable, "-c", BEST_LEVEL_CHECK], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["isa"] == best
    print(f"level {best}: normwise errors {res['errs']}")
    for name, err in res["errs"].items():
        assert err <= 1e-5, (best, name, err)
