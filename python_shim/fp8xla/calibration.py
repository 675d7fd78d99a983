"""Calibration functions for ``quantize_model`` when the user brings no data of their own (the
CLI and the benchmark use them).

Static activation scales only need every matmul to see typical inputs: a few prompts that
generate decodes are enough (:func:`prompt_calibration`; INC's Gemma3 example does the same).

GPTQ needs more. For each weight it solves a least-squares problem on the Gram matrix of the
weight's calibration inputs, one row per calibration token; with fewer tokens than inputs
(2048 for Gemma 3 270M's down projections) the problem is underdetermined and GPTQ fits the
calibration rather than the model. Measured on Gemma 3 270M (bench of 2026-12-07, GPL-3
protocol): calibrated on the eight prompts at 32 tokens, GPTQ weights with static activations
scored +4.4 %, worse than round-to-nearest's +3.9 %. :func:`corpus_calibration` first lets the
float model write a continuation of each prompt (its own text: no corpus ships with the
package and no evaluation text can leak in), then calibrates on those texts in windows they
fill (generate then only prefills, so no padding rows enter the Gram matrices), and ends with
the prompts decoding a few tokens, so that the matmuls only the decode loop runs are observed
too (static scales).
"""
from __future__ import annotations

#: The CLI's and the benchmark's calibration prompts.
CALIBRATION_PROMPTS = [
    "The capital of France is",
    "Describe the city of Berlin?",
    "Photosynthesis is the process by which",
    "def fibonacci(n):",
    "The history of the Roman Empire",
    "Water boils at a temperature of",
    "In mathematics, a prime number is",
    "The best way to learn a new language is",
]


def prompt_calibration(prompts=CALIBRATION_PROMPTS, max_length=32, progress=None):
    """``calib_function(model)``: generates from each prompt up to ``max_length`` tokens."""

    def calib(model):
        for i, p in enumerate(prompts):
            if progress:
                progress(f"calibration prompt {i + 1}/{len(prompts)}")
            model.generate(p, max_length=max_length)

    return calib


def model_written_texts(model, prompts=CALIBRATION_PROMPTS, length=512, top_k=40, seed=0,
                        batch=8):
    """The float ``model``'s continuations of ``prompts``, ``length`` tokens each with the
    prompt, sampled from the top ``top_k`` tokens (greedy text tends to repeat itself, and a
    repeated row adds nothing to a Gram matrix). The model's own sampler and compiled
    generate function are restored afterwards."""
    import keras_hub

    if length < 2:
        raise ValueError(f"fp8xla.calibration: length must be at least 2 tokens, got {length}")
    saved = model.sampler, model.generate_function
    model.sampler = keras_hub.samplers.TopKSampler(k=top_k, seed=seed)
    model.generate_function = None
    try:
        texts = []
        for i in range(0, len(prompts), batch):
            out = model.generate(list(prompts[i:i + batch]), max_length=length,
                                 stop_token_ids=None)
            texts += [str(t) for t in out]
    finally:
        model.sampler, model.generate_function = saved
    return texts


def corpus_calibration(model, prompts=CALIBRATION_PROMPTS, length=512, window=448, batch=4,
                       decode_length=32, progress=None):
    """``calib_function(model)`` for GPTQ (and static scales): calibrates on the float
    ``model``'s own continuations of ``prompts`` (written now, :func:`model_written_texts`),
    each generated in a ``window``-token window it fills, then generates from the prompts up
    to ``decode_length`` tokens. ``window`` must be shorter than ``length`` so that the texts
    fill it. About ``len(prompts) * window`` calibration tokens."""
    if not 0 < window < length:
        raise ValueError(f"fp8xla.calibration: window ({window}) must be between 1 and "
                         f"length - 1 ({length - 1}): a text must fill its window")
    if progress:
        progress(f"the float model writes {len(prompts)} calibration texts of {length} tokens")
    texts = model_written_texts(model, prompts, length)

    def calib(m):
        for i in range(0, len(texts), batch):
            if progress:
                progress(f"calibration texts {min(i + batch, len(texts))}/{len(texts)}")
            m.generate(texts[i:i + batch], max_length=window)
        if progress:
            progress("calibration prompts (decoding)")
        m.generate(list(prompts[:batch]), max_length=decode_length)

    return calib
