"""Two local processes (1 CPU device each, `jax.distributed` over a free port, gloo
collectives): an FP8 export made for 2 devices gives the single-process logits, and the
calibration of activation scales takes the maximum over both processes."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras_hub is imported
WORKER = Path(__file__).with_name("distributed_worker.py")
CALIBRATION_WORKER = Path(__file__).with_name("distributed_calibration_worker.py")
TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(argv, env):
    """Runs `python *argv PORT ID` for ID 0 and 1 (one CPU device each, a free port), killing
    both on a timeout or failure; asserts both succeed."""
    port = str(free_port())
    env1 = dict(env, JAX_NUM_CPU_DEVICES="1")
    procs = [subprocess.Popen([sys.executable, *argv, port, str(i)], env=env1,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    try:
        for q in procs:
            outs.append(q.communicate(timeout=TIMEOUT))
    finally:
        for q in procs:
            if q.poll() is None:
                q.kill()
                q.communicate()
    for q, (_, err) in zip(procs, outs):
        assert q.returncode == 0, err[-4000:]


def test_two_processes_give_the_single_process_logits(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, str(WORKER), "export", str(tmp_path)],
                       env=dict(env, JAX_NUM_CPU_DEVICES="2"), capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-4000:]
    run_two_processes([str(WORKER), "run", str(tmp_path)], env)
    want = np.load(tmp_path / "want.npy")
    for i in range(2):
        got = np.load(tmp_path / f"got{i}.npy")
        # One all-reduce changes the summation order of the row-parallel product only.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "got0.npy"), np.load(tmp_path / "got1.npy"))


def _first_block_qkv_amax(out, pid, tokens):
    """max |input| of the first decoder block's q/k/v projections over `tokens`, in float64:
    the scaled embedding rows through Gemma's RMS norm (x / sqrt(mean(x^2) + eps) * (1 +
    scale)); each row depends on its token only."""
    meta = json.loads((out / f"calib{pid}.json").read_text())
    emb = np.load(out / f"embeddings{pid}.npy").astype(np.float64)
    scale = np.load(out / f"norm{pid}.npy").astype(np.float64)
    x = emb[tokens] * np.float64(np.float32(np.sqrt(meta["hidden_dim"])))
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + meta["epsilon"]) * (1 + scale)
    return float(np.abs(x).max())


def test_calibration_takes_the_maximum_over_processes(tmp_path):
    """Two processes calibrate the same tiny Gemma3 on different prompts: both end with the
    activation scales of the maximum over both, checked for the first block's q/k/v against
    numpy and for every weight against each process's own maximum."""
    pytest.importorskip("keras_hub")
    env = dict(os.environ, JAX_PLATFORMS="cpu", KERAS_BACKEND="jax")
    run_two_processes([str(CALIBRATION_WORKER), str(tmp_path)], env)
    runs = [json.loads((tmp_path / f"calib{i}.json").read_text()) for i in range(2)]
    np.testing.assert_array_equal(np.load(tmp_path / "embeddings0.npy"),
                                  np.load(tmp_path / "embeddings1.npy"))
    fp8_max = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)   # 448
    ref = [_first_block_qkv_amax(tmp_path, i, runs[i]["fed_tokens"]) for i in range(2)]
    assert ref[0] != ref[1], "the two processes' data must give different ranges"
    qkv = [p for p in runs[0]["a_scale"]
           if p.startswith("decoder_block_0/") and p.split("/")[-2] in ("query", "key", "value")]
    assert len(qkv) == 3, sorted(runs[0]["a_scale"])
    for p in qkv:
        for i in range(2):   # what each process observed alone
            np.testing.assert_allclose(runs[i]["local_amax"][p], ref[i], rtol=1e-5)
            np.testing.assert_allclose(runs[i]["a_scale"][p], max(ref) / fp8_max, rtol=1e-5)
    assert runs[0]["a_scale"] == runs[1]["a_scale"]
    assert set(runs[0]["a_scale"]) == set(runs[0]["local_amax"])
    for p, a in runs[0]["a_scale"].items():
        both = max(runs[0]["local_amax"][p], runs[1]["local_amax"][p])
        np.testing.assert_allclose(a, both / fp8_max, rtol=1e-6, err_msg=p)
