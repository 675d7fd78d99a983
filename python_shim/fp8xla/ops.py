"""FP8 operations as jit-able JAX functions backed by fp8xla's XLA custom calls.

Numerics (those of ml_dtypes and Intel Neural Compressor): ``q = sat(RNE(x / scale))`` with
saturation to ±max of the format, ``x' = f32(q) * scale``; each custom call's contract is in
docs/custom-calls.md. Arguments are checked here, before lowering, so mistakes surface as
``TypeError`` / ``ValueError`` naming the op; the native handlers check everything again at
run time.

Under ``jax.vmap`` the elementwise ops (quantize, dequantize, qdq, observe) run as one call
over the whole batch, and so does argmax (it reduces the last dim only); the others (take,
update_slice, fp8_matmul, dot_f32) run one call per example, because their handlers read
operand dims by position. Each ``ffi_call`` says why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from . import _library

#: FP8 dtypes by the names fp8xla and Intel Neural Compressor use ("fp8_e4m3" is e4m3fn).
FORMATS = {
    "e4m3fn": jnp.float8_e4m3fn,
    "fp8_e4m3": jnp.float8_e4m3fn,
    "float8_e4m3fn": jnp.float8_e4m3fn,
    "e5m2": jnp.float8_e5m2,
    "fp8_e5m2": jnp.float8_e5m2,
    "float8_e5m2": jnp.float8_e5m2,
}
_FLOAT_INPUTS = (jnp.float32, jnp.bfloat16)


def fp8_dtype(fmt) -> np.dtype:
    """The FP8 dtype for a format name or dtype; ValueError for anything else."""
    if isinstance(fmt, str):
        if fmt not in FORMATS:
            raise ValueError(
                f"fp8xla: unknown FP8 format {fmt!r}; expected one of {sorted(FORMATS)}"
            )
        return np.dtype(FORMATS[fmt])
    dt = np.dtype(fmt)
    if dt not in (np.dtype(jnp.float8_e4m3fn), np.dtype(jnp.float8_e5m2)):
        raise ValueError(
            f"fp8xla: unsupported FP8 dtype {dt}; expected float8_e4m3fn or float8_e5m2 "
            "(ml_dtypes.float8_e4m3, without 'fn', is a different format)"
        )
    return dt


def format_name(dtype) -> str:
    """'e4m3fn' or 'e5m2' for an FP8 dtype or format name."""
    return "e4m3fn" if fp8_dtype(dtype) == np.dtype(jnp.float8_e4m3fn) else "e5m2"


def max_of(fmt) -> float:
    """Largest finite value of an FP8 format (448 for e4m3fn, 57344 for e5m2)."""
    return float(jnp.finfo(fp8_dtype(fmt)).max)


def scale_for(amax: float, fmt="e4m3fn") -> float:
    """INC's per-tensor scale: amax / max_of_format, and 1 when amax is 0."""
    amax = float(amax)
    if not math.isfinite(amax) or amax < 0:
        raise ValueError(f"fp8xla: amax must be finite and >= 0, got {amax}")
    return 1.0 if amax == 0 else amax / max_of(fmt)


def _check_scale(op: str, scale) -> np.float32:
    if isinstance(scale, jax.core.Tracer):
        raise TypeError(
            f"fp8xla.{op}: `scale` must be a concrete number (it becomes a compile-time "
            "attribute), got a traced value; pass it as a static argument"
        )
    try:
        s = np.float32(scale)
    except (TypeError, ValueError) as e:
        raise TypeError(f"fp8xla.{op}: `scale` must be a number, got {scale!r}") from e
    if np.ndim(scale) != 0:
        raise TypeError(f"fp8xla.{op}: `scale` must be a scalar, got shape {np.shape(scale)}")
    if not (np.isfinite(s) and s > 0):
        raise ValueError(f"fp8xla.{op}: `scale` must be finite and > 0, got {scale}")
    return s


def _check_float(op: str, name: str, x) -> None:
    if x.dtype not in _FLOAT_INPUTS:
        raise TypeError(f"fp8xla.{op}: `{name}` must be float32 or bfloat16, got {x.dtype}")


def quantize(x, scale, dtype="e4m3fn"):
    """FP8 codes of ``x / scale``, saturated: float32|bfloat16 → float8_e4m3fn|float8_e5m2."""
    x = jnp.asarray(x)
    _check_float("quantize", "x", x)
    s = _check_scale("quantize", scale)
    out = jax.ShapeDtypeStruct(x.shape, fp8_dtype(dtype))
    # Elementwise with a static scale: a batch is just more elements (one call).
    return jax.ffi.ffi_call("fp8xla_quantize", out, vmap_method="broadcast_all")(x, scale=s)


def quantize_rows(x, dtype="e4m3fn"):
    """FP8 codes of each row (last dim) of float32 ``x``, each row divided by its own scale
    ``amax(row) / max`` (finite values; 1 for a row of zeros): returns ``(codes, scales)``,
    the scales of shape ``x.shape[:-1]``. The FP8 KV cache's write (``fp8xla_quantize_rows``)."""
    x = jnp.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"fp8xla.quantize_rows: `x` must be float32, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError("fp8xla.quantize_rows: `x` must have rank >= 1 (rows along the last "
                         "dim), got a scalar")
    out = (jax.ShapeDtypeStruct(x.shape, fp8_dtype(dtype)),
           jax.ShapeDtypeStruct(x.shape[:-1], np.float32))
    # Rows are independent: a batch is just more rows (one call).
    return jax.ffi.ffi_call("fp8xla_quantize_rows", out, vmap_method="broadcast_all")(x)


def dequantize(q, scale, dtype=jnp.float32):
    """``f32(q) * scale``: float8 → float32|bfloat16."""
    q = jnp.asarray(q)
    fp8_dtype(q.dtype)
    s = _check_scale("dequantize", scale)
    if np.dtype(dtype) not in _FLOAT_INPUTS:
        raise TypeError(f"fp8xla.dequantize: `dtype` must be float32 or bfloat16, got {dtype}")
    out = jax.ShapeDtypeStruct(q.shape, np.dtype(dtype))
    # Elementwise with a static scale: a batch is just more elements (one call).
    return jax.ffi.ffi_call("fp8xla_dequantize", out, vmap_method="broadcast_all")(q, scale=s)


def take(table, indices, scale, dtype=jnp.float32, row_scales=None):
    """Dequantized rows of an FP8 table (an embedding lookup): ``f32(table[i]) * scale`` for
    each index (times ``row_scales[i]`` when given: one float32 scale per table row), clamped
    to the table's rows like ``stablehlo.gather``; shape ``indices.shape + table.shape[1:]``."""
    table, indices = jnp.asarray(table), jnp.asarray(indices)
    fp8_dtype(table.dtype)
    if table.ndim < 1:
        raise ValueError("fp8xla.take: `table` must have rank >= 1, got a scalar")
    if indices.dtype not in (np.int32, np.int64):
        raise TypeError(f"fp8xla.take: `indices` must be int32 or int64, got {indices.dtype}")
    s = _check_scale("take", scale)
    if np.dtype(dtype) not in _FLOAT_INPUTS:
        raise TypeError(f"fp8xla.take: `dtype` must be float32 or bfloat16, got {dtype}")
    operands = [table, indices]
    if row_scales is not None:
        row_scales = jnp.asarray(row_scales)
        if row_scales.dtype != np.float32 or row_scales.shape != table.shape[:1]:
            raise ValueError(
                f"fp8xla.take: `row_scales` must be float32 of shape {table.shape[:1]} (one per "
                f"table row), got {row_scales.dtype} {row_scales.shape}")
        operands.append(row_scales)
    out = jax.ShapeDtypeStruct(indices.shape + table.shape[1:], np.dtype(dtype))
    # One call per example: the handler reads dim 0 of the table as its rows, so a batch dim
    # put in front of the table (expand_dims, broadcast_all) would be taken for the rows.
    return jax.ffi.ffi_call("fp8xla_take", out, vmap_method="sequential")(*operands, scale=s)


# What fp8xla_update_slice takes: the element types whose size the library knows.
_UPDATE_SLICE_DTYPES = frozenset(np.dtype(d) for d in (
    np.bool_, np.int8, np.uint8, np.int32, np.int64, np.float16, jnp.bfloat16, np.float32,
    np.float64, jnp.float8_e4m3fn, jnp.float8_e5m2))


def update_slice(operand, update, start_indices):
    """``jax.lax.dynamic_update_slice(operand, update, start_indices)`` as an in-place custom
    call: the result aliases ``operand``'s buffer (under ``jax.jit`` with the operand donated,
    or inside a loop that carries it, nothing is copied). As in ``jax.lax``, a negative start
    index counts from the end; then every index is clamped so the update fits (the custom call
    itself clamps like ``stablehlo.dynamic_update_slice``, negative indices to 0)."""
    operand, update = jnp.asarray(operand), jnp.asarray(update)
    if np.dtype(operand.dtype) not in _UPDATE_SLICE_DTYPES:
        raise TypeError(f"fp8xla.update_slice: `operand` must be one of "
                        f"{sorted(str(d) for d in _UPDATE_SLICE_DTYPES)}, got {operand.dtype}")
    if update.dtype != operand.dtype:
        raise TypeError(f"fp8xla.update_slice: `update` must have the operand's dtype "
                        f"{operand.dtype}, got {update.dtype}")
    if update.ndim != operand.ndim or any(u > n for u, n in zip(update.shape, operand.shape)):
        raise ValueError(f"fp8xla.update_slice: `update` must have rank {operand.ndim} and dims "
                         f"at most {operand.shape}, got {update.shape}")
    start = [jnp.asarray(i) for i in start_indices]
    if len(start) != operand.ndim:
        raise ValueError(f"fp8xla.update_slice: expected {operand.ndim} start indices, got "
                         f"{len(start)}")
    for i in start:
        if i.ndim != 0 or i.dtype not in (np.int32, np.int64):
            raise TypeError(f"fp8xla.update_slice: start indices must be int32 or int64 "
                            f"scalars, got {i.dtype}{list(i.shape)}")
    start = [jnp.where(i < 0, i + n, i) for i, n in zip(start, operand.shape)]
    out = jax.ShapeDtypeStruct(operand.shape, operand.dtype)
    # One call per example: the start indices must be scalars and each example's are
    # clamped against its own operand, so the batch cannot become a leading dim.
    return jax.ffi.ffi_call("fp8xla_update_slice", out, input_output_aliases={0: 0},
                            vmap_method="sequential")(operand, update, *start)


def qdq(x, scale, format="e4m3fn"):
    """Fake quantization in one pass: ``dequantize(quantize(x, scale), scale)``, same dtype."""
    x = jnp.asarray(x)
    _check_float("qdq", "x", x)
    s = _check_scale("qdq", scale)
    name = format_name(format)
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    # Elementwise with a static scale: a batch is just more elements (one call).
    return jax.ffi.ffi_call("fp8xla_qdq", out, vmap_method="broadcast_all")(
        x, scale=s, format=name)


def observe(x, site: int):
    """Identity on ``x`` that records max|x| (and NaN/inf counts) under calibration ``site``."""
    x = jnp.asarray(x)
    _check_float("observe", "x", x)
    if isinstance(site, bool) or not isinstance(site, (int, np.integer)):
        raise TypeError(f"fp8xla.observe: `site` must be an int, got {site!r}")
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    # Elementwise: one call over the batch records what a call per example would (the
    # largest |x| of all, and every element counted).
    return jax.ffi.ffi_call("fp8xla_observe", out, has_side_effect=True,
                            vmap_method="broadcast_all")(x, site=np.int64(site))


@dataclass(frozen=True)
class SiteStat:
    """What `observe` saw at one site since the last reset."""

    amax: float  # largest finite |x|
    count: int  # elements seen
    nonfinite: int  # NaN or ±inf elements seen


def observer_stats() -> dict[int, SiteStat]:
    """Every site `observe` has recorded in this process, by site id."""
    import ctypes

    lib = _library.load()
    n = lib.fp8xla_observer_num_sites()
    sites = (ctypes.c_int64 * n)()
    amax = (ctypes.c_float * n)()
    count = (ctypes.c_int64 * n)()
    bad = (ctypes.c_int64 * n)()
    got = lib.fp8xla_observer_read(sites, amax, count, bad, n)
    return {
        int(sites[i]): SiteStat(float(amax[i]), int(count[i]), int(bad[i])) for i in range(got)
    }


def reset_observer() -> None:
    """Forgets all recorded sites."""
    _library.load().fp8xla_observer_reset()


def quantize_weight(w, fmt="e4m3fn", channel_axes=None):
    """Quantizes a weight on the host, INC-style: scale = amax / max_of_format.

    With ``channel_axes=None`` one scale for the tensor (returned as a Python float);
    otherwise one scale per index of ``channel_axes`` (the output channels, e.g. the rhs free
    dims of the matmul), returned as a float32 array of those axes' shape. Returns
    ``(codes, scale)`` with codes of the FP8 dtype."""
    w = np.asarray(w, dtype=np.float32)
    dt = fp8_dtype(fmt)
    m = np.float32(max_of(fmt))
    if channel_axes is None:
        scale = np.float32(scale_for(float(np.max(np.abs(w), initial=0.0)), fmt))
        return np.clip(w / scale, -m, m).astype(dt), float(scale)
    axes = tuple(a % w.ndim for a in np.atleast_1d(channel_axes))
    reduce = tuple(a for a in range(w.ndim) if a not in axes)
    amax = np.max(np.abs(w), axis=reduce, keepdims=True, initial=0.0)
    scale = np.where(amax == 0, np.float32(1), amax / m).astype(np.float32)
    codes = np.clip(w / scale, -m, m).astype(dt)
    return codes, np.squeeze(scale, axis=reduce)


def _dot_general_dims(op, lhs, rhs, dimension_numbers):
    """Checked ``(lc, rc, lb, rb)`` as int tuples (default: last lhs dim with first rhs dim)."""
    if dimension_numbers is None:
        dimension_numbers = (((lhs.ndim - 1,), (0,)), ((), ()))
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(d) for d in x) for x in (lc, rc, lb, rb))
    for name, axes, nd in (("lhs", lc + lb, lhs.ndim), ("rhs", rc + rb, rhs.ndim)):
        if any(not 0 <= a < nd for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"fp8xla.{op}: bad {name} dims {axes} for rank {nd}")
    if len(lc) != len(rc) or len(lb) != len(rb):
        raise ValueError(f"fp8xla.{op}: lhs and rhs need as many contracting and batch dims")
    return lc, rc, lb, rb


def _dot_general_shape(op, lhs_shape, rhs_shape, dimension_numbers):
    (lc, rc), (lb, rb) = dimension_numbers
    for kind, la, ra in (("contracting", lc, rc), ("batch", lb, rb)):
        for a, b in zip(la, ra):
            if lhs_shape[a] != rhs_shape[b]:
                raise ValueError(
                    f"fp8xla.{op}: {kind} dims differ: lhs dim {a} has size "
                    f"{lhs_shape[a]}, rhs dim {b} has size {rhs_shape[b]}"
                )
    batch = [lhs_shape[a] for a in lb]
    lhs_free = [lhs_shape[a] for a in range(len(lhs_shape)) if a not in lc and a not in lb]
    rhs_free = [rhs_shape[a] for a in range(len(rhs_shape)) if a not in rc and a not in rb]
    return tuple(batch + lhs_free + rhs_free), int(np.prod(batch + rhs_free, dtype=np.int64))


def fp8_matmul(lhs, rhs, w_scale, dimension_numbers=None, *, a_scale=None, a_format=None,
               out_dtype=None, w_scale_dim=None, precision="f32"):
    """``dot_general(lhs', f32(rhs) * w_scale)`` with FP8 weights and float32 accumulation.

    ``lhs`` is float32|bfloat16 activations, ``rhs`` float8_e4m3fn|float8_e5m2 weights.
    ``dimension_numbers`` is ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``
    as in ``jax.lax.dot_general``; default: contract the last lhs dim with the first rhs dim.
    ``w_scale``: a number (per tensor) or an array with one scale per output channel (rhs
    batch dims × rhs free dims), or with ``w_scale_dim=d`` one per index of rhs free dim ``d``.
    ``a_scale``: if given, the activations are quantized to FP8
    (``a_format``, default the weights' format) and back first — INC's static activation
    quantization. The result has ``out_dtype`` (default: ``lhs.dtype``).
    ``precision``: ``"f32"`` (default) keeps float32 activations at float32 precision on every
    kernel; ``"bf16"`` lets the AMX tile kernels round them to bfloat16 once (like oneDNN's
    bf16 fpmath mode: about 3 significant digits, faster on AMX, no effect elsewhere)."""
    if precision not in ("f32", "bf16"):
        raise ValueError(f"fp8xla.fp8_matmul: `precision` must be 'f32' or 'bf16', got {precision!r}")
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    _check_float("fp8_matmul", "lhs", lhs)
    try:
        fp8_dtype(rhs.dtype)
    except ValueError:
        raise TypeError(
            f"fp8xla.fp8_matmul: `rhs` must be float8_e4m3fn or float8_e5m2, got {rhs.dtype}"
        ) from None
    lc, rc, lb, rb = _dot_general_dims("fp8_matmul", lhs, rhs, dimension_numbers)
    shape, channels = _dot_general_shape("fp8_matmul", lhs.shape, rhs.shape, ((lc, rc), (lb, rb)))
    out_dtype = np.dtype(out_dtype or lhs.dtype)
    if out_dtype not in _FLOAT_INPUTS:
        raise TypeError(f"fp8xla.fp8_matmul: `out_dtype` must be float32 or bfloat16, got {out_dtype}")
    attrs = dict(
        lhs_contracting_dims=np.array(lc, np.int64),
        rhs_contracting_dims=np.array(rc, np.int64),
        lhs_batching_dims=np.array(lb, np.int64),
        rhs_batching_dims=np.array(rb, np.int64),
    )
    if a_scale is not None:
        attrs["a_scale"] = _check_scale("fp8_matmul", a_scale)
        if a_format is not None:
            attrs["a_format"] = format_name(a_format)
    if precision != "f32":
        attrs["precision"] = precision
    operands = [lhs, rhs]
    if np.ndim(w_scale) == 0 and not isinstance(w_scale, jax.Array):
        attrs["w_scale"] = _check_scale("fp8_matmul", w_scale)
    else:
        w_scale = jnp.asarray(w_scale, jnp.float32)
        if w_scale_dim is not None:
            d = int(w_scale_dim)
            if d in rc or d in rb or not 0 <= d < rhs.ndim:
                raise ValueError(f"fp8xla.fp8_matmul: `w_scale_dim` {d} is not a free rhs dim")
            if w_scale.size != rhs.shape[d]:
                raise ValueError(
                    f"fp8xla.fp8_matmul: `w_scale` must have {rhs.shape[d]} entries (rhs dim "
                    f"{d}), got shape {w_scale.shape}")
            attrs["w_scale_dim"] = np.int64(d)
        elif w_scale.size != channels:
            raise ValueError(
                f"fp8xla.fp8_matmul: per-channel `w_scale` must have {channels} entries "
                f"(rhs batch x output channels), got shape {w_scale.shape}"
            )
        operands.append(w_scale.reshape(-1))
    out = jax.ShapeDtypeStruct(shape, out_dtype)
    # One call per example: the dimension numbers name operand dims by position, and a batch
    # dim put in front (expand_dims, broadcast_all) would shift them; the weights' layout
    # rules would also refuse a batch dim that is not a dot_general batch dim.
    return jax.ffi.ffi_call("fp8xla_matmul", out, vmap_method="sequential")(*operands, **attrs)


def sharded_fp8_matmul(lhs, rhs, w_scale, *, mesh, w_spec, dimension_numbers=None, **kwargs):
    """`fp8_matmul` on a weight sharded over `mesh` as `w_spec` (a ``PartitionSpec`` of
    ``rhs``), each device on its own shard: a ``jax.shard_map`` over the mesh axes the weight
    is split on.

    A split free (output) dim of ``rhs`` (column parallel) splits the result the same way, no
    collective; a split contracting dim (row parallel) splits ``lhs``'s matching dim and sums
    the partial products with one ``psum`` (all-reduce); a split batch dim splits ``lhs`` and
    the result. Per-channel ``w_scale`` (one per index of a free rhs dim: ``w_scale_dim`` or
    the only free dim) follows that dim's split. ``lhs`` may be given in any sharding (JAX
    reshards it to what the product needs); other mesh axes stay automatic. Other keyword
    arguments are those of `fp8_matmul`. Every split dim must divide evenly. This is what the
    rewrite's ``shard_calls`` pass writes into exported graphs (docs/sharding.md)."""
    from jax.sharding import PartitionSpec as P

    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    lc, rc, lb, rb = _dot_general_dims("sharded_fp8_matmul", lhs, rhs, dimension_numbers)
    spec = tuple(w_spec) + (None,) * (rhs.ndim - len(tuple(w_spec)))
    if len(spec) != rhs.ndim:
        raise ValueError(f"fp8xla.sharded_fp8_matmul: `w_spec` {w_spec} has more entries than "
                         f"rhs dims ({rhs.ndim})")

    def axes_of(entry):
        if entry is None:
            return ()
        return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)

    for d, entry in enumerate(spec):
        parts = math.prod(mesh.shape[a] for a in axes_of(entry))
        if rhs.shape[d] % parts:
            raise ValueError(f"fp8xla.sharded_fp8_matmul: rhs dim {d} (size {rhs.shape[d]}) "
                             f"is split {parts} ways over {axes_of(entry)}; it must divide")
    lhs_spec = [None] * lhs.ndim
    rhs_free = [d for d in range(rhs.ndim) if d not in rc and d not in rb]
    lhs_free = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
    out_spec = [None] * (len(lb) + len(lhs_free) + len(rhs_free))
    reduce = []
    for d, entry in enumerate(spec):
        if entry is None:
            continue
        if d in rc:
            lhs_spec[lc[rc.index(d)]] = entry
            reduce.extend(axes_of(entry))
        elif d in rb:
            lhs_spec[lb[rb.index(d)]] = entry
            out_spec[rb.index(d)] = entry
        else:
            out_spec[len(lb) + len(lhs_free) + rhs_free.index(d)] = entry
    operands, in_specs = [lhs, rhs], [P(*lhs_spec), P(*spec)]
    per_channel = not (np.ndim(w_scale) == 0 and not isinstance(w_scale, jax.Array))
    if per_channel:
        d = kwargs.get("w_scale_dim")
        if d is None:
            kept = [k for k in range(rhs.ndim) if k not in rc]
            if len(kept) != 1 and any(spec[k] is not None for k in kept):
                raise ValueError("fp8xla.sharded_fp8_matmul: per-channel scales on a split "
                                 "weight with several output dims need `w_scale_dim`")
            d = kept[0] if len(kept) == 1 else None
        operands.append(jnp.asarray(w_scale, jnp.float32).reshape(-1))
        in_specs.append(P(spec[d] if d is not None else None))
    manual = {a for entry in spec for a in axes_of(entry)}

    def body(lhs, rhs, *scale):
        out = fp8_matmul(lhs, rhs, scale[0] if scale else w_scale, dimension_numbers,
                         **kwargs)
        return jax.lax.psum(out, tuple(reduce)) if reduce else out

    return jax.shard_map(body, mesh=mesh, in_specs=tuple(in_specs), out_specs=P(*out_spec),
                         axis_names=manual, check_vma=False)(*operands)


def dot_f32(lhs, rhs, dimension_numbers=None):
    """``jax.lax.dot_general`` of two float32 arrays by the GEMV kernels (``fp8xla_dot_f32``):
    for few rows against a large operand, read once (attention over a KV cache in a decode
    step). The larger operand must be ``[batch, free, contracting, free]`` once its size-1
    dims are dropped; it may be float8_e4m3fn / float8_e5m2 codes, read as their exact values
    (no scale: an FP8 KV cache). ``dimension_numbers`` as in ``fp8_matmul``."""
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    fp8 = {np.dtype(fp8_dtype("e4m3fn")), np.dtype(fp8_dtype("e5m2"))}
    for name, x in (("lhs", lhs), ("rhs", rhs)):
        if x.dtype != np.float32 and np.dtype(x.dtype) not in fp8:
            raise TypeError(f"fp8xla.dot_f32: `{name}` must be float32 (or FP8 codes, on the "
                            f"larger side), got {x.dtype}")
    lc, rc, lb, rb = _dot_general_dims("dot_f32", lhs, rhs, dimension_numbers)
    shape, _ = _dot_general_shape("dot_f32", lhs.shape, rhs.shape, ((lc, rc), (lb, rb)))
    out = jax.ShapeDtypeStruct(shape, np.float32)
    # One call per example: the dimension numbers name operand dims by position, and a batch
    # dim put in front (expand_dims, broadcast_all) would shift them.
    return jax.ffi.ffi_call("fp8xla_dot_f32", out, vmap_method="sequential")(
        lhs, rhs,
        lhs_contracting_dims=np.array(lc, np.int64),
        rhs_contracting_dims=np.array(rc, np.int64),
        lhs_batching_dims=np.array(lb, np.int64),
        rhs_batching_dims=np.array(rb, np.int64),
    )


def argmax(x):
    """``jnp.argmax(x, axis=-1)`` (int32 indices) by the multi-threaded ``fp8xla_argmax``
    custom call: the first index of the largest value of each row, the first NaN of a row
    that has one. This is what the rewrite makes of a greedy sampler's argmax over a
    vocabulary (pass ``sampler_argmax``)."""
    x = jnp.asarray(x)
    _check_float("argmax", "x", x)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"fp8xla.argmax: `x` must have a last dim of size >= 1, got shape "
                         f"{x.shape}")
    if x.shape[-1] - 1 > np.iinfo(np.int32).max:
        raise ValueError(f"fp8xla.argmax: a last dim of {x.shape[-1]} does not fit int32 "
                         "indices")
    out = jax.ShapeDtypeStruct(x.shape[:-1], np.int32)
    # The call reduces the last dim only: a batch dim put in front is one more leading dim.
    return jax.ffi.ffi_call("fp8xla_argmax", out, vmap_method="broadcast_all")(x)
