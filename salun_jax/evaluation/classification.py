"""A classifier's predictions and the paper's metrics after unlearning: UA / RA / TA /
MIA-Efficacy (SalUn Sec. 5; upstream `Classification/main_forget.py` evaluation).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from salun_jax.data.augment import to_float
from salun_jax.data.splits import Split
from salun_jax.evaluation.metrics import accuracy
from salun_jax.evaluation.mia import from_logits, stratified_shadow_indices, svc_mia
from salun_jax.evaluation.mia import loss_mia as _loss_mia
from salun_jax.models import conv


@functools.cache
def make_predict_fn(apply_fn: Callable, return_features: bool = False) -> Callable:
    """Jitted eval-mode forward on uint8 images: (variables, images) -> logits [, features].

    Cached: the same `apply_fn` (see `salun_jax.step.canonical_module`) gives the same jitted
    function, compiled once per input shape in a process; with the CPU's convolution options
    (`salun_jax.models.conv.compiler_options`), as the training steps."""

    @conv.jit
    def predict_fn(variables, images):
        return apply_fn(
            variables,
            to_float(images),
            train=False,
            **({"return_features": True} if return_features else {}),
        )

    return predict_fn


def predict(
    predict_fn: Callable, variables: Any, images: np.ndarray, batch_size: int = 1000
) -> Any:
    """Runs `predict_fn` over `images` in fixed-size batches (last one padded: one compile)."""
    n = len(images)
    if n == 0:
        raise ValueError("predict got no images")
    outputs = []
    for start in range(0, n, batch_size):
        chunk = np.asarray(images[start : start + batch_size])
        valid = len(chunk)
        if valid < batch_size and n > batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - valid, 0)])
        outputs.append(jax.tree.map(lambda x, v=valid: x[:v], predict_fn(variables, chunk)))
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *outputs)


def model_accuracy(
    predict_fn: Callable,
    variables: Any,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int = 1000,
) -> float:
    """Top-1 accuracy in percent of a model (through `predict_fn`) on images."""
    return accuracy(predict(predict_fn, variables, images, batch_size), labels)


def evaluate_unlearning(
    predict_fn: Callable,
    variables: Any,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    split: Split,
    mia_kinds: Sequence[str] = ("confidence",),
    m_entropy: str = "fixed",
    shadow_seed: int | None = None,
    loss_mia: bool = False,
    also_first_n: bool = False,
) -> dict[str, Any]:
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
      also_first_n: with a `shadow_seed`, also report "MIA_first_n", the confidence MIA with
        upstream's first-n shadow sets on the same model (the class-skew bias, before vs after).

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

    def confidence_mia(member, nonmember, kinds):
        return svc_mia(
            from_logits(retain_logits[member]),
            retain_y[member],
            from_logits(test_logits[nonmember]),
            test_y[nonmember],
            from_logits(forget_logits),
            train_labels[split.forget],
            kinds=kinds,
            m_entropy=m_entropy,
        )

    # Upstream's shadow sets: the first |test| retain samples vs the whole test set (balanced,
    # since retain is larger there). When retain is the smaller set, both sides take the first
    # n = |retain|, so the SVC's classes stay balanced (an imbalanced SVC predicts the majority
    # everywhere).
    first_n = np.arange(min(len(split.test), len(split.retain)))
    if shadow_seed is None:
        member, nonmember = first_n, first_n
    else:
        member, nonmember = stratified_shadow_indices(retain_y, test_y, shadow_seed)
    mia = confidence_mia(member, nonmember, tuple(mia_kinds))
    metrics = {
        "UA": 100.0 - accuracy(forget_logits, train_labels[split.forget]),
        "RA": accuracy(retain_logits, train_labels[split.retain]),
        "TA": accuracy(test_logits, test_y),
        "MIA": 100.0 * mia["confidence"],
        "MIA_all": {kind: 100.0 * value for kind, value in mia.items()},
    }
    if shadow_seed is not None:
        metrics["shadow_seed"] = int(shadow_seed)
        if also_first_n:
            metrics["MIA_first_n"] = (
                100.0 * confidence_mia(first_n, first_n, ("confidence",))["confidence"]
            )
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


def evaluate(
    state, task, test_images: np.ndarray, test_labels: np.ndarray, **options
) -> dict[str, Any]:
    """`evaluate_unlearning` of a train state on a task (`task`: images, labels, split), the
    test arrays indexed by the split's test indices. `options` go to `evaluate_unlearning`."""
    return evaluate_unlearning(
        make_predict_fn(state.apply_fn),
        state.variables,
        task.images,
        task.labels,
        test_images,
        test_labels,
        task.split,
        **options,
    )
