"""Tests for salun_jax.evaluation: features and SVC attack, accuracies, Avg. Gap, timing."""

import doctest
import math

import jax.numpy as jnp
import numpy as np
import pytest

from salun_jax.evaluation import metrics as metrics_module
from salun_jax.evaluation import mia

LOG_FLOOR = math.log(1e-30)  # upstream's log(0)
ln = math.log

# Hand-made probabilities: row 1 holds a zero entry, row 2 is misclassified.
PROBS = np.array(
    [
        [0.70, 0.20, 0.10],
        [0.25, 0.75, 0.00],
        [0.20, 0.30, 0.50],
    ]
)
LABELS = np.array([0, 1, 0])


# ------------------------------------------------------------------------------------------------
# Features.


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("correctness", [1.0, 1.0, 0.0]),
        ("confidence", [0.70, 0.75, 0.20]),
        (
            "entropy",  # 0 log 0 = 0 in row 1
            [
                -(0.7 * ln(0.7) + 0.2 * ln(0.2) + 0.1 * ln(0.1)),  # 0.801819
                -(0.25 * ln(0.25) + 0.75 * ln(0.75)),  # 0.562335
                -(0.2 * ln(0.2) + 0.3 * ln(0.3) + 0.5 * ln(0.5)),  # 1.029653
            ],
        ),
        (
            "m_entropy",  # -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)
            [
                -0.3 * ln(0.7) - 0.2 * ln(0.8) - 0.1 * ln(0.9),  # 0.162167
                -0.25 * ln(0.75) - 0.25 * ln(0.75) - 0.0,  # 0.143841
                -0.8 * ln(0.2) - 0.3 * ln(0.7) - 0.5 * ln(0.5),  # 1.741126
            ],
        ),
    ],
)
def test_scalar_features_match_hand_values(kind, expected):
    features = mia.mia_features(PROBS, LABELS, kind)
    assert features.shape == (3, 1)
    assert features.dtype == np.float64
    np.testing.assert_allclose(features[:, 0], expected, rtol=1e-12)


def test_hand_values_as_literals():
    # The same hand computations, as decimals, so a wrong formula above cannot hide a wrong value.
    np.testing.assert_allclose(
        mia.mia_features(PROBS, LABELS, "entropy")[:, 0], [0.801819, 0.562335, 1.029653], atol=1e-6
    )
    np.testing.assert_allclose(
        mia.mia_features(PROBS, LABELS, "m_entropy")[:, 0],
        [0.162167, 0.143841, 1.741126],
        atol=1e-6,
    )


def test_prob_feature_is_the_probability_vector():
    np.testing.assert_array_equal(mia.mia_features(PROBS, LABELS, "prob"), PROBS)


def test_m_entropy_fixed_clips_log_of_zero():
    # p_y = 0: -(1 - 0) log(max(0, 1e-30)) = 69.08; p_i = 1 for i != y: -1 * log(1e-30) again.
    probs = np.array([[1.0, 0.0]])
    value = mia.mia_features(probs, np.array([1]), "m_entropy")[0, 0]
    assert value == pytest.approx(-2 * LOG_FLOOR)
    assert np.isfinite(value)


def test_m_entropy_upstream_hand_derived():
    # labels {0, 1, 0}: the label set S = {0, 1} selects whole columns 0 and 1, which get weight
    # (1 - p); column 2 keeps weight p. The log is log p everywhere (log(0) -> log(1e-30)).
    expected = [
        -(0.3 * ln(0.7) + 0.8 * ln(0.2)) - 0.1 * ln(0.1),  # 1.624811
        -(0.75 * ln(0.25) + 0.25 * ln(0.75)) - 0.0 * LOG_FLOOR,  # 1.111641
        -(0.8 * ln(0.2) + 0.7 * ln(0.3)) - 0.5 * ln(0.5),  # 2.476905
    ]
    got = mia.m_entropy_upstream(PROBS, LABELS)
    assert got.shape == (3, 1)
    np.testing.assert_allclose(got[:, 0], expected, rtol=1e-12)
    np.testing.assert_allclose(got[:, 0], [1.624811, 1.111641, 2.476905], atol=1e-6)


def test_m_entropy_upstream_depends_on_the_other_samples_in_the_call():
    # Row 0 alone (S = {0}) differs from row 0 within the batch above (S = {0, 1}).
    alone = mia.m_entropy_upstream(PROBS[:1], LABELS[:1])[0, 0]
    assert alone == pytest.approx(-(0.3 * ln(0.7)) - 0.2 * ln(0.2) - 0.1 * ln(0.1))
    # A zero probability in a selected column contributes -log(1e-30) = 69.08.
    zero_in_s = mia.m_entropy_upstream(PROBS[1:2], np.array([2]))[0, 0]
    entropy_row1 = -(0.25 * ln(0.25) + 0.75 * ln(0.75))
    assert zero_in_s == pytest.approx(entropy_row1 - LOG_FLOOR)


def _upstream_transliteration(p, labels):
    """The upstream torch lines, line by line in numpy (same advanced-indexing semantics)."""
    log_prob = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), LOG_FLOOR)
    reverse_prob = 1 - p
    log_reverse_prob = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), LOG_FLOOR)
    modified_probs = p.copy()
    modified_probs[:, labels] = reverse_prob[:, labels]
    modified_log_probs = log_reverse_prob.copy()
    modified_log_probs[:, labels] = log_prob[:, labels]
    return -np.sum(modified_probs * modified_log_probs, axis=-1)


@pytest.mark.parametrize("labels_range", [4, 10])  # some classes absent / all present
def test_m_entropy_upstream_matches_transliteration(labels_range):
    rng = np.random.default_rng(0)
    probs = mia.from_logits(rng.normal(size=(40, 10)) * 3).astype(np.float64)
    probs[0] = np.eye(10)[3]  # exact zeros, as float32 softmax underflow produces
    labels = rng.integers(0, labels_range, size=40)
    np.testing.assert_allclose(
        mia.m_entropy_upstream(probs, labels)[:, 0],
        _upstream_transliteration(probs, labels),
        rtol=1e-12,
    )


def test_from_logits():
    probs = mia.from_logits(np.array([[0.0, 0.0], [ln(3.0), 0.0]], dtype=np.float32))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, [[0.5, 0.5], [0.75, 0.25]], rtol=1e-6)
    np.testing.assert_allclose(mia.from_logits(jnp.array([[1000.0, 0.0]])), [[1.0, 0.0]])


# ------------------------------------------------------------------------------------------------
# The SVC attack.


def _members(rng, n, num_classes=10):
    """Confident, correct predictions: p_y in [0.97, 0.99]."""
    labels = np.arange(n) % num_classes
    p_y = rng.uniform(0.97, 0.99, size=n)
    probs = np.repeat(((1 - p_y) / (num_classes - 1))[:, None], num_classes, axis=1)
    probs[np.arange(n), labels] = p_y
    return probs, labels


def _non_members(rng, n, num_classes=10):
    """Unsure, wrong predictions: p_y ~ 0.1, class y+1 gets 0.3, the rest share what is left."""
    labels = np.arange(n) % num_classes
    p_y = rng.uniform(0.08, 0.12, size=n)
    probs = np.repeat(((0.7 - p_y) / (num_classes - 2))[:, None], num_classes, axis=1)
    probs[np.arange(n), labels] = p_y
    probs[np.arange(n), (labels + 1) % num_classes] = 0.3
    return probs, labels


@pytest.fixture(scope="module")
def shadow():
    rng = np.random.default_rng(0)
    member_p, member_y = _members(rng, 60)
    nonmember_p, nonmember_y = _non_members(rng, 60)
    return member_p, member_y, nonmember_p, nonmember_y, rng


@pytest.mark.parametrize("m_entropy", ["fixed", "upstream"])
@pytest.mark.parametrize(
    "n_member, n_nonmember, expected", [(40, 0, 0.0), (0, 40, 1.0), (20, 20, 0.5)]
)
def test_svc_mia_known_answers(shadow, m_entropy, n_member, n_nonmember, expected):
    member_p, member_y, nonmember_p, nonmember_y, rng = shadow
    parts = []
    if n_member:
        parts.append(_members(rng, n_member))
    if n_nonmember:
        parts.append(_non_members(rng, n_nonmember))
    target_p = np.concatenate([p for p, _ in parts])
    target_y = np.concatenate([y for _, y in parts])
    result = mia.svc_mia(
        member_p, member_y, nonmember_p, nonmember_y, target_p, target_y, m_entropy=m_entropy
    )
    assert list(result) == list(mia.FEATURE_KINDS)
    for kind, value in result.items():
        assert isinstance(value, float)
        assert value == pytest.approx(expected, abs=0.03), kind


def test_mia_efficacy_is_percent_confidence(shadow):
    member_p, member_y, nonmember_p, nonmember_y, rng = shadow
    target_p = np.concatenate([_members(rng, 10)[0], _non_members(rng, 30)[0]])
    target_y = np.concatenate([np.arange(10) % 10, np.arange(30) % 10])
    only_confidence = mia.svc_mia(
        member_p, member_y, nonmember_p, nonmember_y, target_p, target_y, kinds=("confidence",)
    )
    assert list(only_confidence) == ["confidence"]
    assert 100 * only_confidence["confidence"] == pytest.approx(75.0, abs=3.0)


# ------------------------------------------------------------------------------------------------
# Bad inputs.


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (PROBS, LABELS[:2], "3 rows but its labels have length 2"),
        (PROBS * 2, LABELS, "rows must sum to 1"),
        (np.log(PROBS + 1e-3), LABELS, "negative entries"),
        (np.zeros((0, 3)), np.zeros((0,), dtype=int), "empty"),
        (PROBS, np.array([0, 1, 3]), r"labels must lie in \[0, 3\)"),
        (PROBS, np.array([0.0, 1.5, 0.0]), "must be integers"),
        (PROBS[0], LABELS, r"\[N, K\]"),
        (np.full((3, 3), np.nan), LABELS, "NaN"),
    ],
)
def test_mia_features_rejects_bad_inputs(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        mia.mia_features(probs, labels, "confidence")


def test_float_labels_holding_integers_are_accepted():
    got = mia.mia_features(PROBS, LABELS.astype(np.float32), "confidence")
    np.testing.assert_allclose(got[:, 0], [0.7, 0.75, 0.2])


def test_svc_mia_rejects_bad_inputs():
    p, y = PROBS, LABELS
    with pytest.raises(ValueError, match="Unknown MIA feature kind"):
        mia.mia_features(p, y, "loss")
    with pytest.raises(ValueError, match="Unknown MIA feature kind"):
        mia.svc_mia(p, y, p, y, p, y, kinds=("confidence", "loss"))
    with pytest.raises(ValueError, match="m_entropy must be"):
        mia.svc_mia(p, y, p, y, p, y, m_entropy="buggy")
    with pytest.raises(ValueError, match="target_probs is empty"):
        mia.svc_mia(p, y, p, y, np.zeros((0, 3)), np.zeros((0,), dtype=int))
    with pytest.raises(ValueError, match="shadow_test_probs has 3 rows"):
        mia.svc_mia(p, y, p, y[:1], p, y)
    with pytest.raises(ValueError, match="same number of classes"):
        mia.svc_mia(p, y, p, y, np.full((2, 4), 0.25), np.array([0, 1]))


# ------------------------------------------------------------------------------------------------
# Accuracies and Avg. Gap.


def test_accuracy():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    labels = np.array([0, 1, 1, 1])  # 3 of 4 correct
    assert metrics_module.accuracy(logits, labels) == 75.0
    assert metrics_module.accuracy(jnp.asarray(logits), jnp.asarray(labels)) == 75.0


def test_accuracy_rejects_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        metrics_module.accuracy(np.zeros((0, 2)), np.zeros((0,), dtype=int))
    with pytest.raises(ValueError, match="4 rows but labels have length 3"):
        metrics_module.accuracy(np.zeros((4, 2)), np.zeros((3,), dtype=int))
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        metrics_module.accuracy(np.zeros((4,)), np.zeros((4,), dtype=int))


RETRAIN_ROW = {"UA": 5.24, "MIA": 12.88, "RA": 100.00, "TA": 94.26}  # SalUn Table 1


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"UA": 0.63, "MIA": 2.13, "RA": 99.88, "TA": 94.06}, 3.92),  # FT
        ({"UA": 7.61, "MIA": 37.36, "RA": 99.67, "TA": 92.83}, 7.15),  # RL
        ({"UA": 0.69, "MIA": 1.70, "RA": 99.50, "TA": 94.01}, 4.12),  # GA
        ({"UA": 2.85, "MIA": 14.39, "RA": 99.62, "TA": 93.93}, 1.15),  # SalUn
    ],
)
def test_avg_gap_reproduces_paper_table(row, expected):
    assert metrics_module.avg_gap(row, RETRAIN_ROW) == pytest.approx(expected, abs=0.006)


def test_gaps_per_key_ft_row():
    ft = {"UA": 0.63, "MIA": 2.13, "RA": 99.88, "TA": 94.06}
    got = metrics_module.gaps(ft, RETRAIN_ROW)
    assert got == pytest.approx({"UA": 4.61, "RA": 0.12, "TA": 0.20, "MIA": 10.75})
    assert metrics_module.avg_gap(ft, RETRAIN_ROW) == pytest.approx(3.92)
    assert metrics_module.avg_gap(ft, RETRAIN_ROW, keys=("UA",)) == pytest.approx(4.61)


def test_avg_gap_names_missing_keys():
    with pytest.raises(ValueError, match=r"metrics lacks \['TA'\], reference lacks \[\]"):
        metrics_module.avg_gap({"UA": 1, "RA": 2, "MIA": 3}, RETRAIN_ROW)
    with pytest.raises(ValueError, match=r"reference lacks \['MIA'\]"):
        metrics_module.gaps(RETRAIN_ROW, {"UA": 1, "RA": 2, "TA": 3})


def test_docstring_examples_run():
    from salun_jax import optim

    outcome = doctest.testmod(optim, optionflags=doctest.ELLIPSIS)
    assert outcome.attempted > 0 and outcome.failed == 0


def _encode_ids(ids):
    """Images that carry their index, as uint8 pairs (hi, lo) so indices above 255 fit."""
    return np.stack([ids // 256, ids % 256], -1).astype(np.uint8).reshape(-1, 1, 1, 2)


def _lookup_predict_fn(variables, images):
    """A 'model' that looks its logits up by image index in `variables["table"]`."""
    ids = images[..., 0].astype(jnp.int32) * 256 + images[..., 1].astype(jnp.int32)
    return variables["table"][ids.reshape(-1)]


def test_evaluate_unlearning_on_a_constructed_model():
    """A 'model' that looks its answer up by image index: UA/RA/TA and MIA are known exactly."""
    from salun_jax.data.splits import make_split
    from salun_jax.evaluation.classification import evaluate_unlearning

    rng = np.random.default_rng(0)
    n_train, n_test, k = 200, 60, 4
    train_labels = rng.integers(0, k, n_train).astype(np.int32)
    test_labels = rng.integers(0, k, n_test).astype(np.int32)
    split = make_split(
        train_labels, test_labels, scenario="random", num_forget=20, val_fraction=0.0
    )
    # Train images carry their index in [0, 200); test images in [200, 260).
    train_images = _encode_ids(np.arange(n_train))
    test_images = _encode_ids(np.arange(n_train, 260))
    predicted = np.concatenate([train_labels, test_labels]).copy()
    wrong = split.forget[:5]  # 5 of 20 forget images misclassified -> UA = 25
    predicted[wrong] = (predicted[wrong] + 1) % k
    confidence = np.where(np.arange(260) < n_train, 8.0, 0.5)  # members confident, others not
    logits_table = np.eye(k)[predicted] * confidence[:, None]

    metrics = evaluate_unlearning(
        _lookup_predict_fn,
        {"table": jnp.asarray(logits_table)},
        train_images,
        train_labels,
        test_images,
        test_labels,
        split,
        mia_kinds=("confidence", "entropy"),
    )
    assert metrics["UA"] == 25.0
    assert metrics["RA"] == 100.0 and metrics["TA"] == 100.0
    # Forget images look like members except the 5 misclassified ones (p_y tiny): 5/20 non-member.
    assert metrics["MIA"] == 25.0
    assert set(metrics["MIA_all"]) == {"confidence", "entropy"}


# ------------------------------------------------------------------------------------------------
# Shadow-set sampling and the loss MIA.


def _class_sorted_run(n_train=400, n_test=120, num_forget=40, k=4, seed=3):
    """A class-sorted data set, a random split and a lookup 'model' with random logits."""
    from salun_jax.data.splits import make_split

    rng = np.random.default_rng(seed)
    train_labels = np.sort(rng.integers(0, k, n_train)).astype(np.int32)
    test_labels = np.sort(rng.integers(0, k, n_test)).astype(np.int32)
    split = make_split(
        train_labels, test_labels, scenario="random", num_forget=num_forget, val_fraction=0.0
    )
    table = 3.0 * rng.normal(size=(n_train + n_test, k))
    images = _encode_ids(np.arange(n_train)), _encode_ids(np.arange(n_train, n_train + n_test))
    args = (
        _lookup_predict_fn,
        {"table": jnp.asarray(table)},
        images[0],
        train_labels,
        images[1],
        test_labels,
        split,
    )
    return args, table


def test_stratified_shadow_indices_match_class_histograms():
    member_labels = np.repeat(np.arange(4), [300, 100, 50, 45])  # class-sorted, skewed
    nonmember_labels = np.repeat(np.arange(4), [40, 40, 40, 40])
    member, nonmember = mia.stratified_shadow_indices(member_labels, nonmember_labels, 7)
    # Every class fits, so the smaller (non-member) side is taken whole and matched class by class.
    np.testing.assert_array_equal(nonmember, np.arange(160))
    np.testing.assert_array_equal(np.bincount(member_labels[member]), [40, 40, 40, 40])
    assert len(np.unique(member)) == 160
    # Upstream's first-160 members would all be class 0.
    assert np.all(member_labels[:160] == 0)
    # Same seed (int or Generator), same sets; another seed, other members.
    again = mia.stratified_shadow_indices(member_labels, nonmember_labels, np.random.default_rng(7))
    np.testing.assert_array_equal(again[0], member)
    other = mia.stratified_shadow_indices(member_labels, nonmember_labels, 8)
    assert not np.array_equal(other[0], member)


def test_stratified_shadow_indices_unequal_and_unmatchable_classes():
    # Members smaller: n = 90; quotas proportional to the per-class minima (60, 20, 30) -> 90.
    member_labels = np.repeat(np.arange(3), [60, 20, 10])
    nonmember_labels = np.repeat(np.arange(3), [80, 30, 30])
    member, nonmember = mia.stratified_shadow_indices(member_labels, nonmember_labels, 0)
    np.testing.assert_array_equal(np.bincount(member_labels[member]), [60, 20, 10])
    np.testing.assert_array_equal(np.bincount(nonmember_labels[nonmember]), [60, 20, 10])
    # Class 2 absent from the members: minima sum to 60 < n = 70, so both sides are topped up.
    member_labels = np.repeat(np.arange(2), [40, 30])
    nonmember_labels = np.repeat(np.arange(3), [20, 20, 60])
    member, nonmember = mia.stratified_shadow_indices(member_labels, nonmember_labels, 0)
    assert len(member) == len(nonmember) == 70
    assert np.bincount(nonmember_labels[nonmember], minlength=3)[:2].tolist() >= [20, 20]
    with pytest.raises(ValueError, match="empty"):
        mia.stratified_shadow_indices(np.array([], np.int64), nonmember_labels, 0)
    with pytest.raises(ValueError, match="integer"):
        mia.stratified_shadow_indices(member_labels.astype(float), nonmember_labels, 0)


@pytest.mark.parametrize("num_forget", [40, 300])  # retain larger / smaller than test
def test_evaluate_unlearning_first_n_shadow_sets_are_upstreams(num_forget):
    from salun_jax.evaluation.classification import evaluate_unlearning

    args, table = _class_sorted_run(num_forget=num_forget)
    _, _, _, train_labels, _, test_labels, split = args
    kinds = ("confidence", "entropy")
    metrics = evaluate_unlearning(*args, mia_kinds=kinds, mia_shadow="first_n")
    assert set(metrics) == {"UA", "RA", "TA", "MIA", "MIA_all"}  # schema unchanged
    # Today's computation, spelled out: the first n retain vs the first n test samples.
    n = min(len(split.retain), len(split.test))
    test_rows = len(train_labels) + split.test
    expected = mia.svc_mia(
        mia.from_logits(table[split.retain][:n]),
        train_labels[split.retain][:n],
        mia.from_logits(table[test_rows][:n]),
        test_labels[split.test][:n],
        mia.from_logits(table[split.forget]),
        train_labels[split.forget],
        kinds=kinds,
    )
    assert metrics["MIA_all"] == {kind: 100.0 * value for kind, value in expected.items()}


def test_evaluate_unlearning_with_shadow_seed_and_loss_mia():
    from salun_jax.evaluation.classification import evaluate_unlearning

    args, _ = _class_sorted_run()
    first = evaluate_unlearning(*args, shadow_seed=5, loss_mia=True)
    assert first["shadow_seed"] == 5
    assert 0.0 <= first["MIA_loss"] <= 100.0
    assert evaluate_unlearning(*args, shadow_seed=5, loss_mia=True) == first  # reproducible
    plain = evaluate_unlearning(*args, mia_shadow="first_n")
    assert {k: first[k] for k in ("UA", "RA", "TA")} == {k: plain[k] for k in ("UA", "RA", "TA")}
    both = evaluate_unlearning(*args, shadow_seed=5, also_first_n=True)
    assert both["MIA"] == first["MIA"]  # the stratified MIA, unchanged
    assert both["MIA_first_n"] == plain["MIA"]  # upstream's sets, on the same model


def test_loss_mia_separable_and_identical():
    rng = np.random.default_rng(0)
    forget = rng.uniform(0.0, 0.1, 500)  # members: tiny losses
    test = rng.uniform(1.0, 3.0, 200)
    assert mia.loss_mia(forget, test, seed=0) == 1.0
    same = mia.loss_mia(rng.exponential(size=500), rng.exponential(size=500), seed=0)
    assert abs(same - 0.5) < 0.1
    assert mia.loss_mia(forget, test, seed=1) == mia.loss_mia(forget, test, seed=1)
    with pytest.raises(ValueError, match="at least 10"):
        mia.loss_mia(forget[:5], test, seed=0)
    with pytest.raises(ValueError, match="NaN"):
        mia.loss_mia(np.full(20, np.nan), test, seed=0)


def test_evaluate_unlearning_names_non_finite_outputs():
    """Finite weights too large to use (a diverged run's last update) give NaN / infinite
    logits: one clear error counting the images, not a crash inside the MIA's SVC."""
    from salun_jax.evaluation.classification import NonFiniteOutputsError, evaluate_unlearning

    args, table = _class_sorted_run()
    table = table.copy()
    table[[0, 5, 401]] = [np.nan, np.inf, -np.inf, 0.0]  # 3 of the 400 + 120 images' rows
    split = args[-1]
    used = np.concatenate([split.forget, split.retain, 400 + split.test])
    expected = int(np.isin([0, 5, 401], used).sum())
    assert expected == 3  # every train image is in forget or retain, every test image in test
    with pytest.raises(NonFiniteOutputsError, match=f"on {expected} of {len(used)} images"):
        evaluate_unlearning(args[0], {"table": jnp.asarray(table)}, *args[2:])
