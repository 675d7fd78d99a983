"""The library's list of custom-call targets is what the Python side registers and allows, and
the C header declares exactly what the library exports.

In a fresh process: importing fp8xla registers every target, XLA's metadata handshake succeeds
(the CPU backend starts), and the elementwise targets run."""
import ctypes
import ctypes.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp8xla
from fp8xla import _library, graph

HEADER = os.path.join(os.path.dirname(__file__), "..", "..", "include", "fp8xla.h")

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
    print("targets:", ",".join(_library.targets()), "backend:", jax.default_backend())
    """
)

# Records every name registered with XLA, then imports fp8xla (which registers its targets).
SPY = textwrap.dedent(
    """
    import json, jax.ffi
    registered = []
    real = jax.ffi.register_ffi_target
    def spy(name, *args, **kwargs):
        registered.append((name, kwargs.get("platform", args[1] if len(args) > 1 else None)))
        return real(name, *args, **kwargs)
    jax.ffi.register_ffi_target = spy
    import fp8xla
    print(json.dumps(registered))
    """
)


def header_text() -> str:
    with open(HEADER) as f:
        return re.sub(r"/\*.*?\*/", "", f.read(), flags=re.S)


def header_functions() -> set[str]:
    return set(re.findall(r"\b(fp8xla_\w+)\s*\(", header_text()))


def header_handlers() -> set[str]:
    """Names the header declares as XLA FFI handlers: `XLA_FFI_Error* f(XLA_FFI_CallFrame*)`."""
    return set(re.findall(
        r"struct\s+XLA_FFI_Error\s*\*\s*(fp8xla_\w+)\s*\(\s*struct\s+XLA_FFI_CallFrame\s*\*"
        r"\s*\w*\s*\)", header_text()))


def library_targets() -> list[str]:
    """The target list as the library returns it, read here without the package's help."""
    lib = ctypes.CDLL(_library.library_path())
    lib.fp8xla_targets.restype = ctypes.c_char_p
    lib.fp8xla_targets.argtypes = []
    text = lib.fp8xla_targets().decode()
    assert text.endswith("\n"), f"fp8xla_targets(): each name must end with a newline: {text!r}"
    return text.splitlines()


def test_library_lists_exactly_the_handlers_the_header_declares():
    targets = library_targets()
    assert len(targets) == len(set(targets)), targets
    assert set(targets) == header_handlers()
    # The list the package uses is the library's, in its order.
    assert _library.targets() == tuple(targets)


def test_fresh_process_registers_and_runs_every_target():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr
    assert "backend: cpu" in r.stdout
    listed = r.stdout.split("targets: ")[1].split(" backend:")[0].split(",")
    assert sorted(listed) == sorted(header_handlers())


def test_import_registers_exactly_the_librarys_targets_for_cpu():
    r = subprocess.run([sys.executable, "-c", SPY], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr
    registered = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(name for name, _ in registered) == sorted(library_targets())
    assert {platform for _, platform in registered} == {"cpu"}


@pytest.mark.parametrize("target", library_targets())
def test_each_target_reaches_its_handler(target):
    # Called with nothing it accepts: the handler itself must answer (its errors start with the
    # target's name); an unregistered target would fail in XLA's compiler instead.
    out = jax.ShapeDtypeStruct((1,), jnp.int8)
    with pytest.raises(jax.errors.JaxRuntimeError, match=rf"\b{target}: "):
        jax.block_until_ready(jax.ffi.ffi_call(target, out)(np.zeros(1, np.int8)))


def test_an_unregistered_target_fails_otherwise():
    # The control for the test above: its match must not hold for a name nobody registered.
    target = "fp8xla_not_a_target"
    out = jax.ShapeDtypeStruct((1,), jnp.int8)
    with pytest.raises(Exception) as e:
        jax.block_until_ready(jax.ffi.ffi_call(target, out)(np.zeros(1, np.int8)))
    assert not re.search(rf"\b{target}: ", str(e.value)), str(e.value)


def test_rewritten_modules_allow_exactly_the_librarys_targets():
    exp = jax.export.export(jax.jit(lambda x: x + 1), platforms=["cpu"])(
        jax.ShapeDtypeStruct((2,), jnp.float32))
    rewritten = graph.with_module(exp, graph.module_text(exp))
    allowed = [c.is_custom_call() for c in rewritten.disabled_safety_checks]
    assert None not in allowed
    assert sorted(allowed) == sorted(library_targets())


def test_header_declares_exactly_the_symbols_the_library_exports():
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("needs binutils' nm to list the library's dynamic symbols")
    r = subprocess.run([nm, "-D", "--defined-only", fp8xla.library_path()],
                       capture_output=True, text=True, check=True)
    exported = {line.split()[-1] for line in r.stdout.splitlines()
                if line.split()[-1].startswith("fp8xla_")}
    assert exported == header_functions(), (
        f"exported, not declared: {sorted(exported - header_functions())}; "
        f"declared, not exported: {sorted(header_functions() - exported)}")
    assert set(library_targets()) <= exported


def test_a_library_without_the_target_list_is_refused_clearly():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))  # loads, but exports no fp8xla_targets
    with pytest.raises(ImportError, match=r"fp8xla: the library /opt/old/libfp8xla\.so does "
                                          r"not export fp8xla_targets\(\)"):
        _library.read_targets(libc, "/opt/old/libfp8xla.so")
