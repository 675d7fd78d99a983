"""The end-to-end benchmark's memory bandwidth probe: a read-only stream over a large buffer on
every core, the limit that decode of a small model runs into.

    python e2e_bandwidth.py [--gib 1] [--threads N] [--passes 5]      (prints one JSON object)

Decode of Gemma 3 270M reads every weight once per token and computes little on it, so its
speed is bound by how fast the machine reads memory. This probe measures that in the same run
as the contenders (benches/e2e.py runs it once per decode round, in a process of its own):
``threads`` threads (default: every core) each reduce their own contiguous part of a float32
buffer of ``gib`` GiB with ``numpy.max``, which reads every byte once and writes nothing. The
buffer is far larger than any cache, so each pass streams from memory. numpy's max is
vectorized and releases the GIL, and on one core it runs several times faster on data in cache
than any single core reads from memory, so the probe is bound by memory, not by the reduction.
Every thread first writes its own part (first touch: on a multi-socket machine its pages then
sit next to the core that reads them), then all threads start each pass together; a pass ends
when the last one is done. The result is the best pass, as STREAM reports it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

GIB = 2**30
# numpy reads float32 with its widest SIMD loads; an element type is needed to reduce at all,
# and a float reduction (unlike a sum) cannot overflow or round, whatever the buffer holds.
DTYPE = np.float32


@dataclass
class ProbeResult:
    bytes_per_pass: int
    threads: int
    pass_seconds: list  # wall time of each pass, all threads
    checksum: float  # max over the buffer: proves every part was read (and keeps it read)
    parts: list  # (start, stop) element ranges, one per thread

    @property
    def bytes_per_s(self) -> list:
        return [self.bytes_per_pass / s for s in self.pass_seconds]

    @property
    def best_bytes_per_s(self) -> float:
        return max(self.bytes_per_s)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["bytes_per_s"] = self.bytes_per_s
        d["best_bytes_per_s"] = self.best_bytes_per_s
        return d


def split(n: int, parts: int) -> list:
    """``parts`` contiguous (start, stop) ranges covering range(n), sizes differing by at most
    one; empty ranges where there are fewer elements than parts."""
    if parts < 1:
        raise ValueError(f"e2e_bandwidth.split: parts must be at least 1, got {parts}")
    if n < 0:
        raise ValueError(f"e2e_bandwidth.split: n must be >= 0, got {n}")
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def stream_read(buffer: np.ndarray, threads: int, passes: int,
                clock=time.perf_counter) -> ProbeResult:
    """Reads all of ``buffer`` (1-D, contiguous) ``passes`` times with ``threads`` threads,
    each reducing its own part; ``clock`` (seconds) times each pass."""
    buffer = np.asarray(buffer)
    if buffer.ndim != 1 or not buffer.flags.c_contiguous or buffer.size == 0:
        raise ValueError("e2e_bandwidth.stream_read: buffer must be a non-empty contiguous 1-D "
                         f"array, got shape {buffer.shape}")
    if threads < 1 or passes < 1:
        raise ValueError(f"e2e_bandwidth.stream_read: threads and passes must be at least 1, "
                         f"got threads={threads}, passes={passes}")
    parts = split(buffer.size, threads)
    maxima = [None] * threads
    start = threading.Barrier(threads + 1)
    done = threading.Barrier(threads + 1)

    def worker(i, lo, hi):
        part = buffer[lo:hi]
        for _ in range(passes):
            start.wait()
            maxima[i] = part.max() if hi > lo else None
            done.wait()

    pool = [threading.Thread(target=worker, args=(i, lo, hi), daemon=True)
            for i, (lo, hi) in enumerate(parts)]
    for t in pool:
        t.start()
    seconds = []
    for _ in range(passes):
        start.wait()  # every thread is at the start line: the pass begins
        t0 = clock()
        done.wait()  # the last thread has finished its part
        seconds.append(clock() - t0)
    for t in pool:
        t.join()
    checksum = max(float(m) for m in maxima if m is not None)
    return ProbeResult(int(buffer.nbytes), threads, seconds, checksum, parts)


def filled_buffer(nbytes: int, threads: int) -> np.ndarray:
    """A float32 buffer of at least ``nbytes`` whose every part is first written by the thread
    that will read it (values 0, 1, 2, ... modulo 2**20, so the max is known)."""
    n = -(-nbytes // np.dtype(DTYPE).itemsize)
    buffer = np.empty(n, DTYPE)

    def fill(lo, hi):
        buffer[lo:hi] = np.arange(lo, hi, dtype=np.int64) % 2**20

    pool = [threading.Thread(target=fill, args=part) for part in split(n, threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return buffer


def probe(gib: float = 1.0, threads: int | None = None, passes: int = 5) -> dict:
    """The probe as the benchmark runs it; the dictionary of :class:`ProbeResult` plus what it
    read and how."""
    threads = threads or os.cpu_count() or 1
    buffer = filled_buffer(int(gib * GIB), threads)
    result = stream_read(buffer, threads, passes)
    expected = float(min(buffer.size, 2**20) - 1)
    if result.checksum != expected:
        raise RuntimeError(f"e2e_bandwidth.probe: the max over the buffer is {result.checksum}, "
                           f"expected {expected}: a part was not read")
    out = result.as_dict()
    del out["parts"]
    out["method"] = (f"numpy.max over a {buffer.nbytes / GIB:.2f} GiB float32 buffer, "
                     f"{threads} threads, best of {passes} passes")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=1.0, help="buffer size in GiB (default 1)")
    ap.add_argument("--threads", type=int, help="threads (default: every core)")
    ap.add_argument("--passes", type=int, default=5, help="passes over the buffer (default 5)")
    args = ap.parse_args(argv)
    print(json.dumps(probe(args.gib, args.threads, args.passes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
