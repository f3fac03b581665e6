"""Per-example audits of unlearning over populations of models: U-LiRA, KLoM, weight space.

Population metrics such as the SVC MIA-Efficacy ask whether the forget set *as a whole* looks
unseen. These ask it per example, against many retrained models:

  - U-LiRA (Hayes et al., "Inexact Unlearning Needs More Careful Evaluations to Avoid a False
    Sense of Privacy", SaTML 2025): for each example, Gaussians fitted to the logit-scaled
    confidences of shadow models that trained on it and then unlearned it, and of shadow models
    that never trained on it; a target model's likelihood ratio between the two is the attack's
    score. Reported as AUC and TPR at low FPR over target models of both kinds. An exact
    unlearning method (Retrain) sits at chance.
  - KLoM (Georgiev et al., "Attribute-to-Delete: Machine Unlearning via Datamodel Matching",
    2024): for each example, the KL divergence between the distribution of its margin over
    unlearned models and over retrained models (binned). 0 when the two agree.
  - Tug of War (Zhao et al., "What makes unlearning hard and what to do about it", NeurIPS
    2024): the product over forget, retain and test data of 1 - |accuracy difference| to
    Retrain. 1 when the unlearned model's accuracies are Retrain's.
  - Weight space: the L2 distance between models and the loss barrier along the line between
    them (linear mode connectivity).

All are pure numpy on arrays the caller gets from populations (`population_logits`): arrays of
shape [models, examples]; NaN marks a model that does not count for an example (e.g. a shadow
model that never held it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from sklearn import metrics

from salun_jax.types import PyTree

# Hayes et al. report these FPRs; KLoM's reference code uses 20 bins, a floor of 1e-5 and clips
# margins to [-100, 100].
LOW_FPRS = (0.01, 0.001)
KLOM_BINS = 20
KLOM_FLOOR = 1e-5
KLOM_CLIP = 100.0


def margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The margin of the true class, logit_y - logsumexp_{k != y} logit_k, for logits [..., E, K]
    and labels [E]: the logit-scaled confidence log(p_y / (1 - p_y)) of LiRA and the margin of
    KLoM, computed without forming p_y (stable for confident models). Returns [..., E]."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    if logits.ndim < 2 or labels.shape != logits.shape[-2:-1]:
        raise ValueError(
            f"margins: logits [..., E, K] and labels [E], got {logits.shape} and {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[-1]):
        raise ValueError(f"margins: labels must be in [0, {logits.shape[-1]})")
    index = np.broadcast_to(labels[:, None], (*logits.shape[:-1], 1))
    true = np.take_along_axis(logits, index, axis=-1)[..., 0]
    others = logits.copy()
    np.put_along_axis(others, index, -np.inf, axis=-1)
    peak = np.max(others, axis=-1)
    rest = peak + np.log(np.sum(np.exp(others - peak[..., None]), axis=-1))
    return true - rest


def _check_models_by_examples(name: str, array: np.ndarray, examples: int | None = None):
    array = np.asarray(array, np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be [models, examples], got shape {array.shape}")
    if examples is not None and array.shape[1] != examples:
        raise ValueError(f"{name} has {array.shape[1]} examples, expected {examples}")
    return array


def gaussian_log_ratio(
    scores: np.ndarray, in_scores: np.ndarray, out_scores: np.ndarray, min_std: float = 1e-3
) -> np.ndarray:
    """Per example, log N(s; mu_in, sd_in) - log N(s; mu_out, sd_out) for each target score s.

    Args:
      scores: [T, E] the target models' scores (NaN: not a target for that example).
      in_scores: [S_in, E] shadow scores of the "in" hypothesis (U-LiRA: trained on the example,
        then unlearned); NaN where a shadow model does not count for the example.
      out_scores: [S_out, E] shadow scores of the "out" hypothesis (never trained on it).
      min_std: floor of the fitted standard deviations.

    Returns:
      [T, E] log likelihood ratios; NaN where a score is NaN or either hypothesis has fewer than
      two shadow scores for that example.
    """
    scores = _check_models_by_examples("scores", scores)
    examples = scores.shape[1]
    in_scores = _check_models_by_examples("in_scores", in_scores, examples)
    out_scores = _check_models_by_examples("out_scores", out_scores, examples)

    def fit(samples):
        count = np.sum(~np.isnan(samples), axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.nansum(samples, axis=0) / count
            var = np.nansum((samples - mean) ** 2, axis=0) / (count - 1)
        std = np.maximum(np.sqrt(var), min_std)
        return np.where(count >= 2, mean, np.nan), std

    def log_density(x, mean, std):
        return -0.5 * ((x - mean) / std) ** 2 - np.log(std)  # the shared 0.5 log 2 pi cancels

    mean_in, std_in = fit(in_scores)
    mean_out, std_out = fit(out_scores)
    return log_density(scores, mean_in, std_in) - log_density(scores, mean_out, std_out)


def _scores_of_both_kinds(positive, negative) -> tuple[np.ndarray, np.ndarray]:
    positive = np.asarray(positive, np.float64).ravel()
    negative = np.asarray(negative, np.float64).ravel()
    positive, negative = positive[~np.isnan(positive)], negative[~np.isnan(negative)]
    if not len(positive) or not len(negative):
        raise ValueError(
            f"attack_metrics needs scores of both kinds, got {len(positive)} positive and "
            f"{len(negative)} negative"
        )
    truth = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
    return truth, np.concatenate([positive, negative])


def roc_curve(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of an attack whose scores are higher for `positive` cases (NaN dropped)."""
    truth, scores = _scores_of_both_kinds(positive, negative)
    fpr, tpr, _ = metrics.roc_curve(truth, scores)
    return fpr, tpr


def attack_metrics(
    positive: np.ndarray, negative: np.ndarray, fprs: Sequence[float] = LOW_FPRS
) -> dict[str, float]:
    """AUC and the TPR at each FPR in `fprs` (the largest TPR whose FPR does not exceed it) of
    an attack whose scores are higher for `positive` cases; NaN scores are dropped."""
    truth, scores = _scores_of_both_kinds(positive, negative)
    fpr, tpr, _ = metrics.roc_curve(truth, scores)
    out = {"auc": float(metrics.roc_auc_score(truth, scores))}
    for target in fprs:
        out[f"tpr_at_{target:g}_fpr"] = float(np.max(tpr[fpr <= target]))
    out["num_positive"], out["num_negative"] = int(truth.sum()), int(len(truth) - truth.sum())
    return out


def ulira_scores(
    unlearned_targets: np.ndarray,
    retrained_targets: np.ndarray,
    unlearned_shadows: np.ndarray,
    retrained_shadows: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """U-LiRA's attack scores (`ulira`'s arguments): (positive, negative), the
    `gaussian_log_ratio` of the unlearned and of the retrained targets, [T_u, E] and [T_r, E]."""
    examples = np.shape(unlearned_targets)[-1]
    unlearned_shadows = _check_models_by_examples("unlearned_shadows", unlearned_shadows, examples)
    retrained_shadows = _check_models_by_examples("retrained_shadows", retrained_shadows, examples)
    positive = gaussian_log_ratio(unlearned_targets, unlearned_shadows, retrained_shadows)
    negative = gaussian_log_ratio(retrained_targets, unlearned_shadows, retrained_shadows)
    return positive, negative


def ulira(
    unlearned_targets: np.ndarray,
    retrained_targets: np.ndarray,
    unlearned_shadows: np.ndarray,
    retrained_shadows: np.ndarray,
    fprs: Sequence[float] = LOW_FPRS,
) -> dict[str, float]:
    """U-LiRA: can an attacker tell, per example, a model that trained on it and unlearned it
    from one that never trained on it?

    Each argument is [models, examples] of logit-scaled confidences (`margins`), NaN where the
    model does not count for the example. Targets and shadows are different models. Scores are
    `gaussian_log_ratio` of each target against the shadows; the attack's positives are the
    unlearned targets. Returns `attack_metrics`: AUC 0.5 and TPR = FPR at chance."""
    positive, negative = ulira_scores(
        unlearned_targets, retrained_targets, unlearned_shadows, retrained_shadows
    )
    return attack_metrics(positive, negative, fprs)


def klom(
    unlearned: np.ndarray,
    retrained: np.ndarray,
    bins: int = KLOM_BINS,
    floor: float = KLOM_FLOOR,
    clip: float = KLOM_CLIP,
) -> np.ndarray:
    """KLoM per example: KL(P_unlearned || P_retrained) between the histograms of its margin over
    the unlearned models [N_u, E] and the retrained ones [N_r, E], on `bins` equal bins spanning
    both sets' values (clipped to [-clip, clip]); retrained bin probabilities are floored at
    `floor` where the unlearned ones are positive. Returns [E], >= 0; 0 where they agree."""
    unlearned = _check_models_by_examples("unlearned", unlearned)
    retrained = _check_models_by_examples("retrained", retrained, unlearned.shape[1])
    if bins < 1:
        raise ValueError(f"klom: bins must be >= 1, got {bins}")
    unlearned, retrained = np.clip(unlearned, -clip, clip), np.clip(retrained, -clip, clip)
    low = np.minimum(unlearned.min(0), retrained.min(0))
    high = np.maximum(unlearned.max(0), retrained.max(0))
    high = np.where(high > low, high, low + 1.0)

    def histogram(values):  # [N, E] -> [bins, E] probabilities
        index = np.floor((values - low) / (high - low) * bins).astype(int)
        index = np.clip(index, 0, bins - 1)  # the maximum falls in the last bin
        counts = np.stack([np.sum(index == b, axis=0) for b in range(bins)])
        return counts / values.shape[0]

    p, q = histogram(unlearned), histogram(retrained)
    q = np.where(p > 0, np.maximum(q, floor), q)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / q), 0.0)
    return np.sum(terms, axis=0)


def l2_distance(params_a: PyTree, params_b: PyTree) -> float:
    """The Euclidean distance between two models' weights (same structure)."""
    leaves_a, tree_a = jax.tree.flatten(params_a)
    leaves_b, tree_b = jax.tree.flatten(params_b)
    if tree_a != tree_b:
        raise ValueError("l2_distance: the two parameter trees differ in structure")
    total = sum(
        float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
        for a, b in zip(leaves_a, leaves_b, strict=True)
    )
    return math.sqrt(total)


def interpolate(params_a: PyTree, params_b: PyTree, alpha: float) -> PyTree:
    """(1 - alpha) * a + alpha * b, leaf by leaf."""
    return jax.tree.map(lambda a, b: (1.0 - alpha) * a + alpha * b, params_a, params_b)


def loss_barrier(alphas: Sequence[float], losses: Sequence[float]) -> float:
    """The loss barrier along a line between two models: max over alpha of
    L(alpha) - ((1 - alpha) L(0) + alpha L(1)), from losses measured at `alphas` (which include
    0 and 1). 0 for linearly connected models; larger when a ridge separates them."""
    alphas = np.asarray(alphas, np.float64)
    losses = np.asarray(losses, np.float64)
    if alphas.shape != losses.shape or alphas.ndim != 1:
        raise ValueError(f"loss_barrier: alphas and losses of one shape, got {alphas.shape}")
    if not (np.any(alphas == 0.0) and np.any(alphas == 1.0)):
        raise ValueError("loss_barrier: alphas must include 0 and 1 (the two models)")
    start, end = losses[alphas == 0.0][0], losses[alphas == 1.0][0]
    return float(np.max(losses - ((1.0 - alphas) * start + alphas * end)))


def tug_of_war(accuracies: Sequence[float], reference: Sequence[float]) -> float:
    """Tug of War: prod_i (1 - |a_i - r_i| / 100) over the (forget, retain, test) accuracies in
    percent of an unlearned model (`accuracies`) and of Retrain (`reference`). In [0, 1]; 1 means
    Retrain's accuracies on all three sets."""
    a = np.asarray(accuracies, np.float64)
    r = np.asarray(reference, np.float64)
    if a.shape != (3,) or r.shape != (3,):
        raise ValueError(
            f"tug_of_war: (forget, retain, test) accuracies, got shapes {a.shape} and {r.shape}"
        )
    if np.any((a < 0) | (a > 100) | (r < 0) | (r > 100)) or not np.all(np.isfinite(a + r)):
        raise ValueError(f"tug_of_war: accuracies in percent, got {a.tolist()}, {r.tolist()}")
    return float(np.prod(1.0 - np.abs(a - r) / 100.0))
