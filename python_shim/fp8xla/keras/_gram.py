"""Gram matrices ``XᵀX`` of the calibration inputs of a Keras model's weight matrices (for
GPTQ rounding).

The model's own layers are hooked for the duration of ``calib_function(model)``: each
``EinsumDense`` / ``Dense`` records ``XᵀX`` of its input (with the contracted axes in the
kernel's order), and a ``ReversibleEmbedding`` called with ``reverse=True`` (the tied logits)
records ``XᵀX`` of the hidden states it projects, which is the Gram matrix of the transposed
embedding table. The input rows are handed to the host by ``jax.debug.callback`` from inside the
(jit-compiled) step, so generate, predict and eager calls all count, and the products are
accumulated there in float64, in blocks (each block's product in float32). Keras-Hub's
``generate`` also runs its prefill over the padding of the prompt batch, which is counted like
any other input.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np


@dataclass
class Site:
    """One weight matrix's calibration statistics and how its kernel maps to ``W[K, N]``."""

    path: str
    contract: tuple  # kernel axes contracted with the input, in the order of K
    gram: np.ndarray | None = None
    rows: int = 0
    pending: list = field(default_factory=list)
    pending_rows: int = 0

    def add(self, x):
        """Buffers input rows ``x`` ``[M, K]``; their ``XᵀX`` is added in blocks of at least
        ``K`` rows (a decode step gives one row per sequence: one product per row would touch
        the whole ``K x K`` matrix each time)."""
        x = np.asarray(x, np.float32)
        self.pending.append(x)
        self.pending_rows += len(x)
        self.rows += len(x)
        if self.pending_rows >= max(1024, x.shape[1]):
            self.flush()

    def flush(self):
        if not self.pending:
            return
        x = np.concatenate(self.pending)
        self.pending, self.pending_rows = [], 0
        # One block's product in float32 (half the time of float64 on AVX2), the sum over
        # blocks in float64: a block of a few thousand rows is off by ~1e-6 relative, far
        # below GPTQ's damping.
        g = (x.T @ x).astype(np.float64)
        self.gram = g if self.gram is None else self.gram + g


def _einsum_contraction(equation, x_ndim):
    """(input axes contracted, kernel axes contracted in the same order) of an EinsumDense
    equation ``"in,kernel->out"``; None for equations it cannot read (e.g. with ``...``)."""
    lhs, out = equation.replace(" ", "").split("->")
    a, b = lhs.split(",")
    if "." in a or "." in b or len(a) != x_ndim:
        return None
    labels = [c for c in b if c in a and c not in out]
    if not labels or any(c not in string.ascii_letters for c in labels):
        return None
    return tuple(a.index(c) for c in labels), tuple(b.index(c) for c in labels)


def _rows_of(x, x_axes):
    """``x`` as ``[rows, K]``: the contracted axes ``x_axes`` (in that order) last."""
    x = jnp.asarray(x, jnp.float32)
    rest = [d for d in range(x.ndim) if d not in x_axes]
    return jnp.transpose(x, rest + list(x_axes)).reshape(-1, int(np.prod(
        [x.shape[d] for d in x_axes])))


class GramCollector:
    """Context manager hooking the layers whose weight is one of ``variables`` (trainable
    variable index -> variable); ``sites`` maps each index to its :class:`Site`."""

    def __init__(self, model, indices):
        self.model = model
        self.sites = {}
        self._hooked = []
        var_index = {id(model.trainable_variables[i]): i for i in indices}
        for layer in model._flatten_layers(include_self=False, recursive=True):
            kind = type(layer).__name__
            if kind == "EinsumDense" and id(getattr(layer, "kernel", None)) in var_index:
                self._hook_einsum(layer, var_index[id(layer.kernel)], layer.equation)
            elif kind == "Dense" and id(getattr(layer, "kernel", None)) in var_index:
                self._hook_einsum(layer, var_index[id(layer.kernel)], None)
            elif kind == "ReversibleEmbedding" and getattr(layer, "tie_weights", False) and id(
                    getattr(layer, "embeddings", None)) in var_index:
                self._hook_reverse_embedding(layer, var_index[id(layer.embeddings)])

    def _site(self, index, contract):
        if index not in self.sites:
            path = self.model.trainable_variables[index].path
            self.sites[index] = Site(path, contract)
        return self.sites[index]

    def _record(self, site, x, x_axes):
        # the rows go to the host (the Gram matrix is accumulated there, in float64)
        jax.debug.callback(site.add, _rows_of(x, x_axes))

    def _hook_einsum(self, layer, index, equation):
        stock = layer.call

        def call(inputs, *args, **kwargs):
            if equation is None:  # Dense: the last input axis with kernel axis 0
                axes = ((inputs.ndim - 1,), (0,))
            else:
                axes = _einsum_contraction(equation, inputs.ndim)
            if axes is not None:
                self._record(self._site(index, axes[1]), inputs, axes[0])
            return stock(inputs, *args, **kwargs)

        self._install(layer, call)

    def _hook_reverse_embedding(self, layer, index):
        stock = layer.call

        def call(inputs, *args, reverse=False, **kwargs):
            if reverse:  # logits = inputs @ embeddings.T: contracted over embeddings axis 1
                self._record(self._site(index, (1,)), inputs, (inputs.ndim - 1,))
            return stock(inputs, *args, reverse=reverse, **kwargs)

        self._install(layer, call)

    def _install(self, layer, call):
        # past Keras' attribute tracking; removed again on exit
        object.__setattr__(layer, "call", call)
        self._hooked.append(layer)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for layer in self._hooked:
            object.__delattr__(layer, "call")
        self._hooked.clear()
        return False


def _stock_generate_function(model):
    """Keras-Hub's own jit-compiled generate step (so that the hooks are traced into it)."""
    model.generate_function = None
    stock = model.make_generate_function()

    def generate_function(inputs, stop_token_ids=None):
        outputs = stock(inputs, stop_token_ids)
        # Keras-Hub 0.32 returns "images": None without a preprocessor; generate() fails on it
        return {k: v for k, v in outputs.items() if v is not None}

    return generate_function


def collect_grams(model, calib_function, indices):
    """Runs ``calib_function(model)`` on the float model with its layers hooked; returns
    ``{trainable variable index: Site}`` for the weights that saw calibration input."""
    saved = {name: getattr(model, name, None)
             for name in ("generate_function", "predict_function")}
    # Keras(-Hub) caches its compiled steps; new ones are traced with the hooks in place.
    model.predict_function = None
    try:
        with GramCollector(model, indices) as collector:
            model.generate_function = _stock_generate_function(model)
            calib_function(model)
            jax.effects_barrier()
    finally:
        for name, value in saved.items():
            setattr(model, name, value)
    for s in collector.sites.values():
        s.flush()
    return {i: s for i, s in collector.sites.items() if s.rows > 0}
