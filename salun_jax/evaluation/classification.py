"""A classifier's predictions and the paper's metrics after unlearning: UA / RA / TA /
MIA-Efficacy (SalUn Sec. 5; upstream `Classification/main_forget.py` evaluation).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from salun_jax import validation
from salun_jax.data.augment import to_float
from salun_jax.data.splits import Split, check_split_fits
from salun_jax.evaluation.metrics import accuracy
from salun_jax.evaluation.mia import from_logits, stratified_shadow_indices, svc_mia
from salun_jax.evaluation.mia import loss_mia as _loss_mia


@functools.cache
def make_predict_fn(apply_fn: Callable, return_features: bool = False) -> Callable:
    """Jitted eval-mode forward on uint8 images: (variables, images) -> logits [, features].

    Cached: the same `apply_fn` (see `salun_jax.step.canonical_module`) gives the same jitted
    function, compiled once per input shape in a process."""

    @jax.jit
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


class NonFiniteOutputsError(ValueError):
    """The model's outputs are NaN or infinite: its weights are finite but too large to use (a
    diverged run whose last update the training loop's checks could not see)."""


def _check_finite(*logits: np.ndarray) -> None:
    bad = sum(int(np.sum(~np.all(np.isfinite(x), axis=-1))) for x in logits)
    if bad:
        total = sum(len(x) for x in logits)
        raise NonFiniteOutputsError(
            f"non-finite outputs (NaN or infinite logits) on {bad} of {total} images: the "
            "weights diverged; lower the learning rate"
        )


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
    mia_shadow: str = "stratified",
) -> dict[str, Any]:
    """The paper's metrics, in percent.

    UA = 100 - accuracy on D_f; RA on D_r; TA on the split's test indices (class-wise runs drop the
    forgotten class); MIA = 100 * the `confidence` SVC's share of D_f predicted non-member, the SVC
    trained on n = min(|retain|, |test|) retain samples (members) vs n test samples.

    Args:
      mia_shadow: the MIA's shadow sets. "stratified" (default, as the pipeline): a random
        class-stratified draw of retain and test samples (`stratified_shadow_indices`) from
        `shadow_seed`. "first_n" (upstream): the first n retain and the first n test samples in
        index order, which is class-skewed when the data are stored sorted by class.
      shadow_seed: the stratified draw's seed; None: the split's seed, so every method of a split
        sees the same shadow sets (ignored by "first_n").
      loss_mia: also run the challenge starting kit's loss-threshold attack (`mia.loss_mia`, forget
        vs test cross-entropy, seeded with the shadow seed, or 0 for "first_n").
      also_first_n: with "stratified", also report "MIA_first_n", the confidence MIA with
        upstream's first-n shadow sets on the same model (the class-skew bias, before vs after).

    Returns:
      {"UA", "RA", "TA", "MIA"} floats, plus "MIA_all" {kind: percent} for `mia_kinds`;
      "shadow_seed" with "stratified" shadow sets; "MIA_loss" (attack accuracy, percent) when
      `loss_mia`.

    Raises:
      NonFiniteOutputsError: the model's logits are NaN or infinite on some image.
      ValueError: before any prediction, a bad argument: images not uint8 [N, H, W, C] (as
        `load_dataset` gives them; `predict_fn` scales them) or of other [H, W, C] in train and
        test; labels not 1-D non-negative integer class ids, one per image; split indices
        outside these arrays (the split's records are `evaluate`'s check: tuning passes a
        validation split whose "test" indices point into the train arrays).
    """
    check_evaluation_data(train_images, train_labels, test_images, test_labels)
    check_split_fits(split, train_labels, test_labels, records=False)
    if mia_shadow not in ("stratified", "first_n"):
        raise ValueError(f"mia_shadow must be 'stratified' or 'first_n', got {mia_shadow!r}")
    if mia_shadow == "first_n" or shadow_seed is None:
        shadow_seed = None if mia_shadow == "first_n" else int(split.description.get("seed", 0))
    if "confidence" not in mia_kinds:
        mia_kinds = ("confidence", *mia_kinds)
    test_x, test_y = test_images[split.test], test_labels[split.test]
    forget_logits = predict(predict_fn, variables, train_images[split.forget])
    retain_logits = predict(predict_fn, variables, train_images[split.retain])
    test_logits = predict(predict_fn, variables, test_x)
    _check_finite(forget_logits, retain_logits, test_logits)
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

    # Upstream's shadow sets: the first n = min(|test|, |retain|) of each, so the SVC's classes
    # stay balanced (an imbalanced SVC predicts the majority everywhere).
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


def check_evaluation_data(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int | None = None,
    train_names: tuple[str, str] = ("train_images", "train_labels"),
) -> None:
    """The image and label checks of `evaluate_unlearning` / `evaluate` (labels in
    [0, num_classes) when it is given); `train_names` name the train arrays in messages."""
    images_name, labels_name = train_names
    n = validation.check_images_uint8(images_name, train_images)[0]
    m = validation.check_images_uint8("test_images", test_images)[0]
    validation.check_same_image_shape("test_images", test_images, images_name, train_images)
    validation.check_labels(labels_name, train_labels, num_classes, n)
    validation.check_labels("test_labels", test_labels, num_classes, m)


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
    test arrays indexed by the split's test indices. `options` go to `evaluate_unlearning`.

    Raises:
      ValueError: test images not uint8 [M, H, W, C] of the task's [H, W, C]; test labels not
        class ids in [0, task.num_classes), one per image; a split that was made for other data
        (its test indices outside the test arrays, or its recorded sizes or labels digest not
        those of the task's and these labels: `salun_jax.data.splits.SplitMismatchError`).
    """
    check_evaluation_data(
        task.images,
        task.labels,
        test_images,
        test_labels,
        task.num_classes,
        ("task.images", "task.labels"),
    )
    check_split_fits(task.split, task.labels, test_labels)
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
