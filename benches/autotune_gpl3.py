"""fp8xla.keras.autotune on the GPL-3 protocol: the acceptance run of accuracy-aware tuning.

    .venv/bin/python benches/autotune_gpl3.py --out autotune-run [--tolerable-loss 0.005]

eval_fn is ``1 / perplexity`` (INC's scores are higher-is-better), so ``tolerable_loss=0.005``
accepts up to +0.5 % GPL-3 perplexity. Calibration: benches/quality.py's licence passages.
The summary (trials, weights kept in float and their memory) goes to ``OUT/autotune.json``.
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
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    from quality import calibration_function, calibration_passages

    from fp8xla import models, perplexity
    from fp8xla.keras import StaticQuantConfig, TuningConfig, autotune

    act = "fp8_e4m3" if args.activations else None
    config_set = [StaticQuantConfig(activation_dtype=act),
                  StaticQuantConfig(activation_dtype=act, rounding="gptq")]
    scores = []

    def eval_fn(model):
        r = perplexity.gpl3_perplexity(model, progress=True)
        scores.append(r.perplexity)
        return 1.0 / r.perplexity

    model = models.load_model(args.model)
    model = autotune(model, TuningConfig(config_set=config_set,
                                         tolerable_loss=args.tolerable_loss),
                     eval_fn, calib_function=calibration_function(calibration_passages()))
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
