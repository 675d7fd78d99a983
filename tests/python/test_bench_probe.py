"""The end-to-end benchmark's memory-limit column: the bandwidth probe (benches/e2e_bandwidth.py)
reads every byte of a known buffer and computes its rate right, and the bytes a decode step
reads (benches/e2e_traffic.py) are counted as documented, checked against counts made
independently from the tensors a model was built from."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benches"))

import e2e_bandwidth  # noqa: E402
import e2e_traffic  # noqa: E402


class FakeClock:
    """Returns the given instants one after the other."""

    def __init__(self, *instants):
        self.instants = list(instants)

    def __call__(self):
        return self.instants.pop(0)


# ---------------------------------------------------------------------------------------------
# the probe


@pytest.mark.parametrize("n, parts", [(10, 3), (7, 7), (3, 5), (0, 2), (1, 1), (1000003, 2)])
def test_split_covers_every_element_once(n, parts):
    ranges = e2e_bandwidth.split(n, parts)
    assert len(ranges) == parts
    covered = np.zeros(n, int)
    for lo, hi in ranges:
        assert 0 <= lo <= hi <= n
        covered[lo:hi] += 1
    assert np.all(covered == 1)
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("size, threads", [(12, 3), (1001, 2), (5, 4), (3, 8)])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_stream_read_reads_every_part_and_computes_the_rate(size, threads, where):
    # a unique maximum in turn at the start, middle and end of the buffer: the checksum finds
    # it only if the part that holds it was read
    rng = np.random.default_rng(size)
    buffer = rng.uniform(-1, 1, size).astype(np.float32)
    index = {"first": 0, "middle": size // 2, "last": size - 1}[where]
    buffer[index] = 7.5
    result = e2e_bandwidth.stream_read(buffer, threads, passes=2,
                                       clock=FakeClock(10.0, 12.0, 20.0, 24.0))
    assert result.checksum == float(np.max(buffer.astype(np.float64))) == 7.5
    assert result.bytes_per_pass == 4 * size
    assert result.pass_seconds == [2.0, 4.0]
    assert result.bytes_per_s == [4 * size / 2.0, 4 * size / 4.0]
    assert result.best_bytes_per_s == 4 * size / 2.0
    assert result.threads == threads and len(result.parts) == threads


def test_stream_read_times_with_the_real_clock():
    buffer = np.arange(1 << 16, dtype=np.float32)
    result = e2e_bandwidth.stream_read(buffer, threads=2, passes=3)
    assert len(result.pass_seconds) == 3 and all(s > 0 for s in result.pass_seconds)
    assert result.checksum == float((1 << 16) - 1)


@pytest.mark.parametrize("buffer, threads, passes, match", [
    (np.zeros(0, np.float32), 1, 1, "non-empty"),
    (np.zeros((2, 2), np.float32), 1, 1, "1-D"),
    (np.zeros(8, np.float32)[::2], 1, 1, "contiguous"),
    (np.zeros(4, np.float32), 0, 1, "threads"),
    (np.zeros(4, np.float32), 1, 0, "passes"),
])
def test_stream_read_rejects_bad_input(buffer, threads, passes, match):
    with pytest.raises(ValueError, match=f"stream_read.*{match}"):
        e2e_bandwidth.stream_read(buffer, threads, passes)


def test_filled_buffer_and_probe():
    buffer = e2e_bandwidth.filled_buffer(10, threads=3)  # rounded up to whole float32s
    assert buffer.dtype == np.float32 and buffer.size == 3
    assert buffer.tolist() == [0.0, 1.0, 2.0]
    big = e2e_bandwidth.filled_buffer((2**20 + 5) * 4, threads=2)
    assert big[2**20 - 1] == 2**20 - 1 and big[2**20] == 0 and big[-1] == 4
    out = e2e_bandwidth.probe(gib=1 / 256, threads=2, passes=2)
    assert out["bytes_per_pass"] == e2e_bandwidth.GIB // 256
    assert out["best_bytes_per_s"] == max(out["bytes_per_s"]) > 0
    assert out["bytes_per_s"] == [out["bytes_per_pass"] / s for s in out["pass_seconds"]]
    assert "2 threads, best of 2 passes" in out["method"]


# ---------------------------------------------------------------------------------------------
# bytes per decode step


def test_decode_bytes_per_token_and_share():
    # 18 layers x 2 x 1 kv head x 256 x 4 bytes = 36 KiB per position (Gemma 3 270M, float32)
    kv = e2e_traffic.kv_bytes_per_position(18, 1, 256, 4)
    assert kv == 36 * 1024
    d = e2e_traffic.decode_bytes_per_token(268_000_000, kv, prompt_tokens=512, new_tokens=128)
    assert d["mean_context"] == 576
    assert d["kv_cache"] == 576 * 36 * 1024
    assert d["total"] == 268_000_000 + 576 * 36 * 1024
    # 40 tokens/s x 0.25 GB per token over 20 GB/s: half the memory limit
    assert e2e_traffic.memory_limit_share(40.0, 0.25e9, 20e9) == pytest.approx(0.5)
    for missing in [(None, 1.0, 1.0), (1.0, None, 1.0), (1.0, 1.0, None), (1.0, 1.0, 0.0)]:
        assert e2e_traffic.memory_limit_share(*missing) is None
    assert e2e_traffic.kv_bytes_per_position(2, 3, 4, 2, value_dim=8) == 2 * 3 * (4 + 8) * 2


def _var(shape, dtype):
    return SimpleNamespace(shape=shape, dtype=dtype)


def test_keras_weight_bytes_counts_fp8_codes_instead_of_the_float_weights():
    emb, q, norm, other = (_var((100, 8), "float32"), _var((8, 16), "float32"),
                           _var((8,), "float32"), _var((3, 5), "int8"))
    model = SimpleNamespace(weights=[emb, q, norm, other], trainable_variables=[emb, q, norm])
    assert e2e_traffic.keras_weight_bytes(model) == (800 + 128 + 8) * 4 + 15
    # fp8xla: the embedding per tensor (one float32 scale), q per channel (16 scales)
    model.fp8 = SimpleNamespace(weights={
        0: SimpleNamespace(codes=np.zeros((100, 8), np.uint8), w_scale=np.float32(1.0)),
        1: SimpleNamespace(codes=np.zeros((8, 16), np.uint8), w_scale=np.ones(16, np.float32)),
    })
    assert e2e_traffic.keras_weight_bytes(model) == (800 + 4) + (128 + 64) + 8 * 4 + 15


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("keras_hub")
    gguf = pytest.importorskip("gguf")
    from test_models import TINY, write_tiny_gguf

    root = tmp_path_factory.mktemp("traffic")
    stored_q8 = write_tiny_gguf(root / "q8.gguf")
    stored_f32 = write_tiny_gguf(root / "f32.gguf", quantize=False)
    return SimpleNamespace(root=root, config=TINY, stored_q8=stored_q8, stored_f32=stored_f32,
                           reader=gguf.GGUFReader)


def test_gguf_bytes_are_the_stored_tensors(tiny):
    elements = sum(w.size for w in tiny.stored_f32.values())
    assert e2e_traffic.gguf_weight_bytes(tiny.reader(str(tiny.root / "f32.gguf"))) == 4 * elements
    # Q8_0: 32 elements in 34 bytes (32 int8 codes and an f16 scale); the norms stay F32
    expected = sum(w.size * 34 // 32 if w.ndim == 2 else 4 * w.size
                   for w in tiny.stored_q8.values())
    assert e2e_traffic.gguf_weight_bytes(tiny.reader(str(tiny.root / "q8.gguf"))) == expected
    c = tiny.config
    kv = e2e_traffic.gguf_kv_bytes_per_position(tiny.reader(str(tiny.root / "q8.gguf")), 2)
    assert kv == c["num_layers"] * 2 * c["kv_heads"] * c["head_dim"] * 2


def test_keras_bytes_of_the_float32_model(tiny):
    from fp8xla import models

    model = models.convert_gguf(models.read_gguf(tiny.root / "f32.gguf"))
    elements = sum(w.size for w in tiny.stored_f32.values())
    assert e2e_traffic.keras_weight_bytes(model) == 4 * elements
    c = tiny.config
    assert e2e_traffic.keras_kv_bytes_per_position(model) == \
        c["num_layers"] * 2 * c["kv_heads"] * c["head_dim"] * 4
