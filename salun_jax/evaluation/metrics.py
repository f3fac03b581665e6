"""Unlearning metrics from model outputs: top-1 accuracy and Avg. Gap.

No model code lives here: callers run the model and pass logits (or probabilities) and labels.

References:
  SalUn (Fan et al., ICLR 2024), Sec. 5 and Table 1; upstream `Classification/main_forget.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
      SalUn Table 1 "Avg. Gap" (computed in the paper, not the code).
    """
    per_key = gaps(metrics, reference, keys)
    return float(np.mean(list(per_key.values())))
