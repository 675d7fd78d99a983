"""One contender of the end-to-end benchmark, in a process of its own (started by e2e.py).

    python e2e_worker.py prepare CONTENDER --work DIR --settings JSON
    python e2e_worker.py measure CONTENDER --work DIR --settings JSON

``prepare`` loads the float32 model, quantizes it as the contender says and saves a preset in
DIR/CONTENDER/preset (for float32 itself it only loads it, which converts and caches the
default model on a fresh machine, outside the measured process). ``measure`` loads the
contender fresh (the preset, or the float32 model) and measures, in this order (peak RSS is
read for each phase: loading, generating, scoring):

1. decode: Keras-Hub's ``generate`` on a [1, P + N] batch. Its generate step first runs the
   model over the whole padded [1, P + N] sequence to fill the KV cache, then loops one token
   at a time from the end of the prompt. Two runs of the same compiled function differ only in
   the loop: a prompt of P tokens (N decode steps) and a prompt that fills all P + N positions
   (no decode step). Decode tokens/s = N / (t(P prompt) - t(full prompt)); the cache fill,
   the set-up and the copy of the results cancel out. stop_token_ids=None, so generation never
   stops early.
2. prefill and quality: the GPL-3 protocol of fp8xla.perplexity, whose every chunk is one
   forward pass over [1, C + 1] tokens (logits for every position, ``predict_on_batch``); each
   of those calls is a timed prefill, tokens/s = (C + 1) / time. The predictions are saved for
   the top-1 agreement, which the driver computes against float32.

The llama.cpp contenders (kind "llama-cpp", e2e_llama.py) are prepared without Keras (a GGUF
and the token ids) and measured by ``measure_llama`` the same way: decode in the same rounds
(timed greedy single-token steps after the prompt), then the GPL-3 chunks for prefill and
quality. Every measurement also records the bytes one decode step reads (e2e_traffic.py).

Every shape runs once untimed first (that call compiles): compile time is never timed.
Decode gets ``reps`` timed repetitions, prefill one timed call per GPL-3 chunk.

With ``--serve``, ``measure`` runs its decode repetitions when the driver asks: once loaded
and warmed up it sends the event ``ready``, then reads commands from stdin, one per line:
``decode`` runs one repetition and answers with the event ``rep``; ``finish`` (or the end of
stdin) goes on to prefill and quality. So the driver can keep every contender loaded and
measure them in rounds, one repetition each, and no contender's median depends on which
minutes of the run it happened to get (a host's memory bandwidth drifts over minutes).

Progress lines for the driver start with ``@@progress``, events with ``@@event`` (then JSON);
everything else the libraries print goes to the driver's log. The results go to
DIR/CONTENDER/<phase>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback

os.environ.setdefault("KERAS_BACKEND", "jax")
# Run as a script (by e2e_process), this directory is first on sys.path.

import e2e_contenders  # noqa: E402

PROGRESS_PREFIX = "@@progress "
EVENT_PREFIX = "@@event "


def progress(msg: str) -> None:
    print(PROGRESS_PREFIX + msg, file=sys.stderr, flush=True)


def event(name: str, **fields) -> None:
    print(EVENT_PREFIX + json.dumps({"event": name, **fields}), file=sys.stderr, flush=True)


class Step:
    """Reports a step's start and its duration as progress lines."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        progress(f"{self.what} ...")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.seconds = time.perf_counter() - self.t0
        if exc_type is None:
            progress(f"{self.what}: {self.seconds:.1f} s")
        return False


def memory() -> dict:
    """Resident set size of this process now and its peak since the last ``reset_peak()``
    (bytes); ``peak_reset`` says whether resetting works here, else the peak is the process's."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, kib = line.split()[:2]
                    out["rss" if name == "VmRSS:" else "peak"] = int(kib) * 1024
    except OSError:  # no procfs: ru_maxrss (KiB on Linux) is the process's peak
        out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["peak_reset"] = _PEAK_RESET
    return out


_PEAK_RESET = False


def reset_peak() -> None:
    """Starts a new peak-RSS window: Linux resets VmHWM to the current RSS on "5" written to
    /proc/self/clear_refs. Each phase then gets its own peak."""
    global _PEAK_RESET
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _PEAK_RESET = True
    except OSError:
        _PEAK_RESET = False


def stats(values) -> dict:
    """Median, min and max of the finite values (a NaN marks a repetition that failed)."""
    values = [float(v) for v in values]
    vals = sorted(v for v in values if v == v and abs(v) != float("inf"))
    n = len(vals)
    if not n:
        return {"median": None, "min": None, "max": None, "values": values}
    median = vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])
    return {"median": median, "min": vals[0], "max": vals[-1], "values": values}


# ---------------------------------------------------------------------------------------------


class DecodeBench:
    """Decode tokens/s from two generate runs of one compiled shape (see the module doc):
    compiled and warmed up on creation, then one timed repetition per ``rep()``."""

    def __init__(self, model, text_ids, bos, s, out):
        import numpy as np
        from fp8xla import keras as fk

        self.model, self.out, self.reps = model, out, s["reps"]
        p, self.n = s["prompt_tokens"], s["new_tokens"]
        total = p + self.n
        if getattr(model, "fp8", None) is None:
            # Keras-Hub 0.32's own generate function fails without a preprocessor (it returns
            # "images": None); this is the same jitted generate step behind fp8xla's wrapper.
            model.generate_function = fk.float_generate_function(model)
        full = np.concatenate([[bos], text_ids[: total - 1]]).astype(np.int32)[None, :]
        self.batches = {
            "prompt": {"token_ids": np.where(np.arange(total) < p, full, 0).astype(np.int32),
                       "padding_mask": (np.arange(total) < p)[None, :]},
            "full": {"token_ids": full, "padding_mask": np.ones((1, total), bool)},
        }
        self.t_prompt, self.t_full, self.rates = [], [], []
        with Step(f"decode: compile and warm up [1, {total}]") as st:
            self._generate("full")
            _, ids = self._generate("prompt")
        out["decode_warmup_seconds"] = st.seconds
        new = ids[0, p:]
        out["continuation_ids"] = new[:16].tolist()
        try:
            out["continuation"] = model.preprocessor.tokenizer.detokenize(new[:16])
        except Exception:  # informative only
            pass

    def _generate(self, which):
        import numpy as np

        model = self.model
        preprocessor = model.preprocessor
        model.preprocessor = None  # the inputs are token ids already
        try:
            t0 = time.perf_counter()
            result = model.generate(self.batches[which], stop_token_ids=None)
            ids = np.asarray(result["token_ids"])
            return time.perf_counter() - t0, ids
        finally:
            model.preprocessor = preprocessor

    def rep(self) -> float:
        """One timed repetition; returns its decode tokens/s (NaN if it made no sense)."""
        with Step(f"decode rep {len(self.rates) + 1}/{self.reps}"):
            tf, _ = self._generate("full")
            tp, _ = self._generate("prompt")
        self.t_full.append(tf)
        self.t_prompt.append(tp)
        self.rates.append(self.n / (tp - tf) if tp > tf else float("nan"))
        return self.rates[-1]

    def summarize(self) -> None:
        out = self.out
        out["generate_seconds"] = stats(self.t_prompt)  # P-token prompt + N new tokens
        out["generate_fixed_seconds"] = stats(self.t_full)  # same shape, no decode step
        out["decode_tokens_per_s"] = stats(self.rates)


def serve_decode(bench: DecodeBench) -> None:
    """The driver's commands (see the module doc) until ``finish`` or the end of stdin."""
    event("ready")
    for line in sys.stdin:
        command = line.strip()
        if command == "finish":
            return
        if command != "decode":
            raise ValueError(f"e2e_worker: unknown command {command!r} (expected 'decode' or "
                             "'finish')")
        rate = bench.rep()
        event("rep", tokens_per_s=None if rate != rate else rate)


def measure_prefill_and_quality(logits_fn, tokenizer, bos, s, out, work):
    """Prefill tokens/s and the GPL-3 protocol in one go: every chunk of the protocol is one
    forward pass over [1, chunk + 1] tokens, which is the prefill, so each call is timed (after
    one untimed call that compiles) instead of running separate prefill repetitions.
    ``logits_fn(token_ids, padding_mask)`` is the contender's forward pass, ``tokenizer`` the
    one whose ids it takes."""
    import numpy as np
    from fp8xla import perplexity

    p = s["ppl_chunk_tokens"] + 1
    chunk = perplexity.gpl3_token_chunks(tokenizer, s["text_path"], 1, p - 1)
    ids = np.concatenate([[[bos]], chunk], axis=1).astype(np.int32)
    with Step(f"prefill: compile and warm up [1, {p}]") as st:
        logits_fn(ids, np.ones_like(ids))
    out["prefill_warmup_seconds"] = st.seconds
    times = []
    done = [0]

    def timed(token_ids, padding_mask):
        t0 = time.perf_counter()
        logits = logits_fn(token_ids, padding_mask)
        times.append(time.perf_counter() - t0)
        done[0] += len(token_ids)
        progress(f"prefill + perplexity: chunk {done[0]}/{s['ppl_chunks']}: {times[-1]:.1f} s")
        return logits

    with Step(f"GPL-3 perplexity ({s['ppl_chunks']} x {s['ppl_chunk_tokens']} tokens)"):
        r = perplexity.gpl3_perplexity(logits_fn=timed, tokenizer=tokenizer, bos_id=bos,
                                       path=s["text_path"], num_chunks=s["ppl_chunks"],
                                       chunk_tokens=s["ppl_chunk_tokens"])
    np.save(os.path.join(work, "predictions.npy"), r.predictions)
    out["prefill_tokens"] = p
    out["prefill_seconds"] = stats(times)
    out["prefill_tokens_per_s"] = stats(p / t for t in times)
    out["perplexity"] = r.perplexity
    out["num_predictions"] = r.num_predictions
    out["top1_accuracy"] = r.top1_accuracy()
    out["perplexity_seconds"] = r.seconds


def measure(contender, s, work, serve=False) -> dict:
    if contender.kind == "llama-cpp":
        return measure_llama(contender, s, work, serve)
    import fp8xla
    import fp8xla.keras  # noqa: F401  (JAX, Keras and Keras-Hub: the runtime every one needs)
    import fp8xla.models  # noqa: F401
    from fp8xla import perplexity

    reset_peak()
    mem = {"baseline": memory()}
    out = {"memory": mem, "isa": fp8xla.isa()}
    preset = os.path.join(work, "preset") if contender.has_preset else None
    with Step("load") as st:
        model = e2e_contenders.load(contender, s["model"], preset)
    out["load_seconds"] = st.seconds
    mem["load"] = memory()
    reset_peak()
    tokenizer = model.preprocessor.tokenizer
    bos = int(tokenizer.start_token_id)
    text_ids = perplexity.gpl3_token_chunks(
        tokenizer, s["text_path"], 1, s["prompt_tokens"] + s["new_tokens"])[0]
    bench = DecodeBench(model, text_ids, bos, s, out)
    if serve:
        serve_decode(bench)
    else:
        for _ in range(s["reps"]):
            bench.rep()
    bench.summarize()
    mem["generate"] = memory()
    reset_peak()
    out["decode_bytes_per_token"] = keras_decode_bytes(model, s)
    # Keras' way to score text; an fp8xla model runs its FP8 graph there (even when loaded
    # from an FP8 preset, see fp8xla.saving)
    measure_prefill_and_quality(perplexity.keras_logits_fn(model), tokenizer, bos, s, out, work)
    mem["score"] = memory()
    return out


def keras_decode_bytes(model, s) -> dict:
    """What a decode step of a Keras-Hub model reads (e2e_traffic says how it is counted)."""
    import e2e_traffic

    try:
        return e2e_traffic.decode_bytes_per_token(
            e2e_traffic.keras_weight_bytes(model), e2e_traffic.keras_kv_bytes_per_position(model),
            s["prompt_tokens"], s["new_tokens"])
    except Exception as e:  # the decode numbers stand without it; the report shows why not
        return {"error": f"{type(e).__name__}: {e}"}


class LlamaDecodeBench:
    """Decode tokens/s of llama.cpp (e2e_llama.decode: N timed greedy single-token steps
    after the prompt), with DecodeBench's interface: warmed up on creation, one timed
    repetition per ``rep()``."""

    def __init__(self, llm, prompt_ids, s, out, decode=None):
        import e2e_llama

        self.llm, self.prompt, self.out = llm, prompt_ids, out
        self.n, self.reps = s["new_tokens"], s["reps"]
        self.decode = decode or e2e_llama.decode  # (llm, prompt, n) -> (seconds, fed tokens)
        self.seconds, self.rates = [], []
        with Step(f"decode: warm up ({len(prompt_ids)}-token prompt, {self.n} steps)") as st:
            _, fed = self.decode(llm, prompt_ids, self.n)
        out["decode_warmup_seconds"] = st.seconds
        out["continuation_ids"] = fed[:16]

    def rep(self) -> float:
        with Step(f"decode rep {len(self.rates) + 1}/{self.reps}"):
            seconds, _ = self.decode(self.llm, self.prompt, self.n)
        self.seconds.append(seconds)
        self.rates.append(self.n / seconds if seconds > 0 else float("nan"))
        return self.rates[-1]

    def summarize(self) -> None:
        self.out["generate_seconds"] = stats(self.seconds)  # the N decode steps alone
        self.out["decode_tokens_per_s"] = stats(self.rates)


def measure_llama(contender, s, work, serve=False) -> dict:
    """The llama.cpp contender (e2e_llama.py says how it is measured). Until generation is
    over the process holds llama.cpp, numpy and the token ids only, so its peak RSS is
    llama.cpp's; scoring then imports fp8xla.perplexity (and with it JAX) for the protocol."""
    import gc

    import numpy as np

    import e2e_llama
    import e2e_traffic

    import llama_cpp  # loaded before the baseline, as the Keras runtime is

    reset_peak()
    mem = {"baseline": memory()}
    with open(os.path.join(work, "prepare.json")) as f:
        prep = json.load(f)
    preset = os.path.join(work, "preset")
    gguf = os.path.join(preset, e2e_llama.GGUF_NAME)
    tokenizer = e2e_llama.SavedTokenization(os.path.join(preset, e2e_llama.TOKENS_NAME))
    extra = bool(prep.get("use_extra_bufts", True))
    p, n = s["prompt_tokens"], s["new_tokens"]
    out = {"memory": mem, "isa": e2e_llama.system_info(),
           "llama_cpp": {"version": llama_cpp.__version__, "ftype": prep.get("ftype"),
                         "use_extra_bufts": extra, "threads": os.cpu_count(),
                         "kv_cache": "f16", "flash_attn": False}}
    with Step("load") as st:
        llm = e2e_llama.load(gguf, n_ctx=p + n, logits_all=False, extra_bufts=extra)
    out["load_seconds"] = st.seconds
    mem["load"] = memory()
    reset_peak()
    # the Keras contenders' prompt: [BOS] and the text's first P - 1 tokens
    prompt = np.concatenate([[tokenizer.start_token_id], tokenizer.ids[: p - 1]])
    bench = LlamaDecodeBench(llm, prompt, s, out)
    if serve:
        serve_decode(bench)
    else:
        for _ in range(s["reps"]):
            bench.rep()
    bench.summarize()
    mem["generate"] = memory()
    del llm, bench
    gc.collect()
    reset_peak()
    out["decode_bytes_per_token"] = e2e_traffic.decode_bytes_per_token(
        prep["weight_bytes"], prep["kv_cache_bytes_per_position"], p, n)
    c = s["ppl_chunk_tokens"] + 1
    with Step("load for scoring (logits for every position)"):
        scorer = e2e_llama.load(gguf, n_ctx=c, logits_all=True, extra_bufts=extra)
    measure_prefill_and_quality(e2e_llama.logits_fn(scorer), tokenizer,
                                tokenizer.start_token_id, s, out, work)
    mem["score"] = memory()
    return out


def prepare(contender, s, work) -> dict:
    if contender.kind == "llama-cpp":
        import e2e_llama

        return e2e_llama.prepare(contender, s, work, progress)
    from fp8xla import models

    with Step("load the float32 model"):
        model = models.load_model(s["model"], progress=False)
    if not contender.has_preset:
        return {}
    with Step("quantize and save the preset"):
        notes = e2e_contenders.prepare(contender, model, os.path.join(work, "preset"),
                                       s["calib_max_length"], s["gptq_calib_passages"])
    return notes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("phase", choices=["prepare", "measure"])
    ap.add_argument("contender", choices=sorted(e2e_contenders.BY_KEY))
    ap.add_argument("--work", required=True, help="this contender's work directory")
    ap.add_argument("--settings", required=True, help="the benchmark settings as JSON")
    ap.add_argument("--serve", action="store_true",
                    help="measure: run the decode repetitions on the driver's commands")
    args = ap.parse_args(argv)
    contender = e2e_contenders.BY_KEY[args.contender]
    settings = json.loads(args.settings)
    os.makedirs(args.work, exist_ok=True)
    result_path = os.path.join(args.work, f"{args.phase}.json")
    t0 = time.perf_counter()
    try:
        if args.phase == "measure":
            result = measure(contender, settings, args.work, serve=args.serve)
        else:
            result = prepare(contender, settings, args.work)
        result = {"status": "ok", **result}
        code = 0
    except Exception as e:
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}".strip()}
        code = 1
    result["seconds"] = time.perf_counter() - t0
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    return code


if __name__ == "__main__":
    sys.exit(main())
