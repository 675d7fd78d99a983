"""FP8 graph rewrite of exported JAX functions.

``jax.export`` gives the StableHLO of a jitted function whose weights are arguments; the Rust
passes (`instrument`, `quantize`) rewrite that text, and this module turns the result back into
a ``jax.export.Exported`` that runs under ``jax.jit`` and serializes like any other export.

    exp = jax.export.export(jax.jit(f), platforms=["cpu"])(*specs)
    scales = calibrate(exp, weights=[1, 3], batches=[args0, args1])   # {site: amax}
    q = quantize_exported(exp, options)        # weights become FP8 arguments
    y = q.call(*args_with_fp8_weights)
"""
from __future__ import annotations

import ctypes
import dataclasses
import json

import jax
import jax.extend.mlir

from . import _library, ops

class RewriteError(ValueError):
    """A rewrite pass refused the module or its options (the message says where and why)."""


def module_text(exp: jax.export.Exported) -> str:
    """The exported module in MLIR's generic op form with locations (what the passes read)."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir

    with jax_mlir.make_ir_context():
        module = ir.Module.parse(exp.mlir_module())
        return module.operation.get_asm(enable_debug_info=True, print_generic_op_form=True)


def run_pass(name: str, text: str, options: dict) -> tuple[str, dict]:
    """Runs rewrite pass `name` on module text with `options` (a JSON-able dict).

    Returns ``(rewritten module text, report dict)``; raises `RewriteError` naming the pass,
    the option or place, what was expected and what came. The passes (the library's
    ``rewrite::PASSES``):

    - ``"quantize"``: FP8 weights (options ``{"weights": [...], ...}``, see
      `quantize_exported`); runs the quantize passes, then ``update_slices_in_place``,
      ``decode_dots`` and ``sampler_argmax`` unless its options turn them off;
    - ``"instrument"``: ``fp8xla_observe`` on every weight matmul's activation (see
      `instrument_exported`);
    - ``"update_slices_in_place"``: a ``dynamic_update_slice`` of a loop-carried value in a
      ``while`` body becomes the in-place ``fp8xla_update_slice`` (options ``{}``);
    - ``"decode_dots"``: float32 ``dot_general``s of at most 4 rows with a large operand
      become ``fp8xla_dot_f32`` (options ``{"min_bytes": 65536}``, optional);
    - ``"sampler_argmax"``: ``jnp.argmax(x, axis=-1)`` over a last dim of at least 16384
      (a greedy sampler's argmax over the vocabulary) becomes the multi-threaded
      ``fp8xla_argmax`` (options ``{"min_size": 16384}``, optional);
    - ``"shard_calls"``: fp8xla calls on operands sharded over the module's mesh become
      ``sdy.manual_computation``s, one shard per device (options ``{"entry": "main"}``,
      optional; ``quantize`` runs it last unless ``"shard_calls": False``; see
      docs/sharding.md).

    Every pass's result is checked for consistent types, and an error names the pass that
    broke it. Run alone, a pass reports ``{"pass": name, "handled": [...]}``; wrap the text
    with `with_module` to run it."""
    lib = _library.load()
    out_module = ctypes.c_void_p()
    out_report = ctypes.c_void_p()
    rc = lib.fp8xla_rewrite(
        name.encode(), text.encode(), json.dumps(options).encode(),
        ctypes.byref(out_module), ctypes.byref(out_report),
    )
    try:
        report = ctypes.string_at(out_report.value).decode() if out_report.value else ""
        module = ctypes.string_at(out_module.value).decode() if out_module.value else ""
    finally:
        lib.fp8xla_free_string(out_module)
        lib.fp8xla_free_string(out_report)
    if rc != 0:
        raise RewriteError(f"fp8xla {name} pass: {report}")
    return module, json.loads(report)


def _serialize(text: str) -> bytes:
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import hlo

    target = hlo.get_version_from_compatibility_requirement(
        hlo.StablehloCompatibilityRequirement.WEEK_4)
    with jax_mlir.make_ir_context():
        module = ir.Module.parse(text)
        return jax.extend.mlir.serialize_portable_artifact(module, target)


def with_module(exp: jax.export.Exported, text: str, in_avals=None) -> jax.export.Exported:
    """`exp` with its module replaced by `text` (and its input avals by `in_avals`). The
    module may call any of the library's custom-call targets: their safety checks are
    disabled."""
    checks = tuple(exp.disabled_safety_checks) + tuple(
        jax.export.DisabledSafetyCheck.custom_call(t) for t in _library.targets())
    return dataclasses.replace(
        exp,
        mlir_module_serialized=_serialize(text),
        in_avals=tuple(in_avals) if in_avals is not None else exp.in_avals,
        disabled_safety_checks=checks,
    )


def instrument_exported(exp, weights=None, args=None):
    """Inserts `fp8xla_observe` before the activation of every matmul on a weight argument.

    Returns ``(instrumented Exported, sites table)``; running the instrumented export records
    max|activation| per site (read with ``fp8xla.ops.observer_stats()``)."""
    options = {}
    if weights is not None:
        options["weights"] = [int(w) for w in weights]
    if args is not None:
        options["args"] = args
    text, sites = run_pass("instrument", module_text(exp), options)
    if "\"sdy.mesh\"" in text:
        # Under sharding the observers run once per device on the whole activation (XLA
        # cannot replicate a side effect by itself).
        text, _ = run_pass("shard_calls", text, {})
    return with_module(exp, text), sites


def calibrate(exp, batches, weights=None, args=None):
    """Runs the instrumented export on every batch (a tuple of flat arguments each, or a
    callable taking the instrumented ``Exported``) and returns ``({site: SiteStat}, sites)``."""
    inst, sites = instrument_exported(exp, weights, args)
    ops.reset_observer()
    run = jax.jit(inst.call)
    if callable(batches):
        batches(inst)
    else:
        for batch in batches:
            jax.block_until_ready(run(*batch))
    stats = ops.observer_stats()
    if not stats:
        raise RuntimeError(
            "fp8xla.graph.calibrate: no calibration site was reached; the calibration "
            "inputs never ran the instrumented graph")
    return stats, sites


def quantize_exported(exp, options: dict):
    """Applies the `quantize` pass; returns ``(Exported with FP8 weight arguments, report)``.

    The weight arguments named in ``options["weights"]`` become float8 inputs of the new
    export (pass the FP8 codes, e.g. from ``fp8xla.ops.quantize_weight``)."""
    text, report = run_pass("quantize", module_text(exp), options)
    avals = list(exp.in_avals)
    for w in report.get("weights", []):
        if w.get("quantized", True):
            dt = ops.fp8_dtype(w["format"])
            avals[w["arg"]] = jax.core.ShapedArray(avals[w["arg"]].shape, dt)
    return with_module(exp, text, avals), report


__all__ = ["RewriteError", "module_text", "run_pass", "with_module", "instrument_exported",
           "calibrate", "quantize_exported"]
