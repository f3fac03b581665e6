"""UA / RA / TA / MIA-Efficacy of a classifier after unlearning (reference-salun.md §4)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from salun_jax.data.splits import Split
from salun_jax.evaluation.metrics import accuracy
from salun_jax.evaluation.mia import from_logits, svc_mia
from salun_jax.train import predict


def evaluate_unlearning(predict_fn: Callable, variables: Any, train_images: np.ndarray,
                        train_labels: np.ndarray, test_images: np.ndarray,
                        test_labels: np.ndarray, split: Split,
                        mia_kinds: Sequence[str] = ("confidence",),
                        m_entropy: str = "fixed") -> dict[str, Any]:
    """The paper's metrics, in percent.

    UA = 100 - accuracy on D_f; RA on D_r; TA on the split's test indices (class-wise runs drop the
    forgotten class); MIA = 100 * the `confidence` SVC's share of D_f predicted non-member, the SVC
    trained on the first |test| retain samples (members, index order) vs the test set (both cut to
    the smaller of the two sizes, so the two classes are balanced).

    Returns:
      {"UA", "RA", "TA", "MIA"} floats, plus "MIA_all" {kind: percent} for `mia_kinds`.
    """
    if "confidence" not in mia_kinds:
        mia_kinds = ("confidence", *mia_kinds)
    test_x, test_y = test_images[split.test], test_labels[split.test]
    forget_logits = predict(predict_fn, variables, train_images[split.forget])
    retain_logits = predict(predict_fn, variables, train_images[split.retain])
    test_logits = predict(predict_fn, variables, test_x)
    # Upstream: the first |test| retain samples vs the whole test set (balanced, since retain is
    # larger there). When retain is the smaller set, both sides take the first n = |retain|, so
    # the SVC's classes stay balanced (an imbalanced SVC predicts the majority class everywhere).
    n = min(len(split.test), len(split.retain))
    mia = svc_mia(from_logits(retain_logits[:n]), train_labels[split.retain][:n],
                  from_logits(test_logits[:n]), test_y[:n],
                  from_logits(forget_logits), train_labels[split.forget],
                  kinds=tuple(mia_kinds), m_entropy=m_entropy)
    return {
        "UA": 100.0 - accuracy(forget_logits, train_labels[split.forget]),
        "RA": accuracy(retain_logits, train_labels[split.retain]),
        "TA": accuracy(test_logits, test_y),
        "MIA": 100.0 * mia["confidence"],
        "MIA_all": {kind: 100.0 * value for kind, value in mia.items()},
    }
