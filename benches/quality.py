"""Perplexity and top-1 agreement of fp8xla's quantization schemes on the GPL-3 protocol.

    .venv/bin/python benches/quality.py --out quality-run [--schemes rtn,gptq,...]

Each scheme quantizes a fresh float32 copy of the model (gemma3_270m unless ``--model``),
calibrating on other licence texts of ``/usr/share/common-licenses`` (never the GPL family,
whose text is the one scored), and is scored with :func:`fp8xla.perplexity.gpl3_perplexity`.
Results go to ``OUT/quality.json`` (one entry per scheme, written after each); float32's
predictions are kept in ``OUT/float32_predictions.npy`` for the agreement. The Gram matrices
GPTQ needs depend only on the float model and the calibration text, so they are collected once
per run and reused by every GPTQ scheme (``OUT/grams.pkl``); so are the FP8 codes, which
depend only on how the weights are rounded (``OUT/codes.pkl``: a scheme with activations
reuses the codes of its weight-only twin, also from an earlier run into the same ``OUT``).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pickle
import sys
import time

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")

#: Calibration text: licences that are neither the scored GPL-3 nor derived from it.
CALIBRATION_LICENCES = ["Apache-2.0", "Artistic", "BSD", "CC0-1.0", "MPL-1.1", "MPL-2.0"]
LICENCE_DIR = "/usr/share/common-licenses"

SCHEMES = {
    "rtn": dict(activation_dtype=None),
    "rtn-embed-per-tensor": dict(activation_dtype=None, _embedding_per_tensor=True),
    "search": dict(activation_dtype=None, weight_scale="search"),
    "gptq": dict(activation_dtype=None, rounding="gptq"),
    "gptq-search": dict(activation_dtype=None, rounding="gptq", weight_scale="search"),
    "gptq-act": dict(activation_dtype=None, rounding="gptq", gptq_act_order=True),
    "gptq-act-search": dict(activation_dtype=None, rounding="gptq", gptq_act_order=True,
                            weight_scale="search"),
    "gptq-act-edamp0.3": dict(activation_dtype=None, rounding="gptq", gptq_act_order=True,
                              gptq_embedding_damp=0.3),
    "gptq-act-edamp0.03": dict(activation_dtype=None, rounding="gptq", gptq_act_order=True,
                               gptq_embedding_damp=0.03),
    "gptq-act-seq": dict(activation_dtype=None, rounding="gptq", gptq_act_order=True,
                         gptq_sequential=True),
    "gptq-act-seq-wa": dict(activation_dtype="fp8_e4m3", rounding="gptq", gptq_act_order=True,
                            gptq_sequential=True),
    "gptq-act-seq-dynamic": dict(activation_dtype="fp8_e4m3", rounding="gptq",
                                 gptq_act_order=True, gptq_sequential=True, _dynamic=True),
    "gptq-act-seq-embfirst": dict(activation_dtype=None, rounding="gptq", gptq_act_order=True,
                                  gptq_sequential=True, _embedding_first=True),
    "gptq-act-wa": dict(activation_dtype="fp8_e4m3", rounding="gptq", gptq_act_order=True),
    "gptq-act-dynamic": dict(activation_dtype="fp8_e4m3", rounding="gptq",
                             gptq_act_order=True, _dynamic=True),
    "rtn-wa": dict(activation_dtype="fp8_e4m3"),
    "gptq-wa": dict(activation_dtype="fp8_e4m3", rounding="gptq"),
    "gptq-e5m2": dict(weight_dtype="fp8_e5m2", activation_dtype=None, rounding="gptq"),
    "gptq-dynamic": dict(activation_dtype="fp8_e4m3", rounding="gptq", _dynamic=True),
    "rtn-dynamic": dict(activation_dtype="fp8_e4m3", _dynamic=True),
}


def calibration_passages(chars=1500, count=None, stride=750):
    """The calibration licences cut into passages of ``chars`` characters starting every
    ``stride`` characters; ``count`` of them, taken evenly across the licences, or all.

    A passage is longer than the 256-token window it is generated in (so each fills it and
    generate only prefills) but only its first ~1100 characters fit in that window: with a
    stride of half a passage, every part of the text is seen (in two contexts), about 19.5k
    tokens from the six licences, where ``stride=chars`` would drop a third of the text."""
    out = []
    for name in CALIBRATION_LICENCES:
        with open(os.path.join(LICENCE_DIR, name), encoding="utf-8") as f:
            text = " ".join(f.read().split())
        # whole passages only: each fills the window, so generate only prefills
        out += [text[i:i + chars] for i in range(0, len(text) - chars + 1, stride)]
    if count is not None and count < len(out):
        out = [out[round(i * len(out) / count)] for i in range(count)]
    return out


def calibration_function(passages, max_length=256, batch=4, decode_chars=700):
    """Generate calls on the passages: each fills the window, so these only prefill. Then one
    batch of the passages' first ``decode_chars`` characters (about 160 tokens), which
    generate continues: the matmuls that only the decode loop runs (the tied logits and most
    of the last block: the prefill needs only the caches) are observed too, so static
    calibration gives them activation scales instead of leaving them float."""
    from fp8xla.calibration import text_calibration

    return text_calibration(
        passages, window=max_length, batch=batch,
        prompts=[p[:decode_chars] for p in passages[:batch]], decode_length=max_length,
        progress=lambda message: print(f"[quality] {message}", flush=True))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="gemma3_270m")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--calib-passages", type=int, default=None,
                    help="calibrate on this many 256-token passages (default: all licence "
                         "passages; python-docs: 75)")
    ap.add_argument("--calib-stride", type=int, default=750,
                    help="characters between passage starts (1500: no overlap, as before)")
    ap.add_argument("--calibration",
                    choices=["licences", "model-written", "python-docs", "licences+python-docs"],
                    default="licences",
                    help="model-written: fp8xla.calibration.corpus_calibration; python-docs: "
                         "text_calibration(python_doc_passages()); licences+python-docs: both "
                         "texts' passages, twice the tokens")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    from fp8xla import models, perplexity
    from fp8xla.keras import DynamicQuantConfig, StaticQuantConfig, _gram, _quantize, _sequential

    results_path = os.path.join(args.out, "quality.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}

    def save():
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)

    float_path = os.path.join(args.out, "float32_predictions.npy")
    if not os.path.exists(float_path):
        model = models.load_model(args.model)
        r = perplexity.gpl3_perplexity(model, progress=True)
        np.save(float_path, r.predictions)
        results["float32"] = {"perplexity": r.perplexity, "seconds": r.seconds}
        save()
        del model
    float_pred = np.load(float_path)
    base = results["float32"]["perplexity"]

    gram_path = os.path.join(args.out, "grams.pkl")
    stock_collect = _gram.collect_grams

    def cached_collect(model, calib, indices):
        if os.path.exists(gram_path):
            with open(gram_path, "rb") as f:
                return pickle.load(f)
        t0 = time.perf_counter()
        grams = stock_collect(model, calib, indices)
        results["gram_seconds"] = time.perf_counter() - t0
        with open(gram_path, "wb") as f:
            pickle.dump(grams, f)
        return grams

    _gram.collect_grams = cached_collect
    stock_sequential = _sequential.quantize
    from fp8xla import calibration

    if args.calibration == "model-written":
        t0 = time.perf_counter()
        calib = calibration.corpus_calibration(models.load_model(args.model))
        results["calibration"] = "model-written"
        results["calibration_texts_seconds"] = time.perf_counter() - t0
    elif args.calibration == "python-docs":
        calib = calibration.text_calibration(calibration.python_doc_passages(
            count=args.calib_passages or 75))
        results["calibration"] = "python-docs"
    else:
        passages = calibration_passages(count=args.calib_passages, stride=args.calib_stride)
        if args.calibration == "licences+python-docs":
            passages += calibration.python_doc_passages()
            results["calibration"] = "licences+python-docs"
        calib = calibration_function(passages)
        results["calibration_passages"] = len(passages)
        results["calibration_stride"] = args.calib_stride
    # what quantize_model computes once per float model and calibration, shared by schemes
    cache = {}
    codes_path = os.path.join(args.out, "codes.pkl")
    if os.path.exists(codes_path):
        with open(codes_path, "rb") as f:
            cache.update(pickle.load(f))

    def save_codes():
        codes = {k: v for k, v in cache.items() if isinstance(k, tuple)}
        with open(codes_path + ".tmp", "wb") as f:
            pickle.dump(codes, f)
        os.replace(codes_path + ".tmp", codes_path)
    for name in args.schemes.split(","):
        settings = dict(SCHEMES[name])
        per_tensor_embedding = settings.pop("_embedding_per_tensor", False)
        # probe: sequential GPTQ rounding the tied embedding first instead of last
        embedding_first = settings.pop("_embedding_first", False)
        _sequential.quantize = functools.partial(stock_sequential,
                                                 embedding_first=embedding_first)
        kind = DynamicQuantConfig if settings.pop("_dynamic", False) else StaticQuantConfig
        config = kind(**settings)
        model = models.load_model(args.model)
        t0 = time.perf_counter()
        if per_tensor_embedding:  # today's default before per-row embedding scales
            model = _quantize_embedding_per_tensor(model, config, calib)
        else:
            needs_calib = (config.activation_dtype and not config.dynamic) or \
                config.rounding == "gptq"
            if embedding_first:  # codes that the cache's key does not tell apart
                model = _quantize(model, config, calib if needs_calib else None, {})
            else:
                model = _quantize(model, config, calib if needs_calib else None, cache)
                save_codes()
        quantize_seconds = time.perf_counter() - t0
        r = perplexity.gpl3_perplexity(model, progress=True)
        fp8_bytes = sum(np.asarray(q.codes).nbytes + np.asarray(q.w_scale).nbytes
                        for q in model.fp8.weights.values())
        results[name] = {
            "config": {"kind": kind.__name__, **settings}, "perplexity": r.perplexity,
            "delta_percent": 100 * (r.perplexity / base - 1),
            "top1_agreement": float(np.mean(r.predictions == float_pred)),
            "quantize_seconds": quantize_seconds, "fp8_weight_bytes": int(fp8_bytes)}
        print(f"[quality] {name}: {json.dumps(results[name])}", flush=True)
        save()
        del model


def _quantize_embedding_per_tensor(model, config, calib):
    """Quantizes with the embedding per tensor (fp8xla's scheme before per-row scales)."""
    from fp8xla import runtime, weight_rounding
    from fp8xla.keras import quantize_model

    model = quantize_model(model, config, calib if config.activation_dtype else None)
    state = model.fp8
    for i, q in state.weights.items():
        if "embedding" in q.path:
            w = np.asarray(model.trainable_variables[i].value, np.float32)
            s = weight_rounding.amax_scales(w, config.w_format, None)
            q.codes = weight_rounding.round_to_nearest(w, config.w_format, s)
            q.w_scale, q.channel_dim = s, None
    runtime.install(model, state.config, state.weights)
    return model


if __name__ == "__main__":
    sys.exit(main())
