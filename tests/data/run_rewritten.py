#!/usr/bin/env python3
"""Runs quantize-rewritten modules against their fake-quant references.

    KERAS_BACKEND=jax python tests/data/run_rewritten.py LIBFP8XLA.so REWRITTEN.mlir OPTIONS.json
    python tests/data/run_rewritten.py LIBFP8XLA.so --mlp REWRITTEN_MLP.mlir OPTIONS.json

Gemma3 (first form): 
Registers the library's custom calls, quantizes the tiny model's weights as OPTIONS.json says
(per-tensor or per-channel scales; ``q = sat(RNE(w / scale))``; activation scales and
skipped sites are not modelled by the reference), runs
- the reference: the original exported module with the dequantized weights (float32), and
- the rewritten module with the FP8 weights,
on the same prompt, and compares the generated token ids (greedy) and prints both.
"""

import dataclasses
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ctypes  # noqa: E402

import jax  # noqa: E402
import jax.extend  # noqa: E402
import jax.extend.mlir  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from jaxlib.mlir.dialects import stablehlo  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_modules  # noqa: E402

FORMATS = {"e4m3fn": (ml_dtypes.float8_e4m3fn, 448.0), "e5m2": (ml_dtypes.float8_e5m2, 57344.0)}


TARGETS = []  # the library's custom-call targets, as its fp8xla_targets() lists them


def register(lib_path):
    lib = ctypes.cdll.LoadLibrary(lib_path)
    lib.fp8xla_targets.restype = ctypes.c_char_p
    TARGETS[:] = lib.fp8xla_targets().decode().splitlines()
    for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")


def quantize_weight(w, spec):
    """(FP8 codes, dequantized float32) of one weight as the options say."""
    scale = np.asarray(spec["w_scale"], np.float32)
    if scale.ndim == 1:  # per-channel along channel_dim
        shape = [1] * w.ndim
        shape[spec["channel_dim"]] = -1
        scale = scale.reshape(shape)
    dtype, fmax = FORMATS[spec["format"]]
    q = np.clip(w / scale, -fmax, fmax).astype(dtype)
    return q, q.astype(np.float32) * scale


def call_rewritten(exp, text, avals, args):
    ser = jax.extend.mlir.serialize_portable_artifact(text, stablehlo.get_current_version())
    fp8_exp = dataclasses.replace(
        exp,
        mlir_module_serialized=ser,
        in_avals=tuple(avals),
        disabled_safety_checks=tuple(jax.export.DisabledSafetyCheck.custom_call(t) for t in TARGETS),
    )
    return jax.jit(fp8_exp.call)(*args)


def main_mlp(lib_path, rewritten_path, options_path):
    """The MLP of export_modules.py: numeric comparison, activation scales included."""
    register(lib_path)
    options = json.load(open(options_path))
    specs = [
        jax.ShapeDtypeStruct(s, jnp.float32) for s in [(2, 8, 16), (16, 32), (32,), (32, 4), (4,)]
    ]

    def mlp(x, w1, b1, w2, b2):
        h = jax.nn.relu(x @ w1 + b1)
        return h @ w2 + b2

    exp = export_modules.export(mlp, specs)
    r = np.random.RandomState(0)
    args = [r.randn(*s.shape).astype(np.float32) for s in specs]
    ref_args, fp8_args, avals = list(args), list(args), list(exp.in_avals)
    a_scales = {}
    for spec in options["weights"]:
        i = spec["arg"]
        q, dq = quantize_weight(args[i], spec)
        fp8_args[i], ref_args[i] = q, dq
        avals[i] = jax.core.ShapedArray(q.shape, q.dtype)
        a_scales[i] = spec.get("a_scale")

    def qdq(x, arg):
        s = a_scales.get(arg)
        if s is None:
            return x
        s = np.float32(s)
        return np.clip(x / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s

    x, w1, b1, w2, b2 = ref_args
    h = np.maximum(qdq(x, 1) @ w1 + b1, 0)
    ref = qdq(h, 3) @ w2 + b2
    out = np.asarray(call_rewritten(exp, open(rewritten_path).read(), avals, fp8_args))
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    print(f"MLP: max relative error vs the fake-quant reference: {err:.3g}")
    return 0 if err <= 1e-5 else 1


def main(lib_path, rewritten_path, options_path):
    register(lib_path)
    options = json.load(open(options_path))
    model, f, (inputs_spec, state_spec), groups = export_modules.build_gemma3()
    exp = export_modules.export(f, [inputs_spec, state_spec])

    values = [[np.asarray(v.value) for v in g] for g in groups]
    flat = [None, None] + [v for g in values for v in g]  # entry arguments 2.. are the state
    fp8_args = dict(enumerate(flat))
    ref_args = dict(enumerate(flat))
    avals = list(exp.in_avals)
    for w in options["weights"]:
        i = w["arg"]
        fp8_args[i], ref_args[i] = quantize_weight(flat[i], w)
        avals[i] = jax.core.ShapedArray(fp8_args[i].shape, fp8_args[i].dtype)

    token_ids = np.zeros((1, 8), np.int32)
    token_ids[0, :3] = [2, 17, 99]
    padding_mask = np.zeros((1, 8), bool)
    padding_mask[0, :3] = True
    inputs = {"padding_mask": padding_mask, "token_ids": token_ids}

    def unflatten(args):
        state, k = [], 2
        for g in values:
            state.append([args[k + j] for j in range(len(g))])
            k += len(g)
        return inputs, tuple(state)

    ref = jax.jit(exp.call)(*unflatten(ref_args))
    out = call_rewritten(exp, open(rewritten_path).read(), avals, unflatten(fp8_args))
    ref_ids = np.asarray(ref[0]["token_ids"])
    out_ids = np.asarray(out[0]["token_ids"])
    print("reference (fake-quant) token ids:", ref_ids.tolist())
    print("FP8 graph token ids:             ", out_ids.tolist())
    same = np.array_equal(ref_ids, out_ids)
    print("identical" if same else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "--mlp":
        sys.exit(main_mlp(sys.argv[1], *sys.argv[3:5]))
    sys.exit(main(*sys.argv[1:4]))
