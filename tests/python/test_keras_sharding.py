"""fp8xla.keras under keras.distribution.ModelParallel: a tiny Gemma3 (4 query heads, 2 or 1
KV heads) on 2 CPU devices, batch 1 x model 2, gives the single-device FP8 tokens. Runs in a
subprocess with JAX_NUM_CPU_DEVICES=2 (keras_sharding_worker.py holds the checks)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
pytest.importorskip("keras_hub")
WORKER = Path(__file__).with_name("keras_sharding_worker.py")


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_model_parallel_tokens_equal_single_device(kv_heads):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu", KERAS_BACKEND="jax")
    p = subprocess.run([sys.executable, str(WORKER), str(kv_heads)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    assert f"ok {kv_heads}" in p.stdout


def _axes(layout, path):
    return tuple(layout[path].axes)


@pytest.mark.parametrize("kv_heads,inter,vocab", [(1, 64, 256), (2, 64, 256), (4, 63, 255)])
def test_layout_map_replicates_what_the_axis_does_not_divide(kv_heads, inter, vocab):
    import keras
    import numpy as np
    from fp8xla.keras import gemma3_layout_map

    # The layout map reads only the mesh's shape and names (no device is touched).
    mesh = keras.distribution.DeviceMesh((1, 2), ("batch", "model"),
                                         np.array(["cpu:0", "cpu:1"]).reshape(1, 2))
    config = {"num_query_heads": 4, "num_key_value_heads": kv_heads,
              "intermediate_dim": inter, "vocabulary_size": vocab}
    layout = gemma3_layout_map(mesh, config)
    block = "decoder_block_3/attention/"
    assert _axes(layout, block + "query/kernel") == ("model", None, None)
    assert _axes(layout, block + "attention_output/kernel") == ("model", None, None)
    kv = ("model", None, None) if kv_heads % 2 == 0 else (None, None, None)
    assert _axes(layout, block + "key/kernel") == kv
    assert _axes(layout, block + "value/kernel") == kv
    mlp = inter % 2 == 0
    assert _axes(layout, "decoder_block_0/ffw_gating/kernel") == (
        (None, "model") if mlp else (None, None))
    assert _axes(layout, "decoder_block_0/ffw_linear/kernel") == (
        ("model", None) if mlp else (None, None))
    assert _axes(layout, "token_embedding/embeddings") == (
        ("model", None) if vocab % 2 == 0 else (None, None))
    assert layout["decoder_block_0/pre_ffw_norm/scale"] is None
    with pytest.raises(ValueError, match="no axis 'tensor'"):
        gemma3_layout_map(mesh, config, model_dim="tensor")
    with pytest.raises(ValueError, match="lacks 'num_query_heads'"):
        gemma3_layout_map(mesh, {})


def test_real_gemma3_270m_under_model_parallel_quantizes_and_generates():
    import importlib.util

    from fp8xla import models

    if (importlib.util.find_spec(models._GEMMA3_270M_MODULE) is None
            or os.environ.get("FP8XLA_SKIP_REAL_MODEL") == "1"):
        pytest.skip(f"needs the {models.GEMMA3_270M_PACKAGE} package "
                    "(or FP8XLA_SKIP_REAL_MODEL=1)")
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu", KERAS_BACKEND="jax")
    p = subprocess.run([sys.executable, str(WORKER.with_name("real_sharding_worker.py"))],
                       env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    assert "ok real" in p.stdout
