#!/usr/bin/env python3
"""fp8xla.jax on a real model: Gemma 3 270M's forward pass as a plain JAX function.

Keras-Hub's Gemma3 is used only to get the function and its parameters: ``forward(params,
inputs) -> logits`` with ``params`` a dict of arrays by variable path, which is what any
pure-JAX model looks like to fp8xla.jax. The script quantizes it with ``fp8xla.jax.quantize``
and with ``fp8xla.keras.quantize_model`` (same config, weight-only by default so that both
have the same scales), compares their next-token logits on ten prompts and, with
``--perplexity``, scores both on the GPL-3 protocol (docs/quality.md).

    python examples/jax_function_fp8.py [--perplexity] [--dtype fp8_e4m3|fp8_e5m2]
"""
import argparse
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402

PROMPTS = ["The capital of France is", "Describe the city of Berlin?", "Water boils at",
           "def add(a, b):", "Once upon a time", "The theory of relativity",
           "My favourite food is", "In 1492, Columbus", "The mitochondria is",
           "Rust and Python are"]


def forward_function(model):
    """``(forward, params)``: the model's logits as a pure function of a parameter dict."""
    paths = [v.path for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def forward(params, inputs):
        logits, _ = model.stateless_call([params[p] for p in paths], non_trainable, inputs)
        return logits

    return forward, {v.path: v.value for v in model.trainable_variables}


def prompt_batch(model, length=16):
    tok = model.preprocessor.tokenizer
    ids = np.zeros((len(PROMPTS), length), np.int32)
    mask = np.zeros_like(ids, bool)
    for i, p in enumerate(PROMPTS):
        t = [tok.start_token_id] + list(np.asarray(tok(p)))[: length - 1]
        ids[i, : len(t)], mask[i, : len(t)] = t, True
    return {"token_ids": ids, "padding_mask": mask}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="fp8_e4m3", choices=["fp8_e4m3", "fp8_e5m2"])
    ap.add_argument("--perplexity", action="store_true", help="score both on GPL-3")
    args = ap.parse_args(argv)

    import fp8xla.jax
    from fp8xla import models, perplexity
    from fp8xla.keras import StaticQuantConfig, logits, quantize_model

    config = StaticQuantConfig(weight_dtype=args.dtype, activation_dtype=None)
    model = models.load_model(progress=False)
    batch = prompt_batch(model)
    forward, params = forward_function(model)
    q = fp8xla.jax.quantize(forward, params, batch, config=config)
    del params
    q.print_model()
    keras_fp8 = quantize_model(model, config)
    got = np.asarray(q(q.params, batch))
    want = np.asarray(logits(keras_fp8, batch))
    last = batch["padding_mask"].sum(axis=1) - 1
    rows = np.arange(len(last))
    rel = (np.abs(got[rows, last] - want[rows, last]).max(axis=1)
           / np.abs(want[rows, last]).max(axis=1))
    print(f"next-token logits, fp8xla.jax vs fp8xla.keras ({args.dtype} weight-only): "
          f"max relative difference {rel.max():.2e} over {len(rows)} prompts")
    if args.perplexity:
        pj = perplexity.gpl3_perplexity(
            tokenizer=model.preprocessor.tokenizer,
            logits_fn=lambda t, m: q(q.params, {"token_ids": t, "padding_mask": m.astype(bool)}))
        pk = perplexity.gpl3_perplexity(keras_fp8)
        print(f"GPL-3 perplexity: fp8xla.jax {pj.perplexity:.4f}, fp8xla.keras "
              f"{pk.perplexity:.4f} ({100 * (pj.perplexity / pk.perplexity - 1):+.3f} %), "
              f"top-1 agreement {pj.top1_agreement(pk):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
