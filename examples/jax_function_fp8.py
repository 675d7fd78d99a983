#!/usr/bin/env python3
"""fp8xla.jax on a real model: Gemma 3 270M's forward pass as a plain JAX function.

Keras-Hub's Gemma3 is used only to get the function and its parameters: ``forward(params,
inputs) -> logits`` with ``params`` a dict of arrays by variable path, which is what any
pure-JAX model looks like to fp8xla.jax. The script quantizes it with ``fp8xla.jax.quantize``
and with ``fp8xla.keras.quantize_model`` (same config, weight-only by default so that both
have the same scales), compares their next-token logits on ten prompts and, with
``--perplexity``, scores both on the GPL-3 protocol (docs/quality.md). ``--decode N`` also
quantizes Keras-Hub's generate step (the KV-cache decode loop) as a plain function and times
N new tokens through it and through fp8xla.keras' ``generate_function`` in the same run (they
run the same kernels: the ratio should be near 1; time it on a quiet machine).

    python examples/jax_function_fp8.py [--perplexity] [--decode 128] [--dtype fp8_e4m3|fp8_e5m2]
"""
import argparse
import os
import sys
import time

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


def generate_function(model):
    """``(generate, params)``: Keras-Hub's generate step (prompt in, prompt plus greedy
    continuation out) as a pure function of the same parameter dict."""
    from fp8xla import runtime

    step = runtime._stateless_generate(model, None)
    paths = [v.path for v in model.trainable_variables]
    sampler = [v.value for v in model.sampler.variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def generate(params, inputs):
        outputs, _ = step(inputs, (sampler, [params[p] for p in paths], non_trainable))
        return outputs

    return generate, {v.path: v.value for v in model.trainable_variables}


def decode_tokens_per_second(run, inputs, new_tokens, repeats=3):
    """Median tokens/s of ``run(inputs)`` generating ``new_tokens`` (after one warm-up)."""
    import jax

    jax.block_until_ready(run(inputs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(inputs))
        times.append(time.perf_counter() - start)
    return new_tokens / sorted(times)[len(times) // 2]


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
    ap.add_argument("--decode", type=int, default=0, metavar="N",
                    help="time N greedy new tokens through both generate steps")
    args = ap.parse_args(argv)

    import fp8xla.jax
    from fp8xla import models, perplexity
    from fp8xla.keras import StaticQuantConfig, logits, quantize_model

    config = StaticQuantConfig(weight_dtype=args.dtype, activation_dtype=None)
    model = models.load_model(progress=False)
    batch = prompt_batch(model)
    forward, params = forward_function(model)
    q = fp8xla.jax.quantize(forward, params, batch, config=config)
    gen_q = None
    if args.decode:
        prompt = "Describe the city of Berlin?"
        n = len(np.asarray(model.preprocessor.tokenizer(prompt))) + 1
        gen_inputs = model.preprocessor.generate_preprocess([prompt],
                                                            sequence_length=n + args.decode)
        gen_inputs = {k: np.asarray(v) for k, v in gen_inputs.items() if v is not None}
        generate, _ = generate_function(model)
        gen_q = fp8xla.jax.quantize(generate, params, gen_inputs, config=config)
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
    if gen_q is not None:
        tj = decode_tokens_per_second(lambda x: gen_q(gen_q.params, x), gen_inputs, args.decode)
        tk = decode_tokens_per_second(
            lambda x: keras_fp8.generate_function(dict(x), None), gen_inputs, args.decode)
        same = np.array_equal(np.asarray(gen_q(gen_q.params, gen_inputs)["token_ids"]),
                              np.asarray(keras_fp8.generate_function(dict(gen_inputs),
                                                                     None)["token_ids"]))
        print(f"decode ({args.decode} new tokens, greedy, median of 3): fp8xla.jax "
              f"{tj:.1f} tokens/s, fp8xla.keras {tk:.1f} tokens/s (ratio {tj / tk:.3f}); "
              f"same tokens: {same}")
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
