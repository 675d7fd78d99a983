"""Side-by-side timing of XLA's float32 dot and fp8xla's FP8 matmul on the same shapes.

Both run jitted in one process, interleaved repetition by repetition so that machine noise
hits them alike; the reported time of each is the median over repetitions and the spread is
the range of the per-repetition ratio.

In a decode step every layer's weights are read once per token, and together they are far
larger than the CPU caches. Timing one small matrix over and over would instead measure it
from cache. So each shape gets enough distinct weight copies to cover `DISTINCT_BYTES` of
float32 weights (like the layers of a model), and each timed pass calls the matmul once on
every copy, for both contenders alike.

This is part of the installed package, unlike the end-to-end benchmark (benches/ of the
repository): `fp8xla matmuls` is the speed check a user runs after installing, and it needs
nothing but fp8xla.ops, JAX and NumPy."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np

from . import ops

#: Gemma3-270M weight matmuls as (name, K, N, weight layout).
GEMMA3_270M_SHAPES = [
    ("q_proj 640->1024", 640, 1024, "kn"),
    ("kv_proj 640->256", 640, 256, "kn"),
    ("o_proj 1024->640", 1024, 640, "kn"),
    ("ffn_up 640->2048", 640, 2048, "kn"),
    ("ffn_down 2048->640", 2048, 640, "kn"),
    ("logits 640->262144", 640, 262144, "nk"),
]


@dataclass
class Row:
    name: str
    m: int
    k: int
    n: int
    f32_ms: float
    fp8_ms: float
    fake_quant_ms: float
    speedup: float  # f32_ms / fp8_ms (median of per-repetition ratios)
    speedup_range: tuple
    fp8_gbps: float  # weight bytes streamed per second by the FP8 matmul
    f32_gbps: float
    fp8_gflops: float
    f32_gflops: float
    max_rel_err_vs_fake_quant: float


#: Float32 weight bytes each shape's copies cover together (4x this CPU's 32 MiB L3 and more).
DISTINCT_BYTES = 256 * 2**20


def _time(f, arg_sets, iters):
    """Seconds per call of `f`, cycling through `arg_sets` (one call on each per pass)."""
    for args in arg_sets:
        jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        for args in arg_sets:
            out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / (iters * len(arg_sets))


def compare(m, shapes=GEMMA3_270M_SHAPES, reps=5, min_seconds=0.2, seed=0, fmt="e4m3fn",
            progress=None):
    """Times f32 XLA, fake-quant (QDQ weights then f32 dot) and fp8xla on each shape."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, k, n, layout in shapes:
        if progress:
            progress(f"{name}, M={m}")
        wshape = (k, n) if layout == "kn" else (n, k)
        cdim = 0 if layout == "kn" else 1
        copies = max(1, DISTINCT_BYTES // (4 * k * n))
        x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
        dn = (((1,), (cdim,)), ((), ()))
        sshape = (1, n) if layout == "kn" else (n, 1)
        f32 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dn))
        fp8 = jax.jit(lambda a, q, s: ops.fp8_matmul(a, q, s, dn))
        fake = jax.jit(lambda a, q, s: jax.lax.dot_general(
            a, q.astype(jnp.float32) * s.reshape(sshape), dn))
        f32_args, q_args = [], []
        for _ in range(copies):
            w = rng.standard_normal(wshape, dtype=np.float32) * 0.05
            codes, scale = ops.quantize_weight(w, fmt, channel_axes=1 - cdim)
            f32_args.append((x, jnp.asarray(w)))
            q_args.append((x, jnp.asarray(codes), jnp.asarray(scale)))
            del w, codes
        ref = np.asarray(fake(*q_args[0]), np.float64)
        got = np.asarray(fp8(*q_args[0]), np.float64)
        err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)) if ref.size else 0.0
        once = _time(f32, f32_args, 1)
        iters = max(1, int(min_seconds / max(once * copies, 1e-6)))
        t_f32, t_fp8, t_fake = [], [], []
        for _ in range(reps):
            t_f32.append(_time(f32, f32_args, iters))
            t_fp8.append(_time(fp8, q_args, iters))
            t_fake.append(_time(fake, q_args, iters))
        ratios = sorted(a / b for a, b in zip(t_f32, t_fp8))
        f32_s, fp8_s = float(np.median(t_f32)), float(np.median(t_fp8))
        flops = 2.0 * m * k * n
        rows.append(Row(
            name, m, k, n, f32_s * 1e3, fp8_s * 1e3, float(np.median(t_fake)) * 1e3,
            float(np.median(ratios)), (ratios[0], ratios[-1]),
            k * n / fp8_s / 1e9, 4 * k * n / f32_s / 1e9,
            flops / fp8_s / 1e9, flops / f32_s / 1e9, err,
        ))
    return rows


def geomean(xs):
    xs = list(xs)
    return float(np.exp(np.mean(np.log(xs)))) if xs else float("nan")


def table(rows):
    """Markdown table of `compare` rows."""
    out = ["| shape | M | XLA f32 ms | fake-quant ms | fp8xla ms | speedup (range) | "
           "fp8 GB/s | f32 GB/s | fp8 GFLOP/s | f32 GFLOP/s | rel. err |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r.name} | {r.m} | {r.f32_ms:.3f} | {r.fake_quant_ms:.3f} | {r.fp8_ms:.3f} | "
            f"{r.speedup:.2f}x ({r.speedup_range[0]:.2f}-{r.speedup_range[1]:.2f}) | "
            f"{r.fp8_gbps:.1f} | {r.f32_gbps:.1f} | {r.fp8_gflops:.1f} | {r.f32_gflops:.1f} | "
            f"{r.max_rel_err_vs_fake_quant:.1e} |")
    return "\n".join(out)


def as_dicts(rows):
    return [asdict(r) for r in rows]
