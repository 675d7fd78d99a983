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
               vs=None, status="ok", reason=None, bytes_per_token=None, share=None, note=None):
    measure = None
    if status == "ok":
        measure = {
            "prefill_tokens_per_s": {"median": prefill, "min": prefill - 1, "max": prefill + 1},
            "decode_tokens_per_s": {"median": decode, "min": decode - 1, "max": decode + 1},
            "perplexity": ppl,
            "memory": {"load": {"peak": peak_mib * MIB // 2, "rss": 1},
                       "generate": {"peak": peak_mib * MIB, "rss": peak_mib * MIB // 2}},
            "decode_bytes_per_token": {"total": bytes_per_token},
        }
    entry = {"key": key, "label": label, "status": status, "reason": reason,
             "measure": measure, "top1_agreement": top1, "vs_float32": vs,
             "load_average": {"before": [0.5, 0, 0], "after": [1.5, 0, 0]}, "other_cpu": 0.01,
             "memory_limit_share": share}
    if note:
        entry["note"] = note
    return entry


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
        "bandwidth": {"median_bytes_per_s": 20e9, "min_bytes_per_s": 18e9,
                      "max_bytes_per_s": 21e9, "method": "numpy.max over 1 GiB",
                      "probes": [{}, {}, {}], "errors": []},
        "contenders": [
            _contender("float32", "float32 Keras (XLA)", 100.0, 10.0, 1000, 20.0, 1.0,
                       {"prefill": 1.0, "decode": 1.0, "peak_rss": 1.0}, bytes_per_token=1.1e9,
                       share=0.55),
            _contender("fp8xla-e4m3", "fp8xla e4m3 w+a", 125.0, 37.5, 300, 21.5, 0.875,
                       {"prefill": 1.25, "decode": 3.75, "peak_rss": 0.3},
                       bytes_per_token=0.3e9, share=0.5625),
            _contender("inc-fp8", "INC FP8", status="skipped",
                       reason="neural_compressor is not installed"),
            _contender("llama-cpp-q8_0", "llama.cpp Q8_0", 110.0, 30.0, 400, 20.5, 0.9,
                       {"prefill": 1.1, "decode": 3.0, "peak_rss": 0.4}, bytes_per_token=0.3e9,
                       share=0.45, note="use_extra_bufts=False: a test prompt died of SIGSEGV"),
            _contender("llama-cpp-f32", "llama.cpp F32", status="skipped",
                       reason="llama_cpp is not installed (pip install it)"),
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
    assert "bytes read per token / 20.0 GB/s" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 5  # header + one per contender
    assert all(row.count("|") == rows[0].count("|") for row in rows)
    assert rows[0].endswith("| top-1 agreement | decode / memory limit |")
    assert rows[2] == ("| fp8xla e4m3 w+a | 125 | 37.5 | 300 | 1.25x / 3.75x / 0.30x | 21.500 "
                       "| 87.5 % | 56 % |")
    assert rows[3] == ("| INC FP8 (skipped: neural_compressor is not installed) | – | – | – | – "
                       "| – | – | – |")
    # a contender that runs another way than by default says so next to its name
    assert rows[4] == ("| llama.cpp Q8_0 (use_extra_bufts=False: a test prompt died of SIGSEGV) "
                       "| 110 | 30.0 | 400 | 1.10x / 3.00x / 0.40x | 20.500 | 90.0 % | 45 % |")
    assert rows[5].startswith("| llama.cpp F32 (skipped: llama_cpp is not installed "
                              "(pip install it)) | – | – |")


def test_report_has_the_bandwidth_and_bytes_per_token(results):
    text = e2e_report.markdown(results)
    assert ("Memory bandwidth probe (numpy.max over 1 GiB, once per decode round): 20.0 GB/s, "
            "median of 3 (18.0–21.0)") in text
    assert "(32 + 16/2 positions" in text
    rows = [line for line in e2e_report.table(results).splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 5 and all(r.count("|") == rows[0].count("|") for r in rows)
    head = [h.strip() for h in rows[0].split("|")[1:-1]]
    cells = {r.split("|")[1].strip(): [x.strip() for x in r.split("|")[1:-1]] for r in rows[1:]}
    col = head.index("MB read per token"), head.index("decode / memory limit")
    assert [cells["fp8xla e4m3 w+a"][i] for i in col] == ["300", "56 %"]
    assert [cells["float32 Keras (XLA)"][i] for i in col] == ["1100", "55 %"]
    assert [cells["INC FP8"][i] for i in col] == ["–", "–"]
    status = cells["llama.cpp Q8_0"][head.index("status")]
    assert status == "ok (use_extra_bufts=False: a test prompt died of SIGSEGV)"


def test_report_without_a_bandwidth_says_why(results):
    results["bandwidth"] = {"median_bytes_per_s": None, "probes": [],
                            "errors": ["RuntimeError: out of memory"]}
    assert "Memory bandwidth probe: no result (RuntimeError: out of memory)" in \
        e2e_report.markdown(results)
    del results["bandwidth"]  # results of a run before the probe existed
    assert "Memory bandwidth probe: no result (not run)" in e2e_report.markdown(results)
    assert "Memory limit" not in e2e_report.headline(results)


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
