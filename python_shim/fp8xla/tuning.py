"""Accuracy-aware tuning in Intel Neural Compressor's terms, independent of the front end.

:class:`TuningConfig` has INC's names and meaning: ``config_set`` (the configs, tried in
order), ``tolerable_loss`` (the relative loss of the evaluation score accepted against the
float model; INC's scores are higher-is-better, so for perplexity score ``1 / ppl``: a
``tolerable_loss`` of 0.005 then accepts up to +0.5 % perplexity) and ``max_trials``.

:func:`tune` runs the search for a front end (``fp8xla.keras.autotune``) that supplies how to
build and score a candidate and how sensitive each weight is:

1. each config of ``config_set`` in order, with every weight it selects in FP8; the first
   that meets the tolerance wins;
2. if none does, the best-scoring one with the most sensitive weights kept in float: the 1,
   2, 4, 8, ... most sensitive (fewest fallbacks first; at most all but one) until the
   tolerance is met or the trials run out; then, between the last count that failed and the
   first that met, bisection finds the fewest that meet (doubling alone may overshoot by
   almost half of the fallbacks, and the later ones can be large: on Gemma 3 270M the tied
   embedding, 60 % of the weights' bytes, came 63rd);
3. if nothing met it, :class:`TuningError` says what was tried and the best score seen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

__all__ = ["Trial", "TuningConfig", "TuningError", "TuningResult", "relative_loss", "tune"]


class TuningError(ValueError):
    """No config (with the fallbacks tried) met the tolerable loss."""


@dataclass
class TuningConfig:
    """INC's tuning config: ``config_set`` tried in order, ``tolerable_loss`` the accepted
    relative loss of the score (0.01: 1 %), at most ``max_trials`` candidates evaluated."""

    config_set: Sequence = ()
    tolerable_loss: float = 0.01
    max_trials: int = 100

    def __post_init__(self):
        if not isinstance(self.config_set, (list, tuple)):
            self.config_set = [self.config_set]
        if not self.config_set:
            raise ValueError("TuningConfig: config_set is empty; give at least one config")
        if not (isinstance(self.tolerable_loss, (int, float)) and
                0 <= self.tolerable_loss < math.inf):
            raise ValueError(f"TuningConfig: tolerable_loss must be a finite number >= 0, got "
                             f"{self.tolerable_loss!r}")
        if not (isinstance(self.max_trials, int) and self.max_trials >= 1):
            raise ValueError(f"TuningConfig: max_trials must be an int >= 1, got "
                             f"{self.max_trials!r}")


@dataclass
class Trial:
    """One evaluated candidate: a config and the weights kept in float on top of it."""

    config: object
    float_weights: tuple
    score: float
    loss: float
    meets: bool
    float_bytes: int = 0  # bytes the float weights take beyond their FP8 form


@dataclass
class TuningResult:
    baseline: float
    tolerable_loss: float
    trials: list = field(default_factory=list)
    best: Trial | None = None
    total_weight_bytes: int = 0  # float32 bytes of every weight the configs can quantize

    def summary(self) -> str:
        lines = [f"autotune: baseline score {self.baseline:.6g}, tolerable loss "
                 f"{self.tolerable_loss:.4g}"]
        for n, t in enumerate(self.trials):
            lines.append(f"  trial {n + 1}: {_describe(t)}: score {t.score:.6g}, loss "
                         f"{t.loss:+.4%} {'meets' if t.meets else 'fails'}")
        if self.best is not None:
            b = self.best
            share = b.float_bytes / self.total_weight_bytes if self.total_weight_bytes else 0
            lines.append(f"chosen: {_describe(b)}" + (
                f"; kept in float: {', '.join(b.float_weights)} ({b.float_bytes / 2**20:.1f} "
                f"MiB more than FP8, {share:.1%} of the weights' float32 bytes)"
                if b.float_weights else "; no weight kept in float"))
        return "\n".join(lines)


def _describe(t: Trial) -> str:
    name = getattr(t.config, "describe", None)
    text = name() if callable(name) else repr(t.config)
    return text + (f" + {len(t.float_weights)} weight(s) in float" if t.float_weights else "")


def relative_loss(baseline: float, score: float) -> float:
    """INC's relative loss of a higher-is-better score: ``(baseline - score) / |baseline|``."""
    return (baseline - score) / abs(baseline)


def tune(
    baseline: float,
    tune_config: TuningConfig,
    evaluate: Callable[[object, tuple], float],
    sensitivity: Callable[[object], list],
    float_bytes: Callable[[tuple], int],
    total_weight_bytes: int = 0,
    log: Callable[[str], None] = print,
) -> TuningResult:
    """The search described in the module doc.

    ``evaluate(config, float_weights)`` scores a candidate (higher is better);
    ``sensitivity(config)`` lists the names of the weights ``config`` quantizes, most
    sensitive first; ``float_bytes(float_weights)`` is what keeping them float costs."""
    if not (isinstance(baseline, (int, float)) and math.isfinite(baseline) and baseline != 0):
        raise TuningError(f"autotune: eval_fn gave the float model the score {baseline!r}; "
                          "expected a finite, non-zero number (higher is better)")
    result = TuningResult(baseline, tune_config.tolerable_loss,
                          total_weight_bytes=total_weight_bytes)

    def run(config, fallback):
        score = float(evaluate(config, fallback))
        if not math.isfinite(score):
            raise TuningError(f"autotune: eval_fn gave {score!r} for {config!r}; expected a "
                              "finite number")
        loss = relative_loss(baseline, score)
        t = Trial(config, tuple(fallback), score, loss, loss <= tune_config.tolerable_loss,
                  float_bytes(tuple(fallback)) if fallback else 0)
        result.trials.append(t)
        log(f"[fp8xla] autotune trial {len(result.trials)}: {_describe(t)}: score {score:.6g} "
            f"(loss {loss:+.4%}, {'meets' if t.meets else 'fails'} the tolerable "
            f"{tune_config.tolerable_loss:.4%})")
        if t.meets:
            result.best = t
        return t

    for config in tune_config.config_set:
        if len(result.trials) >= tune_config.max_trials:
            break
        if run(config, ()).meets:
            return result
    if result.trials and len(result.trials) < tune_config.max_trials:
        best = max(result.trials, key=lambda t: t.score).config
        ranked = list(sensitivity(best))
        # at least one weight stays FP8: all of them in float is not a quantized model
        most = len(ranked) - 1
        n, failed = 1, 0
        while n <= most and len(result.trials) < tune_config.max_trials:
            if run(best, tuple(ranked[:n])).meets:
                # the fewest fallbacks in (failed, n] that meet: run() keeps the last one that
                # met as result.best, and each one that meets has fewer than the one before
                met = n
                while met - failed > 1 and len(result.trials) < tune_config.max_trials:
                    mid = (failed + met) // 2
                    if run(best, tuple(ranked[:mid])).meets:
                        met = mid
                    else:
                        failed = mid
                return result
            failed = n
            if n == most:
                break
            n = min(2 * n, most)
    top = max(result.trials, key=lambda t: t.score)
    raise TuningError(
        f"autotune: no config met tolerable_loss={tune_config.tolerable_loss} (relative loss "
        f"of eval_fn's score against the float model's {baseline:.6g}) within "
        f"{len(result.trials)} trial(s); the best was {_describe(top)} with loss "
        f"{top.loss:+.4%}. Tried:\n" + result.summary())
