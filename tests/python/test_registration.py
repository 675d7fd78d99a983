"""In a fresh process: importing fp8xla registers every target, XLA's metadata handshake
succeeds (the CPU backend starts), and every target runs."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    import fp8xla
    from fp8xla import _library, ops
    x = jnp.arange(-8, 8, dtype=jnp.float32) / 3
    q = jax.jit(lambda v: ops.quantize(v, 0.5))(x)
    d = jax.jit(lambda v: ops.dequantize(v, 0.5))(q)
    y = jax.jit(lambda v: ops.qdq(v, 0.5, "e5m2"))(x)
    o = jax.jit(lambda v: ops.observe(v, 7))(x)
    jax.block_until_ready((q, d, y, o))
    assert q.dtype == jnp.float8_e4m3fn
    assert float(jnp.abs(d - x).max()) < 0.1
    assert ops.observer_stats()[7].amax == float(jnp.abs(x).max())
    print("targets:", ",".join(_library.TARGETS), "backend:", jax.default_backend())
    """
)


def test_fresh_process_registers_and_runs_every_target():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr
    assert "backend: cpu" in r.stdout
    for t in ("fp8xla_quantize", "fp8xla_dequantize", "fp8xla_qdq", "fp8xla_observe"):
        assert t in r.stdout
