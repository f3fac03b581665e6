"""UA / RA / TA / MIA-Efficacy of a classifier after unlearning (reference-salun.md §4)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from salun_jax.data.splits import Split
from salun_jax.evaluation.metrics import accuracy
from salun_jax.evaluation.mia import from_logits, stratified_shadow_indices, svc_mia
from salun_jax.evaluation.mia import loss_mia as _loss_mia
from salun_jax.train import predict


def evaluate_unlearning(predict_fn: Callable, variables: Any, train_images: np.ndarray,
                        train_labels: np.ndarray, test_images: np.ndarray,
                        test_labels: np.ndarray, split: Split,
                        mia_kinds: Sequence[str] = ("confidence",),
                        m_entropy: str = "fixed", shadow_seed: int | None = None,
                        loss_mia: bool = False) -> dict[str, Any]:
    """The paper's metrics, in percent.

    UA = 100 - accuracy on D_f; RA on D_r; TA on the split's test indices (class-wise runs drop the
    forgotten class); MIA = 100 * the `confidence` SVC's share of D_f predicted non-member, the SVC
    trained on n = min(|retain|, |test|) retain samples (members) vs n test samples.

    Args:
      shadow_seed: None (default, upstream): the shadow sets are the first n retain and the first
        n test samples in index order, which is class-skewed when the data are stored sorted by
        class. An int: a random class-stratified draw (`stratified_shadow_indices`) from that
        seed; pass the split seed so that every method of a seed sees the same shadow sets.
      loss_mia: also run the challenge starting kit's loss-threshold attack (`mia.loss_mia`, forget
        vs test cross-entropy, seeded with `shadow_seed` or 0).

    Returns:
      {"UA", "RA", "TA", "MIA"} floats, plus "MIA_all" {kind: percent} for `mia_kinds`;
      "shadow_seed" when one is given; "MIA_loss" (attack accuracy, percent) when `loss_mia`.
    """
    if "confidence" not in mia_kinds:
        mia_kinds = ("confidence", *mia_kinds)
    test_x, test_y = test_images[split.test], test_labels[split.test]
    forget_logits = predict(predict_fn, variables, train_images[split.forget])
    retain_logits = predict(predict_fn, variables, train_images[split.retain])
    test_logits = predict(predict_fn, variables, test_x)
    retain_y = train_labels[split.retain]
    if shadow_seed is None:
        # Upstream: the first |test| retain samples vs the whole test set (balanced, since retain
        # is larger there). When retain is the smaller set, both sides take the first n = |retain|,
        # so the SVC's classes stay balanced (an imbalanced SVC predicts the majority everywhere).
        n = min(len(split.test), len(split.retain))
        member, nonmember = np.arange(n), np.arange(n)
    else:
        member, nonmember = stratified_shadow_indices(retain_y, test_y, shadow_seed)
    mia = svc_mia(from_logits(retain_logits[member]), retain_y[member],
                  from_logits(test_logits[nonmember]), test_y[nonmember],
                  from_logits(forget_logits), train_labels[split.forget],
                  kinds=tuple(mia_kinds), m_entropy=m_entropy)
    metrics = {
        "UA": 100.0 - accuracy(forget_logits, train_labels[split.forget]),
        "RA": accuracy(retain_logits, train_labels[split.retain]),
        "TA": accuracy(test_logits, test_y),
        "MIA": 100.0 * mia["confidence"],
        "MIA_all": {kind: 100.0 * value for kind, value in mia.items()},
    }
    if shadow_seed is not None:
        metrics["shadow_seed"] = int(shadow_seed)
    if loss_mia:
        forget_losses = _cross_entropy(forget_logits, train_labels[split.forget])
        test_losses = _cross_entropy(test_logits, test_y)
        seed = 0 if shadow_seed is None else shadow_seed
        metrics["MIA_loss"] = 100.0 * _loss_mia(forget_losses, test_losses, seed)
    return metrics


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example softmax cross-entropy in float64: `logsumexp(z) - z_y`, `[N]`."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=1, keepdims=True)
    log_normalizer = np.log(np.exp(z - top).sum(axis=1)) + top[:, 0]
    return log_normalizer - z[np.arange(z.shape[0]), labels]
