"""Quality of fp8xla's FP8 Gemma3 270M against float32, on the GPL-3 perplexity protocol
(fp8xla.perplexity): perplexity and top-1 agreement with float32 for e4m3 weights and
activations, e4m3 weight-only and e5m2 weights and activations.

    KERAS_BACKEND=jax .venv/bin/python benches/quality.py [--json out.json]
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

from fp8xla import models, perplexity  # noqa: E402
from fp8xla.cli import CALIBRATION_PROMPTS  # noqa: E402
from fp8xla.keras import StaticQuantConfig, quantize_model  # noqa: E402


def log(msg):
    print(f"[quality] {msg}", file=sys.stderr, flush=True)


def calib(model):
    for p in CALIBRATION_PROMPTS:
        model.generate(p, max_length=32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    log("float32")
    model = models.load_model(progress=True)
    base = perplexity.gpl3_perplexity(model)
    rows.append({"contender": "float32", "perplexity": base.perplexity, "top1_agreement": 1.0,
                 "seconds": base.seconds})
    del model
    configs = [
        ("fp8xla e4m3 w+a", StaticQuantConfig("fp8_e4m3", "fp8_e4m3")),
        ("fp8xla e4m3 weight-only", StaticQuantConfig("fp8_e4m3", None)),
        ("fp8xla e5m2 w+a", StaticQuantConfig("fp8_e5m2", "fp8_e5m2")),
    ]
    for name, config in configs:
        log(name)
        model = models.load_model(progress=False)
        t0 = time.perf_counter()
        quantize_model(model, config, calib if config.activation_dtype else None)
        q_s = time.perf_counter() - t0
        r = perplexity.gpl3_perplexity(model)
        rows.append({"contender": name, "perplexity": r.perplexity,
                     "top1_agreement": r.top1_agreement(base), "seconds": r.seconds,
                     "quantize_seconds": q_s})
        log(f"{name}: ppl {r.perplexity:.3f}, agreement {r.top1_agreement(base):.4f}")
        del model
    print("| model | GPL-3 perplexity | vs float32 | top-1 agreement with float32 |")
    print("|---|---|---|---|")
    for r in rows:
        d = (r["perplexity"] / rows[0]["perplexity"] - 1) * 100
        print(f"| {r['contender']} | {r['perplexity']:.3f} | {d:+.2f} % | "
              f"{100 * r['top1_agreement']:.1f} % |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
