"""GPL-3 perplexity change from the FP8 KV cache (``kv_cache_dtype``).

    .venv/bin/python benches/kv_cache_quality.py --out kv-quality [--weights float32,rtn]
        [--kv none,fp8_e4m3,fp8_e5m2]

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
import time

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")


def qdq_rows(x, fmt):
    """Each row (last dim) through FP8 with the scale amax(finite |row|) / max (1 for zeros),
    as ``fp8xla_quantize_rows`` writes the cache."""
    import jax.numpy as jnp
    from fp8xla import ops

    name = {"fp8_e4m3": "e4m3fn", "fp8_e5m2": "e5m2"}[fmt]
    dtype, m = ops.fp8_dtype(name), np.float32(ops.max_of(name))
    amax = jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0), axis=-1, keepdims=True)
    s = amax / m
    s = jnp.where(s > 0, s, jnp.float32(1))
    return jnp.clip(x / s, -m, m).astype(dtype).astype(x.dtype) * s


def quantize_attention_reads(model, fmt):
    """Makes every attention layer of ``model`` read QDQ'd keys and values."""
    for block in model.backbone.transformer_layers:
        att = block.attention
        plain = att._compute_attention

        def compute(q, k, v, attention_mask, *args, _plain=plain, **kwargs):
            return _plain(q, qdq_rows(k, fmt), qdq_rows(v, fmt), attention_mask, *args,
                          **kwargs)

        att._compute_attention = compute


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="gemma3_270m")
    ap.add_argument("--weights", default="float32,rtn")
    ap.add_argument("--kv", default="none,fp8_e4m3,fp8_e5m2")
    ap.add_argument("--chunks", type=int, default=None,
                    help="score only this many GPL-3 chunks (default: the protocol's 14)")
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
                quantize_attention_reads(model, kv)
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
