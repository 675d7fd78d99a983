"""One worker process of the end-to-end benchmark (benches/e2e_worker.py), as the driver sees it.

A worker reports on stderr: progress lines (``@@progress``), which go to the driver's
display, events (``@@event {json}``), which the driver waits for, and everything else the
libraries print, which goes to the worker's log with its stdout. A worker started with
``serve=True`` takes commands on stdin, one per line (see e2e_worker.py), so that the driver
can ask several loaded contenders for one decode repetition each in turn.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from e2e_worker import EVENT_PREFIX, PROGRESS_PREFIX

HERE = Path(__file__).resolve().parent


class WorkerFailed(Exception):
    """The worker died, timed out or said something unexpected; the message says which."""


class WorkerProcess:
    def __init__(self, phase, contender, settings: dict, work: Path, report, serve=False):
        self.phase, self.report = phase, report
        work.mkdir(parents=True, exist_ok=True)
        self.result_path = work / f"{phase}.json"
        self.result_path.unlink(missing_ok=True)
        self.log_path = work / f"{phase}.log"
        cmd = [sys.executable, str(HERE / "e2e_worker.py"), phase, contender.key,
               "--work", str(work), "--settings", json.dumps(settings)]
        if serve:
            cmd.append("--serve")
        self.log = open(self.log_path, "w")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE if serve else subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.PIPE, text=True, errors="replace",
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.events: queue.Queue = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            if line.startswith(PROGRESS_PREFIX):
                self.report(f"{self.phase}: {line[len(PROGRESS_PREFIX):].rstrip()}")
            elif line.startswith(EVENT_PREFIX):
                self.events.put(json.loads(line[len(EVENT_PREFIX):]))
            else:
                self.log.write(line)
        self.events.put(None)  # the worker closed stderr: it has exited (or is exiting)

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the worker so far (all its threads), from procfs."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def send(self, command: str) -> None:
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as e:
            raise WorkerFailed(f"the {self.phase} process no longer takes commands ({e})")

    def wait_event(self, name: str, timeout: float, doing: str) -> dict:
        """The worker's next event, which must be ``name``; WorkerFailed otherwise."""
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise WorkerFailed(f"timed out after {timeout:.0f} s {doing}") from None
        if event is None:
            raise WorkerFailed(f"the {self.phase} process ended {doing}")
        if event.get("event") != name:
            raise WorkerFailed(f"expected the event {name!r} {doing}, got {event!r}")
        return event

    def result(self, timeout: float) -> dict:
        """Lets the worker finish (end of commands) and returns what it wrote, or a failure
        record; kills it if it takes longer than ``timeout`` seconds."""
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self.reader.join(timeout)
        if self.reader.is_alive():
            self.kill()
            self.reader.join()
            return self.end(f"timed out after {timeout:.0f} s")
        return self.end()

    def end(self, failed: str | None = None) -> dict:
        """Waits for the worker to exit (kills it first if ``failed`` says why the driver gives
        up on it) and returns its result: what it wrote (a worker that raised writes its
        error), else a failure record with that reason or the exit code."""
        if failed is not None:
            self.kill()
        code = self.proc.wait()
        self.reader.join()
        self.log.close()
        self.seconds = time.perf_counter() - self.t0
        if self.result_path.is_file():
            result = json.loads(self.result_path.read_text())
            if failed is not None and result.get("status") == "ok":
                result = {"status": "failed", "error": failed}
        else:
            what = failed or f"the {self.phase} process exited with code {code} and wrote no " \
                             "results"
            result = {"status": "failed", "error": f"{what}; last log lines: "
                                                   f"{tail(self.log_path)}"}
        if result["status"] != "ok":
            self.report(f"{self.phase} FAILED: {result.get('error')} (log: {self.log_path})")
        else:
            self.report(f"{self.phase} done in {self.seconds:.0f} s")
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


def tail(path, lines=3):
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"
