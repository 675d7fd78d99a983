"""The end-to-end benchmark's generated documentation blocks (benches/e2e_report.py): the
headline table of README.md and the full report of docs/benchmarks.md, written between marker
comments from a results.json, on fake results; and the committed documents being exactly what
the writer makes of the committed benches/results/results.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benches"))

import e2e_report  # noqa: E402

MIB = 2**20


def _contender(key, label, prefill=None, decode=None, peak_mib=None, ppl=None, top1=None,
               vs=None, status="ok", reason=None):
    measure = None
    if status == "ok":
        measure = {
            "prefill_tokens_per_s": {"median": prefill, "min": prefill - 1, "max": prefill + 1},
            "decode_tokens_per_s": {"median": decode, "min": decode - 1, "max": decode + 1},
            "perplexity": ppl,
            "memory": {"load": {"peak": peak_mib * MIB // 2, "rss": 1},
                       "generate": {"peak": peak_mib * MIB, "rss": peak_mib * MIB // 2}},
        }
    return {"key": key, "label": label, "status": status, "reason": reason,
            "measure": measure, "top1_agreement": top1, "vs_float32": vs,
            "load_average": {"before": [0.5, 0, 0], "after": [1.5, 0, 0]}, "other_cpu": 0.01}


@pytest.fixture
def results():
    return {
        "command": "fp8xla bench", "started": "2026-01-02T03:04:05+00:00", "wall_seconds": 90.0,
        "machine": {"cpu": "Fake CPU", "cores": 4, "memory_gib": 16.0,
                    "isa_flags": ["avx2", "fma", "f16c"], "fp8xla_kernels": "avx2"},
        "versions": {"fp8xla": "0.1.0", "jax": "9.9.9", "keras": "8.8.8", "keras-hub": "7.7.7",
                     "numpy": "6.6.6"},
        "settings": {"model": "fake_model", "new_tokens": 16, "prompt_tokens": 32, "reps": 3,
                     "ppl_chunks": 2, "ppl_chunk_tokens": 31},
        "load_average": {"start": [0.1, 0.2, 0.3], "end": [1.0, 0.5, 0.4]},
        "contenders": [
            _contender("float32", "float32 Keras (XLA)", 100.0, 10.0, 1000, 20.0, 1.0,
                       {"prefill": 1.0, "decode": 1.0, "peak_rss": 1.0}),
            _contender("fp8xla-e4m3", "fp8xla e4m3 w+a", 125.0, 37.5, 300, 21.5, 0.875,
                       {"prefill": 1.25, "decode": 3.75, "peak_rss": 0.3}),
            _contender("inc-fp8", "INC FP8", status="skipped",
                       reason="neural_compressor is not installed"),
        ],
        "targets": [],
    }


def _docs(root: Path, readme_block="old headline", report_block="old report"):
    """A fake checkout: README.md and docs/benchmarks.md with their blocks and text around."""
    b = e2e_report.marker
    (root / "docs").mkdir()
    (root / "README.md").write_text(
        f"# Title\n\nBefore the table.\n\n{b('headline', False)}\n{readme_block}\n"
        f"{b('headline', True)}\n\n![chart](benches/results/results.png)\n\nAfter.\n")
    (root / "docs" / "benchmarks.md").write_text(
        f"# Method\n\nText.\n\n{b('report', False)}\n{report_block}\n{b('report', True)}\n")


def test_headline_has_every_contender_with_its_numbers(results):
    text = e2e_report.headline(results)
    assert "Fake CPU, 4 cores" in text and "avx2, fma, f16c" in text
    assert "jax 9.9.9, keras 8.8.8, keras-hub 7.7.7" in text
    assert "16 new tokens after a 32-token prompt, median of 3" in text
    assert "prefill: 32 tokens, median of 2 chunks" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 3  # header + one per contender
    assert all(row.count("|") == rows[0].count("|") for row in rows)
    assert rows[2] == ("| fp8xla e4m3 w+a | 125 | 37.5 | 300 | 1.25x / 3.75x / 0.30x | 21.500 "
                       "| 87.5 % |")
    assert rows[3] == ("| INC FP8 (skipped: neural_compressor is not installed) | – | – | – | – "
                       "| – | – |")


def test_update_docs_replaces_only_the_blocks(tmp_path, results):
    _docs(tmp_path)
    readme_before = (tmp_path / "README.md").read_text()
    written = e2e_report.update_docs(results, tmp_path)
    assert sorted(written) == sorted([tmp_path / "README.md", tmp_path / "docs/benchmarks.md"])
    readme = (tmp_path / "README.md").read_text()
    report = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "old headline" not in readme and "old report" not in report
    assert "| fp8xla e4m3 w+a | 125 | 37.5 |" in readme
    assert "2026-01-02T03:04:05+00:00" in report and "fp8xla e4m3 w+a | 125 (124–126)" in report
    # the text around each block is kept as it was
    head, tail = readme_before.split("old headline")
    assert readme.startswith(head) and readme.endswith(tail)
    assert report.startswith("# Method\n\nText.\n\n") and report.endswith(
        e2e_report.marker("report", True) + "\n")
    # a second run replaces the block instead of adding to it
    e2e_report.update_docs(results, tmp_path)
    assert (tmp_path / "README.md").read_text() == readme
    assert readme.count("| fp8xla e4m3 w+a |") == 1


@pytest.mark.parametrize("doc, block", [("README.md", "headline"),
                                        ("docs/benchmarks.md", "report")], ids=["README", "docs"])
@pytest.mark.parametrize("bad_text", [
    "# Title\n\nno markers\n",
    "{begin}\nx\n{end}\n{begin}\ny\n{end}\n",  # two blocks of the same name
    "{end}\nx\n{begin}\n",  # end before begin
], ids=["no markers", "two blocks", "end before begin"])
def test_bad_markers_are_named_and_nothing_is_written(tmp_path, results, doc, block, bad_text):
    _docs(tmp_path)
    (tmp_path / doc).write_text(bad_text.format(begin=e2e_report.marker(block, False),
                                                end=e2e_report.marker(block, True)))
    before = {p: p.read_text() for p in (tmp_path / "README.md", tmp_path / "docs/benchmarks.md")}
    with pytest.raises(ValueError, match=rf"{doc}: .*generated by fp8xla bench: {block}"):
        e2e_report.update_docs(results, tmp_path)
    assert {p: p.read_text() for p in before} == before  # the other document untouched too


def test_missing_document_is_named(tmp_path, results):
    _docs(tmp_path)
    (tmp_path / "docs" / "benchmarks.md").unlink()
    with pytest.raises(FileNotFoundError, match=r"benchmarks\.md does not exist.*'report'"):
        e2e_report.update_docs(results, tmp_path)


def test_committed_reports_are_generated_from_the_committed_results():
    # README.md, docs/benchmarks.md and benches/results/results.md hold what the writer makes
    # of benches/results/results.json: a hand edit of a generated table fails here.
    results = json.loads((REPO / "benches" / "results" / "results.json").read_text())
    for rel, name, write in e2e_report.DOCUMENTS:
        text = (REPO / rel).read_text()
        assert e2e_report.replace_block(text, name, write(results), rel) == text, rel
    assert (REPO / "benches" / "results" / "results.md").read_text() == \
        e2e_report.markdown(results)
