"""Unlearning metrics from model outputs: UA / RA / TA, Avg. Gap, and a wall-clock stopwatch.

No model code lives here: callers run the model and pass logits (or probabilities) and labels.

References:
  SalUn (Fan et al., ICLR 2024), Sec. 5 and Table 1; reference-salun.md Sec. 4.1 and Sec. 4.3.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.typing import ArrayLike

METRIC_KEYS = ("UA", "RA", "TA", "MIA")


def accuracy(logits_or_probs: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy in percent.

    Args:
      logits_or_probs: `[N, K]` logits or probabilities (argmax is the same for both).
      labels: `[N]` integer labels.

    Returns:
      `100 * mean(argmax(logits) == labels)` as a Python float.

    Raises:
      ValueError: on empty input, wrong ranks or mismatched lengths.
    """
    scores = np.asarray(logits_or_probs)
    y = np.asarray(labels)
    if scores.ndim != 2:
        raise ValueError(f"logits must be [N, K], got shape {scores.shape}.")
    if y.ndim != 1:
        raise ValueError(f"labels must be [N], got shape {y.shape}.")
    if scores.shape[0] != y.shape[0]:
        raise ValueError(f"logits have {scores.shape[0]} rows but labels have length {y.shape[0]}.")
    if y.shape[0] == 0:
        raise ValueError("accuracy of an empty set is undefined (0 samples).")
    return float(100.0 * np.mean(np.argmax(scores, axis=-1) == y))


def unlearning_metrics(
    forget_logits: ArrayLike,
    forget_labels: ArrayLike,
    retain_logits: ArrayLike,
    retain_labels: ArrayLike,
    test_logits: ArrayLike,
    test_labels: ArrayLike,
    mia_efficacy: float,
) -> dict[str, float]:
    """The four numbers of the paper's tables, all in percent.

    Args:
      forget_logits, forget_labels: model outputs on D_f and their *true* labels.
      retain_logits, retain_labels: outputs on D_r and labels.
      test_logits, test_labels: outputs on the test set (for class-wise forgetting, without the
        forgotten class, as upstream) and labels.
      mia_efficacy: MIA-Efficacy **in percent** (e.g. from `mia.mia_efficacy`).

    Returns:
      `{"UA": 100 - forget acc, "RA": retain acc, "TA": test acc, "MIA": mia_efficacy}`.

    Raises:
      ValueError: on bad arrays (see `accuracy`) or an MIA value outside [0, 100].

    References:
      reference-salun.md Sec. 4.1 (UA = 100 - forget accuracy with true labels).
    """
    mia = float(mia_efficacy)
    if not 0.0 <= mia <= 100.0:
        raise ValueError(f"mia_efficacy must be a percentage in [0, 100], got {mia}.")
    return {
        "UA": 100.0 - accuracy(forget_logits, forget_labels),
        "RA": accuracy(retain_logits, retain_labels),
        "TA": accuracy(test_logits, test_labels),
        "MIA": mia,
    }


def gaps(
    metrics: Mapping[str, float],
    reference: Mapping[str, float],
    keys: Sequence[str] = METRIC_KEYS,
) -> dict[str, float]:
    """Per-key absolute gaps `|metrics[k] - reference[k]|`.

    Raises:
      ValueError: naming the keys missing from `metrics` or `reference`.
    """
    keys = tuple(keys)
    if not keys:
        raise ValueError("keys is empty.")
    missing_metrics = [k for k in keys if k not in metrics]
    missing_reference = [k for k in keys if k not in reference]
    if missing_metrics or missing_reference:
        raise ValueError(
            f"Missing keys: metrics lacks {missing_metrics}, reference lacks {missing_reference} "
            f"(needed: {list(keys)})."
        )
    return {k: abs(float(metrics[k]) - float(reference[k])) for k in keys}


def avg_gap(
    metrics: Mapping[str, float],
    reference: Mapping[str, float],
    keys: Sequence[str] = METRIC_KEYS,
) -> float:
    """Avg. Gap: the mean over `keys` of `|metrics[k] - reference[k]|` (reference = Retrain).

    Example: the paper's FT row against Retrain (Table 1, 10% random) gives
    mean(4.61, 10.75, 0.12, 0.20) = 3.92.

    Raises:
      ValueError: naming the keys missing from `metrics` or `reference`.

    References:
      SalUn Table 1 "Avg. Gap"; reference-salun.md Sec. 4.3 (computed in the paper, not the code).
    """
    per_key = gaps(metrics, reference, keys)
    return float(np.mean(list(per_key.values())))


class Stopwatch:
    """Wall-clock seconds of a block; `block(x)` waits for JAX's async dispatch to finish.

    JAX returns before device work ends, so block on the block's result before the clock stops.
    To report run time without compilation, compile first (a warm-up call or `.lower().compile()`)
    and time only the steady-state work.

    Examples:
      >>> import jax.numpy as jnp
      >>> with Stopwatch() as sw:
      ...     y = sw.block(jnp.ones(3) * 2)
      >>> sw.seconds >= 0.0
      True
    """

    def __init__(self) -> None:
        self.seconds: float | None = None
        self._start: float | None = None

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def block(self, result: Any) -> Any:
        """`jax.block_until_ready(result)`, returned; call it on the block's output."""
        return jax.block_until_ready(result)

    def __exit__(self, *exc_info) -> None:
        self.seconds = time.perf_counter() - self._start


Timer = Stopwatch  # alias; `Stopwatch` is the name to use.


def timed(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, float]:
    """Calls `fn(*args, **kwargs)`, blocks on its result, returns `(result, seconds)`."""
    with Stopwatch() as sw:
        result = sw.block(fn(*args, **kwargs))
    return result, sw.seconds
