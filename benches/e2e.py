"""End-to-end benchmark: Gemma 3 270M in float32 Keras, fp8xla's FP8 variants, Intel Neural
Compressor's FP8 and Keras' int8, on speed, memory and quality.

    fp8xla bench [--contenders a,b] [--reps 5] [--out bench-results] [--quick]
    python benches/e2e.py ...                     (the same, without the installed CLI)

For every contender, in its own processes (benches/e2e_worker.py says what each measures and
how): prefill tokens/s, decode tokens/s, peak RSS, GPL-3 perplexity and top-1 agreement with
float32. Quantized contenders are built and saved by a preparation process and loaded fresh by
the measuring process, so that the peak RSS is the deployed model's. The results go to
OUT/results.json, OUT/results.md and OUT/results.png; a contender that cannot run is reported
there as skipped or failed, with the reason.

Results layout (results.json): ``machine``, ``versions``, ``settings``, ``load_average``
(start/end), ``targets`` and ``contenders``, a list of ``{key, label, status ("ok" | "skipped"
| "failed"), reason, prepare, measure, load_average {before, after}, other_cpu, wall_seconds,
top1_agreement, vs_float32 {prefill, decode, peak_rss}}``; ``prepare`` and ``measure`` are what
the worker processes wrote.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import e2e_contenders  # noqa: E402
import e2e_report  # noqa: E402
from e2e_worker import PROGRESS_PREFIX  # noqa: E402
from fp8xla.perplexity import GPL3_PATH  # noqa: E402  (the protocol's text)


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
    text_path: str = GPL3_PATH

    @classmethod
    def quick(cls, **kw):
        """Tiny settings for a smoke test of the machinery (numbers mean nothing)."""
        return cls(prompt_tokens=32, new_tokens=8, reps=1, ppl_chunks=2, ppl_chunk_tokens=31,
                   calib_max_length=12, **kw)


class Progress:
    """One line per step on stderr: time since start, contender, what happens."""

    def __init__(self, total: int, stream=None):
        self.t0 = time.perf_counter()
        self.total = total
        self.stream = stream or sys.stderr

    def __call__(self, index: int, label: str, msg: str) -> None:
        s = int(time.perf_counter() - self.t0)
        print(f"[bench {s // 60:02d}:{s % 60:02d}] ({index}/{self.total}) {label} | {msg}",
              file=self.stream, flush=True)


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

        info["fp8xla_kernels"] = fp8xla.isa()
    except Exception as e:  # reported, not fatal: the workers will fail with the details
        info["fp8xla_kernels"] = f"unavailable ({e})"
    return info


def versions() -> dict:
    out = {}
    for name in ("fp8xla", "jax", "jaxlib", "keras", "keras-hub", "numpy", "neural-compressor",
                 "matplotlib"):
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
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------------------------
# running one worker


def run_worker(phase, contender, settings, work, report, timeout):
    """Runs e2e_worker.py; forwards its progress lines, logs the rest to WORK/PHASE.log.
    Returns what the worker wrote, or a failure record if it wrote nothing."""
    work.mkdir(parents=True, exist_ok=True)
    result_path = work / f"{phase}.json"
    result_path.unlink(missing_ok=True)
    log_path = work / f"{phase}.log"
    cmd = [sys.executable, str(HERE / "e2e_worker.py"), phase, contender.key,
           "--work", str(work), "--settings", json.dumps(asdict(settings))]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    report(f"{phase} ...")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.PIPE, text=True,
                                errors="replace", env=env)
        # a worker that hangs silently would block the loop below: kill it at the deadline
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        try:
            for line in proc.stderr:
                if line.startswith(PROGRESS_PREFIX):
                    report(f"{phase}: {line[len(PROGRESS_PREFIX):].rstrip()}")
                else:
                    log.write(line)
            code = proc.wait()
        finally:
            watchdog.cancel()
    seconds = time.perf_counter() - t0
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        timed_out = seconds >= timeout
        result = {"status": "failed",
                  "error": (f"timed out after {timeout:.0f} s" if timed_out else
                            f"the {phase} process exited with code {code} and wrote no "
                            f"results") + f"; last log lines: {_tail(log_path)}"}
    if result["status"] != "ok":
        report(f"{phase} FAILED: {result.get('error')} (log: {log_path})")
    else:
        report(f"{phase} done in {seconds:.0f} s")
    return result


def _tail(path, lines=3):
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def run_contender(contender, settings, work_root, report, timeout):
    entry = {"key": contender.key, "label": contender.label, "status": "ok", "reason": None,
             "prepare": None, "measure": None, "top1_agreement": None, "vs_float32": None}
    missing = contender.missing_requirement()
    if missing:
        entry.update(status="skipped", reason=missing)
        report(f"skipped: {missing}")
        return entry
    work = work_root / contender.key
    entry["load_average"] = {"before": list(os.getloadavg())}
    busy0, own0, t0 = _cpu_busy_seconds(), _children_cpu_seconds(), time.perf_counter()
    entry["prepare"] = run_worker("prepare", contender, settings, work, report, timeout)
    if entry["prepare"]["status"] != "ok":
        entry.update(status="failed",
                     reason=f"preparation failed: {entry['prepare'].get('error')}")
    if entry["status"] == "ok":
        entry["measure"] = run_worker("measure", contender, settings, work, report, timeout)
        if entry["measure"]["status"] != "ok":
            entry.update(status="failed", reason=entry["measure"].get("error"))
    wall = time.perf_counter() - t0
    entry["wall_seconds"] = wall
    entry["load_average"]["after"] = list(os.getloadavg())
    busy1 = _cpu_busy_seconds()
    if busy0 is not None and busy1 is not None and wall > 0:
        # CPU time the rest of the machine used meanwhile, as a share of all cores
        other = (busy1 - busy0) - (_children_cpu_seconds() - own0)
        entry["other_cpu"] = max(0.0, other) / (wall * (os.cpu_count() or 1))
    return entry


# ---------------------------------------------------------------------------------------------
# comparisons


def compare(results, work_root):
    """Top-1 agreement and ratios against float32, and fp8xla's targets."""
    import numpy as np

    cs = results["contenders"]
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
    ap = argparse.ArgumentParser(
        prog="fp8xla bench",
        description="End-to-end benchmark of Gemma 3 270M: float32 Keras, fp8xla FP8, INC FP8, "
                    "Keras int8 (tokens/s, peak RSS, GPL-3 perplexity). Takes minutes.")
    ap.add_argument("--contenders", default=",".join(keys),
                    help=f"comma-separated subset of: {', '.join(keys)} (default: all)")
    ap.add_argument("--reps", type=int, help="timed repetitions per measurement (default 5; "
                                             "1 with --quick)")
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
                    help="seconds one preparation or measuring process may take")
    args = ap.parse_args(argv)
    chosen = [k.strip() for k in args.contenders.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in e2e_contenders.BY_KEY]
    if unknown or not chosen:
        ap.error(f"unknown contender(s) {', '.join(unknown) or '(none given)'}; "
                 f"choose from {', '.join(keys)}")
    # float32 runs first: the others are compared with it
    args.contenders = [c for c in e2e_contenders.CONTENDERS if c.key in chosen]
    if args.reps is not None and args.reps < 1:
        ap.error("--reps must be at least 1")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    make = Settings.quick if args.quick else Settings
    settings = make(model=args.model, text_path=args.text)
    if args.reps is not None:
        settings.reps = args.reps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work_root = Path(args.work) if args.work else out / "work"
    started = datetime.datetime.now().astimezone()
    results = {
        "schema": 1,
        "command": " ".join(["fp8xla bench", *argv]),
        "started": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "settings": asdict(settings),
        "load_average": {"start": list(os.getloadavg())},
        "contenders": [],
    }
    progress = Progress(len(args.contenders))
    for i, c in enumerate(args.contenders, 1):
        def report(msg, i=i, c=c):
            progress(i, c.label, msg)

        results["contenders"].append(
            run_contender(c, settings, work_root, report, args.timeout))
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
