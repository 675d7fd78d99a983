"""Calibration functions for ``quantize_model`` when the user brings no data of their own (the
CLI and the benchmark use them).

Static activation scales only need every matmul to see typical inputs: a few prompts that
generate decodes are enough (:func:`prompt_calibration`; INC's Gemma3 example does the same).

GPTQ needs more. For each weight it solves a least-squares problem on the Gram matrix of the
weight's calibration inputs, one row per calibration token; with fewer tokens than inputs
(2048 for Gemma 3 270M's down projections) the problem is underdetermined and GPTQ fits the
calibration rather than the model. Measured on Gemma 3 270M, GPL-3 protocol (docs/quality.md,
"Calibration text for GPTQ"): on the eight prompts at 32 tokens, GPTQ weights with static
activations scored +4.4 %, worse than round-to-nearest's +3.9 %. With more text, GPTQ
(act-order, weight-only) scored +1.99 % on 3.6k tokens the float model wrote itself from the
prompts (:func:`corpus_calibration`) and +1.10 % on 19.2k tokens of the Python standard
library's documentation (:func:`python_doc_passages`, which the CLI uses: real prose, present
wherever Python is, nothing shipped or downloaded); round-to-nearest +2.40 %.
:func:`text_calibration` generates on such texts in windows they fill (generate then only
prefills, so no padding rows enter the statistics) and ends with prompts that decode, so that
the matmuls only the decode loop runs are observed too.
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


#: Standard-library modules whose documentation is calibration text: English prose with some
#: code, present wherever Python is (read from the installed modules, not shipped with fp8xla).
DOC_MODULES = (
    "argparse", "asyncio", "calendar", "collections", "configparser", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "doctest", "email", "enum", "fractions",
    "ftplib", "functools", "gettext", "heapq", "http.client", "imaplib", "inspect", "itertools",
    "json", "logging", "mailbox", "optparse", "pathlib", "pdb", "pickle", "pprint", "queue",
    "random", "re", "sched", "selectors", "shutil", "smtplib", "socket", "socketserver",
    "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "tokenize", "traceback", "typing", "unittest", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile",
)


def python_doc_passages(count=75, chars=1500):
    """``count`` passages of ``chars`` characters (whitespace collapsed) of the Python standard
    library's own documentation: the docstrings of :data:`DOC_MODULES` and of their public
    classes and functions, as installed, taken evenly across the text. 1500 characters are
    more than 256 tokens, so each passage fills a 256-token window."""
    import importlib
    import inspect

    parts = []
    for name in DOC_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # e.g. a Python built without sqlite3
            continue
        parts.append(inspect.getdoc(module) or "")
        for member_name, obj in sorted(vars(module).items()):
            if member_name.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 80:  # one-liners say little
                    parts.append(doc)
    text = " ".join(" ".join(parts).split())
    starts = range(0, len(text) - chars + 1, chars)
    if len(starts) < count:
        raise ValueError(f"fp8xla.calibration: the standard library's documentation gives "
                         f"{len(starts)} passages of {chars} characters, fewer than {count}")
    return [text[starts[round(i * len(starts) / count)]:][:chars] for i in range(count)]


def text_calibration(texts, window=256, batch=4, prompts=CALIBRATION_PROMPTS,
                     decode_length=32, progress=None):
    """``calib_function(model)``: generates on ``texts`` in ``window``-token windows (a text
    longer than the window fills it, so generate only prefills and no padding rows enter the
    statistics), then from ``prompts`` up to ``decode_length`` tokens (so that the matmuls
    only the decode loop runs are observed too)."""

    def calib(m):
        for i in range(0, len(texts), batch):
            if progress:
                progress(f"calibration texts {min(i + batch, len(texts))}/{len(texts)}")
            m.generate(list(texts[i:i + batch]), max_length=window)
        if progress:
            progress("calibration prompts (decoding)")
        m.generate(list(prompts[:batch]), max_length=decode_length)

    return calib


def prompt_calibration(prompts=CALIBRATION_PROMPTS, max_length=32, progress=None):
    """``calib_function(model)``: generates from each prompt up to ``max_length`` tokens."""

    def calib(model):
        for i, p in enumerate(prompts):
            if progress:
                progress(f"calibration prompt {i + 1}/{len(prompts)}")
            model.generate(p, max_length=max_length)

    return calib


def calibration_for(config, prompt_max_length=32, gptq_passages=75, progress=None):
    """The ``calib_function`` the CLI and the benchmark give ``quantize_model`` for ``config``:
    Python's documentation for GPTQ (it also gives the static scales), the prompts for static
    activation scales alone, None when nothing needs calibrating."""
    if config.rounding == "gptq":  # more tokens than a weight has inputs
        return text_calibration(python_doc_passages(count=gptq_passages),
                                decode_length=prompt_max_length, progress=progress)
    if config.activation_dtype and not config.dynamic:
        return prompt_calibration(max_length=prompt_max_length, progress=progress)
    return None


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
    return text_calibration(texts, window, batch, prompts, decode_length, progress)
