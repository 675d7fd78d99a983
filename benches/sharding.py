"""What sharding buys or costs on CPU: decode tokens/s and peak RSS per process of Gemma3
(random weights) in float32 Keras and in fp8xla FP8 (e4m3 weights, weight-only), on 1 device,
on 2 devices of one process (keras.distribution.ModelParallel, batch 1 x model 2) and on 2
processes of 1 device each (jax.distributed), for several Gemma3 sizes.

    python benches/sharding.py --sizes 270m,1b,4b --out bench-sharding.json
    python benches/sharding.py --sizes tiny --steps 8 --reps 1      (a smoke test)

Each configuration runs in processes of its own (peak RSS is that process's VmHWM, after
the model is built, quantized and has generated). Decode tokens/s: the same compiled
generate on a [1, L] batch with a prompt of L - steps tokens and with a prompt filling all L
positions; steps / the difference of their times (the cache fill cancels out); the median of
--reps repetitions, each shape run once untimed first. Random weights are enough for speed
and memory (quality is measured on the real 270M: docs/quality.md). Time it on a quiet
machine: other work on the host changes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

# Gemma3 text configurations (Keras-Hub presets' values); "tiny" for smoke tests.
SIZES = {
    "tiny": dict(vocabulary_size=256, num_layers=2, num_query_heads=4, num_key_value_heads=2,
                 hidden_dim=64, intermediate_dim=128, head_dim=16),
    "270m": dict(vocabulary_size=262144, num_layers=18, num_query_heads=4,
                 num_key_value_heads=1, hidden_dim=640, intermediate_dim=2048, head_dim=256),
    "1b": dict(vocabulary_size=262144, num_layers=26, num_query_heads=4,
               num_key_value_heads=1, hidden_dim=1152, intermediate_dim=6912, head_dim=256),
    "4b": dict(vocabulary_size=262144, num_layers=34, num_query_heads=8,
               num_key_value_heads=4, hidden_dim=2560, intermediate_dim=10240, head_dim=256),
}
# (name, dtype, devices per process, processes)
LAYOUTS = [
    ("float32 1 device", "float32", 1, 1),
    ("fp8 1 device", "fp8", 1, 1),
    ("float32 2 devices", "float32", 2, 1),
    ("fp8 2 devices", "fp8", 2, 1),
    ("fp8 2 processes", "fp8", 1, 2),
]


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(a) -> dict:
    if a.processes > 1:
        import keras
        keras.distribution.initialize(f"localhost:{a.port}", a.processes, a.process_id)
    import jax
    import keras
    import keras_hub
    import numpy as np

    from fp8xla.keras import (
        StaticQuantConfig, float_generate_function, gemma3_layout_map, quantize_model)

    cfg = SIZES[a.size]
    devices = jax.device_count()
    dist = None
    if devices > 1:
        mesh = keras.distribution.DeviceMesh((1, devices), ("batch", "model"),
                                             keras.distribution.list_devices())
        dist = keras.distribution.ModelParallel(
            layout_map=gemma3_layout_map(mesh, cfg), batch_dim_name="batch")
    scope = dist.scope() if dist is not None else _null()
    with scope:
        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.Gemma3Backbone(
            image_size=16, use_post_ffw_norm=True, use_post_attention_norm=True,
            use_sliding_window_attention=True, sliding_window_size=512, vision_encoder=None,
            **cfg)
        model = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
        model.compile(sampler=keras_hub.samplers.GreedySampler())
        if a.dtype == "fp8":
            quantize_model(model, StaticQuantConfig(weight_dtype="fp8_e4m3",
                                                    activation_dtype=None,
                                                    granularity="per_channel"))
        else:
            # Keras-Hub's own generate() fails without a preprocessor ("images": None).
            model.generate_function = float_generate_function(model)
        L = a.length
        rng = np.random.default_rng(0)

        def batch(prompt):
            ids = np.zeros((1, L), np.int32)
            ids[0, :prompt] = rng.integers(3, cfg["vocabulary_size"], prompt)
            mask = np.zeros((1, L), bool)
            mask[0, :prompt] = True
            return {"token_ids": ids, "padding_mask": mask}

        def timed(inputs):
            t = time.perf_counter()
            jax.block_until_ready(model.generate(inputs, stop_token_ids=None))
            return time.perf_counter() - t

        decode, full = batch(L - a.steps), batch(L)
        timed(decode)
        timed(full)
        diffs = [timed(decode) - timed(full) for _ in range(a.reps)]
    # A difference at or below zero means the decode steps took less than the timer's noise
    # (tiny models): no rate is reported rather than an absurd one, or a median of the
    # repetitions that happened to come out positive.
    rate = statistics.median(a.steps / d for d in diffs) if min(diffs) > 0 else None
    return {"size": a.size, "dtype": a.dtype, "devices_per_process": len(jax.local_devices()),
            "processes": jax.process_count(), "process_id": jax.process_index(),
            "decode_tokens_per_s": rate,
            "seconds_decode_minus_full": diffs,
            "peak_rss_bytes": peak_rss()}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_layout(size, name, dtype, devices, processes, a) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", KERAS_BACKEND="jax",
               JAX_NUM_CPU_DEVICES=str(devices))
    port = str(free_port())
    cmd = [sys.executable, __file__, "--worker", "--size", size, "--dtype", dtype,
           "--length", str(a.length), "--steps", str(a.steps), "--reps", str(a.reps),
           "--processes", str(processes), "--port", port]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(processes)]
    rows = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=a.timeout)
            if p.returncode != 0:
                return {"size": size, "layout": name,
                        "status": "failed: " + (err.strip().splitlines() or ["?"])[-1]}
            rows.append(json.loads(out.strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
        return {"size": size, "layout": name, "status": f"failed: timeout {a.timeout} s"}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    rates = [r["decode_tokens_per_s"] for r in rows]
    if any(r is None for r in rates):
        return {"size": size, "layout": name, "processes": rows,
                "status": "not measurable: the decode steps took less time than the noise"}
    return {"size": size, "layout": name, "status": "ok",
            "decode_tokens_per_s": min(rates),
            "peak_rss_bytes_per_process": [r["peak_rss_bytes"] for r in rows],
            "processes": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="270m,1b,4b", help=f"of {','.join(SIZES)}")
    ap.add_argument("--layouts", default=",".join(str(i) for i in range(len(LAYOUTS))),
                    help="indices into: " + "; ".join(f"{i} {n[0]}" for i, n in
                                                        enumerate(LAYOUTS)))
    ap.add_argument("--length", type=int, default=640, help="sequence length L")
    ap.add_argument("--steps", type=int, default=128, help="decode steps timed")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=7200)
    ap.add_argument("--out", help="write the results (JSON) here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    results = []
    for size in a.sizes.split(","):
        if size not in SIZES:
            ap.error(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
        for i in a.layouts.split(","):
            name, dtype, devices, processes = LAYOUTS[int(i)]
            r = run_layout(size, name, dtype, devices, processes, a)
            results.append(r)
            rss = ", ".join(f"{b / 2**20:.0f}" for b in r.get("peak_rss_bytes_per_process", []))
            rate = r.get("decode_tokens_per_s")
            print(f"{size:>5} {name:<18} " + (f"{rate:8.1f} tok/s  peak RSS MiB [{rss}]"
                                              if r["status"] == "ok" else r["status"]),
                  flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"length": a.length, "steps": a.steps, "reps": a.reps,
                       "results": results}, f, indent=1)
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
