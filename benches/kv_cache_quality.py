"""GPL-3 perplexity change from the FP8 KV cache (``kv_cache_dtype``).

    .venv/bin/python benches/kv_cache_quality.py --out kv-quality [--weights float32,rtn]
        [--kv none,fp8_e4m3,fp8_e5m2,fp8_e4m3:v,fp8_e4m3+hk,fp8_e4m3+mk,fp8_e4m3+sk4,fp8_e4m3+ok]

The GPL-3 protocol (:mod:`fp8xla.perplexity`) scores the model's forward pass, which has no KV
cache. The FP8 cache's effect is measured there with the same quantization the cache applies:
every attention layer reads its keys and values with each row (one position and KV head,
``head_dim`` values) quantized to FP8 and back with its own scale ``amax / max`` — exactly the
values a decode step reads from the FP8 cache. This is the pessimistic case: in a real
generate the prefill attends over the prompt's float keys and values, and only the decode
steps read the FP8 cache; here every scored token reads FP8 keys and values, its own
included.

Weights: ``float32`` (the Keras model) or ``rtn`` (fp8xla e4m3 weight-only, round to
nearest, no calibration). Each combination is scored on a fresh model; results go to
``OUT/kv_cache_quality.json`` with the change against the same weights with a float32 cache.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def qdq_rows(x, fmt, widen=1.0):
    """Each row (last dim) through FP8 with the scale amax(finite |row|) / max (1 for zeros),
    as ``fp8xla_quantize_rows`` writes the cache; times ``widen`` (>= 1) if given."""
    import jax.numpy as jnp
    from fp8xla import ops

    name = {"fp8_e4m3": "e4m3fn", "fp8_e5m2": "e5m2"}[fmt]
    dtype, m = ops.fp8_dtype(name), np.float32(ops.max_of(name))
    amax = jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0), axis=-1, keepdims=True)
    s = amax / m
    s = jnp.where(s > 0, s, jnp.float32(1)) * np.float32(widen)
    return jnp.clip(x / s, -m, m).astype(dtype).astype(x.dtype) * s


def qdq_rows_least_squares(x, fmt, steps=16):
    """:func:`qdq_rows` with each row's scale widened by ``2^(j / steps)``, ``j < steps`` (one
    binade: past it the FP8 grid repeats), whichever gives the row the least squared error.
    The largest value is then no longer always stored exactly, but the large values together
    are stored closer."""
    import jax.numpy as jnp

    best = qdq_rows(x, fmt)
    best_err = jnp.sum(jnp.square(best - x), axis=-1, keepdims=True)
    for j in range(1, steps):
        y = qdq_rows(x, fmt, 2 ** (j / steps))
        err = jnp.sum(jnp.square(y - x), axis=-1, keepdims=True)
        best = jnp.where(err < best_err, y, best)
        best_err = jnp.minimum(err, best_err)
    return best


def hadamard(n):
    """The orthonormal ``n x n`` Walsh-Hadamard matrix (``n`` a power of two); symmetric, so
    it is its own inverse."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: {n} is not a power of two")
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def key_means(model, passages, max_tokens=256):
    """``[block] -> [kv_heads, head_dim]``: the mean key (after RoPE, as the cache holds it)
    of every attention layer over the calibration ``passages`` (eager forward passes)."""
    from fp8xla.perplexity import _tokenizer_of

    tokenizer = _tokenizer_of(model)
    bos = int(tokenizer.start_token_id)
    blocks = model.backbone.transformer_layers
    sums, count = [0.0] * len(blocks), 0
    plains = [b.attention._compute_attention for b in blocks]

    def recorder(i, plain):
        def compute(q, k, v, attention_mask, *args, **kwargs):
            sums[i] = sums[i] + np.asarray(k, np.float64).sum(axis=(0, 1))
            return plain(q, k, v, attention_mask, *args, **kwargs)
        return compute

    for i, (b, plain) in enumerate(zip(blocks, plains)):
        b.attention._compute_attention = recorder(i, plain)
    try:
        for text in passages:
            ids = np.asarray([[bos] + list(np.asarray(tokenizer(text)))[:max_tokens - 1]],
                             np.int32)
            model.backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)})
            count += ids.shape[1]
    finally:
        for b, plain in zip(blocks, plains):
            b.attention._compute_attention = plain
    return [(s / count).astype(np.float32) for s in sums]


def quantize_attention_reads(model, fmt, parts="kv", rotate_keys=False, key_mean=None,
                             float_key_positions=0, least_squares_keys=False):
    """Makes every attention layer of ``model`` read QDQ'd keys and/or values (``parts``).

    ``float_key_positions``: the keys of the first positions (the BOS token and the first
    words, which draw much of the attention: "attention sinks") are read unquantized, as a
    cache that kept them in float32 beside the FP8 rows would.

    ``least_squares_keys``: key rows use :func:`qdq_rows_least_squares`'s scales.

    ``rotate_keys``: each key row is multiplied by the orthonormal Hadamard matrix ``H``
    before it is quantized, and back after (a cache would store ``k H`` and read it with
    queries ``q H``: ``(q H)·(k H) = q·k``). It spreads the keys' few large channels over all
    of them. Measured on Gemma 3 270M it made the cache's loss worse (docs/quality.md): with
    one scale per row the largest value is stored exactly, and rotated it no longer is.

    ``key_mean`` (from :func:`key_means`): each key row is quantized as ``k - mean`` (its
    layer's mean key) and read back plus the mean. A cache could store ``k - mean`` and never
    add it back: ``q·(k - mean)`` differs from ``q·k`` by the same amount at every position,
    which the softmax cancels; what is quantized is then the part of the key that varies."""
    for n, block in enumerate(model.backbone.transformer_layers):
        att = block.attention
        plain = att._compute_attention
        h = hadamard(att.head_dim) if rotate_keys else None
        mean = None if key_mean is None else key_mean[n]

        def compute(q, k, v, attention_mask, *args, _plain=plain, _h=h, _m=mean, **kwargs):
            if "k" in parts:
                k_in = k
                if _m is not None:
                    k = qdq_rows(k - _m, fmt) + _m
                elif least_squares_keys:
                    k = qdq_rows_least_squares(k, fmt)
                else:
                    k = qdq_rows(k, fmt) if _h is None else qdq_rows(k @ _h, fmt) @ _h
                if float_key_positions:
                    import jax.numpy as jnp
                    kept = float_key_positions
                    k = jnp.concatenate([k_in[:, :kept], k[:, kept:]], axis=1)
            if "v" in parts:
                v = qdq_rows(v, fmt)
            return _plain(q, k, v, attention_mask, *args, **kwargs)

        att._compute_attention = compute


KEY_TRANSFORMS = ("hk", "mk", "sk1", "sk4", "ok")


def parse_kv(spec):
    """``(format, parts, key transform)`` of a ``--kv`` entry: ``fp8_e4m3`` (keys and values),
    with ``:k`` / ``:v`` (only those), and ``+hk`` (keys rotated), ``+mk`` (keys centred on
    their calibration mean), ``+sk1`` / ``+sk4`` (the keys of the first 1 / 4 positions kept
    float) or ``+ok`` (key scales for the least squared error); see
    :func:`quantize_attention_reads`: ``fp8_e4m3:k+mk``."""
    fmt, _, rest = spec.partition(":") if ":" in spec else spec.partition("+")
    if ":" in spec:
        parts, _, transform = rest.partition("+")
    else:
        parts, transform = "", rest
    if fmt not in ("fp8_e4m3", "fp8_e5m2") or parts not in ("", "k", "v") or \
            transform not in ("",) + KEY_TRANSFORMS or (spec.endswith("+")):
        raise SystemExit(f"unknown --kv entry {spec!r}")
    return fmt, parts or "kv", transform or None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="gemma3_270m")
    ap.add_argument("--weights", default="float32,rtn")
    ap.add_argument("--kv", default="none,fp8_e4m3,fp8_e5m2")
    ap.add_argument("--chunks", type=int, default=None,
                    help="score only this many GPL-3 chunks (default: the protocol's 14)")
    ap.add_argument("--mean-passages", type=int, default=24,
                    help="calibration passages (benches/quality.py's) for +mk's key means")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    from fp8xla import models, perplexity
    from fp8xla.keras import StaticQuantConfig, quantize_model

    path = os.path.join(args.out, "kv_cache_quality.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    extra = {} if args.chunks is None else {"num_chunks": args.chunks}
    for weights in args.weights.split(","):
        for kv in args.kv.split(","):
            key = f"{weights}/{kv}"
            if key in results:
                continue
            model = models.load_model(args.model)
            if kv != "none":
                fmt, parts, transform = parse_kv(kv)
                mean = None
                if transform == "mk":
                    from quality import calibration_passages
                    mean = key_means(model, calibration_passages(count=args.mean_passages))
                quantize_attention_reads(
                    model, fmt, parts, rotate_keys=transform == "hk", key_mean=mean,
                    float_key_positions={"sk1": 1, "sk4": 4}.get(transform, 0),
                    least_squares_keys=transform == "ok")
            if weights == "rtn":
                quantize_model(model, StaticQuantConfig(activation_dtype=None))
            elif weights != "float32":
                raise SystemExit(f"unknown --weights entry {weights!r} (float32 or rtn)")
            t0 = time.perf_counter()
            r = perplexity.gpl3_perplexity(model, progress=True, **extra)
            entry = {"perplexity": r.perplexity, "seconds": time.perf_counter() - t0,
                     "predictions": r.num_predictions}
            base = results.get(f"{weights}/none")
            if kv != "none" and base:
                entry["delta_percent"] = 100 * (r.perplexity / base["perplexity"] - 1)
            results[key] = entry
            print(f"[kv-quality] {key}: {json.dumps(entry)}", flush=True)
            with open(path, "w") as f:
                json.dump(results, f, indent=1)
            del model


if __name__ == "__main__":
    main()
