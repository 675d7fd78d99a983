#!/usr/bin/env python3
"""Instruction counts of the greedy sampler's step over Gemma 3's vocabulary (262144 logits),
under callgrind: they do not depend on the machine's load, so they can be taken on a busy
machine, unlike times.

Variants, each exported with jax.export as Keras-Hub's GreedySampler computes it
(`argmax(softmax(logits / temperature))`, Keras' argmax with its -0.0 fix before
`jnp.argmax`), compiled, warmed up, then called STEPS times between a zeroing and a dump of
callgrind's counters:

- `sampler`: softmax + argmax, both in XLA (stock);
- `sampler_fp8xla_argmax`: the same after the pass `sampler_argmax` (what fp8xla runs);
- `argmax`: argmax alone in XLA (what dropping the softmax would leave);
- `argmax_fp8xla_argmax`: that after the pass;
- `dispatch`: a trivial function (one element of the logits): the cost of a call itself.

Run (the helper that zeroes and dumps the counters is compiled with `cc` from valgrind's
callgrind.h):

    valgrind --tool=callgrind --callgrind-out-file=cg.%p.out .venv/bin/python \\
        benches/sampler_callgrind.py

then `python benches/sampler_callgrind.py --report cg.<pid>.out` prints the instructions
per step of each variant (all threads, XLA's and fp8xla's pools included).
"""
import argparse
import ctypes
import glob
import os
import re
import subprocess
import sys
import tempfile

STEPS = 20
VOCAB = 262_144
HELPER = r"""
#include <valgrind/callgrind.h>
void cg_zero(void) { CALLGRIND_ZERO_STATS; }
void cg_dump(const char* name) { CALLGRIND_DUMP_STATS_AT(name); }
"""


def helper():
    tmp = tempfile.mkdtemp()
    src, lib = os.path.join(tmp, "cg.c"), os.path.join(tmp, "libcg.so")
    with open(src, "w") as f:
        f.write(HELPER)
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", lib, src], check=True)
    cg = ctypes.CDLL(lib)
    cg.cg_dump.argtypes = [ctypes.c_char_p]
    return cg


def measure():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax
    import keras
    import numpy as np

    from fp8xla import graph

    def sampler(logits):
        return keras.ops.argmax(keras.activations.softmax(logits / 1.0), axis=-1)

    def argmax(logits):
        return keras.ops.argmax(logits, axis=-1)

    def dispatch(logits):
        return logits[:, 0].astype("int32")

    spec = jax.ShapeDtypeStruct((1, VOCAB), np.float32)
    variants = {}
    for name, fn in (("sampler", sampler), ("argmax", argmax), ("dispatch", dispatch)):
        exp = jax.export.export(jax.jit(fn), platforms=["cpu"])(spec)
        variants[name] = exp
        if name != "dispatch":
            text, report = graph.run_pass("sampler_argmax", graph.module_text(exp), {})
            assert len(report["handled"]) == 1, report
            variants[f"{name}_fp8xla_argmax"] = graph.with_module(exp, text)
    logits = (np.random.default_rng(0).standard_normal((1, VOCAB)) * 3).astype(np.float32)
    cg = helper()
    results = {}
    for name, exp in variants.items():
        run = jax.jit(exp.call)
        for _ in range(3):
            results[name] = np.asarray(run(logits))
        cg.cg_zero()
        for _ in range(STEPS):
            jax.block_until_ready(run(logits))
        cg.cg_dump(name.encode())
    tokens = {k: int(v.ravel()[0]) for k, v in results.items() if k != "dispatch"}
    assert len(set(tokens.values())) == 1, tokens
    print("same token from every variant:", tokens)


def report(prefix):
    """Instructions per step of each dump of a run (files `prefix`, `prefix.N`)."""
    rows = []
    for path in sorted(glob.glob(prefix + "*")):
        text = open(path, errors="replace").read()
        trigger = re.search(r"^desc: Trigger: Client Request: (\S+)", text, re.M)
        total = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        if trigger and total:
            rows.append((trigger.group(1), int(total.group(1)) / STEPS))
    if not rows:
        sys.exit(f"no dumps of named variants in {prefix}*")
    base = dict(rows).get("dispatch", 0.0)
    print(f"{'variant':<24} {'instructions/step':>18} {'minus dispatch':>15}")
    for name, n in rows:
        print(f"{name:<24} {n:>18,.0f} {n - base:>15,.0f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", metavar="CALLGRIND_OUT",
                    help="print the counts of a finished run instead of measuring")
    args = ap.parse_args()
    report(args.report) if args.report else measure()
