"""FP8 calls under JAX sharding, on 2 CPU devices in one process: each case runs in a
subprocess with JAX_NUM_CPU_DEVICES=2 (the device count is fixed when JAX starts); the
checks are in sharding_worker.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("sharding_worker.py")
CASES = [
    "matmul_replicated", "matmul_n", "matmul_k",
    "quantize_replicated", "quantize_megatron",
    "dot_f32_replicated", "dot_f32_heads", "dot_f32_n", "dot_f32_k", "update_slice_heads",
    "take_replicated", "take_vocab", "take_embed",
    "elementwise", "sharded_fp8_matmul",
    "not_divisible",
]


@pytest.mark.parametrize("case", CASES)
def test_two_devices(case):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, str(WORKER), case], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    assert f"ok {case}" in p.stdout
