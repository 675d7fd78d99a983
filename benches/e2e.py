"""End-to-end benchmark: Gemma 3 270M in float32 Keras, fp8xla's FP8 variants, Intel Neural
Compressor's FP8, Keras' int8 and llama.cpp (Q8_0, F32), on speed, memory and quality, and
decode's share of the machine's memory bandwidth.

    fp8xla bench [--contenders a,b] [--reps 5] [--out bench-results] [--quick]
    python benches/e2e.py ...                     (the same, without the installed CLI)

For every contender, in its own processes (benches/e2e_worker.py says what each measures and
how): prefill tokens/s, decode tokens/s, peak RSS, GPL-3 perplexity and top-1 agreement with
float32. Quantized contenders are built and saved by a preparation process and loaded fresh by
the measuring process, so that the peak RSS is the deployed model's. The measuring processes
stay loaded together and take their decode repetitions in rounds, one of each contender per
round (``run_contenders``); at the start of each round the memory bandwidth probe
(e2e_bandwidth.py) runs in a process of its own. The results go to OUT/results.json,
OUT/results.md and OUT/results.png; a contender that cannot run is reported there as skipped
or failed, with the reason.

Results layout (results.json): ``machine``, ``versions``, ``settings``, ``load_average``
(start/end), ``bandwidth`` ({median,min,max}_bytes_per_s, method, probes, errors; None if no
round ran), ``targets`` and ``contenders``, a list of ``{key, label, status ("ok" | "skipped"
| "failed"), reason, note (how an "ok" contender ran, if not as by default), prepare, measure,
load_average {before, after}, other_cpu, top1_agreement, vs_float32 {prefill, decode,
peak_rss}, memory_limit_share}``; ``prepare`` and ``measure`` are what the worker processes
wrote (``measure.decode_bytes_per_token``: e2e_traffic.py); ``load_average`` (1/5/15 min, at
the contender's first decode repetition and after its last) and ``other_cpu`` (the share of
all cores that other processes used during its decode repetitions) say how busy the machine
was while its decode was timed.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Run as a script (`python benches/e2e.py`, which `fp8xla bench` does), this directory is first
# on sys.path, so the sibling modules import directly.
import e2e_contenders
import e2e_report
from e2e_process import WorkerFailed, WorkerProcess
from fp8xla.perplexity import GPL3_PATH  # the protocol's text


@dataclass
class Settings:
    model: str = "gemma3_270m"
    prompt_tokens: int = 512  # the prompt that decode continues
    new_tokens: int = 128
    # Decode of the FP8 contenders is bound by memory bandwidth, which other tenants of a host
    # take without showing in this machine's load: 5 repetitions keep one slow one from
    # deciding the median.
    reps: int = 5
    ppl_chunks: int = 14  # GPL-3 protocol of fp8xla.perplexity; each chunk is a timed prefill
    ppl_chunk_tokens: int = 511  # (of this + 1 tokens, with BOS)
    calib_max_length: int = 32
    # 256-token passages of Python's documentation GPTQ calibrates on (fp8xla.calibration)
    gptq_calib_passages: int = 75
    text_path: str = GPL3_PATH
    # The memory bandwidth probe's buffer (e2e_bandwidth.py), read once per decode round: far
    # larger than any cache.
    probe_gib: float = 1.0

    @classmethod
    def quick(cls, **kw):
        """Tiny settings for a smoke test of the machinery (numbers mean nothing)."""
        return cls(prompt_tokens=32, new_tokens=8, reps=1, ppl_chunks=2, ppl_chunk_tokens=31,
                   calib_max_length=12, gptq_calib_passages=2, probe_gib=0.25, **kw)


class Progress:
    """One line per step on stderr: time since start, contender, what happens."""

    def __init__(self, total: int, stream=None):
        self.t0 = time.perf_counter()
        self.total = total
        self.stream = stream or sys.stderr

    def __call__(self, index: int, label: str, msg: str) -> None:
        self.note(f"({index}/{self.total}) {label} | {msg}")

    def note(self, msg: str) -> None:
        s = int(time.perf_counter() - self.t0)
        print(f"[bench {s // 60:02d}:{s % 60:02d}] {msg}", file=self.stream, flush=True)


# ---------------------------------------------------------------------------------------------
# machine and versions


def machine_info() -> dict:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", platform.machine(), "x86_64"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "isa_flags": [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "amx_tile")
                      if f in flags],
        "memory_gib": mem / 2**30,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS"),
    }
    try:  # the kernels fp8xla dispatches to (loads the library; no model)
        import fp8xla

        kern = fp8xla.info()
        info["fp8xla_kernels"] = f"{kern['isa']} ({kern['kernels']})"
    except Exception as e:  # reported, not fatal: the workers will fail with the details
        info["fp8xla_kernels"] = f"unavailable ({e})"
    return info


def versions() -> dict:
    out = {}
    for name in ("fp8xla", "jax", "jaxlib", "keras", "keras-hub", "numpy", "neural-compressor",
                 "llama-cpp-python", "matplotlib"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _cpu_busy_seconds():
    """Busy CPU seconds of the whole machine so far (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal: busy is all but idle and iowait, and
    # steal, which is time the hypervisor gave to other machines, not to processes here.
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:7]) - idle) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# running the workers


def run_worker(phase, contender, settings, work, report, timeout):
    """Runs one e2e_worker.py process to its end (at most ``timeout`` seconds); returns what
    it wrote, or a failure record if it wrote nothing."""
    report(f"{phase} ...")
    return WorkerProcess(phase, contender, asdict(settings), work, report).result(timeout)


class BandwidthProbe:
    """The memory bandwidth probe (e2e_bandwidth.py), run in a process of its own once per
    decode round, so that its median covers the same minutes as the contenders' decode."""

    def __init__(self, gib: float, timeout: float, run=None):
        self.gib, self.timeout = gib, timeout
        self.run_probe = run or self._run
        self.probes, self.errors = [], []

    def _run(self) -> dict:
        import subprocess

        cmd = [sys.executable, str(Path(__file__).resolve().parent / "e2e_bandwidth.py"),
               "--gib", str(self.gib)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout)
        if r.returncode != 0:
            raise RuntimeError(f"the bandwidth probe exited with code {r.returncode}: "
                               f"{r.stderr.strip()[-500:]}")
        return json.loads(r.stdout)

    def __call__(self) -> float | None:
        """Runs the probe once; its best pass in bytes/s, or None if it failed (the error is
        kept for the results)."""
        try:
            result = self.run_probe()
        except Exception as e:
            self.errors.append(f"{type(e).__name__}: {e}")
            return None
        self.probes.append(result)
        return result["best_bytes_per_s"]

    def summary(self) -> dict | None:
        if not self.probes and not self.errors:
            return None
        rates = sorted(p["best_bytes_per_s"] for p in self.probes)
        n = len(rates)
        median = None if not n else (rates[n // 2] if n % 2 else
                                     0.5 * (rates[n // 2 - 1] + rates[n // 2]))
        return {"median_bytes_per_s": median, "min_bytes_per_s": rates[0] if n else None,
                "max_bytes_per_s": rates[-1] if n else None,
                "method": self.probes[0]["method"] if n else None,
                "probes": self.probes, "errors": self.errors}


def _entry(contender) -> dict:
    return {"key": contender.key, "label": contender.label, "status": "ok", "reason": None,
            "prepare": None, "measure": None, "top1_agreement": None, "vs_float32": None}


class _Repetitions:
    """The load around one contender's decode repetitions: the load average at the first
    and after the last, and the CPU time the rest of the machine used during them."""

    def __init__(self):
        self.before = self.after = None
        self.other = self.wall = 0.0
        self.complete = True

    def timed(self, worker, run):
        if self.before is None:
            self.before = list(os.getloadavg())
        busy0, own0, t0 = _cpu_busy_seconds(), worker.cpu_seconds(), time.perf_counter()
        run()
        wall = time.perf_counter() - t0
        busy1, own1 = _cpu_busy_seconds(), worker.cpu_seconds()
        self.after = list(os.getloadavg())
        if None in (busy0, busy1, own0, own1):
            self.complete = False
        else:
            self.other += max(0.0, (busy1 - busy0) - (own1 - own0))
            self.wall += wall

    def record(self, entry) -> None:
        if self.before is None:
            return
        entry["load_average"] = {"before": self.before, "after": self.after}
        if self.complete and self.wall > 0:
            # /proc/stat and /proc/PID/stat count in clock ticks read at slightly different
            # moments, so short repetitions on a loaded machine can add up to more than every
            # core; the share is at most all of them.
            entry["other_cpu"] = min(1.0, self.other / (self.wall * (os.cpu_count() or 1)))


def run_contenders(contenders, settings, work_root, progress, timeout, probe=None) -> list:
    """Prepares every contender, then measures them together: each measuring worker is
    loaded and warmed up in turn and stays loaded; the decode repetitions run in rounds, one
    of each contender per round; then each worker scores (prefill and quality) and exits.
    Interleaving makes the decode ratios compare minutes of the same host state: a host's
    memory bandwidth drifts over minutes, and one contender measured in a slow stretch would
    otherwise lose to the others by that alone. ``progress(index, label, message)`` and
    ``progress.note(message)`` show what happens; ``timeout`` bounds each step of a worker.
    ``probe()``, if given, runs at the start of every decode round (the bandwidth probe)."""
    entries = [_entry(c) for c in contenders]
    reports = [functools.partial(progress, i, c.label) for i, c in enumerate(contenders, 1)]
    for c, entry, report in zip(contenders, entries, reports):
        missing = c.missing_requirement(settings.model)
        if missing:
            entry.update(status="skipped", reason=missing)
            report(f"skipped: {missing}")
            continue
        entry["prepare"] = run_worker("prepare", c, settings, work_root / c.key, report,
                                      timeout)
        if entry["prepare"]["status"] != "ok":
            entry.update(status="failed",
                         reason=f"preparation failed: {entry['prepare'].get('error')}")
        elif entry["prepare"].get("note"):  # how it runs, e.g. llama.cpp without extra buffers
            entry["note"] = entry["prepare"]["note"]

    def fail(entry, worker, error):
        entry["measure"] = worker.end(failed=str(error))
        entry.update(status="failed", reason=entry["measure"].get("error"))

    live = []  # (worker, entry, repetitions) of the contenders still being measured
    try:
        for c, entry, report in zip(contenders, entries, reports):
            if entry["status"] != "ok":
                continue
            report("measure ...")
            worker = WorkerProcess("measure", c, asdict(settings), work_root / c.key, report,
                                   serve=True)
            try:
                worker.wait_event("ready", timeout, "while loading and warming up")
            except WorkerFailed as e:
                fail(entry, worker, e)
                continue
            live.append((worker, entry, _Repetitions()))
        for r in range(1, settings.reps + 1):
            if live:
                progress.note(f"decode round {r}/{settings.reps}: one repetition of each of "
                              f"{len(live)} contenders")
                if probe is not None:
                    rate = probe()
                    progress.note("memory bandwidth probe: " + (
                        "failed" if rate is None else f"{rate / 1e9:.1f} GB/s"))
            for item in list(live):
                worker, entry, reps = item

                def one_rep(worker=worker):
                    worker.send("decode")
                    worker.wait_event("rep", timeout, f"in decode repetition {r}")

                try:
                    reps.timed(worker, one_rep)
                except WorkerFailed as e:
                    fail(entry, worker, e)
                    live.remove(item)
        for worker, entry, reps in live:
            reps.record(entry)
            entry["measure"] = worker.result(timeout)  # end of commands: prefill and quality
            if entry["measure"]["status"] != "ok":
                entry.update(status="failed", reason=entry["measure"].get("error"))
        live = []
    finally:
        for worker, _, _ in live:  # an interrupted run leaves no worker behind
            worker.kill()
    return entries


# ---------------------------------------------------------------------------------------------
# comparisons


def compare(results, work_root):
    """Top-1 agreement and ratios against float32, decode's share of the memory limit, and
    fp8xla's targets."""
    import numpy as np

    import e2e_traffic

    cs = results["contenders"]
    bandwidth = e2e_report.bandwidth(results)
    for c in cs:
        if c["status"] == "ok":
            c["memory_limit_share"] = e2e_traffic.memory_limit_share(
                e2e_report.decode(c), e2e_report.bytes_per_token(c), bandwidth)
    base = next((c for c in cs if c["key"] == "float32" and c["status"] == "ok"), None)
    base_pred = None
    if base is not None:
        path = work_root / "float32" / "predictions.npy"
        base_pred = np.load(path) if path.is_file() else None
    for c in cs:
        if c["status"] != "ok" or base is None:
            continue
        path = work_root / c["key"] / "predictions.npy"
        if base_pred is not None and path.is_file():
            pred = np.load(path)
            if pred.shape == base_pred.shape:
                c["top1_agreement"] = float(np.mean(pred == base_pred))
        c["vs_float32"] = {
            "prefill": _ratio(e2e_report.prefill(c), e2e_report.prefill(base)),
            "decode": _ratio(e2e_report.decode(c), e2e_report.decode(base)),
            "peak_rss": _ratio(e2e_report.peak_rss(c), e2e_report.peak_rss(base)),
        }
    results["targets"] = []
    for c in cs:
        if not c["key"].startswith("fp8xla"):
            continue
        v = c.get("vs_float32") or {}
        checks = {}
        for key, label, test in e2e_report.TARGETS:
            x = v.get(key)
            checks[key] = {"target": label, "measured": x, "met": None if x is None else test(x)}
        results["targets"].append({"key": c["key"], "label": c["label"], "checks": checks})


def _ratio(a, b):
    return None if a is None or not b else a / b


# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    keys = [c.key for c in e2e_contenders.CONTENDERS]
    default_keys = [c.key for c in e2e_contenders.CONTENDERS if c.in_default_run]
    ap = argparse.ArgumentParser(
        prog="fp8xla bench",
        description="End-to-end benchmark of Gemma 3 270M: float32 Keras, fp8xla FP8, INC FP8, "
                    "Keras int8, llama.cpp Q8_0 and F32 (tokens/s, peak RSS, GPL-3 "
                    "perplexity, decode's share of the memory bandwidth). Takes minutes.")
    ap.add_argument("--contenders", default=",".join(default_keys),
                    help=f"comma-separated subset of: {', '.join(keys)} (default: all but "
                         f"{', '.join(sorted(set(keys) - set(default_keys)))})")
    ap.add_argument("--prompt-tokens", type=int,
                    help="prompt length that decode continues (default 512; 32 with --quick); "
                         "long contexts: 4096 with fp8xla-e4m3-kv8")
    ap.add_argument("--new-tokens", type=int, help="decoded tokens (default 128; 8 with --quick)")
    ap.add_argument("--reps", type=int, help="timed repetitions per measurement (default 5; "
                                             "1 with --quick)")
    ap.add_argument("--ppl-chunks", type=int,
                    help="GPL-3 chunks scored for prefill and perplexity (default 14, the whole "
                         "protocol; 2 with --quick); fewer make a long-context run shorter, "
                         "and its perplexity then covers only those chunks")
    ap.add_argument("--out", default="bench-results", help="output directory "
                                                           "(default: bench-results)")
    ap.add_argument("--work", help="directory for presets and logs (default: OUT/work)")
    ap.add_argument("--keep-work", action="store_true",
                    help="keep the presets (the logs are always kept)")
    ap.add_argument("-m", "--model", default="gemma3_270m",
                    help="gemma3_270m (default) or a Keras-Hub Gemma3 preset name or path")
    ap.add_argument("--quick", action="store_true",
                    help="tiny prompt, few tokens, 2 perplexity chunks: a smoke test")
    ap.add_argument("--text", default=GPL3_PATH, help="text for prompts and perplexity")
    ap.add_argument("--timeout", type=float, default=3600,
                    help="seconds one step of a worker process may take: a preparation, "
                         "loading and warming up, a decode repetition, scoring")
    args = ap.parse_args(argv)
    chosen = [k.strip() for k in args.contenders.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in e2e_contenders.BY_KEY]
    if unknown or not chosen:
        ap.error(f"unknown contender(s) {', '.join(unknown) or '(none given)'}; "
                 f"choose from {', '.join(keys)}")
    # float32 runs first: the others are compared with it
    args.contenders = [c for c in e2e_contenders.CONTENDERS if c.key in chosen]
    if args.ppl_chunks is not None and not 1 <= args.ppl_chunks <= Settings.ppl_chunks:
        ap.error(f"--ppl-chunks must be between 1 and {Settings.ppl_chunks}, got "
                 f"{args.ppl_chunks}")
    for name in ("reps", "prompt_tokens", "new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# Options that only say where files go or how long to wait: they do not change what is
# measured, and their values are local paths, which published results should not carry.
_LOCAL_OPTIONS = {"--out": True, "--work": True, "--timeout": True, "--keep-work": False}


def reported_command(argv) -> str:
    """The command line as results record it: `fp8xla bench` and the options that shape the
    measurement (contenders, repetitions, model, text, --quick), without the local ones."""
    kept, i = [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in _LOCAL_OPTIONS:
            takes_value = _LOCAL_OPTIONS[name] and "=" not in argv[i]
            i += 2 if takes_value else 1
            continue
        kept.append(argv[i])
        i += 1
    return " ".join(["fp8xla bench", *kept])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    make = Settings.quick if args.quick else Settings
    settings = make(model=args.model, text_path=args.text)
    for name in ("reps", "prompt_tokens", "new_tokens", "ppl_chunks"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work_root = Path(args.work) if args.work else out / "work"
    started = datetime.datetime.now().astimezone()
    results = {
        "schema": 1,
        "command": reported_command(argv),
        "started": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "settings": asdict(settings),
        "load_average": {"start": list(os.getloadavg())},
        "contenders": [],
    }
    probe = BandwidthProbe(settings.probe_gib, args.timeout)
    results["contenders"] = run_contenders(args.contenders, settings, work_root,
                                           Progress(len(args.contenders)), args.timeout, probe)
    results["bandwidth"] = probe.summary()
    compare(results, work_root)
    results["load_average"]["end"] = list(os.getloadavg())
    results["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    results["wall_seconds"] = (datetime.datetime.now().astimezone() - started).total_seconds()
    e2e_report.write_all(results, out)
    if not args.keep_work:
        for c in args.contenders:
            shutil.rmtree(work_root / c.key / "preset", ignore_errors=True)
    print(e2e_report.markdown(results))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'} "
          f"(logs in {work_root})", file=sys.stderr)
    return 1 if any(c["status"] == "failed" for c in results["contenders"]) else 0


if __name__ == "__main__":
    sys.exit(main())
