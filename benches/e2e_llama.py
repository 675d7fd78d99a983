"""llama.cpp (through llama-cpp-python) as a contender of the end-to-end benchmark.

The optional package is built from source with the machine's own instruction set
(python_shim/requirements-llama.txt says how; ``./run bench-e2e`` installs it). The contender
runs the model users compare fp8xla with: the GGUF the default model comes from
(``fp8xla.models.gemma3_270m_gguf``, Q4_K_M with a Q8_0 embedding), turned by llama.cpp's own
``llama_model_quantize`` into Q8_0 (llama.cpp's 8-bit format) or F32. The F32 file holds
exactly the dequantized weights that fp8xla's float32 Keras model is converted from; Q8_0
re-quantizes them.

It is measured like the Keras contenders (benches/e2e_worker.py does the measuring):

* the same token ids: the preparation process tokenizes the prompt and the GPL-3 text with the
  same tokenizer as the Keras contenders and saves the ids, so llama.cpp's own tokenizer plays
  no part;
* decode: the prompt is evaluated (untimed), then N single-token steps are timed, each one
  forward pass of the last token and a greedy pick (argmax of its logits, first index on
  ties), as Keras-Hub's generate loop does: N / time;
* prefill and quality: every GPL-3 chunk is one evaluation of [BOS] + 511 tokens with logits
  for every position (``logits_all``), timed, and scored with fp8xla.perplexity's protocol.

llama.cpp's extra buffer types (AMX matmuls and weight repacking) crashed on a Xeon in its AMX
path. The preparation therefore runs a test prompt in a child process of its own; if that
dies, it runs it again with ``use_extra_bufts=False``, and if that works the contender is
measured that way and its status says so.

    python e2e_llama.py check GGUF --tokens NPZ --prompt-tokens P --extra-bufts 0|1
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

#: How the optional contender is installed (built from source with native CPU flags).
INSTALL_HINT = ("CMAKE_ARGS=\"-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF\" pip install -r "
                "python_shim/requirements-llama.txt, which builds llama.cpp; ./run bench-e2e "
                "does it")

#: The GGUF file types the contenders use, by llama.cpp's names (``LLAMA_FTYPE_*``).
FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "f32": "LLAMA_FTYPE_ALL_F32"}

#: llama.cpp's KV cache type when none is asked for: f16, 2 bytes an element.
KV_CACHE_BYTES_PER_ELEMENT = 2

#: The model whose GGUF the contender quantizes (the only one it can run).
DEFAULT_MODEL = "gemma3_270m"

GGUF_NAME = "model.gguf"
TOKENS_NAME = "tokens.npz"


# ---------------------------------------------------------------------------------------------
# preparation (in the preparation process)


def quantize(src, dst, ftype: str, threads: int | None = None) -> None:
    """``llama_model_quantize`` of the GGUF ``src`` to ``dst`` as ``ftype`` (a key of FTYPES).
    The source is already quantized (Q4_K_M), so re-quantizing is allowed explicitly."""
    import llama_cpp

    if ftype not in FTYPES:
        raise ValueError(f"e2e_llama.quantize: unknown file type {ftype!r}; expected one of "
                         f"{', '.join(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[ftype])
    params.allow_requantize = True
    params.nthread = threads or os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                          ctypes.byref(params))
    if code != 0 or not Path(dst).is_file():
        raise RuntimeError(f"e2e_llama.quantize: llama_model_quantize({src} -> {dst}, {ftype}) "
                           f"returned {code}")


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_tokens(tokenizer, text_path: str, path) -> None:
    """The token ids of the benchmark's text (prompt and GPL-3 chunks come from it) and the
    BOS id, made by ``tokenizer`` (the Keras contenders' tokenizer)."""
    text = Path(text_path).read_text(encoding="utf-8")
    ids = np.asarray(tokenizer.tokenize(text), np.int32).reshape(-1)
    np.savez(path, text_ids=ids, bos=np.int32(tokenizer.start_token_id),
             text_sha256=np.str_(text_digest(text)))


class SavedTokenization:
    """A tokenizer for fp8xla.perplexity that returns the ids saved by :func:`save_tokens`,
    for the text they were made from only."""

    def __init__(self, path):
        with np.load(path) as z:
            self.ids = z["text_ids"]
            self.start_token_id = int(z["bos"])
            self.digest = str(z["text_sha256"])

    def tokenize(self, text: str) -> np.ndarray:
        if text_digest(text) != self.digest:
            raise ValueError("e2e_llama.SavedTokenization: the text differs from the one whose "
                             "token ids were saved")
        return self.ids


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"died of {signal.Signals(-code).name}"
        except ValueError:
            return f"died of signal {-code}"
    return f"exited with code {code}"


def check_extra_bufts(gguf, tokens, prompt_tokens: int, timeout: float, run=subprocess.run):
    """Runs a test prompt in a child process with llama.cpp's extra buffer types, and if that
    fails, without them. Returns ``(use_extra_bufts, note)``: the note says why they are off.
    Raises if llama.cpp fails either way."""
    def attempt(extra: bool):
        cmd = [sys.executable, str(HERE / "e2e_llama.py"), "check", str(gguf), "--tokens",
               str(tokens), "--prompt-tokens", str(prompt_tokens), "--extra-bufts",
               str(int(extra))]
        r = run(cmd, capture_output=True, text=True, timeout=timeout)
        if r.returncode == 0:
            return None
        last = (r.stderr or "").strip().splitlines()[-1:] or ["(no output)"]
        return f"{describe_exit(r.returncode)} ({last[0][:200]})"

    failed = attempt(True)
    if failed is None:
        return True, None
    failed_without = attempt(False)
    if failed_without is not None:
        raise RuntimeError(f"llama.cpp fails on a test prompt with its extra buffer types "
                           f"({failed}) and without them ({failed_without})")
    return False, (f"use_extra_bufts=False: with llama.cpp's extra buffer types (AMX, weight "
                   f"repacking) a test prompt {failed}")


def prepare(contender, s: dict, work: str, progress=print) -> dict:
    """Makes the contender's GGUF and token ids in WORK/preset, and decides on the extra
    buffer types."""
    from fp8xla import models

    if s["model"] != DEFAULT_MODEL:
        raise ValueError(f"the llama.cpp contenders run the default model's GGUF only "
                         f"({DEFAULT_MODEL}), not {s['model']}")
    preset = Path(work) / "preset"
    preset.mkdir(parents=True, exist_ok=True)
    src = models.gemma3_270m_gguf(progress=False)
    gguf, tokens = preset / GGUF_NAME, preset / TOKENS_NAME
    progress(f"llama_model_quantize {src.name} -> {contender.config['ftype']} ...")
    t0 = time.perf_counter()
    quantize(src, gguf, contender.config["ftype"])
    quantize_seconds = time.perf_counter() - t0
    reader = models.read_gguf(src)
    tokenizer = models.Gemma3Tokenizer(proto=models.gguf_sentencepiece_proto(reader),
                                       has_vision_tokens=False)
    save_tokens(tokenizer, s["text_path"], tokens)
    progress("test prompt with llama.cpp's extra buffer types (in a child process) ...")
    extra, note = check_extra_bufts(gguf, tokens, s["prompt_tokens"], timeout=1800)
    if note:
        progress(note)
    import e2e_traffic
    import gguf as gguf_package

    out_reader = gguf_package.GGUFReader(str(gguf), "r")
    return {"source_gguf": src.name, "ftype": contender.config["ftype"],
            "quantize_seconds": quantize_seconds, "preset_bytes": gguf.stat().st_size,
            "weight_bytes": e2e_traffic.gguf_weight_bytes(out_reader),
            "kv_cache_bytes_per_position": e2e_traffic.gguf_kv_bytes_per_position(
                out_reader, KV_CACHE_BYTES_PER_ELEMENT),
            "use_extra_bufts": extra, "note": note}


# ---------------------------------------------------------------------------------------------
# running the model (in the measuring process and the check)


@contextlib.contextmanager
def _model_params(**fields):
    """llama-cpp-python's ``Llama`` takes no ``use_extra_bufts``; it builds its model
    parameters from ``llama_model_default_params()`` inside its constructor, so this sets the
    fields on those defaults while a model is constructed."""
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def patched():
        params = default()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    lib.llama_model_default_params = patched
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def load(gguf, n_ctx: int, logits_all: bool, extra_bufts: bool = True, threads=None):
    """A ``llama_cpp.Llama`` on every core (or ``threads``), batches of up to 512 tokens in one
    evaluation, llama.cpp's default f16 cache and llama-cpp-python's defaults otherwise."""
    import llama_cpp

    threads = threads or os.cpu_count() or 1
    kwargs = dict(n_ctx=n_ctx, n_batch=min(512, n_ctx), n_ubatch=min(512, n_ctx),
                  n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                  verbose=False)
    params = {} if extra_bufts else {"use_extra_bufts": False}
    with _model_params(**params):
        return llama_cpp.Llama(str(gguf), **kwargs)


def last_logits(llm) -> np.ndarray:
    """The logits after the last evaluated token (a view into llama.cpp's buffer)."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def decode(llm, prompt_ids, new_tokens: int, clock=time.perf_counter, logits=None):
    """Evaluates the prompt, then ``new_tokens`` greedy single-token steps; returns the time of
    those steps and the tokens they were fed (the first is the prompt's own prediction).
    ``logits(llm)`` reads the last logits (default: llama.cpp's buffer)."""
    logits = logits or last_logits

    def greedy():
        return int(np.argmax(logits(llm)))

    llm.reset()
    llm.eval([int(t) for t in prompt_ids])
    token, fed = greedy(), []
    t0 = clock()
    for _ in range(new_tokens):
        fed.append(token)
        llm.eval([token])
        token = greedy()
    return clock() - t0, fed


def logits_fn(llm):
    """fp8xla.perplexity's ``logits_fn`` on llama.cpp: each row evaluated from an empty cache,
    logits for every position."""
    def fn(token_ids, padding_mask):
        token_ids = np.asarray(token_ids)
        if not np.all(np.asarray(padding_mask)):
            raise ValueError("e2e_llama.logits_fn: padded batches are not supported")
        rows = []
        for row in token_ids:
            llm.reset()
            llm.eval([int(t) for t in row])
            rows.append(np.array(llm.scores[: len(row)], np.float32))
        return np.stack(rows)

    return fn


def system_info() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode(errors="replace").strip()


def _check(argv) -> int:
    ap = argparse.ArgumentParser(description="one test prompt and a few decode steps")
    ap.add_argument("gguf")
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--prompt-tokens", type=int, required=True)
    ap.add_argument("--extra-bufts", type=int, choices=(0, 1), required=True)
    args = ap.parse_args(argv)
    saved = SavedTokenization(args.tokens)
    prompt = np.concatenate([[saved.start_token_id], saved.ids[: args.prompt_tokens - 1]])
    llm = load(args.gguf, n_ctx=args.prompt_tokens + 8, logits_all=False,
               extra_bufts=bool(args.extra_bufts))
    decode(llm, prompt, 4)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["check"]:
        sys.exit("usage: python e2e_llama.py check GGUF --tokens NPZ --prompt-tokens P "
                 "--extra-bufts 0|1")
    sys.exit(_check(sys.argv[2:]))
