"""An FP8 export made for 2 devices runs on 2 local processes (1 CPU device each,
`jax.distributed` over a free port, gloo collectives) and gives the single-process logits."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_single_process_logits(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, str(WORKER), "export", str(tmp_path)],
                       env=dict(env, JAX_NUM_CPU_DEVICES="2"), capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-4000:]
    port = str(free_port())
    env1 = dict(env, JAX_NUM_CPU_DEVICES="1")
    procs = [subprocess.Popen([sys.executable, str(WORKER), "run", str(tmp_path), port, str(i)],
                              env=env1, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
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
    want = np.load(tmp_path / "want.npy")
    for i in range(2):
        got = np.load(tmp_path / f"got{i}.npy")
        # One all-reduce changes the summation order of the row-parallel product only.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "got0.npy"), np.load(tmp_path / "got1.npy"))
