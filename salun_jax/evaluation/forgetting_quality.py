"""Forgetting quality of the NeurIPS 2023 Machine Unlearning challenge (per-example epsilon).

For every forget example the challenge looks at two empirical distributions: the logit-scaled
confidence of that example under N unlearned models and under N models retrained without the
forget set. An attacker picks the best threshold rule (one threshold, or a window of two) to tell
them apart; its false positive / false negative rates give a per-example (epsilon, delta) bound.
Each example earns points by epsilon bucket (1, 1/2, 1/4, ... for buckets of width 0.5), the
forgetting quality F is the mean of those points, and the final score multiplies F by the
unlearned-to-retrained ratios of retain and test accuracy.

The rules follow `metric.py` of google-deepmind/unlearning_evaluation (commit ffae0ff), rewritten
in numpy and vectorised over examples and thresholds. Rates only take the values k / N, so every
threshold is reduced to the pair (true positive count, false positive count) and looked up in a
precomputed `[N + 1, N + 1]` epsilon table.

Where this differs from the reference (all below the resolution of the metric):
  * rates and epsilons are float64 (the reference takes float32 means and logs them in float32);
  * single-threshold grids use numpy's linspace in float64 (the reference's `torch.linspace`
    rounds them to float32);
  * if no threshold survives the discard rules, epsilon is 0 (the reference's
    `np.nanmax` of an empty array would raise). This happens, e.g., when every model gives the
    example the same confidence, i.e. when the two distributions are identical point masses.

References:
  Triantafillou et al., "Are we making progress in unlearning? Findings from the first NeurIPS
  unlearning competition" (2024), Sec. 3; the challenge's metric report
  (unlearning-challenge.github.io/assets/data/Machine_Unlearning_Metric.pdf);
  google-deepmind/unlearning_evaluation `metric.py` and `main.py`.
"""

from __future__ import annotations

import math

import numpy as np
from jax.typing import ArrayLike

DELTA = 1e-5
EPSILON_CAP = 50.0
THRESHOLDS_PER_UNIT = 100  # grid density of both threshold families, per unit of confidence
BUCKET_WIDTH = 0.5

_CONFIDENCE_FLOOR = 1e-45  # the reference adds this inside both logs of the logit scaling
_PEAKY_RATIO = 0.01  # spread ratio below which an example gets EPSILON_CAP outright
_WINDOW_BUFFER = 2.0  # how far the double-threshold grids reach beyond the peakier spread
_DISCARDED = -1.0  # table value of a threshold the reference drops (valid epsilons are >= 0)
_MAX_CHUNK_ELEMENTS = 1 << 21  # thresholds x examples held at once


# ------------------------------------------------------------------------------------------------
# 1. Logit-scaled confidences.


def logit_scaled_confidence_from_probabilities(
    probabilities: ArrayLike, labels: ArrayLike
) -> np.ndarray:
    """`log(p_y) - log(sum_{j != y} p_j)`, both logs floored by adding 1e-45, as the reference.

    The wrong-class mass is summed rather than taken as `1 - p_y`, so confident examples keep
    their precision.

    Args:
      probabilities: `[..., n, K]` class probabilities (any leading axes, e.g. models).
      labels: `[n]` integer true labels, or an integer array broadcastable to `[..., n]`.

    Returns:
      `[..., n]` float64 logit-scaled confidences.

    Raises:
      ValueError: on a rank below 2, labels that do not broadcast or lie outside `[0, K)`,
        negative or non-finite probabilities.

    References:
      unlearning_evaluation `metric.py::compute_logit_scaled_confidence` (after the softmax);
      Carlini et al., "Membership Inference Attacks From First Principles" (LiRA, 2022), Sec. IV.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim < 2:
        raise ValueError(f"probabilities must be [..., n, K], got shape {p.shape}.")
    if not np.all(np.isfinite(p)):
        raise ValueError("probabilities contain NaN or infinite values.")
    if p.size and p.min() < 0:
        raise ValueError(
            "probabilities contain negative entries; pass logits to "
            "`logit_scaled_confidence` instead."
        )
    y = _check_labels(labels, p.shape[:-1], p.shape[-1])
    one_hot = np.arange(p.shape[-1]) == y[..., None]  # [..., n, K]
    correct = np.sum(np.where(one_hot, p, 0.0), axis=-1)
    wrong = np.sum(np.where(one_hot, 0.0, p), axis=-1)
    return np.log(correct + _CONFIDENCE_FLOOR) - np.log(wrong + _CONFIDENCE_FLOOR)


def logit_scaled_confidence(logits: ArrayLike, labels: ArrayLike) -> np.ndarray:
    """The reference's logit-scaled confidence of the true class, from logits.

    Softmax in float64 after subtracting the row maximum, then
    `log(p_y + 1e-45) - log(sum_{j != y} p_j + 1e-45)`. The reference exponentiates in the
    logits' own dtype (float32 from torch) before casting to float64; here everything is float64.

    Args:
      logits: `[..., n, K]` logits, e.g. `[N_models, n, K]`.
      labels: `[n]` integer true labels (or broadcastable to `[..., n]`).

    Returns:
      `[..., n]` float64 confidences; stack per-model rows to get the `[N_models, n]` input of
      `per_example_epsilon`.

    Raises:
      ValueError: as `logit_scaled_confidence_from_probabilities`, and on non-finite logits.

    References:
      unlearning_evaluation `metric.py::compute_logit_scaled_confidence`.
    """
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"logits must be [..., n, K], got shape {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ValueError("logits contain NaN or infinite values.")
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return logit_scaled_confidence_from_probabilities(e / e.sum(axis=-1, keepdims=True), labels)


def _check_labels(labels: ArrayLike, batch_shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}.")
    try:
        y = np.broadcast_to(y, batch_shape)
    except ValueError:
        raise ValueError(
            f"labels of shape {np.shape(labels)} do not broadcast to {batch_shape}."
        ) from None
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}].")
    return y


# ------------------------------------------------------------------------------------------------
# 2. Per-example epsilon.


def _epsilon_table(num_models: int, delta: float) -> np.ndarray:
    """`[N + 1, N + 1]` epsilon of a threshold by (true positive count, false positive count).

    With `fnr = (N - tp) / N` and `fpr = fp / N`, the reference gives: inf when both are 0
    (perfect separation); discarded when exactly one is 0 ("insufficient samples"); else
    `max(log(1 - delta - fpr) - log(fnr), log(1 - delta - fnr) - log(fpr))` over the terms that
    are defined (a log of a negative number is NaN there, and an all-NaN pair is discarded),
    clipped below at 0.
    """
    tp = np.arange(num_models + 1)[:, None]
    fp = np.arange(num_models + 1)[None, :]
    fnr = (num_models - tp) / num_models
    fpr = fp / num_models
    with np.errstate(divide="ignore", invalid="ignore"):
        term_a = np.log(1.0 - delta - fpr) - np.log(fnr)
        term_b = np.log(1.0 - delta - fnr) - np.log(fpr)
    both_nan = np.isnan(term_a) & np.isnan(term_b)
    epsilon = np.clip(np.fmax(term_a, term_b), 0.0, None)  # fmax: the defined term wins
    epsilon = np.where(both_nan, _DISCARDED, epsilon)
    epsilon = np.where((fpr == 0) != (fnr == 0), _DISCARDED, epsilon)
    return np.where((fpr == 0) & (fnr == 0), np.inf, epsilon)


def _count_below(sorted_rows: np.ndarray, queries: np.ndarray, inclusive: bool) -> np.ndarray:
    """Row-wise `searchsorted`: `#{v in row : v < q}` (or `<=`) for `[B, N]` rows, `[B, ...]` q."""
    batch, num = sorted_rows.shape
    flat = queries.reshape(batch, -1)
    low = np.zeros(flat.shape, dtype=np.int64)
    high = np.full(flat.shape, num, dtype=np.int64)
    for _ in range(max(num, 1).bit_length()):  # ceil(log2(N + 1)) halvings close every interval
        mid = (low + high) // 2
        value = np.take_along_axis(sorted_rows, np.minimum(mid, num - 1), axis=1)
        go_right = (value <= flat) if inclusive else (value < flat)
        go_right &= low < high
        low = np.where(go_right, mid + 1, low)
        high = np.where(go_right, high, mid)
    return low.reshape(queries.shape)


def _linspace_rows(start: np.ndarray, stop: np.ndarray, num: np.ndarray, width: int):
    """`np.linspace(start[b], stop[b], num[b])` per row, padded to `width`; returns (grid, valid).

    Same arithmetic as numpy's linspace (`k * step + start`, last point set to `stop`), so each row
    equals the reference's per-example grid exactly.
    """
    k = np.arange(width)
    div = np.maximum(num - 1, 1)[..., None]
    grid = k * ((stop - start)[..., None] / div) + start[..., None]
    grid = np.where(k == (num - 1)[..., None], stop[..., None], grid)
    grid = np.where((num == 1)[..., None], start[..., None], grid)  # linspace(a, b, 1) == [a]
    return grid, k < num[..., None]


def _single_threshold_best(pos: np.ndarray, neg: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Best table epsilon over "confidence >= t is positive", t on a 0.01 grid over all confs.

    Args are `[B, N]` sorted rows; returns `[B]` (`_DISCARDED` where nothing survives).
    """
    num_models = pos.shape[1]
    low = np.minimum(pos[:, 0], neg[:, 0])
    high = np.maximum(pos[:, -1], neg[:, -1])
    num = np.ceil((high - low) * THRESHOLDS_PER_UNIT).astype(np.int64)
    thresholds, valid = _linspace_rows(low, high, num, max(int(num.max()), 1))  # [B, T]
    true_pos = num_models - _count_below(pos, thresholds, inclusive=False)
    false_pos = num_models - _count_below(neg, thresholds, inclusive=False)
    return np.where(valid, table[true_pos, false_pos], _DISCARDED).max(axis=1)


def _double_threshold_best(pos: np.ndarray, neg: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Best table epsilon over "l <= confidence <= r is positive", positive = the peakier set.

    The right edge r runs over a 0.01 grid from `max - 2` to `max + 2` of the peakier set; for
    each r the left edge runs over 400 points from `r - spread - 2` to `r - spread + 2`.
    Args are `[B, N]` sorted rows; returns `[B]`.
    """
    pos_spread = pos[:, -1] - pos[:, 0]
    neg_spread = neg[:, -1] - neg[:, 0]
    swap = (pos_spread >= neg_spread)[:, None]  # ties count as "pos is peakier" too
    peaky = np.where(swap, neg, pos)
    other = np.where(swap, pos, neg)
    width = peaky[:, -1] - peaky[:, 0]
    right_low = peaky[:, 0] + width - _WINDOW_BUFFER
    right_high = peaky[:, -1] + _WINDOW_BUFFER
    num_right = np.ceil((right_high - right_low) * THRESHOLDS_PER_UNIT).astype(np.int64)
    right, valid = _linspace_rows(right_low, right_high, num_right, int(num_right.max()))  # [B, R]
    num_left = math.ceil(2 * _WINDOW_BUFFER * THRESHOLDS_PER_UNIT)
    centre = right - width[:, None]
    left, _ = _linspace_rows(
        centre - _WINDOW_BUFFER, centre + _WINDOW_BUFFER, np.full(centre.shape, num_left), num_left
    )  # [B, R, L]

    def in_window(rows):
        count = _count_below(rows, right, inclusive=True)[..., None]
        return np.maximum(count - _count_below(rows, left, inclusive=False), 0)

    epsilon = table[in_window(peaky), in_window(other)]  # [B, R, L]
    return np.where(valid[..., None], epsilon, _DISCARDED).max(axis=(1, 2))


def _check_confidences(unlearned_conf: ArrayLike, retrained_conf: ArrayLike):
    unlearned = np.asarray(unlearned_conf, dtype=np.float64)
    retrained = np.asarray(retrained_conf, dtype=np.float64)
    for name, conf in (("unlearned_conf", unlearned), ("retrained_conf", retrained)):
        if conf.ndim != 2:
            raise ValueError(f"{name} must be [N_models, n_examples], got shape {conf.shape}.")
        if not np.all(np.isfinite(conf)):
            raise ValueError(f"{name} contains NaN or infinite values.")
    if unlearned.shape != retrained.shape:
        raise ValueError(
            f"unlearned_conf {unlearned.shape} and retrained_conf {retrained.shape} must have the "
            "same shape [N_models, n_examples] (the same number of models on each side)."
        )
    if unlearned.shape[0] < 2:
        raise ValueError(f"Need at least 2 models per side, got {unlearned.shape[0]}.")
    if unlearned.shape[1] == 0:
        raise ValueError("No forget examples (n_examples == 0).")
    return unlearned, retrained


def per_example_epsilon(
    unlearned_conf: ArrayLike, retrained_conf: ArrayLike, delta: float = DELTA
) -> np.ndarray:
    """The challenge's empirical epsilon of every forget example, in `[0, 50]`.

    Per example: "positive" is the side (retrained or unlearned) with the larger median (ties:
    unlearned). If the smaller max-minus-min spread of the two sides is under 1% of the larger,
    the unlearned distribution is deemed too peaky and epsilon is 50. Otherwise two families of
    decision rules are scanned, one threshold (`conf >= t` is positive, t on a 0.01 grid from the
    smallest to the largest confidence) and two (`l <= conf <= r`, the peakier side positive);
    each rule's FPR / FNR give epsilon (inf for perfect separation; rules with exactly one zero
    rate are dropped), the maximum over rules is kept, and the result is clipped to `[0, 50]`.

    Args:
      unlearned_conf: `[N_models, n_examples]` logit-scaled confidences under unlearned models.
      retrained_conf: `[N_models, n_examples]` the same under retrained models.
      delta: the delta of (epsilon, delta)-unlearning; the challenge uses 1e-5.

    Returns:
      `[n_examples]` float64 epsilons.

    Raises:
      ValueError: on shapes other than two equal `[N, n]` matrices, fewer than 2 models, no
        examples, NaN or infinite confidences, or delta outside `(0, 1)`.

    References:
      unlearning_evaluation `metric.py::_get_epsilons`, `_get_single_threshold_rates`,
      `_get_double_threshold_rates`, `compute_forget_score_from_confs`.
    """
    unlearned, retrained = _check_confidences(unlearned_conf, retrained_conf)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}.")
    num_models, num_examples = unlearned.shape
    retrain_is_positive = np.median(retrained, axis=0) > np.median(unlearned, axis=0)
    pos = np.sort(np.where(retrain_is_positive, retrained, unlearned).T, axis=1)  # [n, N]
    neg = np.sort(np.where(retrain_is_positive, unlearned, retrained).T, axis=1)

    pos_spread = pos[:, -1] - pos[:, 0]
    neg_spread = neg[:, -1] - neg[:, 0]
    with np.errstate(invalid="ignore"):  # 0 / 0 is NaN: two point masses are not "peaky"
        ratio = np.minimum(pos_spread, neg_spread) / np.maximum(pos_spread, neg_spread)
    peaky = ratio < _PEAKY_RATIO

    table = _epsilon_table(num_models, delta)
    best = np.full(num_examples, _DISCARDED)
    rest = np.flatnonzero(~peaky)
    # The double-threshold family is ~160k rules per example; chunk the examples to bound memory.
    chunk = max(1, _MAX_CHUNK_ELEMENTS // (401 * 400 + 1))
    for start in range(0, rest.size, chunk):
        rows = rest[start : start + chunk]
        best[rows] = np.maximum(
            _double_threshold_best(pos[rows], neg[rows], table),
            _single_threshold_best(pos[rows], neg[rows], table),
        )
    epsilon = np.where(best == _DISCARDED, 0.0, best)
    return np.clip(np.where(peaky, EPSILON_CAP, epsilon), 0.0, EPSILON_CAP)


# ------------------------------------------------------------------------------------------------
# 3. Points, forgetting quality and the final score.


def epsilon_points(epsilons: ArrayLike, num_models: int) -> np.ndarray:
    """Points per example: `2^-k` for epsilon in bucket `[k/2, (k+1)/2)`, 0 past the last bucket.

    The buckets cover `[0, ceil(ln(N - 1)))`, a rough bound on the epsilon that N samples per side
    can certify; e.g. N = 512 gives 14 buckets, N = 8 gives 4 (points 1, 1/2, 1/4, 1/8).

    Args:
      epsilons: `[n]` per-example epsilons (NaN earns no points, as in the reference).
      num_models: N, the number of models per side.

    Returns:
      `[n]` float64 points in `{0} U {2^-k}`.

    Raises:
      ValueError: if `num_models < 3` (then there is no bucket at all).

    References:
      unlearning_evaluation `metric.py::compute_forget_score_from_confs` (the `bucket_points` loop).
    """
    if num_models < 3:
        raise ValueError(
            f"num_models must be >= 3 for at least one epsilon bucket, got "
            f"{num_models} (buckets cover [0, ceil(ln(N - 1)))."
        )
    num_buckets = int(round(math.ceil(math.log(num_models - 1)) / BUCKET_WIDTH))
    e = np.asarray(epsilons, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bucket = np.floor(e / BUCKET_WIDTH)  # e < (k + 1) / 2 first holds at k = floor(2e)
        earns = (bucket < num_buckets) & (bucket >= 0)
    return np.where(earns, np.exp2(-np.where(earns, bucket, 0.0)), 0.0)


def forgetting_quality(
    unlearned_conf: ArrayLike, retrained_conf: ArrayLike, delta: float = DELTA
) -> float:
    """The challenge's forgetting quality F: the mean of `epsilon_points` over forget examples.

    Args:
      unlearned_conf: `[N_models, n_examples]` logit-scaled confidences under unlearned models.
      retrained_conf: `[N_models, n_examples]` the same under retrained models.
      delta: see `per_example_epsilon`.

    Returns:
      F in `[0, 1]`; 1 means every example is in the lowest epsilon bucket.

    Raises:
      ValueError: as `per_example_epsilon`, or fewer than 3 models (`epsilon_points`).

    References:
      unlearning_evaluation `metric.py::compute_forget_score_from_confs`.
    """
    epsilons = per_example_epsilon(unlearned_conf, retrained_conf, delta)
    return float(np.mean(epsilon_points(epsilons, np.shape(unlearned_conf)[0])))


def final_score(
    quality: float, ra_u: ArrayLike, ra_r: ArrayLike, ta_u: ArrayLike, ta_r: ArrayLike
) -> float:
    """`F * (RA_u / RA_r) * (TA_u / TA_r)`, accuracies averaged over models first.

    Args:
      quality: the forgetting quality F (`forgetting_quality`).
      ra_u: retain accuracy of the unlearned models (scalar or one per model).
      ra_r: retain accuracy of the retrained models.
      ta_u: test accuracy of the unlearned models.
      ta_r: test accuracy of the retrained models.
        Any consistent unit (fractions or percent); only the ratios enter.

    Returns:
      The utility-adjusted score, a Python float.

    Raises:
      ValueError: on NaN or empty inputs, negative accuracies, or a zero retrained accuracy.

    References:
      unlearning_evaluation `main.py` ("Final score (after utility adjustment)").
    """
    means = {}
    for name, value in (
        ("quality", quality),
        ("ra_u", ra_u),
        ("ra_r", ra_r),
        ("ta_u", ta_u),
        ("ta_r", ta_r),
    ):
        array = np.asarray(value, dtype=np.float64)
        if array.size == 0 or np.isnan(array).any():
            raise ValueError(f"{name} is empty or contains NaN.")
        if (array < 0).any():
            raise ValueError(f"{name} must be non-negative, got {value}.")
        means[name] = float(np.mean(array))
    if means["ra_r"] == 0 or means["ta_r"] == 0:
        raise ValueError("Retrained accuracies must be positive (they are denominators).")
    return means["quality"] * (means["ra_u"] / means["ra_r"]) * (means["ta_u"] / means["ta_r"])
