"""The end-to-end benchmark's machinery (benches/e2e*.py): report writers, comparisons,
reporting of contenders that cannot run, the CLI's way to find it, and a quick run on a tiny
random Gemma 3. No timing is asserted: only that each measurement exists and is well formed."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benches"))

import e2e  # noqa: E402
import e2e_contenders  # noqa: E402
import e2e_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _measure(prefill, decode, peak_mib, ppl, bytes_per_token=None):
    def st(v):
        return {"median": v, "min": v * 0.9, "max": v * 1.1, "values": [v * 0.9, v, v * 1.1]}

    peak = peak_mib * 2**20
    return {"status": "ok", "prefill_tokens_per_s": st(prefill), "decode_tokens_per_s": st(decode),
            "perplexity": ppl, "memory": {"load": {"peak": peak // 2, "rss": peak // 4},
                                          "generate": {"peak": peak, "rss": peak // 2}},
            "decode_bytes_per_token": {"total": bytes_per_token}}


def _results(contenders):
    return {
        "schema": 1, "command": "fp8xla bench", "started": "2026-01-01T00:00:00+00:00",
        "wall_seconds": 60.0,
        "machine": {"cpu": "Test CPU", "cores": 2, "memory_gib": 8.0, "isa_flags": ["avx2"],
                    "fp8xla_kernels": "avx2"},
        "versions": {"fp8xla": "0.1.0"},
        "settings": dataclasses.asdict(e2e.Settings()),
        "load_average": {"start": [0.1, 0.2, 0.3], "end": [1.0, 0.5, 0.4]},
        "contenders": contenders,
    }


def _entry(key, status="ok", reason=None, measure=None):
    return {"key": key, "label": e2e_contenders.BY_KEY[key].label, "status": status,
            "reason": reason, "prepare": None, "measure": measure, "top1_agreement": None,
            "vs_float32": None, "load_average": {"before": [0.5, 0, 0], "after": [1.5, 0, 0]}}


@pytest.fixture
def synthetic(tmp_path):
    """float32, an fp8xla contender that meets only the prefill target, a skipped one and a
    failed one; predictions saved as the workers save them (3 of 4 agree)."""
    cs = [
        _entry("float32", measure=_measure(100.0, 10.0, 1000, 20.0, 1.2e9)),
        _entry("fp8xla-e4m3", measure=_measure(120.0, 20.0, 500, 21.0, 0.3e9)),
        _entry("inc-fp8", "skipped", "neural_compressor is not installed (pip install x)"),
        _entry("keras-int8", "failed", "RuntimeError: something broke"),
    ]
    for key, pred in (("float32", [[1, 2], [3, 4]]), ("fp8xla-e4m3", [[1, 2], [3, 5]])):
        (tmp_path / key).mkdir()
        np.save(tmp_path / key / "predictions.npy", np.asarray(pred, np.int32))
    results = _results(cs)
    results["bandwidth"] = {"median_bytes_per_s": 24e9, "min_bytes_per_s": 20e9,
                            "max_bytes_per_s": 25e9, "method": "m", "probes": [{}], "errors": []}
    e2e.compare(results, tmp_path)
    return results


def test_compare_memory_limit_share(synthetic):
    # decode tokens/s x bytes per token / bandwidth: 10 x 1.2 GB / 24 GB/s, 20 x 0.3 GB / 24
    shares = [c.get("memory_limit_share") for c in synthetic["contenders"]]
    assert shares[:2] == [pytest.approx(0.5), pytest.approx(0.25)]
    assert shares[2:] == [None, None]  # nothing is made up for what did not run
    del synthetic["bandwidth"]
    e2e.compare(synthetic, Path("/nonexistent"))
    assert synthetic["contenders"][0]["memory_limit_share"] is None


def test_compare_agreement_ratios_and_targets(synthetic):
    fp8 = synthetic["contenders"][1]
    assert fp8["top1_agreement"] == pytest.approx(0.75)
    assert fp8["vs_float32"] == pytest.approx({"prefill": 1.2, "decode": 2.0, "peak_rss": 0.5})
    assert synthetic["contenders"][0]["top1_agreement"] == 1.0
    for c in synthetic["contenders"][2:]:  # nothing is made up for what did not run
        assert c["vs_float32"] is None and c["top1_agreement"] is None
    (target,) = synthetic["targets"]
    assert target["key"] == "fp8xla-e4m3"
    met = {k: v["met"] for k, v in target["checks"].items()}
    assert met == {"decode": False, "prefill": True, "peak_rss": False}


def test_markdown_reports_every_contender_with_its_status(synthetic):
    md = e2e_report.markdown(synthetic)
    for c in synthetic["contenders"]:
        assert c["label"] in md
    assert "skipped: neural_compressor is not installed (pip install x)" in md
    assert "failed: RuntimeError: something broke" in md
    assert "1.20x / 2.00x / 0.50x" in md
    assert "75.0 %" in md
    assert "| 300 | 25 % |" in md and "| 1200 | 50 % |" in md  # MB per token, share
    assert "24.0 GB/s, median of 1 (20.0–25.0)" in md
    assert "2.00x: not met" in md and "1.20x: met" in md
    rows = [line for line in e2e_report.table(synthetic).splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(synthetic["contenders"])  # header + one per contender
    assert all(row.count("|") == rows[0].count("|") for row in rows)


def test_json_and_chart(synthetic, tmp_path):
    e2e_report.write_json(synthetic, tmp_path / "r.json")
    back = json.loads((tmp_path / "r.json").read_text())
    assert [c["status"] for c in back["contenders"]] == ["ok", "ok", "skipped", "failed"]
    e2e_report.write_chart(synthetic, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC


def test_chart_without_any_measurement(tmp_path):
    results = _results([_entry("inc-fp8", "skipped", "not installed")])
    e2e.compare(results, tmp_path)
    e2e_report.write_chart(results, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC
    assert "skipped: not installed" in e2e_report.markdown(results)


class _Lines:
    """A progress display that keeps its lines."""

    def __init__(self, lines):
        self.lines = lines

    def __call__(self, index, label, msg):
        self.note(f"({index}) {label} | {msg}")

    def note(self, msg):
        self.lines.append(msg)


def test_missing_requirement_is_a_reported_skip(tmp_path):
    c = e2e_contenders.Contender("inc-fp8", "needs a module", "inc",
                                 requires="fp8xla_no_such_module", install_hint="pip install it")
    lines = []
    progress = _Lines(lines)
    (entry,) = e2e.run_contenders([c], e2e.Settings.quick(), tmp_path, progress, timeout=60)
    assert entry["status"] == "skipped"
    assert "fp8xla_no_such_module is not installed (pip install it)" in entry["reason"]
    assert any("skipped" in line for line in lines)
    assert not (tmp_path / "inc-fp8").exists()  # no process was started


def test_unknown_contender_and_order():
    with pytest.raises(SystemExit):
        e2e.parse_args(["--contenders", "float32,nope"])
    args = e2e.parse_args(["--contenders", "keras-int8,float32"])
    assert [c.key for c in args.contenders] == ["float32", "keras-int8"]  # float32 first


def test_ppl_chunks_option_is_bounded_by_the_protocol():
    assert e2e.parse_args(["--ppl-chunks", "2"]).ppl_chunks == 2
    assert e2e.parse_args([]).ppl_chunks is None  # the whole protocol
    for bad in ("0", str(e2e.Settings.ppl_chunks + 1)):
        with pytest.raises(SystemExit):
            e2e.parse_args(["--ppl-chunks", bad])


def test_cli_finds_the_benchmark_in_the_checkout(tmp_path, monkeypatch, capsys):
    from fp8xla import cli

    assert cli.find_bench(REPO) == REPO / "benches" / "e2e.py"
    monkeypatch.chdir(REPO / "benches")  # from a subdirectory: looks in the parents
    assert cli.find_bench() == REPO / "benches" / "e2e.py"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="--repo"):
        cli.find_bench()
    assert cli.main(["bench", "--quick"]) == 2
    assert "runs from a checkout of the fp8xla repository" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# real runs on a tiny random Gemma 3 (a few worker processes)


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    pytest.importorskip("keras_hub")
    pytest.importorskip("gguf")
    from test_models import write_tiny_gguf

    from fp8xla import models

    root = tmp_path_factory.mktemp("bench")
    write_tiny_gguf(root / "tiny.gguf")
    model = models.convert_gguf(models.read_gguf(root / "tiny.gguf"))
    model.save_to_preset(str(root / "preset"))
    return root / "preset"


def test_quick_run_on_a_tiny_model(tiny_preset, tmp_path):
    # The installed CLI in a fresh process, from the checkout, as the README runs it.
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "fp8xla.cli", "bench", "--quick", "--reps", "2", "-m",
         str(tiny_preset), "--out", str(out), "--contenders", "float32,fp8xla-e4m3"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    progress = [line for line in run.stderr.splitlines() if line.startswith("[bench ")]
    # the decode repetitions run in rounds, one of each contender per round
    reps = [line.split("] ", 1)[1] for line in progress if "| measure: decode rep" in line
            and line.endswith(" s")]
    assert [r.rsplit(":", 1)[0] for r in reps] == [
        "(1/2) float32 Keras (XLA) | measure: decode rep 1/2",
        "(2/2) fp8xla e4m3 w+a | measure: decode rep 1/2",
        "(1/2) float32 Keras (XLA) | measure: decode rep 2/2",
        "(2/2) fp8xla e4m3 w+a | measure: decode rep 2/2",
    ], progress
    assert sum("decode round" in line for line in progress) == 2
    results = json.loads((out / "results.json").read_text())
    assert [c["key"] for c in results["contenders"]] == ["float32", "fp8xla-e4m3"]
    s = results["settings"]
    assert s["reps"] == 2
    # the bandwidth probe ran once per round, over the quick settings' buffer
    bw = results["bandwidth"]
    assert len(bw["probes"]) == 2 and not bw["errors"]
    assert all(p["bytes_per_pass"] == int(s["probe_gib"] * 2**30) for p in bw["probes"])
    assert bw["min_bytes_per_s"] <= bw["median_bytes_per_s"] <= bw["max_bytes_per_s"]
    # bytes per decode step: float32 holds every tensor of the GGUF as 4 bytes an element
    import gguf

    reader = gguf.GGUFReader(str(tiny_preset.parent / "tiny.gguf"))
    elements = sum(int(t.n_elements) for t in reader.tensors)
    f32, fp8 = (c["measure"]["decode_bytes_per_token"] for c in results["contenders"])
    assert f32["weights"] == 4 * elements
    assert 0 < fp8["weights"] < f32["weights"] / 2  # FP8 codes in place of the matrices
    for c in results["contenders"]:
        d = c["measure"]["decode_bytes_per_token"]
        assert d["mean_context"] == s["prompt_tokens"] + s["new_tokens"] / 2
        assert d["total"] == d["weights"] + d["kv_cache"]
        rate = c["measure"]["decode_tokens_per_s"]["median"]  # None: all rates NaN (noise)
        assert c["memory_limit_share"] == (None if rate is None else pytest.approx(
            rate * d["total"] / bw["median_bytes_per_s"]))
    for c in results["contenders"]:
        assert c["status"] == "ok", c["reason"]
        m = c["measure"]
        assert len(m["decode_tokens_per_s"]["values"]) == s["reps"]
        assert 0.0 <= c["other_cpu"] <= 1.0 and len(c["load_average"]["before"]) == 3
        assert m["prefill_tokens_per_s"]["median"] > 0
        assert m["num_predictions"] == s["ppl_chunks"] * s["ppl_chunk_tokens"]
        assert math.isfinite(m["perplexity"])
        mem = m["memory"]
        assert 0 < mem["baseline"]["rss"] <= mem["load"]["peak"]
        for phase in ("load", "generate", "score"):
            assert mem[phase]["rss"] <= mem[phase]["peak"]
        assert len(m["prefill_seconds"]["values"]) == s["ppl_chunks"]
        assert 0.0 <= c["top1_agreement"] <= 1.0
        assert len(m["continuation_ids"]) == s["new_tokens"]
    fp8 = results["contenders"][1]
    assert fp8["prepare"]["status"] == "ok" and fp8["prepare"]["preset_bytes"] > 0
    assert not (out / "work" / "fp8xla-e4m3" / "preset").exists()  # removed without --keep-work
    md = (out / "results.md").read_text()
    assert "float32 Keras (XLA)" in md and "fp8xla e4m3 w+a" in md
    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC


def test_a_contender_that_fails_is_reported(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    code = e2e.main(["--quick", "-m", str(tmp_path / "no-such-preset"), "--out", str(out),
                     "--contenders", "float32"])
    assert code == 1
    (c,) = json.loads((out / "results.json").read_text())["contenders"]
    assert c["status"] == "failed" and "no-such-preset" in c["reason"]
    assert "failed: " in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC
    assert "preparation failed" in c["reason"]  # float32's preparation loads the model
    assert os.path.isfile(out / "work" / "float32" / "prepare.log")


def test_a_worker_past_its_timeout_is_killed_and_reported(tmp_path):
    c = e2e_contenders.BY_KEY["float32"]
    lines = []
    result = e2e.run_worker("measure", c, e2e.Settings.quick(), tmp_path / "w", lines.append,
                            timeout=0.5)  # far less than importing JAX takes
    assert result["status"] == "failed"
    assert result["error"].startswith("timed out after")
    assert any("FAILED" in line for line in lines)


def test_a_serving_worker_that_fails_is_reported(tiny_preset, tmp_path):
    # A measuring worker that takes commands: an unknown one ends it with an error, which the
    # driver gets back as the contender's failure.
    from e2e_process import WorkerFailed, WorkerProcess

    lines = []
    settings = dataclasses.asdict(e2e.Settings.quick(model=str(tiny_preset)))
    worker = WorkerProcess("measure", e2e_contenders.BY_KEY["float32"], settings,
                           tmp_path / "w", lines.append, serve=True)
    worker.wait_event("ready", 300, "while loading")
    worker.send("decode")
    rate = worker.wait_event("rep", 300, "in a repetition")["tokens_per_s"]
    assert rate is None or rate > 0  # None: a NaN rate (a tiny model's decode time is noise)
    worker.send("no-such-command")
    with pytest.raises(WorkerFailed, match="ended in the next repetition"):
        worker.wait_event("rep", 300, "in the next repetition")
    result = worker.end(failed="it stopped")
    assert result["status"] == "failed"
    assert "unknown command 'no-such-command'" in result["error"]
    assert any("measure FAILED" in line for line in lines)


def test_reported_command_drops_only_the_local_options():
    argv = ["--contenders", "float32,fp8xla-e4m3", "--out", "somewhere/results", "--reps", "5",
            "--work=scratch", "--keep-work", "--timeout", "60", "-m", "gemma3_270m", "--quick"]
    assert e2e.reported_command(argv) == (
        "fp8xla bench --contenders float32,fp8xla-e4m3 --reps 5 -m gemma3_270m --quick")
    assert e2e.reported_command([]) == "fp8xla bench"
