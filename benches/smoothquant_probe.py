"""Does SmoothQuant-style migration help fp8xla's static e4m3 w+a on Gemma 3? (GPL-3 protocol)

    .venv/bin/python benches/smoothquant_probe.py --out smooth-run [--alphas 0.5,0.75]

SmoothQuant divides each input channel ``j`` of a matmul's activations by
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` and multiplies the weight's row ``j`` by it:
the float model computes the same function, but activation outliers move into the weights.
Here it is applied where the division folds into an existing float operation, so nothing at
run time changes:

- attention input (query, key, value share it): into ``pre_attention_norm`` (Gemma's RMSNorm
  multiplies by ``1 + scale``, so ``scale' = (1 + scale) / s - 1``);
- FFW input (``ffw_gating``, ``ffw_gating_2``): into ``pre_ffw_norm``, the same way;
- ``ffw_linear``'s input ``gelu(gating) * gating_2``: into ``ffw_gating_2``'s output columns.

Not smoothed: the attention output projection (its input channels are the value heads'
channels after softmax, shared by the 4 query heads of a kv head) and the tied logits (the
same table serves the lookup).

Each arm starts from a fresh float32 model, is smoothed (alpha > 0), quantized with
``StaticQuantConfig(activation_dtype="fp8_e4m3")`` (round to nearest, static per-tensor
activation scales) on benches/quality.py's calibration passages, and scored; alpha 0 is the
unsmoothed baseline. The channel maxima come from the same passages, on the float model.
Results: ``OUT/smoothquant.json``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def channel_maxima(model, calib, paths):
    """``{weight path: max |x_j| over the calibration inputs, per contracted channel j}`` for
    the EinsumDense kernels at ``paths`` (hooks as for the Gram matrices)."""
    import jax
    import jax.numpy as jnp

    from fp8xla.keras import _gram

    maxima = {}

    def add(path, m):
        m = np.asarray(m, np.float64)
        maxima[path] = m if path not in maxima else np.maximum(maxima[path], m)

    class MaxCollector(_gram.GramCollector):
        def _record(self, site, x, x_axes):
            rows = _gram._rows_of(x, x_axes)
            jax.debug.callback(functools.partial(add, site.path),
                               jnp.max(jnp.abs(rows), axis=0))

    by_path = {v.path: i for i, v in enumerate(model.trainable_variables)}
    indices = [by_path[p] for p in paths]
    saved = model.generate_function
    try:
        with MaxCollector(model, indices):
            model.generate_function = _gram._stock_generate_function(model)
            calib(model)
            jax.effects_barrier()
    finally:
        model.generate_function = saved
    missing = [p for p in paths if p not in maxima]
    if missing:
        raise RuntimeError(f"smoothquant_probe: calibration never reached {missing}")
    return maxima


def _factors(x_max, w_rows, alpha):
    """SmoothQuant's ``s_j`` from activation maxima and the weights' row maxima (the rows
    multiplied by ``s``, over every weight sharing the input). Channels that never saw input
    or have zero weights keep ``s = 1``."""
    w_max = np.max(np.stack(w_rows), axis=0)
    s = np.ones_like(x_max)
    ok = (x_max > 0) & (w_max > 0)
    s[ok] = x_max[ok] ** alpha / w_max[ok] ** (1 - alpha)
    return s


def smooth(model, maxima, alpha):
    """Applies the migration to ``model``'s Gemma3 decoder blocks in place."""
    blocks = list(getattr(model.backbone, "transformer_layers", []))
    if not blocks:
        raise ValueError("smoothquant_probe: no Gemma3DecoderBlock in the model")
    for block in blocks:
        att = block.attention
        qkv = [att.query_dense, att.key_dense, att.value_dense]  # kernels [heads, d, h]
        x_max = maxima[att.query_dense.kernel.path]
        rows = [np.max(np.abs(np.asarray(layer.kernel.value)), axis=(0, 2)) for layer in qkv]
        s = _factors(x_max, rows, alpha)
        _fold_into_norm(block.pre_attention_norm, s)
        for layer in qkv:
            layer.kernel.assign(np.asarray(layer.kernel.value) * s[None, :, None])

        ffw = [block.gating_ffw, block.gating_ffw_2]  # kernels [d, f]
        x_max = maxima[block.gating_ffw.kernel.path]
        rows = [np.max(np.abs(np.asarray(layer.kernel.value)), axis=1) for layer in ffw]
        s = _factors(x_max, rows, alpha)
        _fold_into_norm(block.pre_ffw_norm, s)
        for layer in ffw:
            layer.kernel.assign(np.asarray(layer.kernel.value) * s[:, None])

        down = block.ffw_linear  # kernel [f, d]; its input gelu(gating) * gating_2
        x_max = maxima[down.kernel.path]
        s = _factors(x_max, [np.max(np.abs(np.asarray(down.kernel.value)), axis=1)], alpha)
        up = block.gating_ffw_2
        up.kernel.assign(np.asarray(up.kernel.value) / s[None, :])
        down.kernel.assign(np.asarray(down.kernel.value) * s[:, None])


def _fold_into_norm(norm, s):
    gamma = np.asarray(norm.scale.value, np.float64)
    norm.scale.assign(((1 + gamma) / s - 1).astype(np.float32))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="gemma3_270m")
    ap.add_argument("--alphas", default="0,0.5", help="comma-separated; 0: no smoothing")
    ap.add_argument("--calib-passages", type=int, default=None)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    from quality import calibration_function, calibration_passages

    from fp8xla import models, perplexity
    from fp8xla.keras import StaticQuantConfig, quantize_model

    path = os.path.join(args.out, "smoothquant.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    calib = calibration_function(calibration_passages(count=args.calib_passages))
    for alpha in (float(a) for a in args.alphas.split(",")):
        model = models.load_model(args.model)
        if alpha > 0:
            sites = [v.path for v in model.trainable_variables
                     if v.path.endswith(("query/kernel", "ffw_gating/kernel",
                                         "ffw_linear/kernel"))]
            t0 = time.perf_counter()
            maxima = channel_maxima(model, calib, sites)
            probe = np.asarray([[2, 651, 6974, 563, 496, 1694]])
            float_hidden = np.asarray(model.backbone({"token_ids": probe,
                                                      "padding_mask": np.ones_like(probe)}))
            smooth(model, maxima, alpha)
            smoothed = np.asarray(model.backbone({"token_ids": probe,
                                                  "padding_mask": np.ones_like(probe)}))
            # the migration must leave the float model's function unchanged
            change = float(np.max(np.abs(smoothed - float_hidden)) /
                           np.max(np.abs(float_hidden)))
            print(f"[smoothquant] alpha {alpha}: float hidden states change {change:.2e} "
                  f"(relative); smoothing took {time.perf_counter() - t0:.0f} s", flush=True)
            if change > 1e-3:
                raise RuntimeError(f"smoothquant_probe: smoothing changed the float model "
                                   f"({change:.2e})")
        model = quantize_model(model, StaticQuantConfig(activation_dtype="fp8_e4m3"), calib)
        r = perplexity.gpl3_perplexity(model, progress=True)
        results[str(alpha)] = {"perplexity": r.perplexity,
                               "predictions": np.asarray(r.predictions).tolist()}
        print(f"[smoothquant] alpha {alpha}: perplexity {r.perplexity:.4f}", flush=True)
        with open(path, "w") as f:
            json.dump(results, f)
        del model


if __name__ == "__main__":
    sys.exit(main())
