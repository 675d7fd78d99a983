#!/usr/bin/env python3
"""Decode speed of the FP8 model with and without the pass `sampler_argmax` (the greedy
sampler's argmax over the vocabulary as the multi-threaded `fp8xla_argmax`), same run, rounds
alternating. Times need a quiet machine; run from the checkout:

    .venv/bin/python benches/sampler_decode.py [--model gemma3_270m] [--rounds 7]
        [--max-length 160] [--prompt "..."]

Both models are the default model quantized as `fp8xla demo` does (e4m3 weights and static
activations calibrated on the demo prompts); they differ only in the rewrite option
`sampler_argmax`. Prints the median decode tokens/s and ms per token of each and their ratio,
and checks that both generate the same text.
"""
import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")


def build(name, sampler_argmax):
    from fp8xla import graph
    from fp8xla import keras as fk
    from fp8xla import models
    from fp8xla.cli import CALIBRATION_PROMPTS

    model = models.load_model(name, progress=True)

    def calib_function(m):
        for p in CALIBRATION_PROMPTS:
            m.generate(p, max_length=32)

    quantize_exported = graph.quantize_exported
    graph.quantize_exported = lambda exp, opts: quantize_exported(
        exp, {**opts, "sampler_argmax": sampler_argmax})
    try:
        config = fk.StaticQuantConfig(weight_dtype="fp8_e4m3", activation_dtype="fp8_e4m3")
        fk.quantize_model(model, config, calib_function)
    finally:
        graph.quantize_exported = quantize_exported
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3_270m")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--prompt", default="Describe the city of Berlin?")
    args = ap.parse_args(argv)
    models = {"fp8xla_argmax": build(args.model, True), "xla_argmax": build(args.model, False)}
    texts, speeds = {}, {k: [] for k in models}
    tokenizer = models["xla_argmax"].preprocessor.tokenizer
    for name, model in models.items():  # compile
        texts[name] = model.generate(args.prompt, max_length=args.max_length)
    new = len(tokenizer(texts["xla_argmax"])) - len(tokenizer(args.prompt))
    for r in range(args.rounds):
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        for name in order:
            t0 = time.perf_counter()
            models[name].generate(args.prompt, max_length=args.max_length)
            speeds[name].append(new / (time.perf_counter() - t0))
    for name, tps in speeds.items():
        med = statistics.median(tps)
        print(f"{name:<14} {med:7.2f} tokens/s  {1000 / med:6.2f} ms/token  "
              f"(rounds: {', '.join(f'{t:.2f}' for t in tps)})")
    ratio = statistics.median(speeds["fp8xla_argmax"]) / statistics.median(speeds["xla_argmax"])
    print(f"fp8xla_argmax / xla_argmax: {ratio:.3f}x over {new} new tokens")
    if texts["fp8xla_argmax"] != texts["xla_argmax"]:
        print("DIFFERENT TEXTS:", texts, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
