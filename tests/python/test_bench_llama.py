"""The llama.cpp contenders' plumbing (benches/e2e_llama.py and its parts of e2e_worker.py and
e2e.py) with fakes: no llama.cpp needed. Greedy decoding and its timing, logits for the
perplexity protocol, the saved token ids, the extra-buffer-types check and its fallback, the
skipped rows, and a note from preparation reaching the results, through the driver's rounds
with the bandwidth probe."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benches"))

import e2e  # noqa: E402
import e2e_contenders  # noqa: E402
import e2e_llama  # noqa: E402
import e2e_worker  # noqa: E402

VOCAB = 11


def next_token(t: int) -> int:
    return (3 * t + 1) % VOCAB


class FakeLlama:
    """llama_cpp.Llama's surface that e2e_llama uses, for a "model" whose next token after t
    is next_token(t); its logits hold that maximum twice (the greedy pick is the first)."""

    def __init__(self, n_ctx=64):
        self.n_ctx, self.evals, self.resets = n_ctx, [], 0
        self.tokens = []
        self.scores = np.zeros((n_ctx, VOCAB), np.float32)

    def reset(self):
        self.tokens, self.resets = [], self.resets + 1

    def eval(self, tokens):
        assert all(isinstance(t, int) for t in tokens)
        self.evals.append(list(tokens))
        for t in tokens:
            row = np.full(VOCAB, -1.0, np.float32)
            row[next_token(t)] = 5.0
            row[-1] = 5.0  # a tie at the last entry: greedy takes the first maximum
            self.scores[len(self.tokens)] = row
            self.tokens.append(t)

    def last_logits(self):
        return self.scores[len(self.tokens) - 1]


class FakeClock:
    def __init__(self, *instants):
        self.instants = list(instants)

    def __call__(self):
        return self.instants.pop(0)


def test_decode_is_greedy_and_times_only_the_steps():
    llm = FakeLlama()
    seconds, fed = e2e_llama.decode(llm, np.array([2, 5, 7], np.int32), 4,
                                    clock=FakeClock(100.0, 102.5),
                                    logits=lambda m: m.last_logits())
    assert seconds == 2.5
    expected, t = [], 7
    for _ in range(4):
        t = next_token(t)
        expected.append(t)
    assert fed == expected
    assert llm.evals == [[2, 5, 7]] + [[t] for t in expected]  # prompt once, then one token
    assert llm.resets == 1


def test_decode_picks_the_first_of_tied_logits():
    llm = FakeLlama()
    logits = np.zeros(VOCAB, np.float32)
    logits[[4, 9]] = 3.0
    _, fed = e2e_llama.decode(llm, [1], 2, clock=FakeClock(0.0, 1.0), logits=lambda m: logits)
    assert fed == [4, 4]


def test_llama_decode_bench_rates():
    out = {}
    settings = {"new_tokens": 8, "reps": 2}
    times = iter([0.5, 2.0, 4.0])  # warm-up, then two repetitions

    def decode(llm, prompt, n):
        assert n == 8 and list(prompt) == [2, 3]
        return next(times), [9] * n

    bench = e2e_worker.LlamaDecodeBench(None, [2, 3], settings, out, decode=decode)
    assert out["continuation_ids"] == [9] * 8
    assert bench.rep() == 4.0 and bench.rep() == 2.0
    bench.summarize()
    assert out["decode_tokens_per_s"]["values"] == [4.0, 2.0]
    assert out["decode_tokens_per_s"]["median"] == 3.0
    assert out["generate_seconds"]["values"] == [2.0, 4.0]


def test_logits_fn_scores_every_position_of_every_row():
    llm = FakeLlama(n_ctx=4)
    ids = np.array([[2, 3, 4, 5], [6, 7, 8, 9]], np.int32)
    logits = e2e_llama.logits_fn(llm)(ids, np.ones_like(ids))
    assert logits.shape == (2, 4, VOCAB) and logits.dtype == np.float32
    assert np.array_equal(logits.argmax(-1), np.vectorize(next_token)(ids))
    assert llm.resets == 2  # each row from an empty cache
    with pytest.raises(ValueError, match="padded"):
        e2e_llama.logits_fn(llm)(ids, np.array([[1, 1, 1, 0], [1, 1, 1, 1]]))


class FakeTokenizer:
    start_token_id = 2

    def tokenize(self, text):
        return [len(word) for word in text.split()]


def test_saved_tokenization_serves_the_same_ids_for_the_same_text(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("one three fifteen letters\n")
    e2e_llama.save_tokens(FakeTokenizer(), str(text), tmp_path / "tokens.npz")
    saved = e2e_llama.SavedTokenization(tmp_path / "tokens.npz")
    assert saved.start_token_id == 2
    assert saved.tokenize(text.read_text()).tolist() == [3, 5, 7, 7]
    with pytest.raises(ValueError, match="text differs"):
        saved.tokenize("another text")


def _completed(code, stderr=""):
    return subprocess.CompletedProcess([], code, "", stderr)


def test_extra_buffer_types_are_kept_when_the_test_prompt_runs():
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        return _completed(0)

    assert e2e_llama.check_extra_bufts("m.gguf", "t.npz", 32, 60, run=run) == (True, None)
    assert len(calls) == 1 and calls[0][-2:] == ["--extra-bufts", "1"]
    assert calls[0][1].endswith("e2e_llama.py") and calls[0][2] == "check"


def test_a_crash_with_extra_buffer_types_falls_back_and_says_so():
    calls = []

    def run(cmd, **kw):
        calls.append(cmd[-1])
        return _completed(-11, "ggml_backend_amx_mul_mat\n") if cmd[-1] == "1" else _completed(0)

    extra, note = e2e_llama.check_extra_bufts("m.gguf", "t.npz", 32, 60, run=run)
    assert calls == ["1", "0"] and extra is False
    assert note.startswith("use_extra_bufts=False: ")
    assert "died of SIGSEGV (ggml_backend_amx_mul_mat)" in note


def test_a_failure_either_way_is_an_error_naming_both():
    def run(cmd, **kw):
        return _completed(-6) if cmd[-1] == "1" else _completed(1, "Traceback\nOSError: bad file")

    with pytest.raises(RuntimeError, match=r"with its extra buffer types \(died of SIGABRT.*"
                                           r"without them \(exited with code 1 \(OSError: bad"):
        e2e_llama.check_extra_bufts("m.gguf", "t.npz", 32, 60, run=run)


def test_quantize_rejects_an_unknown_file_type(tmp_path):
    pytest.importorskip("llama_cpp")
    with pytest.raises(ValueError, match="unknown file type 'q2_z'"):
        e2e_llama.quantize(tmp_path / "a.gguf", tmp_path / "b.gguf", "q2_z")


def test_llama_contenders_and_why_they_would_not_run():
    q8, f32 = e2e_contenders.BY_KEY["llama-cpp-q8_0"], e2e_contenders.BY_KEY["llama-cpp-f32"]
    assert (q8.kind, q8.config, q8.requires) == ("llama-cpp", {"ftype": "q8_0"}, "llama_cpp")
    assert f32.config == {"ftype": "f32"} and set(e2e_llama.FTYPES) == {"q8_0", "f32"}
    absent = dataclasses.replace(q8, requires="fp8xla_no_such_module")
    assert absent.missing_requirement("gemma3_270m") == (
        "fp8xla_no_such_module is not installed (CMAKE_ARGS=\"-DGGML_NATIVE=ON "
        "-DLLAVA_BUILD=OFF\" pip install -r python_shim/requirements-llama.txt (builds llama.cpp "
        "from source))")
    present = dataclasses.replace(q8, requires=None)
    assert present.missing_requirement("gemma3_270m") is None
    assert present.missing_requirement("/some/preset") == (
        "llama.cpp runs the GGUF of the default model gemma3_270m only, not /some/preset")
    # the Keras contenders run on any Gemma 3 preset
    assert e2e_contenders.BY_KEY["float32"].missing_requirement("/some/preset") is None


def test_llama_is_in_the_default_contenders_after_float32():
    args = e2e.parse_args([])
    keys = [c.key for c in args.contenders]
    assert keys[0] == "float32" and {"llama-cpp-q8_0", "llama-cpp-f32"} <= set(keys)


# ---------------------------------------------------------------------------------------------
# the driver's rounds with fake workers


class FakeWorker:
    """A worker process that answers at once (e2e_process.WorkerProcess's surface)."""

    log = []

    def __init__(self, phase, contender, settings, work, report, serve=False):
        self.key = contender.key
        FakeWorker.log.append(("start", self.key))

    def wait_event(self, name, timeout, doing):
        return {"event": name}

    def send(self, command):
        FakeWorker.log.append((command, self.key))

    def cpu_seconds(self):
        return 0.0

    def result(self, timeout):
        return {"status": "ok", "decode_tokens_per_s": {"median": 10.0}}

    def end(self, failed=None):
        return {"status": "failed", "error": failed}

    def kill(self):
        pass


class Lines:
    def __init__(self):
        self.lines = []

    def __call__(self, index, label, msg):
        self.lines.append(f"({index}) {label} | {msg}")

    def note(self, msg):
        self.lines.append(msg)


def test_rounds_probe_bandwidth_and_carry_the_preparation_note(tmp_path, monkeypatch):
    prepared = {"llama-cpp-q8_0": {"status": "ok", "note": "use_extra_bufts=False: crashed"},
                "float32": {"status": "ok"}}
    monkeypatch.setattr(e2e, "run_worker", lambda phase, c, *a: prepared[c.key])
    monkeypatch.setattr(e2e, "WorkerProcess", FakeWorker)
    FakeWorker.log = []
    rates = iter([20e9, None, 30e9])  # the second probe fails
    probes = []

    def probe():
        probes.append(len([e for e in FakeWorker.log if e[0] == "decode"]))
        return next(rates)

    cs = [e2e_contenders.BY_KEY["float32"],
          dataclasses.replace(e2e_contenders.BY_KEY["llama-cpp-q8_0"], requires=None),
          dataclasses.replace(e2e_contenders.BY_KEY["llama-cpp-f32"],
                              requires="fp8xla_no_such_module")]
    settings = dataclasses.replace(e2e.Settings.quick(), reps=3)
    progress = Lines()
    entries = e2e.run_contenders(cs, settings, tmp_path, progress, timeout=5, probe=probe)
    assert [e["status"] for e in entries] == ["ok", "ok", "skipped"]
    assert entries[1]["note"] == "use_extra_bufts=False: crashed" and "note" not in entries[0]
    assert "requirements-llama.txt" in entries[2]["reason"]
    assert probes == [0, 2, 4]  # at the start of each round, before its repetitions
    decodes = [k for what, k in FakeWorker.log if what == "decode"]
    assert decodes == ["float32", "llama-cpp-q8_0"] * 3
    assert sum("memory bandwidth probe: failed" in line for line in progress.lines) == 1
    assert sum("memory bandwidth probe: 20.0 GB/s" in line for line in progress.lines) == 1


def test_bandwidth_probe_summary():
    results = iter([{"best_bytes_per_s": 3.0, "method": "m"}, RuntimeError("no memory"),
                    {"best_bytes_per_s": 1.0, "method": "m"},
                    {"best_bytes_per_s": 2.0, "method": "m"},
                    {"best_bytes_per_s": 10.0, "method": "m"}])

    def run():
        r = next(results)
        if isinstance(r, Exception):
            raise r
        return r

    probe = e2e.BandwidthProbe(1.0, 60, run=run)
    assert probe.summary() is None  # never run
    assert [probe() for _ in range(5)] == [3.0, None, 1.0, 2.0, 10.0]
    s = probe.summary()
    assert (s["median_bytes_per_s"], s["min_bytes_per_s"], s["max_bytes_per_s"]) == \
        (2.5, 1.0, 10.0)
    assert s["errors"] == ["RuntimeError: no memory"] and len(s["probes"]) == 4
    failed = e2e.BandwidthProbe(1.0, 60, run=lambda: 1 / 0)
    assert failed() is None
    assert failed.summary()["median_bytes_per_s"] is None


def test_the_bandwidth_probe_process(tmp_path):
    rate = e2e.BandwidthProbe(1 / 64, 300)()
    assert rate is not None and rate > 0
