"""Per-example audits (salun_jax.evaluation.audit) on constructed cases with known answers."""

import math

import numpy as np
import pytest
from scipy import stats

from salun_jax.evaluation import audit


def test_margins_are_the_logit_scaled_confidence_and_stay_finite():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 4))
    labels = np.array([0, 1, 2, 3, 1])
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    p_true = p[:, np.arange(5), labels]
    np.testing.assert_allclose(audit.margins(logits, labels), np.log(p_true / (1 - p_true)))
    confident = np.array([[200.0, 0.0, -5.0]])  # p_y rounds to 1: log(p/(1-p)) would be inf
    np.testing.assert_allclose(
        audit.margins(confident, np.array([0])), [200.0 - np.log1p(np.exp(-5.0))]
    )
    with pytest.raises(ValueError, match="labels must be in"):
        audit.margins(logits, np.array([0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="logits"):
        audit.margins(logits, labels[:3])


def _gaussian_populations(separation, models=200, examples=50, seed=0):
    """Per example, "in" scores ~ N(mu_e + separation, 1) and "out" scores ~ N(mu_e, 1)."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(0.0, 3.0, size=examples)  # examples differ, as real ones do
    draw = lambda shift: centre + shift + rng.normal(size=(models, examples))  # noqa: E731
    return draw(separation), draw(0.0), draw(separation), draw(0.0)


@pytest.mark.parametrize("separation", [0.5, 1.0, 2.0])
def test_ulira_on_gaussians_matches_the_analytic_roc(separation):
    # Equal variances: the likelihood ratio is monotone in the score, so the attack's AUC is
    # P(X_in > X_out) = Phi(d / sqrt 2) and its TPR at FPR f is 1 - Phi(Phi^-1(1 - f) - d).
    result = audit.ulira(*_gaussian_populations(separation))
    assert result["auc"] == pytest.approx(stats.norm.cdf(separation / math.sqrt(2)), abs=0.015)
    analytic_tpr = 1 - stats.norm.cdf(stats.norm.ppf(0.99) - separation)
    assert result["tpr_at_0.01_fpr"] == pytest.approx(analytic_tpr, abs=0.03)
    assert result["num_positive"] == result["num_negative"] == 200 * 50


def test_identical_populations_give_chance_auc_and_zero_klom():
    targets_in, targets_out, shadows_in, shadows_out = _gaussian_populations(0.0, seed=1)
    result = audit.ulira(targets_in, targets_out, shadows_in, shadows_out)
    assert result["auc"] == pytest.approx(0.5, abs=0.02)
    assert result["tpr_at_0.01_fpr"] == pytest.approx(0.01, abs=0.01)
    np.testing.assert_array_equal(audit.klom(targets_in, targets_in), 0.0)
    # Two independent draws of one distribution: small, but binning noise keeps it above 0.
    assert 0.0 < np.mean(audit.klom(targets_in, targets_out)) < 0.2
    assert np.mean(audit.klom(*_gaussian_populations(3.0)[:2])) > 1.0


def test_klom_by_hand():
    # 2 bins over [0, 1]: p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3).
    unlearned = np.array([[0.0], [0.0], [1.0], [1.0]])
    retrained = np.array([[0.0], [1.0], [1.0], [1.0]])
    np.testing.assert_allclose(audit.klom(unlearned, retrained, bins=2), [0.5 * math.log(4 / 3)])
    # A bin the retrained models never reach is floored, not infinite.
    far = audit.klom(np.array([[0.0], [1.0]]), np.array([[1.0], [1.0]]), bins=2, floor=1e-5)
    np.testing.assert_allclose(far, [0.5 * math.log(0.5 / 1e-5) + 0.5 * math.log(0.5)])
    with pytest.raises(ValueError, match="retrained has 2 examples, expected 1"):
        audit.klom(unlearned, np.zeros((4, 2)))


def test_shadow_models_that_do_not_count_are_ignored():
    # Each example "in" for half the shadow models: NaN elsewhere. The fit uses the rest only.
    targets_in, targets_out, shadows_in, shadows_out = _gaussian_populations(1.0, seed=2)
    half = np.zeros_like(shadows_in, bool)
    half[::2, ::2] = half[1::2, 1::2] = True
    masked = audit.ulira(
        targets_in,
        targets_out,
        np.where(half, shadows_in, np.nan),
        np.where(~half, shadows_out, np.nan),
    )
    assert masked["auc"] == pytest.approx(stats.norm.cdf(1 / math.sqrt(2)), abs=0.02)
    lone = np.full((3, 1), np.nan)
    lone[0] = 1.0  # one shadow score: no Gaussian, NaN ratio
    ratio = audit.gaussian_log_ratio(np.zeros((2, 1)), lone, np.zeros((3, 1)))
    assert np.isnan(ratio).all()


def test_gaussian_log_ratio_by_hand():
    # in: scores {1, 3} (mean 2, sd sqrt 2); out: {-1, 1} (mean 0, sd sqrt 2); at s = 1 the two
    # densities are equal; at s = 2 the ratio is (0 - (2/sqrt 2)^2 / 2) - 0 ... = 1.
    ratio = audit.gaussian_log_ratio(
        np.array([[1.0], [2.0]]), np.array([[1.0], [3.0]]), np.array([[-1.0], [1.0]])
    )
    np.testing.assert_allclose(ratio[:, 0], [0.0, 1.0])


def test_weight_distance_and_loss_barrier():
    a = {"w": np.array([0.0, 0.0]), "b": np.array([1.0])}
    b = {"w": np.array([3.0, 4.0]), "b": np.array([1.0])}
    assert audit.l2_distance(a, b) == 5.0
    np.testing.assert_allclose(audit.interpolate(a, b, 0.5)["w"], [1.5, 2.0])
    assert audit.loss_barrier([0.0, 0.5, 1.0], [1.0, 3.0, 1.0]) == 2.0
    assert audit.loss_barrier([0.0, 0.25, 0.5, 1.0], [1.0, 1.5, 2.0, 3.0]) == 0.0  # a line
    with pytest.raises(ValueError, match="include 0 and 1"):
        audit.loss_barrier([0.0, 0.5], [1.0, 2.0])
    with pytest.raises(ValueError, match="differ in structure"):
        audit.l2_distance(a, {"w": a["w"]})


def test_tug_of_war_by_hand():
    # (1 - 0.10) * (1 - 0.02) * (1 - 0.05) for accuracy gaps of 10, 2 and 5 points.
    assert audit.tug_of_war([90.0, 98.0, 85.0], [100.0, 100.0, 90.0]) == pytest.approx(
        0.9 * 0.98 * 0.95, abs=1e-12
    )
    assert audit.tug_of_war([12.5, 99.0, 90.0], [12.5, 99.0, 90.0]) == 1.0  # Retrain's own
    assert audit.tug_of_war([0.0, 0.0, 0.0], [100.0, 50.0, 50.0]) == 0.0
    with pytest.raises(ValueError, match="forget, retain, test"):
        audit.tug_of_war([90.0, 98.0], [100.0, 100.0])
    with pytest.raises(ValueError, match="in percent"):
        audit.tug_of_war([0.9, 0.98, 1.5e2], [1.0, 1.0, 0.9])
