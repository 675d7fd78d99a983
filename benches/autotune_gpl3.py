"""fp8xla.keras.autotune on the GPL-3 protocol: the acceptance run of accuracy-aware tuning.

    .venv/bin/python benches/autotune_gpl3.py --out autotune-run [--tolerable-loss 0.005]

eval_fn is ``1 / perplexity`` (INC's scores are higher-is-better), so ``tolerable_loss=0.005``
accepts up to +0.5 % GPL-3 perplexity. Calibration: benches/quality.py's licence passages.
The summary (trials, weights kept in float and their memory) goes to ``OUT/autotune.json``.

``--reuse QUALITY_OUT`` takes from a benches/quality.py run (same model and calibration) the
float32 perplexity (as the float model's score), the Gram matrices and the FP8 codes, so that
only the candidates are evaluated; ``--configs`` picks the configs tried (default rtn,gptq).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="gemma3_270m")
    ap.add_argument("--tolerable-loss", type=float, default=0.005)
    ap.add_argument("--activations", action="store_true", help="static e4m3 activations too")
    ap.add_argument("--configs", default="rtn,gptq", help="comma-separated: rtn, gptq, gptq-act")
    ap.add_argument("--reuse", default=None, help="a benches/quality.py output directory")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    from quality import calibration_function, calibration_passages

    import fp8xla.keras as fk
    from fp8xla import models, perplexity
    from fp8xla.keras import StaticQuantConfig, TuningConfig, autotune

    act = "fp8_e4m3" if args.activations else None
    kinds = {"rtn": StaticQuantConfig(activation_dtype=act),
             "gptq": StaticQuantConfig(activation_dtype=act, rounding="gptq"),
             "gptq-act": StaticQuantConfig(activation_dtype=act, rounding="gptq",
                                           gptq_act_order=True)}
    config_set = [kinds[k] for k in args.configs.split(",")]
    scores = []
    float_ppl = None
    if args.reuse:
        import pickle

        with open(os.path.join(args.reuse, "quality.json")) as f:
            float_ppl = json.load(f)["float32"]["perplexity"]
        known = {}
        codes_path = os.path.join(args.reuse, "codes.pkl")
        if os.path.exists(codes_path):
            with open(codes_path, "rb") as f:
                known = pickle.load(f)
        gram_path = os.path.join(args.reuse, "grams.pkl")
        stock_quantize, stock_collect = fk._quantize, fk._gram.collect_grams

        def quantize_with_known_codes(model, config, calib, cache):
            for key, codes in known.items():
                cache.setdefault(key, codes)
            return stock_quantize(model, config, calib, cache)

        def collect_or_load(model, calib, indices):
            if os.path.exists(gram_path):
                with open(gram_path, "rb") as f:
                    return pickle.load(f)
            return stock_collect(model, calib, indices)

        fk._quantize, fk._gram.collect_grams = quantize_with_known_codes, collect_or_load

    def eval_fn(model):
        if float_ppl is not None and getattr(model, "fp8", None) is None:
            scores.append(float_ppl)  # the float model, scored by the quality run
            return 1.0 / float_ppl
        r = perplexity.gpl3_perplexity(model, progress=True)
        scores.append(r.perplexity)
        return 1.0 / r.perplexity

    from fp8xla.tuning import TuningError

    model = models.load_model(args.model)
    try:
        model = autotune(model, TuningConfig(config_set=config_set,
                                             tolerable_loss=args.tolerable_loss),
                         eval_fn, calib_function=calibration_function(calibration_passages()))
    except TuningError as e:
        with open(os.path.join(args.out, "autotune.json"), "w") as f:
            json.dump({"float32_perplexity": scores[0], "perplexities": scores,
                       "error": str(e)}, f, indent=1)
        raise
    r = model.fp8.tuning
    out = {"float32_perplexity": scores[0], "perplexities": scores,
           "trials": [{"config": t.config.describe(), "float_weights": list(t.float_weights),
                       "perplexity": 1 / t.score, "loss": t.loss, "meets": t.meets,
                       "float_bytes": t.float_bytes} for t in r.trials],
           "total_weight_bytes": r.total_weight_bytes, "summary": r.summary()}
    with open(os.path.join(args.out, "autotune.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
