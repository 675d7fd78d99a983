"""Sequential GPTQ: each weight's Gram matrix from the inputs the already-quantized layers
before it produce, as GPTQ's reference implementation (and INC's) runs it.

Parallel GPTQ (:func:`fp8xla.keras._gram.collect_grams`) takes every Gram matrix from the float
model, so a layer is fitted to inputs it will never see once the layers before it are
rounded. Here the calibration is replayed one transformer block at a time:

1. ``calib_function(model)`` runs once on the float model and the token sequences its
   ``generate`` calls end with (prompt and continuation, with their padding masks) are kept:
   a forward pass over them computes what generate's prefill and decode steps computed.
2. The backbone runs on them up to the first block, whose inputs are kept (float: the
   embedding, rounded last, is the lookup's only weight before it).
3. For each block, its weights are taken in the order the block's call uses them, in groups
   that share one input (Gemma 3: q/k/v, the attention output, gate/up, down): the block runs
   on the kept inputs with the group's layers hooked (and stops there), each of the group's
   weights is rounded by GPTQ, and its dequantized value is written into the float variable
   for the rest of the procedure. The block then runs whole to give the next block's inputs.
4. The tied embedding is rounded last, its Gram matrix from the final hidden states of the
   model with every block rounded (the backbone's output, which the logits project).

Rows at padding positions are left out of every Gram matrix. The float variables get their
values back at the end: the quantized model keeps its float weights, as with parallel GPTQ.
Models whose weights are not in ``backbone.transformer_layers`` or the tied embedding get a
clear error.
"""
from __future__ import annotations

import numpy as np

from . import _gram


class _Stop(Exception):
    """Ends a forward pass once what it was run for has been recorded."""


class _RowCollector(_gram.GramCollector):
    """GramCollector for eager calls: rows at padding positions (``row_mask``) are dropped, and
    the pass stops after ``stop_after`` (a trainable variable index) has recorded."""

    row_mask = None
    stop_after = None
    order = None  # when a list: (index, id of the input) in call order

    def _record(self, site, x, x_axes):
        index = next(i for i, s in self.sites.items() if s is site)
        if self.order is not None:
            self.order.append((index, id(x)))
        rows = np.asarray(_gram._rows_of(x, x_axes))
        # a block's dense layers see one row per position (batch x length), in the mask's
        # order; a layer with other rows (none in Gemma 3) keeps them all
        if self.row_mask is not None and len(rows) == len(self.row_mask):
            rows = rows[self.row_mask]
        site.add(rows)
        if index == self.stop_after:
            raise _Stop


def record_sequences(model, calib_function):
    """Runs ``calib_function(model)`` on the float model; returns the ``(token_ids,
    padding_mask)`` numpy pairs its generate calls ended with."""
    sequences = []
    saved = model.generate_function
    stock = _gram._stock_generate_function(model)

    def generate_function(inputs, stop_token_ids=None):
        outputs = stock(inputs, stop_token_ids)
        sequences.append((np.asarray(outputs["token_ids"]),
                          np.asarray(outputs["padding_mask"])))
        return outputs

    model.generate_function = generate_function
    try:
        calib_function(model)
    finally:
        model.generate_function = saved
    if not sequences:
        raise RuntimeError("fp8xla.keras.quantize_model: calib_function never called "
                           "model.generate, so GPTQ has no calibration input")
    return sequences


def _block_inputs(backbone, first_block, sequences):
    """``[(x, call args, call kwargs, row mask)]`` at the input of ``first_block``, one per
    sequence (the row mask: which of its ``batch x length`` positions are not padding)."""
    captured = []

    def call(x, *args, **kwargs):
        captured.append((x, args, kwargs))
        raise _Stop

    object.__setattr__(first_block, "call", call)
    out = []
    try:
        for token_ids, padding_mask in sequences:
            try:
                backbone({"token_ids": token_ids, "padding_mask": padding_mask})
            except _Stop:
                pass
            x, args, kwargs = captured.pop()
            out.append((x, args, kwargs, padding_mask.reshape(-1).astype(bool)))
    finally:
        object.__delattr__(first_block, "call")
    return out


def _weights_of(layer, model, indices):
    ids = {id(v) for v in layer.weights}
    return [i for i in indices if id(model.trainable_variables[i]) in ids]


def quantize(model, calib_function, indices, round_weight, dequantize, progress, *,
             embedding_first=False):
    """Sequential GPTQ of the weights ``indices`` (trainable variable indices) of a Keras-Hub
    causal LM. ``round_weight(index, site)`` returns ``(codes, scale)`` of one weight from its
    :class:`~fp8xla.keras._gram.Site`, ``dequantize(index, codes, scale)`` the weight they
    stand for; returns ``{index: (codes, scale)}``. ``embedding_first`` rounds the tied
    embedding before the blocks (from the float model's final hidden states), so that the
    blocks absorb the lookup's rounding too; measured no better on Gemma 3 270M
    (docs/quality.md), so it is not the order ``quantize_model`` uses."""
    backbone = getattr(model, "backbone", None)
    blocks = list(getattr(backbone, "transformer_layers", None) or [])
    if not blocks:
        raise ValueError(f"fp8xla.keras.quantize_model: gptq_sequential needs a Keras-Hub "
                         f"model with backbone.transformer_layers; {type(model).__name__} has "
                         "none (use gptq_sequential=False)")
    in_blocks = {i: b for b, block in enumerate(blocks) for i in _weights_of(block, model, indices)}
    embedding = getattr(backbone, "token_embedding", None)
    tied = [i for i in indices if i not in in_blocks and embedding is not None
            and getattr(embedding, "tie_weights", False)
            and model.trainable_variables[i] is getattr(embedding, "embeddings", None)]
    other = [model.trainable_variables[i].path for i in indices
             if i not in in_blocks and i not in tied]
    if other:
        raise ValueError(f"fp8xla.keras.quantize_model: gptq_sequential rounds the weights of "
                         f"backbone.transformer_layers and the tied embedding; "
                         f"{', '.join(other)} is neither (use gptq_sequential=False)")

    progress("GPTQ (sequential): recording the calibration sequences (calib_function)")
    sequences = record_sequences(model, calib_function)
    tokens = sum(int(m.sum()) for _, m in sequences)
    progress(f"GPTQ (sequential): {len(sequences)} calibration sequences, {tokens} tokens")
    originals = {i: np.array(model.trainable_variables[i].value)
                 for i in list(in_blocks) + (tied if embedding_first else [])}
    results = {}

    def round_tied():
        for i in tied:
            site = _gram.Site(model.trainable_variables[i].path, (1,))
            for token_ids, padding_mask in sequences:
                hidden = np.asarray(backbone({"token_ids": token_ids,
                                              "padding_mask": padding_mask}), np.float32)
                site.add(hidden.reshape(-1, hidden.shape[-1])[
                    padding_mask.reshape(-1).astype(bool)])
            site.flush()
            results[i] = round_weight(i, site)

    try:
        if embedding_first:
            round_tied()
            for i in tied:
                model.trainable_variables[i].assign(dequantize(i, *results[i]))
        inputs = _block_inputs(backbone, blocks[0], sequences)
        for b, block in enumerate(blocks):
            mine = [i for i in indices if in_blocks.get(i) == b]
            groups = _groups_in_call_order(model, block, mine, inputs[0])
            progress(f"GPTQ (sequential): block {b + 1}/{len(blocks)}, its weights in "
                     f"{len(groups)} groups of {', '.join(str(len(g)) for g in groups)}")
            for group in groups:
                sites = _collect(model, block, group, inputs)
                for i in group:
                    if i not in sites:
                        raise RuntimeError(
                            f"fp8xla.keras.quantize_model: gptq_sequential: "
                            f"{model.trainable_variables[i].path} saw no calibration input")
                    results[i] = round_weight(i, sites[i])
                    model.trainable_variables[i].assign(dequantize(i, *results[i]))
            inputs = [(block(x, *args, **kwargs), args, kwargs, mask)
                      for x, args, kwargs, mask in inputs]
        if not embedding_first:
            round_tied()
    finally:
        for i, value in originals.items():
            model.trainable_variables[i].assign(value)
    return results


def _groups_in_call_order(model, block, mine, first_input):
    """``mine`` (the block's weights to round) as groups of weights whose layers take the same
    input, in the order the block's call uses them."""
    x, args, kwargs, mask = first_input
    with _RowCollector(model, mine) as collector:
        collector.order = []
        block(x, *args, **kwargs)
    groups, last_input = [], None
    for index, input_id in collector.order:
        if index in {i for g in groups for i in g}:
            continue  # a layer called twice: its first call decides
        if groups and input_id == last_input:
            groups[-1].append(index)
        else:
            groups.append([index])
        last_input = input_id
    missing = [model.trainable_variables[i].path for i in mine
               if i not in {j for g in groups for j in g}]
    if missing:
        raise RuntimeError(f"fp8xla.keras.quantize_model: gptq_sequential: the block's call "
                           f"never used {', '.join(missing)}")
    return groups


def _collect(model, block, group, inputs):
    """The Sites (Gram matrices) of ``group``'s weights over every kept block input."""
    with _RowCollector(model, group) as collector:
        collector.stop_after = group[-1]
        for x, args, kwargs, mask in inputs:
            collector.row_mask = mask
            try:
                block(x, *args, **kwargs)
            except _Stop:
                pass
    for s in collector.sites.values():
        s.flush()
    return collector.sites
