"""Tests for salun_jax.evaluation.forgetting_quality against a transcription of the reference.

`_reference_*` below transcribe google-deepmind/unlearning_evaluation `metric.py` (commit ffae0ff)
step by step: one example at a time, the threshold lists built as there, the rates as float32
means over models (torch's float32 `mean`), the single-threshold grid rounded to float32 (torch's
default `linspace` dtype), then the inf / NaN / epsilon masks and `keep_inds`. The only change is
the documented one: an example where no threshold survives gets epsilon 0 (the reference raises).
"""

import math
import warnings

import numpy as np
import pytest

from salun_jax.evaluation import forgetting_quality as fq

# ------------------------------------------------------------------------------------------------
# The reference, transcribed.

_PER_UNIT = 100


def _reference_double_rates(pos, neg):
    pos_diff = pos.max() - pos.min()
    neg_diff = neg.max() - neg.min()
    smallest = neg_diff if pos_diff > neg_diff else pos_diff
    if pos_diff >= neg_diff:
        pos, neg = neg, pos
    buffer = 2.0
    width = smallest
    min_ = pos.min() + width - buffer
    max_ = pos.max() + buffer
    right = np.linspace(min_, max_, num=int(np.ceil((max_ - min_) * _PER_UNIT)))
    num_left = int(np.ceil(2 * buffer * _PER_UNIT))
    thr_left = np.concatenate(
        [np.linspace(tr - width - buffer, tr - width + buffer, num=num_left) for tr in right]
    )
    thr_right = np.tile(np.reshape(right, (-1, 1)), (1, num_left)).reshape(-1)

    def predicted_positive(c):  # [models, thresholds]
        return (thr_left[None, :] <= c[:, None]) & (c[:, None] <= thr_right[None, :])

    tpr = np.mean(predicted_positive(pos), axis=0, dtype=np.float32)
    fnr = np.mean(~predicted_positive(pos), axis=0, dtype=np.float32)
    fpr = np.mean(predicted_positive(neg), axis=0, dtype=np.float32)
    tnr = np.mean(~predicted_positive(neg), axis=0, dtype=np.float32)
    return tpr, fnr, fpr, tnr


def _reference_single_rates(pos, neg):
    all_confs = np.concatenate([pos, neg])
    min_val, max_val = all_confs.min(), all_confs.max()
    num = int(np.ceil((max_val - min_val) * _PER_UNIT))
    thresholds = np.linspace(min_val, max_val, num).astype(np.float32).astype(np.float64)
    tpr = np.mean(pos[:, None] >= thresholds[None, :], axis=0, dtype=np.float32)
    fpr = np.mean(neg[:, None] >= thresholds[None, :], axis=0, dtype=np.float32)
    tnr = np.mean(neg[:, None] < thresholds[None, :], axis=0, dtype=np.float32)
    fnr = np.mean(pos[:, None] < thresholds[None, :], axis=0, dtype=np.float32)
    return tpr, fnr, fpr, tnr


def _reference_epsilons(pos_confs, neg_confs, delta):
    epsilons = []
    for i in range(pos_confs.shape[1]):
        pos = pos_confs[:, i]
        neg = neg_confs[:, i]
        pos_diff = np.max(pos) - np.min(pos)
        neg_diff = np.max(neg) - np.min(neg)
        largest = pos_diff if pos_diff > neg_diff else neg_diff
        smallest = neg_diff if pos_diff > neg_diff else pos_diff
        with np.errstate(invalid="ignore"):
            if smallest / largest < 0.01:
                epsilons.append(50)
                continue
        rates_d = _reference_double_rates(pos, neg)
        rates_s = _reference_single_rates(pos, neg)
        tpr, fnr, fpr, tnr = (np.concatenate([d, s]) for d, s in zip(rates_d, rates_s, strict=True))
        thr_eps = np.zeros(tpr.shape[0])
        thr_eps = np.where((fpr + fnr == 0) & (tpr + tnr == 2), np.inf, thr_eps)
        thr_eps = np.where((thr_eps == 0) & (fpr * fnr == 0), np.nan, thr_eps)
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "All-NaN slice encountered"
            candidate = np.clip(
                np.nanmax(
                    [np.log(1 - delta - fpr) - np.log(fnr), np.log(1 - delta - fnr) - np.log(fpr)],
                    axis=0,
                ),
                0,
                None,
            )
        thr_eps = np.where(thr_eps == 0, candidate, thr_eps)
        kept = [te for te in thr_eps if not np.isnan(te)]
        epsilons.append(np.nanmax(kept) if kept else 0.0)  # the documented deviation
    return np.clip(epsilons, 0, 50)


def _reference_forget_score(unlearned_confs, retrained_confs, delta=1e-5):
    _, forget_set_size = retrained_confs.shape
    retrain_is_positive = np.median(retrained_confs, axis=0) > np.median(unlearned_confs, axis=0)
    pos_confs = np.where(retrain_is_positive, retrained_confs, unlearned_confs)
    neg_confs = np.where(retrain_is_positive, unlearned_confs, retrained_confs)
    eps = _reference_epsilons(pos_confs, neg_confs, delta)
    max_epsilon = np.ceil(np.log(unlearned_confs.shape[0] - 1))
    start_idx, bucket_size, points = 0, 0.5, 1
    bucket_points = {}
    while start_idx + bucket_size <= max_epsilon:
        bucket_points[start_idx] = points
        points /= 2
        start_idx += bucket_size
    score = 0
    for e in eps:
        for start, pts in bucket_points.items():
            if e < start + bucket_size:
                score += pts
                break
    return eps, score / forget_set_size


# ------------------------------------------------------------------------------------------------
# Inputs.


def _random_confidences(num_models, rng):
    """[N, n] unlearned / retrained confidences covering the regimes the rules distinguish."""
    shifts = [0.0, 0.0, 0.3, 0.7, 1.5, 3.0, 8.0, -2.0, 0.5, 1.0, 0.0, 2.0]
    scales = [1.0, 0.5, 1.0, 2.0, 1.0, 0.3, 1.0, 1.5, 0.05, 0.2, 4.0, 0.005]
    unlearned, retrained = [], []
    for shift, scale in zip(shifts, scales, strict=True):
        centre = rng.normal(0.0, 3.0)
        retrained.append(centre + rng.normal(size=num_models))
        unlearned.append(centre + shift + scale * rng.normal(size=num_models))
    # The same sample on both sides (in another model order): epsilon 0.
    same = rng.normal(size=num_models)
    retrained.append(same)
    unlearned.append(rng.permutation(same))
    # Ties between models: confidences on a 0.1 grid.
    retrained.append(np.round(rng.normal(size=num_models), 1))
    unlearned.append(np.round(0.4 + rng.normal(size=num_models), 1))
    return np.stack(unlearned, axis=1), np.stack(retrained, axis=1)


# ------------------------------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize("num_models", [8, 32, 33])
def test_matches_reference_transcription(num_models):
    rng = np.random.default_rng(num_models)
    unlearned, retrained = _random_confidences(num_models, rng)
    reference_eps, reference_score = _reference_forget_score(unlearned, retrained)
    eps = fq.per_example_epsilon(unlearned, retrained)
    # float32 rates/logs in the reference, float64 here.
    np.testing.assert_allclose(eps, reference_eps, rtol=1e-5, atol=1e-6)
    assert fq.forgetting_quality(unlearned, retrained) == pytest.approx(reference_score, abs=1e-12)
    # The inputs must exercise several buckets, the cap and the lowest bucket.
    points = fq.epsilon_points(eps, num_models)
    assert len(np.unique(points)) >= 3
    assert (eps == 50).any() and (eps < 0.5).any()


def test_identical_distributions_give_zero_epsilon_and_full_points():
    rng = np.random.default_rng(0)
    retrained = rng.normal(size=(16, 5))
    eps = fq.per_example_epsilon(retrained.copy(), retrained)
    np.testing.assert_array_equal(eps, np.zeros(5))
    assert fq.forgetting_quality(retrained.copy(), retrained) == 1.0


def test_identical_point_masses_give_zero_epsilon():
    # No threshold survives the discard rules; the reference would raise, we return 0.
    conf = np.full((8, 2), 3.0)
    np.testing.assert_array_equal(fq.per_example_epsilon(conf, conf.copy()), [0.0, 0.0])


@pytest.mark.parametrize("num_models", [8, 32])
def test_perfectly_separated_is_capped_and_scores_nothing(num_models):
    rng = np.random.default_rng(1)
    retrained = rng.normal(size=(num_models, 4))
    unlearned = retrained + 20.0  # same spread, so not "peaky"; every model on the far side
    eps = fq.per_example_epsilon(unlearned, retrained)
    np.testing.assert_array_equal(eps, np.full(4, 50.0))
    np.testing.assert_array_equal(fq.epsilon_points(eps, num_models), np.zeros(4))
    assert fq.forgetting_quality(unlearned, retrained) == 0.0


def test_peaky_unlearned_distribution_gets_the_cap():
    # Six of the eight retrained models sit where the unlearned ones do, so the threshold rules
    # find little (epsilon 0.405 at a spread ratio of 1.1%). Below a 1% ratio the reference
    # declares the unlearned side "peaky" and gives the cap regardless.
    retrained = np.array([-1.0, -0.01, -0.005, -0.001, 0.001, 0.005, 0.01, 1.0])[:, None]
    unlearned = np.linspace(-1.0, 1.0, 8)[:, None]
    eps_rules = fq.per_example_epsilon(0.011 * unlearned, retrained)[0]
    assert eps_rules == pytest.approx(math.log(1 - 1e-5 - 5 / 8) - math.log(2 / 8), rel=1e-12)
    np.testing.assert_array_equal(fq.per_example_epsilon(0.009 * unlearned, retrained), [50.0])
    # The ratio is symmetric: a peaky *retrained* side is capped too.
    np.testing.assert_array_equal(fq.per_example_epsilon(retrained, 0.009 * unlearned), [50.0])


def test_epsilon_points_buckets():
    # N = 8: ceil(ln 7) = 2, buckets [0, .5) [.5, 1) [1, 1.5) [1.5, 2) worth 1, 1/2, 1/4, 1/8.
    eps = [0.0, 0.49, 0.5, 0.99, 1.0, 1.5, 1.99, 2.0, 50.0, np.nan]
    np.testing.assert_array_equal(
        fq.epsilon_points(eps, 8), [1, 1, 0.5, 0.5, 0.25, 0.125, 0.125, 0, 0, 0]
    )
    # N = 512 (the challenge): ceil(ln 511) = 7, so 14 buckets; the last is [6.5, 7).
    np.testing.assert_array_equal(fq.epsilon_points([6.9, 7.0], 512), [2.0**-13, 0.0])


def test_epsilon_table_hand_values():
    table = fq._epsilon_table(4, 1e-5)
    assert table[4, 0] == np.inf  # tp = N, fp = 0: perfect separation
    assert table[4, 1] == fq._DISCARDED and table[3, 0] == fq._DISCARDED  # one zero rate
    assert table[0, 4] == fq._DISCARDED  # fpr = fnr = 1: both logs of a negative number
    # tp = 3, fp = 1: fpr = fnr = 1/4, epsilon = log(3/4 - 1e-5) - log(1/4).
    assert table[3, 1] == pytest.approx(math.log(0.75 - 1e-5) - math.log(0.25), rel=1e-12)
    # tp = 0, fp = 2: fnr = 1, fpr = 1/2; only the second term is defined, and it is negative.
    assert table[0, 2] == 0.0


def test_logit_scaled_confidence():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = [
        math.log(probs[0, 0]) - math.log(probs[0, 1] + probs[0, 2]),
        math.log(1 / 3) - math.log(2 / 3),
    ]
    np.testing.assert_allclose(fq.logit_scaled_confidence(logits, [0, 2]), expected, rtol=1e-12)
    np.testing.assert_allclose(
        fq.logit_scaled_confidence_from_probabilities(probs, [0, 2]), expected, rtol=1e-12
    )
    # [N_models, n, K] logits with [n] labels give [N_models, n]; saturation stays finite.
    stacked = np.stack([logits, logits + 1.0, 1e3 * logits])
    conf = fq.logit_scaled_confidence(stacked, np.array([0, 2]))
    assert conf.shape == (3, 2)
    assert conf[2, 0] == pytest.approx(-math.log(1e-45))  # p_y == 1.0: log(1) - log(1e-45)


def test_final_score_hand_computed():
    # F = 0.5; RA 90 / 95 and TA 80 / 85, per-model accuracies averaged first.
    expected = 0.5 * (90 / 95) * (80 / 85)
    assert fq.final_score(0.5, [89.0, 91.0], 95.0, 80.0, [84.0, 86.0]) == pytest.approx(expected)
    assert fq.final_score(1.0, 0.9, 0.9, 0.8, 0.8) == 1.0


@pytest.mark.parametrize(
    "unlearned, retrained, match",
    [
        (np.zeros(5), np.zeros(5), r"\[N_models, n_examples\]"),
        (np.zeros((4, 3)), np.zeros((5, 3)), "same shape"),
        (np.zeros((1, 3)), np.zeros((1, 3)), "at least 2 models"),
        (np.zeros((4, 0)), np.zeros((4, 0)), "No forget examples"),
        (np.array([[0.0, np.nan]] * 4), np.zeros((4, 2)), "NaN"),
    ],
)
def test_per_example_epsilon_rejects_bad_inputs(unlearned, retrained, match):
    with pytest.raises(ValueError, match=match):
        fq.per_example_epsilon(unlearned, retrained)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match=">= 3"):
        fq.forgetting_quality(np.arange(4.0).reshape(2, 2), np.arange(4.0).reshape(2, 2))
    with pytest.raises(ValueError, match="delta"):
        fq.per_example_epsilon(np.zeros((4, 2)), np.zeros((4, 2)), delta=0.0)
    with pytest.raises(ValueError, match="labels must lie"):
        fq.logit_scaled_confidence(np.zeros((2, 3)), [0, 3])
    with pytest.raises(ValueError, match="broadcast"):
        fq.logit_scaled_confidence(np.zeros((2, 3)), [0, 1, 2])
    with pytest.raises(ValueError, match="NaN"):
        fq.logit_scaled_confidence(np.array([[0.0, np.nan]]), [0])
    with pytest.raises(ValueError, match="NaN"):
        fq.final_score(np.nan, 1.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="denominators"):
        fq.final_score(0.5, 1.0, 0.0, 1.0, 1.0)
