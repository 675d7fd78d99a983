#!/usr/bin/env python3
"""Runs a quantize-rewritten tiny Gemma3 generate step against the fake-quant reference.

    KERAS_BACKEND=jax python tests/data/run_rewritten.py LIBFP8XLA.so REWRITTEN.mlir OPTIONS.json

Registers the library's custom calls, quantizes the tiny model's weights as OPTIONS.json says
(per-tensor scales; ``q = sat(RNE(w / scale))``), runs
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


def main(lib_path, rewritten_path, options_path):
    lib = ctypes.cdll.LoadLibrary(lib_path)
    for name in ["fp8xla_matmul", "fp8xla_observe", "fp8xla_dequantize"]:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    options = json.load(open(options_path))
    model, f, (inputs_spec, state_spec), groups = export_modules.build_gemma3()
    exp = export_modules.export(f, [inputs_spec, state_spec])

    values = [[np.asarray(v.value) for v in g] for g in groups]
    flat = [None, None] + [v for g in values for v in g]  # entry arguments 2.. are the state
    fp8_args = dict(enumerate(flat))
    ref_args = dict(enumerate(flat))
    avals = list(exp.in_avals)
    for w in options["weights"]:
        i, scale = w["arg"], np.float32(w["w_scale"])
        dtype, fmax = FORMATS[w["format"]]
        q = np.clip(flat[i] / scale, -fmax, fmax).astype(dtype)
        fp8_args[i] = q
        ref_args[i] = q.astype(np.float32) * scale
        avals[i] = jax.core.ShapedArray(q.shape, q.dtype)

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
    text = open(rewritten_path).read()
    ser = jax.extend.mlir.serialize_portable_artifact(text, stablehlo.get_current_version())
    targets = ["fp8xla_matmul", "fp8xla_observe", "fp8xla_dequantize"]
    fp8_exp = dataclasses.replace(
        exp,
        mlir_module_serialized=ser,
        in_avals=tuple(avals),
        disabled_safety_checks=tuple(jax.export.DisabledSafetyCheck.custom_call(t) for t in targets),
    )
    out = jax.jit(fp8_exp.call)(*unflatten(fp8_args))
    ref_ids = np.asarray(ref[0]["token_ids"])
    out_ids = np.asarray(out[0]["token_ids"])
    print("reference (fake-quant) token ids:", ref_ids.tolist())
    print("FP8 graph token ids:             ", out_ids.tolist())
    same = np.array_equal(ref_ids, out_ids)
    print("identical" if same else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
