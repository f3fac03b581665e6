"""Audits from populations (`salun_jax.auditing`) on constructed cases: the balanced in-masks,
U-LiRA and KLoM of identical and of separated populations, weight space, and the relearning
attack (it brings back what a model never forgot, and not what Retrain never saw)."""

import dataclasses

import numpy as np
import pytest

from salun_jax import auditing, population
from salun_jax.data.splits import make_split
from salun_jax.models import create_model
from salun_jax.train import TrainConfig
from salun_jax.unlearn import UnlearnConfig, UnlearnTask


def test_in_masks_hold_each_example_in_exactly_half_the_groups():
    masks = auditing.in_masks(11, 4, seed=3)
    assert masks.shape == (4, 11)
    np.testing.assert_array_equal(masks.sum(axis=0), 2)
    np.testing.assert_array_equal(masks[0], ~masks[1])
    np.testing.assert_array_equal(masks, auditing.in_masks(11, 4, seed=3))  # explicit key
    assert not np.array_equal(masks, auditing.in_masks(11, 4, seed=4))
    held = auditing.member_in(masks, 3)
    assert held.shape == (12, 11) and np.all(held.sum(axis=0) == 6)
    shadow = auditing.shadow_members(12, 3)
    assert shadow.tolist() == [True, False, True] * 4
    with pytest.raises(ValueError, match="even"):
        auditing.in_masks(11, 3, seed=0)


def _design(members=16, group_size=4, examples=60):
    masks = auditing.in_masks(examples, members // group_size, seed=0)
    return auditing.member_in(masks, group_size), auditing.shadow_members(members, group_size)


def test_identical_populations_sit_at_chance_and_separated_ones_do_not():
    held, shadow = _design()
    rng = np.random.default_rng(0)
    means = rng.normal(0.0, 3.0, held.shape[1])  # per-example difficulty
    retrained = means + rng.normal(size=held.shape)
    # The same models on both sides: the attack cannot tell them apart; KLoM is 0.
    same = auditing.ulira_and_klom(retrained, np.ones_like(held), retrained, shadow, shadow)
    assert same["ulira"]["auc"] == pytest.approx(0.5, abs=1e-12)
    np.testing.assert_allclose(same["klom"], 0.0)
    # Half the members per example (the design), drawn from Retrain's distribution: chance.
    fresh = means + rng.normal(size=held.shape)
    chance = auditing.ulira_and_klom(fresh, held, retrained, shadow, shadow)
    assert chance["ulira"]["auc"] == pytest.approx(0.5, abs=0.06)
    # Unlearned models whose margins stay 3 sigma above Retrain's: found, KLoM large.
    unlearned = means + 3.0 + rng.normal(size=held.shape)
    apart = auditing.ulira_and_klom(unlearned, held, retrained, shadow, shadow)
    assert apart["ulira"]["auc"] > 0.95
    assert apart["ulira"]["tpr_at_0.01_fpr"] > 0.3
    assert np.mean(apart["klom"]) > 1.0
    with pytest.raises(ValueError, match="as many members"):
        bad = held.copy()
        bad[0, 0] = not bad[0, 0]
        auditing.ulira_and_klom(retrained, bad, retrained, shadow, shadow)


@pytest.fixture(scope="module")
def classwise(digits):
    """Digit 0 forgotten class-wise; two originals (all classes) and two Retrain models."""
    images, labels = digits.train_images[:400], digits.train_labels[:400]
    split = make_split(
        labels, digits.test_labels, scenario="class", forget_class=0, val_fraction=0.0
    )
    model = create_model("small_cnn", 10, digits.mean, digits.std, 0.25)
    recipe = TrainConfig(
        model="small_cnn",
        width=0.25,
        epochs=6,
        batch_size=64,
        learning_rate=0.05,
        milestones=(),
        crop_padding=0,
        flip=False,
    )

    def train(indices, seeds):
        return population.population_train_classifier(
            images, labels, indices, model, recipe, seeds
        ).state

    task = UnlearnTask(model, images, labels, split, 10)
    return task, train(split.train, (0, 1)), train(split.retain, (0, 1))


def test_weight_space_of_a_model_to_itself_and_along_the_line(classwise):
    task, originals, retrained = classwise
    images, labels = task.images[:64], task.labels[:64]
    same = auditing.weight_space(originals, originals, retrained, images, labels)
    np.testing.assert_allclose(same["l2_original"], 0.0)
    np.testing.assert_allclose(same["loss_barrier"], 0.0, atol=1e-9)
    apart = auditing.weight_space(retrained, originals, retrained, images, labels)
    assert np.all(apart["l2_original"] > 0.1)
    np.testing.assert_allclose(apart["l2_retrain"], 0.0)
    np.testing.assert_allclose(apart["l2_original"], same["l2_retrain"])


def test_relearning_brings_back_what_was_never_forgotten_and_not_what_retrain_never_saw(
    classwise,
):
    task, originals, retrained = classwise
    rng = np.random.default_rng(0)
    retain = np.sort(rng.choice(task.retain, 48, replace=False))
    config = UnlearnConfig(learning_rate=0.05, crop_padding=0, flip=False)
    forget = np.asarray(task.forget)
    relearn = dict(eval_indices=forget[4:], config=config, steps=5, seeds=(3, 4))
    original_curve = auditing.relearning_curve(originals, task, retain, **relearn)
    retrain_curve = auditing.relearning_curve(retrained, task, retain, **relearn)
    assert original_curve.shape == (6, 2)
    # Original never forgot: the attack leaves it at its own forget accuracy.
    assert np.all(original_curve[0] > 80.0)
    assert np.all(original_curve[-1] >= original_curve[0] - 10.0)
    # Retrain never saw digit 0: retain data cannot lift it beyond its own level.
    assert np.all(retrain_curve[0] < 5.0)
    assert np.all(retrain_curve[-1] <= retrain_curve[0] + 5.0)
    # A model a few ascent steps from Original ("forgot" shallowly) is brought back by a few
    # steps on retain data with 4 forget examples.
    damaged = population.population_unlearn(
        "GA",
        originals,
        task,
        dataclasses.replace(config, epochs=1, learning_rate=0.05, batch_size=16),
        (5, 6),
    ).state
    train = np.concatenate([retain, forget[:4]])
    damaged_curve = auditing.relearning_curve(damaged, task, train, **{**relearn, "steps": 10})
    assert np.all(damaged_curve[0] < original_curve[0] - 40.0)
    assert np.all(damaged_curve[-1] > original_curve[0] - 20.0)
