"""Perplexity of a Keras-Hub causal LM on the GPL-3 text, the protocol fp8xla reports.

Protocol: the text of ``/usr/share/common-licenses/GPL-3`` is tokenized without BOS and cut
into 14 consecutive chunks of 511 tokens; each chunk is scored as ``[BOS] + chunk``, giving
14 * 511 = 7154 next-token predictions, and the perplexity is ``exp(mean NLL)``.

Logits come from the model's own forward pass, the Keras way (``model.predict_on_batch`` on
``{"token_ids": ..., "padding_mask": ...}`` with the preprocessor detached), so any model that
plugs into Keras-Hub the same way is scored the same way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = ["GPL3_PATH", "PerplexityResult", "gpl3_perplexity", "gpl3_token_chunks", "keras_logits_fn"]

GPL3_PATH = "/usr/share/common-licenses/GPL-3"
NUM_CHUNKS = 14
CHUNK_TOKENS = 511

LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class PerplexityResult:
    """What :func:`gpl3_perplexity` measured.

    ``predictions[c, i]`` is the model's argmax for ``targets[c, i]``, the i-th token of chunk
    c (both ``(num_chunks, chunk_tokens)``); ``nll`` holds the per-token negative log-likelihoods.
    """

    perplexity: float
    mean_nll: float
    nll: np.ndarray
    predictions: np.ndarray
    targets: np.ndarray
    logits_fn: LogitsFn = field(repr=False)
    seconds: float = 0.0

    @property
    def num_predictions(self) -> int:
        return int(self.targets.size)

    def top1_agreement(self, other: "PerplexityResult") -> float:
        """Fraction of positions where this and another run predict the same token."""
        return float(np.mean(self.predictions == other.predictions))

    def top1_accuracy(self) -> float:
        return float(np.mean(self.predictions == self.targets))


def _tokenizer_of(model):
    preprocessor = getattr(model, "preprocessor", None)
    tokenizer = getattr(preprocessor, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            "fp8xla: the model has no preprocessor with a tokenizer; pass tokenizer= explicitly"
        )
    return tokenizer


def gpl3_token_chunks(
    tokenizer,
    path: str = GPL3_PATH,
    num_chunks: int = NUM_CHUNKS,
    chunk_tokens: int = CHUNK_TOKENS,
) -> np.ndarray:
    """The protocol's token chunks, ``(num_chunks, chunk_tokens)`` int32, tokenized without BOS."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    ids = np.asarray(tokenizer.tokenize(text), dtype=np.int32).reshape(-1)
    need = num_chunks * chunk_tokens
    if ids.size < need:
        raise ValueError(
            f"fp8xla: {path} has {ids.size} tokens, the protocol needs {need} "
            f"({num_chunks} chunks of {chunk_tokens})"
        )
    return ids[:need].reshape(num_chunks, chunk_tokens)


def keras_logits_fn(model) -> LogitsFn:
    """Logits ``(batch, seq, vocab)`` float32 from a Keras-Hub causal LM's own forward pass.

    Runs ``model.predict_on_batch`` (Keras jit-compiles its predict function once per input
    shape) on token ids and padding mask, with the preprocessor detached during the call as
    Keras-Hub documents for pre-tokenized input. (Keras' own ``predict_on_batch`` on the task
    with the preprocessor attached would work too, but it first runs an eager forward pass
    whenever a layer, such as the tokenizer, is unbuilt.)
    """

    def logits_fn(token_ids: np.ndarray, padding_mask: np.ndarray) -> np.ndarray:
        inputs = {
            "token_ids": np.asarray(token_ids, np.int32),
            "padding_mask": np.asarray(padding_mask, np.int32),
        }
        preprocessor = getattr(model, "preprocessor", None)
        model.preprocessor = None
        try:
            out = model.predict_on_batch(inputs)
        finally:
            model.preprocessor = preprocessor
        return np.asarray(out, dtype=np.float32)

    return logits_fn


def _log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float32)
    m = logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=-1, dtype=np.float64)) + m[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - picked


def gpl3_perplexity(
    model=None,
    *,
    logits_fn: LogitsFn | None = None,
    tokenizer=None,
    bos_id: int | None = None,
    path: str = GPL3_PATH,
    num_chunks: int = NUM_CHUNKS,
    chunk_tokens: int = CHUNK_TOKENS,
    batch_size: int = 1,
    progress: bool = False,
) -> PerplexityResult:
    """Scores ``model`` (or a ``logits_fn(token_ids, padding_mask)``) with the GPL-3 protocol.

    ``tokenizer`` and ``bos_id`` default to the model's preprocessor tokenizer and its start
    token. ``batch_size`` chunks are scored per forward call (each call's logits are
    ``batch * 512 * vocab`` float32: 0.5 GB per chunk for Gemma 3).
    """
    start = time.perf_counter()
    if logits_fn is None:
        if model is None:
            raise ValueError("fp8xla: pass a model or a logits_fn")
        logits_fn = keras_logits_fn(model)
    if tokenizer is None:
        tokenizer = _tokenizer_of(model)
    if bos_id is None:
        bos_id = int(tokenizer.start_token_id)
    chunks = gpl3_token_chunks(tokenizer, path, num_chunks, chunk_tokens)
    inputs = np.concatenate(
        [np.full((num_chunks, 1), bos_id, np.int32), chunks], axis=1
    )
    mask = np.ones_like(inputs)
    nll = np.empty((num_chunks, chunk_tokens), np.float64)
    predictions = np.empty((num_chunks, chunk_tokens), np.int32)
    for lo in range(0, num_chunks, batch_size):
        hi = min(lo + batch_size, num_chunks)
        logits = logits_fn(inputs[lo:hi], mask[lo:hi])
        logits = np.asarray(logits)[:, :chunk_tokens]  # position i predicts chunk token i
        nll[lo:hi] = _log_softmax_nll(logits, chunks[lo:hi])
        predictions[lo:hi] = logits.argmax(axis=-1)
        del logits
        if progress:
            running = float(np.exp(nll[:hi].mean()))
            print(f"[fp8xla] GPL-3 perplexity: {hi}/{num_chunks} chunks, running {running:.3f}",
                  flush=True)
    mean_nll = float(nll.mean())
    return PerplexityResult(
        perplexity=float(np.exp(mean_nll)),
        mean_nll=mean_nll,
        nll=nll,
        predictions=predictions,
        targets=chunks,
        logits_fn=logits_fn,
        seconds=time.perf_counter() - start,
    )
