"""fp8xla as a JAX plugin: registers fp8xla's XLA custom calls in any JAX process.

The package declares this module under the ``jax_plugins`` entry-point group (pyproject.toml).
JAX imports every such module and calls its ``initialize()`` when it sets up its backends (the
first computation), so a process that never imports fp8xla can still ``jax.export.deserialize``
and run a module that calls fp8xla's custom calls (an artifact of ``fp8xla.jax``, or any module
rewritten by fp8xla's passes). This is not a PJRT backend: it only registers custom-call
targets for the CPU platform. Importing this module imports ``fp8xla``, whose ``__init__``
loads the library; ``initialize()`` makes sure it is loaded.
"""
from . import _library


def initialize():
    """Called by JAX's plugin discovery: loads the library and registers its targets (once)."""
    _library.load()
