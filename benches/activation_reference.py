"""fp8xla's weight+activation quantization against an independent fake-quant reference.

    .venv/bin/python benches/activation_reference.py --out act-ref [--chunks 1]

On the first ``--chunks`` chunks of the GPL-3 protocol, the logits of fp8xla's FP8 model
(round-to-nearest weights; weight-only, static per-tensor activation scales, dynamic per-row
scales) are compared with a reference built independently of fp8xla's graph rewrite and
kernels: the float Keras model holding the dequantized weights, each matmul input quantized
to e4m3 and back in numpy float64 (ml_dtypes rounding) before the layer runs — per tensor with
fp8xla's calibrated static scale, or per row (one scale per token, over the contracted axes)
for the dynamic scheme. Same numbers up to float32 rounding means fp8xla computes what the
scheme says; the KL divergence to the float32 model and the perplexity of each say what the
scheme costs. ``--sites`` restricts the reference's activation quantization to the weights
whose path contains one of the given strings (to see where a scheme loses).

Results: ``OUT/activation_reference.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

E4M3_MAX = 448.0


def qdq_per_tensor(x, scale):
    """float64 reference of static activation QDQ: saturate, round to nearest even."""
    import ml_dtypes

    y = np.clip(np.asarray(x, np.float64) / scale, -E4M3_MAX, E4M3_MAX)
    return (y.astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * scale).astype(np.float32)


def qdq_rows(x2d):
    """float64 reference of dynamic activation QDQ: each row ``amax(finite) / 448``."""
    import ml_dtypes

    x = np.asarray(x2d, np.float64)
    amax = np.max(np.where(np.isfinite(x), np.abs(x), 0.0), axis=-1, keepdims=True)
    s = np.where(amax > 0, amax / E4M3_MAX, 1.0)
    y = np.clip(x / s, -E4M3_MAX, E4M3_MAX)
    return (y.astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * s).astype(np.float32)


class ActivationQdq:
    """Hooks the model's matmul layers (as fp8xla.keras._gram does) so that each input is
    QDQ'd on the host: ``scales[index]`` a float (static) or ``"row"`` (dynamic)."""

    def __init__(self, model, scales):
        import jax
        import jax.numpy as jnp

        self._hooked = []
        var_index = {id(v): i for i, v in enumerate(model.trainable_variables)}

        def qdq(x, x_axes, how):
            rest = [d for d in range(x.ndim) if d not in x_axes]
            perm = rest + list(x_axes)
            xt = jnp.transpose(x, perm)
            shape = xt.shape
            k = int(np.prod([x.shape[d] for d in x_axes]))

            def host(v):
                v = np.asarray(v).reshape(-1, k)
                out = qdq_rows(v) if how == "row" else qdq_per_tensor(v, how)
                return out.reshape(shape)

            y = jax.pure_callback(host, jax.ShapeDtypeStruct(shape, jnp.float32),
                                  xt.astype(jnp.float32))
            return jnp.transpose(y, np.argsort(perm)).astype(x.dtype)

        for layer in model._flatten_layers(include_self=False, recursive=True):
            kind = type(layer).__name__
            if kind in ("EinsumDense", "Dense"):
                i = var_index.get(id(getattr(layer, "kernel", None)))
                if i in scales:
                    self._hook(layer, i, scales[i], kind, qdq)
            elif kind == "ReversibleEmbedding":
                i = var_index.get(id(getattr(layer, "embeddings", None)))
                if i in scales:
                    self._hook_reverse(layer, scales[i], qdq)

    def _hook(self, layer, index, how, kind, qdq):
        from fp8xla.keras import _gram

        stock = layer.call

        def call(inputs, *args, **kwargs):
            if kind == "Dense":
                axes = (inputs.ndim - 1,)
            else:
                found = _gram._einsum_contraction(layer.equation, inputs.ndim)
                if found is None:
                    raise ValueError(f"cannot read equation {layer.equation!r}")
                axes = found[0]
            return stock(qdq(inputs, axes, how), *args, **kwargs)

        object.__setattr__(layer, "call", call)
        self._hooked.append(layer)

    def _hook_reverse(self, layer, how, qdq):
        stock = layer.call

        def call(inputs, *args, reverse=False, **kwargs):
            if reverse:
                inputs = qdq(inputs, (inputs.ndim - 1,), how)
            return stock(inputs, *args, reverse=reverse, **kwargs)

        object.__setattr__(layer, "call", call)
        self._hooked.append(layer)

    def remove(self):
        for layer in self._hooked:
            object.__delattr__(layer, "call")
        self._hooked.clear()


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def compare(name, logits, float_logits, targets, ref=None):
    lp, lf = _log_softmax(logits), _log_softmax(float_logits)
    kl = float(np.mean(np.sum(np.exp(lf) * (lf - lp), -1)))
    nll = -np.take_along_axis(lp, targets[..., None], -1)[..., 0]
    out = {"perplexity": float(np.exp(nll.mean())), "kl_to_float": kl,
           "top1_agreement": float(np.mean(logits.argmax(-1) == float_logits.argmax(-1)))}
    if ref is not None:
        d = np.abs(logits - ref)
        out["max_abs_diff_to_reference"] = float(d.max())
        out["mean_abs_diff_to_reference"] = float(d.mean())
        out["mean_abs_logit"] = float(np.abs(ref).mean())
    print(f"[act-ref] {name}: {json.dumps(out)}", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="gemma3_270m")
    ap.add_argument("--chunks", type=int, default=1)
    ap.add_argument("--calib-passages", type=int, default=8)
    ap.add_argument("--sites", default=None,
                    help="comma-separated path parts: reference QDQ only at these weights")
    ap.add_argument("--skip-static", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    from quality import calibration_function, calibration_passages

    from fp8xla import models, perplexity, weight_rounding
    from fp8xla.keras import DynamicQuantConfig, StaticQuantConfig, _unquantize, quantize_model

    model = models.load_model(args.model)
    tok = perplexity._tokenizer_of(model)
    chunks = perplexity.gpl3_token_chunks(tok, num_chunks=args.chunks)
    inputs = np.concatenate([np.full((len(chunks), 1), int(tok.start_token_id), np.int32),
                             chunks], axis=1)
    n = chunks.shape[1]
    logits_fn = perplexity.keras_logits_fn(model)

    def run():
        return np.concatenate([np.asarray(logits_fn(inputs[c:c + 1], np.ones((1, n + 1))))
                               [:, :n] for c in range(len(chunks))])

    results = {}
    fl = run()
    results["float32"] = compare("float32", fl, fl, chunks)

    fp8 = {}
    keep = [s for s in (args.sites or "").split(",") if s]
    # with --sites, fp8xla's dynamic scheme too quantizes only those weights' activations
    others = tuple(v.path for v in model.trainable_variables
                   if len(v.shape) >= 2 and keep and not any(s in v.path for s in keep))
    schemes = [("weight-only", StaticQuantConfig(activation_dtype=None), None),
               ("dynamic", DynamicQuantConfig(float_activation_layers=others), None)]
    if keep:
        schemes = schemes[1:]
    if not args.skip_static and not keep:
        schemes.append(("static", StaticQuantConfig(),
                        calibration_function(calibration_passages(count=args.calib_passages))))
    qweights = None
    a_scales = {}
    for name, config, calib in schemes:
        _unquantize(model)
        model = quantize_model(model, config, calib)
        fp8[name] = run()
        qweights = model.fp8.weights
        if name == "static":
            a_scales = {i: q.a_scale for i, q in qweights.items() if q.a_scale is not None}
            results["static: weights without an activation scale"] = [
                q.path for i, q in qweights.items() if i not in a_scales]
            results["static: activation scales"] = {
                qweights[i].path: s for i, s in a_scales.items()}
            print(f"[act-ref] static: {len(a_scales)} of {len(qweights)} weights have an "
                  f"activation scale", flush=True)
        results[f"fp8xla {name}"] = compare(f"fp8xla {name}", fp8[name], fl, chunks)

    # the reference: float model holding the dequantized (round-to-nearest) weights
    _unquantize(model)
    originals = {}
    for i, q in qweights.items():
        v = model.trainable_variables[i]
        originals[i] = np.asarray(v.value)
        v.assign(weight_rounding.dequantize(q.codes, q.w_scale, q.channel_dim)
                 .astype(originals[i].dtype))
    def selected(i):
        return not keep or any(s in qweights[i].path for s in keep)

    refs = [] if keep else [("weight-only", {})]
    refs.append(("dynamic", {i: "row" for i in qweights if selected(i)}))
    if a_scales:
        refs.append(("static", {i: s for i, s in a_scales.items() if selected(i)}))
    for name, scales in refs:
        hooks = ActivationQdq(model, scales)
        model.predict_function = None
        try:
            ref = run()
        finally:
            hooks.remove()
            model.predict_function = None
        results[f"reference {name}"] = compare(f"reference {name}", ref, fl, chunks)
        if name in fp8:
            results[f"fp8xla {name} vs reference"] = compare(
                f"fp8xla {name} vs reference", fp8[name], fl, chunks, ref)
    results["sites"] = keep or "all"
    with open(os.path.join(args.out, "activation_reference.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
